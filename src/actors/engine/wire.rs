//! [`EngineError`] on the cluster wire: its codes and parameters are `&'static str` in the
//! process, so they travel as strings and are read back against the closed lists below (an
//! unknown code, from a newer node, reads as `invalid_request`; an unknown parameter as none).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::EngineError;

/// Every code an [`EngineError::Invalid`] carries.
const CODES: &[&str] = &[
    "empty_prompt",
    "context_length_exceeded",
    "token_out_of_vocabulary",
    "invalid_parameter",
    "chat_template_error",
    "invalid_grammar",
];

/// Every parameter an [`EngineError::Invalid`] names.
const PARAMS: &[&str] = &[
    "prompt",
    "max_tokens",
    "messages",
    "temperature",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "response_format",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "tools",
];

/// An [`EngineError`] as it travels.
#[derive(Serialize, Deserialize)]
enum Wire {
    Invalid {
        code: String,
        param: Option<String>,
        message: String,
    },
    Generation(String),
    Crashed(String),
    Unavailable(String),
    Evicted(String),
    Stalled(String),
    OutOfMemory(String),
    SlowReader(String),
}

/// Writes `error` (for `#[serde(with)]`).
pub fn serialize<S: Serializer>(error: &EngineError, serializer: S) -> Result<S::Ok, S::Error> {
    let wire = match error.clone() {
        EngineError::Invalid {
            code,
            param,
            message,
        } => Wire::Invalid {
            code: code.to_string(),
            param: param.map(str::to_string),
            message,
        },
        EngineError::Generation(m) => Wire::Generation(m),
        EngineError::Crashed(m) => Wire::Crashed(m),
        EngineError::Unavailable(m) => Wire::Unavailable(m),
        EngineError::Evicted(m) => Wire::Evicted(m),
        EngineError::Stalled(m) => Wire::Stalled(m),
        EngineError::OutOfMemory(m) => Wire::OutOfMemory(m),
        EngineError::SlowReader(m) => Wire::SlowReader(m),
    };
    wire.serialize(serializer)
}

/// Reads an error written by [`serialize`].
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<EngineError, D::Error> {
    Ok(match Wire::deserialize(deserializer)? {
        Wire::Invalid {
            code,
            param,
            message,
        } => EngineError::Invalid {
            code: known(CODES, &code).unwrap_or("invalid_request"),
            param: param.and_then(|p| known(PARAMS, &p)),
            message,
        },
        Wire::Generation(m) => EngineError::Generation(m),
        Wire::Crashed(m) => EngineError::Crashed(m),
        Wire::Unavailable(m) => EngineError::Unavailable(m),
        Wire::Evicted(m) => EngineError::Evicted(m),
        Wire::Stalled(m) => EngineError::Stalled(m),
        Wire::OutOfMemory(m) => EngineError::OutOfMemory(m),
        Wire::SlowReader(m) => EngineError::SlowReader(m),
    })
}

fn known(list: &[&'static str], name: &str) -> Option<&'static str> {
    list.iter().copied().find(|known| *known == name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::engine::TokenEvent;

    #[test]
    fn every_error_survives_the_wire() {
        let errors = [
            EngineError::Invalid {
                code: "context_length_exceeded",
                param: Some("max_tokens"),
                message: "too long".into(),
            },
            EngineError::Crashed("boom".into()),
            EngineError::SlowReader("slow".into()),
        ];
        for error in errors {
            let event = TokenEvent::Failed(error);
            let bytes = serde_json::to_vec(&event).unwrap();
            assert_eq!(serde_json::from_slice::<TokenEvent>(&bytes).unwrap(), event);
        }
    }

    #[test]
    fn an_unknown_code_reads_as_an_invalid_request() {
        let text =
            r#"{"Failed":{"Invalid":{"code":"new_code","param":"new_field","message":"m"}}}"#;
        let event: TokenEvent = serde_json::from_str(text).unwrap();
        assert_eq!(
            event,
            TokenEvent::Failed(EngineError::Invalid {
                code: "invalid_request",
                param: None,
                message: "m".into()
            })
        );
    }
}
