//! Q8_0, Q4_0 and Q5_0 weights interleaved eight rows at a time, and their products with Q8_0
//! activations.
//!
//! In GGML's layout each row is its own run of blocks, so a product takes one row at a time:
//! its per-block sum is spread over a vector's lanes and must be reduced, and the activation
//! block is reloaded for every row. Here the eight rows of a group share each block's bytes:
//! the eight f16 scales first (one load converts all of them), then 32-byte vectors whose
//! 4-byte lane `r` holds bytes `4m..4m + 4` of row `r`'s block (eight vectors for Q8_0's 32
//! bytes of values, four for Q4_0's 16 bytes of nibbles, five for Q5_0's 4 bytes of fifth bits
//! and 16 of nibbles). A Q8_0 vector `m` holds values `4m..4m + 4` of every row; a Q4_0
//! vector's low nibbles hold values `4m..` and its high nibbles values `16 + 4m..`; Q5_0's
//! first vector holds each row's 32 fifth bits, which are spread onto the nibbles of the other
//! four. Each is multiplied with those four activation bytes broadcast
//! to all lanes, so lane `r` of the sum is row `r`'s product: eight rows come out in one
//! vector, with no reduction across lanes.
//!
//! Each block's product is summed exactly in integers, then scaled and added to its row's
//! accumulator in block order; one token and several take the same steps, so decode and
//! prefill round alike. A matrix whose row count is not a multiple of eight has its last group
//! padded with zero rows, never read back.

use super::activations::Activations;
use super::huge_pages::{weight_buffer, WeightBuffer};
use super::kernels::{BLOCK, Q4_0_BYTES, Q5_0_BYTES, Q8_0_BYTES};

/// Rows per interleaved group.
pub const ROWS: usize = 8;

/// The block types kept interleaved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An f16 scale and 32 signed bytes.
    Q8_0,
    /// An f16 scale and 32 nibbles stored plus 8.
    Q4_0,
    /// An f16 scale, the fifth bit of each value (32 bits), and 32 nibbles; stored plus 16.
    Q5_0,
}

impl Kind {
    /// Bytes of values in one GGML block (after its 2-byte scale).
    fn quant_bytes(self) -> usize {
        match self {
            Kind::Q8_0 => Q8_0_BYTES - 2,
            Kind::Q4_0 => Q4_0_BYTES - 2,
            Kind::Q5_0 => Q5_0_BYTES - 2,
        }
    }

    /// Bytes of one GGML block.
    fn ggml_bytes(self) -> usize {
        2 + self.quant_bytes()
    }

    /// Bytes of one block of a group: eight scales, then eight rows' values.
    pub(super) fn group_block(self) -> usize {
        ROWS * self.ggml_bytes()
    }

    /// What the stored values are above the true ones.
    pub(super) fn offset(self) -> f32 {
        match self {
            Kind::Q8_0 => 0.0,
            Kind::Q4_0 => 8.0,
            Kind::Q5_0 => 16.0,
        }
    }
}

/// Where row `lane`'s bytes `4m..4m + 4` sit in a block of its group.
fn lane_at(m: usize, lane: usize) -> usize {
    2 * ROWS + 32 * m + 4 * lane
}

/// A SIMD version of one group's products (the kind, the group's blocks, their number, the
/// activations, the output and the group's first row in it): unsafe to call unless the CPU
/// has its level's features.
#[cfg(target_arch = "x86_64")]
type GroupProducts = unsafe fn(Kind, &[u8], usize, &Activations, &mut [f32], usize);

/// A matrix in groups of eight interleaved rows.
pub struct Interleaved {
    kind: Kind,
    bytes: WeightBuffer<u8>,
    rows: usize,
    blocks: usize,
}

impl Interleaved {
    /// Interleaves `rows` GGML rows of `kind` of `columns` values.
    pub fn new(kind: Kind, ggml: &[u8], rows: usize, columns: usize) -> Interleaved {
        let blocks = columns / BLOCK;
        let (size, group_block) = (kind.ggml_bytes(), kind.group_block());
        assert_eq!(ggml.len(), rows * blocks * size, "{kind:?} matrix size");
        let mut bytes = weight_buffer(rows.div_ceil(ROWS) * blocks * group_block);
        for (r, row) in ggml.chunks_exact(blocks * size).enumerate() {
            for (b, block) in row.chunks_exact(size).enumerate() {
                let out = &mut bytes[(r / ROWS * blocks + b) * group_block..][..group_block];
                let lane = r % ROWS;
                out[2 * lane..2 * lane + 2].copy_from_slice(&block[..2]);
                for (m, four) in block[2..].chunks_exact(4).enumerate() {
                    out[lane_at(m, lane)..][..4].copy_from_slice(four);
                }
            }
        }
        Interleaved {
            kind,
            bytes,
            rows,
            blocks,
        }
    }

    /// The block type.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The group of row `r`, all its blocks.
    pub(super) fn group(&self, r: usize) -> &[u8] {
        let group_bytes = self.blocks * self.kind.group_block();
        &self.bytes[r / ROWS * group_bytes..][..group_bytes]
    }

    /// Row `r` in GGML's layout (for an embedding lookup).
    pub fn row(&self, r: usize) -> Vec<u8> {
        assert!(r < self.rows, "row {r} of {}", self.rows);
        let (lane, size, group_block) = (r % ROWS, self.kind.ggml_bytes(), self.kind.group_block());
        let group = self.group(r);
        let mut out = vec![0u8; self.blocks * size];
        for (b, block) in out.chunks_exact_mut(size).enumerate() {
            let g = &group[b * group_block..][..group_block];
            block[..2].copy_from_slice(&g[2 * lane..2 * lane + 2]);
            for (m, four) in block[2..].chunks_exact_mut(4).enumerate() {
                four.copy_from_slice(&g[lane_at(m, lane)..][..4]);
            }
        }
        out
    }

    /// `out[t * count + (r - first)]` = row `r` · activation row `t`, for the `count` rows
    /// from `first` (a multiple of eight) that `out` has room for and every token of `a`
    /// (token-major, as the model's activations are).
    pub fn products(&self, first: usize, a: &Activations, out: &mut [f32]) {
        let tokens = a.tokens().max(1);
        assert_eq!(first % ROWS, 0, "groups start at multiples of eight");
        assert_eq!(out.len() % tokens, 0, "whole rows of products");
        let count = out.len() / tokens;
        assert!(
            first + count <= self.rows,
            "rows {first}+{count} of {}",
            self.rows
        );
        for t in 0..a.tokens() {
            assert_eq!(
                a.row(t).len(),
                self.blocks * Q8_0_BYTES,
                "activation row length"
            );
        }
        #[cfg(target_arch = "x86_64")]
        let kernel: Option<GroupProducts> = match super::level::level() {
            super::level::Level::Avx512 => Some(super::interleaved_vnni::group),
            super::level::Level::Avx2 => Some(avx2::group),
            super::level::Level::Scalar => None,
        };
        for start in (0..count).step_by(ROWS) {
            let group = self.group(first + start);
            #[cfg(target_arch = "x86_64")]
            if let Some(kernel) = kernel {
                // SAFETY: the level's features were detected; `group` holds `self.blocks`
                // blocks of `kind`, and every activation row as many Q8_0 blocks (asserted
                // above).
                #[allow(unsafe_code)]
                unsafe {
                    kernel(self.kind, group, self.blocks, a, out, start)
                };
                continue;
            }
            scalar::group(self.kind, group, self.blocks, a, out, start);
        }
    }
}

/// The reference: each product summed in integers per block over the stored values, then
/// scaled with the offset taken out, in block order, with the fused multiply-adds of the
/// SIMD versions, which it therefore matches bit for bit.
pub(super) mod scalar {
    use super::{lane_at, Activations, Kind};
    use half::f16;

    /// Stored value `j` of row `lane` in a group's block (the true value plus the offset).
    fn stored(kind: Kind, g: &[u8], lane: usize, j: usize) -> i32 {
        match kind {
            Kind::Q8_0 => i32::from(g[lane_at(j / 4, lane) + j % 4] as i8),
            Kind::Q4_0 => i32::from(nibble(g, 0, lane, j)),
            Kind::Q5_0 => {
                let at = lane_at(0, lane);
                let high = u32::from_le_bytes([g[at], g[at + 1], g[at + 2], g[at + 3]]) >> j & 1;
                i32::from(nibble(g, 1, lane, j)) + 16 * high as i32
            }
        }
    }

    /// The low four bits of value `j` of row `lane`, its nibbles from vector `first` on.
    fn nibble(g: &[u8], first: usize, lane: usize, j: usize) -> u8 {
        let byte = g[lane_at(first + j % 16 / 4, lane) + j % 4];
        if j < 16 {
            byte & 0x0f
        } else {
            byte >> 4
        }
    }

    /// The products of a group's rows with every token, written as rows `start..` of `out`
    /// (token-major, as many rows as it has room for).
    pub fn group(
        kind: Kind,
        group: &[u8],
        blocks: usize,
        a: &Activations,
        out: &mut [f32],
        start: usize,
    ) {
        let tokens = a.tokens();
        let size = kind.group_block();
        let count = out.len() / tokens;
        for lane in 0..(count - start).min(super::ROWS) {
            for t in 0..tokens {
                let (y, scales, sums) = (a.row(t), a.scales(t), a.sums(t));
                let mut acc = 0f32;
                for b in 0..blocks {
                    let g = &group[b * size..][..size];
                    let values = &y[b * super::Q8_0_BYTES + 2..][..32];
                    let dw = f16::from_le_bytes([g[2 * lane], g[2 * lane + 1]]).to_f32();
                    let dot: i32 = (0..32)
                        .map(|j| stored(kind, g, lane, j) * i32::from(values[j] as i8))
                        .sum();
                    // d_w · (d_y · Σ q·y − offset · d_y · Σ y), as the SIMD passes round it.
                    let scaled = (dot as f32).mul_add(scales[b], -(kind.offset() * sums[b]));
                    acc = dw.mul_add(scaled, acc);
                }
                out[t * count + start + lane] = acc;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
pub(super) mod avx2 {
    use super::{Activations, Kind, Q8_0_BYTES, ROWS};
    use crate::models::cpu::kernels::avx2::{prefetch, to_lanes};
    use std::arch::x86_64::*;

    /// Tokens per pass over a group's blocks (of every interleaved type).
    pub(in crate::models::cpu) const TOKENS: usize = 4;

    /// # Safety
    /// AVX2, FMA and F16C must be available; `group` holds `blocks` blocks of a group of
    /// `kind` and each activation row of `a` as many Q8_0 blocks.
    #[target_feature(enable = "avx2,fma,f16c")]
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

    /// Every token through `pass`, [`TOKENS`] at a time, the rest one by one.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::models::cpu) fn passes<const V: usize>(
        kind: Kind,
        group: &[u8],
        blocks: usize,
        a: &Activations,
        (out, start): (&mut [f32], usize),
        block: impl Fn(&[__m256i; V], *const u8) -> __m256i + Copy,
    ) {
        each_pass(
            out,
            a.tokens(),
            start,
            |t| pass::<TOKENS, V>(kind, group, blocks, a, t, block),
            |t| pass::<1, V>(kind, group, blocks, a, t, block),
        );
    }

    /// A group's products with every token: `four(t)` for tokens `t..t + 4` while four are
    /// left, then `one(t)` for each of the rest, stored as rows `start..` of `out`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::models::cpu) fn each_pass(
        out: &mut [f32],
        tokens: usize,
        start: usize,
        four: impl Fn(usize) -> [__m256; TOKENS],
        one: impl Fn(usize) -> [__m256; 1],
    ) {
        let whole = tokens / TOKENS * TOKENS;
        for t in (0..whole).step_by(TOKENS) {
            store(out, tokens, start, t, &four(t));
        }
        for t in whole..tokens {
            store(out, tokens, start, t, &one(t));
        }
    }

    /// Writes a group's products with tokens `t..` as rows `start..` of `out` (token-major,
    /// `tokens` rows of products; as many of the group's rows as it has room for).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::models::cpu) fn store<const T: usize>(
        out: &mut [f32],
        tokens: usize,
        start: usize,
        t: usize,
        p: &[__m256; T],
    ) {
        let count = out.len() / tokens;
        let valid = (count - start).min(ROWS);
        for (j, p) in p.iter().enumerate() {
            let row = &mut out[(t + j) * count + start..][..valid];
            if valid == ROWS {
                // SAFETY: `row` holds eight floats.
                unsafe { _mm256_storeu_ps(row.as_mut_ptr(), *p) };
            } else {
                row.copy_from_slice(&to_lanes(*p)[..valid]);
            }
        }
    }

    /// The four activation bytes at `4k` of the 32 at `y`, in every lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::models::cpu) fn four(y: *const u8, k: usize) -> __m256i {
        // SAFETY: the callers pass the start of a block's 32 values and `k` below 8.
        _mm256_set1_epi32(unsafe { std::ptr::read_unaligned(y.add(4 * k).cast::<i32>()) })
    }

    /// The eight rows' integer products of a Q8_0 block with the 32 activation values at `y`.
    /// `maddubs` multiplies unsigned by signed bytes: the rows' magnitudes (`v`, made so once
    /// per block) by the activations carrying the rows' signs.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q8_0_block(v: &[__m256i; 8], y: *const u8) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let mut s = _mm256_setzero_si256();
        for (k, v) in v.iter().enumerate() {
            let signed = _mm256_sign_epi8(four(y, k), *v);
            let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(*v), signed);
            s = _mm256_add_epi32(s, _mm256_madd_epi16(pairs, ones));
        }
        s
    }

    /// The eight rows' integer products of a Q4_0 block (values 0..16, the offset of 8 taken
    /// out below) with the 32 activation values at `y`. Each `maddubs` lane is at most
    /// 2 · 15 · 127 = 3810, so eight of them add up in i16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q4_0_block(v: &[__m256i; 4], y: *const u8) -> __m256i {
        let low = _mm256_set1_epi8(0x0f);
        let mut s = _mm256_setzero_si256();
        for (k, v) in v.iter().enumerate() {
            let (l, h) = (
                _mm256_and_si256(*v, low),
                _mm256_and_si256(_mm256_srli_epi16(*v, 4), low),
            );
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(l, four(y, k)));
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(h, four(y, k + 4)));
        }
        _mm256_madd_epi16(s, _mm256_set1_epi16(1))
    }

    /// The eight rows' integer products of a Q5_0 block (values 0..32, the offset of 16 taken
    /// out below) with the 32 activation values at `y`. A `maddubs` lane is at most
    /// 2 · 31 · 127 = 7874, so four add up in i16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn q5_0_block(v: &[__m256i; 5], y: *const u8) -> __m256i {
        let ones = _mm256_set1_epi16(1);
        let mut s = [_mm256_setzero_si256(); 2];
        for k in 0..4 {
            let (l, h) = q5_0_values(v, k);
            s[0] = _mm256_add_epi16(s[0], _mm256_maddubs_epi16(l, four(y, k)));
            s[1] = _mm256_add_epi16(s[1], _mm256_maddubs_epi16(h, four(y, k + 4)));
        }
        _mm256_add_epi32(_mm256_madd_epi16(s[0], ones), _mm256_madd_epi16(s[1], ones))
    }

    /// Values `4k..4k + 4` (low) and `16 + 4k..` (high) of each row of a Q5_0 block, 0..32:
    /// nibbles with their fifth bits. Values `4m..4m + 4` of a row take their fifth bits from
    /// bits `4m..4m + 4` of its first vector's lane: that lane's byte `m / 2` is copied to its
    /// four bytes, each byte keeps its own bit, and a set bit becomes 16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::models::cpu) fn q5_0_values(v: &[__m256i; 5], k: usize) -> (__m256i, __m256i) {
        let low = _mm256_set1_epi8(0x0f);
        let fifth = |m: usize| {
            // Byte `i` of each 128-bit half reads byte `m / 2` of its 4-byte lane.
            let from: [i8; 32] = std::array::from_fn(|i| (m / 2 + i % 16 / 4 * 4) as i8);
            // SAFETY: 32 bytes from the array.
            let from = unsafe { _mm256_loadu_si256(from.as_ptr().cast()) };
            let spread = _mm256_shuffle_epi8(v[0], from);
            let shift = 4 * (m % 2) as u32;
            let bits = _mm256_set1_epi32(i32::from_le_bytes([1, 2, 4, 8].map(|b: u8| b << shift)));
            let set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bits), bits);
            _mm256_and_si256(set, _mm256_set1_epi8(16))
        };
        let nibbles = v[1 + k];
        (
            _mm256_or_si256(_mm256_and_si256(nibbles, low), fifth(k)),
            _mm256_or_si256(
                _mm256_and_si256(_mm256_srli_epi16(nibbles, 4), low),
                fifth(k + 4),
            ),
        )
    }

    /// The eight rows' products with activation rows `t..t + T`, one lane per row; `block`
    /// sums a group block's `V` value vectors with one activation block in integers.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::models::cpu) fn pass<const T: usize, const V: usize>(
        kind: Kind,
        group: &[u8],
        blocks: usize,
        a: &Activations,
        t: usize,
        block: impl Fn(&[__m256i; V], *const u8) -> __m256i,
    ) -> [__m256; T] {
        let size = kind.group_block();
        assert!(group.len() >= blocks * size && size >= 2 * ROWS + 32 * V);
        let act: [&[u8]; T] = std::array::from_fn(|j| a.row(t + j));
        let scales: [&[f32]; T] = std::array::from_fn(|j| a.scales(t + j));
        let sums: [&[f32]; T] = std::array::from_fn(|j| a.sums(t + j));
        for j in 0..T {
            assert!(act[j].len() >= blocks * Q8_0_BYTES);
            assert!(scales[j].len() >= blocks && sums[j].len() >= blocks);
        }
        // Values stored plus an offset: `Σ (q − offset)·y = Σ q·y − offset·Σ y`.
        let offset = kind.offset();
        let mut acc = [_mm256_setzero_ps(); T];
        for b in 0..blocks {
            // SAFETY: block `b` of the group lies within it (asserted above).
            let base = unsafe { group.as_ptr().add(b * size) };
            prefetch(base, size.div_ceil(64));
            // SAFETY: 16 bytes of scales at the block's start.
            let dw = _mm256_cvtph_ps(unsafe { _mm_loadu_si128(base.cast()) });
            // SAFETY: `V` vectors of 32 bytes after the scales, within the block (asserted).
            let v: [__m256i; V] = std::array::from_fn(|m| unsafe {
                _mm256_loadu_si256(base.add(2 * ROWS + 32 * m).cast())
            });
            for j in 0..T {
                // SAFETY: the 32 values of activation block `b`, within the row (asserted).
                let y = unsafe { act[j].as_ptr().add(b * Q8_0_BYTES + 2) };
                let dot = _mm256_cvtepi32_ps(block(&v, y));
                // Row `r`: d_w · (d_y · Σ q·y − offset · d_y · Σ y).
                let scaled = _mm256_fmsub_ps(
                    dot,
                    _mm256_set1_ps(scales[j][b]),
                    _mm256_set1_ps(offset * sums[j][b]),
                );
                acc[j] = _mm256_fmadd_ps(dw, scaled, acc[j]);
            }
        }
        acc
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ5_0, BlockQ8_0, GgmlType};
    use rand::{Rng, SeedableRng};

    /// Random GGML rows of `kind`: scales in 0.001..0.1, Q8_0 values within ±127.
    pub(in crate::models::cpu) fn random_rows(
        kind: Kind,
        rows: usize,
        blocks: usize,
        rng: &mut impl Rng,
    ) -> Vec<u8> {
        (0..rows * blocks)
            .flat_map(|_| {
                let scale = half::f16::from_f32(rng.random_range(0.001..0.1));
                let mut block = scale.to_le_bytes().to_vec();
                block.extend((0..kind.quant_bytes()).map(|_| match kind {
                    Kind::Q8_0 => rng.random_range(-127i8..=127) as u8,
                    Kind::Q4_0 | Kind::Q5_0 => rng.random::<u8>(),
                }));
                block
            })
            .collect()
    }

    /// `bytes` as candle's blocks of `T`, dequantized by candle.
    pub(in crate::models::cpu) fn candle_values<T: GgmlType>(bytes: &[u8]) -> Vec<f32> {
        let size = std::mem::size_of::<T>();
        let blocks: Vec<T> = bytes
            .chunks_exact(size)
            .map(|chunk| {
                let mut block = T::zeros();
                // SAFETY: candle's block types are plain `repr(C)` data with no invalid bit
                // patterns, and `chunk` is exactly one block's size.
                #[allow(unsafe_code)]
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        chunk.as_ptr(),
                        (&mut block as *mut T).cast::<u8>(),
                        size,
                    );
                }
                block
            })
            .collect();
        let mut out = vec![0f32; blocks.len() * T::BLCK_SIZE];
        T::to_float(&blocks, &mut out);
        out
    }

    /// A GGML row, dequantized by candle, times a Q8_0 row's values, in f64.
    fn dequantized_dot(kind: Kind, w: &[u8], y: &[u8]) -> f32 {
        let w = match kind {
            Kind::Q8_0 => candle_values::<BlockQ8_0>(w),
            Kind::Q4_0 => candle_values::<BlockQ4_0>(w),
            Kind::Q5_0 => candle_values::<BlockQ5_0>(w),
        };
        let y = candle_values::<BlockQ8_0>(y);
        w.iter()
            .zip(&y)
            .map(|(w, y)| f64::from(*w) * f64::from(*y))
            .sum::<f64>() as f32
    }

    #[test]
    fn interleaved_rows_multiply_and_read_back_as_ggml_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        // Row counts around the group size; 18 and 3 blocks per row; token counts around the
        // pass size.
        for (rows, tokens, blocks) in [(19, 9, 18), (8, 1, 3), (5, 4, 18), (16, 6, 3)] {
            let x: Vec<f32> = (0..tokens * blocks * BLOCK)
                .map(|_| rng.random_range(-2.0f32..2.0))
                .collect();
            let a = Activations::quantize(&x, tokens, blocks * BLOCK);
            for kind in [Kind::Q8_0, Kind::Q4_0, Kind::Q5_0] {
                let ggml = random_rows(kind, rows, blocks, &mut rng);
                let w = Interleaved::new(kind, &ggml, rows, blocks * BLOCK);
                let row_bytes = blocks * kind.ggml_bytes();
                for (r, row) in ggml.chunks_exact(row_bytes).enumerate() {
                    assert_eq!(w.row(r), row, "{kind:?} row {r}");
                }
                // From the second group on, and from the first.
                for first in [8.min(rows / 8 * 8), 0] {
                    let mut out = vec![f32::NAN; (rows - first) * tokens];
                    w.products(first, &a, &mut out);
                    let mut reference = vec![f32::NAN; (rows - first) * tokens];
                    for g in (first..rows).step_by(ROWS) {
                        scalar::group(kind, w.group(g), blocks, &a, &mut reference, g - first);
                    }
                    for (r, row) in ggml.chunks_exact(row_bytes).enumerate().skip(first) {
                        for t in 0..tokens {
                            let want = dequantized_dot(kind, row, a.row(t));
                            let at = t * (rows - first) + r - first;
                            if super::super::level::level() > super::super::level::Level::Scalar {
                                assert_eq!(out[at].to_bits(), reference[at].to_bits(), "{kind:?}");
                            }
                            for got in [out[at], reference[at]] {
                                let tolerance = 1e-4 * want.abs().max(1.0);
                                assert!((got - want).abs() <= tolerance, "{kind:?} {r} {t}");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn one_token_rounds_as_it_does_among_many() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(6);
        let (rows, tokens, blocks) = (16, 7, 18);
        let x: Vec<f32> = (0..tokens * blocks * BLOCK)
            .map(|_| rng.random_range(-2.0f32..2.0))
            .collect();
        let all = Activations::quantize(&x, tokens, blocks * BLOCK);
        for kind in [Kind::Q8_0, Kind::Q4_0, Kind::Q5_0] {
            let w = Interleaved::new(kind, &random_rows(kind, rows, blocks, &mut rng), rows, 576);
            let mut many = vec![0f32; rows * tokens];
            w.products(0, &all, &mut many);
            for (t, x) in x.chunks_exact(blocks * BLOCK).enumerate() {
                let mut one = vec![0f32; rows];
                w.products(0, &Activations::quantize(x, 1, blocks * BLOCK), &mut one);
                for (r, one) in one.iter().enumerate() {
                    assert_eq!(one.to_bits(), many[t * rows + r].to_bits(), "{kind:?}");
                }
            }
        }
    }

    #[test]
    fn q8_0_products_approximate_the_float_dot() {
        let values = |seed: u32| -> Vec<f32> {
            (0..2048u32)
                .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
                .collect()
        };
        let (w, a) = (values(5), values(6));
        let exact: f32 = w.iter().zip(&a).map(|(w, a)| w * a).sum();
        let mut wq = vec![0u8; 2048 / BLOCK * Q8_0_BYTES];
        crate::models::cpu::kernels::quantize_q8_0(&w, &mut wq);
        let mut quantized = [0f32];
        Interleaved::new(Kind::Q8_0, &wq, 1, 2048).products(
            0,
            &Activations::quantize(&a, 1, 2048),
            &mut quantized,
        );
        let tolerance = 0.02 * (2048f32).sqrt();
        assert!(
            (quantized[0] - exact).abs() < tolerance,
            "{quantized:?} vs {exact}"
        );
    }
}
