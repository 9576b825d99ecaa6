//! The AVX-512 VNNI version of [`super::interleaved`]'s products: the same passes over a group
//! of eight interleaved rows, with each block's integer sums made by `vpdpbusd` (four byte
//! products added into each 32-bit lane in one instruction) instead of AVX2's
//! `vpmaddubsw` + `vpmaddwd` + `vpaddd`. The integer sums are exact in both, and every float
//! step is the same, so the two give the same bits.

#![cfg(target_arch = "x86_64")]
#![allow(unsafe_code)]

use super::activations::Activations;
use super::interleaved::avx2::{four, passes};
use super::interleaved::Kind;
use std::arch::x86_64::*;

/// The products of a group's rows with every token of `a`, written as rows `start..` of `out`
/// (token-major), as [`super::interleaved::Interleaved::products`] describes.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F/BW/VL/VNNI must be available; `group` holds `blocks` blocks
/// of a group of `kind` and each activation row of `a` as many Q8_0 blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn group(
    kind: Kind,
    group: &[u8],
    blocks: usize,
    a: &Activations,
    out: &mut [f32],
    start: usize,
) {
    let out = (out, start);
    match kind {
        Kind::Q8_0 => passes::<8>(kind, group, blocks, a, out, |v, y| q8_0_block(v, y)),
        Kind::Q4_0 => passes::<4>(kind, group, blocks, a, out, |v, y| q4_0_block(v, y)),
        Kind::Q5_0 => passes::<5>(kind, group, blocks, a, out, |v, y| q5_0_block(v, y)),
    }
}

/// The eight rows' integer products of a Q8_0 block with the 32 activation values at `y`:
/// the rows' magnitudes (unsigned) times the activations carrying the rows' signs, in two
/// chains of additions.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q8_0_block(v: &[__m256i; 8], y: *const u8) -> __m256i {
    let mut s = [_mm256_setzero_si256(); 2];
    for (k, v) in v.iter().enumerate() {
        let signed = _mm256_sign_epi8(four(y, k), *v);
        s[k % 2] = _mm256_dpbusd_epi32(s[k % 2], _mm256_abs_epi8(*v), signed);
    }
    _mm256_add_epi32(s[0], s[1])
}

/// The eight rows' integer products of a Q4_0 block (values 0..16; the offset of 8 is taken
/// out by the pass) with the 32 activation values at `y`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_0_block(v: &[__m256i; 4], y: *const u8) -> __m256i {
    let low = _mm256_set1_epi8(0x0f);
    let mut s = [_mm256_setzero_si256(); 2];
    for (k, v) in v.iter().enumerate() {
        let (l, h) = (
            _mm256_and_si256(*v, low),
            _mm256_and_si256(_mm256_srli_epi16(*v, 4), low),
        );
        s[0] = _mm256_dpbusd_epi32(s[0], l, four(y, k));
        s[1] = _mm256_dpbusd_epi32(s[1], h, four(y, k + 4));
    }
    _mm256_add_epi32(s[0], s[1])
}

/// The eight rows' integer products of a Q5_0 block (values 0..32; the offset of 16 is taken
/// out by the pass) with the 32 activation values at `y`; the fifth bits are spread onto the
/// nibbles as in the AVX2 version.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q5_0_block(v: &[__m256i; 5], y: *const u8) -> __m256i {
    let low = _mm256_set1_epi8(0x0f);
    let sixteen = _mm256_set1_epi8(16);
    let fifth = |m: usize| {
        // Byte `i` of each 128-bit half reads byte `m / 2` of its 4-byte lane.
        let from: [i8; 32] = std::array::from_fn(|i| (m / 2 + i % 16 / 4 * 4) as i8);
        // SAFETY: 32 bytes from the array.
        let from = unsafe { _mm256_loadu_si256(from.as_ptr().cast()) };
        let spread = _mm256_shuffle_epi8(v[0], from);
        let shift = 4 * (m % 2) as u32;
        let bits = _mm256_set1_epi32(i32::from_le_bytes([1, 2, 4, 8].map(|b: u8| b << shift)));
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits);
        _mm256_and_si256(set, sixteen)
    };
    let mut s = [_mm256_setzero_si256(); 2];
    for k in 0..4 {
        let nibbles = v[1 + k];
        let l = _mm256_or_si256(_mm256_and_si256(nibbles, low), fifth(k));
        let h = _mm256_or_si256(
            _mm256_and_si256(_mm256_srli_epi16(nibbles, 4), low),
            fifth(k + 4),
        );
        s[0] = _mm256_dpbusd_epi32(s[0], l, four(y, k));
        s[1] = _mm256_dpbusd_epi32(s[1], h, four(y, k + 4));
    }
    _mm256_add_epi32(s[0], s[1])
}

#[cfg(test)]
mod tests {
    use super::super::interleaved::{avx2, tests::random_rows, Interleaved, ROWS};
    use super::super::kernels::BLOCK;
    use super::super::level::{detected, Level};
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn vnni_products_are_the_avx2_bits() {
        if detected() < Level::Avx512 {
            eprintln!("no AVX-512 VNNI on this CPU; the AVX2 path is the one in use");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // Group counts with a partial last group; token counts around the pass of four.
        for (rows, tokens, blocks) in [(19, 9, 18), (8, 1, 3), (5, 4, 18), (24, 6, 5)] {
            let x: Vec<f32> = (0..tokens * blocks * BLOCK)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let a = Activations::quantize(&x, tokens, blocks * BLOCK);
            for kind in [Kind::Q8_0, Kind::Q4_0, Kind::Q5_0] {
                let ggml = random_rows(kind, rows, blocks, &mut rng);
                let w = Interleaved::new(kind, &ggml, rows, blocks * BLOCK);
                let mut want = vec![f32::NAN; rows * tokens];
                let mut got = vec![f32::NAN; rows * tokens];
                for g in (0..rows).step_by(ROWS) {
                    // SAFETY: the features were detected; the group and the activations have
                    // `blocks` blocks.
                    unsafe {
                        avx2::group(kind, w.group(g), blocks, &a, &mut want, g);
                        group(kind, w.group(g), blocks, &a, &mut got, g);
                    }
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&want), "{kind:?} {rows}x{tokens}x{blocks}");
            }
        }
    }
}
