//! `llorch quantize`: a HuggingFace Llama directory to one GGUF file in f32, f16, Q8_0, Q4_0 or
//! Q4_K_M, with candle's quantizers and GGUF writer. Tensor names, shapes and the rotary
//! permutation of the query and key projections follow llama.cpp's converter, so llama.cpp reads
//! the file as well as llorch does.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};
use serde_json::Value as Json;

use super::error::{candle_message, LoadError};
use super::gguf_vocab::vocab_metadata;
use super::hf_dir::{read_json, weight_files};

/// The formats `llorch quantize` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    /// Every tensor in f32.
    F32,
    /// Matrices in f16, norms in f32.
    F16,
    /// Matrices in Q8_0.
    Q8_0,
    /// Matrices in Q4_0, the output projection in Q6_K.
    Q4_0,
    /// Q4_K with Q6_K for the output and for the value and down projections of some layers.
    Q4KM,
}

impl QuantType {
    /// Every format, in the order the help text lists them.
    pub const ALL: [QuantType; 5] = [
        QuantType::F32,
        QuantType::F16,
        QuantType::Q8_0,
        QuantType::Q4_0,
        QuantType::Q4KM,
    ];

    /// The lower-case name used on the command line and in file names.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::F32 => "f32",
            QuantType::F16 => "f16",
            QuantType::Q8_0 => "q8_0",
            QuantType::Q4_0 => "q4_0",
            QuantType::Q4KM => "q4_k_m",
        }
    }

    /// `general.file_type`, as llama.cpp numbers it.
    fn file_type(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q8_0 => 7,
            QuantType::Q4KM => 15,
        }
    }
}

impl fmt::Display for QuantType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for QuantType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        QuantType::ALL
            .into_iter()
            .find(|t| t.name().eq_ignore_ascii_case(s))
            .ok_or_else(|| {
                let names: Vec<&str> = QuantType::ALL.iter().map(|t| t.name()).collect();
                format!("unknown type {s:?} (expected one of {})", names.join(", "))
            })
    }
}

/// What a tensor is, for choosing its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A norm weight (one dimension): always f32.
    Norm,
    /// The token embedding.
    Embedding,
    /// The output projection (`lm_head`).
    Output,
    /// A layer's value projection.
    AttnV,
    /// A layer's down projection.
    FfnDown,
    /// Any other matrix.
    Matrix,
}

/// The GGML type of one tensor: `role` in layer `layer` of `layers`, with rows of `columns`
/// values. A type whose block does not divide the row falls back as llama.cpp's quantizer does:
/// Q4_K to Q5_0, Q6_K to Q8_0, and a 32-value block type to f16.
pub fn tensor_type(
    format: QuantType,
    role: Role,
    layer: Option<usize>,
    layers: usize,
    columns: usize,
) -> GgmlDType {
    if role == Role::Norm || format == QuantType::F32 {
        return GgmlDType::F32;
    }
    let wanted = match format {
        QuantType::F32 => GgmlDType::F32,
        QuantType::F16 => GgmlDType::F16,
        QuantType::Q8_0 => GgmlDType::Q8_0,
        QuantType::Q4_0 if role == Role::Output => GgmlDType::Q6K,
        QuantType::Q4_0 => GgmlDType::Q4_0,
        QuantType::Q4KM => match (role, layer) {
            (Role::Output, _) => GgmlDType::Q6K,
            (Role::AttnV | Role::FfnDown, Some(i)) if more_bits(i, layers) => GgmlDType::Q6K,
            _ => GgmlDType::Q4K,
        },
    };
    let mut chosen = wanted;
    while !columns.is_multiple_of(chosen.block_size()) {
        chosen = match chosen {
            GgmlDType::Q4K => GgmlDType::Q5_0,
            GgmlDType::Q6K => GgmlDType::Q8_0,
            _ => return GgmlDType::F16,
        };
    }
    chosen
}

/// The layers Q4_K_M gives more bits: the first and last eighth, and every third between.
fn more_bits(layer: usize, layers: usize) -> bool {
    layer < layers / 8 || layer >= 7 * layers / 8 || (layer - layers / 8) % 3 == 2
}

/// What `quantize_dir` wrote.
#[derive(Debug, serde::Serialize)]
pub struct QuantizeReport {
    /// The GGUF file.
    pub path: PathBuf,
    /// The format asked for.
    pub format: String,
    /// How many tensors of each GGML type.
    pub tensor_types: BTreeMap<String, usize>,
    /// The file's size in bytes.
    pub bytes: u64,
}

/// The Llama fields the converter needs from `config.json`.
#[derive(serde::Deserialize)]
struct LlamaFields {
    hidden_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    intermediate_size: usize,
    vocab_size: usize,
    max_position_embeddings: usize,
    rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    rope_theta: f64,
    head_dim: Option<usize>,
    #[serde(default)]
    rope_scaling: Option<Json>,
    #[serde(default)]
    tie_word_embeddings: bool,
}

fn default_theta() -> f64 {
    10_000.0
}

/// Converts the Llama in `dir` (config.json, tokenizer.json, safetensors) to `out` in `format`.
pub fn quantize_dir(
    dir: &Path,
    out: &Path,
    format: QuantType,
) -> Result<QuantizeReport, LoadError> {
    let config_path = dir.join("config.json");
    let config = read_json(&config_path, "the model config")?;
    let unsupported = |field: &str, value: String, reason: &str| LoadError::UnsupportedConfig {
        path: config_path.clone(),
        field: field.to_string(),
        value,
        reason: reason.to_string(),
    };
    let model_type = config.get("model_type").and_then(Json::as_str);
    if model_type != Some("llama") {
        return Err(LoadError::UnsupportedArchitecture {
            path: config_path.clone(),
            value: model_type.unwrap_or("none").to_string(),
            supported: "llama".to_string(),
        });
    }
    let fields: LlamaFields =
        serde_json::from_value(config.clone()).map_err(|err| LoadError::BadJson {
            path: config_path.clone(),
            message: err.to_string(),
        })?;
    if let Some(scaling) = fields.rope_scaling.as_ref().filter(|v| !v.is_null()) {
        return Err(unsupported(
            "rope_scaling",
            scaling.to_string(),
            "the converter writes plain rotary embeddings",
        ));
    }
    let head_dim = fields.hidden_size / fields.num_attention_heads;
    if let Some(d) = fields.head_dim.filter(|&d| d != head_dim) {
        return Err(unsupported(
            "head_dim",
            d.to_string(),
            "GGUF Llamas need head_dim = hidden_size / num_attention_heads",
        ));
    }
    let tokenizer = read_json(&dir.join("tokenizer.json"), "the tokenizer")?;
    let tokenizer_config =
        read_json(&dir.join("tokenizer_config.json"), "the tokenizer config").unwrap_or(Json::Null);
    let mut metadata = llama_metadata(dir, &fields, format);
    metadata.extend(
        vocab_metadata(&tokenizer, &tokenizer_config, &config, fields.vocab_size).map_err(
            |message| LoadError::Tokenizer {
                origin: dir.join("tokenizer.json").display().to_string(),
                message,
            },
        )?,
    );
    let files = weight_files(dir)?;
    let weights_error = |err: candle_core::Error| LoadError::Weights {
        path: dir.to_path_buf(),
        message: candle_message(&err),
    };
    // SAFETY: the files are mapped read-only for the length of this conversion.
    #[allow(unsafe_code)]
    let weights = unsafe { MmapedSafetensors::multi(&files) }.map_err(weights_error)?;
    let tensors = convert_tensors(&weights, &fields, format).map_err(weights_error)?;
    write_gguf(out, &metadata, &tensors)?;
    let mut tensor_types = BTreeMap::new();
    for (_, tensor) in &tensors {
        *tensor_types
            .entry(format!("{:?}", tensor.dtype()).to_lowercase())
            .or_insert(0) += 1;
    }
    let bytes = std::fs::metadata(out)
        .map_err(|source| LoadError::Io {
            path: out.to_path_buf(),
            source,
        })?
        .len();
    Ok(QuantizeReport {
        path: out.to_path_buf(),
        format: format.to_string(),
        tensor_types,
        bytes,
    })
}

/// The `general.*` and `llama.*` keys.
fn llama_metadata(
    dir: &Path,
    fields: &LlamaFields,
    format: QuantType,
) -> Vec<(String, gguf_file::Value)> {
    use gguf_file::Value::{String as S, F32, U32};
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".to_string());
    let u32_of = |n: usize| U32(n as u32);
    let head_dim = fields.hidden_size / fields.num_attention_heads;
    vec![
        ("general.architecture".into(), S("llama".into())),
        ("general.name".into(), S(name)),
        ("general.file_type".into(), U32(format.file_type())),
        ("general.quantization_version".into(), U32(2)),
        (
            "llama.context_length".into(),
            u32_of(fields.max_position_embeddings),
        ),
        ("llama.embedding_length".into(), u32_of(fields.hidden_size)),
        ("llama.block_count".into(), u32_of(fields.num_hidden_layers)),
        (
            "llama.feed_forward_length".into(),
            u32_of(fields.intermediate_size),
        ),
        (
            "llama.attention.head_count".into(),
            u32_of(fields.num_attention_heads),
        ),
        (
            "llama.attention.head_count_kv".into(),
            u32_of(kv_heads(fields)),
        ),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            F32(fields.rms_norm_eps as f32),
        ),
        ("llama.rope.freq_base".into(), F32(fields.rope_theta as f32)),
        ("llama.rope.dimension_count".into(), u32_of(head_dim)),
        ("llama.vocab_size".into(), u32_of(fields.vocab_size)),
        ("llama.attention.key_length".into(), u32_of(head_dim)),
        ("llama.attention.value_length".into(), u32_of(head_dim)),
    ]
}

fn kv_heads(fields: &LlamaFields) -> usize {
    fields
        .num_key_value_heads
        .unwrap_or(fields.num_attention_heads)
}

/// Reads, renames, permutes and quantizes every tensor, in llama.cpp's order.
fn convert_tensors(
    weights: &MmapedSafetensors,
    fields: &LlamaFields,
    format: QuantType,
) -> candle_core::Result<Vec<(String, QTensor)>> {
    let layers = fields.num_hidden_layers;
    let load = |name: &str| -> candle_core::Result<Tensor> {
        weights.load(name, &Device::Cpu)?.to_dtype(DType::F32)
    };
    let quantize = |tensor: Tensor, role: Role, layer: Option<usize>| {
        let columns = *tensor.dims().last().unwrap_or(&1);
        QTensor::quantize(&tensor, tensor_type(format, role, layer, layers, columns))
    };
    let mut out = vec![(
        "token_embd.weight".to_string(),
        quantize(load("model.embed_tokens.weight")?, Role::Embedding, None)?,
    )];
    for i in 0..layers {
        let hf = |suffix: &str| format!("model.layers.{i}.{suffix}.weight");
        let at = Some(i);
        let rows = [
            ("attn_norm", load(&hf("input_layernorm"))?, Role::Norm),
            (
                "attn_q",
                unpermute(load(&hf("self_attn.q_proj"))?, fields.num_attention_heads)?,
                Role::Matrix,
            ),
            (
                "attn_k",
                unpermute(load(&hf("self_attn.k_proj"))?, kv_heads(fields))?,
                Role::Matrix,
            ),
            ("attn_v", load(&hf("self_attn.v_proj"))?, Role::AttnV),
            ("attn_output", load(&hf("self_attn.o_proj"))?, Role::Matrix),
            (
                "ffn_norm",
                load(&hf("post_attention_layernorm"))?,
                Role::Norm,
            ),
            ("ffn_gate", load(&hf("mlp.gate_proj"))?, Role::Matrix),
            ("ffn_up", load(&hf("mlp.up_proj"))?, Role::Matrix),
            ("ffn_down", load(&hf("mlp.down_proj"))?, Role::FfnDown),
        ];
        for (name, tensor, role) in rows {
            out.push((
                format!("blk.{i}.{name}.weight"),
                quantize(tensor, role, at)?,
            ));
        }
    }
    out.push((
        "output_norm.weight".to_string(),
        quantize(load("model.norm.weight")?, Role::Norm, None)?,
    ));
    let has_head = weights.get("lm_head.weight").is_ok();
    if has_head && !fields.tie_word_embeddings {
        out.push((
            "output.weight".to_string(),
            quantize(load("lm_head.weight")?, Role::Output, None)?,
        ));
    }
    Ok(out)
}

/// HuggingFace stores each query/key head's rotary halves apart (`[x0..x(d/2), y0..]`); GGUF
/// Llamas interleave them (`[x0, y0, x1, y1, ..]`) for llama.cpp's rotary kernel.
fn unpermute(weight: Tensor, heads: usize) -> candle_core::Result<Tensor> {
    let (rows, columns) = weight.dims2()?;
    weight
        .reshape((heads, 2, rows / heads / 2, columns))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, columns))
}

fn write_gguf(
    out: &Path,
    metadata: &[(String, gguf_file::Value)],
    tensors: &[(String, QTensor)],
) -> Result<(), LoadError> {
    let io = |source: std::io::Error| LoadError::Io {
        path: out.to_path_buf(),
        source,
    };
    let file = std::fs::File::create(out).map_err(io)?;
    let mut writer = std::io::BufWriter::new(file);
    let metadata: Vec<(&str, &gguf_file::Value)> =
        metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensors: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    gguf_file::write(&mut writer, &metadata, &tensors).map_err(|err| LoadError::Weights {
        path: out.to_path_buf(),
        message: candle_message(&err),
    })?;
    std::io::Write::flush(&mut writer).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_both_ways() {
        for t in QuantType::ALL {
            assert_eq!(t.name().parse::<QuantType>(), Ok(t));
        }
        assert_eq!("Q4_K_M".parse::<QuantType>(), Ok(QuantType::Q4KM));
        assert!("q3_k".parse::<QuantType>().unwrap_err().contains("q4_k_m"));
    }

    #[test]
    fn q4_k_m_gives_six_bits_to_the_output_and_some_layers() {
        let t = |role, layer| tensor_type(QuantType::Q4KM, role, layer, 22, 2048);
        assert_eq!(t(Role::Output, None), GgmlDType::Q6K);
        assert_eq!(t(Role::Matrix, Some(0)), GgmlDType::Q4K);
        assert_eq!(t(Role::Norm, Some(0)), GgmlDType::F32);
        // 22 layers: the first 2 and last 3 get more bits, and every third between.
        let six: Vec<usize> = (0..22)
            .filter(|&i| t(Role::AttnV, Some(i)) == GgmlDType::Q6K)
            .collect();
        assert_eq!(six, [0, 1, 4, 7, 10, 13, 16, 19, 20, 21]);
        assert_eq!(t(Role::FfnDown, Some(5)), GgmlDType::Q4K);
    }

    #[test]
    fn rows_the_block_does_not_divide_fall_back() {
        // 576 columns: not a multiple of 256, a multiple of 32.
        let t = |format, role| tensor_type(format, role, Some(0), 30, 576);
        assert_eq!(t(QuantType::Q4KM, Role::Matrix), GgmlDType::Q5_0);
        assert_eq!(t(QuantType::Q4KM, Role::AttnV), GgmlDType::Q8_0);
        assert_eq!(t(QuantType::Q4_0, Role::Output), GgmlDType::Q8_0);
        // 172 columns: not even a multiple of 32.
        let narrow = tensor_type(QuantType::Q8_0, Role::FfnDown, Some(0), 5, 172);
        assert_eq!(narrow, GgmlDType::F16);
        assert_eq!(
            tensor_type(QuantType::F32, Role::Matrix, None, 5, 172),
            GgmlDType::F32
        );
    }

    #[test]
    fn unpermute_interleaves_each_heads_halves() {
        // One head of 4 rows [a0, a1, b0, b1] becomes [a0, b0, a1, b1].
        let w = Tensor::new(&[[0f32], [1.], [2.], [3.]], &Device::Cpu).unwrap();
        let got = unpermute(w, 1).unwrap().flatten_all().unwrap();
        assert_eq!(got.to_vec1::<f32>().unwrap(), [0., 2., 1., 3.]);
    }
}
