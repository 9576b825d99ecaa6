//! The daemon as a child process (`llorch serve` on a free port), for signal tests.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Starts `llorch serve` on a free port and returns it with its base URL.
pub fn start(config: &std::path::Path) -> (Child, String) {
    let (child, url, _) = start_logged(config, &[]);
    (child, url)
}

/// Like [`start`] with extra environment variables; also returns every later stderr line.
pub fn start_logged(
    config: &std::path::Path,
    env: &[(&str, &str)],
) -> (Child, String, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llorch"))
        .envs(env.iter().copied())
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
                    return (child, url.trim().to_string(), lines_rx);
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

/// Sends a signal (`TERM`, `INT`, `HUP`) to the child.
pub fn signal(child: &Child, name: &str) {
    let status = Command::new("kill")
        .args([&format!("-{name}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits up to `limit` for the child to exit; returns its exit code and how long it took, or
/// kills it and returns `None`.
pub fn wait_exit(child: &mut Child, limit: Duration) -> Option<(i32, Duration)> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(status) = child.try_wait().unwrap() {
            return Some((status.code().unwrap_or(-1), started.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
