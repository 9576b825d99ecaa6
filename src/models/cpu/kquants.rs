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
