//! Admission through the router and the wait for a job's first event, shared by every
//! generation route; the queue deadline, the request deadline and the server's abort apply
//! from here on.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::mpsc::Receiver;
use tokio::sync::watch;
use tokio::time::Instant;

use super::error::ApiError;
use super::shutdown::wait_abort;
use super::AppState;
use crate::actors::engine::{EngineError, GenerationRequest, TokenEvent};
use crate::metrics::Metrics;
use crate::models::ToolFormat;

/// Sets a job's cancel flag when dropped, so a request whose client has gone (its handler or
/// response stream dropped) stops generating.
#[derive(Debug)]
pub struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A job's events after `Started`, with the first one already read.
pub struct EventStream {
    first: Option<TokenEvent>,
    rest: Receiver<TokenEvent>,
}

impl EventStream {
    /// The next event; `None` when the engine dropped the job without a terminal event.
    pub async fn recv(&mut self) -> Option<TokenEvent> {
        match self.first.take() {
            Some(event) => Some(event),
            None => self.rest.recv().await,
        }
    }
}

/// What ends a request from outside: the server's abort and the request's total deadline.
pub struct Interrupts {
    aborted: watch::Receiver<bool>,
    deadline: Instant,
    timeout: Duration,
}

impl Interrupts {
    /// Resolves with the error that ends the request: `server_shutdown` or `deadline_exceeded`.
    pub async fn fired(&mut self) -> ApiError {
        tokio::select! {
            () = wait_abort(&mut self.aborted) => ApiError::unavailable(
                "server_shutdown",
                "the server is shutting down",
            ),
            () = tokio::time::sleep_until(self.deadline) => ApiError {
                status: StatusCode::GATEWAY_TIMEOUT,
                kind: "timeout_error",
                code: "deadline_exceeded",
                param: None,
                message: format!(
                    "the request ran longer than its deadline of {:?} (request_timeout)",
                    self.timeout
                ),
            },
        }
    }
}

/// Records a request's tokens and latencies, and counts it as cancelled if it is dropped before
/// a terminal event.
pub struct Recorder {
    metrics: Arc<Metrics>,
    model: String,
    arrived: Instant,
    last_token: Option<Instant>,
    done: bool,
}

impl Recorder {
    fn new(metrics: Arc<Metrics>, model: &str, arrived: Instant) -> Self {
        Self {
            metrics,
            model: model.to_string(),
            arrived,
            last_token: None,
            done: false,
        }
    }

    fn started(&self, prompt_tokens: usize) {
        self.metrics
            .prompt_tokens
            .with_label_values(&[self.model.as_str()])
            .inc_by(prompt_tokens as u64);
    }

    /// One generated token reached the client.
    pub fn token(&mut self) {
        let now = Instant::now();
        let model = [self.model.as_str()];
        let (histogram, since) = match self.last_token {
            None => (&self.metrics.time_to_first_token, self.arrived),
            Some(last) => (&self.metrics.inter_token_latency, last),
        };
        histogram
            .with_label_values(&model)
            .observe(now.duration_since(since).as_secs_f64());
        self.metrics
            .generated_tokens
            .with_label_values(&model)
            .inc();
        self.last_token = Some(now);
    }

    /// The request ended normally.
    pub fn finished(&mut self) {
        self.done = true;
    }

    /// The request ended with an error after its response started.
    pub fn failed(&mut self, error: &ApiError) {
        self.done = true;
        self.metrics.failure(&self.model, error.code);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.done {
            self.metrics.failure(&self.model, "cancelled");
        }
    }
}

/// A started job: its prompt ids and its events from the first token on.
pub struct Started {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// How the model writes tool calls, when the request offered tools.
    pub tool_format: Option<ToolFormat>,
    /// The events after `Started`.
    pub events: EventStream,
    /// Cancels the job when dropped (held only for that).
    _cancel: CancelOnDrop,
    /// What may end it from outside.
    pub interrupts: Interrupts,
    /// Its metrics.
    pub recorder: Recorder,
}

/// How one attempt at a request ended before its first token.
enum Attempt {
    Started(Box<Started>),
    /// The replica crashed before the request emitted anything: it may be retried.
    Lost(ApiError),
}

/// Admits a request and waits for its first token, so that errors before the first byte get a
/// real status. A request whose replica crashes before its first token is retried once (it has
/// emitted nothing); it then waits in the queue for another replica or the restarted one.
pub async fn start(
    state: &AppState,
    model: &str,
    request: GenerationRequest,
) -> Result<Started, ApiError> {
    let arrived = Instant::now();
    match attempt(state, model, request.clone(), arrived).await? {
        Attempt::Started(started) => Ok(*started),
        Attempt::Lost(error) => {
            tracing::warn!(model, error = %error.message, "retrying a request lost before its first token");
            match attempt(state, model, request, arrived).await? {
                Attempt::Started(started) => Ok(*started),
                Attempt::Lost(error) => Err(ApiError::unavailable(
                    "model_restarting",
                    format!(
                        "the model {model:?} crashed twice on this request and is restarting: {}",
                        error.message
                    ),
                )),
            }
        }
    }
}

async fn attempt(
    state: &AppState,
    model: &str,
    request: GenerationRequest,
    arrived: Instant,
) -> Result<Attempt, ApiError> {
    let admitted = super::admit::admit(state, model, request).await?;
    let guard = CancelOnDrop(admitted.cancel);
    let mut events = admitted.events;
    let mut interrupts = Interrupts {
        aborted: state.shutdown.aborted(),
        deadline: arrived + admitted.request_timeout,
        timeout: admitted.request_timeout,
    };
    let queue_deadline = arrived + admitted.queue_timeout;
    let queued = tokio::select! {
        event = events.recv() => event,
        error = interrupts.fired() => return Err(error),
        () = tokio::time::sleep_until(queue_deadline) => {
            return Err(ApiError::unavailable(
                "queue_timeout",
                format!(
                    "the request waited longer than {:?} for a free slot of {model:?} (queue_timeout)",
                    admitted.queue_timeout
                ),
            ))
        }
    };
    let (prompt_ids, tool_format) = match queued {
        Some(TokenEvent::Started {
            prompt_ids,
            tool_format,
        }) => (prompt_ids, tool_format),
        Some(TokenEvent::Failed(err @ EngineError::Crashed(_))) => {
            return Ok(Attempt::Lost(err.into()))
        }
        Some(TokenEvent::Failed(err)) => return Err(err.into()),
        Some(_) | None => return Ok(Attempt::Lost(lost())),
    };
    let first = tokio::select! {
        event = events.recv() => event,
        error = interrupts.fired() => return Err(error),
    };
    match first {
        Some(TokenEvent::Failed(err @ EngineError::Crashed(_))) => Ok(Attempt::Lost(err.into())),
        Some(TokenEvent::Failed(err)) => Err(err.into()),
        None => Ok(Attempt::Lost(lost())),
        first => {
            let recorder = Recorder::new(state.metrics.clone(), model, arrived);
            recorder.started(prompt_ids.len());
            Ok(Attempt::Started(Box::new(Started {
                prompt_ids,
                tool_format,
                events: EventStream {
                    first,
                    rest: events,
                },
                _cancel: guard,
                interrupts,
                recorder,
            })))
        }
    }
}

/// The error of a job dropped without a terminal event (its engine died).
pub fn lost() -> ApiError {
    ApiError {
        code: "model_crashed",
        ..ApiError::internal("the model stopped before finishing the request")
    }
}
