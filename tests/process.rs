//! The daemon as a process: SIGHUP re-reads pool.toml (a broken file changes nothing), and
//! SIGTERM exits cleanly; `[server] http_threads` sets the HTTP runtime's workers.

mod common;

use common::process::signal;
use std::time::{Duration, Instant};

fn demo(name: &str) -> String {
    format!("[[models]]\nname = \"{name}\"\nsource = \"builtin:demo\"\n")
}

fn model_ids(url: &str) -> Vec<String> {
    let body = http_get(&format!("{url}/v1/models"));
    let value: serde_json::Value = serde_json::from_str(&body).unwrap();
    value["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

fn wait_for(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A GET on a fresh runtime (the test itself is synchronous).
fn http_get(url: &str) -> String {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async { reqwest::get(url).await.unwrap().text().await.unwrap() })
}

#[test]
fn sighup_applies_a_valid_pool_file_and_ignores_a_broken_one_and_sigterm_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pool.toml");
    std::fs::write(&config, format!("version = 1\n{}", demo("first"))).unwrap();
    let (mut child, url) = common::process::start(&config);
    wait_for("first", || model_ids(&url) == ["first"]);

    std::fs::write(
        &config,
        format!("version = 1\n{}{}", demo("first"), demo("second")),
    )
    .unwrap();
    signal(&child, "HUP");
    wait_for("second", || model_ids(&url) == ["first", "second"]);

    std::fs::write(&config, "version = 1\n[[models]\n").unwrap();
    signal(&child, "HUP");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        model_ids(&url),
        ["first", "second"],
        "a broken file changed the pool"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "a broken file stopped the daemon"
    );

    signal(&child, "TERM");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not exit on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn the_daemon_serves_http_on_as_many_threads_as_configured() {
    for threads in [1, 3] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("pool.toml");
        let pool = format!(
            "version = 1\n[server]\nhttp_threads = {threads}\n{}",
            demo("d")
        );
        std::fs::write(&config, pool).unwrap();
        let (mut child, _url, lines) =
            common::process::start_logged(&config, &[("RUST_LOG", "llorch=info")]);
        let deadline = Instant::now() + Duration::from_secs(20);
        let announced = loop {
            match lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains("llorch listening") => break Some(line),
                Ok(_) => {}
                Err(_) => break None,
            }
        };
        let _ = child.kill();
        let _ = child.wait();
        let announced = announced.expect("the daemon logged where it listens");
        assert!(
            announced.contains(&format!("http_threads={threads}")),
            "{announced}"
        );
    }
}
