//! Architecture detection from a HuggingFace `config.json`.

use std::path::Path;

use super::error::LoadError;

/// The safetensors architectures llorch serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama and Llama-2/3 style decoders.
    Llama,
    /// Mistral (with a correct sliding window).
    Mistral,
    /// Phi-1/1.5/2 style (parallel attention and MLP, LayerNorm, partial rotary).
    Phi,
    /// Phi-3 (fused qkv and gate/up projections).
    Phi3,
    /// Qwen2 / Qwen2.5.
    Qwen2,
    /// Qwen3 (q/k norms).
    Qwen3,
    /// Gemma (first generation).
    Gemma,
    /// Gemma 2 (soft-capping, sandwich norms).
    Gemma2,
    /// IBM Granite (multipliers honoured).
    Granite,
    /// OLMo (non-parametric LayerNorm).
    Olmo,
    /// OLMo 2 (post-norms, q/k norms).
    Olmo2,
    /// StableLM (LayerNorm, partial rotary).
    StableLm,
    /// StarCoder2.
    Starcoder2,
}

/// Every supported architecture with the `model_type` value that names it.
const MODEL_TYPES: &[(&str, Architecture)] = &[
    ("llama", Architecture::Llama),
    ("mistral", Architecture::Mistral),
    ("phi", Architecture::Phi),
    ("phi3", Architecture::Phi3),
    ("qwen2", Architecture::Qwen2),
    ("qwen3", Architecture::Qwen3),
    ("gemma", Architecture::Gemma),
    ("gemma2", Architecture::Gemma2),
    ("granite", Architecture::Granite),
    ("olmo", Architecture::Olmo),
    ("olmo2", Architecture::Olmo2),
    ("stablelm", Architecture::StableLm),
    ("starcoder2", Architecture::Starcoder2),
];

/// `architectures[]` class names (lowercased) and the architecture each names.
const CLASS_NAMES: &[(&str, Architecture)] = &[
    ("llamaforcausallm", Architecture::Llama),
    ("mistralforcausallm", Architecture::Mistral),
    ("phiforcausallm", Architecture::Phi),
    ("phi3forcausallm", Architecture::Phi3),
    ("qwen2forcausallm", Architecture::Qwen2),
    ("qwen3forcausallm", Architecture::Qwen3),
    ("gemmaforcausallm", Architecture::Gemma),
    ("gemma2forcausallm", Architecture::Gemma2),
    ("graniteforcausallm", Architecture::Granite),
    ("olmoforcausallm", Architecture::Olmo),
    ("olmo2forcausallm", Architecture::Olmo2),
    ("stablelmforcausallm", Architecture::StableLm),
    ("starcoder2forcausallm", Architecture::Starcoder2),
];

impl Architecture {
    /// Returns the `model_type` string of this architecture.
    pub fn model_type(self) -> &'static str {
        MODEL_TYPES
            .iter()
            .find(|(_, arch)| *arch == self)
            .map(|(name, _)| *name)
            .unwrap_or("unknown")
    }

    /// Returns the comma-separated list of supported `model_type` values.
    pub fn supported_list() -> String {
        MODEL_TYPES
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Detects the architecture from a parsed `config.json`: `model_type` first, then
    /// `architectures[]`, both compared case-insensitively.
    pub fn detect(config: &serde_json::Value, path: &Path) -> Result<Self, LoadError> {
        let unsupported = |value: String| LoadError::UnsupportedArchitecture {
            path: path.to_path_buf(),
            value,
            supported: Self::supported_list(),
        };
        if let Some(model_type) = config.get("model_type").and_then(|v| v.as_str()) {
            let wanted = model_type.to_ascii_lowercase();
            return MODEL_TYPES
                .iter()
                .find(|(name, _)| *name == wanted)
                .map(|(_, arch)| *arch)
                .ok_or_else(|| unsupported(model_type.to_string()));
        }
        let classes: Vec<&str> = config
            .get("architectures")
            .and_then(|v| v.as_array())
            .map(|list| list.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        for class in &classes {
            let wanted = class.to_ascii_lowercase();
            if let Some((_, arch)) = CLASS_NAMES.iter().find(|(name, _)| *name == wanted) {
                return Ok(*arch);
            }
        }
        match classes.first() {
            Some(class) => Err(unsupported((*class).to_string())),
            None => Err(LoadError::BadJson {
                path: path.to_path_buf(),
                message: "neither `model_type` nor `architectures` is present".to_string(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn detect(value: serde_json::Value) -> Result<Architecture, LoadError> {
        Architecture::detect(&value, Path::new("/m/config.json"))
    }

    #[test]
    fn model_type_wins_and_is_case_insensitive() {
        let arch = detect(json!({"model_type": "Qwen2", "architectures": ["LlamaForCausalLM"]}));
        assert_eq!(arch.unwrap(), Architecture::Qwen2);
    }

    #[test]
    fn architectures_list_is_the_fallback() {
        let arch = detect(json!({"architectures": ["Gemma2ForCausalLM"]}));
        assert_eq!(arch.unwrap(), Architecture::Gemma2);
    }

    #[test]
    fn unsupported_value_names_file_and_value() {
        let err = detect(json!({"model_type": "mamba"}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"mamba\""), "{err}");
        assert!(err.contains("/m/config.json"), "{err}");
        let err = detect(json!({"architectures": ["BertModel"]}))
            .unwrap_err()
            .to_string();
        assert!(err.contains("BertModel"), "{err}");
    }

    #[test]
    fn missing_both_fields_is_an_error() {
        let err = detect(json!({"hidden_size": 4})).unwrap_err().to_string();
        assert!(err.contains("model_type"), "{err}");
    }
}
