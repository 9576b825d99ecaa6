//! The router: maps model names to replicas and owns admission. Each model has a bounded
//! in-flight count per replica and one bounded wait queue; a request goes to the ready replica
//! with the fewest requests in flight, waits in the queue when all are busy, and is refused
//! (503) when the queue is full. Handlers get the job's event stream at once and never wait on
//! the router for a generation.
//!
//! Replicas have a role: `Active` ones serve; `Standby` ones are a reload's new generation,
//! loading beside the old one (make-before-break); `Retiring` ones are an old generation that
//! finishes its in-flight jobs and takes no new ones.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc::Receiver;

use super::admin::Failure;
use super::engine::{
    CompletionNotice, EngineError, GenerationRequest, Job, Occupancy, Shared, TokenEvent,
};
use super::model_actor::ModelMsg;
use super::supervisor::SupervisorMsg;
use crate::metrics::Metrics;
use crate::models::ModelInfo;

/// How long a refused client is told to wait before retrying, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Names one replica: a model, its index in the model's device list, and the generation of
/// the model's spec it runs (a reload starts a new generation).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaId {
    /// The model name.
    pub model: String,
    /// The replica's index.
    pub index: usize,
    /// The device, for logs and listings.
    pub device: String,
    /// The spec generation.
    pub generation: u64,
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}@{}", self.model, self.index, self.device)
    }
}

/// A replica's lifecycle state as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaState {
    /// Loading on its engine thread.
    Loading,
    /// Serving.
    Ready,
    /// Crashed; its supervisor restarts it after a backoff. Requests wait in the queue.
    Restarting,
    /// Failed (load error or too many crashes); the failure says why.
    Failed(Failure),
}

/// Whether a replica takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Serves requests.
    Active,
    /// A reload's new generation, loading beside the active one.
    Standby,
    /// An old generation finishing its in-flight jobs.
    Retiring,
}

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// No model by that name.
    #[error("the model {0:?} does not exist")]
    UnknownModel(String),
    /// Every slot and the queue are full.
    #[error("the model {0:?} is overloaded; retry later")]
    Overloaded(String),
    /// No replica is ready yet (loading or restarting) and the model does not queue meanwhile.
    #[error("the model {model:?} is {}; retry later", if *restarting { "restarting" } else { "loading" })]
    NotReady {
        /// The model.
        model: String,
        /// Whether it is restarting after a crash (else loading).
        restarting: bool,
    },
    /// No replica can serve (all failed, or the model is being evicted).
    #[error("the model {model:?} is unavailable: {reason}")]
    Unavailable {
        /// The model.
        model: String,
        /// Why.
        reason: String,
    },
}

/// An admitted request: its event stream, cancel flag and deadlines.
#[derive(Debug)]
pub struct Admitted {
    /// The job's events.
    pub events: Receiver<TokenEvent>,
    /// Setting it stops the job.
    pub cancel: Arc<AtomicBool>,
    /// Longest the job may wait for a slot.
    pub queue_timeout: Duration,
    /// Longest the job may run in all.
    pub request_timeout: Duration,
}

/// One replica's status for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Which replica.
    pub id: ReplicaId,
    /// Its lifecycle state.
    pub state: ReplicaState,
    /// Whether it takes new work.
    pub role: Role,
    /// Jobs sent to it and not yet finished.
    pub in_flight: usize,
    /// The last load error or crash reason.
    pub last_error: Option<String>,
    /// How many times it was restarted.
    pub restarts: usize,
    /// When it last became ready.
    pub loaded_at: Option<SystemTime>,
    /// Bytes of weights it holds on its device, once loaded.
    pub memory_bytes: Option<u64>,
    /// How much the GPU's memory in use grew while it loaded (GPUs only).
    pub device_memory_bytes: Option<u64>,
    /// Its engine's sequences and KV blocks, once it has an engine.
    pub occupancy: Option<Occupancy>,
}

/// A model's status for listings.
#[derive(Debug, Clone)]
pub struct ModelStatus {
    /// The model name.
    pub name: String,
    /// Its replicas.
    pub replicas: Vec<ReplicaStatus>,
    /// Requests waiting.
    pub queued: usize,
    /// Whether it is being evicted.
    pub draining: bool,
    /// How long it has been idle (nothing in flight or queued), if it is.
    pub idle_for: Option<Duration>,
    /// Whether it loads on demand (not at startup, or again after an idle unload).
    pub lazy: bool,
    /// The model's facts, once a replica has loaded.
    pub info: Option<ModelInfo>,
}

impl ModelStatus {
    /// Whether it has no replica and loads on its next request.
    pub fn unloaded(&self) -> bool {
        self.lazy && self.replicas.is_empty()
    }

    /// Active replicas that are ready.
    pub fn ready_replicas(&self) -> usize {
        self.replicas
            .iter()
            .filter(|r| r.role == Role::Active && r.state == ReplicaState::Ready)
            .count()
    }
}

/// One replica registered with the router.
pub struct ReplicaEntry {
    /// Its id.
    pub id: ReplicaId,
    /// Its actor (`None` when it could not be started, e.g. its device is missing).
    pub actor: Option<ActorRef<ModelMsg>>,
    /// Whether it loads beside the active generation (a make-before-break reload).
    pub standby: bool,
    /// Its engine's shared state, to read its occupancy (`None` without an engine).
    pub engine: Option<Arc<Shared>>,
}

/// One model's admission limits.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// The model name.
    pub name: String,
    /// Requests generating at once per replica (`None`: as many sequences as its engine runs).
    pub max_concurrent: Option<usize>,
    /// Waiting requests before 503.
    pub max_queue: usize,
    /// Loaded on the first request (and again after an idle unload).
    pub lazy: bool,
    /// Longest a request may wait for a slot.
    pub queue_timeout: Duration,
    /// Longest a request may run in all.
    pub request_timeout: Duration,
    /// Whether requests wait while no replica is ready but one is loading or restarting.
    pub queue_during_load: bool,
    /// Longest a stream may stay paused by a client that reads nothing.
    pub slow_reader_timeout: Duration,
}

/// Messages the router handles.
pub enum RouterMsg {
    /// Admit a request for a model.
    Dispatch {
        /// The model name.
        model: String,
        /// The request.
        request: GenerationRequest,
        /// Where the admission result goes.
        reply: RpcReplyPort<Result<Admitted, RouteError>>,
    },
    /// Adds a model (or updates its limits when it exists).
    AddRoute(RouteSpec),
    /// Removes a model; queued requests end with `model_evicted`.
    RemoveRoute(String),
    /// Starts or stops refusing new requests for a model (an evict drains it).
    SetDraining(String, bool),
    /// Holds (or releases) a model's queue while it is unloaded to make room or for idleness;
    /// requests that arrive meanwhile wait and trigger a new load.
    Park(String, bool),
    /// A replica's actor started (sent by the actor itself, before it reports its load).
    Register(ReplicaEntry),
    /// A replica finished loading.
    ReplicaLoaded {
        /// Which one.
        replica: ReplicaId,
        /// Its facts, or the load error.
        result: Result<ModelInfo, Failure>,
    },
    /// A replica's actor died.
    ReplicaDown {
        /// Which one.
        replica: ReplicaId,
        /// Why.
        reason: String,
        /// Whether the supervisor will restart it (else it is failed until an admin reload).
        restarting: bool,
    },
    /// Jobs a dead replica never started: queue them again, at the front.
    Requeue {
        /// The replica they were sent to.
        replica: ReplicaId,
        /// The jobs.
        jobs: Vec<Job>,
    },
    /// A job left a replica instance (finished, failed or abandoned).
    Release(ReplicaId, u64),
    /// Makes a model's standby generation active and its active generation retiring.
    Promote {
        /// The model.
        model: String,
        /// The standby generation.
        generation: u64,
    },
    /// Drops replicas from the table (retired or abandoned ones).
    Forget(Vec<ReplicaId>),
    /// Lists every model's status.
    List(RpcReplyPort<Vec<ModelStatus>>),
}

struct Replica {
    id: ReplicaId,
    /// Which incarnation this is; a restart registers a new one, so releases of jobs from a
    /// dead incarnation do not free slots of the live one.
    epoch: u64,
    actor: Option<ActorRef<ModelMsg>>,
    state: ReplicaState,
    role: Role,
    in_flight: usize,
    last_error: Option<String>,
    restarts: usize,
    loaded_at: Option<SystemTime>,
    info: Option<ModelInfo>,
    registered_at: Instant,
    engine: Option<Arc<Shared>>,
}

impl Replica {
    fn serves(&self) -> bool {
        self.role == Role::Active && self.state == ReplicaState::Ready && self.actor.is_some()
    }

    /// Whether it takes another job: fewer in flight than the model's `max_concurrent`, or
    /// without one than the sequences its engine runs at once.
    fn has_slot(&self, max_concurrent: Option<usize>) -> bool {
        let slots = max_concurrent.unwrap_or_else(|| self.info.as_ref().map_or(1, |i| i.max_seqs));
        self.serves() && self.in_flight < slots
    }
}

struct Route {
    replicas: Vec<Replica>,
    queue: VecDeque<Job>,
    spec: RouteSpec,
    max_concurrent: Option<usize>,
    max_queue: usize,
    draining: bool,
    lazy: bool,
    parked: bool,
    load_requested: bool,
    last_active: Instant,
}

impl Route {
    fn new(spec: &RouteSpec) -> Self {
        Self {
            replicas: Vec::new(),
            queue: VecDeque::new(),
            spec: spec.clone(),
            max_concurrent: spec.max_concurrent,
            max_queue: spec.max_queue,
            draining: false,
            lazy: spec.lazy,
            parked: false,
            load_requested: false,
            last_active: Instant::now(),
        }
    }

    fn busy(&self) -> bool {
        !self.queue.is_empty() || self.replicas.iter().any(|r| r.in_flight > 0)
    }

    /// Asks the supervisor to load a lazy model that has work waiting and no replica.
    fn request_load(&mut self, name: &str, supervisor: &ActorRef<SupervisorMsg>) {
        let unloaded = !self.replicas.iter().any(|r| r.role == Role::Active);
        if self.lazy && unloaded && !self.parked && !self.queue.is_empty() && !self.load_requested {
            self.load_requested = true;
            let _ = supervisor.cast(SupervisorMsg::EnsureLoaded(name.to_string()));
        }
    }

    fn replica(&mut self, id: &ReplicaId) -> Option<&mut Replica> {
        self.replicas.iter_mut().find(|r| &r.id == id)
    }
}

/// The router actor.
pub struct Router;

/// The router's state: one route per model.
pub struct RouterState {
    routes: HashMap<String, Route>,
    order: Vec<String>,
    next_epoch: u64,
    supervisor: ActorRef<SupervisorMsg>,
    metrics: Arc<Metrics>,
}

/// What the router is started with.
pub struct RouterArgs {
    /// The models.
    pub routes: Vec<RouteSpec>,
    /// Where load requests for lazy models go.
    pub supervisor: ActorRef<SupervisorMsg>,
    /// Where restarts and load durations are recorded.
    pub metrics: Arc<Metrics>,
}

impl RouterState {
    fn route(&mut self, model: &str) -> Option<&mut Route> {
        self.routes.get_mut(model)
    }
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = RouterArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<RouterMsg>,
        args: RouterArgs,
    ) -> Result<RouterState, ActorProcessingErr> {
        let mut state = RouterState {
            routes: HashMap::new(),
            order: Vec::new(),
            next_epoch: 0,
            supervisor: args.supervisor,
            metrics: args.metrics,
        };
        for spec in args.routes {
            add_route(&mut state, spec);
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<RouterMsg>,
        message: RouterMsg,
        state: &mut RouterState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            RouterMsg::Dispatch {
                model,
                request,
                reply,
            } => {
                let result = dispatch(&myself, state, &model, request);
                let _ = reply.send(result);
            }
            RouterMsg::AddRoute(spec) => add_route(state, spec),
            RouterMsg::RemoveRoute(model) => {
                if let Some(mut route) = state.routes.remove(&model) {
                    state.order.retain(|name| name != &model);
                    for job in route.queue.drain(..) {
                        job.send(TokenEvent::Failed(EngineError::Evicted(format!(
                            "the model {model:?} was evicted"
                        ))));
                    }
                }
            }
            RouterMsg::SetDraining(model, draining) => {
                if let Some(route) = state.route(&model) {
                    route.draining = draining;
                }
            }
            RouterMsg::Park(model, parked) => {
                let supervisor = state.supervisor.clone();
                if let Some(route) = state.route(&model) {
                    route.parked = parked;
                    if !parked {
                        route.lazy = true;
                        route.load_requested = false;
                        route.request_load(&model, &supervisor);
                    }
                }
            }
            RouterMsg::Register(entry) => {
                state.next_epoch += 1;
                let epoch = state.next_epoch;
                let metrics = state.metrics.clone();
                if let Some(route) = state.route(&entry.id.model) {
                    if !entry.standby {
                        route.load_requested = false;
                    }
                    let model = entry.id.model.clone();
                    if register(route, entry, epoch) {
                        metrics.restarts.with_label_values(&[model.as_str()]).inc();
                    }
                }
            }
            RouterMsg::ReplicaLoaded { replica, result } => {
                let metrics = state.metrics.clone();
                if let Some(route) = state.route(&replica.model) {
                    if let Some(entry) = route.replica(&replica) {
                        let outcome = if result.is_ok() { "ok" } else { "error" };
                        metrics
                            .load_duration
                            .with_label_values(&[replica.model.as_str(), outcome])
                            .observe(entry.registered_at.elapsed().as_secs_f64());
                        match result {
                            Ok(info) => {
                                entry.state = ReplicaState::Ready;
                                entry.loaded_at = Some(SystemTime::now());
                                entry.info = Some(info);
                            }
                            Err(err) => {
                                entry.last_error = Some(err.to_string());
                                entry.state = ReplicaState::Failed(err);
                            }
                        }
                    }
                    start_queued(&myself, route);
                    fail_queue_if_unservable(&replica.model, route);
                }
            }
            RouterMsg::ReplicaDown {
                replica,
                reason,
                restarting,
            } => {
                if let Some(route) = state.route(&replica.model) {
                    if let Some(entry) = route.replica(&replica) {
                        entry.last_error = Some(reason.clone());
                        entry.state = if restarting {
                            ReplicaState::Restarting
                        } else {
                            ReplicaState::Failed(Failure::other(reason))
                        };
                        entry.actor = None;
                    }
                    fail_queue_if_unservable(&replica.model, route);
                }
            }
            RouterMsg::Requeue { replica, jobs } => {
                if let Some(route) = state.route(&replica.model) {
                    for mut job in jobs.into_iter().rev() {
                        // Dropping the notice frees the dead replica's slot.
                        job.notice = None;
                        route.queue.push_front(job);
                    }
                    start_queued(&myself, route);
                    fail_queue_if_unservable(&replica.model, route);
                }
            }
            RouterMsg::Release(replica, epoch) => {
                if let Some(route) = state.route(&replica.model) {
                    if let Some(entry) = route
                        .replicas
                        .iter_mut()
                        .find(|r| r.id == replica && r.epoch == epoch)
                    {
                        entry.in_flight = entry.in_flight.saturating_sub(1);
                    }
                    route.last_active = Instant::now();
                    start_queued(&myself, route);
                }
            }
            RouterMsg::Promote { model, generation } => {
                if let Some(route) = state.route(&model) {
                    for replica in route.replicas.iter_mut() {
                        replica.role = match replica.role {
                            Role::Standby if replica.id.generation == generation => Role::Active,
                            Role::Active => Role::Retiring,
                            other => other,
                        };
                    }
                    start_queued(&myself, route);
                }
            }
            RouterMsg::Forget(ids) => {
                for id in ids {
                    if let Some(route) = state.route(&id.model) {
                        route.replicas.retain(|r| r.id != id);
                        fail_queue_if_unservable(&id.model, route);
                    }
                }
            }
            RouterMsg::List(reply) => {
                let _ = reply.send(list(state));
            }
        }
        Ok(())
    }
}

fn add_route(state: &mut RouterState, spec: RouteSpec) {
    match state.routes.get_mut(&spec.name) {
        Some(route) => {
            route.max_concurrent = spec.max_concurrent;
            route.max_queue = spec.max_queue;
            route.spec = spec;
        }
        None => {
            state.order.push(spec.name.clone());
            state.routes.insert(spec.name.clone(), Route::new(&spec));
        }
    }
}

/// Adds (or replaces, on a restart) a replica; returns whether it was a restart.
fn register(route: &mut Route, entry: ReplicaEntry, epoch: u64) -> bool {
    let previous = route.replicas.iter().position(|r| r.id == entry.id);
    let restart = previous.is_some();
    let (last_error, restarts, role) = match previous {
        Some(index) => {
            let old = route.replicas.remove(index);
            (old.last_error, old.restarts + 1, old.role)
        }
        None if entry.standby => (None, 0, Role::Standby),
        None => (None, 0, Role::Active),
    };
    route.replicas.push(Replica {
        id: entry.id,
        epoch,
        actor: entry.actor,
        state: ReplicaState::Loading,
        role,
        in_flight: 0,
        last_error,
        restarts,
        loaded_at: None,
        info: None,
        registered_at: Instant::now(),
        engine: entry.engine,
    });
    route
        .replicas
        .sort_by_key(|r| (r.id.generation, r.id.index));
    restart
}

fn list(state: &RouterState) -> Vec<ModelStatus> {
    state
        .order
        .iter()
        .filter_map(|name| state.routes.get(name).map(|route| (name, route)))
        .map(|(name, route)| ModelStatus {
            name: name.clone(),
            replicas: route
                .replicas
                .iter()
                .map(|r| ReplicaStatus {
                    id: r.id.clone(),
                    state: r.state.clone(),
                    role: r.role,
                    in_flight: r.in_flight,
                    last_error: r.last_error.clone(),
                    restarts: r.restarts,
                    loaded_at: r.loaded_at,
                    memory_bytes: r.info.as_ref().map(|info| info.weights_bytes),
                    device_memory_bytes: r.info.as_ref().and_then(|info| info.device_bytes),
                    occupancy: r.engine.as_ref().map(|engine| engine.occupancy()),
                })
                .collect(),
            queued: route.queue.len(),
            draining: route.draining,
            idle_for: (!route.busy()).then(|| route.last_active.elapsed()),
            lazy: route.lazy,
            info: route
                .replicas
                .iter()
                .filter(|r| r.role == Role::Active)
                .find_map(|r| r.info.clone()),
        })
        .collect()
}

fn dispatch(
    myself: &ActorRef<RouterMsg>,
    state: &mut RouterState,
    model: &str,
    request: GenerationRequest,
) -> Result<Admitted, RouteError> {
    let supervisor = state.supervisor.clone();
    let route = state
        .route(model)
        .ok_or_else(|| RouteError::UnknownModel(model.to_string()))?;
    if route.draining {
        return Err(RouteError::Unavailable {
            model: model.to_string(),
            reason: "it is being evicted".to_string(),
        });
    }
    if let Some(reason) = unservable(route) {
        return Err(RouteError::Unavailable {
            model: model.to_string(),
            reason,
        });
    }
    if !route.spec.queue_during_load && !route.replicas.iter().any(Replica::serves) {
        let starting = route
            .replicas
            .iter()
            .filter(|r| r.role == Role::Active)
            .find(|r| matches!(r.state, ReplicaState::Loading | ReplicaState::Restarting));
        if let Some(replica) = starting {
            return Err(RouteError::NotReady {
                model: model.to_string(),
                restarting: replica.state == ReplicaState::Restarting,
            });
        }
    }
    route.queue.retain(|job| !job.abandoned());
    route.last_active = Instant::now();
    let max = route.max_concurrent;
    let has_free_slot = route.replicas.iter().any(|r| r.has_slot(max));
    if !has_free_slot && route.queue.len() >= route.max_queue {
        return Err(RouteError::Overloaded(model.to_string()));
    }
    let (mut job, events, cancel) = Job::new(request);
    job.slow_reader_timeout = route.spec.slow_reader_timeout;
    route.queue.push_back(job);
    start_queued(myself, route);
    route.request_load(model, &supervisor);
    Ok(Admitted {
        events,
        cancel,
        queue_timeout: route.spec.queue_timeout,
        request_timeout: route.spec.request_timeout,
    })
}

/// Starts queued jobs while some ready active replica has a free slot.
fn start_queued(myself: &ActorRef<RouterMsg>, route: &mut Route) {
    if route.parked {
        return;
    }
    loop {
        let max = route.max_concurrent;
        let Some(replica) = route
            .replicas
            .iter_mut()
            .filter(|r| r.has_slot(max))
            .min_by_key(|r| r.in_flight)
        else {
            return;
        };
        let Some(mut job) = route.queue.pop_front() else {
            return;
        };
        if job.abandoned() {
            continue;
        }
        replica.in_flight += 1;
        let router = myself.clone();
        let (id, epoch) = (replica.id.clone(), replica.epoch);
        job.notice = Some(CompletionNotice::new(move || {
            let _ = router.cast(RouterMsg::Release(id, epoch));
        }));
        if let Some(actor) = &replica.actor {
            if let Err(err) = actor.cast(ModelMsg::Generate(job)) {
                tracing::warn!(replica = %replica.id, error = %err, "replica mailbox closed");
            }
        }
    }
}

/// Returns why no active replica can ever serve this model (every one failed), if so.
fn unservable(route: &Route) -> Option<String> {
    let mut active = route
        .replicas
        .iter()
        .filter(|r| r.role == Role::Active)
        .peekable();
    active.peek()?;
    let mut reasons = Vec::new();
    for replica in active {
        match &replica.state {
            ReplicaState::Failed(reason) => reasons.push(reason.to_string()),
            _ => return None,
        }
    }
    reasons.into_iter().next()
}

/// Ends every queued job with an error when no replica is left to serve them.
fn fail_queue_if_unservable(model: &str, route: &mut Route) {
    if let Some(reason) = unservable(route) {
        for job in route.queue.drain(..) {
            job.send(TokenEvent::Failed(EngineError::Unavailable(format!(
                "the model {model:?} is unavailable: {reason}"
            ))));
        }
    }
}
