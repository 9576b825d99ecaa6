//! RELIABILITY.md S6: malformed or hostile model files loaded through the admin API fail fast
//! with 400 `invalid_model_file`, allocate nothing like what their headers claim, and leave
//! the other models serving.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::daemon::Daemon;
use common::load::snapshot;
use serde_json::{json, Value};

/// Writes a tiny valid Llama (config, tokenizer, weights) into `dir`.
fn write_model(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let config = json!({
        "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
        "vocab_size": 8, "rms_norm_eps": 1e-5, "max_position_embeddings": 64,
        "tie_word_embeddings": false
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "hello": 1}, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let t =
        |rows: usize, cols: usize| Tensor::randn(0f32, 0.02, (rows, cols), &Device::Cpu).unwrap();
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    weights.insert("model.embed_tokens.weight".into(), t(8, 16));
    weights.insert("lm_head.weight".into(), t(8, 16));
    weights.insert(
        "model.norm.weight".into(),
        Tensor::ones(16, candle_core::DType::F32, &Device::Cpu).unwrap(),
    );
    for (name, rows, cols) in [
        ("self_attn.q_proj", 16, 16),
        ("self_attn.k_proj", 16, 16),
        ("self_attn.v_proj", 16, 16),
        ("self_attn.o_proj", 16, 16),
        ("mlp.gate_proj", 32, 16),
        ("mlp.up_proj", 32, 16),
        ("mlp.down_proj", 16, 32),
    ] {
        weights.insert(format!("model.layers.0.{name}.weight"), t(rows, cols));
    }
    for norm in ["input_layernorm", "post_attention_layernorm"] {
        weights.insert(
            format!("model.layers.0.{norm}.weight"),
            Tensor::ones(16, candle_core::DType::F32, &Device::Cpu).unwrap(),
        );
    }
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
}

/// Splits a safetensors file into its header JSON and data.
fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let text = header.to_string();
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out
}

/// A copy of the valid model with its weights file replaced by `weights`.
fn variant(root: &Path, name: &str, weights: Vec<u8>) {
    let dir = root.join(name);
    write_model(&dir);
    std::fs::write(dir.join("model.safetensors"), weights).unwrap();
}

/// A GGUF with one llama metadata entry and one tensor, whose header says what `tensor` says.
fn gguf(key_length: u64, dims: &[u64], data: usize) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend(1u64.to_le_bytes()); // tensors
    out.extend(1u64.to_le_bytes()); // metadata entries
    let key = b"general.architecture";
    out.extend(key_length.to_le_bytes());
    out.extend(key);
    out.extend(8u32.to_le_bytes());
    out.extend(5u64.to_le_bytes());
    out.extend(b"llama");
    out.extend(1u64.to_le_bytes());
    out.extend(b"x");
    out.extend((dims.len() as u32).to_le_bytes());
    for dim in dims {
        out.extend(dim.to_le_bytes());
    }
    out.extend(0u32.to_le_bytes()); // f32
    out.extend(0u64.to_le_bytes()); // offset
    while !out.len().is_multiple_of(32) {
        out.push(0);
    }
    out.extend(vec![0u8; data]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_model_files_fail_fast_with_invalid_model_file() {
    let root = tempfile::tempdir().unwrap();
    write_model(&root.path().join("good"));
    let valid = std::fs::read(root.path().join("good/model.safetensors")).unwrap();
    let (header, data) = split(&valid);
    let first = header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone();
    let second = header
        .as_object()
        .unwrap()
        .keys()
        .filter(|k| *k != "__metadata__")
        .nth(1)
        .unwrap()
        .clone();
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    cases.push(("truncated", valid[..valid.len() * 6 / 10].to_vec()));
    let mut huge = valid.clone();
    huge[..8].copy_from_slice(&200_000_000u64.to_le_bytes());
    cases.push(("header_over_100mb", huge));
    let mut long = valid.clone();
    long[..8].copy_from_slice(&(valid.len() as u64 + 10).to_le_bytes());
    cases.push(("header_past_the_end", long));
    let mut out_of_range = header.clone();
    out_of_range[&first]["data_offsets"][1] = json!(data.len() + 1000);
    cases.push(("offsets_out_of_range", join(&out_of_range, &data)));
    let mut overlapping = header.clone();
    overlapping[&second]["data_offsets"] = overlapping[&first]["data_offsets"].clone();
    cases.push(("offsets_overlapping", join(&overlapping, &data)));
    let mut overflow = header.clone();
    overflow[&first]["shape"] = json!([4294967296u64, 4294967296u64, 16]);
    cases.push(("shape_overflow", join(&overflow, &data)));
    let mut dtype = header.clone();
    dtype[&first]["dtype"] = json!("Q9");
    cases.push(("unknown_dtype", join(&dtype, &data)));
    for (name, bytes) in &cases {
        variant(root.path(), name, bytes.clone());
    }
    let ggufs = [
        ("tensor_past_the_end.gguf", gguf(20, &[1_000_000], 16)),
        ("huge_key_length.gguf", gguf(1 << 62, &[4], 16)),
        ("huge_shape.gguf", gguf(20, &[1 << 40, 1 << 40], 16)),
    ];
    for (name, bytes) in &ggufs {
        std::fs::write(root.path().join(name), bytes).unwrap();
    }

    let daemon = Daemon::start(&format!(
        "version = 1\n[server]\nmodels_root = {:?}\n[[models]]\nname = \"demo\"\nsource = \"builtin:demo\"\n",
        root.path()
    ))
    .await;
    let before = snapshot().rss;
    let names: Vec<&str> = cases
        .iter()
        .map(|(n, _)| *n)
        .chain(ggufs.iter().map(|(n, _)| *n))
        .collect();
    for (index, name) in names.iter().enumerate() {
        let entry = json!({"name": format!("bad{index}"), "source": name});
        let started = Instant::now();
        let (status, body) = daemon.post("/admin/models", &entry).await;
        let took = started.elapsed();
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_model_file")),
            "{name}: {body}"
        );
        assert!(
            took < Duration::from_secs(1),
            "{name}: refused after {took:?}"
        );
        let (status, _) = daemon
            .post(
                "/v1/completions",
                &json!({"model": "demo", "prompt": "Hi", "max_tokens": 1}),
            )
            .await;
        assert_eq!(status, 200, "the demo model stopped serving after {name}");
    }
    let grown = snapshot().rss.saturating_sub(before);
    eprintln!(
        "S6: {} malformed files refused; RSS grew {} KiB",
        names.len(),
        grown / 1024
    );
    assert!(grown < 64 * 1024 * 1024, "RSS grew {grown} bytes");
    let (status, _) = daemon
        .post("/admin/models", &json!({"name": "good", "source": "good"}))
        .await;
    assert_eq!(status, 200, "the valid model loads");
}
