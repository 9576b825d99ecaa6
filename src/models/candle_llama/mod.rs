//! The batched Llama-family decoder on any candle device (CUDA above all): the same
//! architectures as llorch's CPU decoder (Llama with Llama 3 RoPE scaling, Mistral's exact
//! window, Qwen2's biases, Qwen3's q/k norms, Granite's multipliers), from HuggingFace
//! safetensors, with candle's tensor ops and a paged KV cache of device tensors.
//!
//! One step runs every token of every sequence through the same matrix products; attention
//! gathers each sequence's cached keys and values through its block table into a padded
//! batch (`attention`). Results are not bit-identical across batch compositions (the GPU's
//! matrix products pick their tiling by shape), as BATCHING.md says of every GPU stack.

mod attention;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::batch::{check_step, BatchedModel, KvDtype, KvLayout, SeqChunk, Solo};
use super::cpu::llama_hf::FamilyConfig;
use super::error::GenerationError;
use attention::{KvPool, StepIndex};

/// One transformer block's weights.
struct Layer {
    attn_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<Tensor>,
    k_norm: Option<Tensor>,
    ffn_norm: Tensor,
    /// The gate and up projections in one matrix (`2 × ffn` rows).
    gate_up: Linear,
    ffn: usize,
    down: Linear,
}

/// Shapes and constants.
struct Hyper {
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f32,
    window: Option<usize>,
    attention_scale: f64,
    embedding_multiplier: f64,
    residual_multiplier: f64,
    logits_multiplier: f64,
}

/// A Llama-family model of candle tensors with a paged KV cache on its device.
pub struct CandleLlama {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Tensor,
    hyper: Hyper,
    /// Rotary cosines and sines, `positions × head_dim / 2`, in the compute dtype.
    cos: Tensor,
    sin: Tensor,
    device: Device,
    dtype: DType,
    vocab: usize,
    pool: Option<KvPool>,
    /// The single-sequence path's pool and its sequence.
    solo_pool: Option<KvPool>,
    solo: Solo,
}

impl CandleLlama {
    /// Builds the model from HuggingFace-named weights. `window` is Mistral's attention window,
    /// `max_positions` the longest context the rotary tables cover.
    pub fn new(
        config: &FamilyConfig,
        vb: VarBuilder,
        vocab: usize,
        window: Option<usize>,
        max_positions: usize,
    ) -> candle_core::Result<CandleLlama> {
        let heads = config.num_attention_heads;
        let kv_heads = config.num_key_value_heads.unwrap_or(heads);
        let head_dim = config.head_dim.unwrap_or(config.hidden_size / heads);
        let hidden = config.hidden_size;
        let (device, dtype) = (vb.device().clone(), vb.dtype());
        let model = vb.pp("model");
        let embed = model.get((vocab, hidden), "embed_tokens.weight")?;
        let linear = |vb: VarBuilder, out: usize, inp: usize| -> candle_core::Result<Linear> {
            let weight = vb.get((out, inp), "weight")?;
            let bias = match vb.contains_tensor("bias") {
                true => Some(vb.get(out, "bias")?),
                false => None,
            };
            Ok(Linear::new(weight, bias))
        };
        let optional = |vb: &VarBuilder, name: &str| match vb.contains_tensor(name) {
            true => vb.get(head_dim, name).map(Some),
            false => Ok(None),
        };
        let ffn = config.intermediate_size;
        let layers = (0..config.num_hidden_layers)
            .map(|i| {
                let vb = model.pp("layers").pp(i);
                let attn = vb.pp("self_attn");
                let mlp = vb.pp("mlp");
                Ok(Layer {
                    attn_norm: vb.get(hidden, "input_layernorm.weight")?,
                    q: linear(attn.pp("q_proj"), heads * head_dim, hidden)?,
                    k: linear(attn.pp("k_proj"), kv_heads * head_dim, hidden)?,
                    v: linear(attn.pp("v_proj"), kv_heads * head_dim, hidden)?,
                    o: linear(attn.pp("o_proj"), hidden, heads * head_dim)?,
                    q_norm: optional(&attn, "q_norm.weight")?,
                    k_norm: optional(&attn, "k_norm.weight")?,
                    ffn_norm: vb.get(hidden, "post_attention_layernorm.weight")?,
                    gate_up: fused(
                        linear(mlp.pp("gate_proj"), ffn, hidden)?,
                        linear(mlp.pp("up_proj"), ffn, hidden)?,
                    )?,
                    ffn,
                    down: linear(mlp.pp("down_proj"), hidden, ffn)?,
                })
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let lm_head = match config.tie_word_embeddings {
            true => embed.clone(),
            false => vb.get((vocab, hidden), "lm_head.weight")?,
        };
        let rope = config.rope(head_dim)?;
        let pairs = rope.inverse_frequencies.len();
        let (mut cos, mut sin) = (
            vec![0f32; max_positions * pairs],
            vec![0f32; max_positions * pairs],
        );
        for p in 0..max_positions {
            for (i, f) in rope.inverse_frequencies.iter().enumerate() {
                (sin[p * pairs + i], cos[p * pairs + i]) = (p as f32 * f).sin_cos();
            }
        }
        let table = |values: Vec<f32>| {
            Tensor::from_vec(values, (max_positions, pairs), &device)?.to_dtype(dtype)
        };
        let multiplier = |value: Option<f64>| value.unwrap_or(1.0);
        Ok(CandleLlama {
            norm: model.get(hidden, "norm.weight")?,
            embed,
            layers,
            lm_head,
            hyper: Hyper {
                heads,
                kv_heads,
                head_dim,
                eps: config.rms_norm_eps as f32,
                window,
                attention_scale: config
                    .attention_multiplier
                    .unwrap_or(1.0 / (head_dim as f64).sqrt()),
                embedding_multiplier: multiplier(config.embedding_multiplier),
                residual_multiplier: multiplier(config.residual_multiplier),
                logits_multiplier: 1.0 / multiplier(config.logits_scaling),
            },
            cos: table(cos)?,
            sin: table(sin)?,
            device,
            dtype,
            vocab,
            pool: None,
            solo_pool: None,
            solo: Solo::default(),
        })
    }

    /// Empties the single-sequence path's cache.
    pub fn clear_kv_cache(&mut self) {
        self.solo.clear();
    }

    /// Runs `ids` as the continuation of the single-sequence path's one sequence, at
    /// `position` (its cached length), and returns the logits of the last.
    pub fn forward(&mut self, ids: &[u32], position: usize) -> Result<Vec<f32>, GenerationError> {
        let layout = self.solo.layout(position, ids.len())?;
        let have = self.solo_pool.as_ref().map_or(0, |p| p.layout().blocks);
        if have < layout.blocks {
            let mut grown = self.new_pool(layout)?;
            if let Some(old) = &self.solo_pool {
                grown.copy_from(old)?;
            }
            self.solo_pool = Some(grown);
        }
        let mut pool = self.solo_pool.take();
        let result = match &mut pool {
            Some(pool) => self.step(&[self.solo.chunk(ids)], pool),
            None => Err(GenerationError::Forward("no cache".to_string())),
        };
        self.solo_pool = pool;
        let mut logits = result?;
        self.solo.advance(ids.len());
        logits
            .pop()
            .ok_or_else(|| GenerationError::Forward("no logits".to_string()))
    }

    /// Whether the cache can store `dtype`: only the compute dtype (or `Auto`).
    fn check_kv_dtype(&self, dtype: KvDtype) -> Result<(), String> {
        let stored = match dtype {
            KvDtype::Auto => self.dtype,
            KvDtype::F32 => DType::F32,
            KvDtype::F16 => DType::F16,
        };
        match stored == self.dtype {
            true => Ok(()),
            false => Err(format!(
                "kv_cache_dtype \"{}\" needs the model's dtype to be the same on this device \
                 (its cache stores the compute dtype, here {:?}); use \"auto\"",
                dtype.name(),
                self.dtype
            )),
        }
    }

    fn new_pool(&self, layout: KvLayout) -> candle_core::Result<KvPool> {
        let h = &self.hyper;
        KvPool::new(
            self.layers.len(),
            h.kv_heads,
            h.head_dim,
            layout,
            self.dtype,
            &self.device,
        )
    }

    fn step(
        &self,
        seqs: &[SeqChunk<'_>],
        pool: &mut KvPool,
    ) -> Result<Vec<Vec<f32>>, GenerationError> {
        check_step(seqs, pool.layout(), self.vocab)?;
        Ok(self.forward_rows(seqs, pool)?)
    }

    fn forward_rows(
        &self,
        seqs: &[SeqChunk<'_>],
        pool: &mut KvPool,
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        let h = &self.hyper;
        let shape = (h.kv_heads, h.head_dim);
        let scores = match self.dtype {
            DType::F16 => DType::F32,
            other => other,
        };
        let index = StepIndex::new(seqs, pool.layout(), h.window, shape, scores, &self.device)?;
        let n = index.tokens();
        let mut x = self.embed.index_select(&index.ids, 0)?;
        if h.embedding_multiplier != 1.0 {
            x = (x * h.embedding_multiplier)?;
        }
        let cos = self.cos.index_select(&index.positions, 0)?;
        let sin = self.sin.index_select(&index.positions, 0)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let normed = candle_nn::ops::rms_norm(&x, &layer.attn_norm, h.eps)?;
            let heads = |t: Tensor, count: usize, norm: &Option<Tensor>| {
                let t = t.reshape((1, n, count, h.head_dim))?;
                let t = match norm {
                    Some(weight) => candle_nn::ops::rms_norm(&t, weight, h.eps)?,
                    None => t,
                };
                candle_nn::rotary_emb::rope_thd(&t.contiguous()?, &cos, &sin)
            };
            let q = heads(layer.q.forward(&normed)?, h.heads, &layer.q_norm)?;
            let k = heads(layer.k.forward(&normed)?, h.kv_heads, &layer.k_norm)?;
            let v = layer.v.forward(&normed)?;
            pool.write(i, &index, &k, &v)?;
            let attended = attention::attend(pool, i, &index, &q, h.attention_scale)?;
            let out = layer.o.forward(&attended)?;
            x = (x + scaled(out, h.residual_multiplier)?)?;
            let normed = candle_nn::ops::rms_norm(&x, &layer.ffn_norm, h.eps)?;
            let gate_up = layer.gate_up.forward(&normed)?;
            let gate = candle_nn::ops::silu(&gate_up.narrow(1, 0, layer.ffn)?)?;
            let up = gate_up.narrow(1, layer.ffn, layer.ffn)?;
            let mlp = layer.down.forward(&(gate * up)?)?;
            x = (x + scaled(mlp, h.residual_multiplier)?)?;
        }
        let Some(last) = &index.logit_rows else {
            return Ok(Vec::new());
        };
        let last = x.index_select(last, 0)?;
        let normed = candle_nn::ops::rms_norm(&last, &self.norm, h.eps)?;
        let logits = scaled(normed.matmul(&self.lm_head.t()?)?, h.logits_multiplier)?;
        logits.to_dtype(DType::F32)?.to_vec2::<f32>()
    }
}

/// Two projections of the same input as one matrix: one product instead of two.
fn fused(a: Linear, b: Linear) -> candle_core::Result<Linear> {
    let weight = Tensor::cat(&[a.weight(), b.weight()], 0)?;
    let bias = match (a.bias(), b.bias()) {
        (None, None) => None,
        (a_bias, b_bias) => {
            let zeros = |w: &Tensor| Tensor::zeros(w.dim(0)?, w.dtype(), w.device());
            let a_bias = a_bias.cloned().map_or_else(|| zeros(a.weight()), Ok)?;
            let b_bias = b_bias.cloned().map_or_else(|| zeros(b.weight()), Ok)?;
            Some(Tensor::cat(&[&a_bias, &b_bias], 0)?)
        }
    };
    Ok(Linear::new(weight, bias))
}

fn scaled(t: Tensor, multiplier: f64) -> candle_core::Result<Tensor> {
    match multiplier == 1.0 {
        true => Ok(t),
        false => t * multiplier,
    }
}

impl BatchedModel for CandleLlama {
    /// The cache stores the model's compute dtype; `dtype` must be that or `Auto`.
    fn kv_bytes_per_token(&self, dtype: KvDtype) -> Result<usize, String> {
        self.check_kv_dtype(dtype)?;
        let h = &self.hyper;
        Ok(2 * self.layers.len() * h.kv_heads * h.head_dim * self.dtype.size_in_bytes())
    }

    fn init_kv(&mut self, layout: KvLayout, dtype: KvDtype) -> Result<(), GenerationError> {
        self.check_kv_dtype(dtype)
            .map_err(GenerationError::Forward)?;
        self.pool = None;
        self.pool = Some(self.new_pool(layout)?);
        Ok(())
    }

    fn kv_layout(&self) -> Option<KvLayout> {
        self.pool.as_ref().map(KvPool::layout)
    }

    fn forward_batch(&mut self, seqs: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, GenerationError> {
        let mut pool = self.pool.take().ok_or_else(|| {
            GenerationError::Forward("the KV cache was not initialised".to_string())
        })?;
        let result = self.step(seqs, &mut pool);
        self.pool = Some(pool);
        result
    }
}
