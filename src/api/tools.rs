//! Tool calls on the wire: a chat request's `tools`, `tool_choice` and `parallel_tool_calls`
//! validated into [`Tools`], an earlier assistant message's `tool_calls`, and the calls of an
//! answer as `message.tool_calls` or streamed `delta.tool_calls`.

use rand::Rng;
use serde_json::{json, Value};

use super::error::ApiError;
use crate::models::{Call, Function, MessageCall, ToolChoice, Tools};

/// Most functions a request may offer (OpenAI's limit).
pub const MAX_TOOLS: usize = 128;
/// Longest function name (OpenAI's limit).
const MAX_NAME: usize = 64;

/// The request's tools, `None` when it offers none or `tool_choice` is `none`.
pub fn request_tools(
    list: Option<&[Value]>,
    choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<Tools>, ApiError> {
    let list = list.unwrap_or_default();
    if list.len() > MAX_TOOLS {
        return Err(invalid(
            "tools",
            format!("at most {MAX_TOOLS} tools are allowed"),
        ));
    }
    let mut functions: Vec<Function> = Vec::new();
    for (i, tool) in list.iter().enumerate() {
        let function =
            function(tool).map_err(|why| invalid("tools", format!("tools[{i}]: {why}")))?;
        if functions.iter().any(|f| f.name == function.name) {
            return Err(invalid(
                "tools",
                format!("tools[{i}]: the name {:?} is given twice", function.name),
            ));
        }
        functions.push(function);
    }
    let choice = match choice {
        None | Some(Value::Null) => None,
        Some(value) => Some(tool_choice(value, &functions)?),
    };
    let choice = match (choice, functions.is_empty()) {
        (Some(None), _) | (None, true) => return Ok(None),
        (None, false) => ToolChoice::Auto,
        (Some(Some(ToolChoice::Auto)), true) => return Ok(None),
        (Some(Some(_)), true) => {
            return Err(invalid(
                "tool_choice",
                "tool_choice asks for a call, but the request gives no tools".into(),
            ))
        }
        (Some(Some(choice)), false) => choice,
    };
    Ok(Some(Tools {
        functions,
        choice,
        parallel: parallel.unwrap_or(true),
    }))
}

/// One `{"type": "function", "function": {..}}` entry.
fn function(tool: &Value) -> Result<Function, String> {
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(other) => {
            return Err(format!(
                "tools of type {other:?} are not supported; give functions"
            ))
        }
        None => return Err("a tool needs \"type\": \"function\"".into()),
    }
    let inner = tool
        .get("function")
        .filter(|f| f.is_object())
        .ok_or("a tool needs a \"function\" object")?;
    let name = inner
        .get("name")
        .and_then(Value::as_str)
        .ok_or("a function needs a \"name\"")?;
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    if name.is_empty() || name.len() > MAX_NAME || !name.chars().all(valid) {
        return Err(format!(
            "the function name {name:?} must be 1 to {MAX_NAME} letters, digits, '_' or '-'"
        ));
    }
    let description = match inner.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(text)) => Some(text.clone()),
        Some(_) => return Err("a function's \"description\" must be a string".into()),
    };
    let parameters = match inner.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(schema @ Value::Object(_)) => schema.clone(),
        Some(_) => return Err("a function's \"parameters\" must be a JSON schema object".into()),
    };
    Ok(Function {
        name: name.to_string(),
        description,
        parameters,
    })
}

/// `tool_choice`: `None` inside for `"none"`.
fn tool_choice(value: &Value, functions: &[Function]) -> Result<Option<ToolChoice>, ApiError> {
    match value {
        Value::String(choice) => match choice.as_str() {
            "none" => Ok(None),
            "auto" => Ok(Some(ToolChoice::Auto)),
            "required" => Ok(Some(ToolChoice::Required)),
            other => Err(invalid(
                "tool_choice",
                format!("tool_choice {other:?} is not none, auto, required or a function"),
            )),
        },
        Value::Object(object) => {
            match object.get("type").and_then(Value::as_str) {
                Some("function") => {}
                Some(kind) => {
                    return Err(ApiError::bad_request(
                        "unsupported_parameter",
                        Some("tool_choice"),
                        format!("tool_choice of type {kind:?} is not supported; name a function"),
                    ))
                }
                None => {
                    return Err(invalid(
                        "tool_choice",
                        "tool_choice needs a \"type\"".into(),
                    ))
                }
            }
            let name = value
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid("tool_choice", "tool_choice.function.name is missing".into())
                })?;
            if !functions.iter().any(|f| f.name == name) {
                return Err(invalid(
                    "tool_choice",
                    format!("tool_choice names {name:?}, which is not one of the tools"),
                ));
            }
            Ok(Some(ToolChoice::Named(name.to_string())))
        }
        _ => Err(invalid(
            "tool_choice",
            "tool_choice must be a string or an object".into(),
        )),
    }
}

/// An earlier assistant message's `tool_calls`.
pub fn message_calls(calls: &[Value]) -> Result<Vec<MessageCall>, ApiError> {
    calls
        .iter()
        .enumerate()
        .map(|(i, call)| {
            let text = |key: &str| {
                call.get("function")
                    .and_then(|f| f.get(key))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            let id = call.get("id").and_then(Value::as_str);
            match (id, text("name"), text("arguments")) {
                (Some(id), Some(name), Some(arguments)) => Ok(MessageCall {
                    id: id.to_string(),
                    name,
                    arguments,
                }),
                _ => Err(invalid(
                    "messages",
                    format!("tool_calls[{i}] needs an id and a function with a name and arguments (a string)"),
                )),
            }
        })
        .collect()
}

/// A call as OpenAI writes it: `{"id", "type": "function", "function": {name, arguments}}`,
/// with a fresh id.
pub fn call_json(call: &Call) -> Value {
    let suffix: String = (0..24)
        .map(|_| {
            let i = rand::rng().random_range(0..36);
            char::from_digit(i, 36).unwrap_or('0')
        })
        .collect();
    json!({
        "id": format!("call_{suffix}"),
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    })
}

fn invalid(param: &'static str, message: String) -> ApiError {
    ApiError::bad_request("invalid_parameter", Some(param), message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}})
    }

    #[test]
    fn tool_choice_defaults_to_auto_and_none_removes_the_tools() {
        let list = [weather()];
        let tools = request_tools(Some(&list), None, None).unwrap().unwrap();
        assert_eq!((tools.choice, tools.parallel), (ToolChoice::Auto, true));
        assert_eq!(
            request_tools(Some(&list), Some(&json!("none")), None),
            Ok(None)
        );
        assert_eq!(request_tools(None, Some(&json!("auto")), None), Ok(None));
        let named = json!({"type": "function", "function": {"name": "weather"}});
        let tools = request_tools(Some(&list), Some(&named), Some(false))
            .unwrap()
            .unwrap();
        assert_eq!(tools.choice, ToolChoice::Named("weather".into()));
        assert!(!tools.parallel);
    }

    #[test]
    fn bad_tools_and_choices_are_refused_naming_the_field() {
        let list = [weather()];
        let cases = [
            (
                vec![json!({"type": "custom", "custom": {"name": "x"}})],
                json!(null),
                "tools",
            ),
            (
                vec![json!({"type": "function", "function": {"name": "a b"}})],
                json!(null),
                "tools",
            ),
            (vec![weather(), weather()], json!(null), "tools"),
            (list.to_vec(), json!("always"), "tool_choice"),
            (
                list.to_vec(),
                json!({"type": "function", "function": {"name": "other"}}),
                "tool_choice",
            ),
            (Vec::new(), json!("required"), "tool_choice"),
        ];
        for (list, choice, param) in cases {
            let error = request_tools(Some(&list), Some(&choice), None).unwrap_err();
            assert_eq!(error.param.as_deref(), Some(param), "{list:?} {choice}");
        }
    }

    #[test]
    fn earlier_calls_need_ids_names_and_argument_text() {
        let good =
            json!([{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]);
        let calls = message_calls(good.as_array().unwrap()).unwrap();
        assert_eq!(calls[0].name, "f");
        let bad = json!([{"id": "c1", "function": {"name": "f", "arguments": {}}}]);
        assert!(message_calls(bad.as_array().unwrap()).is_err());
    }
}
