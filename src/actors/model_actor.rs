//! The model actor: the mailbox and lifecycle face of one replica (a model on a device). It
//! owns the engine thread, which owns the model; loading happens on that thread and is reported
//! back as a message, so the actor never blocks.

use ractor::{Actor, ActorProcessingErr, ActorRef};

use super::engine::{spawn_engine, EngineError, EngineHandle, Job, TokenEvent};
use super::router::{ReplicaEntry, ReplicaId, RouterMsg};
use crate::models::{LoadSpec, ModelInfo};

/// Messages a model actor handles.
#[derive(Debug)]
pub enum ModelMsg {
    /// Run a job on this replica's engine.
    Generate(Job),
    /// The engine thread finished loading (or failed to).
    Loaded(Result<ModelInfo, String>),
}

/// What a model actor is started with.
pub struct ModelActorArgs {
    /// Which replica this is.
    pub replica: ReplicaId,
    /// What to load.
    pub spec: LoadSpec,
    /// Where to report load results.
    pub router: ActorRef<RouterMsg>,
}

/// The model actor.
pub struct ModelActor;

/// A model actor's state.
pub struct ModelState {
    replica: ReplicaId,
    engine: EngineHandle,
    router: ActorRef<RouterMsg>,
}

impl Actor for ModelActor {
    type Msg = ModelMsg;
    type State = ModelState;
    type Arguments = ModelActorArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ModelMsg>,
        args: ModelActorArgs,
    ) -> Result<ModelState, ActorProcessingErr> {
        args.router.cast(RouterMsg::Register(ReplicaEntry {
            id: args.replica.clone(),
            actor: Some(myself.clone()),
        }))?;
        let (engine, ready) = spawn_engine(&args.replica.to_string(), args.spec)?;
        tokio::spawn(async move {
            let result = match ready.await {
                Ok(Ok(info)) => Ok(info),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err("the engine thread ended while loading".to_string()),
            };
            let _ = myself.cast(ModelMsg::Loaded(result));
        });
        Ok(ModelState {
            replica: args.replica,
            engine,
            router: args.router,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<ModelMsg>,
        message: ModelMsg,
        state: &mut ModelState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ModelMsg::Loaded(result) => {
                match &result {
                    Ok(info) => {
                        tracing::info!(replica = %state.replica, context = info.context_length, "model ready")
                    }
                    Err(err) => {
                        tracing::error!(replica = %state.replica, error = %err, "model failed to load")
                    }
                }
                state.router.cast(RouterMsg::ReplicaLoaded {
                    replica: state.replica.clone(),
                    result,
                })?;
                Ok(())
            }
            ModelMsg::Generate(job) => match state.engine.submit(job) {
                Ok(()) => Ok(()),
                Err(job) => {
                    job.send(TokenEvent::Failed(EngineError::Crashed(
                        "the engine thread has stopped".to_string(),
                    )));
                    Err(format!("{}: the engine thread has stopped", state.replica).into())
                }
            },
        }
    }
}
