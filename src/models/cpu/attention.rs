//! Attention's two products over the KV cache for the query heads of one KV head: their
//! scores against every cached key and the weighted sums of the cached values. Each runs over
//! all positions (the runs of a sequence's blocks) and all the heads in one call: a kernel
//! call per block and head cost more than the products of a decode step's short blocks. A
//! scalar reference and an AVX2/FMA version are held to each other by the tests.
//!
//! The cache rows hold every KV head of a position: `keys[p * stride..][..d]` is position
//! `p`'s key for the head the slice starts at.

/// A run of consecutive positions in the cache: the offset of its first row's value, and
/// how many rows.
pub type Run = (usize, usize);

/// Positions in all `runs`.
fn positions(runs: &[Run]) -> usize {
    runs.iter().map(|&(_, len)| len).sum()
}

/// Scores of several queries (`queries`: heads of `d` values, one after another) against the
/// keys of the positions of `runs`, taken in order: `out[j * P + p] = query_j · key_p`, `P`
/// the positions. The runs are walked once, each run's keys used by every query in turn while
/// they are in the cache. Runs other than the last must hold a multiple of four rows, so that
/// every position is summed as it would be in one run.
pub fn scores(
    queries: &[f32],
    d: usize,
    keys: &[f32],
    stride: usize,
    runs: &[Run],
    out: &mut [f32],
) {
    let total = positions(runs);
    assert_eq!(
        out.len(),
        queries.len() / d * total,
        "one score per query and position"
    );
    check_runs(d, keys, stride, runs);
    #[cfg(target_arch = "x86_64")]
    if super::kernels::simd() {
        // SAFETY: the features were detected; the sizes were checked above.
        #[allow(unsafe_code)]
        return unsafe { avx2::scores_runs(queries, d, keys, stride, runs, out) };
    }
    let mut first = 0;
    for &(at, len) in runs {
        for (query, out) in queries.chunks_exact(d).zip(out.chunks_exact_mut(total)) {
            scalar::scores(query, &keys[at..], stride, &mut out[first..first + len]);
        }
        first += len;
    }
}

/// Adds the weighted sums of the values of the positions of `runs` to `out`, for several
/// queries: `out[j][..] += Σ_p weights[j * P + p] · value_p`, each position added in turn, so a
/// sum split into runs rounds exactly as one run over all of them. `out` holds the queries'
/// outputs of `d` values one after another.
pub fn weighted_sums(
    weights: &[f32],
    values: &[f32],
    stride: usize,
    runs: &[Run],
    out: &mut [f32],
    d: usize,
) {
    let total = positions(runs);
    assert_eq!(
        weights.len(),
        out.len() / d * total,
        "one weight per query and position"
    );
    check_runs(d, values, stride, runs);
    #[cfg(target_arch = "x86_64")]
    if super::kernels::simd() {
        // SAFETY: the features were detected; the sizes were checked above.
        #[allow(unsafe_code)]
        return unsafe { avx2::weighted_sums_runs(weights, values, stride, runs, out, d) };
    }
    let mut first = 0;
    for &(at, len) in runs {
        for (weights, out) in weights.chunks_exact(total).zip(out.chunks_exact_mut(d)) {
            scalar::weighted_sum_into(&weights[first..first + len], &values[at..], stride, out);
        }
        first += len;
    }
}

/// Asserts that every run's rows fit in `cache`.
fn check_runs(d: usize, cache: &[f32], stride: usize, runs: &[Run]) {
    for &(at, len) in runs {
        assert!(at <= cache.len(), "a run starts in the cache");
        check(d, &cache[at..], stride, len);
    }
}

/// Asserts that `positions` rows of `d` values at `stride` fit in `cache`.
fn check(d: usize, cache: &[f32], stride: usize, positions: usize) {
    assert!(d <= stride, "a head is at most a cache row");
    if positions > 0 {
        assert!(
            (positions - 1) * stride + d <= cache.len(),
            "{positions} positions of the cache"
        );
    }
}

/// The reference versions.
pub mod scalar {
    /// `out[p] = query · keys[p * stride..][..query.len()]`, one run of [`super::scores`].
    pub fn scores(query: &[f32], keys: &[f32], stride: usize, out: &mut [f32]) {
        let d = query.len();
        for (p, o) in out.iter_mut().enumerate() {
            *o = query
                .iter()
                .zip(&keys[p * stride..][..d])
                .map(|(q, k)| q * k)
                .sum();
        }
    }

    /// `out += Σ_p weights[p] · values[p * stride..][..out.len()]`, one run of
    /// [`super::weighted_sums`].
    pub fn weighted_sum_into(weights: &[f32], values: &[f32], stride: usize, out: &mut [f32]) {
        let d = out.len();
        for (p, w) in weights.iter().enumerate() {
            for (o, v) in out.iter_mut().zip(&values[p * stride..][..d]) {
                *o += w * v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use std::arch::x86_64::*;

    /// Positions per step of [`scores`]: their four sums are reduced together.
    const POSITIONS: usize = 4;
    /// Output values per pass of [`weighted_sum`], held in four registers.
    const WIDTH: usize = 32;

    /// [`super::scores`] over runs.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; every run's rows lie within `keys` (checked by the
    /// caller), and `out` holds a score per query and position.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn scores_runs(
        queries: &[f32],
        d: usize,
        keys: &[f32],
        stride: usize,
        runs: &[(usize, usize)],
        out: &mut [f32],
    ) {
        let total = out.len() / (queries.len() / d).max(1);
        let mut first = 0;
        for &(at, len) in runs {
            for (query, out) in queries.chunks_exact(d).zip(out.chunks_exact_mut(total)) {
                // SAFETY: as this function's.
                unsafe { scores(query, &keys[at..], stride, &mut out[first..first + len]) };
            }
            first += len;
        }
    }

    /// [`super::weighted_sums`] over runs.
    ///
    /// # Safety
    /// AVX2 and FMA must be available; every run's rows lie within `values` (checked by the
    /// caller), and `weights` holds a weight per query and position.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn weighted_sums_runs(
        weights: &[f32],
        values: &[f32],
        stride: usize,
        runs: &[(usize, usize)],
        out: &mut [f32],
        d: usize,
    ) {
        let total = weights.len() / (out.len() / d).max(1);
        let mut first = 0;
        for &(at, len) in runs {
            for (weights, out) in weights.chunks_exact(total).zip(out.chunks_exact_mut(d)) {
                let part = &weights[first..first + len];
                // SAFETY: as this function's.
                unsafe { weighted_sum_into(part, &values[at..], stride, out) };
            }
            first += len;
        }
    }

    /// # Safety
    /// AVX2 and FMA must be available; `out.len()` rows of `query.len()` values at `stride`
    /// lie within `keys`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn scores(query: &[f32], keys: &[f32], stride: usize, out: &mut [f32]) {
        let d = query.len();
        let whole = d / 8 * 8;
        let row = |p: usize| &keys[p * stride..][..d];
        let dot = |p: usize| -> __m256 {
            let key = row(p);
            let mut acc = _mm256_setzero_ps();
            for c in (0..whole).step_by(8) {
                // SAFETY: eight floats from `c < whole <= d` of the query and of the key row.
                acc = unsafe {
                    _mm256_fmadd_ps(
                        _mm256_loadu_ps(query.as_ptr().add(c)),
                        _mm256_loadu_ps(key.as_ptr().add(c)),
                        acc,
                    )
                };
            }
            acc
        };
        let tail = |p: usize| -> f32 {
            query[whole..]
                .iter()
                .zip(&row(p)[whole..])
                .map(|(q, k)| q * k)
                .sum()
        };
        let positions = out.len();
        let grouped = positions / POSITIONS * POSITIONS;
        for p in (0..grouped).step_by(POSITIONS) {
            // Pairwise adds leave lane i of each half holding part of position p + i's sum.
            let pairs = _mm256_hadd_ps(
                _mm256_hadd_ps(dot(p), dot(p + 1)),
                _mm256_hadd_ps(dot(p + 2), dot(p + 3)),
            );
            let four = _mm_add_ps(
                _mm256_castps256_ps128(pairs),
                _mm256_extractf128_ps::<1>(pairs),
            );
            let mut sums = [0f32; POSITIONS];
            // SAFETY: the array holds four floats.
            unsafe { _mm_storeu_ps(sums.as_mut_ptr(), four) };
            for (i, s) in sums.iter().enumerate() {
                out[p + i] = s + tail(p + i);
            }
        }
        for (p, o) in out.iter_mut().enumerate().skip(grouped) {
            *o = crate::models::cpu::kernels::avx2::sum_lanes(dot(p)) + tail(p);
        }
    }

    /// # Safety
    /// AVX2 and FMA must be available; `weights.len()` rows of `out.len()` values at `stride`
    /// lie within `values`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn weighted_sum_into(weights: &[f32], values: &[f32], stride: usize, out: &mut [f32]) {
        let d = out.len();
        let whole = d / 8 * 8;
        for c in (0..whole).step_by(WIDTH) {
            let vectors = (whole - c).min(WIDTH) / 8;
            let mut acc = [_mm256_setzero_ps(); WIDTH / 8];
            for (k, acc) in acc.iter_mut().enumerate().take(vectors) {
                // SAFETY: eight floats from `c + 8k < whole <= d`.
                *acc = unsafe { _mm256_loadu_ps(out.as_ptr().add(c + 8 * k)) };
            }
            for (p, w) in weights.iter().enumerate() {
                let w = _mm256_set1_ps(*w);
                let value = &values[p * stride + c..][..vectors * 8];
                for (k, acc) in acc.iter_mut().enumerate().take(vectors) {
                    // SAFETY: eight floats from `8k < vectors * 8 = value.len()`.
                    *acc = unsafe {
                        _mm256_fmadd_ps(w, _mm256_loadu_ps(value.as_ptr().add(8 * k)), *acc)
                    };
                }
            }
            for (k, acc) in acc.iter().enumerate().take(vectors) {
                // SAFETY: eight floats from `c + 8k < whole <= d`.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * k), *acc) };
            }
        }
        if whole < d {
            let tail = &mut out[whole..];
            for (p, w) in weights.iter().enumerate() {
                for (o, v) in tail
                    .iter_mut()
                    .zip(&values[p * stride + whole..][..d - whole])
                {
                    *o += w * v;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn scores_and_weighted_sums_match_the_f64_products() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        // Head sizes with and without a tail, positions around the group of four.
        for (d, stride, positions) in [(64, 192, 37), (64, 64, 1), (72, 80, 6), (13, 26, 5)] {
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
            let query = random(d);
            // The cache starts one head in, as a later KV head's slice does.
            let cache = random(positions * stride + d);
            let cache = &cache[d.min(stride - d)..];
            let weights = random(positions);
            let exact_score = |p: usize| -> f64 {
                (0..d)
                    .map(|i| f64::from(query[i]) * f64::from(cache[p * stride + i]))
                    .sum()
            };
            let exact_sum = |i: usize| -> f64 {
                (0..positions)
                    .map(|p| f64::from(weights[p]) * f64::from(cache[p * stride + i]))
                    .sum()
            };
            let tolerance = |n: usize| 1e-6 * 4.0 * n as f64;
            let (mut fast, mut reference) = (vec![f32::NAN; positions], vec![f32::NAN; positions]);
            scores(&query, d, cache, stride, &[(0, positions)], &mut fast);
            scalar::scores(&query, cache, stride, &mut reference);
            for p in 0..positions {
                for got in [fast[p], reference[p]] {
                    let want = exact_score(p);
                    assert!(
                        (f64::from(got) - want).abs() <= tolerance(d),
                        "{d} {p}: {got} vs {want}"
                    );
                }
            }
            let (mut fast, mut reference) = (vec![0.0; d], vec![0.0; d]);
            weighted_sums(&weights, cache, stride, &[(0, positions)], &mut fast, d);
            scalar::weighted_sum_into(&weights, cache, stride, &mut reference);
            for i in 0..d {
                for got in [fast[i], reference[i]] {
                    let want = exact_sum(i);
                    assert!(
                        (f64::from(got) - want).abs() <= tolerance(positions),
                        "{d} {i}: {got} vs {want}"
                    );
                }
            }
        }
    }
}
