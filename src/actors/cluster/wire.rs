//! The bodies of the agent's generation messages, as JSON: a request sent to the node that
//! serves it, its admission, its events sent back in batches, and a cancel.

use serde::{Deserialize, Serialize};

use crate::actors::engine::{GenerationRequest, TokenEvent};
use crate::actors::router::RouteError;

/// The largest request body sent to a peer: ractor_cluster tears a link down on an inbound
/// frame over 16 MiB, so a request stays well below.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024 * 1024;

/// A request for a model of another node.
#[derive(Debug, Serialize, Deserialize)]
pub struct Generate {
    /// The node that asked (its agent takes the events).
    pub origin: String,
    /// The request's number on that node.
    pub req_id: u64,
    /// The model.
    pub model: String,
    /// The request.
    pub request: GenerationRequest,
}

/// How the serving node admitted it: its deadlines in milliseconds, or why not.
pub type Admission = Result<(u64, u64), RouteError>;

/// Events of one request, in order, from the node that serves it.
#[derive(Debug, Serialize, Deserialize)]
pub struct Events {
    /// The serving node.
    pub node: String,
    /// The request's number on the asking node.
    pub req_id: u64,
    /// The events since the last batch.
    pub events: Vec<TokenEvent>,
    /// The job ended without a terminal event (its engine died): no more will come.
    pub end: bool,
}

/// The asking node no longer wants a request.
#[derive(Debug, Serialize, Deserialize)]
pub struct Cancel {
    /// The node that asked.
    pub origin: String,
    /// The request's number there.
    pub req_id: u64,
}

/// Whether `event` ends its stream.
pub fn terminal(event: &TokenEvent) -> bool {
    matches!(event, TokenEvent::Finished { .. } | TokenEvent::Failed(_))
}
