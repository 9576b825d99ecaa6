//! `GET /health`, `GET /ready` and `GET /v1/models`.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use ractor::rpc::CallResult;
use serde_json::{json, Value};

use super::auth::Access;
use super::error::ApiError;
use super::AppState;
use crate::actors::router::{ModelStatus, RouterMsg};

/// How long the router may take to answer a health or listing call.
const STATUS_TIMEOUT: Duration = Duration::from_secs(1);

async fn statuses(state: &AppState) -> Option<Vec<ModelStatus>> {
    match state
        .router
        .call(RouterMsg::List, Some(STATUS_TIMEOUT))
        .await
    {
        Ok(CallResult::Success(list)) => Some(list),
        _ => None,
    }
}

fn ready_replicas(status: &ModelStatus) -> usize {
    status.ready_replicas()
}

/// Liveness: the HTTP loop and the router answer.
#[utoipa::path(get, path = "/health", tag = "health",
    responses((status = 200, description = "The HTTP loop and the router answer", body = crate::api::openapi::schemas::StatusBody),
        (status = 503, description = "The router does not answer", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn health(State(state): State<AppState>) -> Response {
    match statuses(&state).await {
        Some(_) => Json(json!({"status": "ok"})).into_response(),
        None => ApiError::unavailable("unhealthy", "the router does not answer").into_response(),
    }
}

/// Readiness: not shutting down, and every configured model has at least one ready replica.
#[utoipa::path(get, path = "/ready", tag = "health",
    responses((status = 200, description = "Every configured model has a ready replica", body = crate::api::openapi::schemas::StatusBody),
        (status = 503, description = "Shutting down, or models not ready", body = crate::api::openapi::schemas::StatusBody)))]
pub async fn ready(State(state): State<AppState>) -> Response {
    if state.shutdown.draining() {
        let body = json!({"status": "shutting_down"});
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response();
    }
    let Some(list) = statuses(&state).await else {
        return ApiError::unavailable("unhealthy", "the router does not answer").into_response();
    };
    let waiting: Vec<&str> = list
        .iter()
        .filter(|status| ready_replicas(status) == 0 && !status.unloaded())
        .map(|status| status.name.as_str())
        .collect();
    if waiting.is_empty() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        let body = json!({"status": "not_ready", "models_not_ready": waiting});
        (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
    }
}

/// `GET /v1/models`: the models with a ready replica, in the OpenAI list shape; with
/// `[cluster]`, those of every node, each with the `nodes` that serve it.
#[utoipa::path(get, path = "/v1/models", tag = "inference", security(("bearer" = [])),
    responses((status = 200, description = "The models with a ready replica", body = crate::api::openapi::schemas::ModelList),
        (status = 401, description = "No valid key", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn models(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
) -> Result<Response, ApiError> {
    let list = statuses(&state)
        .await
        .ok_or_else(|| ApiError::unavailable("unhealthy", "the router does not answer"))?;
    let here = state.cluster.as_ref().map(|view| view.node().to_string());
    let mut data: Vec<Value> = list
        .iter()
        .filter(|status| ready_replicas(status) > 0 || status.unloaded())
        .filter(|status| access.allows(&status.name))
        .map(|status| {
            let nodes = here.as_ref().map(|here| vec![here.clone()]);
            let context = status.info.as_ref().map(|info| info.context_length);
            card(&state, &status.name, context, ready_replicas(status), nodes)
        })
        .collect();
    let remote = state
        .cluster
        .as_ref()
        .map(|view| view.ready())
        .unwrap_or_default();
    for model in remote.into_iter().filter(|m| access.allows(&m.model)) {
        match data
            .iter_mut()
            .find(|card| card["id"] == model.model.as_str())
        {
            Some(card) => {
                let replicas = card["replicas"].as_u64().unwrap_or(0);
                card["replicas"] = json!(replicas + model.replicas as u64);
                if let Some(nodes) = card["nodes"].as_array_mut() {
                    nodes.push(json!(model.node));
                }
                if card["max_model_len"].is_null() {
                    card["max_model_len"] = json!(model.context_length);
                }
            }
            None => data.push(card(
                &state,
                &model.model,
                model.context_length,
                model.replicas,
                Some(vec![model.node]),
            )),
        }
    }
    Ok(Json(json!({"object": "list", "data": data})).into_response())
}

/// One model of `/v1/models`; `nodes` with `[cluster]`.
fn card(
    state: &AppState,
    id: &str,
    context: Option<usize>,
    replicas: usize,
    nodes: Option<Vec<String>>,
) -> Value {
    let mut card = json!({
        "id": id,
        "object": "model",
        "created": state.started_at,
        "owned_by": "llorch",
        "max_model_len": context,
        "replicas": replicas,
    });
    if let (Some(nodes), Some(fields)) = (nodes, card.as_object_mut()) {
        fields.insert("nodes".to_string(), json!(nodes));
    }
    card
}
