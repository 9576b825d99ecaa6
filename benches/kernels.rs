//! The CPU dot-product kernels on one matrix-vector product: a 1536 × 576 matrix (a small
//! model's FFN projection, which fits in L2) and a 5632 × 2048 one (a 1B model's, which does
//! not). Criterion reports weight bytes per second (every block type counted as GGML's
//! blocks, though ours are interleaved eight rows at a time). Q8_0, Q4_0, Q5_0, Q4_K and
//! Q6_K (K blocks only where 256 divides the row) run against candle's own `vec_dot` on the
//! same blocks.
//!
//! The `prefill` group multiplies the same matrices with 128 activation rows through
//! `Weight::matmul` (quantizing or packing the activations included; every GGML type, and
//! bf16 as a safetensors checkpoint stores it) and reports multiply-adds per second; run it with `RAYON_NUM_THREADS=1` for one thread's figure.
//!
//! The `batch8` and `batch16` groups do the same with 8 and 16 rows: the products of a
//! decode step of that many streams. Their one matrix stays in cache from call to call; the
//! `cold16` group cycles through 1 GiB of copies of the larger one, so that its weights come
//! from memory, as a model's step reads them.
//!
//! The `attention` group runs one KV head's attention (its query heads' scores, softmax and
//! weighted sums of the values) over a sequence's paged cache, for the small and 1b models'
//! geometry and several context lengths, and reports multiply-adds per second; `attend` with
//! an f32 cache, `attend_f16` with a half-precision one; `scores` and `sums` run its two
//! products alone for one and two query heads over 256 positions in runs of 16.
//!
//! Every label ends in the kernels' level (`@avx512`, `@avx2`, `@scalar`): the best this CPU
//! has, or the one `LLORCH_CPU_LEVEL` forces, so
//! `LLORCH_CPU_LEVEL=avx2 cargo bench --bench kernels` adds the AVX2 rows beside the others.
//!
//! `cargo bench --bench kernels`

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ5_0, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::{bf16, f16};
use llorch::models::batch::KvLayout;
use llorch::models::cpu::activations::Activations;
use llorch::models::cpu::attention::{self, Element};
use llorch::models::cpu::f16_panels::F16Panels;
use llorch::models::cpu::interleaved::{Interleaved, Kind};
use llorch::models::cpu::interleaved_q4k::InterleavedQ4K;
use llorch::models::cpu::interleaved_q6k::InterleavedQ6K;
use llorch::models::cpu::kquants::{quantize_q8k, Q8K, QK_K};
use llorch::models::cpu::kv_pool::{KvPool, Scratch, Span};
use llorch::models::cpu::level::level;
use llorch::models::cpu::weight::Weight;
use llorch::models::cpu::Plain;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
        .collect()
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

/// Ours (`products` of the matrix `interleave` makes of the GGML bytes, with one token of
/// Q8_K activations, on this thread) and candle's `vec_dot` on the same K blocks of `T`.
fn k_and_candle<T: GgmlType, M>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    (rows, cols): (usize, usize),
    (w, x): (&[f32], &[f32]),
    interleave: impl Fn(&[u8]) -> M,
    products: impl Fn(&M, &[Q8K], &mut [f32]),
) {
    let label = format!("{rows}x{cols}@{}", level().name());
    let mut xk = vec![Q8K::ZERO; cols / QK_K];
    quantize_q8k(x, &mut xk);
    let (blocks, bytes) = candle_blocks::<T>(w);
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    let ours = interleave(&bytes);
    let mut out = vec![0f32; rows];
    group.bench_with_input(BenchmarkId::new(name, &label), &ours, |b, m| {
        b.iter(|| products(m, &xk, &mut out))
    });
    candle(group, name, &label, &blocks, cols, x);
}

/// candle's `vec_dot` of each row of `blocks` with `x` in `T`'s activation type.
fn candle<T: GgmlType>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    label: &str,
    blocks: &[T],
    cols: usize,
    x: &[f32],
) {
    let mut x_candle = vec![T::VecDotType::zeros(); cols / T::VecDotType::BLCK_SIZE];
    T::VecDotType::from_float(x, &mut x_candle);
    group.bench_with_input(
        BenchmarkId::new(format!("candle_{name}"), label),
        blocks,
        |b, w| {
            b.iter(|| {
                w.chunks_exact(cols / T::BLCK_SIZE)
                    .map(|r| T::vec_dot(cols, r, &x_candle))
                    .sum::<f32>()
            })
        },
    );
}

/// Ours (interleaved eight rows at a time, as the model holds them, on this thread) and
/// candle's `vec_dot` on the same blocks of `T`, whose GGML bytes are counted.
fn interleaved_and_candle<T: GgmlType>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    kind: Kind,
    (rows, cols): (usize, usize),
    w: &[f32],
    x: &[f32],
) {
    let label = format!("{rows}x{cols}@{}", level().name());
    let name = format!("{kind:?}").to_lowercase();
    let (blocks, bytes) = candle_blocks::<T>(w);
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    let ours = Interleaved::new(kind, &bytes, rows, cols);
    let a = Activations::quantize(x, 1, cols);
    let mut out = vec![0f32; rows];
    group.bench_with_input(BenchmarkId::new(&name, &label), &ours, |b, w| {
        b.iter(|| w.products(0, &a, &mut out))
    });
    candle(group, &name, &label, &blocks, cols, x);
}

fn matvec(c: &mut Criterion) {
    let mut group = c.benchmark_group("matvec");
    for (rows, cols) in [(1536usize, 576usize), (5632, 2048)] {
        let x = values(cols, 7);
        let w = values(rows * cols, 3);
        let label = format!("{rows}x{cols}@{}", level().name());
        interleaved_and_candle::<BlockQ8_0>(&mut group, Kind::Q8_0, (rows, cols), &w, &x);
        interleaved_and_candle::<BlockQ4_0>(&mut group, Kind::Q4_0, (rows, cols), &w, &x);
        interleaved_and_candle::<BlockQ5_0>(&mut group, Kind::Q5_0, (rows, cols), &w, &x);
        if cols % QK_K == 0 {
            let shape = (rows, cols);
            let q4k = |b: &[u8]| InterleavedQ4K::new(b, rows, cols);
            k_and_candle::<BlockQ4K, _>(&mut group, "q4_k", shape, (&w, &x), q4k, |m, a, o| {
                m.products(0, a, 1, o)
            });
            let q6k = |b: &[u8]| InterleavedQ6K::new(b, rows, cols);
            k_and_candle::<BlockQ6K, _>(&mut group, "q6_k", shape, (&w, &x), q6k, |m, a, o| {
                m.products(0, a, 1, o)
            });
        }
        let bytes: Vec<u8> = w
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        group.throughput(Throughput::Bytes(bytes.len() as u64));
        let panels = F16Panels::new(&bytes, rows, cols);
        let mut out = vec![0f32; rows];
        group.bench_with_input(BenchmarkId::new("f16", &label), &panels, |b, w| {
            b.iter(|| w.products(0, &x, 1, &mut out))
        });
    }
    group.finish();
}

/// Tokens per prefill product: the harness's prompt length.
const PREFILL_TOKENS: usize = 128;

fn prefill(c: &mut Criterion) {
    products(c, "prefill", PREFILL_TOKENS);
}

/// The decode step of eight and of sixteen streams: as many activation rows.
fn batch(c: &mut Criterion) {
    for tokens in [8, 16] {
        products(c, &format!("batch{tokens}"), tokens);
    }
}

/// Bytes of weights the `cold` group cycles through: more than any cache of these machines,
/// so every product reads its weights from memory, as a model's step does.
const COLD_BYTES: usize = 1 << 30;

/// The 1b model's FFN product with 16 activation rows, each call on the next of as many
/// copies of the matrix as [`COLD_BYTES`] takes: a 16-stream decode step's weights come
/// from memory, which the `batch16` group (one matrix, cached) does not measure.
fn cold(c: &mut Criterion) {
    let mut group = c.benchmark_group("cold16");
    let (rows, cols, tokens) = (5632usize, 2048usize, 16usize);
    let (w, x, mut out, label) = case(&mut group, (rows, cols), tokens);
    for (name, dtype) in [
        ("q8_0", GgmlDType::Q8_0),
        ("q4_0", GgmlDType::Q4_0),
        ("f16", GgmlDType::F16),
    ] {
        let q = QTensor::quantize(&w, dtype).expect("quantize");
        let copies = COLD_BYTES.div_ceil(q.storage_size_in_bytes());
        let weights: Vec<Weight> = (0..copies)
            .map(|_| Weight::new(&q).expect("weight"))
            .collect();
        let mut next = 0;
        group.bench_function(BenchmarkId::new(name, &label), |b| {
            rayon::scope(|_| {
                b.iter(|| {
                    weights[next].matmul(&x, tokens, &mut out);
                    next = (next + 1) % weights.len();
                })
            })
        });
    }
    group.finish();
}

/// A product's operands: the `rows × cols` weight, `tokens` activation rows, the output and
/// the label; `group` counts its multiply-adds.
fn case(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    (rows, cols): (usize, usize),
    tokens: usize,
) -> (Tensor, Vec<f32>, Vec<f32>, String) {
    let w = Tensor::from_vec(values(rows * cols, 3), (rows, cols), &Device::Cpu)
        .expect("weight tensor");
    group.throughput(Throughput::Elements((tokens * rows * cols) as u64));
    (
        w,
        values(tokens * cols, 7),
        vec![0f32; tokens * rows],
        format!("{rows}x{cols}@{}", level().name()),
    )
}

/// Group `name`: every type's product of both matrices with `tokens` activation rows.
fn products(c: &mut Criterion, name: &str, tokens: usize) {
    let mut group = c.benchmark_group(name);
    for (rows, cols) in [(1536usize, 576usize), (5632, 2048)] {
        let (w, x, mut out, label) = case(&mut group, (rows, cols), tokens);
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
            // Inside the pool, as the model's forward pass runs: a product called from outside
            // pays for waking the pool, which a step pays once.
            group.bench_function(BenchmarkId::new(name, &label), |b| {
                rayon::scope(|_| b.iter(|| weight.matmul(&x, tokens, &mut out)))
            });
        }
        let bytes: Vec<u8> = values(rows * cols, 3)
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let weight = Weight::from_bf16(&bytes, rows, cols);
        group.bench_function(BenchmarkId::new("bf16", &label), |b| {
            rayon::scope(|_| b.iter(|| weight.matmul(&x, tokens, &mut out)))
        });
    }
    group.finish();
}

/// Head size of both geometries.
const HEAD_DIM: usize = 64;

fn attention(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention");
    attend::<f32>(&mut group, "attend");
    attend::<f16>(&mut group, "attend_f16");
    attention_products(&mut group);
    group.finish();
}

/// The `scores` and `sums` rows of the attention group: its two products alone, for two
/// query heads (a pair, the unit of the wide kernels) and for one, over 256 positions of an
/// f32 cache in runs of 16, as a paged cache holds them.
fn attention_products(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    let (positions, stride) = (256usize, HEAD_DIM);
    let cache = values(positions * stride, 19);
    let runs: Vec<(usize, usize)> = (0..positions / 16).map(|r| (r * 16 * stride, 16)).collect();
    for heads in [2usize, 1] {
        let queries = values(heads * HEAD_DIM, 23);
        let weights: Vec<f32> = values(heads * positions, 29)
            .iter()
            .map(|w| w.abs())
            .collect();
        let mut scores = vec![0f32; heads * positions];
        let mut sums = vec![0f32; heads * HEAD_DIM];
        let label = format!("{heads}/{positions}@{}", level().name());
        group.throughput(Throughput::Elements((heads * positions * HEAD_DIM) as u64));
        group.bench_function(BenchmarkId::new("scores", &label), |b| {
            b.iter(|| attention::scores(&queries, HEAD_DIM, &cache, stride, &runs, &mut scores))
        });
        group.bench_function(BenchmarkId::new("sums", &label), |b| {
            b.iter(|| {
                attention::weighted_sums(&weights, &cache, stride, &runs, &mut sums, HEAD_DIM)
            })
        });
    }
}

/// Rows `name` of the attention group: a cache of `T`.
fn attend<T: Element + Plain>(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
) {
    // (name, query heads per KV head, KV heads): the small model's and the 1b model's.
    for (model, queries, kv_heads) in [("small", 3usize, 3usize), ("1b", 8, 4)] {
        let width = kv_heads * HEAD_DIM;
        for context in [64usize, 256, 1024] {
            let layout = KvLayout {
                block_size: 16,
                blocks: context.div_ceil(16),
            };
            let mut pool = KvPool::<T>::new(1, kv_heads, HEAD_DIM, layout);
            // Blocks in reverse order, as a pool handed out over time holds them.
            let table: Vec<u32> = (0..layout.blocks as u32).rev().collect();
            let keys = values(context * width, 11);
            let cached = values(context * width, 13);
            pool.write(0, &table, 0, &keys, &cached);
            let q: Vec<f32> = values(queries * HEAD_DIM, 17)
                .iter()
                .map(|v| v * 0.2)
                .collect();
            let span = Span {
                table: &table,
                start: 0,
                end: context,
                kv_head: 1,
            };
            let mut scratch = Scratch::default();
            let mut out = vec![0f32; queries * HEAD_DIM];
            let layer = pool.layer(0);
            let label = format!("{model}/{context}@{}", level().name());
            group.throughput(Throughput::Elements(
                (2 * queries * context * HEAD_DIM) as u64,
            ));
            group.bench_function(BenchmarkId::new(name, &label), |b| {
                b.iter(|| layer.attend(&q, &span, 0.125, &mut scratch, &mut out))
            });
        }
    }
}

criterion_group!(benches, matvec, prefill, batch, cold, attention);
criterion_main!(benches);
