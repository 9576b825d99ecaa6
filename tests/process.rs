//! The daemon as a process: SIGHUP re-reads pool.toml (a broken file changes nothing), and
//! SIGTERM exits cleanly.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn demo(name: &str) -> String {
    format!("[[models]]\nname = \"{name}\"\nsource = \"builtin:demo\"\n")
}

/// Starts `llorch serve` on a free port and returns it with its base URL.
fn start(config: &std::path::Path) -> (Child, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llorch"))
        .args([
            "serve",
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (lines_tx, lines_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
        match line {
            Ok(line) => {
                if let Some(url) = line.strip_prefix("llorch listening on ") {
                    return (child, url.trim().to_string());
                }
            }
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the daemon never listened");
            }
        }
    }
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

fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
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
    let (mut child, url) = start(&config);
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
