//! RELIABILITY.md H4 and the metrics of issue 5: `/metrics` is valid Prometheus text (checked
//! with `promtool check metrics`), and its counters move when a request succeeds, is shed, is
//! cancelled by its client, or meets a crash.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{metric_sum, Daemon, SseReader};
use llorch::actors::faults::{arm, Fault};
use serde_json::{json, Value};

const POOL: &str = "version = 1\n\
    [[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\nmax_queue = 1\nmax_concurrent = 1\n\
    [[models]]\nname = \"victim\"\nsource = \"builtin:demo\"\n";

async fn scrape(daemon: &Daemon) -> String {
    let response = daemon
        .client
        .get(daemon.at("/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    response.text().await.unwrap()
}

/// Scrapes until `check` holds (counters of dropped streams move when the server notices).
async fn eventually(daemon: &Daemon, what: &str, check: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = scrape(daemon).await;
        if check(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what} never moved:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn long(model: &str) -> Value {
    json!({"model": model, "prompt": "Once", "max_tokens": 2000, "ignore_eos": true, "stream": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_move_on_success_shed_cancel_and_crash_and_promtool_accepts_the_text() {
    let daemon = Daemon::start(POOL).await;

    let (status, _) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "demo", "prompt": "Hi", "max_tokens": 3, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200);
    let text = scrape(&daemon).await;
    assert_eq!(
        metric_sum(
            &text,
            "llorch_requests_total",
            &[("model", "demo"), ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(&text, "llorch_generated_tokens_total", &[("model", "demo")]),
        3.0
    );
    assert!(metric_sum(&text, "llorch_prompt_tokens_total", &[("model", "demo")]) >= 1.0);
    assert_eq!(
        metric_sum(
            &text,
            "llorch_time_to_first_token_seconds_count",
            &[("model", "demo")]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "llorch_inter_token_latency_seconds_count",
            &[("model", "demo")]
        ),
        2.0
    );
    assert_eq!(
        metric_sum(
            &text,
            "llorch_replica_state",
            &[("model", "demo"), ("state", "ready")]
        ),
        1.0
    );
    assert!(metric_sum(&text, "llorch_replica_memory_bytes", &[("model", "demo")]) > 0.0);
    assert_eq!(
        metric_sum(
            &text,
            "llorch_load_duration_seconds_count",
            &[("model", "demo"), ("outcome", "ok")]
        ),
        1.0
    );

    // Shed: one generating, one queued (max_queue = 1), the third is refused.
    let running = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&long("demo"))
        .send()
        .await
        .unwrap();
    let mut running = SseReader::new(running);
    assert!(running.next().await.is_some());
    let queued = {
        let client = daemon.client.clone();
        let url = daemon.at("/v1/completions");
        tokio::spawn(async move { client.post(url).json(&long("demo")).send().await })
    };
    let text = eventually(&daemon, "llorch_queue_depth", |text| {
        metric_sum(text, "llorch_queue_depth", &[("model", "demo")]) == 1.0
    })
    .await;
    assert_eq!(
        metric_sum(&text, "llorch_in_flight", &[("model", "demo")]),
        1.0
    );
    let (status, body) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "demo", "prompt": "Hi", "max_tokens": 1}),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (503, Some("server_overloaded"))
    );
    let text = scrape(&daemon).await;
    assert_eq!(
        metric_sum(
            &text,
            "llorch_requests_total",
            &[("model", "demo"), ("status", "503")]
        ),
        1.0
    );
    let shed = [
        ("model", "demo"),
        ("reason", "overloaded"),
        ("code", "server_overloaded"),
    ];
    assert_eq!(
        metric_sum(&text, "llorch_request_failures_total", &shed),
        1.0
    );

    // Cancel: both clients go away mid-stream.
    drop(running);
    queued.abort();
    let cancelled = [
        ("model", "demo"),
        ("reason", "dropped"),
        ("code", "cancelled"),
    ];
    eventually(&daemon, "cancelled requests", |text| {
        metric_sum(text, "llorch_request_failures_total", &cancelled) >= 1.0
            && metric_sum(text, "llorch_in_flight", &[("model", "demo")]) == 0.0
    })
    .await;

    // Crash: the victim panics at its third token; its client gets `model_crashed`.
    arm("victim#0@cpu", Fault::PanicAtToken(3));
    let events = daemon.stream("/v1/completions", &long("victim")).await;
    assert!(
        events.iter().any(|e| e.contains("model_crashed")),
        "{events:?}"
    );
    let crashed = [
        ("model", "victim"),
        ("reason", "generation"),
        ("code", "model_crashed"),
    ];
    let text = eventually(&daemon, "crash counters", |text| {
        metric_sum(text, "llorch_request_failures_total", &crashed) == 1.0
            && metric_sum(text, "llorch_restarts_total", &[("model", "victim")]) == 1.0
    })
    .await;
    assert!(!text.contains("Once"), "a prompt leaked into the metrics");
    common::promtool_accepts(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_need_the_admin_key_unless_configured_public() {
    let keys = llorch::api::Keys::parse(Some("sk-admin"), "sk-user");
    let private = Daemon::start_with_keys(POOL, keys.clone()).await;
    let status = |daemon: &Daemon, key: Option<&'static str>| {
        let mut request = daemon.client.get(daemon.at("/metrics"));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(&private, None).await, 401);
    assert_eq!(status(&private, Some("sk-user")).await, 403);
    assert_eq!(status(&private, Some("sk-admin")).await, 200);
    let public = Daemon::start_with_keys(
        &POOL.replace(
            "version = 1\n",
            "version = 1\n[server]\nmetrics_public = true\n",
        ),
        keys,
    )
    .await;
    assert_eq!(status(&public, None).await, 200);
}
