//! The admin API: list replicas, load, reload, evict, and re-read `pool.toml`. Every route
//! goes through [`super::auth::require_admin`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::admin_nodes;
use super::error::ApiError;
use super::extract::{ApiJson, ApiQuery};
use super::AppState;
use crate::actors::admin::{
    run_admin, AdminCommand, AdminError, FailureKind, ModelOutcome, DEFAULT_DRAIN_TIMEOUT,
};
use crate::actors::cluster::RemoteAdmin;
use crate::config::{confine, validate_entry, ModelEntry};
use crate::models::ModelSource;

/// How long an admin call may wait for its operation (a load, a drain) to finish.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(600);

impl From<AdminError> for ApiError {
    fn from(err: AdminError) -> Self {
        let message = err.to_string();
        let conflict = |code| ApiError {
            status: StatusCode::CONFLICT,
            kind: "conflict_error",
            code,
            param: None,
            message: message.clone(),
        };
        match err {
            AdminError::NotFound(_) => ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "not_found_error",
                code: "model_not_found",
                param: Some("name".to_string()),
                message,
            },
            AdminError::AlreadyLoaded(_) => conflict("model_already_loaded"),
            AdminError::InProgress(_) => conflict("operation_in_progress"),
            AdminError::LoadFailed { reason, .. } => match reason.kind {
                FailureKind::InvalidFile => {
                    ApiError::bad_request("invalid_model_file", Some("source"), message)
                }
                FailureKind::OutOfMemory => ApiError::unavailable("out_of_memory", message),
                FailureKind::Other => ApiError::bad_request("model_load_failed", None, message),
            },
            AdminError::Config(_) => ApiError::bad_request("invalid_config", None, message),
            AdminError::NoPoolFile => ApiError::bad_request("no_pool_file", None, message),
            AdminError::Unavailable(_) => ApiError::unavailable("supervisor_unavailable", message),
        }
    }
}

/// The `wait` query of the admin operations.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// `false` answers `202 Accepted` as soon as the operation has started, with what it
    /// started (`loading`, `reloading`, `evicting`, ...); `true` (the default) answers when it
    /// has finished.
    #[serde(default = "yes")]
    wait: bool,
}

fn yes() -> bool {
    true
}

async fn run(
    state: &AppState,
    command: AdminCommand,
    wait: bool,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    Ok(answer(local(state, command, wait).await?, wait))
}

/// Carries out `command` on this node's supervisor; each model's outcome.
pub(super) async fn local(
    state: &AppState,
    command: AdminCommand,
    wait: bool,
) -> Result<Vec<Value>, ApiError> {
    let outcomes = run_admin(&state.supervisor, command, wait, ADMIN_TIMEOUT).await?;
    Ok(outcomes.iter().map(outcome_json).collect())
}

/// The answer to an admin operation: `200` when done, `202` when only started.
pub(super) fn answer(models: Vec<Value>, wait: bool) -> (StatusCode, Json<Value>) {
    let status = if wait {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    (status, Json(json!({ "models": models })))
}

fn outcome_json(outcome: &ModelOutcome) -> Value {
    serde_json::to_value(outcome).unwrap_or_default()
}

/// `GET /admin/models`: every replica with its state, load and history.
#[utoipa::path(get, path = "/admin/models", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "Every model, replica and device", body = crate::api::openapi::schemas::PoolListing),
        (status = 401, description = "No admin key", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn list(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let mut listing = pool_listing(&state).await?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    if let Some(fields) = listing.as_object_mut() {
        fields.insert("time".to_string(), json!(now));
    }
    Ok(Json(listing))
}

/// How often `GET /admin/events` looks at the pool.
const EVENTS_POLL: Duration = Duration::from_millis(250);

/// `GET /admin/events`: server-sent events, each `{"models": [...], "devices": [...]}` as
/// `GET /admin/models` lists them, sent at once and then whenever the listing changes (a load's progress, a
/// state, in-flight and queued requests, sequences and KV blocks); the pool is looked at every
/// quarter second, and a comment keeps an idle stream open until the server stops.
#[utoipa::path(get, path = "/admin/events", tag = "admin", security(("bearer" = [])),
    responses((status = 200, description = "Server-sent events, each a listing as `GET /admin/models` gives (without `time`), at once and on every change", body = crate::api::openapi::schemas::PoolListing, content_type = "text/event-stream"),
        (status = 401, description = "No admin key", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn events(
    State(state): State<AppState>,
) -> Sse<impl futures::Stream<Item = Result<Event, std::convert::Infallible>>> {
    let stream = futures::stream::unfold((state, Value::Null), |(state, last)| async move {
        loop {
            match pool_listing(&state).await {
                Ok(listing) if listing != last => {
                    let event = Event::default().data(listing.to_string());
                    return Some((Ok(event), (state, listing)));
                }
                Ok(_) => {}
                Err(error) => {
                    let event = Event::default().data(json!(error.body()).to_string());
                    return Some((Ok(event), (state, Value::Null)));
                }
            }
            tokio::time::sleep(EVENTS_POLL).await;
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// `POST /admin/models[?wait=false]`: loads a new model from a `[[models]]`-shaped JSON body.
#[utoipa::path(post, path = "/admin/models", tag = "admin", security(("bearer" = [])),
    params(WaitQuery), request_body = crate::config::ModelEntry,
    responses((status = 200, description = "Loaded", body = crate::api::openapi::schemas::AdminOutcomes),
        (status = 202, description = "Started (`wait=false`)", body = crate::api::openapi::schemas::AdminOutcomes),
        (status = 400, description = "Invalid request", body = crate::api::openapi::schemas::ErrorResponse), (status = 401, description = "No key, or a key that is not valid here", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 409, description = "Already loaded, or another operation on it is running", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 503, description = "Out of memory", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn load(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<WaitQuery>,
    ApiJson(entry): ApiJson<ModelEntry>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let mut entry = entry;
    let root = &state.server.models_root;
    let local = matches!(
        entry.source.parse::<ModelSource>(),
        Ok(ModelSource::Dir(_) | ModelSource::Gguf(_))
    );
    if local {
        let path = confine(root, &entry.source).map_err(|err| {
            ApiError::bad_request(
                "path_outside_models_root",
                Some("source"),
                format!("{err} (server.models_root)"),
            )
        })?;
        entry.source = path.to_string_lossy().into_owned();
    }
    let spec = validate_entry(&entry, root)
        .map_err(|err| ApiError::bad_request("invalid_model", Some(&err.field), err.to_string()))?;
    run(&state, AdminCommand::Load(spec), query.wait).await
}

/// Query of `POST /admin/models/{name}/reload`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct ReloadQuery {
    /// As [`WaitQuery`].
    #[serde(default = "yes")]
    wait: bool,
    /// With `[cluster]`: only on this node (default: on every node that has the model).
    #[serde(default)]
    node: Option<String>,
}

/// `POST /admin/models/{name}/reload[?wait=false][&node=N]`.
#[utoipa::path(post, path = "/admin/models/{name}/reload", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "The model"), ReloadQuery),
    responses((status = 200, description = "Reloaded (with `[cluster]`, on each node that has it)", body = crate::api::openapi::schemas::AdminOutcomes),
        (status = 202, description = "Started (`wait=false`)", body = crate::api::openapi::schemas::AdminOutcomes),
        (status = 400, description = "Invalid request", body = crate::api::openapi::schemas::ErrorResponse), (status = 401, description = "No key, or a key that is not valid here", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 404, description = "No such model (or node)", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 409, description = "Another operation on it is running", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn reload(
    State(state): State<AppState>,
    UrlPath(name): UrlPath<String>,
    ApiQuery(query): ApiQuery<ReloadQuery>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let op = RemoteAdmin::Reload {
        name,
        wait: query.wait,
    };
    admin_nodes::carry_out(&state, op, query.node).await
}

/// Query of `POST /admin/models/{name}/evict`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EvictQuery {
    /// `drain` (default) or `abort`.
    #[serde(default)]
    mode: Option<String>,
    /// Drain deadline in milliseconds (default 30 000).
    #[serde(default)]
    timeout_ms: Option<u64>,
    /// As [`WaitQuery`].
    #[serde(default = "yes")]
    wait: bool,
    /// As in [`ReloadQuery`].
    #[serde(default)]
    node: Option<String>,
}

/// `POST /admin/models/{name}/evict[?mode=abort][&timeout_ms=N][&wait=false][&node=N]`.
#[utoipa::path(post, path = "/admin/models/{name}/evict", tag = "admin", security(("bearer" = [])),
    params(("name" = String, Path, description = "The model"), EvictQuery),
    responses((status = 200, description = "Evicted, its memory free (with `[cluster]`, on each node that had it)", body = crate::api::openapi::schemas::AdminOutcomes),
        (status = 202, description = "Started (`wait=false`)", body = crate::api::openapi::schemas::AdminOutcomes),
        (status = 400, description = "Invalid request", body = crate::api::openapi::schemas::ErrorResponse), (status = 401, description = "No key, or a key that is not valid here", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 404, description = "No such model (or node)", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 409, description = "Another operation on it is running", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn evict(
    State(state): State<AppState>,
    UrlPath(name): UrlPath<String>,
    ApiQuery(query): ApiQuery<EvictQuery>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let abort = match query.mode.as_deref() {
        None | Some("drain") => false,
        Some("abort") => true,
        Some(other) => {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                Some("mode"),
                format!("mode must be drain or abort, not {other:?}"),
            ))
        }
    };
    let drain = query
        .timeout_ms
        .map_or(DEFAULT_DRAIN_TIMEOUT, Duration::from_millis);
    let op = RemoteAdmin::Evict {
        name,
        abort,
        drain_ms: u64::try_from(drain.as_millis()).unwrap_or(u64::MAX),
        wait: query.wait,
    };
    admin_nodes::carry_out(&state, op, query.node).await
}

/// `POST /admin/reload[?wait=false]`: re-reads `pool.toml` and applies the difference.
#[utoipa::path(post, path = "/admin/reload", tag = "admin", security(("bearer" = [])),
    params(WaitQuery),
    responses((status = 200, description = "Each model's outcome", body = crate::api::openapi::schemas::AdminOutcomes),
        (status = 202, description = "Started (`wait=false`)", body = crate::api::openapi::schemas::AdminOutcomes),
        (status = 400, description = "The pool file is broken (its diagnostics); nothing changed", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 401, description = "No admin key", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn reload_pool(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<WaitQuery>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    run(&state, AdminCommand::ReloadPool, query.wait).await
}

/// This node's listing, and with `[cluster]` every other node's, each replica and device
/// with its `node`.
async fn pool_listing(state: &AppState) -> Result<Value, ApiError> {
    let mut listing = crate::actors::listing::listing(&state.router, &state.supervisor)
        .await
        .ok_or_else(|| ApiError::unavailable("unhealthy", "the router does not answer"))?;
    if let Some(cluster) = &state.cluster {
        cluster.merge(&mut listing);
    }
    Ok(listing)
}
