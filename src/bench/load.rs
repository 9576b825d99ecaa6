//! The bare engine under concurrent load: the aggregate decode speed of several streams on one
//! replica, the time to first token of a request that arrives while streams decode, and the
//! time to first token of a prompt whose long prefix an earlier request already computed.
//!
//! Every request has its own prompt (the prefix runs excepted), so that no run finds another's
//! blocks in the prefix cache.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use serde_json::{json, Value};
use tokio::sync::mpsc::Receiver;

use super::{median, Run};
use llorch::actors::engine::{EngineHandle, GenerationRequest, Job, TokenEvent};
use llorch::models::{GenerationParams, Prompt, SamplingParams};

/// Distinct prompts of one length over a vocabulary.
pub struct Prompts {
    /// The vocabulary size.
    pub vocab: u32,
    /// Tokens per prompt.
    pub len: usize,
}

impl Prompts {
    /// The `k`-th prompt: ids past the first few (often special tokens), cycling through the
    /// vocabulary from a start of its own.
    pub fn ids(&self, k: usize) -> Vec<u32> {
        self.of_len(k, self.len)
    }

    fn of_len(&self, k: usize, len: usize) -> Vec<u32> {
        let span = self.vocab.saturating_sub(3).max(1);
        (0..len as u32)
            .map(|i| 3 + (i.wrapping_mul(7) + k as u32 * 13) % span)
            .collect()
    }
}

/// A greedy job of `max_tokens` tokens on `ids`, EOS ignored.
fn job(ids: Vec<u32>, max_tokens: usize) -> (Job, Receiver<TokenEvent>, Instant) {
    let params = GenerationParams {
        sampling: SamplingParams {
            temperature: 0.0,
            ..SamplingParams::default()
        },
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..GenerationParams::default()
    };
    let (job, events, _) = Job::new(GenerationRequest {
        prompt: Prompt::Ids(ids),
        params,
        cache_salt: 0,
    });
    (job, events, Instant::now())
}

/// Reads a job's events to its end; the times of its tokens from `start`.
async fn collect(mut events: Receiver<TokenEvent>, start: Instant) -> anyhow::Result<Run> {
    let mut times = Vec::new();
    while let Some(event) = events.recv().await {
        match event {
            TokenEvent::Token { .. } => times.push(start.elapsed()),
            TokenEvent::Finished { .. } => break,
            TokenEvent::Failed(err) => return Err(anyhow!(err)),
            TokenEvent::Started { .. } | TokenEvent::Prompt { .. } => {}
        }
    }
    Run::from_times(&times)
}

/// Reads every stream on one thread, as the daemon's one HTTP worker does: a thread per
/// stream would take the compute threads' cores at every token.
fn collect_all(pending: Vec<(Receiver<TokenEvent>, Instant)>) -> anyhow::Result<Vec<Run>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(futures::future::try_join_all(
        pending
            .into_iter()
            .map(|(events, start)| collect(events, start)),
    ))
}

/// Runs `ids` alone for `max_tokens` tokens.
pub fn once(engine: &EngineHandle, ids: Vec<u32>, max_tokens: usize) -> anyhow::Result<Run> {
    let (job, events, start) = job(ids, max_tokens);
    engine
        .submit(job)
        .map_err(|_| anyhow!("the engine thread has stopped"))?;
    collect_all(vec![(events, start)])?
        .pop()
        .ok_or_else(|| anyhow!("no run"))
}

/// The engine's load runs.
pub struct LoadBench<'a> {
    /// The engine.
    pub engine: &'a EngineHandle,
    /// The prompts.
    pub prompts: &'a Prompts,
    /// Tokens each stream generates.
    pub decode_tokens: usize,
    /// Repetitions of the time-to-first-token runs.
    pub runs: usize,
}

impl LoadBench<'_> {
    /// Runs `streams` requests at once, each its own prompt from prompt `first`.
    fn streams(&self, streams: usize, first: usize, max_tokens: usize) -> anyhow::Result<Vec<Run>> {
        let mut pending = Vec::new();
        for k in first..first + streams {
            let (job, events, start) = job(self.prompts.ids(k), max_tokens);
            self.engine
                .submit(job)
                .map_err(|_| anyhow!("the engine thread has stopped"))?;
            pending.push((events, start));
        }
        collect_all(pending)
    }

    /// For each stream count: every stream's tokens over the time from the submissions to the
    /// last token, and the steady decode rate while all decoded at once.
    pub fn concurrent(&self, counts: &[usize], first: usize) -> anyhow::Result<Vec<Value>> {
        let mut out = Vec::new();
        for (i, &streams) in counts.iter().enumerate() {
            let runs = self.streams(streams, first + i * 64, self.decode_tokens)?;
            let tokens: usize = runs.iter().map(|r| r.times.len()).sum();
            let wall = runs.iter().map(Run::last_token).max().unwrap_or_default();
            out.push(json!({
                "streams": streams,
                "tokens_per_s": tokens as f64 / wall.as_secs_f64(),
                "steady_decode_tok_s": steady_decode(&runs),
            }));
        }
        Ok(out)
    }

    /// The time to first token of requests arriving one after another, idle and then while
    /// `background` streams decode (each probe its own prompt).
    pub fn ttft_under_load(&self, background: usize, first: usize) -> anyhow::Result<Value> {
        let probe = |k: usize| -> anyhow::Result<f64> {
            let run = once(self.engine, self.prompts.ids(k), 2)?;
            Ok(run.first_token.as_secs_f64() * 1000.0)
        };
        let idle: Vec<f64> = (0..self.runs)
            .map(|r| probe(first + r))
            .collect::<anyhow::Result<_>>()?;
        let mut cancels = Vec::new();
        let mut streams = Vec::new();
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        for k in 0..background {
            let ids = self.prompts.ids(first + self.runs + k);
            let (job, events, _) = job(ids, usize::MAX / 2);
            cancels.push(job.cancel.clone());
            self.engine
                .submit(job)
                .map_err(|_| anyhow!("the engine thread has stopped"))?;
            streams.push(events);
        }
        // One thread drains the background streams, as the daemon's HTTP worker would.
        let reader = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().build()?;
            runtime.block_on(futures::future::join_all(streams.into_iter().map(
                |mut events| {
                    let started = started_tx.clone();
                    async move {
                        let mut first = true;
                        while let Some(event) = events.recv().await {
                            if first && matches!(event, TokenEvent::Token { .. }) {
                                first = false;
                                let _ = started.send(());
                            }
                        }
                    }
                },
            )));
            anyhow::Ok(())
        });
        for _ in 0..background {
            started_rx.recv_timeout(Duration::from_secs(600))?;
        }
        let loaded: Vec<f64> = (0..self.runs)
            .map(|r| probe(first + self.runs + background + r))
            .collect::<anyhow::Result<_>>()?;
        for cancel in cancels {
            cancel.store(true, Ordering::Relaxed);
        }
        let _ = reader.join();
        let (idle_ms, loaded_ms) = (median(&idle), median(&loaded));
        Ok(json!({
            "background_streams": background,
            "prompt_tokens": self.prompts.len,
            "idle_ttft_ms": idle_ms,
            "loaded_ttft_ms": loaded_ms,
            "ratio": idle_ms.zip(loaded_ms).map(|(i, l)| l / i),
            "idle_ttft_ms_runs": idle,
            "loaded_ttft_ms_runs": loaded,
        }))
    }

    /// The time to first token of a `prefix`-token prompt with a short tail of its own, then
    /// of the same prefix with another tail (which finds the prefix in the cache).
    pub fn prefix(&self, prefix: usize, first: usize) -> anyhow::Result<Value> {
        let (mut cold, mut warm) = (Vec::new(), Vec::new());
        for r in 0..self.runs {
            let shared = self.prompts.of_len(first + 3 * r, prefix);
            for (k, times) in [(1, &mut cold), (2, &mut warm)] {
                let ids: Vec<u32> = shared
                    .iter()
                    .copied()
                    .chain(self.prompts.of_len(first + 3 * r + k, 16))
                    .collect();
                let run = once(self.engine, ids, 2)?;
                times.push(run.first_token.as_secs_f64() * 1000.0);
            }
        }
        let (cold_ms, warm_ms) = (median(&cold), median(&warm));
        Ok(json!({
            "prefix_tokens": prefix,
            "first_ttft_ms": cold_ms,
            "repeat_ttft_ms": warm_ms,
            "ratio": cold_ms.zip(warm_ms).map(|(c, w)| w / c),
            "first_ttft_ms_runs": cold,
            "repeat_ttft_ms_runs": warm,
        }))
    }
}

/// Tokens per second while every stream was decoding: from the last stream's first token to the
/// first stream's last token, counting each stream's tokens in that window. With one stream it is
/// that stream's decode rate; `None` when the streams never all decoded at once.
pub fn steady_decode(runs: &[Run]) -> Option<f64> {
    let from = runs.iter().map(|r| r.first_token).max()?;
    let to = runs.iter().map(|r| r.last_token()).min()?;
    if to <= from {
        return None;
    }
    let tokens: usize = runs
        .iter()
        .map(|r| r.times.iter().filter(|t| **t > from && **t <= to).count())
        .sum();
    Some(tokens as f64 / (to - from).as_secs_f64())
}
