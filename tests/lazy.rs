//! Lazy loading, idle unloading and memory budgets through the real daemon: `preload = false`
//! loads on the first request, `keep_alive` unloads an idle model, and a device's
//! `memory_budget` unloads the least recently used idle, unpinned model to make room, never a
//! busy or pinned one (RELIABILITY.md E7).

mod common;

use std::time::{Duration, Instant};

use common::daemon::{Daemon, SseReader};
use serde_json::{json, Value};

/// Fits one demo model (about 2.5 MiB of f32 weights) but not two.
const ONE_DEMO: &str = "[devices.cpu]\nmemory_budget = \"4MiB\"\n";

fn demo(name: &str, extra: &str) -> String {
    format!("[[models]]\nname = \"{name}\"\nsource = \"builtin:demo\"\n{extra}\n")
}

async fn loaded(daemon: &Daemon, name: &str) -> bool {
    let listing: Value = daemon.get_json("/admin/models").await;
    listing["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == name)
        .unwrap()["loaded"]
        == true
}

/// Completes a request, then waits until the router has released its slot (the release
/// arrives just after the response) and no operation (an on-demand load finishing) holds a
/// model, so that the model counts as idle.
async fn complete(daemon: &Daemon, name: &str) -> (u16, Value) {
    let body = json!({"model": name, "prompt": "Hi", "max_tokens": 3});
    let answer = daemon.post("/v1/completions", &body).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let listing: Value = daemon.get_json("/admin/models").await;
        let busy = listing["models"].as_array().unwrap().iter().any(|m| {
            m["queued"] != 0
                || m["operation_in_progress"] == true
                || m["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["in_flight"] != 0)
        });
        if !busy || Instant::now() >= deadline {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lazy_model_loads_on_its_first_request() {
    let daemon = Daemon::start(&format!("version = 1\n{}", demo("lazy", "preload = false"))).await;
    assert!(!loaded(&daemon, "lazy").await);
    let models: Value = daemon.get_json("/v1/models").await;
    assert_eq!(
        models["data"][0]["id"], "lazy",
        "an unloaded model is still listed"
    );
    let listing: Value = daemon.get_json("/admin/models").await;
    assert_eq!(listing["models"][0]["state"], "evicted");
    let (status, body) = complete(&daemon, "lazy").await;
    assert_eq!(status, 200, "{body}");
    assert!(loaded(&daemon, "lazy").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_unloads_an_idle_model_and_the_next_request_reloads_it() {
    let daemon = Daemon::start(&format!(
        "version = 1\n{}",
        demo("idle", "keep_alive = \"300ms\"")
    ))
    .await;
    let (status, _) = complete(&daemon, "idle").await;
    assert_eq!(status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    while loaded(&daemon, "idle").await {
        assert!(
            Instant::now() < deadline,
            "the idle model was never unloaded"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, body) = complete(&daemon, "idle").await;
    assert_eq!(status, 200, "{body}");
    assert!(loaded(&daemon, "idle").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_budget_unloads_the_least_recently_used_idle_model() {
    let daemon = Daemon::start(&format!(
        "version = 1\n{ONE_DEMO}{}{}",
        demo("first", ""),
        demo("second", "preload = false")
    ))
    .await;
    assert!(loaded(&daemon, "first").await);
    let (status, body) = complete(&daemon, "second").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !loaded(&daemon, "first").await,
        "first was not unloaded to make room"
    );
    assert!(loaded(&daemon, "second").await);
    let (status, body) = complete(&daemon, "first").await;
    assert_eq!(status, 200, "{body}");
    assert!(loaded(&daemon, "first").await);
    assert!(!loaded(&daemon, "second").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_and_busy_models_are_never_unloaded_to_make_room() {
    let daemon = Daemon::start(&format!(
        "version = 1\n{ONE_DEMO}{}{}",
        demo("pinned", "pinned = true"),
        demo("wanting", "preload = false")
    ))
    .await;
    let (status, body) = complete(&daemon, "wanting").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("memory budget"),
        "{body}"
    );
    assert!(loaded(&daemon, "pinned").await);

    let daemon = Daemon::start(&format!(
        "version = 1\n{ONE_DEMO}{}{}",
        demo("busy", ""),
        demo("wanting", "preload = false")
    ))
    .await;
    let stream = json!({"model": "busy", "prompt": "Hello", "max_tokens": 300, "ignore_eos": true, "stream": true});
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&stream)
        .send()
        .await
        .unwrap();
    let mut busy = SseReader::new(response);
    assert!(busy.next().await.is_some());
    let (status, body) = complete(&daemon, "wanting").await;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("busy or pinned"),
        "{body}"
    );
    let mut last = String::new();
    while let Some(frame) = busy.next().await {
        last = frame;
    }
    assert_eq!(last, "[DONE]");
    assert!(loaded(&daemon, "busy").await);
}

/// A pool reload that adds a model makes room within the budget the same way (here by
/// unloading a lazily loaded, idle model), and reports a model that cannot fit as failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_reload_respects_the_memory_budget() {
    for pinned in [false, true] {
        let extra = if pinned {
            "preload = false\npinned = true"
        } else {
            "preload = false"
        };
        let old = demo("old", extra);
        let daemon = Daemon::start(&format!("version = 1\n{ONE_DEMO}{old}")).await;
        let (status, _) = complete(&daemon, "old").await;
        assert_eq!(status, 200);
        assert!(loaded(&daemon, "old").await);
        let next = format!("version = 1\n{ONE_DEMO}{old}{}", demo("new", ""));
        std::fs::write(daemon.pool_path(), next).unwrap();
        // The on-demand load of `old` holds its claim until its task sees the replica ready
        // (it polls every 25 ms), which may be just after the request was served: while it
        // does, `old` is busy and cannot be unloaded. An operator would retry; so does the
        // test (a claim that is never released fails it).
        let mut attempts = 0;
        let (body, outcome) = loop {
            attempts += 1;
            let response = daemon
                .client
                .post(daemon.at("/admin/reload"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await.unwrap();
            let outcome = body["models"]
                .as_array()
                .unwrap()
                .iter()
                .find(|o| o["name"] == "new")
                .unwrap()
                .clone();
            if pinned || outcome["action"] != "failed" || attempts == 20 {
                break (body, outcome);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        if pinned {
            assert_eq!(outcome["action"], "failed", "{body}");
            assert!(
                outcome["error"].as_str().unwrap().contains("memory budget"),
                "{outcome}"
            );
            assert!(loaded(&daemon, "old").await);
        } else {
            assert_eq!(outcome["action"], "loaded", "{body}");
            assert!(loaded(&daemon, "new").await);
            assert!(
                !loaded(&daemon, "old").await,
                "the idle model was not unloaded to make room"
            );
        }
    }
}
