//! The operator CLI (`llorch ps`, `load`, `reload`, `evict`) against a running daemon.

mod common;

use common::daemon::Daemon;

async fn llorch(args: &[&str], url: &str) -> (bool, String, String) {
    common::llorch_cli(args, url).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ps_load_reload_and_evict_drive_a_running_daemon() {
    let daemon =
        Daemon::start("version = 1\n[[models]]\nname = \"first\"\nsource = \"builtin:demo\"\n")
            .await;
    let (ok, table, stderr) = llorch(&["ps"], &daemon.url).await;
    assert!(ok, "{stderr}");
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("MODEL  REPLICA"), "{table}");
    assert!(lines[1].starts_with("first  first#0@cpu  ready"), "{table}");
    // The demo runs batched: no sequence running of the 16 it may run, no KV block held.
    let cells: Vec<&str> = lines[1].split_whitespace().collect();
    assert_eq!(&cells[3..7], ["0", "0", "0/16", "0.0%"], "{table}");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("second.toml");
    std::fs::write(&file, "name = \"second\"\nsource = \"builtin:demo\"\n").unwrap();
    let (ok, out, stderr) = llorch(&["load", file.to_str().unwrap()], &daemon.url).await;
    assert!(ok, "{stderr}");
    assert_eq!(out.trim(), "second loaded");
    let (ok, _, stderr) = llorch(&["load", file.to_str().unwrap()], &daemon.url).await;
    assert!(!ok);
    assert!(
        stderr.contains("409") && stderr.contains("already loaded"),
        "{stderr}"
    );

    let (ok, out, stderr) = llorch(&["reload", "second"], &daemon.url).await;
    assert!(ok, "{stderr}");
    assert_eq!(out.trim(), "second reloaded");
    let (ok, out, stderr) = llorch(&["reload"], &daemon.url).await;
    assert!(ok, "{stderr}");
    assert!(
        out.contains("first unchanged") && out.contains("second evicted"),
        "{out}"
    );

    let (ok, out, stderr) = llorch(&["evict", "first", "--abort"], &daemon.url).await;
    assert!(ok, "{stderr}");
    assert_eq!(out.trim(), "first evicted");
    let (ok, table, _) = llorch(&["ps"], &daemon.url).await;
    assert!(ok);
    assert_eq!(
        table.trim(),
        "MODEL  REPLICA  STATE  IN FLIGHT  QUEUED  RUNNING  KV USED  RESTARTS  LAST ERROR"
    );
    let (ok, _, stderr) = llorch(&["evict", "first"], &daemon.url).await;
    assert!(!ok);
    assert!(stderr.contains("404"), "{stderr}");
}

/// A load shows its progress while it runs: `/admin/models` gives the loading replica's
/// bytes read and total, and `llorch load` off a terminal prints a line per tenth of the way
/// (the fake model's load counts its milliseconds as its bytes), then the outcome.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_load_shows_its_progress_in_the_listing_and_the_cli() {
    let daemon =
        Daemon::start("version = 1\n[[models]]\nname = \"first\"\nsource = \"builtin:demo\"\n")
            .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow.toml");
    std::fs::write(
        &file,
        "name = \"slow\"\nsource = \"builtin:fake?ms=5&load_ms=2000\"\n",
    )
    .unwrap();
    let url = daemon.url.clone();
    let path = file.to_str().unwrap().to_string();
    let cli = tokio::spawn(async move { llorch(&["load", &path], &url).await });
    let mut seen = Vec::new();
    while !cli.is_finished() {
        let listing = daemon.get_json("/admin/models").await;
        let slow = listing["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "slow")
            .cloned();
        if let Some(progress) = slow.map(|m| m["replicas"][0]["load_progress"].clone()) {
            if let Some(read) = progress["bytes_read"].as_u64() {
                assert_eq!(progress["bytes_total"], 2000, "{progress}");
                seen.push(read);
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (ok, out, stderr) = cli.await.unwrap();
    assert!(ok, "{stderr}");
    assert_eq!(out.trim(), "slow loaded");
    assert!(
        seen.len() >= 3 && seen.windows(2).all(|w| w[0] <= w[1]),
        "{seen:?}"
    );
    assert!(seen.last() > seen.first(), "{seen:?}");
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("slow: loading "))
        .collect();
    assert!(lines.len() >= 3, "{stderr}");
    assert!(
        lines.iter().any(|l| l.contains("of 2000 bytes")),
        "{stderr}"
    );
    let listing = daemon.get_json("/admin/models").await;
    let slow = &listing["models"].as_array().unwrap()[1];
    assert_eq!(slow["replicas"][0]["state"], "ready");
    assert!(slow["replicas"][0]["load_progress"].is_null());
}

/// `GET /admin/events` sends the pool as `/admin/models` lists it, at once and on every
/// change: a model being loaded shows up loading with its progress, then ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_events_stream_follows_a_load_from_loading_to_ready() {
    let daemon =
        Daemon::start("version = 1\n[[models]]\nname = \"first\"\nsource = \"builtin:demo\"\n")
            .await;
    let response = daemon
        .client
        .get(daemon.at("/admin/events"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut events = common::daemon::SseReader::new(response);
    let first: serde_json::Value = serde_json::from_str(&events.next().await.unwrap()).unwrap();
    assert_eq!(
        first["models"][0]["replicas"][0]["state"], "ready",
        "{first}"
    );
    let body = serde_json::json!({"name": "slow", "source": "builtin:fake?ms=5&load_ms=1500"});
    let loading = tokio::spawn({
        let (client, url) = (daemon.client.clone(), daemon.at("/admin/models"));
        async move { client.post(url).json(&body).send().await.unwrap().status() }
    });
    let mut states = Vec::new();
    while states.last().map(String::as_str) != Some("ready") {
        let event: serde_json::Value = serde_json::from_str(&events.next().await.unwrap()).unwrap();
        let Some(slow) = event["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "slow")
        else {
            continue;
        };
        let replica = &slow["replicas"][0];
        let state = replica["state"].as_str().unwrap_or("none").to_string();
        if state == "loading" {
            assert_eq!(replica["load_progress"]["bytes_total"], 1500, "{replica}");
        }
        if states.last() != Some(&state) {
            states.push(state);
        }
    }
    assert_eq!(states, ["loading", "ready"]);
    assert_eq!(loading.await.unwrap(), 200);
    // A shutdown ends the stream.
    drop(daemon);
    let ended = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while events.next().await.is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the events stream outlived the server");
}

/// `llorch load --no-wait` and `reload --no-wait` return as soon as the daemon has started
/// the operation (`202 Accepted`, the outcome `loading` / `reloading`); the replica then goes
/// from loading to ready on its own. A refused operation is still refused at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_wait_returns_once_the_operation_has_started() {
    let daemon =
        Daemon::start("version = 1\n[[models]]\nname = \"first\"\nsource = \"builtin:demo\"\n")
            .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("slow.toml");
    std::fs::write(
        &file,
        "name = \"slow\"\nsource = \"builtin:fake?ms=5&load_ms=3000\"\n",
    )
    .unwrap();
    let path = file.to_str().unwrap();
    let (ok, out, stderr) = llorch(&["load", path, "--no-wait"], &daemon.url).await;
    assert!(ok, "{stderr}");
    assert_eq!(out.trim(), "slow loading");
    let state = |listing: serde_json::Value| {
        listing["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "slow")
            .map(|m| m["replicas"][0]["state"].as_str().unwrap_or("").to_string())
    };
    assert_eq!(
        state(daemon.get_json("/admin/models").await).as_deref(),
        Some("loading")
    );
    let (ok, _, stderr) = llorch(&["load", path, "--no-wait"], &daemon.url).await;
    assert!(!ok);
    assert!(stderr.contains("409"), "{stderr}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while state(daemon.get_json("/admin/models").await).as_deref() != Some("ready") {
        assert!(std::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let (status, body) = daemon
        .post(
            "/admin/models/first/reload?wait=false",
            &serde_json::json!(null),
        )
        .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["models"][0]["action"], "reloading", "{body}");
    let (status, body) = daemon
        .post("/admin/reload?wait=maybe", &serde_json::json!(null))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_parameter", "{body}");
    // `node` only means something in a cluster.
    let (status, body) = daemon
        .post("/admin/models/first/evict?node=a", &serde_json::json!(null))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "node", "{body}");
}
