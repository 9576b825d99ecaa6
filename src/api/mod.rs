//! The HTTP API (axum): OpenAI-compatible completions and chat completions (streamed over SSE
//! or not), `/v1/models`, `/health`, `/ready`, and the ancestor's `/execute`. Every error is
//! the OpenAI envelope with the statuses of RELIABILITY.md §8.

mod admin;
mod auth;
pub mod client;
mod dispatch;
mod error;
mod execute;
mod extract;
mod health;
mod metrics;
mod openai;
mod request_id;
mod server;
mod shutdown;
mod stream;
mod types;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, Uri};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ractor::ActorRef;
use tokio::net::TcpListener;

pub use auth::{Access, InferenceKey, Keys};
pub use error::ApiError;
pub use shutdown::Shutdown;

use crate::actors::pool::Pool;
use crate::actors::router::RouterMsg;
use crate::actors::supervisor::SupervisorMsg;
use crate::config::ServerConfig;
use crate::metrics::Metrics;

/// Largest accepted admin request body (64 KiB).
const ADMIN_BODY_LIMIT: usize = 64 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The router actor.
    pub router: ActorRef<RouterMsg>,
    /// The supervisor (admin commands).
    pub supervisor: ActorRef<SupervisorMsg>,
    /// The configured keys.
    pub keys: Arc<Keys>,
    /// Unix time the server started (the `created` of listed models).
    pub started_at: u64,
    /// Server limits and timeouts.
    pub server: Arc<ServerConfig>,
    /// The drain state.
    pub shutdown: Arc<Shutdown>,
    /// The pool's metrics.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// Creates the state for a running pool.
    pub fn new(pool: &Pool, keys: Keys, server: ServerConfig) -> Self {
        Self {
            router: pool.router(),
            supervisor: pool.supervisor(),
            keys: Arc::new(keys),
            server: Arc::new(server),
            shutdown: Arc::new(Shutdown::default()),
            metrics: pool.metrics(),
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// Builds the axum application.
pub fn app(state: AppState) -> axum::Router {
    let admin = axum::Router::new()
        .route("/admin/models", get(admin::list).post(admin::load))
        .route("/admin/models/{name}/reload", post(admin::reload))
        .route("/admin/models/{name}/evict", post(admin::evict))
        .route("/admin/reload", post(admin::reload_pool))
        .layer(DefaultBodyLimit::max(ADMIN_BODY_LIMIT))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    let inference = axum::Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(health::models))
        .route("/execute", post(execute::execute))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            shutdown::track_in_flight,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_inference_key,
        ));
    let metrics = axum::Router::new().route("/metrics", get(metrics::metrics));
    let metrics = if state.server.metrics_public {
        metrics
    } else {
        metrics.route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ))
    };
    axum::Router::new()
        .merge(admin)
        .merge(inference)
        .merge(metrics)
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.server.max_body))
        .layer(middleware::from_fn(request_id::request_id))
        .with_state(state)
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn method_not_allowed(uri: Uri) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        ..ApiError::bad_request("", None, format!("method not allowed on {}", uri.path()))
    }
    .into_response()
}

/// Serves the API on `listener` until `stop` resolves, then closes every connection within
/// two seconds (see [`drain`] for ending in-flight requests first).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    stop: impl Future<Output = ()> + Send,
) -> std::io::Result<()> {
    let limits = server::ConnectionLimits {
        header_timeout: state.server.header_timeout,
        max_connections: state.server.max_connections,
    };
    server::serve_connections(listener, app(state), limits, stop).await
}

/// Drains the server: refuses new inference requests, waits until the ones in flight end, the
/// shutdown timeout passes or `abort_now` resolves (a second signal), then ends the remaining
/// ones with `server_shutdown`.
pub async fn drain(state: &AppState, abort_now: impl Future<Output = ()>) {
    let shutdown = &state.shutdown;
    shutdown.begin_drain();
    tracing::info!(
        in_flight = shutdown.in_flight(),
        timeout = ?state.server.shutdown_timeout,
        "draining"
    );
    tokio::select! {
        () = shutdown.wait_idle() => {}
        () = tokio::time::sleep(state.server.shutdown_timeout) => {
            tracing::warn!(in_flight = shutdown.in_flight(), "shutdown timeout: ending the requests left");
        }
        () = abort_now => {
            tracing::warn!(in_flight = shutdown.in_flight(), "second signal: aborting");
        }
    }
    shutdown.abort();
}
