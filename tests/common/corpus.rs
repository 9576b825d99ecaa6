//! The malformed-request corpus (`tests/corpus/malformed/*.http`). File format: `# key: value`
//! lines, then the request exactly as sent, except that the head's line ends become CRLF,
//! `{len}` becomes the body's length, `{repeat}` becomes `repeat` (`{i}` numbered)
//! `repeat-count` times, and the file's final newline is dropped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::raw::SendMode;

/// One corpus file.
pub struct Case {
    pub name: String,
    pub expect_status: Option<u16>,
    pub expect_code: Option<String>,
    pub expect_param: Option<String>,
    pub stream_ok: bool,
    pub json: bool,
    pub mode: SendMode,
    pub timeout: Duration,
    pub headers: Vec<(String, String)>,
    pub request: Vec<u8>,
}

fn meta<'a>(lines: &'a [(String, String)], key: &str) -> Option<&'a str> {
    lines
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

pub fn load_case(path: &Path) -> Case {
    let bytes = std::fs::read(path).unwrap();
    let mut rest: &[u8] = &bytes;
    let mut lines = Vec::new();
    while rest.starts_with(b"# ") {
        let end = rest.iter().position(|b| *b == b'\n').unwrap();
        let line = String::from_utf8_lossy(&rest[2..end]).to_string();
        let (key, value) = line.split_once(": ").unwrap_or((line.as_str(), ""));
        lines.push((key.to_string(), value.to_string()));
        rest = &rest[end + 1..];
    }
    let split = rest
        .windows(2)
        .position(|w| w == b"\n\n")
        .expect("a blank line ends the head");
    let head = &rest[..split];
    let mut body = rest[split + 2..].to_vec();
    if body.last() == Some(&b'\n') {
        body.pop();
    }
    if let Some(count) = meta(&lines, "repeat-count") {
        let count: usize = count.parse().unwrap();
        let unit = meta(&lines, "repeat").unwrap_or("");
        let unit = unit.replace("\\r\\n", "\r\n");
        let generated: String = (0..count)
            .map(|i| unit.replace("{i}", &i.to_string()))
            .collect();
        let marker = b"{repeat}";
        let at = body
            .windows(marker.len())
            .position(|w| w == marker)
            .unwrap();
        body.splice(at..at + marker.len(), generated.into_bytes());
    }
    let head = String::from_utf8_lossy(head)
        .replace("{len}", &body.len().to_string())
        .replace('\n', "\r\n");
    let mut request = head.into_bytes();
    request.extend_from_slice(b"\r\n\r\n");
    request.extend_from_slice(&body);
    let expect = meta(&lines, "expect").unwrap_or("");
    let mut words = expect.split(' ');
    let first = words.next().unwrap_or("");
    let second = words.next().map(str::to_string);
    let stream_ok = second.as_deref() == Some("stream");
    let mode = match meta(&lines, "mode") {
        Some("stall") => SendMode::Stall,
        Some("trickle") => SendMode::Trickle(Duration::from_millis(300)),
        _ => SendMode::Whole,
    };
    Case {
        name: path.file_name().unwrap().to_string_lossy().to_string(),
        expect_status: first.parse().ok(),
        expect_code: second.filter(|_| !stream_ok),
        expect_param: words.next().map(str::to_string),
        stream_ok,
        json: meta(&lines, "json") != Some("no"),
        mode,
        timeout: Duration::from_secs(
            meta(&lines, "timeout")
                .map(|t| t.parse().unwrap())
                .unwrap_or(5),
        ),
        headers: lines
            .iter()
            .filter(|(k, _)| k == "header")
            .map(|(_, v)| {
                let (n, v) = v.split_once(": ").unwrap();
                (n.to_string(), v.to_string())
            })
            .collect(),
        request,
    }
}

pub fn corpus() -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/malformed");
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "http"))
        .collect();
    files.sort();
    files
}
