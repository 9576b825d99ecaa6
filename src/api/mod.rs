//! The HTTP API (axum): OpenAI-compatible completions and chat completions (streamed over SSE
//! or not), `/v1/models`, `/health`, `/ready`, and the ancestor's `/execute`. Every error is
//! the OpenAI envelope with the statuses of RELIABILITY.md §8.

mod admin;
mod admin_nodes;
mod admit;
mod auth;
pub mod client;
mod console;
mod constraint;
mod dispatch;
mod error;
mod execute;
mod extract;
mod fields;
mod health;
mod host;
mod logprobs;
mod metrics;
mod openai;
pub mod openapi;
mod rate;
mod request_id;
mod routes;
mod server;
mod shutdown;
mod stream;
mod tools;
mod types;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ractor::ActorRef;
use tokio::net::TcpListener;

pub use auth::{Access, InferenceKey, Keys};
pub use error::ApiError;
pub use rate::Rate;
pub use routes::{app, route_inventory, Guard, RouteInfo};
pub use shutdown::Shutdown;
pub use types::{ChatRequest, CompletionRequest};

use crate::actors::pool::Pool;
use crate::actors::router::RouterMsg;
use crate::actors::supervisor::SupervisorMsg;
use crate::config::ServerConfig;
use crate::metrics::Metrics;

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
    /// Per-caller token buckets (used when `server.rate_limit` is set).
    pub limiter: Arc<rate::Limiter>,
    /// The other nodes, with `[cluster]`.
    pub cluster: Option<crate::actors::cluster::ClusterView>,
    /// Requests sent to other nodes, with `[cluster]`.
    pub relay: Option<crate::actors::cluster::Relay>,
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
            limiter: Arc::default(),
            cluster: pool.cluster_view(),
            relay: pool.relay(),
            started_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        }
    }
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
