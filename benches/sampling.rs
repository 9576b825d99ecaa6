//! Choosing one token from a vocabulary's logits, per sampling setting: greedy, plain
//! temperature, top-k, top-p and min-p, on a 32 000-token (Llama 2) and a 151 936-token
//! (Qwen 2) vocabulary. The logits are a long flat tail with five tokens lifted above it: by
//! 16–20 (`peaked`, a confident trained model: the five hold all but 0.2 % of the mass) or by
//! 8–12 (`flat`: the tail holds most of the mass, the hard case for top-p, run for top-p
//! only). Criterion reports tokens chosen per second.
//!
//! `cargo bench --bench sampling`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use llorch::models::{Sampler, SamplingParams};

/// Logits with a long tail in [-4, 4) and five tokens lifted to `top`, `top - 1`, ….
fn logits(vocab: usize, top: f32) -> Vec<f32> {
    let mut state = 0x9e37_79b9_u32;
    let mut values: Vec<f32> = (0..vocab)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state % 8000) as f32 / 1000.0 - 4.0
        })
        .collect();
    for (rank, id) in [17usize, 523, 1999, 7, 20_011].into_iter().enumerate() {
        values[id % vocab] = top - rank as f32;
    }
    values
}

fn settings() -> Vec<(&'static str, SamplingParams)> {
    let seeded = SamplingParams {
        seed: Some(7),
        ..SamplingParams::default()
    };
    vec![
        ("greedy", SamplingParams::greedy()),
        ("temperature", seeded.clone()),
        (
            "top_k_40",
            SamplingParams {
                top_k: 40,
                ..seeded.clone()
            },
        ),
        (
            "top_p_0.9",
            SamplingParams {
                top_p: 0.9,
                ..seeded.clone()
            },
        ),
        (
            "min_p_0.05",
            SamplingParams {
                min_p: 0.05,
                ..seeded
            },
        ),
    ]
}

fn sampling(c: &mut Criterion) {
    let mut group = c.benchmark_group("sample");
    group.throughput(Throughput::Elements(1));
    for vocab in [32_000, 151_936] {
        for (shape, top) in [("peaked", 20.0), ("flat", 12.0)] {
            let values = logits(vocab, top);
            for (setting, params) in settings() {
                if shape == "flat" && setting != "top_p_0.9" {
                    continue;
                }
                let name = format!("{setting}/{shape}");
                let mut sampler = Sampler::new(params);
                let mut scratch = values.clone();
                group.bench_function(BenchmarkId::new(name, vocab), |b| {
                    b.iter(|| {
                        scratch.copy_from_slice(&values);
                        sampler.sample(&mut scratch, &[])
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, sampling);
criterion_main!(benches);
