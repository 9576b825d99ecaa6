//! Attention's two products over the KV cache for the query heads of one KV head: their
//! scores against every cached key and the weighted sums of the cached values. Each runs over
//! all positions (the runs of a sequence's blocks) and all the heads in one call: a kernel
//! call per block and head cost more than the products of a decode step's short blocks. A
//! scalar reference and an AVX2/FMA version are held to each other by the tests; at the
//! AVX-512 level the weighted sums run sixteen lanes wide, to the AVX2 bits (`attention/avx512.rs`).
//!
//! The cache rows hold every KV head of a position: `keys[p * stride..][..d]` is position
//! `p`'s key for the head the slice starts at.

/// A cached value's storage type: `f32`, or `f16` (half the memory, and half the bytes a
/// decode step's attention reads; each key and value rounded once, when stored).
pub trait Element: Copy + Send + Sync + 'static {
    /// The stored form of `value`.
    fn from_f32(value: f32) -> Self;
    /// The value as f32.
    fn to_f32(self) -> f32;
    /// Eight values from `p` as the lanes of a vector.
    ///
    /// # Safety
    /// AVX2 and F16C must be available, and eight values from `p` readable.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// Sixteen values from `p` as the lanes of a vector.
    ///
    /// # Safety
    /// AVX2, F16C and AVX-512 F must be available, and sixteen values from `p` readable.
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Element for f32 {
    fn from_f32(value: f32) -> f32 {
        value
    }

    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const f32) -> std::arch::x86_64::__m256 {
        // SAFETY: the caller's.
        unsafe { std::arch::x86_64::_mm256_loadu_ps(p) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn load16(p: *const f32) -> std::arch::x86_64::__m512 {
        // SAFETY: the caller's.
        unsafe { std::arch::x86_64::_mm512_loadu_ps(p) }
    }
}

impl Element for half::f16 {
    fn from_f32(value: f32) -> half::f16 {
        half::f16::from_f32(value)
    }

    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const half::f16) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's: eight halves, 16 bytes.
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast())) }
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[allow(unsafe_code)]
    #[target_feature(enable = "avx2,fma,f16c,avx512f")]
    unsafe fn load16(p: *const half::f16) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        // SAFETY: the caller's: sixteen halves, 32 bytes.
        unsafe { _mm512_cvtph_ps(_mm256_loadu_si256(p.cast())) }
    }
}

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
pub fn scores<T: Element>(
    queries: &[f32],
    d: usize,
    keys: &[T],
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
pub fn weighted_sums<T: Element>(
    weights: &[f32],
    values: &[T],
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
    {
        use super::level::{level, Level};
        let (w, v) = (weights, values);
        // SAFETY: the features were detected; the sizes were checked above.
        #[allow(unsafe_code)]
        match level() {
            Level::Avx512 => {
                return unsafe { avx2::weighted_sums_runs::<T, true>(w, v, stride, runs, out, d) };
            }
            Level::Avx2 => {
                return unsafe { avx2::weighted_sums_runs::<T, false>(w, v, stride, runs, out, d) };
            }
            Level::Scalar => {}
        }
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
fn check_runs<T>(d: usize, cache: &[T], stride: usize, runs: &[Run]) {
    for &(at, len) in runs {
        assert!(at <= cache.len(), "a run starts in the cache");
        check(d, &cache[at..], stride, len);
    }
}

/// Asserts that `positions` rows of `d` values at `stride` fit in `cache`.
fn check<T>(d: usize, cache: &[T], stride: usize, positions: usize) {
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
    use super::Element;

    /// `out[p] = query · keys[p * stride..][..query.len()]`, one run of [`super::scores`].
    pub fn scores<T: Element>(query: &[f32], keys: &[T], stride: usize, out: &mut [f32]) {
        let d = query.len();
        for (p, o) in out.iter_mut().enumerate() {
            *o = query
                .iter()
                .zip(&keys[p * stride..][..d])
                .map(|(q, k)| q * k.to_f32())
                .sum();
        }
    }

    /// `out += Σ_p weights[p] · values[p * stride..][..out.len()]`, one run of
    /// [`super::weighted_sums`].
    pub fn weighted_sum_into<T: Element>(
        weights: &[f32],
        values: &[T],
        stride: usize,
        out: &mut [f32],
    ) {
        let d = out.len();
        for (p, w) in weights.iter().enumerate() {
            for (o, v) in out.iter_mut().zip(&values[p * stride..][..d]) {
                *o += w * v.to_f32();
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use super::Element;
    use std::arch::x86_64::*;

    /// Positions per step of [`scores`]: their four sums are reduced together.
    const POSITIONS: usize = 4;

    /// [`super::scores`] over runs: the queries two at a time, so that each key vector loaded
    /// serves both (eight chains of multiply-adds in flight), then the odd one alone.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; every run's rows lie within `keys` (checked by the
    /// caller), and `out` holds a score per query and position.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn scores_runs<T: Element>(
        queries: &[f32],
        d: usize,
        keys: &[T],
        stride: usize,
        runs: &[(usize, usize)],
        out: &mut [f32],
    ) {
        let heads = queries.len() / d;
        let total = out.len() / heads.max(1);
        let mut first = 0;
        for &(at, len) in runs {
            let keys = &keys[at..];
            let span = first..first + len;
            for (q, o) in queries.chunks(2 * d).zip(out.chunks_mut(2 * total)) {
                if q.len() == 2 * d {
                    let ((qa, qb), (oa, ob)) = (q.split_at(d), o.split_at_mut(total));
                    let out = [&mut oa[span.clone()], &mut ob[span.clone()]];
                    // SAFETY: as this function's.
                    unsafe { scores::<T, 2>([qa, qb], keys, stride, out) };
                } else {
                    // SAFETY: as this function's.
                    unsafe { scores::<T, 1>([q], keys, stride, [&mut o[span.clone()]]) };
                }
            }
            first += len;
        }
    }

    /// [`super::weighted_sums`] over runs: the queries two at a time, so that each value
    /// vector loaded serves both, then the odd one alone. `WIDE` sums with AVX-512
    /// ([`super::avx512::weighted_sum_into`]), to the same bits.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available, and AVX-512 F if `WIDE`; every run's rows lie
    /// within `values` (checked by the caller), and `weights` holds a weight per query and
    /// position.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn weighted_sums_runs<T: Element, const WIDE: bool>(
        weights: &[f32],
        values: &[T],
        stride: usize,
        runs: &[(usize, usize)],
        out: &mut [f32],
        d: usize,
    ) {
        let heads = out.len() / d;
        let total = weights.len() / heads.max(1);
        let mut first = 0;
        for &(at, len) in runs {
            let values = &values[at..];
            let span = first..first + len;
            for (w, o) in weights.chunks(2 * total).zip(out.chunks_mut(2 * d)) {
                if o.len() == 2 * d {
                    let ((wa, wb), (oa, ob)) = (w.split_at(total), o.split_at_mut(d));
                    let w = [&wa[span.clone()], &wb[span.clone()]];
                    // SAFETY: as this function's.
                    unsafe {
                        match WIDE {
                            true => super::avx512::weighted_sum_into(w, values, stride, [oa, ob]),
                            false => weighted_sum_into::<T, 2, 4>(w, values, stride, [oa, ob]),
                        }
                    };
                } else {
                    let w = [&w[span.clone()]];
                    // SAFETY: as this function's.
                    unsafe {
                        match WIDE {
                            true => super::avx512::weighted_sum_into(w, values, stride, [o]),
                            false => weighted_sum_into::<T, 1, 8>(w, values, stride, [o]),
                        }
                    };
                }
            }
            first += len;
        }
    }

    /// The scores of `H` queries against `out[0].len()` key rows at `stride`: each
    /// position's sum is formed lane by lane in column order and reduced four positions at a
    /// time, as it would be for one query alone.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `out[h].len()` rows of `queries[h].len()` values at
    /// `stride` lie within `keys`, and every query and output has the first's length.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn scores<T: Element, const H: usize>(
        queries: [&[f32]; H],
        keys: &[T],
        stride: usize,
        mut out: [&mut [f32]; H],
    ) {
        let d = queries[0].len();
        let whole = d / 8 * 8;
        let row = |p: usize| &keys[p * stride..][..d];
        // The dot products of every query with POSITIONS consecutive rows from `p`, formed
        // side by side so that their chains of multiply-adds overlap.
        let dots = |p: usize| -> [[__m256; POSITIONS]; H] {
            // The rows are checked once here; the loop reads within them.
            let last = row(p + POSITIONS - 1);
            let first = last.as_ptr().wrapping_sub((POSITIONS - 1) * stride);
            let mut acc = [[_mm256_setzero_ps(); POSITIONS]; H];
            for c in (0..whole).step_by(8) {
                // SAFETY: eight floats from `c < whole <= d` of each query and of each key row
                // `p + i` (rows `p` to `p + 3` lie in `keys`: the last was sliced above).
                unsafe {
                    let k: [__m256; POSITIONS] =
                        std::array::from_fn(|i| T::load8(first.add(i * stride + c)));
                    for (acc, query) in acc.iter_mut().zip(queries) {
                        let q = _mm256_loadu_ps(query.as_ptr().add(c));
                        for (a, k) in acc.iter_mut().zip(k) {
                            *a = _mm256_fmadd_ps(q, k, *a);
                        }
                    }
                }
            }
            acc
        };
        let dot = |query: &[f32], p: usize| -> __m256 {
            let key = row(p);
            let mut acc = _mm256_setzero_ps();
            for c in (0..whole).step_by(8) {
                // SAFETY: eight floats from `c < whole <= d` of the query and of the key row.
                acc = unsafe {
                    _mm256_fmadd_ps(
                        _mm256_loadu_ps(query.as_ptr().add(c)),
                        T::load8(key.as_ptr().add(c)),
                        acc,
                    )
                };
            }
            acc
        };
        let tail = |query: &[f32], p: usize| -> f32 {
            query[whole..]
                .iter()
                .zip(&row(p)[whole..])
                .map(|(q, k)| q * k.to_f32())
                .sum()
        };
        let positions = out[0].len();
        let grouped = positions / POSITIONS * POSITIONS;
        for p in (0..grouped).step_by(POSITIONS) {
            for ((sums, out), query) in dots(p).into_iter().zip(out.iter_mut()).zip(queries) {
                // Pairwise adds leave lane i of each half holding part of position p + i's sum.
                let [p0, p1, p2, p3] = sums;
                let pairs = _mm256_hadd_ps(_mm256_hadd_ps(p0, p1), _mm256_hadd_ps(p2, p3));
                let four = _mm_add_ps(
                    _mm256_castps256_ps128(pairs),
                    _mm256_extractf128_ps::<1>(pairs),
                );
                let sums = &mut out[p..p + POSITIONS];
                // SAFETY: the slice holds four floats.
                unsafe { _mm_storeu_ps(sums.as_mut_ptr(), four) };
                if whole < d {
                    for (i, s) in sums.iter_mut().enumerate() {
                        *s += tail(query, p + i);
                    }
                }
            }
        }
        for (out, query) in out.iter_mut().zip(queries) {
            for (p, o) in out.iter_mut().enumerate().skip(grouped) {
                *o = crate::models::cpu::kernels::avx2::sum_lanes(dot(query, p)) + tail(query, p);
            }
        }
    }

    /// `out[h] += Σ_p weights[h][p] · values[p * stride..]` for `H` queries, `V` vectors of
    /// each query's output per pass over the positions (`H × V` registers of sums), then the
    /// rest a vector at a time; each output value is summed in position order, as it would be
    /// for one query alone.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `weights[h].len()` rows of `out[h].len()` values at
    /// `stride` lie within `values`, and every query's weights and output have the first's
    /// lengths.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn weighted_sum_into<T: Element, const H: usize, const V: usize>(
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
        let whole = d / 8 * 8;
        let full = whole / (8 * V) * (8 * V);
        for c in (0..full).step_by(8 * V) {
            // SAFETY: `8V` values from `c + 8V <= whole <= d` of each row and output.
            unsafe { weighted_pass::<T, H, V>(&weights, values, stride, &mut out, c) };
        }
        for c in (full..whole).step_by(8) {
            // SAFETY: eight values from `c + 8 <= whole <= d` of each row and output.
            unsafe { weighted_pass::<T, H, 1>(&weights, values, stride, &mut out, c) };
        }
        if whole < d {
            for (out, weights) in out.into_iter().zip(weights) {
                let tail = &mut out[whole..];
                for (p, w) in weights.iter().enumerate() {
                    for (o, v) in tail
                        .iter_mut()
                        .zip(&values[p * stride + whole..][..d - whole])
                    {
                        *o += w * v.to_f32();
                    }
                }
            }
        }
    }

    /// One pass of [`weighted_sum_into`] over every position for the `8V` output values
    /// from `c` of each query.
    ///
    /// # Safety
    /// AVX2, FMA and F16C must be available; `c + 8V` is at most every output's length, and the
    /// positions' rows at `stride` hold as many values from `c` within `values`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn weighted_pass<T: Element, const H: usize, const V: usize>(
        weights: &[&[f32]; H],
        values: &[T],
        stride: usize,
        out: &mut [&mut [f32]; H],
        c: usize,
    ) {
        let mut acc = [[_mm256_setzero_ps(); V]; H];
        for (acc, out) in acc.iter_mut().zip(out.iter()) {
            for (k, a) in acc.iter_mut().enumerate() {
                // SAFETY: eight floats from `c + 8k < c + 8V <=` the output's length.
                *a = unsafe { _mm256_loadu_ps(out.as_ptr().add(c + 8 * k)) };
            }
        }
        let positions = weights[0].len();
        for p in 0..positions {
            // SAFETY: the caller's: row `p` holds `8V` values from `c`.
            let row = unsafe { values.as_ptr().add(p * stride + c) };
            let mut v = [_mm256_setzero_ps(); V];
            for (k, v) in v.iter_mut().enumerate() {
                // SAFETY: as above.
                *v = unsafe { T::load8(row.add(8 * k)) };
            }
            for (acc, weights) in acc.iter_mut().zip(weights) {
                let w = _mm256_set1_ps(weights[p]);
                for (a, v) in acc.iter_mut().zip(&v) {
                    *a = _mm256_fmadd_ps(w, *v, *a);
                }
            }
        }
        for (acc, out) in acc.iter().zip(out.iter_mut()) {
            for (k, a) in acc.iter().enumerate() {
                // SAFETY: eight floats from `c + 8k < c + 8V <=` the output's length.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr().add(c + 8 * k), *a) };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512;

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn scores_and_weighted_sums_match_the_f64_products() {
        products_match_f64::<f32>();
        products_match_f64::<half::f16>();
    }

    /// The kernels against f64 sums of the stored values, for a cache of `T`.
    fn products_match_f64<T: Element>() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        // Head sizes with and without a tail, positions around the group of four.
        for (d, stride, positions) in [(64, 192, 37), (64, 64, 1), (72, 80, 6), (13, 26, 5)] {
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
            let query = random(d);
            // The cache starts one head in, as a later KV head's slice does.
            let cache: Vec<T> = random(positions * stride + d)
                .into_iter()
                .map(T::from_f32)
                .collect();
            let cache = &cache[d.min(stride - d)..];
            let weights = random(positions);
            let exact_score = |p: usize| -> f64 {
                (0..d)
                    .map(|i| f64::from(query[i]) * f64::from(cache[p * stride + i].to_f32()))
                    .sum()
            };
            let exact_sum = |i: usize| -> f64 {
                (0..positions)
                    .map(|p| f64::from(weights[p]) * f64::from(cache[p * stride + i].to_f32()))
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

    /// The AVX-512 weighted sums give the AVX2 kernel's bits: head sizes with and without a
    /// tail past whole vectors of 64, 16 and 8 values, one to five queries, runs of several
    /// lengths.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn avx512_weighted_sums_are_the_avx2_bits() {
        if super::super::level::level() < super::super::level::Level::Avx512 {
            eprintln!("skipped: the kernels run below AVX-512 here");
            return;
        }
        wide_sums_are_avx2_sums::<f32>();
        wide_sums_are_avx2_sums::<half::f16>();
    }

    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    fn wide_sums_are_avx2_sums<T: Element>() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let shapes = [
            (64, 64),
            (128, 128),
            (72, 80),
            (40, 40),
            (13, 26),
            (200, 208),
        ];
        for (d, stride) in shapes {
            for heads in 1..=5 {
                let positions = 47;
                let mut random = |n: usize| -> Vec<f32> {
                    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
                };
                let cache: Vec<T> = random(positions * stride + d)
                    .into_iter()
                    .map(T::from_f32)
                    .collect();
                let weights = random(heads * positions);
                let runs = [
                    (0, 16),
                    (16 * stride, 12),
                    (28 * stride, 4),
                    (32 * stride, 15),
                ];
                let (mut narrow, mut wide) = (vec![0.25; heads * d], vec![0.25; heads * d]);
                let (w, c) = (&weights, &cache);
                // SAFETY: AVX-512 was detected (above); the runs lie within the cache.
                unsafe {
                    avx2::weighted_sums_runs::<T, false>(w, c, stride, &runs, &mut narrow, d);
                    avx2::weighted_sums_runs::<T, true>(w, c, stride, &runs, &mut wide, d);
                }
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&narrow), bits(&wide), "{d} {heads}");
            }
        }
    }

    /// Queries taken together (two at a time, the odd one alone) give each query the bits it
    /// gets alone, for head sizes with and without a tail and runs split at multiples of four.
    #[test]
    fn a_query_scores_and_sums_the_same_bits_alone_and_in_a_group() {
        same_bits_alone_and_together::<f32>();
        same_bits_alone_and_together::<half::f16>();
    }

    fn same_bits_alone_and_together<T: Element>() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for (d, stride, heads) in [(64, 192, 3), (64, 256, 8), (72, 80, 5), (13, 26, 2)] {
            let positions = 23;
            let mut random =
                |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
            let queries = random(heads * d);
            let cache: Vec<T> = random(positions * stride + d)
                .into_iter()
                .map(T::from_f32)
                .collect();
            let weights = random(heads * positions);
            let runs = [(0, 8), (8 * stride, 12), (20 * stride, 3)];
            let mut together = vec![0.0; heads * positions];
            scores(&queries, d, &cache, stride, &runs, &mut together);
            let mut summed = vec![0.5; heads * d];
            weighted_sums(&weights, &cache, stride, &runs, &mut summed, d);
            for h in 0..heads {
                let mut alone = vec![0.0; positions];
                scores(&queries[h * d..][..d], d, &cache, stride, &runs, &mut alone);
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&alone), bits(&together[h * positions..][..positions]));
                let mut sum = vec![0.5; d];
                let w = &weights[h * positions..][..positions];
                weighted_sums(w, &cache, stride, &runs, &mut sum, d);
                assert_eq!(bits(&sum), bits(&summed[h * d..][..d]), "{d} {h}");
            }
        }
    }
}
