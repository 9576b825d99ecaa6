//! Admission: a model's replicas, its bounded queue, and the choice of the ready replica with
//! the fewest requests in flight.

use std::collections::VecDeque;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use ractor::ActorRef;
use tokio::sync::mpsc::Receiver;

use super::status::{ReplicaId, ReplicaState, Role};
use super::{RouteSpec, RouterMsg, RouterState};
use crate::actors::engine::{
    CompletionNotice, EngineError, GenerationRequest, Job, Shared, TokenEvent,
};
use crate::actors::model_actor::ModelMsg;
use crate::actors::supervisor::SupervisorMsg;
use crate::models::ModelInfo;

/// Why a request was not admitted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize, serde::Deserialize)]
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

pub(super) struct Replica {
    pub(super) id: ReplicaId,
    /// Which incarnation this is; a restart registers a new one, so releases of jobs from a
    /// dead incarnation do not free slots of the live one.
    pub(super) epoch: u64,
    pub(super) actor: Option<ActorRef<ModelMsg>>,
    pub(super) state: ReplicaState,
    pub(super) role: Role,
    pub(super) in_flight: usize,
    pub(super) last_error: Option<String>,
    pub(super) restarts: usize,
    pub(super) loaded_at: Option<SystemTime>,
    pub(super) info: Option<ModelInfo>,
    pub(super) registered_at: Instant,
    pub(super) engine: Option<Arc<Shared>>,
}

impl Replica {
    pub(super) fn serves(&self) -> bool {
        self.role == Role::Active && self.state == ReplicaState::Ready && self.actor.is_some()
    }

    /// Whether it takes another job: fewer in flight than the model's `max_concurrent`, or
    /// without one than the sequences its engine runs at once.
    pub(super) fn has_slot(&self, max_concurrent: Option<usize>) -> bool {
        let slots = max_concurrent.unwrap_or_else(|| self.info.as_ref().map_or(1, |i| i.max_seqs));
        self.serves() && self.in_flight < slots
    }
}

pub(super) struct Route {
    pub(super) replicas: Vec<Replica>,
    pub(super) queue: VecDeque<Job>,
    pub(super) spec: RouteSpec,
    pub(super) max_concurrent: Option<usize>,
    pub(super) max_queue: usize,
    pub(super) draining: bool,
    pub(super) lazy: bool,
    pub(super) parked: bool,
    pub(super) load_requested: bool,
    pub(super) last_active: Instant,
}

impl Route {
    pub(super) fn new(spec: &RouteSpec) -> Self {
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

    pub(super) fn busy(&self) -> bool {
        !self.queue.is_empty() || self.replicas.iter().any(|r| r.in_flight > 0)
    }

    /// Asks the supervisor to load a lazy model that has work waiting and no replica.
    pub(super) fn request_load(&mut self, name: &str, supervisor: &ActorRef<SupervisorMsg>) {
        let unloaded = !self.replicas.iter().any(|r| r.role == Role::Active);
        if self.lazy && unloaded && !self.parked && !self.queue.is_empty() && !self.load_requested {
            self.load_requested = true;
            let _ = supervisor.cast(SupervisorMsg::EnsureLoaded(name.to_string()));
        }
    }

    pub(super) fn replica(&mut self, id: &ReplicaId) -> Option<&mut Replica> {
        self.replicas.iter_mut().find(|r| &r.id == id)
    }
}

pub(super) fn dispatch(
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
pub(super) fn start_queued(myself: &ActorRef<RouterMsg>, route: &mut Route) {
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
pub(super) fn unservable(route: &Route) -> Option<String> {
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
pub(super) fn fail_queue_if_unservable(model: &str, route: &mut Route) {
    if let Some(reason) = unservable(route) {
        for job in route.queue.drain(..) {
            job.send(TokenEvent::Failed(EngineError::Unavailable(format!(
                "the model {model:?} is unavailable: {reason}"
            ))));
        }
    }
}
