//! The router: maps model names to replicas and owns admission. Each model has a bounded
//! in-flight count per replica and one bounded wait queue; a request goes to the ready replica
//! with the fewest requests in flight, waits in the queue when all are busy, and is refused
//! (503) when the queue is full. Handlers get the job's event stream at once and never wait on
//! the router for a generation.
//!
//! Replicas have a role: `Active` ones serve; `Standby` ones are a reload's new generation,
//! loading beside the old one (make-before-break); `Retiring` ones are an old generation that
//! finishes its in-flight jobs and takes no new ones.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::admin::Failure;
use super::engine::{EngineError, GenerationRequest, Job, Shared, TokenEvent};
use super::model_actor::ModelMsg;
use super::supervisor::SupervisorMsg;
use crate::metrics::Metrics;
use crate::models::ModelInfo;

mod admission;
mod status;

pub use admission::{Admitted, RouteError};
pub use status::{ModelStatus, ReplicaId, ReplicaState, ReplicaStatus, Role};

use admission::{dispatch, fail_queue_if_unservable, start_queued, Replica, Route};
use status::list;

/// How long a refused client is told to wait before retrying, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

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
#[derive(ractor_cluster::RactorMessage)]
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
    /// A model's load: requests in flight on its ready replicas and queued for it (`None`
    /// when no replica of it is ready to take one).
    Load(String, RpcReplyPort<Option<usize>>),
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
            RouterMsg::Load(model, reply) => {
                let _ = reply.send(status::load(state, &model));
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
