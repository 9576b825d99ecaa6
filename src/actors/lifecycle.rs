//! The long parts of admin operations, run in tasks: wait for a load, drain an evict, swap a
//! reload's generations. Each talks to the supervisor and the router with short messages and
//! tells the supervisor when it is done, so a model is never operated on twice at once.

use std::time::{Duration, Instant};

use futures::future::join_all;
use ractor::rpc::CallResult;
use ractor::ActorRef;

use super::admin::{AdminError, Failure, ModelOutcome, DEFAULT_DRAIN_TIMEOUT, LOAD_TIMEOUT};
use super::engine::EngineError;
use super::model_actor::ModelMsg;
use super::router::{ModelStatus, ReplicaId, ReplicaState, RouterMsg};
use super::supervisor::{route_spec, Plan, PoolPlan, SupervisorMsg};
use crate::config::ModelSpec;

/// How often a waiting task looks at the router.
const POLL_INTERVAL: Duration = Duration::from_millis(25);
/// How long an RPC to the router or supervisor may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a stopping model actor may take to join its engine thread.
const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// The actors an operation talks to.
pub struct Ctx {
    /// The supervisor.
    pub supervisor: ActorRef<SupervisorMsg>,
    /// The router.
    pub router: ActorRef<RouterMsg>,
}

/// Runs a claimed plan, then releases its models.
pub async fn run(ctx: &Ctx, plan: Plan) -> Result<Vec<ModelOutcome>, AdminError> {
    let result = match plan {
        Plan::Load { spec, unload } | Plan::Activate { spec, unload } => {
            let name = spec.name.clone();
            unload_all(ctx, &unload).await;
            let outcome = load(ctx, spec).await;
            finish(ctx, std::iter::once(name).chain(unload).collect());
            outcome.map(|o| vec![o])
        }
        Plan::Unload(name) => {
            unload_one(ctx, &name).await;
            finish(ctx, vec![name.clone()]);
            Ok(vec![ModelOutcome {
                name,
                action: "unloaded",
                error: None,
            }])
        }
        Plan::Evict { name, abort, drain } => {
            let outcome = evict(ctx, &name, abort, drain).await;
            finish(ctx, vec![name]);
            outcome.map(|o| vec![o])
        }
        Plan::Reload {
            spec,
            unload,
            break_first,
        } => {
            let name = spec.name.clone();
            unload_all(ctx, &unload).await;
            let outcome = if break_first {
                reload_break_first(ctx, spec).await
            } else {
                reload(ctx, spec).await
            };
            finish(ctx, std::iter::once(name).chain(unload).collect());
            outcome.map(|o| vec![o])
        }
        Plan::Pool(pool) => Ok(apply_pool(ctx, pool).await),
    };
    if let Err(err) = &result {
        tracing::warn!(error = %err, "admin operation failed");
    }
    result
}

fn finish(ctx: &Ctx, names: Vec<String>) {
    let _ = ctx.supervisor.cast(SupervisorMsg::Finished(names));
}

/// Applies a pool diff: added models load, removed ones are evicted (drained), changed ones
/// reload, unchanged ones are not touched. Each model's outcome is reported.
async fn apply_pool(ctx: &Ctx, pool: PoolPlan) -> Vec<ModelOutcome> {
    let PoolPlan {
        added,
        changed,
        removed,
        unchanged,
        unload,
        rejected,
    } = pool;
    let touched: Vec<String> = added
        .iter()
        .map(|spec| spec.name.clone())
        .chain(changed.iter().map(|(spec, _)| spec.name.clone()))
        .chain(removed.iter().cloned())
        .chain(unload.iter().cloned())
        .collect();
    // Removals and unloads first, so that their memory is free for what loads next.
    let evicts = removed.into_iter().map(|name| async move {
        let result = evict(ctx, &name, false, DEFAULT_DRAIN_TIMEOUT).await;
        outcome_of(name, result)
    });
    let mut outcomes = join_all(evicts).await;
    unload_all(ctx, &unload).await;
    let loads = added.into_iter().map(|spec| async move {
        let name = spec.name.clone();
        if !spec.preload {
            let _ = ctx.router.cast(RouterMsg::AddRoute(route_spec(&spec)));
            let _ = ctx.supervisor.cast(SupervisorMsg::Commit {
                name: name.clone(),
                spec: Some(spec),
            });
            return ModelOutcome {
                name,
                action: "added",
                error: None,
            };
        }
        outcome_of(name, load(ctx, spec).await)
    });
    let reloads = changed.into_iter().map(|(spec, break_first)| async move {
        let name = spec.name.clone();
        let result = if break_first {
            reload_break_first(ctx, spec).await
        } else {
            reload(ctx, spec).await
        };
        outcome_of(name, result)
    });
    let (loaded, reloaded) = futures::join!(join_all(loads), join_all(reloads));
    outcomes.extend(loaded);
    outcomes.extend(reloaded);
    outcomes.extend(rejected.into_iter().map(|(name, reason)| ModelOutcome {
        name,
        action: "failed",
        error: Some(reason),
    }));
    outcomes.extend(unchanged.into_iter().map(|name| ModelOutcome {
        name,
        action: "unchanged",
        error: None,
    }));
    finish(ctx, touched);
    outcomes
}

fn outcome_of(name: String, result: Result<ModelOutcome, AdminError>) -> ModelOutcome {
    result.unwrap_or_else(|err| ModelOutcome {
        name,
        action: "failed",
        error: Some(err.to_string()),
    })
}

async fn unload_all(ctx: &Ctx, names: &[String]) {
    join_all(names.iter().map(|name| unload_one(ctx, name))).await;
}

/// Unloads a model's replicas but keeps it configured: requests that arrive meanwhile wait,
/// and the next request loads it again.
async fn unload_one(ctx: &Ctx, name: &str) {
    let _ = ctx.router.cast(RouterMsg::Park(name.to_string(), true));
    let ids = replica_ids(ctx, name, |_| true).await;
    wait_idle(ctx, name, &ids, DEFAULT_DRAIN_TIMEOUT).await;
    stop(ctx, name, ids.clone()).await;
    let _ = ctx.router.cast(RouterMsg::Forget(ids));
    let _ = ctx
        .supervisor
        .cast(SupervisorMsg::Unloaded(name.to_string()));
    let _ = ctx.router.cast(RouterMsg::Park(name.to_string(), false));
}

/// Break-before-make, for a device budget that cannot hold both generations: requests wait
/// while the old generation stops and the new one loads.
async fn reload_break_first(ctx: &Ctx, spec: ModelSpec) -> Result<ModelOutcome, AdminError> {
    let name = spec.name.clone();
    let _ = ctx.router.cast(RouterMsg::Park(name.clone(), true));
    let old = replica_ids(ctx, &name, |_| true).await;
    wait_idle(ctx, &name, &old, DEFAULT_DRAIN_TIMEOUT).await;
    stop(ctx, &name, old.clone()).await;
    let _ = ctx.router.cast(RouterMsg::Forget(old));
    let _ = ctx.router.cast(RouterMsg::AddRoute(route_spec(&spec)));
    let started = start_generation(ctx, spec.clone(), false).await;
    let _ = ctx.router.cast(RouterMsg::Park(name.clone(), false));
    let new = started?;
    let _ = ctx.supervisor.cast(SupervisorMsg::Commit {
        name: name.clone(),
        spec: Some(spec),
    });
    match wait_loaded(ctx, &name, &new).await {
        Ok(()) => Ok(ModelOutcome {
            name,
            action: "reloaded",
            error: None,
        }),
        Err(reason) => Err(AdminError::LoadFailed { name, reason }),
    }
}

/// Adds a model and waits for its replicas. A failed load leaves the model listed as failed,
/// so that a reload can retry it.
async fn load(ctx: &Ctx, spec: ModelSpec) -> Result<ModelOutcome, AdminError> {
    ctx.router
        .cast(RouterMsg::AddRoute(route_spec(&spec)))
        .map_err(|err| AdminError::Unavailable(err.to_string()))?;
    let name = spec.name.clone();
    let ids = start_generation(ctx, spec, false).await?;
    match wait_loaded(ctx, &name, &ids).await {
        Ok(()) => Ok(ModelOutcome {
            name,
            action: "loaded",
            error: None,
        }),
        Err(reason) => Err(AdminError::LoadFailed { name, reason }),
    }
}

/// Drains (or aborts) a model, stops its replicas, joins their engine threads (so their memory
/// is free when this returns) and removes it.
async fn evict(
    ctx: &Ctx,
    name: &str,
    abort: bool,
    drain: Duration,
) -> Result<ModelOutcome, AdminError> {
    let _ = ctx
        .router
        .cast(RouterMsg::SetDraining(name.to_string(), true));
    let ids = replica_ids(ctx, name, |_| true).await;
    if !abort {
        wait_idle(ctx, name, &ids, drain).await;
    }
    stop(ctx, name, ids).await;
    let _ = ctx.router.cast(RouterMsg::RemoveRoute(name.to_string()));
    let _ = ctx.supervisor.cast(SupervisorMsg::Commit {
        name: name.to_string(),
        spec: None,
    });
    Ok(ModelOutcome {
        name: name.to_string(),
        action: "evicted",
        error: None,
    })
}

/// Make-before-break: the new generation loads beside the old one, takes over when every new
/// replica is ready, and the old one drains and stops. If the new generation fails to load,
/// it is dropped and the old one keeps serving.
async fn reload(ctx: &Ctx, spec: ModelSpec) -> Result<ModelOutcome, AdminError> {
    let name = spec.name.clone();
    let old = replica_ids(ctx, &name, |_| true).await;
    let new = start_generation(ctx, spec.clone(), true).await?;
    if let Err(reason) = wait_loaded(ctx, &name, &new).await {
        stop(ctx, &name, new.clone()).await;
        let _ = ctx.router.cast(RouterMsg::Forget(new));
        return Err(AdminError::LoadFailed { name, reason });
    }
    let generation = new.first().map_or(0, |id| id.generation);
    let _ = ctx.router.cast(RouterMsg::AddRoute(route_spec(&spec)));
    let _ = ctx.router.cast(RouterMsg::Promote {
        model: name.clone(),
        generation,
    });
    wait_idle(ctx, &name, &old, DEFAULT_DRAIN_TIMEOUT).await;
    stop(ctx, &name, old.clone()).await;
    let _ = ctx.router.cast(RouterMsg::Forget(old));
    let _ = ctx.supervisor.cast(SupervisorMsg::Commit {
        name: name.clone(),
        spec: Some(spec),
    });
    Ok(ModelOutcome {
        name,
        action: "reloaded",
        error: None,
    })
}

async fn start_generation(
    ctx: &Ctx,
    spec: ModelSpec,
    standby: bool,
) -> Result<Vec<ReplicaId>, AdminError> {
    let call = ctx
        .supervisor
        .call(
            |reply| SupervisorMsg::StartGeneration {
                spec,
                standby,
                reply,
            },
            Some(CALL_TIMEOUT),
        )
        .await;
    match call {
        Ok(CallResult::Success(ids)) => Ok(ids),
        _ => Err(AdminError::Unavailable(
            "the supervisor did not start the replicas".to_string(),
        )),
    }
}

/// Stops supervising `ids`, ends what they still run with `model_evicted`, stops their actors
/// and waits until their engine threads have ended.
async fn stop(ctx: &Ctx, name: &str, ids: Vec<ReplicaId>) {
    let call = ctx
        .supervisor
        .call(
            |reply| SupervisorMsg::Detach(ids, reply),
            Some(CALL_TIMEOUT),
        )
        .await;
    let Ok(CallResult::Success(actors)) = call else {
        return;
    };
    let reason = format!("the model {name:?} was evicted");
    let stops = actors.into_iter().map(|actor| {
        let reason = reason.clone();
        async move {
            if actor
                .cast(ModelMsg::Retire(EngineError::Evicted(reason)))
                .is_ok()
            {
                let _ = actor.wait(Some(STOP_TIMEOUT)).await;
            }
        }
    });
    join_all(stops).await;
}

async fn status(ctx: &Ctx, name: &str) -> Option<ModelStatus> {
    match ctx.router.call(RouterMsg::List, Some(CALL_TIMEOUT)).await {
        Ok(CallResult::Success(list)) => list.into_iter().find(|status| status.name == name),
        _ => None,
    }
}

async fn replica_ids(ctx: &Ctx, name: &str, keep: impl Fn(&ReplicaId) -> bool) -> Vec<ReplicaId> {
    status(ctx, name)
        .await
        .map(|status| {
            status
                .replicas
                .into_iter()
                .map(|replica| replica.id)
                .filter(|id| keep(id))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until every replica in `ids` is ready; returns the first failure's reason otherwise.
async fn wait_loaded(ctx: &Ctx, name: &str, ids: &[ReplicaId]) -> Result<(), Failure> {
    let deadline = Instant::now() + LOAD_TIMEOUT;
    loop {
        if let Some(status) = status(ctx, name).await {
            let ours: Vec<_> = status
                .replicas
                .iter()
                .filter(|replica| ids.contains(&replica.id))
                .collect();
            if let Some(failed) = ours.iter().find_map(|replica| match &replica.state {
                ReplicaState::Failed(reason) => Some(reason.clone()),
                _ => None,
            }) {
                return Err(failed);
            }
            if ours.len() == ids.len() && ours.iter().all(|r| r.state == ReplicaState::Ready) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            return Err(Failure::other(format!(
                "the load took longer than {LOAD_TIMEOUT:?}"
            )));
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// Waits until the replicas in `ids` run nothing and (for an evict) nothing is queued, or the
/// deadline passes.
async fn wait_idle(ctx: &Ctx, name: &str, ids: &[ReplicaId], drain: Duration) {
    let deadline = Instant::now() + drain;
    loop {
        let Some(status) = status(ctx, name).await else {
            return;
        };
        let busy: usize = status
            .replicas
            .iter()
            .filter(|replica| ids.contains(&replica.id))
            .map(|replica| replica.in_flight)
            .sum();
        let queued = if status.draining { status.queued } else { 0 };
        if busy == 0 && queued == 0 {
            return;
        }
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}
