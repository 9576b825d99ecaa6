//! Daemons joined by `[cluster]`, each a `llorch serve` process on loopback.

use std::process::Child;
use std::sync::mpsc::Receiver;

use serde_json::Value;

use super::process::{start_with_args, wait_ready};

/// The cookie of the test clusters.
pub const COOKIE: &str = "test-cluster-cookie";

/// A free port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node's pool file: its cluster section and its models (`(name, source)`).
pub fn pool(
    dir: &std::path::Path,
    node: &str,
    port: u16,
    peers: &[u16],
    models: &[(&str, &str)],
) -> std::path::PathBuf {
    let peers: Vec<String> = peers.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    let mut text = format!(
        "version = 1\n[cluster]\nnode = \"{node}\"\nlisten = \"127.0.0.1:{port}\"\npeers = [{}]\n",
        peers.join(", ")
    );
    for (name, source) in models {
        text.push_str(&format!(
            "[[models]]\nname = \"{name}\"\nsource = \"{source}\"\n"
        ));
    }
    let path = dir.join(format!("{node}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

/// A running node; killed when dropped.
pub struct Node {
    /// The process.
    pub child: Child,
    /// Its API.
    pub url: String,
    /// Its stderr, line by line.
    pub log: Receiver<String>,
}

impl Node {
    /// Whether a line of its log so far contains `text`.
    pub fn logged(&self, text: &str) -> bool {
        self.log.try_iter().any(|line| line.contains(text))
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // A stopped node must run again to be killed; a dead one ignores this.
        let _ = std::process::Command::new("kill")
            .args(["-CONT", &self.child.id().to_string()])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a node with `config` and `cookie` and waits until it is ready.
pub async fn node(config: &std::path::Path, cookie: &str) -> Node {
    let (child, url, log) = start_with_args(
        config,
        &[("LLORCH_CLUSTER_COOKIE", cookie)],
        &["--listen", "127.0.0.1:0"],
    );
    wait_ready(&url).await;
    Node { child, url, log }
}

/// `POST path` with a JSON body: the status and the JSON answer.
pub async fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

/// `GET path` as JSON.
pub async fn get(url: &str, path: &str) -> Value {
    reqwest::get(format!("{url}{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `/v1/models` on `url`: each model's nodes, sorted.
pub async fn model_nodes(url: &str) -> Vec<(String, Vec<String>)> {
    let list = get(url, "/v1/models").await;
    let mut models: Vec<(String, Vec<String>)> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|card| {
            let mut nodes: Vec<String> = card["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_string())
                .collect();
            nodes.sort();
            (card["id"].as_str().unwrap().to_string(), nodes)
        })
        .collect();
    models.sort();
    models
}
