//! The AVX-512 form of attention's weighted sums, to the AVX2 kernel's bits: each output
//! value is one chain of multiply-adds over the positions whatever the vector width, so
//! sixteen lanes give the eight-lane bits with half the loads and multiply-adds
//! (`cargo bench --bench kernels -- attention/sums`). The scores stay with the AVX2 kernel:
//! to keep its bits a 512-bit form must load each key's eight values into both halves of a
//! register, and on the Xeon measured that shuffle cost what the wider multiply-adds saved
//! (two queries over 256 positions: 28.9 G multiply-adds/s at AVX2, 23.1 with AVX-512).

#![allow(unsafe_code)]

use super::avx2;
use super::Element;
use std::arch::x86_64::*;

/// Output vectors per query in a pass of [`weighted_sum_into`].
const VECTORS: usize = 4;

/// `out[h] += Σ_p weights[h][p] · values[p * stride..]` for `H` queries, as
/// `avx2::weighted_sum_into` gives it: sixteen output values a vector, [`VECTORS`] vectors of
/// each query's output per pass over the positions, then single vectors, then the AVX2
/// kernel for the last fewer than sixteen.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F must be available; `weights[h].len()` rows of
/// `out[h].len()` values at `stride` lie within `values`, and every query's weights and output
/// have the first's lengths.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub(super) unsafe fn weighted_sum_into<T: Element, const H: usize>(
    weights: [&[f32]; H],
    values: &[T],
    stride: usize,
    mut out: [&mut [f32]; H],
) {
    let d = out[0].len();
    let positions = weights[0].len();
    if positions > 0 {
        assert!((positions - 1) * stride + d <= values.len(), "value rows");
    }
    let wide = d / 16 * 16;
    let full = wide / (16 * VECTORS) * (16 * VECTORS);
    for c in (0..full).step_by(16 * VECTORS) {
        // SAFETY: `16 VECTORS` values from `c` of each row and output, within `wide <= d`.
        unsafe { pass::<T, H, VECTORS>(&weights, values, stride, &mut out, c) };
    }
    for c in (full..wide).step_by(16) {
        // SAFETY: sixteen values from `c + 16 <= wide <= d` of each row and output.
        unsafe { pass::<T, H, 1>(&weights, values, stride, &mut out, c) };
    }
    if wide < d {
        let rest = out.map(|o| &mut o[wide..]);
        // SAFETY: the caller's, for the values from `wide` of each row.
        unsafe { avx2::weighted_sum_into::<T, H, 1>(weights, &values[wide..], stride, rest) };
    }
}

/// One pass of [`weighted_sum_into`] over every position for the `16V` output values from `c`
/// of each query.
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F must be available; `c + 16V` is at most every output's
/// length, and the positions' rows at `stride` hold as many values from `c` within `values`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn pass<T: Element, const H: usize, const V: usize>(
    weights: &[&[f32]; H],
    values: &[T],
    stride: usize,
    out: &mut [&mut [f32]; H],
    c: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); V]; H];
    for (acc, out) in acc.iter_mut().zip(out.iter()) {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: sixteen floats from `c + 16k < c + 16V <=` the output's length.
            *a = unsafe { _mm512_loadu_ps(out.as_ptr().add(c + 16 * k)) };
        }
    }
    for p in 0..weights[0].len() {
        // SAFETY: the caller's: row `p` holds `16V` values from `c`.
        let row = unsafe { values.as_ptr().add(p * stride + c) };
        let mut v = [_mm512_setzero_ps(); V];
        for (k, v) in v.iter_mut().enumerate() {
            // SAFETY: as above.
            *v = unsafe { T::load16(row.add(16 * k)) };
        }
        for (acc, weights) in acc.iter_mut().zip(weights) {
            let w = _mm512_set1_ps(weights[p]);
            for (a, v) in acc.iter_mut().zip(&v) {
                *a = _mm512_fmadd_ps(w, *v, *a);
            }
        }
    }
    for (acc, out) in acc.iter().zip(out.iter_mut()) {
        for (k, a) in acc.iter().enumerate() {
            // SAFETY: sixteen floats from `c + 16k < c + 16V <=` the output's length.
            unsafe { _mm512_storeu_ps(out.as_mut_ptr().add(c + 16 * k), *a) };
        }
    }
}
