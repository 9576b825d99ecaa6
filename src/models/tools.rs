//! Tool calls: the functions a chat request offers, how a model's chat template asks it to
//! call them (its [`ToolFormat`]), the grammar that forces a call when the request requires
//! one, and the parser that finds calls in the generated text, whole or as it streams.

use serde_json::{json, Map, Value};

use super::grammar::Constraint;

/// The functions a chat request offers and how the model may use them.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tools {
    /// The functions, in the request's order.
    pub functions: Vec<Function>,
    /// Whether the model must call one, and which.
    pub choice: ToolChoice,
    /// Whether several calls may come in one answer.
    pub parallel: bool,
}

/// One function a model may call.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Function {
    /// Its name.
    pub name: String,
    /// What it does, for the model.
    pub description: Option<String>,
    /// The JSON schema of its arguments (an object schema).
    pub parameters: Value,
}

/// `tool_choice` (`none` removes the tools from the request before it gets here).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ToolChoice {
    /// The model decides between text and calls.
    Auto,
    /// The model must call at least one of the functions.
    Required,
    /// The model must call this function.
    Named(String),
}

/// One call the model made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    /// The function's name.
    pub name: String,
    /// Its arguments as JSON text.
    pub arguments: String,
}

/// How a model writes tool calls, read from its chat template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ToolFormat {
    /// `<tool_call>{"name": .., "arguments": {..}}</tool_call>`, once per call (Hermes, Qwen
    /// 2.5 and 3); also what llorch asks of a model whose template does not take tools.
    Hermes,
    /// `[TOOL_CALLS][{"name": .., "arguments": {..}}, ..]` (Mistral).
    Mistral,
    /// The whole answer is `{"name": .., "parameters": {..}}`, maybe after `<|python_tag|>`
    /// (Llama 3.1 and later).
    Llama3,
}

const HERMES_OPEN: &str = "<tool_call>";
const HERMES_CLOSE: &str = "</tool_call>";
const MISTRAL_OPEN: &str = "[TOOL_CALLS]";
const PYTHON_TAG: &str = "<|python_tag|>";

impl ToolFormat {
    /// The format a chat template's own text asks for (Hermes when it shows none).
    pub fn of_template(source: &str) -> Self {
        if source.contains(MISTRAL_OPEN) {
            ToolFormat::Mistral
        } else if source.contains(HERMES_OPEN) {
            ToolFormat::Hermes
        } else if source.contains("<|start_header_id|>") && source.contains("tools") {
            ToolFormat::Llama3
        } else {
            ToolFormat::Hermes
        }
    }

    fn arguments_key(self) -> &'static str {
        match self {
            ToolFormat::Llama3 => "parameters",
            ToolFormat::Hermes | ToolFormat::Mistral => "arguments",
        }
    }

    /// The grammar of an answer that is only calls, for `required` or a named function;
    /// `None` for `auto`.
    pub fn constraint(self, tools: &Tools) -> Option<Constraint> {
        let allowed: Vec<&Function> = match &tools.choice {
            ToolChoice::Auto => return None,
            ToolChoice::Required => tools.functions.iter().collect(),
            ToolChoice::Named(name) => tools.functions.iter().filter(|f| &f.name == name).collect(),
        };
        let calls: Vec<Value> = allowed
            .iter()
            .map(|f| {
                let mut properties = Map::new();
                properties.insert("name".into(), json!({"const": f.name}));
                properties.insert(self.arguments_key().into(), f.parameters.clone());
                json!({
                    "type": "object",
                    "properties": properties,
                    "required": ["name", self.arguments_key()],
                    "additionalProperties": false,
                })
            })
            .collect();
        let one = match calls.as_slice() {
            [single] => single.clone(),
            _ => json!({"anyOf": calls}),
        };
        let layout =
            json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "});
        let with_layout = |mut schema: Value| {
            if let Some(object) = schema.as_object_mut() {
                object.insert("x-guidance".into(), layout.clone());
            }
            schema
        };
        let lark = match self {
            ToolFormat::Hermes => {
                let more = if tools.parallel {
                    " (\"\\n\" call)*"
                } else {
                    ""
                };
                format!(
                    "start: call{more}\ncall: {open} body {close}\nbody: %json {schema}\n",
                    open = lark_string(&format!("{HERMES_OPEN}\n")),
                    close = lark_string(&format!("\n{HERMES_CLOSE}")),
                    schema = with_layout(one),
                )
            }
            ToolFormat::Mistral => {
                let mut list = json!({"type": "array", "items": one, "minItems": 1});
                if !tools.parallel {
                    list["maxItems"] = json!(1);
                }
                format!(
                    "start: {open} body\nbody: %json {schema}\n",
                    open = lark_string(MISTRAL_OPEN),
                    schema = with_layout(list),
                )
            }
            ToolFormat::Llama3 => format!("start: body\nbody: %json {}\n", with_layout(one)),
        };
        Some(Constraint::ToolCalls(lark))
    }

    /// The marker that opens the calls of an answer.
    fn opener(self) -> &'static str {
        match self {
            ToolFormat::Hermes => HERMES_OPEN,
            ToolFormat::Mistral => MISTRAL_OPEN,
            ToolFormat::Llama3 => "{",
        }
    }

    /// Parses a block of calls (from its opener on); `None` when it is not one.
    fn parse_calls(self, block: &str) -> Option<Vec<Call>> {
        match self {
            ToolFormat::Hermes => {
                let mut calls = Vec::new();
                let mut rest = block.trim();
                while !rest.is_empty() {
                    let body = rest.strip_prefix(HERMES_OPEN)?;
                    let (json, after) = match body.find(HERMES_CLOSE) {
                        Some(end) => (&body[..end], &body[end + HERMES_CLOSE.len()..]),
                        None => (body, ""),
                    };
                    calls.push(self.call(&serde_json::from_str(json.trim()).ok()?)?);
                    rest = after.trim_start();
                }
                Some(calls)
            }
            ToolFormat::Mistral => {
                let body = block.trim().strip_prefix(MISTRAL_OPEN)?;
                match serde_json::from_str(body.trim()).ok()? {
                    Value::Array(items) => items.iter().map(|item| self.call(item)).collect(),
                    item => Some(vec![self.call(&item)?]),
                }
            }
            ToolFormat::Llama3 => {
                let body = block.trim();
                let body = body.strip_prefix(PYTHON_TAG).unwrap_or(body).trim();
                Some(vec![self.call(&serde_json::from_str(body).ok()?)?])
            }
        }
    }

    /// One call object: its name and its arguments (an object, or JSON text of one).
    fn call(self, value: &Value) -> Option<Call> {
        let name = value.get("name")?.as_str()?.to_string();
        let arguments = value
            .get(self.arguments_key())
            .or_else(|| value.get("arguments"))?;
        let arguments = match arguments {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        Some(Call { name, arguments })
    }
}

/// `text` as a Lark string literal.
fn lark_string(text: &str) -> String {
    serde_json::to_string(text).unwrap_or_default()
}

/// The system text that describes the tools to a model whose template has no place for
/// them, asking for calls in the [`ToolFormat::Hermes`] form.
pub fn tools_prompt(tools: &Tools) -> String {
    let mut text = String::from(
        "You may call one or more functions to answer. Their signatures, as JSON schemas:\n<tools>\n",
    );
    for function in &tools.functions {
        text.push_str(&function_json(function).to_string());
        text.push('\n');
    }
    text.push_str(
        "</tools>\nTo call a function, answer with a JSON object holding its name and arguments inside <tool_call></tool_call> tags, one block per call:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>",
    );
    text
}

/// A function as chat templates and OpenAI's API show it:
/// `{"type": "function", "function": {..}}`.
pub fn function_json(function: &Function) -> Value {
    let mut inner = Map::new();
    inner.insert("name".into(), json!(function.name));
    if let Some(description) = &function.description {
        inner.insert("description".into(), json!(description));
    }
    inner.insert("parameters".into(), function.parameters.clone());
    json!({"type": "function", "function": inner})
}

/// A piece of a streamed answer: text for the client, or a whole call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Text of the message's content.
    Content(String),
    /// A tool call.
    Call(Call),
}

/// Finds tool calls in an answer as its text streams in. Text that cannot be the start of a
/// call is passed on as content at once; text that may be is held until it is known; calls
/// are passed on whole. A block that does not parse as calls is passed on as content, so no
/// text is lost.
#[derive(Debug, Clone)]
pub struct ToolStream {
    format: ToolFormat,
    parallel: bool,
    held: String,
    in_calls: bool,
    /// Llama 3: the answer did not start with a call, so it has none.
    plain: bool,
    calls: usize,
}

impl ToolStream {
    /// A parser for answers in `format`; without `parallel`, calls after the first are
    /// dropped.
    pub fn new(format: ToolFormat, parallel: bool) -> Self {
        Self {
            format,
            parallel,
            held: String::new(),
            in_calls: false,
            plain: false,
            calls: 0,
        }
    }

    /// How many calls were passed on.
    pub fn calls(&self) -> usize {
        self.calls
    }

    /// Takes the next text of the answer.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.held.push_str(text);
        let mut pieces = Vec::new();
        if !self.in_calls {
            self.find_opener(&mut pieces);
        }
        if self.in_calls && self.format == ToolFormat::Hermes {
            self.take_closed_calls(&mut pieces);
        }
        pieces
    }

    /// Ends the answer: what is held is passed on (whitespace after calls is dropped).
    pub fn finish(&mut self) -> Vec<Piece> {
        let held = std::mem::take(&mut self.held);
        let mut pieces = Vec::new();
        if held.is_empty() || (self.in_calls && held.trim().is_empty()) {
            return pieces;
        }
        match self
            .in_calls
            .then(|| self.format.parse_calls(&held))
            .flatten()
        {
            Some(calls) => self.pass_calls(calls, &mut pieces),
            None => pieces.push(Piece::Content(held)),
        }
        pieces
    }

    /// Passes on the text before an opener; holds text that may begin one.
    fn find_opener(&mut self, pieces: &mut Vec<Piece>) {
        if self.plain {
            pieces.push(Piece::Content(std::mem::take(&mut self.held)));
            return;
        }
        if self.format == ToolFormat::Llama3 {
            let start = self.held.trim_start();
            if start.is_empty() || PYTHON_TAG.starts_with(start) {
                return;
            }
            if start.starts_with('{') || start.starts_with(PYTHON_TAG) {
                self.in_calls = true;
            } else {
                self.plain = true;
                pieces.push(Piece::Content(std::mem::take(&mut self.held)));
            }
            return;
        }
        let opener = self.format.opener();
        if let Some(at) = self.held.find(opener) {
            let before: String = self.held.drain(..at).collect();
            if !before.is_empty() {
                pieces.push(Piece::Content(before));
            }
            self.in_calls = true;
            return;
        }
        let keep = partial_suffix(&self.held, opener);
        let pass: String = self.held.drain(..self.held.len() - keep).collect();
        if !pass.is_empty() {
            pieces.push(Piece::Content(pass));
        }
    }

    /// Hermes: passes on each call whose closing tag has come.
    fn take_closed_calls(&mut self, pieces: &mut Vec<Piece>) {
        while let Some(end) = self.held.find(HERMES_CLOSE) {
            let block: String = self.held.drain(..end + HERMES_CLOSE.len()).collect();
            match self.format.parse_calls(&block) {
                Some(calls) => self.pass_calls(calls, pieces),
                None => pieces.push(Piece::Content(block)),
            }
        }
    }

    fn pass_calls(&mut self, calls: Vec<Call>, pieces: &mut Vec<Piece>) {
        for call in calls {
            if self.parallel || self.calls == 0 {
                self.calls += 1;
                pieces.push(Piece::Call(call));
            }
        }
    }
}

/// The length of the longest end of `text` that is a proper start of `marker`.
fn partial_suffix(text: &str, marker: &str) -> usize {
    (1..marker.len().min(text.len() + 1))
        .rev()
        .find(|&n| {
            text.is_char_boundary(text.len() - n) && marker.starts_with(&text[text.len() - n..])
        })
        .unwrap_or(0)
}

/// Splits a whole answer into its content and its calls.
pub fn parse_answer(format: ToolFormat, parallel: bool, text: &str) -> (String, Vec<Call>) {
    let mut stream = ToolStream::new(format, parallel);
    let mut pieces = stream.push(text);
    pieces.extend(stream.finish());
    gather(pieces)
}

/// The content (joined) and the calls of an answer's pieces.
fn gather(pieces: Vec<Piece>) -> (String, Vec<Call>) {
    let mut content = String::new();
    let mut calls = Vec::new();
    for piece in pieces {
        match piece {
            Piece::Content(text) => content.push_str(&text),
            Piece::Call(call) => calls.push(call),
        }
    }
    (content, calls)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(name: &str, arguments: &str) -> Call {
        Call {
            name: name.into(),
            arguments: arguments.into(),
        }
    }

    #[test]
    fn hermes_answers_split_into_content_and_calls() {
        let text = "Let me look.<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n{\"name\": \"time\", \"arguments\": {}}\n</tool_call>";
        let (content, calls) = parse_answer(ToolFormat::Hermes, true, text);
        assert_eq!(content, "Let me look.");
        assert_eq!(
            calls,
            vec![call("weather", r#"{"city":"Oslo"}"#), call("time", "{}")]
        );
        let (_, first) = parse_answer(ToolFormat::Hermes, false, text);
        assert_eq!(first, vec![call("weather", r#"{"city":"Oslo"}"#)]);
    }

    #[test]
    fn text_that_is_not_a_call_stays_content() {
        for format in [ToolFormat::Hermes, ToolFormat::Mistral, ToolFormat::Llama3] {
            let text = "a <tool_call> { not json";
            let (content, calls) = parse_answer(format, true, text);
            assert_eq!((content.as_str(), calls.len()), (text, 0), "{format:?}");
        }
        let (content, calls) = parse_answer(ToolFormat::Llama3, true, "{broken");
        assert_eq!((content.as_str(), calls.len()), ("{broken", 0));
    }

    #[test]
    fn mistral_and_llama3_answers_parse() {
        let mistral = r#"[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": "{}"}]"#;
        let (content, calls) = parse_answer(ToolFormat::Mistral, true, mistral);
        assert_eq!(content, "");
        assert_eq!(calls, vec![call("a", r#"{"x":1}"#), call("b", "{}")]);
        let llama = r#"<|python_tag|>{"name": "a", "parameters": {"x": 1}}"#;
        let (_, calls) = parse_answer(ToolFormat::Llama3, true, llama);
        assert_eq!(calls, vec![call("a", r#"{"x":1}"#)]);
        let (content, calls) = parse_answer(ToolFormat::Llama3, true, "Hello {x}");
        assert_eq!((content.as_str(), calls.len()), ("Hello {x}", 0));
    }

    #[test]
    fn streaming_in_any_pieces_gives_what_the_whole_text_gives() {
        let texts = [
            "Sure.<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": \"<tool\"}}\n</tool_call> ok",
            "no calls here, only < and <tool and text",
            "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}}]",
        ];
        for format in [ToolFormat::Hermes, ToolFormat::Mistral] {
            for text in texts {
                let whole = parse_answer(format, true, text);
                for size in 1..6 {
                    let mut stream = ToolStream::new(format, true);
                    let mut pieces = Vec::new();
                    let chars: Vec<char> = text.chars().collect();
                    for chunk in chars.chunks(size) {
                        pieces.extend(stream.push(&chunk.iter().collect::<String>()));
                    }
                    pieces.extend(stream.finish());
                    assert_eq!(gather(pieces), whole, "{format:?} {size} {text:?}");
                }
            }
        }
    }

    #[test]
    fn content_before_a_possible_opener_is_passed_on_at_once() {
        let mut stream = ToolStream::new(ToolFormat::Hermes, true);
        assert_eq!(stream.push("Hi <to"), vec![Piece::Content("Hi ".into())]);
        assert_eq!(stream.push("day"), vec![Piece::Content("<today".into())]);
    }

    /// Walks a forced-call grammar with a seeded random choice among the allowed tokens:
    /// whatever the walk, the text parses as calls whose arguments fit the schema.
    #[test]
    fn forced_calls_parse_in_every_format() {
        let tokenizer = crate::models::demo::demo_tokenizer().unwrap();
        let eos = tokenizer.token_id(tokenizer.eos_token()).unwrap();
        let grammars = crate::models::Grammars::new(&tokenizer, eos).unwrap();
        let function = |name: &str| Function {
            name: name.into(),
            description: None,
            parameters: json!({"type": "object", "properties": {"n": {"type": "integer",
                "minimum": 0, "maximum": 99}}, "required": ["n"], "additionalProperties": false}),
        };
        for format in [ToolFormat::Hermes, ToolFormat::Mistral, ToolFormat::Llama3] {
            for (choice, parallel) in [
                (ToolChoice::Required, false),
                (ToolChoice::Named("g".into()), true),
            ] {
                let tools = Tools {
                    functions: vec![function("f"), function("g")],
                    choice: choice.clone(),
                    parallel,
                };
                let constraint = format.constraint(&tools).unwrap();
                for seed in 0..5u64 {
                    let mut guide = grammars.guide(&constraint).unwrap();
                    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
                    let mut ids = Vec::new();
                    for _ in 0..400 {
                        let mut logits = vec![0.0; tokenizer.vocab_size()];
                        guide.mask(&mut logits).unwrap();
                        let allowed: Vec<usize> = (0..logits.len())
                            .filter(|&i| logits[i].is_finite())
                            .collect();
                        state = state
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let id = allowed[(state >> 33) as usize % allowed.len()] as u32;
                        if id == eos {
                            break;
                        }
                        ids.push(id);
                        if guide.advance(id).unwrap() {
                            break;
                        }
                    }
                    let text = tokenizer.decode(&ids).unwrap();
                    let (content, calls) = parse_answer(format, parallel, &text);
                    assert_eq!(content, "", "{format:?} {text:?}");
                    assert!(!calls.is_empty(), "{format:?} {text:?}");
                    for call in calls {
                        if let ToolChoice::Named(name) = &choice {
                            assert_eq!(&call.name, name);
                        }
                        let arguments: Value = serde_json::from_str(&call.arguments).unwrap();
                        assert!(arguments["n"].as_u64().is_some_and(|n| n <= 99), "{text:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn templates_name_their_format() {
        let cases = [
            ("{{ '[TOOL_CALLS]' }}", ToolFormat::Mistral),
            ("<tool_call>{{ tools }}", ToolFormat::Hermes),
            ("<|start_header_id|>{% if tools %}", ToolFormat::Llama3),
            ("{{ messages }}", ToolFormat::Hermes),
        ];
        for (template, format) in cases {
            assert_eq!(ToolFormat::of_template(template), format, "{template}");
        }
    }
}
