//! `GET /metrics`: the pool's metrics in the Prometheus text format.

use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use ractor::rpc::CallResult;

use super::error::ApiError;
use super::AppState;
use crate::actors::router::{ModelStatus, ReplicaState, RouterMsg};
use crate::metrics::{BatchGauges, ModelGauges, ReplicaGauges};

/// How long the router may take to answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// The Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "metrics", security(("bearer" = [])),
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 401, description = "No admin key (unless `metrics_public`)", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn metrics(State(state): State<AppState>) -> Response {
    let models = match state
        .router
        .call(RouterMsg::List, Some(STATUS_TIMEOUT))
        .await
    {
        Ok(CallResult::Success(models)) => models,
        _ => {
            return ApiError::unavailable("unhealthy", "the router does not answer").into_response()
        }
    };
    let body = state.metrics.render(&gauges(&models));
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
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
