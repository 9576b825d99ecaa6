//! Who runs in the next step of a batched replica, and with which KV blocks.
//!
//! Sequences wait in arrival order and run in admission order. Each step has a budget of
//! `max_batch_tokens` tokens: first the next token of every running sequence that decodes,
//! then the rest of the prompts still being read (chunked prefill), then new sequences from
//! the head of the queue while the budget, `max_seqs` and the free blocks allow (strict
//! arrival order: a head that does not fit waits, and nothing passes it).
//!
//! With `prompts_alone` (the CPU, where a step's time grows with its tokens), a step that
//! would finish a prompt runs its prompt chunks without the decodes, unless the step before
//! already did: the new sequence's first token then waits for its own prompt only, and the
//! decoding sequences wait as long as they would have in one longer step that held both.
//! On a GPU a few more rows cost a decode step next to nothing, so they share the step.
//!
//! When a running sequence needs a block and none is free, the scheduler preempts: a sequence
//! whose client is not reading first, else the newest running one. A preempted sequence loses
//! its blocks (their full ones stay in the prefix cache), goes back to the head of the queue,
//! and is admitted again only when the free blocks cover all its tokens, so it cannot be
//! preempted again while it recomputes; no one is admitted in a step that preempted.
//!
//! Plain data, no channels and no model: the engine asks for a [`Plan`], runs it, and reports
//! back with [`Scheduler::commit`], [`Scheduler::push_token`] and [`Scheduler::remove`].

use std::collections::{HashMap, VecDeque};

use super::blocks::BlockAllocator;
use super::prefix::{BlockKey, PrefixCache, ROOT};

/// A sequence's id within one engine.
pub type SeqId = u64;

/// A scheduler's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Sequences running at once.
    pub max_seqs: usize,
    /// Tokens per step (at least `max_seqs`, so every running sequence can decode).
    pub max_batch_tokens: usize,
    /// Token slots per KV block.
    pub block_size: usize,
    /// Blocks in the pool.
    pub blocks: usize,
    /// Whether full blocks are kept for reuse by later prompts.
    pub prefix_caching: bool,
    /// Whether a step that finishes a prompt leaves the decodes for the next step.
    pub prompts_alone: bool,
}

#[derive(Debug)]
struct Seq {
    /// Every known token: the prompt, then the generated ones.
    tokens: Vec<u32>,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    /// The block table.
    blocks: Vec<u32>,
    /// The keys of the full computed blocks, in order.
    keys: Vec<BlockKey>,
    salt: u64,
    /// Whether it may start from cached blocks.
    reuse: bool,
    paused: bool,
    admitted: bool,
    preempted: bool,
    /// Prompt tokens found in the prefix cache at the first admission.
    cached_tokens: usize,
}

/// What the scheduler has done since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Sequences preempted.
    pub preemptions: u64,
    /// Tokens computed again after preemptions.
    pub recomputed_tokens: u64,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queried_tokens: u64,
    /// Prompt tokens found there.
    pub prefix_hit_tokens: u64,
    /// Cached blocks handed out for new contents.
    pub evictions: u64,
}

/// One sequence's part of a step: tokens `start..start + len` of its known tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chunk {
    /// The sequence.
    pub seq: SeqId,
    /// Its first token in this step (its computed tokens before the step).
    pub start: usize,
    /// Tokens in this step.
    pub len: usize,
    /// Whether the chunk reaches the last known token, so its logits give the next token.
    pub logits: bool,
}

/// The next step.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Plan {
    /// What runs, in the order of the batch.
    pub chunks: Vec<Chunk>,
    /// Sequences preempted while planning.
    pub preempted: Vec<SeqId>,
    /// Sequences admitted for the first time.
    pub admitted: Vec<SeqId>,
}

/// The scheduler of one replica.
#[derive(Debug)]
pub struct Scheduler {
    config: SchedulerConfig,
    alloc: BlockAllocator,
    prefix: PrefixCache,
    seqs: HashMap<SeqId, Seq>,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
    counters: Counters,
    /// Whether the last plan left the decodes out.
    prompts_only: bool,
}

impl Scheduler {
    /// An idle scheduler over an empty pool.
    pub fn new(config: SchedulerConfig) -> Scheduler {
        assert!(config.max_seqs > 0 && config.max_batch_tokens >= config.max_seqs);
        Scheduler {
            config,
            alloc: BlockAllocator::new(config.blocks),
            prefix: PrefixCache::new(config.blocks),
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            counters: Counters::default(),
            prompts_only: false,
        }
    }

    /// The limits.
    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Queues a sequence of `tokens` (its prompt, at least one token and fewer than the pool
    /// holds) whose prefix-cache entries are shared only under `salt`; without `reuse` it
    /// computes every token, whatever the cache holds (its blocks still join the cache).
    pub fn add(&mut self, id: SeqId, tokens: Vec<u32>, salt: u64, reuse: bool) {
        assert!(!tokens.is_empty() && tokens.len() < self.capacity());
        self.seqs.insert(
            id,
            Seq {
                tokens,
                computed: 0,
                blocks: Vec::new(),
                keys: Vec::new(),
                salt,
                reuse,
                paused: false,
                admitted: false,
                preempted: false,
                cached_tokens: 0,
            },
        );
        self.waiting.push_back(id);
    }

    /// Token slots in the pool.
    pub fn capacity(&self) -> usize {
        self.config.blocks * self.config.block_size
    }

    /// Drops a sequence (finished, failed or abandoned) and lets go of its blocks.
    pub fn remove(&mut self, id: SeqId) {
        if let Some(seq) = self.seqs.remove(&id) {
            self.release(&seq.blocks);
        }
        self.waiting.retain(|&s| s != id);
        self.running.retain(|&s| s != id);
    }

    /// Lets go of a table's blocks, the last first: a prompt's first blocks are the ones other
    /// prompts share most, so they stay cached longest.
    fn release(&mut self, blocks: &[u32]) {
        for &block in blocks.iter().rev() {
            self.alloc.release(block);
        }
    }

    /// Appends a generated token to a sequence's known tokens.
    pub fn push_token(&mut self, id: SeqId, token: u32) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.tokens.push(token);
        }
    }

    /// Marks a sequence as waiting for its client (not scheduled, first to be preempted).
    pub fn set_paused(&mut self, id: SeqId, paused: bool) {
        if let Some(seq) = self.seqs.get_mut(&id) {
            seq.paused = paused;
        }
    }

    /// A sequence's known tokens.
    pub fn tokens(&self, id: SeqId) -> &[u32] {
        self.seqs.get(&id).map_or(&[], |s| &s.tokens)
    }

    /// A chunk's tokens (empty if the chunk does not fit the sequence's known tokens).
    pub fn chunk_tokens(&self, chunk: &Chunk) -> &[u32] {
        self.tokens(chunk.seq)
            .get(chunk.start..chunk.start + chunk.len)
            .unwrap_or(&[])
    }

    /// A sequence's block table.
    pub fn block_table(&self, id: SeqId) -> &[u32] {
        self.seqs.get(&id).map_or(&[], |s| &s.blocks)
    }

    /// Prompt tokens a sequence found in the prefix cache when first admitted.
    pub fn cached_tokens(&self, id: SeqId) -> usize {
        self.seqs.get(&id).map_or(0, |s| s.cached_tokens)
    }

    /// Whether a sequence has ever been admitted (its computation began).
    pub fn admitted(&self, id: SeqId) -> bool {
        self.seqs.get(&id).is_some_and(|s| s.admitted)
    }

    /// Sequences running (admitted and holding blocks).
    pub fn running(&self) -> usize {
        self.running.len()
    }

    /// Sequences waiting for admission (new or preempted).
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences running but not scheduled because their clients do not read.
    pub fn paused(&self) -> usize {
        self.running
            .iter()
            .filter(|id| self.seqs.get(id).is_some_and(|s| s.paused))
            .count()
    }

    /// Blocks held by sequences.
    pub fn blocks_used(&self) -> usize {
        self.alloc.used()
    }

    /// Free blocks that still hold a cached prefix.
    pub fn blocks_cached(&self) -> usize {
        self.prefix.len()
    }

    /// What the scheduler has done so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// Every sequence, waiting or running, in queue then admission order.
    pub fn ids(&self) -> Vec<SeqId> {
        self.running
            .iter()
            .chain(self.waiting.iter())
            .copied()
            .collect()
    }

    /// Plans the next step.
    pub fn schedule(&mut self) -> Plan {
        let mut plan = Plan::default();
        let mut budget = self.config.max_batch_tokens;
        let mut decodes = 0;
        for decoding in [true, false] {
            for id in self.running.clone() {
                let Some(seq) = self.seqs.get(&id) else {
                    continue;
                };
                let remaining = seq.tokens.len() - seq.computed;
                let preempted_now = !self.running.contains(&id);
                if preempted_now || seq.paused || (remaining == 1) != decoding || budget == 0 {
                    continue;
                }
                let (start, len) = (seq.computed, remaining.min(budget));
                loop {
                    if self.grow(id, start + len) {
                        plan.chunks.push(Chunk {
                            seq: id,
                            start,
                            len,
                            logits: len == remaining,
                        });
                        budget -= len;
                        break;
                    }
                    let victim = self.victim();
                    self.preempt(victim, &mut plan, &mut budget);
                    if victim == id {
                        break;
                    }
                }
            }
            if decoding {
                decodes = plan.chunks.len();
            }
        }
        if plan.preempted.is_empty() {
            self.admit(&mut plan, &mut budget);
        }
        let prompts = plan.chunks.get(decodes..).unwrap_or_default();
        self.prompts_only = self.config.prompts_alone
            && !self.prompts_only
            && plan.preempted.is_empty()
            && decodes > 0
            && prompts.iter().any(|chunk| chunk.logits);
        if self.prompts_only {
            // The decodes keep the blocks they grew; they run in the next step.
            plan.chunks.drain(..decodes);
        }
        plan
    }

    /// Records that a planned step ran: the chunks' tokens are computed, and blocks they
    /// filled join the prefix cache.
    pub fn commit(&mut self, plan: &Plan) {
        for chunk in &plan.chunks {
            if let Some(seq) = self.seqs.get_mut(&chunk.seq) {
                seq.computed = chunk.start + chunk.len;
            }
            self.publish(chunk.seq);
        }
    }

    /// Keys the sequence's newly full computed blocks and caches them.
    fn publish(&mut self, id: SeqId) {
        let size = self.config.block_size;
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        while (seq.keys.len() + 1) * size <= seq.computed {
            let i = seq.keys.len();
            let parent = seq.keys.last().copied().unwrap_or(ROOT);
            let (Some(tokens), Some(&block)) =
                (seq.tokens.get(i * size..(i + 1) * size), seq.blocks.get(i))
            else {
                return;
            };
            let key = self.prefix.key(parent, tokens, seq.salt);
            if self.config.prefix_caching {
                self.prefix.insert(block, parent, key, tokens);
            }
            seq.keys.push(key);
        }
    }

    /// Gives a sequence the blocks to hold `tokens` tokens; false (and nothing taken) when
    /// too few are free.
    fn grow(&mut self, id: SeqId, tokens: usize) -> bool {
        let have = self.seqs.get(&id).map_or(0, |s| s.blocks.len());
        let needed = tokens.div_ceil(self.config.block_size).saturating_sub(have);
        if self.alloc.free() < needed {
            return false;
        }
        for _ in 0..needed {
            let Some(block) = self.alloc.allocate() else {
                unreachable!("free blocks were counted");
            };
            if self.prefix.forget(block) {
                self.counters.evictions += 1;
            }
            if let Some(seq) = self.seqs.get_mut(&id) {
                seq.blocks.push(block);
            }
        }
        true
    }

    /// The sequence to preempt: the newest whose client is not reading, else the newest.
    fn victim(&self) -> SeqId {
        let paused = self
            .running
            .iter()
            .rev()
            .find(|id| self.seqs.get(id).is_some_and(|s| s.paused));
        match paused.or(self.running.last()) {
            Some(&id) => id,
            None => unreachable!("a sequence that needs a block is running"),
        }
    }

    /// Frees a running sequence's blocks and queues it again at the head.
    fn preempt(&mut self, id: SeqId, plan: &mut Plan, budget: &mut usize) {
        if let Some(at) = plan.chunks.iter().position(|c| c.seq == id) {
            *budget += plan.chunks.remove(at).len;
        }
        if let Some(seq) = self.seqs.get_mut(&id) {
            for &block in seq.blocks.iter().rev() {
                self.alloc.release(block);
            }
            seq.blocks.clear();
            seq.keys.clear();
            seq.computed = 0;
            seq.preempted = true;
        }
        self.running.retain(|&s| s != id);
        self.waiting.push_front(id);
        self.counters.preemptions += 1;
        plan.preempted.push(id);
    }

    /// Admits sequences from the head of the queue while they fit.
    fn admit(&mut self, plan: &mut Plan, budget: &mut usize) {
        let size = self.config.block_size;
        while *budget > 0 && self.running.len() < self.config.max_seqs {
            let Some(&id) = self.waiting.front() else {
                return;
            };
            let hits = self.take_cached_prefix(id);
            let reserve = self.running.len();
            let Some(seq) = self.seqs.get_mut(&id) else {
                return;
            };
            let known = seq.tokens.len();
            let cached = hits * size;
            let len = (known - cached).min(*budget);
            let needed = (cached + len).div_ceil(size) - hits;
            let gate = match seq.preempted {
                true => (known + 1).div_ceil(size) - hits,
                false => needed + reserve,
            };
            if self.alloc.free() < gate {
                for &block in seq.blocks.iter().rev() {
                    self.alloc.release(block);
                }
                seq.blocks.clear();
                seq.keys.clear();
                return;
            }
            seq.computed = cached;
            if seq.preempted {
                self.counters.recomputed_tokens += (known - cached) as u64;
            } else {
                seq.cached_tokens = cached;
                self.counters.prefix_queried_tokens += known as u64;
                self.counters.prefix_hit_tokens += cached as u64;
            }
            if !seq.admitted {
                plan.admitted.push(id);
            }
            seq.admitted = true;
            seq.preempted = false;
            self.waiting.pop_front();
            self.running.push(id);
            let grown = self.grow(id, cached + len);
            debug_assert!(grown, "the gate counted the blocks");
            plan.chunks.push(Chunk {
                seq: id,
                start: cached,
                len,
                logits: cached + len == known,
            });
            *budget -= len;
        }
    }

    /// Holds the cached blocks that start a waiting sequence's tokens (full blocks, at most
    /// all tokens but the last) and returns how many.
    fn take_cached_prefix(&mut self, id: SeqId) -> usize {
        let size = self.config.block_size;
        if !self.config.prefix_caching {
            return 0;
        }
        let Some(seq) = self.seqs.get_mut(&id).filter(|seq| seq.reuse) else {
            return 0;
        };
        let full = (seq.tokens.len() - 1) / size;
        while seq.keys.len() < full {
            let i = seq.keys.len();
            let parent = seq.keys.last().copied().unwrap_or(ROOT);
            let Some(tokens) = seq.tokens.get(i * size..(i + 1) * size) else {
                break;
            };
            let key = self.prefix.key(parent, tokens, seq.salt);
            let Some(block) = self.prefix.lookup(parent, key, tokens) else {
                break;
            };
            self.alloc.share(block);
            seq.blocks.push(block);
            seq.keys.push(key);
        }
        seq.keys.len()
    }

    /// Checks the bookkeeping (tests): every reference is a table entry, free and used blocks
    /// add up, and no block a sequence may still write is held by another.
    #[cfg(test)]
    pub fn check(&self) {
        let tables: usize = self.seqs.values().map(|s| s.blocks.len()).sum();
        let refs: u32 = (0..self.config.blocks as u32)
            .map(|b| self.alloc.refs(b))
            .sum();
        assert_eq!(tables, refs as usize, "references and table entries");
        assert_eq!(self.alloc.free() + self.alloc.used(), self.config.blocks);
        for seq in self.seqs.values() {
            let size = self.config.block_size;
            for &block in &seq.blocks[seq.computed / size..] {
                assert_eq!(self.alloc.refs(block), 1, "a writable block is shared");
            }
            assert!(
                seq.keys.len() * size <= seq.computed,
                "keys of uncomputed blocks"
            );
        }
        assert_eq!(self.running.len() + self.waiting.len(), self.seqs.len());
    }
}

#[cfg(test)]
mod tests;
