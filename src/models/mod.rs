//! The model layer: synchronous, no tokio, no actors, no threads.
//!
//! It turns a model source (a HuggingFace directory, a GGUF file, a `hf:` repository or
//! `builtin:demo`) into a [`LoadedModel`], and a prompt into a stream of tokens through a
//! [`Sequence`]. It imports nothing from `actors`, `api` or `config`.

mod arch;
pub mod batch;
pub mod candle_llama;
pub mod cpu;
mod decoder;
mod demo;
mod detok;
mod device;
mod error;
#[cfg(feature = "fault-injection")]
mod fake;
mod footprint;
mod generation;
mod gguf;
mod gguf_check;
mod gguf_tokenizer;
mod gguf_vocab;
mod grammar;
mod hf_dir;
mod load;
mod logprobs;
mod model;
mod phi;
mod progress;
mod quantize;
mod sampling;
mod source;
mod stop;
mod tokenizer;
mod tools;

pub use arch::Architecture;
pub use detok::Detokenizer;
pub use device::{available_memory, device_label, proc_bytes, DTypeChoice, DeviceSpec};
pub use error::{first_line, GenerationError, LoadError};
#[cfg(feature = "fault-injection")]
pub use fake::fake_forwards;
pub use footprint::estimate_weight_bytes;
pub use generation::{
    prepare_prompt, tokenize_prompt, EchoedToken, FinishReason, GenerationParams, Prompt, Sequence,
    StepOutput,
};
pub use gguf_check::check_gguf;
pub use grammar::{Constraint, Grammars, Guide};
pub use load::{load, load_with_progress, LoadSpec, LoadedModel, ModelInfo};
pub use logprobs::{Logprobs, TokenLogprob};
pub use model::Model;
pub use progress::{LoadProgress, Progress};
pub use quantize::{quantize_dir, tensor_type, QuantType, QuantizeReport, Role};
pub use sampling::{argmax, Adjustment, DeviceDraw, Sampler, SamplingParams, MAX_DEVICE_TOP_K};
pub use source::{resolve_hub, ModelSource, BUILTIN_DEMO};
pub use stop::{StopMatcher, StopOutcome};
pub use tokenizer::{ChatMessage, MessageCall, TextTokenizer};
pub use tools::{parse_answer, Call, Function, Piece, ToolChoice, ToolFormat, ToolStream, Tools};
