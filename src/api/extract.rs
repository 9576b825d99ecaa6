//! `ApiJson`: axum's JSON extractor with its rejections mapped into the OpenAI envelope.

use axum::extract::rejection::JsonRejection;
use axum::extract::FromRequest;
use axum::http::StatusCode;

use super::error::ApiError;

/// A JSON body whose rejections are [`ApiError`]s (400, 413 or 415).
#[derive(Debug, FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let text = rejection.body_text();
        match rejection {
            JsonRejection::JsonSyntaxError(_) => ApiError::bad_request("invalid_json", None, text),
            JsonRejection::JsonDataError(_) => {
                let field = backquoted(&text);
                let code = if text.contains("missing field") {
                    "missing_field"
                } else {
                    "invalid_type"
                };
                ApiError::bad_request(code, field.as_deref(), text)
            }
            JsonRejection::MissingJsonContentType(_) => ApiError {
                status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
                code: "unsupported_media_type",
                ..ApiError::bad_request("", None, text)
            },
            JsonRejection::BytesRejection(_) => ApiError {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                code: "request_too_large",
                ..ApiError::bad_request("", None, text)
            },
            _ => ApiError::bad_request("invalid_json", None, text),
        }
    }
}

/// The first name in backquotes in serde's message (`missing field `model``).
fn backquoted(text: &str) -> Option<String> {
    let start = text.find('`')? + 1;
    let len = text[start..].find('`')?;
    Some(text[start..start + len].to_string())
}
