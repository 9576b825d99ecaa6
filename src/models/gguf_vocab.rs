//! The `tokenizer.ggml.*` metadata `llorch quantize` writes, from a `tokenizer.json`.
//!
//! A byte-level BPE vocabulary becomes llama.cpp's `gpt2` (tokens and merges). A BPE with byte
//! fallback (SentencePiece's BPE, as Llama 2 uses) becomes `llama`, with each piece scored by
//! minus its id, as SentencePiece's BPE trainer scores pieces, and `<0xNN>` pieces typed as
//! bytes. Any other vocabulary (Unigram, WordLevel, WordPiece) becomes `llama` with its own
//! scores or none. llorch prefers a `tokenizer.json` beside the GGUF file when there is one.

use candle_core::quantized::gguf_file::Value;
use serde_json::Value as Json;

/// llama.cpp token types (`llama_token_type`).
const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// The tokenizer keys for a vocabulary of `vocab_size` rows (ids past the tokenizer's vocabulary
/// become unused `[PADn]` tokens). `config` gives the BOS/EOS ids, `tokenizer_config` the chat
/// template and `add_bos_token`.
pub fn vocab_metadata(
    tokenizer: &Json,
    tokenizer_config: &Json,
    config: &Json,
    vocab_size: usize,
) -> Result<Vec<(String, Value)>, String> {
    let model = tokenizer
        .get("model")
        .ok_or("tokenizer.json has no model")?;
    let kind = model.get("type").and_then(Json::as_str).unwrap_or("");
    let byte_fallback = model.get("byte_fallback").and_then(Json::as_bool) == Some(true);
    let piece = |id: usize, text: &str| match () {
        _ if byte_fallback && is_byte_piece(text) => (0.0, BYTE),
        _ if byte_fallback => (-(id as f32), NORMAL),
        _ => (0.0, NORMAL),
    };
    let mut tokens: Vec<Option<(String, f32, i32)>> = Vec::new();
    let mut put = |id: usize, text: &str, score: f32, kind: i32| {
        if tokens.len() <= id {
            tokens.resize(id + 1, None);
        }
        tokens[id] = Some((text.to_string(), score, kind));
    };
    match model.get("vocab") {
        Some(Json::Object(map)) => {
            for (text, id) in map {
                let id = id.as_u64().ok_or("a vocabulary id is not a number")? as usize;
                let (score, kind) = piece(id, text);
                put(id, text, score, kind);
            }
        }
        Some(Json::Array(pieces)) => {
            for (id, piece) in pieces.iter().enumerate() {
                let text = piece.get(0).and_then(Json::as_str).ok_or("bad piece")?;
                let score = piece.get(1).and_then(Json::as_f64).unwrap_or(0.0);
                put(id, text, score as f32, NORMAL);
            }
        }
        _ => return Err("tokenizer.json has no model.vocab".to_string()),
    }
    let unk = model.get("unk_token").and_then(Json::as_str);
    for added in tokenizer
        .get("added_tokens")
        .and_then(Json::as_array)
        .into_iter()
        .flatten()
    {
        let id = added
            .get("id")
            .and_then(Json::as_u64)
            .ok_or("bad added token")? as usize;
        let text = added.get("content").and_then(Json::as_str).unwrap_or("");
        let special = added.get("special").and_then(Json::as_bool) == Some(true);
        let kind = match () {
            _ if Some(text) == unk => UNKNOWN,
            _ if special => CONTROL,
            _ => USER_DEFINED,
        };
        put(id, text, 0.0, kind);
    }
    if tokens.len() > vocab_size {
        return Err(format!(
            "the tokenizer has {} ids but the model only {vocab_size} rows",
            tokens.len()
        ));
    }
    tokens.resize(vocab_size, None);
    let rows: Vec<(String, f32, i32)> = tokens
        .into_iter()
        .enumerate()
        .map(|(id, row)| row.unwrap_or_else(|| (format!("[PAD{id}]"), 0.0, UNUSED)))
        .collect();
    let array = |values: Vec<Value>| Value::Array(values);
    let mut out = vec![(
        "tokenizer.ggml.tokens".to_string(),
        array(rows.iter().map(|r| Value::String(r.0.clone())).collect()),
    )];
    out.push((
        "tokenizer.ggml.token_type".to_string(),
        array(rows.iter().map(|r| Value::I32(r.2)).collect()),
    ));
    if kind == "BPE" && !byte_fallback {
        out.push(("tokenizer.ggml.model".into(), Value::String("gpt2".into())));
        out.push(("tokenizer.ggml.pre".into(), Value::String("default".into())));
        out.push(("tokenizer.ggml.merges".into(), array(merges(model)?)));
    } else {
        out.push(("tokenizer.ggml.model".into(), Value::String("llama".into())));
        out.push((
            "tokenizer.ggml.scores".to_string(),
            array(rows.iter().map(|r| Value::F32(r.1)).collect()),
        ));
    }
    let first_id = |value: Option<&Json>| match value {
        Some(Json::Array(ids)) => ids.first().and_then(Json::as_u64),
        Some(other) => other.as_u64(),
        None => None,
    };
    for (key, field) in [
        ("tokenizer.ggml.bos_token_id", "bos_token_id"),
        ("tokenizer.ggml.eos_token_id", "eos_token_id"),
    ] {
        if let Some(id) = first_id(config.get(field)) {
            out.push((key.to_string(), Value::U32(id as u32)));
        }
    }
    if let Some(id) = rows.iter().position(|r| r.2 == UNKNOWN) {
        out.push((
            "tokenizer.ggml.unknown_token_id".into(),
            Value::U32(id as u32),
        ));
    }
    if let Some(add) = tokenizer_config
        .get("add_bos_token")
        .and_then(Json::as_bool)
    {
        out.push(("tokenizer.ggml.add_bos_token".into(), Value::Bool(add)));
    }
    if let Some(template) = tokenizer_config.get("chat_template").and_then(Json::as_str) {
        out.push((
            "tokenizer.chat_template".into(),
            Value::String(template.to_string()),
        ));
    }
    Ok(out)
}

/// `<0xNN>`: SentencePiece's name for the byte NN.
fn is_byte_piece(text: &str) -> bool {
    text.len() == 6
        && text.starts_with("<0x")
        && text.ends_with('>')
        && text[3..5].chars().all(|c| c.is_ascii_hexdigit())
}

/// BPE merges as `"left right"` strings, from either of tokenizer.json's two spellings.
fn merges(model: &Json) -> Result<Vec<Value>, String> {
    let list = model.get("merges").and_then(Json::as_array);
    list.into_iter()
        .flatten()
        .map(|merge| match merge {
            Json::String(pair) => Ok(Value::String(pair.clone())),
            Json::Array(pair) => match (pair.first(), pair.get(1)) {
                (Some(Json::String(a)), Some(Json::String(b))) => {
                    Ok(Value::String(format!("{a} {b}")))
                }
                _ => Err("a merge is not a pair of strings".to_string()),
            },
            _ => Err("a merge is neither a string nor a pair".to_string()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn strings(meta: &[(String, Value)], key: &str) -> Vec<String> {
        let (_, value) = meta.iter().find(|(k, _)| k == key).unwrap();
        let Value::Array(items) = value else { panic!() };
        items
            .iter()
            .map(|v| v.to_string().unwrap().clone())
            .collect()
    }

    #[test]
    fn word_level_becomes_llama_with_padding_and_specials() {
        let tokenizer = json!({
            "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "<s>": 1, "w2": 2}, "unk_token": "<unk>"},
            "added_tokens": [{"id": 0, "content": "<unk>", "special": true},
                             {"id": 1, "content": "<s>", "special": true}]
        });
        let config = json!({"bos_token_id": 1, "eos_token_id": [2, 1]});
        let meta = vocab_metadata(&tokenizer, &Json::Null, &config, 4).unwrap();
        assert_eq!(
            strings(&meta, "tokenizer.ggml.tokens"),
            ["<unk>", "<s>", "w2", "[PAD3]"]
        );
        let get = |key: &str| meta.iter().find(|(k, _)| k == key).map(|(_, v)| v);
        assert_eq!(
            get("tokenizer.ggml.model").unwrap().to_string().unwrap(),
            "llama"
        );
        assert_eq!(
            get("tokenizer.ggml.eos_token_id")
                .unwrap()
                .to_u32()
                .unwrap(),
            2
        );
        assert_eq!(
            get("tokenizer.ggml.unknown_token_id")
                .unwrap()
                .to_u32()
                .unwrap(),
            0
        );
        let Value::Array(types) = get("tokenizer.ggml.token_type").unwrap() else {
            panic!()
        };
        let types: Vec<i32> = types.iter().map(|v| v.to_i32().unwrap()).collect();
        assert_eq!(types, [UNKNOWN, CONTROL, NORMAL, UNUSED]);
    }

    #[test]
    fn bpe_becomes_gpt2_with_merges_of_either_spelling() {
        let tokenizer = json!({
            "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}
        });
        let meta = vocab_metadata(&tokenizer, &Json::Null, &Json::Null, 3).unwrap();
        assert_eq!(strings(&meta, "tokenizer.ggml.merges"), ["a b"]);
        assert_eq!(strings(&meta, "tokenizer.ggml.tokens"), ["a", "b", "ab"]);
    }

    #[test]
    fn a_vocabulary_larger_than_the_model_is_refused() {
        let tokenizer = json!({"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 5}}});
        let err = vocab_metadata(&tokenizer, &Json::Null, &Json::Null, 3).unwrap_err();
        assert!(err.contains("6 ids"), "{err}");
    }
}
