//! RELIABILITY.md checklist X on the fake backend (5 ms per token): a client that leaves stops
//! its generation within two steps, whether it was streaming, waiting for a non-streamed
//! answer, or still queued, and the slot is free again at once. Cancellation reaches the engine
//! through the job's cancel flag (set when the handler's future or the response stream is
//! dropped), read by the engine thread before every step, and through the closed event channel.
//! A client that stops reading pauses its generation (the event channel is bounded) until its
//! `slow_reader_timeout` ends it.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use common::daemon::{metric_sum, Daemon, SseReader};
use common::load::snapshot;
use common::raw::{parse, RawReply};
use futures::StreamExt;
use llorch::models::fake_forwards;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Cancellation tests count forward passes process-wide: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn pool(replicas: usize, max_queue: usize) -> String {
    let devices = vec!["\"cpu\""; replicas].join(", ");
    format!(
        "version = 1\n[[models]]\nname = \"fake\"\nsource = \"builtin:fake?ms=5\"\n\
         devices = [{devices}]\nmax_queue = {max_queue}\n"
    )
}

fn long(stream: bool) -> Value {
    json!({"model": "fake", "prompt": "Go", "max_tokens": 10000, "stream": stream})
}

/// Sums a gauge over models from `/metrics`.
async fn gauge(daemon: &Daemon, name: &str) -> f64 {
    metric_sum(&daemon.metrics().await, name, &[])
}

/// Waits until nothing is in flight or queued; returns how long it took.
async fn settle(daemon: &Daemon, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        let busy =
            gauge(daemon, "llorch_in_flight").await + gauge(daemon, "llorch_queue_depth").await;
        if busy == 0.0 {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "still busy after {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Time until a fresh streamed request's first token.
async fn first_token_time(daemon: &Daemon) -> Duration {
    let started = Instant::now();
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&json!({"model": "fake", "prompt": "Go", "max_tokens": 2, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut reader = SseReader::new(response);
    assert!(reader.next().await.is_some());
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x1_two_hundred_abandoned_streams_free_everything() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&pool(4, 256)).await;
    let mut clients = Vec::new();
    for _ in 0..200 {
        let (client, url) = (daemon.client.clone(), daemon.at("/v1/completions"));
        clients.push(tokio::spawn(async move {
            let request = client.post(url).json(&long(true)).send();
            // Each client leaves after 0.5 s, started or still queued.
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                if let Ok(response) = request.await {
                    let mut body = response.bytes_stream();
                    while body.next().await.is_some() {}
                }
            })
            .await;
        }));
    }
    for client in clients {
        client.await.unwrap();
    }
    let left = fake_forwards();
    let first = first_token_time(&daemon).await;
    let settled = settle(&daemon, Duration::from_secs(2)).await;
    let after = fake_forwards() - left;
    eprintln!("X1: first token {first:?} after the clients left, gauges 0 after {settled:?}, {after} forward passes for nobody or the probe");
    assert!(
        first < Duration::from_secs(1),
        "first token after {first:?}"
    );
    // At most two steps per stream after its client left (and 3 for the probe request).
    assert!(
        after <= 2 * 200 + 3,
        "{after} forward passes after the clients left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x2_a_single_slot_is_free_within_a_second_of_a_client_timeout() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&pool(1, 8)).await;
    let request = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&long(true))
        .timeout(Duration::from_millis(100));
    let _ = async {
        let response = request.send().await?;
        let mut body = response.bytes_stream();
        while let Some(chunk) = body.next().await {
            chunk?;
        }
        Ok::<(), reqwest::Error>(())
    }
    .await;
    let first = first_token_time(&daemon).await;
    eprintln!("X2: the next request's first token came {first:?} after the client timed out");
    assert!(first < Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x3_a_closed_non_streaming_request_stops_within_two_steps() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&pool(1, 8)).await;
    let request = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&long(false))
        .timeout(Duration::from_millis(300));
    assert!(request.send().await.unwrap_err().is_timeout());
    let left = fake_forwards();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = fake_forwards() - left;
    eprintln!("X3: {after} forward passes after the client closed");
    assert!(after <= 2, "{after} forward passes after the client closed");
    settle(&daemon, Duration::from_secs(2)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x4_a_client_that_leaves_while_queued_never_reaches_the_engine() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&pool(1, 8)).await;
    let running = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&json!({"model": "fake", "prompt": "Go", "max_tokens": 60, "stream": true}))
        .send()
        .await
        .unwrap();
    let queued = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&long(true))
        .timeout(Duration::from_millis(100));
    assert!(queued.send().await.unwrap_err().is_timeout());
    let mut running = SseReader::new(running);
    let mut events = 0;
    while running.next().await.is_some() {
        events += 1;
    }
    let done = fake_forwards();
    settle(&daemon, Duration::from_secs(2)).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let after = fake_forwards() - done;
    eprintln!("X4: the running stream sent {events} events; {after} forward passes after it ended");
    assert_eq!(after, 0, "the abandoned queued request was run");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x6_cancelled_jobs_are_counted_and_free_their_slot() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&pool(1, 8)).await;
    for _ in 0..3 {
        let response = daemon
            .client
            .post(daemon.at("/v1/completions"))
            .json(&long(true))
            .send()
            .await
            .unwrap();
        let mut reader = SseReader::new(response);
        for _ in 0..5 {
            assert!(reader.next().await.is_some());
        }
    }
    settle(&daemon, Duration::from_secs(2)).await;
    let text = daemon
        .client
        .get(daemon.at("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let cancelled: f64 = text
        .lines()
        .filter(|l| {
            l.starts_with("llorch_request_failures_total{") && l.contains("code=\"cancelled\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(cancelled, 3.0);
}

/// Streams `max_tokens` tokens from `model` and returns the longest gap between events.
async fn longest_gap(daemon: &Daemon, model: &str, max_tokens: usize) -> Duration {
    let response = daemon
        .client
        .post(daemon.at("/v1/completions"))
        .json(&json!({"model": model, "prompt": "Go", "max_tokens": max_tokens, "stream": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let mut reader = SseReader::new(response);
    let (mut last, mut longest, mut done) = (Instant::now(), Duration::ZERO, false);
    while let Some(event) = reader.next().await {
        longest = longest.max(last.elapsed());
        last = Instant::now();
        done = event == "[DONE]";
    }
    assert!(done, "the stream did not end with [DONE]");
    longest
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x5_a_client_that_reads_nothing_is_paused_then_ended() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(
        "version = 1\n[[models]]\nname = \"fake\"\nsource = \"builtin:fake?ms=0\"\n\
         slow_reader_timeout = \"2s\"\n\
         [[models]]\nname = \"other\"\nsource = \"builtin:fake?ms=5\"\n",
    )
    .await;
    let address: SocketAddr = daemon.url.trim_start_matches("http://").parse().unwrap();
    let body =
        json!({"model": "fake", "prompt": "Go", "max_tokens": 60000, "stream": true}).to_string();
    let request = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // A small receive window, so that what the client's kernel holds is small too.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(&address.into()).unwrap();
    let mut slow = std::net::TcpStream::from(socket);
    let rss_before = snapshot().rss;
    let before = fake_forwards();
    slow.write_all(request.as_bytes()).unwrap();
    // The generation pauses once the buffers between the engine and the client are full.
    let started = Instant::now();
    let mut last = (fake_forwards(), Instant::now());
    while last.1.elapsed() < Duration::from_millis(500) {
        assert!(started.elapsed() < Duration::from_secs(10), "never paused");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = fake_forwards();
        if now != last.0 {
            last = (now, Instant::now());
        }
    }
    let generated = last.0 - before;
    let paused_at = last.1;
    // Another model streams normally while the slow client reads nothing.
    let gap = longest_gap(&daemon, "other", 100).await;
    let rss_growth = snapshot().rss.saturating_sub(rss_before);
    let wait = Duration::from_secs(3).saturating_sub(paused_at.elapsed());
    tokio::time::sleep(wait).await;
    let received = tokio::task::spawn_blocking(move || {
        slow.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut bytes = Vec::new();
        slow.read_to_end(&mut bytes).unwrap();
        bytes
    })
    .await
    .unwrap();
    let RawReply::Response { status, body, .. } = parse(&received) else {
        panic!("no response");
    };
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    let events: Vec<&str> = text
        .split("\n\n")
        .filter_map(|frame| frame.strip_prefix("data: "))
        .collect();
    let tokens = events.iter().filter(|e| e.contains("\"text\"")).count();
    let error: Value = serde_json::from_str(events[events.len() - 2]).unwrap();
    eprintln!(
        "X5: the generation paused after {generated} tokens ({} KiB of SSE) for a client \
         that read nothing; RSS +{} KiB meanwhile; the other model's longest gap {gap:?}",
        text.len() / 1024,
        rss_growth / 1024
    );
    assert_eq!(error["error"]["code"], "slow_reader");
    assert_eq!(events.last(), Some(&"[DONE]"));
    assert_eq!(
        tokens as u64, generated,
        "every generated token was delivered"
    );
    // 60 000 tokens were asked for; only what the bounded channel and the socket buffers hold
    // was generated before the pause.
    assert!(
        text.len() < 512 * 1024,
        "{} bytes were buffered",
        text.len()
    );
    assert!(rss_growth < 32 << 20, "RSS grew {rss_growth} bytes");
    assert!(
        gap < Duration::from_millis(500),
        "the other model's gap was {gap:?}"
    );
    // The slot is free again.
    assert!(first_token_time(&daemon).await < Duration::from_secs(1));
}
