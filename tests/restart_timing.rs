//! F3 in paused (virtual) tokio time, with backoff jitter switched off: the restarts of a
//! replica that keeps crashing wait exactly 250, 500, 1000, 2000 and 4000 ms; the sixth crash
//! within 120 s marks it failed (503 `model_unavailable`, `/ready` 503); an admin reload
//! recovers it; and 300 s without a crash start the backoff over.
//!
//! Engine threads work in real time, so the test keeps the runtime busy (no automatic clock
//! jumps) and moves the virtual clock itself, 1 ms at a time, while a request is pending.

mod common;

use std::future::Future;
use std::time::Duration;

use common::daemon::Daemon;
use llorch::actors::faults::{arm, set_no_jitter, supervision_events, Fault, SupervisionEvent};
use serde_json::{json, Value};

/// Keeps the runtime from ever idling, so tokio never advances the paused clock by itself.
fn hold_the_clock() {
    tokio::spawn(async {
        loop {
            tokio::task::yield_now().await;
        }
    });
}

/// Runs `future` to completion, moving virtual time forward 1 ms per turn while it waits.
async fn drive<T: Send + 'static>(future: impl Future<Output = T> + Send + 'static) -> T {
    let task = tokio::spawn(future);
    while !task.is_finished() {
        tokio::time::advance(Duration::from_millis(1)).await;
        std::thread::sleep(Duration::from_micros(200));
    }
    task.await.unwrap()
}

async fn complete(daemon: &Daemon, model: &str, max_tokens: usize) -> (u16, Value) {
    let client = daemon.client.clone();
    let url = daemon.at("/v1/completions");
    let body = json!({"model": model, "prompt": "Hi", "max_tokens": max_tokens});
    drive(async move {
        let response = client.post(url).json(&body).send().await.unwrap();
        let status = response.status().as_u16();
        (status, response.json::<Value>().await.unwrap())
    })
    .await
}

/// The delays between each failure of `replica` and the respawn that followed it.
fn backoffs(replica: &str) -> Vec<Duration> {
    supervision_events(replica)
        .windows(2)
        .filter_map(|pair| match pair {
            [(SupervisionEvent::Failed, failed), (SupervisionEvent::Respawned, respawned)] => {
                Some(respawned.duration_since(*failed))
            }
            _ => None,
        })
        .collect()
}

/// Checks the observed backoffs against the expected ones. tokio's timer fires on the first
/// millisecond tick at or after a deadline, and `drive` moves virtual time 1 ms per scheduler
/// turn, so the supervisor records a respawn a turn or a few after its timer fired (CI saw
/// 252 ms for 250): up to `LATE` late, far below the doubling the checks tell apart.
fn assert_backoffs(observed: Vec<Duration>, expected_ms: &[u64]) {
    const LATE: Duration = Duration::from_millis(5);
    assert_eq!(observed.len(), expected_ms.len(), "{observed:?}");
    for (got, want) in observed.iter().zip(expected_ms) {
        let want = Duration::from_millis(*want);
        assert!(*got >= want && *got <= want + LATE, "{observed:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn restart_backoff_and_intensity_in_virtual_time() {
    set_no_jitter(true);
    let replica = "f3v-victim#0@cpu";
    let daemon = Daemon::start(
        "version = 1\n[[models]]\nname = \"f3v-victim\"\nsource = \"builtin:demo\"\n",
    )
    .await;
    hold_the_clock();
    for _ in 0..6 {
        arm(replica, Fault::PanicAtToken(0));
    }
    let mut answers = Vec::new();
    loop {
        let (status, body) = complete(&daemon, "f3v-victim", 1).await;
        let code = body["error"]["code"].as_str().unwrap_or("").to_string();
        answers.push((status, code.clone()));
        if code == "model_unavailable" {
            break;
        }
        assert!(answers.len() < 10, "{answers:?}");
    }
    assert_backoffs(backoffs(replica), &[250, 500, 1000, 2000, 4000]);
    let events: Vec<SupervisionEvent> = supervision_events(replica)
        .into_iter()
        .map(|(e, _)| e)
        .collect();
    assert_eq!(
        events
            .iter()
            .filter(|e| **e == SupervisionEvent::Failed)
            .count(),
        6,
        "{events:?}"
    );
    assert_eq!(events.last(), Some(&SupervisionEvent::GaveUp), "{events:?}");
    let client = daemon.client.clone();
    let ready = daemon.at("/ready");
    let status =
        drive(async move { client.get(ready).send().await.unwrap().status().as_u16() }).await;
    assert_eq!(status, 503);

    // An admin reload starts a fresh generation with a fresh restart history.
    let client = daemon.client.clone();
    let reload = daemon.at("/admin/models/f3v-victim/reload");
    let status =
        drive(async move { client.post(reload).send().await.unwrap().status().as_u16() }).await;
    assert_eq!(status, 200);
    let (status, body) = complete(&daemon, "f3v-victim", 1).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test(start_paused = true)]
async fn three_hundred_quiet_seconds_reset_the_backoff() {
    set_no_jitter(true);
    let replica = "f3q-quiet#0@cpu";
    let daemon =
        Daemon::start("version = 1\n[[models]]\nname = \"f3q-quiet\"\nsource = \"builtin:demo\"\n")
            .await;
    hold_the_clock();
    for round in 0..3 {
        if round == 2 {
            tokio::time::advance(Duration::from_secs(301)).await;
        }
        // A crash before the first token is retried once; the retry waits for the restart.
        arm(replica, Fault::PanicAtToken(0));
        let (status, body) = complete(&daemon, "f3q-quiet", 1).await;
        assert_eq!(status, 200, "round {round}: {body}");
    }
    assert_backoffs(backoffs(replica), &[250, 500, 250]);
}
