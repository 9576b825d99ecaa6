//! llorch's own Llama-family decoder, used where candle-transformers does not match the
//! reference implementation exactly.
//!
//! - Mistral: candle 0.11.1 masks one token too many in prefill and applies no sliding window at
//!   all during single-token decode. Here query position `i` sees keys `j` with
//!   `i - sliding_window < j <= i`, in prefill and in decode, as HuggingFace transformers does
//!   (`MistralAttention`, `sliding_window` in `modeling_mistral.py`).
//! - Granite: candle 0.11.1 ignores `embedding_multiplier`, `residual_multiplier`,
//!   `attention_multiplier` and `logits_scaling`; here all four are applied where
//!   `modeling_granite.py` applies them.
//!
//! The block is the usual pre-norm decoder: RMSNorm, rotary (rotate-half) attention with grouped
//! KV heads and a KV cache, RMSNorm, SwiGLU MLP.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{embedding, linear_b, rms_norm, Embedding, Linear, RmsNorm, VarBuilder};
use serde::Deserialize;

/// The subset of a HuggingFace Llama/Mistral/Granite `config.json` this decoder reads.
#[derive(Debug, Clone, Deserialize)]
pub struct DecoderConfig {
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
    /// Number of key/value heads (grouped-query attention); defaults to the query heads.
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rotary base frequency.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output head shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Mistral's attention window (`None`: full causal attention).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    /// Whether q/k/v/o projections carry biases.
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether the MLP projections carry biases.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Granite: scale applied to the token embeddings.
    #[serde(default = "one")]
    pub embedding_multiplier: f64,
    /// Granite: scale applied to each sub-layer output before the residual add.
    #[serde(default = "one")]
    pub residual_multiplier: f64,
    /// Granite: the attention score scale (replaces `1/sqrt(head_dim)`).
    #[serde(default)]
    pub attention_multiplier: Option<f64>,
    /// Granite: logits are divided by this.
    #[serde(default = "one")]
    pub logits_scaling: f64,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn one() -> f64 {
    1.0
}

impl DecoderConfig {
    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads)
    }

    fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }
}

/// Rotary position tables (rotate-half convention) in the model's dtype.
#[derive(Debug, Clone)]
pub(super) struct Rotary {
    cos: Tensor,
    sin: Tensor,
    dim: usize,
}

impl Rotary {
    /// Tables for the first `dim` features of each head, base `theta`, up to `max_positions`.
    pub(super) fn new(
        dim: usize,
        theta: f64,
        max_positions: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1f32 / (theta as f32).powf(i as f32 / dim as f32))
            .collect();
        let inv_freq = Tensor::from_vec(inv_freq, (1, dim / 2), device)?;
        let positions = Tensor::arange(0u32, max_positions as u32, device)?
            .to_dtype(DType::F32)?
            .reshape((max_positions, 1))?;
        let freqs = positions.matmul(&inv_freq)?;
        Ok(Self {
            cos: freqs.cos()?.to_dtype(dtype)?,
            sin: freqs.sin()?.to_dtype(dtype)?,
            dim,
        })
    }

    /// Rotates `q` and `k` (shape `(batch, heads, seq, head_dim)`) at absolute position `pos`;
    /// features past the table's `dim` pass through unchanged (partial rotary).
    pub(super) fn apply(&self, q: &Tensor, k: &Tensor, pos: usize) -> Result<(Tensor, Tensor)> {
        let seq_len = q.dim(2)?;
        let cos = self.cos.narrow(0, pos, seq_len)?;
        let sin = self.sin.narrow(0, pos, seq_len)?;
        let rotate = |t: &Tensor| -> Result<Tensor> {
            let head_dim = t.dim(3)?;
            if head_dim == self.dim {
                return candle_nn::rotary_emb::rope(&t.contiguous()?, &cos, &sin);
            }
            let rotated =
                candle_nn::rotary_emb::rope(&t.narrow(3, 0, self.dim)?.contiguous()?, &cos, &sin)?;
            let rest = t.narrow(3, self.dim, head_dim - self.dim)?;
            Tensor::cat(&[&rotated, &rest], 3)
        };
        Ok((rotate(q)?, rotate(k)?))
    }
}

/// Scaled dot-product attention over a growing KV cache, with grouped KV heads, a causal
/// (optionally sliding-window) mask and the softmax in f32.
#[derive(Debug, Clone)]
pub(super) struct CachedAttention {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    window: Option<usize>,
    kv_cache: Option<(Tensor, Tensor)>,
}

impl CachedAttention {
    /// An empty cache for `heads` query heads over `kv_heads` key/value heads.
    pub(super) fn new(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f64,
        window: Option<usize>,
    ) -> Self {
        Self {
            heads,
            kv_heads,
            head_dim,
            scale,
            window,
            kv_cache: None,
        }
    }

    /// Appends `k`/`v` (shape `(batch, kv_heads, seq, head_dim)`) to the cache, attends `q`
    /// (queries at absolute positions `pos..`) over everything cached, and returns the heads
    /// concatenated, shape `(batch, seq, heads * head_dim)`.
    pub(super) fn attend(
        &mut self,
        q: &Tensor,
        k: Tensor,
        v: Tensor,
        pos: usize,
    ) -> Result<Tensor> {
        let (batch, _, seq_len, _) = q.dims4()?;
        let (k, v) = match &self.kv_cache {
            Some((past_k, past_v)) => (
                Tensor::cat(&[past_k, &k], 2)?,
                Tensor::cat(&[past_v, &v], 2)?,
            ),
            None => (k, v),
        };
        self.kv_cache = Some((k.clone(), v.clone()));
        let n_rep = self.heads / self.kv_heads;
        let k = candle_transformers::utils::repeat_kv(k, n_rep)?.contiguous()?;
        let v = candle_transformers::utils::repeat_kv(v, n_rep)?.contiguous()?;
        let scores = (q.contiguous()?.matmul(&k.t()?)? * self.scale)?.to_dtype(DType::F32)?;
        let kv_len = k.dim(2)?;
        let scores = match attention_mask(seq_len, kv_len, pos, self.window, q.device())? {
            Some(mask) => scores.broadcast_add(&mask)?,
            None => scores,
        };
        let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, seq_len, self.heads * self.head_dim))
    }

    /// Drops every cached key and value.
    pub(super) fn clear(&mut self) {
        self.kv_cache = None;
    }
}

#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    core: CachedAttention,
}

impl Attention {
    fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let head_dim = cfg.head_dim();
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.kv_heads());
        let bias = cfg.attention_bias;
        let scale = cfg
            .attention_multiplier
            .unwrap_or(1.0 / (head_dim as f64).sqrt());
        Ok(Self {
            q_proj: linear_b(cfg.hidden_size, heads * head_dim, bias, vb.pp("q_proj"))?,
            k_proj: linear_b(cfg.hidden_size, kv_heads * head_dim, bias, vb.pp("k_proj"))?,
            v_proj: linear_b(cfg.hidden_size, kv_heads * head_dim, bias, vb.pp("v_proj"))?,
            o_proj: linear_b(heads * head_dim, cfg.hidden_size, bias, vb.pp("o_proj"))?,
            heads,
            kv_heads,
            head_dim,
            core: CachedAttention::new(heads, kv_heads, head_dim, scale, cfg.sliding_window),
        })
    }

    fn forward(&mut self, xs: &Tensor, pos: usize, rotary: &Rotary) -> Result<Tensor> {
        let (batch, seq_len, _) = xs.dims3()?;
        let split = |t: Tensor, heads: usize| {
            t.reshape((batch, seq_len, heads, self.head_dim))?
                .transpose(1, 2)
        };
        let q = split(self.q_proj.forward(xs)?, self.heads)?;
        let k = split(self.k_proj.forward(xs)?, self.kv_heads)?;
        let v = split(self.v_proj.forward(xs)?, self.kv_heads)?.contiguous()?;
        let (q, k) = rotary.apply(&q, &k, pos)?;
        self.core.attend(&q, k, v, pos)?.apply(&self.o_proj)
    }
}

/// Builds the additive mask for `seq_len` queries starting at absolute position `pos` over
/// `kv_len` keys, or `None` when every key is visible to every query.
fn attention_mask(
    seq_len: usize,
    kv_len: usize,
    pos: usize,
    window: Option<usize>,
    device: &Device,
) -> Result<Option<Tensor>> {
    let visible = |i: usize, j: usize| {
        let query = pos + i;
        j <= query && window.is_none_or(|w| query - j < w)
    };
    let all_visible = (0..seq_len).all(|i| (0..kv_len).all(|j| visible(i, j)));
    if all_visible {
        return Ok(None);
    }
    let mask: Vec<f32> = (0..seq_len)
        .flat_map(|i| (0..kv_len).map(move |j| (i, j)))
        .map(|(i, j)| {
            if visible(i, j) {
                0.0
            } else {
                f32::NEG_INFINITY
            }
        })
        .collect();
    Tensor::from_vec(mask, (1, 1, seq_len, kv_len), device).map(Some)
}

#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: linear_b(h, i, b, vb.pp("gate_proj"))?,
            up_proj: linear_b(h, i, b, vb.pp("up_proj"))?,
            down_proj: linear_b(i, h, b, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate_proj.forward(xs)?)?;
        (gate * self.up_proj.forward(xs)?)?.apply(&self.down_proj)
    }
}

#[derive(Debug, Clone)]
struct Block {
    input_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    mlp: Mlp,
}

/// A Llama-family causal LM with its own KV cache.
#[derive(Debug, Clone)]
pub struct Decoder {
    embed: Embedding,
    blocks: Vec<Block>,
    norm: RmsNorm,
    lm_head: Linear,
    rotary: Rotary,
    embedding_multiplier: f64,
    residual_multiplier: f64,
    logits_scaling: f64,
}

impl Decoder {
    /// Builds the decoder from HuggingFace-named weights (`model.layers.N...`, `lm_head`).
    pub fn new(cfg: &DecoderConfig, vb: VarBuilder) -> Result<Self> {
        let model = vb.pp("model");
        let embed = embedding(cfg.vocab_size, cfg.hidden_size, model.pp("embed_tokens"))?;
        let blocks = (0..cfg.num_hidden_layers)
            .map(|index| {
                let vb = model.pp("layers").pp(index);
                Ok(Block {
                    input_norm: rms_norm(
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                        vb.pp("input_layernorm"),
                    )?,
                    attn: Attention::new(cfg, vb.pp("self_attn"))?,
                    post_attn_norm: rms_norm(
                        cfg.hidden_size,
                        cfg.rms_norm_eps,
                        vb.pp("post_attention_layernorm"),
                    )?,
                    mlp: Mlp::new(cfg, vb.pp("mlp"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear::new(embed.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        Ok(Self {
            norm: rms_norm(cfg.hidden_size, cfg.rms_norm_eps, model.pp("norm"))?,
            rotary: Rotary::new(
                cfg.head_dim(),
                cfg.rope_theta,
                cfg.max_position_embeddings,
                vb.dtype(),
                vb.device(),
            )?,
            embed,
            blocks,
            lm_head,
            embedding_multiplier: cfg.embedding_multiplier,
            residual_multiplier: cfg.residual_multiplier,
            logits_scaling: cfg.logits_scaling,
        })
    }

    /// Runs `ids` (shape `(batch, seq)`) at absolute position `pos` and returns the logits of the
    /// last position, shape `(batch, vocab)`.
    pub fn forward(&mut self, ids: &Tensor, pos: usize) -> Result<Tensor> {
        let seq_len = ids.dim(1)?;
        let mut xs = (self.embed.forward(ids)? * self.embedding_multiplier)?;
        for block in self.blocks.iter_mut() {
            let attn = block
                .attn
                .forward(&block.input_norm.forward(&xs)?, pos, &self.rotary)?;
            xs = (xs + (attn * self.residual_multiplier)?)?;
            let mlp = block.mlp.forward(&block.post_attn_norm.forward(&xs)?)?;
            xs = (xs + (mlp * self.residual_multiplier)?)?;
        }
        let last = xs.narrow(1, seq_len - 1, 1)?.squeeze(1)?;
        self.norm.forward(&last)?.apply(&self.lm_head)? / self.logits_scaling
    }

    /// Drops every cached key and value.
    pub fn clear_kv_cache(&mut self) {
        for block in self.blocks.iter_mut() {
            block.attn.core.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask_rows(
        seq_len: usize,
        kv_len: usize,
        pos: usize,
        window: Option<usize>,
    ) -> Vec<Vec<bool>> {
        match attention_mask(seq_len, kv_len, pos, window, &Device::Cpu).unwrap() {
            None => vec![vec![true; kv_len]; seq_len],
            Some(mask) => mask
                .squeeze(0)
                .unwrap()
                .squeeze(0)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
                .into_iter()
                .map(|row| row.into_iter().map(|v| v == 0.0).collect())
                .collect(),
        }
    }

    #[test]
    fn causal_prefill_hides_the_future() {
        let rows = mask_rows(3, 3, 0, None);
        assert_eq!(rows[0], vec![true, false, false]);
        assert_eq!(rows[2], vec![true, true, true]);
    }

    #[test]
    fn sliding_window_keeps_exactly_window_keys_in_prefill() {
        let rows = mask_rows(5, 5, 0, Some(2));
        assert_eq!(rows[4], vec![false, false, false, true, true]);
        assert_eq!(rows[1], vec![true, true, false, false, false]);
    }

    #[test]
    fn sliding_window_applies_during_decode() {
        let rows = mask_rows(1, 6, 5, Some(3));
        assert_eq!(rows[0], vec![false, false, false, true, true, true]);
        assert!(attention_mask(1, 6, 5, None, &Device::Cpu)
            .unwrap()
            .is_none());
    }
}
