//! The CPU kernels' levels (`LLORCH_CPU_LEVEL`: AVX-512 VNNI, AVX2, scalar) give the same
//! greedy tokens: for each Q8_0 GGUF fixture, `llorch generate` at every level reproduces the
//! golden continuation (llama.cpp's) of its first case. A level the CPU lacks falls back to
//! the best it has, so on any machine every run must still match.

mod common;

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const LEVELS: [&str; 3] = ["avx512", "avx2", "scalar"];

/// `llorch generate --json` of `prompt` on `source` at `level`, greedy: (prompt ids, generated
/// ids).
fn generate(source: &Path, prompt: &str, tokens: usize, level: &str) -> (Vec<u64>, Vec<u64>) {
    let output = Command::new(env!("CARGO_BIN_EXE_llorch"))
        .args(["generate", "--source"])
        .arg(source)
        .args([
            "--prompt",
            prompt,
            "--temperature",
            "0",
            "--ignore-eos",
            "--json",
        ])
        .args(["--max-tokens", &tokens.to_string()])
        .env("LLORCH_CPU_LEVEL", level)
        .output()
        .expect("running llorch generate");
    assert!(
        output.status.success(),
        "llorch generate at {level}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let json: Value = serde_json::from_slice(&output.stdout).expect("generate --json output");
    let ids = |key: &str| -> Vec<u64> {
        json[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in {json}"))
            .iter()
            .map(|id| id.as_u64().expect("token id"))
            .collect()
    };
    (ids("prompt_ids"), ids("generated_ids"))
}

#[test]
fn every_level_gives_the_golden_tokens_of_the_q8_0_fixtures() {
    let Some(fixtures) = common::fixtures() else {
        return;
    };
    for name in ["tiny-llama", "tiny-qwen2", "stories260k"] {
        let source = fixtures.join(format!("gguf/{name}-q8_0.gguf"));
        let golden = fixtures.join(format!("gguf/{name}-q8_0.golden.json"));
        let golden: Value = serde_json::from_slice(&std::fs::read(&golden).unwrap()).unwrap();
        let case = &golden["cases"][0];
        let want: Vec<u64> = serde_json::from_value(case["generated_ids"].clone()).unwrap();
        let prompt_ids: Vec<u64> = serde_json::from_value(case["prompt_ids"].clone()).unwrap();
        let prompt = case["prompt"].as_str().unwrap();
        for level in LEVELS {
            let (prompt_got, got) = generate(&source, prompt, want.len(), level);
            assert_eq!(prompt_got, prompt_ids, "{name} prompt at {level}");
            assert_eq!(got, want, "{name} at {level}");
        }
    }
}
