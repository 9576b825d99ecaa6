//! llorch's own Phi-1/1.5/2 (`PhiForCausalLM`), so that it runs in f16 and bf16 as well as f32.
//!
//! candle-transformers 0.11.1 builds Phi's rotary tables in f32 whatever the weights' dtype, and
//! its rotary kernel refuses mixed dtypes, so in half precision it fails at the first request.
//! Here the tables are in the model's dtype, as in the other decoders.
//!
//! The block follows `modeling_phi.py`: one LayerNorm feeds attention and the MLP in parallel,
//! and both outputs are added to the residual. Attention rotates only the first
//! `partial_rotary_factor × head_dim` features of each head, optionally LayerNorms q and k per
//! head, and every projection (including the output head) carries a bias.

use candle_core::{Module, Result, Tensor};
use candle_nn::{embedding, layer_norm, linear, Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::decoder::{CachedAttention, Rotary};

/// The `hidden_act` values this model implements: the exact GELU and its tanh approximations.
pub const PHI_ACTIVATIONS: &[&str] = &["gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast"];

/// The subset of a HuggingFace Phi `config.json` this model reads.
#[derive(Debug, Clone, Deserialize)]
pub struct PhiConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads; defaults to the query heads.
    pub num_key_value_heads: Option<usize>,
    /// The MLP activation.
    pub hidden_act: String,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Rotary base frequency (transformers ≤ 4 writes it here).
    pub rope_theta: Option<f64>,
    /// Share of each head's features that are rotated (transformers ≤ 4 writes it here).
    pub partial_rotary_factor: Option<f64>,
    /// transformers 5's home for the two fields above.
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    /// Whether q and k get a per-head LayerNorm.
    #[serde(default)]
    pub qk_layernorm: bool,
    /// Whether the output head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
}

/// The rotary fields of transformers 5's `rope_parameters`.
#[derive(Debug, Clone, Deserialize)]
pub struct RopeParameters {
    /// Rotary base frequency.
    pub rope_theta: Option<f64>,
    /// Share of each head's features that are rotated.
    pub partial_rotary_factor: Option<f64>,
}

impl PhiConfig {
    fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    fn rope_field(
        &self,
        top: Option<f64>,
        nested: fn(&RopeParameters) -> Option<f64>,
    ) -> Option<f64> {
        top.or_else(|| self.rope_parameters.as_ref().and_then(nested))
    }

    fn rope_theta(&self) -> f64 {
        self.rope_field(self.rope_theta, |p| p.rope_theta)
            .unwrap_or(10_000.0)
    }

    /// The rotated width per head, as transformers computes it (`int(head_dim × factor)`).
    fn rotary_dim(&self) -> usize {
        let factor = self
            .rope_field(self.partial_rotary_factor, |p| p.partial_rotary_factor)
            .unwrap_or(0.5);
        (self.head_dim() as f64 * factor) as usize
    }

    /// Whether the activation is the tanh GELU (`true`) or the exact erf GELU (`false`).
    fn tanh_gelu(&self) -> Result<bool> {
        match self.hidden_act.as_str() {
            "gelu" => Ok(false),
            act if PHI_ACTIVATIONS.contains(&act) => Ok(true),
            act => candle_core::bail!("unsupported hidden_act {act:?}"),
        }
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    dense: Linear,
    qk_norms: Option<(LayerNorm, LayerNorm)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    core: CachedAttention,
}

impl Attention {
    fn new(cfg: &PhiConfig, vb: VarBuilder) -> Result<Self> {
        let head_dim = cfg.head_dim();
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_key_value_heads.unwrap_or(heads);
        let qk_norms = if cfg.qk_layernorm {
            Some((
                layer_norm(head_dim, cfg.layer_norm_eps, vb.pp("q_layernorm"))?,
                layer_norm(head_dim, cfg.layer_norm_eps, vb.pp("k_layernorm"))?,
            ))
        } else {
            None
        };
        let scale = 1.0 / (head_dim as f64).sqrt();
        Ok(Self {
            q_proj: linear(cfg.hidden_size, heads * head_dim, vb.pp("q_proj"))?,
            k_proj: linear(cfg.hidden_size, kv_heads * head_dim, vb.pp("k_proj"))?,
            v_proj: linear(cfg.hidden_size, kv_heads * head_dim, vb.pp("v_proj"))?,
            dense: linear(heads * head_dim, cfg.hidden_size, vb.pp("dense"))?,
            qk_norms,
            heads,
            kv_heads,
            head_dim,
            core: CachedAttention::new(heads, kv_heads, head_dim, scale, None),
        })
    }

    fn forward(&mut self, xs: &Tensor, pos: usize, rotary: &Rotary) -> Result<Tensor> {
        let (batch, seq_len, _) = xs.dims3()?;
        let heads_of = |t: Tensor, heads: usize| t.reshape((batch, seq_len, heads, self.head_dim));
        let mut q = heads_of(self.q_proj.forward(xs)?, self.heads)?;
        let mut k = heads_of(self.k_proj.forward(xs)?, self.kv_heads)?;
        if let Some((q_norm, k_norm)) = &self.qk_norms {
            q = q_norm.forward(&q)?;
            k = k_norm.forward(&k)?;
        }
        let v = heads_of(self.v_proj.forward(xs)?, self.kv_heads)?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k) = rotary.apply(&q.transpose(1, 2)?, &k.transpose(1, 2)?, pos)?;
        self.core.attend(&q, k, v, pos)?.apply(&self.dense)
    }
}

#[derive(Debug, Clone)]
struct Block {
    norm: LayerNorm,
    attn: Attention,
    fc1: Linear,
    fc2: Linear,
}

/// A Phi-1/1.5/2 causal LM with its own KV cache.
#[derive(Debug, Clone)]
pub struct Phi {
    embed: Embedding,
    blocks: Vec<Block>,
    final_norm: LayerNorm,
    lm_head: Linear,
    rotary: Rotary,
    tanh_gelu: bool,
}

impl Phi {
    /// Builds the model from HuggingFace-named weights (`model.layers.N...`, `lm_head`).
    pub fn new(cfg: &PhiConfig, vb: VarBuilder) -> Result<Self> {
        let model = vb.pp("model");
        let embed = embedding(cfg.vocab_size, cfg.hidden_size, model.pp("embed_tokens"))?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|index| {
                let vb = model.pp("layers").pp(index);
                Ok(Block {
                    norm: layer_norm(
                        cfg.hidden_size,
                        cfg.layer_norm_eps,
                        vb.pp("input_layernorm"),
                    )?,
                    attn: Attention::new(cfg, vb.pp("self_attn"))?,
                    fc1: linear(
                        cfg.hidden_size,
                        cfg.intermediate_size,
                        vb.pp("mlp").pp("fc1"),
                    )?,
                    fc2: linear(
                        cfg.intermediate_size,
                        cfg.hidden_size,
                        vb.pp("mlp").pp("fc2"),
                    )?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let head = vb.pp("lm_head");
        let head_weight = if cfg.tie_word_embeddings {
            embed.embeddings().clone()
        } else {
            head.get((cfg.vocab_size, cfg.hidden_size), "weight")?
        };
        let head_bias = head.get(cfg.vocab_size, "bias")?;
        Ok(Self {
            final_norm: layer_norm(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                model.pp("final_layernorm"),
            )?,
            rotary: Rotary::new(
                cfg.rotary_dim(),
                cfg.rope_theta(),
                cfg.max_position_embeddings,
                vb.dtype(),
                vb.device(),
            )?,
            tanh_gelu: cfg.tanh_gelu()?,
            embed,
            blocks,
            lm_head: Linear::new(head_weight, Some(head_bias)),
        })
    }

    /// Runs `ids` (shape `(batch, seq)`) at absolute position `pos` and returns the logits of the
    /// last position, shape `(batch, vocab)`.
    pub fn forward(&mut self, ids: &Tensor, pos: usize) -> Result<Tensor> {
        let seq_len = ids.dim(1)?;
        let mut xs = self.embed.forward(ids)?;
        for block in self.blocks.iter_mut() {
            let normed = block.norm.forward(&xs)?;
            let attn = block.attn.forward(&normed, pos, &self.rotary)?;
            let hidden = normed.apply(&block.fc1)?;
            let hidden = if self.tanh_gelu {
                hidden.gelu()?
            } else {
                hidden.gelu_erf()?
            };
            let mlp = hidden.apply(&block.fc2)?;
            xs = ((attn + mlp)? + xs)?;
        }
        let last = xs.narrow(1, seq_len - 1, 1)?.squeeze(1)?;
        self.final_norm.forward(&last)?.apply(&self.lm_head)
    }

    /// Drops every cached key and value.
    pub fn clear_kv_cache(&mut self) {
        for block in self.blocks.iter_mut() {
            block.attn.core.clear();
        }
    }
}
