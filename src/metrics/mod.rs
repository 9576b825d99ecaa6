//! Prometheus metrics of one pool: counters and histograms recorded as requests, replicas and
//! engine steps move, gauges filled from the pool's state at each scrape. Served as text by
//! `GET /metrics`. Plain data in, text out: this module knows nothing of the actors.

mod batching;
mod merge;

use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

pub use batching::{BatchGauges, StepMetrics};
pub use merge::merge;

/// One model's state at a scrape.
#[derive(Debug, Clone, Default)]
pub struct ModelGauges {
    /// The model name.
    pub name: String,
    /// Requests waiting in the router's queue.
    pub queued: usize,
    /// Its replicas.
    pub replicas: Vec<ReplicaGauges>,
}

/// One replica's state at a scrape.
#[derive(Debug, Clone, Default)]
pub struct ReplicaGauges {
    /// The replica's label (`index/g<generation>`).
    pub replica: String,
    /// Its device.
    pub device: String,
    /// One of `loading`, `ready`, `restarting`, `failed`.
    pub state: &'static str,
    /// Requests handed to it and not finished.
    pub in_flight: usize,
    /// Bytes of weights it holds.
    pub memory_bytes: Option<u64>,
    /// GPU memory its load took.
    pub device_memory_bytes: Option<u64>,
    /// Its engine's sequences and KV blocks.
    pub batch: Option<BatchGauges>,
}

/// Every metric of a pool. Cheap to share behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    /// Finished requests by model and HTTP status (`llorch_requests_total`).
    pub requests: IntCounterVec,
    /// Requests that did not finish normally, by model, class and error code.
    pub failures: IntCounterVec,
    /// Prompt tokens of started requests.
    pub prompt_tokens: IntCounterVec,
    /// Generated tokens sent to clients.
    pub generated_tokens: IntCounterVec,
    /// Seconds from a request's arrival to its first token.
    pub time_to_first_token: HistogramVec,
    /// Seconds between consecutive tokens of one request.
    pub inter_token_latency: HistogramVec,
    /// Replica restarts after crashes, by model.
    pub restarts: IntCounterVec,
    /// Seconds a replica took to load, by model and outcome.
    pub load_duration: HistogramVec,
    queued: IntGaugeVec,
    in_flight: IntGaugeVec,
    replica_state: IntGaugeVec,
    replica_memory: GaugeVec,
    replica_device_memory: GaugeVec,
    batching: batching::Batching,
}

/// The replica states exported as `llorch_replica_state{state=...}`.
const STATES: [&str; 4] = ["loading", "ready", "restarting", "failed"];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|err| unreachable!("static metric {name}: {err}"));
            registry
                .register(Box::new(metric.clone()))
                .unwrap_or_else(|err| unreachable!("metric {name} registered twice: {err}"));
            metric
        };
        let requests = counter(
            "llorch_requests_total",
            "Finished inference requests by model and HTTP status.",
            &["model", "status"],
        );
        let failures = counter(
            "llorch_request_failures_total",
            "Requests that did not finish normally, by model, class (validation, overloaded, \
             dropped, generation, unavailable) and error code.",
            &["model", "reason", "code"],
        );
        let prompt_tokens = counter(
            "llorch_prompt_tokens_total",
            "Prompt tokens of started requests.",
            &["model"],
        );
        let generated_tokens = counter(
            "llorch_generated_tokens_total",
            "Generated tokens sent to clients.",
            &["model"],
        );
        let restarts = counter(
            "llorch_restarts_total",
            "Replica restarts after a crash or a stall.",
            &["model"],
        );
        let histogram = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .unwrap_or_else(|err| unreachable!("static metric {name}: {err}"));
            registry
                .register(Box::new(metric.clone()))
                .unwrap_or_else(|err| unreachable!("metric {name} registered twice: {err}"));
            metric
        };
        let latency = vec![
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let time_to_first_token = histogram(
            "llorch_time_to_first_token_seconds",
            "Seconds from a request's arrival to its first generated token.",
            &["model"],
            latency.clone(),
        );
        let inter_token_latency = histogram(
            "llorch_inter_token_latency_seconds",
            "Seconds between consecutive generated tokens of one request.",
            &["model"],
            latency,
        );
        let load_duration = histogram(
            "llorch_load_duration_seconds",
            "Seconds a replica took to load, by outcome (ok or error).",
            &["model", "outcome"],
            vec![
                0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
            ],
        );
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let metric = IntGaugeVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|err| unreachable!("static metric {name}: {err}"));
            registry
                .register(Box::new(metric.clone()))
                .unwrap_or_else(|err| unreachable!("metric {name} registered twice: {err}"));
            metric
        };
        let queued = gauge(
            "llorch_queue_depth",
            "Requests waiting for a slot, by model.",
            &["model"],
        );
        let in_flight = gauge(
            "llorch_in_flight",
            "Requests handed to a replica and not finished, by model.",
            &["model"],
        );
        let replica_state = gauge(
            "llorch_replica_state",
            "1 for each replica's current state (loading, ready, restarting, failed), else 0.",
            &["model", "replica", "device", "state"],
        );
        let replica_memory = float_gauge(
            &registry,
            "llorch_replica_memory_bytes",
            "Bytes of weights a loaded replica holds on its device.",
        );
        let replica_device_memory = float_gauge(
            &registry,
            "llorch_replica_device_memory_bytes",
            "GPU memory in use on the device grew by this much while the replica loaded (GPUs only).",
        );
        let batching = batching::Batching::new(&registry);
        Self {
            registry,
            batching,
            requests,
            failures,
            prompt_tokens,
            generated_tokens,
            time_to_first_token,
            inter_token_latency,
            restarts,
            load_duration,
            queued,
            in_flight,
            replica_state,
            replica_memory,
            replica_device_memory,
        }
    }

    /// Records one finished request.
    pub fn request(&self, model: &str, status: u16) {
        self.requests
            .with_label_values(&[model, &status.to_string()])
            .inc();
    }

    /// Records a request that did not finish normally; the class comes from its code.
    pub fn failure(&self, model: &str, code: &str) {
        self.failures
            .with_label_values(&[model, failure_class(code), code])
            .inc();
    }

    /// The handles one engine of `model` records its steps into.
    pub fn step_metrics(&self, model: &str) -> StepMetrics {
        self.batching.step_metrics(model)
    }

    /// The text exposition, with the gauges set from `models` (the pool's state).
    pub fn render(&self, models: &[ModelGauges]) -> String {
        self.queued.reset();
        self.in_flight.reset();
        self.replica_state.reset();
        self.replica_memory.reset();
        self.replica_device_memory.reset();
        self.batching.reset();
        for model in models {
            let name = model.name.as_str();
            self.queued
                .with_label_values(&[name])
                .set(model.queued as i64);
            let in_flight: usize = model.replicas.iter().map(|r| r.in_flight).sum();
            self.in_flight
                .with_label_values(&[name])
                .set(in_flight as i64);
            for replica in &model.replicas {
                let labels = [name, replica.replica.as_str(), replica.device.as_str()];
                for state in STATES {
                    self.replica_state
                        .with_label_values(&[name, labels[1], labels[2], state])
                        .set(i64::from(state == replica.state));
                }
                if let Some(bytes) = replica.memory_bytes {
                    self.replica_memory
                        .with_label_values(&labels)
                        .set(bytes as f64);
                }
                if let Some(bytes) = replica.device_memory_bytes {
                    self.replica_device_memory
                        .with_label_values(&labels)
                        .set(bytes as f64);
                }
                if let Some(batch) = replica.batch {
                    self.batching.set(&labels, batch);
                }
            }
        }
        let mut out = Vec::new();
        if let Err(err) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %err, "encoding metrics");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The TGI-style class of an error code: `validation`, `overloaded`, `dropped`, `generation`
/// or `unavailable`.
pub fn failure_class(code: &str) -> &'static str {
    match code {
        "server_overloaded" | "queue_timeout" => "overloaded",
        "cancelled" => "dropped",
        "model_crashed" | "generation_stalled" | "generation_error" | "deadline_exceeded"
        | "server_shutdown" | "model_evicted" => "generation",
        "model_loading" | "model_restarting" | "model_unavailable" | "shutting_down"
        | "internal_error" => "unavailable",
        _ => "validation",
    }
}

/// A float gauge labelled by model, replica and device, registered in `registry`.
fn float_gauge(registry: &Registry, name: &str, help: &str) -> GaugeVec {
    let gauge = GaugeVec::new(Opts::new(name, help), &["model", "replica", "device"])
        .unwrap_or_else(|err| unreachable!("static metric: {err}"));
    registry
        .register(Box::new(gauge.clone()))
        .unwrap_or_else(|err| unreachable!("metric registered twice: {err}"));
    gauge
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_fall_into_the_tgi_classes() {
        assert_eq!(failure_class("server_overloaded"), "overloaded");
        assert_eq!(failure_class("cancelled"), "dropped");
        assert_eq!(failure_class("model_crashed"), "generation");
        assert_eq!(failure_class("context_length_exceeded"), "validation");
        assert_eq!(failure_class("shutting_down"), "unavailable");
    }

    #[test]
    fn an_empty_pool_renders_the_counters_it_has_seen() {
        let metrics = Metrics::new();
        metrics.request("demo", 200);
        metrics.failure("demo", "server_overloaded");
        let text = metrics.render(&[]);
        assert!(text.contains("llorch_requests_total{model=\"demo\",status=\"200\"} 1"));
        assert!(text.contains(
            "llorch_request_failures_total{code=\"server_overloaded\",model=\"demo\",reason=\"overloaded\"} 1"
        ));
    }
}
