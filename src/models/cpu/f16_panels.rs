//! f16 and bf16 weights in panels of [`PANEL`] rows, and their products with f32 activations
//! (each weight widened to f32 exactly, then multiplied and added in f32). Panels
//! are stored in groups of [`GROUP`] (32 rows), column by column: the group's 32 values of
//! column 0, then of column 1, ... A panel's column is 16 consecutive values within its
//! group's column.
//!
//! The layout makes an output tile a set of whole vectors: a panel's 16 rows times up to six
//! tokens are twelve AVX registers, each column adds one converted weight pair times one
//! broadcast activation per token, and no sum ever crosses lanes. Each weight value is
//! converted once per six tokens and each activation loaded once per 16 rows; the results are
//! 16 consecutive outputs of a token, stored as two vectors into the token-major output.
//! The activations are first [`pack`]ed tile by tile, so that a tile reads them as one stream
//! rather than six rows whose addresses may share a cache set. A decode (one token) takes
//! [`STREAMS`] whole groups per pass: their four panels' eight sums are independent chains,
//! read from two streams of one 64-byte line per column, and each panel's sums are formed in
//! exactly a tile's order. Groups of four panels (128 bytes a column) made the AVX-512 tiles'
//! walks, two panels a unit, read every other line: 1b f16 two threads, 16 streams 75 → 89
//! tokens/s and decode 12.8 → 14.5 with groups of two (`llorch bench --concurrency 16`).

use half::{bf16, f16};
use rayon::prelude::*;

use super::buffer::zeros;
use super::huge_pages::{weight_buffer, WeightBuffer};
use super::level::Level;
use super::Plain;

/// A 16-bit float type that panels hold: f16 or bf16.
pub trait Half: Plain {
    /// bf16 (its bits are an f32's top half); otherwise IEEE f16.
    const BF16: bool;
    /// The value of two little-endian bytes.
    fn from_le(bytes: [u8; 2]) -> Self;
    /// The value as f32 (exact).
    fn widen(self) -> f32;
}

impl Half for f16 {
    const BF16: bool = false;
    fn from_le(bytes: [u8; 2]) -> Self {
        f16::from_le_bytes(bytes)
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

impl Half for bf16 {
    const BF16: bool = true;
    fn from_le(bytes: [u8; 2]) -> Self {
        bf16::from_le_bytes(bytes)
    }
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// Rows per panel.
pub const PANEL: usize = 16;
/// Tokens per tile of the AVX2 version: 6 × 2 accumulators, 2 weight vectors and a broadcast
/// fill 15 of the 16 AVX registers.
pub(super) const TOKENS: usize = 6;
/// Tokens per tile of the AVX-512 version ([`super::half_avx512`]): a panel's 16 rows are one
/// 512-bit register, so 16 accumulators, the weights and a broadcast fit in its 32.
pub(super) const WIDE: usize = 16;

/// Tokens per tile at the kernels' level: the activations are [`pack`]ed this wide.
fn tile_width() -> usize {
    match super::level::level() {
        super::level::Level::Avx512 => WIDE,
        _ => TOKENS,
    }
}

/// The tiles of `tokens` tokens `width` wide: their first token and their width.
pub(super) fn tiles(tokens: usize, width: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..tokens)
        .step_by(width)
        .map(move |t| (t, width.min(tokens - t)))
}

/// `tokens` activation rows of `columns` values (`x`, row-major) laid out tile by tile, as
/// wide as the kernels' level takes them (see [`pack_tiles`]).
pub fn pack(x: &[f32], tokens: usize, columns: usize) -> Vec<f32> {
    pack_tiles(x, tokens, columns, tile_width())
}

/// `x` laid out in tiles of `width` tokens: the tile of tokens `t..t + w` takes `w × columns`
/// values from `t × columns`, column by column (value `k` of token `t + j` at
/// `t × columns + k × w + j`).
pub(super) fn pack_tiles(x: &[f32], tokens: usize, columns: usize, width: usize) -> Vec<f32> {
    assert_eq!(x.len(), tokens * columns, "activation size");
    let mut packed = zeros(x.len());
    let tile = width * columns.max(1);
    packed
        .par_chunks_mut(tile)
        .zip(x.par_chunks(tile))
        .for_each(|(packed, rows)| {
            let width = rows.len() / columns;
            for (k, column) in packed.chunks_exact_mut(width).enumerate() {
                for (j, v) in column.iter_mut().enumerate() {
                    *v = rows[j * columns + k];
                }
            }
        });
    packed
}

/// Panels per storage group: a group's column is one 64-byte line, so a pair of panels walks
/// its storage as one stream.
pub const GROUP: usize = 2;
/// Groups a one-token product runs at once ([`avx2::products`]): their panels' eight
/// independent sums cover the additions' latency.
pub const STREAMS: usize = 2;
/// Rows per storage group.
pub(super) const GROUP_ROWS: usize = GROUP * PANEL;

/// A `rows × columns` matrix of `H` values in groups of panels; the last group's missing rows
/// are zeros.
pub struct HalfPanels<H: Half> {
    rows: usize,
    columns: usize,
    data: WeightBuffer<H>,
}

/// An f16 matrix in panels.
pub type F16Panels = HalfPanels<f16>;
/// A bf16 matrix in panels.
pub type Bf16Panels = HalfPanels<bf16>;

/// Where a product reads: the matrix's values, its columns, and the first panel.
pub(super) struct Panels<'a, H> {
    /// The matrix's values, in groups of panels.
    pub(super) data: &'a [H],
    /// Values per row.
    pub(super) columns: usize,
    /// The first panel of the product.
    pub(super) first: usize,
}

impl<H> Clone for Panels<'_, H> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<H> Copy for Panels<'_, H> {}

impl<H> Panels<'_, H> {
    /// Where panel `p` (from the first) starts: its column `k` is 16 values from there plus
    /// `k × GROUP_ROWS`.
    pub(super) fn at(&self, p: usize) -> usize {
        let p = self.first + p;
        p / GROUP * GROUP_ROWS * self.columns + p % GROUP * PANEL
    }
}

impl<H: Half> HalfPanels<H> {
    /// Lays out `rows` row-major rows of `columns` little-endian `H` values.
    pub fn new(bytes: &[u8], rows: usize, columns: usize) -> HalfPanels<H> {
        assert_eq!(
            bytes.len(),
            rows * columns * 2,
            "rows × columns 16-bit values"
        );
        let groups = rows.div_ceil(GROUP_ROWS);
        let mut data = weight_buffer(groups * GROUP_ROWS * columns);
        data.par_chunks_exact_mut(GROUP_ROWS * columns.max(1))
            .enumerate()
            .for_each(|(g, group)| {
                for i in 0..GROUP_ROWS.min(rows - g * GROUP_ROWS) {
                    let row = &bytes[(g * GROUP_ROWS + i) * columns * 2..][..columns * 2];
                    for (k, b) in row.chunks_exact(2).enumerate() {
                        group[k * GROUP_ROWS + i] = H::from_le([b[0], b[1]]);
                    }
                }
            });
        HalfPanels {
            rows,
            columns,
            data,
        }
    }

    /// Row `row` as f32 values (an embedding lookup).
    pub fn row(&self, row: usize, out: &mut [f32]) {
        let size = GROUP_ROWS * self.columns;
        let group = &self.data[row / GROUP_ROWS * size..][..size];
        for (o, column) in out.iter_mut().zip(group.chunks_exact(GROUP_ROWS)) {
            *o = column[row % GROUP_ROWS].widen();
        }
    }

    /// Where a product of rows `first..` (a multiple of [`PANEL`]) reads.
    pub(super) fn panels(&self, first: usize) -> Panels<'_, H> {
        Panels {
            data: &self.data,
            columns: self.columns,
            first: first / PANEL,
        }
    }

    /// The products of rows `first..` with `tokens` activation rows, [`pack`]ed in `x`,
    /// token-major: `out[t * count + i]` = row `first + i` · token `t`, for the `count` rows
    /// `out` has room for. `first` is a multiple of [`PANEL`].
    pub fn products(&self, first: usize, x: &[f32], tokens: usize, out: &mut [f32]) {
        assert!(
            tokens > 0 && first.is_multiple_of(PANEL),
            "a panel's first row"
        );
        assert_eq!(x.len(), tokens * self.columns, "activation size");
        assert_eq!(out.len() % tokens, 0, "whole rows of products");
        assert!(
            first + out.len() / tokens <= self.rows,
            "rows of the matrix"
        );
        let panels = self.panels(first);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the level's features were detected; the sizes were checked above, and the
        // storage holds whole groups, so every panel of these rows lies within it; `x` was
        // packed as wide as the level's tiles.
        #[allow(unsafe_code)]
        match super::level::level() {
            Level::Avx512 if tokens > 1 => {
                return unsafe { super::half_avx512::products(panels, x, tokens, out) }
            }
            Level::Avx512 | Level::Avx2 => {
                return unsafe { avx2::products(panels, x, tokens, out) }
            }
            Level::Scalar => {}
        }
        scalar::products(panels, x, tokens, out, tile_width())
    }
}

/// Writes the products of panel `p` with token `t` (`values`, one per panel row) into `out`
/// (token-major, `count` rows of products per token), as many as it has rows for.
pub(super) fn write(out: &mut [f32], count: usize, p: usize, t: usize, values: &[f32; PANEL]) {
    let valid = PANEL.min(count - p * PANEL);
    out[t * count + p * PANEL..][..valid].copy_from_slice(&values[..valid]);
}

/// The reference version.
mod scalar {
    use super::{tiles, write, Half, Panels, GROUP_ROWS, PANEL};

    /// [`super::HalfPanels::products`] of the panels from `panels.first`, `x` packed in
    /// tiles `tile` tokens wide.
    pub fn products<H: Half>(
        panels: Panels<'_, H>,
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
        tile: usize,
    ) {
        let (count, columns) = (out.len() / tokens, panels.columns);
        for p in 0..count.div_ceil(PANEL) {
            let at = panels.at(p);
            for (t, width) in tiles(tokens, tile) {
                let tile = &x[t * columns..(t + width) * columns];
                for j in 0..width {
                    let mut sums = [0f32; PANEL];
                    for (k, a) in tile.iter().skip(j).step_by(width).enumerate() {
                        let w = &panels.data[at + k * GROUP_ROWS..][..PANEL];
                        for (s, w) in sums.iter_mut().zip(w) {
                            *s += w.widen() * a;
                        }
                    }
                    write(out, count, p, t + j, &sums);
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod avx2 {
    use super::{tiles, write, Half, Panels, GROUP, GROUP_ROWS, PANEL, STREAMS, TOKENS};
    use crate::models::cpu::kernels::avx2::prefetch;
    use std::arch::x86_64::*;

    /// The eight `H` values at `p` as f32: f16 converted by F16C, bf16 moved into the top
    /// half of each lane (both exact).
    ///
    /// # Safety
    /// Eight values must be readable at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen<H: Half>(p: *const H) -> __m256 {
        // SAFETY: the caller's 16 bytes at `p`.
        let bits = unsafe { _mm_loadu_si128(p.cast()) };
        if H::BF16 {
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bits), 16))
        } else {
            _mm256_cvtph_ps(bits)
        }
    }

    /// # Safety
    /// AVX2, FMA and F16C must be available; the storage holds every panel of `out`'s rows,
    /// `x` is `tokens` rows of `columns` values, packed in tiles of [`TOKENS`].
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn products<H: Half>(
        panels: Panels<'_, H>,
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
    ) {
        let (count, columns) = (out.len() / tokens, panels.columns);
        let total = count.div_ceil(PANEL);
        if tokens == 1 {
            // Whole groups a pass at a time, panels before the first group and after the last
            // one by one.
            let mut p = 0;
            while p < total {
                let whole = (panels.first + p).is_multiple_of(GROUP);
                if whole && p + STREAMS * GROUP <= total {
                    p += groups::<H, STREAMS>(panels, p, x, out);
                } else if whole && p + GROUP <= total {
                    p += groups::<H, 1>(panels, p, x, out);
                } else {
                    write(out, count, p, 0, &lanes(tile::<H, 1>(panels, p, x)[0]));
                    p += 1;
                }
            }
            return;
        }
        for p in 0..total {
            for (t, width) in tiles(tokens, TOKENS) {
                let a = &x[t * columns..(t + width) * columns];
                match width {
                    TOKENS => store(out, count, p, t, tile::<H, TOKENS>(panels, p, a)),
                    1 => store(out, count, p, t, tile::<H, 1>(panels, p, a)),
                    2 => store(out, count, p, t, tile::<H, 2>(panels, p, a)),
                    3 => store(out, count, p, t, tile::<H, 3>(panels, p, a)),
                    4 => store(out, count, p, t, tile::<H, 4>(panels, p, a)),
                    _ => store(out, count, p, t, tile::<H, 5>(panels, p, a)),
                }
            }
        }
    }

    /// The products of panel `p` with a packed tile of `T` tokens: per token, two vectors of
    /// the panel's 16 rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn tile<H: Half, const T: usize>(
        panels: Panels<'_, H>,
        p: usize,
        a: &[f32],
    ) -> [[__m256; 2]; T] {
        let columns = a.len() / T;
        let at = panels.at(p);
        assert!(columns == panels.columns && a.len() == T * columns);
        assert!(columns == 0 || at + (columns - 1) * GROUP_ROWS + PANEL <= panels.data.len());
        let (w, a) = (panels.data.as_ptr().wrapping_add(at), a.as_ptr());
        let mut acc = [[_mm256_setzero_ps(); 2]; T];
        for k in 0..columns {
            // SAFETY: column `k` of the panel is 16 halves from `at + k GROUP_ROWS` and column
            // `k` of the tile `T` floats from `T k` (asserted lengths).
            unsafe {
                let w0 = widen(w.add(k * GROUP_ROWS));
                let w1 = widen(w.add(k * GROUP_ROWS + 8));
                for (j, acc) in acc.iter_mut().enumerate() {
                    let b = _mm256_broadcast_ss(&*a.add(k * T + j));
                    acc[0] = _mm256_fmadd_ps(w0, b, acc[0]);
                    acc[1] = _mm256_fmadd_ps(w1, b, acc[1]);
                }
            }
        }
        acc
    }

    /// Writes the one-token products of the `N` whole groups from panel `p` into `out`;
    /// returns the panels done.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn groups<H: Half, const N: usize>(
        panels: Panels<'_, H>,
        p: usize,
        x: &[f32],
        out: &mut [f32],
    ) -> usize {
        let size = GROUP_ROWS * x.len();
        let groups = std::array::from_fn(|n| &panels.data[panels.at(p) + n * size..][..size]);
        let sums = matvec::<H, N>(groups, x);
        for (i, sums) in sums.into_iter().flatten().enumerate() {
            write(out, out.len(), p + i, 0, &lanes(sums));
        }
        N * GROUP
    }

    /// The products of `N` groups with one activation row. Each panel's sums run over the
    /// columns in order, exactly as [`tile`] forms them for a token of a batch, so a token
    /// decoded alone gets the same bits as in a batch; the groups' panels' independent sums
    /// (eight for two groups) overlap the additions' latency, and a group's column is one
    /// 64-byte line.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn matvec<H: Half, const N: usize>(groups: [&[H]; N], x: &[f32]) -> [[[__m256; 2]; GROUP]; N] {
        let columns = x.len();
        for group in groups {
            assert_eq!(group.len(), GROUP_ROWS * columns);
        }
        let bases = groups.map(<[H]>::as_ptr);
        let mut acc = [[[_mm256_setzero_ps(); 2]; GROUP]; N];
        for (k, &value) in x.iter().enumerate() {
            // SAFETY: `k < columns`: column `k` of a group is `GROUP_ROWS` halves from
            // `k GROUP_ROWS`.
            unsafe {
                let s = _mm256_set1_ps(value);
                for (base, acc) in bases.iter().zip(acc.iter_mut()) {
                    if k % 4 == 0 {
                        prefetch(base.wrapping_add(k * GROUP_ROWS).cast(), GROUP_ROWS / 8);
                    }
                    let column = base.add(k * GROUP_ROWS);
                    for (i, acc) in acc.iter_mut().enumerate() {
                        let [w0, w1] = widen_panel(column.add(i * PANEL));
                        acc[0] = _mm256_fmadd_ps(w0, s, acc[0]);
                        acc[1] = _mm256_fmadd_ps(w1, s, acc[1]);
                    }
                }
            }
        }
        if H::BF16 {
            // Rows 0-3 and 8-11 sat in the first vector, 4-7 and 12-15 in the second.
            for acc in acc.iter_mut().flatten() {
                *acc = [
                    _mm256_permute2f128_ps::<0x20>(acc[0], acc[1]),
                    _mm256_permute2f128_ps::<0x31>(acc[0], acc[1]),
                ];
            }
        }
        acc
    }

    /// A panel's column (16 values at `p`) as f32 in two vectors: f16 rows 0-7 and 8-15;
    /// bf16 rows 0-3 and 8-11, then 4-7 and 12-15, each value interleaved with a zero below
    /// it (one load and two shuffles, where the in-order widening takes two loads, two
    /// zero-extensions and two shifts).
    ///
    /// # Safety
    /// Sixteen values must be readable at `p`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn widen_panel<H: Half>(p: *const H) -> [__m256; 2] {
        if H::BF16 {
            // SAFETY: the caller's 32 bytes at `p`.
            let bits = unsafe { _mm256_loadu_si256(p.cast()) };
            let zero = _mm256_setzero_si256();
            [
                _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, bits)),
                _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, bits)),
            ]
        } else {
            // SAFETY: the caller's 16 values at `p`.
            unsafe { [widen(p), widen(p.add(8))] }
        }
    }

    /// The 16 values of two vectors.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn lanes(v: [__m256; 2]) -> [f32; PANEL] {
        let mut out = [0f32; PANEL];
        // SAFETY: 8 floats at offsets 0 and 8 of a 16-float array.
        unsafe {
            _mm256_storeu_ps(out.as_mut_ptr(), v[0]);
            _mm256_storeu_ps(out.as_mut_ptr().add(8), v[1]);
        }
        out
    }

    /// Writes a tile's products (panel `p`, tokens `t..`) into `out`.
    #[inline]
    #[target_feature(enable = "avx2")]
    fn store<const T: usize>(
        out: &mut [f32],
        count: usize,
        p: usize,
        t: usize,
        tile: [[__m256; 2]; T],
    ) {
        for (j, v) in tile.into_iter().enumerate() {
            let at = (t + j) * count + p * PANEL;
            if count - p * PANEL >= PANEL {
                let o = &mut out[at..at + PANEL];
                // SAFETY: 8 floats at offsets 0 and 8 of a 16-float slice.
                unsafe {
                    _mm256_storeu_ps(o.as_mut_ptr(), v[0]);
                    _mm256_storeu_ps(o.as_mut_ptr().add(8), v[1]);
                }
            } else {
                write(out, count, p, t + j, &lanes(v));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn matrix<H: Half>(
        rng: &mut impl Rng,
        rows: usize,
        columns: usize,
        from: fn(f32) -> H,
        bytes: fn(H) -> [u8; 2],
    ) -> (Vec<H>, Vec<u8>) {
        let values: Vec<H> = (0..rows * columns)
            .map(|_| from(rng.random_range(-2.0f32..2.0)))
            .collect();
        let raw = values.iter().flat_map(|&v| bytes(v)).collect();
        (values, raw)
    }

    #[test]
    fn panels_compute_every_product_of_rows_and_tokens_in_both_versions() {
        products_of::<f16>(f16::from_f32, f16::to_le_bytes);
        products_of::<bf16>(bf16::from_f32, bf16::to_le_bytes);
    }

    fn products_of<H: Half>(from: fn(f32) -> H, bytes: fn(H) -> [u8; 2]) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Row counts below, at and past a panel; one token (the matrix-vector steps) and
        // token counts leaving a last tile of every width from 1 to 6; column counts with and
        // without a remainder of the four-column steps.
        let cases = [
            (40, 9, 576),
            (16, 1, 64),
            (21, 1, 45),
            (5, 3, 45),
            (33, 14, 42),
            (17, 7, 40),
            (17, 10, 40),
            (17, 11, 40),
            (16, 12, 8),
            // Whole groups and a partial one, one token (two groups a pass, one, then panels).
            (70, 1, 40),
            (128, 1, 33),
        ];
        for (rows, tokens, columns) in cases {
            let (values, raw) = matrix(&mut rng, rows, columns, from, bytes);
            let w = HalfPanels::<H>::new(&raw, rows, columns);
            let x: Vec<f32> = (0..tokens * columns)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            for first in (0..rows).step_by(PANEL) {
                for count in [rows - first, PANEL.min(rows - first)] {
                    let packed = pack(&x, tokens, columns);
                    let tile = tile_width();
                    let mut fast = vec![f32::NAN; count * tokens];
                    w.products(first, &packed, tokens, &mut fast);
                    let panels = Panels {
                        data: &w.data,
                        columns,
                        first: first / PANEL,
                    };
                    let mut reference = vec![f32::NAN; count * tokens];
                    scalar::products(panels, &packed, tokens, &mut reference, tile);
                    for (i, row) in values
                        .chunks_exact(columns)
                        .skip(first)
                        .take(count)
                        .enumerate()
                    {
                        for (t, a) in x.chunks_exact(columns).enumerate() {
                            let want: f32 = row.iter().zip(a).map(|(w, a)| w.widen() * a).sum();
                            // Float rounding of `columns` products of magnitude up to 4 in
                            // another order.
                            let tolerance = 8e-6 * columns as f32;
                            for got in [fast[t * count + i], reference[t * count + i]] {
                                assert!(
                                    (got - want).abs() <= tolerance,
                                    "{i} {t}: {got} vs {want}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_row_of_panels_is_the_row_that_was_laid_out() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let (values, raw) = matrix(&mut rng, 21, 10, bf16::from_f32, bf16::to_le_bytes);
        let w = Bf16Panels::new(&raw, 21, 10);
        let mut out = [0f32; 10];
        for (r, want) in values.chunks_exact(10).enumerate() {
            w.row(r, &mut out);
            let want: Vec<f32> = want.iter().map(|v| v.widen()).collect();
            assert_eq!(out.as_slice(), want.as_slice(), "row {r}");
        }
    }
}
