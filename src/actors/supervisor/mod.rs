//! The pool supervisor: the one writer of pool state. It spawns the router and one model actor
//! per (model, device), restarts model actors that fail (exponential backoff, then `failed`),
//! and runs admin operations. It overrides ractor's default of stopping itself when a child
//! dies, so every other model keeps serving.
//!
//! Long operations (draining, waiting for a load) run in tasks that talk back to the
//! supervisor with short messages, so its mailbox never waits on a model.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use candle_core::Device;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rand::Rng;
use tokio::sync::oneshot;

use super::admin::{AdminCommand, AdminError, Failure, ModelOutcome};
use super::engine::EngineConfig;
use super::lifecycle;
use super::model_actor::{ModelActor, ModelActorArgs, ModelMsg};
use super::restart::{Decision, RestartTracker};
use super::router::{
    ModelStatus, ReplicaEntry, ReplicaId, RouteSpec, Router, RouterArgs, RouterMsg,
};
use crate::config::{ModelSpec, PoolConfig, PrefixCacheScope};
use crate::models::{DeviceSpec, LoadSpec};

mod plan;

use plan::{claim, make_room};
pub use plan::{Plan, PoolPlan};

/// The reply to an admin command.
pub type AdminReply = RpcReplyPort<Result<Vec<ModelOutcome>, AdminError>>;

/// Messages the supervisor handles.
#[derive(ractor_cluster::RactorMessage)]
pub enum SupervisorMsg {
    /// Start a replica again after its backoff.
    Respawn(ReplicaId),
    /// Run an admin command; the reply comes when it is done, or, without `wait`, as soon as
    /// it is accepted (its outcomes then say what was started: `loading`, `reloading`, ...).
    Admin {
        /// The command.
        command: AdminCommand,
        /// Reply when the operation has finished rather than when it has started.
        wait: bool,
        /// Receives the outcomes.
        reply: AdminReply,
    },
    /// Start the replicas of a spec under a new generation; replies with their ids.
    StartGeneration {
        /// The model's spec.
        spec: ModelSpec,
        /// Load beside the active generation instead of replacing it.
        standby: bool,
        /// Receives the ids.
        reply: RpcReplyPort<Vec<ReplicaId>>,
    },
    /// Stop supervising these replicas and hand their actors over to be stopped.
    Detach(Vec<ReplicaId>, RpcReplyPort<Vec<ActorRef<ModelMsg>>>),
    /// Record a model's spec (or its removal) once an operation has succeeded.
    Commit {
        /// The model.
        name: String,
        /// Its spec, or `None` when it was evicted.
        spec: Option<ModelSpec>,
    },
    /// An operation on these models has ended.
    Finished(Vec<String>),
    /// A lazy model got a request and has no replica: load it.
    EnsureLoaded(String),
    /// A model's replicas were unloaded (for idleness or to make room); its route stays.
    Unloaded(String),
    /// Periodic check for models idle past their `keep_alive`.
    Tick,
    /// The models an admin or background operation is working on, and the devices' budgets.
    Overview(RpcReplyPort<Overview>),
}

/// What the supervisor knows beyond the router's listing.
#[derive(Debug, Clone, Default)]
pub struct Overview {
    /// The models an admin or background operation is working on, sorted.
    pub busy: Vec<String>,
    /// Every configured or used device, sorted by name.
    pub devices: Vec<DeviceUse>,
}

/// A device's memory budget and what the pool's models hold of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceUse {
    /// The device (`cpu`, `cuda:0`).
    pub device: DeviceSpec,
    /// Its `memory_budget` in bytes, when one is set.
    pub budget: Option<u64>,
    /// The bytes the loaded and loading models are estimated to hold on it (weights and KV
    /// cache), as the budget check counts them.
    pub reserved: u64,
}

/// How often idle models are looked for.
const TICK: Duration = Duration::from_secs(1);

/// What the supervisor is started with.
pub struct SupervisorArgs {
    /// The validated pool.
    pub config: PoolConfig,
    /// The file it came from, re-read by `POST /admin/reload`.
    pub config_path: Option<PathBuf>,
    /// Receives the router's address once it is up.
    pub router_tx: oneshot::Sender<ActorRef<RouterMsg>>,
    /// The pool's metrics (the router records into them).
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

/// The supervisor actor.
pub struct PoolSupervisor;

/// A replica the supervisor keeps alive.
struct Slot {
    args: ModelActorArgs,
    actor: Option<ActorRef<ModelMsg>>,
    restarts: RestartTracker,
}

/// The supervisor's state.
pub struct SupervisorState {
    router: ActorRef<RouterMsg>,
    slots: HashMap<ReplicaId, Slot>,
    by_actor: HashMap<ActorId, ReplicaId>,
    models: HashMap<String, ModelSpec>,
    devices: HashMap<DeviceSpec, Result<Device, String>>,
    busy: HashSet<String>,
    next_generation: u64,
    config_path: Option<PathBuf>,
    budgets: HashMap<DeviceSpec, u64>,
    /// Estimated bytes each loaded (or loading) model holds, per replica device.
    held: HashMap<String, Vec<(DeviceSpec, u64)>>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Actor for PoolSupervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: SupervisorArgs,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        let routes = args.config.models.iter().map(route_spec).collect();
        let router_args = RouterArgs {
            routes,
            supervisor: myself.clone(),
            metrics: args.metrics.clone(),
        };
        let (router, _) = Actor::spawn_linked(None, Router, router_args, myself.get_cell()).await?;
        let mut state = SupervisorState {
            router: router.clone(),
            slots: HashMap::new(),
            by_actor: HashMap::new(),
            models: HashMap::new(),
            devices: HashMap::new(),
            busy: HashSet::new(),
            next_generation: 0,
            config_path: args.config_path,
            budgets: args.config.budgets.clone(),
            held: HashMap::new(),
            metrics: args.metrics.clone(),
        };
        for model in &args.config.models {
            state.models.insert(model.name.clone(), model.clone());
            if model.preload {
                start_generation(&myself, &mut state, model, false).await?;
            }
        }
        let ticker = myself.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            loop {
                interval.tick().await;
                if ticker.cast(SupervisorMsg::Tick).is_err() {
                    return;
                }
            }
        });
        let _ = args.router_tx.send(router);
        Ok(state)
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<SupervisorMsg>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        for slot in state.slots.values_mut() {
            if let Some(actor) = slot.actor.take() {
                actor.stop(None);
            }
        }
        state.router.stop(None);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        message: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            SupervisorMsg::Respawn(id) => {
                #[cfg(feature = "fault-injection")]
                super::faults::record(&id.to_string(), super::faults::SupervisionEvent::Respawned);
                if let Err(err) = spawn_replica(&myself, state, &id).await {
                    tracing::error!(replica = %id, error = %err, "restart failed");
                    state.router.cast(RouterMsg::ReplicaDown {
                        replica: id,
                        reason: format!("restart failed: {err}"),
                        restarting: false,
                    })?;
                }
            }
            SupervisorMsg::Admin {
                command,
                wait,
                reply,
            } => {
                let statuses = router_statuses(&state.router).await;
                admin(&myself, state, (command, wait, reply), &statuses);
            }
            SupervisorMsg::EnsureLoaded(name) => {
                let statuses = router_statuses(&state.router).await;
                activate(&myself, state, &name, &statuses);
            }
            SupervisorMsg::Unloaded(name) => {
                state.held.remove(&name);
            }
            SupervisorMsg::Overview(reply) => {
                let _ = reply.send(overview(state));
            }
            SupervisorMsg::Tick => {
                let statuses = router_statuses(&state.router).await;
                unload_idle(&myself, state, &statuses);
            }
            SupervisorMsg::StartGeneration {
                spec,
                standby,
                reply,
            } => {
                let ids = start_generation(&myself, state, &spec, standby).await?;
                let _ = reply.send(ids);
            }
            SupervisorMsg::Detach(ids, reply) => {
                let actors = ids
                    .iter()
                    .filter_map(|id| state.slots.remove(id))
                    .filter_map(|slot| slot.actor)
                    .inspect(|actor| {
                        state.by_actor.remove(&actor.get_id());
                    })
                    .collect();
                let _ = reply.send(actors);
            }
            SupervisorMsg::Commit { name, spec } => match spec {
                Some(spec) => {
                    state.models.insert(name, spec);
                }
                None => {
                    state.models.remove(&name);
                    state.held.remove(&name);
                }
            },
            SupervisorMsg::Finished(names) => {
                for name in names {
                    state.busy.remove(&name);
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason, failed) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string(), true),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".to_string()), false)
            }
            _ => return Ok(()),
        };
        if cell.get_id() == state.router.get_id() {
            tracing::error!(%reason, "the router died; stopping the pool");
            myself.stop(Some("router died".to_string()));
            return Ok(());
        }
        let Some(id) = state.by_actor.remove(&cell.get_id()) else {
            return Ok(());
        };
        let Some(slot) = state.slots.get_mut(&id) else {
            return Ok(());
        };
        slot.actor = None;
        if !failed {
            return Ok(());
        }
        let jitter = rand::rng().random_range(-1.0..=1.0);
        #[cfg(feature = "fault-injection")]
        let jitter = super::faults::jitter(jitter);
        #[cfg(feature = "fault-injection")]
        super::faults::record(&id.to_string(), super::faults::SupervisionEvent::Failed);
        match slot
            .restarts
            .on_failure(tokio::time::Instant::now(), jitter)
        {
            Decision::RestartAfter(delay) => {
                tracing::warn!(replica = %id, %reason, ?delay, "model actor failed; restarting");
                state.router.cast(RouterMsg::ReplicaDown {
                    replica: id.clone(),
                    reason,
                    restarting: true,
                })?;
                schedule_respawn(myself, id, delay);
            }
            Decision::GiveUp => {
                #[cfg(feature = "fault-injection")]
                super::faults::record(&id.to_string(), super::faults::SupervisionEvent::GaveUp);
                tracing::error!(replica = %id, %reason, "too many restarts; replica failed");
                state.router.cast(RouterMsg::ReplicaDown {
                    replica: id,
                    reason: format!("too many restarts; last: {reason}"),
                    restarting: false,
                })?;
            }
        }
        Ok(())
    }
}

fn overview(state: &SupervisorState) -> Overview {
    let mut busy: Vec<String> = state.busy.iter().cloned().collect();
    busy.sort();
    let mut reserved: HashMap<DeviceSpec, u64> =
        state.budgets.keys().map(|device| (*device, 0)).collect();
    for (device, bytes) in state.held.values().flatten() {
        *reserved.entry(*device).or_default() += bytes;
    }
    let mut devices: Vec<DeviceUse> = reserved
        .into_iter()
        .map(|(device, reserved)| DeviceUse {
            device,
            budget: state.budgets.get(&device).copied(),
            reserved,
        })
        .collect();
    devices.sort_by_key(|d| d.device.to_string());
    Overview { busy, devices }
}

/// Checks an admin command against the pool, claims the models it touches, and hands it to a
/// task that replies when it is done (or replies at once with what it started, without `wait`).
fn admin(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    (command, wait, reply): (AdminCommand, bool, AdminReply),
    statuses: &[ModelStatus],
) {
    match plan::plan(state, command, statuses) {
        Err(err) => {
            tracing::info!(error = %err, "admin command refused");
            let _ = reply.send(Err(err));
        }
        Ok(plan) => {
            let ctx = lifecycle::Ctx {
                supervisor: myself.clone(),
                router: state.router.clone(),
            };
            let reply = if wait {
                Some(reply)
            } else {
                let _ = reply.send(Ok(plan.started()));
                None
            };
            tokio::spawn(async move {
                let result = lifecycle::run(&ctx, plan).await;
                if let Some(reply) = reply {
                    let _ = reply.send(result);
                }
            });
        }
    }
}

/// Loads a lazy model that got a request, making room on its devices first.
fn activate(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    name: &str,
    statuses: &[ModelStatus],
) {
    let Some(spec) = state.models.get(name).cloned() else {
        return;
    };
    if state.held.contains_key(name) {
        return;
    }
    if state.busy.contains(name) {
        // An unload of this model is finishing; ask again once it is done.
        let supervisor = myself.clone();
        let name = name.to_string();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = supervisor.cast(SupervisorMsg::EnsureLoaded(name));
        });
        return;
    }
    let plan = make_room(state, statuses, &spec, false, &[])
        .map(|unload| Plan::Activate { spec, unload })
        .map_err(|reason| AdminError::LoadFailed {
            name: name.to_string(),
            reason: Failure::other(reason),
        })
        .and_then(|plan| claim(state, plan));
    match plan {
        Ok(plan) => spawn_plan(myself, state, plan),
        Err(err) => {
            tracing::error!(model = name, error = %err, "cannot load on demand");
            let _ = state.router.cast(RouterMsg::Register(ReplicaEntry {
                id: ReplicaId {
                    model: name.to_string(),
                    index: 0,
                    device: "-".to_string(),
                    generation: 0,
                },
                actor: None,
                standby: false,
                engine: None,
            }));
            let _ = state.router.cast(RouterMsg::ReplicaLoaded {
                replica: ReplicaId {
                    model: name.to_string(),
                    index: 0,
                    device: "-".to_string(),
                    generation: 0,
                },
                result: Err(Failure::other(err.to_string())),
            });
        }
    }
}

/// Unloads loaded models idle past their `keep_alive`.
fn unload_idle(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    statuses: &[ModelStatus],
) {
    for status in statuses {
        let Some(keep_alive) = state
            .models
            .get(&status.name)
            .and_then(|spec| spec.keep_alive)
        else {
            continue;
        };
        let idle_long = status.idle_for.is_some_and(|idle| idle >= keep_alive);
        if !idle_long || !state.held.contains_key(&status.name) || state.busy.contains(&status.name)
        {
            continue;
        }
        tracing::info!(model = %status.name, ?keep_alive, "unloading an idle model");
        if let Ok(plan) = claim(state, Plan::Unload(status.name.clone())) {
            spawn_plan(myself, state, plan);
        }
    }
}

fn spawn_plan(myself: &ActorRef<SupervisorMsg>, state: &SupervisorState, plan: Plan) {
    let ctx = lifecycle::Ctx {
        supervisor: myself.clone(),
        router: state.router.clone(),
    };
    tokio::spawn(async move {
        if let Err(err) = lifecycle::run(&ctx, plan).await {
            tracing::error!(error = %err, "background model operation failed");
        }
    });
}

async fn router_statuses(router: &ActorRef<RouterMsg>) -> Vec<ModelStatus> {
    match router
        .call(RouterMsg::List, Some(Duration::from_secs(2)))
        .await
    {
        Ok(ractor::rpc::CallResult::Success(list)) => list,
        _ => Vec::new(),
    }
}

/// The admission limits of a model.
pub fn route_spec(spec: &ModelSpec) -> RouteSpec {
    RouteSpec {
        name: spec.name.clone(),
        max_concurrent: spec.max_concurrent,
        max_queue: spec.max_queue,
        lazy: !spec.preload,
        queue_timeout: spec.queue_timeout,
        request_timeout: spec.request_timeout,
        queue_during_load: spec.queue_during_load,
        slow_reader_timeout: spec.slow_reader_timeout,
    }
}

/// Spawns one model actor per device of `spec`, under a new generation.
async fn start_generation(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    spec: &ModelSpec,
    standby: bool,
) -> Result<Vec<ReplicaId>, ActorProcessingErr> {
    state.next_generation += 1;
    let generation = state.next_generation;
    let held = spec
        .devices
        .iter()
        .map(|device| (*device, spec.footprint(*device)))
        .collect();
    state.held.insert(spec.name.clone(), held);
    let mut ids = Vec::new();
    for (index, device_spec) in spec.devices.iter().enumerate() {
        let id = ReplicaId {
            model: spec.name.clone(),
            index,
            device: device_spec.to_string(),
            generation,
        };
        ids.push(id.clone());
        // One Device per GPU, cloned to every replica on it.
        let device = state
            .devices
            .entry(*device_spec)
            .or_insert_with(|| device_spec.open().map_err(|err| err.to_string()))
            .clone();
        let device = match device {
            Ok(device) => device,
            Err(err) => {
                tracing::error!(replica = %id, error = %err, "device unavailable");
                state.router.cast(RouterMsg::Register(ReplicaEntry {
                    id: id.clone(),
                    actor: None,
                    standby,
                    engine: None,
                }))?;
                state.router.cast(RouterMsg::ReplicaLoaded {
                    replica: id,
                    result: Err(Failure::other(err)),
                })?;
                continue;
            }
        };
        let args = ModelActorArgs {
            replica: id.clone(),
            spec: LoadSpec {
                source: spec.source.clone(),
                device,
                dtype: spec.dtype,
                max_seq_len: spec.max_seq_len,
            },
            router: state.router.clone(),
            standby,
            stall_timeout: spec.stall_timeout,
            load_timeout: spec.load_timeout,
            engine: EngineConfig {
                max_seqs: spec.max_concurrent,
                max_batch_tokens: spec.max_batch_tokens,
                kv_cache_bytes: spec.kv_cache,
                kv_dtype: spec.kv_cache_dtype,
                prefix_caching: spec.prefix_cache != PrefixCacheScope::Off,
                shared_prefix_cache: spec.prefix_cache == PrefixCacheScope::Global,
                metrics: Some(state.metrics.step_metrics(&spec.name)),
            },
        };
        state.slots.insert(
            id.clone(),
            Slot {
                args,
                actor: None,
                restarts: RestartTracker::default(),
            },
        );
        spawn_replica(myself, state, &id).await?;
    }
    Ok(ids)
}

fn schedule_respawn(supervisor: ActorRef<SupervisorMsg>, id: ReplicaId, delay: Duration) {
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        let _ = supervisor.cast(SupervisorMsg::Respawn(id));
    });
}

async fn spawn_replica(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    id: &ReplicaId,
) -> Result<(), ActorProcessingErr> {
    let Some(slot) = state.slots.get_mut(id) else {
        return Ok(());
    };
    // A restarted replica re-registers under its id and keeps the role it had.
    let (actor, _) =
        Actor::spawn_linked(None, ModelActor, slot.args.clone(), myself.get_cell()).await?;
    state.by_actor.insert(actor.get_id(), id.clone());
    slot.actor = Some(actor);
    Ok(())
}
