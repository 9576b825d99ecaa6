//! The batched decoder of candle tensor ops (the GPU path; here on the device named by
//! `LLORCH_TEST_DEVICE`, the CPU by default, in f32): every golden case of every Llama-family
//! fixture run together, prompts read in chunks beside the others' decodes, gives the golden
//! tokens, and a sequence's logits in a batch match its logits alone.

mod common;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use common::{fixtures, golden};
use llorch::models::batch::{BatchedModel, Choice, KvDtype, KvLayout, Row, SeqChunk};
use llorch::models::candle_llama::CandleLlama;
use llorch::models::cpu::llama_hf::FamilyConfig;
use llorch::models::{argmax, DeviceSpec, Sampler, SamplingParams};

const FAMILY: &[(&str, Option<usize>)] = &[
    ("llama", None),
    ("mistral", None),
    ("qwen2", None),
    ("qwen3", None),
    ("granite", None),
    ("stories260k", None),
];

fn device() -> Device {
    let name = std::env::var("LLORCH_TEST_DEVICE").unwrap_or_else(|_| "cpu".to_string());
    name.parse::<DeviceSpec>().unwrap().open().unwrap()
}

fn model(dir: &std::path::Path, device: &Device) -> CandleLlama {
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let family: FamilyConfig = serde_json::from_value(config.clone()).unwrap();
    let vocab = config["vocab_size"].as_u64().unwrap() as usize;
    let positions = config["max_position_embeddings"].as_u64().unwrap() as usize;
    // SAFETY: the fixture files are not modified while mapped.
    #[allow(unsafe_code)]
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[dir.join("model.safetensors")], DType::F32, device)
    }
    .unwrap();
    let window = family.sliding_window;
    CandleLlama::new(&family, vb, vocab, window, positions).unwrap()
}

/// Five prompts of 3 to 11 tokens, and their block tables (eight blocks each, interleaved).
fn staggered_prompts() -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let prompts: Vec<Vec<u32>> = (0..5u32)
        .map(|i| (0..3 + 2 * i).map(|t| 1 + (t * 7 + i * 13) % 200).collect())
        .collect();
    let tables = (0..prompts.len())
        .map(|i| (0..8).map(|b| (b * prompts.len() + i) as u32).collect())
        .collect();
    (prompts, tables)
}

/// The step of the sequences in `subset`: each one's tokens from its `computed` count on.
fn subset_chunks<'a>(
    subset: &[usize],
    tokens: &'a [Vec<u32>],
    computed: &[usize],
    tables: &'a [Vec<u32>],
) -> Vec<SeqChunk<'a>> {
    subset
        .iter()
        .map(|&i| SeqChunk {
            tokens: &tokens[i][computed[i]..],
            context_len: computed[i],
            block_table: &tables[i],
            logits: true,
            all_logits: false,
        })
        .collect()
}

/// One sequence of the hand-run batch: its known tokens and how many are computed.
struct Seq {
    tokens: Vec<u32>,
    computed: usize,
    table: Vec<u32>,
    generated: usize,
}

#[test]
fn sequences_run_together_give_the_golden_tokens() {
    let Some(dir) = fixtures() else {
        return;
    };
    let device = device();
    for (name, _) in FAMILY {
        let path = dir.join("models").join(name);
        let mut model = model(&path, &device);
        model
            .init_kv(
                KvLayout {
                    block_size: 16,
                    blocks: 64,
                },
                KvDtype::Auto,
            )
            .unwrap();
        let cases = golden(&dir, &format!("models/{name}/golden.json")).cases;
        let mut seqs: Vec<Seq> = cases
            .iter()
            .enumerate()
            .map(|(i, case)| Seq {
                tokens: case.prompt_ids.clone(),
                computed: 0,
                // Interleaved blocks, so no sequence's blocks are contiguous.
                table: (0..8).map(|b| (b * cases.len() + i) as u32).collect(),
                generated: 0,
            })
            .collect();
        // Prompts in chunks of 5 beside the others' decodes, until each has 32 tokens.
        while seqs.iter().any(|s| s.generated < 32) {
            let running: Vec<usize> = (0..seqs.len())
                .filter(|&i| seqs[i].generated < 32)
                .collect();
            let chunks: Vec<SeqChunk<'_>> = running
                .iter()
                .map(|&i| {
                    let s = &seqs[i];
                    let end = (s.computed + 5).min(s.tokens.len());
                    SeqChunk {
                        tokens: &s.tokens[s.computed..end],
                        context_len: s.computed,
                        block_table: &s.table,
                        logits: end == s.tokens.len(),
                        all_logits: false,
                    }
                })
                .collect();
            let ends: Vec<(usize, bool)> = chunks.iter().map(|c| (c.end(), c.logits)).collect();
            let mut logits = model.forward_batch(&chunks).unwrap().into_iter();
            for (&i, (end, wants)) in running.iter().zip(ends) {
                seqs[i].computed = end;
                if wants {
                    let next = argmax(&logits.next().unwrap());
                    seqs[i].tokens.push(next);
                    seqs[i].generated += 1;
                }
            }
        }
        for (seq, case) in seqs.iter().zip(&cases) {
            let generated = &seq.tokens[case.prompt_ids.len()..];
            assert_eq!(generated, case.generated_ids, "{name} {}", case.name);
        }
    }
}

#[test]
fn a_sequence_in_a_batch_has_the_logits_it_has_alone() {
    let Some(dir) = fixtures() else {
        return;
    };
    let device = device();
    for (name, _) in FAMILY {
        let path = dir.join("models").join(name);
        let mut model = model(&path, &device);
        let cases = golden(&dir, &format!("models/{name}/golden.json")).cases;
        let prompts: Vec<Vec<u32>> = cases.iter().map(|c| c.prompt_ids.clone()).collect();
        let alone: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| {
                let logits = model.forward(p, 0).unwrap();
                model.clear_kv_cache();
                logits
            })
            .collect();
        model
            .init_kv(
                KvLayout {
                    block_size: 16,
                    blocks: 32,
                },
                KvDtype::Auto,
            )
            .unwrap();
        let tables: Vec<Vec<u32>> = (0..prompts.len())
            .map(|i| (0..4).map(|b| (4 * i + b) as u32).collect())
            .collect();
        let chunks: Vec<SeqChunk<'_>> = prompts
            .iter()
            .zip(&tables)
            .map(|(p, t)| SeqChunk {
                tokens: p,
                context_len: 0,
                block_table: t,
                logits: true,
                all_logits: false,
            })
            .collect();
        let together = model.forward_batch(&chunks).unwrap();
        for ((a, b), case) in alone.iter().zip(&together).zip(&cases) {
            let worst = a
                .iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-3, "{name} {}: |diff| {worst}", case.name);
            assert_eq!(argmax(a), argmax(b));
        }
    }
}

/// The candle path's cache stores the model's compute dtype: naming another is an error that
/// says so, and naming that one (or `auto`) works.
#[test]
fn the_candle_cache_takes_only_the_models_dtype() {
    let Some(dir) = fixtures() else {
        return;
    };
    let device = device();
    let path = dir.join("models").join(FAMILY[0].0);
    let mut model = model(&path, &device);
    let layout = KvLayout {
        block_size: 16,
        blocks: 4,
    };
    let reason = model.kv_bytes_per_token(KvDtype::F16).unwrap_err();
    assert!(reason.contains("kv_cache_dtype \"f16\""), "{reason}");
    let err = model.init_kv(layout, KvDtype::F16).unwrap_err().to_string();
    assert!(err.contains("kv_cache_dtype \"f16\""), "{err}");
    model.init_kv(layout, KvDtype::F32).unwrap();
    assert_eq!(model.kv_layout(), Some(layout));
}

/// A chunk that asks for every row's logits (an echo's prompt log probabilities) gets, for
/// each of its positions, the logits a prompt ending there gets alone.
#[test]
fn every_row_of_a_chunk_has_the_logits_of_its_prefix() {
    let Some(dir) = fixtures() else {
        return;
    };
    let device = device();
    for (name, _) in FAMILY {
        let path = dir.join("models").join(name);
        let mut model = model(&path, &device);
        let prompt = golden(&dir, &format!("models/{name}/golden.json")).cases[0]
            .prompt_ids
            .clone();
        let prefixes = [1, prompt.len() / 2, prompt.len()];
        let alone: Vec<Vec<f32>> = prefixes
            .iter()
            .map(|&n| {
                let logits = model.forward(&prompt[..n], 0).unwrap();
                model.clear_kv_cache();
                logits
            })
            .collect();
        let layout = KvLayout {
            block_size: 16,
            blocks: 8,
        };
        model.init_kv(layout, KvDtype::Auto).unwrap();
        let table: Vec<u32> = (0..4).collect();
        let chunk = SeqChunk {
            tokens: &prompt,
            context_len: 0,
            block_table: &table,
            logits: true,
            all_logits: true,
        };
        let rows = model.forward_batch(&[chunk]).unwrap();
        assert_eq!(rows.len(), prompt.len(), "{name}: one row per token");
        for (&n, expected) in prefixes.iter().zip(&alone) {
            let worst = rows[n - 1]
                .iter()
                .zip(expected)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f32::max);
            assert!(worst < 1e-3, "{name} row {}: |diff| {worst}", n - 1);
        }
    }
}

/// A step asked for chosen tokens gives, for the chunks that want the greedy token, the argmax
/// of the logits the same step gives, for those that want a draw the token their sampler
/// draws from those logits (both chosen on the device by the fused CUDA kernels; elsewhere
/// the greedy token on the host and the draw's logits), and the logits of the others.
#[test]
fn chosen_rows_are_the_tokens_of_the_same_steps_logits() {
    let Some(dir) = fixtures() else {
        return;
    };
    let device = device();
    let mut model = model(&dir.join("models").join("llama"), &device);
    model
        .init_kv(
            KvLayout {
                block_size: 16,
                blocks: 48,
            },
            KvDtype::Auto,
        )
        .unwrap();
    let (prompts, tables) = staggered_prompts();
    let mut tokens = prompts.clone();
    let mut computed = vec![0; prompts.len()];
    // The prompts, then decodes of changing subsets.
    let subsets: [&[usize]; 5] = [
        &[0, 1, 2, 3, 4],
        &[0, 1, 2, 3, 4],
        &[2],
        &[0, 3, 4],
        &[4, 2],
    ];
    for subset in subsets {
        let chunks = subset_chunks(subset, &tokens, &computed, &tables);
        let logits = model.forward_batch(&chunks).unwrap();
        // The same step again (it rewrites the same keys and values), the sequences' tokens
        // chosen greedily, drawn, or left to the host in turn.
        let params = SamplingParams {
            temperature: 1.5,
            repetition_penalty: 1.1,
            seed: Some(chunks.len() as u64),
            ..SamplingParams::default()
        };
        let choices: Vec<Choice> = (0..chunks.len())
            .map(|k| match k % 3 {
                0 => Choice::Greedy,
                1 => Choice::Draw(Sampler::new(params.clone()).device_draw(&[1, 2]).unwrap()),
                _ => Choice::Logits,
            })
            .collect();
        let rows = model.forward_choosing(&chunks, &choices).unwrap();
        assert_eq!(rows.len(), chunks.len());
        for ((row, logits), choice) in rows.iter().zip(&logits).zip(&choices) {
            let expected = match choice {
                Choice::Greedy => Row::Greedy(argmax(logits)),
                Choice::Draw(_) if model.draws() => Row::Drawn {
                    token: Sampler::new(params.clone()).sample(&mut logits.clone(), &[1, 2]),
                    used_fraction: true,
                },
                _ => Row::Logits(logits.clone()),
            };
            assert_eq!(row, &expected);
        }
        for (&i, logits) in subset.iter().zip(&logits) {
            computed[i] = tokens[i].len();
            tokens[i].push(argmax(logits));
        }
    }
}

/// Decode steps replayed from CUDA graphs give the logits of the same steps run eagerly, while
/// the batch size changes from step to step (each size padded to its graph's) and after the
/// cache is made anew (a graph captured against the old cache must not be replayed).
#[cfg(feature = "cuda")]
#[test]
fn decode_graphs_give_the_eager_logits_across_batch_sizes_and_caches() {
    let Some(dir) = fixtures() else {
        return;
    };
    let device = device();
    assert!(device.is_cuda(), "CUDA graphs need a CUDA test device");
    let path = dir.join("models").join("llama");
    let mut graphed = model(&path, &device);
    let mut eager = model(&path, &device);
    eager.set_graphs(false);
    let (prompts, tables) = staggered_prompts();
    for blocks in [48, 40] {
        let layout = KvLayout {
            block_size: 16,
            blocks,
        };
        graphed.init_kv(layout, KvDtype::Auto).unwrap();
        eager.init_kv(layout, KvDtype::Auto).unwrap();
        let mut tokens = prompts.clone();
        let mut computed = vec![0; prompts.len()];
        // The prompts (an eager step), then decodes of changing subsets.
        let subsets: [&[usize]; 7] = [
            &[0, 1, 2, 3, 4],
            &[0, 1, 2, 3, 4],
            &[2],
            &[0, 3, 4],
            &[1],
            &[0, 1, 2, 3, 4],
            &[4, 2],
        ];
        for subset in subsets {
            let chunks = subset_chunks(subset, &tokens, &computed, &tables);
            let mine = graphed.forward_batch(&chunks).unwrap();
            let theirs = eager.forward_batch(&chunks).unwrap();
            for (&i, (a, b)) in subset.iter().zip(mine.iter().zip(&theirs)) {
                let worst = a
                    .iter()
                    .zip(b)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0.0, f32::max);
                assert!(
                    worst < 1e-3,
                    "{blocks} blocks, sequence {i}: |diff| {worst}"
                );
                computed[i] = tokens[i].len();
                tokens[i].push(argmax(b));
            }
        }
    }
    assert_eq!(eager.graph_replays(), 0);
    assert_eq!(graphed.graph_replays(), 12, "six decode steps per cache");
}
