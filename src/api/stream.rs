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
use crate::models::{EchoedToken, FinishReason, Logprobs};

/// Interval of SSE comment pings that keep proxies from closing idle streams.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Token counts of a finished job.
#[derive(Debug, Clone, Copy, Default)]
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

/// What a route sends for each kind of event of a request's choices (one, or `n`).
pub trait ChunkFormat: Send + 'static {
    /// The chunks for one generated token of choice `index` (none while the text it made
    /// final is held back, as a tool call's may be).
    fn token(&mut self, index: usize, token: &Generated) -> Vec<Value>;
    /// The chunks of choice `index`'s echoed prompt (a completion with `echo`).
    fn prompt(&mut self, _index: usize, _tokens: &[EchoedToken]) -> Vec<Value> {
        Vec::new()
    }
    /// The chunks that close choice `index` (its own counts in `usage`).
    fn finish(&mut self, index: usize, reason: FinishReason, usage: Usage) -> Vec<Value>;
    /// The chunks after every choice finished (`usage` summed over them), before `[DONE]`.
    fn end(&mut self, usage: Usage) -> Vec<Value>;
    /// The event for a failure.
    fn error(&mut self, error: &ApiError) -> Value;
    /// Whether the stream ends with `data: [DONE]`.
    fn done_marker(&self) -> bool {
        true
    }
}

impl Usage {
    /// The usage of several choices of one prompt: the prompt once, every choice's tokens.
    pub fn of_choices(usages: &[Usage]) -> Usage {
        let first = usages.first().copied().unwrap_or_default();
        Usage {
            completion_tokens: usages.iter().map(|u| u.completion_tokens).sum(),
            ..first
        }
    }
}

/// How a job's next step went.
enum Step {
    Prompt(Vec<EchoedToken>),
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
        Some(TokenEvent::Prompt { tokens }) => Step::Prompt(tokens),
        Some(TokenEvent::Started { .. }) => Step::Nothing,
        Some(TokenEvent::Failed(err)) => Step::Failed(err.into()),
        None => Step::Failed(lost()),
    }
}

/// One choice's steps, as a stream that ends after its terminal step; its recorder counts
/// them as they pass.
fn steps(index: usize, started: Started) -> impl Stream<Item = (usize, Step)> {
    stream::unfold(Some(started), move |state| async move {
        let mut started = state?;
        let step = next_step(&mut started).await;
        match &step {
            Step::Token(_) => started.recorder.token(),
            Step::Finished(..) => started.recorder.finished(),
            Step::Failed(error) => started.recorder.failed(error),
            Step::Prompt(_) | Step::Nothing => {}
        }
        let terminal = matches!(step, Step::Finished(..) | Step::Failed(_));
        Some(((index, step), (!terminal).then_some(started)))
    })
}

/// Streams started jobs, the choices of one request, as SSE in the given format: their
/// chunks interleaved as their tokens come, each choice closed by its finish chunks, then
/// the format's end chunks once all have finished. A failure of any choice ends the stream
/// with its error event (the others are cancelled as they are dropped). `opening` chunks are
/// sent first.
pub fn sse<F: ChunkFormat>(
    opening: Vec<Value>,
    started: Vec<Started>,
    format: F,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let head = stream::iter(opening.into_iter().map(|chunk| json_event(&chunk)));
    let left = started.len();
    let merged = stream::select_all(
        started
            .into_iter()
            .enumerate()
            .map(|(index, started)| Box::pin(steps(index, started))),
    );
    let body = stream::unfold(
        Some((merged, format, Vec::new(), left)),
        |state| async move {
            let (mut merged, mut format, mut usages, mut left) = state?;
            let (index, step) = merged.next().await?;
            let mut out: Vec<Value> = Vec::new();
            let mut done = false;
            match step {
                Step::Prompt(tokens) => out.extend(format.prompt(index, &tokens)),
                Step::Token(token) => out.extend(format.token(index, &token)),
                Step::Finished(reason, usage) => {
                    out.extend(format.finish(index, reason, usage));
                    usages.push(usage);
                    left -= 1;
                    if left == 0 {
                        out.extend(format.end(Usage::of_choices(&usages)));
                        done = true;
                    }
                }
                Step::Failed(error) => {
                    out.push(format.error(&error));
                    done = true;
                }
                Step::Nothing => {}
            }
            let mut events: Vec<Event> = out.iter().map(json_event).collect();
            if done {
                if format.done_marker() {
                    events.push(Event::default().data("[DONE]"));
                }
                return Some((stream::iter(events), None));
            }
            Some((stream::iter(events), Some((merged, format, usages, left))))
        },
    )
    .flatten();
    Sse::new(head.chain(body).map(Ok)).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}

fn json_event(chunk: &Value) -> Event {
    Event::default().data(chunk.to_string())
}

/// A job collected to its end.
#[derive(Debug)]
pub struct Collected {
    /// The echoed prompt, when the request asked for one.
    pub echo: Option<Vec<EchoedToken>>,
    /// The generated tokens.
    pub tokens: Vec<Generated>,
    /// Why it ended.
    pub reason: FinishReason,
    /// Its counts.
    pub usage: Usage,
}

/// Collects a started job to its end: its echo, its tokens, and how it ended.
pub async fn collect(started: &mut Started) -> Result<Collected, ApiError> {
    let mut tokens = Vec::new();
    let mut echo = None;
    loop {
        match next_step(started).await {
            Step::Prompt(prompt) => echo = Some(prompt),
            Step::Token(token) => {
                started.recorder.token();
                tokens.push(token);
            }
            Step::Finished(reason, usage) => {
                started.recorder.finished();
                return Ok(Collected {
                    echo,
                    tokens,
                    reason,
                    usage,
                });
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
