//! A weight matrix in its GGUF type and its product with activations, split over rayon's
//! threads by blocks of output rows. Q8_0, Q4_0, Q5_0, Q4_K, Q6_K, f16 and f32 rows use
//! llorch's kernels; Q5_K uses candle's block type and dot product.

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ5_0, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use super::activations::Activations;
use super::f16_tiles;
use super::interleaved::{Interleaved, Kind};
use super::kernels;
use super::kquants::{self, Q4K_BYTES, Q6K_BYTES, Q8K, QK_K};

/// The rows of one matrix.
enum Rows {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Q8_0, Q4_0 or Q5_0, interleaved eight rows at a time.
    Blocks(Interleaved),
    Q4K(Vec<u8>),
    Q5K(Vec<BlockQ5K>),
    Q6K(Vec<u8>),
}

/// A `rows × columns` weight matrix.
pub struct Weight {
    rows: usize,
    columns: usize,
    data: Rows,
}

/// The GGML types this CPU path multiplies.
pub const SUPPORTED: &[GgmlDType] = &[
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::Q8_0,
    GgmlDType::Q4_0,
    GgmlDType::Q5_0,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Copies a tensor's bytes into candle's block type.
fn blocks<T: GgmlType>(bytes: &[u8]) -> candle_core::Result<Vec<T>> {
    let size = std::mem::size_of::<T>();
    if !bytes.len().is_multiple_of(size) {
        candle_core::bail!("{} bytes are not whole {:?} blocks", bytes.len(), T::DTYPE);
    }
    let mut out = vec![T::zeros(); bytes.len() / size];
    // SAFETY: candle's block types are `repr(C)` plain data (scales, nibbles, bytes) with no
    // invalid bit patterns, `out` has room for exactly `bytes.len()` bytes, and the source is a
    // byte slice (alignment 1), so a byte copy is a valid way to fill it.
    #[allow(unsafe_code)]
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), out.as_mut_ptr().cast::<u8>(), bytes.len());
    }
    Ok(out)
}

impl Weight {
    /// Takes a 2-D tensor of one of the [`SUPPORTED`] types.
    pub fn new(tensor: &QTensor) -> candle_core::Result<Weight> {
        let (rows, columns) = tensor.shape().dims2()?;
        let bytes = tensor.data()?;
        let data = match tensor.dtype() {
            GgmlDType::F32 => Rows::F32(
                bytes
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
            ),
            GgmlDType::F16 => Rows::F16(
                bytes
                    .chunks_exact(2)
                    .map(|b| f16::from_le_bytes([b[0], b[1]]))
                    .collect(),
            ),
            GgmlDType::Q8_0 => Rows::Blocks(Interleaved::new(Kind::Q8_0, &bytes, rows, columns)),
            GgmlDType::Q4_0 => Rows::Blocks(Interleaved::new(Kind::Q4_0, &bytes, rows, columns)),
            GgmlDType::Q5_0 => Rows::Blocks(Interleaved::new(Kind::Q5_0, &bytes, rows, columns)),
            GgmlDType::Q4K => Rows::Q4K(bytes.into_owned()),
            GgmlDType::Q5K => Rows::Q5K(blocks(&bytes)?),
            GgmlDType::Q6K => Rows::Q6K(bytes.into_owned()),
            other => candle_core::bail!("the CPU path does not multiply {other:?}"),
        };
        Ok(Weight {
            rows,
            columns,
            data,
        })
    }

    /// Output rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Row `row` as f32 values (an embedding lookup).
    pub fn row(&self, row: usize, out: &mut [f32]) {
        let n = self.columns;
        match &self.data {
            Rows::F32(d) => out.copy_from_slice(&d[row * n..(row + 1) * n]),
            Rows::F16(d) => {
                for (o, v) in out.iter_mut().zip(&d[row * n..(row + 1) * n]) {
                    *o = v.to_f32();
                }
            }
            Rows::Blocks(d) => {
                let bytes = d.row(row);
                match d.kind() {
                    Kind::Q8_0 => row_to_float::<BlockQ8_0>(&bytes, 0, n, out),
                    Kind::Q4_0 => row_to_float::<BlockQ4_0>(&bytes, 0, n, out),
                    Kind::Q5_0 => row_to_float::<BlockQ5_0>(&bytes, 0, n, out),
                }
            }
            Rows::Q4K(d) => row_to_float::<BlockQ4K>(d, row, n, out),
            Rows::Q5K(d) => to_float(d, row, n, out),
            Rows::Q6K(d) => row_to_float::<BlockQ6K>(d, row, n, out),
        }
    }

    /// `out[t][r] = x[t] · row r` for `tokens` activation rows `x` (`tokens × columns`, row
    /// major); `out` is `tokens × rows`.
    pub fn matmul(&self, x: &[f32], tokens: usize, out: &mut [f32]) {
        assert_eq!(x.len(), tokens * self.columns, "activation size");
        assert_eq!(out.len(), tokens * self.rows, "output size");
        let n = self.columns;
        match &self.data {
            Rows::F32(d) => self.each(out, tokens, |r, t| {
                kernels::dot_f32(&d[r * n..(r + 1) * n], &x[t * n..(t + 1) * n])
            }),
            Rows::F16(d) if tokens == 1 => {
                self.each(out, 1, |r, _| kernels::dot_f16(&d[r * n..(r + 1) * n], x))
            }
            Rows::F16(d) => self.row_blocks(out, tokens, |first, part| {
                let count = part.len() / tokens;
                f16_tiles::products(&d[first * n..(first + count) * n], x, n, part)
            }),
            Rows::Blocks(d) => {
                let a = Activations::quantize(x, tokens, n);
                self.row_blocks(out, tokens, |first, part| d.products(first, &a, part))
            }
            Rows::Q4K(d) => self.k_products(d, Q4K_BYTES, x, tokens, out, Q4K_KERNELS),
            Rows::Q5K(d) => self.candle_products(d, x, tokens, out),
            Rows::Q6K(d) => self.k_products(d, Q6K_BYTES, x, tokens, out, Q6K_KERNELS),
        }
    }

    /// Products of K-quant rows (`block_bytes` per 256 values) with Q8_K activations, four
    /// tokens at a time through `four`, the rest through `one`.
    fn k_products(
        &self,
        rows: &[u8],
        block_bytes: usize,
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
        (one, four): KKernels,
    ) {
        let per_row = self.columns / QK_K;
        let mut a = vec![Q8K::ZERO; tokens * per_row];
        match tokens {
            1 => kquants::quantize_q8k(x, &mut a),
            _ => x
                .par_chunks_exact(self.columns)
                .zip(a.par_chunks_exact_mut(per_row))
                .for_each(|(values, blocks)| kquants::quantize_q8k(values, blocks)),
        }
        let bytes = per_row * block_bytes;
        let act = |t: usize| &a[t * per_row..(t + 1) * per_row];
        let whole = tokens / 4 * 4;
        self.products(out, tokens, |r, o| {
            let row = &rows[r * bytes..(r + 1) * bytes];
            for t in (0..whole).step_by(4) {
                o[t..t + 4].copy_from_slice(&four(row, std::array::from_fn(|k| act(t + k))));
            }
            for (t, v) in o.iter_mut().enumerate().skip(whole) {
                *v = one(row, act(t));
            }
        })
    }

    /// Products through candle's blocks: activations in the type's dot-product partner.
    fn candle_products<T: GgmlType + Sync>(
        &self,
        rows: &[T],
        x: &[f32],
        tokens: usize,
        out: &mut [f32],
    ) where
        T::VecDotType: Sync,
    {
        let n = self.columns;
        let per_row = n / T::BLCK_SIZE;
        let mut a = vec![T::VecDotType::zeros(); tokens * per_row];
        for (values, blocks) in x.chunks_exact(n).zip(a.chunks_exact_mut(per_row)) {
            T::VecDotType::from_float(values, blocks);
        }
        self.each(out, tokens, |r, t| {
            T::vec_dot(
                n,
                &rows[r * per_row..(r + 1) * per_row],
                &a[t * per_row..(t + 1) * per_row],
            )
        })
    }

    /// [`Weight::products`] with one dot product per (row, token).
    fn each<F>(&self, out: &mut [f32], tokens: usize, dot: F)
    where
        F: Fn(usize, usize) -> f32 + Sync,
    {
        self.products(out, tokens, |r, o| {
            for (t, v) in o.iter_mut().enumerate() {
                *v = dot(r, t);
            }
        })
    }

    /// Fills `out` (`tokens × rows`) through `row(r, o)`, which writes row `r`'s products with
    /// every token into `o`; each thread takes a block of rows, so a weight row is read from
    /// memory once per call.
    fn products<F>(&self, out: &mut [f32], tokens: usize, row: F)
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        self.row_blocks(out, tokens, |first, part| {
            for (i, o) in part.chunks_exact_mut(tokens).enumerate() {
                row(first + i, o);
            }
        })
    }

    /// Fills `out` (`tokens × rows`) through `rows(first, part)`, which writes the products of
    /// the rows from `first` with every token into `part` (row major, `tokens` per row); each
    /// thread takes blocks of [`ROW_CHUNK`] rows.
    fn row_blocks<F>(&self, out: &mut [f32], tokens: usize, rows: F)
    where
        F: Fn(usize, &mut [f32]) + Sync,
    {
        let chunk = ROW_CHUNK.min(self.rows.max(1));
        if tokens == 1 {
            out.par_chunks_mut(chunk)
                .enumerate()
                .for_each(|(c, part)| rows(c * chunk, part));
            return;
        }
        // Row-major by weight row, then transposed into token-major `out`.
        let mut by_row = vec![0f32; self.rows * tokens];
        by_row
            .par_chunks_mut(chunk * tokens)
            .enumerate()
            .for_each(|(c, part)| rows(c * chunk, part));
        out.par_chunks_mut(self.rows)
            .enumerate()
            .for_each(|(t, o)| {
                for (o, row) in o.iter_mut().zip(by_row.chunks_exact(tokens)) {
                    *o = row[t];
                }
            });
    }
}

/// The K-quant kernels: one activation row, and four.
type KKernels = (fn(&[u8], &[Q8K]) -> f32, fn(&[u8], [&[Q8K]; 4]) -> [f32; 4]);

const Q4K_KERNELS: KKernels = (kquants::dot_q4k, kquants::dot_q4k_x4);
const Q6K_KERNELS: KKernels = (kquants::dot_q6k, kquants::dot_q6k_x4);

/// Rows per unit of parallel work: small enough to balance two to sixteen threads over a
/// 576-row matrix, large enough that scheduling costs little next to the dot products. A
/// multiple of the interleaved group, so that every unit starts at a group.
const ROW_CHUNK: usize = 32;
const _: () = assert!(ROW_CHUNK.is_multiple_of(super::interleaved::ROWS));

fn to_float<T: GgmlType>(d: &[T], row: usize, n: usize, out: &mut [f32]) {
    let per_row = n / T::BLCK_SIZE;
    T::to_float(&d[row * per_row..(row + 1) * per_row], out);
}

/// Row `row` of a matrix kept as GGML bytes, dequantized through candle's block type `T`.
fn row_to_float<T: GgmlType>(bytes: &[u8], row: usize, n: usize, out: &mut [f32]) {
    let row_bytes = n / T::BLCK_SIZE * std::mem::size_of::<T>();
    let blocks: Vec<T> =
        blocks(&bytes[row * row_bytes..(row + 1) * row_bytes]).expect("a row is whole blocks");
    T::to_float(&blocks, out);
}
