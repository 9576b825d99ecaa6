//! Q4_K weights interleaved eight rows at a time, and their products with Q8_K activations.
//!
//! As in [`super::interleaved`], the eight rows of a group share each K block's bytes, so
//! one pass over a block yields eight rows' products in one vector with no reduction across
//! lanes. A group block holds, in order:
//! - the eight rows' f16 `d` (16 bytes), then their f16 `dmin` (16 bytes);
//! - the 6-bit scales unpacked to bytes, `[sub-block][row]` (64 bytes);
//! - the 6-bit mins unpacked to bytes, `[pair of sub-blocks][row][2]` (64 bytes), so that one
//!   widening load puts a row's two mins of a pair in its 32-bit lane;
//! - for each pair `k` of 32-value sub-blocks, eight 32-byte vectors whose 4-byte lane `r`
//!   holds bytes `32k + 4m..32k + 4m + 4` of row `r`'s nibbles: low nibbles are values
//!   `4m..4m + 4` of sub-block `2k`, high nibbles those of sub-block `2k + 1` (1024 bytes).
//!
//! 1184 bytes for eight rows' 256 values, against 1152 in GGML's layout: the scales are
//! unpacked once at load, not once per block per token.
//!
//! A row's product with a Q8_K block is `d_y · (d · Σ_j scale_j · Σ q·y − dmin · Σ_j min_j ·
//! Σ y)`, the sums exact in integers, added to the row's accumulator in block order.

use super::huge_pages::{weight_buffer, WeightBuffer};
use super::interleaved::ROWS;
use super::kquants::{scales_and_mins, Q4K_BYTES, Q8K, QK_K};
use half::f16;

/// Where the eight `d` scales start in a group block.
pub(super) const D: usize = 0;
/// Where the eight `dmin` scales start.
pub(super) const DMIN: usize = 16;
/// Where the unpacked scales start.
pub(super) const SCALES: usize = 32;
/// Where the unpacked mins start.
const MINS: usize = 96;
/// Where the nibbles start.
const QS: usize = 160;
/// Bytes of one group block.
pub(super) const GROUP_BLOCK: usize = QS + 4 * 8 * 32;

/// Where row `lane`'s nibble bytes `32k + 4m..32k + 4m + 4` sit in a group block.
pub(super) fn nibbles_at(k: usize, m: usize, lane: usize) -> usize {
    QS + (8 * k + m) * 32 + 4 * lane
}

/// Where row `lane`'s min of sub-block `j` sits in a group block.
fn min_at(j: usize, lane: usize) -> usize {
    MINS + 16 * (j / 2) + 2 * lane + j % 2
}

/// A Q4_K matrix in groups of eight interleaved rows.
pub struct InterleavedQ4K {
    bytes: WeightBuffer<u8>,
    rows: usize,
    blocks: usize,
}

impl InterleavedQ4K {
    /// Interleaves `rows` GGML Q4_K rows of `columns` values (a multiple of 256).
    pub fn new(ggml: &[u8], rows: usize, columns: usize) -> InterleavedQ4K {
        let blocks = columns / QK_K;
        assert_eq!(ggml.len(), rows * blocks * Q4K_BYTES, "Q4_K matrix size");
        let mut bytes = weight_buffer(rows.div_ceil(ROWS) * blocks * GROUP_BLOCK);
        for (r, row) in ggml.chunks_exact(blocks * Q4K_BYTES).enumerate() {
            let lane = r % ROWS;
            for (b, x) in row.chunks_exact(Q4K_BYTES).enumerate() {
                let out = &mut bytes[(r / ROWS * blocks + b) * GROUP_BLOCK..][..GROUP_BLOCK];
                out[D + 2 * lane..][..2].copy_from_slice(&x[0..2]);
                out[DMIN + 2 * lane..][..2].copy_from_slice(&x[2..4]);
                let (scales, mins) = scales_and_mins(&x[4..16]);
                for j in 0..8 {
                    out[SCALES + 8 * j + lane] = scales[j];
                    out[min_at(j, lane)] = mins[j];
                }
                for k in 0..4 {
                    for m in 0..8 {
                        let from = 16 + 32 * k + 4 * m;
                        out[nibbles_at(k, m, lane)..][..4].copy_from_slice(&x[from..from + 4]);
                    }
                }
            }
        }
        InterleavedQ4K {
            bytes,
            rows,
            blocks,
        }
    }

    /// The group of row `r`, all its blocks.
    pub(super) fn group(&self, r: usize) -> &[u8] {
        let group_bytes = self.blocks * GROUP_BLOCK;
        &self.bytes[r / ROWS * group_bytes..][..group_bytes]
    }

    /// Row `r`'s values, computed as candle dequantizes Q4_K (an embedding lookup).
    pub fn values(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        assert_eq!(out.len(), self.blocks * QK_K, "row length");
        let lane = r % ROWS;
        let half = |g: &[u8], at: usize| f16::from_le_bytes([g[at], g[at + 1]]).to_f32();
        for (g, out) in self
            .group(r)
            .chunks_exact(GROUP_BLOCK)
            .zip(out.chunks_exact_mut(QK_K))
        {
            let (d, dmin) = (half(g, D + 2 * lane), half(g, DMIN + 2 * lane));
            for (j, out) in out.chunks_exact_mut(32).enumerate() {
                let scale = d * f32::from(g[SCALES + 8 * j + lane]);
                let min = dmin * f32::from(g[min_at(j, lane)]);
                for (i, v) in out.iter_mut().enumerate() {
                    let byte = g[nibbles_at(j / 2, i / 4, lane) + i % 4];
                    let q = if j % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                    *v = scale * f32::from(q) - min;
                }
            }
        }
    }

    /// `out[t * count + (r - first)]` = row `r` · activation row `t`, for the `count` rows
    /// from `first` (a multiple of eight) that `out` has room for (token-major); `a` holds
    /// `tokens` rows of Q8_K blocks.
    pub fn products(&self, first: usize, a: &[Q8K], tokens: usize, out: &mut [f32]) {
        let kernels = GroupKernels {
            scalar: scalar::group,
            #[cfg(target_arch = "x86_64")]
            avx2: avx2::group,
            #[cfg(target_arch = "x86_64")]
            avx512: super::interleaved_vnni::q4k_group,
        };
        let matrix = (self.rows, self.blocks, |r| self.group(r));
        each_group(matrix, first, a, tokens, out, kernels);
    }
}

/// An interleaved K type's products of one group (its group blocks, the number of blocks, the
/// activations, the output and the group's first row in it).
type GroupProducts = fn(&[u8], usize, &[Q8K], &mut [f32], usize);

/// The versions of an interleaved K type's group products.
pub(super) struct GroupKernels {
    /// The reference.
    pub scalar: GroupProducts,
    /// The AVX2 version: unsafe to call unless AVX2, FMA and F16C are present.
    #[cfg(target_arch = "x86_64")]
    pub avx2: unsafe fn(&[u8], usize, &[Q8K], &mut [f32], usize),
    /// The AVX-512 VNNI version: unsafe to call unless AVX2, FMA, F16C and AVX-512
    /// F/BW/VL/VNNI are present.
    #[cfg(target_arch = "x86_64")]
    pub avx512: unsafe fn(&[u8], usize, &[Q8K], &mut [f32], usize),
}

/// Checks the arguments of an interleaved K matrix's products (`rows` rows of `blocks` K
/// blocks, `group(r)` the group of row `r`; `a`, `tokens` rows of Q8_K blocks; `out`, tokens
/// × rows from `first`) and runs each group from row `first` through `kernels`.
pub(super) fn each_group<'w>(
    (rows, blocks, group): (usize, usize, impl Fn(usize) -> &'w [u8]),
    first: usize,
    a: &[Q8K],
    tokens: usize,
    out: &mut [f32],
    kernels: GroupKernels,
) {
    let tokens = tokens.max(1);
    assert_eq!(first % ROWS, 0, "groups start at multiples of eight");
    assert_eq!(a.len(), tokens * blocks, "activation rows");
    assert_eq!(out.len() % tokens, 0, "whole rows of products");
    let count = out.len() / tokens;
    assert!(first + count <= rows, "rows {first}+{count} of {rows}");
    #[cfg(target_arch = "x86_64")]
    let kernel = match super::level::level() {
        super::level::Level::Avx512 => Some(kernels.avx512),
        super::level::Level::Avx2 => Some(kernels.avx2),
        super::level::Level::Scalar => None,
    };
    for start in (0..count).step_by(ROWS) {
        let group = group(first + start);
        #[cfg(target_arch = "x86_64")]
        if let Some(kernel) = kernel {
            // SAFETY: the level's features were detected; `group` holds `blocks` group blocks
            // and `a` as many Q8_K blocks per token (asserted above).
            #[allow(unsafe_code)]
            unsafe {
                kernel(group, blocks, a, out, start)
            };
            continue;
        }
        (kernels.scalar)(group, blocks, a, out, start);
    }
}

/// The reference: each block's sums in integers, then scaled, in block order.
mod scalar {
    use super::{min_at, nibbles_at, D, DMIN, GROUP_BLOCK, Q8K, SCALES};
    use half::f16;

    /// The products of a group's rows with every token, written as rows `start..` of `out`
    /// (token-major, as many rows as it has room for).
    pub fn group(group: &[u8], blocks: usize, a: &[Q8K], out: &mut [f32], start: usize) {
        let tokens = a.len() / blocks;
        let count = out.len() / tokens;
        let half = |g: &[u8], at: usize| f16::from_le_bytes([g[at], g[at + 1]]).to_f32();
        for lane in 0..(count - start).min(super::ROWS) {
            for t in 0..tokens {
                out[t * count + start + lane] = group
                    .chunks_exact(GROUP_BLOCK)
                    .zip(&a[t * blocks..(t + 1) * blocks])
                    .fold(0f32, |acc, (g, y)| {
                        let (mut dot, mut offset) = (0i32, 0i32);
                        for j in 0..8 {
                            let sub: i32 = (0..32)
                                .map(|i| {
                                    let byte = g[nibbles_at(j / 2, i / 4, lane) + i % 4];
                                    let q = if j % 2 == 0 { byte & 0x0f } else { byte >> 4 };
                                    i32::from(q) * i32::from(y.qs[32 * j + i])
                                })
                                .sum();
                            dot += i32::from(g[SCALES + 8 * j + lane]) * sub;
                            let sum = i32::from(y.bsums[2 * j]) + i32::from(y.bsums[2 * j + 1]);
                            offset += i32::from(g[min_at(j, lane)]) * sum;
                        }
                        let (d, dmin) = (half(g, D + 2 * lane), half(g, DMIN + 2 * lane));
                        // As the SIMD passes round it: d_y applied to each sum, then fused.
                        let (dot, offset) = (dot as f32 * y.d, offset as f32 * y.d);
                        (-dmin).mul_add(offset, d.mul_add(dot, acc))
                    });
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod avx2 {
    use super::{nibbles_at, D, DMIN, GROUP_BLOCK, MINS, Q8K, SCALES};
    use crate::models::cpu::interleaved::avx2::{each_pass, four, TOKENS};
    use crate::models::cpu::kernels::avx2::prefetch_part;
    use std::arch::x86_64::*;

    /// # Safety
    /// AVX2, FMA and F16C must be available; `group` holds `blocks` group blocks and `a`
    /// `blocks` Q8_K blocks per token.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn group(group: &[u8], blocks: usize, a: &[Q8K], out: &mut [f32], start: usize) {
        let (four, one) = (
            |t| pass::<TOKENS>(group, blocks, a, t),
            |t| pass::<1>(group, blocks, a, t),
        );
        each_pass(out, a.len() / blocks, start, four, one);
    }

    /// Sub-block `j`'s eight scales, each in both 16-bit halves of its row's lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn scales(base: *const u8, j: usize) -> __m256i {
        // SAFETY: eight bytes of scales within the group block (the callers' `base`).
        let s = _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(base.add(SCALES + 8 * j).cast()) });
        _mm256_or_si256(s, _mm256_slli_epi32(s, 16))
    }

    /// The eight rows' `Σ_j scale_j · Σ q·y` for one group block at `base` and one Q8_K block
    /// (asking for a later block's lines as it goes if `fetch`).
    /// Each `maddubs` lane is at most 2 · 15 · 127 = 3810, so a sub-block's eight add up in
    /// i16; `madd` with the duplicated scales then sums a lane's pair times its row's scale.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dots(base: *const u8, y: &Q8K, fetch: bool) -> __m256i {
        let low = _mm256_set1_epi8(0x0f);
        let mut sum = _mm256_setzero_si256();
        for k in 0..4 {
            if fetch {
                prefetch_part(base, GROUP_BLOCK, k, 4);
            }
            let (mut l, mut h) = (_mm256_setzero_si256(), _mm256_setzero_si256());
            // SAFETY: sub-blocks `2k` and `2k + 1` of the block's 256 values.
            let (yl, yh) = unsafe { (y.qs.as_ptr().add(64 * k), y.qs.as_ptr().add(64 * k + 32)) };
            for m in 0..8 {
                // SAFETY: vector `m` of pair `k`, within the group block.
                let v = unsafe { _mm256_loadu_si256(base.add(nibbles_at(k, m, 0)).cast()) };
                let (vl, vh) = (
                    _mm256_and_si256(v, low),
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                );
                l = _mm256_add_epi16(l, _mm256_maddubs_epi16(vl, four(yl.cast(), m)));
                h = _mm256_add_epi16(h, _mm256_maddubs_epi16(vh, four(yh.cast(), m)));
            }
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(l, scales(base, 2 * k)));
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(h, scales(base, 2 * k + 1)));
        }
        sum
    }

    /// The eight rows' `Σ_j min_j · Σ y` for one group block at `base` and one Q8_K block:
    /// a pair's two mins per lane, `madd` with the pair's two activation sums.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::models::cpu) fn offsets(base: *const u8, y: &Q8K) -> __m256i {
        let mut sum = _mm256_setzero_si256();
        for p in 0..4 {
            // SAFETY: sixteen bytes of mins within the group block.
            let mins =
                _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(base.add(MINS + 16 * p).cast()) });
            let s = &y.bsums[4 * p..4 * p + 4];
            let (first, second) = (s[0] + s[1], s[2] + s[3]);
            let pair = i32::from(first as u16) | (i32::from(second) << 16);
            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(mins, _mm256_set1_epi32(pair)));
        }
        sum
    }

    /// The eight rows' products with activation rows `t..t + T`, one lane per row.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn pass<const T: usize>(group: &[u8], blocks: usize, a: &[Q8K], t: usize) -> [__m256; T] {
        assert!(group.len() >= blocks * GROUP_BLOCK && a.len() >= (t + T) * blocks);
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..blocks {
            // SAFETY: block `b` of the group lies within it (asserted above).
            let base = unsafe { group.as_ptr().add(b * GROUP_BLOCK) };
            // SAFETY: 16 bytes of `d` and of `dmin` at the block's start.
            let (d, dmin) = unsafe {
                (
                    _mm256_cvtph_ps(_mm_loadu_si128(base.add(D).cast())),
                    _mm256_cvtph_ps(_mm_loadu_si128(base.add(DMIN).cast())),
                )
            };
            for (j, acc) in acc.iter_mut().enumerate() {
                let y = &a[(t + j) * blocks + b];
                let dy = _mm256_set1_ps(y.d);
                let dot = _mm256_mul_ps(_mm256_cvtepi32_ps(dots(base, y, j == 0)), dy);
                let offset = _mm256_mul_ps(_mm256_cvtepi32_ps(offsets(base, y)), dy);
                *acc = _mm256_fnmadd_ps(dmin, offset, _mm256_fmadd_ps(d, dot, *acc));
            }
        }
        acc
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::models::cpu::interleaved::tests::candle_values;
    use crate::models::cpu::kquants::quantize_q8k;
    use candle_core::quantized::k_quants::BlockQ4K;
    use rand::{Rng, SeedableRng};

    /// Random GGML Q4_K rows: `d` and `dmin` in 0.001..0.01, every other byte random.
    pub(in crate::models::cpu) fn random_rows(
        rows: usize,
        blocks: usize,
        rng: &mut impl Rng,
    ) -> Vec<u8> {
        (0..rows * blocks)
            .flat_map(|_| {
                let mut block: Vec<u8> = (0..Q4K_BYTES).map(|_| rng.random()).collect();
                for at in [0, 2] {
                    let scale = f16::from_f32(rng.random_range(0.001..0.01));
                    block[at..at + 2].copy_from_slice(&scale.to_le_bytes());
                }
                block
            })
            .collect()
    }

    /// Checks `products(first, a, tokens, out)` of a matrix whose rows dequantize to
    /// `expected` (`blocks` K blocks each), and `reference` (the scalar version, same
    /// arguments but `tokens`), against the exact products of `expected` with the dequantized
    /// activations, for 1, 4 and 7 tokens, from group 0 and each later group.
    pub(in crate::models::cpu) fn check_products(
        expected: &[Vec<f32>],
        blocks: usize,
        rng: &mut impl Rng,
        products: impl Fn(usize, &[Q8K], usize, &mut [f32]),
        reference: impl Fn(usize, &[Q8K], &mut [f32]),
    ) {
        let (rows, columns) = (expected.len(), blocks * QK_K);
        for tokens in [1, 4, 7] {
            let x: Vec<f32> = (0..tokens * columns)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let mut a = vec![Q8K::ZERO; tokens * blocks];
            quantize_q8k(&x, &mut a);
            let y: Vec<f32> = a
                .iter()
                .flat_map(|b| b.qs.iter().map(|&q| b.d * f32::from(q)))
                .collect();
            for first in (0..rows).step_by(ROWS) {
                let count = rows - first;
                let (mut simd, mut scalar) =
                    (vec![0f32; count * tokens], vec![0f32; count * tokens]);
                products(first, &a, tokens, &mut simd);
                reference(first, &a, &mut scalar);
                if crate::models::cpu::level::level() > crate::models::cpu::level::Level::Scalar {
                    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                    assert_eq!(bits(&simd), bits(&scalar), "SIMD and scalar bits");
                }
                for i in 0..count {
                    for t in 0..tokens {
                        let exact: f64 = expected[first + i]
                            .iter()
                            .zip(&y[t * columns..(t + 1) * columns])
                            .map(|(w, y)| f64::from(*w) * f64::from(*y))
                            .sum();
                        for got in [simd[t * count + i], scalar[t * count + i]] {
                            assert!(
                                (f64::from(got) - exact).abs() <= 1e-4 * (1.0 + exact.abs()),
                                "row {} token {t}: {got} vs {exact}",
                                first + i
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn interleaved_q4k_rows_multiply_and_read_back_as_candle_dequantizes_them() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (rows, blocks) in [(1, 1), (8, 2), (13, 3), (19, 1)] {
            let ggml = random_rows(rows, blocks, &mut rng);
            let w = InterleavedQ4K::new(&ggml, rows, blocks * QK_K);
            let expected: Vec<Vec<f32>> = ggml
                .chunks_exact(blocks * Q4K_BYTES)
                .map(candle_values::<BlockQ4K>)
                .collect();
            for (r, expected) in expected.iter().enumerate() {
                let mut got = vec![0f32; blocks * QK_K];
                w.values(r, &mut got);
                assert_eq!(&got, expected, "row {r} of {rows}");
            }
            let reference = |first: usize, a: &[Q8K], out: &mut [f32]| {
                for start in (0..rows - first).step_by(ROWS) {
                    scalar::group(w.group(first + start), blocks, a, out, start);
                }
            };
            check_products(
                &expected,
                blocks,
                &mut rng,
                |first, a, tokens, out| w.products(first, a, tokens, out),
                reference,
            );
        }
    }

    /// Checks that `products` (as in [`check_products`]) of one token round as the same
    /// token's among six do, bit for bit, on `rows` rows of `blocks` K blocks.
    pub(in crate::models::cpu) fn check_one_token_as_among_many(
        rows: usize,
        blocks: usize,
        rng: &mut impl Rng,
        products: impl Fn(usize, &[Q8K], usize, &mut [f32]),
    ) {
        let tokens = 6;
        let x: Vec<f32> = (0..tokens * blocks * QK_K)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let mut a = vec![Q8K::ZERO; tokens * blocks];
        quantize_q8k(&x, &mut a);
        let mut many = vec![0f32; rows * tokens];
        products(0, &a, tokens, &mut many);
        for t in 0..tokens {
            let mut one = vec![0f32; rows];
            products(0, &a[t * blocks..(t + 1) * blocks], 1, &mut one);
            for r in 0..rows {
                let many = many[t * rows + r];
                assert_eq!(one[r].to_bits(), many.to_bits(), "row {r} token {t}");
            }
        }
    }

    #[test]
    fn one_token_rounds_as_it_does_among_many() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let (rows, blocks) = (16, 2);
        let w = InterleavedQ4K::new(&random_rows(rows, blocks, &mut rng), rows, blocks * QK_K);
        check_one_token_as_among_many(rows, blocks, &mut rng, |f, a, t, o| w.products(f, a, t, o));
    }
}
