//! Turning a job's events into SSE: one `data:` chunk per token, then a final chunk and
//! `data: [DONE]`; after a failure (the model's, the request deadline or the server's
//! shutdown), one `data: {"error":...}` event then `data: [DONE]`. A stream never just stops.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use futures::stream::{self, Stream, StreamExt};
use serde_json::Value;

use super::dispatch::{lost, Started};
use super::error::ApiError;
use crate::actors::engine::TokenEvent;
use crate::models::{FinishReason, Logprobs};

/// Interval of SSE comment pings that keep proxies from closing idle streams.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Token counts of a finished job.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: usize,
    /// Tokens generated.
    pub completion_tokens: usize,
    /// Prompt tokens reused from the prefix cache.
    pub cached_tokens: usize,
}

/// One generated token as a route sees it.
#[derive(Debug, Clone)]
pub struct Generated {
    /// The token id.
    pub id: u32,
    /// Text that became final with it.
    pub text: String,
    /// Its log probabilities, when the request asked.
    pub logprobs: Option<Box<Logprobs>>,
}

/// What a route sends for each kind of event.
pub trait ChunkFormat: Send + 'static {
    /// The chunk for one generated token.
    fn token(&mut self, token: &Generated) -> Value;
    /// The chunks that close a finished stream (before `[DONE]`).
    fn finish(&mut self, reason: FinishReason, usage: Usage) -> Vec<Value>;
    /// The event for a failure.
    fn error(&mut self, error: &ApiError) -> Value;
    /// Whether the stream ends with `data: [DONE]`.
    fn done_marker(&self) -> bool {
        true
    }
}

/// How a job's next step went.
enum Step {
    Token(Generated),
    Finished(FinishReason, Usage),
    Failed(ApiError),
    Nothing,
}

/// Waits for the job's next event, or for the deadline or the server's abort.
async fn next_step(started: &mut Started) -> Step {
    let event = tokio::select! {
        event = started.events.recv() => event,
        error = started.interrupts.fired() => return Step::Failed(error),
    };
    match event {
        Some(TokenEvent::Token { id, text, logprobs }) => {
            Step::Token(Generated { id, text, logprobs })
        }
        Some(TokenEvent::Finished {
            reason,
            prompt_tokens,
            completion_tokens,
            cached_tokens,
        }) => Step::Finished(
            reason,
            Usage {
                prompt_tokens,
                completion_tokens,
                cached_tokens,
            },
        ),
        Some(TokenEvent::Started { .. }) => Step::Nothing,
        Some(TokenEvent::Failed(err)) => Step::Failed(err.into()),
        None => Step::Failed(lost()),
    }
}

/// Streams a started job as SSE in the given format. `opening` chunks are sent first.
pub fn sse<F: ChunkFormat>(
    opening: Vec<Value>,
    started: Started,
    format: F,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let head = stream::iter(opening.into_iter().map(|chunk| json_event(&chunk)));
    let body = stream::unfold(Some((started, format)), |state| async move {
        let (mut started, mut format) = state?;
        let (batch, finished) = match next_step(&mut started).await {
            Step::Token(token) => {
                started.recorder.token();
                (vec![format.token(&token)], false)
            }
            Step::Finished(reason, usage) => {
                started.recorder.finished();
                (format.finish(reason, usage), true)
            }
            Step::Failed(error) => {
                started.recorder.failed(&error);
                (vec![format.error(&error)], true)
            }
            Step::Nothing => (Vec::new(), false),
        };
        let mut out: Vec<Event> = batch.iter().map(json_event).collect();
        if finished {
            if format.done_marker() {
                out.push(Event::default().data("[DONE]"));
            }
            return Some((stream::iter(out), None));
        }
        Some((stream::iter(out), Some((started, format))))
    })
    .flatten();
    Sse::new(head.chain(body).map(Ok)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

fn json_event(chunk: &Value) -> Event {
    Event::default().data(chunk.to_string())
}

/// Collects a started job to its end: its tokens, and how it ended.
pub async fn collect(
    started: &mut Started,
) -> Result<(Vec<Generated>, FinishReason, Usage), ApiError> {
    let mut tokens = Vec::new();
    loop {
        match next_step(started).await {
            Step::Token(token) => {
                started.recorder.token();
                tokens.push(token);
            }
            Step::Finished(reason, usage) => {
                started.recorder.finished();
                return Ok((tokens, reason, usage));
            }
            Step::Failed(error) => {
                // The handler's response counts this failure.
                started.recorder.finished();
                return Err(error);
            }
            Step::Nothing => {}
        }
    }
}
