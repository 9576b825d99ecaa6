//! Reading a Llama-family GGUF (`llama`, `qwen2`, `qwen3`) into [`CpuLlama`]: matrices stay
//! in their GGUF types, norms and biases become f32 vectors.

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;

use super::llama::{CpuLlama, Hyper, Layer, Linear, Weights};
use super::ops::{Rope, RopeStyle};
use super::weight::{Weight, SUPPORTED};

/// The GGUF architectures this path runs and their rotary pairing: llama.cpp's converter
/// permutes a Llama's q/k rows into interleaved pairs and leaves Qwen's in halves.
const ARCHITECTURES: &[(&str, RopeStyle)] = &[
    ("llama", RopeStyle::Interleaved),
    ("qwen2", RopeStyle::Half),
    ("qwen3", RopeStyle::Half),
];

fn style(content: &Content) -> Option<RopeStyle> {
    let arch = content
        .metadata
        .get("general.architecture")?
        .to_string()
        .ok()?;
    ARCHITECTURES
        .iter()
        .find(|(name, _)| name == arch)
        .map(|(_, style)| *style)
}

fn metadata_u32(content: &Content, arch: &str, key: &str) -> Option<u32> {
    let value = content.metadata.get(&format!("{arch}.{key}"))?;
    value
        .to_u32()
        .ok()
        .or_else(|| value.to_u64().ok().map(|v| v as u32))
}

fn architecture(content: &Content) -> String {
    content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default()
}

/// Whether this path runs `content`: a dense model of a listed architecture whose matrices
/// are all of supported types, whose rotary embedding covers whole heads and that asks for no
/// RoPE scaling but Llama 3's (given as `rope_freqs`).
pub fn supports(content: &Content) -> bool {
    let arch = architecture(content);
    let md = |key: &str| metadata_u32(content, &arch, key);
    let (Some(_), Some(_), Some(_)) = (
        style(content),
        md("embedding_length"),
        md("attention.head_count"),
    ) else {
        return false;
    };
    let head_dim = head_dim(content, &arch);
    let whole_heads = md("rope.dimension_count").is_none_or(|d| Some(d as usize) == head_dim);
    let dense = md("expert_count").unwrap_or(0) <= 1;
    let scaling = content
        .metadata
        .get(&format!("{arch}.rope.scaling.type"))
        .and_then(|v| v.to_string().ok().cloned());
    let unscaled = scaling.is_none_or(|kind| kind == "none");
    let types_ok = content.tensor_infos.values().all(|info| {
        info.shape.rank() == 1 && info.ggml_dtype == GgmlDType::F32
            || SUPPORTED.contains(&info.ggml_dtype)
    });
    whole_heads && dense && unscaled && types_ok
}

/// The head width: `attention.key_length` when given (Qwen3), else hidden / heads.
fn head_dim(content: &Content, arch: &str) -> Option<usize> {
    let md = |key: &str| metadata_u32(content, arch, key).map(|v| v as usize);
    md("attention.key_length")
        .or_else(|| Some(md("embedding_length")? / md("attention.head_count")?))
}

/// Reads the model from a GGUF file already parsed into `content`.
pub fn from_gguf<R: std::io::Read + std::io::Seek>(
    content: &Content,
    reader: &mut R,
) -> candle_core::Result<CpuLlama> {
    let device = Device::Cpu;
    let arch = architecture(content);
    let md = |key: &str| match metadata_u32(content, &arch, key) {
        Some(v) => Ok(v as usize),
        None => candle_core::bail!("no {arch}.{key} in the metadata"),
    };
    let float = |key: &str, default: f32| -> candle_core::Result<f32> {
        match content.metadata.get(&format!("{arch}.{key}")) {
            Some(v) => v.to_f32(),
            None => Ok(default),
        }
    };
    let heads = md("attention.head_count")?;
    let kv_heads = md("attention.head_count_kv").unwrap_or(heads);
    let hidden = md("embedding_length")?;
    let head_dim = head_dim(content, &arch).unwrap_or(hidden / heads);
    let eps = float("attention.layer_norm_rms_epsilon", 1e-5)?;
    let base = float("rope.freq_base", 10_000.0)?;
    let style = style(content).unwrap_or(RopeStyle::Interleaved);
    let has = |name: &str| content.tensor_infos.contains_key(name);
    // The weights' buffers share huge-page chunks (see `huge_pages`).
    super::huge_pages::in_arena(|| {
        let mut read = |name: &str| content.tensor(reader, name, &device);
        let vector = |tensor: QTensor| tensor.dequantize(&device)?.to_vec1::<f32>();
        let divisors = match has("rope_freqs.weight") {
            true => Some(vector(read("rope_freqs.weight")?)?),
            false => None,
        };
        let embedding = Weight::new(&read("token_embd.weight")?)?;
        let output = match has("output.weight") {
            true => Some(Weight::new(&read("output.weight")?)?),
            false => None,
        };
        let norm = vector(read("output_norm.weight")?)?;
        let mut layers = Vec::new();
        for i in 0..md("block_count")? {
            let name = |part: &str, kind: &str| format!("blk.{i}.{part}.{kind}");
            let mut linear = |part: &str| -> candle_core::Result<Linear> {
                let weight = Weight::new(&read(&name(part, "weight"))?)?;
                let bias = match has(&name(part, "bias")) {
                    true => Some(vector(read(&name(part, "bias"))?)?),
                    false => None,
                };
                Ok(Linear { weight, bias })
            };
            let (q, k, v, o) = (
                linear("attn_q")?,
                linear("attn_k")?,
                linear("attn_v")?,
                linear("attn_output")?,
            );
            let (gate, up, down) = (linear("ffn_gate")?, linear("ffn_up")?, linear("ffn_down")?);
            let mut optional = |part: &str| -> candle_core::Result<Option<Vec<f32>>> {
                match has(&name(part, "weight")) {
                    true => Ok(Some(vector(read(&name(part, "weight"))?)?)),
                    false => Ok(None),
                }
            };
            let (q_norm, k_norm) = (optional("attn_q_norm")?, optional("attn_k_norm")?);
            let mut layer_norm = |part: &str| vector(read(&name(part, "weight"))?);
            layers.push(Layer {
                attn_norm: layer_norm("attn_norm")?,
                ffn_norm: layer_norm("ffn_norm")?,
                q,
                k,
                v,
                o,
                q_norm,
                k_norm,
                gate,
                up,
                down,
            });
        }
        let rope = Rope::new(base, head_dim, style, None, divisors.as_deref());
        Ok(CpuLlama::new(Weights {
            embedding,
            layers,
            norm,
            output,
            hyper: Hyper {
                hidden,
                heads,
                kv_heads,
                head_dim,
                eps,
                rope,
                window: None,
                attention_scale: 1.0 / (head_dim as f32).sqrt(),
                embedding_multiplier: 1.0,
                residual_multiplier: 1.0,
                logits_multiplier: 1.0,
            },
        }))
    })
}
