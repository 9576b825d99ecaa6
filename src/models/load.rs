//! Turns a `ModelSource` into a `LoadedModel`: weights, tokenizer and generation facts.

use std::path::Path;
use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::demo;
use super::device::{device_label, DTypeChoice};
use super::error::{GenerationError, LoadError};
use super::gguf::load_gguf;
use super::grammar::Grammars;
use super::hf_dir::{load_dir, read_json};
use super::model::Model;
use super::progress::{weight_files, LoadProgress};
use super::source::{default_hub_cache, hub_offline, resolve_hub, ModelSource};
use super::tokenizer::TextTokenizer;

/// What to load and where.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Where the model comes from.
    pub source: ModelSource,
    /// The device to run on (create GPU devices once and clone them).
    pub device: Device,
    /// The compute dtype.
    pub dtype: DTypeChoice,
    /// An optional cap on the context length (prompt plus generated tokens).
    pub max_seq_len: Option<usize>,
}

/// Facts about a loaded model that generation and the API need.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// The source as given.
    pub source: String,
    /// The architecture (`model_type` or GGUF `general.architecture`).
    pub architecture: String,
    /// The longest sequence (prompt plus generated tokens) the model runs.
    pub context_length: usize,
    /// The length of the logit vector.
    pub vocab_size: usize,
    /// Token ids that end a generation unless `ignore_eos` is set.
    pub eos_ids: Vec<u32>,
    /// The compute dtype.
    pub dtype: DType,
    /// The device name (`cpu`, `cuda`, `metal`).
    pub device: String,
    /// Bytes the weights take (estimated from the weight files and the compute dtype).
    pub weights_bytes: u64,
    /// How much the GPU's memory in use grew during the load (`None` on the CPU). It counts
    /// what the allocator reserved, so it can exceed the weights, or be 0 when a reserved
    /// block had room.
    pub device_bytes: Option<u64>,
    /// Whether a replica runs many sequences per forward pass (set by the engine).
    pub batched: bool,
    /// Sequences one replica runs at once (1 unless batched; set by the engine).
    pub max_seqs: usize,
    /// Bytes of the replica's paged KV cache (0 unless batched; set by the engine).
    pub kv_cache_bytes: u64,
}

/// A model ready to generate: weights with their KV cache, tokenizer and facts.
pub struct LoadedModel {
    /// The weights and KV cache.
    pub model: Model,
    /// The tokenizer and chat template.
    pub tokenizer: TextTokenizer,
    /// Facts about the model.
    pub info: ModelInfo,
    device: Device,
    /// The grammar compiler over the tokenizer's vocabulary, built by the first request
    /// that asks for a constraint.
    grammars: OnceLock<Result<Grammars, String>>,
}

impl LoadedModel {
    /// Runs `ids` at `position` and returns the last position's logits.
    pub fn forward(&mut self, ids: &[u32], position: usize) -> Result<Vec<f32>, GenerationError> {
        let input = Tensor::new(ids, &self.device)?.unsqueeze(0)?;
        self.model.forward(&input, position)
    }

    /// Empties the KV cache.
    pub fn clear_kv_cache(&mut self) -> Result<(), GenerationError> {
        self.model.clear_kv_cache()
    }

    /// Returns the device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The grammar compiler of this model's vocabulary (built on first use), or why it
    /// cannot be built.
    pub fn grammars(&self) -> Result<&Grammars, String> {
        let eos = self.info.eos_ids.first().copied().unwrap_or(0);
        self.grammars
            .get_or_init(|| Grammars::new(&self.tokenizer, eos))
            .as_ref()
            .map_err(Clone::clone)
    }
}

/// Loads a model. This is CPU/IO-bound work: call it from an engine thread, never from an
/// async task.
pub fn load(spec: &LoadSpec) -> Result<LoadedModel, LoadError> {
    load_with_progress(spec, &LoadProgress::default())
}

/// [`load`], counting the bytes of weights read in `progress`.
pub fn load_with_progress(
    spec: &LoadSpec,
    progress: &LoadProgress,
) -> Result<LoadedModel, LoadError> {
    let device = spec.device.clone();
    // On a GPU, loads take turns, so the memory each one takes is the difference in use.
    let _turn = super::device::gpu_load_turn(&device);
    let before = super::device::gpu_memory_used(&device);
    let mut loaded = match &spec.source {
        ModelSource::Dir(dir) => {
            progress.read_ahead(&weight_files(dir), || load_hf_dir(dir, &device, spec.dtype))?
        }
        ModelSource::Hub { repo, revision } => {
            let dir = resolve_hub(
                repo,
                revision,
                &default_hub_cache(),
                hub_offline(),
                progress,
            )?;
            progress.read_ahead(&weight_files(&dir), || {
                load_hf_dir(&dir, &device, spec.dtype)
            })?
        }
        ModelSource::Gguf(path) => progress.read_ahead(std::slice::from_ref(path), || {
            load_gguf_file(path, &device, spec.dtype)
        })?,
        #[cfg(feature = "fault-injection")]
        ModelSource::BuiltinFake { ms, load_ms } => {
            // The fake's progress counts the milliseconds of its load.
            for done in (0..*load_ms).step_by(10) {
                progress.set(done, *load_ms);
                std::thread::sleep(std::time::Duration::from_millis((*load_ms - done).min(10)));
            }
            progress.set(*load_ms, *load_ms);
            let tokenizer = demo::demo_tokenizer()?;
            LoadedModel {
                grammars: OnceLock::new(),
                model: super::model::Model::Fake(super::fake::FakeModel::new(
                    std::time::Duration::from_millis(*ms),
                    tokenizer.vocab_size(),
                )),
                tokenizer,
                info: ModelInfo {
                    source: String::new(),
                    architecture: "fake".to_string(),
                    context_length: super::fake::FAKE_CONTEXT,
                    vocab_size: 0,
                    eos_ids: demo::DEMO_EOS.to_vec(),
                    dtype: candle_core::DType::F32,
                    device: String::new(),
                    weights_bytes: 0,
                    device_bytes: None,
                    batched: false,
                    max_seqs: 1,
                    kv_cache_bytes: 0,
                },
                device: device.clone(),
            }
        }
        ModelSource::BuiltinDemo => {
            let dtype = spec.dtype.resolve(&device)?;
            LoadedModel {
                grammars: OnceLock::new(),
                model: demo::demo_model(&device, dtype)?,
                tokenizer: demo::demo_tokenizer()?,
                info: ModelInfo {
                    source: String::new(),
                    architecture: "llama".to_string(),
                    context_length: demo::DEMO_CONTEXT,
                    vocab_size: 0,
                    eos_ids: demo::DEMO_EOS.to_vec(),
                    dtype,
                    device: String::new(),
                    weights_bytes: 0,
                    device_bytes: None,
                    batched: false,
                    max_seqs: 1,
                    kv_cache_bytes: 0,
                },
                device: device.clone(),
            }
        }
    };
    if loaded.info.vocab_size == 0 {
        loaded.info.vocab_size = loaded.tokenizer.vocab_size();
    }
    loaded.info.source = spec.source.to_string();
    loaded.info.weights_bytes = super::footprint::loaded_bytes(&spec.source, loaded.info.dtype);
    loaded.info.device = device_label(&device);
    loaded.info.device_bytes = before
        .zip(super::device::gpu_memory_used(&device))
        .map(|(before, after)| after.saturating_sub(before));
    if let Some(cap) = spec.max_seq_len {
        loaded.info.context_length = loaded.info.context_length.min(cap);
    }
    Ok(loaded)
}

fn load_hf_dir(dir: &Path, device: &Device, choice: DTypeChoice) -> Result<LoadedModel, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::MissingFile {
            path: dir.to_path_buf(),
            what: "the model directory",
        });
    }
    let tokenizer = TextTokenizer::from_dir(dir)?;
    let loaded = load_dir(dir, device, choice)?;
    let dtype = loaded.dtype;
    let eos_ids = eos_ids(dir, &loaded.config, &tokenizer)?;
    Ok(LoadedModel {
        grammars: OnceLock::new(),
        model: loaded.model,
        tokenizer,
        info: ModelInfo {
            source: String::new(),
            architecture: loaded.architecture.model_type().to_string(),
            context_length: loaded.context_length,
            vocab_size: loaded.vocab_size,
            eos_ids,
            dtype,
            device: String::new(),
            weights_bytes: 0,
            device_bytes: None,
            batched: false,
            max_seqs: 1,
            kv_cache_bytes: 0,
        },
        device: device.clone(),
    })
}

fn load_gguf_file(
    path: &Path,
    device: &Device,
    choice: DTypeChoice,
) -> Result<LoadedModel, LoadError> {
    if !matches!(choice, DTypeChoice::Auto | DTypeChoice::F32) {
        return Err(LoadError::UnsupportedDtype {
            dtype: choice.to_string(),
            device: device_label(device),
            reason: "GGUF weights run in their stored quantized types; use dtype auto".to_string(),
        });
    }
    let gguf = load_gguf(path, device)?;
    let beside = path.with_file_name("tokenizer.json");
    let tokens =
        |id: Option<u32>, tok: &tokenizers::Tokenizer| id.and_then(|id| tok.id_to_token(id));
    let inner = if beside.exists() {
        tokenizers::Tokenizer::from_file(&beside).map_err(|err| LoadError::Tokenizer {
            origin: beside.display().to_string(),
            message: err.to_string(),
        })?
    } else {
        let document = gguf
            .tokenizer_json
            .map_err(|message| LoadError::Tokenizer {
                origin: format!("gguf metadata of {}", path.display()),
                message,
            })?;
        document
            .to_string()
            .parse()
            .map_err(|err: tokenizers::Error| LoadError::Tokenizer {
                origin: format!("gguf metadata of {}", path.display()),
                message: err.to_string(),
            })?
    };
    let bos = tokens(gguf.specials.bos, &inner);
    let eos = tokens(gguf.specials.eos.first().copied(), &inner);
    let tokenizer = TextTokenizer::new(inner, gguf.chat_template, bos, eos)?;
    Ok(LoadedModel {
        grammars: OnceLock::new(),
        model: gguf.model,
        tokenizer,
        info: ModelInfo {
            source: String::new(),
            architecture: gguf.architecture,
            context_length: gguf.context_length,
            vocab_size: gguf.vocab_size,
            eos_ids: gguf.specials.eos,
            dtype: DType::F32,
            device: String::new(),
            weights_bytes: 0,
            device_bytes: None,
            batched: false,
            max_seqs: 1,
            kv_cache_bytes: 0,
        },
        device: device.clone(),
    })
}

/// EOS ids: `generation_config.json` first, then `config.json`, then the tokenizer's EOS token.
fn eos_ids(dir: &Path, config: &Value, tokenizer: &TextTokenizer) -> Result<Vec<u32>, LoadError> {
    let generation_path = dir.join("generation_config.json");
    let generation = if generation_path.exists() {
        read_json(&generation_path, "the generation config")?
    } else {
        Value::Null
    };
    let from = |value: &Value| -> Vec<u32> {
        match value.get("eos_token_id") {
            Some(Value::Number(n)) => n.as_u64().map(|id| vec![id as u32]).unwrap_or_default(),
            Some(Value::Array(list)) => list
                .iter()
                .filter_map(|v| v.as_u64().map(|id| id as u32))
                .collect(),
            _ => Vec::new(),
        }
    };
    let mut ids = from(&generation);
    if ids.is_empty() {
        ids = from(config);
    }
    if ids.is_empty() {
        ids.extend(tokenizer.token_id(tokenizer.eos_token()));
    }
    Ok(ids)
}
