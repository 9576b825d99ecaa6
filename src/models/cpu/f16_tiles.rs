//! Prefill's matrix products for f16 weight rows against f32 activations: a tile of weight
//! rows times a tile of tokens summed in registers, so that each weight value is converted once
//! for every token of the tile and each activation loaded once for every row of it.

use half::f16;

use super::kernels;

/// `out[t * rows + r]` = weight row `r` of `w` (`rows` consecutive rows of `columns` values) ·
/// activation row `t` of `x` (`tokens` rows of `columns` values): token-major, as the model's
/// activations are.
pub fn products(w: &[f16], x: &[f32], columns: usize, out: &mut [f32]) {
    let columns = columns.max(1);
    assert_eq!(w.len() % columns, 0, "whole weight rows");
    assert_eq!(x.len() % columns, 0, "whole activation rows");
    let tokens = x.len() / columns;
    assert_eq!(out.len(), w.len() / columns * tokens, "output size");
    #[cfg(target_arch = "x86_64")]
    if kernels::simd() {
        // SAFETY: the features were detected; the sizes were checked above.
        #[allow(unsafe_code)]
        return unsafe { avx2::products(w, x, columns, out) };
    }
    let rows = w.len() / columns;
    for (a, o) in x.chunks_exact(columns).zip(out.chunks_exact_mut(rows)) {
        for (row, v) in w.chunks_exact(columns).zip(o) {
            *v = kernels::dot_f16(row, a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod avx2 {
    use crate::models::cpu::kernels::avx2::sum_lanes;
    use crate::models::cpu::kernels::scalar;
    use half::f16;
    use std::arch::x86_64::*;

    /// Weight rows per tile.
    const ROWS: usize = 4;
    /// Tokens per tile.
    const TOKENS: usize = 2;

    /// # Safety
    /// AVX2, FMA and F16C must be available; `w` and `x` are whole rows of `columns` values and
    /// `out` holds their products.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn products(w: &[f16], x: &[f32], columns: usize, out: &mut [f32]) {
        let tokens = x.len() / columns;
        let rows = w.len() / columns;
        let whole_rows = rows / ROWS * ROWS;
        let whole_tokens = tokens / TOKENS * TOKENS;
        let row = |r: usize| &w[r * columns..(r + 1) * columns];
        let act = |t: usize| &x[t * columns..(t + 1) * columns];
        for r in (0..whole_rows).step_by(ROWS) {
            let w: [&[f16]; ROWS] = std::array::from_fn(|i| row(r + i));
            for t in (0..whole_tokens).step_by(TOKENS) {
                let p = tile(w, std::array::from_fn::<_, TOKENS, _>(|j| act(t + j)));
                store(out, rows, r, t, p);
            }
            for t in whole_tokens..tokens {
                store(out, rows, r, t, tile(w, [act(t)]));
            }
        }
        for r in whole_rows..rows {
            for t in (0..whole_tokens).step_by(TOKENS) {
                let p = tile(
                    [row(r)],
                    std::array::from_fn::<_, TOKENS, _>(|j| act(t + j)),
                );
                store(out, rows, r, t, p);
            }
            for t in whole_tokens..tokens {
                store(out, rows, r, t, tile([row(r)], [act(t)]));
            }
        }
    }

    /// The products of `R` weight rows with `T` activation rows, all of one length.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tile<const R: usize, const T: usize>(w: [&[f16]; R], a: [&[f32]; T]) -> [[f32; T]; R] {
        let n = w[0].len();
        assert!(w.iter().all(|w| w.len() == n) && a.iter().all(|a| a.len() == n));
        let whole = n / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        let mut x = [_mm256_setzero_ps(); R];
        for c in (0..whole).step_by(8) {
            for i in 0..R {
                // SAFETY: 8 halves from `c`, below `whole` <= the row's length (asserted).
                x[i] = unsafe { _mm256_cvtph_ps(_mm_loadu_si128(w[i].as_ptr().add(c).cast())) };
            }
            for j in 0..T {
                // SAFETY: 8 floats from `c` of a row as long as the weight rows (asserted).
                let y = unsafe { _mm256_loadu_ps(a[j].as_ptr().add(c)) };
                for i in 0..R {
                    acc[i][j] = _mm256_fmadd_ps(x[i], y, acc[i][j]);
                }
            }
        }
        let mut out = [[0f32; T]; R];
        for i in 0..R {
            for j in 0..T {
                out[i][j] = sum_lanes(acc[i][j]) + scalar::dot_f16(&w[i][whole..], &a[j][whole..]);
            }
        }
        out
    }

    /// Writes a tile's products at rows `r..` and tokens `t..` of `out` (tokens × `rows`).
    #[inline]
    fn store<const R: usize, const T: usize>(
        out: &mut [f32],
        rows: usize,
        r: usize,
        t: usize,
        p: [[f32; T]; R],
    ) {
        for j in 0..T {
            let o = &mut out[(t + j) * rows + r..][..R];
            for (o, p) in o.iter_mut().zip(&p) {
                *o = p[j];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn tiles_compute_every_product_of_rows_and_tokens() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Row and token counts around the tile sizes; lengths with and without a tail.
        for (rows, tokens, columns) in [(5, 9, 576), (4, 8, 64), (1, 3, 45), (7, 1, 40)] {
            let w: Vec<f16> = (0..rows * columns)
                .map(|_| f16::from_f32(rng.random_range(-2.0f32..2.0)))
                .collect();
            let x: Vec<f32> = (0..tokens * columns)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let mut out = vec![f32::NAN; rows * tokens];
            products(&w, &x, columns, &mut out);
            for (r, row) in w.chunks_exact(columns).enumerate() {
                for (t, a) in x.chunks_exact(columns).enumerate() {
                    let want = kernels::scalar::dot_f16(row, a);
                    let got = out[t * rows + r];
                    // Float rounding of `columns` products of magnitude up to 4 in another order.
                    let tolerance = 8e-6 * columns as f32;
                    assert!((got - want).abs() <= tolerance, "{r} {t}: {got} vs {want}");
                }
            }
        }
    }
}
