//! `builtin:demo`: a small Llama with seeded random weights and a byte-level tokenizer, built
//! in memory so the daemon can run with no files and no network.

use std::borrow::Cow;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::llama;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::candle_llama::CandleLlama;
use super::cpu::llama_hf::{self, FamilyConfig, RawTensor, Tensors};
use super::error::{candle_message, LoadError};
use super::model::Model;
use super::tokenizer::TextTokenizer;

/// Special tokens of the demo vocabulary, in id order.
const SPECIALS: &[&str] = &[
    "<|pad|>",
    "<|bos|>",
    "<|eos|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
];
/// Id of `<|bos|>`.
const BOS_ID: u32 = 1;
/// Ids that end a generation: `<|eos|>` and `<|end|>`.
pub const DEMO_EOS: &[u32] = &[2, 6];
/// The seed of the demo weights: the same model in every process.
const DEMO_SEED: u64 = 0x11_0c4;
/// The demo chat template (ChatML-like, emits BOS itself): tools go in a first system turn,
/// calls are written as Hermes' `<tool_call>` blocks.
const DEMO_TEMPLATE: &str = concat!(
    "{{ bos_token }}",
    "{% if tools %}{{ '<|system|>\n<tools>\n' }}{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}",
    "{{ '</tools>\nTo call a function, answer <tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>, one block per call.<|end|>\n' }}{% endif %}",
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] }}",
    "{% for call in message['tool_calls'] or [] %}{{ '<tool_call>\n' }}{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}{{ '\n</tool_call>' }}{% endfor %}",
    "{{ '<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
);
/// The demo model's context length.
pub const DEMO_CONTEXT: usize = 2048;
/// The demo model's parameter count: embeddings and head (263 × 128 each), 4 layers of
/// attention (128×128 ×2, 64×128 ×2), MLP (256×128 ×3) and two norms, and the final norm.
pub const DEMO_PARAMETERS: u64 =
    2 * 263 * 128 + 4 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128 + 2 * 128) + 128;

/// The demo model's shape.
fn demo_config() -> llama::Config {
    llama::LlamaConfig {
        hidden_size: 128,
        intermediate_size: 256,
        vocab_size: SPECIALS.len() + 256,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: Some(2),
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        bos_token_id: Some(BOS_ID),
        eos_token_id: None,
        rope_scaling: None,
        max_position_embeddings: DEMO_CONTEXT,
        tie_word_embeddings: Some(false),
    }
    .into_config(false)
}

/// Builds the demo model on `device` in `dtype`.
pub fn demo_model(device: &Device, dtype: DType) -> Result<Model, LoadError> {
    let cfg = demo_config();
    let weights = |err: candle_core::Error| LoadError::Weights {
        path: "builtin:demo".into(),
        message: candle_message(&err),
    };
    let tensors = demo_tensors(&cfg, device).map_err(weights)?;
    if device.is_cpu() && matches!(dtype, DType::F32 | DType::F16) {
        let model = llama_hf::from_tensors(
            &family(&cfg),
            &InMemory(tensors),
            cfg.vocab_size,
            None,
            dtype == DType::F16,
        )
        .map_err(weights)?;
        return Ok(Model::CpuLlama(Box::new(model)));
    }
    let vb = VarBuilder::from_tensors(tensors, dtype, device);
    if device.is_cuda() {
        let model = CandleLlama::new(&family(&cfg), vb, cfg.vocab_size, None, DEMO_CONTEXT)
            .map_err(weights)?;
        return Ok(Model::CandleLlama(Box::new(model)));
    }
    let model = llama::Llama::load(vb, &cfg).map_err(weights)?;
    let cache = llama::Cache::new(true, dtype, &cfg, device).map_err(weights)?;
    Ok(Model::Llama {
        model,
        cache,
        config: Box::new(cfg),
        dtype,
        device: device.clone(),
    })
}

/// The demo's shape as the batched decoders read it.
fn family(cfg: &llama::Config) -> FamilyConfig {
    FamilyConfig {
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_hidden_layers: cfg.num_hidden_layers,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: Some(cfg.num_key_value_heads),
        head_dim: None,
        rms_norm_eps: cfg.rms_norm_eps,
        rope_theta: Some(f64::from(cfg.rope_theta)),
        rope_scaling: None,
        rope_parameters: None,
        tie_word_embeddings: false,
        sliding_window: None,
        embedding_multiplier: None,
        residual_multiplier: None,
        attention_multiplier: None,
        logits_scaling: None,
    }
}

/// The demo's tensors as the CPU decoder reads them.
struct InMemory(HashMap<String, Tensor>);

impl Tensors for InMemory {
    fn tensor(&self, name: &str) -> candle_core::Result<Option<RawTensor<'_>>> {
        let Some(tensor) = self.0.get(name) else {
            return Ok(None);
        };
        let values = tensor.flatten_all()?.to_vec1::<f32>()?;
        Ok(Some(RawTensor {
            dtype: DType::F32,
            shape: tensor.dims().to_vec(),
            bytes: Cow::Owned(values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        }))
    }
}

/// Draws every weight from a seeded uniform distribution with the variance of N(0, 1/fan_in)
/// (norm weights near 1), so activations stay in range through the layers.
fn demo_tensors(
    cfg: &llama::Config,
    device: &Device,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(DEMO_SEED);
    let mut tensors = HashMap::new();
    let head_dim = cfg.hidden_size / cfg.num_attention_heads;
    let kv_width = cfg.num_key_value_heads * head_dim;
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let mut matrix = |name: String, rows: usize, cols: usize, scale: f32| {
        let bound = scale * 3f32.sqrt() / (cols as f32).sqrt();
        let data: Vec<f32> = (0..rows * cols)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        Tensor::from_vec(data, (rows, cols), device).map(|t| (name, t))
    };
    let mut entries = vec![
        matrix("model.embed_tokens.weight".into(), v, h, (h as f32).sqrt())?,
        matrix("lm_head.weight".into(), v, h, 2.0)?,
    ];
    for layer in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        entries.push(matrix(format!("{p}.self_attn.q_proj.weight"), h, h, 1.0)?);
        entries.push(matrix(
            format!("{p}.self_attn.k_proj.weight"),
            kv_width,
            h,
            1.0,
        )?);
        entries.push(matrix(
            format!("{p}.self_attn.v_proj.weight"),
            kv_width,
            h,
            1.0,
        )?);
        entries.push(matrix(format!("{p}.self_attn.o_proj.weight"), h, h, 1.0)?);
        entries.push(matrix(format!("{p}.mlp.gate_proj.weight"), i, h, 1.0)?);
        entries.push(matrix(format!("{p}.mlp.up_proj.weight"), i, h, 1.0)?);
        entries.push(matrix(format!("{p}.mlp.down_proj.weight"), h, i, 1.0)?);
    }
    tensors.extend(entries);
    let ones = Tensor::ones(h, DType::F32, device)?;
    for layer in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{layer}");
        tensors.insert(format!("{p}.input_layernorm.weight"), ones.clone());
        tensors.insert(format!("{p}.post_attention_layernorm.weight"), ones.clone());
    }
    tensors.insert("model.norm.weight".into(), ones);
    Ok(tensors)
}

/// Builds the demo tokenizer: byte-level BPE over the 256 byte symbols, plus the specials.
pub fn demo_tokenizer() -> Result<TextTokenizer, LoadError> {
    let byte_symbols = byte_level_alphabet();
    let mut vocab = serde_json::Map::new();
    for (id, token) in SPECIALS.iter().enumerate() {
        vocab.insert((*token).to_string(), json!(id));
    }
    for (offset, symbol) in byte_symbols.iter().enumerate() {
        vocab.insert(symbol.to_string(), json!(SPECIALS.len() + offset));
    }
    let added: Vec<_> = SPECIALS
        .iter()
        .enumerate()
        .map(|(id, token)| {
            json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let bos = SPECIALS[BOS_ID as usize];
    let document = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}}
        },
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
                  "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    let inner: tokenizers::Tokenizer =
        document
            .to_string()
            .parse()
            .map_err(|err: tokenizers::Error| LoadError::Tokenizer {
                origin: "builtin:demo".to_string(),
                message: err.to_string(),
            })?;
    TextTokenizer::new(
        inner,
        Some(DEMO_TEMPLATE.to_string()),
        Some(bos.to_string()),
        Some(SPECIALS[DEMO_EOS[0] as usize].to_string()),
    )
}

/// GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 onward.
fn byte_level_alphabet() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut next = 0x100u32;
    (0u32..256)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap_or('?')
            } else {
                let symbol = char::from_u32(next).unwrap_or('?');
                next += 1;
                symbol
            }
        })
        .collect()
}
