//! Q4_0 weights interleaved eight rows at a time, and their products with Q8_0 activations.
//!
//! In GGML's layout each row is its own run of blocks, so a product takes one row at a time:
//! its per-block sum is spread over a vector's lanes and must be reduced, and the activation
//! block is reloaded for every row. Here the eight rows of a group share each block's bytes:
//! the eight f16 scales first (one load converts all of them), then four 32-byte vectors whose
//! 4-byte lane `r` holds bytes `4m..4m + 4` of row `r`'s block. The low nibbles of vector `m`
//! are then values `4m..4m + 4` of every row and the high nibbles values `16 + 4m..`; each is
//! multiplied with those four activation bytes broadcast to all lanes, so lane `r` of the sum
//! is row `r`'s product and eight rows come out in one vector, with no reduction across lanes.
//! A matrix whose row count is not a multiple of eight has its last group padded with zero
//! rows, never read back.

use super::kernels::{BLOCK, Q4_0_BYTES, Q8_0_BYTES};
use super::tiles::Activations;

/// Rows per interleaved group.
pub const ROWS: usize = 8;
/// Bytes of one block of a group: eight f16 scales, then eight rows' 16 bytes of nibbles.
const GROUP_BLOCK: usize = 2 * ROWS + ROWS * 16;

/// A Q4_0 matrix in groups of eight interleaved rows.
pub struct Q4_0x8 {
    bytes: Vec<u8>,
    rows: usize,
    blocks: usize,
}

impl Q4_0x8 {
    /// Interleaves `rows` GGML Q4_0 rows of `columns` values.
    pub fn new(ggml: &[u8], rows: usize, columns: usize) -> Q4_0x8 {
        let blocks = columns / BLOCK;
        assert_eq!(ggml.len(), rows * blocks * Q4_0_BYTES, "Q4_0 matrix size");
        let groups = rows.div_ceil(ROWS);
        let mut bytes = vec![0u8; groups * blocks * GROUP_BLOCK];
        for (r, row) in ggml.chunks_exact(blocks * Q4_0_BYTES).enumerate() {
            for (b, block) in row.chunks_exact(Q4_0_BYTES).enumerate() {
                let out = &mut bytes[Self::offset(blocks, r, b)..][..GROUP_BLOCK];
                let lane = r % ROWS;
                out[2 * lane..2 * lane + 2].copy_from_slice(&block[..2]);
                for m in 0..4 {
                    let at = 2 * ROWS + m * 32 + 4 * lane;
                    out[at..at + 4].copy_from_slice(&block[2 + 4 * m..6 + 4 * m]);
                }
            }
        }
        Q4_0x8 {
            bytes,
            rows,
            blocks,
        }
    }

    /// Where block `b` of row `r`'s group starts.
    fn offset(blocks: usize, r: usize, b: usize) -> usize {
        (r / ROWS * blocks + b) * GROUP_BLOCK
    }

    /// Row `r` in GGML's layout (for an embedding lookup).
    pub fn row(&self, r: usize) -> Vec<u8> {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        let lane = r % ROWS;
        let mut out = vec![0u8; self.blocks * Q4_0_BYTES];
        for (b, block) in out.chunks_exact_mut(Q4_0_BYTES).enumerate() {
            let group = &self.bytes[Self::offset(self.blocks, r, b)..][..GROUP_BLOCK];
            block[..2].copy_from_slice(&group[2 * lane..2 * lane + 2]);
            for m in 0..4 {
                let at = 2 * ROWS + m * 32 + 4 * lane;
                block[2 + 4 * m..6 + 4 * m].copy_from_slice(&group[at..at + 4]);
            }
        }
        out
    }

    /// `out[(r - first) * tokens + t]` = row `r` · activation row `t`, for the rows from
    /// `first` (a multiple of eight) that `out` has room for and every token of `a`.
    pub fn products(&self, first: usize, a: &Activations, out: &mut [f32]) {
        let tokens = a.tokens();
        assert_eq!(first % ROWS, 0, "groups start at multiples of eight");
        assert_eq!(out.len() % tokens.max(1), 0, "whole rows of products");
        let count = out.len() / tokens.max(1);
        assert!(
            first + count <= self.rows,
            "rows {first}+{count} of {}",
            self.rows
        );
        assert!(a.row(0).len() >= self.blocks * Q8_0_BYTES || tokens == 0);
        let group_bytes = self.blocks * GROUP_BLOCK;
        for (i, start) in (0..count).step_by(ROWS).enumerate() {
            let g = first / ROWS + i;
            let group = &self.bytes[g * group_bytes..(g + 1) * group_bytes];
            let valid = (count - start).min(ROWS);
            let out = &mut out[start * tokens..(start + valid) * tokens];
            #[cfg(target_arch = "x86_64")]
            if super::kernels::simd() {
                // SAFETY: the features were detected; `group` holds `self.blocks` blocks of
                // the group, and every activation row as many Q8_0 blocks (asserted above).
                #[allow(unsafe_code)]
                unsafe {
                    avx2::group(group, self.blocks, a, out)
                };
                continue;
            }
            scalar::group(group, self.blocks, a, out);
        }
    }
}

/// The reference: each product summed in integers per block, then scaled, in block order.
mod scalar {
    use super::{Activations, GROUP_BLOCK, Q8_0_BYTES, ROWS};
    use half::f16;

    /// The products of a group's first `out.len() / tokens` rows with every token.
    pub fn group(group: &[u8], blocks: usize, a: &Activations, out: &mut [f32]) {
        let tokens = a.tokens();
        for (lane, o) in out.chunks_exact_mut(tokens).enumerate() {
            for (t, o) in o.iter_mut().enumerate() {
                let (y, sums) = (a.row(t), a.sums(t));
                *o = (0..blocks)
                    .map(|b| {
                        let g = &group[b * GROUP_BLOCK..][..GROUP_BLOCK];
                        let y = &y[b * Q8_0_BYTES..][..Q8_0_BYTES];
                        let dw = f16::from_le_bytes([g[2 * lane], g[2 * lane + 1]]).to_f32();
                        let dy = f16::from_le_bytes([y[0], y[1]]).to_f32();
                        let dot: i32 = (0..16)
                            .map(|j| {
                                let byte = g[2 * ROWS + j / 4 * 32 + 4 * lane + j % 4];
                                i32::from(byte & 0x0f) * i32::from(y[2 + j] as i8)
                                    + i32::from(byte >> 4) * i32::from(y[18 + j] as i8)
                            })
                            .sum();
                        dw * (dot as f32 * dy - 8.0 * sums[b])
                    })
                    .sum();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::{Activations, GROUP_BLOCK, Q8_0_BYTES, ROWS};
    use crate::models::cpu::kernels::avx2::{prefetch, to_lanes};
    use std::arch::x86_64::*;

    /// Tokens per pass over a group's blocks.
    const TOKENS: usize = 4;

    /// # Safety
    /// AVX2, FMA and F16C must be available; `group` holds `blocks` blocks of a group and each
    /// activation row of `a` as many Q8_0 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group(group: &[u8], blocks: usize, a: &Activations, out: &mut [f32]) {
        let tokens = a.tokens();
        let whole = tokens / TOKENS * TOKENS;
        for t in (0..whole).step_by(TOKENS) {
            let p = pass::<TOKENS>(group, blocks, a, t);
            store(out, tokens, t, &p);
        }
        for t in whole..tokens {
            let p = pass::<1>(group, blocks, a, t);
            store(out, tokens, t, &p);
        }
    }

    /// Writes the products of tokens `t..` into `out` (rows × tokens, as many rows as it has).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn store<const T: usize>(out: &mut [f32], tokens: usize, t: usize, p: &[__m256; T]) {
        if tokens == 1 && out.len() == ROWS {
            // SAFETY: `out` holds eight floats.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), p[0]) };
            return;
        }
        for (j, p) in p.iter().enumerate() {
            for (r, v) in to_lanes(*p).iter().enumerate().take(out.len() / tokens) {
                out[r * tokens + t + j] = *v;
            }
        }
    }

    /// The eight rows' products with activation rows `t..t + T`, one lane per row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn pass<const T: usize>(group: &[u8], blocks: usize, a: &Activations, t: usize) -> [__m256; T] {
        assert!(group.len() >= blocks * GROUP_BLOCK);
        let act: [&[u8]; T] = std::array::from_fn(|j| a.row(t + j));
        let scales: [&[f32]; T] = std::array::from_fn(|j| a.scales(t + j));
        let sums: [&[f32]; T] = std::array::from_fn(|j| a.sums(t + j));
        for j in 0..T {
            assert!(act[j].len() >= blocks * Q8_0_BYTES);
            assert!(scales[j].len() >= blocks && sums[j].len() >= blocks);
        }
        let low = _mm256_set1_epi8(0x0f);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..blocks {
            // SAFETY: block `b` of the group lies within it (asserted above).
            let base = unsafe { group.as_ptr().add(b * GROUP_BLOCK) };
            prefetch(base, GROUP_BLOCK.div_ceil(64));
            // SAFETY: 16 bytes of scales at the block's start.
            let dw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(base.cast()) });
            let mut v = [_mm256_setzero_si256(); 8];
            for m in 0..4 {
                // SAFETY: vector `m` of the block's nibbles, 32 bytes within it.
                let p = unsafe { _mm256_loadu_si256(base.add(2 * ROWS + 32 * m).cast()) };
                v[m] = _mm256_and_si256(p, low);
                v[m + 4] = _mm256_and_si256(_mm256_srli_epi16(p, 4), low);
            }
            for j in 0..T {
                // SAFETY: the 32 values of activation block `b`, within the row (asserted).
                let y = unsafe { act[j].as_ptr().add(b * Q8_0_BYTES + 2) };
                // Each `maddubs` lane is at most 2 · 15 · 127 = 3810; eight of them fit in i16.
                let mut s = _mm256_setzero_si256();
                for (k, v) in v.iter().enumerate() {
                    // SAFETY: four bytes at `4k` of the block's 32 values.
                    let y4 = unsafe { std::ptr::read_unaligned(y.add(4 * k).cast::<i32>()) };
                    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(*v, _mm256_set1_epi32(y4)));
                }
                let dot = _mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones));
                // Row `r`: d_w · (d_y · Σ q·y − 8 · d_y · Σ y), the nibbles' offset of 8.
                let scaled = _mm256_fmsub_ps(
                    dot,
                    _mm256_set1_ps(scales[j][b]),
                    _mm256_set1_ps(8.0 * sums[j][b]),
                );
                acc[j] = _mm256_fmadd_ps(dw, scaled, acc[j]);
            }
        }
        acc
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn interleaved_rows_multiply_and_read_back_as_ggml_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Row counts around the group size; 18 and 3 blocks per row; token counts around the
        // pass size.
        for (rows, tokens, blocks) in [(19, 9, 18), (8, 1, 3), (5, 4, 18), (16, 6, 3)] {
            let ggml: Vec<u8> = (0..rows * blocks)
                .flat_map(|_| {
                    let scale = half::f16::from_f32(rng.random_range(0.001..0.1));
                    let mut block = scale.to_le_bytes().to_vec();
                    block.extend((0..16).map(|_| rng.random::<u8>()));
                    block
                })
                .collect();
            let x: Vec<f32> = (0..tokens * blocks * BLOCK)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let a = Activations::quantize(&x, tokens, blocks * BLOCK);
            let w = Q4_0x8::new(&ggml, rows, blocks * BLOCK);
            let row_bytes = blocks * Q4_0_BYTES;
            for (r, row) in ggml.chunks_exact(row_bytes).enumerate() {
                assert_eq!(w.row(r), row, "row {r}");
            }
            // From the second group on, and from the first: every product near GGML's.
            for first in [8.min(rows / 8 * 8), 0] {
                let mut out = vec![f32::NAN; (rows - first) * tokens];
                w.products(first, &a, &mut out);
                let mut reference = vec![f32::NAN; (rows - first) * tokens];
                for g in (first..rows).step_by(ROWS) {
                    let group = &w.bytes[g / ROWS * blocks * GROUP_BLOCK..][..blocks * GROUP_BLOCK];
                    let valid = (rows - g).min(ROWS);
                    let o = &mut reference[(g - first) * tokens..(g - first + valid) * tokens];
                    scalar::group(group, blocks, &a, o);
                }
                for (r, row) in ggml.chunks_exact(row_bytes).enumerate().skip(first) {
                    for t in 0..tokens {
                        let want = dequantized_dot(row, a.row(t));
                        let got = [
                            out[(r - first) * tokens + t],
                            reference[(r - first) * tokens + t],
                        ];
                        for got in got {
                            let tolerance = 1e-4 * want.abs().max(1.0);
                            assert!((got - want).abs() <= tolerance, "{r} {t}: {got} {want}");
                        }
                    }
                }
            }
        }
    }

    /// A Q4_0 row times a Q8_0 row through their dequantized values, in f64.
    fn dequantized_dot(w: &[u8], y: &[u8]) -> f32 {
        let scale = |b: &[u8]| f64::from(half::f16::from_le_bytes([b[0], b[1]]).to_f32());
        w.chunks_exact(Q4_0_BYTES)
            .zip(y.chunks_exact(Q8_0_BYTES))
            .map(|(w, y)| {
                let values = (0..BLOCK).map(|j| {
                    let byte = w[2 + j % 16];
                    let q = if j < 16 { byte & 0x0f } else { byte >> 4 };
                    f64::from(i32::from(q) - 8) * f64::from(y[2 + j] as i8)
                });
                scale(w) * scale(y) * values.sum::<f64>()
            })
            .sum::<f64>() as f32
    }
}
