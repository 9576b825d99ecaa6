//! `POST /v1/completions` and `POST /v1/chat/completions`, streamed and not.

use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use rand::Rng;
use serde_json::{json, Value};

use super::auth::Access;
use super::dispatch::{start, Started};
use super::error::ApiError;
use super::extract::ApiJson;
use super::logprobs;
use super::rate::Caller;
use super::stream::{collect, sse, ChunkFormat, Generated, Usage};
use super::types::{ChatRequest, CommonParams, CompletionRequest};
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
    /// The request asked for log probabilities.
    logprobs: bool,
}

impl Envelope {
    fn new(kind: Kind, model: &str, common: &CommonParams) -> Self {
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
            return_token_ids: common.return_token_ids,
            include_usage: common.stream_include_usage(),
            logprobs: false,
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
            set(&mut body, "usage", usage_json(usage));
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

/// Sets `key` on a JSON object (does nothing to a value that is not an object).
fn set(target: &mut Value, key: &str, value: Value) {
    if let Some(object) = target.as_object_mut() {
        object.insert(key.to_string(), value);
    }
}

fn usage_json(usage: Usage) -> Value {
    json!({
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    })
}

/// The `logprobs` of a choice holding `tokens`, in the endpoint's form.
fn choice_logprobs(
    kind: Kind,
    completion: &mut logprobs::Completion,
    tokens: &[&Generated],
) -> Value {
    match kind {
        Kind::Chat => logprobs::chat(tokens),
        Kind::Completion => completion.object(tokens),
    }
}

/// Streamed chunks of one OpenAI request: the envelope, and each choice's completion
/// log probabilities (whose text offsets run on across its chunks).
struct OpenAiChunks(Envelope, Vec<logprobs::Completion>);

impl ChunkFormat for OpenAiChunks {
    fn token(&mut self, index: usize, token: &Generated) -> Value {
        let mut choice = self.0.text_choice(&token.text, true, false);
        set(&mut choice, "index", json!(index));
        if self.0.return_token_ids {
            set(&mut choice, "token_ids", json!([token.id]));
        }
        if let (true, Some(completion)) = (self.0.logprobs, self.1.get_mut(index)) {
            let logprobs = choice_logprobs(self.0.kind, completion, &[token]);
            set(&mut choice, "logprobs", logprobs);
        }
        self.0.wrap(true, choice, None)
    }

    fn finish(&mut self, index: usize, reason: FinishReason, _usage: Usage) -> Vec<Value> {
        let mut choice = self.0.text_choice("", true, false);
        set(&mut choice, "index", json!(index));
        set(&mut choice, "finish_reason", json!(reason.openai()));
        if self.0.kind == Kind::Chat {
            set(&mut choice, "delta", json!({}));
        }
        vec![self.0.wrap(true, choice, None)]
    }

    fn end(&mut self, usage: Usage) -> Vec<Value> {
        if !self.0.include_usage {
            return Vec::new();
        }
        let mut last = self.0.wrap(true, Value::Null, Some(usage));
        set(&mut last, "choices", json!([]));
        vec![last]
    }

    fn error(&mut self, error: &ApiError) -> Value {
        json!(error.body())
    }
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    caller: Option<Extension<Caller>>,
    ApiJson(request): ApiJson<CompletionRequest>,
) -> Response {
    let result = async {
        access.check(&request.model)?;
        let mut generation = request.to_generation(&state.server.limits)?;
        generation.cache_salt = caller.map_or(0, |Extension(caller)| caller.cache_salt());
        let envelope = Envelope::new(Kind::Completion, &request.model, &request.common);
        respond(&state, generation, envelope, &request.common).await
    }
    .await;
    observe(&state, &request.model, result)
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    caller: Option<Extension<Caller>>,
    ApiJson(request): ApiJson<ChatRequest>,
) -> Response {
    #[cfg(feature = "fault-injection")]
    crate::actors::faults::on_handler(&request.model);
    let result = async {
        access.check(&request.model)?;
        let mut generation = request.to_generation(&state.server.limits)?;
        generation.cache_salt = caller.map_or(0, |Extension(caller)| caller.cache_salt());
        let envelope = Envelope::new(Kind::Chat, &request.model, &request.common);
        respond(&state, generation, envelope, &request.common).await
    }
    .await;
    observe(&state, &request.model, result)
}

/// Counts a request's response in the metrics. Requests refused before they reached a model
/// (validation, unknown model, keys) are counted under `model="-"`, so that client-chosen names
/// never become metric labels.
pub fn observe(state: &AppState, model: &str, result: Result<Response, ApiError>) -> Response {
    let routed =
        |error: &ApiError| !matches!(error.status.as_u16(), 400 | 401 | 403 | 404 | 413 | 415);
    match result {
        Ok(response) => {
            state.metrics.request(model, response.status().as_u16());
            response
        }
        Err(error) => {
            let label = if routed(&error) { model } else { "-" };
            state.metrics.request(label, error.status.as_u16());
            state.metrics.failure(label, error.code);
            error.into_response()
        }
    }
}

async fn respond(
    state: &AppState,
    generation: crate::actors::engine::GenerationRequest,
    mut envelope: Envelope,
    common: &CommonParams,
) -> Result<Response, ApiError> {
    envelope.logprobs = generation.params.logprobs.is_some();
    let started = start_choices(state, &envelope.model, generation, common.choices()).await?;
    let prompt_ids = started
        .first()
        .map(|s| s.prompt_ids.clone())
        .unwrap_or_default();
    if common.stream {
        let mut opening = Vec::new();
        if envelope.kind == Kind::Chat || envelope.return_token_ids {
            for index in 0..started.len() {
                let mut choice = envelope.text_choice("", true, true);
                set(&mut choice, "index", json!(index));
                if envelope.return_token_ids {
                    set(&mut choice, "prompt_token_ids", json!(prompt_ids));
                }
                opening.push(envelope.wrap(true, choice, None));
            }
        }
        let completions = started.iter().map(|_| Default::default()).collect();
        let format = OpenAiChunks(envelope, completions);
        return Ok(sse(opening, started, format).into_response());
    }
    let collected = futures::future::join_all(
        started
            .into_iter()
            .map(|mut started| async move { collect(&mut started).await }),
    )
    .await;
    let mut choices = Vec::new();
    let mut usages = Vec::new();
    for (index, result) in collected.into_iter().enumerate() {
        let (tokens, reason, usage) = result?;
        usages.push(usage);
        let text: String = tokens.iter().map(|t| t.text.as_str()).collect();
        let mut choice = envelope.text_choice(&text, false, true);
        set(&mut choice, "index", json!(index));
        set(&mut choice, "finish_reason", json!(reason.openai()));
        if envelope.return_token_ids {
            let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
            set(&mut choice, "prompt_token_ids", json!(prompt_ids));
            set(&mut choice, "token_ids", json!(ids));
        }
        if envelope.logprobs {
            let all: Vec<&Generated> = tokens.iter().collect();
            let mut completion = logprobs::Completion::default();
            let logprobs = choice_logprobs(envelope.kind, &mut completion, &all);
            set(&mut choice, "logprobs", logprobs);
        }
        choices.push(choice);
    }
    let mut body = envelope.wrap(false, Value::Null, Some(Usage::of_choices(&usages)));
    set(&mut body, "choices", json!(choices));
    Ok(Json(body).into_response())
}

/// Starts a request's `n` choices: the first alone, so that its prompt is in the prefix
/// cache by the time the others are admitted (they then reuse its blocks), then the rest
/// together, choice `i` seeded with the request's seed plus `i`.
async fn start_choices(
    state: &AppState,
    model: &str,
    generation: crate::actors::engine::GenerationRequest,
    n: usize,
) -> Result<Vec<Started>, ApiError> {
    let first = start(state, model, generation.clone()).await?;
    let rest = (1..n).map(|i| {
        let mut choice = generation.clone();
        choice.params.sampling.seed = choice
            .params
            .sampling
            .seed
            .map(|s| s.wrapping_add(i as u64));
        start(state, model, choice)
    });
    let mut started = vec![first];
    started.extend(futures::future::try_join_all(rest).await?);
    Ok(started)
}
