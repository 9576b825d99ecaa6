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
use super::stream::{collect, sse, ChunkFormat, Collected, Generated, Usage};
use super::tools;
use super::types::{ChatRequest, CommonParams, CompletionRequest};
use super::AppState;
use crate::models::{
    parse_answer, EchoedToken, FinishReason, Piece, Prompt, ToolFormat, ToolStream,
};

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

/// The text of an echoed prompt: the prompt as given, or its tokens' texts when it was given
/// as token ids.
fn echo_text(given: Option<&str>, tokens: &[EchoedToken]) -> String {
    match given {
        Some(text) => text.to_string(),
        None => tokens.iter().map(|t| t.text.as_str()).collect(),
    }
}

/// A choice's `finish_reason`: `tool_calls` when it ended after calls.
fn finish_reason(reason: FinishReason, calls: usize) -> &'static str {
    match (reason, calls) {
        (FinishReason::Eos | FinishReason::StopString, 1..) => "tool_calls",
        _ => reason.openai(),
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

/// Streamed chunks of one OpenAI request: the envelope, each choice's completion log
/// probabilities (whose text offsets run on across its chunks) and, when the request offered
/// tools, each choice's call parser.
struct OpenAiChunks {
    envelope: Envelope,
    completions: Vec<logprobs::Completion>,
    tools: Vec<Option<ToolStream>>,
    /// The prompt as given, for an echo.
    prompt_text: Option<String>,
}

impl OpenAiChunks {
    /// A content chunk of choice `index`.
    fn content(&mut self, index: usize, text: &str, token: Option<&Generated>) -> Value {
        let mut choice = self.envelope.text_choice(text, true, false);
        set(&mut choice, "index", json!(index));
        if let Some(token) = token {
            if self.envelope.return_token_ids {
                set(&mut choice, "token_ids", json!([token.id]));
            }
            if let (true, Some(completion)) =
                (self.envelope.logprobs, self.completions.get_mut(index))
            {
                let logprobs = choice_logprobs(self.envelope.kind, completion, &[token]);
                set(&mut choice, "logprobs", logprobs);
            }
        }
        self.envelope.wrap(true, choice, None)
    }

    /// The chunks of a choice's pieces: content, and each call whole as one
    /// `delta.tool_calls` entry, numbered from `first_call`.
    fn pieces(&mut self, index: usize, pieces: Vec<Piece>, first_call: usize) -> Vec<Value> {
        let mut call_index = first_call;
        let mut chunks = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Content(text) => chunks.push(self.content(index, &text, None)),
                Piece::Call(call) => {
                    let mut entry = tools::call_json(&call);
                    set(&mut entry, "index", json!(call_index));
                    call_index += 1;
                    let delta = json!({"tool_calls": [entry]});
                    let choice = json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": null});
                    chunks.push(self.envelope.wrap(true, choice, None));
                }
            }
        }
        chunks
    }
}

impl ChunkFormat for OpenAiChunks {
    fn prompt(&mut self, index: usize, tokens: &[EchoedToken]) -> Vec<Value> {
        let text = echo_text(self.prompt_text.as_deref(), tokens);
        let mut choice = self.envelope.text_choice(&text, true, false);
        set(&mut choice, "index", json!(index));
        if let (true, Some(completion)) = (self.envelope.logprobs, self.completions.get_mut(index))
        {
            set(&mut choice, "logprobs", completion.with_prompt(tokens, &[]));
        }
        vec![self.envelope.wrap(true, choice, None)]
    }

    fn token(&mut self, index: usize, token: &Generated) -> Vec<Value> {
        let Some(stream) = self.tools.get_mut(index).and_then(Option::as_mut) else {
            return vec![self.content(index, &token.text, Some(token))];
        };
        let before = stream.calls();
        let pieces = stream.push(&token.text);
        self.pieces(index, pieces, before)
    }

    fn finish(&mut self, index: usize, reason: FinishReason, _usage: Usage) -> Vec<Value> {
        let mut chunks = Vec::new();
        let mut finish = reason.openai();
        if let Some(stream) = self.tools.get_mut(index).and_then(Option::as_mut) {
            let before = stream.calls();
            let pieces = stream.finish();
            let calls = stream.calls();
            chunks = self.pieces(index, pieces, before);
            finish = finish_reason(reason, calls);
        }
        let mut choice = self.envelope.text_choice("", true, false);
        set(&mut choice, "index", json!(index));
        set(&mut choice, "finish_reason", json!(finish));
        if self.envelope.kind == Kind::Chat {
            set(&mut choice, "delta", json!({}));
        }
        chunks.push(self.envelope.wrap(true, choice, None));
        chunks
    }

    fn end(&mut self, usage: Usage) -> Vec<Value> {
        if !self.envelope.include_usage {
            return Vec::new();
        }
        let mut last = self.envelope.wrap(true, Value::Null, Some(usage));
        set(&mut last, "choices", json!([]));
        vec![last]
    }

    fn error(&mut self, error: &ApiError) -> Value {
        json!(error.body())
    }
}

/// `POST /v1/completions`.
#[utoipa::path(post, path = "/v1/completions", tag = "inference", security(("bearer" = [])),
    request_body = crate::api::types::CompletionRequest,
    responses((status = 200, description = "The completion; with `stream`, server-sent events each holding a chunk of this shape, then `[DONE]`", content(
            (crate::api::openapi::schemas::Completion = "application/json"), (crate::api::openapi::schemas::Completion = "text/event-stream"))),
        (status = 400, description = "Invalid request", body = crate::api::openapi::schemas::ErrorResponse), (status = 401, description = "No key, or a key that is not valid here", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 404, description = "No such model", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 503, description = "Overloaded, or no replica can serve", body = crate::api::openapi::schemas::ErrorResponse)))]
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
#[utoipa::path(post, path = "/v1/chat/completions", tag = "inference", security(("bearer" = [])),
    request_body = crate::api::types::ChatRequest,
    responses((status = 200, description = "The answer; with `stream`, server-sent events of `ChatCompletionChunk`, then `[DONE]`", content(
            (crate::api::openapi::schemas::ChatCompletion = "application/json"), (crate::api::openapi::schemas::ChatCompletionChunk = "text/event-stream"))),
        (status = 400, description = "Invalid request", body = crate::api::openapi::schemas::ErrorResponse), (status = 401, description = "No key, or a key that is not valid here", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 404, description = "No such model", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 429, description = "Rate limited", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 503, description = "Overloaded, or no replica can serve", body = crate::api::openapi::schemas::ErrorResponse)))]
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
    let prompt_text = match &generation.prompt {
        Prompt::Text { text, .. } => Some(text.clone()),
        _ => None,
    };
    let parallel = match &generation.prompt {
        Prompt::Chat {
            tools: Some(tools), ..
        } => tools.parallel,
        _ => true,
    };
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
        let format = OpenAiChunks {
            completions: started.iter().map(|_| Default::default()).collect(),
            tools: started
                .iter()
                .map(|s| s.tool_format.map(|f| ToolStream::new(f, parallel)))
                .collect(),
            envelope,
            prompt_text,
        };
        return Ok(sse(opening, started, format).into_response());
    }
    let formats: Vec<Option<ToolFormat>> = started.iter().map(|s| s.tool_format).collect();
    let collected = futures::future::join_all(
        started
            .into_iter()
            .map(|mut started| async move { collect(&mut started).await }),
    )
    .await;
    let mut choices = Vec::new();
    let mut usages = Vec::new();
    for (index, result) in collected.into_iter().enumerate() {
        let Collected {
            echo,
            tokens,
            reason,
            usage,
        } = result?;
        usages.push(usage);
        let mut text: String = tokens.iter().map(|t| t.text.as_str()).collect();
        if let Some(echo) = &echo {
            text = echo_text(prompt_text.as_deref(), echo) + &text;
        }
        let mut choice = envelope.text_choice(&text, false, true);
        set(&mut choice, "index", json!(index));
        set(&mut choice, "finish_reason", json!(reason.openai()));
        if let Some(format) = formats.get(index).copied().flatten() {
            let (content, calls) = parse_answer(format, parallel, &text);
            if !calls.is_empty() {
                let content = Some(content).filter(|c| !c.is_empty());
                let calls: Vec<Value> = calls.iter().map(tools::call_json).collect();
                let message = json!({"role": "assistant", "content": content, "tool_calls": calls});
                set(&mut choice, "message", message);
                set(
                    &mut choice,
                    "finish_reason",
                    json!(finish_reason(reason, calls.len())),
                );
            }
        }
        if envelope.return_token_ids {
            let ids: Vec<u32> = tokens.iter().map(|t| t.id).collect();
            set(&mut choice, "prompt_token_ids", json!(prompt_ids));
            set(&mut choice, "token_ids", json!(ids));
        }
        if envelope.logprobs {
            let all: Vec<&Generated> = tokens.iter().collect();
            let mut completion = logprobs::Completion::default();
            let logprobs = match &echo {
                Some(echo) => completion.with_prompt(echo, &all),
                None => choice_logprobs(envelope.kind, &mut completion, &all),
            };
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
