//! Admission through the router and the wait for a job's first event, shared by every
//! generation route.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ractor::rpc::CallResult;
use tokio::sync::mpsc::UnboundedReceiver;

use super::error::ApiError;
use super::AppState;
use crate::actors::engine::{GenerationRequest, TokenEvent};
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

/// A started job: its prompt ids and the rest of its events.
pub struct Started {
    /// The prompt's token ids.
    pub prompt_ids: Vec<u32>,
    /// The events after `Started`.
    pub events: UnboundedReceiver<TokenEvent>,
    /// Cancels the job when dropped.
    pub guard: CancelOnDrop,
}

/// Admits a request and waits until the engine has accepted it (tokenized and validated), so
/// that errors before the first byte get a real status.
pub async fn start(
    state: &AppState,
    model: &str,
    request: GenerationRequest,
) -> Result<Started, ApiError> {
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
    match events.recv().await {
        Some(TokenEvent::Started { prompt_ids }) => Ok(Started {
            prompt_ids,
            events,
            guard,
        }),
        Some(TokenEvent::Failed(err)) => Err(err.into()),
        Some(_) | None => Err(ApiError {
            code: "model_crashed",
            ..ApiError::internal("the model stopped before starting the request")
        }),
    }
}
