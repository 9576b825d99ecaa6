//! RELIABILITY.md checklist G: graceful shutdown of the daemon process. SIGTERM drains
//! (`/ready` 503 at once, new requests 503 `shutting_down`, streams in flight finish), streams
//! still running at the drain deadline end with `server_shutdown` + `[DONE]`, a second signal
//! aborts, an idle daemon exits at once even with a keep-alive connection open, and a load or
//! an evict in progress does not hold the exit back.

mod common;

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use common::daemon::SseReader;
use common::process::{signal, start, start_logged, wait_exit, wait_ready};
use serde_json::{json, Value};
use tokio::task::JoinHandle;

/// How a stream ended, as its client saw it.
#[derive(Debug, PartialEq, Eq)]
enum Ending {
    /// `[DONE]` after the final chunk.
    Done,
    /// An error event (its code), then `[DONE]`.
    Error(String),
    /// Anything else: a non-200 answer, or EOF without `[DONE]`.
    Broken(String),
}

fn pool(dir: &tempfile::TempDir, shutdown_timeout: &str) -> PathBuf {
    let path = dir.path().join("pool.toml");
    let text = format!(
        "version = 1\n[server]\nshutdown_timeout = \"{shutdown_timeout}\"\n\
         [[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\ndevices = [\"cpu\", \"cpu\"]\n"
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Starts a streamed completion of `max_tokens` tokens from `demo` and follows it to its end.
fn stream(url: &str, max_tokens: usize) -> JoinHandle<Ending> {
    stream_from(url, "demo", max_tokens)
}

/// Starts a streamed completion of `max_tokens` tokens from `model` and follows it to its end.
fn stream_from(url: &str, model: &str, max_tokens: usize) -> JoinHandle<Ending> {
    let (url, model) = (url.to_string(), model.to_string());
    tokio::spawn(async move {
        let body = json!({"model": model, "prompt": "Once upon", "max_tokens": max_tokens,
                          "ignore_eos": true, "stream": true});
        let response = match reqwest::Client::new()
            .post(format!("{url}/v1/completions"))
            .json(&body)
            .send()
            .await
        {
            Ok(response) => response,
            Err(err) => return Ending::Broken(err.to_string()),
        };
        if response.status() != 200 {
            return Ending::Broken(format!("status {}", response.status()));
        }
        let mut reader = SseReader::new(response);
        let mut error = None;
        while let Some(data) = reader.next().await {
            if data == "[DONE]" {
                return match error {
                    Some(code) => Ending::Error(code),
                    None => Ending::Done,
                };
            }
            let chunk: Value = serde_json::from_str(&data).unwrap();
            if let Some(code) = chunk["error"]["code"].as_str() {
                error = Some(code.to_string());
            }
        }
        Ending::Broken("EOF without [DONE]".to_string())
    })
}

async fn status_and_code(url: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let request = match body {
        Some(body) => client.post(format!("{url}{path}")).json(&body),
        None => client.get(format!("{url}{path}")),
    };
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn exit_within(child: &mut Child, limit: Duration) -> Duration {
    let (code, took) = wait_exit(child, limit)
        .unwrap_or_else(|| panic!("the daemon did not exit within {limit:?}"));
    assert_eq!(code, 0, "exit code");
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g1_sigterm_drains_refuses_new_work_and_lets_streams_finish() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = start(&pool(&dir, "30s"));
    wait_ready(&url).await;
    // Long enough to be still streaming when the signal comes: six 200-token streams of
    // the batched demo model can end within the half second below.
    let streams: Vec<_> = (0..6).map(|_| stream(&url, 2000)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&child, "TERM");
    let signalled = Instant::now();
    loop {
        let (status, _) = status_and_code(&url, "/ready", None).await;
        if status == 503 {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(1),
            "/ready stayed 200"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("/ready went 503 {:?} after SIGTERM", signalled.elapsed());
    let (status, body) = status_and_code(
        &url,
        "/v1/completions",
        Some(json!({"model": "demo", "prompt": "Hi", "max_tokens": 1})),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("shutting_down"))
    );
    for handle in streams {
        assert_eq!(handle.await.unwrap(), Ending::Done);
    }
    let took = exit_within(&mut child, Duration::from_secs(35));
    eprintln!("exited {took:?} after the streams finished");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g2_streams_running_at_the_drain_deadline_end_with_server_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = start(&pool(&dir, "1s"));
    wait_ready(&url).await;
    let streams: Vec<_> = (0..2).map(|_| stream(&url, 2000)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&child, "TERM");
    let took = exit_within(&mut child, Duration::from_secs(10));
    eprintln!("exited {took:?} after SIGTERM (drain deadline 1 s)");
    assert!(took < Duration::from_secs(4), "exit took {took:?}");
    for handle in streams {
        assert_eq!(
            handle.await.unwrap(),
            Ending::Error("server_shutdown".to_string())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g3_a_second_signal_aborts_the_drain() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = start(&pool(&dir, "30s"));
    wait_ready(&url).await;
    let streams: Vec<_> = (0..2).map(|_| stream(&url, 2000)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    signal(&child, "TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    signal(&child, "INT");
    let took = exit_within(&mut child, Duration::from_secs(10));
    eprintln!("exited {took:?} after the second signal");
    assert!(took < Duration::from_secs(3), "exit took {took:?}");
    for handle in streams {
        assert_eq!(
            handle.await.unwrap(),
            Ending::Error("server_shutdown".to_string())
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g5_an_idle_daemon_exits_at_once_despite_a_keep_alive_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, url) = start(&pool(&dir, "30s"));
    wait_ready(&url).await;
    // This client keeps its connection open (HTTP keep-alive) after the request.
    let client = reqwest::Client::new();
    let health = client.get(format!("{url}/health")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    signal(&child, "TERM");
    let took = exit_within(&mut child, Duration::from_secs(10));
    eprintln!("idle exit took {took:?}");
    assert!(took < Duration::from_secs(2), "exit took {took:?}");
    drop(client);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn g4_a_load_and_a_draining_evict_do_not_hold_the_exit_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pool.toml");
    std::fs::write(
        &path,
        "version = 1\n[server]\nshutdown_timeout = \"2s\"\n\
         [[models]]\nname = \"busy\"\nsource = \"builtin:fake?ms=20\"\n\
         [[models]]\nname = \"slow\"\nsource = \"builtin:fake?ms=5&load_ms=60000\"\n\
         preload = false\n",
    )
    .unwrap();
    let (mut child, url, lines) = start_logged(&path, &[]);
    wait_ready(&url).await;
    // A request that waits for slow's 60-second load, and a stream on busy that an evict
    // (with a 60-second drain deadline) waits for.
    let waiting = stream_from(&url, "slow", 10);
    let draining = stream_from(&url, "busy", 10_000);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !status_and_code(&url, "/admin/models", None).await.1["models"]
        .as_array()
        .is_some_and(|models| {
            models
                .iter()
                .any(|m| m["name"] == "busy" && m["replicas"][0]["in_flight"] == 1)
        })
    {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the busy stream never started");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let evict = {
        let url = url.clone();
        tokio::spawn(async move {
            reqwest::Client::new()
                .post(format!("{url}/admin/models/busy/evict?timeout_ms=60000"))
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, listing) = status_and_code(&url, "/admin/models", None).await;
        let state = |name: &str| {
            listing["models"]
                .as_array()
                .and_then(|models| models.iter().find(|m| m["name"] == name))
                .map(|m| (m["state"].clone(), m["replicas"][0]["state"].clone()))
        };
        let (busy, slow) = (state("busy"), state("slow"));
        if busy.as_ref().map(|d| d.0 == "draining") == Some(true)
            && slow.as_ref().map(|s| s.1 == "loading") == Some(true)
        {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("never both loading and draining: {listing}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    signal(&child, "TERM");
    let took = exit_within(&mut child, Duration::from_secs(7));
    eprintln!(
        "exited {took:?} after SIGTERM with a load and a drain in progress (drain deadline 2 s)"
    );
    // A thread still loading is not waited for: the exit follows the 2 s drain.
    assert!(took < Duration::from_millis(3500), "exit took {took:?}");
    let waited = waiting.await.unwrap();
    assert!(
        matches!(&waited, Ending::Broken(s) if s.starts_with("status 503")),
        "the request waiting for the load: {waited:?}"
    );
    let drained = draining.await.unwrap();
    assert!(
        matches!(&drained, Ending::Error(code) if code == "server_shutdown" || code == "model_evicted"),
        "the draining stream: {drained:?}"
    );
    let _ = evict.await.unwrap();
    let log: Vec<String> = lines.try_iter().collect();
    assert!(
        !log.iter().any(|line| line.contains("panicked")),
        "the daemon panicked: {log:?}"
    );
}
