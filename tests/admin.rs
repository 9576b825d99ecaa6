//! The admin API against the real daemon: listing, load, evict (drain and abort), reload
//! (make-before-break), pool.toml reload with a diff, concurrent admin calls, and keys
//! (RELIABILITY.md E1, E2, E4, E6, R2, R3, R4, H3).

mod common;

use std::time::Duration;

use common::daemon::{on_test_device, test_device, Daemon, SseReader};
use llorch::api::Keys;
use serde_json::{json, Value};

fn demo(name: &str, extra: &str) -> String {
    format!("[[models]]\nname = \"{name}\"\nsource = \"builtin:demo\"\n{extra}\n")
}

async fn admin_models(daemon: &Daemon) -> Value {
    daemon.get_json("/admin/models").await
}

fn model<'a>(listing: &'a Value, name: &str) -> Option<&'a Value> {
    listing["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
}

async fn admin_post(daemon: &Daemon, path: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = daemon.client.post(daemon.at(path));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.json().await.unwrap())
}

async fn open_stream(daemon: &Daemon, model: &str, max_tokens: usize) -> SseReader {
    let body = json!({"model": model, "prompt": "Hello", "max_tokens": max_tokens, "ignore_eos": true, "stream": true});
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    SseReader::new(response)
}

async fn rest(reader: &mut SseReader) -> Vec<String> {
    let mut frames = Vec::new();
    while let Some(frame) = reader.next().await {
        frames.push(frame);
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_models_lists_every_replica_with_its_state() {
    let daemon = Daemon::start(&format!(
        "version = 1\n{}",
        demo("listed", "devices = [\"cpu\", \"cpu\"]")
    ))
    .await;
    let all_ready = |listing: &Value| {
        model(listing, "listed").unwrap()["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["state"] == "ready")
    };
    let mut listing = admin_models(&daemon).await;
    for _ in 0..500 {
        if all_ready(&listing) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        listing = admin_models(&daemon).await;
    }
    let listed = model(&listing, "listed").unwrap();
    let replicas = listed["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 2);
    for (index, replica) in replicas.iter().enumerate() {
        assert_eq!(
            replica["replica"],
            format!("listed#{index}@{}", test_device())
        );
        assert_eq!(replica["state"], "ready");
        assert_eq!(replica["in_flight"], 0);
        assert_eq!(replica["restarts"], 0);
        assert!(replica["loaded_at"].as_u64().is_some());
        assert!(replica["last_error"].is_null());
        // The demo's 658,304 f32 parameters; what the device reported is measured on GPUs.
        assert_eq!(replica["memory_bytes"], 2_633_216);
        assert_eq!(
            replica["device_memory_bytes"].is_u64(),
            test_device() != "cpu"
        );
    }
    assert_eq!(listed["context_length"], 2048);
}

/// E1: new requests are refused at once; in-flight ones finish normally; the call returns when
/// the model is gone; other models see nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_evict_lets_in_flight_requests_finish() {
    let daemon = Daemon::start(&format!(
        "version = 1\n{}{}",
        demo("e1-victim", ""),
        demo("e1-other", "")
    ))
    .await;
    let mut in_flight = open_stream(&daemon, "e1-victim", 1500).await;
    let evict = {
        let client = daemon.client.clone();
        let url = daemon.at("/admin/models/e1-victim/evict");
        tokio::spawn(async move { client.post(url).send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (status, refused) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "e1-victim", "prompt": "x", "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 503, "{refused}");
    assert_eq!(refused["error"]["code"], "model_unavailable");
    let frames = rest(&mut in_flight).await;
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    assert!(
        frames.iter().all(|f| !f.contains("\"error\"")),
        "{frames:?}"
    );
    let response = evict.await.unwrap();
    assert_eq!(response.status(), 200);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["models"][0]["action"], "evicted");
    assert!(model(&admin_models(&daemon).await, "e1-victim").is_none());
    let (status, gone) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "e1-victim", "prompt": "x"}),
        )
        .await;
    assert_eq!(
        (status, gone["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let (status, _) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "e1-other", "prompt": "x", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
}

/// E1 deadline and E2: streams still running when the drain ends, or at once with
/// `mode=abort`, end with one `model_evicted` error and `[DONE]`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evict_deadline_and_abort_end_streams_with_model_evicted() {
    let daemon = Daemon::start(&format!(
        "version = 1\n{}{}",
        demo("e2-drain", ""),
        demo("e2-abort", "")
    ))
    .await;
    for (model, query) in [("e2-drain", "?timeout_ms=200"), ("e2-abort", "?mode=abort")] {
        let mut long = open_stream(&daemon, model, 2000).await;
        let (status, body) = admin_post(
            &daemon,
            &format!("/admin/models/{model}/evict{query}"),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let frames = rest(&mut long).await;
        let (last, before) = frames.split_last().unwrap();
        assert_eq!(last, "[DONE]");
        let error: Value = serde_json::from_str(before.last().unwrap()).unwrap();
        assert_eq!(error["error"]["code"], "model_evicted", "{model}");
        assert!(frames.len() < 2000, "{model}: the stream ran to its end");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_loads_through_the_admin_api_once() {
    let daemon = Daemon::start("version = 1\n").await;
    let entry = json!({"name": "added", "source": "builtin:demo", "max_queue": 4});
    let (status, body) = admin_post(&daemon, "/admin/models", Some(entry.clone())).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["models"][0]["action"], "loaded");
    let (status, _) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "added", "prompt": "x", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200);
    let (status, body) = admin_post(&daemon, "/admin/models", Some(entry)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("model_already_loaded"))
    );
    let bad = json!({"name": "bad", "source": "builtin:demo", "max_concurrent": 0});
    let (status, body) = admin_post(&daemon, "/admin/models", Some(bad)).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("models.max_concurrent"))
    );
    let unknown = json!({"name": "bad", "source": "builtin:demo", "colour": "red"});
    let (status, _) = admin_post(&daemon, "/admin/models", Some(unknown)).await;
    assert_eq!(status, 400);
    // S5: local sources must lie under server.models_root (here the pool file's folder).
    for path in [
        "/nonexistent/model",
        "../x",
        "%2e%2e/x",
        "model/../../y",
        "/etc/passwd",
        "/dev/zero",
        "nope",
    ] {
        let missing = json!({"name": "missing", "source": path});
        let (status, body) = admin_post(&daemon, "/admin/models", Some(missing)).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(
            body["error"]["code"], "path_outside_models_root",
            "{path}: {body}"
        );
        assert_eq!(body["error"]["param"], "source");
    }
    let empty = daemon.pool_path().parent().unwrap().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let (status, body) = admin_post(
        &daemon,
        "/admin/models",
        Some(json!({"name": "e", "source": "empty"})),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing file"),
        "{body}"
    );
    let (status, _) = admin_post(&daemon, "/admin/models/nothing/reload", None).await;
    assert_eq!(status, 404);
}

/// E6: a reload while clients stream is make-before-break: every request succeeds, and the
/// model runs a new generation afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_is_make_before_break() {
    let daemon = Daemon::start(&format!("version = 1\n{}", demo("e6-victim", ""))).await;
    let before = model(&admin_models(&daemon).await, "e6-victim").unwrap()["replicas"][0]
        ["generation"]
        .clone();
    let clients: Vec<_> = (0..3)
        .map(|_| {
            let client = daemon.client.clone();
            let url = daemon.at("/v1/completions");
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for _ in 0..8 {
                    let body = json!({"model": "e6-victim", "prompt": "Hi", "max_tokens": 12});
                    statuses.push(
                        client
                            .post(&url)
                            .json(&body)
                            .send()
                            .await
                            .unwrap()
                            .status()
                            .as_u16(),
                    );
                }
                statuses
            })
        })
        .collect();
    let (status, body) = admin_post(&daemon, "/admin/models/e6-victim/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["models"][0]["action"], "reloaded");
    for client in clients {
        assert!(client.await.unwrap().iter().all(|s| *s == 200));
    }
    let listing = admin_models(&daemon).await;
    let replicas = model(&listing, "e6-victim").unwrap()["replicas"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    assert!(replicas[0]["generation"].as_u64() > before.as_u64());
    assert_eq!(replicas[0]["state"], "ready");
}

/// E4 (scaled): concurrent admin calls on one model while it serves: every admin answer is
/// 200, 404 (the model was just evicted) or 409; no 5xx; inference answers 200, 404 or 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_concurrent_admin_storm_never_errors_or_loads_twice() {
    let daemon = Daemon::start(&format!("version = 1\n{}", demo("e4", ""))).await;
    let admins: Vec<_> = (0..6)
        .map(|task| {
            let client = daemon.client.clone();
            let base = daemon.url.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                for step in 0..6 {
                    let request = match (task + step) % 3 {
                        0 => client
                            .post(format!("{base}/admin/models"))
                            .json(&json!({"name": "e4", "source": "builtin:demo"})),
                        1 => client.post(format!("{base}/admin/models/e4/reload")),
                        _ => client.post(format!("{base}/admin/models/e4/evict?timeout_ms=100")),
                    };
                    statuses.push(request.send().await.unwrap().status().as_u16());
                }
                statuses
            })
        })
        .collect();
    let inference = {
        let client = daemon.client.clone();
        let url = daemon.at("/v1/completions");
        tokio::spawn(async move {
            let mut statuses = Vec::new();
            for _ in 0..30 {
                let body = json!({"model": "e4", "prompt": "Hi", "max_tokens": 3});
                statuses.push(
                    client
                        .post(&url)
                        .json(&body)
                        .send()
                        .await
                        .unwrap()
                        .status()
                        .as_u16(),
                );
            }
            statuses
        })
    };
    let mut max_active = 0;
    for _ in 0..20 {
        let listing = admin_models(&daemon).await;
        if let Some(entry) = model(&listing, "e4") {
            let active = entry["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|r| r["standby"] == false && r["state"] != "draining")
                .count();
            max_active = max_active.max(active);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for admin in admins {
        let statuses = admin.await.unwrap();
        assert!(
            statuses.iter().all(|s| [200, 404, 409].contains(s)),
            "{statuses:?}"
        );
    }
    let statuses = inference.await.unwrap();
    assert!(
        statuses.iter().all(|s| [200, 404, 503].contains(s)),
        "{statuses:?}"
    );
    assert!(
        max_active <= 1,
        "{max_active} active replicas of a one-device model"
    );
}

/// R2, R3, R4: `POST /admin/reload` applies the diff of the pool file; a broken file changes
/// nothing and answers 400 with the same diagnostics as startup.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_reload_applies_the_diff_and_refuses_a_broken_file() {
    let original = format!(
        "version = 1\n{}{}{}",
        demo("r-keep", ""),
        demo("r-change", ""),
        demo("r-remove", "")
    );
    let daemon = Daemon::start(&original).await;
    let generation = |listing: &Value, name: &str| {
        model(listing, name).unwrap()["replicas"][0]["generation"]
            .as_u64()
            .unwrap()
    };
    let before = admin_models(&daemon).await;

    std::fs::write(
        daemon.pool_path(),
        format!("{original}max_concurency = 3\n"),
    )
    .unwrap();
    let (status, body) = admin_post(&daemon, "/admin/reload", None).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["code"], "invalid_config");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("pool.toml:") && message.contains("max_concurency"),
        "{message}"
    );
    assert_eq!(
        generation(&admin_models(&daemon).await, "r-keep"),
        generation(&before, "r-keep")
    );

    // A model whose files exist but do not load: validation passes, the load fails.
    let broken = tempfile::tempdir().unwrap();
    std::fs::write(
        broken.path().join("config.json"),
        r#"{"model_type": "mamba"}"#,
    )
    .unwrap();
    std::fs::write(broken.path().join("tokenizer.json"), "{}").unwrap();
    let next = format!(
        "version = 1\n{}{}{}[[models]]\nname = \"r-broken\"\nsource = \"{}\"\n",
        demo("r-keep", ""),
        demo("r-change", "max_queue = 3"),
        demo("r-add", ""),
        broken.path().display(),
    );
    std::fs::write(daemon.pool_path(), on_test_device(&next)).unwrap();
    let (status, body) = admin_post(&daemon, "/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let broken_outcome = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|o| o["name"] == "r-broken")
        .unwrap()
        .clone();
    assert!(
        broken_outcome["error"]
            .as_str()
            .unwrap()
            .contains("r-broken\" failed to load"),
        "{broken_outcome}"
    );
    let mut outcomes: Vec<(String, String)> = body["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| {
            (
                o["name"].as_str().unwrap().to_string(),
                o["action"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    outcomes.sort();
    let expected = [
        ("r-add", "loaded"),
        ("r-broken", "failed"),
        ("r-change", "reloaded"),
        ("r-keep", "unchanged"),
        ("r-remove", "evicted"),
    ];
    assert_eq!(
        outcomes,
        expected.map(|(a, b)| (a.to_string(), b.to_string()))
    );
    let after = admin_models(&daemon).await;
    assert_eq!(
        generation(&after, "r-keep"),
        generation(&before, "r-keep"),
        "unchanged models are not touched"
    );
    assert!(generation(&after, "r-change") > generation(&before, "r-change"));
    assert!(model(&after, "r-remove").is_none());
    let (status, _) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "r-add", "prompt": "x", "max_tokens": 1}),
        )
        .await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_admin_key_when_one_is_set() {
    let keys = Keys::parse(Some("admin-secret"), "user-key");
    let daemon = Daemon::start_with_keys("version = 1\n", keys).await;
    let get = |token: Option<&str>| {
        let mut request = daemon.client.get(daemon.at("/admin/models"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send()
    };
    let response = get(None).await.unwrap();
    assert_eq!(response.status(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    let response = get(Some("user-key")).await.unwrap();
    assert_eq!(response.status(), 403);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "admin_key_required");
    assert_eq!(get(Some("wrong")).await.unwrap().status(), 401);
    assert_eq!(get(Some("admin-secret")).await.unwrap().status(), 200);
}

/// E5: a request for a model being evicted is refused at once with 503, never routed to a
/// stopping replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_for_a_draining_model_gets_503_at_once() {
    let daemon = Daemon::start(&format!("version = 1\n{}", demo("e5", ""))).await;
    let mut in_flight = open_stream(&daemon, "e5", 300).await;
    let evict = {
        let client = daemon.client.clone();
        let url = daemon.at("/admin/models/e5/evict?timeout_ms=5000");
        tokio::spawn(async move { client.post(url).send().await.unwrap().status().as_u16() })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = daemon
            .post(
                "/v1/completions",
                &json!({"model": "e5", "prompt": "x", "max_tokens": 1}),
            )
            .await;
        if status == 503 {
            assert_eq!(body["error"]["code"], "model_unavailable");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("being evicted"),
                "{body}"
            );
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{status} {body}");
    }
    let frames = rest(&mut in_flight).await;
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    assert_eq!(evict.await.unwrap(), 200);
}

/// Reload with a budget that holds one copy only: break-before-make, and requests sent during
/// the reload wait and succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_breaks_before_making_when_the_budget_holds_one_copy() {
    let daemon = Daemon::start(&format!(
        "version = 1\n[devices.cpu]\nmemory_budget = \"4MiB\"\n{}",
        demo("tight", "")
    ))
    .await;
    let before =
        model(&admin_models(&daemon).await, "tight").unwrap()["replicas"][0]["generation"].as_u64();
    let request = {
        let client = daemon.client.clone();
        let url = daemon.at("/v1/completions");
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let body = json!({"model": "tight", "prompt": "Hi", "max_tokens": 3});
            client
                .post(url)
                .json(&body)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        })
    };
    let (status, body) = admin_post(&daemon, "/admin/models/tight/reload", None).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["models"][0]["action"], "reloaded");
    assert_eq!(request.await.unwrap(), 200);
    let replicas = model(&admin_models(&daemon).await, "tight").unwrap()["replicas"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(replicas.len(), 1);
    assert!(replicas[0]["generation"].as_u64() > before);
}

/// R5: the pool file is read once per reload: a truncated file is refused whole, and a file
/// replaced by rename is applied whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_reload_reads_the_file_once_and_applies_it_whole() {
    let daemon = Daemon::start(&format!("version = 1\n{}", demo("r5-a", ""))).await;
    std::fs::write(daemon.pool_path(), "").unwrap();
    let (status, body) = admin_post(&daemon, "/admin/reload", None).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("invalid_config")),
        "{body}"
    );
    assert!(model(&admin_models(&daemon).await, "r5-a").is_some());
    let staged = daemon.pool_path().with_extension("new");
    std::fs::write(
        &staged,
        on_test_device(&format!(
            "version = 1\n{}{}",
            demo("r5-b", ""),
            demo("r5-c", "")
        )),
    )
    .unwrap();
    std::fs::rename(&staged, daemon.pool_path()).unwrap();
    let (status, body) = admin_post(&daemon, "/admin/reload", None).await;
    assert_eq!(status, 200, "{body}");
    let listing = admin_models(&daemon).await;
    let names: Vec<&str> = listing["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["r5-b", "r5-c"]);
}
