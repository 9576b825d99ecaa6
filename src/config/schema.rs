//! The wire types of `pool.toml`: exactly what the file may say, with documented defaults.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The default listen address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// Default requests generating at once per replica.
pub const DEFAULT_MAX_CONCURRENT: usize = 1;
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
}

/// `[devices."<device>"]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSection {
    /// Memory the models on this device may hold, e.g. `"8GiB"` (default: unlimited).
    #[serde(default)]
    pub memory_budget: Option<String>,
}

/// `[server]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to listen on (default `127.0.0.1:8080`).
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for ServerSection {
    fn default() -> Self {
        Self {
            listen: default_listen(),
        }
    }
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Requests generating at once per replica (default 1).
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
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

fn default_max_concurrent() -> usize {
    DEFAULT_MAX_CONCURRENT
}

fn default_max_queue() -> usize {
    DEFAULT_MAX_QUEUE
}
