//! The AVX-512 VNNI versions of the interleaved products ([`super::interleaved`]'s Q8_0, Q4_0
//! and Q5_0, [`super::interleaved_q4k`] and [`super::interleaved_q6k`]): the same passes over
//! a group of eight interleaved rows, with each block's integer sums made by `vpdpbusd` (four
//! byte products added into each 32-bit lane in one instruction) instead of AVX2's
//! `vpmaddubsw` + `vpmaddwd` + `vpaddd`; a K sub-block's sum is then multiplied by its scale
//! in 32 bits. The integer sums are exact in both, and every float step is the same, so the
//! two give the same bits.

#![cfg(target_arch = "x86_64")]
#![allow(unsafe_code)]

use super::activations::Activations;
use super::interleaved::avx2::{each_pass, four, pass, q5_0_values, store, TOKENS};
use super::interleaved::{Kind, ROWS};
use super::kernels::avx2::{prefetch, prefetch_part};
use super::kernels::Q8_0_BYTES;
use super::kquants::Q8K;
use super::{interleaved_q4k as q4k, interleaved_q6k as q6k};
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
    let tokens = a.tokens();
    macro_rules! passes {
        ($pass:ident) => {
            wide_passes(
                out,
                tokens,
                start,
                |t| $pass::<WIDE>(group, blocks, a, t),
                |t| $pass::<TOKENS>(group, blocks, a, t),
                |t| $pass::<1>(group, blocks, a, t),
            )
        };
    }
    match kind {
        Kind::Q8_0 => passes!(q8_0_pass),
        Kind::Q4_0 => passes!(q4_0_pass),
        Kind::Q5_0 => passes!(q5_0_pass),
    }
}

/// Tokens per wide pass: with AVX-512's 32 vector registers, eight accumulators fit beside a
/// block's value vectors, so each block's values are loaded once per eight tokens.
const WIDE: usize = 8;

/// Every token through a pass over the group's blocks: [`WIDE`] at a time (`wide(t)`), then
/// the rest as the AVX2 version takes them, four (`four(t)`), then one by one (`one(t)`). A
/// token's sums run in the same order whatever the pass, so its products do not depend on
/// the others.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn wide_passes(
    out: &mut [f32],
    tokens: usize,
    start: usize,
    wide: impl Fn(usize) -> [__m256; WIDE],
    four: impl Fn(usize) -> [__m256; TOKENS],
    one: impl Fn(usize) -> [__m256; 1],
) {
    let mut t = 0;
    while t + WIDE <= tokens {
        store(out, tokens, start, t, &wide(t));
        t += WIDE;
    }
    while t + TOKENS <= tokens {
        store(out, tokens, start, t, &four(t));
        t += TOKENS;
    }
    for t in t..tokens {
        store(out, tokens, start, t, &one(t));
    }
}

/// A Q8_0 pass. Each block's values are made unsigned once for all `T` tokens by adding 128
/// (flipping the top bit), and each token's sum starts at `−128 · Σ y`:
/// `Σ (q + 128)·y − 128·Σ y = Σ q·y` exactly, so one `vpdpbusd` per four values is all a token
/// costs, where the AVX2 way (magnitudes times the activations carrying the rows' signs) also
/// signs every activation vector per row.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q8_0_pass<const T: usize>(
    group: &[u8],
    blocks: usize,
    a: &Activations,
    t: usize,
) -> [__m256; T] {
    let top = _mm256_set1_epi8(i8::MIN);
    vnni_pass::<T>(Kind::Q8_0, group, blocks, a, t, 128, |base| {
        // SAFETY: eight vectors of 32 bytes after the scales, within the block.
        std::array::from_fn(|m| unsafe {
            _mm256_xor_si256(_mm256_loadu_si256(base.add(2 * ROWS + 32 * m).cast()), top)
        })
    })
}

/// A Q4_0 pass: each block's nibbles split once for all `T` tokens (values 0..16; the offset
/// of 8 is taken out as the AVX2 pass takes it).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4_0_pass<const T: usize>(
    group: &[u8],
    blocks: usize,
    a: &Activations,
    t: usize,
) -> [__m256; T] {
    let low = _mm256_set1_epi8(0x0f);
    vnni_pass::<T>(Kind::Q4_0, group, blocks, a, t, 0, |base| {
        // SAFETY: four vectors of 32 bytes after the scales, within the block.
        let v: [__m256i; 4] = std::array::from_fn(|m| unsafe {
            _mm256_loadu_si256(base.add(2 * ROWS + 32 * m).cast())
        });
        std::array::from_fn(|k| match k {
            0..4 => _mm256_and_si256(v[k], low),
            _ => _mm256_and_si256(_mm256_srli_epi16(v[k - 4], 4), low),
        })
    })
}

/// A Q5_0 pass: the AVX2 pass with [`q5_0_block`]'s sums. Assembling a block's values once
/// for all tokens, as the other kinds do, spills registers and runs at half the speed.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q5_0_pass<const T: usize>(
    group: &[u8],
    blocks: usize,
    a: &Activations,
    t: usize,
) -> [__m256; T] {
    pass::<T, 5>(Kind::Q5_0, group, blocks, a, t, |v, y| q5_0_block(v, y))
}

/// The eight rows' integer products of a Q5_0 block (values 0..32; the offset of 16 is taken
/// out by the pass) with the 32 activation values at `y`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q5_0_block(v: &[__m256i; 5], y: *const u8) -> __m256i {
    let mut s = [_mm256_setzero_si256(); 2];
    for k in 0..4 {
        let (l, h) = q5_0_values(v, k);
        s[0] = _mm256_dpbusd_epi32(s[0], l, four(y, k));
        s[1] = _mm256_dpbusd_epi32(s[1], h, four(y, k + 4));
    }
    _mm256_add_epi32(s[0], s[1])
}

/// The eight rows' products with activation rows `t..t + T` of a group of `kind`, one lane per
/// row. `values(block)` gives a group block's values as unsigned bytes, vector `k` holding
/// each row's values `4k..4k + 4`, once for all `T` tokens; each token then sums them with
/// one `vpdpbusd` per vector, in its own chain, starting from `−bias · Σ y` (values stored
/// `bias` above the true ones and taken out in integers). The float steps are the AVX2
/// pass's, so the bits are its bits.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn vnni_pass<const T: usize>(
    kind: Kind,
    group: &[u8],
    blocks: usize,
    a: &Activations,
    t: usize,
    bias: i32,
    values: impl Fn(*const u8) -> [__m256i; 8],
) -> [__m256; T] {
    let size = kind.group_block();
    // A group block is 16 bytes of scales and eight rows' values: `values` reads within it.
    assert!(group.len() >= blocks * size);
    assert!(a.blocks() == blocks && a.tokens() >= t + T);
    // Rows `t..t + T` from one pointer each, row `j`'s block `b` at `j · blocks + b`.
    let (quants, scales, sums, integers) = a.from_row(t);
    assert!(quants.len() >= T * blocks * Q8_0_BYTES && scales.len() >= T * blocks);
    assert!(sums.len() >= T * blocks && integers.len() >= T * blocks);
    let (quants, scales, sums, integers) = (
        quants.as_ptr(),
        scales.as_ptr(),
        sums.as_ptr(),
        integers.as_ptr(),
    );
    let offset = kind.offset();
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..blocks {
        // SAFETY: block `b` of the group lies within it (asserted above).
        let base = unsafe { group.as_ptr().add(b * size) };
        prefetch(base, size.div_ceil(64));
        // SAFETY: 16 bytes of scales at the block's start.
        let dw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(base.cast()) });
        let v = values(base);
        // SAFETY (every read below): index `j · blocks + b` of rows `t..t + T`, within the
        // lengths asserted above; a block's 32 values follow its 2-byte scale.
        let at = |j: usize| j * blocks + b;
        let y: [*const u8; T] =
            std::array::from_fn(|j| unsafe { quants.add(at(j) * Q8_0_BYTES + 2) });
        // One chain of sums per token, each value vector taken by every token in turn.
        let mut s: [__m256i; T] =
            std::array::from_fn(|j| _mm256_set1_epi32(-bias * unsafe { *integers.add(at(j)) }));
        for (k, v) in v.iter().enumerate() {
            for j in 0..T {
                s[j] = _mm256_dpbusd_epi32(s[j], *v, four(y[j], k));
            }
        }
        for j in 0..T {
            let dot = _mm256_cvtepi32_ps(s[j]);
            // As the AVX2 pass: d_w · (d_y · Σ q·y − offset · d_y · Σ y).
            let (scale, sum) = unsafe { (*scales.add(at(j)), *sums.add(at(j))) };
            let scaled = _mm256_fmsub_ps(dot, _mm256_set1_ps(scale), _mm256_set1_ps(offset * sum));
            acc[j] = _mm256_fmadd_ps(dw, scaled, acc[j]);
        }
    }
    acc
}

/// The products of a Q4_K group's rows with every token of `a` (`blocks` Q8_K blocks per
/// token), written as rows `start..` of `out` (token-major).
///
/// # Safety
/// As for [`group`]; `group` holds `blocks` Q4_K group blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q4k_group(group: &[u8], blocks: usize, a: &[Q8K], out: &mut [f32], start: usize) {
    let (four, one) = (
        |t| q4k_pass::<TOKENS>(group, blocks, a, t),
        |t| q4k_pass::<1>(group, blocks, a, t),
    );
    each_pass(out, a.len() / blocks, start, four, one);
}

/// The eight rows' products with activation rows `t..t + T` of a Q4_K group, one lane per
/// row. Each vector of nibbles is split once for all `T` tokens; a sub-block's sum is made
/// in 32 bits and multiplied by its row's scale, then the block is finished as in the AVX2
/// version: `d_y · (d · Σ_j scale_j · Σ q·y − dmin · Σ_j min_j · Σ y)`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q4k_pass<const T: usize>(group: &[u8], blocks: usize, a: &[Q8K], t: usize) -> [__m256; T] {
    assert!(group.len() >= blocks * q4k::GROUP_BLOCK && a.len() >= (t + T) * blocks);
    let low = _mm256_set1_epi8(0x0f);
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..blocks {
        // SAFETY: block `b` of the group lies within it (asserted above).
        let base = unsafe { group.as_ptr().add(b * q4k::GROUP_BLOCK) };
        let ys: [&Q8K; T] = std::array::from_fn(|j| &a[(t + j) * blocks + b]);
        let scale = |j: usize| {
            // SAFETY: eight bytes of scales within the group block.
            _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(base.add(q4k::SCALES + 8 * j).cast()) })
        };
        let mut dots = [_mm256_setzero_si256(); T];
        for k in 0..4 {
            prefetch_part(base, q4k::GROUP_BLOCK, k, 4);
            let mut l = [_mm256_setzero_si256(); T];
            let mut h = [_mm256_setzero_si256(); T];
            for m in 0..8 {
                // SAFETY: vector `m` of pair `k`, within the group block.
                let v = unsafe { _mm256_loadu_si256(base.add(q4k::nibbles_at(k, m, 0)).cast()) };
                let (vl, vh) = (
                    _mm256_and_si256(v, low),
                    _mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                );
                for (j, y) in ys.iter().enumerate() {
                    // SAFETY: sub-blocks `2k` and `2k + 1` of the block's 256 values.
                    let (yl, yh) =
                        unsafe { (y.qs.as_ptr().add(64 * k), y.qs.as_ptr().add(64 * k + 32)) };
                    l[j] = _mm256_dpbusd_epi32(l[j], vl, four(yl.cast(), m));
                    h[j] = _mm256_dpbusd_epi32(h[j], vh, four(yh.cast(), m));
                }
            }
            for (j, dot) in dots.iter_mut().enumerate() {
                *dot = _mm256_add_epi32(*dot, _mm256_mullo_epi32(l[j], scale(2 * k)));
                *dot = _mm256_add_epi32(*dot, _mm256_mullo_epi32(h[j], scale(2 * k + 1)));
            }
        }
        // SAFETY: 16 bytes of `d` and of `dmin` at the block's start.
        let (d, dmin) = unsafe {
            (
                _mm256_cvtph_ps(_mm_loadu_si128(base.add(q4k::D).cast())),
                _mm256_cvtph_ps(_mm_loadu_si128(base.add(q4k::DMIN).cast())),
            )
        };
        for (j, acc) in acc.iter_mut().enumerate() {
            let y = ys[j];
            let dy = _mm256_set1_ps(y.d);
            let dot = _mm256_mul_ps(_mm256_cvtepi32_ps(dots[j]), dy);
            let offset = _mm256_mul_ps(_mm256_cvtepi32_ps(q4k::avx2::offsets(base, y)), dy);
            *acc = _mm256_fnmadd_ps(dmin, offset, _mm256_fmadd_ps(d, dot, *acc));
        }
    }
    acc
}

/// The products of a Q6_K group's rows with every token of `a` (`blocks` Q8_K blocks per
/// token), written as rows `start..` of `out` (token-major).
///
/// # Safety
/// As for [`group`]; `group` holds `blocks` Q6_K group blocks.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
pub unsafe fn q6k_group(group: &[u8], blocks: usize, a: &[Q8K], out: &mut [f32], start: usize) {
    wide_passes(
        out,
        a.len() / blocks,
        start,
        |t| q6k_pass::<WIDE>(group, blocks, a, t),
        |t| q6k_pass::<TOKENS>(group, blocks, a, t),
        |t| q6k_pass::<1>(group, blocks, a, t),
    );
}

/// The eight rows' products with activation rows `t..t + T` of a Q6_K group, one lane per
/// row. Each quarter of a step's values is unpacked once for all `T` tokens (the AVX2 version
/// unpacks them per token); a 16-value group's four steps are summed in 32 bits and multiplied
/// by its row's scale (sign-extended from the scale pair's half), then the block is finished
/// as in the AVX2 version: `d · d_y · (Σ s·q·y − 32 · Σ s·bsum)`. Quarter by quarter, a
/// token needs two accumulators, so eight tokens fit in the registers.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
fn q6k_pass<const T: usize>(group: &[u8], blocks: usize, a: &[Q8K], t: usize) -> [__m256; T] {
    assert!(group.len() >= blocks * q6k::GROUP_BLOCK && a.len() >= (t + T) * blocks);
    let mut acc = [_mm256_setzero_ps(); T];
    for b in 0..blocks {
        // SAFETY: block `b` of the group lies within it (asserted above).
        let base = unsafe { group.as_ptr().add(b * q6k::GROUP_BLOCK) };
        let ys: [&Q8K; T] = std::array::from_fn(|j| &a[(t + j) * blocks + b]);
        let load = |n: usize, m: usize, which: usize| {
            // SAFETY: a value vector within the group block.
            unsafe { _mm256_loadu_si256(base.add(q6k::vector_at(n, m, which, 0)).cast()) }
        };
        let mut dots = [_mm256_setzero_si256(); T];
        for n in 0..2 {
            for half in 0..2 {
                prefetch_part(base, q6k::GROUP_BLOCK, 2 * n + half, 4);
                for quarter in 0..4 {
                    // The quarter's scale of this half: group `2p + half` of pair `p = 4n + quarter`.
                    let pair = q6k::avx2::pair(base, 4 * n + quarter);
                    let scale = match half {
                        0 => _mm256_srai_epi32(_mm256_slli_epi32(pair, 16), 16),
                        _ => _mm256_srai_epi32(pair, 16),
                    };
                    let mut s = [_mm256_setzero_si256(); T];
                    for m in 4 * half..4 * half + 4 {
                        let q = q6k::avx2::quarter(
                            load(n, m, 0),
                            load(n, m, 1),
                            load(n, m, 2),
                            quarter,
                        );
                        for (s, y) in s.iter_mut().zip(&ys) {
                            // SAFETY: the quarter's 32 activations within the block's 256.
                            let yq = unsafe { y.qs.as_ptr().add(128 * n + 32 * quarter) };
                            *s = _mm256_dpbusd_epi32(*s, q, four(yq.cast(), m));
                        }
                    }
                    for (dot, s) in dots.iter_mut().zip(&s) {
                        *dot = _mm256_add_epi32(*dot, _mm256_mullo_epi32(*s, scale));
                    }
                }
            }
        }
        // SAFETY: 16 bytes of `d` at the block's start.
        let d = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(base.add(q6k::D).cast()) });
        for (j, acc) in acc.iter_mut().enumerate() {
            let (dot, y) = (&dots[j], ys[j]);
            let total = _mm256_sub_epi32(*dot, _mm256_slli_epi32(q6k::avx2::offsets(base, y), 5));
            let scaled = _mm256_mul_ps(_mm256_cvtepi32_ps(total), _mm256_set1_ps(y.d));
            *acc = _mm256_fmadd_ps(d, scaled, *acc);
        }
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::super::interleaved::{avx2, tests::random_rows, Interleaved, ROWS};
    use super::super::interleaved_q4k::InterleavedQ4K;
    use super::super::interleaved_q6k::InterleavedQ6K;
    use super::super::kernels::BLOCK;
    use super::super::kquants::{quantize_q8k, QK_K};
    use super::super::level::{detected, Level};
    use super::*;
    use rand::{Rng, SeedableRng};

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn vnni_products_are_the_avx2_bits() {
        if detected() < Level::Avx512 {
            eprintln!("no AVX-512 VNNI on this CPU; the AVX2 path is the one in use");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // Group counts with a partial last group; token counts around the pass of four.
        for (rows, tokens, blocks) in [(19, 9, 18), (8, 1, 3), (5, 4, 18), (24, 6, 5), (16, 21, 4)]
        {
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
                assert_eq!(bits(&got), bits(&want), "{kind:?} {rows}x{tokens}x{blocks}");
            }
        }
    }

    #[test]
    fn vnni_k_products_are_the_avx2_bits() {
        if detected() < Level::Avx512 {
            eprintln!("no AVX-512 VNNI on this CPU; the AVX2 path is the one in use");
            return;
        }
        let mut rng = rand::rngs::StdRng::seed_from_u64(10);
        for (rows, tokens, blocks) in [(19, 13, 2), (8, 1, 1), (5, 4, 3), (16, 6, 2)] {
            let x: Vec<f32> = (0..tokens * blocks * QK_K)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let mut a = vec![Q8K::ZERO; tokens * blocks];
            quantize_q8k(&x, &mut a);
            let q4 = InterleavedQ4K::new(
                &q4k::tests::random_rows(rows, blocks, &mut rng),
                rows,
                blocks * QK_K,
            );
            let q6 = InterleavedQ6K::new(
                &q6k::tests::random_rows(rows, blocks, &mut rng),
                rows,
                blocks * QK_K,
            );
            type Kernel = unsafe fn(&[u8], usize, &[Q8K], &mut [f32], usize);
            let starts = (0..rows).step_by(ROWS);
            let cases: [(Vec<&[u8]>, Kernel, Kernel); 2] = [
                (
                    starts.clone().map(|r| q4.group(r)).collect(),
                    q4k::avx2::group,
                    q4k_group,
                ),
                (
                    starts.clone().map(|r| q6.group(r)).collect(),
                    q6k::avx2::group,
                    q6k_group,
                ),
            ];
            for (i, (groups, avx2, vnni)) in cases.into_iter().enumerate() {
                let mut want = vec![f32::NAN; rows * tokens];
                let mut got = vec![f32::NAN; rows * tokens];
                for (g, group_bytes) in starts.clone().zip(groups) {
                    // SAFETY: the features were detected; the group and the activations have
                    // `blocks` blocks.
                    unsafe {
                        avx2(group_bytes, blocks, &a, &mut want, g);
                        vnni(group_bytes, blocks, &a, &mut got, g);
                    }
                }
                assert_eq!(
                    bits(&got),
                    bits(&want),
                    "kind {i}: {rows}x{tokens}x{blocks}"
                );
            }
        }
    }
}
