//! RELIABILITY.md checklist G: graceful shutdown of the daemon process. SIGTERM drains
//! (`/ready` 503 at once, new requests 503 `shutting_down`, streams in flight finish), streams
//! still running at the drain deadline end with `server_shutdown` + `[DONE]`, a second signal
//! aborts, and an idle daemon exits at once even with a keep-alive connection open.

mod common;

use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

use common::daemon::SseReader;
use common::process::{signal, start, wait_exit};
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

async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::get(format!("{url}/ready"))
        .await
        .map(|r| r.status())
        .ok()
        != Some(reqwest::StatusCode::OK)
    {
        assert!(Instant::now() < deadline, "the daemon never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a streamed completion of `max_tokens` tokens and follows it to its end.
fn stream(url: &str, max_tokens: usize) -> JoinHandle<Ending> {
    let url = url.to_string();
    tokio::spawn(async move {
        let body = json!({"model": "demo", "prompt": "Once upon", "max_tokens": max_tokens,
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
    let streams: Vec<_> = (0..6).map(|_| stream(&url, 200)).collect();
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
