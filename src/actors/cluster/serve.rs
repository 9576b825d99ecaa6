//! The serving side of a remote request: the agent admits it through this node's router like
//! any local request, then a pump casts its events back to the asking node's agent in
//! batches (whatever is ready, at most [`BATCH`] events, sent at once, so a token waits for
//! no timer). A cancel from the asking node, or the loss of that node, stops the job.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ractor::rpc::CallResult;
use ractor::ActorRef;
use tokio::sync::mpsc::Receiver;

use super::wire::{self, Admission, Cancel, Events, Generate};
use super::{agent_of, AgentMsg};
use crate::actors::engine::TokenEvent;
use crate::actors::router::{RouteError, RouterMsg};

/// The most events one cast carries.
const BATCH: usize = 64;
/// How long the router may take to admit a request.
const ROUTER_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a pump waiting for events checks that the asking node is still there.
const ORIGIN_CHECK: Duration = Duration::from_secs(1);

/// A job run for another node: (asking node, its number for the request).
type Key = (String, u64);

/// The cancel flags of the jobs this node runs for others.
#[derive(Clone, Default)]
pub struct Served(Arc<Mutex<HashMap<Key, Arc<AtomicBool>>>>);

impl Served {
    /// Stops the job `cancel` names, if it still runs.
    pub(super) fn cancel(&self, cancel: &Cancel) {
        let key = (cancel.origin.clone(), cancel.req_id);
        if let Some(flag) = self.0.lock().ok().and_then(|jobs| jobs.get(&key).cloned()) {
            flag.store(true, Ordering::Relaxed);
        }
    }

    fn remove(&self, key: &Key) {
        if let Ok(mut jobs) = self.0.lock() {
            jobs.remove(key);
        }
    }
}

/// Admits a request another node sent; the answer is an [`Admission`] as JSON.
pub(super) async fn generate(
    node: String,
    router: ActorRef<RouterMsg>,
    served: Served,
    body: Vec<u8>,
) -> Vec<u8> {
    let admission: Admission = match serde_json::from_slice::<Generate>(&body) {
        Ok(asked) => admit(node, router, served, asked).await,
        Err(err) => Err(RouteError::Unavailable {
            model: String::new(),
            reason: format!("unreadable request: {err}"),
        }),
    };
    serde_json::to_vec(&admission).unwrap_or_default()
}

async fn admit(
    node: String,
    router: ActorRef<RouterMsg>,
    served: Served,
    asked: Generate,
) -> Admission {
    let Generate {
        origin,
        req_id,
        model,
        request,
    } = asked;
    let call = router
        .call(
            |reply| RouterMsg::Dispatch {
                model: model.clone(),
                request,
                reply,
            },
            Some(ROUTER_TIMEOUT),
        )
        .await;
    let admitted = match call {
        Ok(CallResult::Success(result)) => result?,
        _ => {
            return Err(RouteError::Unavailable {
                model,
                reason: "the router did not answer".to_string(),
            })
        }
    };
    let key = (origin, req_id);
    if let Ok(mut jobs) = served.0.lock() {
        jobs.insert(key.clone(), admitted.cancel.clone());
    }
    let deadlines = (
        millis(admitted.queue_timeout),
        millis(admitted.request_timeout),
    );
    tokio::spawn(async move {
        pump(&node, &key, admitted.events, &admitted.cancel).await;
        served.remove(&key);
    });
    Ok(deadlines)
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Casts a job's events to the asking node until the job ends or that node is gone.
async fn pump(
    node: &str,
    (origin, req_id): &Key,
    mut events: Receiver<TokenEvent>,
    cancel: &AtomicBool,
) {
    let Some(agent) = agent_of(origin) else {
        cancel.store(true, Ordering::Relaxed);
        return;
    };
    let mut check = tokio::time::interval(ORIGIN_CHECK);
    check.tick().await;
    loop {
        let first = tokio::select! {
            event = events.recv() => event,
            _ = check.tick() => {
                if agent_of(origin).is_none() {
                    cancel.store(true, Ordering::Relaxed);
                    return;
                }
                continue;
            }
        };
        let mut batch: Vec<TokenEvent> = first.into_iter().collect();
        let end = batch.is_empty();
        while batch.len() < BATCH {
            match events.try_recv() {
                Ok(event) => batch.push(event),
                Err(_) => break,
            }
        }
        let last = end || batch.last().is_some_and(wire::terminal);
        let body = Events {
            node: node.to_string(),
            req_id: *req_id,
            events: batch,
            end,
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        if agent.cast(AgentMsg::Events(bytes)).is_err() {
            cancel.store(true, Ordering::Relaxed);
            return;
        }
        if last {
            return;
        }
    }
}
