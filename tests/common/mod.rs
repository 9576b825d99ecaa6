//! Shared helpers for integration tests: the reference fixtures and their goldens.

#![allow(dead_code)]

pub mod cluster;
pub mod corpus;
pub mod daemon;
pub mod load;
pub mod process;
pub mod raw;

use std::io::Write;
use std::path::PathBuf;

use candle_core::Device;
use llorch::models::{
    load, DTypeChoice, FinishReason, GenerationParams, LoadSpec, LoadedModel, ModelSource,
    SamplingParams, Sequence,
};
use serde::Deserialize;

/// Whether `command` (an external tool a test drives) runs and succeeds. Without it the test
/// skips with `hint`, unless the environment variable `require` is `1`: then it fails.
pub fn tool_available(command: &mut std::process::Command, require: &str, hint: &str) -> bool {
    let found = command.output().is_ok_and(|out| out.status.success());
    let required = std::env::var(require).is_ok_and(|v| v == "1");
    assert!(
        found || !required,
        "{require}=1 but {command:?} does not run"
    );
    if !found {
        eprintln!("skipping: {hint}");
    }
    found
}

/// Returns the fixtures folder (`LLORCH_FIXTURES`, default `../shared/fixtures`), or `None` with
/// a message when it is absent. With `LLORCH_REQUIRE_FIXTURES=1` an absent folder fails the test.
pub fn fixtures() -> Option<PathBuf> {
    let dir = std::env::var_os("LLORCH_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures"));
    if dir.join("index.json").is_file() {
        return Some(dir);
    }
    let required = std::env::var("LLORCH_REQUIRE_FIXTURES").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "LLORCH_REQUIRE_FIXTURES=1 but no fixtures at {} (set LLORCH_FIXTURES)",
        dir.display()
    );
    eprintln!(
        "skipping: no reference fixtures at {} (set LLORCH_FIXTURES)",
        dir.display()
    );
    None
}

/// One entry of `index.json`.
#[derive(Debug, Deserialize)]
pub struct IndexEntry {
    pub name: String,
    pub kind: String,
    pub path: String,
    pub golden: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Index {
    entries: Vec<IndexEntry>,
}

/// Reads `index.json`.
pub fn index(fixtures: &std::path::Path) -> Vec<IndexEntry> {
    let text = std::fs::read_to_string(fixtures.join("index.json")).unwrap();
    serde_json::from_str::<Index>(&text).unwrap().entries
}

/// A golden file.
#[derive(Debug, Deserialize)]
pub struct Golden {
    pub cases: Vec<Case>,
}

/// One golden case.
#[derive(Debug, Deserialize)]
pub struct Case {
    pub name: String,
    pub kind: String,
    pub prompt: String,
    #[serde(default)]
    pub messages: Vec<llorch::models::ChatMessage>,
    pub add_special_tokens: bool,
    pub prompt_ids: Vec<u32>,
    pub last_prompt_top5: Vec<TopLogit>,
    pub generated_ids: Vec<u32>,
    pub generated_text: String,
}

/// One of the top-5 logits.
#[derive(Debug, Deserialize)]
pub struct TopLogit {
    pub id: u32,
    pub logit: f32,
}

/// A `pool.toml` serving every entry under its index name.
pub fn fixture_pool(fixtures: &std::path::Path, entries: &[IndexEntry]) -> String {
    let mut toml = String::from("version = 1\n");
    for entry in entries {
        toml.push_str(&format!(
            "[[models]]\nname = \"{}\"\nsource = \"{}\"\n",
            entry.name,
            fixtures.join(&entry.path).display()
        ));
    }
    toml
}

/// Reads a golden file relative to the fixtures folder.
pub fn golden(fixtures: &std::path::Path, rel: &str) -> Golden {
    let text = std::fs::read_to_string(fixtures.join(rel)).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Loads a model on the CPU in f32.
pub fn load_cpu(source: &str) -> LoadedModel {
    load(&LoadSpec {
        source: source.parse::<ModelSource>().unwrap(),
        device: Device::Cpu,
        dtype: DTypeChoice::Auto,
        max_seq_len: None,
    })
    .unwrap_or_else(|err| panic!("loading {source}: {err}"))
}

/// Runs a greedy generation of `n` tokens with EOS ignored; returns ids and the streamed text.
pub fn greedy(model: &mut LoadedModel, prompt_ids: Vec<u32>, n: usize) -> (Vec<u32>, String) {
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(n),
        stop: Vec::new(),
        ignore_eos: true,
        ..GenerationParams::default()
    };
    let mut sequence = Sequence::new(model, prompt_ids, params).unwrap();
    let mut text = String::new();
    loop {
        let step = sequence.step(model).unwrap();
        text.push_str(&step.text);
        if let Some(reason) = step.finished {
            assert_eq!(reason, FinishReason::MaxTokens);
            break;
        }
    }
    model.clear_kv_cache().unwrap();
    (sequence.generated_ids().to_vec(), text)
}

/// Top-`k` (id, logit) pairs, highest first.
pub fn top_k(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut pairs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i as u32, l))
        .collect();
    pairs.sort_by(|a, b| b.1.total_cmp(&a.1));
    pairs.truncate(k);
    pairs
}

/// The first generated token's log probabilities against the golden top-5 logits at the
/// last prompt position: a log probability is the logit less one normaliser, so the five
/// alternatives' differences from the first equal the logits' differences; the greedy token
/// is the most likely; and five probabilities add up to at most 1.
pub fn check_first_logprobs(label: &str, logprobs: &serde_json::Value, golden: &[TopLogit]) {
    let (chosen, top): (f64, Vec<f64>) = match logprobs.get("content") {
        Some(content) => (
            content[0]["logprob"].as_f64().unwrap(),
            content[0]["top_logprobs"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t["logprob"].as_f64().unwrap())
                .collect(),
        ),
        None => {
            let mut top: Vec<f64> = logprobs["top_logprobs"][0]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_f64().unwrap())
                .collect();
            top.sort_by(|a, b| b.total_cmp(a));
            (logprobs["token_logprobs"][0].as_f64().unwrap(), top)
        }
    };
    assert_eq!(
        chosen, top[0],
        "{label}: the greedy token is the most likely"
    );
    let expected: Vec<f64> = golden
        .iter()
        .map(|g| f64::from(g.logit - golden[0].logit))
        .collect();
    if logprobs.get("content").is_some() {
        assert_eq!(top.len(), 5, "{label}: {logprobs}");
        for (k, lp) in top.iter().enumerate() {
            let got = lp - top[0];
            assert!(
                (got - expected[k]).abs() < 1e-3,
                "{label}: alternative {k}: {got} against the golden {}",
                expected[k]
            );
        }
    } else {
        // Completions key alternatives by text, so tokens that decode alike share a key.
        for lp in &top {
            let got = lp - top[0];
            assert!(
                expected.iter().any(|e| (got - e).abs() < 1e-3),
                "{label}: {got} is no golden difference {expected:?}"
            );
        }
    }
    assert!(
        top.iter().map(|lp| lp.exp()).sum::<f64>() <= 1.0 + 1e-6,
        "{label}"
    );
}

/// Runs `python3 tests/<script> <url> <args...>`; it must exit 0 and print "all checks
/// passed". Returns its stdout.
pub async fn run_script(script: &str, url: &str, args: &[&str]) -> String {
    let path = format!("{}/tests/{script}", env!("CARGO_MANIFEST_DIR"));
    let output = tokio::process::Command::new("python3")
        .arg(path)
        .arg(url)
        .args(args)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{script}: {stdout}\n{stderr}");
    assert!(stdout.contains("all checks passed"), "{script}: {stdout}");
    stdout
}

/// Runs the `llorch` binary with `args` against the daemon at `url` (no admin key in its
/// environment): whether it succeeded, its stdout and its stderr.
pub async fn llorch_cli(args: &[&str], url: &str) -> (bool, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_llorch"))
        .args(args)
        .args(["--url", url])
        .env_remove("LLORCH_ADMIN_KEY")
        .output()
        .await
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs `promtool check metrics` on the text when promtool is installed (required in CI).
pub fn promtool_accepts(text: &str) {
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(child) => child,
        Err(err) => {
            assert!(
                std::env::var("LLORCH_REQUIRE_PROMTOOL").is_err(),
                "promtool is required (LLORCH_REQUIRE_PROMTOOL) but cannot run: {err}"
            );
            eprintln!("promtool not installed; skipping the promtool check");
            return;
        }
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
