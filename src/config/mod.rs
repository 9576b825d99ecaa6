//! Configuration: `pool.toml` plus `LLORCH_SERVER__*` environment overrides, validated in full
//! before any actor starts. Actors only ever see the validated [`PoolConfig`].

mod cluster;
mod confine;
mod schema;
mod validate;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Serialized};
use figment::Figment;

pub use cluster::{ClusterConfig, ClusterTls};
pub use confine::{confine, Outside};
pub use schema::{ClusterSection, DeviceSection, ModelEntry, PoolFile, ServerSection};
pub use validate::{parse_bytes, parse_duration, validate, validate_entry};

use crate::models::batch::KvDtype;
use crate::models::{DTypeChoice, DeviceSpec, ModelSource};

/// A validated pool.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Server settings.
    pub server: ServerConfig,
    /// Models in file order.
    pub models: Vec<ModelSpec>,
    /// Memory budgets per device, in bytes (devices without one are unlimited).
    pub budgets: HashMap<DeviceSpec, u64>,
    /// `[cluster]`, when this daemon joins others.
    pub cluster: Option<ClusterConfig>,
}

/// Validated server settings.
#[derive(Debug, Clone, PartialEq)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// Longest time to receive a request's headers.
    pub header_timeout: Duration,
    /// Longest time to receive a request's body (then 408).
    pub body_timeout: Duration,
    /// Largest inference request body in bytes.
    pub max_body: usize,
    /// Most open connections.
    pub max_connections: usize,
    /// Worker threads of the async runtime that serves HTTP (read at start).
    pub http_threads: usize,
    /// How long in-flight requests may finish after a shutdown signal.
    pub shutdown_timeout: Duration,
    /// Whether `/metrics` needs no key.
    pub metrics_public: bool,
    /// Per-request limits checked before a request reaches a model.
    pub limits: RequestLimits,
    /// Origins allowed by CORS.
    pub cors_origins: Vec<String>,
    /// Host names accepted besides loopback ones.
    pub allowed_hosts: Vec<String>,
    /// Per-caller request rate, if limited.
    pub rate_limit: Option<Rate>,
    /// The folder admin loads may read local models from.
    pub models_root: PathBuf,
}

impl ServerConfig {
    /// The defaults of every field, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Self {
        Self {
            listen,
            header_timeout: DEFAULT_HEADER_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_body: DEFAULT_MAX_BODY,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            http_threads: default_http_threads(),
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            metrics_public: false,
            limits: RequestLimits::default(),
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            rate_limit: None,
            models_root: PathBuf::from("."),
        }
    }
}

/// Per-request limits (RELIABILITY.md §9).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    /// Most chat messages.
    pub max_messages: usize,
    /// Most stop strings.
    pub max_stop: usize,
    /// Longest stop string in bytes.
    pub max_stop_bytes: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        Self {
            max_messages: 2048,
            max_stop: 4,
            max_stop_bytes: 256,
        }
    }
}

/// Default time to receive a request's headers.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to receive a request's body.
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(30);
/// Default largest inference request body (2 MiB).
pub const DEFAULT_MAX_BODY: usize = 2 * 1024 * 1024;
/// Default most open connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// The default number of HTTP worker threads: one per 8 CPU cores, at least one. Forward
/// passes use every core; an HTTP worker woken for each token takes a core from them, and a
/// second worker woken to look for more work takes another. With two workers on a 2-core box
/// the daemon lost a median 3.4 % of the bare engine's decode tokens/s, with one 1.1 % (24
/// launches each of `llorch bench --http`, small Q4_0 model, two threads; run 10 in
/// `docs/bench-runs/`). Serving HTTP needs little CPU: tokenization and forward passes run on
/// their own threads.
pub fn default_http_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |cores| (cores.get() / 8).max(1))
}

/// Default shutdown drain.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);
/// Default longest wait in a model's queue.
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default longest a request may run in all.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Default longest a load may take.
pub const DEFAULT_LOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// A validated model entry.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSpec {
    /// The routing name.
    pub name: String,
    /// Where the weights come from.
    pub source: ModelSource,
    /// One replica per device (a device may repeat).
    pub devices: Vec<DeviceSpec>,
    /// The compute dtype.
    pub dtype: DTypeChoice,
    /// Sequences generating at once per replica (`None`: the engine's default).
    pub max_concurrent: Option<usize>,
    /// Tokens per forward pass (`None`: the engine's default).
    pub max_batch_tokens: Option<usize>,
    /// Bytes of each replica's KV cache (`None`: the engine's default).
    pub kv_cache: Option<u64>,
    /// How the KV cache stores keys and values.
    pub kv_cache_dtype: KvDtype,
    /// Which requests share cached prompt blocks.
    pub prefix_cache: PrefixCacheScope,
    /// Waiting requests per model.
    pub max_queue: usize,
    /// Cap on prompt plus generated tokens.
    pub max_seq_len: Option<usize>,
    /// Load at startup.
    pub preload: bool,
    /// Unload after this much idle time.
    pub keep_alive: Option<Duration>,
    /// Never unload automatically to make room.
    pub pinned: bool,
    /// Longest a generation step may run before the replica is declared stalled.
    pub stall_timeout: Duration,
    /// Longest a request may wait in the queue.
    pub queue_timeout: Duration,
    /// Longest a request may run in all.
    pub request_timeout: Duration,
    /// Longest a load may take.
    pub load_timeout: Duration,
    /// Longest a stream may stay paused by a client that reads nothing.
    pub slow_reader_timeout: Duration,
    /// Whether requests wait while the model loads or restarts (else 503 at once).
    pub queue_during_load: bool,
}

impl ModelSpec {
    /// Bytes one replica holds on `device`: its weights and an explicit `kv_cache` (the
    /// default cache, at most a quarter of the memory free at load, is not known before).
    pub fn footprint(&self, device: DeviceSpec) -> u64 {
        crate::models::estimate_weight_bytes(&self.source, self.dtype, device)
            + self.kv_cache.unwrap_or(0)
    }
}

/// Which requests reuse each other's cached prompt blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefixCacheScope {
    /// Requests made with the same API key (all requests of a pool without keys).
    #[default]
    Key,
    /// Every request.
    Global,
    /// None: no prompt blocks are cached.
    Off,
}

impl std::str::FromStr for PrefixCacheScope {
    type Err = String;

    fn from_str(value: &str) -> Result<Self, String> {
        match value {
            "key" => Ok(PrefixCacheScope::Key),
            "global" => Ok(PrefixCacheScope::Global),
            "off" => Ok(PrefixCacheScope::Off),
            other => Err(format!(
                "expected \"key\", \"global\" or \"off\", got {other:?}"
            )),
        }
    }
}

/// A per-caller request rate: `per_second` requests on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Bucket size.
    pub burst: f64,
}

/// How long a stream may stay paused by a client that reads nothing, unless its model says.
pub const DEFAULT_SLOW_READER_TIMEOUT: Duration = Duration::from_secs(30);

/// The default stall timeout.
pub const DEFAULT_STALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A configuration error that names the file, the line (when known) and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}{}: {field}: {message}", file.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
pub struct ConfigError {
    /// The config file.
    pub file: PathBuf,
    /// 1-based line of the offending entry, when it can be located.
    pub line: Option<usize>,
    /// The field path (`models[1].name`, `server.listen`, ...).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Reads, overrides and validates a pool file.
pub fn load(path: &Path) -> Result<PoolConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|err| ConfigError {
        file: path.to_path_buf(),
        line: None,
        field: "-".to_string(),
        message: format!("cannot read the file: {err}"),
    })?;
    let parsed = parse(path, &text)?;
    let merged: PoolFile = Figment::from(Serialized::defaults(parsed))
        .merge(
            Env::prefixed("LLORCH_")
                .split("__")
                .filter(|key| key.as_str().to_ascii_lowercase().starts_with("server.")),
        )
        .extract()
        .map_err(|err| ConfigError {
            file: path.to_path_buf(),
            line: None,
            field: err
                .path
                .last()
                .cloned()
                .unwrap_or_else(|| "environment".to_string()),
            message: format!("environment override: {err}"),
        })?;
    validate(path, &text, &merged)
}

/// Parses the TOML text into the wire types, locating errors by line.
pub fn parse(path: &Path, text: &str) -> Result<PoolFile, ConfigError> {
    toml::from_str::<PoolFile>(text).map_err(|err| {
        let line = err
            .span()
            .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
        let message = err.message().to_string();
        let field = field_of(&message, line.and_then(|l| text.lines().nth(l - 1)));
        ConfigError {
            file: path.to_path_buf(),
            line,
            field,
            message,
        }
    })
}

/// Names the field of a TOML error: the one in backquotes in a field error's message, else the
/// key or table on the offending line.
fn field_of(message: &str, line: Option<&str>) -> String {
    let about_a_field = message.contains("field");
    if let Some(start) = message.find('`').filter(|_| about_a_field) {
        if let Some(len) = message[start + 1..].find('`') {
            return message[start + 1..start + 1 + len].to_string();
        }
    }
    line.and_then(|l| l.split('=').next())
        .map(|key| key.trim().trim_matches(['[', ']']).to_string())
        .filter(|key| !key.is_empty())
        .unwrap_or_else(|| "-".to_string())
}
