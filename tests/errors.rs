//! Every load and generation error path, asserting the message a user sees. These tests build
//! their own tiny models in temp dirs and need no fixtures.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use llorch::models::{
    load, DTypeChoice, GenerationError, GenerationParams, LoadError, LoadSpec, LoadedModel,
    ModelSource, SamplingParams, Sequence,
};
use serde_json::json;

const HIDDEN: usize = 8;
const VOCAB: usize = 16;

fn tiny_config() -> serde_json::Value {
    json!({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"],
        "hidden_size": HIDDEN, "intermediate_size": 16, "num_hidden_layers": 1,
        "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 32, "tie_word_embeddings": false
    })
}

fn tiny_weights(embed_rows: usize) -> HashMap<String, Tensor> {
    let t = |shape: (usize, usize)| Tensor::ones(shape, DType::F32, &Device::Cpu).unwrap();
    let mut w = HashMap::new();
    w.insert(
        "model.embed_tokens.weight".to_string(),
        t((embed_rows, HIDDEN)),
    );
    w.insert("lm_head.weight".to_string(), t((VOCAB, HIDDEN)));
    w.insert(
        "model.norm.weight".to_string(),
        Tensor::ones(HIDDEN, DType::F32, &Device::Cpu).unwrap(),
    );
    let p = "model.layers.0";
    for (name, shape) in [
        ("self_attn.q_proj", (HIDDEN, HIDDEN)),
        ("self_attn.k_proj", (HIDDEN / 2, HIDDEN)),
        ("self_attn.v_proj", (HIDDEN / 2, HIDDEN)),
        ("self_attn.o_proj", (HIDDEN, HIDDEN)),
        ("mlp.gate_proj", (16, HIDDEN)),
        ("mlp.up_proj", (16, HIDDEN)),
        ("mlp.down_proj", (HIDDEN, 16)),
    ] {
        w.insert(format!("{p}.{name}.weight"), t(shape));
    }
    for name in ["input_layernorm", "post_attention_layernorm"] {
        w.insert(
            format!("{p}.{name}.weight"),
            Tensor::ones(HIDDEN, DType::F32, &Device::Cpu).unwrap(),
        );
    }
    w
}

fn tiny_tokenizer() -> String {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..VOCAB).map(|i| (format!("w{i}"), json!(i))).collect();
    json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "w0"}
    })
    .to_string()
}

/// Writes a complete tiny Llama directory and returns it.
fn tiny_model_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &tiny_config(), &tiny_weights(VOCAB));
    dir
}

fn write_model(dir: &Path, config: &serde_json::Value, weights: &HashMap<String, Tensor>) {
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer()).unwrap();
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
}

fn try_load(
    source: &str,
    dtype: DTypeChoice,
    max_seq_len: Option<usize>,
) -> Result<LoadedModel, LoadError> {
    load(&LoadSpec {
        source: source.parse::<ModelSource>()?,
        device: Device::Cpu,
        dtype,
        max_seq_len,
    })
}

fn load_error(dir: &Path) -> String {
    match try_load(dir.to_str().unwrap(), DTypeChoice::Auto, None) {
        Ok(_) => panic!("loading {} succeeded", dir.display()),
        Err(err) => err.to_string(),
    }
}

#[test]
fn a_complete_tiny_model_loads_and_generates() {
    let dir = tiny_model_dir();
    let mut model = try_load(dir.path().to_str().unwrap(), DTypeChoice::Auto, None).unwrap();
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(3),
        ..GenerationParams::default()
    };
    let mut sequence = Sequence::new(&model, vec![1, 2, 3], params).unwrap();
    while sequence.step(&mut model).unwrap().finished.is_none() {}
    assert_eq!(sequence.generated_ids().len(), 3);
}

#[test]
fn missing_directory_and_files_are_named() {
    let err = load_error(Path::new("/nonexistent/model-dir"));
    assert!(err.contains("missing file /nonexistent/model-dir"), "{err}");

    let dir = tiny_model_dir();
    std::fs::remove_file(dir.path().join("config.json")).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("missing file") && err.contains("config.json"),
        "{err}"
    );

    let dir = tiny_model_dir();
    std::fs::remove_file(dir.path().join("tokenizer.json")).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("missing file") && err.contains("tokenizer.json"),
        "{err}"
    );

    let dir = tiny_model_dir();
    std::fs::remove_file(dir.path().join("model.safetensors")).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn bad_json_names_the_file() {
    let dir = tiny_model_dir();
    std::fs::write(dir.path().join("config.json"), "{ not json").unwrap();
    let err = load_error(dir.path());
    assert!(
        err.starts_with("invalid JSON in") && err.contains("config.json"),
        "{err}"
    );

    let dir = tiny_model_dir();
    let mut config = tiny_config();
    config.as_object_mut().unwrap().remove("hidden_size");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("hidden_size"), "{err}");
}

#[test]
fn unknown_architecture_names_file_and_value() {
    let dir = tiny_model_dir();
    let mut config = tiny_config();
    config["model_type"] = json!("mamba");
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(err.contains("unsupported architecture \"mamba\""), "{err}");
    assert!(
        err.contains("config.json") && err.contains("llama, mistral"),
        "{err}"
    );
}

#[test]
fn weight_shape_mismatch_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    write_model(dir.path(), &tiny_config(), &tiny_weights(VOCAB + 3));
    let err = load_error(dir.path());
    assert!(err.contains("do not match the model config"), "{err}");
    assert!(err.contains("embed_tokens"), "{err}");
}

#[test]
fn a_config_field_we_cannot_honour_is_an_error() {
    let dir = tiny_model_dir();
    let mut config = tiny_config();
    config["model_type"] = json!("mistral");
    config["rope_scaling"] = json!({"type": "linear", "factor": 2.0});
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let err = load_error(dir.path());
    assert!(
        err.contains("unsupported configuration") && err.contains("rope_scaling"),
        "{err}"
    );
    assert!(err.contains("\"linear\""), "{err}");
}

#[test]
fn prompt_longer_than_the_context_is_rejected() {
    let model = try_load("builtin:demo", DTypeChoice::Auto, Some(8)).unwrap();
    let err = Sequence::new(&model, vec![5; 8], GenerationParams::default()).unwrap_err();
    assert!(matches!(
        err,
        GenerationError::ContextLengthExceeded {
            prompt_tokens: 8,
            context_length: 8
        }
    ));
    assert_eq!(
        err.to_string(),
        "the prompt has 8 tokens but the model's context is 8 tokens"
    );
    let err = Sequence::new(&model, vec![], GenerationParams::default()).unwrap_err();
    assert_eq!(err.to_string(), "the prompt is empty");
    let err = Sequence::new(&model, vec![1, 99_999], GenerationParams::default()).unwrap_err();
    assert!(
        err.to_string()
            .contains("token id 99999 is outside the vocabulary"),
        "{err}"
    );
}

#[test]
fn gguf_errors_are_clear() {
    let err = try_load("/nonexistent/x.gguf", DTypeChoice::Auto, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("missing file /nonexistent/x.gguf"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.gguf");
    std::fs::write(&path, b"this is not a gguf file at all").unwrap();
    let err = try_load(path.to_str().unwrap(), DTypeChoice::Auto, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.starts_with("invalid GGUF file"), "{err}");
    let err = try_load(path.to_str().unwrap(), DTypeChoice::Bf16, None)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("dtype bf16 is not supported"), "{err}");
}

#[test]
fn bad_sources_are_rejected_before_loading() {
    let err = try_load("builtin:llama", DTypeChoice::Auto, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("the only built-in model is builtin:demo"),
        "{err}"
    );
}

#[test]
fn hub_source_missing_from_an_offline_cache_is_a_clear_error() {
    let cache = tempfile::tempdir().unwrap();
    let err = llorch::models::resolve_hub(
        "org/absent",
        "main",
        &hf_hub::Cache::new(cache.path().to_path_buf()),
        true,
        &llorch::models::LoadProgress::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("org/absent@main") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
}
