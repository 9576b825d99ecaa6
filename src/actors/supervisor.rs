//! The pool supervisor: reads the validated pool, spawns the router and one model actor per
//! (model, device), and restarts model actors that fail. It overrides ractor's default of
//! stopping itself when a child dies: a dead replica is reported to the router, restarted after
//! an exponential backoff, and every other model keeps serving.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::Device;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use rand::Rng;
use tokio::sync::oneshot;

use super::model_actor::{ModelActor, ModelActorArgs, ModelMsg};
use super::restart::{Decision, RestartTracker};
use super::router::{ReplicaEntry, ReplicaId, RouteSpec, Router, RouterMsg};
use crate::config::PoolConfig;
use crate::models::{DeviceSpec, LoadSpec};

/// Messages the supervisor handles.
#[derive(Debug)]
pub enum SupervisorMsg {
    /// Start a replica again after its backoff.
    Respawn(ReplicaId),
}

/// What the supervisor is started with.
pub struct SupervisorArgs {
    /// The validated pool.
    pub config: PoolConfig,
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
        let routes = args
            .config
            .models
            .iter()
            .map(|model| RouteSpec {
                name: model.name.clone(),
                max_concurrent: model.max_concurrent,
                max_queue: model.max_queue,
            })
            .collect();
        let (router, _) = Actor::spawn_linked(None, Router, routes, myself.get_cell()).await?;
        let mut state = SupervisorState {
            router: router.clone(),
            slots: HashMap::new(),
            by_actor: HashMap::new(),
        };
        let mut devices: HashMap<DeviceSpec, Result<Device, String>> = HashMap::new();
        for model in &args.config.models {
            for (index, spec) in model.devices.iter().enumerate() {
                let id = ReplicaId {
                    model: model.name.clone(),
                    index,
                    device: spec.to_string(),
                };
                // One Device per GPU, cloned to every replica on it.
                let device = devices
                    .entry(*spec)
                    .or_insert_with(|| spec.open().map_err(|err| err.to_string()))
                    .clone();
                let device = match device {
                    Ok(device) => device,
                    Err(err) => {
                        tracing::error!(replica = %id, error = %err, "device unavailable");
                        router.cast(RouterMsg::Register(ReplicaEntry {
                            id: id.clone(),
                            actor: None,
                        }))?;
                        router.cast(RouterMsg::ReplicaLoaded {
                            replica: id,
                            result: Err(err),
                        })?;
                        continue;
                    }
                };
                let args = ModelActorArgs {
                    replica: id.clone(),
                    spec: LoadSpec {
                        source: model.source.clone(),
                        device,
                        dtype: model.dtype,
                        max_seq_len: model.max_seq_len,
                    },
                    router: router.clone(),
                };
                state.slots.insert(
                    id.clone(),
                    Slot {
                        args,
                        actor: None,
                        restarts: RestartTracker::default(),
                    },
                );
                spawn_replica(&myself, &mut state, &id).await?;
            }
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
    let (actor, _) =
        Actor::spawn_linked(None, ModelActor, slot.args.clone(), myself.get_cell()).await?;
    state.by_actor.insert(actor.get_id(), id.clone());
    slot.actor = Some(actor);
    Ok(())
}
