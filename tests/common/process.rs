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
    start_with_args(config, env, &["--listen", "127.0.0.1:0"])
}

/// Starts `llorch serve --config CONFIG ARGS...`; returns it with the URL it printed and every
/// later stderr line.
pub fn start_with_args(
    config: &std::path::Path,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Child, String, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_llorch"))
        .envs(env.iter().copied())
        .args(["serve", "--config", config.to_str().unwrap()])
        .args(args)
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

/// Waits until the daemon at `url` answers `/ready` with 200 (at most 60 s).
pub async fn wait_ready(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reqwest::get(format!("{url}/ready"))
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "the daemon never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
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

/// Resident memory (bytes) and open file descriptors of process `pid`.
pub fn resources(pid: u32) -> (u64, usize) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    (rss, fds)
}

/// The local addresses (`/proc/net/tcp*` notation, e.g. `0100007F:1F90`) of the TCP sockets
/// that process `pid` listens on, with the file each came from (`tcp` or `tcp6`).
pub fn listening_addresses(pid: u32) -> Vec<(String, String)> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().to_string();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect();
    let mut found = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is field 1, st is field 3 (0A = LISTEN), inode is field 9.
            if fields.len() > 9 && fields[3] == "0A" && inodes.iter().any(|i| i == fields[9]) {
                found.push((table.to_string(), fields[1].to_string()));
            }
        }
    }
    found
}
