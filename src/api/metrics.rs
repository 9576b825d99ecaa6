//! `GET /metrics`: the pool's metrics in the Prometheus text format.

use std::time::Duration;

use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use ractor::rpc::CallResult;

use super::error::ApiError;
use super::AppState;
use crate::actors::router::RouterMsg;

/// How long the router may take to answer.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

/// The Prometheus text exposition.
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
    let body = state.metrics.render(&models);
    (
        [(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        body,
    )
        .into_response()
}
