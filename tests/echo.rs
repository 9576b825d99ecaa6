//! Completions with `echo`: the prompt comes back before the completion, and with `logprobs`
//! every prompt token after the first has its log probability, as evaluation harnesses ask
//! with `max_tokens: 0`. Checked against the transformers goldens: echoing a prompt followed
//! by its greedy continuation, each continuation token is the most likely at its position,
//! and the first one's alternatives are the golden top-5 logits (full-precision weights).

mod common;

use common::daemon::Daemon;
use common::{check_first_logprobs, fixture_pool, fixtures, golden, index};
use serde_json::{json, Value};

const COMPLETIONS: &str = "/v1/completions";

fn demo_pool() -> String {
    "version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n".to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_greedy_continuations_match_the_goldens_for_every_fixture() {
    let Some(fixtures) = fixtures() else { return };
    let entries = index(&fixtures);
    let daemon = Daemon::start(&fixture_pool(&fixtures, &entries)).await;
    for entry in &entries {
        let case = golden(&fixtures, &entry.golden[0])
            .cases
            .into_iter()
            .find(|case| case.kind == "plain")
            .unwrap();
        let label = format!("{} {}", entry.name, case.name);
        let prompt_len = case.prompt_ids.len();
        let ids: Vec<u32> = case
            .prompt_ids
            .iter()
            .chain(&case.generated_ids)
            .copied()
            .collect();
        let body = json!({"model": entry.name, "prompt": ids, "echo": true, "logprobs": 5,
            "max_tokens": 0});
        let (status, response) = daemon.post(COMPLETIONS, &body).await;
        assert_eq!(status, 200, "{label}: {response}");
        let choice = &response["choices"][0];
        assert_eq!(choice["finish_reason"], "length", "{label}");
        assert_eq!(response["usage"]["completion_tokens"], 0, "{label}");
        let logprobs = &choice["logprobs"];
        let values = logprobs["token_logprobs"].as_array().unwrap();
        assert_eq!(values.len(), ids.len(), "{label}: one entry per token");
        assert_eq!(logprobs["text_offset"].as_array().unwrap().len(), ids.len());
        assert!(values[0].is_null(), "{label}: the first token has none");
        assert!(values[1..].iter().all(Value::is_f64), "{label}: {logprobs}");
        let text: String = logprobs["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_str().unwrap())
            .collect();
        assert_eq!(
            choice["text"], text,
            "{label}: token ids echo as their texts"
        );
        for i in prompt_len..ids.len() {
            let chosen = values[i].as_f64().unwrap();
            let best = logprobs["top_logprobs"][i]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_f64().unwrap())
                .fold(f64::NEG_INFINITY, f64::max);
            assert!(
                (chosen - best).abs() < 1e-4,
                "{label}: the greedy token at {i} is the most likely ({chosen} against {best})"
            );
        }
        // Q8_0 weights run against Q8_0-quantized activations, as in llama.cpp, so their
        // logits differ from the reference's by more than the tolerance.
        if !entry.name.ends_with("q8_0") {
            let at_first = json!({
                "token_logprobs": [values[prompt_len]],
                "top_logprobs": [logprobs["top_logprobs"][prompt_len]],
            });
            check_first_logprobs(&label, &at_first, &case.last_prompt_top5);
        }
    }
}

/// The same positions' log probabilities, echoed (every row of one prefill) and generated
/// (the last row of a shorter prompt), agree: each prefix's next-token alternatives are the
/// echo's alternatives at that position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_and_generated_log_probabilities_agree() {
    let daemon = Daemon::start(&demo_pool()).await;
    let prompt = "The quick brown fox jumps over the lazy dog, then rests.";
    let body =
        json!({"model": "demo", "prompt": prompt, "echo": true, "logprobs": 3, "max_tokens": 0});
    let (status, echoed) = daemon.post(COMPLETIONS, &body).await;
    assert_eq!(status, 200, "{echoed}");
    let (_, ids) = daemon
        .post(
            COMPLETIONS,
            &json!({"model": "demo", "prompt": prompt, "max_tokens": 1, "return_token_ids": true}),
        )
        .await;
    let ids: Vec<u64> =
        serde_json::from_value(ids["choices"][0]["prompt_token_ids"].clone()).unwrap();
    let echoed = &echoed["choices"][0];
    assert_eq!(echoed["text"], prompt);
    for k in [1, 5, ids.len() - 1] {
        let body = json!({"model": "demo", "prompt": ids[..k], "max_tokens": 1, "logprobs": 3,
            "temperature": 0});
        let (status, generated) = daemon.post(COMPLETIONS, &body).await;
        assert_eq!(status, 200, "{generated}");
        let from_generation = &generated["choices"][0]["logprobs"]["top_logprobs"][0];
        let from_echo = &echoed["logprobs"]["top_logprobs"][k];
        let (a, b) = (
            from_generation.as_object().unwrap(),
            from_echo.as_object().unwrap(),
        );
        assert_eq!(a.len(), b.len(), "{k}: {a:?} {b:?}");
        for (token, lp) in a {
            let other = b[token].as_f64().unwrap();
            assert!((lp.as_f64().unwrap() - other).abs() < 1e-4, "{k} {token}");
        }
    }
}

/// A prompt longer than a step's token budget is echoed from several prefill chunks, and a
/// prompt already in the prefix cache is computed again for its log probabilities: both give
/// what one whole prefill gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_and_cached_prompts_echo_every_position() {
    let pool = format!(
        "{}[[models]]\nname = \"chunked\"\nsource = \"builtin:demo\"\nmax_batch_tokens = 8\n",
        demo_pool()
    );
    let daemon = Daemon::start(&pool).await;
    let prompt = "A prompt long enough to span several prefill chunks and prefix cache blocks.";
    let echo = |model: &str| json!({"model": model, "prompt": prompt, "echo": true, "logprobs": 2, "max_tokens": 0});
    let plain = json!({"model": "chunked", "prompt": prompt, "max_tokens": 1});
    assert_eq!(daemon.post(COMPLETIONS, &plain).await.0, 200);
    let (_, whole) = daemon.post(COMPLETIONS, &echo("demo")).await;
    let (_, chunked) = daemon.post(COMPLETIONS, &echo("chunked")).await;
    let (whole, chunked) = (
        &whole["choices"][0]["logprobs"],
        &chunked["choices"][0]["logprobs"],
    );
    let values = chunked["token_logprobs"].as_array().unwrap();
    assert!(values.len() > 40, "{chunked}");
    assert!(values[1..].iter().all(Value::is_f64), "{chunked}");
    for (i, (a, b)) in values
        .iter()
        .zip(whole["token_logprobs"].as_array().unwrap())
        .enumerate()
    {
        if let (Some(a), Some(b)) = (a.as_f64(), b.as_f64()) {
            assert!((a - b).abs() < 1e-4, "position {i}: {a} against {b}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_prepends_the_prompt_streamed_and_not() {
    let daemon = Daemon::start(&demo_pool()).await;
    let body = json!({"model": "demo", "prompt": "Hello there", "echo": true, "max_tokens": 4,
        "seed": 1});
    let (status, plain) = daemon.post(COMPLETIONS, &body).await;
    assert_eq!(status, 200, "{plain}");
    let text = plain["choices"][0]["text"].as_str().unwrap();
    assert!(
        text.starts_with("Hello there") && text.len() > 11,
        "{text:?}"
    );
    assert_eq!(plain["usage"]["completion_tokens"], 4);
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["logprobs"] = json!(2);
    let chunks = daemon.stream(COMPLETIONS, &streamed).await;
    let first: Value = serde_json::from_str(&chunks[0]).unwrap();
    assert_eq!(first["choices"][0]["text"], "Hello there", "{chunks:?}");
    let tokens = first["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .unwrap();
    assert!(tokens[0].is_null() && tokens.len() > 2, "{first}");
    let all: String = chunks
        .iter()
        .filter(|c| *c != "[DONE]")
        .map(|c| {
            let chunk: Value = serde_json::from_str(c).unwrap();
            chunk["choices"][0]["text"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect();
    assert_eq!(all, text, "the same seed, streamed or not");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_is_refused_on_chat_and_max_tokens_zero_needs_it() {
    let daemon = Daemon::start(&demo_pool()).await;
    let chat = json!({"model": "demo", "messages": [{"role": "user", "content": "hi"}],
        "echo": true});
    let (status, body) = daemon.post("/v1/chat/completions", &chat).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("echo"))
    );
    let zero = json!({"model": "demo", "prompt": "hi", "max_tokens": 0});
    let (status, body) = daemon.post(COMPLETIONS, &zero).await;
    assert_eq!(
        (status, body["error"]["param"].as_str()),
        (400, Some("max_tokens"))
    );
}
