//! The K types of llama.cpp's `Q4_K_M` files: their Q8_K activations and Q4_K's packed scales.
//! The products are [`super::interleaved_q4k`]'s and [`super::interleaved_q6k`]'s (and
//! [`super::interleaved`]'s for the Q5_0 and Q8_0 fallbacks, on rows the 256-value K blocks do
//! not divide).
//!
//! GGML's layouts, 256 values a K block:
//! - Q8_K: f32 scale, 256 `i8`, then the sum of each 16 values as `i16`.
//! - Q4_K: f16 scale `d`, f16 `dmin`, 12 bytes packing eight 6-bit scales and eight 6-bit
//!   mins, 128 bytes of nibbles. Value `i` of 32-value group `g` is
//!   `d·scale[g]·q − dmin·min[g]`; group `2k` is the low nibbles of bytes `32k..32k+32`, group
//!   `2k+1` their high nibbles.
//! - Q6_K: 128 bytes of low nibbles, 64 bytes of high 2-bit pairs, sixteen `i8` scales (one per
//!   16 values), f16 `d`; a value is `d·scale·(q − 32)` with `q` in 0..64.

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

/// Quantizes `x` (whole K blocks) into `out`: per block, the value of largest magnitude (the
/// first of them) maps to −127 and the rest round half to even, as llama.cpp's reference
/// quantizer does. The AVX2 version writes the same blocks.
pub fn quantize_q8k(x: &[f32], out: &mut [Q8K]) {
    assert_eq!(x.len(), out.len() * QK_K, "Q8_K rows are whole blocks");
    #[cfg(target_arch = "x86_64")]
    if super::kernels::simd() {
        for (values, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
            // SAFETY: the features were detected; `values` holds one block's 256 values.
            #[allow(unsafe_code)]
            unsafe {
                avx2::quantize(values, block)
            };
        }
        return;
    }
    for (values, block) in x.chunks_exact(QK_K).zip(out.iter_mut()) {
        quantize(values, block);
    }
}

/// One block of [`quantize_q8k`], the reference.
fn quantize(values: &[f32], block: &mut Q8K) {
    let max = values
        .iter()
        .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
    if max == 0.0 {
        *block = Q8K::ZERO;
        return;
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

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::{Q8K, QK_K};
    use crate::models::cpu::kernels::avx2::max_lane;
    use std::arch::x86_64::*;

    /// One block of [`super::quantize_q8k`]: the largest magnitude by vector maxima, the
    /// first value that has it by comparing each vector with it, then 32 values a step
    /// (multiplied, rounded half to even, capped at 127, packed to bytes) with their two
    /// 16-value sums, added across lanes four groups at a time.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `values` holds 256 values.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn quantize(values: &[f32], block: &mut Q8K) {
        assert_eq!(values.len(), QK_K);
        // SAFETY (every load below): vector `k` of the block's 32.
        let load = |k: usize| unsafe { _mm256_loadu_ps(values.as_ptr().add(8 * k)) };
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fff_ffff));
        let mut m = _mm256_setzero_ps();
        for k in 0..QK_K / 8 {
            m = _mm256_max_ps(m, _mm256_and_ps(load(k), magnitude));
        }
        let amax = max_lane(m);
        if amax == 0.0 {
            *block = Q8K::ZERO;
            return;
        }
        let wanted = _mm256_set1_ps(amax);
        let first = (0..QK_K / 8)
            .find_map(|k| {
                let equal = _mm256_cmp_ps::<_CMP_EQ_OQ>(_mm256_and_ps(load(k), magnitude), wanted);
                let mask = _mm256_movemask_ps(equal);
                (mask != 0).then(|| 8 * k + mask.trailing_zeros() as usize)
            })
            .expect("a value has the largest magnitude");
        let inverse = -127.0 / values[first];
        let (scale, cap) = (_mm256_set1_ps(inverse), _mm256_set1_ps(127.0));
        let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        let mut pairs = [_mm256_setzero_si256(); 8];
        for (step, pair) in pairs.iter_mut().enumerate() {
            let q: [__m256i; 4] = std::array::from_fn(|i| {
                let product = _mm256_mul_ps(load(4 * step + i), scale);
                let rounded =
                    _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(product);
                _mm256_cvtps_epi32(_mm256_min_ps(rounded, cap))
            });
            let words = _mm256_packs_epi16(
                _mm256_packs_epi32(q[0], q[1]),
                _mm256_packs_epi32(q[2], q[3]),
            );
            let bytes = _mm256_permutevar8x32_epi32(words, order);
            // SAFETY: 32 of the block's 256 bytes.
            unsafe { _mm256_storeu_si256(block.qs.as_mut_ptr().add(32 * step).cast(), bytes) };
            *pair = _mm256_hadd_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        }
        for (four, pairs) in pairs.chunks_exact(2).enumerate() {
            // Lanes: the four groups' sums of values 0..4 and 4..8 of their eight-value halves.
            let h = _mm256_hadd_epi32(pairs[0], pairs[1]);
            let sums = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256::<1>(h));
            let sums = _mm_packs_epi32(sums, sums);
            // SAFETY: four of the block's sixteen sums.
            unsafe { _mm_storel_epi64(block.bsums.as_mut_ptr().add(4 * four).cast(), sums) };
        }
        block.d = 1.0 / inverse;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn activations(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    fn q8k(x: &[f32]) -> Vec<Q8K> {
        let mut out = vec![Q8K::ZERO; x.len() / QK_K];
        quantize_q8k(x, &mut out);
        out
    }

    #[test]
    fn simd_q8k_blocks_are_the_reference_blocks() {
        // Random values; exact ties (multiples of a half step); a zero block; blocks whose
        // largest magnitude occurs with both signs (in one vector and in a later one), the
        // negative or the positive first.
        let mut x = activations(7 * QK_K, 2);
        for (i, v) in x[..QK_K].iter_mut().enumerate() {
            *v = (i % 17) as f32 * 0.5 - 4.0;
        }
        x[QK_K..2 * QK_K].fill(0.0);
        for (block, first) in [(3, -3.0), (4, 3.0)] {
            let values = &mut x[block * QK_K..(block + 1) * QK_K];
            values.iter_mut().for_each(|v| *v = v.clamp(-1.5, 1.5));
            values[40] = first;
            values[43] = -first;
            values[200] = -first;
        }
        let got = q8k(&x);
        for (b, (got, values)) in got.iter().zip(x.chunks_exact(QK_K)).enumerate() {
            let mut want = Q8K::ZERO;
            quantize(values, &mut want);
            assert_eq!(got.d.to_bits(), want.d.to_bits(), "block {b} scale");
            assert_eq!(got.qs, want.qs, "block {b} values");
            assert_eq!(got.bsums, want.bsums, "block {b} sums");
        }
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
}
