//! The text side of a model: tokenizer, special tokens and chat template.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{GenerationError, LoadError};

/// One chat message as clients send it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
}

/// A tokenizer plus what generation needs around it.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    chat: Option<minijinja::Environment<'static>>,
    bos_token: String,
    eos_token: String,
}

/// The name of the compiled chat template inside the jinja environment.
const CHAT_TEMPLATE: &str = "chat";

impl TextTokenizer {
    /// Wraps a tokenizer with its chat template and special token strings.
    pub fn new(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, LoadError> {
        let chat = chat_template.map(compile_template).transpose()?;
        Ok(Self {
            inner,
            chat,
            bos_token: bos_token.unwrap_or_default(),
            eos_token: eos_token.unwrap_or_default(),
        })
    }

    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(LoadError::MissingFile {
                path,
                what: "the tokenizer",
            });
        }
        let inner =
            tokenizers::Tokenizer::from_file(&path).map_err(|err| LoadError::Tokenizer {
                origin: path.display().to_string(),
                message: err.to_string(),
            })?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            super::hf_dir::read_json(&config_path, "the tokenizer config")?
        } else {
            Value::Null
        };
        Self::new(
            inner,
            chat_template_of(&config),
            token_string(config.get("bos_token")),
            token_string(config.get("eos_token")),
        )
    }

    /// Encodes text; `add_special_tokens` applies the tokenizer's post-processor (e.g. BOS).
    pub fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, GenerationError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|enc| enc.get_ids().to_vec())
            .map_err(|err| GenerationError::Tokenizer(err.to_string()))
    }

    /// Decodes ids to text, keeping special tokens (as `tokenizer.decode(ids,
    /// skip_special_tokens=False)` does).
    pub fn decode(&self, ids: &[u32]) -> Result<String, GenerationError> {
        self.inner
            .decode(ids, false)
            .map_err(|err| GenerationError::Tokenizer(err.to_string()))
    }

    /// The tokenizer as HuggingFace's `tokenizer.json`.
    pub fn to_json(&self) -> Result<String, String> {
        self.inner.to_string(false).map_err(|err| err.to_string())
    }

    /// The HuggingFace tokenizer itself.
    pub fn hf(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Returns the id of a token string, special tokens included.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Returns the number of tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Returns the EOS token string from the tokenizer config (empty when unknown).
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    /// Whether the model has a chat template.
    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// Renders `messages` with the model's chat template.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, GenerationError> {
        let env = self.chat.as_ref().ok_or(GenerationError::NoChatTemplate)?;
        let template = env
            .get_template(CHAT_TEMPLATE)
            .map_err(|err| GenerationError::ChatTemplate(err.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|err| GenerationError::ChatTemplate(err.to_string()))
    }
}

/// Compiles a HuggingFace chat template with the settings transformers uses
/// (`trim_blocks`, `lstrip_blocks`, `raise_exception`, Python string methods).
fn compile_template(source: String) -> Result<minijinja::Environment<'static>, LoadError> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |message: String| -> Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                message,
            ))
        },
    );
    env.add_template_owned(CHAT_TEMPLATE, source)
        .map_err(|err| LoadError::Tokenizer {
            origin: "chat template".to_string(),
            message: err.to_string(),
        })?;
    Ok(env)
}

/// Reads `chat_template` from a tokenizer config: a string, or a list of named templates of
/// which `default` is taken.
fn chat_template_of(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(template) => Some(template.clone()),
        Value::Array(named) => named
            .iter()
            .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|entry| entry.get("template")?.as_str().map(str::to_string)),
        _ => None,
    }
}

/// Reads a special token that is either a string or an `{"content": ..}` object.
fn token_string(value: Option<&Value>) -> Option<String> {
    match value? {
        Value::String(text) => Some(text.clone()),
        Value::Object(map) => map.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn word_level() -> tokenizers::Tokenizer {
        let json = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel","vocab":{"<unk>":0,"hi":1},"unk_token":"<unk>"}}"#;
        json.parse().unwrap()
    }

    #[test]
    fn renders_a_template_with_python_string_methods() {
        let template = "{{ bos_token }}{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'].strip() }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}";
        let tok = TextTokenizer::new(
            word_level(),
            Some(template.into()),
            Some("<s>".into()),
            None,
        )
        .unwrap();
        let messages = vec![ChatMessage {
            role: "user".into(),
            content: "  hi  ".into(),
        }];
        assert_eq!(tok.render_chat(&messages, true).unwrap(), "<s>USER: hi\nA:");
    }

    #[test]
    fn raise_exception_surfaces_as_a_template_error() {
        let template = "{{ raise_exception('roles must alternate') }}";
        let tok = TextTokenizer::new(word_level(), Some(template.into()), None, None).unwrap();
        let err = tok.render_chat(&[], false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn no_template_is_a_typed_error() {
        let tok = TextTokenizer::new(word_level(), None, None, None).unwrap();
        assert!(matches!(
            tok.render_chat(&[], true),
            Err(GenerationError::NoChatTemplate)
        ));
    }

    #[test]
    fn reads_named_templates_and_object_tokens() {
        let config = serde_json::json!({
            "chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}],
            "eos_token": {"content": "</s>"}
        });
        assert_eq!(chat_template_of(&config).as_deref(), Some("y"));
        assert_eq!(
            token_string(config.get("eos_token")).as_deref(),
            Some("</s>")
        );
    }
}
