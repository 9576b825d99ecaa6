//! A weight matrix in its GGUF type and its product with activations, split over rayon's
//! threads by blocks of output rows. Q8_0, Q4_0, Q5_0, Q4_K, Q6_K, f16 and f32 rows use
//! llorch's kernels; Q5_K uses candle's block type and dot product.

use candle_core::quantized::k_quants::{
    BlockQ4_0, BlockQ5K, BlockQ5_0, BlockQ8K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use rayon::prelude::*;

use super::activations::Activations;
use super::f16_panels::{self, Bf16Panels, F16Panels, PANEL};
use super::huge_pages::{weight_buffer, WeightBuffer};
use super::interleaved::{Interleaved, Kind};
use super::interleaved_q4k::InterleavedQ4K;
use super::interleaved_q6k::InterleavedQ6K;
use super::kernels;
use super::kquants::{self, Q8K, QK_K};
use super::token_major::TokenMajor;

/// The rows of one matrix.
enum Rows {
    F32(WeightBuffer<f32>),
    /// f16, in panels of 16 rows.
    F16(F16Panels),
    /// bf16, in panels of 16 rows.
    Bf16(Bf16Panels),
    /// Q8_0, Q4_0 or Q5_0, interleaved eight rows at a time.
    Blocks(Interleaved),
    /// Q4_K, interleaved eight rows at a time.
    Q4K(InterleavedQ4K),
    Q5K(Vec<BlockQ5K>),
    /// Q6_K, interleaved eight rows at a time.
    Q6K(InterleavedQ6K),
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
            GgmlDType::F32 => {
                let mut values = weight_buffer(rows * columns);
                for (v, b) in values.iter_mut().zip(bytes.chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
                Rows::F32(values)
            }
            GgmlDType::F16 => Rows::F16(F16Panels::new(&bytes, rows, columns)),
            GgmlDType::Q8_0 => Rows::Blocks(Interleaved::new(Kind::Q8_0, &bytes, rows, columns)),
            GgmlDType::Q4_0 => Rows::Blocks(Interleaved::new(Kind::Q4_0, &bytes, rows, columns)),
            GgmlDType::Q5_0 => Rows::Blocks(Interleaved::new(Kind::Q5_0, &bytes, rows, columns)),
            GgmlDType::Q4K => Rows::Q4K(InterleavedQ4K::new(&bytes, rows, columns)),
            GgmlDType::Q5K => Rows::Q5K(blocks(&bytes)?),
            GgmlDType::Q6K => Rows::Q6K(InterleavedQ6K::new(&bytes, rows, columns)),
            other => candle_core::bail!("the CPU path does not multiply {other:?}"),
        };
        Ok(Weight {
            rows,
            columns,
            data,
        })
    }

    /// An f32 matrix from `rows × columns` values.
    pub fn from_f32(values: &[f32], rows: usize, columns: usize) -> Weight {
        assert_eq!(values.len(), rows * columns, "rows × columns values");
        let mut data = weight_buffer(rows * columns);
        data.par_chunks_mut(ROW_CHUNK * columns.max(1))
            .zip(values.par_chunks(ROW_CHUNK * columns.max(1)))
            .for_each(|(to, from)| to.copy_from_slice(from));
        Weight {
            rows,
            columns,
            data: Rows::F32(data),
        }
    }

    /// An f32 matrix from `rows × columns` little-endian values.
    pub fn from_f32_bytes(bytes: &[u8], rows: usize, columns: usize) -> Weight {
        assert_eq!(bytes.len(), rows * columns * 4, "rows × columns f32 values");
        let mut data = weight_buffer(rows * columns);
        let chunk = ROW_CHUNK * columns.max(1);
        data.par_chunks_mut(chunk)
            .zip(bytes.par_chunks(chunk * 4))
            .for_each(|(to, from)| {
                for (v, b) in to.iter_mut().zip(from.chunks_exact(4)) {
                    *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                }
            });
        Weight {
            rows,
            columns,
            data: Rows::F32(data),
        }
    }

    /// An f16 matrix from `rows × columns` little-endian values, laid out in panels.
    pub fn from_f16(bytes: &[u8], rows: usize, columns: usize) -> Weight {
        Weight {
            rows,
            columns,
            data: Rows::F16(F16Panels::new(bytes, rows, columns)),
        }
    }

    /// A bf16 matrix from `rows × columns` little-endian values, laid out in panels.
    pub fn from_bf16(bytes: &[u8], rows: usize, columns: usize) -> Weight {
        Weight {
            rows,
            columns,
            data: Rows::Bf16(Bf16Panels::new(bytes, rows, columns)),
        }
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
            Rows::F16(d) => d.row(row, out),
            Rows::Bf16(d) => d.row(row, out),
            Rows::Blocks(d) => {
                let bytes = d.row(row);
                match d.kind() {
                    Kind::Q8_0 => row_to_float::<BlockQ8_0>(&bytes, 0, n, out),
                    Kind::Q4_0 => row_to_float::<BlockQ4_0>(&bytes, 0, n, out),
                    Kind::Q5_0 => row_to_float::<BlockQ5_0>(&bytes, 0, n, out),
                }
            }
            Rows::Q4K(d) => d.values(row, out),
            Rows::Q5K(d) => to_float(d, row, n, out),
            Rows::Q6K(d) => d.values(row, out),
        }
    }

    /// `out[t][r] = x[t] · row r` for `tokens` activation rows `x` (`tokens × columns`, row
    /// major); `out` is `tokens × rows`.
    pub fn matmul(&self, x: &[f32], tokens: usize, out: &mut [f32]) {
        Weight::matmul_all(&mut [(self, out)], x, tokens);
    }

    /// [`Weight::matmul`] for several weights of the same width and the same activations in
    /// one parallel region: the pool wakes once, and the activations are quantized once per
    /// type, not once per weight.
    pub fn matmul_all(products: &mut [(&Weight, &mut [f32])], x: &[f32], tokens: usize) {
        let Some(columns) = products.first().map(|(w, _)| w.columns) else {
            return;
        };
        assert_eq!(x.len(), tokens * columns, "activation size");
        for (w, out) in products.iter() {
            assert_eq!(w.columns, columns, "weights of one width");
            assert_eq!(out.len(), tokens * w.rows, "output size");
        }
        if tokens == 0 {
            return;
        }
        let prepared = Prepared::new(products.iter().map(|(w, _)| *w), x, tokens, columns);
        if tokens == 1 {
            // One token: a unit's rows are a contiguous piece of its output.
            let mut units = Vec::new();
            for (w, out) in products.iter_mut() {
                let rows = w.decode_rows();
                for (c, part) in out.chunks_mut(rows).enumerate() {
                    units.push((*w, c * rows, part));
                }
            }
            units
                .into_par_iter()
                .for_each(|(w, first, part)| w.part(first, &prepared, part));
            return;
        }
        let mut units = Vec::new();
        for (w, out) in products.iter_mut() {
            let target = TokenMajor::new(out, w.rows);
            for first in (0..w.rows).step_by(ROW_CHUNK) {
                units.push((*w, first, target.clone()));
            }
        }
        units
            .into_par_iter()
            .for_each_init(Vec::new, |part, (w, first, target)| {
                part.resize(ROW_CHUNK.min(w.rows - first) * tokens, 0.0);
                w.part(first, &prepared, part);
                // SAFETY: every unit of one output starts at its own multiple of `ROW_CHUNK`
                // and writes at most `ROW_CHUNK` rows, so no two units write the same value.
                #[allow(unsafe_code)]
                unsafe {
                    target.write(first, part, tokens)
                };
            });
    }

    /// Rows per unit of a one-token product: f16 and bf16 panels are multiplied a group at a
    /// time.
    fn decode_rows(&self) -> usize {
        match self.data {
            Rows::F16(_) | Rows::Bf16(_) => f16_panels::STREAMS * f16_panels::GROUP * PANEL,
            _ => ROW_CHUNK,
        }
    }

    /// The products of the `count` rows from `first` that `part` has room for with every
    /// token, token-major: `part[t * count + (r - first)]`.
    fn part(&self, first: usize, p: &Prepared<'_>, part: &mut [f32]) {
        let (n, tokens) = (self.columns, p.tokens);
        let count = part.len() / tokens;
        let x = |t: usize| &p.x[t * n..(t + 1) * n];
        let each = |part: &mut [f32], dot: &dyn Fn(usize, usize) -> f32| {
            for (t, o) in part.chunks_exact_mut(count).enumerate() {
                for (i, v) in o.iter_mut().enumerate() {
                    *v = dot(first + i, t);
                }
            }
        };
        match &self.data {
            Rows::F32(d) => each(part, &|r, t| kernels::dot_f32(&d[r * n..(r + 1) * n], x(t))),
            Rows::F16(d) => d.products(first, p.packed.as_deref().unwrap_or(p.x), tokens, part),
            Rows::Bf16(d) => d.products(first, p.packed.as_deref().unwrap_or(p.x), tokens, part),
            Rows::Blocks(d) => d.products(first, p.q8_0.as_ref().expect("Q8_0 activations"), part),
            Rows::Q4K(d) => d.products(
                first,
                p.q8k.as_ref().expect("Q8_K activations"),
                tokens,
                part,
            ),
            Rows::Q6K(d) => d.products(
                first,
                p.q8k.as_ref().expect("Q8_K activations"),
                tokens,
                part,
            ),
            Rows::Q5K(d) => {
                let per_row = n / QK_K;
                let a = p.q8k_candle.as_ref().expect("Q8_K activations");
                each(part, &|r, t| {
                    BlockQ5K::vec_dot(
                        n,
                        &d[r * per_row..(r + 1) * per_row],
                        &a[t * per_row..(t + 1) * per_row],
                    )
                })
            }
        }
    }
}

/// The activations of one product, quantized for each weight type that takes them: Q8_0
/// blocks for the interleaved types, llorch's Q8_K for Q4_K and Q6_K, candle's for Q5_K; for
/// f16 weights and several tokens, packed tile by tile.
struct Prepared<'a> {
    x: &'a [f32],
    tokens: usize,
    /// [`f16_panels::pack`]ed activations; one token's are `x` itself.
    packed: Option<Vec<f32>>,
    q8_0: Option<Activations>,
    q8k: Option<Vec<Q8K>>,
    q8k_candle: Option<Vec<BlockQ8K>>,
}

impl<'a> Prepared<'a> {
    fn new<'w>(
        weights: impl Iterator<Item = &'w Weight>,
        x: &'a [f32],
        tokens: usize,
        columns: usize,
    ) -> Prepared<'a> {
        let mut p = Prepared {
            x,
            tokens,
            packed: None,
            q8_0: None,
            q8k: None,
            q8k_candle: None,
        };
        let per_row = columns / QK_K;
        for w in weights {
            match &w.data {
                Rows::Blocks(_) if p.q8_0.is_none() => {
                    p.q8_0 = Some(Activations::quantize(x, tokens, columns))
                }
                Rows::Q4K(_) | Rows::Q6K(_) if p.q8k.is_none() => {
                    let mut a = vec![Q8K::ZERO; tokens * per_row];
                    match tokens {
                        1 => kquants::quantize_q8k(x, &mut a),
                        _ => x
                            .par_chunks_exact(columns)
                            .zip(a.par_chunks_exact_mut(per_row))
                            .for_each(|(values, blocks)| kquants::quantize_q8k(values, blocks)),
                    }
                    p.q8k = Some(a);
                }
                Rows::F16(_) | Rows::Bf16(_) if tokens > 1 && p.packed.is_none() => {
                    p.packed = Some(f16_panels::pack(x, tokens, columns));
                }
                Rows::Q5K(_) if p.q8k_candle.is_none() => {
                    let mut a = vec![BlockQ8K::zeros(); tokens * per_row];
                    for (values, blocks) in x.chunks_exact(columns).zip(a.chunks_exact_mut(per_row))
                    {
                        BlockQ8K::from_float(values, blocks);
                    }
                    p.q8k_candle = Some(a);
                }
                _ => {}
            }
        }
        p
    }
}

/// Rows per unit of parallel work: small enough to balance two to sixteen threads over a
/// 576-row matrix, large enough that scheduling costs little next to the dot products. A
/// multiple of the interleaved group, so that every unit starts at a group.
const ROW_CHUNK: usize = 32;
const _: () = assert!(ROW_CHUNK.is_multiple_of(super::interleaved::ROWS));
const _: () = assert!(ROW_CHUNK.is_multiple_of(PANEL));

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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand::{Rng, SeedableRng};

    /// A `rows × columns` weight of `dtype` from random values, and its values as candle
    /// dequantizes them.
    fn weight(
        dtype: GgmlDType,
        rows: usize,
        columns: usize,
        rng: &mut impl Rng,
    ) -> (Weight, Vec<f32>) {
        let values: Vec<f32> = (0..rows * columns)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let tensor = Tensor::from_vec(values, (rows, columns), &Device::Cpu).expect("tensor");
        let q = QTensor::quantize(&tensor, dtype).expect("quantize");
        let dequantized = q.dequantize(&Device::Cpu).expect("dequantize");
        let flat = dequantized
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("values");
        (Weight::new(&q).expect("weight"), flat)
    }

    /// A token's products are the same bits whatever else is in the batch: row `t` of a
    /// batch of `n` equals the same activations multiplied alone, for every type, at tile and
    /// group edges (batched decoding's invariance rests on this).
    #[test]
    fn a_tokens_products_do_not_depend_on_its_batch() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let columns = 512;
        let mut weights: Vec<(String, Weight)> = SUPPORTED
            .iter()
            .map(|&dtype| (format!("{dtype:?}"), weight(dtype, 72, columns, &mut rng).0))
            .collect();
        let bf16: Vec<u8> = (0..72 * columns)
            .flat_map(|_| half::bf16::from_f32(rng.random_range(-1.0..1.0)).to_le_bytes())
            .collect();
        weights.push(("bf16".to_string(), Weight::from_bf16(&bf16, 72, columns)));
        for (dtype, w) in &weights {
            let x: Vec<f32> = (0..64 * columns)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let alone: Vec<Vec<u32>> = x
                .chunks_exact(columns)
                .map(|row| {
                    let mut out = vec![0f32; w.rows];
                    w.matmul(row, 1, &mut out);
                    out.iter().map(|v| v.to_bits()).collect()
                })
                .collect();
            for n in (1..=13).chain([64]) {
                let mut out = vec![0f32; n * w.rows];
                w.matmul(&x[..n * columns], n, &mut out);
                for (t, row) in out.chunks_exact(w.rows).enumerate() {
                    let bits: Vec<u32> = row.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(bits, alone[t], "{dtype}: token {t} of {n}");
                }
            }
        }
    }

    #[test]
    fn fused_products_put_every_weights_rows_in_their_places() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let columns = 512;
        let types = SUPPORTED;
        // Row counts below, at and past a unit of work, none a multiple of it but the 64.
        let weights: Vec<_> = types
            .iter()
            .zip([40, 8, 72, 64, 17, 33, 9, 100])
            .map(|(&dtype, rows)| weight(dtype, rows, columns, &mut rng))
            .collect();
        for tokens in [1, 3, 6] {
            let x: Vec<f32> = (0..tokens * columns)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect();
            let mut outs: Vec<Vec<f32>> = weights
                .iter()
                .map(|(w, _)| vec![f32::NAN; tokens * w.rows])
                .collect();
            let mut products: Vec<(&Weight, &mut [f32])> = weights
                .iter()
                .zip(outs.iter_mut())
                .map(|((w, _), o)| (w, &mut o[..]))
                .collect();
            Weight::matmul_all(&mut products, &x, tokens);
            for (((w, values), out), dtype) in weights.iter().zip(&outs).zip(types) {
                for t in 0..tokens {
                    let a = &x[t * columns..(t + 1) * columns];
                    for r in 0..w.rows {
                        let row = &values[r * columns..(r + 1) * columns];
                        let exact: f64 = row.iter().zip(a).map(|(w, a)| f64::from(w * a)).sum();
                        let scale: f64 = row
                            .iter()
                            .zip(a)
                            .map(|(w, a)| f64::from((w * a).abs()))
                            .sum();
                        let got = f64::from(out[t * w.rows + r]);
                        assert!(
                            (got - exact).abs() <= 0.02 * scale,
                            "{dtype:?} row {r} token {t} of {tokens}: {got} vs {exact}"
                        );
                    }
                }
                let mut alone = vec![0f32; tokens * w.rows];
                w.matmul(&x, tokens, &mut alone);
                assert_eq!(&alone, out, "{dtype:?} alone and fused");
            }
        }
    }
}
