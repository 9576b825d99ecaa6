//! The paged KV cache of the CPU path: per layer, keys and values of `blocks × block_size`
//! token slots, each block holding every KV head's slots one after another (`[block][kv
//! head][slot][head dim]`, as vLLM lays its blocks out), and attention of one KV head's
//! queries over a sequence's positions through its block table. A head's keys in a block are
//! one contiguous run of memory, which the attention of a decode step streams from DRAM.
//! With each slot holding every head (`[block][slot][kv head][head dim]`) a head's keys were
//! 256-byte pieces a row apart: the attention of eight streams at 520–640-token contexts took
//! about 7 % longer per step (17.8 against 16.6 ms, three alternations), and `cargo bench
//! --bench kernels -- attention/` ran 13–28 % slower.
//!
//! The storage is written (zeroed) when the pool is made, on huge pages where the system gives
//! them, as llama.cpp clears its cache at start: the scheduler hands blocks out across the whole
//! pool, and a pool whose pages were faulted in at first use cost a page fault every few
//! kilobytes of every new block (`perf record` of 16 decoding streams showed the kernel
//! clearing pages inside the steps).

use super::attention::{self, Element};
use super::huge_pages::{weight_buffer, Plain, WeightBuffer};
use crate::models::batch::{KvLayout, BLOCK_ALIGN};

/// Keys and values of every layer, in blocks, stored as `T` (`f32` or `f16`).
pub struct KvPool<T: Plain> {
    layout: KvLayout,
    kv_heads: usize,
    head_dim: usize,
    keys: Vec<WeightBuffer<T>>,
    values: Vec<WeightBuffer<T>>,
}

/// Where a query's attention reads: one KV head of one sequence's positions.
pub struct Span<'a> {
    /// The sequence's blocks in position order.
    pub table: &'a [u32],
    /// The first position attended (after a sliding window, else 0).
    pub start: usize,
    /// One past the last position attended.
    pub end: usize,
    /// The KV head.
    pub kv_head: usize,
}

impl<T: Plain + Element> KvPool<T> {
    /// An empty pool of `layout` for `layers` layers of `kv_heads` heads of `head_dim` values.
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, layout: KvLayout) -> KvPool<T> {
        let len = layout.tokens() * kv_heads * head_dim;
        KvPool {
            layout,
            kv_heads,
            head_dim,
            keys: (0..layers).map(|_| weight_buffer(len)).collect(),
            values: (0..layers).map(|_| weight_buffer(len)).collect(),
        }
    }

    /// The pool's geometry.
    pub fn layout(&self) -> KvLayout {
        self.layout
    }

    /// Grows the pool to `blocks` blocks (the single-sequence path grows as it goes).
    pub fn grow(&mut self, blocks: usize) {
        if blocks <= self.layout.blocks {
            return;
        }
        self.layout.blocks = blocks;
        let len = self.layout.tokens() * self.kv_heads * self.head_dim;
        for store in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let mut grown = weight_buffer(len);
            grown[..store.len()].copy_from_slice(store);
            *store = grown;
        }
    }

    /// The first value of KV head `head`'s slot for `position` in a sequence with block table
    /// `table`.
    fn slot(&self, table: &[u32], position: usize, head: usize) -> usize {
        let size = self.layout.block_size;
        let block = table[position / size] as usize;
        ((block * self.kv_heads + head) * size + position % size) * self.head_dim
    }

    /// Stores the keys and values of consecutive positions from `first` (every KV head's values
    /// of a position one after another, rotated keys) into layer `layer`'s slots.
    pub fn write(
        &mut self,
        layer: usize,
        table: &[u32],
        first: usize,
        keys: &[f32],
        values: &[f32],
    ) {
        let d = self.head_dim;
        let store = |to: &mut [T], from: &[f32]| {
            to.iter_mut()
                .zip(from)
                .for_each(|(t, f)| *t = T::from_f32(*f));
        };
        for (i, (k, v)) in keys.chunks_exact(d).zip(values.chunks_exact(d)).enumerate() {
            let at = self.slot(table, first + i / self.kv_heads, i % self.kv_heads);
            store(&mut self.keys[layer][at..at + d], k);
            store(&mut self.values[layer][at..at + d], v);
        }
    }

    /// Layer `layer`'s storage, for [`attend`].
    pub fn layer(&self, layer: usize) -> Layer<'_, T> {
        Layer {
            keys: &self.keys[layer],
            values: &self.values[layer],
            kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            block_size: self.layout.block_size,
        }
    }
}

/// One layer's keys and values, shared by the threads of its attention.
#[derive(Clone, Copy)]
pub struct Layer<'a, T> {
    keys: &'a [T],
    values: &'a [T],
    kv_heads: usize,
    head_dim: usize,
    block_size: usize,
}

impl<T: Element> Layer<'_, T> {
    /// The pieces of positions `start..span.end` that lie in one block each: (offset of the
    /// first position's value in the storage, first position, one past the last).
    fn pieces<'s>(
        &self,
        span: &'s Span<'_>,
        start: usize,
    ) -> impl Iterator<Item = (usize, usize, usize)> + 's {
        let (size, heads, d) = (self.block_size, self.kv_heads, self.head_dim);
        (start / size..span.end.div_ceil(size)).map(move |b| {
            let from = start.max(b * size);
            let to = span.end.min((b + 1) * size);
            let head = span.table[b] as usize * heads + span.kv_head;
            let at = (head * size + from - b * size) * d;
            (at, from, to)
        })
    }

    /// Softmax attention of the queries of one KV head's group (`queries`: heads of the
    /// pool's head size, one after another) over `span`, into `out` (the same shape): for each query,
    /// `out = Σ_p softmax(scale · q·k_p)_p · v_p`. The group's queries take each block in
    /// turn, so a block's keys and values come from memory once for all of them. `scratch` is
    /// the caller's scores and weights space.
    ///
    /// Each query's scores and running sum of values are formed in position order, and the
    /// scores are taken in groups of four from a multiple of four (a window's start is rounded
    /// down, the extra scores unused), so the result depends only on the positions attended,
    /// not on which blocks hold them or how large the blocks are.
    pub fn attend(
        &self,
        queries: &[f32],
        span: &Span<'_>,
        scale: f32,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        let d = self.head_dim;
        let heads = queries.len() / d;
        let aligned = span.start / BLOCK_ALIGN * BLOCK_ALIGN;
        let (all, seen) = (span.end - aligned, span.end - span.start);
        scratch.scores.resize(heads * all, 0.0);
        scratch.weights.resize(heads * seen, 0.0);
        scratch.runs.clear();
        let runs = self
            .pieces(span, aligned)
            .map(|(at, from, to)| (at, to - from));
        scratch.runs.extend(runs);
        attention::scores(queries, d, self.keys, d, &scratch.runs, &mut scratch.scores);
        let chunks = scratch.scores.chunks_exact(all);
        for (scores, weights) in chunks.zip(scratch.weights.chunks_exact_mut(seen)) {
            let live = &scores[span.start - aligned..];
            let max = super::exp::max_value(live);
            let total = super::exp::exp_shifted(live, max, scale, weights) as f32;
            weights.iter_mut().for_each(|w| *w /= total);
        }
        out.fill(0.0);
        scratch.runs.clear();
        let runs = self
            .pieces(span, span.start)
            .map(|(at, from, to)| (at, to - from));
        scratch.runs.extend(runs);
        let values = self.values;
        attention::weighted_sums(&scratch.weights, values, d, &scratch.runs, out, d);
    }
}

/// One thread's scratch space for [`Layer::attend`].
#[derive(Default)]
pub struct Scratch {
    scores: Vec<f32>,
    weights: Vec<f32>,
    runs: Vec<attention::Run>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The paged result equals the contiguous one bit for bit, for lengths around the group
    /// of four and the block size, block sizes 4 and 16, shuffled block ids and windows.
    #[test]
    fn paged_attention_equals_contiguous_attention_bit_for_bit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (kv_heads, d) = (2, 24);
        let width = kv_heads * d;
        for block_size in [4, 16] {
            for len in 1usize..=70 {
                let keys: Vec<f32> = (0..len * width)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                let values: Vec<f32> = (0..len * width)
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                let blocks = len.div_ceil(block_size) + 3;
                let mut table: Vec<u32> = (0..blocks as u32).collect();
                for i in (1..table.len()).rev() {
                    table.swap(i, rng.random_range(0..=i));
                }
                let layout = KvLayout { block_size, blocks };
                let mut pool = KvPool::<f32>::new(1, kv_heads, d, layout);
                pool.write(0, &table, 0, &keys, &values);
                let mut contiguous = KvPool::<f32>::new(
                    1,
                    kv_heads,
                    d,
                    KvLayout {
                        block_size: len.next_multiple_of(4),
                        blocks: 1,
                    },
                );
                contiguous.write(0, &[0], 0, &keys, &values);
                let query: Vec<f32> = (0..d).map(|_| rng.random_range(-1.0..1.0)).collect();
                for start in [0, len / 3, len - 1] {
                    let mut got = vec![0.0; d];
                    let mut want = vec![0.0; d];
                    let mut scratch = Scratch::default();
                    let paged = Span {
                        table: &table,
                        start,
                        end: len,
                        kv_head: 1,
                    };
                    pool.layer(0)
                        .attend(&query, &paged, 0.3, &mut scratch, &mut got);
                    let flat = Span {
                        table: &[0],
                        start,
                        end: len,
                        kv_head: 1,
                    };
                    contiguous
                        .layer(0)
                        .attend(&query, &flat, 0.3, &mut scratch, &mut want);
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(
                        bits(&got),
                        bits(&want),
                        "block {block_size} len {len} start {start}"
                    );
                }
            }
        }
    }
}
