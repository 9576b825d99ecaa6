//! The asking side of a remote request: the relay numbers it, sends it to the serving node's
//! agent, and feeds the events that agent casts back into an ordinary job channel, so the API
//! streams a remote job exactly as a local one. A client that leaves cancels the job there.
//! A serving node that is lost ends its jobs here: one that has produced no token with
//! `model_crashed`, so that it is retried elsewhere as after a local crash, and a running
//! stream with `model_unavailable`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::rpc::CallResult;
use tokio::sync::mpsc::{self, Sender, UnboundedReceiver, UnboundedSender};

use super::wire::{self, Admission, Cancel, Events, Generate};
use super::{agent_of, AgentMsg};
use crate::actors::engine::{EngineError, GenerationRequest, TokenEvent, EVENT_BUFFER};
use crate::actors::router::{Admitted, RouteError};

/// How long a serving node may take to admit a request.
const ADMIT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a forwarding task looks at its request's cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(100);

/// One request waiting for events.
struct Open {
    node: String,
    to: UnboundedSender<TokenEvent>,
    /// Whether a token has been passed on.
    streaming: bool,
}

/// This node's remote requests, by number.
#[derive(Clone)]
pub struct Relay {
    node: String,
    open: Arc<Mutex<(u64, HashMap<u64, Open>)>>,
}

impl Relay {
    /// The relay of node `node`.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_string(),
            open: Arc::default(),
        }
    }

    /// Sends `request` for `model` to `node` and, once admitted there, returns its job as a
    /// local admission would.
    pub async fn dispatch(
        &self,
        node: &str,
        model: &str,
        request: GenerationRequest,
    ) -> Result<Admitted, RouteError> {
        let unavailable = |reason: String| RouteError::Unavailable {
            model: model.to_string(),
            reason,
        };
        let agent = agent_of(node).ok_or_else(|| unavailable(format!("node {node} left")))?;
        let (to, from) = mpsc::unbounded_channel();
        let req_id = self.open(node, to);
        let body = Generate {
            origin: self.node.clone(),
            req_id,
            model: model.to_string(),
            request,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        if bytes.len() > wire::MAX_REQUEST_BYTES {
            self.close(req_id);
            return Err(unavailable(format!(
                "the request is {} bytes, over the {} a peer takes",
                bytes.len(),
                wire::MAX_REQUEST_BYTES
            )));
        }
        let call = agent
            .call(
                |reply| AgentMsg::Generate(bytes, reply),
                Some(ADMIT_TIMEOUT),
            )
            .await;
        let admission: Admission = match call {
            Ok(CallResult::Success(answer)) => serde_json::from_slice(&answer)
                .unwrap_or_else(|err| Err(unavailable(format!("unreadable admission: {err}")))),
            _ => Err(unavailable(format!("node {node} did not answer"))),
        };
        let (queue_ms, request_ms) = admission.inspect_err(|_| self.close(req_id))?;
        let (events, receiver) = mpsc::channel(EVENT_BUFFER);
        let cancel = Arc::new(AtomicBool::new(false));
        tokio::spawn(forward(
            self.clone(),
            node.to_string(),
            req_id,
            from,
            events,
            cancel.clone(),
        ));
        Ok(Admitted {
            events: receiver,
            cancel,
            queue_timeout: Duration::from_millis(queue_ms),
            request_timeout: Duration::from_millis(request_ms),
        })
    }

    fn open(&self, node: &str, to: UnboundedSender<TokenEvent>) -> u64 {
        let Ok(mut open) = self.open.lock() else {
            return 0;
        };
        open.0 += 1;
        let req_id = open.0;
        let entry = Open {
            node: node.to_string(),
            to,
            streaming: false,
        };
        open.1.insert(req_id, entry);
        req_id
    }

    fn close(&self, req_id: u64) {
        if let Ok(mut open) = self.open.lock() {
            open.1.remove(&req_id);
        }
    }

    /// Hands a batch of events to its request; `false` when no request here has that
    /// number any more (its client left), so the serving node should stop.
    pub(super) fn deliver(&self, batch: Events) -> bool {
        let Ok(mut open) = self.open.lock() else {
            return false;
        };
        let Some(entry) = open.1.get_mut(&batch.req_id) else {
            return false;
        };
        let mut ended = batch.end;
        for event in batch.events {
            ended |= wire::terminal(&event);
            entry.streaming |= matches!(event, TokenEvent::Token { .. });
            if entry.to.send(event).is_err() {
                ended = true;
            }
        }
        if ended {
            open.1.remove(&batch.req_id);
        }
        true
    }

    /// Ends every request served by a node not in `connected`: it was lost.
    pub(super) fn keep_only(&self, connected: &[String]) {
        let Ok(mut open) = self.open.lock() else {
            return;
        };
        open.1.retain(|_, entry| {
            let alive = connected.contains(&entry.node);
            if !alive {
                let reason = format!("the node {} serving this request was lost", entry.node);
                let error = match entry.streaming {
                    true => EngineError::Unavailable(reason),
                    false => EngineError::Crashed(reason),
                };
                let _ = entry.to.send(TokenEvent::Failed(error));
            }
            alive
        });
    }

    /// Asks `node` to stop the job it runs for this node's request `req_id`.
    pub(super) fn cancel_on(&self, node: &str, req_id: u64) {
        let Some(agent) = agent_of(node) else {
            return;
        };
        let body = Cancel {
            origin: self.node.clone(),
            req_id,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let _ = agent.cast(AgentMsg::Cancel(bytes));
    }

    /// This node's requests running on `node`.
    pub fn open_on(&self, node: &str) -> usize {
        self.open
            .lock()
            .map(|open| open.1.values().filter(|o| o.node == node).count())
            .unwrap_or(0)
    }
}

/// Moves a remote job's events into its job channel until it ends; a client that leaves
/// (the channel closed, or the cancel flag set) cancels the job on the serving node.
async fn forward(
    relay: Relay,
    node: String,
    req_id: u64,
    mut from: UnboundedReceiver<TokenEvent>,
    to: Sender<TokenEvent>,
    cancel: Arc<AtomicBool>,
) {
    let mut poll = tokio::time::interval(CANCEL_POLL);
    loop {
        tokio::select! {
            event = from.recv() => match event {
                Some(event) => {
                    let last = wire::terminal(&event);
                    if to.send(event).await.is_err() {
                        break;
                    }
                    if last {
                        return;
                    }
                }
                None => return,
            },
            () = to.closed() => break,
            _ = poll.tick() => if cancel.load(Ordering::Relaxed) {
                break;
            },
        }
    }
    relay.close(req_id);
    relay.cancel_on(&node, req_id);
}
