//! Requests across a cluster: three `llorch serve` processes on loopback; a has `alpha`, b
//! has `beta`, c has `gamma` (each one the others lack), and b and c both have `demo` and
//! `slow`. Any node serves any model, token for token as the node that runs it;
//! `/v1/models` lists the union; a client that leaves cancels the job on the serving node;
//! the least-loaded replica of the cluster takes a request, the asked node's on a tie;
//! 32 streams through a spread over b and c and all complete, and a's `/metrics` shows both
//! nodes' work; a serving node killed mid-stream ends its stream with one error event and
//! `[DONE]`, the next request goes to the node that is left, and the killed node, started
//! again, rejoins and serves.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{free_port, get, model_nodes, node, pool, post, Node, COOKIE};
use common::daemon::{metric_sum, SseReader};
use serde_json::{json, Value};

const SLOW: (&str, &str) = ("slow", "builtin:fake?ms=20");

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

/// The three nodes, once a lists every model, and their pool files.
async fn cluster(dir: &std::path::Path) -> ([Node; 3], [std::path::PathBuf; 3]) {
    let [pa, pb, pc] = [free_port(), free_port(), free_port()];
    let (demo, model) = (("demo", "builtin:demo"), |name| (name, "builtin:demo"));
    let configs = [
        pool(dir, "a", pa, &[pb, pc], &[model("alpha")]),
        pool(dir, "b", pb, &[pa, pc], &[demo, model("beta"), SLOW]),
        pool(dir, "c", pc, &[pa, pb], &[demo, model("gamma"), SLOW]),
    ];
    let a = node(&configs[0], COOKIE).await;
    let b = node(&configs[1], COOKIE).await;
    let c = node(&configs[2], COOKIE).await;
    for url in [&a.url, &b.url, &c.url] {
        until(
            "every node listing every model",
            Duration::from_secs(20),
            || async { model_nodes(url).await == everything() },
        )
        .await;
    }
    ([a, b, c], configs)
}

/// `/v1/models` of the whole cluster.
fn everything() -> Vec<(String, Vec<String>)> {
    [
        ("alpha", vec!["a"]),
        ("beta", vec!["b"]),
        ("demo", vec!["b", "c"]),
        ("gamma", vec!["c"]),
        ("slow", vec!["b", "c"]),
    ]
    .iter()
    .map(|(m, n)| (m.to_string(), n.iter().map(|n| n.to_string()).collect()))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_serves_any_model_of_the_cluster() {
    let dir = tempfile::tempdir().unwrap();
    let ([a, b, c], configs) = cluster(dir.path()).await;

    // Token for token as on the node that runs it: each node asks for another's own model.
    let ask = |model: &str| {
        json!({"model": model, "prompt": "Once upon a time", "max_tokens": 24,
            "temperature": 0, "logprobs": 2})
    };
    for (owner, asker, model) in [(&b, &a, "beta"), (&c, &b, "gamma"), (&a, &c, "alpha")] {
        let (status, here) = post(&owner.url, "/v1/completions", &ask(model)).await;
        assert_eq!(status, 200, "{here}");
        let (status, there) = post(&asker.url, "/v1/completions", &ask(model)).await;
        assert_eq!(status, 200, "{there}");
        assert_eq!(there["choices"], here["choices"], "{model}");
        assert_eq!(there["usage"]["completion_tokens"], 24);
    }
    let ask = ask("beta");
    let (_, here) = post(&b.url, "/v1/completions", &ask).await;
    let (_, there) = post(&a.url, "/v1/completions", &ask).await;
    for count in ["prompt_tokens", "completion_tokens"] {
        assert_eq!(there["usage"][count], here["usage"][count]);
    }
    // It ran on b: b's prefix cache held the prompt.
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

    // The least-loaded replica of the cluster takes a request, this node's when loads tie:
    // b keeps the first stream of `slow` and, busy with it, sends the second to c.
    let mut first = stream(&b.url, &long).await;
    first.next().await.unwrap();
    assert_eq!(in_flight(&b.url, "slow").await, 1);
    assert_eq!(in_flight(&c.url, "slow").await, 0);
    let mut second = stream(&b.url, &long).await;
    second.next().await.unwrap();
    assert_eq!(in_flight(&b.url, "slow").await, 1);
    assert_eq!(in_flight(&c.url, "slow").await, 1);
    drop((first, second));
    until("both slots free", Duration::from_secs(5), || async {
        in_flight(&b.url, "slow").await + in_flight(&c.url, "slow").await == 0
    })
    .await;

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
    // a's /metrics gathers every node's, each sample with its node: both b and c ran demo.
    let metrics = |scope: &'static str| {
        let url = format!("{}/metrics{scope}", a.url);
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };
    let text = metrics("").await;
    for node in ["b", "c"] {
        let labels = [("node", node), ("model", "demo")];
        let steps = metric_sum(&text, "llorch_step_duration_seconds_count", &labels);
        assert!(steps > 0.0, "{node} ran no step of demo:\n{text}");
    }
    common::promtool_accepts(&text);
    let own = metrics("?scope=node").await;
    assert!(
        !own.contains("node=\"b\"") && own.contains("llorch_requests_total"),
        "{own}"
    );
    let bad = reqwest::get(format!("{}/metrics?scope=everything", a.url))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);

    // A serving node killed mid-stream: the stream ends with an error event, then [DONE];
    // the next request goes to the node left.
    let mut events = stream(&a.url, &long).await;
    for _ in 0..3 {
        events.next().await.unwrap();
    }
    let (victim, survivor, config, own) = match in_flight(&b.url, "slow").await {
        1 => (b, c, &configs[1], "beta"),
        _ => (c, b, &configs[2], "gamma"),
    };
    drop(victim);
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
    assert_eq!(error["error"]["code"], "model_unavailable", "{error}");
    assert_eq!(last, "[DONE]");
    eprintln!(
        "the stream ended {:?} after its node was killed",
        killed.elapsed()
    );
    let short = json!({"model": "slow", "prompt": "Go", "max_tokens": 4});
    let (status, body) = post(&a.url, "/v1/completions", &short).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(in_flight(&survivor.url, "slow").await, 0);
    let (status, body) = post(
        &a.url,
        "/v1/completions",
        &json!({"model": own, "prompt": "x"}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("model_not_found"))
    );

    // The killed node, started again, rejoins and serves its own model through a.
    let _back = node(config, COOKIE).await;
    until("the node rejoining", Duration::from_secs(20), || async {
        model_nodes(&a.url).await == everything()
    })
    .await;
    let (status, body) = post(
        &a.url,
        "/v1/completions",
        &json!({"model": own, "prompt": "x"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
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
