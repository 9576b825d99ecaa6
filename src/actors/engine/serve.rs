//! The engine loop: take commands, drop what clients abandoned, let the scheduler plan a step,
//! run it as one forward pass, then sample each sequence's next token and send its events.
//!
//! A batched model (llorch's own Llama-family decoder) runs every planned sequence in one
//! pass over its paged KV cache. The others run one sequence at a time through their own
//! caches: the same loop with room for one sequence and a cache cleared when it ends.

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::time::Instant;

use rayon::prelude::*;

use super::scheduler::{Chunk, Plan, Scheduler, SchedulerConfig, SeqId};
use super::{
    panic_message, Command, EngineConfig, EngineError, EngineExit, Job, Shared, TokenEvent,
    PAUSE_POLL,
};
use crate::models::batch::{Choice, KvLayout, Row, SeqChunk};
use crate::models::device_label;
use crate::models::{
    available_memory, prepare_prompt, FinishReason, GenerationError, LoadError, LoadedModel,
    ModelInfo, Sequence, ToolFormat,
};

/// Token slots per KV block.
pub const BLOCK_SIZE: usize = 16;
/// Longest context the default KV cache makes room for, per sequence.
const DEFAULT_CONTEXT_PER_SEQUENCE: usize = 4096;

/// A job the engine has accepted.
struct Entry {
    job: Job,
    sequence: Sequence,
    /// When its client stopped reading (its channel filled up), while it still has not.
    paused_since: Option<Instant>,
    /// How the model writes tool calls, when the request offered tools.
    tool_format: Option<ToolFormat>,
}

/// The state of one engine thread after its model loaded.
pub struct Engine<'a> {
    replica: &'a str,
    model: LoadedModel,
    scheduler: Scheduler,
    entries: BTreeMap<SeqId, Entry>,
    next_id: SeqId,
    batched: bool,
    shared: &'a Shared,
    config: &'a EngineConfig,
}

impl<'a> Engine<'a> {
    /// Sizes the scheduler and, for a batched model, its KV cache.
    pub fn new(
        replica: &'a str,
        mut model: LoadedModel,
        config: &'a EngineConfig,
        shared: &'a Shared,
    ) -> Result<Engine<'a>, LoadError> {
        let context = model.info.context_length;
        let on_gpu = !model.device().is_cpu();
        let available = available_memory(model.device());
        let device = device_label(model.device());
        let scheduler = match model.model.batched() {
            Some(batched) => {
                let max_seqs = config.max_seqs.unwrap_or(if on_gpu { 64 } else { 16 });
                let max_batch_tokens = config
                    .max_batch_tokens
                    .unwrap_or(if on_gpu { 2048 } else { 256 })
                    .max(max_seqs);
                let per_token = batched
                    .kv_bytes_per_token(config.kv_dtype)
                    .map_err(|reason| LoadError::UnsupportedDtype {
                        dtype: format!("kv_cache_dtype {}", config.kv_dtype.name()),
                        device,
                        reason,
                    })? as u64;
                let bytes = config.kv_cache_bytes.unwrap_or_else(|| {
                    let wanted = (max_seqs * context.min(DEFAULT_CONTEXT_PER_SEQUENCE)) as u64;
                    let cap = available.map_or(u64::MAX, |free| free / 4);
                    (wanted * per_token).min(cap)
                });
                let block_bytes = per_token * BLOCK_SIZE as u64;
                // At least one sequence of the whole context (or one block more than asked).
                let blocks = ((bytes / block_bytes) as usize).max(2);
                let layout = KvLayout {
                    block_size: BLOCK_SIZE,
                    blocks,
                };
                batched
                    .init_kv(layout, config.kv_dtype)
                    .map_err(|err| LoadError::Panicked(err.to_string()))?;
                model.info.batched = true;
                model.info.max_seqs = max_seqs;
                model.info.kv_cache_bytes = blocks as u64 * block_bytes;
                model.info.context_length = context.min(layout.tokens());
                SchedulerConfig {
                    max_seqs,
                    max_batch_tokens,
                    block_size: BLOCK_SIZE,
                    blocks,
                    prefix_caching: config.prefix_caching,
                    prompts_alone: !on_gpu,
                }
            }
            None => SchedulerConfig {
                max_seqs: 1,
                max_batch_tokens: context + 1,
                block_size: BLOCK_SIZE,
                blocks: context.div_ceil(BLOCK_SIZE) + 1,
                prefix_caching: false,
                prompts_alone: false,
            },
        };
        let batched = model.info.batched;
        let scheduler = Scheduler::new(scheduler);
        shared.stats.update(&scheduler);
        Ok(Engine {
            replica,
            model,
            scheduler,
            entries: BTreeMap::new(),
            next_id: 0,
            batched,
            shared,
            config,
        })
    }

    /// The model's facts, with the engine's batching limits.
    pub fn info(&self) -> &ModelInfo {
        &self.model.info
    }

    /// Serves commands until the channel closes or a step panics.
    pub fn serve(&mut self, commands: &mpsc::Receiver<Command>) -> EngineExit {
        loop {
            if self.entries.is_empty() {
                self.shared.stats.update(&self.scheduler);
                match commands.recv() {
                    Ok(command) => self.apply(command),
                    Err(_) => return self.stop(),
                }
            }
            loop {
                match commands.try_recv() {
                    Ok(command) => self.apply(command),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        // The owner is gone: nothing may outlive it without a terminal event.
                        let gone = EngineError::Unavailable("the replica stopped".to_string());
                        self.apply(Command::Abort(gone));
                        return self.stop();
                    }
                }
            }
            self.reap();
            let before = self.scheduler.counters();
            let plan = self.scheduler.schedule();
            self.shared.stats.update(&self.scheduler);
            if let Some(metrics) = &self.config.metrics {
                super::stats::count(metrics, before, self.scheduler.counters());
            }
            if plan.chunks.is_empty() {
                if !self.entries.is_empty() {
                    // Every sequence waits for its client to read.
                    std::thread::sleep(PAUSE_POLL);
                }
                continue;
            }
            for id in &plan.admitted {
                if let Some(entry) = self.entries.get(id) {
                    entry.job.send(TokenEvent::Started {
                        prompt_ids: entry.sequence.prompt_ids().to_vec(),
                        tool_format: entry.tool_format,
                    });
                }
            }
            let began = Instant::now();
            self.shared.heartbeat.begin();
            let all_rows = self.per_chunk(&plan, |c, s| s.wants_prompt_rows(c.start));
            let ran = catch_unwind(AssertUnwindSafe(|| self.execute(&plan, &all_rows)));
            self.shared.heartbeat.end();
            match ran {
                Err(panic) => return self.crash(panic_message(panic.as_ref()), commands),
                Ok(Err(err)) => {
                    // Inputs were checked per sequence, so this is the model's own failure:
                    // every sequence of the step may have half-written blocks.
                    let error = EngineError::from(err);
                    for chunk in &plan.chunks {
                        self.fail(chunk.seq, error.clone());
                    }
                }
                Ok(Ok(logits)) => {
                    self.scheduler.commit(&plan);
                    self.accept(&plan, &all_rows, logits);
                }
            }
            if let Some(metrics) = &self.config.metrics {
                let tokens: usize = plan.chunks.iter().map(|c| c.len).sum();
                metrics.batch_tokens.observe(tokens as f64);
                metrics.batch_sequences.observe(plan.chunks.len() as f64);
                metrics.step_seconds.observe(began.elapsed().as_secs_f64());
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Run(job) => self.admit(*job),
            Command::Abort(error) => {
                for id in self.scheduler.ids() {
                    self.fail(id, error.clone());
                }
            }
        }
    }

    /// Tokenizes and validates a job; a valid one joins the scheduler's queue, an invalid one
    /// gets its error.
    fn admit(&mut self, job: Job) {
        if job.abandoned() {
            return;
        }
        let request = &job.request;
        let prepared = prepare_prompt(&self.model.tokenizer, &request.prompt, &request.params)
            .and_then(|(ids, params, format)| {
                Ok((Sequence::new(&self.model, ids, params)?, format))
            });
        match prepared {
            Ok((sequence, tool_format)) => {
                let id = self.next_id;
                self.next_id += 1;
                let prompt = sequence.prompt_ids().to_vec();
                let salt = match self.config.shared_prefix_cache {
                    true => 0,
                    false => job.request.cache_salt,
                };
                // An echo with log probabilities computes its whole prompt: cached blocks
                // would leave their positions without logits.
                let reuse = !sequence.wants_prompt_rows(0);
                self.scheduler.add(id, prompt, salt, reuse);
                self.entries.insert(
                    id,
                    Entry {
                        job,
                        sequence,
                        paused_since: None,
                        tool_format,
                    },
                );
            }
            Err(err) => job.send(TokenEvent::Failed(err.into())),
        }
    }

    /// Drops sequences whose clients left, pauses those whose clients do not read, and ends
    /// those paused for their slow-reader timeout.
    fn reap(&mut self) {
        let ids: Vec<SeqId> = self.entries.keys().copied().collect();
        for id in ids {
            let Some(entry) = self.entries.get_mut(&id) else {
                continue;
            };
            if entry.job.abandoned() {
                self.remove(id);
                continue;
            }
            if entry.job.has_room() {
                entry.paused_since = None;
                self.scheduler.set_paused(id, false);
                continue;
            }
            let since = *entry.paused_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= entry.job.slow_reader_timeout {
                let message = format!(
                    "the client read nothing for {:?} (slow_reader_timeout)",
                    entry.job.slow_reader_timeout
                );
                self.fail(id, EngineError::SlowReader(message));
            } else {
                self.scheduler.set_paused(id, true);
            }
        }
    }

    /// Runs a planned step and returns the logits of the chunks that ask for them: every
    /// token's of the chunks marked in `all_rows`, the last token's of the others.
    fn execute(&mut self, plan: &Plan, all_rows: &[bool]) -> Result<Vec<Row>, GenerationError> {
        #[cfg(feature = "fault-injection")]
        for chunk in plan.chunks.iter().filter(|c| c.logits) {
            if let Some(entry) = self.entries.get(&chunk.seq) {
                super::super::faults::on_step(self.replica, entry.sequence.generated_ids().len());
            }
        }
        let _ = self.replica; // read only by the fault hooks of test builds
        let scheduler = &self.scheduler;
        if !self.batched {
            let Some(chunk) = plan.chunks.first() else {
                return Ok(Vec::new());
            };
            let tokens = scheduler.chunk_tokens(chunk);
            if all_rows.first() == Some(&true) {
                // The unbatched models return their last token's logits: one token a pass.
                return tokens
                    .chunks(1)
                    .enumerate()
                    .map(|(i, token)| self.model.forward(token, chunk.start + i).map(Row::Logits))
                    .collect();
            }
            return Ok(vec![Row::Logits(self.model.forward(tokens, chunk.start)?)]);
        }
        let Some(model) = self.model.model.batched() else {
            return Err(GenerationError::Forward(
                "the model lost its batched path".into(),
            ));
        };
        // Sequences whose token the model can choose where the logits lie get it chosen there.
        let draws = model.draws();
        let choices: Vec<Choice> = plan
            .chunks
            .iter()
            .map(|c| match (c.logits, self.entries.get(&c.seq)) {
                (true, Some(entry)) => entry.sequence.choice(draws),
                _ => Choice::Logits,
            })
            .collect();
        let chunks: Vec<SeqChunk<'_>> = plan
            .chunks
            .iter()
            .zip(all_rows)
            .map(|(c, &all_logits)| SeqChunk {
                tokens: scheduler.chunk_tokens(c),
                context_len: c.start,
                block_table: scheduler.block_table(c.seq),
                logits: c.logits,
                all_logits,
            })
            .collect();
        model.forward_choosing(&chunks, &choices)
    }

    /// `test` of each chunk of `plan` and its sequence (false where the sequence has left).
    fn per_chunk(&self, plan: &Plan, test: impl Fn(&Chunk, &Sequence) -> bool) -> Vec<bool> {
        plan.chunks
            .iter()
            .map(|c| {
                self.entries
                    .get(&c.seq)
                    .is_some_and(|e| test(c, &e.sequence))
            })
            .collect()
    }

    /// Samples each sequence's next token from its logits and sends its events. The
    /// sequences sample side by side on rayon's pool (each masks its logits with its grammar,
    /// draws, detokenizes; none touches another's state), then their events go out in plan
    /// order.
    fn accept(&mut self, plan: &Plan, all_rows: &[bool], rows: Vec<Row>) {
        let mut rows = rows.into_iter();
        let mut logits: BTreeMap<SeqId, Row> = BTreeMap::new();
        let mut failed = Vec::new();
        for (chunk, &all) in plan.chunks.iter().zip(all_rows) {
            let count = match all {
                true => chunk.len,
                false => usize::from(chunk.logits),
            };
            let mut taken: Vec<Row> = rows.by_ref().take(count).collect();
            let Some(entry) = self.entries.get_mut(&chunk.seq) else {
                continue;
            };
            if all {
                let tokenizer = &self.model.tokenizer;
                // A chunk with every row's logits never has its rows chosen greedily.
                let rows: Vec<Vec<f32>> = taken.into_iter().filter_map(Row::into_logits).collect();
                if let Err(err) = entry.sequence.record_prompt(chunk.start, &rows, tokenizer) {
                    failed.push((chunk.seq, err.into()));
                    continue;
                }
                taken = rows.into_iter().map(Row::Logits).collect();
            }
            if chunk.logits {
                if let Some(last) = taken.into_iter().last() {
                    logits.insert(chunk.seq, last);
                }
            }
        }
        for (id, error) in failed {
            self.fail(id, error);
        }
        self.echo(plan, &mut logits);
        let tokenizer = &self.model.tokenizer;
        let work: Vec<(SeqId, &mut Sequence, Row)> = self
            .entries
            .iter_mut()
            .filter_map(|(id, entry)| Some((*id, &mut entry.sequence, logits.remove(id)?)))
            .collect();
        let mut sampled: BTreeMap<SeqId, _> = work
            .into_par_iter()
            .map(|(id, sequence, row)| {
                let result = catch_unwind(AssertUnwindSafe(|| sequence.accept_row(row, tokenizer)));
                (id, result)
            })
            .collect();
        for chunk in plan.chunks.iter().filter(|c| c.logits) {
            let Some(sampled) = sampled.remove(&chunk.seq) else {
                continue;
            };
            let output = match sampled {
                Ok(Ok(output)) => output,
                Ok(Err(err)) => {
                    self.fail(chunk.seq, err.into());
                    continue;
                }
                Err(panic) => {
                    // Sampling touches only this sequence: the others go on.
                    let message = panic_message(panic.as_ref());
                    self.fail(chunk.seq, EngineError::Crashed(message));
                    continue;
                }
            };
            let Some(entry) = self.entries.get(&chunk.seq) else {
                continue;
            };
            entry.job.send(TokenEvent::Token {
                id: output.token,
                text: output.text,
                logprobs: output.logprobs,
            });
            self.scheduler.push_token(chunk.seq, output.token);
            if let Some(reason) = output.finished {
                entry.job.send(TokenEvent::Finished {
                    reason,
                    prompt_tokens: entry.sequence.prompt_ids().len(),
                    completion_tokens: entry.sequence.generated_ids().len(),
                    cached_tokens: self.scheduler.cached_tokens(chunk.seq),
                });
                self.remove(chunk.seq);
            }
        }
    }

    /// Sends the echo of each sequence whose prompt is now computed, and ends those that
    /// asked for nothing more (`max_tokens: 0`), taking their logits out of the sampling.
    fn echo(&mut self, plan: &Plan, logits: &mut BTreeMap<SeqId, Row>) {
        for chunk in plan.chunks.iter().filter(|c| c.logits) {
            let Some(entry) = self.entries.get_mut(&chunk.seq) else {
                continue;
            };
            match entry.sequence.take_echo(&self.model.tokenizer) {
                Ok(Some(tokens)) => entry.job.send(TokenEvent::Prompt { tokens }),
                Ok(None) => {}
                Err(err) => {
                    logits.remove(&chunk.seq);
                    self.fail(chunk.seq, err.into());
                    continue;
                }
            }
            if entry.sequence.prompt_only() {
                logits.remove(&chunk.seq);
                entry.job.send(TokenEvent::Finished {
                    reason: FinishReason::MaxTokens,
                    prompt_tokens: entry.sequence.prompt_ids().len(),
                    completion_tokens: 0,
                    cached_tokens: self.scheduler.cached_tokens(chunk.seq),
                });
                self.remove(chunk.seq);
            }
        }
    }

    /// Ends a sequence with `error`.
    fn fail(&mut self, id: SeqId, error: EngineError) {
        if let Some(entry) = self.entries.get(&id) {
            entry.job.send(TokenEvent::Failed(error));
        }
        self.remove(id);
    }

    /// Drops a sequence and frees its blocks (an unbatched model's cache is cleared when its
    /// one running sequence leaves).
    fn remove(&mut self, id: SeqId) {
        let was_running = self.scheduler.admitted(id);
        self.entries.remove(&id);
        self.scheduler.remove(id);
        if !self.batched && was_running {
            if let Err(err) = self.model.clear_kv_cache() {
                tracing::error!(error = %err, "clearing the kv cache failed");
            }
        }
    }

    /// The engine stops; its occupancy reads zero.
    fn stop(&mut self) -> EngineExit {
        self.shared.stats.clear();
        EngineExit::Stopped
    }

    /// A step panicked: the model may be corrupt, so the engine exits. Sequences that began
    /// computing are `crashed` (their clients may have seen tokens); the rest, and the jobs
    /// still in the channel, never started and may run elsewhere.
    fn crash(&mut self, message: String, commands: &mpsc::Receiver<Command>) -> EngineExit {
        let (mut crashed, mut unstarted) = (Vec::new(), Vec::new());
        for (id, entry) in std::mem::take(&mut self.entries) {
            match self.scheduler.admitted(id) {
                true => crashed.push(entry.job),
                false => unstarted.push(entry.job),
            }
        }
        unstarted.extend(commands.try_iter().filter_map(|command| match command {
            Command::Run(job) => Some(*job),
            Command::Abort(_) => None,
        }));
        self.shared.stats.clear();
        EngineExit::Panicked {
            message,
            crashed,
            unstarted,
        }
    }
}
