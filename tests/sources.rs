//! Model sources end to end through the `llorch generate` binary: `builtin:demo`, `hf:` repos
//! resolved from a hub cache laid out as hf-hub lays it out (branch, commit, sharded weights),
//! and bad sources.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::Device;
use common::{fixtures, golden};
use serde_json::Value;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn llorch(args: &[&str], env: &[(&str, &Path)]) -> (bool, String, String) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_llorch"));
    command.args(args).env("HF_HUB_OFFLINE", "1");
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

fn generate_json(source: &str, prompt: &str, extra: &[&str], env: &[(&str, &Path)]) -> Value {
    let mut args = vec!["generate", "--source", source, "--prompt", prompt, "--json"];
    args.extend_from_slice(extra);
    let (ok, stdout, stderr) = llorch(&args, env);
    assert!(ok, "llorch generate failed: {stderr}");
    serde_json::from_str(stdout.trim()).unwrap()
}

/// Lays out `files` (name → bytes) in `cache` as hf-hub does: blobs by content, a snapshot of
/// symlinks, and `refs/main` naming the commit.
fn lay_out_cache(cache: &Path, repo: &str, files: &HashMap<String, Vec<u8>>) {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = root.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(root.join("blobs")).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::create_dir_all(&snapshot).unwrap();
    for (index, (name, bytes)) in files.iter().enumerate() {
        let blob = format!("blob{index:04}");
        std::fs::write(root.join("blobs").join(&blob), bytes).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snapshot.join(name)).unwrap();
    }
    std::fs::write(root.join("refs").join("main"), COMMIT).unwrap();
}

fn model_files(dir: &Path, names: &[&str]) -> HashMap<String, Vec<u8>> {
    names
        .iter()
        .map(|name| (name.to_string(), std::fs::read(dir.join(name)).unwrap()))
        .collect()
}

const TEXT_FILES: &[&str] = &[
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
];

fn greedy_args() -> Vec<&'static str> {
    vec!["--temperature", "0", "--ignore-eos", "--max-tokens", "32"]
}

#[test]
fn builtin_demo_generates_and_the_seed_fixes_the_tokens() {
    let args = ["--max-tokens", "12", "--temperature", "1.0", "--ignore-eos"];
    let first = generate_json(
        "builtin:demo",
        "Hello",
        &[&args[..], &["--seed", "7"]].concat(),
        &[],
    );
    let again = generate_json(
        "builtin:demo",
        "Hello",
        &[&args[..], &["--seed", "7"]].concat(),
        &[],
    );
    let other = generate_json(
        "builtin:demo",
        "Hello",
        &[&args[..], &["--seed", "8"]].concat(),
        &[],
    );
    assert_eq!(
        first["prompt_ids"],
        serde_json::json!([1, 79, 108, 115, 115, 118])
    );
    assert_eq!(first["generated_ids"].as_array().unwrap().len(), 12);
    assert_eq!(first, again);
    assert_ne!(first["generated_ids"], other["generated_ids"]);
}

#[test]
fn hub_cache_branch_and_commit_resolve_offline() {
    let Some(fixtures) = fixtures() else { return };
    let source = fixtures.join("models/llama");
    let case = &golden(&fixtures, "models/llama/golden.json").cases[0];
    let cache = tempfile::tempdir().unwrap();
    let mut files = model_files(&source, TEXT_FILES);
    files.extend(model_files(&source, &["model.safetensors"]));
    lay_out_cache(cache.path(), "fixture/llama", &files);
    for spec in ["hf:fixture/llama", &format!("hf:fixture/llama@{COMMIT}")] {
        let out = generate_json(
            spec,
            &case.prompt,
            &greedy_args(),
            &[("HF_HUB_CACHE", cache.path())],
        );
        assert_eq!(
            out["prompt_ids"],
            serde_json::json!(case.prompt_ids),
            "{spec}"
        );
        assert_eq!(
            out["generated_ids"],
            serde_json::json!(case.generated_ids),
            "{spec}"
        );
        assert_eq!(
            out["text"],
            Value::String(case.generated_text.clone()),
            "{spec}"
        );
    }
}

#[test]
fn sharded_weights_in_the_hub_cache_load() {
    let Some(fixtures) = fixtures() else { return };
    let source = fixtures.join("models/llama");
    let case = &golden(&fixtures, "models/llama/golden.json").cases[1];
    let weights =
        candle_core::safetensors::load(source.join("model.safetensors"), &Device::Cpu).unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let mut files = model_files(&source, TEXT_FILES);
    let mut weight_map = serde_json::Map::new();
    let mut names: Vec<&String> = weights.keys().collect();
    names.sort();
    for (shard, chunk) in names.chunks(names.len().div_ceil(2)).enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", shard + 1);
        let part: HashMap<String, candle_core::Tensor> = chunk
            .iter()
            .map(|name| ((*name).clone(), weights[*name].clone()))
            .collect();
        candle_core::safetensors::save(&part, scratch.path().join(&file)).unwrap();
        files.insert(
            file.clone(),
            std::fs::read(scratch.path().join(&file)).unwrap(),
        );
        for name in chunk {
            weight_map.insert((*name).clone(), Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    files.insert(
        "model.safetensors.index.json".into(),
        index.to_string().into_bytes(),
    );
    let cache = tempfile::tempdir().unwrap();
    lay_out_cache(cache.path(), "fixture/sharded", &files);
    let out = generate_json(
        "hf:fixture/sharded",
        &case.prompt,
        &greedy_args(),
        &[("HF_HUB_CACHE", cache.path())],
    );
    assert_eq!(out["generated_ids"], serde_json::json!(case.generated_ids));
}

#[test]
fn a_gguf_without_tokenizer_json_tokenizes_from_its_metadata() {
    let Some(fixtures) = fixtures() else { return };
    let case = &golden(&fixtures, "models/stories260k/golden.json").cases[1];
    let path = fixtures.join("gguf/stories260k-f32.gguf");
    assert!(!path.with_file_name("tokenizer.json").exists());
    let out = generate_json(path.to_str().unwrap(), &case.prompt, &greedy_args(), &[]);
    assert_eq!(out["prompt_ids"], serde_json::json!(case.prompt_ids));
    assert_eq!(out["generated_ids"], serde_json::json!(case.generated_ids));
    assert_eq!(out["text"], Value::String(case.generated_text.clone()));
}

#[test]
fn errors_exit_non_zero_with_the_reason() {
    let (ok, _, stderr) = llorch(
        &["generate", "--source", "hf:org/absent", "--prompt", "x"],
        &[],
    );
    assert!(!ok);
    assert!(stderr.contains("cannot fetch org/absent@main"), "{stderr}");
    let (ok, _, stderr) = llorch(
        &[
            "generate",
            "--source",
            "builtin:demo",
            "--prompt",
            "x",
            "--device",
            "cuda:0",
        ],
        &[],
    );
    assert!(!ok);
    assert!(
        stderr.contains("device cuda:0 is not available"),
        "{stderr}"
    );
}
