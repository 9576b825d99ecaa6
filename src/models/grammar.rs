//! Constrained decoding with `llguidance` (the grammar engine vLLM, llama.cpp and mistral.rs
//! use): a request's constraint (a JSON schema, any JSON object, a regular expression, a
//! choice of strings or a Lark grammar) becomes a matcher per sequence, which masks the
//! tokens that cannot continue the output before each token is sampled.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use super::error::GenerationError;
use super::sampling::Constrain;
use super::tokenizer::TextTokenizer;

/// What the output must match.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Constraint {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// A value valid against this JSON schema.
    JsonSchema(Value),
    /// A whole match of this regular expression.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
    /// Tool calls only: a Lark grammar built from the request's tools.
    ToolCalls(String),
}

impl Constraint {
    /// The request field that asks for this kind of constraint.
    pub fn param(&self) -> &'static str {
        match self {
            Constraint::JsonObject | Constraint::JsonSchema(_) => "response_format",
            Constraint::Regex(_) => "guided_regex",
            Constraint::Choice(_) => "guided_choice",
            Constraint::Lark(_) => "guided_grammar",
            Constraint::ToolCalls(_) => "tools",
        }
    }

    fn grammar(&self) -> TopLevelGrammar {
        match self {
            Constraint::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(json!({"type": "object"})))
            }
            Constraint::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(compact(schema.clone()))
            }
            Constraint::Regex(regex) => TopLevelGrammar::from_regex(regex),
            Constraint::Choice(choices) => {
                let alternatives: Vec<String> = choices.iter().map(|c| lark_string(c)).collect();
                TopLevelGrammar::from_lark(format!("start: {}", alternatives.join(" | ")))
            }
            Constraint::Lark(grammar) | Constraint::ToolCalls(grammar) => {
                TopLevelGrammar::from_lark(grammar.clone())
            }
        }
    }
}

/// `schema` with llguidance's layout options set, unless it sets its own (`x-guidance`): no
/// whitespace but one space after each `,` and `:`, as `json.dumps` writes, so that a model
/// cannot spend its tokens on whitespace between values.
fn compact(mut schema: Value) -> Value {
    if let Some(object) = schema.as_object_mut() {
        object.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// `text` as a Lark string literal.
fn lark_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// One model's grammar compiler: its vocabulary as byte strings in a trie, built once.
pub struct Grammars {
    factory: ParserFactory,
    /// Tokens the trie knows.
    vocab: usize,
}

impl Grammars {
    /// Builds the token trie of `tokenizer` (whose end-of-sequence token is `eos`).
    pub fn new(tokenizer: &TextTokenizer, eos: TokenId) -> Result<Self, String> {
        let json: Value = serde_json::from_str(&tokenizer.to_json()?)
            .map_err(|err| format!("the tokenizer's JSON: {err}"))?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&json)
            .map_err(|err| format!("the tokenizer's token bytes: {err}"))?;
        let vocab = tokenizer.vocab_size().max(words.len());
        words.resize(vocab, Vec::new());
        let info = TokRxInfo::new(vocab as u32, eos);
        let env = Env {
            trie: TokTrie::from(&info, &words),
            tokenizer: tokenizer.hf().clone(),
        };
        let env: TokEnv = Arc::new(env);
        let mut factory = ParserFactory::new_simple(&env).map_err(|err| err.to_string())?;
        factory.quiet();
        Ok(Self { factory, vocab })
    }

    /// A fresh matcher for `constraint`, or why the constraint cannot be compiled.
    pub fn guide(&self, constraint: &Constraint) -> Result<Guide, String> {
        let parser = self
            .factory
            .create_parser(constraint.grammar())
            .map_err(|err| err.to_string())?;
        let matcher = Matcher::new(Ok(parser));
        match matcher.get_error() {
            Some(error) => Err(error),
            None => Ok(Guide {
                matcher,
                vocab: self.vocab,
            }),
        }
    }
}

/// The tokenizer as llguidance sees it: the trie, and text to tokens.
struct Env {
    trie: TokTrie,
    tokenizer: tokenizers::Tokenizer,
}

impl TokenizerEnv for Env {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        match self
            .tokenizer
            .encode(String::from_utf8_lossy(s).as_ref(), false)
        {
            Ok(encoding) => encoding.get_ids().to_vec(),
            Err(_) => self.trie.greedy_tokenize(s),
        }
    }
}

/// One sequence's matcher.
pub struct Guide {
    matcher: Matcher,
    /// Tokens its trie knows (a model's vocabulary may be padded past them).
    vocab: usize,
}

impl std::fmt::Debug for Guide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guide")
            .field("stopped", &self.matcher.is_stopped())
            .finish()
    }
}

impl Constrain for Guide {
    type Error = GenerationError;

    fn allows(&mut self, token: u32) -> Result<bool, GenerationError> {
        Guide::allows(self, token)
    }

    fn mask(&mut self, logits: &mut [f32]) -> Result<(), GenerationError> {
        Guide::mask(self, logits)
    }
}

impl Guide {
    /// Sets the logits of every token that cannot come next to −∞ (those past the
    /// tokenizer's vocabulary too).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), GenerationError> {
        let allowed = self.matcher.compute_mask_or_eos().map_err(fault)?;
        let words = allowed.as_slice();
        // 32 tokens per word of the mask: most words are all masked or all allowed.
        for (i, chunk) in logits.chunks_mut(32).enumerate() {
            match words.get(i).copied().unwrap_or(0) {
                u32::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                word => {
                    for (bit, logit) in chunk.iter_mut().enumerate() {
                        if word & (1 << bit) == 0 {
                            *logit = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Whether `token` may come next (the end-of-sequence token once the output may end).
    pub fn allows(&mut self, token: u32) -> Result<bool, GenerationError> {
        if token as usize >= self.vocab || self.matcher.is_stopped() {
            return Ok(false);
        }
        Ok(self.matcher.validate_tokens(&[token]).map_err(fault)? == 1)
    }

    /// Moves past `token`; returns whether the output is now complete (nothing may follow).
    pub fn advance(&mut self, token: u32) -> Result<bool, GenerationError> {
        if self.matcher.is_stopped() {
            return Ok(true);
        }
        self.matcher.consume_token(token).map_err(fault)?;
        Ok(self.matcher.is_stopped())
    }
}

fn fault(err: impl std::fmt::Display) -> GenerationError {
    GenerationError::Grammar(err.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::demo;

    fn grammars() -> (Grammars, TextTokenizer) {
        let tokenizer = demo::demo_tokenizer().unwrap();
        let eos = tokenizer.token_id(tokenizer.eos_token()).unwrap_or(0);
        (Grammars::new(&tokenizer, eos).unwrap(), tokenizer)
    }

    /// Greedy decoding over uniform logits, the mask choosing: the lowest allowed id each step.
    fn lowest_allowed(guide: &mut Guide, vocab: usize, steps: usize) -> Vec<u32> {
        let mut ids = Vec::new();
        for _ in 0..steps {
            let mut logits = vec![0.0; vocab];
            guide.mask(&mut logits).unwrap();
            let id = logits.iter().position(|l| l.is_finite()).unwrap() as u32;
            ids.push(id);
            if guide.advance(id).unwrap() {
                break;
            }
        }
        ids
    }

    #[test]
    fn a_choice_allows_only_its_strings() {
        let (grammars, tokenizer) = grammars();
        let choices = vec!["yes".to_string(), "no".to_string()];
        let mut guide = grammars
            .guide(&Constraint::Choice(choices.clone()))
            .unwrap();
        let ids = lowest_allowed(&mut guide, tokenizer.vocab_size(), 20);
        let text = tokenizer.decode(&ids).unwrap();
        let eos = tokenizer.eos_token();
        assert!(
            choices.contains(&text.trim_end_matches(eos).to_string()),
            "{text:?}"
        );
    }

    #[test]
    fn a_bad_schema_is_refused_with_the_reason() {
        let (grammars, _) = grammars();
        let error = grammars
            .guide(&Constraint::JsonSchema(json!({"type": "no-such-type"})))
            .unwrap_err();
        assert!(error.contains("no-such-type"), "{error}");
        assert!(grammars.guide(&Constraint::Regex("(".into())).is_err());
    }
}
