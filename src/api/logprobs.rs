//! Log probabilities on the wire: chat's `logprobs.content` entries and the completions API's
//! `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` object.

use serde_json::{json, Map, Value};

use super::stream::Generated;
use crate::models::{EchoedToken, Logprobs, TokenLogprob};

/// Chat's `logprobs` for `tokens`: `{"content": [...], "refusal": null}`.
pub fn chat(tokens: &[&Generated]) -> Value {
    let content: Vec<Value> = tokens
        .iter()
        .filter_map(|token| token.logprobs.as_deref())
        .map(chat_entry)
        .collect();
    json!({"content": content, "refusal": null})
}

fn chat_entry(logprobs: &Logprobs) -> Value {
    let mut entry = chat_token(&logprobs.chosen);
    let top: Vec<Value> = logprobs.top.iter().map(chat_token).collect();
    if let Some(object) = entry.as_object_mut() {
        object.insert("top_logprobs".into(), json!(top));
    }
    entry
}

fn chat_token(token: &TokenLogprob) -> Value {
    json!({
        "token": token.text,
        "logprob": finite(token.logprob),
        "bytes": token.text.as_bytes(),
    })
}

/// The completions API's `logprobs` object, which counts `text_offset` in characters from
/// the start of the completion across the chunks of a stream.
#[derive(Debug, Default)]
pub struct Completion {
    offset: usize,
}

impl Completion {
    /// The object for `tokens`, the next ones of the completion.
    pub fn object(&mut self, tokens: &[&Generated]) -> Value {
        self.entries(
            tokens
                .iter()
                .map(|token| (token.text.as_str(), token.logprobs.as_deref())),
        )
    }

    /// The object for an echoed prompt's tokens followed by the completion's `tokens`
    /// (the prompt's first token has no log probability: `null`).
    pub fn with_prompt(&mut self, prompt: &[EchoedToken], tokens: &[&Generated]) -> Value {
        let prompt = prompt
            .iter()
            .map(|token| (token.text.as_str(), token.logprobs.as_deref()));
        let generated = tokens
            .iter()
            .map(|token| (token.text.as_str(), token.logprobs.as_deref()));
        self.entries(prompt.chain(generated))
    }

    /// One entry per token: its text, log probability and alternatives (`null` when it has
    /// none) and its offset.
    fn entries<'a>(
        &mut self,
        tokens: impl Iterator<Item = (&'a str, Option<&'a Logprobs>)>,
    ) -> Value {
        let (mut texts, mut logprobs, mut tops, mut offsets) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (text, lp) in tokens {
            offsets.push(self.offset);
            self.offset += text.chars().count();
            let Some(lp) = lp else {
                texts.push(json!(text));
                logprobs.push(Value::Null);
                tops.push(Value::Null);
                continue;
            };
            texts.push(json!(lp.chosen.text));
            logprobs.push(finite(lp.chosen.logprob));
            // Keyed by text, as OpenAI's format is: of tokens that decode alike, the most
            // likely (the first) keeps the key.
            let mut top = Map::new();
            for t in &lp.top {
                top.entry(t.text.clone())
                    .or_insert_with(|| finite(t.logprob));
            }
            tops.push(Value::Object(top));
        }
        json!({
            "tokens": texts,
            "token_logprobs": logprobs,
            "top_logprobs": tops,
            "text_offset": offsets,
        })
    }
}

/// A log probability as JSON: an impossible token (−∞, which JSON cannot carry) as OpenAI's
/// floor of −9999.
fn finite(logprob: f32) -> Value {
    json!(if logprob.is_finite() {
        logprob
    } else {
        -9999.0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(id: u32, text: &str, logprob: f32) -> Generated {
        let entry = |id: u32, text: &str, logprob: f32| TokenLogprob {
            id,
            text: text.into(),
            logprob,
        };
        Generated {
            id,
            text: text.into(),
            logprobs: Some(Box::new(Logprobs {
                chosen: entry(id, text, logprob),
                top: vec![entry(id, text, logprob), entry(9, "é", f32::NEG_INFINITY)],
            })),
        }
    }

    #[test]
    fn chat_entries_carry_bytes_and_alternatives() {
        let a = token(1, "hi", -0.5);
        let value = chat(&[&a]);
        let entry = &value["content"][0];
        assert_eq!(entry["token"], "hi");
        assert_eq!(entry["logprob"], -0.5);
        assert_eq!(entry["bytes"], json!([104, 105]));
        assert_eq!(entry["top_logprobs"][1]["bytes"], json!([195, 169]));
        assert_eq!(entry["top_logprobs"][1]["logprob"], -9999.0);
    }

    #[test]
    fn completion_offsets_run_on_across_chunks() {
        let mut completion = Completion::default();
        let (a, b) = (token(1, "hé", -0.25), token(2, " x", -1.0));
        let first = completion.object(&[&a]);
        let second = completion.object(&[&b]);
        assert_eq!(first["text_offset"], json!([0]));
        assert_eq!(second["text_offset"], json!([2]));
        assert_eq!(second["tokens"], json!([" x"]));
        assert_eq!(second["token_logprobs"], json!([-1.0]));
        assert_eq!(first["top_logprobs"][0]["hé"], -0.25);
        let twins = Generated {
            text: "hé".into(),
            ..token(3, "é", -3.0)
        };
        let third = completion.object(&[&twins]);
        assert_eq!(
            third["top_logprobs"][0]["é"], -3.0,
            "the likelier of two alike"
        );
    }

    #[test]
    fn an_echoed_prompt_comes_first_with_null_for_its_first_token() {
        let mut completion = Completion::default();
        let first = EchoedToken {
            id: 1,
            text: "<s>".into(),
            logprobs: None,
        };
        let second = EchoedToken {
            id: 5,
            text: "ab".into(),
            logprobs: token(5, "ab", -2.0).logprobs,
        };
        let generated = token(6, "c", -0.5);
        let object = completion.with_prompt(&[first, second], &[&generated]);
        assert_eq!(object["tokens"], json!(["<s>", "ab", "c"]));
        assert_eq!(object["token_logprobs"], json!([null, -2.0, -0.5]));
        assert_eq!(object["top_logprobs"][0], Value::Null);
        assert_eq!(object["text_offset"], json!([0, 3, 5]));
    }
}
