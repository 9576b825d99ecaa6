//! RELIABILITY.md §9 deadlines: the queue deadline (503 `queue_timeout`), the total request
//! deadline (`deadline_exceeded`, in the stream or as 504), and the load deadline (the replica
//! is `failed` and the rest of the pool serves).

mod common;

use std::time::{Duration, Instant};

use common::daemon::Daemon;
use llorch::actors::faults::{arm, Fault};
use serde_json::{json, Value};

fn long(stream: bool) -> Value {
    json!({"model": "demo", "prompt": "Once", "max_tokens": 2000, "ignore_eos": true,
           "stream": stream})
}

/// The last two payloads of a stream.
async fn tail(daemon: &Daemon, body: &Value) -> Vec<String> {
    let mut all = daemon.stream("/v1/completions", body).await;
    all.split_off(all.len().saturating_sub(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_past_the_queue_deadline_gets_503_queue_timeout() {
    let daemon = Daemon::start(
        "version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\nqueue_timeout = \"300ms\"\n\
         max_concurrent = 1\n",
    )
    .await;
    let busy = {
        let client = daemon.client.clone();
        let url = daemon.at("/v1/completions");
        tokio::spawn(async move { client.post(url).json(&long(false)).send().await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&json!({"model": "demo", "prompt": "Hi", "max_tokens": 1}))
        .send()
        .await
        .unwrap();
    let waited = started.elapsed();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "queue_timeout");
    assert!(
        waited >= Duration::from_millis(250),
        "answered after {waited:?}"
    );
    busy.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_total_deadline_ends_with_deadline_exceeded() {
    let daemon = Daemon::start(
        "version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\nrequest_timeout = \"400ms\"\n",
    )
    .await;
    let last = tail(&daemon, &long(true)).await;
    let error: Value = serde_json::from_str(&last[0]).unwrap();
    assert_eq!(error["error"]["code"], "deadline_exceeded", "{last:?}");
    assert_eq!(last[1], "[DONE]");
    let (status, body) = daemon.post("/v1/completions", &long(false)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (504, Some("deadline_exceeded"))
    );
    // The replica was freed: a short request still runs.
    let (status, _) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "demo", "prompt": "Hi", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_past_the_load_deadline_fails_the_replica_and_the_pool_serves() {
    arm("stuck#0@cpu", Fault::SlowNextLoad(Duration::from_secs(5)));
    let daemon = Daemon::start_unready(
        "version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n\
         [[models]]\nname = \"stuck\"\nsource = \"builtin:demo\"\nload_timeout = \"300ms\"\n",
    )
    .await;
    daemon.wait_model("demo").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let error = loop {
        let listing = daemon.get_json("/admin/models").await;
        let stuck = listing["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "stuck")
            .cloned()
            .unwrap();
        let replica = &stuck["replicas"][0];
        if replica["state"] == "failed" {
            break replica["last_error"].as_str().unwrap().to_string();
        }
        assert!(Instant::now() < deadline, "never failed: {stuck}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(error.contains("load_timeout"), "{error}");
    let (status, body) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "stuck", "prompt": "Hi", "max_tokens": 1}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("model_unavailable"))
    );
    let (status, _) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "demo", "prompt": "Hi", "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 200);
}

/// RELIABILITY.md C6: `finish_reason` and `usage` match what the fake backend produced (one
/// letter per token, never an end token).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_counts_equal_the_tokens_produced() {
    let daemon =
        Daemon::start("version = 1\n[[models]]\nname = \"fake\"\nsource = \"builtin:fake?ms=1\"\n")
            .await;
    for max_tokens in [1usize, 7, 33] {
        let body = json!({"model": "fake", "prompt": "Go", "max_tokens": max_tokens});
        let (status, value) = daemon.post("/v1/completions", &body).await;
        assert_eq!(status, 200);
        let text = value["choices"][0]["text"].as_str().unwrap();
        assert_eq!(text.chars().count(), max_tokens, "{text}");
        assert_eq!(value["choices"][0]["finish_reason"], "length");
        assert_eq!(value["usage"]["completion_tokens"], max_tokens);
        let stream = json!({"model": "fake", "prompt": "Go", "max_tokens": max_tokens,
                            "stream": true, "stream_options": {"include_usage": true}});
        let events = daemon.stream("/v1/completions", &stream).await;
        let chunks: Vec<Value> = events
            .iter()
            .filter(|e| *e != "[DONE]")
            .map(|e| serde_json::from_str(e).unwrap())
            .collect();
        let streamed: String = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["text"].as_str())
            .collect();
        assert_eq!(streamed, text, "streamed and one-shot texts differ");
        let finish: Vec<_> = chunks
            .iter()
            .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
            .collect();
        assert_eq!(finish, ["length"]);
        let usage = &chunks.last().unwrap()["usage"];
        assert_eq!(usage["completion_tokens"], max_tokens);
        assert_eq!(events.last().unwrap(), "[DONE]");
    }
}
