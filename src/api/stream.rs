//! Turning a job's events into SSE: one `data:` chunk per token, then a final chunk and
//! `data: [DONE]`; after a failure, one `data: {"error":...}` event then `data: [DONE]`. A
//! stream never just stops.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt};
use serde_json::Value;

use super::dispatch::{lost, CancelOnDrop, EventStream};
use super::error::ApiError;
use crate::actors::engine::TokenEvent;
use crate::models::FinishReason;

/// Interval of SSE comment pings that keep proxies from closing idle streams.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Token counts of a finished job.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
}

/// What a route sends for each kind of event.
pub trait ChunkFormat: Send + 'static {
    /// The chunk for one generated token.
    fn token(&mut self, id: u32, text: &str) -> Value;
    /// The chunks that close a finished stream (before `[DONE]`).
    fn finish(&mut self, reason: FinishReason, usage: Usage) -> Vec<Value>;
    /// The event for a failure.
    fn error(&mut self, error: &ApiError) -> Value;
    /// Whether the stream ends with `data: [DONE]`.
    fn done_marker(&self) -> bool {
        true
    }
}

/// Streams a started job as SSE in the given format. `opening` chunks are sent first.
pub fn sse<F: ChunkFormat>(
    opening: Vec<Value>,
    events: EventStream,
    guard: CancelOnDrop,
    format: F,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let head = stream::iter(opening.into_iter().map(|chunk| json_event(&chunk)));
    let body = stream::unfold(Some((events, guard, format)), |state| async move {
        let (mut events, guard, mut format) = state?;
        let (batch, finished) = match events.recv().await {
            Some(TokenEvent::Token { id, text }) => (vec![format.token(id, &text)], false),
            Some(TokenEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            }) => {
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                };
                (format.finish(reason, usage), true)
            }
            Some(TokenEvent::Started { .. }) => (Vec::new(), false),
            Some(TokenEvent::Failed(err)) => (vec![format.error(&err.into())], true),
            None => {
                let lost = ApiError {
                    code: "model_crashed",
                    ..ApiError::internal("the model stopped before finishing the request")
                };
                (vec![format.error(&lost)], true)
            }
        };
        let mut out: Vec<Event> = batch.iter().map(json_event).collect();
        if finished {
            if format.done_marker() {
                out.push(Event::default().data("[DONE]"));
            }
            return Some((stream::iter(out), None));
        }
        Some((stream::iter(out), Some((events, guard, format))))
    })
    .flatten();
    Sse::new(head.chain(body).map(Ok)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

fn json_event(chunk: &Value) -> Event {
    Event::default().data(chunk.to_string())
}

/// Collects a started job to its end: token ids, text, and how it ended.
pub async fn collect(
    mut events: EventStream,
) -> Result<(Vec<u32>, String, FinishReason, Usage), ApiError> {
    let mut ids = Vec::new();
    let mut text = String::new();
    while let Some(event) = events.recv().await {
        match event {
            TokenEvent::Token { id, text: piece } => {
                ids.push(id);
                text.push_str(&piece);
            }
            TokenEvent::Finished {
                reason,
                prompt_tokens,
                completion_tokens,
            } => {
                let usage = Usage {
                    prompt_tokens,
                    completion_tokens,
                };
                return Ok((ids, text, reason, usage));
            }
            TokenEvent::Started { .. } => {}
            TokenEvent::Failed(err) => return Err(err.into()),
        }
    }
    Err(lost())
}
