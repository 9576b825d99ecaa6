//! RELIABILITY.md checklist L (PR tier) on the fake backend (5 ms per token, no compute):
//! L1 steady load at capacity, L2 overload at several times capacity with H2 (health stays
//! fast), L3 non-streamed load with `oha` at and beyond capacity, L4 resources return to
//! baseline after each, and L7 (loading one model does not slow another). `LLORCH_LOAD_SECS` sets the run length (default 60 s). The tests run one at a time.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use common::daemon::{metric_sum, Daemon};
use common::load::{client_loop, quantile, snapshot, stream_once, Outcome, Snapshot, Stats};
use llorch::actors::faults::{arm, Fault};
use serde_json::json;
use tokio::time::Instant;

/// Load tests share two cores: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const MS_PER_TOKEN: u64 = 5;

fn run_secs() -> u64 {
    std::env::var("LLORCH_LOAD_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60)
}

fn pool(models: &[&str], replicas: usize, max_queue: usize) -> String {
    let devices = vec!["\"cpu\""; replicas].join(", ");
    let mut text = "version = 1\n".to_string();
    for name in models {
        text.push_str(&format!(
            "[[models]]\nname = \"{name}\"\nsource = \"builtin:fake?ms={MS_PER_TOKEN}\"\n\
             devices = [{devices}]\nmax_queue = {max_queue}\n"
        ));
    }
    text
}

/// L4: within 10 s of the last request, nothing is in flight and the process is back within
/// bounds of `baseline` (fds ±8, tokio tasks ±16, RSS +50 MiB).
async fn resources_return(daemon: &Daemon, baseline: Snapshot) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = daemon.metrics().await;
        let busy: f64 = metric_sum(&text, "llorch_in_flight", &[])
            + metric_sum(&text, "llorch_queue_depth", &[]);
        let now = snapshot();
        let settled = busy == 0.0
            && now.fds.abs_diff(baseline.fds) <= 8
            && now.tasks.abs_diff(baseline.tasks) <= 16
            && now.rss < baseline.rss + 50 * 1024 * 1024;
        if settled {
            eprintln!("L4: baseline {baseline:?}, after {now:?}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "L4: resources did not return: busy {busy}, baseline {baseline:?}, now {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn warm_up(daemon: &Daemon, models: &[&str]) -> Snapshot {
    let stats = Arc::new(Stats::default());
    let until = Instant::now() + Duration::from_secs(2);
    let tasks: Vec<_> = models
        .iter()
        .map(|m| {
            let (url, model) = (daemon.url.clone(), m.to_string());
            tokio::spawn(client_loop(
                url,
                model,
                10,
                until,
                Duration::from_millis(50),
                stats.clone(),
            ))
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    snapshot()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_steady_load_at_capacity_has_no_errors_and_keeps_the_token_rate() {
    let _serial = SERIAL.lock().await;
    let models = ["a", "b", "c"];
    let daemon = Daemon::start(&pool(&models, 11, 64)).await;
    let baseline = warm_up(&daemon, &models).await;
    let stats = Arc::new(Stats::default());
    let until = Instant::now() + Duration::from_secs(run_secs());
    let clients: Vec<_> = (0..32)
        .map(|i| {
            let (url, model) = (daemon.url.clone(), models[i % 3].to_string());
            tokio::spawn(client_loop(
                url,
                model,
                20,
                until,
                Duration::from_millis(50),
                stats.clone(),
            ))
        })
        .collect();
    for client in clients {
        client.await.unwrap();
    }
    let records = stats.records();
    let mut by_outcome: HashMap<String, usize> = HashMap::new();
    for record in &records {
        *by_outcome
            .entry(format!("{:?}", record.outcome))
            .or_default() += 1;
    }
    let completed: Vec<_> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Completed)
        .collect();
    let mut ttft: Vec<Duration> = completed.iter().filter_map(|r| r.ttft).collect();
    let mut gaps: Vec<Duration> = completed.iter().flat_map(|r| r.gaps.clone()).collect();
    let tokens: usize = completed.iter().map(|r| r.tokens.saturating_sub(1)).sum();
    let streaming: f64 = completed.iter().map(|r| r.streaming.as_secs_f64()).sum();
    let rate = tokens as f64 / streaming;
    let theoretical = 1000.0 / MS_PER_TOKEN as f64;
    let (p99_ttft, p99_gap) = (quantile(&mut ttft, 0.99), quantile(&mut gaps, 0.99));
    eprintln!(
        "L1: {} requests {by_outcome:?}; p99 TTFT {p99_ttft:?}, p99 gap {p99_gap:?}; \
         per-stream rate {rate:.1} tok/s of {theoretical:.0}",
        records.len()
    );
    assert_eq!(
        completed.len(),
        records.len(),
        "L1 outcomes: {by_outcome:?}"
    );
    assert!(records.len() > 100, "too few requests: {}", records.len());
    assert!(
        p99_ttft < Duration::from_millis(200),
        "p99 TTFT {p99_ttft:?}"
    );
    assert!(p99_gap < Duration::from_millis(250), "p99 gap {p99_gap:?}");
    assert!(
        rate >= 0.9 * theoretical,
        "token rate {rate:.1} of {theoretical}"
    );
    resources_return(&daemon, baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l2_overload_sheds_with_503_fast_and_health_stays_fast() {
    let _serial = SERIAL.lock().await;
    let models = ["a", "b", "c"];
    let max_queue = 16;
    let daemon = Daemon::start(&pool(&models, 4, max_queue)).await;
    let baseline = warm_up(&daemon, &models).await;
    let stats = Arc::new(Stats::default());
    let until = Instant::now() + Duration::from_secs(run_secs());
    let clients: Vec<_> = (0..128)
        .map(|i| {
            let (url, model) = (daemon.url.clone(), models[i % 3].to_string());
            tokio::spawn(client_loop(
                url,
                model,
                20,
                until,
                Duration::from_millis(200),
                stats.clone(),
            ))
        })
        .collect();
    let prober = {
        let (client, url) = (daemon.client.clone(), daemon.at("/health"));
        tokio::spawn(async move {
            let mut times = Vec::new();
            while Instant::now() < until {
                let started = Instant::now();
                let status = client.get(&url).send().await.map(|r| r.status().as_u16());
                times.push((status.unwrap_or(0), started.elapsed()));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            times
        })
    };
    let sampler = {
        let (client, url) = (daemon.client.clone(), daemon.at("/metrics"));
        tokio::spawn(async move {
            let mut most = 0.0f64;
            while Instant::now() < until {
                let text = client.get(&url).send().await.unwrap().text().await.unwrap();
                for model in ["a", "b", "c"] {
                    most = most.max(metric_sum(&text, "llorch_queue_depth", &[("model", model)]));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            most
        })
    };
    for client in clients {
        client.await.unwrap();
    }
    let health = prober.await.unwrap();
    let most_queued = sampler.await.unwrap();
    let records = stats.records();
    let undocumented: Vec<_> = records
        .iter()
        .filter(|r| match &r.outcome {
            Outcome::Completed => false,
            Outcome::HttpError(503, code, true) => code != "server_overloaded",
            _ => true,
        })
        .map(|r| r.outcome.clone())
        .collect();
    let mut rejects: Vec<Duration> = records
        .iter()
        .filter(|r| matches!(r.outcome, Outcome::HttpError(..)))
        .map(|r| r.answer)
        .collect();
    let accepted = records
        .iter()
        .filter(|r| r.outcome == Outcome::Completed)
        .count();
    let mut health_times: Vec<Duration> = health.iter().map(|(_, t)| *t).collect();
    let p99_reject = quantile(&mut rejects, 0.99);
    let p99_health = quantile(&mut health_times, 0.99);
    eprintln!(
        "L2: {} requests, {accepted} completed, {} refused (p99 {p99_reject:?}); most queued {most_queued}; \
         /health p99 {p99_health:?} over {} probes",
        records.len(),
        rejects.len(),
        health.len()
    );
    assert!(
        undocumented.is_empty(),
        "undocumented outcomes: {:?}",
        &undocumented[..undocumented.len().min(5)]
    );
    assert!(!rejects.is_empty(), "the overload never shed");
    assert!(accepted > 0);
    assert!(
        p99_reject < Duration::from_millis(50),
        "p99 time to reject {p99_reject:?}"
    );
    assert!(
        most_queued <= max_queue as f64,
        "queue depth reached {most_queued}"
    );
    assert!(
        health.iter().all(|(status, _)| *status == 200),
        "a /health probe failed"
    );
    assert!(
        p99_health < Duration::from_millis(50),
        "H2: /health p99 {p99_health:?}"
    );
    resources_return(&daemon, baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_loading_one_model_does_not_slow_another() {
    let _serial = SERIAL.lock().await;
    let daemon = Daemon::start(&pool(&["a"], 1, 64)).await;
    let client = reqwest::Client::new();
    let body = common::load::body("a", 40);
    let gaps_for = |secs: u64| {
        let (client, url, body) = (client.clone(), daemon.url.clone(), body.clone());
        async move {
            let until = Instant::now() + Duration::from_secs(secs);
            let mut gaps = Vec::new();
            while Instant::now() < until {
                let record = stream_once(&client, &url, "a", &body, Duration::from_secs(10)).await;
                assert_eq!(record.outcome, Outcome::Completed);
                gaps.extend(record.gaps);
            }
            gaps
        }
    };
    let mut before = gaps_for(5).await;
    arm("b#0@cpu", Fault::SlowNextLoad(Duration::from_secs(5)));
    let load = {
        let (client, url) = (daemon.client.clone(), daemon.at("/admin/models"));
        tokio::spawn(async move {
            let entry = json!({"name": "b", "source": format!("builtin:fake?ms={MS_PER_TOKEN}")});
            let started = Instant::now();
            let response = client.post(url).json(&entry).send().await.unwrap();
            (response.status().as_u16(), started.elapsed())
        })
    };
    let mut during = gaps_for(5).await;
    let (status, took) = load.await.unwrap();
    let (p99_before, p99_during) = (quantile(&mut before, 0.99), quantile(&mut during, 0.99));
    eprintln!("L7: p99 gap of a {p99_before:?} before, {p99_during:?} while b loaded ({status} after {took:?})");
    assert_eq!(status, 200);
    assert!(took >= Duration::from_secs(5), "the load took {took:?}");
    assert!(
        p99_during.as_secs_f64() < p99_before.as_secs_f64() * 1.2 + 0.001,
        "p99 gap rose from {p99_before:?} to {p99_during:?}"
    );
}

/// The `oha` load generator: `LLORCH_OHA`, else `oha` on `PATH`. Without it the test is
/// skipped with a message, unless `LLORCH_REQUIRE_OHA=1` (set by `.ci/run`, which installs it).
fn oha() -> Option<String> {
    let program = std::env::var("LLORCH_OHA").unwrap_or_else(|_| "oha".to_string());
    common::tool_available(
        std::process::Command::new(&program).arg("--version"),
        "LLORCH_REQUIRE_OHA",
        "no oha for L3 (cargo install oha, or set LLORCH_OHA)",
    )
    .then_some(program)
}

/// Runs `oha` for `secs` with `clients` connections posting a non-streamed completion to
/// model `a`; returns its status histogram and its errors other than the requests cut off by
/// the end of the run.
async fn oha_run(
    oha: &str,
    daemon: &Daemon,
    secs: u64,
    clients: usize,
) -> (HashMap<String, u64>, serde_json::Value) {
    let body = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        body.path(),
        json!({"model": "a", "prompt": "Go", "max_tokens": 8}).to_string(),
    )
    .unwrap();
    let output = tokio::process::Command::new(oha)
        .args(["-z", &format!("{secs}s"), "-c", &clients.to_string()])
        .args(["--no-tui", "--output-format", "json", "-m", "POST"])
        .args(["-H", "content-type: application/json", "-D"])
        .arg(body.path())
        .arg(daemon.at("/v1/completions"))
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let statuses: HashMap<String, u64> =
        serde_json::from_value(report["statusCodeDistribution"].clone()).unwrap();
    let mut errors = report["errorDistribution"].clone();
    if let Some(errors) = errors.as_object_mut() {
        errors.remove("aborted due to deadline");
    }
    eprintln!(
        "L3 ({clients} clients, {secs} s): statuses {statuses:?}, other errors {errors}, {:.0} req/s, p99 {:.1} ms",
        report["summary"]["requestsPerSec"].as_f64().unwrap_or(0.0),
        report["latencyPercentiles"]["p99"].as_f64().unwrap_or(0.0) * 1000.0
    );
    (statuses, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l3_non_streaming_load_with_oha_at_capacity_is_all_200() {
    let Some(oha) = oha() else { return };
    let _serial = SERIAL.lock().await;
    // 64 connections, 64 replicas.
    let daemon = Daemon::start(&pool(&["a"], 64, 64)).await;
    let baseline = warm_up(&daemon, &["a"]).await;
    let (statuses, errors) = oha_run(&oha, &daemon, run_secs().min(30), 64).await;
    assert_eq!(statuses.keys().collect::<Vec<_>>(), ["200"], "{statuses:?}");
    assert_eq!(errors, json!({}));
    resources_return(&daemon, baseline).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l3_non_streaming_load_with_oha_at_four_times_capacity_is_200_or_503() {
    let Some(oha) = oha() else { return };
    let _serial = SERIAL.lock().await;
    // 64 connections, 16 replicas, a queue of one.
    let daemon = Daemon::start(&pool(&["a"], 16, 1)).await;
    let baseline = warm_up(&daemon, &["a"]).await;
    let (statuses, errors) = oha_run(&oha, &daemon, run_secs().min(30), 64).await;
    assert!(statuses.get("200").is_some_and(|n| *n > 0), "{statuses:?}");
    assert!(statuses.get("503").is_some_and(|n| *n > 0), "{statuses:?}");
    assert!(
        statuses.keys().all(|s| s == "200" || s == "503"),
        "{statuses:?}"
    );
    assert_eq!(errors, json!({}));
    resources_return(&daemon, baseline).await;
}
