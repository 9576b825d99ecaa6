//! The text side of a model: tokenizer, special tokens and chat template.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::{GenerationError, LoadError};
use super::tools::{function_json, tools_prompt, ToolFormat, Tools};

/// One chat message as clients send it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
    /// An assistant message's tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<MessageCall>,
    /// A tool message: the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message of `role` with text `content`.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }
    }
}

/// A tool call of an earlier assistant message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageCall {
    /// The call's id, which the tool message answering it names.
    pub id: String,
    /// The function called.
    pub name: String,
    /// Its arguments as JSON text.
    pub arguments: String,
}

/// A tokenizer plus what generation needs around it.
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    chat: Option<minijinja::Environment<'static>>,
    /// The chat template takes `tools` (otherwise llorch describes them in a system message).
    takes_tools: bool,
    tool_format: ToolFormat,
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
        let takes_tools = chat_template.as_deref().is_some_and(takes_tools);
        let tool_format = match (&chat_template, takes_tools) {
            (Some(source), true) => ToolFormat::of_template(source),
            _ => ToolFormat::Hermes,
        };
        let chat = chat_template.map(compile_template).transpose()?;
        Ok(Self {
            inner,
            chat,
            takes_tools,
            tool_format,
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

    /// How this model writes tool calls.
    pub fn tool_format(&self) -> ToolFormat {
        self.tool_format
    }

    /// Renders `messages` with the model's chat template, offering `tools`: to the template
    /// when it takes them, otherwise described in a system message (and earlier calls and
    /// tool results written into the messages' text) in the [`ToolFormat::Hermes`] form.
    pub fn render_chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&Tools>,
        add_generation_prompt: bool,
    ) -> Result<String, GenerationError> {
        let env = self.chat.as_ref().ok_or(GenerationError::NoChatTemplate)?;
        let template = env
            .get_template(CHAT_TEMPLATE)
            .map_err(|err| GenerationError::ChatTemplate(err.to_string()))?;
        let mut messages: Vec<Value> = messages
            .iter()
            .map(|message| message_json(message, self.takes_tools))
            .collect();
        if let (Some(tools), false) = (tools, self.takes_tools) {
            describe_tools(&mut messages, &tools_prompt(tools));
        }
        let tools: Option<Vec<Value>> =
            tools.map(|tools| tools.functions.iter().map(function_json).collect());
        template
            .render(minijinja::context! {
                messages => messages,
                tools => tools,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.as_str(),
                eos_token => self.eos_token.as_str(),
            })
            .map_err(|err| GenerationError::ChatTemplate(err.to_string()))
    }
}

/// Whether a chat template reads `tools`.
fn takes_tools(source: &str) -> bool {
    let mut env = minijinja::Environment::new();
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.template_from_str(source)
        .map(|template| template.undeclared_variables(false).contains("tools"))
        .unwrap_or(false)
}

/// A message as chat templates read it (transformers' form: a call's arguments as an
/// object). For a template without tools, calls and results are written into the text.
fn message_json(message: &ChatMessage, takes_tools: bool) -> Value {
    let mut value = serde_json::json!({"role": message.role, "content": message.content});
    if !message.tool_calls.is_empty() {
        let calls: Vec<Value> = message
            .tool_calls
            .iter()
            .map(|call| {
                let arguments = serde_json::from_str(&call.arguments)
                    .unwrap_or_else(|_| Value::String(call.arguments.clone()));
                serde_json::json!({"id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": arguments}})
            })
            .collect();
        if !takes_tools {
            let mut text = message.content.clone();
            for call in &calls {
                let written = serde_json::json!({"name": call["function"]["name"],
                    "arguments": call["function"]["arguments"]});
                text.push_str(&format!("<tool_call>\n{written}\n</tool_call>"));
            }
            value["content"] = Value::String(text);
        }
        value["tool_calls"] = Value::Array(calls);
    }
    if let Some(id) = &message.tool_call_id {
        value["tool_call_id"] = Value::String(id.clone());
        if !takes_tools {
            let text = format!("<tool_response>\n{}\n</tool_response>", message.content);
            value["content"] = Value::String(text);
        }
    }
    value
}

/// Puts the tools' description at the start of the first system message, or in a new one.
fn describe_tools(messages: &mut Vec<Value>, description: &str) {
    match messages.first_mut() {
        Some(first) if first["role"] == "system" => {
            let text = format!(
                "{}\n\n{description}",
                first["content"].as_str().unwrap_or("")
            );
            first["content"] = Value::String(text);
        }
        _ => messages.insert(
            0,
            serde_json::json!({"role": "system", "content": description}),
        ),
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
        let messages = vec![ChatMessage::new("user", "  hi  ")];
        assert_eq!(
            tok.render_chat(&messages, None, true).unwrap(),
            "<s>USER: hi\nA:"
        );
    }

    #[test]
    fn raise_exception_surfaces_as_a_template_error() {
        let template = "{{ raise_exception('roles must alternate') }}";
        let tok = TextTokenizer::new(word_level(), Some(template.into()), None, None).unwrap();
        let err = tok.render_chat(&[], None, false).unwrap_err().to_string();
        assert!(err.contains("roles must alternate"), "{err}");
    }

    #[test]
    fn no_template_is_a_typed_error() {
        let tok = TextTokenizer::new(word_level(), None, None, None).unwrap();
        assert!(matches!(
            tok.render_chat(&[], None, true),
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
