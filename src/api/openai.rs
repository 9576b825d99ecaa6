//! `POST /v1/completions` and `POST /v1/chat/completions`, streamed and not.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use rand::Rng;
use serde_json::{json, Value};

use super::auth::Access;
use super::dispatch::start;
use super::error::ApiError;
use super::extract::ApiJson;
use super::stream::{collect, sse, ChunkFormat, Usage};
use super::types::{ChatRequest, CompletionRequest};
use super::AppState;
use crate::models::FinishReason;

/// Which OpenAI object a response is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// The fields every chunk and response of one request share.
#[derive(Debug, Clone)]
struct Envelope {
    kind: Kind,
    id: String,
    created: u64,
    model: String,
    return_token_ids: bool,
    include_usage: bool,
}

impl Envelope {
    fn new(kind: Kind, model: &str, return_token_ids: bool) -> Self {
        let prefix = match kind {
            Kind::Completion => "cmpl",
            Kind::Chat => "chatcmpl",
        };
        let suffix: String = (0..24)
            .map(|_| char::from_digit(rand::rng().random_range(0..16), 16).unwrap_or('0'))
            .collect();
        Self {
            kind,
            id: format!("{prefix}-{suffix}"),
            created: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            model: model.to_string(),
            return_token_ids,
            include_usage: false,
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Completion, _) => "text_completion",
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
        }
    }

    fn wrap(&self, chunk: bool, choice: Value, usage: Option<Usage>) -> Value {
        let mut body = json!({
            "id": self.id,
            "object": self.object(chunk),
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        });
        if let Some(usage) = usage {
            body["usage"] = usage_json(usage);
        }
        body
    }

    fn text_choice(&self, text: &str, chunk: bool, role: bool) -> Value {
        match self.kind {
            Kind::Completion => {
                json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null})
            }
            Kind::Chat if chunk => {
                let delta = if role {
                    json!({"role": "assistant", "content": text})
                } else {
                    json!({"content": text})
                };
                json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": null})
            }
            Kind::Chat => {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": null, "finish_reason": null})
            }
        }
    }
}

fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    })
}

/// Streamed chunks of one OpenAI request.
struct OpenAiChunks(Envelope);

impl ChunkFormat for OpenAiChunks {
    fn token(&mut self, id: u32, text: &str) -> Value {
        let mut choice = self.0.text_choice(text, true, false);
        if self.0.return_token_ids {
            choice["token_ids"] = json!([id]);
        }
        self.0.wrap(true, choice, None)
    }

    fn finish(&mut self, reason: FinishReason, usage: Usage) -> Vec<Value> {
        let mut choice = self.0.text_choice("", true, false);
        choice["finish_reason"] = json!(reason.openai());
        if self.0.kind == Kind::Chat {
            choice["delta"] = json!({});
        }
        let mut chunks = vec![self.0.wrap(true, choice, None)];
        if self.0.include_usage {
            let mut last = self.0.wrap(true, Value::Null, Some(usage));
            last["choices"] = json!([]);
            chunks.push(last);
        }
        chunks
    }

    fn error(&mut self, error: &ApiError) -> Value {
        json!(error.body())
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    access.check(&request.model)?;
    let generation = request.to_generation()?;
    let mut envelope = Envelope::new(
        Kind::Completion,
        &request.model,
        request.common.return_token_ids,
    );
    envelope.include_usage = request.stream_include_usage();
    respond(
        &state,
        &request.model,
        generation,
        envelope,
        request.common.stream,
    )
    .await
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Result<Response, ApiError> {
    access.check(&request.model)?;
    let generation = request.to_generation()?;
    let mut envelope = Envelope::new(Kind::Chat, &request.model, request.common.return_token_ids);
    envelope.include_usage = request.stream_include_usage();
    respond(
        &state,
        &request.model,
        generation,
        envelope,
        request.common.stream,
    )
    .await
}

async fn respond(
    state: &AppState,
    model: &str,
    generation: crate::actors::engine::GenerationRequest,
    envelope: Envelope,
    stream: bool,
) -> Result<Response, ApiError> {
    let started = start(state, model, generation).await?;
    if stream {
        let mut opening = Vec::new();
        if envelope.kind == Kind::Chat || envelope.return_token_ids {
            let mut choice = envelope.text_choice("", true, true);
            if envelope.return_token_ids {
                choice["prompt_token_ids"] = json!(started.prompt_ids);
            }
            opening.push(envelope.wrap(true, choice, None));
        }
        let format = OpenAiChunks(envelope);
        return Ok(sse(opening, started.events, started.guard, format).into_response());
    }
    let _guard = started.guard;
    let (ids, text, reason, usage) = collect(started.events).await?;
    let mut choice = envelope.text_choice(&text, false, true);
    choice["finish_reason"] = json!(reason.openai());
    if envelope.return_token_ids {
        choice["prompt_token_ids"] = json!(started.prompt_ids);
        choice["token_ids"] = json!(ids);
    }
    Ok(Json(envelope.wrap(false, choice, Some(usage))).into_response())
}
