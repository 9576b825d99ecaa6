//! The HTTP API (axum): OpenAI-compatible completions and chat completions (streamed over SSE
//! or not), `/v1/models`, `/health`, `/ready`, and the ancestor's `/execute`. Every error is
//! the OpenAI envelope with the statuses of RELIABILITY.md §8.

mod dispatch;
mod error;
mod execute;
mod extract;
mod health;
mod openai;
mod stream;
mod types;

use std::future::Future;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::DefaultBodyLimit;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ractor::ActorRef;
use tokio::net::TcpListener;

pub use error::ApiError;

use crate::actors::router::RouterMsg;

/// Largest accepted request body (2 MiB).
const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The router actor.
    pub router: ActorRef<RouterMsg>,
    /// Unix time the server started (the `created` of listed models).
    pub started_at: u64,
}

impl AppState {
    /// Creates the state for a router.
    pub fn new(router: ActorRef<RouterMsg>) -> Self {
        Self {
            router,
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
}

/// Builds the axum application.
pub fn app(state: AppState) -> axum::Router {
    axum::Router::new()
        .route("/v1/completions", post(openai::completions))
        .route("/v1/chat/completions", post(openai::chat_completions))
        .route("/v1/models", get(health::models))
        .route("/execute", post(execute::execute))
        .route("/health", get(health::health))
        .route("/ready", get(health::ready))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
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

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, app(state))
        .with_graceful_shutdown(shutdown)
        .await
}
