//! The CPU dot-product kernels on one matrix-vector product: a 1536 × 576 matrix (a small
//! model's FFN projection, which fits in L2) and a 5632 × 2048 one (a 1B model's, which does
//! not). Criterion reports weight bytes per second (Q4_0 as GGML's 18-byte blocks, though ours
//! is interleaved eight rows at a time). Q4_0, Q5_0, Q4_K and Q6_K (K blocks only where 256
//! divides the row) run against candle's own `vec_dot` on the same blocks.
//!
//! The `prefill` group multiplies the same matrices with 128 activation rows through
//! `Weight::matmul` (quantizing the activations included) and reports multiply-adds per
//! second; run it with `RAYON_NUM_THREADS=1` for one thread's figure.
//!
//! `cargo bench --bench kernels`

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ5_0, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::f16;
use llorch::models::cpu::interleaved::Q4_0x8;
use llorch::models::cpu::kernels::{
    block_sums, dot_f16, dot_q8_0, quantize_q8_0, BLOCK, Q8_0_BYTES,
};
use llorch::models::cpu::kquants::{dot_q4k, dot_q5_0, dot_q6k, quantize_q8k, Q8K, QK_K};
use llorch::models::cpu::tiles::Activations;
use llorch::models::cpu::weight::Weight;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
}

fn q8(x: &[f32]) -> Vec<u8> {
    let mut out = vec![0; x.len() / BLOCK * Q8_0_BYTES];
    quantize_q8_0(x, &mut out);
    out
}

/// candle's quantization of `w` into blocks of `T`, and the same blocks as GGML bytes.
fn candle_blocks<T: GgmlType>(w: &[f32]) -> (Vec<T>, Vec<u8>) {
    let mut blocks = vec![T::zeros(); w.len() / T::BLCK_SIZE];
    T::from_float(w, &mut blocks);
    let size = blocks.len() * std::mem::size_of::<T>();
    // SAFETY: candle's block types are `repr(C)` plain data; the slice covers exactly the
    // vector's initialised blocks and lives while `blocks` does (it is copied at once).
    #[allow(unsafe_code)]
    let bytes = unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast::<u8>(), size) }.to_vec();
    (blocks, bytes)
}

/// Ours and candle's product of a matrix of type `T` with a vector: `ours(row bytes)` and
/// candle's `vec_dot` against `T`'s activation type.
fn ours_and_candle<T: GgmlType>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    (rows, cols): (usize, usize),
    w: &[f32],
    x: &[f32],
    ours: impl Fn(&[u8]) -> f32,
) {
    let label = format!("{rows}x{cols}");
    let (blocks, bytes) = candle_blocks::<T>(w);
    let row = bytes.len() / rows;
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_with_input(BenchmarkId::new(name, &label), &bytes, |b, w| {
        b.iter(|| w.chunks_exact(row).map(&ours).sum::<f32>())
    });
    let mut x_candle = vec![T::VecDotType::zeros(); cols / T::VecDotType::BLCK_SIZE];
    T::VecDotType::from_float(x, &mut x_candle);
    group.bench_with_input(
        BenchmarkId::new(format!("candle_{name}"), &label),
        &blocks,
        |b, w| {
            b.iter(|| {
                w.chunks_exact(cols / T::BLCK_SIZE)
                    .map(|r| T::vec_dot(cols, r, &x_candle))
                    .sum::<f32>()
            })
        },
    );
}

fn matvec(c: &mut Criterion) {
    let mut group = c.benchmark_group("matvec");
    for (rows, cols) in [(1536usize, 576usize), (5632, 2048)] {
        let x = values(cols, 7);
        let xq = q8(&x);
        let w = values(rows * cols, 3);
        let label = format!("{rows}x{cols}");
        let wq8 = q8(&w);
        group.throughput(Throughput::Bytes(wq8.len() as u64));
        group.bench_with_input(BenchmarkId::new("q8_0", &label), &wq8, |b, w| {
            let row = cols / BLOCK * Q8_0_BYTES;
            b.iter(|| w.chunks_exact(row).map(|r| dot_q8_0(r, &xq)).sum::<f32>())
        });
        // Q4_0 rows: the Q8_0 scales with the low nibble of each value byte.
        let wq4: Vec<u8> = wq8
            .chunks_exact(Q8_0_BYTES)
            .flat_map(|b| {
                b[..2]
                    .iter()
                    .copied()
                    .chain(b[2..18].iter().map(|v| v & 0x77))
            })
            .collect();
        group.throughput(Throughput::Bytes(wq4.len() as u64));
        // Interleaved eight rows at a time, as the model holds them, on this thread.
        let w4x8 = Q4_0x8::new(&wq4, rows, cols);
        let xa = Activations::quantize(&x, 1, cols);
        let mut out = vec![0f32; rows];
        group.bench_with_input(BenchmarkId::new("q4_0", &label), &w4x8, |b, w| {
            b.iter(|| w.products(0, &xa, &mut out))
        });
        // candle's own Q4_0 x Q8_0 dot product on the same values, for reference.
        let mut w_candle = vec![BlockQ4_0::zeros(); rows * cols / BLOCK];
        BlockQ4_0::from_float(&w, &mut w_candle);
        let mut x_candle = vec![BlockQ8_0::zeros(); cols / BLOCK];
        BlockQ8_0::from_float(&x, &mut x_candle);
        group.throughput(Throughput::Bytes(wq4.len() as u64));
        group.bench_with_input(
            BenchmarkId::new("candle_q4_0", &label),
            &w_candle,
            |b, w| {
                b.iter(|| {
                    w.chunks_exact(cols / BLOCK)
                        .map(|r| BlockQ4_0::vec_dot(cols, r, &x_candle))
                        .sum::<f32>()
                })
            },
        );
        let mut sums = vec![0f32; cols / BLOCK];
        block_sums(&xq, &mut sums);
        ours_and_candle::<BlockQ5_0>(&mut group, "q5_0", (rows, cols), &w, &x, |r| {
            dot_q5_0(r, &xq, &sums)
        });
        if cols % QK_K == 0 {
            let mut xk = vec![Q8K::ZERO; cols / QK_K];
            quantize_q8k(&x, &mut xk);
            ours_and_candle::<BlockQ4K>(&mut group, "q4_k", (rows, cols), &w, &x, |r| {
                dot_q4k(r, &xk)
            });
            ours_and_candle::<BlockQ6K>(&mut group, "q6_k", (rows, cols), &w, &x, |r| {
                dot_q6k(r, &xk)
            });
        }
        let wh: Vec<f16> = w.iter().map(|v| f16::from_f32(*v)).collect();
        group.throughput(Throughput::Bytes(wh.len() as u64 * 2));
        group.bench_with_input(BenchmarkId::new("f16", &label), &wh, |b, w| {
            b.iter(|| w.chunks_exact(cols).map(|r| dot_f16(r, &x)).sum::<f32>())
        });
    }
    group.finish();
}

/// Tokens per prefill product: the harness's prompt length.
const PREFILL_TOKENS: usize = 128;

fn prefill(c: &mut Criterion) {
    let mut group = c.benchmark_group("prefill");
    for (rows, cols) in [(1536usize, 576usize), (5632, 2048)] {
        let w = Tensor::from_vec(values(rows * cols, 3), (rows, cols), &Device::Cpu)
            .expect("weight tensor");
        let x = values(PREFILL_TOKENS * cols, 7);
        let mut out = vec![0f32; PREFILL_TOKENS * rows];
        let label = format!("{rows}x{cols}");
        group.throughput(Throughput::Elements((PREFILL_TOKENS * rows * cols) as u64));
        for (name, dtype) in [
            ("q8_0", GgmlDType::Q8_0),
            ("q4_0", GgmlDType::Q4_0),
            ("q5_0", GgmlDType::Q5_0),
            ("q4_k", GgmlDType::Q4K),
            ("q6_k", GgmlDType::Q6K),
            ("f16", GgmlDType::F16),
        ] {
            if cols % dtype.block_size() != 0 {
                continue;
            }
            let q = QTensor::quantize(&w, dtype).expect("quantize");
            let weight = Weight::new(&q).expect("weight");
            group.bench_function(BenchmarkId::new(name, &label), |b| {
                b.iter(|| weight.matmul(&x, PREFILL_TOKENS, &mut out))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, matvec, prefill);
criterion_main!(benches);
