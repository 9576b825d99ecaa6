//! What llorch does with each OpenAI request field that is not a sampling or stopping
//! parameter ([`super::types::CommonParams`] holds those): a field is honoured, accepted and
//! ignored for a stated reason, or refused with 400 `unsupported_parameter`. A field of no
//! OpenAI schema is ignored and logged at debug (RELIABILITY.md: unknown extra fields must
//! succeed, as in vLLM). The README's table of fields says the same, and
//! `tests/openai_fields.py` checks both against the official client's request schemas.

use serde_json::{Map, Value};

use super::error::ApiError;

/// Which endpoint a request came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /v1/chat/completions`.
    Chat,
    /// `POST /v1/completions`.
    Completions,
}

/// How a field outside the sampling parameters is treated.
#[derive(Debug, Clone, Copy)]
enum Rule {
    /// Accepted and ignored; the text says why ignoring it changes nothing the client sees.
    Ignored(&'static str),
    /// Accepted when `accept` holds for its value (a value that asks for nothing llorch does
    /// not do, such as `response_format: {"type": "text"}`), refused otherwise with the text.
    Only(fn(&Value) -> bool, &'static str),
    /// Refused with the text.
    Refused(&'static str),
}

/// The chat request's fields that are not sampling parameters, with their rules.
const CHAT: &[(&str, Rule)] = &[
    ("user", Rule::Ignored(IDENTITY)),
    ("safety_identifier", Rule::Ignored(IDENTITY)),
    ("metadata", Rule::Ignored(STORE)),
    ("store", Rule::Ignored(STORE)),
    ("service_tier", Rule::Ignored(TIER)),
    ("prompt_cache_key", Rule::Ignored(CACHE_KEY)),
    ("prompt_cache_options", Rule::Ignored(CACHE_KEY)),
    ("prompt_cache_retention", Rule::Ignored(CACHE_KEY)),
    (
        "prediction",
        Rule::Ignored("a predicted output only speeds up OpenAI's decoding; the output is the same without it"),
    ),
    ("functions", Rule::Only(is_empty_list, FUNCTIONS)),
    ("function_call", Rule::Only(is_no_tool_choice, FUNCTIONS)),
    (
        "modalities",
        Rule::Only(is_text_modality, "only the text modality is served"),
    ),
    ("audio", Rule::Refused("audio output is not served")),
    (
        "reasoning_effort",
        Rule::Refused("the served models do not take a reasoning effort"),
    ),
    (
        "verbosity",
        Rule::Refused("the served models do not take a verbosity setting"),
    ),
    ("web_search_options", Rule::Refused("web search is not served")),
    (
        "moderation",
        Rule::Refused("llorch runs no moderation on requests or outputs"),
    ),
];

/// The completion request's fields that are not sampling parameters, with their rules.
const COMPLETIONS: &[(&str, Rule)] = &[
    ("user", Rule::Ignored(IDENTITY)),
    (
        "best_of",
        Rule::Only(
            is_one,
            "best_of above 1 is not supported (one candidate is generated per choice)",
        ),
    ),
    (
        "suffix",
        Rule::Only(
            is_null_or_empty_text,
            "suffix (insertion) is not supported: the served models complete text left to right",
        ),
    ),
];

/// The fields of a chat message other than `role` and `content`.
const MESSAGE: &[(&str, Rule)] = &[
    (
        "name",
        Rule::Ignored("the served chat templates have no place for a participant's name"),
    ),
    (
        "refusal",
        Rule::Ignored("an earlier refusal's text is the message's content to the template"),
    ),
    ("function_call", Rule::Only(Value::is_null, FUNCTIONS)),
    ("audio", Rule::Only(Value::is_null, "audio is not served")),
];

const IDENTITY: &str =
    "an end-user identifier for OpenAI's abuse monitoring; llorch neither logs nor uses it";
const STORE: &str = "llorch stores no completions, so there is nothing to store or tag";
const TIER: &str = "llorch has one service tier";
const CACHE_KEY: &str =
    "llorch's prefix cache matches prompts by their tokens, whatever the key or retention asked";
const FUNCTIONS: &str =
    "the functions API is deprecated and not served; give tools and tool_choice (tool_calls on messages)";

/// The rules of `endpoint`'s request fields.
fn rules(endpoint: Endpoint) -> &'static [(&'static str, Rule)] {
    match endpoint {
        Endpoint::Chat => CHAT,
        Endpoint::Completions => COMPLETIONS,
    }
}

/// Checks the fields of a request that its types did not take: each must be one whose rule
/// accepts its value. A field of the other endpoint's schema is refused there; a field of no
/// OpenAI schema (another server's extension) is ignored and logged at debug, as vLLM does.
pub fn check_request(endpoint: Endpoint, rest: &Map<String, Value>) -> Result<(), ApiError> {
    let other = match endpoint {
        Endpoint::Chat => COMPLETIONS,
        Endpoint::Completions => CHAT,
    };
    let (honoured_elsewhere, reason) = match endpoint {
        Endpoint::Chat => (COMPLETIONS_HONOURED, "a completions field"),
        Endpoint::Completions => (CHAT_HONOURED, "a chat completions field"),
    };
    let given = |f: &&&str| rest.get(**f).is_some_and(|v| !v.is_null());
    if let Some(field) = honoured_elsewhere.iter().find(given) {
        return Err(ApiError::bad_request(
            "unsupported_parameter",
            Some(field),
            format!("{field}: {reason}, not one of this endpoint"),
        ));
    }
    check(rules(endpoint), other, rest, "")
}

/// Fields the chat request's types take that completions refuse.
const CHAT_HONOURED: &[&str] = &["tools", "tool_choice", "parallel_tool_calls"];
/// Fields the completion request's types take that chat refuses.
const COMPLETIONS_HONOURED: &[&str] = &["echo"];

/// Checks the fields of a chat message other than `role` and `content`.
pub fn check_message(rest: &Map<String, Value>) -> Result<(), ApiError> {
    check(MESSAGE, &[], rest, "messages.")
}

fn check(
    rules: &[(&str, Rule)],
    other: &[(&str, Rule)],
    rest: &Map<String, Value>,
    prefix: &str,
) -> Result<(), ApiError> {
    // Sorted, so that the first refused field is the same whatever the map's order.
    let mut names: Vec<&String> = rest.keys().collect();
    names.sort();
    for name in names {
        let value = &rest[name];
        let param = format!("{prefix}{name}");
        let refuse = |reason: &str| {
            Err(ApiError::bad_request(
                "unsupported_parameter",
                Some(&param),
                format!("{param}: {reason}"),
            ))
        };
        match rules.iter().find(|(field, _)| field == name) {
            None if other.iter().any(|(field, _)| field == name) => {
                return refuse("not a field of this endpoint")
            }
            None => tracing::debug!(field = %param, "unknown request field ignored"),
            Some((_, Rule::Ignored(reason))) => {
                tracing::debug!(field = %param, reason, "request field accepted and ignored");
            }
            Some((_, Rule::Only(accept, _))) if value.is_null() || accept(value) => {}
            Some((_, Rule::Only(_, reason) | Rule::Refused(reason))) => return refuse(reason),
        }
    }
    Ok(())
}

fn is_empty_list(value: &Value) -> bool {
    value.as_array().is_some_and(Vec::is_empty)
}

fn is_no_tool_choice(value: &Value) -> bool {
    matches!(value.as_str(), Some("none" | "auto"))
}

fn is_text_modality(value: &Value) -> bool {
    value
        .as_array()
        .is_some_and(|list| list.iter().all(|m| m.as_str() == Some("text")))
}

fn is_one(value: &Value) -> bool {
    value.as_u64() == Some(1)
}

fn is_null_or_empty_text(value: &Value) -> bool {
    value.as_str().is_some_and(str::is_empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rest(value: Value) -> Map<String, Value> {
        value.as_object().unwrap().clone()
    }

    fn refused_param(result: Result<(), ApiError>) -> String {
        let error = result.unwrap_err();
        assert_eq!(error.code, "unsupported_parameter");
        assert_eq!(error.status, axum::http::StatusCode::BAD_REQUEST);
        error.param.unwrap()
    }

    /// Every rule as a README row: `| endpoint | field | treatment |`, the treatment
    /// `ignored` or `refused` (`Only` rules refuse the values that ask for more).
    fn rows() -> Vec<String> {
        let rows = |endpoint: &'static str, rules: &'static [(&'static str, Rule)]| {
            rules.iter().map(move |(field, rule)| {
                let treatment = match rule {
                    Rule::Ignored(_) => "ignored",
                    Rule::Only(..) | Rule::Refused(_) => "refused",
                };
                format!("| {endpoint} | `{field}` | {treatment}")
            })
        };
        rows("chat", CHAT)
            .chain(rows("completions", COMPLETIONS))
            .chain(rows("message", MESSAGE))
            .collect()
    }

    #[test]
    fn the_readme_lists_every_rule_with_its_treatment() {
        let readme = include_str!("../../README.md");
        for row in rows() {
            assert!(readme.contains(&row), "README lacks the row {row:?}");
        }
    }

    #[test]
    fn ignored_fields_are_accepted_with_any_value() {
        let fields =
            json!({"user": "u1", "store": true, "metadata": {"a": "b"}, "service_tier": "flex"});
        check_request(Endpoint::Chat, &rest(fields)).unwrap();
    }

    #[test]
    fn a_field_that_asks_for_nothing_new_is_accepted_and_one_that_does_is_refused() {
        let text = json!({"functions": [], "function_call": "none"});
        check_request(Endpoint::Chat, &rest(text)).unwrap();
        let functions = json!({"functions": [{"name": "f"}]});
        assert_eq!(
            refused_param(check_request(Endpoint::Chat, &rest(functions))),
            "functions"
        );
    }

    #[test]
    fn unknown_fields_pass_and_the_other_endpoints_fields_are_refused() {
        check_request(Endpoint::Chat, &rest(json!({"guided_json": {}, "x": 1}))).unwrap();
        let tools = json!({"tools": [{"type": "function"}]});
        assert_eq!(
            refused_param(check_request(Endpoint::Completions, &rest(tools))),
            "tools"
        );
        let echo = json!({"echo": true});
        assert_eq!(
            refused_param(check_request(Endpoint::Chat, &rest(echo))),
            "echo"
        );
        check_request(Endpoint::Completions, &rest(json!({"best_of": 1}))).unwrap();
    }

    #[test]
    fn message_fields_are_named_with_their_path() {
        check_message(&rest(json!({"name": "bob", "refusal": null}))).unwrap();
        let call = json!({"function_call": {"name": "f", "arguments": "{}"}});
        assert_eq!(
            refused_param(check_message(&rest(call))),
            "messages.function_call"
        );
    }
}
