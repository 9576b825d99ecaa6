//! Admission through the router and the wait for a job's first event, shared by every
//! generation route.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::AppState;
use crate::actors::engine::{EngineError, GenerationRequest, TokenEvent};
use crate::actors::router::RouterMsg;

/// How long the router may take to answer an admission call.
const ROUTER_TIMEOUT: Duration = Duration::from_secs(5);

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
    rest: UnboundedReceiver<TokenEvent>,
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

/// A started job: its prompt ids and its events from the first token on.
pub struct Started {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The events after `Started`.
    pub events: EventStream,
    /// Cancels the job when dropped.
    pub guard: CancelOnDrop,
}

/// How one attempt at a request ended before its first token.
enum Attempt {
    Started(Started),
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
    match attempt(state, model, request.clone()).await? {
        Attempt::Started(started) => Ok(started),
        Attempt::Lost(error) => {
            tracing::warn!(model, error = %error.message, "retrying a request lost before its first token");
            match attempt(state, model, request).await? {
                Attempt::Started(started) => Ok(started),
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
) -> Result<Attempt, ApiError> {
    let model = model.to_string();
    let call = state
        .router
        .call(
            |reply| RouterMsg::Dispatch {
                model,
                request,
                reply,
            },
            Some(ROUTER_TIMEOUT),
        )
        .await;
    let admitted = match call {
        Ok(CallResult::Success(result)) => result?,
        Ok(_) | Err(_) => {
            return Err(ApiError::unavailable(
                "model_unavailable",
                "the router did not answer",
            ))
        }
    };
    let guard = CancelOnDrop(admitted.cancel);
    let mut events = admitted.events;
    let prompt_ids = match events.recv().await {
        Some(TokenEvent::Started { prompt_ids }) => prompt_ids,
        Some(TokenEvent::Failed(err @ EngineError::Crashed(_))) => {
            return Ok(Attempt::Lost(err.into()))
        }
        Some(TokenEvent::Failed(err)) => return Err(err.into()),
        Some(_) | None => return Ok(Attempt::Lost(lost())),
    };
    match events.recv().await {
        Some(TokenEvent::Failed(err @ EngineError::Crashed(_))) => Ok(Attempt::Lost(err.into())),
        Some(TokenEvent::Failed(err)) => Err(err.into()),
        None => Ok(Attempt::Lost(lost())),
        first => Ok(Attempt::Started(Started {
            prompt_ids,
            events: EventStream {
                first,
                rest: events,
            },
            guard,
        })),
    }
}

/// The error of a job dropped without a terminal event (its engine died).
pub fn lost() -> ApiError {
    ApiError {
        code: "model_crashed",
        ..ApiError::internal("the model stopped before finishing the request")
    }
}
