//! Q6_K weights interleaved eight rows at a time, and their products with Q8_K activations.
//!
//! As in [`super::interleaved_q4k`], one pass over a group block yields eight rows' products
//! in one vector. GGML's Q6_K block holds 128 bytes of low nibbles (`ql`), 64 bytes of high
//! 2-bit pairs (`qh`), sixteen `i8` scales (one per 16 values) and an f16 `d`; in each half
//! `n` of 128 values, `ql` bytes `64n + l` and `64n + 32 + l` and `qh` byte `32n + l` give
//! values `l`, `l + 32`, `l + 64` and `l + 96` (low nibbles, then high nibbles; the `qh` byte's
//! bit pairs in that order). A group block holds, in order:
//! - the eight rows' f16 `d` (16 bytes);
//! - the scales, `[pair of 16-value groups][row][2]` (128 bytes), so that one widening load
//!   puts a row's two scales of a pair in its 32-bit lane;
//! - for each half `n` and `m` in 0..8, three 32-byte vectors whose 4-byte lane `r` holds
//!   row `r`'s bytes `4m..4m + 4` of `ql[64n..]`, of `ql[64n + 32..]` and of `qh[32n..]`
//!   (1536 bytes).
//!
//! 1680 bytes for eight rows, as in GGML's layout. The values are multiplied unsigned (0..64)
//! and the offset of 32 taken once per block from the activations' 16-value sums:
//! `Σ s·(q − 32)·y = Σ s·q·y − 32·Σ s·bsum`.

use super::huge_pages::{weight_buffer, WeightBuffer};
use super::interleaved::ROWS;
use super::kquants::{Q6K_BYTES, Q8K, QK_K};
use half::f16;

/// Where the eight `d` scales start in a group block.
pub(super) const D: usize = 0;
/// Where the scales start.
const SCALES: usize = 16;
/// Where the value vectors start.
const VALUES: usize = 144;
/// Bytes of one group block.
pub(super) const GROUP_BLOCK: usize = VALUES + 2 * 8 * 3 * 32;

/// Where row `lane`'s four bytes of vector `which` (0: `ql`, 1: `ql + 32`, 2: `qh`) of half
/// `n` and step `m` sit in a group block.
pub(super) fn vector_at(n: usize, m: usize, which: usize, lane: usize) -> usize {
    VALUES + ((8 * n + m) * 3 + which) * 32 + 4 * lane
}

/// Where row `lane`'s scale of 16-value group `g` sits in a group block.
fn scale_at(g: usize, lane: usize) -> usize {
    SCALES + 16 * (g / 2) + 2 * lane + g % 2
}

/// A Q6_K matrix in groups of eight interleaved rows.
pub struct InterleavedQ6K {
    bytes: WeightBuffer<u8>,
    rows: usize,
    blocks: usize,
}

impl InterleavedQ6K {
    /// Interleaves `rows` GGML Q6_K rows of `columns` values (a multiple of 256).
    pub fn new(ggml: &[u8], rows: usize, columns: usize) -> InterleavedQ6K {
        let blocks = columns / QK_K;
        assert_eq!(ggml.len(), rows * blocks * Q6K_BYTES, "Q6_K matrix size");
        let mut bytes = weight_buffer(rows.div_ceil(ROWS) * blocks * GROUP_BLOCK);
        for (r, row) in ggml.chunks_exact(blocks * Q6K_BYTES).enumerate() {
            let lane = r % ROWS;
            for (b, x) in row.chunks_exact(Q6K_BYTES).enumerate() {
                let out = &mut bytes[(r / ROWS * blocks + b) * GROUP_BLOCK..][..GROUP_BLOCK];
                out[D + 2 * lane..][..2].copy_from_slice(&x[208..210]);
                for g in 0..16 {
                    out[scale_at(g, lane)] = x[192 + g];
                }
                for n in 0..2 {
                    for m in 0..8 {
                        let from = [64 * n + 4 * m, 64 * n + 32 + 4 * m, 128 + 32 * n + 4 * m];
                        for (which, from) in from.into_iter().enumerate() {
                            out[vector_at(n, m, which, lane)..][..4]
                                .copy_from_slice(&x[from..from + 4]);
                        }
                    }
                }
            }
        }
        InterleavedQ6K {
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

    /// Row `r`'s values, computed as candle dequantizes Q6_K (an embedding lookup).
    pub fn values(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        assert_eq!(out.len(), self.blocks * QK_K, "row length");
        let lane = r % ROWS;
        for (g, out) in self
            .group(r)
            .chunks_exact(GROUP_BLOCK)
            .zip(out.chunks_exact_mut(QK_K))
        {
            let d = f16::from_le_bytes([g[D + 2 * lane], g[D + 2 * lane + 1]]).to_f32();
            for (i, v) in out.iter_mut().enumerate() {
                let scale = f32::from(g[scale_at(i / 16, lane)] as i8);
                *v = d * scale * f32::from(value(g, lane, i) as i8 - 32);
            }
        }
    }

    /// `out[t * count + (r - first)]` = row `r` · activation row `t`, for the `count` rows
    /// from `first` (a multiple of eight) that `out` has room for (token-major); `a` holds
    /// `tokens` rows of Q8_K blocks.
    pub fn products(&self, first: usize, a: &[Q8K], tokens: usize, out: &mut [f32]) {
        let kernels = super::interleaved_q4k::GroupKernels {
            scalar: scalar::group,
            #[cfg(target_arch = "x86_64")]
            avx2: avx2::group,
            #[cfg(target_arch = "x86_64")]
            avx512: super::interleaved_vnni::q6k_group,
        };
        let matrix = (self.rows, self.blocks, |r| self.group(r));
        super::interleaved_q4k::each_group(matrix, first, a, tokens, out, kernels);
    }
}

/// Value `i` (0..256) of row `lane` in a group block, 0..64 (before the offset of 32).
fn value(g: &[u8], lane: usize, i: usize) -> u8 {
    let (n, quarter, l) = (i / 128, i % 128 / 32, i % 32);
    let low = g[vector_at(n, l / 4, quarter % 2, lane) + l % 4];
    let low = if quarter < 2 { low & 0x0f } else { low >> 4 };
    let high = g[vector_at(n, l / 4, 2, lane) + l % 4] >> (2 * quarter) & 3;
    low | high << 4
}

/// The reference: each block's sums in integers, then scaled, in block order.
mod scalar {
    use super::{scale_at, value, D, GROUP_BLOCK, Q8K};
    use half::f16;

    /// The products of a group's rows with every token, written as rows `start..` of `out`
    /// (token-major, as many rows as it has room for).
    pub fn group(group: &[u8], blocks: usize, a: &[Q8K], out: &mut [f32], start: usize) {
        let tokens = a.len() / blocks;
        let count = out.len() / tokens;
        for lane in 0..(count - start).min(super::ROWS) {
            for t in 0..tokens {
                out[t * count + start + lane] = group
                    .chunks_exact(GROUP_BLOCK)
                    .zip(&a[t * blocks..(t + 1) * blocks])
                    .fold(0f32, |acc, (g, y)| {
                        let dot: i32 = (0..16)
                            .map(|k| {
                                let sum: i32 = (16 * k..16 * k + 16)
                                    .map(|i| {
                                        (i32::from(value(g, lane, i)) - 32) * i32::from(y.qs[i])
                                    })
                                    .sum();
                                i32::from(g[scale_at(k, lane)] as i8) * sum
                            })
                            .sum();
                        let d = f16::from_le_bytes([g[D + 2 * lane], g[D + 2 * lane + 1]]);
                        // As the SIMD passes round it: d · (d_y · Σ) fused into the sum.
                        d.to_f32().mul_add(dot as f32 * y.d, acc)
                    });
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod avx2 {
    use super::{vector_at, D, GROUP_BLOCK, Q8K, SCALES};
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

    /// Pair `p`'s scales: lane `r` holds row `r`'s scales of groups `2p` and `2p + 1` as i16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::models::cpu) fn pair(base: *const u8, p: usize) -> __m256i {
        // SAFETY: sixteen bytes of scales within the group block (the callers' `base`).
        _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(base.add(SCALES + 16 * p).cast()) })
    }

    /// The eight rows' `Σ_g scale_g · Σ q·y` (values 0..64) for one group block at `base` and
    /// one Q8_K block (asking for a later block's lines as it goes if `fetch`). Each step `m`
    /// of a half unpacks its three vectors into the four quarters' values (the `qh` pair
    /// moved to bits 4..6 by one shift and mask). A `maddubs` lane is at most 2 · 63 · 127 =
    /// 16002, so two steps add up in i16 before `madd` with their group's scale, duplicated
    /// in both halves of each lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn dots(base: *const u8, y: &Q8K, fetch: bool) -> __m256i {
        let load = |n: usize, m: usize, which: usize| {
            // SAFETY: a value vector within the group block.
            unsafe { _mm256_loadu_si256(base.add(vector_at(n, m, which, 0)).cast()) }
        };
        let mut sum = _mm256_setzero_si256();
        for n in 0..2 {
            // SAFETY: the half's 128 activations within the block's 256.
            let y = unsafe { y.qs.as_ptr().add(128 * n) }.cast::<u8>();
            for half in 0..2 {
                if fetch {
                    prefetch_part(base, GROUP_BLOCK, 2 * n + half, 4);
                }
                // Each quarter's scales of this half: group `2p + half` of pair `p = 4n + quarter`.
                let pattern = |p: __m256i| match half {
                    0 => _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(p, 0xa0), 0xa0),
                    _ => _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(p, 0xf5), 0xf5),
                };
                let scales: [__m256i; 4] = std::array::from_fn(|q| pattern(pair(base, 4 * n + q)));
                let mut s = [_mm256_setzero_si256(); 4];
                for m in 4 * half..4 * half + 4 {
                    let q = quarters(load(n, m, 0), load(n, m, 1), load(n, m, 2));
                    for (quarter, q) in q.iter().enumerate() {
                        // SAFETY: the quarter's 32 activations within the half's 128.
                        let yq = unsafe { y.add(32 * quarter) };
                        s[quarter] =
                            _mm256_add_epi16(s[quarter], _mm256_maddubs_epi16(*q, four(yq, m)));
                    }
                    if m % 2 == 1 {
                        for (s, scale) in s.iter_mut().zip(&scales) {
                            sum = _mm256_add_epi32(sum, _mm256_madd_epi16(*s, *scale));
                            *s = _mm256_setzero_si256();
                        }
                    }
                }
            }
        }
        sum
    }

    /// The four quarters' values (0..64) of one step from its three vectors (`ql`, `ql + 32`,
    /// `qh`), as [`quarter`] makes each.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn quarters(a: __m256i, b: __m256i, h: __m256i) -> [__m256i; 4] {
        std::array::from_fn(|i| quarter(a, b, h, i))
    }

    /// Quarter `i`'s values (0..64) of one step from its three vectors (`ql`, `ql + 32`,
    /// `qh`): nibbles (low ones of `ql` and `ql + 32` for quarters 0 and 1, high ones for 2
    /// and 3), with the quarter's `qh` pair moved to bits 4..6 by one shift and mask.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::models::cpu) fn quarter(a: __m256i, b: __m256i, h: __m256i, i: usize) -> __m256i {
        let (nibble, pair_bits) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
        let (low, high) = match i {
            0 => (a, _mm256_slli_epi16(h, 4)),
            1 => (b, _mm256_slli_epi16(h, 2)),
            2 => (_mm256_srli_epi16(a, 4), h),
            _ => (_mm256_srli_epi16(b, 4), _mm256_srli_epi16(h, 2)),
        };
        _mm256_or_si256(
            _mm256_and_si256(low, nibble),
            _mm256_and_si256(high, pair_bits),
        )
    }

    /// The eight rows' `Σ_g scale_g · Σ y` for one group block at `base` and one Q8_K block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::models::cpu) fn offsets(base: *const u8, y: &Q8K) -> __m256i {
        let mut sum = _mm256_setzero_si256();
        for p in 0..8 {
            let sums = i32::from(y.bsums[2 * p] as u16) | (i32::from(y.bsums[2 * p + 1]) << 16);
            sum = _mm256_add_epi32(
                sum,
                _mm256_madd_epi16(pair(base, p), _mm256_set1_epi32(sums)),
            );
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
            // SAFETY: 16 bytes of `d` at the block's start.
            let d = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(base.add(D).cast()) });
            for (j, acc) in acc.iter_mut().enumerate() {
                let y = &a[(t + j) * blocks + b];
                let total = _mm256_sub_epi32(
                    dots(base, y, j == 0),
                    _mm256_slli_epi32(offsets(base, y), 5),
                );
                let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(total), _mm256_set1_ps(y.d));
                *acc = _mm256_fmadd_ps(d, scaled, *acc);
            }
        }
        acc
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::models::cpu::interleaved::tests::candle_values;
    use crate::models::cpu::interleaved_q4k::tests::{
        check_one_token_as_among_many, check_products,
    };
    use candle_core::quantized::k_quants::BlockQ6K;
    use rand::{Rng, SeedableRng};

    /// Random GGML Q6_K rows: `d` in 0.001..0.01, every other byte random.
    pub(in crate::models::cpu) fn random_rows(
        rows: usize,
        blocks: usize,
        rng: &mut impl Rng,
    ) -> Vec<u8> {
        (0..rows * blocks)
            .flat_map(|_| {
                let mut block: Vec<u8> = (0..Q6K_BYTES).map(|_| rng.random()).collect();
                let d = f16::from_f32(rng.random_range(0.001..0.01));
                block[208..210].copy_from_slice(&d.to_le_bytes());
                block
            })
            .collect()
    }

    #[test]
    fn interleaved_q6k_rows_multiply_and_read_back_as_candle_dequantizes_them() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for (rows, blocks) in [(1, 1), (8, 2), (13, 3), (19, 1)] {
            let ggml = random_rows(rows, blocks, &mut rng);
            let w = InterleavedQ6K::new(&ggml, rows, blocks * QK_K);
            let expected: Vec<Vec<f32>> = ggml
                .chunks_exact(blocks * Q6K_BYTES)
                .map(candle_values::<BlockQ6K>)
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

    #[test]
    fn one_token_rounds_as_it_does_among_many() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(22);
        let (rows, blocks) = (16, 2);
        let w = InterleavedQ6K::new(&random_rows(rows, blocks, &mut rng), rows, blocks * QK_K);
        check_one_token_as_among_many(rows, blocks, &mut rng, |f, a, t, o| w.products(f, a, t, o));
    }
}
