//! Evict and reload across nodes: the request an agent carries out for another node, and its
//! answer, as JSON on the wire.

use std::time::Duration;

use ractor::ActorRef;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::actors::admin::{run_admin, AdminCommand, AdminError};
use crate::actors::supervisor::SupervisorMsg;

/// How long a remote admin operation may take (a reload loads a model).
pub const REMOTE_ADMIN_TIMEOUT: Duration = Duration::from_secs(600);

/// An admin operation on a model of another node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum RemoteAdmin {
    /// Evict it (drain for `drain_ms`, or abort).
    Evict {
        /// The model.
        name: String,
        /// End in-flight requests at once.
        abort: bool,
        /// How long to drain, in milliseconds.
        drain_ms: u64,
        /// Answer when done rather than when started.
        wait: bool,
    },
    /// Reload it.
    Reload {
        /// The model.
        name: String,
        /// Answer when done rather than when started.
        wait: bool,
    },
}

/// How a node answered: its outcomes, or why it refused.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum RemoteAnswer {
    /// Each model's outcome (`{"name", "action", "error"}`).
    Done(Vec<Value>),
    /// The node has no such model.
    NotFound(String),
    /// The node refused or failed the operation.
    Refused(String),
}

impl RemoteAdmin {
    /// The model it addresses.
    pub fn name(&self) -> &str {
        match self {
            Self::Evict { name, .. } | Self::Reload { name, .. } => name,
        }
    }

    /// Whether to answer when done rather than when started.
    pub fn wait(&self) -> bool {
        match self {
            Self::Evict { wait, .. } | Self::Reload { wait, .. } => *wait,
        }
    }

    /// The supervisor's command for it, and whether to answer when done.
    pub fn command(self) -> (AdminCommand, bool) {
        match self {
            Self::Evict {
                name,
                abort,
                drain_ms,
                wait,
            } => (
                AdminCommand::Evict {
                    name,
                    abort,
                    drain: Duration::from_millis(drain_ms),
                },
                wait,
            ),
            Self::Reload { name, wait } => (AdminCommand::Reload { name, spec: None }, wait),
        }
    }
}

/// Runs `request` on this node's supervisor.
pub async fn carry_out(supervisor: &ActorRef<SupervisorMsg>, request: RemoteAdmin) -> RemoteAnswer {
    let (command, wait) = request.command();
    match run_admin(supervisor, command, wait, REMOTE_ADMIN_TIMEOUT).await {
        Ok(outcomes) => RemoteAnswer::Done(
            outcomes
                .iter()
                .map(|o| serde_json::to_value(o).unwrap_or_default())
                .collect(),
        ),
        Err(err @ AdminError::NotFound(_)) => RemoteAnswer::NotFound(err.to_string()),
        Err(err) => RemoteAnswer::Refused(err.to_string()),
    }
}
