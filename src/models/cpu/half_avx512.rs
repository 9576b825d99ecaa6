//! The AVX-512 version of [`super::f16_panels`]' many-token products. A panel's 16 rows are
//! one 512-bit register, so a tile takes [`WIDE`] tokens with one accumulator each: a column
//! of the panel is widened once per 16 tokens instead of once per six, and each token adds one
//! multiply-add per column. Every row's sum runs over the columns in order with the same fused
//! multiply-adds as the AVX2 tile and the one-token pass, so the products are their bits,
//! whatever the tile width.

#![cfg(target_arch = "x86_64")]
#![allow(unsafe_code)]

use super::f16_panels::{tiles, write, Half, Panels, GROUP_ROWS, PANEL, WIDE};
use super::kernels::avx2::{prefetch, prefetch_ahead};
use std::arch::x86_64::*;

/// The products of the panels from `panels.first` with `tokens` activation rows, packed in
/// tiles of [`WIDE`] tokens, as [`super::f16_panels::HalfPanels::products`] describes.
///
/// With more than [`WIDE`] tokens the two panels of a group share each column's cache line, so
/// they run together ([`pair`]): eight tokens at a time over a span of [`SPAN`] columns, every
/// tile of the span in turn, each token's sums carried from span to span. Otherwise (a decode
/// batch), and for a single panel (the last of an odd count), a panel runs alone, [`WIDE`]
/// tokens a tile and the rest in sub-tiles of 8, 4, 2 and 1: one pass over the weights then,
/// which for 16 tokens beat the pairs' two (`llorch bench --prompt-tokens 16 --concurrency 16`,
/// two threads, alternated: small f16 16 streams 481–484 → 497–506 tokens/s, 1b f16 96–97 →
/// 100).
///
/// # Safety
/// AVX2, FMA, F16C and AVX-512 F must be available; the storage holds every panel of `out`'s
/// rows and `x` is `tokens` rows of `columns` values.
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
pub unsafe fn products<H: Half>(panels: Panels<'_, H>, x: &[f32], tokens: usize, out: &mut [f32]) {
    let (count, columns) = (out.len() / tokens, panels.columns);
    assert_eq!(x.len(), tokens * columns, "activation size");
    let all = count.div_ceil(PANEL);
    let mut p = 0;
    while p < all {
        if tokens > WIDE && p + 1 < all && panels.at(p) + PANEL == panels.at(p + 1) {
            let sums = pairs(panels, p, x, tokens);
            for (t, two) in sums.chunks_exact(2).enumerate() {
                store(out, count, p, t, [two[0]]);
                store(out, count, p + 1, t, [two[1]]);
            }
            p += 2;
            continue;
        }
        for (t, width) in tiles(tokens, WIDE) {
            let a = &x[t * columns..(t + width) * columns];
            let mut j = 0;
            for sub in [WIDE, 8, 4, 2, 1] {
                if width - j < sub {
                    continue;
                }
                let at = Tile { a, width, first: j };
                match sub {
                    WIDE => store(out, count, p, t + j, tile::<H, WIDE>(panels, p, at)),
                    8 => store(out, count, p, t + j, tile::<H, 8>(panels, p, at)),
                    4 => store(out, count, p, t + j, tile::<H, 4>(panels, p, at)),
                    2 => store(out, count, p, t + j, tile::<H, 2>(panels, p, at)),
                    _ => store(out, count, p, t + j, tile::<H, 1>(panels, p, at)),
                }
                j += sub;
            }
        }
        p += 1;
    }
}

/// Columns per span of [`pairs`]: 4 KiB of a group's storage (one 64-byte line a column).
const SPAN: usize = 64;

/// The sums of panels `p` and `p + 1` (adjacent in their group) with every token, two per
/// token (`[token][panel]`): span by span of [`SPAN`] columns, every tile's tokens eight (then
/// 4, 2, 1) at a time. The first pass over a span reads its lines from memory and the others
/// from cache; each pass also asks for its share of the next span's lines, so memory is busy
/// while the later passes compute.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
fn pairs<H: Half>(panels: Panels<'_, H>, p: usize, x: &[f32], tokens: usize) -> Vec<__m512> {
    let columns = panels.columns;
    let mut sums = vec![_mm512_setzero_ps(); 2 * tokens];
    let mut passes = Vec::new();
    for (t, width) in tiles(tokens, WIDE) {
        let mut j = 0;
        for sub in [8, 4, 2, 1] {
            while width - j >= sub {
                passes.push((t, width, j, sub));
                j += sub;
            }
        }
    }
    for from in (0..columns).step_by(SPAN) {
        let span = from..(from + SPAN).min(columns);
        for (n, &(t, width, j, sub)) in passes.iter().enumerate() {
            let at = Tile {
                a: &x[t * columns..(t + width) * columns],
                width,
                first: j,
            };
            let fetch = Fetch {
                pass: n,
                passes: passes.len(),
            };
            let state = &mut sums[2 * (t + j)..2 * (t + j + sub)];
            match sub {
                8 => pair::<H, 8>(panels, p, at, span.clone(), fetch, state),
                4 => pair::<H, 4>(panels, p, at, span.clone(), fetch, state),
                2 => pair::<H, 2>(panels, p, at, span.clone(), fetch, state),
                _ => pair::<H, 1>(panels, p, at, span.clone(), fetch, state),
            }
        }
    }
    sums
}

/// Which of a span's passes this is: pass `pass` of `passes` asks for the next span's lines
/// of the columns `k` with `k % passes == pass`.
#[derive(Clone, Copy)]
struct Fetch {
    pass: usize,
    passes: usize,
}

/// Panels `p` and `p + 1` over columns `span` with `T` tokens of a packed tile, continuing the
/// sums in `state` (`[token][panel]`). Every sum runs over the columns in order with the
/// fused multiply-adds of [`tile`], so the products are its bits.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
fn pair<H: Half, const T: usize>(
    panels: Panels<'_, H>,
    p: usize,
    tile: Tile<'_>,
    span: std::ops::Range<usize>,
    fetch: Fetch,
    state: &mut [__m512],
) {
    let columns = panels.columns;
    let at = panels.at(p);
    assert!(tile.first + T <= tile.width && tile.a.len() == tile.width * columns);
    assert!(span.end <= columns && state.len() == 2 * T);
    assert!(span.is_empty() || at + (span.end - 1) * GROUP_ROWS + 2 * PANEL <= panels.data.len());
    let (w, a) = (panels.data.as_ptr().wrapping_add(at), tile.a.as_ptr());
    let mut acc0: [__m512; T] = std::array::from_fn(|j| state[2 * j]);
    let mut acc1: [__m512; T] = std::array::from_fn(|j| state[2 * j + 1]);
    // The first column of the span whose line this pass asks for, then every `passes`-th.
    let mut due =
        span.start + (fetch.pass + fetch.passes - span.start % fetch.passes) % fetch.passes;
    for k in span {
        // SAFETY: columns `k` of both panels are 32 values from `at + k GROUP_ROWS` (the
        // second panel follows the first), and the tile's tokens `first..first + T` of column
        // `k` lie within its `width` (asserted).
        unsafe {
            if k == due {
                prefetch_ahead(w.add(k * GROUP_ROWS).cast(), SPAN * GROUP_ROWS * 2, 1);
                due += fetch.passes;
            }
            let (w0, w1) = (
                widen(w.add(k * GROUP_ROWS)),
                widen(w.add(k * GROUP_ROWS + PANEL)),
            );
            let ak = a.add(k * tile.width + tile.first);
            for j in 0..T {
                let y = _mm512_set1_ps(*ak.add(j));
                acc0[j] = _mm512_fmadd_ps(w0, y, acc0[j]);
                acc1[j] = _mm512_fmadd_ps(w1, y, acc1[j]);
            }
        }
    }
    for (j, two) in state.chunks_exact_mut(2).enumerate() {
        two[0] = acc0[j];
        two[1] = acc1[j];
    }
}

/// Tokens `first..` of a packed tile `a` of `width` tokens (value `k` of its token `j` at
/// `k × width + j`).
#[derive(Clone, Copy)]
struct Tile<'a> {
    a: &'a [f32],
    width: usize,
    first: usize,
}

/// The 16 `H` values at `p` as f32: f16 converted, bf16 moved into the top half of each lane
/// (both exact).
///
/// # Safety
/// Sixteen values must be readable at `p`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
unsafe fn widen<H: Half>(p: *const H) -> __m512 {
    // SAFETY: the caller's 32 bytes at `p`.
    let bits = unsafe { _mm256_loadu_si256(p.cast()) };
    if H::BF16 {
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16))
    } else {
        _mm512_cvtph_ps(bits)
    }
}

/// Values past the 4 KiB that [`prefetch`] adds, so that the tile asks 8 KiB ahead: a
/// 16-token tile does 16 multiply-adds per column, too little work to cover 4 KiB's fetch.
const FURTHER: usize = 2048;

/// The products of panel `p` with `T` tokens of a packed tile: per token, the panel's 16
/// rows (a panel without its group's other, the last of an odd count). Each column asks for
/// the line 8 KiB ahead of its own: left to the hardware, the panel's stride of one group
/// column per column (128 bytes when groups were four panels) kept the tile waiting on memory
/// (4 KiB ahead: 1b f16 prefill 58 → 64 tokens/s with one thread, small f16 16 streams
/// 336 → 373 with two; 8 KiB: 16 streams 337 → 362 more, prefill unchanged).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
fn tile<H: Half, const T: usize>(panels: Panels<'_, H>, p: usize, tile: Tile<'_>) -> [__m512; T] {
    let columns = panels.columns;
    let at = panels.at(p);
    assert!(tile.first + T <= tile.width && tile.a.len() == tile.width * columns);
    assert!(columns == 0 || at + (columns - 1) * GROUP_ROWS + PANEL <= panels.data.len());
    let (w, a) = (panels.data.as_ptr().wrapping_add(at), tile.a.as_ptr());
    let mut acc = [_mm512_setzero_ps(); T];
    for k in 0..columns {
        // SAFETY: column `k` of the panel is 16 values from `at + k GROUP_ROWS`, and the
        // tile's tokens `first..first + T` of column `k` lie within its `width` (asserted).
        unsafe {
            prefetch(w.add(k * GROUP_ROWS + FURTHER).cast(), 1);
            let wk = widen(w.add(k * GROUP_ROWS));
            let ak = a.add(k * tile.width + tile.first);
            for (j, acc) in acc.iter_mut().enumerate() {
                *acc = _mm512_fmadd_ps(wk, _mm512_set1_ps(*ak.add(j)), *acc);
            }
        }
    }
    acc
}

/// Writes a tile's products (panel `p`, tokens `t..`) into `out`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f")]
fn store<const T: usize>(out: &mut [f32], count: usize, p: usize, t: usize, tile: [__m512; T]) {
    for (j, v) in tile.into_iter().enumerate() {
        let mut values = [0f32; PANEL];
        // SAFETY: 16 floats into a 16-float array.
        unsafe { _mm512_storeu_ps(values.as_mut_ptr(), v) };
        write(out, count, p, t + j, &values);
    }
}

#[cfg(test)]
mod tests {
    use super::super::f16_panels::{avx2, pack_tiles, HalfPanels, TOKENS};
    use super::super::level::{level, Level};
    use super::*;
    use half::{bf16, f16};
    use rand::{Rng, SeedableRng};

    #[test]
    fn wide_tiles_give_the_bits_of_the_avx2_tiles() {
        if level() < Level::Avx512 {
            return;
        }
        same_bits::<f16>(|v| f16::from_f32(v).to_le_bytes());
        same_bits::<bf16>(|v| bf16::from_f32(v).to_le_bytes());
    }

    fn same_bits<H: Half>(bytes: fn(f32) -> [u8; 2]) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        // Token counts of whole wide tiles and of every remainder's sub-tiles; rows below, at
        // and past a panel and a group; odd column counts; several spans of a pair.
        for (rows, tokens, columns) in [
            (40, 16, 64),
            (70, 31, 45),
            (16, 2, 576),
            (33, 23, 7),
            (64, 19, 200),
            (64, 12, 100),
        ] {
            let raw: Vec<u8> = (0..rows * columns)
                .flat_map(|_| bytes(rng.random_range(-2.0f32..2.0)))
                .collect();
            let w = HalfPanels::<H>::new(&raw, rows, columns);
            let x: Vec<f32> = (0..tokens * columns)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            for first in (0..rows).step_by(PANEL) {
                let count = rows - first;
                let (mut wide, mut narrow) =
                    (vec![0f32; count * tokens], vec![1f32; count * tokens]);
                let (packed, six) = (
                    pack_tiles(&x, tokens, columns, WIDE),
                    pack_tiles(&x, tokens, columns, TOKENS),
                );
                // SAFETY: the level was checked above; `w` holds every panel of its rows.
                unsafe {
                    products(w.panels(first), &packed, tokens, &mut wide);
                    avx2::products(w.panels(first), &six, tokens, &mut narrow);
                }
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&wide),
                    bits(&narrow),
                    "{rows}x{columns}, {tokens} tokens"
                );
            }
        }
    }
}
