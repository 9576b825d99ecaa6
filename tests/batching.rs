//! Continuous batching on the CPU: sequences run together (different prompt lengths, joining
//! and leaving at different steps, chunked prompts, prefix-cache hits, preemption) give the
//! same greedy tokens as each prompt alone and as the transformers goldens, and the batched
//! forward pass gives the same logits, bit for bit, whatever else is in the batch.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::{fixtures, golden, load_cpu};
use llorch::actors::engine::{
    spawn_engine, EngineConfig, EngineExit, EngineHandle, GenerationRequest, Job, TokenEvent,
};
use llorch::metrics::Metrics;
use llorch::models::batch::{KvDtype, KvLayout, SeqChunk};
use llorch::models::{
    DTypeChoice, FinishReason, GenerationParams, LoadSpec, ModelSource, Prompt, SamplingParams,
};
use tokio::sync::mpsc::Receiver;

/// The batched fixtures (source relative to the fixtures folder) and their goldens.
const BATCHED: &[(&str, &str)] = &[
    ("models/llama", "models/llama/golden.json"),
    ("models/mistral", "models/mistral/golden.json"),
    ("models/qwen2", "models/qwen2/golden.json"),
    ("models/qwen3", "models/qwen3/golden.json"),
    ("models/granite", "models/granite/golden.json"),
    ("models/stories260k", "models/stories260k/golden.json"),
    ("gguf/tiny-llama-f32.gguf", "models/llama/golden.json"),
    (
        "gguf/tiny-llama-q8_0.gguf",
        "gguf/tiny-llama-q8_0.golden.json",
    ),
    ("gguf/tiny-qwen2-f32.gguf", "models/qwen2/golden.json"),
    (
        "gguf/tiny-qwen2-q8_0.gguf",
        "gguf/tiny-qwen2-q8_0.golden.json",
    ),
    (
        "gguf/stories260k-f32.gguf",
        "models/stories260k/golden.json",
    ),
];

struct Fixture {
    source: PathBuf,
    cases: Vec<(Vec<u32>, Vec<u32>)>,
}

fn batched_fixtures() -> Option<Vec<Fixture>> {
    let dir = fixtures()?;
    Some(
        BATCHED
            .iter()
            .map(|(source, gold)| Fixture {
                source: dir.join(source),
                cases: golden(&dir, gold)
                    .cases
                    .into_iter()
                    .map(|case| (case.prompt_ids, case.generated_ids))
                    .collect(),
            })
            .collect(),
    )
}

fn engine(source: &Path, config: EngineConfig) -> EngineHandle {
    let spec = LoadSpec {
        source: source.to_str().unwrap().parse::<ModelSource>().unwrap(),
        device: Device::Cpu,
        dtype: DTypeChoice::Auto,
        max_seq_len: None,
    };
    let (handle, ready) = spawn_engine("batching", spec, config, |_| {}).unwrap();
    let info = ready.blocking_recv().unwrap().unwrap();
    assert!(info.batched, "{} runs batched", source.display());
    handle
}

fn submit(engine: &EngineHandle, prompt: &[u32], n: usize, salt: u64) -> Receiver<TokenEvent> {
    let (job, events, _) = Job::new(GenerationRequest {
        prompt: Prompt::Ids(prompt.to_vec()),
        params: GenerationParams {
            sampling: SamplingParams::greedy(),
            max_tokens: Some(n),
            ignore_eos: true,
            ..GenerationParams::default()
        },
        cache_salt: salt,
    });
    engine.submit(job).unwrap();
    events
}

/// The generated ids and the prompt tokens reused from the prefix cache.
fn finish(events: &mut Receiver<TokenEvent>) -> (Vec<u32>, usize) {
    let mut ids = Vec::new();
    while let Some(event) = events.blocking_recv() {
        match event {
            TokenEvent::Token { id, .. } => ids.push(id),
            TokenEvent::Finished {
                reason,
                cached_tokens,
                ..
            } => {
                assert_eq!(reason, FinishReason::MaxTokens);
                return (ids, cached_tokens);
            }
            TokenEvent::Failed(err) => panic!("failed: {err}"),
            TokenEvent::Started { .. } | TokenEvent::Prompt { .. } => {}
        }
    }
    panic!("the stream ended without a terminal event")
}

/// Waits for `k` tokens of a stream and returns them.
fn first_tokens(events: &mut Receiver<TokenEvent>, k: usize) -> Vec<u32> {
    let mut ids = Vec::new();
    while ids.len() < k {
        match events.blocking_recv() {
            Some(TokenEvent::Token { id, .. }) => ids.push(id),
            Some(TokenEvent::Started { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    ids
}

fn config(max_seqs: usize, max_batch_tokens: usize, kv_cache_bytes: Option<u64>) -> EngineConfig {
    EngineConfig {
        max_seqs: Some(max_seqs),
        max_batch_tokens: Some(max_batch_tokens),
        kv_cache_bytes,
        prefix_caching: true,
        ..EngineConfig::default()
    }
}

/// Submits every case of `fixture` at once to an engine of `config` and checks each stream's
/// tokens against the golden ones.
fn all_cases_together(fixture: &Fixture, config: EngineConfig, what: &str) {
    let engine = engine(&fixture.source, config);
    let mut streams: Vec<_> = fixture
        .cases
        .iter()
        .map(|(prompt, gold)| submit(&engine, prompt, gold.len(), 0))
        .collect();
    for ((_, gold), events) in fixture.cases.iter().zip(&mut streams) {
        let (ids, _) = finish(events);
        assert_eq!(&ids, gold, "{} {what}", fixture.source.display());
    }
}

/// A half-precision cache rounds every key and value once: the trained model (stories260k,
/// from safetensors and from GGUF) still generates its golden tokens with it, run together.
#[test]
fn a_half_precision_cache_keeps_the_trained_models_golden_tokens() {
    let Some(fixtures) = batched_fixtures() else {
        return;
    };
    let trained = fixtures
        .iter()
        .filter(|f| f.source.to_string_lossy().contains("stories260k"));
    let mut checked = 0;
    for fixture in trained {
        let f16 = EngineConfig {
            kv_dtype: KvDtype::F16,
            ..config(4, 7, None)
        };
        all_cases_together(fixture, f16, "f16 cache");
        checked += 1;
    }
    assert_eq!(checked, 2, "the safetensors and the GGUF stories260k");
}

/// Every case of every batched fixture submitted at once, with budgets from one token per
/// sequence (prompts read in chunks beside the others' decodes) to whole prompts.
#[test]
fn sequences_run_together_give_the_golden_tokens() {
    let Some(fixtures) = batched_fixtures() else {
        return;
    };
    for fixture in &fixtures {
        for budget in [4, 7, 64] {
            all_cases_together(
                fixture,
                config(4, budget, None),
                &format!("budget {budget}"),
            );
        }
    }
}

/// Sequences joining while others decode, each after the previous has streamed a few tokens,
/// and a sequence cancelled partway, leave everyone's tokens as they are alone.
#[test]
fn sequences_joining_and_leaving_at_different_steps_keep_their_tokens() {
    let Some(fixtures) = batched_fixtures() else {
        return;
    };
    for fixture in &fixtures {
        let engine = engine(&fixture.source, config(8, 16, None));
        let (doomed, mut doomed_events, cancel) = Job::new(GenerationRequest {
            prompt: Prompt::Ids(fixture.cases[0].0.clone()),
            params: GenerationParams {
                sampling: SamplingParams::greedy(),
                max_tokens: Some(1000),
                ignore_eos: true,
                ..GenerationParams::default()
            },
            cache_salt: 7,
        });
        engine.submit(doomed).unwrap();
        first_tokens(&mut doomed_events, 2);
        let mut streams = Vec::new();
        for (i, (prompt, gold)) in fixture.cases.iter().enumerate() {
            let mut events = submit(&engine, prompt, gold.len(), 0);
            let head = first_tokens(&mut events, 3 + i);
            if i == 1 {
                cancel.store(true, std::sync::atomic::Ordering::Relaxed);
            }
            streams.push((head, events));
        }
        for ((_, gold), (head, mut events)) in fixture.cases.iter().zip(streams) {
            let (rest, _) = finish(&mut events);
            let ids: Vec<u32> = head.into_iter().chain(rest).collect();
            assert_eq!(&ids, gold, "{}", fixture.source.display());
        }
    }
}

/// A KV pool too small for every sequence at once: the newest are preempted, recomputed
/// later, and still give the golden tokens; the pool's counters say it happened.
#[test]
fn preempted_sequences_recompute_to_the_same_tokens() {
    let Some(fixtures) = batched_fixtures() else {
        return;
    };
    for fixture in &fixtures {
        let per_token = load_cpu(fixture.source.to_str().unwrap())
            .model
            .batched()
            .unwrap()
            .kv_bytes_per_token(KvDtype::Auto)
            .unwrap() as u64;
        let longest = fixture
            .cases
            .iter()
            .map(|(prompt, gold)| prompt.len() + gold.len())
            .max()
            .unwrap();
        // Room for the longest sequence and a little more: never all of them at once.
        let blocks = longest.div_ceil(16) + 2;
        let metrics = Metrics::new();
        let step_metrics = metrics.step_metrics("tiny");
        let engine = engine(
            &fixture.source,
            EngineConfig {
                metrics: Some(step_metrics.clone()),
                ..config(8, 64, Some(blocks as u64 * 16 * per_token))
            },
        );
        // Every case twice under different salts, so that no prefix is shared.
        let mut streams: Vec<_> = (0..2)
            .flat_map(|salt| {
                fixture
                    .cases
                    .iter()
                    .map(move |(prompt, gold)| (prompt, gold, salt))
            })
            .map(|(prompt, gold, salt)| (gold, submit(&engine, prompt, gold.len(), salt)))
            .collect();
        for (gold, events) in &mut streams {
            let (ids, _) = finish(events);
            assert_eq!(&ids, *gold, "{}", fixture.source.display());
        }
        assert!(
            step_metrics.preemptions.get() > 0,
            "{}: no preemption",
            fixture.source.display()
        );
        assert!(step_metrics.recomputed_tokens.get() > 0);
    }
}

/// The same prompt again reuses the full blocks of the first, reports them as cached, and
/// gives the same tokens; a request under another salt reuses nothing.
#[test]
fn a_repeated_prompt_hits_the_prefix_cache_and_keeps_its_tokens() {
    let Some(fixtures) = batched_fixtures() else {
        return;
    };
    for fixture in &fixtures {
        let engine = engine(&fixture.source, config(4, 64, None));
        let (prompt, gold) = &fixture.cases[0];
        let (first, cached) = finish(&mut submit(&engine, prompt, gold.len(), 0));
        assert_eq!((&first, cached), (gold, 0));
        // The first turn's prompt and answer, then a few more tokens: a chat's next turn.
        let mut turn: Vec<u32> = prompt.iter().chain(gold).copied().collect();
        turn.extend(&prompt[1..4]);
        let (alone, _) = finish(&mut submit(&engine, &turn, 8, 1));
        let (again, cached) = finish(&mut submit(&engine, &turn, 8, 0));
        assert_eq!(again, alone, "{}", fixture.source.display());
        assert_eq!(cached, (prompt.len() + gold.len() - 1) / 16 * 16);
        assert!(cached > 0);
        let (repeat, cached) = finish(&mut submit(&engine, prompt, gold.len(), 0));
        assert_eq!(&repeat, gold);
        assert_eq!(cached, (prompt.len() - 1) / 16 * 16);
    }
}

/// The batched forward pass itself: three sequences stepped together in uneven chunks give
/// the logits of each stepped alone, bit for bit, in every fixture's weight types.
#[test]
fn batched_logits_equal_each_sequence_alone_bit_for_bit() {
    let Some(fixtures) = batched_fixtures() else {
        return;
    };
    for fixture in &fixtures {
        let full = logits_alone_and_together(fixture, KvDtype::F32);
        let half = logits_alone_and_together(fixture, KvDtype::F16);
        // The half cache is in use: its rounding moves the logits.
        assert_ne!(full, half, "{}", fixture.source.display());
    }
}

/// The check of [`batched_logits_equal_each_sequence_alone_bit_for_bit`] for one fixture and
/// cache type; returns the logits' bits of each sequence's steps alone.
fn logits_alone_and_together(fixture: &Fixture, dtype: KvDtype) -> Vec<Vec<Vec<u32>>> {
    {
        let mut loaded = load_cpu(fixture.source.to_str().unwrap());
        let model = loaded.model.batched().unwrap();
        let layout = KvLayout {
            block_size: 16,
            blocks: 160,
        };
        model.init_kv(layout, dtype).unwrap();
        let prompts: Vec<Vec<u32>> = fixture
            .cases
            .iter()
            .map(|(p, g)| [&p[..], &g[..10]].concat())
            .collect();
        let table = |s: usize| -> Vec<u32> { (0..16).map(|b| (s * 16 + b) as u32).collect() };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        // Alone: each sequence in steps of 5 tokens, the logits after every step.
        let mut alone = Vec::new();
        for (s, tokens) in prompts.iter().enumerate() {
            let table = table(s);
            let mut steps = Vec::new();
            for start in (0..tokens.len()).step_by(5) {
                let end = (start + 5).min(tokens.len());
                let chunk = SeqChunk {
                    tokens: &tokens[start..end],
                    context_len: start,
                    block_table: &table,
                    logits: true,
                    all_logits: false,
                };
                steps.push(bits(&model.forward_batch(&[chunk]).unwrap()[0]));
            }
            alone.push(steps);
        }
        // Together, with other blocks: the same chunks in one batch per step.
        let tables: Vec<Vec<u32>> = (0..prompts.len()).map(|s| table(s + 3)).collect();
        let longest = prompts.iter().map(Vec::len).max().unwrap();
        for (step, start) in (0..longest).step_by(5).enumerate() {
            let chunks: Vec<(usize, SeqChunk<'_>)> = prompts
                .iter()
                .enumerate()
                .filter(|(_, tokens)| start < tokens.len())
                .map(|(s, tokens)| {
                    let end = (start + 5).min(tokens.len());
                    let chunk = SeqChunk {
                        tokens: &tokens[start..end],
                        context_len: start,
                        block_table: &tables[s],
                        logits: true,
                        all_logits: false,
                    };
                    (s, chunk)
                })
                .collect();
            let batch: Vec<SeqChunk<'_>> = chunks.iter().map(|(_, c)| *c).collect();
            let logits = model.forward_batch(&batch).unwrap();
            for ((s, _), logits) in chunks.iter().zip(logits) {
                assert_eq!(
                    bits(&logits),
                    alone[*s][step],
                    "{} sequence {s} step {step}, {dtype:?} cache",
                    fixture.source.display()
                );
            }
        }
        alone
    }
}

/// The demo model (batched, no fixtures needed) on an engine named `name`.
fn demo_engine(
    name: &str,
    config: EngineConfig,
) -> (EngineHandle, std::sync::mpsc::Receiver<EngineExit>) {
    let spec = LoadSpec {
        source: ModelSource::BuiltinDemo,
        device: Device::Cpu,
        dtype: DTypeChoice::Auto,
        max_seq_len: None,
    };
    let (exit_tx, exit_rx) = std::sync::mpsc::channel();
    let (handle, ready) = spawn_engine(name, spec, config, move |exit| {
        let _ = exit_tx.send(exit);
    })
    .unwrap();
    assert!(ready.blocking_recv().unwrap().unwrap().batched);
    (handle, exit_rx)
}

fn wait_for(mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// A cancelled sequence and one whose client went away free their blocks at the next step;
/// the others go on.
#[test]
fn cancelled_sequences_free_their_blocks() {
    let (engine, _) = demo_engine("cancel-blocks", config(4, 64, None));
    let ids: Vec<u32> = (10..60).collect();
    let (job, mut events, cancel) = Job::new(GenerationRequest {
        prompt: Prompt::Ids(ids.clone()),
        params: GenerationParams {
            sampling: SamplingParams::greedy(),
            max_tokens: Some(1500),
            ignore_eos: true,
            ..GenerationParams::default()
        },
        cache_salt: 0,
    });
    engine.submit(job).unwrap();
    let mut dropped = submit(&engine, &ids[5..], 1500, 1);
    first_tokens(&mut events, 2);
    first_tokens(&mut dropped, 2);
    assert_eq!(engine.occupancy().running, 2);
    assert!(engine.occupancy().kv_blocks_used >= 7);
    cancel.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(dropped);
    wait_for(|| engine.occupancy().running == 0);
    assert_eq!(engine.occupancy().kv_blocks_used, 0);
    // The engine serves on.
    let (ids, _) = finish(&mut submit(&engine, &[1, 2, 3], 4, 0));
    assert_eq!(ids.len(), 4);
}

/// A client that reads nothing pauses its own sequence only: the others run to their end.
#[test]
fn a_paused_sequence_does_not_hold_the_batch_back() {
    let (engine, _) = demo_engine("paused", config(4, 64, None));
    let mut stuck = submit(&engine, &[1, 20, 21, 22], 1500, 0);
    first_tokens(&mut stuck, 1);
    // The stuck stream's channel fills (128 events) while these two run to their end.
    let mut others: Vec<_> = (0..2)
        .map(|i| submit(&engine, &[1, 30 + i, 31, 32], 400, 0))
        .collect();
    for events in &mut others {
        let (ids, _) = finish(events);
        assert_eq!(ids.len(), 400);
    }
    assert_eq!(engine.occupancy().paused, 1);
    let (ids, _) = finish(&mut stuck);
    assert_eq!(ids.len(), 1499);
}

/// A panic in a batched step fails every sequence that had started computing (they are
/// `crashed`) and hands back those that had not, for another replica.
#[test]
fn a_panic_in_a_step_ends_the_engine_with_every_sequence_accounted_for() {
    let name = "batched-panic";
    llorch::actors::faults::arm(name, llorch::actors::faults::Fault::PanicAtToken(20));
    let (engine, exits) = demo_engine(name, config(2, 64, None));
    let _running: Vec<_> = (0..2)
        .map(|i| submit(&engine, &[1, 40 + i, 41], 200, 0))
        .collect();
    let _queued = submit(&engine, &[1, 50, 51], 10, 0);
    match exits
        .recv_timeout(std::time::Duration::from_secs(30))
        .unwrap()
    {
        EngineExit::Panicked {
            crashed, unstarted, ..
        } => {
            assert_eq!((crashed.len(), unstarted.len()), (2, 1));
        }
        EngineExit::Stopped => panic!("the engine stopped without a panic"),
    }
}
