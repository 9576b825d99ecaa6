//! OpenAI request types and their validation into an engine [`GenerationRequest`].

use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::ApiError;
use super::fields::{self, Endpoint};
use super::tools;
use crate::actors::engine::GenerationRequest;
use crate::config::RequestLimits;
use crate::models::{ChatMessage, GenerationParams, Prompt, SamplingParams};

/// `max_tokens` when the request gives none.
pub const DEFAULT_MAX_TOKENS: usize = 512;
/// Longest model name, in bytes.
pub const MAX_MODEL_NAME: usize = 256;
/// The chat roles a message may have.
pub const ROLES: [&str; 5] = ["system", "developer", "user", "assistant", "tool"];
/// Most choices (`n`) per request.
pub const MAX_CHOICES: u32 = 8;
/// Most `top_logprobs` (chat).
pub const MAX_TOP_LOGPROBS: u32 = 20;
/// Most alternatives a completion's `logprobs` may ask for.
pub const MAX_COMPLETION_LOGPROBS: u32 = 5;

/// A prompt: a string, a one-element list of strings, or token ids.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum PromptInput {
    /// Plain text.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
    /// A batch of texts (only one is accepted).
    Texts(Vec<String>),
}

/// `stop`: one string or several.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum StopInput {
    /// One stop string.
    One(String),
    /// Several.
    Many(Vec<String>),
}

/// Sampling and stopping fields shared by completions and chat completions (OpenAI plus the
/// vLLM extensions `top_k`, `min_p`, `repetition_penalty`, `ignore_eos`, `return_token_ids`).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct CommonParams {
    /// Most tokens to generate.
    pub max_tokens: Option<usize>,
    /// Chat's newer name for `max_tokens`.
    pub max_completion_tokens: Option<usize>,
    /// Sampling temperature (default 1).
    pub temperature: Option<f32>,
    /// Nucleus sampling (default 1).
    pub top_p: Option<f32>,
    /// Top-k (0 or -1: off).
    pub top_k: Option<i64>,
    /// Min-p (default 0).
    pub min_p: Option<f32>,
    /// Repetition penalty (default 1).
    pub repetition_penalty: Option<f32>,
    /// RNG seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Option<StopInput>,
    /// Stream with server-sent events.
    #[serde(default)]
    pub stream: bool,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Number of choices (1 to [`MAX_CHOICES`]).
    pub n: Option<u32>,
    /// Keep generating past EOS.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Add `prompt_token_ids` and `token_ids` to each choice.
    #[serde(default)]
    pub return_token_ids: bool,
    /// OpenAI's frequency penalty on generated tokens, in [-2, 2] (default 0).
    pub frequency_penalty: Option<f32>,
    /// OpenAI's presence penalty on generated tokens, in [-2, 2] (default 0).
    pub presence_penalty: Option<f32>,
    /// Log probabilities of the chosen tokens: chat's flag or a completion's count of
    /// alternatives.
    pub logprobs: Option<LogprobsInput>,
    /// Chat: alternatives per position with their log probabilities (at most 20).
    pub top_logprobs: Option<u32>,
    /// Additive biases on token logits, by token id (-100 to 100, at most 300 entries).
    pub logit_bias: Option<std::collections::HashMap<String, f32>>,
    /// `text`, `json_object` or `json_schema` (structured outputs).
    pub response_format: Option<Value>,
    /// vLLM's: the output is a whole match of this regular expression.
    pub guided_regex: Option<String>,
    /// vLLM's: the output is exactly one of these strings.
    pub guided_choice: Option<Vec<String>>,
    /// vLLM's: the output follows this Lark grammar (llguidance's dialect).
    pub guided_grammar: Option<String>,
}

/// `logprobs`: chat's flag, or a completion's count of alternatives per position.
#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum LogprobsInput {
    /// Chat: return the chosen tokens' log probabilities.
    Flag(bool),
    /// Completions: this many alternatives per position.
    Count(u32),
}

/// `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct CompletionRequest {
    /// The model name.
    pub model: String,
    /// The prompt.
    pub prompt: PromptInput,
    /// Return the prompt before the completion (with its tokens' log probabilities when
    /// `logprobs` asks); `max_tokens: 0` then generates nothing.
    #[serde(default)]
    pub echo: Option<bool>,
    /// The sampling and stopping fields.
    #[serde(flatten)]
    pub common: CommonParams,
    /// Every other field, checked against [`fields`]' rules.
    #[serde(flatten)]
    #[schema(ignore)]
    pub rest: Map<String, Value>,
}

/// Chat message content: a string or a list of text parts.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ContentInput {
    /// Plain text.
    Text(String),
    /// Content parts; only `{"type":"text"}` parts are supported.
    Parts(Vec<ContentPart>),
}

/// One content part.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ContentPart {
    /// The part type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The text of a text part.
    pub text: Option<String>,
}

/// One chat message on the wire.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct MessageInput {
    /// The role.
    pub role: String,
    /// The content (an assistant message that calls tools may have none).
    pub content: Option<ContentInput>,
    /// An assistant message's tool calls.
    pub tool_calls: Option<Vec<Value>>,
    /// A tool message: the id of the call it answers.
    pub tool_call_id: Option<String>,
    /// Every other field, checked against [`fields`]' rules.
    #[serde(flatten)]
    #[schema(ignore)]
    pub rest: Map<String, Value>,
}

/// `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
pub struct ChatRequest {
    /// The model name.
    pub model: String,
    /// The conversation.
    pub messages: Vec<MessageInput>,
    /// Functions the model may call.
    pub tools: Option<Vec<Value>>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ..}}`.
    pub tool_choice: Option<Value>,
    /// Whether an answer may hold several calls (default true).
    pub parallel_tool_calls: Option<bool>,
    /// The sampling and stopping fields.
    #[serde(flatten)]
    pub common: CommonParams,
    /// Every other field, checked against [`fields`]' rules.
    #[serde(flatten)]
    #[schema(ignore)]
    pub rest: Map<String, Value>,
}

impl CompletionRequest {
    /// Validates the request into an engine request.
    pub fn to_generation(&self, limits: &RequestLimits) -> Result<GenerationRequest, ApiError> {
        check_model_name(&self.model)?;
        fields::check_request(Endpoint::Completions, &self.rest)?;
        let prompt = match &self.prompt {
            PromptInput::Text(text) => text.clone(),
            PromptInput::Texts(texts) if texts.len() == 1 => texts.concat(),
            PromptInput::Texts(_) => {
                return Err(ApiError::bad_request(
                    "unsupported_parameter",
                    Some("prompt"),
                    "only one prompt per request is supported",
                ))
            }
            PromptInput::Ids(ids) => {
                return Ok(GenerationRequest {
                    prompt: Prompt::Ids(ids.clone()),
                    params: self.params(limits)?,
                    cache_salt: 0,
                })
            }
        };
        if prompt.is_empty() {
            return Err(ApiError::bad_request(
                "empty_prompt",
                Some("prompt"),
                "the prompt is empty",
            ));
        }
        Ok(GenerationRequest {
            prompt: Prompt::Text {
                text: prompt,
                add_special_tokens: true,
            },
            params: self.params(limits)?,
            cache_salt: 0,
        })
    }

    fn params(&self, limits: &RequestLimits) -> Result<GenerationParams, ApiError> {
        let echo = self.echo.unwrap_or(false);
        Ok(GenerationParams {
            logprobs: self.common.requested_logprobs(Endpoint::Completions)?,
            echo,
            ..self.common.to_params(limits, echo)?
        })
    }
}

/// Refuses model names no route could have (they are registry keys, never paths).
fn check_model_name(model: &str) -> Result<(), ApiError> {
    if model.len() > MAX_MODEL_NAME {
        return Err(ApiError::bad_request(
            "invalid_parameter",
            Some("model"),
            format!("the model name is longer than {MAX_MODEL_NAME} bytes"),
        ));
    }
    Ok(())
}

impl ChatRequest {
    /// Validates the request into an engine request.
    pub fn to_generation(&self, limits: &RequestLimits) -> Result<GenerationRequest, ApiError> {
        check_model_name(&self.model)?;
        fields::check_request(Endpoint::Chat, &self.rest)?;
        if self.messages.len() > limits.max_messages {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                Some("messages"),
                format!(
                    "{} messages given; at most {} are allowed",
                    self.messages.len(),
                    limits.max_messages
                ),
            ));
        }
        if self.messages.is_empty() {
            return Err(ApiError::bad_request(
                "missing_field",
                Some("messages"),
                "messages must not be empty",
            ));
        }
        let messages = self
            .messages
            .iter()
            .map(|message| {
                if !ROLES.contains(&message.role.as_str()) {
                    return Err(ApiError::bad_request(
                        "invalid_parameter",
                        Some("messages"),
                        format!(
                            "unknown role {:?}; expected one of {}",
                            message.role,
                            ROLES.join(", ")
                        ),
                    ));
                }
                fields::check_message(&message.rest)?;
                let content = match &message.content {
                    Some(ContentInput::Text(text)) => text.clone(),
                    Some(ContentInput::Parts(parts)) => parts
                        .iter()
                        .map(|part| match (part.kind.as_str(), &part.text) {
                            ("text", Some(text)) => Ok(text.as_str()),
                            _ => Err(ApiError::bad_request(
                                "unsupported_parameter",
                                Some("messages"),
                                format!("content parts of type {:?} are not supported", part.kind),
                            )),
                        })
                        .collect::<Result<String, _>>()?,
                    None if message.role == "assistant" => String::new(),
                    None => {
                        return Err(ApiError::bad_request(
                            "missing_field",
                            Some("messages"),
                            format!("a {} message needs content", message.role),
                        ))
                    }
                };
                Ok(ChatMessage {
                    role: message.role.clone(),
                    content,
                    tool_calls: tools::message_calls(
                        message.tool_calls.as_deref().unwrap_or_default(),
                    )?,
                    tool_call_id: message.tool_call_id.clone(),
                })
            })
            .collect::<Result<Vec<_>, ApiError>>()?;
        let tools = tools::request_tools(
            self.tools.as_deref(),
            self.tool_choice.as_ref(),
            self.parallel_tool_calls,
        )?;
        let params = GenerationParams {
            logprobs: self.common.requested_logprobs(Endpoint::Chat)?,
            ..self.common.to_params(limits, false)?
        };
        if let (Some(_), Some(constraint)) = (&tools, &params.constraint) {
            return Err(ApiError::bad_request(
                "invalid_parameter",
                Some(constraint.param()),
                format!(
                    "{} cannot be combined with tools (give tool_choice: \"none\" to use it)",
                    constraint.param()
                ),
            ));
        }
        Ok(GenerationRequest {
            prompt: Prompt::Chat { messages, tools },
            params,
            cache_salt: 0,
        })
    }
}

impl CommonParams {
    /// Validates the sampling and stopping fields; `max_tokens: 0` is taken only with an
    /// `echo` (the prompt's log probabilities alone).
    pub fn to_params(
        &self,
        limits: &RequestLimits,
        echo: bool,
    ) -> Result<GenerationParams, ApiError> {
        let out_of_range = |param: &str, message: &str| {
            ApiError::bad_request("integer_out_of_range", Some(param), message.to_string())
        };
        if self.n.is_some_and(|n| !(1..=MAX_CHOICES).contains(&n)) {
            return Err(out_of_range(
                "n",
                &format!("n must be between 1 and {MAX_CHOICES}"),
            ));
        }
        let max_tokens = self
            .max_completion_tokens
            .or(self.max_tokens)
            .unwrap_or(DEFAULT_MAX_TOKENS);
        if max_tokens == 0 && !echo {
            return Err(out_of_range(
                "max_tokens",
                "max_tokens must be at least 1 (0 only with echo)",
            ));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(_) => return Err(out_of_range("top_k", "top_k must be -1, 0 or positive")),
        };
        let stop = match &self.stop {
            None => Vec::new(),
            Some(StopInput::One(stop)) => vec![stop.clone()],
            Some(StopInput::Many(stops)) => stops.clone(),
        };
        if stop.len() > limits.max_stop {
            return Err(out_of_range(
                "stop",
                &format!("at most {} stop sequences are allowed", limits.max_stop),
            ));
        }
        if stop.iter().any(|s| s.len() > limits.max_stop_bytes) {
            return Err(out_of_range(
                "stop",
                &format!(
                    "a stop sequence may be at most {} bytes",
                    limits.max_stop_bytes
                ),
            ));
        }
        if self.top_logprobs.is_some_and(|n| n > MAX_TOP_LOGPROBS) {
            return Err(out_of_range(
                "top_logprobs",
                "top_logprobs may be at most 20",
            ));
        }
        let sampling = SamplingParams {
            temperature: self.temperature.unwrap_or(1.0),
            top_p: self.top_p.unwrap_or(1.0),
            top_k,
            min_p: self.min_p.unwrap_or(0.0),
            repetition_penalty: self.repetition_penalty.unwrap_or(1.0),
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
            seed: self.seed,
            logit_bias: self.logit_bias()?,
        };
        sampling.validate().map_err(|err| match err {
            crate::models::GenerationError::InvalidParameter { param, .. } => {
                ApiError::bad_request("invalid_parameter", Some(param), err.to_string())
            }
            other => ApiError::bad_request("invalid_parameter", None, other.to_string()),
        })?;
        Ok(GenerationParams {
            sampling,
            max_tokens: Some(max_tokens),
            stop,
            ignore_eos: self.ignore_eos,
            strict_max_tokens: self.max_completion_tokens.or(self.max_tokens).is_some(),
            logprobs: None,
            constraint: self.constraint()?,
            echo: false,
        })
    }

    /// How many alternatives per position the request asks for with each token's log
    /// probability (`None`: none asked). Chat takes `logprobs: true` and `top_logprobs`
    /// (0–20); completions take `logprobs: N` (0–5).
    fn requested_logprobs(&self, endpoint: Endpoint) -> Result<Option<usize>, ApiError> {
        let top = self.top_logprobs.unwrap_or(0) as usize;
        let invalid = |code, param, message: &str| {
            Err(ApiError::bad_request(
                code,
                Some(param),
                message.to_string(),
            ))
        };
        match (endpoint, self.logprobs) {
            (Endpoint::Chat, Some(LogprobsInput::Count(_))) => invalid(
                "invalid_type",
                "logprobs",
                "chat takes logprobs: true or false (and top_logprobs for alternatives)",
            ),
            (Endpoint::Chat, Some(LogprobsInput::Flag(true))) => Ok(Some(top)),
            (Endpoint::Chat, _) if top > 0 => invalid(
                "invalid_parameter",
                "top_logprobs",
                "top_logprobs needs logprobs: true",
            ),
            (Endpoint::Chat, _) => Ok(None),
            (Endpoint::Completions, _) if self.top_logprobs.is_some() => invalid(
                "unsupported_parameter",
                "top_logprobs",
                "completions take logprobs: N (0 to 5) for alternatives, not top_logprobs",
            ),
            (Endpoint::Completions, Some(LogprobsInput::Flag(_))) => invalid(
                "invalid_type",
                "logprobs",
                "completions take logprobs as a number of alternatives, 0 to 5",
            ),
            (Endpoint::Completions, Some(LogprobsInput::Count(n)))
                if n > MAX_COMPLETION_LOGPROBS =>
            {
                invalid(
                    "integer_out_of_range",
                    "logprobs",
                    "logprobs may be at most 5",
                )
            }
            (Endpoint::Completions, Some(LogprobsInput::Count(n))) => Ok(Some(n as usize)),
            (Endpoint::Completions, None) => Ok(None),
        }
    }
}

impl CommonParams {
    /// `logit_bias` with its keys parsed as token ids.
    fn logit_bias(&self) -> Result<Vec<(u32, f32)>, ApiError> {
        let Some(bias) = &self.logit_bias else {
            return Ok(Vec::new());
        };
        bias.iter()
            .map(|(key, value)| {
                key.parse::<u32>().map(|id| (id, *value)).map_err(|_| {
                    ApiError::bad_request(
                        "invalid_parameter",
                        Some("logit_bias"),
                        format!("logit_bias keys are token ids; {key:?} is not one"),
                    )
                })
            })
            .collect()
    }
}

/// `stream_options` (`include_usage` adds a final chunk with token counts).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
pub struct StreamOptions {
    /// Send a last chunk with `usage`.
    #[serde(default)]
    pub include_usage: bool,
}

impl CommonParams {
    /// How many choices the request asks for (validated by [`CommonParams::to_params`]).
    pub fn choices(&self) -> usize {
        self.n.unwrap_or(1) as usize
    }

    /// Whether the client asked for a usage chunk at the end of the stream.
    pub fn stream_include_usage(&self) -> bool {
        self.stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage)
    }
}

#[cfg(test)]
mod properties {
    //! RELIABILITY.md Z1: the validators never panic on any JSON, and whatever they accept
    //! satisfies the §9 limits. Fields are absent, plausible (valid or just out of range) or
    //! arbitrary JSON; about 4 % of chat and 8 % of completion cases are accepted (counted
    //! once while writing the generator), so the accepted-request checks do run.

    use proptest::prelude::*;
    use serde_json::{json, Map, Value};

    use super::{ChatRequest, CompletionRequest};
    use crate::config::RequestLimits;

    /// Field names the validators look at, so random objects hit their branches.
    const KEYS: &[&str] = &[
        "model",
        "prompt",
        "messages",
        "role",
        "content",
        "type",
        "text",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "repetition_penalty",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "include_usage",
        "n",
        "ignore_eos",
        "logprobs",
        "top_logprobs",
        "logit_bias",
        "frequency_penalty",
        "presence_penalty",
        "response_format",
        "json_schema",
        "schema",
        "guided_regex",
        "guided_choice",
        "guided_grammar",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "tool_calls",
        "tool_call_id",
        "function",
        "name",
        "0",
        "1",
    ];

    fn scalar() -> impl Strategy<Value = Value> {
        prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            (-5i64..5000).prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            (-3.0f64..3.0).prop_map(|f| json!(f)),
            "[a-z ]{0,12}".prop_map(Value::from),
            prop::sample::select(vec!["user", "system", "assistant", "wizard", "demo"])
                .prop_map(Value::from),
        ]
    }

    fn value() -> impl Strategy<Value = Value> {
        scalar().prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                prop::collection::vec((prop::sample::select(KEYS), inner), 0..8).prop_map(
                    |pairs| {
                        let mut object = Map::new();
                        for (key, value) in pairs {
                            object.insert(key.to_string(), value);
                        }
                        Value::Object(object)
                    }
                ),
            ]
        })
    }

    /// A plausible value for a known field (often valid, sometimes just out of range).
    fn plausible(key: &'static str) -> BoxedStrategy<Value> {
        match key {
            "prompt" => "[a-z ]{0,20}".prop_map(Value::from).boxed(),
            "messages" => prop::collection::vec(
                (
                    prop::sample::select(vec!["user", "system", "assistant", "tool", "wizard"]),
                    "[a-z ]{0,10}",
                )
                    .prop_map(|(role, content)| json!({"role": role, "content": content})),
                0..4,
            )
            .prop_map(Value::Array)
            .boxed(),
            "max_tokens" => (0i64..3000).prop_map(Value::from).boxed(),
            "temperature" => (-0.5f64..2.5).prop_map(|f| json!(f)).boxed(),
            "top_p" => (-0.1f64..1.2).prop_map(|f| json!(f)).boxed(),
            "stop" => prop::collection::vec("[a-z]{0,300}", 0..6)
                .prop_map(|v| json!(v))
                .boxed(),
            "n" => (0i64..3).prop_map(Value::from).boxed(),
            "logit_bias" => prop::collection::vec(("[0-9a-z]{1,3}", -150.0f64..150.0), 0..4)
                .prop_map(|pairs| {
                    Value::Object(pairs.into_iter().map(|(k, v)| (k, json!(v))).collect())
                })
                .boxed(),
            "top_logprobs" => (0i64..30).prop_map(Value::from).boxed(),
            "stream" | "ignore_eos" | "logprobs" => any::<bool>().prop_map(Value::from).boxed(),
            "seed" => any::<u64>().prop_map(Value::from).boxed(),
            "min_p" => (-0.1f64..1.1).prop_map(|f| json!(f)).boxed(),
            "repetition_penalty" => (0.0f64..2.0).prop_map(|f| json!(f)).boxed(),
            "top_k" => (-2i64..50).prop_map(Value::from).boxed(),
            "max_completion_tokens" => (0i64..100).prop_map(Value::from).boxed(),
            "frequency_penalty" | "presence_penalty" => {
                (-2.5f64..2.5).prop_map(|f| json!(f)).boxed()
            }
            "response_format" => {
                prop::sample::select(vec!["text", "json_object", "json_schema", "yaml"])
                    .prop_map(
                        |kind| json!({"type": kind, "json_schema": {"schema": {"type": "object"}}}),
                    )
                    .boxed()
            }
            "tools" => prop::collection::vec("[a-z_ ]{0,6}", 0..3)
                .prop_map(|names| {
                    let tool = |name| json!({"type": "function", "function": {"name": name}});
                    Value::Array(names.iter().map(tool).collect())
                })
                .boxed(),
            "tool_choice" => prop_oneof![
                prop::sample::select(vec!["none", "auto", "required", "any"]).prop_map(Value::from),
                "[a-z]{0,3}"
                    .prop_map(|name| json!({"type": "function", "function": {"name": name}})),
            ]
            .boxed(),
            "guided_choice" => prop::collection::vec("[a-z]{0,5}", 0..3)
                .prop_map(|v| json!(v))
                .boxed(),
            "stream_options" => any::<bool>()
                .prop_map(|b| json!({"include_usage": b}))
                .boxed(),
            _ => value().boxed(),
        }
    }

    /// A request object with `model`, and each known field absent, plausible or random.
    fn request() -> impl Strategy<Value = Value> {
        let fields: Vec<BoxedStrategy<Option<(&'static str, Value)>>> = KEYS
            .iter()
            .filter(|key| **key != "model")
            .map(|key| {
                let key: &'static str = key;
                let absent = if matches!(key, "prompt" | "messages") {
                    2
                } else {
                    20
                };
                prop_oneof![
                    absent => Just(None),
                    10 => plausible(key).prop_map(move |v| Some((key, v))),
                    1 => value().prop_map(move |v| Some((key, v))),
                ]
                .boxed()
            })
            .collect();
        fields.prop_map(|fields| {
            let mut object = Map::new();
            object.insert("model".into(), json!("demo"));
            for (key, value) in fields.into_iter().flatten() {
                object.insert(key.to_string(), value);
            }
            Value::Object(object)
        })
    }

    fn check_params(params: &crate::models::GenerationParams, limits: &RequestLimits) {
        let max_tokens = params.max_tokens.unwrap_or(1);
        assert!(max_tokens >= 1);
        assert!(params.stop.len() <= limits.max_stop);
        assert!(params.stop.iter().all(|s| s.len() <= limits.max_stop_bytes));
        let sampling = &params.sampling;
        assert!((0.0..=2.0).contains(&sampling.temperature));
        assert!(sampling.top_p > 0.0 && sampling.top_p <= 1.0);
        assert!(sampling.logit_bias.len() <= 300);
        assert!((-2.0..=2.0).contains(&sampling.presence_penalty));
        assert!((-2.0..=2.0).contains(&sampling.frequency_penalty));
        if let Some(crate::models::Constraint::Choice(choices)) = &params.constraint {
            assert!(!choices.is_empty());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn completions_never_panic_and_accept_only_valid_requests(body in request()) {
            let limits = RequestLimits::default();
            if let Ok(request) = serde_json::from_value::<CompletionRequest>(body) {
                if let Ok(generation) = request.to_generation(&limits) {
                    check_params(&generation.params, &limits);
                    prop_assert!(request.common.n.is_none_or(|n| (1..=8).contains(&n)));
                }
            }
        }

        #[test]
        fn chat_never_panics_and_accepts_only_valid_requests(body in request()) {
            let limits = RequestLimits::default();
            if let Ok(request) = serde_json::from_value::<ChatRequest>(body) {
                if let Ok(generation) = request.to_generation(&limits) {
                    check_params(&generation.params, &limits);
                    prop_assert!(!request.messages.is_empty());
                    prop_assert!(request.messages.len() <= limits.max_messages);
                    prop_assert!(request.messages.iter().all(|m| super::ROLES.contains(&m.role.as_str())));
                }
            }
        }
    }
}
