//! Reading a Llama-family model in HuggingFace's layout (`model.layers.N.self_attn.q_proj`,
//! ...) into [`CpuLlama`]: Llama (with Llama 3 RoPE scaling), Mistral (exact sliding window),
//! Qwen2 (q/k/v biases), Qwen3 (q/k norms) and Granite (its four multipliers). Biases and
//! q/k norms are taken wherever the checkpoint has them.
//!
//! f32, f16 and bf16 matrices are kept as stored (f16 and bf16 in panels, widened to f32
//! value by value as they are multiplied); with `as_f16` every matrix is kept in f16. Norms and
//! biases become f32 vectors.

use std::borrow::Cow;

use candle_core::{bail, DType, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use serde::Deserialize;

use super::llama::{CpuLlama, Hyper, Layer, Linear, Weights};
use super::ops::{Llama3Scaling, Rope, RopeStyle};
use super::weight::Weight;

/// A stored tensor: its dtype, shape and little-endian bytes.
pub struct RawTensor<'a> {
    /// The stored dtype.
    pub dtype: DType,
    /// The shape.
    pub shape: Vec<usize>,
    /// The values, little-endian.
    pub bytes: Cow<'a, [u8]>,
}

/// Where the tensors come from, by name.
pub trait Tensors {
    /// The tensor `name`, or `None` when there is none.
    fn tensor(&self, name: &str) -> Result<Option<RawTensor<'_>>>;
}

/// The fields of `config.json` this path reads.
#[derive(Debug, Clone, Deserialize)]
pub struct FamilyConfig {
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (default: the query heads).
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Values per head (default: hidden / heads).
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base (default 10 000).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (`rope_type = "llama3"` or none).
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
    /// transformers 5's form of the rotary settings.
    #[serde(default)]
    pub rope_parameters: Option<RopeScaling>,
    /// Whether the output projection is the embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Mistral's attention window.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Granite: scale of the token embeddings.
    #[serde(default)]
    pub embedding_multiplier: Option<f64>,
    /// Granite: scale of each sub-layer's output.
    #[serde(default)]
    pub residual_multiplier: Option<f64>,
    /// Granite: the attention scores' scale.
    #[serde(default)]
    pub attention_multiplier: Option<f64>,
    /// Granite: the logits are divided by this.
    #[serde(default)]
    pub logits_scaling: Option<f64>,
}

/// `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeScaling {
    /// `default` or `llama3`.
    #[serde(default, alias = "type")]
    pub rope_type: Option<String>,
    /// The rotary base (in `rope_parameters`).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Llama 3: the divisor of low frequencies.
    #[serde(default)]
    pub factor: Option<f64>,
    /// Llama 3.
    #[serde(default)]
    pub low_freq_factor: Option<f64>,
    /// Llama 3.
    #[serde(default)]
    pub high_freq_factor: Option<f64>,
    /// Llama 3.
    #[serde(default)]
    pub original_max_position_embeddings: Option<f64>,
}

impl FamilyConfig {
    /// The rotary embedding these settings describe (rotate-half pairing).
    pub fn rope(&self, head_dim: usize) -> Result<Rope> {
        let mut base = self.rope_theta;
        let mut scaling = None;
        for settings in [&self.rope_parameters, &self.rope_scaling]
            .into_iter()
            .flatten()
        {
            base = base.or(settings.rope_theta);
            match settings.rope_type.as_deref().unwrap_or("default") {
                "default" => {}
                "llama3" => {
                    let need = |v: Option<f64>, what: &str| match v {
                        Some(v) => Ok(v as f32),
                        None => bail!("llama3 RoPE scaling without {what}"),
                    };
                    scaling = Some(Llama3Scaling {
                        factor: need(settings.factor, "factor")?,
                        low_freq_factor: need(settings.low_freq_factor, "low_freq_factor")?,
                        high_freq_factor: need(settings.high_freq_factor, "high_freq_factor")?,
                        original_max_position_embeddings: need(
                            settings.original_max_position_embeddings,
                            "original_max_position_embeddings",
                        )?,
                    });
                }
                other => bail!("RoPE scaling {other:?} is not implemented"),
            }
        }
        let base = base.unwrap_or(10_000.0) as f32;
        Ok(Rope::new(base, head_dim, RopeStyle::Half, scaling, None))
    }
}

/// Builds the model from `tensors` laid out as HuggingFace names them, checking every shape
/// against the config and `vocab`. `window` is the attention window to honour (Mistral's), if
/// any.
pub fn from_tensors(
    config: &FamilyConfig,
    tensors: &dyn Tensors,
    vocab: usize,
    window: Option<usize>,
    as_f16: bool,
) -> Result<CpuLlama> {
    let heads = config.num_attention_heads;
    let kv_heads = config.num_key_value_heads.unwrap_or(heads);
    let head_dim = config.head_dim.unwrap_or(config.hidden_size / heads);
    let rope = config.rope(head_dim)?;
    let require = |name: &str| match tensors.tensor(name)? {
        Some(tensor) => Ok(tensor),
        None => bail!("cannot find tensor {name}"),
    };
    let shaped = |name: &str, t: &RawTensor<'_>, shape: &[usize]| -> Result<()> {
        if t.shape != shape {
            bail!("{name} has shape {:?}, the config says {shape:?}", t.shape);
        }
        Ok(())
    };
    let matrix = |name: &str, rows: usize, columns: usize| -> Result<Weight> {
        let t = require(name)?;
        shaped(name, &t, &[rows, columns])?;
        matrix_weight(t.dtype, &t.bytes, rows, columns, as_f16)
    };
    let vector = |name: &str, len: usize| -> Result<Vec<f32>> {
        let t = require(name)?;
        shaped(name, &t, &[len])?;
        floats(t.dtype, &t.bytes)
    };
    let optional = |name: &str, len: usize| -> Result<Option<Vec<f32>>> {
        match tensors.tensor(name)? {
            Some(t) => {
                shaped(name, &t, &[len])?;
                Ok(Some(floats(t.dtype, &t.bytes)?))
            }
            None => Ok(None),
        }
    };
    let linear = |name: &str, rows: usize, columns: usize| -> Result<Linear> {
        Ok(Linear {
            weight: matrix(&format!("{name}.weight"), rows, columns)?,
            bias: optional(&format!("{name}.bias"), rows)?,
        })
    };
    let (hidden, ffn, vocab) = (config.hidden_size, config.intermediate_size, vocab);
    let (q_rows, kv_rows) = (heads * head_dim, kv_heads * head_dim);
    super::huge_pages::in_arena(|| {
        let embedding = matrix("model.embed_tokens.weight", vocab, hidden)?;
        let output = match config.tie_word_embeddings {
            true => None,
            false => Some(matrix("lm_head.weight", vocab, hidden)?),
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(Layer {
                attn_norm: vector(&format!("{p}.input_layernorm.weight"), hidden)?,
                q: linear(&format!("{p}.self_attn.q_proj"), q_rows, hidden)?,
                k: linear(&format!("{p}.self_attn.k_proj"), kv_rows, hidden)?,
                v: linear(&format!("{p}.self_attn.v_proj"), kv_rows, hidden)?,
                o: linear(&format!("{p}.self_attn.o_proj"), hidden, q_rows)?,
                q_norm: optional(&format!("{p}.self_attn.q_norm.weight"), head_dim)?,
                k_norm: optional(&format!("{p}.self_attn.k_norm.weight"), head_dim)?,
                ffn_norm: vector(&format!("{p}.post_attention_layernorm.weight"), hidden)?,
                gate: linear(&format!("{p}.mlp.gate_proj"), ffn, hidden)?,
                up: linear(&format!("{p}.mlp.up_proj"), ffn, hidden)?,
                down: linear(&format!("{p}.mlp.down_proj"), hidden, ffn)?,
            });
        }
        let norm = vector("model.norm.weight", hidden)?;
        let multiplier = |value: Option<f64>| value.unwrap_or(1.0) as f32;
        let attention_scale = config
            .attention_multiplier
            .map_or(1.0 / (head_dim as f32).sqrt(), |m| m as f32);
        Ok(CpuLlama::new(Weights {
            embedding,
            layers,
            norm,
            output,
            hyper: Hyper {
                hidden: config.hidden_size,
                heads,
                kv_heads,
                head_dim,
                eps: config.rms_norm_eps as f32,
                rope,
                window,
                attention_scale,
                embedding_multiplier: multiplier(config.embedding_multiplier),
                residual_multiplier: multiplier(config.residual_multiplier),
                logits_multiplier: 1.0 / multiplier(config.logits_scaling),
            },
        }))
    })
}

/// A matrix of `dtype` as a [`Weight`]: f16 kept (in panels), f32 and bf16 kept (bf16 in
/// panels) unless `as_f16` narrows them to f16.
fn matrix_weight(
    dtype: DType,
    bytes: &[u8],
    rows: usize,
    columns: usize,
    as_f16: bool,
) -> Result<Weight> {
    if bytes.len() != rows * columns * dtype.size_in_bytes() {
        bail!("{rows}×{columns} {dtype:?} values in {} bytes", bytes.len());
    }
    match (dtype, as_f16) {
        (DType::F16, _) => Ok(Weight::from_f16(bytes, rows, columns)),
        (DType::F32, false) => Ok(Weight::from_f32_bytes(bytes, rows, columns)),
        (DType::BF16 | DType::F32, true) => {
            let halves: Vec<u8> = floats(dtype, bytes)?
                .par_iter()
                .flat_map_iter(|&v| f16::from_f32(v).to_le_bytes())
                .collect();
            Ok(Weight::from_f16(&halves, rows, columns))
        }
        (DType::BF16, false) => Ok(Weight::from_bf16(bytes, rows, columns)),
        (other, _) => bail!("{other:?} weights are not run on the CPU path"),
    }
}

/// Little-endian f32, f16 or bf16 values as f32.
fn floats(dtype: DType, bytes: &[u8]) -> Result<Vec<f32>> {
    let pairs = bytes.par_chunks_exact(2);
    Ok(match dtype {
        DType::F32 => bytes
            .par_chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        DType::F16 => pairs
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        DType::BF16 => pairs
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        other => bail!("{other:?} values are not read on the CPU path"),
    })
}
