//! The wire types of `pool.toml`: exactly what the file may say, with documented defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default waiting requests per model before 503.
pub const DEFAULT_MAX_QUEUE: usize = 64;

/// The whole file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolFile {
    /// Schema version; must be 1.
    pub version: u32,
    /// HTTP server settings.
    #[serde(default)]
    pub server: ServerSection,
    /// The models to serve.
    #[serde(default)]
    pub models: Vec<ModelEntry>,
    /// Per-device settings: `[devices.cpu]`, `[devices."cuda:0"]`.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceSection>,
    /// Joins this daemon with others into one pool (read at start only).
    #[serde(default)]
    pub cluster: Option<ClusterSection>,
}

/// `[cluster]`: this node's name, where its cluster listener binds, and the peers it dials.
/// The shared secret comes from `LLORCH_CLUSTER_COOKIE`, never from the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// This node's name, unique in the cluster (letters, digits, `-`, `_`, `.`).
    pub node: String,
    /// The cluster listener's address, e.g. `"127.0.0.1:7410"`.
    pub listen: String,
    /// The other nodes' cluster listeners (`host:port`), dialled and re-dialled when lost.
    #[serde(default)]
    pub peers: Vec<String>,
    /// This node's certificate chain (PEM): with `tls_key` and `tls_ca`, links use mutual TLS.
    #[serde(default)]
    pub tls_cert: Option<String>,
    /// This node's private key (PEM).
    #[serde(default)]
    pub tls_key: Option<String>,
    /// The cluster's certificate authority (PEM): peers must present a certificate it signed.
    #[serde(default)]
    pub tls_ca: Option<String>,
}

/// `[devices."<device>"]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// Memory the models on this device may hold, e.g. `"8GiB"` (default: unlimited).
    #[serde(default)]
    pub memory_budget: Option<String>,
}

/// `[server]`. Durations are strings such as `"30s"`, sizes strings such as `"2MiB"`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on (default `127.0.0.1:8080`).
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Longest time to receive a request's headers before the connection is closed
    /// (default `"30s"`).
    #[serde(default)]
    pub header_timeout: Option<String>,
    /// Longest time to receive a request's body before 408 (default `"30s"`).
    #[serde(default)]
    pub body_timeout: Option<String>,
    /// Largest inference request body (default `"2MiB"`; admin bodies are capped at 64 KiB).
    #[serde(default)]
    pub max_body: Option<String>,
    /// Most open connections; further ones wait to be accepted (default 1024).
    #[serde(default)]
    pub max_connections: Option<usize>,
    /// Worker threads that serve HTTP (default one per 8 CPU cores, at least one; read at
    /// start, a reload keeps the running count).
    #[serde(default)]
    pub http_threads: Option<usize>,
    /// How long in-flight requests may finish after SIGTERM before they end with
    /// `server_shutdown` (default `"30s"`).
    #[serde(default)]
    pub shutdown_timeout: Option<String>,
    /// Serve `/metrics` without a key (default false: the admin key is needed when keys are set).
    #[serde(default)]
    pub metrics_public: bool,
    /// Most chat messages per request (default 2048).
    #[serde(default)]
    pub max_messages: Option<usize>,
    /// Most stop strings per request (default 4).
    #[serde(default)]
    pub max_stop: Option<usize>,
    /// Longest stop string in bytes (default 256).
    #[serde(default)]
    pub max_stop_bytes: Option<usize>,
    /// Origins allowed by CORS (default none: no CORS headers at all).
    #[serde(default)]
    pub cors_origins: Vec<String>,
    /// Host names accepted besides loopback ones when listening on loopback (default none).
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Inference requests per second per key (per client address without keys), e.g. `10`
    /// (default: no limit).
    #[serde(default)]
    pub rate_limit: Option<f64>,
    /// Requests a caller may send at once before the rate applies (default: one second's worth).
    #[serde(default)]
    pub rate_burst: Option<u32>,
    /// The only folder `POST /admin/models` may load local models from (relative to this
    /// file; default: the folder of this file).
    #[serde(default)]
    pub models_root: Option<String>,
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// What clients send as `model`.
    pub name: String,
    /// A local HuggingFace directory, a `.gguf` file, `hf:org/repo[@rev]` or `builtin:demo`.
    pub source: String,
    /// One replica per entry: `cpu`, `cuda:N`, `metal:N` (default `["cpu"]`).
    #[serde(default = "default_devices")]
    pub devices: Vec<String>,
    /// `auto` (bf16 on CUDA, f32 elsewhere), `f32`, `f16` or `bf16` (default `auto`).
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Sequences generating at once per replica (default: 16 on the CPU and 64 on a GPU for
    /// a batched model, 1 for the others).
    #[serde(default)]
    pub max_concurrent: Option<usize>,
    /// Tokens per forward pass, the running sequences' next tokens and chunks of prompts
    /// together (default 256 on the CPU, 2048 on a GPU; at least `max_concurrent`).
    #[serde(default)]
    pub max_batch_tokens: Option<usize>,
    /// Size of each replica's paged KV cache, e.g. `"2GiB"` (default: `max_concurrent`
    /// sequences of up to 4096 tokens, at most a quarter of the device's free memory).
    #[serde(default)]
    pub kv_cache: Option<String>,
    /// How the KV cache stores keys and values: `"auto"` (f32 on the CPU, the compute dtype
    /// on a GPU), `"f32"` or `"f16"` (half the memory and the bytes a decode step reads, as
    /// llama.cpp's default cache; on a GPU only with `dtype = "f16"`). Default `"auto"`.
    #[serde(default)]
    pub kv_cache_dtype: Option<String>,
    /// Which requests reuse each other's cached prompt blocks: `"key"` (those of the same
    /// API key), `"global"` (all) or `"off"` (default `"key"`).
    #[serde(default)]
    pub prefix_cache: Option<String>,
    /// Requests waiting per model before new ones get 503 (default 64).
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    /// Cap on prompt plus generated tokens (default: the model's context length).
    #[serde(default)]
    pub max_seq_len: Option<usize>,
    /// Load at startup (default true); `false` loads on the first request.
    #[serde(default = "default_true")]
    pub preload: bool,
    /// Unload after this much idle time, e.g. `"5m"` (default: never).
    #[serde(default)]
    pub keep_alive: Option<String>,
    /// Never unload automatically to make room (default false).
    #[serde(default)]
    pub pinned: bool,
    /// A generation step running longer than this fails its requests with
    /// `generation_stalled` and restarts the replica (default `"30s"`).
    #[serde(default)]
    pub stall_timeout: Option<String>,
    /// Longest a request may wait for a free slot before 503 `queue_timeout` (default `"60s"`).
    #[serde(default)]
    pub queue_timeout: Option<String>,
    /// Longest a request may run in all before it ends with `deadline_exceeded`
    /// (default `"600s"`).
    #[serde(default)]
    pub request_timeout: Option<String>,
    /// Longest a load may take before the replica is `failed` (default `"300s"`).
    #[serde(default)]
    pub load_timeout: Option<String>,
    /// Longest a stream stays paused because its client reads nothing before it ends with
    /// `slow_reader` (default `"30s"`).
    #[serde(default)]
    pub slow_reader_timeout: Option<String>,
    /// Whether requests for a model that is loading or restarting wait in the queue (default
    /// true); `false` answers 503 `model_loading` or `model_restarting` at once.
    #[serde(default = "default_true")]
    pub queue_during_load: bool,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            header_timeout: None,
            body_timeout: None,
            max_body: None,
            max_connections: None,
            http_threads: None,
            shutdown_timeout: None,
            metrics_public: false,
            max_messages: None,
            max_stop: None,
            max_stop_bytes: None,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            rate_limit: None,
            rate_burst: None,
            models_root: None,
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_listen() -> String {
    DEFAULT_LISTEN.to_string()
}

fn default_devices() -> Vec<String> {
    vec!["cpu".to_string()]
}

fn default_dtype() -> String {
    "auto".to_string()
}

fn default_max_queue() -> usize {
    DEFAULT_MAX_QUEUE
}
