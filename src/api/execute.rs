//! `POST /execute`: the ancestor worker's endpoint, kept for its clients. SSE frames
//! `{"type":"started",...}`, `{"type":"token","t":..,"i":..}`, then exactly one
//! `{"type":"end",...}` or `{"type":"error",...}`.

use std::time::Instant;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use serde::Deserialize;
use serde_json::{json, Value};

use super::auth::Access;
use super::dispatch::start;
use super::error::ApiError;
use super::extract::ApiJson;
use super::openai::observe;
use super::rate::Caller;
use super::stream::{sse, ChunkFormat, Generated, Usage};
use super::types::{CommonParams, StopInput};
use super::AppState;
use crate::actors::engine::GenerationRequest;
use crate::models::{FinishReason, Prompt};

/// The `/execute` body.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ExecuteRequest {
    /// The caller's id for the job, echoed in `started`.
    pub job_id: String,
    /// The model name.
    pub model: String,
    /// The prompt text.
    pub prompt: String,
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// RNG seed.
    pub seed: Option<u64>,
    /// Nucleus sampling.
    pub top_p: Option<f32>,
    /// Top-k.
    pub top_k: Option<i64>,
    /// Repetition penalty.
    pub repetition_penalty: Option<f32>,
    /// Stop strings.
    pub stop: Option<StopInput>,
    /// Min-p.
    pub min_p: Option<f32>,
}

struct ExecuteFrames {
    index: usize,
    started_at: Instant,
}

impl ChunkFormat for ExecuteFrames {
    fn token(&mut self, _index: usize, token: &Generated) -> Vec<Value> {
        let frame = json!({"type": "token", "t": token.text, "i": self.index});
        self.index += 1;
        vec![frame]
    }

    fn finish(&mut self, _index: usize, reason: FinishReason, usage: Usage) -> Vec<Value> {
        vec![json!({
            "type": "end",
            "tokens_out": usage.completion_tokens,
            "decode_time_ms": self.started_at.elapsed().as_millis() as u64,
            "stop_reason": reason,
        })]
    }

    fn end(&mut self, _usage: Usage) -> Vec<Value> {
        Vec::new()
    }

    fn error(&mut self, error: &ApiError) -> Value {
        json!({"type": "error", "code": error.code, "message": error.message})
    }

    fn done_marker(&self) -> bool {
        false
    }
}

/// `POST /execute`.
#[utoipa::path(post, path = "/execute", tag = "inference", security(("bearer" = [])),
    request_body = ExecuteRequest,
    responses((status = 200, description = "Server-sent frames: `started`, `token`s, then one `end` or `error`", body = crate::api::openapi::schemas::ExecuteFrame, content_type = "text/event-stream"),
        (status = 400, description = "Invalid request", body = crate::api::openapi::schemas::ErrorResponse), (status = 401, description = "No key, or a key that is not valid here", body = crate::api::openapi::schemas::ErrorResponse),
        (status = 404, description = "No such model", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn execute(
    State(state): State<AppState>,
    Extension(access): Extension<Access>,
    caller: Option<Extension<Caller>>,
    ApiJson(request): ApiJson<ExecuteRequest>,
) -> Response {
    let salt = caller.map_or(0, |Extension(caller)| caller.cache_salt());
    let result = run(&state, &access, salt, &request).await;
    observe(&state, &request.model, result)
}

async fn run(
    state: &AppState,
    access: &Access,
    cache_salt: u64,
    request: &ExecuteRequest,
) -> Result<Response, ApiError> {
    access.check(&request.model)?;
    let common = CommonParams {
        max_tokens: request.max_tokens,
        temperature: request.temperature,
        top_p: request.top_p,
        top_k: request.top_k,
        min_p: request.min_p,
        repetition_penalty: request.repetition_penalty,
        seed: request.seed,
        stop: request.stop.clone(),
        ..CommonParams::default()
    };
    let generation = GenerationRequest {
        prompt: Prompt::Text {
            text: request.prompt.clone(),
            add_special_tokens: true,
        },
        params: common.to_params(&state.server.limits, false)?,
        cache_salt,
    };
    let started = start(state, &request.model, generation).await?;
    let opening = vec![json!({
        "type": "started",
        "job_id": request.job_id,
        "model": request.model,
        "prompt_tokens": started.prompt_ids.len(),
    })];
    let frames = ExecuteFrames {
        index: 0,
        started_at: Instant::now(),
    };
    Ok(sse(opening, vec![started], frames).into_response())
}
