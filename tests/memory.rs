//! E3: evicting a model gives its memory back. A ~250 MB random Llama is loaded and evicted 20
//! times through the admin API; after each evict the process RSS returns within 64 MiB of the
//! baseline (taken after one warm-up cycle) within 10 s, and does not grow across cycles.
//! F7: 20 loads that fail half way (most weights are read, then one is missing) leak nothing
//! either. One test, so that no other test shares the process's RSS.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use common::daemon::Daemon;
use serde_json::json;

const MIB: u64 = 1024 * 1024;
const HIDDEN: usize = 768;
const INTERMEDIATE: usize = 2048;
const VOCAB: usize = 32_000;
const LAYERS: usize = 2;

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

/// Writes a random Llama of about 250 MB (f32) with a tiny tokenizer.
fn write_big_model(dir: &std::path::Path) {
    let config = json!({
        "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": 12, "num_key_value_heads": 4,
        "vocab_size": VOCAB, "rms_norm_eps": 1e-5, "max_position_embeddings": 256,
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
    let random =
        |rows: usize, cols: usize| Tensor::randn(0f32, 0.02, (rows, cols), &Device::Cpu).unwrap();
    let ones = || Tensor::ones(HIDDEN, DType::F32, &Device::Cpu).unwrap();
    let kv = HIDDEN / 12 * 4;
    let mut weights: HashMap<String, Tensor> = HashMap::new();
    weights.insert("model.embed_tokens.weight".into(), random(VOCAB, HIDDEN));
    weights.insert("lm_head.weight".into(), random(VOCAB, HIDDEN));
    weights.insert("model.norm.weight".into(), ones());
    for layer in 0..LAYERS {
        let p = format!("model.layers.{layer}");
        for (name, rows, cols) in [
            ("self_attn.q_proj", HIDDEN, HIDDEN),
            ("self_attn.k_proj", kv, HIDDEN),
            ("self_attn.v_proj", kv, HIDDEN),
            ("self_attn.o_proj", HIDDEN, HIDDEN),
            ("mlp.gate_proj", INTERMEDIATE, HIDDEN),
            ("mlp.up_proj", INTERMEDIATE, HIDDEN),
            ("mlp.down_proj", HIDDEN, INTERMEDIATE),
        ] {
            weights.insert(format!("{p}.{name}.weight"), random(rows, cols));
        }
        weights.insert(format!("{p}.input_layernorm.weight"), ones());
        weights.insert(format!("{p}.post_attention_layernorm.weight"), ones());
    }
    candle_core::safetensors::save(&weights, dir.join("model.safetensors")).unwrap();
}

async fn cycle(daemon: &Daemon, source: &str) -> (u64, u64) {
    let entry = json!({"name": "big", "source": source});
    let response = daemon
        .client
        .post(daemon.at("/admin/models"))
        .json(&entry)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let (status, body) = daemon
        .post(
            "/v1/completions",
            &json!({"model": "big", "prompt": "hello", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let loaded = rss_bytes();
    let response = daemon
        .client
        .post(daemon.at("/admin/models/big/evict"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    (loaded, rss_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicting_gives_the_memory_back_over_twenty_cycles() {
    // Admin loads read only under server.models_root.
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("big");
    std::fs::create_dir(&model).unwrap();
    write_big_model(&model);
    let source = "big".to_string();
    let daemon = Daemon::start(&format!(
        "version = 1\n[server]\nmodels_root = {:?}\n",
        dir.path()
    ))
    .await;
    cycle(&daemon, &source).await;
    let baseline = rss_bytes();
    let mut after_evicts = Vec::new();
    for round in 0..20 {
        let (loaded, _) = cycle(&daemon, &source).await;
        assert!(
            loaded > baseline + 150 * MIB,
            "round {round}: the model did not allocate ({} MiB over baseline)",
            loaded.saturating_sub(baseline) / MIB
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let settled = loop {
            let now = rss_bytes();
            if now <= baseline + 64 * MIB || Instant::now() >= deadline {
                break now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(
            settled <= baseline + 64 * MIB,
            "round {round}: RSS {} MiB after evict, baseline {} MiB",
            settled / MIB,
            baseline / MIB
        );
        after_evicts.push(settled);
    }
    let first = after_evicts[0];
    let last = *after_evicts.last().unwrap();
    assert!(
        last <= first + 64 * MIB,
        "RSS grew from {} to {} MiB over 20 cycles",
        first / MIB,
        last / MIB
    );
    eprintln!(
        "baseline {} MiB; after evicts: first {} MiB, last {} MiB",
        baseline / MIB,
        first / MIB,
        last / MIB
    );

    // F7: the config claims one more layer than the weights have, so the embeddings, the head
    // and two layers are read before the load fails.
    let config_path = model.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["num_hidden_layers"] = json!(LAYERS + 1);
    std::fs::write(&config_path, config.to_string()).unwrap();
    // candle's Llama loader panics on a missing tensor, and with RUST_BACKTRACE set the panic
    // message symbolises the binary once (the symbol tables stay mapped for the process's
    // life), so the failure baseline is taken after one warm-up failure, as for E3.
    let fail_once = || async {
        let entry = json!({"name": "broken", "source": source});
        let response = daemon
            .client
            .post(daemon.at("/admin/models"))
            .json(&entry)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        let body: serde_json::Value = response.json().await.unwrap();
        let message = body["error"]["message"].as_str().unwrap();
        assert!(
            message.contains("cannot find tensor model.layers.2"),
            "{message}"
        );
        assert!(
            !message.contains('\n'),
            "the error carries a backtrace: {message}"
        );
        let response = daemon
            .client
            .post(daemon.at("/admin/models/broken/evict"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    };
    fail_once().await;
    let failure_baseline = rss_bytes();
    for _ in 0..20 {
        fail_once().await;
    }
    let after_failures = rss_bytes();
    assert!(
        after_failures <= failure_baseline + 64 * MIB,
        "RSS {} MiB after 20 failed loads, {} MiB after the first",
        after_failures / MIB,
        failure_baseline / MIB
    );
    eprintln!(
        "failed loads: {} MiB after the first, {} MiB after 20 more",
        failure_baseline / MIB,
        after_failures / MIB
    );
}
