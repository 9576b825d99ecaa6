//! The shapes of the responses, as the OpenAPI document describes them. The handlers build
//! these bodies with `serde_json`; `tests/openapi.rs` validates real responses of each kind
//! against these schemas (unknown fields refused), so a change to a response that is not made
//! here too fails the tests.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

/// The error envelope of every non-2xx answer (OpenAI's shape).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorResponse {
    /// The error.
    pub error: ErrorObject,
}

/// One error.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ErrorObject {
    /// What went wrong, for a person.
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `not_found_error`, ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault.
    pub param: Option<String>,
    /// A stable code (`model_not_found`, `context_length_exceeded`, ...).
    pub code: String,
}

/// `/health` and `/ready`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusBody {
    /// `ok`, `ready`, `not_ready` or `shutting_down`.
    pub status: String,
    /// `/ready` while some models have no ready replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub models_not_ready: Option<Vec<String>>,
}

/// `GET /v1/models`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelList {
    /// `list`.
    pub object: String,
    /// The models with a ready replica.
    pub data: Vec<ModelCard>,
}

/// One served model.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelCard {
    /// The name clients send as `model`.
    pub id: String,
    /// `model`.
    pub object: String,
    /// Unix time the server started.
    pub created: u64,
    /// `llorch`.
    pub owned_by: String,
    /// Its context length.
    pub max_model_len: Option<usize>,
    /// Its ready replicas.
    pub replicas: usize,
    /// With `[cluster]`: the nodes with a ready replica of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<String>>,
}

/// Token counts of a request.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// The prompt tokens served from the prefix cache.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// `usage.prompt_tokens_details`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PromptTokensDetails {
    /// Prompt tokens reused from the prefix cache.
    pub cached_tokens: usize,
}

/// A chosen token's log probability (chat).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenLogprob {
    /// The token's text.
    pub token: String,
    /// Its log probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Option<Vec<u8>>,
    /// The most likely alternatives (absent inside `top_logprobs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<Vec<TopLogprob>>,
}

/// One alternative of [`TokenLogprob`].
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TopLogprob {
    /// The token's text.
    pub token: String,
    /// Its log probability.
    pub logprob: f32,
    /// Its UTF-8 bytes.
    pub bytes: Option<Vec<u8>>,
}

/// A chat choice's `logprobs`.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<TokenLogprob>,
    /// Always null.
    pub refusal: Option<Vec<TokenLogprob>>,
}

/// A function call the model made.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ToolCall {
    /// Its position among the message's calls (streamed deltas only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub index: Option<usize>,
    /// `call_...`.
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The function and its arguments.
    pub function: FunctionCall,
}

/// The function of a [`ToolCall`].
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FunctionCall {
    /// The function's name.
    pub name: String,
    /// Its arguments, a JSON object as a string.
    pub arguments: String,
}

/// The assistant's answer.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AssistantMessage {
    /// `assistant`.
    pub role: String,
    /// The text (null when the answer is only tool calls).
    pub content: Option<String>,
    /// Always null.
    pub refusal: Option<String>,
    /// The calls, when the model called tools.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// One choice of a chat completion.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatChoice {
    /// The choice's index (`n` > 1).
    pub index: usize,
    /// The answer.
    pub message: AssistantMessage,
    /// With `logprobs: true`.
    pub logprobs: Option<ChatLogprobs>,
    /// `stop`, `length`, `tool_calls` or `content_filter`.
    pub finish_reason: String,
    /// With `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// With `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `POST /v1/chat/completions` (not streamed).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletion {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    pub object: String,
    /// Unix time.
    pub created: u64,
    /// The model.
    pub model: String,
    /// The choices.
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// What a streamed chat chunk adds to a choice.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatDelta {
    /// `assistant`, in each choice's first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// The next text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Whole calls, as each is parsed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// One choice of a streamed chat chunk.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatChunkChoice {
    /// The choice's index.
    pub index: usize,
    /// What it adds.
    pub delta: ChatDelta,
    /// The tokens' log probabilities, with `logprobs: true`.
    pub logprobs: Option<ChatLogprobs>,
    /// Set on the choice's last chunk.
    pub finish_reason: Option<String>,
    /// With `return_token_ids`, in the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// With `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// A `data:` event of a streamed chat completion (then `data: [DONE]`).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChatCompletionChunk {
    /// The same for every chunk of a request.
    pub id: String,
    /// `chat.completion.chunk`.
    pub object: String,
    /// Unix time.
    pub created: u64,
    /// The model.
    pub model: String,
    /// The choices this chunk adds to (empty in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// In a last chunk, with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A completion choice's `logprobs` (the legacy shape).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionLogprobs {
    /// The tokens' texts.
    pub tokens: Vec<String>,
    /// Their log probabilities (null for an echoed prompt's first token).
    pub token_logprobs: Vec<Option<f32>>,
    /// The alternatives per position.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Each token's character offset in the text.
    pub text_offset: Vec<usize>,
}

/// One choice of a completion (or of a streamed completion chunk).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompletionChoice {
    /// The choice's index.
    pub index: usize,
    /// The text (the next piece, when streamed).
    pub text: String,
    /// With `logprobs: N`.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop` or `length`; null until a streamed choice's last chunk.
    pub finish_reason: Option<String>,
    /// With `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_token_ids: Option<Vec<u32>>,
    /// With `return_token_ids`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_ids: Option<Vec<u32>>,
}

/// `POST /v1/completions`, and each `data:` event of a streamed one.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Completion {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: String,
    /// Unix time.
    pub created: u64,
    /// The model.
    pub model: String,
    /// The choices.
    pub choices: Vec<CompletionChoice>,
    /// Token counts (streamed: in the last chunk with `stream_options.include_usage`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A `data:` frame of `POST /execute`: `started`, `token` (`t`, `i`), then one `end` or
/// `error`.
#[derive(Serialize, ToSchema)]
pub struct ExecuteFrame {
    /// `started`, `token`, `end` or `error`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The frame's other fields.
    #[serde(flatten)]
    pub fields: BTreeMap<String, Value>,
}

/// The outcome of an admin operation, one entry per model it touched.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminOutcomes {
    /// Each model's outcome.
    pub models: Vec<ModelOutcome>,
}

/// One model's outcome.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelOutcome {
    /// The model.
    pub name: String,
    /// Done: `loaded`, `added`, `reloaded`, `evicted`, `unloaded`, `unchanged`, `failed`;
    /// started (`?wait=false`): `loading`, `reloading`, `evicting`.
    pub action: String,
    /// Why it failed.
    pub error: Option<String>,
    /// With `[cluster]`: the node it was carried out on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// `GET /admin/models` (and each `data:` event of `GET /admin/events`, without `time`).
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolListing {
    /// Every model.
    pub models: Vec<ModelListing>,
    /// Every configured or used device.
    pub devices: Vec<DeviceListing>,
    /// Unix time of the listing (`/admin/models` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub time: Option<u64>,
    /// With `[cluster]`: this node and every peer it hears from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nodes: Option<Vec<NodeListing>>,
}

/// A node of the cluster.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NodeListing {
    /// Its name.
    pub node: String,
    /// Whether it is the node that answered.
    pub local: bool,
    /// Unix time of its last listing.
    pub last_seen: u64,
}

/// One model of the pool.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelListing {
    /// Its name.
    pub name: String,
    /// Whether it has replicas.
    pub loaded: bool,
    /// Whether an admin or background operation is working on it.
    pub operation_in_progress: bool,
    /// `loaded`, `draining` or `evicted`.
    pub state: String,
    /// Requests waiting for a slot.
    pub queued: usize,
    /// Its context length, once loaded.
    pub context_length: Option<usize>,
    /// Its replicas.
    pub replicas: Vec<ReplicaListing>,
}

/// One replica.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicaListing {
    /// With `[cluster]`: the node it runs on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `model#index@device`.
    pub replica: String,
    /// Its device.
    pub device: String,
    /// Its generation (a reload starts a new one).
    pub generation: u64,
    /// `loading`, `ready`, `draining`, `restarting` or `failed`.
    pub state: String,
    /// A generation loading beside the active one.
    pub standby: bool,
    /// Requests it is serving.
    pub in_flight: usize,
    /// Times it was restarted.
    pub restarts: u32,
    /// Its last failure.
    pub last_error: Option<String>,
    /// Bytes of its weights.
    pub memory_bytes: Option<u64>,
    /// Bytes it holds on its GPU.
    pub device_memory_bytes: Option<u64>,
    /// Unix time it became ready.
    pub loaded_at: Option<u64>,
    /// Its sequences and KV blocks, once ready.
    pub batching: Option<Batching>,
    /// While it loads.
    pub load_progress: Option<LoadProgress>,
}

/// A replica's sequences and KV cache.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Batching {
    /// Whether its architecture runs batched.
    pub batched: bool,
    /// Sequences it may run at once.
    pub max_sequences: usize,
    /// Sequences running.
    pub running: usize,
    /// Sequences admitted and waiting for blocks.
    pub waiting: usize,
    /// Sequences preempted.
    pub paused: usize,
    /// KV blocks held by sequences.
    pub kv_blocks_used: usize,
    /// KV blocks kept by the prefix cache.
    pub kv_blocks_cached: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// Tokens per block.
    pub kv_block_tokens: usize,
    /// Bytes of the KV cache.
    pub kv_cache_bytes: Option<u64>,
}

/// A loading replica's progress.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadProgress {
    /// Bytes of its weight files read.
    pub bytes_read: u64,
    /// Their total.
    pub bytes_total: u64,
    /// Bytes of an `hf:` source's files downloaded so far.
    pub bytes_downloaded: u64,
    /// The sizes of the files whose download has started (0 when nothing is downloaded).
    pub download_bytes_total: u64,
}

/// A device of the pool.
#[derive(Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeviceListing {
    /// With `[cluster]`: the node it belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// `cpu`, `cuda:0`, ...
    pub device: String,
    /// Its `memory_budget`, when set.
    pub memory_budget_bytes: Option<u64>,
    /// Bytes the loaded and loading models are estimated to hold on it.
    pub memory_reserved_bytes: u64,
    /// Replicas on it.
    pub replicas: usize,
    /// Their weights' bytes.
    pub memory_bytes: u64,
}
