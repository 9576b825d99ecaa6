//! The pool supervisor: the one writer of pool state. It spawns the router and one model actor
//! per (model, device), restarts model actors that fail (exponential backoff, then `failed`),
//! and runs admin operations. It overrides ractor's default of stopping itself when a child
//! dies, so every other model keeps serving.
//!
//! Long operations (draining, waiting for a load) run in tasks that talk back to the
//! supervisor with short messages, so its mailbox never waits on a model.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use candle_core::Device;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use rand::Rng;
use tokio::sync::oneshot;

use super::admin::{AdminCommand, AdminError, ModelOutcome};
use super::lifecycle;
use super::model_actor::{ModelActor, ModelActorArgs, ModelMsg};
use super::restart::{Decision, RestartTracker};
use super::router::{ReplicaEntry, ReplicaId, RouteSpec, Router, RouterMsg};
use crate::config::{ModelSpec, PoolConfig};
use crate::models::{DeviceSpec, LoadSpec};

/// The reply to an admin command.
pub type AdminReply = RpcReplyPort<Result<Vec<ModelOutcome>, AdminError>>;

/// Messages the supervisor handles.
pub enum SupervisorMsg {
    /// Start a replica again after its backoff.
    Respawn(ReplicaId),
    /// Run an admin command.
    Admin(AdminCommand, AdminReply),
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
}

/// What the supervisor is started with.
pub struct SupervisorArgs {
    /// The validated pool.
    pub config: PoolConfig,
    /// The file it came from, re-read by `POST /admin/reload`.
    pub config_path: Option<PathBuf>,
    /// Receives the router's address once it is up.
    pub router_tx: oneshot::Sender<ActorRef<RouterMsg>>,
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
        let (router, _) = Actor::spawn_linked(None, Router, routes, myself.get_cell()).await?;
        let mut state = SupervisorState {
            router: router.clone(),
            slots: HashMap::new(),
            by_actor: HashMap::new(),
            models: HashMap::new(),
            devices: HashMap::new(),
            busy: HashSet::new(),
            next_generation: 0,
            config_path: args.config_path,
        };
        for model in &args.config.models {
            state.models.insert(model.name.clone(), model.clone());
            start_generation(&myself, &mut state, model, false).await?;
        }
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
                if let Err(err) = spawn_replica(&myself, state, &id).await {
                    tracing::error!(replica = %id, error = %err, "restart failed");
                    state.router.cast(RouterMsg::ReplicaDown {
                        replica: id,
                        reason: format!("restart failed: {err}"),
                        restarting: false,
                    })?;
                }
            }
            SupervisorMsg::Admin(command, reply) => admin(&myself, state, command, reply),
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
        match slot.restarts.on_failure(Instant::now(), jitter) {
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

/// Checks an admin command against the pool, claims the models it touches, and hands it to a
/// task that replies when it is done.
fn admin(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    command: AdminCommand,
    reply: AdminReply,
) {
    match plan(state, command) {
        Err(err) => {
            tracing::info!(error = %err, "admin command refused");
            let _ = reply.send(Err(err));
        }
        Ok(plan) => {
            let ctx = lifecycle::Ctx {
                supervisor: myself.clone(),
                router: state.router.clone(),
            };
            tokio::spawn(async move {
                let _ = reply.send(lifecycle::run(&ctx, plan).await);
            });
        }
    }
}

fn plan(state: &mut SupervisorState, command: AdminCommand) -> Result<Plan, AdminError> {
    let plan = match command {
        AdminCommand::Load(spec) => {
            if state.models.contains_key(&spec.name) {
                return Err(AdminError::AlreadyLoaded(spec.name));
            }
            Plan::Load(spec)
        }
        AdminCommand::Evict { name, abort, drain } => {
            if !state.models.contains_key(&name) {
                return Err(AdminError::NotFound(name));
            }
            Plan::Evict { name, abort, drain }
        }
        AdminCommand::Reload { name, spec } => {
            let current = state
                .models
                .get(&name)
                .cloned()
                .ok_or(AdminError::NotFound(name))?;
            Plan::Reload(spec.unwrap_or(current))
        }
        AdminCommand::ReloadPool => {
            let path = state.config_path.as_ref().ok_or(AdminError::NoPoolFile)?;
            let config = crate::config::load(path).map_err(AdminError::Config)?;
            let mut pool = PoolPlan::default();
            for spec in &config.models {
                match state.models.get(&spec.name) {
                    None => pool.added.push(spec.clone()),
                    Some(current) if current != spec => pool.changed.push(spec.clone()),
                    Some(_) => pool.unchanged.push(spec.name.clone()),
                }
            }
            pool.removed = state
                .models
                .keys()
                .filter(|name| !config.models.iter().any(|spec| &spec.name == *name))
                .cloned()
                .collect();
            pool.removed.sort();
            Plan::Pool(pool)
        }
    };
    let touched = plan.touched();
    if let Some(name) = touched.iter().find(|name| state.busy.contains(*name)) {
        return Err(AdminError::InProgress(name.clone()));
    }
    state.busy.extend(touched);
    if let Plan::Load(spec) = &plan {
        state.models.insert(spec.name.clone(), spec.clone());
    }
    if let Plan::Pool(pool) = &plan {
        for spec in &pool.added {
            state.models.insert(spec.name.clone(), spec.clone());
        }
    }
    Ok(plan)
}

/// An admin command, checked and with its models claimed.
pub enum Plan {
    /// Load a new model.
    Load(ModelSpec),
    /// Evict a model.
    Evict {
        /// The model.
        name: String,
        /// End in-flight requests at once.
        abort: bool,
        /// How long to drain.
        drain: Duration,
    },
    /// Reload a model from this spec.
    Reload(ModelSpec),
    /// Apply a new pool file.
    Pool(PoolPlan),
}

/// The difference between the running pool and a new pool file.
#[derive(Default)]
pub struct PoolPlan {
    /// Models only in the file.
    pub added: Vec<ModelSpec>,
    /// Models whose spec changed.
    pub changed: Vec<ModelSpec>,
    /// Models no longer in the file.
    pub removed: Vec<String>,
    /// Models whose spec is the same.
    pub unchanged: Vec<String>,
}

impl Plan {
    fn touched(&self) -> Vec<String> {
        match self {
            Plan::Load(spec) | Plan::Reload(spec) => vec![spec.name.clone()],
            Plan::Evict { name, .. } => vec![name.clone()],
            Plan::Pool(pool) => pool
                .added
                .iter()
                .chain(&pool.changed)
                .map(|spec| spec.name.clone())
                .chain(pool.removed.iter().cloned())
                .collect(),
        }
    }
}

/// The admission limits of a model.
pub fn route_spec(spec: &ModelSpec) -> RouteSpec {
    RouteSpec {
        name: spec.name.clone(),
        max_concurrent: spec.max_concurrent,
        max_queue: spec.max_queue,
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
                }))?;
                state.router.cast(RouterMsg::ReplicaLoaded {
                    replica: id,
                    result: Err(err),
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
