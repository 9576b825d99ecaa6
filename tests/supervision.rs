//! Supervision through the real daemon, with faults injected into chosen replicas: panics
//! mid-stream and before the first token, restart intensity, and load failures
//! (RELIABILITY.md F1, F2, F3, F7).

mod common;

use std::time::{Duration, Instant};

use common::daemon::{Daemon, SseReader};
use llorch::actors::faults::{arm, Fault};
use serde_json::{json, Value};

fn pool(models: &[(&str, &str)]) -> String {
    let mut toml = String::from("version = 1\n");
    for (name, extra) in models {
        toml.push_str(&format!(
            "[[models]]\nname = \"{name}\"\nsource = \"builtin:demo\"\n{extra}\n"
        ));
    }
    toml
}

async fn all_frames(reader: &mut SseReader) -> Vec<String> {
    let mut frames = Vec::new();
    while let Some(frame) = reader.next().await {
        frames.push(frame);
    }
    frames
}

/// F1: a panic mid-stream ends that stream with one `model_crashed` error and `[DONE]`; the
/// requests queued behind it are served by the restarted replica; another model sees nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_mid_stream_ends_the_stream_and_queued_requests_are_served_after_restart() {
    // One sequence at a time, so that the requests below wait in the queue (batched, they would
    // run beside the long one and crash with it: tests/batching.rs covers that).
    let victim = "max_queue = 16\nmax_concurrent = 1";
    let daemon = Daemon::start(&pool(&[("f1-victim", victim), ("f1-other", "")])).await;
    arm("f1-victim#0@cpu", Fault::PanicAtToken(5));
    let long = json!({"model": "f1-victim", "prompt": "Hello", "max_tokens": 50, "ignore_eos": true, "stream": true});
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut crashed = SseReader::new(response);
    let queued: Vec<_> = (0..3)
        .map(|_| {
            let client = daemon.client.clone();
            let url = daemon.at("/v1/completions");
            let body =
                json!({"model": "f1-victim", "prompt": "Hi", "max_tokens": 4, "ignore_eos": true});
            tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap() })
        })
        .collect();
    let frames = all_frames(&mut crashed).await;
    let (last, before) = frames.split_last().unwrap();
    assert_eq!(last, "[DONE]");
    let error: Value = serde_json::from_str(before.last().unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "model_crashed", "{frames:?}");
    let tokens = before.len() - 1;
    assert_eq!(
        tokens, 5,
        "five tokens streamed before the panic at token 5: {frames:?}"
    );

    let (status, body) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "f1-other", "prompt": "Hi", "max_tokens": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let health = daemon
        .client
        .get(daemon.at("/health"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200);
    for task in queued {
        let response = task.await.unwrap();
        assert_eq!(response.status(), 200);
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["usage"]["completion_tokens"], 4);
    }
    daemon.wait_model("f1-victim").await;
}

/// F2: with two replicas, a panic before the first token is invisible to the client: the
/// request is retried on the other replica and streams normally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_before_the_first_token_is_retried_on_another_replica() {
    let daemon = Daemon::start(&pool(&[("f2-victim", "devices = [\"cpu\", \"cpu\"]")])).await;
    arm("f2-victim#0@cpu", Fault::PanicAtToken(0));
    let body = json!({"model": "f2-victim", "prompt": "Hello", "max_tokens": 6, "ignore_eos": true, "stream": true});
    let frames = daemon.stream("/v1/completions", &body).await;
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    assert!(
        frames.iter().all(|f| !f.contains("\"error\"")),
        "{frames:?}"
    );
    let chunks = frames.len() - 1;
    assert_eq!(chunks, 7, "six tokens and the finish chunk: {frames:?}");
}

/// F2 with one replica: a request that crashes its replica twice before its first token gets
/// 503 `model_restarting` with `Retry-After`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_crashes_twice_before_its_first_token_gets_503_model_restarting() {
    let daemon = Daemon::start(&pool(&[("f2-single", "")])).await;
    arm("f2-single#0@cpu", Fault::PanicAtToken(0));
    arm("f2-single#0@cpu", Fault::PanicAtToken(0));
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&json!({"model": "f2-single", "prompt": "Hi", "max_tokens": 2}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    assert_eq!(response.headers()["retry-after"], "1");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "model_restarting");
    daemon.wait_model("f2-single").await;
    let (status, _) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "f2-single", "prompt": "Hi", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
}

/// F3: six crashes within the window make the replica `failed`: requests get 503
/// `model_unavailable`, it leaves `/v1/models`, and `/ready` turns 503. The restarts between
/// the crashes wait 250, 500, 1000, 2000 and 4000 ms (±20 %).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_restarts_mark_the_replica_failed() {
    let daemon = Daemon::start(&pool(&[("f3-victim", ""), ("f3-other", "")])).await;
    for _ in 0..6 {
        arm("f3-victim#0@cpu", Fault::PanicAtToken(0));
    }
    let started = Instant::now();
    let body = json!({"model": "f3-victim", "prompt": "Hi", "max_tokens": 2});
    let mut statuses = Vec::new();
    let final_error = loop {
        let (status, response) = daemon.post("/v1/completions", &body).await;
        statuses.push((
            status,
            response["error"]["code"].as_str().unwrap_or("").to_string(),
        ));
        if response["error"]["code"] == "model_unavailable" {
            break response;
        }
        assert!(started.elapsed() < Duration::from_secs(40), "{statuses:?}");
    };
    let elapsed = started.elapsed();
    // Five backoffs of 250..4000 ms with ±20 % jitter: 6.2 s to 9.3 s, plus load times.
    assert!(
        elapsed >= Duration::from_millis(6_200),
        "{elapsed:?} {statuses:?}"
    );
    assert!(
        statuses.iter().all(|(status, code)| *status == 503
            && (code == "model_restarting" || code == "model_unavailable")),
        "{statuses:?}"
    );
    assert!(
        final_error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("too many restarts"),
        "{final_error}"
    );
    let (status, again) = daemon.post("/v1/completions", &body).await;
    assert_eq!(
        (status, again["error"]["code"].as_str()),
        (503, Some("model_unavailable"))
    );
    let ready = daemon.client.get(daemon.at("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let models: Value = daemon.get_json("/v1/models").await;
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["f3-other"]);
}

/// F7: a load that fails or panics leaves the replica failed with its error; the rest of the
/// pool serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_or_panicking_load_fails_only_that_model() {
    arm("f7-error#0@cpu", Fault::FailNextLoad("disk on fire".into()));
    arm("f7-panic#0@cpu", Fault::PanicNextLoad);
    let daemon = Daemon::start_unready(&pool(&[
        ("f7-error", ""),
        ("f7-panic", ""),
        ("f7-good", ""),
    ]))
    .await;
    daemon.wait_model("f7-good").await;
    let expectations = [
        ("f7-error", "injected load failure: disk on fire"),
        ("f7-panic", "the loader panicked"),
    ];
    for (model, message) in expectations {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let (status, body) = daemon
                .post(
                    "/v1/completions",
                    &json!({"model": model, "prompt": "x", "max_tokens": 1}),
                )
                .await;
            if status == 503 && body["error"]["code"] == "model_unavailable" {
                assert!(
                    body["error"]["message"].as_str().unwrap().contains(message),
                    "{body}"
                );
                break;
            }
            assert!(Instant::now() < deadline, "{model}: {status} {body}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let (status, _) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "f7-good", "prompt": "x", "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 200);
    let ready = daemon.client.get(daemon.at("/ready")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
}

/// F6: a replica that stops producing tokens is caught by the stall watchdog: its stream ends
/// with `generation_stalled`, the replica restarts, and another model is unaffected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_generation_is_stalled_out_and_the_replica_restarts() {
    let daemon = Daemon::start(&pool(&[
        ("f6-victim", "stall_timeout = \"400ms\""),
        ("f6-other", ""),
    ]))
    .await;
    arm(
        "f6-victim#0@cpu",
        Fault::HangAtToken(3, Duration::from_secs(3)),
    );
    let body = json!({"model": "f6-victim", "prompt": "Hello", "max_tokens": 50, "ignore_eos": true, "stream": true});
    let started = Instant::now();
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut hung = SseReader::new(response);
    let frames = all_frames(&mut hung).await;
    let stalled_after = started.elapsed();
    let (last, before) = frames.split_last().unwrap();
    assert_eq!(last, "[DONE]");
    let error: Value = serde_json::from_str(before.last().unwrap()).unwrap();
    assert_eq!(error["error"]["code"], "generation_stalled", "{frames:?}");
    assert!(
        stalled_after < Duration::from_secs(2),
        "the stall was reported after {stalled_after:?}"
    );
    let (status, _) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "f6-other", "prompt": "Hi", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
    daemon.wait_model("f6-victim").await;
    let (status, body) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "f6-victim", "prompt": "Hi", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}
