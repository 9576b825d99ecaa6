//! The pool daemon over HTTP: conformance through the API, routing by name, replicas,
//! admission, disconnects, health under load, and config errors at startup.

mod common;

use std::time::{Duration, Instant};

use common::daemon::{Daemon, SseReader};
use common::{fixture_pool, fixtures, golden, index};
use serde_json::{json, Value};

fn demo_pool(extra: &str) -> String {
    format!("version = 1\n{extra}")
}

/// The text of a streamed chunk (completion `text` or chat `delta.content`).
fn chunk_text(chunk: &Value) -> String {
    let choice = &chunk["choices"][0];
    choice["text"]
        .as_str()
        .or_else(|| choice["delta"]["content"].as_str())
        .unwrap_or_default()
        .to_string()
}

fn chunk_ids(chunk: &Value) -> Vec<u64> {
    chunk["choices"][0]["token_ids"]
        .as_array()
        .map(|ids| ids.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_architecture_returns_the_golden_tokens_over_http() {
    let Some(fixtures) = fixtures() else { return };
    let entries: Vec<_> = index(&fixtures)
        .into_iter()
        .filter(|entry| entry.kind == "safetensors")
        .collect();
    let daemon = Daemon::start(&fixture_pool(&fixtures, &entries)).await;
    for entry in &entries {
        let cases = golden(&fixtures, &entry.golden[0]).cases;
        let mut kinds_seen = Vec::new();
        for case in cases {
            let label = format!("{} {}", entry.name, case.name);
            let (path, mut body) = if case.kind == "chat" {
                ("/v1/chat/completions", json!({"messages": case.messages}))
            } else {
                ("/v1/completions", json!({"prompt": case.prompt}))
            };
            body["model"] = json!(entry.name);
            body["temperature"] = json!(0);
            body["ignore_eos"] = json!(true);
            body["return_token_ids"] = json!(true);
            body["max_tokens"] = json!(case.generated_ids.len());
            if case.kind == "chat" {
                body["logprobs"] = json!(true);
                body["top_logprobs"] = json!(5);
            } else {
                body["logprobs"] = json!(5);
            }
            let (status, response) = daemon.post(path, &body).await;
            assert_eq!(status, 200, "{label}: {response}");
            let choice = &response["choices"][0];
            common::check_first_logprobs(&label, &choice["logprobs"], &case.last_prompt_top5);
            body.as_object_mut().unwrap().remove("logprobs");
            body.as_object_mut().unwrap().remove("top_logprobs");
            assert_eq!(
                choice["prompt_token_ids"],
                json!(case.prompt_ids),
                "{label}"
            );
            assert_eq!(choice["token_ids"], json!(case.generated_ids), "{label}");
            let text = choice["text"]
                .as_str()
                .or_else(|| choice["message"]["content"].as_str())
                .unwrap();
            assert_eq!(text, case.generated_text, "{label}");
            assert_eq!(choice["finish_reason"], "length", "{label}");
            assert_eq!(
                response["usage"]["completion_tokens"],
                json!(case.generated_ids.len())
            );

            body["stream"] = json!(true);
            let frames = daemon.stream(path, &body).await;
            assert_eq!(frames.last().map(String::as_str), Some("[DONE]"), "{label}");
            let chunks: Vec<Value> = frames[..frames.len() - 1]
                .iter()
                .map(|frame| serde_json::from_str(frame).unwrap())
                .collect();
            let streamed: String = chunks.iter().map(chunk_text).collect();
            let streamed_ids: Vec<u64> = chunks.iter().flat_map(chunk_ids).collect();
            assert_eq!(streamed, text, "{label}: streamed text");
            assert_eq!(
                json!(streamed_ids),
                json!(case.generated_ids),
                "{label}: streamed ids"
            );
            kinds_seen.push(case.kind);
        }
        assert!(kinds_seen.iter().any(|k| k == "plain"), "{}", entry.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_and_replicas_are_served_by_name_and_unknown_names_are_404() {
    let daemon = Daemon::start(&demo_pool(
        "[[models]]\nname = \"alpha\"\nsource = \"builtin:demo\"\ndevices = [\"cpu\", \"cpu\"]\n\
         [[models]]\nname = \"beta\"\nsource = \"builtin:demo\"\n",
    ))
    .await;
    let models: Value = daemon.get_json("/v1/models").await;
    let listed: Vec<(String, u64)> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["id"].as_str().unwrap().to_string(),
                m["replicas"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![("alpha".to_string(), 2), ("beta".to_string(), 1)]
    );

    // Two long streams on alpha both produce tokens while the other is still open: two
    // replicas serve at once (each admits one request at a time).
    let long = json!({"model": "alpha", "prompt": "Hello", "max_tokens": 400, "ignore_eos": true, "stream": true});
    let first = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let second = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let (mut a, mut b) = (SseReader::new(first), SseReader::new(second));
    for _ in 0..3 {
        assert!(a.next().await.is_some());
        assert!(b.next().await.is_some());
    }
    drop((a, b));

    let (status, body) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "beta", "prompt": "Hi", "max_tokens": 3}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model"], "beta");
    let (status, body) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "gamma", "prompt": "Hi"}),
        )
        .await;
    assert_eq!(status, 404);
    assert_eq!(body["error"]["code"], "model_not_found");
    assert_eq!(body["error"]["type"], "not_found_error");
    assert_eq!(body["error"]["param"], "model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_slots_and_queue_get_503_with_retry_after() {
    let daemon = Daemon::start(&demo_pool(
        "[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\nmax_concurrent = 1\nmax_queue = 2\n",
    ))
    .await;
    // A long stream holds the only slot until the test drops it.
    let holder = json!({"model": "demo", "prompt": "Hello", "max_tokens": 2000, "ignore_eos": true, "stream": true});
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&holder)
        .send()
        .await
        .unwrap();
    let mut holder = SseReader::new(response);
    assert!(holder.next().await.is_some());
    let body = json!({"model": "demo", "prompt": "Hello", "max_tokens": 20, "ignore_eos": true});
    let queued: Vec<_> = (0..2)
        .map(|_| {
            let client = daemon.client.clone();
            let url = daemon.at("/v1/completions");
            let body = body.clone();
            tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap() })
        })
        .collect();
    // Admission is one router message; give both requests time to reach the queue.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 503);
    assert_eq!(refused.headers()["retry-after"], "1");
    let error: Value = refused.json().await.unwrap();
    assert_eq!(error["error"]["code"], "server_overloaded");
    assert_eq!(error["error"]["type"], "service_unavailable_error");
    assert!(
        holder.next().await.is_some(),
        "the slot holder is still generating"
    );
    drop(holder);
    for task in queued {
        let response = task.await.unwrap();
        assert_eq!(response.status(), 200);
        let done: Value = response.json().await.unwrap();
        assert_eq!(done["usage"]["completion_tokens"], 20);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_replica() {
    let daemon = Daemon::start(&demo_pool(
        "[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n",
    ))
    .await;
    let endless = json!({"model": "demo", "prompt": "Hello", "max_tokens": 2000, "ignore_eos": true, "stream": true});
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&endless)
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    for _ in 0..3 {
        assert!(reader.next().await.is_some());
    }
    drop(reader);
    let started = Instant::now();
    let quick = json!({"model": "demo", "prompt": "Hi", "max_tokens": 1, "stream": true});
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&quick)
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    let first = reader.next().await.unwrap();
    let waited = started.elapsed();
    assert!(first.contains("\"text\""), "{first}");
    assert!(
        waited < Duration::from_secs(1),
        "the next request started after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_quickly_while_a_long_generation_runs() {
    let daemon = Daemon::start(&demo_pool(
        "[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n",
    ))
    .await;
    let long = json!({"model": "demo", "prompt": "Hello", "max_tokens": 1500, "ignore_eos": true, "stream": true});
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&long)
        .send()
        .await
        .unwrap();
    let mut reader = SseReader::new(response);
    assert!(reader.next().await.is_some());
    let mut timings = Vec::new();
    for _ in 0..7 {
        let started = Instant::now();
        let health = daemon
            .client
            .get(daemon.at("/health"))
            .send()
            .await
            .unwrap();
        timings.push(started.elapsed());
        assert_eq!(health.status(), 200);
        assert!(reader.next().await.is_some(), "the generation ended early");
    }
    timings.sort();
    assert!(
        timings[3] < Duration::from_millis(50),
        "median /health took {:?}",
        timings[3]
    );
}

#[test]
fn a_broken_pool_file_fails_startup_naming_file_line_and_field() {
    let cases = [
        ("version = 1\n[[models]\nname = \"x\"\n", ":2:", "models"),
        ("version = 1\n[[models]]\nname = \"x\"\nsource = \"builtin:demo\"\nmax_concurency = 2\n", ":5:", "max_concurency"),
        (
            "version = 1\n[[models]]\nname = \"x\"\nsource = \"builtin:demo\"\n[[models]]\nname = \"x\"\nsource = \"builtin:demo\"\n",
            ":6:",
            "models[1].name",
        ),
        (
            "version = 1\n[[models]]\nname = \"x\"\nsource = \"builtin:demo\"\ndevices = [\"cuda:7\"]\n",
            ":5:",
            "device cuda:7 is not available",
        ),
    ];
    for (text, line, field) in cases {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broken.toml");
        std::fs::write(&path, text).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_llorch"))
            .args([
                "serve",
                "--config",
                path.to_str().unwrap(),
                "--listen",
                "127.0.0.1:0",
            ])
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        let expected = format!("{}{line}", path.display());
        assert!(stderr.contains(&expected), "{stderr}");
        assert!(stderr.contains(field), "{stderr}");
        assert!(!stderr.contains("listening"), "{stderr}");
    }
}

/// The demo model's greedy output repeats one token; OpenAI's penalties on generated tokens
/// break the loop, and the first token (nothing generated yet) is the same either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_and_frequency_penalties_break_a_greedy_loop() {
    let daemon = Daemon::start(&demo_pool(
        "[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n",
    ))
    .await;
    let ids = |penalties: Value| {
        let mut body = json!({
            "model": "demo", "prompt": "hello there", "max_tokens": 40, "temperature": 0,
            "ignore_eos": true, "return_token_ids": true,
        });
        body.as_object_mut()
            .unwrap()
            .extend(penalties.as_object().unwrap().clone());
        let daemon = &daemon;
        async move {
            let (status, response) = daemon.post("/v1/completions", &body).await;
            assert_eq!(status, 200, "{response}");
            let ids: Vec<u64> =
                serde_json::from_value(response["choices"][0]["token_ids"].clone()).unwrap();
            ids
        }
    };
    let distinct = |ids: &[u64]| ids.iter().collect::<std::collections::HashSet<_>>().len();
    let plain = ids(json!({})).await;
    assert!(distinct(&plain) < 10, "the demo's greedy loop: {plain:?}");
    for penalties in [
        json!({"frequency_penalty": 1.0}),
        json!({"presence_penalty": 2.0}),
    ] {
        let penalised = ids(penalties.clone()).await;
        assert_eq!(penalised[0], plain[0], "{penalties}");
        assert!(
            distinct(&penalised) > 3 * distinct(&plain),
            "{penalties}: {penalised:?} against {plain:?}"
        );
    }
    assert_eq!(ids(json!({"presence_penalty": -2.0})).await, plain);
    let (status, response) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "demo", "prompt": "x", "frequency_penalty": 2.5}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(response["error"]["param"], "frequency_penalty");
}

/// A sequence that ends at an end-of-sequence token counts it but does not write its text
/// (the demo's are `<|eos|>` and `<|end|>`), plain or constrained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_end_of_sequence_token_is_counted_but_not_written() {
    let daemon = Daemon::start(&demo_pool(
        "[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n",
    ))
    .await;
    let mut stopped = 0;
    for seed in 0..20 {
        let body = json!({
            "model": "demo", "prompt": "hi", "max_tokens": 60, "seed": seed,
            "return_token_ids": true,
        });
        let (status, response) = daemon.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{response}");
        let choice = &response["choices"][0];
        let text = choice["text"].as_str().unwrap();
        assert!(
            !text.contains("<|eos|>") && !text.contains("<|end|>"),
            "{text:?}"
        );
        let ids = choice["token_ids"].as_array().unwrap().len();
        assert_eq!(response["usage"]["completion_tokens"], json!(ids));
        if choice["finish_reason"] == "stop" {
            stopped += 1;
        }
    }
    assert!(stopped >= 3, "{stopped} of 20 ended at EOS");
    for seed in 0..5 {
        let body = json!({
            "model": "demo", "prompt": "x", "max_tokens": 40, "seed": seed, "guided_regex": "a+",
        });
        let (status, response) = daemon.post("/v1/completions", &body).await;
        assert_eq!(status, 200, "{response}");
        let text = response["choices"][0]["text"].as_str().unwrap();
        assert!(
            !text.is_empty() && text.chars().all(|c| c == 'a'),
            "{text:?}"
        );
    }
}

/// `n` choices of one prompt: the first is prefilled alone, the others reuse its full KV
/// blocks from the prefix cache (`llorch_prefix_cache_hits_total` counts their tokens);
/// usage counts the prompt once and every choice's tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_choices_of_one_request_share_the_prompts_blocks() {
    let daemon = Daemon::start(&demo_pool(
        "[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n",
    ))
    .await;
    let hits = |metrics: String| -> u64 {
        metrics
            .lines()
            .find(|l| l.starts_with("llorch_prefix_cache_hits_total{model=\"demo\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    };
    let before = hits(daemon.metrics().await);
    let prompt: Vec<String> = (0..60).map(|i| format!("word{i}")).collect();
    let body = json!({
        "model": "demo", "prompt": prompt.join(" "), "max_tokens": 5, "n": 4, "seed": 1,
        "ignore_eos": true,
    });
    let (status, response) = daemon.post("/v1/completions", &body).await;
    assert_eq!(status, 200, "{response}");
    let choices = response["choices"].as_array().unwrap();
    let indexes: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1, 2, 3]);
    let prompt_tokens = response["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(response["usage"]["completion_tokens"], 20);
    let full_blocks = prompt_tokens / 16 * 16;
    assert_eq!(hits(daemon.metrics().await) - before, 3 * full_blocks);
}
