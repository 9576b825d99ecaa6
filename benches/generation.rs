//! Prefill and decode throughput of the bare model (no engine thread, no HTTP).
//!
//! `LLORCH_BENCH_MODEL` picks the model source (default `builtin:demo`); run with
//! `cargo bench --bench generation`. Criterion reports tokens/s as elements/s.

use std::time::{Duration, Instant};

use candle_core::Device;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use llorch::models::{load, DTypeChoice, LoadSpec, LoadedModel, ModelSource};

/// Prompt length of the prefill benchmark.
const PREFILL_TOKENS: usize = 128;
/// Tokens generated per decode measurement.
const DECODE_TOKENS: usize = 64;

fn model() -> LoadedModel {
    let source = std::env::var("LLORCH_BENCH_MODEL").unwrap_or_else(|_| "builtin:demo".into());
    let source: ModelSource = source.parse().expect("LLORCH_BENCH_MODEL");
    load(&LoadSpec {
        source,
        device: Device::Cpu,
        dtype: DTypeChoice::Auto,
        max_seq_len: None,
    })
    .expect("loading the benchmark model")
}

/// A prompt of `n` valid token ids (cycling through the low vocabulary).
fn prompt(model: &LoadedModel, n: usize) -> Vec<u32> {
    let vocab = model.info.vocab_size as u32;
    (0..n as u32).map(|i| 1 + (i * 7) % (vocab - 1)).collect()
}

fn bench(c: &mut Criterion) {
    let mut model = model();
    let ids = prompt(&model, PREFILL_TOKENS);
    let mut group = c.benchmark_group("generation");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(10));

    group.throughput(Throughput::Elements(PREFILL_TOKENS as u64));
    group.bench_function("prefill_128", |b| {
        b.iter(|| {
            model.forward(&ids, 0).expect("prefill");
            model.clear_kv_cache().expect("clear");
        })
    });

    group.throughput(Throughput::Elements(DECODE_TOKENS as u64));
    group.bench_function("decode_64_after_128", |b| {
        b.iter_custom(|iterations| {
            let mut total = Duration::ZERO;
            for _ in 0..iterations {
                model.forward(&ids, 0).expect("prefill");
                let start = Instant::now();
                for step in 0..DECODE_TOKENS {
                    model
                        .forward(&[ids[step % ids.len()]], PREFILL_TOKENS + step)
                        .expect("decode");
                }
                total += start.elapsed();
                model.clear_kv_cache().expect("clear");
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
