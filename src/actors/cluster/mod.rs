//! One pool across machines, on `ractor_cluster`: each node runs a `NodeServer` and one
//! remotable [`ClusterAgent`] (named `agent@<node>`, in the process group `agents` of the
//! scope [`SCOPE`]); a watcher task dials the configured peers (again and again, with backoff,
//! when a link is lost), asks every peer's agent for its listing each second, and forgets a
//! node that misses [`MISSES`] answers in a row, closing its link so that a frozen peer is
//! dropped too (ractor_cluster never times a peer out by itself).

mod admin;
mod links;
mod relay;
mod serve;
mod tls;
mod view;
mod wire;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{pg, Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use ractor_cluster::{IncomingEncryptionMode, NodeServer, NodeServerMessage, RactorClusterMessage};

pub use admin::{RemoteAdmin, RemoteAnswer};
pub use relay::Relay;
pub use serve::Served;
pub use view::{ClusterView, RemoteModel};

use super::exposition::render;
use super::listing::listing;
use super::router::RouterMsg;
use super::supervisor::SupervisorMsg;
use crate::config::ClusterConfig;
use crate::metrics::Metrics;

/// The process-group scope of llorch's cluster actors; a change of the messages' wire format
/// changes it, so that nodes of different versions ignore each other.
pub const SCOPE: &str = "llorch.v1";
/// The group every node's agent joins.
const AGENTS: &str = "agents";
/// How often the watcher looks at the links and the peers.
const TICK: Duration = Duration::from_secs(1);
/// How long a peer's agent has to answer.
const ANSWER: Duration = Duration::from_millis(900);
/// Answers a peer may miss in a row before it is forgotten and its link closed.
pub const MISSES: u32 = 3;
/// The longest wait between two dials of an unreachable peer.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// What crosses nodes: each variant travels tagged by its name.
#[derive(RactorClusterMessage)]
pub enum AgentMsg {
    /// Another node asks for this node's listing (`{"models": [...], "devices": [...]}` as
    /// JSON).
    #[rpc]
    Status(RpcReplyPort<Vec<u8>>),
    /// Another node asks this one to evict or reload one of its models (a [`RemoteAdmin`] as
    /// JSON); the answer is a [`RemoteAnswer`] as JSON.
    #[rpc]
    Admin(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Another node sends a request for one of this node's models (a `wire::Generate` as
    /// JSON); the answer is its admission (`wire::Admission`), and its events follow as
    /// `Events` casts to the asking node's agent.
    #[rpc]
    Generate(Vec<u8>, RpcReplyPort<Vec<u8>>),
    /// Events of a request this node sent elsewhere (a `wire::Events` as JSON).
    Events(Vec<u8>),
    /// The asking node no longer wants a request this node runs (a `wire::Cancel` as JSON).
    Cancel(Vec<u8>),
    /// Another node asks for this node's metrics (its Prometheus text).
    #[rpc]
    Metrics(RpcReplyPort<Vec<u8>>),
}

/// The agent of this node.
pub struct ClusterAgent;

/// What the agent answers with.
pub struct AgentState {
    node: String,
    router: ActorRef<RouterMsg>,
    supervisor: ActorRef<SupervisorMsg>,
    relay: Relay,
    served: Served,
    metrics: Arc<Metrics>,
}

impl Actor for ClusterAgent {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = AgentState;

    async fn pre_start(
        &self,
        myself: ActorRef<AgentMsg>,
        state: AgentState,
    ) -> Result<AgentState, ActorProcessingErr> {
        pg::join_scoped(
            SCOPE.to_string(),
            AGENTS.to_string(),
            vec![myself.get_cell()],
        );
        Ok(state)
    }

    async fn handle(
        &self,
        _myself: ActorRef<AgentMsg>,
        message: AgentMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            AgentMsg::Status(reply) => {
                let listing = listing(&state.router, &state.supervisor).await;
                let bytes = listing.map(|l| l.to_string().into_bytes());
                let _ = reply.send(bytes.unwrap_or_default());
            }
            AgentMsg::Admin(request, reply) => {
                let supervisor = state.supervisor.clone();
                // A reload may take minutes: the agent keeps answering meanwhile.
                tokio::spawn(async move {
                    let answer = match serde_json::from_slice::<RemoteAdmin>(&request) {
                        Ok(request) => admin::carry_out(&supervisor, request).await,
                        Err(err) => RemoteAnswer::Refused(format!("unreadable request: {err}")),
                    };
                    let _ = reply.send(serde_json::to_vec(&answer).unwrap_or_default());
                });
            }
            AgentMsg::Generate(body, reply) => {
                let (node, router) = (state.node.clone(), state.router.clone());
                let served = state.served.clone();
                tokio::spawn(async move {
                    let _ = reply.send(serve::generate(node, router, served, body).await);
                });
            }
            AgentMsg::Events(body) => match serde_json::from_slice::<wire::Events>(&body) {
                Ok(batch) => {
                    let (node, req_id) = (batch.node.clone(), batch.req_id);
                    if !state.relay.deliver(batch) {
                        state.relay.cancel_on(&node, req_id);
                    }
                }
                Err(err) => tracing::warn!(error = %err, "unreadable events from a peer"),
            },
            AgentMsg::Metrics(reply) => {
                let text = render(&state.router, &state.metrics).await;
                let _ = reply.send(text.unwrap_or_default().into_bytes());
            }
            AgentMsg::Cancel(body) => match serde_json::from_slice::<wire::Cancel>(&body) {
                Ok(cancel) => state.served.cancel(&cancel),
                Err(err) => tracing::warn!(error = %err, "unreadable cancel from a peer"),
            },
        }
        Ok(())
    }
}

/// Asks `node`'s agent to carry out `request`.
pub async fn remote_admin(node: &str, request: &RemoteAdmin) -> RemoteAnswer {
    let Some(agent) = agent_of(node) else {
        return RemoteAnswer::Refused(format!("node {node} is not connected"));
    };
    let bytes = serde_json::to_vec(request).unwrap_or_default();
    let call = agent
        .call(
            |reply| AgentMsg::Admin(bytes, reply),
            Some(admin::REMOTE_ADMIN_TIMEOUT),
        )
        .await;
    match call {
        Ok(CallResult::Success(answer)) => serde_json::from_slice(&answer)
            .unwrap_or_else(|err| RemoteAnswer::Refused(format!("unreadable answer: {err}"))),
        _ => RemoteAnswer::Refused(format!("node {node} did not answer")),
    }
}

/// Every connected peer's metrics (Prometheus text), by node; a peer that does not answer
/// within [`ANSWER`] is left out.
pub async fn peer_metrics() -> Vec<(String, String)> {
    let asked = remote_agents().into_iter().map(|(node, agent)| async move {
        match agent.call(AgentMsg::Metrics, Some(ANSWER)).await {
            Ok(CallResult::Success(text)) => Some((node, String::from_utf8(text).ok()?)),
            _ => None,
        }
    });
    let mut answers: Vec<(String, String)> = futures::future::join_all(asked)
        .await
        .into_iter()
        .flatten()
        .filter(|(_, text)| !text.is_empty())
        .collect();
    answers.sort();
    answers
}

/// The agents of the connected peers, by node.
fn remote_agents() -> Vec<(String, ActorRef<AgentMsg>)> {
    pg::get_scoped_members(&SCOPE.to_string(), &AGENTS.to_string())
        .into_iter()
        .filter(|cell| !cell.get_id().is_local())
        .filter_map(|cell| {
            let node = cell.get_name()?.strip_prefix("agent@")?.to_string();
            Some((node, ActorRef::<AgentMsg>::from(cell)))
        })
        .collect()
}

/// The agent of a connected peer.
fn agent_of(node: &str) -> Option<ActorRef<AgentMsg>> {
    remote_agents()
        .into_iter()
        .find_map(|(peer, agent)| (peer == node).then_some(agent))
}

/// A running cluster membership: the node server, the agent and the watcher.
pub struct Cluster {
    server: ActorRef<NodeServerMessage>,
    agent: ActorRef<AgentMsg>,
    watcher: tokio::task::JoinHandle<()>,
    view: ClusterView,
    relay: Relay,
}

impl Cluster {
    /// Starts this node's listener and agent and begins dialling the peers.
    pub async fn start(
        config: &ClusterConfig,
        cookie: String,
        router: ActorRef<RouterMsg>,
        supervisor: ActorRef<SupervisorMsg>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let tls = config.tls.as_ref().map(tls::load).transpose()?;
        let encryption = tls
            .as_ref()
            .map(|tls| IncomingEncryptionMode::Tls(tls.acceptor.clone()));
        let server = NodeServer::new(
            config.listen.port(),
            cookie,
            config.node.clone(),
            config.listen.ip().to_string(),
            encryption,
            Some(ractor_cluster::node::NodeConnectionMode::Isolated),
        )
        .with_listen_addr(config.listen.ip());
        let (server, _) = Actor::spawn(None, server, ())
            .await
            .map_err(|err| format!("the cluster listener did not start: {err}"))?;
        server
            .cast(NodeServerMessage::SubscribeToEvents {
                id: "llorch.links".to_string(),
                subscription: Box::new(links::LinkLog::default()),
            })
            .map_err(|err| format!("the cluster listener did not start: {err}"))?;
        let name = format!("agent@{}", config.node);
        let relay = Relay::new(&config.node);
        let state = AgentState {
            node: config.node.clone(),
            router,
            supervisor,
            relay: relay.clone(),
            served: Served::default(),
            metrics,
        };
        let (agent, _) = Actor::spawn(Some(name), ClusterAgent, state)
            .await
            .map_err(|err| format!("the cluster agent did not start: {err}"))?;
        let view = ClusterView::new(&config.node);
        let tls_on = tls.is_some();
        let watched = (view.clone(), relay.clone());
        let watcher = tokio::spawn(watch(server.clone(), config.peers.clone(), tls, watched));
        tracing::info!(node = %config.node, listen = %config.listen, peers = ?config.peers, tls = tls_on, "cluster node started");
        Ok(Self {
            server,
            agent,
            watcher,
            view,
            relay,
        })
    }

    /// What this node knows of the others.
    pub fn view(&self) -> ClusterView {
        self.view.clone()
    }

    /// The requests this node sends to others.
    pub fn relay(&self) -> Relay {
        self.relay.clone()
    }

    /// Leaves the cluster: stops the watcher, the agent and the node server.
    pub fn stop(&self) {
        self.watcher.abort();
        self.agent.stop(None);
        self.server.stop(None);
    }
}

/// When a peer may next be dialled, and the wait after that.
struct Dial {
    next: Instant,
    backoff: Duration,
}

/// Every [`TICK`]: dials unconnected peers, asks every agent for its listing, and drops the
/// peers that stopped answering.
async fn watch(
    server: ActorRef<NodeServerMessage>,
    peers: Vec<String>,
    tls: Option<tls::Tls>,
    (view, relay): (ClusterView, Relay),
) {
    let mut dials: HashMap<String, Dial> = HashMap::new();
    let mut misses: HashMap<String, u32> = HashMap::new();
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
        let sessions = match server
            .call(NodeServerMessage::GetSessions, Some(ANSWER))
            .await
        {
            Ok(CallResult::Success(sessions)) => sessions,
            _ => continue,
        };
        for peer in &peers {
            let linked = sessions.values().any(|s| {
                s.peer_addr == *peer
                    || s.peer_name
                        .as_ref()
                        .is_some_and(|n| n.connection_string == *peer)
            });
            if !linked {
                dial(&server, peer, tls.as_ref(), &mut dials).await;
            }
        }
        let agents = remote_agents();
        let asked = futures::future::join_all(agents.iter().map(|(node, agent)| async move {
            let answer = agent.call(AgentMsg::Status, Some(ANSWER)).await;
            let listing = match answer {
                Ok(CallResult::Success(bytes)) => serde_json::from_slice(&bytes).ok(),
                _ => None,
            };
            (node.clone(), listing)
        }))
        .await;
        for (node, listing) in asked {
            match listing {
                Some(listing) => {
                    misses.remove(&node);
                    view.seen(&node, listing);
                }
                None => {
                    let missed = misses.entry(node.clone()).or_default();
                    *missed += 1;
                    if *missed >= MISSES {
                        misses.remove(&node);
                        lose(&sessions, &node, &view);
                    }
                }
            }
        }
        for node in view.nodes() {
            if !agents.iter().any(|(n, _)| *n == node) && view.forget(&node) {
                tracing::warn!(%node, "cluster node left");
            }
        }
        relay.keep_only(&view.nodes());
    }
}

/// Dials `peer` (over TLS when `tls` is set) when its backoff allows; a failure doubles the
/// wait (up to [`MAX_BACKOFF`]).
async fn dial(
    server: &ActorRef<NodeServerMessage>,
    peer: &str,
    tls: Option<&tls::Tls>,
    dials: &mut HashMap<String, Dial>,
) {
    let now = Instant::now();
    let state = dials.entry(peer.to_string()).or_insert(Dial {
        next: now,
        backoff: TICK,
    });
    if now < state.next {
        return;
    }
    let connect = async {
        match tls {
            Some(tls) => {
                let name = tls::server_name(peer)?;
                ractor_cluster::client_connect_enc(server, peer, tls.connector.clone(), name)
                    .await
                    .map_err(|err| err.to_string())
            }
            None => ractor_cluster::client_connect(server, peer)
                .await
                .map_err(|err| err.to_string()),
        }
    };
    let dialled = tokio::time::timeout(ANSWER, connect).await;
    match dialled {
        Ok(Ok(())) => {
            state.backoff = TICK;
            state.next = now + TICK;
        }
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "cluster peer not reachable");
            state.backoff = (state.backoff * 2).min(MAX_BACKOFF);
            state.next = now + state.backoff;
        }
        Err(_) => {
            state.backoff = (state.backoff * 2).min(MAX_BACKOFF);
            state.next = now + state.backoff;
        }
    }
}

/// Forgets a node that stopped answering and closes its link (its remote actors then leave
/// the process groups; the node is dialled again later if configured).
fn lose(
    sessions: &HashMap<u64, ractor_cluster::node::NodeServerSessionInformation>,
    node: &str,
    view: &ClusterView,
) {
    view.forget(node);
    tracing::warn!(%node, misses = MISSES, "cluster node stopped answering; its link is closed");
    for session in sessions.values() {
        if session.peer_name.as_ref().is_some_and(|n| n.name == node) {
            session
                .actor
                .stop(Some("the peer stopped answering".to_string()));
        }
    }
}
