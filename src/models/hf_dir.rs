//! Loading a model from a local HuggingFace directory (`config.json` + safetensors).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use candle_transformers::models::{
    gemma, gemma2, llama, olmo, olmo2, phi3, qwen2, qwen3, stable_lm, starcoder2,
};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::arch::Architecture;
use super::candle_llama::CandleLlama;
use super::cpu::llama_hf::{self, FamilyConfig, RawTensor, Tensors};
use super::decoder::{Decoder, DecoderConfig};
use super::device::DTypeChoice;
use super::error::{candle_message, LoadError};
use super::model::Model;
use super::phi::{Phi, PhiConfig, PHI_ACTIVATIONS};
use super::source::shard_files;

/// What a directory load produces besides the model itself.
pub struct DirModel {
    /// The runnable model.
    pub model: Model,
    /// The detected architecture.
    pub architecture: Architecture,
    /// The longest sequence (prompt + generated) this model computes exactly.
    pub context_length: usize,
    /// Logit vector length.
    pub vocab_size: usize,
    /// The parsed `config.json`.
    pub config: Value,
    /// The compute dtype.
    pub dtype: DType,
}

/// Reads and parses a JSON file, mapping failures to typed errors that name the file.
pub fn read_json(path: &Path, what: &'static str) -> Result<Value, LoadError> {
    if !path.exists() {
        return Err(LoadError::MissingFile {
            path: path.to_path_buf(),
            what,
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|err| LoadError::BadJson {
        path: path.to_path_buf(),
        message: err.to_string(),
    })
}

/// Loads the model in `dir` on `device` in the dtype `choice` resolves to.
pub fn load_dir(dir: &Path, device: &Device, choice: DTypeChoice) -> Result<DirModel, LoadError> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path, "the model config")?;
    let architecture = Architecture::detect(&config, &config_path)?;
    let dtype = choice.resolve(device)?;
    let checker = ConfigCheck {
        path: &config_path,
        config: &config,
    };
    checker.check_rope_scaling(architecture)?;
    let files = weight_files(dir)?;
    let weights_label = files.first().cloned().unwrap_or_else(|| dir.to_path_buf());
    let weight_error = |err: candle_core::Error| LoadError::Weights {
        path: weights_label.clone(),
        message: candle_message(&err),
    };
    let own = device.is_cpu() && matches!(dtype, DType::F32 | DType::F16);
    let (model, exact_window) = match architecture {
        Architecture::Llama
        | Architecture::Mistral
        | Architecture::Qwen2
        | Architecture::Qwen3
        | Architecture::Granite
            if own =>
        {
            let model =
                build_cpu_llama(architecture, &checker, &files, dtype).map_err(
                    |err| match err {
                        BuildError::Config(err) => err,
                        BuildError::Candle(err) => weight_error(err),
                    },
                )?;
            (model, true)
        }
        Architecture::Llama
        | Architecture::Mistral
        | Architecture::Qwen2
        | Architecture::Qwen3
        | Architecture::Granite
            if device.is_cuda() || device.is_cpu() =>
        {
            let vb = mmap_weights(&files, dtype, device)?;
            let model =
                build_candle_llama(architecture, &checker, vb).map_err(|err| match err {
                    BuildError::Config(err) => err,
                    BuildError::Candle(err) => weight_error(err),
                })?;
            (model, true)
        }
        _ => {
            let vb = mmap_weights(&files, dtype, device)?;
            let model =
                build(architecture, &checker, vb, dtype, device).map_err(|err| match err {
                    BuildError::Config(err) => err,
                    BuildError::Candle(err) => weight_error(err),
                })?;
            (model, false)
        }
    };
    let context_length = checker.context_length(architecture, exact_window)?;
    let vocab_size = checker.vocab_size()?;
    Ok(DirModel {
        model,
        architecture,
        context_length,
        vocab_size,
        config,
        dtype,
    })
}

enum BuildError {
    Config(LoadError),
    Candle(candle_core::Error),
}

impl From<candle_core::Error> for BuildError {
    fn from(err: candle_core::Error) -> Self {
        BuildError::Candle(err)
    }
}

impl From<LoadError> for BuildError {
    fn from(err: LoadError) -> Self {
        BuildError::Config(err)
    }
}

/// llorch's own batched decoder on the CPU, from the mapped safetensors.
fn build_cpu_llama(
    architecture: Architecture,
    checker: &ConfigCheck<'_>,
    files: &[PathBuf],
    dtype: DType,
) -> Result<Model, BuildError> {
    let (config, window) = family_config(architecture, checker)?;
    // SAFETY: as for `mmap_weights`: mapped read-only, never written by llorch.
    #[allow(unsafe_code)]
    let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }?;
    let vocab = checker.vocab_size()?;
    let as_f16 = dtype == DType::F16;
    let model = llama_hf::from_tensors(&config, &Mapped(mapped), vocab, window, as_f16)?;
    Ok(Model::CpuLlama(Box::new(model)))
}

/// The batched decoder of candle tensor ops (GPUs, and bf16 on the CPU).
fn build_candle_llama(
    architecture: Architecture,
    checker: &ConfigCheck<'_>,
    vb: VarBuilder<'static>,
) -> Result<Model, BuildError> {
    let (config, window) = family_config(architecture, checker)?;
    let vocab = checker.vocab_size()?;
    let positions = checker.trained_length()?;
    let model = CandleLlama::new(&config, vb, vocab, window, positions)?;
    Ok(Model::CandleLlama(Box::new(model)))
}

/// The config of a Llama-family model and the attention window it honours.
fn family_config(
    architecture: Architecture,
    checker: &ConfigCheck<'_>,
) -> Result<(FamilyConfig, Option<usize>), BuildError> {
    checker.check_activation("hidden_act", &["silu"])?;
    if matches!(architecture, Architecture::Qwen2 | Architecture::Qwen3) {
        checker.reject_true(
            "use_sliding_window",
            "Qwen's per-layer sliding window is not implemented",
        )?;
    }
    let config: FamilyConfig = checker.parse()?;
    let window = match architecture {
        Architecture::Mistral => config.sliding_window,
        _ => None,
    };
    Ok((config, window))
}

/// Memory-mapped safetensors as the CPU decoder reads them.
struct Mapped(candle_core::safetensors::MmapedSafetensors);

impl Tensors for Mapped {
    fn tensor(&self, name: &str) -> candle_core::Result<Option<RawTensor<'_>>> {
        match self.0.get(name) {
            Ok(view) => Ok(Some(RawTensor {
                dtype: DType::try_from(view.dtype())?,
                shape: view.shape().to_vec(),
                bytes: Cow::Borrowed(view.data()),
            })),
            Err(_) => Ok(None),
        }
    }
}

fn build(
    architecture: Architecture,
    checker: &ConfigCheck<'_>,
    vb: VarBuilder<'static>,
    dtype: DType,
    device: &Device,
) -> Result<Model, BuildError> {
    Ok(match architecture {
        Architecture::Llama => {
            let cfg: llama::LlamaConfig = checker.parse()?;
            let cfg = cfg.into_config(false);
            let cache = llama::Cache::new(true, dtype, &cfg, device)?;
            Model::Llama {
                model: llama::Llama::load(vb, &cfg)?,
                cache,
                config: Box::new(cfg),
                dtype,
                device: device.clone(),
            }
        }
        Architecture::Mistral | Architecture::Granite => {
            let cfg: DecoderConfig = checker.parse()?;
            checker.check_activation("hidden_act", &["silu"])?;
            Model::Decoder(Decoder::new(&cfg, vb)?)
        }
        Architecture::Phi => {
            checker.check_activation("hidden_act", PHI_ACTIVATIONS)?;
            Model::Phi(Phi::new(&checker.parse::<PhiConfig>()?, vb)?)
        }
        Architecture::Phi3 => Model::Phi3(phi3::Model::new(&checker.parse::<phi3::Config>()?, vb)?),
        Architecture::Qwen2 => {
            checker.reject_true(
                "use_sliding_window",
                "candle's Qwen2 has no per-layer window",
            )?;
            let cfg: qwen2::Config = checker.parse()?;
            Model::Qwen2(qwen2::ModelForCausalLM::new(&cfg, vb)?)
        }
        Architecture::Qwen3 => {
            checker.reject_true("use_sliding_window", "candle's Qwen3 has no sliding window")?;
            let cfg: qwen3::Config = checker.parse()?;
            Model::Qwen3(qwen3::ModelForCausalLM::new(&cfg, vb)?)
        }
        Architecture::Gemma => Model::Gemma(gemma::Model::new(
            false,
            &checker.parse::<gemma::Config>()?,
            vb,
        )?),
        Architecture::Gemma2 => Model::Gemma2(gemma2::Model::new(
            false,
            &checker.parse::<gemma2::Config>()?,
            vb,
        )?),
        Architecture::Olmo => Model::Olmo(olmo::Model::new(&checker.parse::<olmo::Config>()?, vb)?),
        Architecture::Olmo2 => {
            checker.reject_non_null("clip_qkv", "candle's OLMo 2 does not clip q/k/v")?;
            Model::Olmo2(olmo2::Model::new(&checker.parse::<olmo2::Config>()?, vb)?)
        }
        Architecture::StableLm => {
            checker.reject_true("qk_layernorm", "candle's StableLM has no q/k LayerNorm")?;
            let cfg: stable_lm::Config = checker.parse()?;
            Model::StableLm {
                model: Box::new(stable_lm::Model::new(&cfg, vb.clone())?),
                config: Box::new(cfg),
                weights: vb,
            }
        }
        Architecture::Starcoder2 => Model::Starcoder2(starcoder2::Model::new(
            &checker.parse::<starcoder2::Config>()?,
            vb,
        )?),
    })
}

/// Lists the safetensors files of a directory: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if !index.exists() {
        return Err(LoadError::MissingFile {
            path: single,
            what: "the weights (model.safetensors or model.safetensors.index.json)",
        });
    }
    let files: Vec<PathBuf> = shard_files(&index)?
        .into_iter()
        .map(|name| dir.join(name))
        .collect();
    if let Some(missing) = files.iter().find(|path| !path.exists()) {
        return Err(LoadError::MissingFile {
            path: missing.clone(),
            what: "a weight shard named by model.safetensors.index.json",
        });
    }
    Ok(files)
}

/// Maps the safetensors files into a `VarBuilder`.
#[allow(unsafe_code)]
fn mmap_weights(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>, LoadError> {
    // SAFETY: the files are mapped read-only and llorch never writes to model files; a reload
    // that changes weights on disk must write new files rather than modify mapped ones
    // (documented in the README).
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }.map_err(|err| {
        LoadError::Weights {
            path: files.first().cloned().unwrap_or_default(),
            message: candle_message(&err),
        }
    })
}

/// Checks a parsed `config.json` for fields llorch cannot honour.
struct ConfigCheck<'a> {
    path: &'a Path,
    config: &'a Value,
}

impl ConfigCheck<'_> {
    fn bad(&self, message: &str) -> LoadError {
        LoadError::BadJson {
            path: self.path.to_path_buf(),
            message: message.to_string(),
        }
    }

    fn unsupported(&self, field: &str, value: &Value, reason: &str) -> LoadError {
        LoadError::UnsupportedConfig {
            path: self.path.to_path_buf(),
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }

    fn parse<T: DeserializeOwned>(&self) -> Result<T, LoadError> {
        serde_json::from_value(self.config.clone()).map_err(|err| self.bad(&err.to_string()))
    }

    fn reject_true(&self, field: &str, reason: &str) -> Result<(), LoadError> {
        match self.config.get(field) {
            Some(value @ Value::Bool(true)) => Err(self.unsupported(field, value, reason)),
            _ => Ok(()),
        }
    }

    fn reject_non_null(&self, field: &str, reason: &str) -> Result<(), LoadError> {
        match self.config.get(field) {
            Some(Value::Null) | None => Ok(()),
            Some(value) => Err(self.unsupported(field, value, reason)),
        }
    }

    fn vocab_size(&self) -> Result<usize, LoadError> {
        self.config
            .get("vocab_size")
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| self.bad("missing integer field `vocab_size`"))
    }

    /// The length the model was trained for.
    fn trained_length(&self) -> Result<usize, LoadError> {
        [
            "max_position_embeddings",
            "n_positions",
            "max_sequence_length",
        ]
        .iter()
        .find_map(|field| self.config.get(*field).and_then(Value::as_u64))
        .map(|v| v as usize)
        .ok_or_else(|| self.bad("missing integer field `max_position_embeddings`"))
    }

    fn check_activation(&self, field: &str, allowed: &[&str]) -> Result<(), LoadError> {
        match self.config.get(field).and_then(Value::as_str) {
            Some(act) if !allowed.contains(&act) => Err(self.unsupported(
                field,
                &Value::String(act.to_string()),
                &format!("implemented for this architecture: {}", allowed.join(", ")),
            )),
            _ => Ok(()),
        }
    }

    /// Rejects RoPE scaling schemes the architecture's implementation does not apply.
    fn check_rope_scaling(&self, architecture: Architecture) -> Result<(), LoadError> {
        let supported: &[&str] = match architecture {
            Architecture::Llama => &["default", "llama3"],
            Architecture::Phi3 => &["default", "longrope", "su"],
            _ => &["default"],
        };
        for field in ["rope_scaling", "rope_parameters"] {
            let Some(value) = self.config.get(field) else {
                continue;
            };
            if value.is_null() {
                continue;
            }
            let kind = value
                .get("rope_type")
                .or_else(|| value.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            if !supported.contains(&kind) {
                return Err(self.unsupported(
                    field,
                    value,
                    &format!(
                        "RoPE scaling {kind:?} is not implemented for {}",
                        architecture.model_type()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The context length: the trained length, capped where candle applies an attention window
    /// inexactly (beyond that window its results would differ from the reference); llorch's
    /// own decoder (`exact`) applies Mistral's window exactly and Qwen's not at all, as
    /// transformers does without `use_sliding_window`.
    fn context_length(&self, architecture: Architecture, exact: bool) -> Result<usize, LoadError> {
        let trained = self.trained_length()?;
        let window = self.config.get("sliding_window").and_then(Value::as_u64);
        let inexact_window = match architecture {
            _ if exact => None,
            // Exact in llorch's own decoder.
            Architecture::Mistral => None,
            Architecture::Qwen2
            | Architecture::Gemma2
            | Architecture::Phi3
            | Architecture::Starcoder2 => window,
            _ => None,
        };
        Ok(match inexact_window {
            Some(window) => trained.min(window as usize),
            None => trained,
        })
    }
}
