//! How much memory a model's weights take once loaded, estimated before loading from the
//! weight files (their size, scaled from the stored dtype to the compute dtype, or kept at the
//! stored width where llorch's CPU decoder keeps f16 and bf16 matrices as stored). The
//! supervisor uses it to keep each device within its memory budget.

use std::path::Path;

use super::arch::Architecture;
use super::demo;
use super::device::{DTypeChoice, DeviceSpec};
use super::hf_dir::weight_files;
use super::source::{default_hub_cache, resolve_hub, ModelSource};

/// Bytes per element of a HuggingFace `torch_dtype` name.
fn stored_element_bytes(dir: &Path) -> u64 {
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(&config).unwrap_or_default();
    let name = value
        .get("torch_dtype")
        .or_else(|| value.get("dtype"))
        .and_then(|v| v.as_str())
        .unwrap_or("float32");
    match name {
        "float16" | "bfloat16" => 2,
        _ => 4,
    }
}

/// Bytes per element of the compute dtype on a device.
fn compute_element_bytes(dtype: DTypeChoice, device: DeviceSpec) -> u64 {
    match (dtype, device) {
        (DTypeChoice::F16 | DTypeChoice::Bf16, _) => 2,
        (DTypeChoice::Auto, DeviceSpec::Cuda(_)) => 2,
        _ => 4,
    }
}

/// Whether llorch's own CPU decoder loads the directory: a Llama-family model on the CPU in
/// f32 (`auto`) or f16, which keeps matrices stored in f16 or bf16 as they are.
fn own_cpu_decoder(dir: &Path, dtype: DTypeChoice, device: DeviceSpec) -> bool {
    let path = dir.join("config.json");
    let config = std::fs::read_to_string(&path).unwrap_or_default();
    let config: serde_json::Value = serde_json::from_str(&config).unwrap_or_default();
    let family = matches!(
        Architecture::detect(&config, &path),
        Ok(Architecture::Llama
            | Architecture::Mistral
            | Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Granite)
    );
    family
        && device == DeviceSpec::Cpu
        && matches!(
            dtype,
            DTypeChoice::Auto | DTypeChoice::F32 | DTypeChoice::F16
        )
}

/// The bytes a loaded model's weights take, from its weight files and its compute dtype.
pub fn loaded_bytes(source: &ModelSource, dtype: candle_core::DType) -> u64 {
    let choice = match dtype {
        candle_core::DType::F16 => DTypeChoice::F16,
        candle_core::DType::BF16 => DTypeChoice::Bf16,
        _ => DTypeChoice::F32,
    };
    estimate_weight_bytes(source, choice, DeviceSpec::Cpu)
}

/// Estimates the bytes a model's weights will take on `device`; 0 when the files cannot be
/// found (the load itself will then report the error).
pub fn estimate_weight_bytes(source: &ModelSource, dtype: DTypeChoice, device: DeviceSpec) -> u64 {
    let dir_bytes = |dir: &Path| -> u64 {
        let files = weight_files(dir).unwrap_or_default();
        let stored: u64 = files
            .iter()
            .filter_map(|file| std::fs::metadata(file).ok())
            .map(|meta| meta.len())
            .sum();
        let (element, compute) = (
            stored_element_bytes(dir),
            compute_element_bytes(dtype, device),
        );
        let loaded = match own_cpu_decoder(dir, dtype, device) {
            true => compute.min(element),
            false => compute,
        };
        stored * loaded / element
    };
    match source {
        ModelSource::Dir(dir) => dir_bytes(dir),
        ModelSource::Gguf(file) => std::fs::metadata(file).map(|m| m.len()).unwrap_or(0),
        ModelSource::Hub { repo, revision } => resolve_hub(
            repo,
            revision,
            &default_hub_cache(),
            true,
            &Default::default(),
        )
        .map(|dir| dir_bytes(&dir))
        .unwrap_or(0),
        ModelSource::BuiltinDemo => demo::DEMO_PARAMETERS * compute_element_bytes(dtype, device),
        #[cfg(feature = "fault-injection")]
        ModelSource::BuiltinFake { .. } => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gguf_and_demo_estimates() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.gguf");
        std::fs::write(&file, vec![0u8; 4096]).unwrap();
        let source = ModelSource::Gguf(file);
        assert_eq!(
            estimate_weight_bytes(&source, DTypeChoice::Auto, DeviceSpec::Cpu),
            4096
        );
        let demo = estimate_weight_bytes(
            &ModelSource::BuiltinDemo,
            DTypeChoice::Auto,
            DeviceSpec::Cpu,
        );
        let half =
            estimate_weight_bytes(&ModelSource::BuiltinDemo, DTypeChoice::F16, DeviceSpec::Cpu);
        assert_eq!(demo, 2 * half);
    }

    #[test]
    fn a_directory_scales_from_the_stored_to_the_compute_dtype() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"torch_dtype": "bfloat16"}"#,
        )
        .unwrap();
        std::fs::write(dir.path().join("model.safetensors"), vec![0u8; 1000]).unwrap();
        let source = ModelSource::Dir(dir.path().to_path_buf());
        assert_eq!(
            estimate_weight_bytes(&source, DTypeChoice::Auto, DeviceSpec::Cpu),
            2000
        );
        assert_eq!(
            estimate_weight_bytes(&source, DTypeChoice::Bf16, DeviceSpec::Cpu),
            1000
        );
    }

    #[test]
    fn the_cpu_decoder_keeps_half_precision_checkpoints_at_their_width() {
        let dir = tempfile::tempdir().unwrap();
        let config = r#"{"model_type": "llama", "torch_dtype": "bfloat16"}"#;
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        std::fs::write(dir.path().join("model.safetensors"), vec![0u8; 1000]).unwrap();
        let source = ModelSource::Dir(dir.path().to_path_buf());
        assert_eq!(
            estimate_weight_bytes(&source, DTypeChoice::Auto, DeviceSpec::Cpu),
            1000
        );
        // Another architecture runs through candle, which widens it to f32.
        let phi = r#"{"model_type": "phi", "torch_dtype": "bfloat16"}"#;
        std::fs::write(dir.path().join("config.json"), phi).unwrap();
        assert_eq!(
            estimate_weight_bytes(&source, DTypeChoice::Auto, DeviceSpec::Cpu),
            2000
        );
    }
}
