//! The K types of llama.cpp's `Q4_K_M` files: Q8_K activations, Q4_K's packed scales (its
//! products are [`super::interleaved_q4k`]'s), and Q6_K rows' dot products with Q8_K
//! activations (the Q5_0 and Q8_0 fallbacks, for rows the 256-value K blocks do not divide, are
//! [`super::interleaved`]'s). A scalar reference and an AVX2 version of the Q6_K dot, held to
//! the same result by the tests, like [`super::kernels`].
//!
//! GGML's layouts, 256 values a K block:
//! - Q8_K: f32 scale, 256 `i8`, then the sum of each 16 values as `i16`.
//! - Q4_K: f16 scale `d`, f16 `dmin`, 12 bytes packing eight 6-bit scales and eight 6-bit
//!   mins, 128 bytes of nibbles. Value `i` of 32-value group `g` is
//!   `d·scale[g]·q − dmin·min[g]`; group `2k` is the low nibbles of bytes `32k..32k+32`, group
//!   `2k+1` their high nibbles.
//! - Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, sixteen `i8` scales (one per
//!   16 values), f16 `d`; a value is `d·scale·(q − 32)` with `q` in 0..64.

use half::f16;

/// Values per K block.
pub const QK_K: usize = 256;
/// Bytes per Q4_K block.
pub const Q4K_BYTES: usize = 144;
/// Bytes per Q6_K block.
pub const Q6K_BYTES: usize = 210;

/// A Q8_K activation block.
#[derive(Clone, Copy)]
#[repr(C)]
pub struct Q8K {
    pub(super) d: f32,
    pub(super) qs: [i8; QK_K],
    pub(super) bsums: [i16; QK_K / 16],
}

impl Q8K {
    /// An all-zero block, for sizing buffers.
    pub const ZERO: Q8K = Q8K {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
}

/// Quantizes `x` (whole K blocks) into `out`: per block, the value of largest magnitude maps to
/// −127 and the rest round half to even, as llama.cpp's reference quantizer does.
pub fn quantize_q8k(x: &[f32], out: &mut [Q8K]) {
    assert_eq!(x.len(), out.len() * QK_K, "Q8_K rows are whole blocks");
    for (values, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        let max = values
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        if max == 0.0 {
            *block = Q8K::ZERO;
            continue;
        }
        let inverse = -127.0 / max;
        for (q, v) in block.qs.iter_mut().zip(values) {
            *q = (v * inverse).round_ties_even().min(127.0) as i8;
        }
        for (sum, group) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = group.iter().map(|&q| i16::from(q)).sum();
        }
        block.d = 1.0 / inverse;
    }
}

fn half(bytes: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([bytes[at], bytes[at + 1]]).to_f32()
}

/// The eight 6-bit scales and eight 6-bit mins of a Q4_K block's 12 packed bytes: the low six
/// bits of bytes 0..4 are scales 0..4 and of bytes 4..8 mins 0..4; scales and mins 4..8 take
/// their low four bits from the nibbles of bytes 8..12 and their top two from the top bits of
/// bytes 0..4 and 4..8. Four at a time in `u32` words, without branches.
pub(super) fn scales_and_mins(packed: &[u8]) -> ([u8; 8], [u8; 8]) {
    let word =
        |i: usize| u32::from_le_bytes([packed[i], packed[i + 1], packed[i + 2], packed[i + 3]]);
    let (a, b, c) = (word(0), word(4), word(8));
    let (six, four, two) = (0x3f3f_3f3f, 0x0f0f_0f0f, 0x0303_0303);
    let scales_high = (c & four) | (((a >> 6) & two) << 4);
    let mins_high = ((c >> 4) & four) | (((b >> 6) & two) << 4);
    let join = |low: u32, high: u32| {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&low.to_le_bytes());
        out[4..].copy_from_slice(&high.to_le_bytes());
        out
    };
    (join(a & six, scales_high), join(b & six, mins_high))
}

/// `w · a` for a Q6_K row and a Q8_K row of as many values.
pub fn dot_q6k(w: &[u8], a: &[Q8K]) -> f32 {
    dot_q6k_x4_or_1(w, [a])[0]
}

/// [`dot_q6k`] of one weight row with four activation rows at once, each summed as
/// [`dot_q6k`] sums it.
pub fn dot_q6k_x4(w: &[u8], a: [&[Q8K]; 4]) -> [f32; 4] {
    dot_q6k_x4_or_1(w, a)
}

fn dot_q6k_x4_or_1<const T: usize>(w: &[u8], a: [&[Q8K]; T]) -> [f32; T] {
    for a in a {
        assert_eq!(w.len(), a.len() * Q6K_BYTES, "rows of one length");
    }
    #[cfg(target_arch = "x86_64")]
    if super::kernels::simd() {
        // SAFETY: the features were detected; `w` holds as many Q6_K blocks as each row of `a`
        // Q8_K blocks.
        #[allow(unsafe_code)]
        return unsafe { avx2::dot_q6k(w, a) };
    }
    a.map(|a| scalar::dot_q6k(w, a))
}

/// The reference versions.
pub mod scalar {
    use super::{half, Q6K_BYTES, Q8K};

    /// The 256 values of a Q6_K block as integers 0..64 (before the offset of 32).
    pub(super) fn q6k_values(x: &[u8]) -> [u8; 256] {
        let mut q = [0u8; 256];
        for half_block in 0..2 {
            let ql = &x[64 * half_block..64 * half_block + 64];
            let qh = &x[128 + 32 * half_block..128 + 32 * half_block + 32];
            let out = &mut q[128 * half_block..128 * half_block + 128];
            for l in 0..32 {
                out[l] = (ql[l] & 0x0f) | ((qh[l] & 3) << 4);
                out[l + 32] = (ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4);
                out[l + 64] = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4);
                out[l + 96] = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4);
            }
        }
        q
    }

    /// `w · a` for a Q6_K row and a Q8_K row.
    pub fn dot_q6k(w: &[u8], a: &[Q8K]) -> f32 {
        w.chunks_exact(Q6K_BYTES)
            .zip(a)
            .map(|(x, y)| {
                let q = q6k_values(x);
                let scales = &x[192..208];
                let dot: i32 = (0..16)
                    .map(|g| {
                        let group: i32 = (16 * g..16 * g + 16)
                            .map(|i| (i32::from(q[i]) - 32) * i32::from(y.qs[i]))
                            .sum();
                        i32::from(scales[g] as i8) * group
                    })
                    .sum();
                y.d * half(x, 208) * dot as f32
            })
            .sum()
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod avx2 {
    use super::{Q6K_BYTES, Q8K};
    use crate::models::cpu::kernels::avx2 as shared;
    use std::arch::x86_64::*;

    /// 32 bytes from `bytes[at..]`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn load(bytes: &[u8], at: usize) -> __m256i {
        assert!(bytes.len() >= at + 32);
        // SAFETY: 32 bytes from `at`, within the slice (asserted).
        unsafe { _mm256_loadu_si256(bytes.as_ptr().add(at).cast()) }
    }

    /// 32 activation bytes of a Q8_K block from value `at`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn activations(block: &Q8K, at: usize) -> __m256i {
        assert!(at + 32 <= block.qs.len());
        // SAFETY: 32 of the block's 256 values from `at` (asserted).
        unsafe { _mm256_loadu_si256(block.qs.as_ptr().add(at).cast()) }
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available; `w` holds as many Q6_K blocks as each row of `a`
    /// Q8_K blocks.
    ///
    /// The 6-bit values are multiplied unsigned (0..64) and the offset taken once per block from
    /// the activation's 16-value sums: `Σ s·(q − 32)·y = Σ s·q·y − 32·Σ s·bsum`. Each weight
    /// block is unpacked once for the `T` activation rows.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_q6k<const T: usize>(w: &[u8], a: [&[Q8K]; T]) -> [f32; T] {
        let low_nibbles = _mm256_set1_epi8(0x0f);
        let two_bits = _mm256_set1_epi8(3);
        let mut acc = [_mm256_setzero_ps(); T];
        for (b, x) in w.chunks_exact(Q6K_BYTES).enumerate() {
            shared::prefetch(x.as_ptr(), Q6K_BYTES.div_ceil(64));
            let scales = &x[192..208];
            let scale = |g: usize| i16::from(scales[g] as i8);
            let pair =
                |g: usize| _mm256_set_m128i(_mm_set1_epi16(scale(g + 1)), _mm_set1_epi16(scale(g)));
            let mut sums = [_mm256_setzero_si256(); T];
            for h in 0..2 {
                let ql0 = load(x, 64 * h);
                let ql1 = load(x, 64 * h + 32);
                let qh = load(x, 128 + 32 * h);
                // The two high bits of each value, moved above its nibble.
                let high = |bits: __m256i| _mm256_slli_epi16(_mm256_and_si256(bits, two_bits), 4);
                let low = |bytes: __m256i| _mm256_and_si256(bytes, low_nibbles);
                let quarters = [
                    _mm256_or_si256(low(ql0), high(qh)),
                    _mm256_or_si256(low(ql1), high(_mm256_srli_epi16(qh, 2))),
                    _mm256_or_si256(
                        low(_mm256_srli_epi16(ql0, 4)),
                        high(_mm256_srli_epi16(qh, 4)),
                    ),
                    _mm256_or_si256(
                        low(_mm256_srli_epi16(ql1, 4)),
                        high(_mm256_srli_epi16(qh, 6)),
                    ),
                ];
                for (k, q) in quarters.into_iter().enumerate() {
                    let s = pair(8 * h + 2 * k);
                    for j in 0..T {
                        let y = activations(&a[j][b], 128 * h + 32 * k);
                        let scaled = _mm256_madd_epi16(_mm256_maddubs_epi16(q, y), s);
                        sums[j] = _mm256_add_epi32(sums[j], scaled);
                    }
                }
            }
            let d = shared::f16_at(x, 208);
            // SAFETY: the sixteen scales, 16 bytes of the block.
            let scales = _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(scales.as_ptr().cast()) });
            for j in 0..T {
                let y = &a[j][b];
                // SAFETY: the block's sixteen i16 sums, 32 bytes.
                let bsums = unsafe { _mm256_loadu_si256(y.bsums.as_ptr().cast()) };
                // 32 · Σ scale·bsum, spread over the lanes (two groups each).
                let offset = _mm256_slli_epi32(_mm256_madd_epi16(scales, bsums), 5);
                let total = _mm256_sub_epi32(sums[j], offset);
                let scale = _mm256_set1_ps(y.d * d);
                acc[j] = _mm256_fmadd_ps(scale, _mm256_cvtepi32_ps(total), acc[j]);
            }
        }
        let mut out = [0f32; T];
        for j in 0..T {
            out[j] = shared::sum_lanes(acc[j]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random_bytes(n: usize, rng: &mut rand::rngs::StdRng) -> Vec<u8> {
        (0..n).map(|_| rng.random::<u8>()).collect()
    }

    /// Blocks of random bytes with the f16 fields at `scale_at` set to small positive scales.
    fn random_row(blocks: usize, bytes: usize, scale_at: &[usize], seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut row = random_bytes(blocks * bytes, &mut rng);
        for block in row.chunks_exact_mut(bytes) {
            for &at in scale_at {
                let d = f16::from_f32(rng.random_range(0.001..0.01)).to_le_bytes();
                block[at..at + 2].copy_from_slice(&d);
            }
        }
        row
    }

    fn activations(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    fn q8k(x: &[f32]) -> Vec<Q8K> {
        let mut out = vec![Q8K::ZERO; x.len() / QK_K];
        quantize_q8k(x, &mut out);
        out
    }

    fn close(simd: f32, reference: f32) {
        let tolerance = 1e-4 * reference.abs().max(1.0);
        assert!(
            (simd - reference).abs() <= tolerance,
            "simd {simd} vs scalar {reference}"
        );
    }

    #[test]
    fn q8k_blocks_hold_their_values_and_sums() {
        let x = activations(512, 1);
        for (block, values) in q8k(&x).iter().zip(x.chunks(QK_K)) {
            for (q, v) in block.qs.iter().zip(values) {
                assert!((f32::from(*q) * block.d - v).abs() <= block.d.abs() * 0.5 + 1e-6);
            }
            for (g, sum) in block.bsums.iter().enumerate() {
                let want: i16 = block.qs[16 * g..16 * g + 16]
                    .iter()
                    .map(|&q| i16::from(q))
                    .sum();
                assert_eq!(*sum, want);
            }
        }
    }

    /// The reference dots equal candle's dequantized rows times the dequantized activations,
    /// so the scalar versions read GGML's layouts as candle does.
    #[test]
    fn scalar_dots_match_candle_dequantization() {
        use crate::models::cpu::interleaved::tests::candle_values;
        use candle_core::quantized::k_quants::BlockQ6K;
        let n = 1024;
        let x = activations(n, 7);
        let a = q8k(&x);
        let a_values: Vec<f32> = a
            .iter()
            .flat_map(|b| b.qs.iter().map(move |&q| f32::from(q) * b.d))
            .collect();
        let float_dot = |w: &[f32], y: &[f32]| w.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        let w6 = random_row(n / QK_K, Q6K_BYTES, &[208], 9);
        close(
            scalar::dot_q6k(&w6, &a),
            float_dot(&candle_values::<BlockQ6K>(&w6), &a_values),
        );
    }

    #[test]
    fn simd_and_scalar_agree() {
        for (n, seed) in [(256, 1), (2048, 2), (5632, 3)] {
            let x = activations(n, seed);
            let a = q8k(&x);
            let w6 = random_row(n / QK_K, Q6K_BYTES, &[208], seed + 20);
            close(dot_q6k(&w6, &a), scalar::dot_q6k(&w6, &a));
            // Four tokens at once (prefill) sum each product as one token (decode) does.
            let rows: Vec<Vec<Q8K>> = (0..4)
                .map(|k| q8k(&activations(n, seed + 50 + k)))
                .collect();
            let four: [&[Q8K]; 4] = std::array::from_fn(|k| &rows[k][..]);
            for (got, row) in dot_q6k_x4(&w6, four).iter().zip(four) {
                assert_eq!(got.to_bits(), dot_q6k(&w6, row).to_bits());
            }
        }
    }
}
