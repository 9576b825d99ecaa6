//! Loading a single `.gguf` file: a Llama, Qwen2 or Qwen3 on the CPU through llorch's own
//! forward pass ([`super::cpu::CpuLlama`]), other models and devices through candle's quantized models; the
//! tokenizer from a `tokenizer.json` beside the file or else from the GGUF metadata.

use std::io::Seek;
use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::Device;
use candle_transformers::models::{
    quantized_gemma3, quantized_llama, quantized_phi3, quantized_qwen2, quantized_qwen3,
};

use super::cpu::llama_gguf;
use super::error::{candle_message, LoadError};
use super::gguf_tokenizer::{self, GgufSpecials};
use super::model::Model;

/// What a GGUF load produces besides the model.
pub struct GgufModel {
    /// The runnable model.
    pub model: Model,
    /// `general.architecture`.
    pub architecture: String,
    /// `<arch>.context_length`.
    pub context_length: usize,
    /// Vocabulary size (the token list's length).
    pub vocab_size: usize,
    /// BOS/EOS facts from the metadata.
    pub specials: GgufSpecials,
    /// `tokenizer.chat_template`, if any.
    pub chat_template: Option<String>,
    /// The tokenizer document built from the metadata (`None` when the metadata has none).
    pub tokenizer_json: Result<serde_json::Value, String>,
}

/// The GGUF architectures llorch serves.
pub const GGUF_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2", "qwen3", "phi3", "gemma3"];

/// Loads a GGUF file onto `device`.
pub fn load_gguf(path: &Path, device: &Device) -> Result<GgufModel, LoadError> {
    let bad = |message: String| LoadError::Gguf {
        path: path.to_path_buf(),
        message,
    };
    if !path.exists() {
        return Err(LoadError::MissingFile {
            path: path.to_path_buf(),
            what: "the GGUF model",
        });
    }
    let mut file = std::fs::File::open(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let length = file
        .metadata()
        .map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    super::gguf_check::check_gguf(&mut file, length).map_err(bad)?;
    file.rewind().map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let content = Content::read(&mut file).map_err(|err| bad(candle_message(&err)))?;
    let meta_string = |key: &str| {
        content
            .metadata
            .get(key)
            .and_then(|v| v.to_string().ok().cloned())
    };
    let architecture = meta_string("general.architecture")
        .ok_or_else(|| bad("no general.architecture in the metadata".to_string()))?;
    let context_length = content
        .metadata
        .get(&format!("{architecture}.context_length"))
        .and_then(|v| v.to_u64().ok())
        .ok_or_else(|| bad(format!("no {architecture}.context_length in the metadata")))?
        as usize;
    let vocab_size = content
        .metadata
        .get("tokenizer.ggml.tokens")
        .and_then(|v| v.to_vec().ok())
        .map(Vec::len)
        .or_else(|| {
            content
                .metadata
                .get(&format!("{architecture}.vocab_size"))
                .and_then(|v| v.to_u64().ok())
                .map(|n| n as usize)
        })
        .ok_or_else(|| bad("the vocabulary size is not in the metadata".to_string()))?;
    let specials = gguf_tokenizer::specials(&content, true);
    let chat_template = meta_string("tokenizer.chat_template");
    let tokenizer_json = gguf_tokenizer::tokenizer_json(&content);
    let weights_error = |err: candle_core::Error| LoadError::Weights {
        path: path.to_path_buf(),
        message: candle_message(&err),
    };
    let model = match architecture.as_str() {
        _ if device.is_cpu() && llama_gguf::supports(&content) => Model::CpuLlama(Box::new(
            llama_gguf::from_gguf(&content, &mut file).map_err(weights_error)?,
        )),
        "llama" | "mistral" => Model::QuantLlama(
            quantized_llama::ModelWeights::from_gguf(content, &mut file, device)
                .map_err(weights_error)?,
        ),
        "qwen2" => Model::QuantQwen2(
            quantized_qwen2::ModelWeights::from_gguf(content, &mut file, device)
                .map_err(weights_error)?,
        ),
        "qwen3" => Model::QuantQwen3(
            quantized_qwen3::ModelWeights::from_gguf(content, &mut file, device)
                .map_err(weights_error)?,
        ),
        "phi3" => {
            let model = quantized_phi3::ModelWeights::from_gguf(false, content, &mut file, device)
                .map_err(weights_error)?;
            Model::QuantPhi3 {
                pristine: model.clone(),
                model,
            }
        }
        "gemma3" => {
            let model = quantized_gemma3::ModelWeights::from_gguf(content, &mut file, device)
                .map_err(weights_error)?;
            Model::QuantGemma3 {
                pristine: model.clone(),
                model,
            }
        }
        other => {
            return Err(LoadError::UnsupportedArchitecture {
                path: path.to_path_buf(),
                value: other.to_string(),
                supported: GGUF_ARCHITECTURES.join(", "),
            })
        }
    };
    Ok(GgufModel {
        model,
        architecture,
        context_length,
        vocab_size,
        specials,
        chat_template,
        tokenizer_json,
    })
}
