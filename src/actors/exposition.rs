//! This node's Prometheus text: the metrics' counters and histograms with the gauges of the
//! pool's state as the router reports it now; served by `/metrics` and, with `[cluster]`,
//! by the cluster agent to the other nodes.

use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::ActorRef;

use super::router::{ModelStatus, ReplicaState, RouterMsg};
use crate::metrics::{BatchGauges, Metrics, ModelGauges, ReplicaGauges};

/// How long the router may take to answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// This node's exposition; `None` when the router does not answer.
pub async fn render(router: &ActorRef<RouterMsg>, metrics: &Metrics) -> Option<String> {
    match router.call(RouterMsg::List, Some(STATUS_TIMEOUT)).await {
        Ok(CallResult::Success(models)) => Some(metrics.render(&gauges(&models))),
        _ => None,
    }
}

/// The pool's state as the metrics take it.
fn gauges(models: &[ModelStatus]) -> Vec<ModelGauges> {
    models
        .iter()
        .map(|model| ModelGauges {
            name: model.name.clone(),
            queued: model.queued,
            replicas: model
                .replicas
                .iter()
                .map(|replica| ReplicaGauges {
                    replica: format!("{}/g{}", replica.id.index, replica.id.generation),
                    device: replica.id.device.clone(),
                    state: match replica.state {
                        ReplicaState::Loading => "loading",
                        ReplicaState::Ready => "ready",
                        ReplicaState::Restarting => "restarting",
                        ReplicaState::Failed(_) => "failed",
                    },
                    in_flight: replica.in_flight,
                    memory_bytes: replica.memory_bytes,
                    device_memory_bytes: replica.device_memory_bytes,
                    batch: replica
                        .occupancy
                        .filter(|o| o.kv_blocks_total > 0 && replica.state == ReplicaState::Ready)
                        .map(|o| BatchGauges {
                            running: o.running,
                            waiting: o.waiting,
                            paused: o.paused,
                            kv_blocks_used: o.kv_blocks_used,
                            kv_blocks_total: o.kv_blocks_total,
                            kv_blocks_cached: o.kv_blocks_cached,
                        }),
                })
                .collect(),
        })
        .collect()
}
