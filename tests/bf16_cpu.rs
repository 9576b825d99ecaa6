//! bf16 checkpoints on the CPU path run as stored: their matrices stay bf16 (in panels, each
//! weight widened to f32 as it is multiplied) instead of being converted to f32 at load. The
//! logits equal those of the same checkpoint widened to f32 beforehand, within the rounding
//! of another summation order, and the greedy tokens are the same.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, golden, greedy, load_cpu};

/// Writes the fixture `name`'s weights in `dtype` (after rounding them to bf16) with its
/// config and tokenizer files into `dir`.
fn write_rounded(fixture: &Path, dir: &Path, dtype: DType) {
    let tensors = candle_core::safetensors::load(fixture.join("model.safetensors"), &Device::Cpu)
        .expect("reading the fixture's weights");
    let rounded: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            let bf16 = t.to_dtype(DType::BF16).expect("to bf16");
            (name, bf16.to_dtype(dtype).expect("to the stored dtype"))
        })
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    candle_core::safetensors::save(&rounded, dir.join("model.safetensors")).unwrap();
    for entry in std::fs::read_dir(fixture).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if name.ends_with(".json") && name != "golden.json" {
            std::fs::copy(&path, dir.join(&name)).unwrap();
        }
    }
}

#[test]
fn bf16_checkpoints_give_the_logits_and_tokens_of_their_f32_widening() {
    let Some(fixtures) = fixtures() else { return };
    let temp = tempfile::tempdir().unwrap();
    for name in ["llama", "qwen2"] {
        let fixture = fixtures.join("models").join(name);
        let (bf16_dir, f32_dir) = (temp.path().join(format!("{name}-bf16")), {
            temp.path().join(format!("{name}-f32"))
        });
        write_rounded(&fixture, &bf16_dir, DType::BF16);
        write_rounded(&fixture, &f32_dir, DType::F32);
        let mut native = load_cpu(bf16_dir.to_str().unwrap());
        let mut widened = load_cpu(f32_dir.to_str().unwrap());
        let cases = golden(&fixtures, &format!("models/{name}/golden.json")).cases;
        for case in &cases {
            let ids = &case.prompt_ids;
            let (a, b) = (
                native.forward(ids, 0).unwrap(),
                widened.forward(ids, 0).unwrap(),
            );
            native.clear_kv_cache().unwrap();
            widened.clear_kv_cache().unwrap();
            let worst = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (x - y).abs())
                .fold(0f32, f32::max);
            assert!(
                worst <= 1e-4,
                "{name} {}: logits differ by {worst}",
                case.name
            );
            let (got, _) = greedy(&mut native, ids.clone(), 12);
            let (want, _) = greedy(&mut widened, ids.clone(), 12);
            assert_eq!(got, want, "{name} {}: greedy tokens", case.name);
        }
    }
}
