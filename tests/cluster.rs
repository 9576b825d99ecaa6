//! Several daemons as one pool (`[cluster]`, ractor_cluster): three `llorch serve` processes
//! on loopback, named a, b and c, with the demo model on b and c only. The mesh forms and
//! a's `/admin/models` lists b's and c's replicas with their node; a node with a wrong cookie
//! never appears; a frozen node (SIGSTOP) is dropped within a few seconds and rejoins after
//! SIGCONT; a killed node is dropped; evict and reload on one node reach every node that has
//! the model (or the one `?node=` names); a `[cluster]` node without the cookie refuses to start.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{free_port, node, pool, post, COOKIE};
use common::process::{signal, wait_exit};
use serde_json::Value;

/// The demo model.
const DEMO: &[(&str, &str)] = &[("demo", "builtin:demo")];

/// The nodes whose replicas of `demo` a's listing shows, sorted.
async fn demo_nodes(url: &str) -> Vec<String> {
    let listing: Value = reqwest::get(format!("{url}/admin/models"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut nodes: Vec<String> = listing["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == "demo")
        .flat_map(|m| m["replicas"].as_array().unwrap().clone())
        .filter(|r| r["state"] == "ready")
        .map(|r| r["node"].as_str().unwrap().to_string())
        .collect();
    nodes.sort();
    nodes
}

/// Waits until `demo_nodes(url)` is `want`; returns how long it took.
async fn until(url: &str, want: &[&str], limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let nodes = demo_nodes(url).await;
        if nodes == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "after {limit:?} a lists demo on {nodes:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_daemons_form_one_pool_and_drop_and_readmit_lost_nodes() {
    let dir = tempfile::tempdir().unwrap();
    let [pa, pb, pc, pd] = [free_port(), free_port(), free_port(), free_port()];
    let a = node(&pool(dir.path(), "a", pa, &[pb, pc], &[]), COOKIE).await;
    let b = node(&pool(dir.path(), "b", pb, &[pa, pc], DEMO), COOKIE).await;
    let c = node(&pool(dir.path(), "c", pc, &[pa, pb], DEMO), COOKIE).await;
    until(&a.url, &["b", "c"], Duration::from_secs(20)).await;
    until(&b.url, &["b", "c"], Duration::from_secs(20)).await;
    let listing: Value = reqwest::get(format!("{}/admin/models", a.url))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let names: Vec<&str> = listing["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"], "{listing}");
    let (ok, table, stderr) = common::llorch_cli(&["ps"], &a.url).await;
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("MODEL  NODE  REPLICA"), "{table}");
    assert!(
        lines[1].starts_with("demo   b     demo#0@cpu  ready"),
        "{table}"
    );
    assert!(
        lines[2].starts_with("demo   c     demo#0@cpu  ready"),
        "{table}"
    );

    // A node with another cookie dials a and is never let in.
    let d = node(&pool(dir.path(), "d", pd, &[pa], DEMO), "another-cookie").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(demo_nodes(&a.url).await, ["b", "c"]);
    assert_eq!(demo_nodes(&d.url).await, ["d"]);
    assert!(
        a.logged("cluster link refused"),
        "a did not log the refused link"
    );
    drop(d);

    // A frozen node stops answering: a drops it within a few seconds, and takes it back once
    // it runs again.
    signal(&b.child, "STOP");
    let dropped = until(&a.url, &["c"], Duration::from_secs(10)).await;
    eprintln!("a dropped the frozen b after {dropped:?}");
    signal(&b.child, "CONT");
    let back = until(&a.url, &["b", "c"], Duration::from_secs(30)).await;
    eprintln!("b rejoined a {back:?} after SIGCONT");

    // A killed node goes away at once.
    let mut c = c;
    c.child.kill().unwrap();
    let gone = until(&a.url, &["b"], Duration::from_secs(5)).await;
    eprintln!("a dropped the killed c after {gone:?}");
}

/// Each outcome's `(node, action)`, sorted.
fn outcomes(body: &Value) -> Vec<(String, String)> {
    let mut outcomes: Vec<(String, String)> = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            let field = |key: &str| o[key].as_str().unwrap().to_string();
            (field("node"), field("action"))
        })
        .collect();
    outcomes.sort();
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_and_reload_address_every_node_that_has_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let [pa, pb, pc] = [free_port(), free_port(), free_port()];
    let a = node(&pool(dir.path(), "a", pa, &[pb, pc], &[]), COOKIE).await;
    let b = node(&pool(dir.path(), "b", pb, &[pa, pc], DEMO), COOKIE).await;
    let c = node(&pool(dir.path(), "c", pc, &[pa, pb], DEMO), COOKIE).await;
    until(&a.url, &["b", "c"], Duration::from_secs(20)).await;

    // a has no demo of its own: the reload runs on b and c.
    let (status, body) = post(&a.url, "/admin/models/demo/reload", &Value::Null).await;
    assert_eq!(status, 200, "{body}");
    let reloaded = [("b", "reloaded"), ("c", "reloaded")].map(|(n, a)| (n.into(), a.into()));
    assert_eq!(outcomes(&body), reloaded, "{body}");
    until(&a.url, &["b", "c"], Duration::from_secs(10)).await;

    // An unknown node is named as such; a node without the model says so.
    let (status, body) = post(&a.url, "/admin/models/demo/evict?node=zz", &Value::Null).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("node_not_found"))
    );
    let (status, body) = post(&a.url, "/admin/models/demo/evict?node=a", &Value::Null).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    // `?node=` picks one node; b still serves.
    let (status, body) = post(&a.url, "/admin/models/demo/evict?node=c", &Value::Null).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(outcomes(&body), [("c".into(), "evicted".into())], "{body}");
    until(&a.url, &["b"], Duration::from_secs(10)).await;
    assert_eq!(demo_nodes(&c.url).await, ["b"]);

    // Without it, every node that still has the model; then none has it.
    let (status, body) = post(&c.url, "/admin/models/demo/evict?mode=abort", &Value::Null).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(outcomes(&body), [("b".into(), "evicted".into())], "{body}");
    until(&a.url, &[], Duration::from_secs(10)).await;
    let (status, body) = post(&a.url, "/admin/models/demo/evict", &Value::Null).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    drop(b);
}

#[test]
fn a_cluster_node_without_the_cookie_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = pool(dir.path(), "a", free_port(), &[], &[]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llorch"))
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env_remove("LLORCH_CLUSTER_COOKIE")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (code, _) = wait_exit(&mut child, Duration::from_secs(30)).expect("it kept running");
    assert_ne!(code, 0);
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("LLORCH_CLUSTER_COOKIE"), "{stderr}");
}
