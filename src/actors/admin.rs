//! Admin operations on the pool (load, evict, reload, re-read pool.toml): their commands,
//! outcomes and errors as the supervisor sees them.

use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::ActorRef;

use super::supervisor::SupervisorMsg;
use crate::config::{ConfigError, ModelSpec};

/// How long an evict (or the old generation of a reload) may drain before its remaining
/// requests end with `model_evicted`.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a load may take before it is reported failed.
pub const LOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// What kind of failure took a replica down, as far as a client needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// The model files are malformed (answered as `invalid_model_file`).
    InvalidFile,
    /// The device ran out of memory while loading (answered as `out_of_memory`).
    OutOfMemory,
    /// Anything else: a missing file, a crash, a load past its deadline.
    Other,
}

/// Why a replica failed to load or stopped serving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    /// Its kind.
    pub kind: FailureKind,
    /// The message a user sees.
    pub message: String,
}

impl Failure {
    /// A failure of kind [`FailureKind::Other`].
    pub fn other(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Other,
            message: message.into(),
        }
    }

    /// Classifies a load error.
    pub fn from_load(err: &crate::models::LoadError) -> Self {
        if err.is_out_of_memory() {
            return Self {
                kind: FailureKind::OutOfMemory,
                message: format!("the device ran out of memory loading the weights ({err})"),
            };
        }
        Self {
            kind: if err.is_invalid_file() {
                FailureKind::InvalidFile
            } else {
                FailureKind::Other
            },
            message: err.to_string(),
        }
    }
}

/// An admin command.
#[derive(Debug, Clone)]
pub enum AdminCommand {
    /// Load a new model.
    Load(ModelSpec),
    /// Evict a model: drain (or abort) its requests, stop its replicas, free their memory.
    Evict {
        /// The model.
        name: String,
        /// End in-flight requests at once instead of draining.
        abort: bool,
        /// How long to drain.
        drain: Duration,
    },
    /// Reload a model (from a new spec, or its current one), make-before-break.
    Reload {
        /// The model.
        name: String,
        /// The new spec; `None` reloads the current one.
        spec: Option<ModelSpec>,
    },
    /// Re-read the pool file and apply the difference.
    ReloadPool,
}

/// What happened to one model.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ModelOutcome {
    /// The model.
    pub name: String,
    /// `loaded`, `evicted`, `reloaded`, `unchanged` or `failed`.
    pub action: &'static str,
    /// The error, for `failed`.
    pub error: Option<String>,
}

/// Why an admin command failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdminError {
    /// No model by that name.
    #[error("the model {0:?} does not exist")]
    NotFound(String),
    /// A model by that name is already loaded.
    #[error("a model named {0:?} is already loaded")]
    AlreadyLoaded(String),
    /// Another admin operation on the model is running.
    #[error("another operation on {0:?} is in progress")]
    InProgress(String),
    /// The model failed to load (the old generation, if any, keeps serving).
    #[error("the model {name:?} failed to load: {reason}")]
    LoadFailed {
        /// The model.
        name: String,
        /// Why.
        reason: Failure,
    },
    /// The pool file is invalid; nothing changed.
    #[error("{0}")]
    Config(ConfigError),
    /// The pool was started without a file to re-read.
    #[error("the pool was not started from a file")]
    NoPoolFile,
    /// The supervisor did not answer.
    #[error("the supervisor did not answer: {0}")]
    Unavailable(String),
}

/// Runs `command` on the supervisor (answering when it is done, or only started when `wait`
/// is false), waiting at most `timeout` for the answer.
pub async fn run_admin(
    supervisor: &ActorRef<SupervisorMsg>,
    command: AdminCommand,
    wait: bool,
    timeout: Duration,
) -> Result<Vec<ModelOutcome>, AdminError> {
    let call = supervisor
        .call(
            |reply| SupervisorMsg::Admin {
                command,
                wait,
                reply,
            },
            Some(timeout),
        )
        .await;
    match call {
        Ok(CallResult::Success(result)) => result,
        _ => Err(AdminError::Unavailable("no answer".to_string())),
    }
}
