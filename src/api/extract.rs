//! `ApiJson`: a JSON body read within the body timeout and the route's size limit, with every
//! rejection in the OpenAI envelope (400, 408, 413 or 415); `ApiQuery`: a query string whose
//! rejection is a 400 in the envelope.

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;

/// A JSON body whose rejections are [`ApiError`]s.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

/// A query string whose rejections are [`ApiError`]s (`invalid_parameter`).
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(value)| Self(value))
            .map_err(|rejection| {
                ApiError::bad_request("invalid_parameter", None, rejection.body_text())
            })
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        check_headers(request.headers())?;
        let timeout = state.server.body_timeout;
        let bytes = tokio::time::timeout(timeout, Bytes::from_request(request, state))
            .await
            .map_err(|_| ApiError {
                status: StatusCode::REQUEST_TIMEOUT,
                kind: "timeout_error",
                code: "request_body_timeout",
                param: None,
                message: format!("the request body was not received within {timeout:?}"),
            })?
            .map_err(body_error)?;
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => {
                let mut error = ApiError::from(rejection);
                if error.code == "invalid_type" && error.param.is_none() {
                    error.param = key_before_error(&bytes, &error.message);
                }
                Err(error)
            }
        }
    }
}

/// Refuses bodies that are not plain JSON: another content type, or any content encoding
/// (bodies are never decompressed, so no compression bomb can grow past the size limit).
fn check_headers(headers: &HeaderMap) -> Result<(), ApiError> {
    let unsupported = |message: String| ApiError {
        status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
        code: "unsupported_media_type",
        ..ApiError::bad_request("", None, message)
    };
    let content_type = headers
        .get(CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .unwrap_or("");
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if mime != "application/json" && !(mime.starts_with("application/") && mime.ends_with("+json"))
    {
        return Err(unsupported(
            "expected request with `Content-Type: application/json`".to_string(),
        ));
    }
    if let Some(encoding) = headers.get(CONTENT_ENCODING) {
        let identity = encoding
            .to_str()
            .is_ok_and(|e| e.trim().eq_ignore_ascii_case("identity"));
        if !identity {
            return Err(unsupported(
                "compressed request bodies are not accepted (Content-Encoding)".to_string(),
            ));
        }
    }
    Ok(())
}

fn body_error(rejection: BytesRejection) -> ApiError {
    let text = rejection.body_text();
    if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            code: "request_too_large",
            ..ApiError::bad_request("", None, text)
        };
    }
    ApiError::bad_request("invalid_body", None, text)
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        let text = rejection.body_text();
        match rejection {
            JsonRejection::JsonDataError(_) if !text.contains("duplicate field") => {
                let field = if text.contains("missing field") {
                    backquoted(&text)
                } else {
                    data_error_path(&text)
                };
                let code = if text.contains("missing field") {
                    "missing_field"
                } else {
                    "invalid_type"
                };
                ApiError::bad_request(code, field.as_deref(), text)
            }
            _ => ApiError::bad_request("invalid_json", None, text),
        }
    }
}

/// The field path serde_path_to_error puts before a data error's message
/// (`... target type: messages[0].role: invalid type ...`), without list indices.
fn data_error_path(text: &str) -> Option<String> {
    let rest = text.split_once("target type: ")?.1;
    let (path, _) = rest.split_once(": ")?;
    let path = path.trim();
    let plain = path
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_.[]".contains(c));
    let top = path.split(['.', '[']).next()?;
    (plain && !top.is_empty() && path != ".").then(|| top.to_string())
}

/// For a data error without a path (fields of a flattened struct lose it), the JSON key whose
/// value ends where serde stopped: the last `"key":` before `line L column C` of the message.
fn key_before_error(body: &[u8], message: &str) -> Option<String> {
    let position = message.rsplit_once(" at line ")?.1;
    let (line, column) = position.split_once(" column ")?;
    let (line, column): (usize, usize) = (line.trim().parse().ok()?, column.trim().parse().ok()?);
    let start = body
        .split(|b| *b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum::<usize>();
    let end = (start + column).min(body.len());
    let before = std::str::from_utf8(body.get(..end)?).ok()?;
    let colon = before.rfind("\":")?;
    let open = before[..colon].rfind('"')?;
    let key = &before[open + 1..colon];
    (!key.is_empty() && key.len() <= 64).then(|| key.to_string())
}

/// The first name in backquotes in serde's message (`missing field `model``).
fn backquoted(text: &str) -> Option<String> {
    let start = text.find('`')? + 1;
    let len = text[start..].find('`')?;
    Some(text[start..start + len].to_string())
}
