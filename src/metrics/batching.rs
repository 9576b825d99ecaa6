//! The metrics of continuous batching: per-step histograms and counters, which each replica's
//! engine thread records as it runs, and per-replica gauges of running and waiting sequences
//! and KV blocks, set at each scrape from the replicas' occupancy.

use prometheus::{GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec};
use prometheus::{IntGaugeVec, Opts, Registry};

/// One engine's handles on the per-step metrics of its model.
#[derive(Debug, Clone)]
pub struct StepMetrics {
    /// Tokens per step.
    pub batch_tokens: Histogram,
    /// Sequences per step.
    pub batch_sequences: Histogram,
    /// Seconds per step.
    pub step_seconds: Histogram,
    /// Sequences preempted.
    pub preemptions: IntCounter,
    /// Tokens computed again after preemptions.
    pub recomputed_tokens: IntCounter,
    /// Prompt tokens looked up in the prefix cache.
    pub prefix_queried_tokens: IntCounter,
    /// Prompt tokens found there.
    pub prefix_hit_tokens: IntCounter,
    /// Cached blocks reused for new contents.
    pub prefix_evictions: IntCounter,
}

/// A replica's batching state at a scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchGauges {
    /// Sequences running.
    pub running: usize,
    /// Sequences waiting for admission in the engine.
    pub waiting: usize,
    /// Running sequences whose clients do not read.
    pub paused: usize,
    /// KV blocks held by sequences.
    pub kv_blocks_used: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// Free KV blocks still holding a cached prefix.
    pub kv_blocks_cached: usize,
}

/// Every batching metric of a pool.
pub struct Batching {
    batch_tokens: HistogramVec,
    batch_sequences: HistogramVec,
    step_seconds: HistogramVec,
    preemptions: IntCounterVec,
    recomputed_tokens: IntCounterVec,
    prefix_queried_tokens: IntCounterVec,
    prefix_hit_tokens: IntCounterVec,
    prefix_evictions: IntCounterVec,
    running: IntGaugeVec,
    waiting: IntGaugeVec,
    paused: IntGaugeVec,
    blocks_used: IntGaugeVec,
    blocks_total: IntGaugeVec,
    blocks_cached: IntGaugeVec,
    usage: GaugeVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|err| unreachable!("metric registered twice: {err}"));
    metric
}

impl Batching {
    /// Creates and registers the batching metrics in `registry`.
    pub fn new(registry: &Registry) -> Batching {
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let opts = HistogramOpts::new(name, help).buckets(buckets);
            let metric = HistogramVec::new(opts, &["model"])
                .unwrap_or_else(|err| unreachable!("static metric {name}: {err}"));
            register(registry, metric)
        };
        let counter = |name: &str, help: &str| {
            let metric = IntCounterVec::new(Opts::new(name, help), &["model"])
                .unwrap_or_else(|err| unreachable!("static metric {name}: {err}"));
            register(registry, metric)
        };
        let labels = ["model", "replica", "device"];
        let gauge = |name: &str, help: &str| {
            let metric = IntGaugeVec::new(Opts::new(name, help), &labels)
                .unwrap_or_else(|err| unreachable!("static metric {name}: {err}"));
            register(registry, metric)
        };
        let sizes = vec![
            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
        ];
        Batching {
            batch_tokens: histogram(
                "llorch_iteration_tokens",
                "Tokens per engine step (next tokens of running sequences and prompt chunks).",
                sizes.clone(),
            ),
            batch_sequences: histogram(
                "llorch_batch_sequences",
                "Sequences per engine step.",
                sizes[..8].to_vec(),
            ),
            step_seconds: histogram(
                "llorch_step_duration_seconds",
                "Seconds per engine step.",
                vec![
                    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            ),
            preemptions: counter(
                "llorch_num_preemptions_total",
                "Sequences preempted (their KV blocks freed, recomputed later).",
            ),
            recomputed_tokens: counter(
                "llorch_recomputed_tokens_total",
                "Tokens computed again after preemptions.",
            ),
            prefix_queried_tokens: counter(
                "llorch_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            ),
            prefix_hit_tokens: counter(
                "llorch_prefix_cache_hits_total",
                "Prompt tokens whose keys and values came from the prefix cache.",
            ),
            prefix_evictions: counter(
                "llorch_prefix_cache_evictions_total",
                "Cached KV blocks reused for new contents.",
            ),
            running: gauge(
                "llorch_num_requests_running",
                "Sequences a replica runs (holding KV blocks).",
            ),
            waiting: gauge(
                "llorch_num_requests_waiting",
                "Sequences waiting for admission in a replica's engine.",
            ),
            paused: gauge(
                "llorch_num_requests_paused",
                "Running sequences not stepped because their clients do not read.",
            ),
            blocks_used: gauge(
                "llorch_kv_cache_blocks_used",
                "KV cache blocks held by sequences.",
            ),
            blocks_total: gauge(
                "llorch_kv_cache_blocks_capacity",
                "KV cache blocks in the pool.",
            ),
            blocks_cached: gauge(
                "llorch_kv_cache_blocks_cached",
                "Free KV cache blocks that still hold a cached prompt prefix.",
            ),
            usage: register(
                registry,
                GaugeVec::new(
                    Opts::new(
                        "llorch_kv_cache_usage_ratio",
                        "Fraction of the KV cache blocks held by sequences.",
                    ),
                    &labels,
                )
                .unwrap_or_else(|err| unreachable!("static metric: {err}")),
            ),
        }
    }

    /// The handles one engine of `model` records into.
    pub fn step_metrics(&self, model: &str) -> StepMetrics {
        let labels = [model];
        StepMetrics {
            batch_tokens: self.batch_tokens.with_label_values(&labels),
            batch_sequences: self.batch_sequences.with_label_values(&labels),
            step_seconds: self.step_seconds.with_label_values(&labels),
            preemptions: self.preemptions.with_label_values(&labels),
            recomputed_tokens: self.recomputed_tokens.with_label_values(&labels),
            prefix_queried_tokens: self.prefix_queried_tokens.with_label_values(&labels),
            prefix_hit_tokens: self.prefix_hit_tokens.with_label_values(&labels),
            prefix_evictions: self.prefix_evictions.with_label_values(&labels),
        }
    }

    /// Clears the gauges before a scrape sets them.
    pub fn reset(&self) {
        for gauge in [
            &self.running,
            &self.waiting,
            &self.paused,
            &self.blocks_used,
            &self.blocks_total,
            &self.blocks_cached,
        ] {
            gauge.reset();
        }
        self.usage.reset();
    }

    /// Sets one replica's gauges.
    pub fn set(&self, labels: &[&str; 3], gauges: BatchGauges) {
        let set = |gauge: &IntGaugeVec, value: usize| {
            gauge.with_label_values(labels).set(value as i64);
        };
        set(&self.running, gauges.running);
        set(&self.waiting, gauges.waiting);
        set(&self.paused, gauges.paused);
        set(&self.blocks_used, gauges.kv_blocks_used);
        set(&self.blocks_total, gauges.kv_blocks_total);
        set(&self.blocks_cached, gauges.kv_blocks_cached);
        let usage = match gauges.kv_blocks_total {
            0 => 0.0,
            total => gauges.kv_blocks_used as f64 / total as f64,
        };
        self.usage.with_label_values(labels).set(usage);
    }
}
