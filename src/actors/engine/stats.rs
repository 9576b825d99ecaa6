//! What an engine reports about its batching: its occupancy (read by the router for
//! `/admin/models`, `llorch ps` and the gauges of `/metrics`) and its per-step figures
//! (recorded straight into the pool's counters and histograms).

use std::sync::atomic::{AtomicUsize, Ordering};

use prometheus::IntCounter;

use crate::metrics::StepMetrics;

use super::scheduler::{Counters, Scheduler};

/// The engine's occupancy, updated after every scheduling decision.
#[derive(Debug, Default)]
pub struct EngineStats {
    running: AtomicUsize,
    waiting: AtomicUsize,
    paused: AtomicUsize,
    blocks_used: AtomicUsize,
    blocks_total: AtomicUsize,
    blocks_cached: AtomicUsize,
    block_size: AtomicUsize,
    max_seqs: AtomicUsize,
}

/// A snapshot of [`EngineStats`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    /// Sequences running (holding KV blocks).
    pub running: usize,
    /// Sequences waiting for admission.
    pub waiting: usize,
    /// Running sequences whose clients do not read.
    pub paused: usize,
    /// KV blocks held by sequences.
    pub kv_blocks_used: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// Free KV blocks that hold a cached prefix.
    pub kv_blocks_cached: usize,
    /// Token slots per block.
    pub kv_block_size: usize,
    /// Sequences that may run at once.
    pub max_seqs: usize,
}

impl EngineStats {
    /// Records the scheduler's state.
    pub(super) fn update(&self, scheduler: &Scheduler) {
        let config = scheduler.config();
        let set = |field: &AtomicUsize, value: usize| field.store(value, Ordering::Relaxed);
        set(&self.running, scheduler.running());
        set(&self.waiting, scheduler.waiting());
        set(&self.paused, scheduler.paused());
        set(&self.blocks_used, scheduler.blocks_used());
        set(&self.blocks_total, config.blocks);
        set(&self.blocks_cached, scheduler.blocks_cached());
        set(&self.block_size, config.block_size);
        set(&self.max_seqs, config.max_seqs);
    }

    /// Zero occupancy (the engine has stopped).
    pub(super) fn clear(&self) {
        for field in [
            &self.running,
            &self.waiting,
            &self.paused,
            &self.blocks_used,
        ] {
            field.store(0, Ordering::Relaxed);
        }
    }

    /// The current values.
    pub fn snapshot(&self) -> Occupancy {
        let get = |field: &AtomicUsize| field.load(Ordering::Relaxed);
        Occupancy {
            running: get(&self.running),
            waiting: get(&self.waiting),
            paused: get(&self.paused),
            kv_blocks_used: get(&self.blocks_used),
            kv_blocks_total: get(&self.blocks_total),
            kv_blocks_cached: get(&self.blocks_cached),
            kv_block_size: get(&self.block_size),
            max_seqs: get(&self.max_seqs),
        }
    }
}

/// Adds what the scheduler did between `before` and `now` to the pool's counters.
pub(super) fn count(metrics: &StepMetrics, before: Counters, now: Counters) {
    let add = |counter: &IntCounter, was: u64, is: u64| counter.inc_by(is - was);
    add(&metrics.preemptions, before.preemptions, now.preemptions);
    add(
        &metrics.recomputed_tokens,
        before.recomputed_tokens,
        now.recomputed_tokens,
    );
    add(
        &metrics.prefix_queried_tokens,
        before.prefix_queried_tokens,
        now.prefix_queried_tokens,
    );
    add(
        &metrics.prefix_hit_tokens,
        before.prefix_hit_tokens,
        now.prefix_hit_tokens,
    );
    add(&metrics.prefix_evictions, before.evictions, now.evictions);
}
