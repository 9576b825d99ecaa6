//! Builds a HuggingFace tokenizer from GGUF metadata (`tokenizer.ggml.*`), for GGUF files that
//! come without a `tokenizer.json`.
//!
//! Two vocabularies are supported, as llama.cpp names them: `gpt2` (byte-level BPE with merges)
//! and `llama` (SentencePiece-style BPE with byte fallback, merges ranked by piece score the way
//! transformers' `SentencePieceExtractor` ranks them).

use std::collections::{HashMap, HashSet};

use candle_core::quantized::gguf_file::{Content, Value};
use serde_json::{json, Value as Json};

/// llama.cpp token types (`llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;
const TOKEN_TYPE_BYTE: i32 = 6;
/// The SentencePiece word-boundary marker.
const SPM_SPACE: &str = "\u{2581}";
/// Llama-3's split regex (`llama-bpe`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split regex (`qwen2`).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The special-token facts a GGUF file records.
#[derive(Debug, Clone, Default)]
pub struct GgufSpecials {
    /// `tokenizer.ggml.bos_token_id`.
    pub bos: Option<u32>,
    /// `tokenizer.ggml.eos_token_id`, `eot_token_id` and `eom_token_id`.
    pub eos: Vec<u32>,
    /// `tokenizer.ggml.add_bos_token`.
    pub add_bos: bool,
}

/// Reads the special-token ids of a GGUF file.
pub fn specials(content: &Content, default_add_bos: bool) -> GgufSpecials {
    let id = |key: &str| content.metadata.get(key).and_then(|v| v.to_u32().ok());
    let eos = [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ]
    .iter()
    .filter_map(|key| id(key))
    .fold(Vec::new(), |mut ids, token| {
        if !ids.contains(&token) {
            ids.push(token);
        }
        ids
    });
    GgufSpecials {
        bos: id("tokenizer.ggml.bos_token_id"),
        eos,
        add_bos: content
            .metadata
            .get("tokenizer.ggml.add_bos_token")
            .and_then(|v| v.to_bool().ok())
            .unwrap_or(default_add_bos),
    }
}

/// Builds the `tokenizer.json` document for the vocabulary in `content`.
pub fn tokenizer_json(content: &Content) -> Result<Json, String> {
    let meta = &content.metadata;
    let model = meta
        .get("tokenizer.ggml.model")
        .ok_or("no tokenizer.ggml.model in the metadata")?
        .to_string()
        .map_err(|e| e.to_string())?
        .clone();
    let tokens: Vec<String> = string_array(meta.get("tokenizer.ggml.tokens"))
        .ok_or("no tokenizer.ggml.tokens in the metadata")?;
    let types: Vec<i32> = meta
        .get("tokenizer.ggml.token_type")
        .and_then(|v| v.to_vec().ok())
        .map(|list| list.iter().map(|v| v.to_i32().unwrap_or(1)).collect())
        .unwrap_or_else(|| vec![1; tokens.len()]);
    let default_add_bos = model == "llama";
    let specials = specials(content, default_add_bos);
    let added = added_tokens(&tokens, &types);
    let post = post_processor(&tokens, &specials);
    match model.as_str() {
        "gpt2" => {
            let merges = string_array(meta.get("tokenizer.ggml.merges"))
                .ok_or("no tokenizer.ggml.merges in the metadata")?;
            let pre = meta
                .get("tokenizer.ggml.pre")
                .and_then(|v| v.to_string().ok().cloned())
                .unwrap_or_else(|| "default".to_string());
            Ok(json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": null,
                "pre_tokenizer": gpt2_pre_tokenizer(&pre)?,
                "post_processor": post,
                "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": null,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                    "vocab": vocab_map(&tokens),
                    "merges": merges,
                }
            }))
        }
        "llama" => {
            let scores: Vec<f32> = meta
                .get("tokenizer.ggml.scores")
                .and_then(|v| v.to_vec().ok())
                .map(|list| list.iter().map(|v| v.to_f32().unwrap_or(0.0)).collect())
                .ok_or("no tokenizer.ggml.scores in the metadata")?;
            let unk = meta
                .get("tokenizer.ggml.unknown_token_id")
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tokens.get(id as usize).cloned());
            Ok(json!({
                "version": "1.0",
                "truncation": null,
                "padding": null,
                "added_tokens": added,
                "normalizer": {"type": "Sequence", "normalizers": [
                    {"type": "Prepend", "prepend": SPM_SPACE},
                    {"type": "Replace", "pattern": {"String": " "}, "content": SPM_SPACE}
                ]},
                "pre_tokenizer": null,
                "post_processor": post,
                "decoder": {"type": "Sequence", "decoders": [
                    {"type": "Replace", "pattern": {"String": SPM_SPACE}, "content": " "},
                    {"type": "ByteFallback"},
                    {"type": "Fuse"},
                    {"type": "Strip", "content": " ", "start": 1, "stop": 0}
                ]},
                "model": {
                    "type": "BPE", "dropout": null, "unk_token": unk,
                    "continuing_subword_prefix": null, "end_of_word_suffix": null,
                    "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                    "vocab": vocab_map(&tokens),
                    "merges": spm_merges(&tokens, &scores, &types),
                }
            }))
        }
        other => Err(format!(
            "tokenizer.ggml.model {other:?} is not supported (supported: gpt2, llama); \
             put a tokenizer.json beside the .gguf file"
        )),
    }
}

fn string_array(value: Option<&Value>) -> Option<Vec<String>> {
    value?
        .to_vec()
        .ok()?
        .iter()
        .map(|v| v.to_string().ok().cloned())
        .collect()
}

fn vocab_map(tokens: &[String]) -> Json {
    let map: serde_json::Map<String, Json> = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.clone(), json!(id)))
        .collect();
    Json::Object(map)
}

fn added_tokens(tokens: &[String], types: &[i32]) -> Vec<Json> {
    tokens
        .iter()
        .zip(types)
        .enumerate()
        .filter(|(_, (_, kind))| matches!(**kind, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
        .map(|(id, (token, kind))| {
            json!({
                "id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": *kind == TOKEN_TYPE_CONTROL
            })
        })
        .collect()
}

fn post_processor(tokens: &[String], specials: &GgufSpecials) -> Json {
    let bos = specials
        .bos
        .filter(|_| specials.add_bos)
        .and_then(|id| tokens.get(id as usize).map(|token| (id, token.clone())));
    match bos {
        None => Json::Null,
        Some((id, token)) => json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [
                {"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                {"SpecialToken": {"id": token, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}
            ],
            "special_tokens": {token.clone(): {"id": token, "ids": [id], "tokens": [token]}}
        }),
    }
}

fn gpt2_pre_tokenizer(pre: &str) -> Result<Json, String> {
    let byte_level = |use_regex: bool| json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex});
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            byte_level(false)
        ]})
    };
    match pre {
        "default" | "gpt-2" | "gpt2" => Ok(byte_level(true)),
        "llama-bpe" | "llama3" => Ok(split(LLAMA3_SPLIT)),
        "qwen2" => Ok(split(QWEN2_SPLIT)),
        other => Err(format!(
            "tokenizer.ggml.pre {other:?} is not supported (supported: gpt-2, llama-bpe, qwen2); \
             put a tokenizer.json beside the .gguf file"
        )),
    }
}

/// Derives BPE merges from SentencePiece scores: every split of a piece into two pieces of the
/// vocabulary is a merge, ranked by the merged piece's score (highest first); splits of one
/// piece are ordered by the ids of their parts.
fn spm_merges(tokens: &[String], scores: &[f32], types: &[i32]) -> Vec<Json> {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(id, token)| (token.as_str(), id))
        .collect();
    let mergeable: HashSet<usize> = (0..tokens.len())
        .filter(|id| {
            let kind = types.get(*id).copied().unwrap_or(1);
            kind != TOKEN_TYPE_CONTROL && kind != TOKEN_TYPE_BYTE
        })
        .collect();
    let mut merges: Vec<(f32, usize, usize, usize)> = Vec::new();
    for (id, piece) in tokens.iter().enumerate() {
        if !mergeable.contains(&id) {
            continue;
        }
        let mut local: Vec<(usize, usize)> = piece
            .char_indices()
            .skip(1)
            .filter_map(|(split, _)| {
                let left = ids.get(&piece[..split])?;
                let right = ids.get(&piece[split..])?;
                (mergeable.contains(left) && mergeable.contains(right)).then_some((*left, *right))
            })
            .collect();
        local.sort();
        let score = scores.get(id).copied().unwrap_or(0.0);
        merges.extend(local.into_iter().map(|(l, r)| (score, id, l, r)));
    }
    // A stable sort keeps vocabulary order among equal scores, as Python's `sorted` does.
    merges.sort_by(|a, b| b.0.total_cmp(&a.0));
    merges
        .into_iter()
        .map(|(_, _, l, r)| json!([tokens[l], tokens[r]]))
        .collect()
}
