//! Prefill's matrix products for the weight types of 32-value blocks (Q8_0, Q5_0) against
//! Q8_0 activations: a tile of weight rows times a tile of tokens, its products summed in
//! registers, so that each weight block is unpacked once for every token of the tile and each
//! activation block loaded once for every row of it.
//!
//! Each (row, token) product is summed as the one-token kernels sum it: one accumulator, block
//! order, the same scale products; Q8_0 prefill rounds exactly as Q8_0 decode does.

use super::kernels::{self, BLOCK, Q8_0_BYTES};
use super::kquants::{self, Q5_0_BYTES};
use rayon::prelude::*;

/// A weight type of 32-value blocks with an f16 scale first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Blocks {
    /// Signed 8-bit values.
    Q8_0,
    /// 5-bit values stored plus 16.
    Q5_0,
}

impl Blocks {
    /// Bytes per block.
    pub fn bytes(self) -> usize {
        match self {
            Blocks::Q8_0 => Q8_0_BYTES,
            Blocks::Q5_0 => Q5_0_BYTES,
        }
    }
}

/// Activation rows quantized to Q8_0 blocks, with each block's scale as f32 and its sum (scale
/// times the sum of its integers); the scales and sums of each row are padded with zeros to a
/// whole number of groups of eight.
pub struct Activations {
    quants: Vec<u8>,
    scales: Vec<f32>,
    sums: Vec<f32>,
    blocks: usize,
    padded: usize,
}

impl Activations {
    /// Quantizes `tokens` rows of `columns` values (row major; `columns` a multiple of 32).
    pub fn quantize(x: &[f32], tokens: usize, columns: usize) -> Activations {
        assert_eq!(x.len(), tokens * columns, "activation size");
        let blocks = columns / BLOCK;
        let padded = blocks.next_multiple_of(8);
        let mut quants = vec![0u8; tokens * blocks * Q8_0_BYTES];
        let mut scales = vec![0f32; tokens * padded];
        let mut sums = vec![0f32; tokens * padded];
        let row = |(((values, q), d), s): Row<'_>| {
            kernels::quantize_q8_0(values, q);
            kernels::block_sums(q, &mut s[..blocks]);
            for (d, block) in d.iter_mut().zip(q.chunks_exact(Q8_0_BYTES)) {
                *d = half::f16::from_le_bytes([block[0], block[1]]).to_f32();
            }
        };
        // One token (decode) on this thread: waking the pool costs more than it saves.
        match tokens {
            1 => row((((x, &mut quants[..]), &mut scales[..]), &mut sums[..])),
            _ => x
                .par_chunks_exact(columns)
                .zip(quants.par_chunks_exact_mut(blocks * Q8_0_BYTES))
                .zip(scales.par_chunks_exact_mut(padded))
                .zip(sums.par_chunks_exact_mut(padded))
                .for_each(row),
        }
        Activations {
            quants,
            scales,
            sums,
            blocks,
            padded,
        }
    }

    /// Activation rows.
    pub fn tokens(&self) -> usize {
        self.sums.len() / self.padded.max(1)
    }

    /// Row `t`'s Q8_0 blocks.
    pub fn row(&self, t: usize) -> &[u8] {
        let stride = self.blocks * Q8_0_BYTES;
        &self.quants[t * stride..(t + 1) * stride]
    }

    /// Row `t`'s block scales, padded.
    pub(super) fn scales(&self, t: usize) -> &[f32] {
        &self.scales[t * self.padded..(t + 1) * self.padded]
    }

    /// Row `t`'s block sums.
    pub fn sums(&self, t: usize) -> &[f32] {
        &self.sums[t * self.padded..t * self.padded + self.blocks]
    }

    /// Row `t`'s block sums, padded.
    fn padded_sums(&self, t: usize) -> &[f32] {
        &self.sums[t * self.padded..(t + 1) * self.padded]
    }
}

/// One activation row being quantized: its values, then its blocks, scales and sums.
type Row<'a> = (((&'a [f32], &'a mut [u8]), &'a mut [f32]), &'a mut [f32]);

/// The product of one weight row of `kind` with activation row `t`, as the one-token kernels
/// compute it.
pub fn dot(kind: Blocks, w: &[u8], a: &Activations, t: usize) -> f32 {
    match kind {
        Blocks::Q8_0 => kernels::dot_q8_0(w, a.row(t)),
        Blocks::Q5_0 => kquants::dot_q5_0(w, a.row(t), a.sums(t)),
    }
}

/// `out[r * tokens + t]` = weight row `r` of `w` (consecutive rows of `kind` blocks, as many
/// values as an activation row) · activation row `t`, for every row of `w` and every token.
pub fn products(kind: Blocks, w: &[u8], a: &Activations, out: &mut [f32]) {
    let row_bytes = a.blocks * kind.bytes();
    assert_eq!(w.len() % row_bytes.max(1), 0, "whole weight rows");
    assert_eq!(
        out.len(),
        w.len() / row_bytes.max(1) * a.tokens(),
        "output size"
    );
    #[cfg(target_arch = "x86_64")]
    if kernels::simd() {
        // SAFETY: the features were detected; the sizes were checked above.
        #[allow(unsafe_code)]
        return unsafe { avx2::products(kind, w, a, out) };
    }
    let tokens = a.tokens();
    for (row, o) in w.chunks_exact(row_bytes).zip(out.chunks_exact_mut(tokens)) {
        for (t, v) in o.iter_mut().enumerate() {
            *v = dot(kind, row, a, t);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod avx2 {
    use super::{Activations, Blocks, Q5_0_BYTES};
    use crate::models::cpu::kernels::avx2::{eight_scales, sum_lanes, to_lanes, values};
    use crate::models::cpu::kernels::Q8_0_BYTES;
    use crate::models::cpu::kquants::avx2::q5_0_values;
    use std::arch::x86_64::*;

    /// Weight rows per tile.
    const ROWS: usize = 3;
    /// Tokens per tile.
    const TOKENS: usize = 2;

    /// # Safety
    /// AVX2, FMA and F16C must be available; `w` is whole rows of `a`'s length and `out` holds
    /// their products with every token.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn products(kind: Blocks, w: &[u8], a: &Activations, out: &mut [f32]) {
        match kind {
            Blocks::Q8_0 => tiles::<true, Q8_0_BYTES>(w, a, 0.0, out, |x| values(x)),
            Blocks::Q5_0 => tiles::<false, Q5_0_BYTES>(w, a, 16.0, out, |x| q5_0_values(x)),
        }
    }

    /// Every row of `w` against every token, [`ROWS`] × [`TOKENS`] at a time, the edges in
    /// smaller tiles.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tiles<const SIGNED: bool, const W: usize>(
        w: &[u8],
        a: &Activations,
        offset: f32,
        out: &mut [f32],
        unpack: impl Fn(&[u8]) -> __m256i + Copy,
    ) {
        let row_bytes = a.blocks * W;
        let tokens = a.tokens();
        let rows = w.len() / row_bytes;
        let whole_rows = rows / ROWS * ROWS;
        let whole_tokens = tokens / TOKENS * TOKENS;
        let row = |r: usize| &w[r * row_bytes..(r + 1) * row_bytes];
        for r in (0..whole_rows).step_by(ROWS) {
            let w = std::array::from_fn(|i| row(r + i));
            for t in (0..whole_tokens).step_by(TOKENS) {
                let p = tile::<ROWS, TOKENS, SIGNED, W>(w, a, t, offset, unpack);
                store(out, tokens, r, t, p);
            }
            for t in whole_tokens..tokens {
                let p = tile::<ROWS, 1, SIGNED, W>(w, a, t, offset, unpack);
                store(out, tokens, r, t, p);
            }
        }
        for r in whole_rows..rows {
            for t in (0..whole_tokens).step_by(TOKENS) {
                let p = tile::<1, TOKENS, SIGNED, W>([row(r)], a, t, offset, unpack);
                store(out, tokens, r, t, p);
            }
            for t in whole_tokens..tokens {
                let p = tile::<1, 1, SIGNED, W>([row(r)], a, t, offset, unpack);
                store(out, tokens, r, t, p);
            }
        }
    }

    /// Writes a tile's products at rows `r..` and tokens `t..` of `out` (rows × tokens).
    #[inline]
    pub(in crate::models::cpu) fn store<const R: usize, const T: usize>(
        out: &mut [f32],
        tokens: usize,
        r: usize,
        t: usize,
        p: [[f32; T]; R],
    ) {
        for (i, p) in p.iter().enumerate() {
            let at = (r + i) * tokens + t;
            out[at..at + T].copy_from_slice(p);
        }
    }

    /// The products of `R` weight rows with the `T` activation rows from `t`. `SIGNED` blocks
    /// (Q8_0) multiply through the sign trick of the one-token kernel; the others hold unsigned
    /// values whose `offset` is taken once per block from the activation sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tile<const R: usize, const T: usize, const SIGNED: bool, const W: usize>(
        w: [&[u8]; R],
        a: &Activations,
        t: usize,
        offset: f32,
        unpack: impl Fn(&[u8]) -> __m256i,
    ) -> [[f32; T]; R] {
        let blocks = a.blocks;
        let act: [&[u8]; T] = std::array::from_fn(|j| a.row(t + j));
        let scales: [&[f32]; T] = std::array::from_fn(|j| a.scales(t + j));
        let sums: [&[f32]; T] = std::array::from_fn(|j| a.padded_sums(t + j));
        assert!(w.iter().all(|w| w.len() >= blocks * W));
        for j in 0..T {
            assert!(act[j].len() >= blocks * Q8_0_BYTES);
            assert!(scales[j].len() >= blocks.next_multiple_of(8));
            assert!(sums[j].len() >= blocks.next_multiple_of(8));
        }
        let ones = _mm256_set1_epi16(1);
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut offsets = [[_mm256_setzero_ps(); T]; R];
        let mut d = [[[0f32; 8]; T]; R];
        let mut x = [_mm256_setzero_si256(); R];
        let mut m = [_mm256_setzero_si256(); R];
        for group in (0..blocks).step_by(8) {
            let count = (blocks - group).min(8);
            for i in 0..R {
                let ws = match count {
                    8 => eight_scales(&w[i][group * W..], W),
                    _ => {
                        let mut bits = [0u16; 8];
                        for (k, bits) in bits.iter_mut().enumerate().take(count) {
                            let at = (group + k) * W;
                            *bits = u16::from_le_bytes([w[i][at], w[i][at + 1]]);
                        }
                        // SAFETY: eight u16 from the array.
                        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(bits.as_ptr().cast()) })
                    }
                };
                for j in 0..T {
                    // SAFETY: the scales and sums are padded to whole groups of eight.
                    let ys = unsafe { _mm256_loadu_ps(scales[j].as_ptr().add(group)) };
                    d[i][j] = to_lanes(_mm256_mul_ps(ws, ys));
                    if !SIGNED {
                        // SAFETY: as for the scales.
                        let s = unsafe { _mm256_loadu_ps(sums[j].as_ptr().add(group)) };
                        offsets[i][j] = _mm256_fmadd_ps(ws, s, offsets[i][j]);
                    }
                }
            }
            for k in 0..count {
                let b = group + k;
                for i in 0..R {
                    // SAFETY: block `b` is below `blocks`, and the row holds `blocks` blocks of
                    // `W` bytes (asserted above).
                    x[i] =
                        unpack(unsafe { std::slice::from_raw_parts(w[i].as_ptr().add(b * W), W) });
                    m[i] = match SIGNED {
                        true => _mm256_sign_epi8(x[i], x[i]),
                        false => x[i],
                    };
                }
                for j in 0..T {
                    // SAFETY: 32 bytes from offset 2 of block `b`, below `blocks` (asserted).
                    let y = unsafe {
                        _mm256_loadu_si256(act[j].as_ptr().add(b * Q8_0_BYTES + 2).cast())
                    };
                    for i in 0..R {
                        let y = match SIGNED {
                            true => _mm256_sign_epi8(y, x[i]),
                            false => y,
                        };
                        let sums = _mm256_madd_epi16(_mm256_maddubs_epi16(m[i], y), ones);
                        let d = _mm256_broadcast_ss(&d[i][j][k]);
                        acc[i][j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sums), acc[i][j]);
                    }
                }
            }
        }
        let mut out = [[0f32; T]; R];
        for i in 0..R {
            for j in 0..T {
                out[i][j] = sum_lanes(acc[i][j]);
                if !SIGNED {
                    out[i][j] -= offset * sum_lanes(offsets[i][j]);
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_rows(kind: Blocks, rows: usize, blocks: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..rows * blocks)
            .flat_map(|_| {
                let mut block = half::f16::from_f32(rng.random_range(0.001..0.1))
                    .to_le_bytes()
                    .to_vec();
                block.extend((2..kind.bytes()).map(|_| match kind {
                    // Quantized values are within ±127.
                    Blocks::Q8_0 => rng.random_range(-127i8..=127) as u8,
                    _ => rng.random::<u8>(),
                }));
                block
            })
            .collect()
    }

    #[test]
    fn tiles_compute_every_product_as_the_one_token_kernels_do() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        // Row and token counts around the tile sizes; 18 and 64 blocks (a tail of 2 and none).
        for (rows, tokens, blocks) in [(5, 9, 18), (4, 8, 64), (1, 3, 2), (7, 1, 18)] {
            let x: Vec<f32> = (0..tokens * blocks * BLOCK)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let a = Activations::quantize(&x, tokens, blocks * BLOCK);
            for kind in [Blocks::Q8_0, Blocks::Q5_0] {
                let w = random_rows(kind, rows, blocks, rows as u64);
                let mut out = vec![f32::NAN; rows * tokens];
                products(kind, &w, &a, &mut out);
                let row_bytes = blocks * kind.bytes();
                for (r, row) in w.chunks_exact(row_bytes).enumerate() {
                    for t in 0..tokens {
                        let (got, want) = (out[r * tokens + t], dot(kind, row, &a, t));
                        if kind == Blocks::Q8_0 {
                            // Bit for bit: prefill must round as decode does.
                            assert_eq!(got.to_bits(), want.to_bits(), "{kind:?} {r} {t}");
                        } else {
                            let tolerance = 1e-5 * want.abs().max(1.0);
                            assert!((got - want).abs() <= tolerance, "{kind:?} {got} {want}");
                        }
                    }
                }
            }
        }
    }
}
