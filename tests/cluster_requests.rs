//! Requests across a cluster: three `llorch serve` processes on loopback; a has no model, b
//! has `demo`, `beta` and `slow`, c has `demo` and `slow`. Any node serves any model, token
//! for token as the node that runs it; `/v1/models` lists the union; a client that leaves
//! cancels the job on the serving node; 32 streams through a spread over b and c and all
//! complete; a serving node killed mid-stream ends its streams with an error event, and the
//! next request goes to the node that is left.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{free_port, node, pool, Node, COOKIE};
use common::daemon::{metric_sum, SseReader};
use serde_json::{json, Value};

const SLOW: (&str, &str) = ("slow", "builtin:fake?ms=20");

async fn post(url: &str, path: &str, body: &Value) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{url}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn get(url: &str, path: &str) -> Value {
    reqwest::get(format!("{url}{path}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn stream(url: &str, body: &Value) -> SseReader {
    let response = reqwest::Client::new()
        .post(format!("{url}/v1/completions"))
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    SseReader::new(response)
}

/// `/v1/models` on `url`: each model's nodes, sorted.
async fn model_nodes(url: &str) -> Vec<(String, Vec<String>)> {
    let list = get(url, "/v1/models").await;
    let mut models: Vec<(String, Vec<String>)> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|card| {
            let mut nodes: Vec<String> = card["nodes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_string())
                .collect();
            nodes.sort();
            (card["id"].as_str().unwrap().to_string(), nodes)
        })
        .collect();
    models.sort();
    models
}

/// Requests in flight on `url`'s own replicas of `model`.
async fn in_flight(url: &str, model: &str) -> u64 {
    let listing = get(url, "/admin/models").await;
    listing["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["name"] == model)
        .flat_map(|m| m["replicas"].as_array().unwrap().clone())
        .filter(|r| r["node"] == listing["nodes"][0]["node"])
        .map(|r| r["in_flight"].as_u64().unwrap())
        .sum()
}

/// Waits until `check` holds, for at most `limit`.
async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < limit,
            "{what} did not happen in {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

async fn cluster(dir: &std::path::Path) -> (Node, Node, Node) {
    let [pa, pb, pc] = [free_port(), free_port(), free_port()];
    let demo = ("demo", "builtin:demo");
    let a = node(&pool(dir, "a", pa, &[pb, pc], &[]), COOKIE).await;
    let b = node(
        &pool(
            dir,
            "b",
            pb,
            &[pa, pc],
            &[demo, ("beta", "builtin:demo"), SLOW],
        ),
        COOKIE,
    )
    .await;
    let c = node(&pool(dir, "c", pc, &[pa, pb], &[demo, SLOW]), COOKIE).await;
    let want: Vec<(String, Vec<String>)> = [
        ("beta", vec!["b"]),
        ("demo", vec!["b", "c"]),
        ("slow", vec!["b", "c"]),
    ]
    .iter()
    .map(|(m, n)| (m.to_string(), n.iter().map(|n| n.to_string()).collect()))
    .collect();
    until("a listing every model", Duration::from_secs(20), || async {
        model_nodes(&a.url).await == want
    })
    .await;
    (a, b, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_any_model_of_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = cluster(dir.path()).await;

    // Token for token as on the node that runs it, whole and streamed.
    let ask = json!({"model": "beta", "prompt": "Once upon a time", "max_tokens": 24,
        "temperature": 0, "logprobs": 2});
    let (status, here) = post(&b.url, "/v1/completions", &ask).await;
    assert_eq!(status, 200, "{here}");
    let (status, there) = post(&a.url, "/v1/completions", &ask).await;
    assert_eq!(status, 200, "{there}");
    assert_eq!(there["choices"], here["choices"]);
    for count in ["prompt_tokens", "completion_tokens"] {
        assert_eq!(there["usage"][count], here["usage"][count]);
    }
    // It ran on b: b's prefix cache held the prompt of the first request.
    assert_eq!(there["usage"]["prompt_tokens_details"]["cached_tokens"], 16);
    let mut ask_streamed = ask.clone();
    ask_streamed["stream"] = json!(true);
    let mut events = stream(&a.url, &ask_streamed).await;
    let mut text = String::new();
    let mut last = String::new();
    while let Some(data) = events.next().await {
        if let Ok(chunk) = serde_json::from_str::<Value>(&data) {
            text.push_str(chunk["choices"][0]["text"].as_str().unwrap_or(""));
        }
        last = data;
    }
    assert_eq!(last, "[DONE]");
    assert_eq!(text, here["choices"][0]["text"].as_str().unwrap());

    // A model no node has, and a bad request, answer as on a single node.
    let (status, body) = post(
        &a.url,
        "/v1/completions",
        &json!({"model": "nowhere", "prompt": "x"}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );
    let too_long = json!({"model": "beta", "prompt": "x", "max_tokens": 1_000_000});
    let (status, body) = post(&a.url, "/v1/completions", &too_long).await;
    let (status_b, body_b) = post(&b.url, "/v1/completions", &too_long).await;
    assert_eq!((status, &body["error"]), (status_b, &body_b["error"]));

    // A client that leaves cancels the job where it runs.
    let long = json!({"model": "slow", "prompt": "Go", "max_tokens": 5000, "stream": true});
    let mut events = stream(&a.url, &long).await;
    for _ in 0..3 {
        events.next().await.unwrap();
    }
    let running = in_flight(&b.url, "slow").await + in_flight(&c.url, "slow").await;
    assert_eq!(running, 1);
    drop(events);
    let freed = until(
        "the job's end on its node",
        Duration::from_secs(5),
        || async { in_flight(&b.url, "slow").await + in_flight(&c.url, "slow").await == 0 },
    )
    .await;
    eprintln!("a client leaving a freed the remote slot after {freed:?}");

    // 32 streams through a spread over b's and c's replicas, and every one completes.
    let clients = (0..32).map(|i| {
        let url = a.url.clone();
        tokio::spawn(async move {
            let body = json!({"model": "demo", "prompt": format!("Story {i}"), "max_tokens": 24,
                "stream": true, "ignore_eos": true});
            let mut events = stream(&url, &body).await;
            let (mut chunks, mut last) = (0, String::new());
            while let Some(data) = events.next().await {
                chunks += 1;
                last = data;
            }
            (chunks, last)
        })
    });
    for client in futures::future::join_all(clients).await {
        let (chunks, last) = client.unwrap();
        assert_eq!(last, "[DONE]");
        assert!(chunks >= 25, "{chunks} chunks");
    }
    for url in [&b.url, &c.url] {
        let text = reqwest::get(format!("{url}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let steps = metric_sum(
            &text,
            "llorch_step_duration_seconds_count",
            &[("model", "demo")],
        );
        assert!(steps > 0.0, "{url} ran no step of demo");
    }

    // A serving node killed mid-stream: the stream ends with an error event, then [DONE];
    // the next request goes to the node left.
    let mut events = stream(&a.url, &long).await;
    for _ in 0..3 {
        events.next().await.unwrap();
    }
    let (mut victim, survivor) = match in_flight(&b.url, "slow").await {
        1 => (b, c),
        _ => (c, b),
    };
    victim.child.kill().unwrap();
    let killed = Instant::now();
    let mut error = None;
    let mut last = String::new();
    while let Some(data) = tokio::time::timeout(Duration::from_secs(10), events.next())
        .await
        .expect("the stream went silent")
    {
        if let Ok(chunk) = serde_json::from_str::<Value>(&data) {
            if chunk.get("error").is_some() {
                error = Some(chunk);
            }
        }
        last = data;
    }
    let error = error.expect("no error event");
    assert_eq!(error["error"]["code"], "model_crashed", "{error}");
    assert_eq!(last, "[DONE]");
    eprintln!(
        "the stream ended {:?} after its node was killed",
        killed.elapsed()
    );
    let short = json!({"model": "slow", "prompt": "Go", "max_tokens": 4});
    let (status, body) = post(&a.url, "/v1/completions", &short).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(in_flight(&survivor.url, "slow").await, 0);
    drop(victim);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_lost_before_its_first_token_is_retried_on_another_node() {
    let dir = tempfile::tempdir().unwrap();
    let [pa, pb, pc] = [free_port(), free_port(), free_port()];
    let sluggish = [("sluggish", "builtin:fake?ms=1500")];
    let a = node(&pool(dir.path(), "a", pa, &[pb, pc], &[]), COOKIE).await;
    let b = node(&pool(dir.path(), "b", pb, &[pa, pc], &sluggish), COOKIE).await;
    let c = node(&pool(dir.path(), "c", pc, &[pa, pb], &sluggish), COOKIE).await;
    let served = vec![(
        "sluggish".to_string(),
        vec!["b".to_string(), "c".to_string()],
    )];
    until("a listing b and c", Duration::from_secs(20), || async {
        model_nodes(&a.url).await == served
    })
    .await;
    let url = a.url.clone();
    let asked = tokio::spawn(async move {
        let body = json!({"model": "sluggish", "prompt": "Go", "max_tokens": 2});
        post(&url, "/v1/completions", &body).await
    });
    until(
        "the request reaching b or c",
        Duration::from_secs(5),
        || async { in_flight(&b.url, "sluggish").await + in_flight(&c.url, "sluggish").await == 1 },
    )
    .await;
    let (mut victim, survivor) = match in_flight(&b.url, "sluggish").await {
        1 => (b, c),
        _ => (c, b),
    };
    victim.child.kill().unwrap();
    until(
        "the retry reaching the other node",
        Duration::from_secs(5),
        || async { in_flight(&survivor.url, "sluggish").await == 1 },
    )
    .await;
    let (status, body) = asked.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 2, "{body}");
    drop(victim);
}
