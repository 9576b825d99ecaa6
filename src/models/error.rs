//! Typed errors of the model layer: loading a model and running a generation.

use std::path::PathBuf;

/// Errors raised while turning a model source into a runnable model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file the source needs does not exist.
    #[error("missing file {path}: {what}")]
    MissingFile {
        /// The path that was looked for.
        path: PathBuf,
        /// What the file was needed for.
        what: &'static str,
    },
    /// A file exists but could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file that failed.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A JSON file is malformed or lacks a required field.
    #[error("invalid JSON in {path}: {message}")]
    BadJson {
        /// The file that failed to parse.
        path: PathBuf,
        /// What serde reported.
        message: String,
    },
    /// `config.json` names an architecture llorch does not serve.
    #[error("unsupported architecture {value:?} in {path} (supported: {supported})")]
    UnsupportedArchitecture {
        /// The config file that named it.
        path: PathBuf,
        /// The `model_type` / `architectures[]` value found.
        value: String,
        /// The comma-separated list of supported values.
        supported: String,
    },
    /// A config field has a value llorch cannot honour exactly.
    #[error("unsupported configuration in {path}: {field} = {value} ({reason})")]
    UnsupportedConfig {
        /// The config file.
        path: PathBuf,
        /// The offending field.
        field: String,
        /// Its value, rendered.
        value: String,
        /// Why it cannot be honoured.
        reason: String,
    },
    /// Weights do not fit the architecture described by the config (shape or name mismatch).
    #[error("weights in {path} do not match the model config: {message}")]
    Weights {
        /// The weight file(s).
        path: PathBuf,
        /// The candle error text, which names the tensor and shapes.
        message: String,
    },
    /// A GGUF file is malformed or lacks required metadata.
    #[error("invalid GGUF file {path}: {message}")]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The tokenizer could not be loaded or built.
    #[error("tokenizer error ({origin}): {message}")]
    Tokenizer {
        /// Where the tokenizer came from (a path or "gguf metadata").
        origin: String,
        /// What failed.
        message: String,
    },
    /// The source string is not one llorch understands.
    #[error("invalid model source {source_str:?}: {reason}")]
    BadSource {
        /// The source string as given.
        source_str: String,
        /// Why it is invalid.
        reason: String,
    },
    /// A `hf:` source is not in the local cache and could not be downloaded.
    #[error("cannot fetch {repo} from the Hugging Face hub: {message}")]
    Hub {
        /// The repository (with revision).
        repo: String,
        /// What failed.
        message: String,
    },
    /// The requested dtype cannot run on the requested device.
    #[error("dtype {dtype} is not supported on device {device}: {reason}")]
    UnsupportedDtype {
        /// The dtype asked for.
        dtype: String,
        /// The device asked for.
        device: String,
        /// Why not.
        reason: String,
    },
    /// The loader panicked (a bug or a corrupt file); the message is the panic's.
    #[error("the loader panicked: {0}")]
    Panicked(String),
    /// A load failure injected by a test.
    #[cfg(feature = "fault-injection")]
    #[error("injected load failure: {0}")]
    Injected(String),
    /// The requested device is not available in this build or on this machine.
    #[error("device {device} is not available: {reason}")]
    DeviceUnavailable {
        /// The device asked for.
        device: String,
        /// Why not.
        reason: String,
    },
}

impl LoadError {
    /// Whether the device ran out of memory while the weights were placed on it.
    pub fn is_out_of_memory(&self) -> bool {
        is_out_of_memory(&self.to_string())
    }

    /// Whether the model's files themselves are malformed (weights, GGUF or config JSON), as
    /// opposed to missing, unsupported or failing for another reason.
    pub fn is_invalid_file(&self) -> bool {
        matches!(
            self,
            LoadError::Weights { .. } | LoadError::Gguf { .. } | LoadError::BadJson { .. }
        )
    }
}

/// Errors raised while running a generation on a loaded model.
#[derive(Debug, thiserror::Error)]
pub enum GenerationError {
    /// The prompt has no tokens at all.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The prompt (plus at least one generated token) does not fit the context.
    #[error(
        "the prompt has {prompt_tokens} tokens but the model's context is {context_length} tokens"
    )]
    ContextLengthExceeded {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The model's context length.
        context_length: usize,
    },
    /// The prompt plus the requested `max_tokens` does not fit the context.
    #[error(
        "the prompt has {prompt_tokens} tokens and max_tokens is {max_tokens}, {} in all, but the model's context is {context_length} tokens",
        prompt_tokens + max_tokens
    )]
    MaxTokensExceedContext {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// The requested maximum.
        max_tokens: usize,
        /// The model's context length.
        context_length: usize,
    },
    /// A prompt token id is outside the vocabulary.
    #[error("token id {id} is outside the vocabulary of {vocab_size} tokens")]
    TokenOutOfVocabulary {
        /// The offending id.
        id: u32,
        /// The model's vocabulary size.
        vocab_size: usize,
    },
    /// A sampling parameter is out of range.
    #[error("invalid sampling parameter {param}: {reason}")]
    InvalidParameter {
        /// The parameter name as clients send it.
        param: &'static str,
        /// Why it is invalid.
        reason: String,
    },
    /// The model has no chat template but a chat prompt was given.
    #[error("this model has no chat template")]
    NoChatTemplate,
    /// The chat template failed to render.
    #[error("chat template error: {0}")]
    ChatTemplate(String),
    /// Tokenizing or detokenizing failed.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// A request's constraint (`response_format`, `guided_*`) cannot be compiled.
    #[error("{param}: {reason}")]
    InvalidConstraint {
        /// The request field that gave it.
        param: &'static str,
        /// What the grammar engine said.
        reason: String,
    },
    /// The grammar engine failed while masking or advancing a constrained sequence.
    #[error("constrained decoding failed: {0}")]
    Grammar(String),
    /// The forward pass failed (device error, shape bug).
    #[error("forward pass failed: {0}")]
    Forward(String),
    /// The device ran out of memory during the forward pass (the KV cache or the activations
    /// of this request do not fit).
    #[error("the device ran out of memory for this request: {0}")]
    OutOfMemory(String),
}

impl From<candle_core::Error> for GenerationError {
    fn from(err: candle_core::Error) -> Self {
        let message = candle_message(&err);
        if is_out_of_memory(&message) {
            GenerationError::OutOfMemory(message)
        } else {
            GenerationError::Forward(message)
        }
    }
}

/// Whether an error text reports a device allocation failure (CUDA's
/// `CUDA_ERROR_OUT_OF_MEMORY`, or an "out of memory" message from another backend).
pub fn is_out_of_memory(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    lower.contains("out_of_memory") || lower.contains("out of memory")
}

/// A candle error's message without its backtrace: formatting a captured backtrace
/// symbolises the binary (slow, and it leaks source paths into user-facing text).
pub fn candle_message(err: &candle_core::Error) -> String {
    match err {
        candle_core::Error::WithBacktrace { inner, .. } => candle_message(inner),
        other => first_line(&other.to_string()),
    }
}

/// The first line of an error's text: candle appends a backtrace (with source paths) when
/// `RUST_BACKTRACE` is set, which users must not see.
pub fn first_line(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or_default()
        .trim_end()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_allocation_failures_are_out_of_memory_and_nothing_else_is() {
        // The text candle gives for a failed CUDA allocation.
        let cuda = "DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")";
        assert!(is_out_of_memory(cuda));
        let err: GenerationError = candle_core::Error::Msg(cuda.to_string()).into();
        assert!(matches!(err, GenerationError::OutOfMemory(_)), "{err:?}");
        let other: GenerationError = candle_core::Error::Msg("shape mismatch".into()).into();
        assert!(matches!(other, GenerationError::Forward(_)), "{other:?}");
        let load = LoadError::Weights {
            path: "model.safetensors".into(),
            message: cuda.to_string(),
        };
        assert!(load.is_out_of_memory());
    }
}
