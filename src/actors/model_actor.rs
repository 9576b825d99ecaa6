//! The model actor: the mailbox and lifecycle face of one replica (a model on a device). It
//! owns the engine thread, which owns the model; loading happens on that thread and is reported
//! back as a message, so the actor never blocks. When the engine thread panics, the actor hands
//! the jobs that never started back to the router and fails, so its supervisor restarts it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::mpsc::Sender;

use super::admin::Failure;
use super::engine::{
    spawn_engine, EngineConfig, EngineError, EngineExit, EngineHandle, Job, TokenEvent,
};
use super::router::{ReplicaEntry, ReplicaId, RouterMsg};
use crate::models::{LoadSpec, ModelInfo};

/// Shortest interval between two stall checks.
const MIN_WATCHDOG_PERIOD: Duration = Duration::from_millis(20);

/// Messages a model actor handles.
#[derive(Debug, ractor_cluster::RactorMessage)]
pub enum ModelMsg {
    /// Run a job on this replica's engine.
    Generate(Job),
    /// The engine thread finished loading (or failed to).
    Loaded(Result<ModelInfo, Failure>),
    /// The load ran past the load deadline; its engine thread is left to finish on its own.
    LoadTimedOut(Duration),
    /// The engine thread ended.
    EngineExited(EngineExit),
    /// End every job this replica runs or holds with this error, then stop.
    Retire(EngineError),
    /// Check that the engine is making progress.
    Watchdog,
}

/// What a model actor is started with.
#[derive(Clone)]
pub struct ModelActorArgs {
    /// Which replica this is.
    pub replica: ReplicaId,
    /// What to load.
    pub spec: LoadSpec,
    /// Where to report load results.
    pub router: ActorRef<RouterMsg>,
    /// Whether it loads beside the active generation (a make-before-break reload).
    pub standby: bool,
    /// Longest a generation step may run before the replica is declared stalled.
    pub stall_timeout: Duration,
    /// Longest the load may take before the replica is failed.
    pub load_timeout: Duration,
    /// How the engine batches.
    pub engine: EngineConfig,
}

/// The model actor.
pub struct ModelActor;

/// A model actor's state.
pub struct ModelState {
    replica: ReplicaId,
    engine: Option<EngineHandle>,
    router: ActorRef<RouterMsg>,
    stall_timeout: Duration,
    /// The event channels and cancel flags of jobs handed to the engine, so that a stalled
    /// engine's requests can still be ended (the engine thread itself is stuck).
    watched: Vec<(Sender<TokenEvent>, Arc<AtomicBool>)>,
    /// Whether the engine finished loading (a thread still loading is not joined on stop).
    loaded: bool,
}

/// Takes a crashed replica out of routing, hands its unstarted jobs back, then fails the jobs
/// that were generating. The order matters: a client that retries after its error must find
/// the router already aware of the crash.
fn crash(
    state: &mut ModelState,
    reason: String,
    crashed: Vec<Job>,
    unstarted: Vec<Job>,
) -> Result<(), ActorProcessingErr> {
    state.router.cast(RouterMsg::ReplicaDown {
        replica: state.replica.clone(),
        reason: reason.clone(),
        restarting: true,
    })?;
    state.router.cast(RouterMsg::Requeue {
        replica: state.replica.clone(),
        jobs: unstarted,
    })?;
    for job in crashed {
        job.send(TokenEvent::Failed(EngineError::Crashed(reason.clone())));
    }
    Ok(())
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
        let exits = myself.clone();
        let (engine, ready) = spawn_engine(
            &args.replica.to_string(),
            args.spec,
            args.engine,
            move |exit| {
                let _ = exits.cast(ModelMsg::EngineExited(exit));
            },
        )?;
        // Before the load result, which the task below reports through this actor.
        args.router.cast(RouterMsg::Register(ReplicaEntry {
            id: args.replica.clone(),
            actor: Some(myself.clone()),
            standby: args.standby,
            engine: Some(engine.shared()),
        }))?;
        let loads = myself.clone();
        let load_timeout = args.load_timeout;
        tokio::spawn(async move {
            let message = match tokio::time::timeout(load_timeout, ready).await {
                Ok(Ok(Ok(info))) => ModelMsg::Loaded(Ok(info)),
                Ok(Ok(Err(err))) => ModelMsg::Loaded(Err(Failure::from_load(&err))),
                Ok(Err(_)) => {
                    ModelMsg::Loaded(Err(Failure::other("the engine thread ended while loading")))
                }
                Err(_) => ModelMsg::LoadTimedOut(load_timeout),
            };
            let _ = loads.cast(message);
        });
        let watchdog = myself;
        let period = (args.stall_timeout / 4).max(MIN_WATCHDOG_PERIOD);
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(period);
            loop {
                interval.tick().await;
                if watchdog.cast(ModelMsg::Watchdog).is_err() {
                    return;
                }
            }
        });
        Ok(ModelState {
            replica: args.replica,
            engine: Some(engine),
            router: args.router,
            stall_timeout: args.stall_timeout,
            watched: Vec::new(),
            loaded: false,
        })
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<ModelMsg>,
        state: &mut ModelState,
    ) -> Result<(), ActorProcessingErr> {
        // Closing the job channel ends the engine thread after its current step; it is joined
        // off the async runtime, so that once the actor has stopped the model's memory is free.
        // A thread still loading is let go instead: it ends once its load returns, and waiting
        // for it would hold back a shutdown or an evict by as long as the load takes.
        match state.engine.take() {
            Some(engine) if state.loaded => {
                let _ = tokio::task::spawn_blocking(move || engine.shutdown()).await;
            }
            Some(engine) => drop(engine.detach()),
            None => {}
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ModelMsg>,
        message: ModelMsg,
        state: &mut ModelState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            ModelMsg::LoadTimedOut(deadline) => {
                let err = format!("the load took longer than load_timeout ({deadline:?})");
                tracing::error!(replica = %state.replica, error = %err, "model failed to load");
                // The engine thread is stuck in the load; it is not joined, and exits on its own
                // once the load returns and finds its job channel closed.
                state.engine = state.engine.take().map(EngineHandle::detach);
                state.router.cast(RouterMsg::ReplicaLoaded {
                    replica: state.replica.clone(),
                    result: Err(Failure::other(err)),
                })?;
                Ok(())
            }
            ModelMsg::Loaded(result) => {
                state.loaded = result.is_ok();
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
            ModelMsg::Generate(job) => {
                state.watched.retain(|(events, _)| !events.is_closed());
                state.watched.push((job.events.clone(), job.cancel.clone()));
                let submitted = match &state.engine {
                    Some(engine) => engine.submit(job),
                    None => Err(Box::new(job)),
                };
                match submitted {
                    Ok(()) => Ok(()),
                    Err(job) => {
                        let reason = "the engine thread has stopped".to_string();
                        crash(state, reason.clone(), vec![*job], Vec::new())?;
                        Err(format!("{}: {reason}", state.replica).into())
                    }
                }
            }
            ModelMsg::Retire(error) => {
                // The abort reaches the engine before the channel closes in post_stop.
                if let Some(engine) = &state.engine {
                    engine.abort_all(error);
                }
                myself.stop(None);
                Ok(())
            }
            ModelMsg::Watchdog => {
                let running = state
                    .engine
                    .as_ref()
                    .and_then(EngineHandle::step_running_for);
                match running {
                    Some(running) if running > state.stall_timeout => {
                        let reason = format!(
                            "generation stalled: no token for {running:?} (stall_timeout {:?})",
                            state.stall_timeout
                        );
                        tracing::error!(replica = %state.replica, %reason, "engine stalled");
                        // The router first, so that a client retrying after its error does not
                        // reach this replica; the stuck thread ends once its step returns.
                        state.engine = None;
                        crash(state, reason.clone(), Vec::new(), Vec::new())?;
                        for (events, cancel) in state.watched.drain(..) {
                            cancel.store(true, Ordering::Relaxed);
                            let _ = events
                                .try_send(TokenEvent::Failed(EngineError::Stalled(reason.clone())));
                        }
                        Err(format!("{}: {reason}", state.replica).into())
                    }
                    _ => Ok(()),
                }
            }
            ModelMsg::EngineExited(EngineExit::Stopped) => Ok(()),
            ModelMsg::EngineExited(EngineExit::Panicked {
                message,
                crashed,
                unstarted,
            }) => {
                tracing::error!(replica = %state.replica, panic = %message, "engine thread panicked");
                state.engine = None;
                crash(state, message.clone(), crashed, unstarted)?;
                Err(format!("{}: the engine panicked: {message}", state.replica).into())
            }
        }
    }
}
