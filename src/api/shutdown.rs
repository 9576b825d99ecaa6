//! Graceful shutdown: on the first signal the server drains (`/ready` answers 503, new
//! inference requests get 503 `shutting_down`, requests in flight go on); at the drain deadline
//! or on a second signal it aborts, and every stream still open ends with `server_shutdown` and
//! `[DONE]`, so no SSE body keeps the process alive.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use tokio::sync::{watch, Notify};

use super::error::ApiError;
use super::AppState;

/// The drain state shared by the server, its handlers and the signal handler.
#[derive(Debug)]
pub struct Shutdown {
    draining: AtomicBool,
    abort: watch::Sender<bool>,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl Default for Shutdown {
    fn default() -> Self {
        Self {
            draining: AtomicBool::new(false),
            abort: watch::Sender::new(false),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        }
    }
}

impl Shutdown {
    /// Starts draining: readiness fails and new inference requests are refused.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Whether the server is draining.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Ends every request still in flight with `server_shutdown`.
    pub fn abort(&self) {
        self.begin_drain();
        self.abort.send_replace(true);
    }

    /// A receiver that turns `true` when the server aborts.
    pub fn aborted(&self) -> watch::Receiver<bool> {
        self.abort.subscribe()
    }

    /// Inference requests whose response (or stream) has not ended.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Resolves once no inference request is in flight.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight() == 0 {
                return;
            }
            notified.await;
        }
    }

    fn track(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }
}

/// Counts one request in flight until dropped.
struct InFlight(Arc<Shutdown>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Resolves when `aborted` turns true (never, if its sender is gone without aborting).
pub async fn wait_abort(aborted: &mut watch::Receiver<bool>) {
    if aborted.wait_for(|abort| *abort).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Middleware for inference routes: refuses new requests while draining and counts the ones
/// in flight until their response body (an SSE stream included) has ended.
pub async fn track_in_flight(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if state.shutdown.draining() {
        return ApiError::unavailable("shutting_down", "the server is shutting down")
            .into_response();
    }
    let guard = state.shutdown.track();
    let response = next.run(request).await;
    let streaming = response
        .headers()
        .get(CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        return response;
    }
    response.map(|body| {
        Body::from_stream(body.into_data_stream().map(move |chunk| {
            let _held = &guard;
            chunk
        }))
    })
}
