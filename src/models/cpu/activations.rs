//! Activations quantized once per matrix product into Q8_0 blocks, the partner of the weight
//! types of 32-value blocks (Q8_0, Q4_0, Q5_0; [`super::interleaved`]).

use super::buffer::zeros;
use super::kernels::{self, BLOCK, Q8_0_BYTES};
use rayon::prelude::*;

/// Activation rows quantized to Q8_0 blocks, with each block's scale as f32, its sum (scale
/// times the sum of its integers) and the sum of its integers.
pub struct Activations {
    quants: Vec<u8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
    integer_sums: Vec<i32>,
    blocks: usize,
}

impl Activations {
    /// Quantizes `tokens` rows of `columns` values (row major; `columns` a multiple of 32).
    pub fn quantize(x: &[f32], tokens: usize, columns: usize) -> Activations {
        assert_eq!(x.len(), tokens * columns, "activation size");
        let blocks = columns / BLOCK;
        let mut quants = zeros(tokens * blocks * Q8_0_BYTES);
        let mut scales = zeros(tokens * blocks);
        let mut sums = zeros(tokens * blocks);
        let mut integer_sums = vec![0i32; tokens * blocks];
        let row = |((((values, q), d), s), n): Row<'_>| {
            kernels::quantize_q8_0(values, q);
            kernels::block_sums(q, s, n);
            for (d, block) in d.iter_mut().zip(q.chunks_exact(Q8_0_BYTES)) {
                *d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            }
        };
        // One token (decode) on this thread: waking the pool costs more than it saves.
        match tokens {
            1 => row((
                (((x, &mut quants[..]), &mut scales[..]), &mut sums[..]),
                &mut integer_sums[..],
            )),
            _ => x
                .par_chunks_exact(columns)
                .zip(quants.par_chunks_exact_mut(blocks * Q8_0_BYTES))
                .zip(scales.par_chunks_exact_mut(blocks))
                .zip(sums.par_chunks_exact_mut(blocks))
                .zip(integer_sums.par_chunks_exact_mut(blocks))
                .for_each(row),
        }
        Activations {
            quants,
            scales,
            sums,
            integer_sums,
            blocks,
        }
    }

    /// Activation rows.
    pub fn tokens(&self) -> usize {
        self.sums.len() / self.blocks.max(1)
    }

    /// Row `t`'s Q8_0 blocks.
    pub fn row(&self, t: usize) -> &[u8] {
        let stride = self.blocks * Q8_0_BYTES;
        &self.quants[t * stride..(t + 1) * stride]
    }

    /// Row `t`'s block scales as f32.
    pub fn scales(&self, t: usize) -> &[f32] {
        &self.scales[t * self.blocks..(t + 1) * self.blocks]
    }

    /// Row `t`'s block sums.
    pub fn sums(&self, t: usize) -> &[f32] {
        &self.sums[t * self.blocks..(t + 1) * self.blocks]
    }

    /// Rows `t..`'s blocks, scales, sums and sums of integers, each row's after the one
    /// before (strides `blocks × 34` bytes and `blocks`), for kernels that address several
    /// rows from one pointer.
    pub fn from_row(&self, t: usize) -> (&[u8], &[f32], &[f32], &[i32]) {
        let b = t * self.blocks;
        (
            &self.quants[b * Q8_0_BYTES..],
            &self.scales[b..],
            &self.sums[b..],
            &self.integer_sums[b..],
        )
    }

    /// Blocks per row.
    pub fn blocks(&self) -> usize {
        self.blocks
    }

    /// Row `t`'s blocks' sums of their integers.
    pub fn integer_sums(&self, t: usize) -> &[i32] {
        &self.integer_sums[t * self.blocks..(t + 1) * self.blocks]
    }
}

/// One activation row being quantized: its values, then its blocks, scales, sums and sums of
/// integers.
type Row<'a> = (
    (((&'a [f32], &'a mut [u8]), &'a mut [f32]), &'a mut [f32]),
    &'a mut [i32],
);
