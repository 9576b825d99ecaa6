//! The router: maps model names to replicas and owns admission. Each model has a bounded
//! in-flight count per replica and one bounded wait queue; a request goes to the ready replica
//! with the fewest requests in flight, waits in the queue when all are busy, and is refused
//! (503) when the queue is full. Handlers get the job's event stream at once and never wait on
//! the router for a generation.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use tokio::sync::mpsc::UnboundedReceiver;

use super::engine::{CompletionNotice, EngineError, GenerationRequest, Job, TokenEvent};
use super::model_actor::ModelMsg;
use crate::models::ModelInfo;

/// How long a refused client is told to wait before retrying, in seconds.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Names one replica: a model and its index in the model's device list.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ReplicaId {
    /// The model name.
    pub model: String,
    /// The replica's index.
    pub index: usize,
    /// The device, for logs and listings.
    pub device: String,
}

impl fmt::Display for ReplicaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}@{}", self.model, self.index, self.device)
    }
}

/// A replica's state as the router sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicaState {
    /// Loading on its engine thread.
    Loading,
    /// Serving.
    Ready,
    /// Crashed; its supervisor restarts it after a backoff. Requests wait in the queue.
    Restarting,
    /// Failed (load error or crash); the message says why.
    Failed(String),
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
    /// No replica can serve (all failed).
    #[error("the model {model:?} is unavailable: {reason}")]
    Unavailable {
        /// The model.
        model: String,
        /// The last error seen.
        reason: String,
    },
}

/// An admitted request: its event stream and cancel flag.
#[derive(Debug)]
pub struct Admitted {
    /// The job's events.
    pub events: UnboundedReceiver<TokenEvent>,
    /// Setting it stops the job.
    pub cancel: Arc<AtomicBool>,
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
    /// The model's facts, once a replica has loaded.
    pub info: Option<ModelInfo>,
}

/// One replica's status for listings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaStatus {
    /// Which replica.
    pub id: ReplicaId,
    /// Its lifecycle state.
    pub state: ReplicaState,
    /// Jobs sent to it and not yet finished.
    pub in_flight: usize,
    /// The last load error or crash reason.
    pub last_error: Option<String>,
    /// How many times it was restarted.
    pub restarts: usize,
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
    /// A replica's actor started (sent by the actor itself, before it reports its load).
    Register(ReplicaEntry),
    /// A replica finished loading.
    ReplicaLoaded {
        /// Which one.
        replica: ReplicaId,
        /// Its facts, or the load error.
        result: Result<ModelInfo, String>,
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
    /// List every model's status.
    List(RpcReplyPort<Vec<ModelStatus>>),
}

/// One replica registered with the router.
pub struct ReplicaEntry {
    /// Its id.
    pub id: ReplicaId,
    /// Its actor (`None` when it could not be started, e.g. its device is missing).
    pub actor: Option<ActorRef<ModelMsg>>,
}

/// One model's routing table entry, as the supervisor hands it over.
pub struct RouteSpec {
    /// The model name.
    pub name: String,
    /// Requests generating at once per replica.
    pub max_concurrent: usize,
    /// Waiting requests before 503.
    pub max_queue: usize,
}

struct Replica {
    id: ReplicaId,
    /// Which incarnation of the replica this is; a restart registers a new one, so releases
    /// of jobs from a dead incarnation do not free slots of the live one.
    epoch: u64,
    actor: Option<ActorRef<ModelMsg>>,
    state: ReplicaState,
    in_flight: usize,
    last_error: Option<String>,
    restarts: usize,
}

struct Route {
    replicas: Vec<Replica>,
    queue: VecDeque<Job>,
    max_concurrent: usize,
    max_queue: usize,
    info: Option<ModelInfo>,
}

/// The router actor.
pub struct Router;

/// The router's state: one route per model.
pub struct RouterState {
    routes: HashMap<String, Route>,
    order: Vec<String>,
    next_epoch: u64,
}

impl RouterState {
    fn route(&mut self, model: &str) -> Option<&mut Route> {
        self.routes.get_mut(model)
    }
}

impl Actor for Router {
    type Msg = RouterMsg;
    type State = RouterState;
    type Arguments = Vec<RouteSpec>;

    async fn pre_start(
        &self,
        _myself: ActorRef<RouterMsg>,
        specs: Vec<RouteSpec>,
    ) -> Result<RouterState, ActorProcessingErr> {
        let order = specs.iter().map(|spec| spec.name.clone()).collect();
        let routes = specs
            .into_iter()
            .map(|spec| {
                let route = Route {
                    replicas: Vec::new(),
                    queue: VecDeque::new(),
                    max_concurrent: spec.max_concurrent,
                    max_queue: spec.max_queue,
                    info: None,
                };
                (spec.name, route)
            })
            .collect();
        Ok(RouterState {
            routes,
            order,
            next_epoch: 0,
        })
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
            RouterMsg::Register(entry) => {
                state.next_epoch += 1;
                let epoch = state.next_epoch;
                if let Some(route) = state.route(&entry.id.model) {
                    let previous = route.replicas.iter().position(|r| r.id == entry.id);
                    let (last_error, restarts) = match previous {
                        Some(index) => {
                            let old = route.replicas.remove(index);
                            (old.last_error, old.restarts + 1)
                        }
                        None => (None, 0),
                    };
                    route.replicas.push(Replica {
                        id: entry.id,
                        epoch,
                        actor: entry.actor,
                        state: ReplicaState::Loading,
                        in_flight: 0,
                        last_error,
                        restarts,
                    });
                    route.replicas.sort_by_key(|r| r.id.index);
                }
            }
            RouterMsg::ReplicaLoaded { replica, result } => {
                if let Some(route) = state.route(&replica.model) {
                    if let Some(entry) = route.replicas.iter_mut().find(|r| r.id == replica) {
                        entry.state = match result {
                            Ok(info) => {
                                route.info.get_or_insert(info);
                                ReplicaState::Ready
                            }
                            Err(err) => {
                                entry.last_error = Some(err.clone());
                                ReplicaState::Failed(err)
                            }
                        };
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
                    if let Some(entry) = route.replicas.iter_mut().find(|r| r.id == replica) {
                        entry.last_error = Some(reason.clone());
                        entry.state = if restarting {
                            ReplicaState::Restarting
                        } else {
                            ReplicaState::Failed(reason)
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
                    start_queued(&myself, route);
                }
            }
            RouterMsg::List(reply) => {
                let list = state
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
                                in_flight: r.in_flight,
                                last_error: r.last_error.clone(),
                                restarts: r.restarts,
                            })
                            .collect(),
                        queued: route.queue.len(),
                        info: route.info.clone(),
                    })
                    .collect();
                let _ = reply.send(list);
            }
        }
        Ok(())
    }
}

fn dispatch(
    myself: &ActorRef<RouterMsg>,
    state: &mut RouterState,
    model: &str,
    request: GenerationRequest,
) -> Result<Admitted, RouteError> {
    let route = state
        .route(model)
        .ok_or_else(|| RouteError::UnknownModel(model.to_string()))?;
    if let Some(reason) = unservable(route) {
        return Err(RouteError::Unavailable {
            model: model.to_string(),
            reason,
        });
    }
    route.queue.retain(|job| !job.abandoned());
    let has_free_slot = route
        .replicas
        .iter()
        .any(|r| r.state == ReplicaState::Ready && r.in_flight < route.max_concurrent);
    if !has_free_slot && route.queue.len() >= route.max_queue {
        return Err(RouteError::Overloaded(model.to_string()));
    }
    let (job, events, cancel) = Job::new(request);
    route.queue.push_back(job);
    start_queued(myself, route);
    Ok(Admitted { events, cancel })
}

/// Starts queued jobs while some ready replica has a free slot.
fn start_queued(myself: &ActorRef<RouterMsg>, route: &mut Route) {
    loop {
        let max = route.max_concurrent;
        let Some(replica) = route
            .replicas
            .iter_mut()
            .filter(|r| r.state == ReplicaState::Ready && r.actor.is_some() && r.in_flight < max)
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

/// Returns why no replica can ever serve this model (every one failed), if so.
fn unservable(route: &Route) -> Option<String> {
    let all_failed = !route.replicas.is_empty()
        && route
            .replicas
            .iter()
            .all(|r| matches!(r.state, ReplicaState::Failed(_)));
    if !all_failed {
        return None;
    }
    route.replicas.iter().find_map(|r| match &r.state {
        ReplicaState::Failed(reason) => Some(reason.clone()),
        _ => None,
    })
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
