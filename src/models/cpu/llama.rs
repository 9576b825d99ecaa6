//! llorch's own Llama-family decoder on the CPU (Llama, Mistral, Qwen2, Qwen3, Granite):
//! weights stay in their stored types and are multiplied by [`Weight`], activations are plain
//! f32 buffers, and keys and values live in a paged [`KvPool`].
//!
//! One forward pass runs a batch of sequences ([`SeqChunk`]): every token of every sequence is
//! a row of the same matrix products, so each weight matrix is read once per step, and each
//! row attends over its own sequence's positions through that sequence's block table. Every
//! kernel computes a row alone, in an order that depends only on that row, so a sequence's
//! logits are the same bits whatever else is in its batch.

use rayon::prelude::*;

use super::attention::Element;
use super::buffer::zeros;
use super::hot;
use super::huge_pages::Plain;
use super::kv_pool::{KvPool, Scratch, Span};
use super::ops::{self, Rope};
use super::weight::Weight;
use crate::models::batch::{check_step, BatchedModel, KvDtype, KvLayout, SeqChunk, Solo};
use crate::models::error::GenerationError;
use half::f16;

/// A weight matrix and its optional bias.
pub struct Linear {
    /// `out × in`.
    pub weight: Weight,
    /// One value per output row.
    pub bias: Option<Vec<f32>>,
}

impl Linear {
    /// A projection without a bias.
    pub fn plain(weight: Weight) -> Linear {
        Linear { weight, bias: None }
    }
}

/// One transformer block.
pub struct Layer {
    /// RMSNorm before attention.
    pub attn_norm: Vec<f32>,
    /// Query projection.
    pub q: Linear,
    /// Key projection.
    pub k: Linear,
    /// Value projection.
    pub v: Linear,
    /// Output projection.
    pub o: Linear,
    /// Qwen3's RMSNorm of each query head (before the rotation).
    pub q_norm: Option<Vec<f32>>,
    /// Qwen3's RMSNorm of each key head.
    pub k_norm: Option<Vec<f32>>,
    /// RMSNorm before the MLP.
    pub ffn_norm: Vec<f32>,
    /// MLP gate projection.
    pub gate: Linear,
    /// MLP up projection.
    pub up: Linear,
    /// MLP down projection.
    pub down: Linear,
}

/// The shapes and constants of the forward pass.
pub struct Hyper {
    /// Width of the residual stream.
    pub hidden: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Values per head.
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub eps: f32,
    /// The rotary embedding.
    pub rope: Rope,
    /// Mistral's sliding window: a token attends to itself and the `window - 1` before it.
    pub window: Option<usize>,
    /// The attention scores' scale (`1/sqrt(head_dim)`, Granite's `attention_multiplier`).
    pub attention_scale: f32,
    /// Granite: the token embeddings are multiplied by this.
    pub embedding_multiplier: f32,
    /// Granite: each sub-layer's output is multiplied by this before the residual add.
    pub residual_multiplier: f32,
    /// Granite: the logits are multiplied by this (`1 / logits_scaling`).
    pub logits_multiplier: f32,
}

/// The weights of a model.
pub struct Weights {
    /// Token embeddings (`vocab × hidden`).
    pub embedding: Weight,
    /// The blocks.
    pub layers: Vec<Layer>,
    /// The final RMSNorm.
    pub norm: Vec<f32>,
    /// The output projection; `None` when it is the embedding.
    pub output: Option<Weight>,
    /// Shapes and constants.
    pub hyper: Hyper,
}

/// A Llama-family model on the CPU with its KV cache.
pub struct CpuLlama {
    weights: Weights,
    /// The batched engine's pool (`None` until [`BatchedModel::init_kv`]).
    pool: Option<Pool>,
    /// The single-sequence path's pool and its sequence.
    solo_pool: Option<KvPool<f32>>,
    solo: Solo,
}

impl CpuLlama {
    /// A model with empty caches.
    pub fn new(weights: Weights) -> CpuLlama {
        CpuLlama {
            weights,
            pool: None,
            solo_pool: None,
            solo: Solo::default(),
        }
    }

    /// Empties the single-sequence path's cache.
    pub fn clear_kv_cache(&mut self) {
        self.solo.clear();
    }

    /// Runs `ids` as the continuation of the one sequence of the single-sequence path, at
    /// `position` (which must equal its cached length), and returns the logits of the last.
    pub fn forward(&mut self, ids: &[u32], position: usize) -> Result<Vec<f32>, GenerationError> {
        let layout = self.solo.layout(position, ids.len())?;
        let w = &self.weights;
        let pool = self.solo_pool.get_or_insert_with(|| {
            KvPool::new(w.layers.len(), w.hyper.kv_heads, w.hyper.head_dim, layout)
        });
        pool.grow(layout.blocks);
        let chunk = self.solo.chunk(ids);
        check_step(&[chunk], pool.layout(), w.vocab())?;
        let mut logits = hot::run(|| w.forward(&[chunk], pool));
        self.solo.advance(ids.len());
        logits
            .pop()
            .ok_or_else(|| GenerationError::Forward("no logits".to_string()))
    }
}

/// The batched engine's pool in the type it stores.
enum Pool {
    F32(KvPool<f32>),
    F16(KvPool<f16>),
}

impl BatchedModel for CpuLlama {
    /// Every type; `Auto` stores f32.
    fn kv_bytes_per_token(&self, dtype: KvDtype) -> Result<usize, String> {
        let size = match dtype {
            KvDtype::Auto | KvDtype::F32 => std::mem::size_of::<f32>(),
            KvDtype::F16 => std::mem::size_of::<f16>(),
        };
        Ok(2 * self.weights.layers.len() * self.weights.kv_width() * size)
    }

    fn init_kv(&mut self, layout: KvLayout, dtype: KvDtype) -> Result<(), GenerationError> {
        let w = &self.weights;
        let (layers, heads, d) = (w.layers.len(), w.hyper.kv_heads, w.hyper.head_dim);
        self.pool = None;
        self.pool = Some(match dtype {
            KvDtype::Auto | KvDtype::F32 => Pool::F32(KvPool::new(layers, heads, d, layout)),
            KvDtype::F16 => Pool::F16(KvPool::new(layers, heads, d, layout)),
        });
        Ok(())
    }

    fn kv_layout(&self) -> Option<KvLayout> {
        self.pool.as_ref().map(|pool| match pool {
            Pool::F32(p) => p.layout(),
            Pool::F16(p) => p.layout(),
        })
    }

    /// Runs on a thread of rayon's pool, so its matrix products split their rows from inside
    /// the pool: waking the pool from outside for each of the ~200 products of a step cost
    /// more than the products of a small model.
    fn forward_batch(&mut self, seqs: &[SeqChunk<'_>]) -> Result<Vec<Vec<f32>>, GenerationError> {
        let w = &self.weights;
        let pool = self.pool.as_mut().ok_or_else(|| {
            GenerationError::Forward("the KV cache was not initialised".to_string())
        })?;
        match pool {
            Pool::F32(pool) => w.step(seqs, pool),
            Pool::F16(pool) => w.step(seqs, pool),
        }
    }
}

/// Which sequence and position each row of a step is.
struct Rows {
    seq: Vec<usize>,
    position: Vec<usize>,
}

impl Weights {
    /// Checks `seqs` against `pool` and runs them as one step inside rayon's pool.
    fn step<T: Plain + Element>(
        &self,
        seqs: &[SeqChunk<'_>],
        pool: &mut KvPool<T>,
    ) -> Result<Vec<Vec<f32>>, GenerationError> {
        check_step(seqs, pool.layout(), self.vocab())?;
        Ok(hot::run(|| self.forward(seqs, pool)))
    }

    /// Values per KV slot of one layer.
    fn kv_width(&self) -> usize {
        self.hyper.kv_heads * self.hyper.head_dim
    }

    /// The vocabulary size.
    pub fn vocab(&self) -> usize {
        self.embedding.rows()
    }

    /// One step over checked `seqs`; returns the logits of the chunks that ask for them.
    fn forward<T: Plain + Element>(
        &self,
        seqs: &[SeqChunk<'_>],
        pool: &mut KvPool<T>,
    ) -> Vec<Vec<f32>> {
        let s = &self.hyper;
        let mut rows = Rows {
            seq: Vec::new(),
            position: Vec::new(),
        };
        for (i, seq) in seqs.iter().enumerate() {
            rows.seq.extend(std::iter::repeat_n(i, seq.tokens.len()));
            rows.position.extend(seq.context_len..seq.end());
        }
        let (n, hidden) = (rows.seq.len(), s.hidden);
        let mut x = zeros(n * hidden);
        let ids = seqs.iter().flat_map(|seq| seq.tokens);
        for (row, &id) in x.chunks_exact_mut(hidden).zip(ids) {
            self.embedding.row(id as usize, row);
        }
        if s.embedding_multiplier != 1.0 {
            x.iter_mut().for_each(|v| *v *= s.embedding_multiplier);
        }
        let angles = s.rope.angles(&rows.position);
        let mut h = zeros(n * hidden);
        for (index, layer) in self.layers.iter().enumerate() {
            ops::rms_norm(&x, &layer.attn_norm, s.eps, &mut h);
            let attended = self.attention(index, layer, &h, seqs, &rows, &angles, pool);
            let projected = project(&layer.o, &attended, n);
            ops::add_scaled(&mut x, &projected, s.residual_multiplier);
            ops::rms_norm(&x, &layer.ffn_norm, s.eps, &mut h);
            let ffn = layer.gate.weight.rows();
            let (mut gate, mut up) = (zeros(n * ffn), zeros(n * ffn));
            Weight::matmul_all(
                &mut [(&layer.gate.weight, &mut gate), (&layer.up.weight, &mut up)],
                &h,
                n,
            );
            add_bias(&layer.gate, &mut gate);
            add_bias(&layer.up, &mut up);
            ops::silu_times(&mut gate, &up, ffn);
            let projected = project(&layer.down, &gate, n);
            ops::add_scaled(&mut x, &projected, s.residual_multiplier);
        }
        self.logits(seqs, &x)
    }

    /// The attention sub-layer of layer `index` for the normed rows `h`: projections, rotary
    /// embedding, the new keys and values stored in the pool, then each row's attention over
    /// its own sequence. Returns the heads' outputs, `rows × heads × head_dim`.
    #[allow(clippy::too_many_arguments)]
    fn attention<T: Plain + Element>(
        &self,
        index: usize,
        layer: &Layer,
        h: &[f32],
        seqs: &[SeqChunk<'_>],
        rows: &Rows,
        angles: &ops::Angles,
        pool: &mut KvPool<T>,
    ) -> Vec<f32> {
        let s = &self.hyper;
        let n = rows.seq.len();
        let (q_width, kv_width) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let (mut q, mut k, mut v) = (zeros(n * q_width), zeros(n * kv_width), zeros(n * kv_width));
        Weight::matmul_all(
            &mut [
                (&layer.q.weight, &mut q),
                (&layer.k.weight, &mut k),
                (&layer.v.weight, &mut v),
            ],
            h,
            n,
        );
        add_bias(&layer.q, &mut q);
        add_bias(&layer.k, &mut k);
        add_bias(&layer.v, &mut v);
        if let Some(norm) = &layer.q_norm {
            ops::rms_norm_heads(&mut q, norm, s.eps);
        }
        if let Some(norm) = &layer.k_norm {
            ops::rms_norm_heads(&mut k, norm, s.eps);
        }
        angles.rotate(&mut q, s.heads, s.head_dim);
        angles.rotate(&mut k, s.kv_heads, s.head_dim);
        let mut first = 0;
        for seq in seqs {
            let count = seq.tokens.len();
            let (keys, values) = (
                &k[first * kv_width..(first + count) * kv_width],
                &v[first * kv_width..(first + count) * kv_width],
            );
            pool.write(index, seq.block_table, seq.context_len, keys, values);
            first += count;
        }
        let layer_kv = pool.layer(index);
        let d = s.head_dim;
        // One unit per (row, KV head): the query heads that share the KV head read its keys
        // and values together.
        let group = (s.heads / s.kv_heads) * d;
        let mut out = zeros(n * q_width);
        out.par_chunks_mut(group).enumerate().for_each_init(
            Scratch::default,
            |scratch, (unit, o)| {
                let (row, kv_head) = (unit / s.kv_heads, unit % s.kv_heads);
                let position = rows.position[row];
                let span = Span {
                    table: seqs[rows.seq[row]].block_table,
                    start: s.window.map_or(0, |w| (position + 1).saturating_sub(w)),
                    end: position + 1,
                    kv_head,
                };
                let queries = &q[unit * group..(unit + 1) * group];
                layer_kv.attend(queries, &span, s.attention_scale, scratch, o);
            },
        );
        out
    }

    /// The final norm and output projection of each chunk's rows that ask for logits (see
    /// [`SeqChunk::logit_rows`]).
    fn logits(&self, seqs: &[SeqChunk<'_>], x: &[f32]) -> Vec<Vec<f32>> {
        let s = &self.hyper;
        let hidden = s.hidden;
        let mut last = Vec::new();
        let mut end = 0;
        for seq in seqs {
            end += seq.tokens.len();
            let rows = seq.logit_rows();
            last.extend_from_slice(&x[(end - rows) * hidden..end * hidden]);
        }
        let wanted = last.len() / hidden;
        if wanted == 0 {
            return Vec::new();
        }
        let mut normed = zeros(last.len());
        ops::rms_norm(&last, &self.norm, s.eps, &mut normed);
        let head = self.output.as_ref().unwrap_or(&self.embedding);
        let vocab = head.rows();
        // A decode step's logits are megabytes: zeroed, scaled and copied out on every thread
        // of the pool rather than on this one while the others wait.
        let mut logits = Vec::new();
        rayon::iter::repeat_n(0.0, wanted * vocab).collect_into_vec(&mut logits);
        head.matmul(&normed, wanted, &mut logits);
        let multiplier = s.logits_multiplier;
        logits
            .par_chunks_exact_mut(vocab)
            .map(|row| {
                if multiplier != 1.0 {
                    row.iter_mut().for_each(|v| *v *= multiplier);
                }
                row.to_vec()
            })
            .collect()
    }
}

/// `x · linearᵀ + bias` for `n` rows.
fn project(linear: &Linear, x: &[f32], n: usize) -> Vec<f32> {
    let mut out = zeros(n * linear.weight.rows());
    linear.weight.matmul(x, n, &mut out);
    add_bias(linear, &mut out);
    out
}

fn add_bias(linear: &Linear, out: &mut [f32]) {
    if let Some(bias) = &linear.bias {
        ops::add_bias(out, bias);
    }
}
