//! RELIABILITY.md checklist S (the PR-tier items that are not in `auth.rs`) and C3: deny by
//! default over the whole route table, keys never logged, CORS off unless configured, the
//! DNS-rebinding guard, a panicking handler answered with a 500 envelope, and `panic = unwind`.

mod common;

use std::time::Duration;

use common::daemon::Daemon;
use common::process::{signal, start_logged, wait_exit};
use common::raw::{exchange, RawReply, SendMode};
use llorch::actors::faults::{arm, Fault};
use llorch::api::{route_inventory, Guard, Keys};
use serde_json::{json, Value};

const POOL: &str = "version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n";

#[tokio::test]
async fn s2_every_route_but_health_and_ready_refuses_a_request_without_a_key() {
    let daemon = Daemon::start_with_keys(POOL, Keys::parse(Some("sk-admin"), "sk-user")).await;
    let routes = route_inventory();
    assert!(
        routes.len() >= 11,
        "the inventory lists {} routes",
        routes.len()
    );
    for route in routes {
        for method in route.methods {
            let path = route
                .path
                .replace("{name}", "demo")
                .replace("{file}", "app.js");
            let request = match *method {
                "GET" => daemon.client.get(daemon.at(&path)),
                _ => daemon.client.post(daemon.at(&path)).json(&json!({})),
            };
            let status = request.send().await.unwrap().status().as_u16();
            if route.guard == Guard::Public {
                assert!(status == 200 || status == 503, "{method} {path}: {status}");
            } else {
                assert_eq!(status, 401, "{method} {path} answered without a key");
            }
        }
    }
}

#[test]
fn s3_keys_and_authorization_headers_never_reach_the_logs() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pool.toml");
    std::fs::write(&config, POOL).unwrap();
    let (mut child, url, lines) = start_logged(
        &config,
        &[
            ("RUST_LOG", "debug"),
            ("LLORCH_ADMIN_KEY", "sk-admin-SECRET-1"),
            ("LLORCH_API_KEYS", "sk-user-SECRET-2:demo"),
        ],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let client = reqwest::Client::new();
        for _ in 0..50 {
            if client
                .get(format!("{url}/ready"))
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let good = json!({"model": "demo", "prompt": "Hi", "max_tokens": 2});
        for key in ["sk-user-SECRET-2", "sk-admin-SECRET-1", "sk-wrong-SECRET-3"] {
            client
                .post(format!("{url}/v1/completions"))
                .bearer_auth(key)
                .json(&good)
                .send()
                .await
                .unwrap();
            client
                .get(format!("{url}/admin/models"))
                .bearer_auth(key)
                .send()
                .await
                .unwrap();
        }
    });
    signal(&child, "TERM");
    assert_eq!(
        wait_exit(&mut child, Duration::from_secs(10)).map(|r| r.0),
        Some(0)
    );
    let logged: Vec<String> = lines.try_iter().collect();
    assert!(logged.len() > 5, "too few log lines to check: {logged:?}");
    for line in &logged {
        assert!(!line.contains("SECRET"), "a key reached the log: {line}");
        assert!(
            !line.to_ascii_lowercase().contains("authorization"),
            "{line}"
        );
    }
}

async fn preflight(daemon: &Daemon, origin: &str) -> reqwest::header::HeaderMap {
    daemon
        .client
        .request(reqwest::Method::OPTIONS, daemon.at("/v1/chat/completions"))
        .header("origin", origin)
        .header("access-control-request-method", "POST")
        .send()
        .await
        .unwrap()
        .headers()
        .clone()
}

#[tokio::test]
async fn s7_no_cors_headers_unless_origins_are_configured() {
    let closed = Daemon::start(POOL).await;
    let headers = preflight(&closed, "https://evil.example").await;
    assert!(headers.get("access-control-allow-origin").is_none());
    let open = Daemon::start(&POOL.replace(
        "version = 1\n",
        "version = 1\n[server]\ncors_origins = [\"https://app.example\"]\n",
    ))
    .await;
    let headers = preflight(&open, "https://app.example").await;
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert!(headers.get("access-control-allow-credentials").is_none());
    let headers = preflight(&open, "https://evil.example").await;
    assert!(headers.get("access-control-allow-origin").is_none());
}

#[tokio::test]
async fn s8_a_loopback_server_refuses_foreign_host_names() {
    let daemon = Daemon::start(POOL).await;
    let address = daemon.url.trim_start_matches("http://").to_string();
    let port = address.rsplit(':').next().unwrap().to_string();
    for (host, want) in [
        ("evil.example".to_string(), 403),
        (format!("evil.example:{port}"), 403),
        (format!("localhost:{port}"), 200),
        (format!("127.0.0.1:{port}"), 200),
        (format!("[::1]:{port}"), 200),
    ] {
        let request = format!("GET /health HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let reply = exchange(
            &address,
            request.as_bytes(),
            SendMode::Whole,
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        let RawReply::Response { status, body, .. } = reply else {
            panic!("{host}: closed");
        };
        assert_eq!(status, want, "Host: {host}");
        if want == 403 {
            let value: Value = serde_json::from_slice(&body).unwrap();
            assert_eq!(value["error"]["code"], "host_not_allowed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c3_a_panicking_handler_gets_a_500_envelope_and_the_server_keeps_serving() {
    let daemon = Daemon::start(POOL).await;
    arm("handler:demo", Fault::PanicInHandler);
    let chat =
        json!({"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1});
    let (status, body) = daemon.post("/v1/chat/completions", &chat).await;
    assert_eq!(status, 500);
    assert_eq!(body["error"]["code"], "internal_error");
    assert_eq!(body["error"]["type"], "server_error");
    for _ in 0..100 {
        let (status, _) = daemon.post("/v1/chat/completions", &chat).await;
        assert_eq!(status, 200);
    }
}

#[test]
fn s10_builds_unwind_on_panic() {
    const { assert!(cfg!(panic = "unwind")) };
    let manifest =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml")).unwrap();
    let release = manifest.split("[profile.release]").nth(1).unwrap();
    assert!(
        release.contains("panic = \"unwind\""),
        "ractor needs panic = unwind in release"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s9_a_key_over_its_rate_gets_429_and_another_key_is_unaffected() {
    let pool = POOL.replace(
        "version = 1\n",
        "version = 1\n[server]\nrate_limit = 2\nrate_burst = 4\n",
    );
    let daemon = Daemon::start_with_keys(&pool, Keys::parse(None, "sk-a,sk-b")).await;
    // Readiness through /ready, which is not rate limited, so no bucket is spent waiting.
    for _ in 0..600 {
        let ready = daemon.client.get(daemon.at("/ready")).send().await.unwrap();
        if ready.status() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ask = |key: &'static str| {
        let request = daemon.client.get(daemon.at("/v1/models")).bearer_auth(key);
        async move { request.send().await.unwrap() }
    };
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for _ in 0..8 {
        let response = ask("sk-a").await;
        if response.status() == 429 {
            retry_after = response.headers().get("retry-after").cloned();
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limit_exceeded");
            statuses.push(429);
        } else {
            statuses.push(response.status().as_u16());
        }
    }
    assert_eq!(
        &statuses[..4],
        &[200, 200, 200, 200],
        "the burst is served: {statuses:?}"
    );
    assert!(
        statuses[4..].contains(&429),
        "8 requests at once exceed 2/s: {statuses:?}"
    );
    assert_eq!(retry_after.unwrap(), "1");
    assert_eq!(
        ask("sk-b").await.status(),
        200,
        "another key has its own bucket"
    );
}
