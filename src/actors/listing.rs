//! The pool's listing (models, replicas, devices) as the admin API and the console show it,
//! built from the router's and the supervisor's answers.

use std::time::{Duration, UNIX_EPOCH};

use ractor::rpc::CallResult;
use ractor::ActorRef;
use serde_json::{json, Value};

use crate::actors::router::{ReplicaState, ReplicaStatus, Role, RouterMsg};
use crate::actors::supervisor::{Overview, SupervisorMsg};
use crate::models::ModelInfo;

/// Every model with its replicas, and every device with its budget, as `/admin/models` and
/// `/admin/events` show them; `None` when the router does not answer.
pub async fn listing(
    router: &ActorRef<RouterMsg>,
    supervisor: &ActorRef<SupervisorMsg>,
) -> Option<Value> {
    let call = router
        .call(RouterMsg::List, Some(Duration::from_secs(2)))
        .await;
    let Ok(CallResult::Success(models)) = call else {
        return None;
    };
    let overview_call = supervisor
        .call(SupervisorMsg::Overview, Some(Duration::from_secs(2)))
        .await;
    let Overview { busy, devices } = match overview_call {
        Ok(CallResult::Success(overview)) => overview,
        _ => Overview::default(),
    };
    let devices: Vec<Value> = devices
        .iter()
        .map(|use_| {
            let name = use_.device.to_string();
            let on_it = models
                .iter()
                .flat_map(|model| &model.replicas)
                .filter(|replica| replica.id.device == name);
            json!({
                "device": name,
                "memory_budget_bytes": use_.budget,
                "memory_reserved_bytes": use_.reserved,
                "replicas": on_it.clone().count(),
                "memory_bytes": on_it.filter_map(|replica| replica.memory_bytes).sum::<u64>(),
            })
        })
        .collect();
    let models: Vec<Value> = models
        .iter()
        .map(|model| {
            let replicas: Vec<Value> = model
                .replicas
                .iter()
                .map(|replica| {
                    let state_name = match (&replica.state, replica.role, model.draining) {
                        (_, Role::Retiring, _) | (ReplicaState::Ready, _, true) => "draining",
                        (ReplicaState::Loading, _, _) => "loading",
                        (ReplicaState::Ready, _, false) => "ready",
                        (ReplicaState::Restarting, _, _) => "restarting",
                        (ReplicaState::Failed(_), _, _) => "failed",
                    };
                    json!({
                        "replica": replica.id.to_string(),
                        "device": replica.id.device,
                        "generation": replica.id.generation,
                        "state": state_name,
                        "standby": replica.role == Role::Standby,
                        "in_flight": replica.in_flight,
                        "restarts": replica.restarts,
                        "last_error": replica.last_error,
                        "memory_bytes": replica.memory_bytes,
                        "device_memory_bytes": replica.device_memory_bytes,
                        "loaded_at": replica.loaded_at.and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| d.as_secs()),
                        "batching": batching(replica, model.info.as_ref()),
                        "load_progress": replica.load_progress.map(|p| json!({
                            "bytes_read": p.bytes_read,
                            "bytes_total": p.bytes_total,
                            "bytes_downloaded": p.bytes_downloaded,
                            "download_bytes_total": p.download_bytes_total,
                        })),
                    })
                })
                .collect();
            json!({
                "name": model.name,
                "loaded": !model.replicas.is_empty(),
                "operation_in_progress": busy.contains(&model.name),
                "state": if model.replicas.is_empty() { "evicted" } else if model.draining { "draining" } else { "loaded" },
                "queued": model.queued,
                "context_length": model.info.as_ref().map(|info| info.context_length),
                "replicas": replicas,
            })
        })
        .collect();
    Some(json!({"models": models, "devices": devices}))
}

/// A ready replica's sequences and KV blocks (`null` before it has loaded).
fn batching(replica: &ReplicaStatus, info: Option<&ModelInfo>) -> Value {
    match (replica.occupancy, info, &replica.state) {
        (Some(o), Some(info), ReplicaState::Ready) => json!({
            "batched": info.batched,
            "max_sequences": o.max_seqs,
            "running": o.running,
            "waiting": o.waiting,
            "paused": o.paused,
            "kv_blocks_used": o.kv_blocks_used,
            "kv_blocks_cached": o.kv_blocks_cached,
            "kv_blocks_total": o.kv_blocks_total,
            "kv_block_tokens": o.kv_block_size,
            "kv_cache_bytes": info.kv_cache_bytes,
        }),
        _ => Value::Null,
    }
}
