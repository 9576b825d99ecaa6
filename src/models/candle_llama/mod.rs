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
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod graphs;
pub mod ops;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, VarBuilder};

use super::batch::{
    check_step, chosen_rows, BatchedModel, Choice, KvDtype, KvLayout, Row, SeqChunk, Solo,
};
use super::cpu::llama_hf::FamilyConfig;
use super::error::GenerationError;
use super::sampling::argmax;
use attention::{KvPool, StepIndex};
use ops::{scaled, Ops};

/// One transformer block's weights.
struct Layer {
    attn_norm: Tensor,
    /// The q, k and v projections in one matrix (`(heads + 2 kv heads) × head dim` rows).
    qkv: Linear,
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
    ops: Ops,
    vocab: usize,
    pool: Option<KvPool>,
    /// Captured decode steps of the batched path (CUDA only).
    #[cfg(feature = "cuda")]
    graphs: Option<graphs::DecodeGraphs>,
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
                    qkv: fused(&[
                        linear(attn.pp("q_proj"), heads * head_dim, hidden)?,
                        linear(attn.pp("k_proj"), kv_heads * head_dim, hidden)?,
                        linear(attn.pp("v_proj"), kv_heads * head_dim, hidden)?,
                    ])?,
                    o: linear(attn.pp("o_proj"), hidden, heads * head_dim)?,
                    q_norm: optional(&attn, "q_norm.weight")?,
                    k_norm: optional(&attn, "k_norm.weight")?,
                    ffn_norm: vb.get(hidden, "post_attention_layernorm.weight")?,
                    gate_up: fused(&[
                        linear(mlp.pp("gate_proj"), ffn, hidden)?,
                        linear(mlp.pp("up_proj"), ffn, hidden)?,
                    ])?,
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
        let built = CandleLlama {
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
            ops: Ops::for_device(&device, dtype, head_dim)?,
            #[cfg(feature = "cuda")]
            graphs: None,
            device,
            dtype,
            vocab,
            pool: None,
            solo_pool: None,
            solo: Solo::default(),
        };
        #[cfg(feature = "cuda")]
        let built = {
            let mut built = built;
            built.set_graphs(true);
            built
        };
        Ok(built)
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
        let rows = match &self.solo_pool {
            Some(pool) => self.step(&[self.solo.chunk(ids)], pool, &[&Choice::Logits])?,
            None => return Err(GenerationError::Forward("no cache".to_string())),
        };
        self.solo.advance(ids.len());
        match rows.into_iter().last() {
            Some(Row::Logits(logits)) => Ok(logits),
            _ => Err(GenerationError::Forward("no logits".to_string())),
        }
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

    /// Runs a step eagerly; `chosen`: how each of its rows comes back.
    fn step(
        &self,
        seqs: &[SeqChunk<'_>],
        pool: &KvPool,
        chosen: &[&Choice],
    ) -> Result<Vec<Row>, GenerationError> {
        check_step(seqs, pool.layout(), self.vocab)?;
        let scores = match self.dtype {
            DType::F16 => DType::F32,
            other => other,
        };
        let index = StepIndex::new(
            seqs,
            pool.layout(),
            self.hyper.window,
            scores,
            self.ops.paged(),
            &self.device,
        )?;
        Ok(match self.logits(&index, pool)? {
            Some(logits) => self.rows(&logits.to_dtype(DType::F32)?, chosen)?,
            None => Vec::new(),
        })
    }

    /// A step's f32 `logits` as rows for the host, as `chosen` asks for each: with the fused
    /// kernels the tokens of greedy rows and draws are chosen on the device (a step of such
    /// rows only copies back their ids), the logits of the others come back; with candle's
    /// ops the host takes greedy rows' argmax and draws come back as logits.
    fn rows(&self, logits: &Tensor, chosen: &[&Choice]) -> candle_core::Result<Vec<Row>> {
        let on_device = match chosen.iter().any(|c| !matches!(c, Choice::Logits)) {
            true => self.ops.choose(logits, chosen)?,
            false => None,
        };
        let copied = on_device.is_none() || chosen.iter().any(|c| matches!(c, Choice::Logits));
        let mut all = match copied {
            true => Some(logits.to_vec2::<f32>()?.into_iter()),
            false => None,
        };
        chosen
            .iter()
            .enumerate()
            .map(|(r, choice)| {
                let row = all.as_mut().and_then(Iterator::next);
                let picked = on_device.as_ref().map(|p| p[r]);
                Ok(match (choice, picked, row) {
                    (Choice::Greedy, Some((token, _)), _) => Row::Greedy(token),
                    (Choice::Draw(_), Some((token, used_fraction)), _) => Row::Drawn {
                        token,
                        used_fraction,
                    },
                    (Choice::Greedy, None, Some(row)) => Row::Greedy(argmax(&row)),
                    (_, _, Some(row)) => Row::Logits(row),
                    (_, _, None) => candle_core::bail!("a row's logits were not copied"),
                })
            })
            .collect()
    }

    /// Runs the step that `index` describes: writes its keys and values into `pool` and
    /// returns the logits of its logit rows (`None` when it has none), in the compute dtype.
    fn logits(&self, index: &StepIndex, pool: &KvPool) -> candle_core::Result<Option<Tensor>> {
        let h = &self.hyper;
        let mut x = self.embed.index_select(&index.ids, 0)?;
        if h.embedding_multiplier != 1.0 {
            x = (x * h.embedding_multiplier)?;
        }
        let shape = (h.heads, h.kv_heads, h.head_dim);
        let mut delta: Option<Tensor> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let add_norm = |x: &Tensor, delta: Option<&Tensor>, weight: &Tensor| {
                self.ops
                    .add_rms_norm(x, delta, weight, h.eps, h.residual_multiplier)
            };
            let (residual, normed) = add_norm(&x, delta.as_ref(), &layer.attn_norm)?;
            let q = self.ops.rope_kv_write(
                &self.ops.linear(&normed, &layer.qkv)?,
                shape,
                (&index.positions, &index.slots),
                (&self.cos, &self.sin),
                (layer.q_norm.as_ref(), layer.k_norm.as_ref()),
                pool.caches(i),
                h.eps,
            )?;
            let attended =
                attention::attend(pool, i, index, &q, shape, h.attention_scale, &self.ops)?;
            let out = self.ops.linear(&attended, &layer.o)?;
            let (residual, normed) = add_norm(&residual, Some(&out), &layer.ffn_norm)?;
            let gate_up = self.ops.linear(&normed, &layer.gate_up)?;
            let activated = self.ops.silu_mul(&gate_up, layer.ffn)?;
            delta = Some(self.ops.linear(&activated, &layer.down)?);
            x = residual;
        }
        let Some(last) = &index.logit_rows else {
            return Ok(None);
        };
        let (x, delta) = match delta {
            Some(delta) => (x.index_select(last, 0)?, Some(delta.index_select(last, 0)?)),
            None => (x.index_select(last, 0)?, None),
        };
        let (_, normed) =
            self.ops
                .add_rms_norm(&x, delta.as_ref(), &self.norm, h.eps, h.residual_multiplier)?;
        scaled(
            self.ops.project(&normed, &self.lm_head)?,
            h.logits_multiplier,
        )
        .map(Some)
    }
}

/// Projections of the same input as one matrix (their rows stacked): one product instead of
/// several. A projection without a bias gets zeros where another has one.
fn fused(parts: &[Linear]) -> candle_core::Result<Linear> {
    let weights: Vec<&Tensor> = parts.iter().map(Linear::weight).collect();
    let weight = Tensor::cat(&weights, 0)?;
    let bias = match parts.iter().any(|p| p.bias().is_some()) {
        false => None,
        true => {
            let biases = parts
                .iter()
                .map(|p| match p.bias() {
                    Some(bias) => Ok(bias.clone()),
                    None => {
                        Tensor::zeros(p.weight().dim(0)?, p.weight().dtype(), p.weight().device())
                    }
                })
                .collect::<candle_core::Result<Vec<_>>>()?;
            Some(Tensor::cat(&biases, 0)?)
        }
    };
    Ok(Linear::new(weight, bias))
}

impl CandleLlama {
    /// Turns the CUDA graphs of decode steps on or off (on by default unless
    /// `LLORCH_CUDA_GRAPHS=off`; graphs need a CUDA device and the fused kernels).
    #[cfg(feature = "cuda")]
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = match on && self.ops.paged() {
            true => graphs::DecodeGraphs::for_device(&self.device, self.cos.dims()[0]),
            false => None,
        };
    }

    /// How many batched steps ran as replays of a CUDA graph.
    #[cfg(feature = "cuda")]
    pub fn graph_replays(&self) -> usize {
        self.graphs
            .as_ref()
            .map_or(0, graphs::DecodeGraphs::replays)
    }

    /// The batched path's pool.
    fn pool(&self) -> Result<&KvPool, GenerationError> {
        self.pool
            .as_ref()
            .ok_or_else(|| GenerationError::Forward("the KV cache was not initialised".to_string()))
    }

    /// The step through a captured graph when `graphs` can run it (`None`: run it eagerly);
    /// `chosen` as in [`CandleLlama::rows`].
    #[cfg(feature = "cuda")]
    fn replay(
        &self,
        graphs: &mut graphs::DecodeGraphs,
        seqs: &[SeqChunk<'_>],
        chosen: &[&Choice],
    ) -> Result<Option<Vec<Row>>, GenerationError> {
        let pool = self.pool()?;
        check_step(seqs, pool.layout(), self.vocab)?;
        match graphs.run(self, seqs, pool)? {
            Some(logits) => Ok(Some(self.rows(&logits, chosen)?)),
            None => Ok(None),
        }
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
        let rows = self.forward_choosing(seqs, &vec![Choice::Logits; seqs.len()])?;
        Ok(rows.into_iter().filter_map(Row::into_logits).collect())
    }

    fn draws(&self) -> bool {
        self.ops.draws(self.vocab)
    }

    fn forward_choosing(
        &mut self,
        seqs: &[SeqChunk<'_>],
        choices: &[Choice],
    ) -> Result<Vec<Row>, GenerationError> {
        let chosen = chosen_rows(seqs, choices);
        #[cfg(feature = "cuda")]
        if let Some(mut graphs) = self.graphs.take() {
            let replayed = self.replay(&mut graphs, seqs, &chosen);
            self.graphs = Some(graphs);
            if let Some(rows) = replayed? {
                return Ok(rows);
            }
        }
        self.step(seqs, self.pool()?, &chosen)
    }
}
