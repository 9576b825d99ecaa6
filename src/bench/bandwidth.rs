//! The decode speed memory bandwidth allows: weight bytes read per token, and the machine's
//! measured read bandwidth.

use std::path::Path;
use std::time::Instant;

use candle_core::quantized::gguf_file::Content;
use candle_core::DType;

/// Bytes of weights one decode step reads: every matrix once, but of the token embedding only
/// one row unless it doubles as the output projection. `dtype` is the dtype the weights of a
/// HuggingFace directory are loaded in; a tensor stored narrower keeps its stored width (as
/// llorch's CPU decoder keeps f16 and bf16 matrices); GGUF tensors keep their stored types. `None` for a
/// source that is not a local file or directory (`builtin:demo`, `hf:`).
pub fn weight_bytes_per_token(source: &str, dtype: DType) -> anyhow::Result<Option<u64>> {
    let path = Path::new(source);
    if !path.exists() {
        return Ok(None);
    }
    let tensors = if path.extension().is_some_and(|e| e == "gguf") {
        gguf_tensors(path)?
    } else {
        safetensors_tensors(path, dtype)?
    };
    let total: u64 = tensors.iter().map(|(_, bytes)| bytes).sum();
    let has_output = tensors
        .iter()
        .any(|(name, _)| name == "output.weight" || name == "lm_head.weight");
    let embedding: u64 = tensors
        .iter()
        .filter(|(name, _)| name == "token_embd.weight" || name == "model.embed_tokens.weight")
        .map(|(_, bytes)| bytes)
        .sum();
    Ok(Some(if has_output { total - embedding } else { total }))
}

fn gguf_tensors(path: &Path) -> anyhow::Result<Vec<(String, u64)>> {
    let mut file = std::fs::File::open(path)?;
    let content = Content::read(&mut file)?;
    Ok(content
        .tensor_infos
        .iter()
        .map(|(name, info)| {
            let dtype = info.ggml_dtype;
            let elements = info.shape.elem_count() as u64;
            let bytes = elements / dtype.block_size() as u64 * dtype.type_size() as u64;
            (name.clone(), bytes)
        })
        .collect())
}

fn safetensors_tensors(dir: &Path, dtype: DType) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        let mut file = std::fs::File::open(&path)?;
        let mut length = [0u8; 8];
        std::io::Read::read_exact(&mut file, &mut length)?;
        let mut header = vec![0u8; u64::from_le_bytes(length) as usize];
        std::io::Read::read_exact(&mut file, &mut header)?;
        let header: serde_json::Value = serde_json::from_slice(&header)?;
        for (name, info) in header.as_object().into_iter().flatten() {
            let Some(shape) = info.get("shape").and_then(|s| s.as_array()) else {
                continue;
            };
            let elements: u64 = shape.iter().filter_map(|d| d.as_u64()).product();
            let stored = match info.get("dtype").and_then(|d| d.as_str()) {
                Some("F16" | "BF16") => 2,
                _ => 4,
            };
            let width = stored.min(dtype.size_in_bytes() as u64);
            out.push((name.clone(), elements * width));
        }
    }
    Ok(out)
}

/// Read bandwidth in bytes per second with `threads` threads summing a 512 MiB buffer, best of
/// five passes (each thread reads its own contiguous part).
pub fn read_bandwidth(threads: usize) -> f64 {
    const BYTES: usize = 512 << 20;
    let words: Vec<u64> = (0..BYTES / 8).map(|i| i as u64).collect();
    let threads = threads.max(1);
    let part = words.len().div_ceil(threads);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let sum: u64 = std::thread::scope(|scope| {
            let handles: Vec<_> = words
                .chunks(part)
                .map(|chunk| scope.spawn(move || sum_words(chunk)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        std::hint::black_box(sum);
        best = best.min(start.elapsed().as_secs_f64());
    }
    BYTES as f64 / best
}

/// Sums with eight independent accumulators so the loop is bound by loads, not by one add chain.
fn sum_words(words: &[u64]) -> u64 {
    let mut acc = [0u64; 8];
    let mut chunks = words.chunks_exact(8);
    for chunk in &mut chunks {
        for (a, w) in acc.iter_mut().zip(chunk) {
            *a = a.wrapping_add(*w);
        }
    }
    let tail: u64 = chunks.remainder().iter().fold(0, |a, w| a.wrapping_add(*w));
    acc.iter().fold(tail, |a, w| a.wrapping_add(*w))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn sums_every_word_including_the_tail() {
        let words: Vec<u64> = (1..=19).collect();
        assert_eq!(sum_words(&words), 190);
    }

    #[test]
    fn stored_half_tensors_count_their_stored_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let device = Device::Cpu;
        let tensors = std::collections::HashMap::from([
            (
                "a".to_string(),
                Tensor::zeros((2, 3), DType::BF16, &device).unwrap(),
            ),
            (
                "b".to_string(),
                Tensor::zeros(4, DType::F32, &device).unwrap(),
            ),
        ]);
        candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
        let source = dir.path().to_str().unwrap();
        // Loaded in f32: the bf16 matrix stays 2 bytes a value, the f32 vector 4.
        assert_eq!(
            weight_bytes_per_token(source, DType::F32).unwrap(),
            Some(6 * 2 + 4 * 4)
        );
        // Loaded in f16: everything 2 bytes a value.
        assert_eq!(
            weight_bytes_per_token(source, DType::F16).unwrap(),
            Some(6 * 2 + 4 * 2)
        );
    }
}
