//! `GET /metrics`: the pool's metrics in the Prometheus text format; with `[cluster]`, every
//! node's (each sample labelled with its `node`) unless `?scope=node`.

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::error::ApiError;
use super::extract::ApiQuery;
use super::AppState;
use crate::actors::cluster::peer_metrics;
use crate::actors::exposition::render;

/// Query of `GET /metrics`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MetricsQuery {
    /// With `[cluster]`: `cluster` (the default) gathers every node's metrics, each sample
    /// labelled with its `node`; `node` gives this node's alone (to scrape each node).
    #[serde(default)]
    scope: Option<String>,
}

/// The Prometheus text exposition.
#[utoipa::path(get, path = "/metrics", tag = "metrics", security(("bearer" = [])),
    params(MetricsQuery),
    responses((status = 200, description = "Prometheus text exposition", body = String, content_type = "text/plain; version=0.0.4"),
        (status = 400, description = "Invalid `scope`", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 401, description = "No admin key (unless `metrics_public`)", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn metrics(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<MetricsQuery>,
) -> Response {
    let whole = match query.scope.as_deref() {
        None | Some("cluster") => true,
        Some("node") => false,
        Some(other) => {
            return ApiError::bad_request(
                "invalid_parameter",
                Some("scope"),
                format!("scope must be cluster or node, not {other:?}"),
            )
            .into_response()
        }
    };
    let Some(mut body) = render(&state.router, &state.metrics).await else {
        return ApiError::unavailable("unhealthy", "the router does not answer").into_response();
    };
    if let (Some(view), true) = (&state.cluster, whole) {
        let mut parts = vec![(view.node().to_string(), body)];
        parts.extend(peer_metrics().await);
        body = crate::metrics::merge(&parts);
    }
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}
