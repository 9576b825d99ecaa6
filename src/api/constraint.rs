//! The request fields that constrain the output: OpenAI's `response_format` (`text`,
//! `json_object`, `json_schema`) and vLLM's `guided_regex`, `guided_choice` and
//! `guided_grammar` (a Lark grammar); at most one per request.

use serde_json::Value;

use super::error::ApiError;
use super::types::CommonParams;
use crate::models::Constraint;

impl CommonParams {
    /// The constraint the request asks for, if any.
    pub fn constraint(&self) -> Result<Option<Constraint>, ApiError> {
        let mut asked = Vec::new();
        if let Some(format) = &self.response_format {
            if let Some(constraint) = response_format(format)? {
                asked.push(constraint);
            }
        }
        if let Some(regex) = &self.guided_regex {
            asked.push(Constraint::Regex(regex.clone()));
        }
        if let Some(choices) = &self.guided_choice {
            if choices.is_empty() {
                return Err(invalid(
                    "guided_choice",
                    "guided_choice needs at least one string",
                ));
            }
            asked.push(Constraint::Choice(choices.clone()));
        }
        if let Some(grammar) = &self.guided_grammar {
            asked.push(Constraint::Lark(grammar.clone()));
        }
        match asked.as_slice() {
            [] | [_] => Ok(asked.pop()),
            [_, second, ..] => Err(invalid(
                second.param(),
                "give at most one of response_format (json_object or json_schema), guided_regex, guided_choice and guided_grammar",
            )),
        }
    }
}

/// `response_format`: `{"type": "text"}` asks for nothing, `json_object` for any JSON
/// object, `json_schema` for a value valid against `json_schema.schema`.
fn response_format(format: &Value) -> Result<Option<Constraint>, ApiError> {
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Constraint::JsonObject)),
        Some("json_schema") => match format.get("json_schema").and_then(|s| s.get("schema")) {
            Some(schema) if schema.is_object() => Ok(Some(Constraint::JsonSchema(schema.clone()))),
            _ => Err(invalid(
                "response_format",
                "response_format json_schema needs json_schema.schema, a JSON schema object",
            )),
        },
        _ => Err(invalid(
            "response_format",
            "response_format.type must be text, json_object or json_schema",
        )),
    }
}

fn invalid(param: &'static str, message: &str) -> ApiError {
    ApiError::bad_request("invalid_parameter", Some(param), message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(fields: Value) -> CommonParams {
        serde_json::from_value(fields).unwrap()
    }

    #[test]
    fn response_formats_map_to_constraints() {
        assert_eq!(
            params(json!({"response_format": {"type": "text"}})).constraint(),
            Ok(None)
        );
        assert_eq!(
            params(json!({"response_format": {"type": "json_object"}})).constraint(),
            Ok(Some(Constraint::JsonObject))
        );
        let schema = json!({"type": "object"});
        let format = json!({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}});
        assert_eq!(
            params(json!({"response_format": format})).constraint(),
            Ok(Some(Constraint::JsonSchema(schema)))
        );
        for bad in [json!({"type": "json_schema"}), json!({"type": "yaml"})] {
            let error = params(json!({"response_format": bad}))
                .constraint()
                .unwrap_err();
            assert_eq!(error.param.as_deref(), Some("response_format"));
        }
    }

    #[test]
    fn two_constraints_are_refused_naming_the_second() {
        let error =
            params(json!({"response_format": {"type": "json_object"}, "guided_regex": "a"}))
                .constraint()
                .unwrap_err();
        assert_eq!(error.param.as_deref(), Some("guided_regex"));
        let empty = params(json!({"guided_choice": []}))
            .constraint()
            .unwrap_err();
        assert_eq!(empty.param.as_deref(), Some("guided_choice"));
    }
}
