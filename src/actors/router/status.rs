//! What the router tells about replicas and models: their names, states and roles, and the
//! listings behind `/admin/models`, `/v1/models`, `llorch ps` and the gauges of `/metrics`.

use std::fmt;
use std::time::{Duration, SystemTime};

use super::RouterState;
use crate::actors::admin::Failure;
use crate::actors::engine::Occupancy;
use crate::models::ModelInfo;

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
    /// While it loads: bytes of weights read (and downloaded) and their totals.
    pub load_progress: Option<crate::models::Progress>,
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

pub(super) fn list(state: &RouterState) -> Vec<ModelStatus> {
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
                    load_progress: r
                        .engine
                        .as_ref()
                        .filter(|_| r.state == ReplicaState::Loading)
                        .map(|engine| engine.load_progress()),
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

/// `model`'s load: requests in flight on its ready active replicas plus its queue; `None`
/// when it has no such replica or is draining.
pub(super) fn load(state: &RouterState, model: &str) -> Option<usize> {
    let route = state.routes.get(model).filter(|route| !route.draining)?;
    let ready: Vec<usize> = route
        .replicas
        .iter()
        .filter(|r| r.state == ReplicaState::Ready && r.role == Role::Active)
        .map(|r| r.in_flight)
        .collect();
    (!ready.is_empty()).then(|| ready.iter().sum::<usize>() + route.queue.len())
}
