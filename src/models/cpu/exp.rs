//! `exp` over a whole vector, for softmax-like sums (the sampler's token weights, attention's
//! weights) and the SiLU of the feed-forward layers: the
//! standard library's `exp` is a call per value, which LLVM cannot vectorize. Here `exp(x)` is
//! `2^n · e^r` with `n` the nearest integer to `x / ln 2` and `|r| ≤ ln 2 / 2`, `e^r` its
//! Taylor polynomial to degree 6 (relative error under 3e-7, two units in the last place),
//! and `2^n` built from its exponent bits; every step is plain arithmetic that LLVM turns into
//! AVX2 (eight values per instruction) where the CPU has it.

/// Below this `exp` is taken as 0 (`e^-87` is near the smallest normal `f32`).
const UNDERFLOW: f32 = -87.0;
/// Values per block summed in `f32` before being added in `f64`.
pub const SUM_BLOCK: usize = 1024;

/// `e^x` for `x ≤ 0` (`x` above 0 is not supported: `2^n` would overflow past 88).
#[inline(always)]
pub fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * LN2_HI - n * LN2_LO;
    let poly = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^n from its biased exponent `n + 127`, read as an integer from the low mantissa bits
    // of `2^23 + n + 127` (a float-to-int cast would not vectorize: it saturates).
    let biased = (n.max(-126.0) + (127.0 + 8_388_608.0)).to_bits();
    let two_n = f32::from_bits(biased << 23);
    if x < UNDERFLOW {
        0.0
    } else {
        poly * two_n
    }
}

/// Sets `out[i] = e^((values[i] - max) · scale)` and returns the sum of `out`. `max` must be
/// at least every value and `scale` positive, so that every exponent is at most 0.
pub fn exp_shifted(values: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f64 {
    assert_eq!(values.len(), out.len(), "one output per value");
    #[cfg(target_arch = "x86_64")]
    if super::kernels::simd() {
        // SAFETY: the features `avx2_exp_shifted` enables were detected.
        #[allow(unsafe_code)]
        return unsafe { avx2_exp_shifted(values, max, scale, out) };
    }
    exp_shifted_body(values, max, scale, out)
}

/// [`exp_shifted`] compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_exp_shifted(values: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f64 {
    exp_shifted_body(values, max, scale, out)
}

#[inline(always)]
fn exp_shifted_body(values: &[f32], max: f32, scale: f32, out: &mut [f32]) -> f64 {
    let mut total = 0f64;
    for (v, o) in values.chunks(SUM_BLOCK).zip(out.chunks_mut(SUM_BLOCK)) {
        for (v, o) in v.iter().zip(o.iter_mut()) {
            *o = exp_nonpositive((v - max) * scale);
        }
        total += f64::from(sum_lanes(o));
    }
    total
}

/// `gate[i] = silu(gate[i]) · up[i]`, with `silu(g) = g / (1 + e^-g)` written through
/// `e^-|g|` (at most 1, so [`exp_nonpositive`] applies): `1 / (1 + e)` for `g ≥ 0` and
/// `e / (1 + e)` below 0.
pub fn silu_times(gate: &mut [f32], up: &[f32]) {
    assert_eq!(gate.len(), up.len(), "one up value per gate value");
    #[cfg(target_arch = "x86_64")]
    if super::kernels::simd() {
        // SAFETY: the features `avx2_silu_times` enables were detected.
        #[allow(unsafe_code)]
        return unsafe { avx2_silu_times(gate, up) };
    }
    silu_times_body(gate, up)
}

/// [`silu_times`] compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_silu_times(gate: &mut [f32], up: &[f32]) {
    silu_times_body(gate, up)
}

#[inline(always)]
fn silu_times_body(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        let e = exp_nonpositive(-g.abs());
        let sigmoid = if *g >= 0.0 { 1.0 } else { e } / (1.0 + e);
        *g = *g * sigmoid * u;
    }
}

/// The sum of `values` in eight running lanes (so that it vectorizes), then across them.
#[inline(always)]
fn sum_lanes(values: &[f32]) -> f32 {
    sum_at_least_body(values, f32::NEG_INFINITY)
}

/// The sum of the values at or above `floor` (at most [`SUM_BLOCK`] of them, so that `f32`
/// keeps the sum to about 1e-7), the way [`exp_shifted`] sums each block.
pub fn sum_at_least(values: &[f32], floor: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::kernels::simd() {
        // SAFETY: the features `avx2_sum_at_least` enables were detected.
        #[allow(unsafe_code)]
        return unsafe { avx2_sum_at_least(values, floor) };
    }
    sum_at_least_body(values, floor)
}

/// [`sum_at_least`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_sum_at_least(values: &[f32], floor: f32) -> f32 {
    sum_at_least_body(values, floor)
}

#[inline(always)]
fn sum_at_least_body(values: &[f32], floor: f32) -> f32 {
    let kept = |v: f32| if v >= floor { v } else { 0.0 };
    let mut lanes = [0f32; 8];
    let chunks = values.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|&v| kept(v)).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += kept(v);
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// The largest value that is not NaN (`-inf` when there is none), in eight lanes.
pub fn max_value(values: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::kernels::simd() {
        // SAFETY: the features `avx2_max_value` enables were detected.
        #[allow(unsafe_code)]
        return unsafe { avx2_max_value(values) };
    }
    max_value_body(values)
}

/// [`max_value`] compiled for AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn avx2_max_value(values: &[f32]) -> f32 {
    max_value_body(values)
}

#[inline(always)]
fn max_value_body(values: &[f32]) -> f32 {
    let larger = |a: f32, b: f32| if b > a { b } else { a };
    let mut lanes = [f32::NEG_INFINITY; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks
        .remainder()
        .iter()
        .fold(f32::NEG_INFINITY, |m, &v| larger(m, v));
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane = larger(*lane, v);
        }
    }
    lanes.into_iter().fold(tail, larger)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid() -> Vec<f32> {
        (0..20_011).map(|i| -100.0 + i as f32 * 0.005).collect()
    }

    #[test]
    fn exp_is_within_two_units_in_the_last_place_of_libm() {
        let x = grid();
        for v in &x {
            let (ours, exact) = (exp_nonpositive(*v), f64::from(*v).exp());
            if *v < UNDERFLOW {
                assert_eq!(ours, 0.0);
            } else {
                let relative = ((f64::from(ours) - exact) / exact).abs();
                assert!(relative < 3e-7, "exp({v}) = {ours}, libm {exact}");
            }
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
    }

    #[test]
    fn vector_exp_and_sum_match_the_scalar_ones() {
        let x: Vec<f32> = grid().into_iter().map(|v| v / 10.0 + 3.0).collect();
        let max = max_value(&x);
        assert_eq!(max, x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let mut out = vec![0f32; x.len()];
        let total = exp_shifted(&x, max, 0.7, &mut out);
        let mut expected_total = 0f64;
        for (v, o) in x.iter().zip(&out) {
            let expected = exp_nonpositive((v - max) * 0.7);
            assert_eq!(*o, expected, "the vector path computes the scalar formula");
            expected_total += f64::from(expected);
        }
        assert!((total - expected_total).abs() < 1e-5 * expected_total);
    }

    #[test]
    fn silu_times_matches_the_formula_in_f64() {
        let gate: Vec<f32> = grid().into_iter().map(|v| v + 50.0).collect();
        let up: Vec<f32> = (0..gate.len())
            .map(|i| 1.5 - (i % 7) as f32 * 0.5)
            .collect();
        let mut out = gate.clone();
        silu_times(&mut out, &up);
        for ((g, u), o) in gate.iter().zip(&up).zip(&out) {
            let (g, u) = (f64::from(*g), f64::from(*u));
            let want = g / (1.0 + (-g).exp()) * u;
            let tolerance = 1e-6 * want.abs() + 1e-30;
            assert!(
                (f64::from(*o) - want).abs() <= tolerance,
                "silu({g}) * {u} = {o}, want {want}"
            );
        }
        let mut nan = [f32::NAN, 0.0];
        silu_times(&mut nan, &[1.0, 1.0]);
        assert!(nan[0].is_nan(), "NaN stays NaN");
        assert_eq!(nan[1], 0.0);
    }

    #[test]
    fn max_skips_nan_and_handles_short_and_empty_input() {
        assert_eq!(max_value(&[]), f32::NEG_INFINITY);
        assert_eq!(max_value(&[f32::NAN, 1.0, 3.0]), 3.0);
        let mut long = vec![0.5f32; 37];
        long[3] = f32::NAN;
        long[36] = 2.0;
        assert_eq!(max_value(&long), 2.0);
    }
}
