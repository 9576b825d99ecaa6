//! Error responses of the API: the OpenAI envelope with the statuses of RELIABILITY.md §8, and
//! the daemon keeps serving after each.

mod common;

use common::daemon::Daemon;
use serde_json::{json, Value};

async fn demo() -> Daemon {
    Daemon::start(
        "version = 1\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\nmax_seq_len = 64\n",
    )
    .await
}

async fn raw(
    daemon: &Daemon,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let verb = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = daemon.client.request(verb, daemon.at(path)).body(body);
    if let Some(content_type) = content_type {
        request = request.header("content-type", content_type);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    assert_eq!(
        headers
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string()),
        Some("application/json".to_string()),
        "{method} {path} {status} {headers:?}"
    );
    (status, headers, response.json().await.unwrap())
}

fn assert_error(body: &Value, kind: &str, code: &str, param: Option<&str>) {
    let error = &body["error"];
    assert_eq!(error["type"], kind, "{body}");
    assert_eq!(error["code"], code, "{body}");
    assert_eq!(error["param"], json!(param), "{body}");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
}

/// One malformed request and the error it must get.
struct Case {
    method: &'static str,
    path: &'static str,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    status: u16,
    code: &'static str,
    param: Option<&'static str>,
}

impl Case {
    fn new(
        method: &'static str,
        path: &'static str,
        content_type: Option<&'static str>,
        body: Vec<u8>,
        status: u16,
        code: &'static str,
        param: Option<&'static str>,
    ) -> Self {
        Self {
            method,
            path,
            content_type,
            body,
            status,
            code,
            param,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rejection_is_an_openai_envelope_and_the_daemon_keeps_serving() {
    let daemon = demo().await;
    let json = Some("application/json");
    let post = |body: &[u8], status, code, param| {
        Case::new(
            "POST",
            "/v1/completions",
            json,
            body.to_vec(),
            status,
            code,
            param,
        )
    };
    let cases = [
        post(b"{not json", 400, "invalid_json", None),
        post(br#"{"prompt":"x"}"#, 400, "missing_field", Some("model")),
        post(
            br#"{"model":"demo","prompt":"x","max_tokens":"many"}"#,
            400,
            "invalid_type",
            Some("max_tokens"),
        ),
        Case::new(
            "POST",
            "/v1/completions",
            Some("text/plain"),
            br#"{"model":"demo","prompt":"x"}"#.to_vec(),
            415,
            "unsupported_media_type",
            None,
        ),
        Case::new(
            "GET",
            "/v1/nothing",
            None,
            Vec::new(),
            404,
            "route_not_found",
            None,
        ),
        Case::new(
            "DELETE",
            "/v1/completions",
            None,
            Vec::new(),
            405,
            "method_not_allowed",
            None,
        ),
        post(
            br#"{"model":"demo","prompt":"x","n":9}"#,
            400,
            "integer_out_of_range",
            Some("n"),
        ),
        Case::new(
            "POST",
            "/v1/chat/completions",
            json,
            br#"{"model":"demo","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_schema","json_schema":{"name":"x","schema":{"type":"nope"}}}}"#.to_vec(),
            400,
            "invalid_grammar",
            Some("response_format"),
        ),
        post(
            br#"{"model":"demo","prompt":"x","logprobs":6}"#,
            400,
            "integer_out_of_range",
            Some("logprobs"),
        ),
        post(
            br#"{"model":"demo","prompt":"x","logprobs":true}"#,
            400,
            "invalid_type",
            Some("logprobs"),
        ),
        Case::new(
            "POST",
            "/v1/chat/completions",
            json,
            br#"{"model":"demo","messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#
                .to_vec(),
            400,
            "invalid_parameter",
            Some("top_logprobs"),
        ),
        post(
            br#"{"model":"demo","prompt":"x","tools":[{"type":"function"}]}"#,
            400,
            "unsupported_parameter",
            Some("tools"),
        ),
        post(
            br#"{"model":"demo","prompt":"x","temperature":-1}"#,
            400,
            "invalid_parameter",
            Some("temperature"),
        ),
        post(
            br#"{"model":"demo","prompt":"x","max_tokens":0}"#,
            400,
            "integer_out_of_range",
            Some("max_tokens"),
        ),
        post(
            br#"{"model":"demo","prompt":"x","stop":["a","b","c","d","e"]}"#,
            400,
            "integer_out_of_range",
            Some("stop"),
        ),
        post(
            br#"{"model":"demo","prompt":""}"#,
            400,
            "empty_prompt",
            Some("prompt"),
        ),
        Case::new(
            "POST",
            "/v1/chat/completions",
            json,
            br#"{"model":"demo","messages":[]}"#.to_vec(),
            400,
            "missing_field",
            Some("messages"),
        ),
    ];
    for Case {
        method,
        path,
        content_type,
        body,
        status,
        code,
        param,
    } in cases
    {
        let (got, headers, response) = raw(&daemon, method, path, content_type, body).await;
        assert_eq!(got, status, "{method} {path} {code}: {response}");
        let kind = match status {
            404 => "not_found_error",
            _ => "invalid_request_error",
        };
        assert_error(&response, kind, code, param);
        if status == 405 {
            assert_eq!(headers["allow"], "POST");
        }
    }
    let (status, body) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "demo", "prompt": "ok", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_longer_than_the_context_names_both_numbers() {
    let daemon = demo().await;
    let (status, body) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "demo", "prompt": "x".repeat(100)}),
        )
        .await;
    assert_eq!(status, 400);
    assert_error(
        &body,
        "invalid_request_error",
        "context_length_exceeded",
        Some("prompt"),
    );
    assert_eq!(
        body["error"]["message"],
        "the prompt has 101 tokens but the model's context is 64 tokens"
    );
    let stream = json!({"model": "demo", "prompt": "x".repeat(100), "stream": true});
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&stream)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        400,
        "errors before the first byte keep their status when streaming"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generation_stops_at_the_context_length_with_finish_reason_length() {
    let daemon = demo().await;
    // Without max_tokens, generation runs until the context is full.
    let (status, body) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "demo", "prompt": "Hello", "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length");
    assert_eq!(body["usage"]["total_tokens"], 64);
    // An explicit max_tokens that cannot fit is refused, naming the numbers.
    let (status, body) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "demo", "prompt": "Hello", "max_tokens": 500}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["code"], "context_length_exceeded");
    assert_eq!(body["error"]["param"], "max_tokens");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("500") && message.contains("64"),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn execute_streams_started_tokens_and_one_end_frame() {
    let daemon = demo().await;
    let body = json!({"job_id": "job-7", "model": "demo", "prompt": "Hi", "max_tokens": 4, "temperature": 0});
    let frames: Vec<Value> = daemon
        .stream("/execute", &body)
        .await
        .iter()
        .map(|frame| serde_json::from_str(frame).unwrap())
        .collect();
    assert_eq!(frames[0]["type"], "started");
    assert_eq!(frames[0]["job_id"], "job-7");
    let tokens: Vec<&Value> = frames.iter().filter(|f| f["type"] == "token").collect();
    assert_eq!(tokens.len(), 4);
    assert_eq!(
        tokens
            .iter()
            .map(|t| t["i"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        vec![0, 1, 2, 3]
    );
    let end = frames.last().unwrap();
    assert_eq!(
        (
            end["type"].as_str(),
            end["tokens_out"].as_u64(),
            end["stop_reason"].as_str()
        ),
        (Some("end"), Some(4), Some("max_tokens"))
    );
    assert_eq!(
        frames
            .iter()
            .filter(|f| f["type"] == "end" || f["type"] == "error")
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_the_limit_is_413() {
    let daemon = demo().await;
    let body = vec![b' '; 3 * 1024 * 1024];
    let (status, _, response) = raw(
        &daemon,
        "POST",
        "/v1/completions",
        Some("application/json"),
        body,
    )
    .await;
    assert_eq!(status, 413);
    assert_error(
        &response,
        "invalid_request_error",
        "request_too_large",
        None,
    );
}
