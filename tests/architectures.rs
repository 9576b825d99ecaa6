//! Where llorch departs from candle-transformers to match transformers: Mistral's sliding
//! window and Granite's multipliers. Each is checked through an identity that transformers'
//! definition implies, on fixture weights copied into a temp dir.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use common::{fixtures, load_cpu, top_k};
use llorch::models::{argmax, LoadedModel};
use serde_json::Value;

/// Copies a fixture model directory, edits its config and optionally its weights.
fn variant(
    fixture: &Path,
    edit_config: impl FnOnce(&mut Value),
    edit_weights: impl FnOnce(&mut HashMap<String, Tensor>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        std::fs::copy(fixture.join(name), dir.path().join(name)).unwrap();
    }
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture.join("config.json")).unwrap())
            .unwrap();
    edit_config(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let mut weights =
        candle_core::safetensors::load(fixture.join("model.safetensors"), &Device::Cpu).unwrap();
    edit_weights(&mut weights);
    candle_core::safetensors::save(&weights, dir.path().join("model.safetensors")).unwrap();
    dir
}

fn logits_at_end(model: &mut LoadedModel, ids: &[u32]) -> Vec<f32> {
    let logits = model.forward(ids, 0).unwrap();
    model.clear_kv_cache().unwrap();
    logits
}

fn assert_close(a: &[f32], b: &[f32], tolerance: f32, label: &str) {
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= tolerance, "{label}: max |diff| {worst}");
}

/// With one layer, a query under a window of W keys sees exactly the last W tokens, and RoPE
/// depends only on relative positions, so the windowed model's logits after N tokens equal the
/// unwindowed model's logits on the last W tokens alone. candle's own Mistral shows W+1 tokens
/// in prefill and all of them in decode, and fails this.
#[test]
fn mistral_sliding_window_matches_its_definition_in_prefill_and_decode() {
    let Some(fixtures) = fixtures() else { return };
    const WINDOW: usize = 5;
    let source = fixtures.join("models/mistral");
    let one_layer = |window: Option<usize>| {
        variant(
            &source,
            |config| {
                config["num_hidden_layers"] = 1.into();
                config["sliding_window"] = window.map_or(Value::Null, Value::from);
            },
            |_| {},
        )
    };
    let windowed_dir = one_layer(Some(WINDOW));
    let full_dir = one_layer(None);
    let mut windowed = load_cpu(windowed_dir.path().to_str().unwrap());
    let mut full = load_cpu(full_dir.path().to_str().unwrap());
    let mut ids = windowed
        .tokenizer
        .encode("Once upon a time, there was a little robot who", true)
        .unwrap();
    assert!(ids.len() > 2 * WINDOW);

    // Prefill of the whole prompt.
    let ours = logits_at_end(&mut windowed, &ids);
    let reference = logits_at_end(&mut full, &ids[ids.len() - WINDOW..]);
    assert_close(&ours, &reference, 1e-4, "prefill");
    let unwindowed = logits_at_end(&mut full, &ids);
    assert!(top_k(&unwindowed, 1) != top_k(&ours, 1) || (unwindowed[0] - ours[0]).abs() > 1e-3);

    // Decode token by token through the KV cache.
    let mut logits = windowed.forward(&ids, 0).unwrap();
    for _ in 0..12 {
        let next = argmax(&logits);
        ids.push(next);
        logits = windowed.forward(&[next], ids.len() - 1).unwrap();
        let reference = logits_at_end(&mut full, &ids[ids.len() - WINDOW..]);
        assert_close(&logits, &reference, 1e-4, "decode");
    }
}

/// transformers' Granite multiplies embeddings by `embedding_multiplier`, each sub-layer's
/// output by `residual_multiplier`, scores by `attention_multiplier`, and divides logits by
/// `logits_scaling`. Moving those factors into the weights of a neutral model (which matches
/// the transformers golden) must give the same logits.
#[test]
fn granite_multipliers_are_applied_where_transformers_applies_them() {
    let Some(fixtures) = fixtures() else { return };
    let source = fixtures.join("models/granite");
    let (embedding, residual, attention, logits_scaling) = (3.0, 0.5, 0.1, 4.0);
    let head_dim: f64 = 16.0;
    let with_multipliers = variant(
        &source,
        |config| {
            config["embedding_multiplier"] = embedding.into();
            config["residual_multiplier"] = residual.into();
            config["attention_multiplier"] = attention.into();
            config["logits_scaling"] = logits_scaling.into();
        },
        |_| {},
    );
    let folded = variant(
        &source,
        |_| {},
        |weights| {
            let scale = |weights: &mut HashMap<String, Tensor>, name: &str, factor: f64| {
                let tensor = (weights[name].clone() * factor).unwrap();
                weights.insert(name.to_string(), tensor);
            };
            scale(weights, "model.embed_tokens.weight", embedding);
            scale(weights, "lm_head.weight", 1.0 / logits_scaling);
            for layer in 0..2 {
                let p = format!("model.layers.{layer}");
                scale(
                    weights,
                    &format!("{p}.self_attn.q_proj.weight"),
                    attention * head_dim.sqrt(),
                );
                scale(weights, &format!("{p}.self_attn.o_proj.weight"), residual);
                scale(weights, &format!("{p}.mlp.down_proj.weight"), residual);
            }
        },
    );
    let mut ours = load_cpu(with_multipliers.path().to_str().unwrap());
    let mut reference = load_cpu(folded.path().to_str().unwrap());
    let ids = ours
        .tokenizer
        .encode("The license grants you the right to copy", true)
        .unwrap();
    let a = logits_at_end(&mut ours, &ids);
    let b = logits_at_end(&mut reference, &ids);
    assert_close(&a, &b, 1e-3, "granite multipliers");
    let neutral = load_cpu(source.to_str().unwrap()).forward(&ids, 0).unwrap();
    assert!(
        a.iter().zip(&neutral).any(|(x, y)| (x - y).abs() > 0.1),
        "multipliers changed nothing"
    );
}
