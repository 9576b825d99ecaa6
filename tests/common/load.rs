//! A streaming load driver: clients that send streamed completions in a loop, classify every
//! stream by the rules of RELIABILITY.md §13 (completed, errored in band, HTTP error,
//! truncated, stalled), and record time to first token and gaps between events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{json, Value};
use tokio::time::Instant;

/// How one request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// `[DONE]` after data, no error.
    Completed,
    /// An error event (its code) then `[DONE]`.
    ErroredInBand(String),
    /// A non-200 answer: status, `error.code`, and whether `Retry-After` was set.
    HttpError(u16, String, bool),
    /// EOF without a terminal event.
    Truncated,
    /// No event for longer than the stall limit.
    Stalled,
}

/// One request's record.
#[derive(Debug, Clone)]
pub struct Record {
    /// The model asked.
    pub model: String,
    /// How it ended.
    pub outcome: Outcome,
    /// Time to the first data event (streams that started).
    pub ttft: Option<Duration>,
    /// Time to the answer's status line.
    pub answer: Duration,
    /// Gaps between consecutive data events.
    pub gaps: Vec<Duration>,
    /// Tokens received and the time from first to last.
    pub tokens: usize,
    /// Seconds from the first token to the last.
    pub streaming: Duration,
}

/// Every record of a run.
#[derive(Default)]
pub struct Stats {
    records: Mutex<Vec<Record>>,
}

impl Stats {
    /// Adds a record.
    pub fn push(&self, record: Record) {
        self.records.lock().unwrap().push(record);
    }

    /// A copy of every record.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().unwrap().clone()
    }
}

/// The `q` quantile (0..1) of `values`.
pub fn quantile(values: &mut [Duration], q: f64) -> Duration {
    if values.is_empty() {
        return Duration::ZERO;
    }
    values.sort();
    let index = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[index.min(values.len() - 1)]
}

/// A streamed completion request body.
pub fn body(model: &str, max_tokens: usize) -> Value {
    json!({"model": model, "prompt": "Go", "max_tokens": max_tokens, "stream": true})
}

/// Sends one streamed request and classifies it.
pub async fn stream_once(
    client: &reqwest::Client,
    url: &str,
    model: &str,
    body: &Value,
    stall: Duration,
) -> Record {
    let started = Instant::now();
    let mut record = Record {
        model: model.to_string(),
        outcome: Outcome::Truncated,
        ttft: None,
        answer: Duration::ZERO,
        gaps: Vec::new(),
        tokens: 0,
        streaming: Duration::ZERO,
    };
    let response = match tokio::time::timeout(
        stall,
        client
            .post(format!("{url}/v1/completions"))
            .json(body)
            .send(),
    )
    .await
    {
        Ok(Ok(response)) => response,
        Ok(Err(_)) => return record,
        Err(_) => {
            record.outcome = Outcome::Stalled;
            return record;
        }
    };
    record.answer = started.elapsed();
    let status = response.status().as_u16();
    if status != 200 {
        let retry = response.headers().contains_key("retry-after");
        let value: Value = response.json().await.unwrap_or(Value::Null);
        let code = value["error"]["code"].as_str().unwrap_or("").to_string();
        record.outcome = Outcome::HttpError(status, code, retry);
        return record;
    }
    let mut body = response.bytes_stream();
    let mut buffer: Vec<u8> = Vec::new();
    let mut last = Instant::now();
    let mut first_token: Option<Instant> = None;
    let mut error = None;
    loop {
        while let Some(end) = buffer.windows(2).position(|w| w == b"\n\n") {
            let frame: Vec<u8> = buffer.drain(..end + 2).collect();
            let text = String::from_utf8_lossy(&frame);
            let Some(data) = text.lines().find_map(|l| l.strip_prefix("data: ")) else {
                continue;
            };
            let now = Instant::now();
            if data == "[DONE]" {
                record.outcome = match error.take() {
                    Some(code) => Outcome::ErroredInBand(code),
                    None => Outcome::Completed,
                };
                if let Some(first) = first_token {
                    record.streaming = last.duration_since(first);
                }
                return record;
            }
            let chunk: Value = serde_json::from_str(data).unwrap_or(Value::Null);
            if let Some(code) = chunk["error"]["code"].as_str() {
                error = Some(code.to_string());
                continue;
            }
            let has_text = chunk["choices"][0]["text"]
                .as_str()
                .is_some_and(|t| !t.is_empty());
            if has_text {
                record.tokens += 1;
                match first_token {
                    None => {
                        first_token = Some(now);
                        record.ttft = Some(now.duration_since(started));
                    }
                    Some(_) => record.gaps.push(now.duration_since(last)),
                }
                last = now;
            }
        }
        match tokio::time::timeout(stall, body.next()).await {
            Ok(Some(Ok(bytes))) => buffer.extend_from_slice(&bytes),
            Ok(Some(Err(_))) | Ok(None) => return record,
            Err(_) => {
                record.outcome = Outcome::Stalled;
                return record;
            }
        }
    }
}

/// Sends streamed requests to `model` until `until`, pausing `backoff` after a refusal.
pub async fn client_loop(
    url: String,
    model: String,
    max_tokens: usize,
    until: Instant,
    backoff: Duration,
    stats: Arc<Stats>,
) {
    let client = reqwest::Client::new();
    let body = body(&model, max_tokens);
    while Instant::now() < until {
        let record = stream_once(&client, &url, &model, &body, Duration::from_secs(35)).await;
        let refused = matches!(record.outcome, Outcome::HttpError(..));
        stats.push(record);
        if refused {
            tokio::time::sleep(backoff).await;
        }
    }
}

/// What the process holds: resident memory, open descriptors, live tokio tasks.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    /// Resident set size in bytes.
    pub rss: u64,
    /// Open file descriptors.
    pub fds: usize,
    /// Alive tokio tasks.
    pub tasks: usize,
}

/// Takes a snapshot of this process.
pub fn snapshot() -> Snapshot {
    let (rss, fds) = super::process::resources(std::process::id());
    let tasks = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();
    Snapshot { rss, fds, tasks }
}
