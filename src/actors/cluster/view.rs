//! What this node knows of the other nodes: each one's last listing and when it was seen,
//! shared between the cluster watcher (which writes it) and the admin API (which reads it).
//! It holds listings only, never a model.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

/// A model with ready replicas on a peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteModel {
    /// Its name.
    pub model: String,
    /// The peer.
    pub node: String,
    /// Its ready replicas there.
    pub replicas: usize,
    /// Requests in flight on them and queued for it there.
    pub load: usize,
    /// Its context length.
    pub context_length: Option<usize>,
}

/// One peer as last seen.
#[derive(Debug, Clone)]
struct Peer {
    listing: Value,
    seen: SystemTime,
}

/// The cluster as this node sees it.
#[derive(Debug, Clone)]
pub struct ClusterView {
    node: String,
    peers: Arc<RwLock<BTreeMap<String, Peer>>>,
}

impl ClusterView {
    /// The view of node `node`, knowing no peer yet.
    pub fn new(node: &str) -> Self {
        Self {
            node: node.to_string(),
            peers: Arc::default(),
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Records `node`'s listing, seen now.
    pub fn seen(&self, node: &str, listing: Value) {
        if let Ok(mut peers) = self.peers.write() {
            peers.insert(
                node.to_string(),
                Peer {
                    listing,
                    seen: SystemTime::now(),
                },
            );
        }
    }

    /// Forgets `node` (lost, or gone from the cluster); whether it was known.
    pub fn forget(&self, node: &str) -> bool {
        self.peers
            .write()
            .map(|mut peers| peers.remove(node).is_some())
            .unwrap_or(false)
    }

    /// The peers whose last listing has a model called `model`.
    pub fn nodes_with(&self, model: &str) -> Vec<String> {
        let Ok(peers) = self.peers.read() else {
            return Vec::new();
        };
        peers
            .iter()
            .filter(|(_, peer)| {
                let models = peer.listing.get("models").and_then(Value::as_array);
                models.is_some_and(|models| models.iter().any(|m| m["name"] == model))
            })
            .map(|(node, _)| node.clone())
            .collect()
    }

    /// Every peer's models with a ready replica, as of its last listing.
    pub fn ready(&self) -> Vec<RemoteModel> {
        let Ok(peers) = self.peers.read() else {
            return Vec::new();
        };
        let mut ready = Vec::new();
        for (node, peer) in peers.iter() {
            let models = peer.listing.get("models").and_then(Value::as_array);
            for model in models.into_iter().flatten() {
                let replicas = model.get("replicas").and_then(Value::as_array);
                let up: Vec<&Value> = replicas
                    .into_iter()
                    .flatten()
                    .filter(|r| r["state"] == "ready" && r["standby"] != true)
                    .collect();
                let (Some(name), false) = (model["name"].as_str(), up.is_empty()) else {
                    continue;
                };
                let count = |v: &Value| v.as_u64().and_then(|n| usize::try_from(n).ok());
                let in_flight: usize = up.iter().filter_map(|r| count(&r["in_flight"])).sum();
                ready.push(RemoteModel {
                    model: name.to_string(),
                    node: node.clone(),
                    replicas: up.len(),
                    load: in_flight + count(&model["queued"]).unwrap_or(0),
                    context_length: count(&model["context_length"]),
                });
            }
        }
        ready
    }

    /// The peers with a ready replica of `model` and their load, the least loaded first.
    pub fn serving(&self, model: &str) -> Vec<(String, usize)> {
        let mut ready: Vec<RemoteModel> = self
            .ready()
            .into_iter()
            .filter(|m| m.model == model)
            .collect();
        ready.sort_by(|a, b| (a.load, &a.node).cmp(&(b.load, &b.node)));
        ready.into_iter().map(|m| (m.node, m.load)).collect()
    }

    /// The peers known now.
    pub fn nodes(&self) -> Vec<String> {
        self.peers
            .read()
            .map(|peers| peers.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Adds the peers to a local listing (`{"models": [...], "devices": [...]}`): every
    /// replica and device gets its `node`, a peer's models join the local ones of the same
    /// name, and `nodes` lists this node and each peer with the time of its last listing
    /// (`last_seen`, Unix seconds).
    pub fn merge(&self, listing: &mut Value) {
        tag(listing, &self.node);
        let now = unix(SystemTime::now());
        let mut nodes = vec![json!({"node": self.node, "local": true, "last_seen": now})];
        let Ok(peers) = self.peers.read() else {
            return;
        };
        for (node, peer) in peers.iter() {
            let mut remote = peer.listing.clone();
            tag(&mut remote, node);
            for model in take_list(&mut remote, "models") {
                add_model(listing, model);
            }
            for device in take_list(&mut remote, "devices") {
                push(listing, "devices", device);
            }
            let seen = unix(peer.seen);
            nodes.push(json!({"node": node, "local": false, "last_seen": seen}));
        }
        if let Some(fields) = listing.as_object_mut() {
            fields.insert("nodes".to_string(), Value::Array(nodes));
        }
    }
}

fn unix(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sets `node` on every replica and device of a listing.
fn tag(listing: &mut Value, node: &str) {
    let models = listing.get_mut("models").and_then(Value::as_array_mut);
    for model in models.into_iter().flatten() {
        let replicas = model.get_mut("replicas").and_then(Value::as_array_mut);
        for replica in replicas.into_iter().flatten() {
            set(replica, "node", node);
        }
    }
    let devices = listing.get_mut("devices").and_then(Value::as_array_mut);
    for device in devices.into_iter().flatten() {
        set(device, "node", node);
    }
}

fn set(value: &mut Value, key: &str, text: &str) {
    if let Some(fields) = value.as_object_mut() {
        fields.insert(key.to_string(), json!(text));
    }
}

fn take_list(value: &mut Value, key: &str) -> Vec<Value> {
    match value.get_mut(key).map(Value::take) {
        Some(Value::Array(items)) => items,
        _ => Vec::new(),
    }
}

fn push(listing: &mut Value, key: &str, item: Value) {
    if let Some(Value::Array(items)) = listing.get_mut(key) {
        items.push(item);
    }
}

/// Adds a peer's model: its replicas join a local model of the same name, else it is listed
/// as it is.
fn add_model(listing: &mut Value, mut model: Value) {
    let name = model.get("name").cloned();
    let models = listing.get_mut("models").and_then(Value::as_array_mut);
    let Some(models) = models else {
        return;
    };
    let local = models.iter_mut().find(|m| m.get("name") == name.as_ref());
    match local {
        Some(local) => {
            for replica in take_list(&mut model, "replicas") {
                push(local, "replicas", replica);
            }
        }
        None => models.push(model),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_join_the_local_listing_with_their_node() {
        let view = ClusterView::new("a");
        view.seen(
            "b",
            json!({"models": [
                {"name": "demo", "replicas": [{"replica": "demo#0@cpu"}]},
                {"name": "only-b", "replicas": [{"replica": "only-b#0@cpu"}]}
            ], "devices": [{"device": "cpu"}]}),
        );
        let mut listing = json!({
            "models": [{"name": "demo", "replicas": [{"replica": "demo#0@cpu"}]}],
            "devices": [{"device": "cpu"}]
        });
        view.merge(&mut listing);
        let demo = &listing["models"][0]["replicas"];
        assert_eq!(demo[0]["node"], "a");
        assert_eq!(demo[1]["node"], "b");
        assert_eq!(listing["models"][1]["name"], "only-b");
        assert_eq!(listing["models"][1]["replicas"][0]["node"], "b");
        assert_eq!(listing["devices"][1]["node"], "b");
        assert_eq!(listing["nodes"][0]["node"], "a");
        assert_eq!(listing["nodes"][1]["node"], "b");
        assert!(view.ready().is_empty(), "no replica of b is ready");
        assert!(view.forget("b") && !view.forget("b"));
        let mut alone = json!({"models": [], "devices": []});
        view.merge(&mut alone);
        assert_eq!(alone["nodes"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn the_least_loaded_peer_serves_first() {
        let view = ClusterView::new("a");
        let listing = |in_flight: u64, queued: u64| {
            json!({"models": [{"name": "demo", "queued": queued, "context_length": 64, "replicas": [
                {"state": "ready", "standby": false, "in_flight": in_flight},
                {"state": "loading", "standby": false, "in_flight": 0}
            ]}], "devices": []})
        };
        view.seen("b", listing(3, 1));
        view.seen("c", listing(2, 0));
        view.seen(
            "d",
            json!({"models": [{"name": "demo", "replicas": [{"state": "failed"}]}]}),
        );
        assert_eq!(view.serving("demo"), [("c".into(), 2), ("b".into(), 4)]);
        assert!(view.serving("other").is_empty());
        let b = view.ready().into_iter().find(|m| m.node == "b").unwrap();
        assert_eq!((b.replicas, b.load, b.context_length), (1, 4, Some(64)));
    }
}
