//! Q8_0 quantization of activations and the f32-activation kernel: the dot product of one f32
//! weight row with one activation row (f16 weights are [`super::f16_panels`], the 32-value
//! block types are [`super::interleaved`]; attention's products are [`super::attention`]).
//! Each has a scalar version, the reference, and an AVX2/FMA/F16C version used when the CPU has
//! those features; the tests hold the two to the same result.
//!
//! The block layouts are GGML's: a Q8_0 block is an f16 scale then 32 `i8`; a Q4_0 block is an
//! f16 scale then 16 bytes, the low nibbles holding values 0..16 and the high nibbles 16..32,
//! each stored plus 8.

use half::f16;

/// Values per Q8_0 / Q4_0 block.
pub const BLOCK: usize = 32;
/// Bytes per Q8_0 block.
pub const Q8_0_BYTES: usize = 34;
/// Bytes per Q4_0 block.
pub const Q4_0_BYTES: usize = 18;
/// Bytes per Q5_0 block.
pub const Q5_0_BYTES: usize = 22;

/// Whether the AVX2 versions run here: the CPU has AVX2, FMA and F16C and
/// `LLORCH_CPU_LEVEL` does not ask for the scalar ones.
pub(super) fn simd() -> bool {
    super::level::level() >= super::level::Level::Avx2
}

/// Quantizes `x` (a multiple of 32 values) to Q8_0 blocks in `out`: per block, the scale is
/// the largest magnitude over 127 and each value times 127 over that magnitude is rounded half
/// to even, as llama.cpp's x86 quantizer does, so that activations quantize to the same bytes
/// and near-ties in the logits fall the same way.
pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
    assert_eq!(x.len() % BLOCK, 0, "Q8_0 rows are whole blocks");
    assert_eq!(out.len(), x.len() / BLOCK * Q8_0_BYTES, "Q8_0 output size");
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the features were detected; the sizes were checked above.
        #[allow(unsafe_code)]
        return unsafe { avx2::quantize_q8_0(x, out) };
    }
    scalar::quantize_q8_0(x, out);
}

fn scale(block: &[u8]) -> f32 {
    f16::from_le_bytes([block[0], block[1]]).to_f32()
}

/// The sum of each Q8_0 block's values (scale times the sum of its integers) into `out`, which
/// the Q4_0 and Q5_0 products take with the row so they can multiply unsigned values and
/// subtract their offset once per block, and the sum of its integers into `integers`, which
/// the VNNI Q8_0 product takes to do the same in integers.
pub fn block_sums(a: &[u8], out: &mut [f32], integers: &mut [i32]) {
    assert_eq!(a.len() / Q8_0_BYTES, out.len(), "one sum per block");
    assert_eq!(out.len(), integers.len(), "one integer sum per block");
    for ((block, sum), integer) in a.chunks_exact(Q8_0_BYTES).zip(out).zip(integers) {
        let total: i32 = block[2..].iter().map(|&q| i32::from(q as i8)).sum();
        *sum = scale(block) * total as f32;
        *integer = total;
    }
}

/// `w · a` for f32 rows.
pub fn dot_f32(w: &[f32], a: &[f32]) -> f32 {
    assert_eq!(w.len(), a.len(), "rows of one length");
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the features were detected; the slices have equal lengths.
        #[allow(unsafe_code)]
        return unsafe { avx2::dot_f32(w, a) };
    }
    scalar::dot_f32(w, a)
}

/// The reference versions.
pub mod scalar {
    use super::{BLOCK, Q8_0_BYTES};
    use half::f16;

    /// Q8_0 quantization of `x` into `out` (whole blocks).
    pub fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
        for (values, block) in x.chunks_exact(BLOCK).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
            let amax = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let inverse = if amax == 0.0 { 0.0 } else { 127.0 / amax };
            block[..2].copy_from_slice(&f16::from_f32(amax / 127.0).to_le_bytes());
            for (q, v) in block[2..].iter_mut().zip(values) {
                *q = (v * inverse).round_ties_even() as i8 as u8;
            }
        }
    }

    /// `w · a` for f32 rows.
    pub fn dot_f32(w: &[f32], a: &[f32]) -> f32 {
        w.iter().zip(a).map(|(x, y)| x * y).sum()
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod avx2 {
    use super::Q8_0_BYTES;
    use std::arch::x86_64::*;

    /// How far ahead of the bytes being multiplied the weight kernels ask for the next ones:
    /// a row's weights stream from memory once per token, and one thread's hardware prefetch
    /// alone left a Q4_0 decode about 10 % slower (`llorch bench`, small Q4_0, one thread).
    /// 4 KiB rather than 1: a batched step does a block's work for every token before the
    /// next block, and with 1 KiB the small Q8_0 model's 16-stream steps took about 12 %
    /// longer (the fetch came too late).
    const PREFETCH: usize = 4096;

    /// Asks for the `lines` cache lines `PREFETCH` bytes past `p` to be brought into L1. A
    /// prefetch never faults, so addresses past the end of the weights are harmless.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::models::cpu) fn prefetch(p: *const u8, lines: usize) {
        prefetch_ahead(p, PREFETCH, lines);
    }

    /// Asks for the `lines` cache lines `ahead` bytes past `p` to be brought into L1.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::models::cpu) fn prefetch_ahead(p: *const u8, ahead: usize, lines: usize) {
        let ahead = p.wrapping_add(ahead);
        for line in 0..lines {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64 * line).cast());
        }
    }

    /// Asks for part `part` of `parts` of the lines that [`prefetch`] would ask for a block of
    /// `size` bytes at `p`: a K block's 19 (Q4_K) or 27 (Q6_K) lines asked for at once at
    /// its start stalled a one-token product on the prefetches themselves (most of its
    /// samples in `perf` fell on them), so those kernels spread them over the block's work.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::models::cpu) fn prefetch_part(
        p: *const u8,
        size: usize,
        part: usize,
        parts: usize,
    ) {
        let lines = size.div_ceil(64).div_ceil(parts);
        prefetch(p.wrapping_add(64 * lines * part), lines);
    }

    /// Sums the eight lanes.
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::models::cpu) fn sum_lanes(v: __m256) -> f32 {
        let pair = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_add_ps(pair, _mm_movehl_ps(pair, pair));
        let one = _mm_add_ss(pair, _mm_movehdup_ps(pair));
        _mm_cvtss_f32(one)
    }

    /// The eight lanes of `v` as an array.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::models::cpu) fn to_lanes(v: __m256) -> [f32; 8] {
        let mut lanes = [0f32; 8];
        // SAFETY: the array holds eight floats.
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
        lanes
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available; `x` is whole blocks and `out` their Q8_0 size.
    ///
    /// The same bytes as the scalar quantizer: the scale is the f16 of `amax / 127` (F16C
    /// rounds to nearest even, as `half` does), and `round_ps` rounds half to even.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize_q8_0(x: &[f32], out: &mut [u8]) {
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        for (values, block) in x.chunks_exact(32).zip(out.chunks_exact_mut(Q8_0_BYTES)) {
            // SAFETY: four groups of 8 floats from a 32-float block.
            let v: [__m256; 4] =
                std::array::from_fn(|k| unsafe { _mm256_loadu_ps(values.as_ptr().add(8 * k)) });
            let m = _mm256_max_ps(
                _mm256_max_ps(
                    _mm256_and_ps(v[0], magnitude),
                    _mm256_and_ps(v[1], magnitude),
                ),
                _mm256_max_ps(
                    _mm256_and_ps(v[2], magnitude),
                    _mm256_and_ps(v[3], magnitude),
                ),
            );
            let amax = max_lane(m);
            let inverse = _mm256_set1_ps(if amax == 0.0 { 0.0 } else { 127.0 / amax });
            let scale = _mm_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(_mm_set_ss(amax / 127.0));
            block[..2].copy_from_slice(&(_mm_extract_epi16::<0>(scale) as u16).to_le_bytes());
            let q: [__m256i; 4] = std::array::from_fn(|k| {
                let r = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm256_mul_ps(v[k], inverse),
                );
                _mm256_cvtps_epi32(r)
            });
            // Pack 32 i32 to 32 i8; the packs interleave 128-bit lanes, the permute restores order.
            let words = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes =
                _mm256_permutevar8x32_epi32(words, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
            // SAFETY: 32 bytes from offset 2 of a 34-byte block.
            unsafe { _mm256_storeu_si256(block.as_mut_ptr().add(2).cast(), bytes) };
        }
    }

    /// The largest of the eight lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(in crate::models::cpu) fn max_lane(v: __m256) -> f32 {
        let pair = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let pair = _mm_max_ps(pair, _mm_movehl_ps(pair, pair));
        _mm_cvtss_f32(_mm_max_ps(pair, _mm_movehdup_ps(pair)))
    }

    /// # Safety
    /// AVX2 and FMA must be available; the slices have equal lengths.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_f32(w: &[f32], a: &[f32]) -> f32 {
        let mut acc = [_mm256_setzero_ps(); 4];
        let whole = w.len() / 32 * 32;
        for (x, y) in w[..whole].chunks_exact(32).zip(a[..whole].chunks_exact(32)) {
            for (lane, sum) in acc.iter_mut().enumerate() {
                // SAFETY: 8 floats from offset 8 * lane of 32-element chunks.
                let (wx, ay) = unsafe {
                    (
                        _mm256_loadu_ps(x.as_ptr().add(8 * lane)),
                        _mm256_loadu_ps(y.as_ptr().add(8 * lane)),
                    )
                };
                *sum = _mm256_fmadd_ps(wx, ay, *sum);
            }
        }
        let total = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        sum_lanes(total) + super::scalar::dot_f32(&w[whole..], &a[whole..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// Within float rounding of `n` products of magnitude up to 4 summed in another order; a
    /// misread block misses by the size of the result itself (around `sqrt(n)`).
    fn close(simd: f32, reference: f32, n: usize) {
        let tolerance = 2e-6 * 4.0 * n as f32;
        assert!(
            (simd - reference).abs() <= tolerance,
            "simd {simd} vs scalar {reference}"
        );
    }

    fn q8(x: &[f32]) -> Vec<u8> {
        let mut out = vec![0; x.len() / BLOCK * Q8_0_BYTES];
        quantize_q8_0(x, &mut out);
        out
    }

    #[test]
    fn simd_quantization_writes_the_scalar_bytes() {
        // Random values, exact ties (multiples of a half step), zeros and a zero block.
        let mut x = values(4096, 11);
        for (i, v) in x.iter_mut().enumerate().take(256) {
            *v = (i % 17) as f32 * 0.5 - 4.0;
        }
        x[256..288].fill(0.0);
        let mut reference = vec![0u8; x.len() / BLOCK * Q8_0_BYTES];
        scalar::quantize_q8_0(&x, &mut reference);
        assert_eq!(q8(&x), reference);
    }

    #[test]
    fn q8_0_quantization_is_within_half_a_step() {
        let x = values(64, 1);
        let q = q8(&x);
        for (block, values) in q.chunks(Q8_0_BYTES).zip(x.chunks(BLOCK)) {
            let d = scale(block);
            for (byte, v) in block[2..].iter().zip(values) {
                assert!((f32::from(*byte as i8) * d - v).abs() <= d * 0.5 + 1e-3);
            }
        }
    }

    #[test]
    fn simd_and_scalar_agree_for_f32_rows() {
        for (n, seed) in [(32, 1), (576, 2), (2048, 3), (5632, 4)] {
            let (w, a) = (values(n, seed), values(n, seed + 100));
            close(dot_f32(&w, &a), scalar::dot_f32(&w, &a), n);
        }
        // Lengths that are not a multiple of 32 take the scalar tail.
        let (w, a) = (values(45, 9), values(45, 10));
        close(dot_f32(&w, &a), scalar::dot_f32(&w, &a), 45);
    }
}
