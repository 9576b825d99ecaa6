//! Tool calls over HTTP: `tools` rendered into the prompt (by a template that takes them, and
//! described in a system message for one that does not), `tool_choice` `required` and a named
//! function forcing valid calls even from random weights, streamed as `delta.tool_calls`,
//! `none` leaving the tools out, a `tool` message going back into the template, and bad
//! tools refused.

mod common;

use common::daemon::Daemon;
use common::{fixtures, load_cpu};
use serde_json::{json, Value};

const CHAT: &str = "/v1/chat/completions";

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                "required": ["city", "unit"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add",
            "parameters": {"type": "object", "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 999},
                "b": {"type": "integer", "minimum": 0, "maximum": 999}},
                "required": ["a", "b"], "additionalProperties": false}}}
    ])
}

fn request(model: &str, choice: Value, seed: u64) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"}],
        "tools": tools(),
        "tool_choice": choice,
        "parallel_tool_calls": false,
        "seed": seed,
        "max_tokens": 600,
    })
}

/// Checks that a call names one of the tools (`only`, when given) and that its arguments are
/// a JSON object with the function's required fields of the right types.
fn check_call(call: &Value, only: Option<&str>) {
    assert_eq!(call["type"], "function", "{call}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{call}");
    let name = call["function"]["name"].as_str().unwrap();
    let arguments: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    match name {
        "get_weather" => {
            assert!(arguments["city"].is_string(), "{arguments}");
            let unit = arguments["unit"].as_str().unwrap();
            assert!(["celsius", "fahrenheit"].contains(&unit), "{arguments}");
        }
        "add" => assert!(
            arguments["a"].is_i64() && arguments["b"].is_i64(),
            "{arguments}"
        ),
        other => panic!("called {other:?}"),
    }
    if let Some(only) = only {
        assert_eq!(name, only);
    }
}

fn pool(extra: &str) -> String {
    format!("version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n{extra}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_and_named_tool_choices_give_valid_calls() {
    let daemon = Daemon::start(&pool("")).await;
    for seed in 0..8 {
        let (status, body) = daemon
            .post(CHAT, &request("demo", json!("required"), seed))
            .await;
        assert_eq!(status, 200, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
        assert_eq!(choice["message"]["content"], Value::Null, "{body}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        assert!(!calls.is_empty(), "{body}");
        calls.iter().for_each(|call| check_call(call, None));
    }
    let named = json!({"type": "function", "function": {"name": "add"}});
    let (status, body) = daemon.post(CHAT, &request("demo", named, 3)).await;
    assert_eq!(status, 200, "{body}");
    let calls = body["choices"][0]["message"]["tool_calls"]
        .as_array()
        .unwrap();
    assert_eq!(calls.len(), 1, "{body}");
    check_call(&calls[0], Some("add"));
}

/// With parallel calls allowed, a call may follow a call; a random model rarely ends on its
/// own, so the end-of-sequence token (id 2) gets a bias, as a client may give it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_calls_come_back_as_several_tool_calls() {
    let daemon = Daemon::start(&pool("")).await;
    let mut most = 0;
    for seed in 0..8 {
        let mut body = request("demo", json!("required"), seed);
        body["parallel_tool_calls"] = json!(true);
        body["logit_bias"] = json!({"2": 10});
        let (status, body) = daemon.post(CHAT, &body).await;
        assert_eq!(status, 200, "{body}");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
        let calls = choice["message"]["tool_calls"].as_array().unwrap();
        calls.iter().for_each(|call| check_call(call, None));
        most = most.max(calls.len());
    }
    assert!(most >= 2, "no answer held two calls");
}

/// Reassembles streamed chunks the way the OpenAI SDK does: content by concatenation, calls
/// by their `index`, their `arguments` by concatenation.
fn reassemble(chunks: &[String]) -> (String, Vec<Value>, String) {
    let mut content = String::new();
    let mut calls: Vec<Value> = Vec::new();
    let mut finish = String::new();
    for data in chunks.iter().filter(|d| *d != "[DONE]") {
        let chunk: Value = serde_json::from_str(data).unwrap();
        let Some(choice) = chunk["choices"].get(0) else {
            continue;
        };
        content.push_str(choice["delta"]["content"].as_str().unwrap_or(""));
        for delta in choice["delta"]["tool_calls"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let index = delta["index"].as_u64().unwrap() as usize;
            if index == calls.len() {
                calls.push(json!({"id": delta["id"], "type": delta["type"],
                    "function": {"name": delta["function"]["name"], "arguments": ""}}));
            }
            let arguments = delta["function"]["arguments"].as_str().unwrap_or("");
            let so_far = calls[index]["function"]["arguments"]
                .as_str()
                .unwrap()
                .to_string();
            calls[index]["function"]["arguments"] = json!(so_far + arguments);
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            finish = reason.to_string();
        }
    }
    (content, calls, finish)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_calls_arrive_as_tool_call_deltas() {
    let daemon = Daemon::start(&pool("")).await;
    for seed in 0..4 {
        let mut body = request("demo", json!("required"), seed);
        body["stream"] = json!(true);
        let chunks = daemon.stream(CHAT, &body).await;
        let (content, calls, finish) = reassemble(&chunks);
        assert_eq!(finish, "tool_calls", "{chunks:?}");
        assert_eq!(content, "", "{chunks:?}");
        assert!(!calls.is_empty(), "{chunks:?}");
        calls.iter().for_each(|call| check_call(call, None));
    }
}

/// The prompt the daemon built, decoded with the demo model's own tokenizer.
async fn rendered_prompt(daemon: &Daemon, mut body: Value) -> String {
    body["return_token_ids"] = json!(true);
    body["max_tokens"] = json!(1);
    let (status, response) = daemon.post(CHAT, &body).await;
    assert_eq!(status, 200, "{response}");
    let ids: Vec<u32> =
        serde_json::from_value(response["choices"][0]["prompt_token_ids"].clone()).unwrap();
    load_cpu("builtin:demo").tokenizer.decode(&ids).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_renders_tools_calls_and_tool_results() {
    let daemon = Daemon::start(&pool("")).await;
    let offered = rendered_prompt(&daemon, request("demo", json!("auto"), 0)).await;
    assert!(offered.contains("<tools>"), "{offered}");
    assert!(offered.contains(r#""name":"get_weather""#), "{offered}");
    let none = rendered_prompt(&daemon, request("demo", json!("none"), 0)).await;
    assert!(!none.contains("get_weather"), "{none}");
    let mut round_trip = request("demo", json!("auto"), 0);
    round_trip["messages"] = json!([
        {"role": "user", "content": "What is the weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\": \"Oslo\", \"unit\": \"celsius\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "7 degrees and rain"},
    ]);
    let text = rendered_prompt(&daemon, round_trip).await;
    assert!(
        text.contains(r#"<tool_call>"#) && text.contains(r#""city":"Oslo""#),
        "{text}"
    );
    assert!(text.contains("<|tool|>\n7 degrees and rain"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_without_tools_gets_them_in_a_system_message() {
    let Some(fixtures) = fixtures() else { return };
    let qwen2 = fixtures.join("models/qwen2");
    let daemon = Daemon::start(&pool(&format!(
        "[[models]]\nname = \"qwen2\"\nsource = \"{}\"\n",
        qwen2.display()
    )))
    .await;
    let mut plain = request("qwen2", json!("none"), 0);
    plain["tools"] = json!([tools()[1]]);
    plain["max_tokens"] = json!(4);
    let (status, plain) = daemon.post(CHAT, &plain).await;
    assert_eq!(status, 200, "{plain}");
    for seed in 0..4 {
        // One short tool: the fixture's 1000-token vocabulary spells JSON nearly byte by byte.
        let mut body = request("qwen2", json!("required"), seed);
        body["tools"] = json!([tools()[1]]);
        body.as_object_mut().unwrap().remove("max_tokens");
        let (status, body) = daemon.post(CHAT, &body).await;
        assert_eq!(status, 200, "{body}");
        let offered = body["usage"]["prompt_tokens"].as_u64().unwrap();
        assert!(
            offered > plain["usage"]["prompt_tokens"].as_u64().unwrap() + 50,
            "{body}"
        );
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{body}");
        for call in choice["message"]["tool_calls"].as_array().unwrap() {
            check_call(call, None);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tool_requests_are_refused_naming_the_field() {
    let daemon = Daemon::start(&pool("")).await;
    let mut unknown = request(
        "demo",
        json!({"type": "function", "function": {"name": "nope"}}),
        0,
    );
    let mut combined = request("demo", json!("required"), 0);
    combined["response_format"] = json!({"type": "json_object"});
    let mut bad_tool = request("demo", json!("auto"), 0);
    bad_tool["tools"] = json!([{"type": "function", "function": {"name": "has space"}}]);
    let completions = json!({"model": "demo", "prompt": "hi", "tools": tools()});
    for (path, body, param) in [
        (CHAT, unknown.take(), "tool_choice"),
        (CHAT, combined, "response_format"),
        (CHAT, bad_tool, "tools"),
        ("/v1/completions", completions, "tools"),
    ] {
        let (status, response) = daemon.post(path, &body).await;
        assert_eq!(status, 400, "{response}");
        assert_eq!(response["error"]["param"], param, "{response}");
    }
    let (status, _) = daemon.post(CHAT, &request("demo", json!("auto"), 0)).await;
    assert_eq!(status, 200);
}
