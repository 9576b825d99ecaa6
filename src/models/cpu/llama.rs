//! A GGUF Llama run on the CPU with llorch's own forward pass: weights stay in their GGUF types
//! and are multiplied by [`Weight`], activations and the KV cache are plain f32 buffers owned by
//! the model, and no tensor is allocated per operation.

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::GgmlDType;
use rayon::prelude::*;

use super::buffer::zeros;
use super::weight::{Weight, SUPPORTED};

/// One transformer block.
struct Layer {
    attn_norm: Vec<f32>,
    q: Weight,
    k: Weight,
    v: Weight,
    o: Weight,
    ffn_norm: Vec<f32>,
    gate: Weight,
    up: Weight,
    down: Weight,
    /// Keys of every cached position, `[position][kv head][head dim]`, rotated.
    keys: Vec<f32>,
    /// Values, laid out like `keys`.
    values: Vec<f32>,
}

/// The shapes the forward pass needs.
struct Shape {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    ffn: usize,
    eps: f32,
    /// `base^(-2i/head_dim)` for each rotated pair.
    inverse_frequencies: Vec<f32>,
}

/// A Llama-family GGUF model on the CPU.
pub struct CpuLlama {
    embedding: Weight,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    /// `None` when the output projection is the embedding.
    output: Option<Weight>,
    shape: Shape,
    /// Positions in the KV cache.
    cached: usize,
}

impl CpuLlama {
    /// Whether this path runs `content`: a Llama whose matrices are all of supported types and
    /// whose rotary embedding covers whole heads.
    pub fn supports(content: &Content) -> bool {
        let md = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
        let (Some(hidden), Some(heads)) = (
            md("llama.embedding_length"),
            md("llama.attention.head_count"),
        ) else {
            return false;
        };
        let whole_heads = md("llama.rope.dimension_count").is_none_or(|d| d * heads == hidden);
        let dense = md("llama.expert_count").unwrap_or(0) <= 1;
        let types_ok = content.tensor_infos.values().all(|info| {
            info.shape.rank() == 1 && info.ggml_dtype == GgmlDType::F32
                || SUPPORTED.contains(&info.ggml_dtype)
        });
        whole_heads && dense && types_ok
    }

    /// Reads the model from a GGUF file already parsed into `content`.
    pub fn from_gguf<R: std::io::Read + std::io::Seek>(
        content: &Content,
        reader: &mut R,
    ) -> candle_core::Result<CpuLlama> {
        let device = candle_core::Device::Cpu;
        let md = |key: &str| match content.metadata.get(key) {
            Some(v) => v.to_u32().map(|n| n as usize),
            None => candle_core::bail!("no {key} in the metadata"),
        };
        let heads = md("llama.attention.head_count")?;
        let kv_heads = md("llama.attention.head_count_kv").unwrap_or(heads);
        let hidden = md("llama.embedding_length")?;
        let eps = content
            .metadata
            .get("llama.attention.layer_norm_rms_epsilon")
            .map(|v| v.to_f32())
            .transpose()?
            .unwrap_or(1e-5);
        let base = content
            .metadata
            .get("llama.rope.freq_base")
            .map(|v| v.to_f32())
            .transpose()?
            .unwrap_or(10_000.0);
        let head_dim = hidden / heads;
        let inverse_frequencies = (0..head_dim)
            .step_by(2)
            .map(|i| 1.0 / base.powf(i as f32 / head_dim as f32))
            .collect();
        // The weights' buffers share huge-page chunks (see `huge_pages`).
        let (embedding, output, norm, layers) = super::huge_pages::in_arena(|| {
            let mut read = |name: &str| content.tensor(reader, name, &device);
            let embedding = Weight::new(&read("token_embd.weight")?)?;
            let output = match content.tensor_infos.contains_key("output.weight") {
                true => Some(Weight::new(&read("output.weight")?)?),
                false => None,
            };
            let vector = |tensor: candle_core::quantized::QTensor| {
                tensor.dequantize(&device)?.to_vec1::<f32>()
            };
            let norm = vector(read("output_norm.weight")?)?;
            let mut layers = Vec::new();
            for i in 0..md("llama.block_count")? {
                let mut part = |part: &str| read(&format!("blk.{i}.{part}.weight"));
                layers.push(Layer {
                    attn_norm: vector(part("attn_norm")?)?,
                    q: Weight::new(&part("attn_q")?)?,
                    k: Weight::new(&part("attn_k")?)?,
                    v: Weight::new(&part("attn_v")?)?,
                    o: Weight::new(&part("attn_output")?)?,
                    ffn_norm: vector(part("ffn_norm")?)?,
                    gate: Weight::new(&part("ffn_gate")?)?,
                    up: Weight::new(&part("ffn_up")?)?,
                    down: Weight::new(&part("ffn_down")?)?,
                    keys: Vec::new(),
                    values: Vec::new(),
                });
            }
            candle_core::Result::Ok((embedding, output, norm, layers))
        })?;
        let ffn = layers.first().map_or(0, |l| l.gate.rows());
        Ok(CpuLlama {
            embedding,
            layers,
            norm,
            output,
            shape: Shape {
                hidden,
                heads,
                kv_heads,
                head_dim,
                ffn,
                eps,
                inverse_frequencies,
            },
            cached: 0,
        })
    }

    /// Empties the KV cache.
    pub fn clear_kv_cache(&mut self) {
        self.cached = 0;
        for layer in &mut self.layers {
            layer.keys.clear();
            layer.values.clear();
        }
    }

    /// Runs `ids` at `position` (which must equal the cached length) and returns the logits of
    /// the last one. The pass runs on a thread of rayon's pool, so its matrix products split
    /// their rows from inside the pool: waking the pool from outside for each of the ~200
    /// products of a step cost more than the products of a small model.
    pub fn forward(&mut self, ids: &[u32], position: usize) -> candle_core::Result<Vec<f32>> {
        rayon::scope(|_| self.forward_in_pool(ids, position))
    }

    fn forward_in_pool(&mut self, ids: &[u32], position: usize) -> candle_core::Result<Vec<f32>> {
        if position != self.cached {
            candle_core::bail!("position {position} but {} positions cached", self.cached);
        }
        let s = &self.shape;
        let (n, hidden) = (ids.len(), s.hidden);
        let vocab = self.embedding.rows();
        let mut x = zeros(n * hidden);
        for (row, &id) in x.chunks_exact_mut(hidden).zip(ids) {
            if id as usize >= vocab {
                candle_core::bail!("token id {id} is outside the vocabulary of {vocab}");
            }
            self.embedding.row(id as usize, row);
        }
        let kv = s.kv_heads * s.head_dim;
        let mut h = zeros(n * hidden);
        let (mut q, mut k, mut v) = (zeros(n * hidden), zeros(n * kv), zeros(n * kv));
        let mut attended = zeros(n * hidden);
        let mut projected = zeros(n * hidden);
        let (mut gate, mut up) = (zeros(n * s.ffn), zeros(n * s.ffn));
        let angles = Angles::new(position, n, &s.inverse_frequencies);
        for layer in &mut self.layers {
            rms_norm(&x, &layer.attn_norm, s.eps, &mut h);
            Weight::matmul_all(
                &mut [(&layer.q, &mut q), (&layer.k, &mut k), (&layer.v, &mut v)],
                &h,
                n,
            );
            rotate(&mut q, s.heads, s.head_dim, &angles);
            rotate(&mut k, s.kv_heads, s.head_dim, &angles);
            layer.keys.extend_from_slice(&k);
            layer.values.extend_from_slice(&v);
            attend(s, &q, &layer.keys, &layer.values, position, &mut attended);
            layer.o.matmul(&attended, n, &mut projected);
            add(&mut x, &projected);
            rms_norm(&x, &layer.ffn_norm, s.eps, &mut h);
            Weight::matmul_all(&mut [(&layer.gate, &mut gate), (&layer.up, &mut up)], &h, n);
            silu_times(&mut gate, &up, s.ffn);
            layer.down.matmul(&gate, n, &mut projected);
            add(&mut x, &projected);
        }
        self.cached += n;
        let last = &x[(n - 1) * hidden..];
        let mut normed = zeros(hidden);
        rms_norm(last, &self.norm, s.eps, &mut normed);
        let head = self.output.as_ref().unwrap_or(&self.embedding);
        let mut logits = zeros(head.rows());
        head.matmul(&normed, 1, &mut logits);
        Ok(logits)
    }
}

/// `out = x / rms(x) * weight`, row by row (rows split over the pool's threads).
fn rms_norm(x: &[f32], weight: &[f32], eps: f32, out: &mut [f32]) {
    let n = weight.len();
    let norm = |(row, o): (&[f32], &mut [f32])| {
        let mean_square = row.iter().map(|v| v * v).sum::<f32>() / n as f32;
        let scale = 1.0 / (mean_square + eps).sqrt();
        for ((o, v), w) in o.iter_mut().zip(row).zip(weight) {
            *o = v * scale * w;
        }
    };
    match x.len() > n {
        true => x
            .par_chunks_exact(n)
            .zip(out.par_chunks_exact_mut(n))
            .for_each(norm),
        false => x
            .chunks_exact(n)
            .zip(out.chunks_exact_mut(n))
            .for_each(norm),
    }
}

/// `gate = silu(gate) * up`, a row of `width` per token (rows split over the pool's threads).
fn silu_times(gate: &mut [f32], up: &[f32], width: usize) {
    let row = |(g, u): (&mut [f32], &[f32])| super::exp::silu_times(g, u);
    match gate.len() > width {
        true => gate
            .par_chunks_mut(width)
            .zip(up.par_chunks(width))
            .for_each(row),
        false => row((gate, up)),
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// The rotary angles' sines and cosines of `n` positions from `position`, each frequency
/// once: computed once per forward pass and shared by every layer and head.
struct Angles {
    sin: Vec<f32>,
    cos: Vec<f32>,
    pairs: usize,
}

impl Angles {
    fn new(position: usize, n: usize, inverse: &[f32]) -> Angles {
        let pairs = inverse.len();
        let (mut sin, mut cos) = (zeros(n * pairs), zeros(n * pairs));
        for t in 0..n {
            let pos = (position + t) as f32;
            for (i, frequency) in inverse.iter().enumerate() {
                (sin[t * pairs + i], cos[t * pairs + i]) = (pos * frequency).sin_cos();
            }
        }
        Angles { sin, cos, pairs }
    }
}

/// Rotary embedding on interleaved pairs `(2i, 2i+1)` of each head of each token.
fn rotate(x: &mut [f32], heads: usize, head_dim: usize, angles: &Angles) {
    let p = angles.pairs;
    for (t, token) in x.chunks_exact_mut(heads * head_dim).enumerate() {
        let (sin, cos) = (
            &angles.sin[t * p..(t + 1) * p],
            &angles.cos[t * p..(t + 1) * p],
        );
        for head in token.chunks_exact_mut(head_dim) {
            for ((pair, sin), cos) in head.chunks_exact_mut(2).zip(sin).zip(cos) {
                let (a, b) = (pair[0], pair[1]);
                pair[0] = a * cos - b * sin;
                pair[1] = a * sin + b * cos;
            }
        }
    }
}

/// Causal attention of the `n` new queries over every cached position; one unit of parallel work
/// per (token, head).
fn attend(s: &Shape, q: &[f32], keys: &[f32], values: &[f32], position: usize, out: &mut [f32]) {
    let d = s.head_dim;
    let group = s.heads / s.kv_heads;
    let kv = s.kv_heads * d;
    let scale = 1.0 / (d as f32).sqrt();
    let buffers = || (Vec::new(), Vec::new());
    out.par_chunks_mut(d)
        .enumerate()
        .for_each_init(buffers, |(scores, weights), (unit, o)| {
            let (t, head) = (unit / s.heads, unit % s.heads);
            let query = &q[unit * d..(unit + 1) * d];
            let at = (head / group) * d;
            let seen = position + t + 1;
            scores.resize(seen, 0.0);
            weights.resize(seen, 0.0);
            let (keys, values) = (&keys[at..], &values[at..]);
            super::attention::scores(query, keys, kv, scores);
            let max = super::exp::max_value(scores);
            let total = super::exp::exp_shifted(scores, max, scale, weights) as f32;
            weights.iter_mut().for_each(|w| *w /= total);
            super::attention::weighted_sum(weights, values, kv, o);
        });
}
