//! The fused CUDA kernels of the batched decoder against the candle ops they replace, on the
//! device named by `LLORCH_TEST_DEVICE` (a CUDA device; the CUDA build only), in f32 and bf16,
//! with shapes that leave partial warps and blocks.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, IndexOp, Tensor};
use llorch::models::batch::Choice;
use llorch::models::candle_llama::ops::Ops;
use llorch::models::DeviceSpec;
use llorch::models::{Sampler, SamplingParams, MAX_DEVICE_TOP_K};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn device() -> Device {
    let name = std::env::var("LLORCH_TEST_DEVICE").unwrap_or_else(|_| "cuda:0".to_string());
    let device = name.parse::<DeviceSpec>().unwrap().open().unwrap();
    assert!(
        device.is_cuda(),
        "these tests need a CUDA device, got {name}"
    );
    device
}

fn kernels(device: &Device, dtype: DType, head_dim: usize) -> Ops {
    let ops = Ops::for_device(device, dtype, head_dim).unwrap();
    assert!(ops.paged(), "the fused kernels are not in use");
    ops
}

fn random(shape: &[usize], dtype: DType, device: &Device) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, device)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The largest difference between two tensors relative to the reference's largest magnitude.
fn relative(a: &Tensor, reference: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = reference
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap();
    let diff: f32 = (a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap();
    let scale: f32 = b.abs().unwrap().max(0).unwrap().to_scalar().unwrap();
    diff / scale.max(1e-6)
}

fn tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => 1e-5,
        _ => 2e-2,
    }
}

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

#[test]
fn add_rms_norm_is_the_residual_add_and_norm() {
    let device = device();
    for dtype in DTYPES {
        let fused = kernels(&device, dtype, 64);
        for (rows, hidden, multiplier) in [(1, 2048, 1.0), (5, 300, 0.5), (3, 7, 1.0)] {
            let x = random(&[rows, hidden], dtype, &device);
            let delta = random(&[rows, hidden], dtype, &device);
            let weight = random(&[hidden], dtype, &device);
            let (x_ref, normed_ref) = Ops::Candle
                .add_rms_norm(&x, Some(&delta), &weight, 1e-5, multiplier)
                .unwrap();
            let mine = x.copy().unwrap();
            let (x_new, normed) = fused
                .add_rms_norm(&mine, Some(&delta), &weight, 1e-5, multiplier)
                .unwrap();
            let what = format!("{dtype:?} {rows}x{hidden} × {multiplier}");
            assert!(relative(&x_new, &x_ref) <= tolerance(dtype), "{what}: sum");
            assert!(
                relative(&mine, &x_ref) <= tolerance(dtype),
                "{what}: in place"
            );
            assert!(
                relative(&normed, &normed_ref) <= tolerance(dtype),
                "{what}: norm"
            );
            let (_, plain) = fused.add_rms_norm(&x, None, &weight, 1e-5, 1.0).unwrap();
            let (_, plain_ref) = Ops::Candle
                .add_rms_norm(&x, None, &weight, 1e-5, 1.0)
                .unwrap();
            assert!(
                relative(&plain, &plain_ref) <= tolerance(dtype),
                "{what}: no delta"
            );
        }
    }
}

#[test]
fn silu_mul_is_silu_of_the_gate_times_up() {
    let device = device();
    for dtype in DTYPES {
        let fused = kernels(&device, dtype, 64);
        for (rows, ffn) in [(1, 5632), (7, 150)] {
            let gate_up = random(&[rows, 2 * ffn], dtype, &device);
            let mine = fused.silu_mul(&gate_up, ffn).unwrap();
            let reference = Ops::Candle.silu_mul(&gate_up, ffn).unwrap();
            let error = relative(&mine, &reference);
            assert!(error <= tolerance(dtype), "{dtype:?} {rows}x{ffn}: {error}");
        }
    }
}

/// The fused projection of one or two rows is candle's matmul (with and without a bias, for
/// output widths that leave partial blocks, and input widths shorter than a block's stride,
/// between one and two strides, over two, and as wide as a feed-forward layer's); a third row,
/// or rows whose width breaks 16-byte loads, fall back to the matmul.
#[test]
fn the_projection_of_one_or_two_rows_is_candles_matmul() {
    let device = device();
    for dtype in DTYPES {
        let fused = kernels(&device, dtype, 64);
        let Ops::Cuda(kernels) = &fused else {
            unreachable!("the fused kernels are in use")
        };
        for (rows, k, n) in [
            (1, 2048, 2560),
            (2, 64, 7),
            (1, 8, 13),
            (2, 1544, 33),
            (1, 4104, 6),
            (2, 5632, 2049),
            (1, 256, 1),
        ] {
            let x = random(&[rows, k], dtype, &device);
            let w = random(&[n, k], dtype, &device);
            let bias = random(&[n], dtype, &device);
            for bias in [None, Some(bias)] {
                let linear = candle_nn::Linear::new(w.clone(), bias.clone());
                let mine = kernels.gemv(&x, &w, bias.as_ref()).unwrap().unwrap();
                let reference = Ops::Candle.linear(&x, &linear).unwrap();
                assert_eq!(mine.dims2().unwrap(), (rows, n));
                let error = relative(&mine, &reference);
                assert!(
                    error <= tolerance(dtype),
                    "{dtype:?} {rows}x{k}x{n}: {error}"
                );
                let error = relative(&fused.linear(&x, &linear).unwrap(), &reference);
                assert!(error <= tolerance(dtype), "{dtype:?} linear: {error}");
            }
            let head = fused.project(&x, &w).unwrap();
            let error = relative(&head, &x.matmul(&w.t().unwrap()).unwrap());
            assert!(
                error <= tolerance(dtype),
                "{dtype:?} head {rows}x{k}x{n}: {error}"
            );
        }
    }
    let Ops::Cuda(kernels) = kernels(&device, DType::BF16, 64) else {
        unreachable!("the fused kernels are in use")
    };
    let w = random(&[16, 64], DType::BF16, &device);
    let three = random(&[3, 64], DType::BF16, &device);
    assert!(kernels.gemv(&three, &w, None).unwrap().is_none());
    let odd = random(&[2, 60], DType::BF16, &device);
    let w_odd = random(&[16, 60], DType::BF16, &device);
    assert!(kernels.gemv(&odd, &w_odd, None).unwrap().is_none());
}

#[test]
fn rope_kv_write_rotates_and_stores_what_candle_does() {
    let device = device();
    for dtype in DTYPES {
        for (heads, kv_heads, dim, norms) in
            [(4, 2, 64, false), (6, 3, 96, true), (2, 2, 256, false)]
        {
            let fused = kernels(&device, dtype, dim);
            let tokens = 5;
            let slots_total = 40;
            let qkv = random(&[tokens, (heads + 2 * kv_heads) * dim], dtype, &device);
            let positions = Tensor::new(&[0u32, 3, 17, 4, 30], &device).unwrap();
            let slots = Tensor::new(&[9u32, 0, 39, 12, 21], &device).unwrap();
            let (cos, sin) = tables(64, dim / 2, dtype, &device);
            let (q_norm, k_norm) = match norms {
                true => (
                    Some(random(&[dim], dtype, &device)),
                    Some(random(&[dim], dtype, &device)),
                ),
                false => (None, None),
            };
            let caches = || {
                (
                    Tensor::zeros((kv_heads, slots_total, dim), dtype, &device).unwrap(),
                    Tensor::zeros((kv_heads, slots_total, dim), dtype, &device).unwrap(),
                )
            };
            let run = |ops: &Ops| {
                let (k, v) = caches();
                let q = ops
                    .rope_kv_write(
                        &qkv,
                        (heads, kv_heads, dim),
                        (&positions, &slots),
                        (&cos, &sin),
                        (q_norm.as_ref(), k_norm.as_ref()),
                        (&k, &v),
                        1e-6,
                    )
                    .unwrap();
                (q, k, v)
            };
            let (q, k, v) = run(&fused);
            let (q_ref, k_ref, v_ref) = run(&Ops::Candle);
            let what = format!("{dtype:?} {heads}/{kv_heads} heads of {dim}, norms {norms}");
            assert!(relative(&q, &q_ref) <= tolerance(dtype), "{what}: q");
            assert!(relative(&k, &k_ref) <= tolerance(dtype), "{what}: k cache");
            assert!(relative(&v, &v_ref) == 0.0, "{what}: v cache");
        }
    }
}

#[test]
fn paged_attention_is_softmax_attention_over_the_block_table() {
    let device = device();
    for dtype in DTYPES {
        for (heads, kv_heads, dim, window) in
            [(4, 2, 64, None), (8, 8, 128, Some(5)), (3, 1, 32, None)]
        {
            let fused = kernels(&device, dtype, dim);
            let (block_size, blocks) = (4, 12);
            let k = random(&[kv_heads, block_size * blocks, dim], dtype, &device);
            let v = random(&[kv_heads, block_size * blocks, dim], dtype, &device);
            // Three sequences: 1, 9 and 13 positions, blocks out of order.
            let lens = [1u32, 9, 13];
            let table: Vec<Vec<u32>> = vec![vec![7], vec![2, 11, 0], vec![5, 1, 9, 3]];
            let width = 4;
            let flat: Vec<u32> = table
                .iter()
                .flat_map(|t| t.iter().copied().chain(std::iter::repeat(0)).take(width))
                .collect();
            let tables = Tensor::from_vec(flat, (3, width), &device).unwrap();
            let lens_t = Tensor::new(&lens, &device).unwrap();
            // Queries in rows 4, 0 and 2 of a five-row step.
            let q = random(&[5, heads * dim], dtype, &device);
            let rows = Tensor::new(&[4u32, 0, 2], &device).unwrap();
            let scale = 1.0 / (dim as f32).sqrt();
            let out = fused
                .paged_attention(
                    &q,
                    Some(&rows),
                    (heads, kv_heads, dim),
                    (&k, &v),
                    (&tables, &lens_t),
                    block_size,
                    window,
                    scale,
                )
                .unwrap();
            for (s, (&len, &row)) in lens.iter().zip(&[4usize, 0, 2]).enumerate() {
                let len = len as usize;
                let first = window.map_or(0, |w| len.saturating_sub(w));
                let slots: Vec<u32> = (first..len)
                    .map(|p| table[s][p / block_size] * block_size as u32 + (p % block_size) as u32)
                    .collect();
                let slots = Tensor::new(slots.as_slice(), &device).unwrap();
                let group = heads / kv_heads;
                for h in 0..heads {
                    let f32s = |t: Tensor| t.to_dtype(DType::F32).unwrap();
                    let qh = f32s(q.i((row, h * dim..(h + 1) * dim)).unwrap())
                        .unsqueeze(0)
                        .unwrap();
                    let kh = f32s(k.i(h / group).unwrap().index_select(&slots, 0).unwrap());
                    let vh = f32s(v.i(h / group).unwrap().index_select(&slots, 0).unwrap());
                    let scores = (qh.matmul(&kh.t().unwrap()).unwrap() * scale as f64).unwrap();
                    let probs = candle_nn::ops::softmax_last_dim(&scores).unwrap();
                    let reference = probs.matmul(&vh).unwrap().squeeze(0).unwrap();
                    let mine = out.i((s, h * dim..(h + 1) * dim)).unwrap();
                    let error = relative(&mine, &reference);
                    assert!(
                        error <= tolerance(dtype),
                        "{dtype:?} {heads}/{kv_heads} heads of {dim}, window {window:?}, sequence {s} head {h}: {error}"
                    );
                }
            }
        }
    }
}

/// Rotary tables of `positions` rows and `pairs` frequencies.
fn tables(positions: usize, pairs: usize, dtype: DType, device: &Device) -> (Tensor, Tensor) {
    let angles: Vec<f32> = (0..positions)
        .flat_map(|p| (0..pairs).map(move |i| p as f32 * 10000f32.powf(-(i as f32) / pairs as f32)))
        .collect();
    let angles = Tensor::from_vec(angles, (positions, pairs), device).unwrap();
    (
        angles.cos().unwrap().to_dtype(dtype).unwrap(),
        angles.sin().unwrap().to_dtype(dtype).unwrap(),
    )
}

/// The device's greedy choice is the host's: the first of equal maxima, never a NaN, the
/// first of a row of -inf, 0 for a row of NaNs; rows narrower and wider than a block.
#[test]
fn greedy_on_the_device_is_the_hosts_argmax() {
    let device = device();
    let ops = kernels(&device, DType::F32, 64);
    for vocab in [1usize, 7, 256, 257, 32000] {
        let mut rows: Vec<Vec<f32>> = (0..4)
            .map(|r| {
                (0..vocab)
                    .map(|i| ((i * 7919 + r * 104729) % 1009) as f32 / 97.0)
                    .collect()
            })
            .collect();
        // Ties at the maximum, early and late.
        rows[1].iter_mut().for_each(|v| *v = v.min(3.0));
        // NaNs, one where the maximum would be.
        let top = llorch::models::argmax(&rows[2]) as usize;
        rows[2][top] = f32::NAN;
        rows[2][vocab / 2] = f32::NAN;
        rows.push(vec![f32::NEG_INFINITY; vocab]);
        rows.push(vec![f32::NAN; vocab]);
        let flat: Vec<f32> = rows.concat();
        let logits = Tensor::from_vec(flat, (rows.len(), vocab), &device).unwrap();
        let greedy = vec![&Choice::Greedy; rows.len()];
        let chosen = ops
            .choose(&logits, &greedy)
            .unwrap()
            .expect("chosen on the device");
        let host: Vec<(u32, bool)> = rows
            .iter()
            .map(|r| (llorch::models::argmax(r), false))
            .collect();
        assert_eq!(chosen, host, "vocab {vocab}");
    }
    let zeros = Tensor::zeros((1, 4), DType::F32, &device).unwrap();
    assert_eq!(
        Ops::Candle.choose(&zeros, &[&Choice::Greedy]).unwrap(),
        None
    );
}

/// Draws on the device are the host sampler's: for every setting (temperature, min-p, logit
/// bias, repetition, presence and frequency penalties, greedy with penalties, top-k of 1 to
/// the widest the device takes, alone and with top-p and min-p, top-p alone and with min-p)
/// and its seed, 24 steps of
/// random logits (some with a NaN, some rows all -inf, every third step rounded to halves, so
/// with ties and both zeros) give the tokens `Sampler::sample` gives, the RNG and the
/// penalties staying in step; a row that asks for its logits is left as it was. Vocabularies
/// of one token, fewer than top-k, part of a block, one block, and several with a tail.
#[test]
fn draws_on_the_device_are_the_host_samplers_tokens() {
    let device = device();
    let ops = kernels(&device, DType::F32, 64);
    let settings = [
        SamplingParams::default(),
        SamplingParams {
            temperature: 0.7,
            min_p: 0.05,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.3,
            repetition_penalty: 1.2,
            presence_penalty: 0.5,
            frequency_penalty: 0.3,
            logit_bias: vec![(5, 3.0), (2, -1.0), (5, 0.25)],
            ..SamplingParams::default()
        },
        SamplingParams {
            repetition_penalty: 1.5,
            logit_bias: vec![(1, 0.5)],
            ..SamplingParams::greedy()
        },
        SamplingParams {
            temperature: 2.0,
            min_p: 0.5,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_k: 5,
            top_p: 0.6,
            min_p: 0.1,
            repetition_penalty: 1.3,
            presence_penalty: 0.4,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.5,
            top_k: MAX_DEVICE_TOP_K,
            top_p: 0.9,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_k: 1,
            ..SamplingParams::default()
        },
        SamplingParams {
            top_p: 0.9,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 1.3,
            top_p: 0.5,
            min_p: 0.05,
            frequency_penalty: 0.2,
            ..SamplingParams::default()
        },
        SamplingParams {
            temperature: 0.6,
            top_p: 0.3,
            min_p: 0.5,
            ..SamplingParams::default()
        },
    ];
    let mut rng = StdRng::seed_from_u64(3);
    let mut not_the_argmax = 0;
    for vocab in [1usize, 9, 1024, 3001, 32000] {
        let seeded = |i: usize, p: &SamplingParams| {
            Sampler::new(SamplingParams {
                seed: Some((i * 7 + vocab) as u64),
                ..p.clone()
            })
        };
        let mut host: Vec<Sampler> = settings
            .iter()
            .enumerate()
            .map(|(i, p)| seeded(i, p))
            .collect();
        let mut mirror: Vec<Sampler> = settings
            .iter()
            .enumerate()
            .map(|(i, p)| seeded(i, p))
            .collect();
        let mut previous: Vec<Vec<u32>> = vec![vec![0, 3, 3]; settings.len()];
        for step in 0..24 {
            let mut rows: Vec<Vec<f32>> = (0..=settings.len())
                .map(|_| {
                    (0..vocab)
                        .map(|_| rng.random::<f32>() * 8.0 - 4.0)
                        .collect()
                })
                .collect();
            if step % 6 == 5 {
                rows[0].fill(f32::NEG_INFINITY);
            }
            if step % 4 == 1 {
                rows[2][vocab / 3] = f32::NAN;
                rows[6][vocab / 2] = f32::NAN;
            }
            if step % 3 == 2 {
                // Ties, and both zeros (-0.0 ranks below +0.0 in top-k, as on the host).
                for row in &mut rows {
                    row.iter_mut().for_each(|x| *x = (*x * 2.0).round() / 2.0);
                }
            }
            let mut choices: Vec<Choice> = mirror
                .iter()
                .zip(&previous)
                .map(|(s, p)| Choice::Draw(s.device_draw(p).expect("drawn on the device")))
                .collect();
            choices.push(Choice::Logits);
            let chosen: Vec<&Choice> = choices.iter().collect();
            let logits = Tensor::from_vec(rows.concat(), (rows.len(), vocab), &device).unwrap();
            let picked = ops
                .choose(&logits, &chosen)
                .unwrap()
                .expect("chosen on the device");
            for (r, sampler) in host.iter_mut().enumerate() {
                let expected = sampler.sample(&mut rows[r].clone(), &previous[r]);
                assert_eq!(
                    picked[r].0, expected,
                    "vocab {vocab}, step {step}, setting {r}"
                );
                not_the_argmax += usize::from(expected != llorch::models::argmax(&rows[r]));
                mirror[r].take_drawn(picked[r].0, picked[r].1);
                previous[r].push(expected);
            }
            let untouched = logits.i(settings.len()).unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(untouched, rows[settings.len()]);
        }
    }
    assert!(
        not_the_argmax > 100,
        "{not_the_argmax} draws were not the argmax"
    );
}
