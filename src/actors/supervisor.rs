//! The pool supervisor: reads the validated pool, spawns the router and one model actor per
//! (model, device), and watches them. It overrides ractor's default of stopping itself when a
//! child dies: a dead replica is reported to the router and every other model keeps serving.

use std::collections::HashMap;

use candle_core::Device;
use ractor::{Actor, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::sync::oneshot;

use super::model_actor::{ModelActor, ModelActorArgs, ModelMsg};
use super::router::{ReplicaEntry, ReplicaId, RouteSpec, Router, RouterMsg};
use crate::config::PoolConfig;
use crate::models::{DeviceSpec, LoadSpec};

/// What the supervisor is started with.
pub struct SupervisorArgs {
    /// The validated pool.
    pub config: PoolConfig,
    /// Receives the router's address once it is up.
    pub router_tx: oneshot::Sender<ActorRef<RouterMsg>>,
}

/// The supervisor actor.
pub struct PoolSupervisor;

/// The supervisor's state.
pub struct SupervisorState {
    router: ActorRef<RouterMsg>,
    replicas: HashMap<ActorId, (ReplicaId, ActorRef<ModelMsg>)>,
}

impl Actor for PoolSupervisor {
    type Msg = ();
    type State = SupervisorState;
    type Arguments = SupervisorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<()>,
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
        let mut devices: HashMap<DeviceSpec, Result<Device, String>> = HashMap::new();
        let mut replicas = HashMap::new();
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
                let actor_args = ModelActorArgs {
                    replica: id.clone(),
                    spec: LoadSpec {
                        source: model.source.clone(),
                        device,
                        dtype: model.dtype,
                        max_seq_len: model.max_seq_len,
                    },
                    router: router.clone(),
                };
                let (actor, _) =
                    Actor::spawn_linked(None, ModelActor, actor_args, myself.get_cell()).await?;
                replicas.insert(actor.get_id(), (id, actor));
            }
        }
        let _ = args.router_tx.send(router.clone());
        Ok(SupervisorState { router, replicas })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<()>,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        for (_, actor) in state.replicas.values() {
            actor.stop(None);
        }
        state.router.stop(None);
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<()>,
        event: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, reason) = match event {
            SupervisionEvent::ActorFailed(cell, err) => (cell, err.to_string()),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, reason.unwrap_or_else(|| "stopped".to_string()))
            }
            _ => return Ok(()),
        };
        if cell.get_id() == state.router.get_id() {
            tracing::error!(%reason, "the router died; stopping the pool");
            myself.stop(Some("router died".to_string()));
            return Ok(());
        }
        if let Some((id, _)) = state.replicas.remove(&cell.get_id()) {
            tracing::error!(replica = %id, %reason, "model actor died");
            state.router.cast(RouterMsg::ReplicaDown {
                replica: id,
                reason,
            })?;
        }
        Ok(())
    }
}
