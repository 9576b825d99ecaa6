//! `ApiError`: every non-2xx response, in the OpenAI envelope
//! `{"error":{"message","type","param","code"}}`, with one status mapping.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use crate::actors::engine::EngineError;
use crate::actors::router::{RouteError, RETRY_AFTER_SECS};

/// An error as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The OpenAI error `type`.
    pub kind: &'static str,
    /// A stable machine-readable `code`.
    pub code: &'static str,
    /// The request field at fault, if any.
    pub param: Option<String>,
    /// The human-readable message.
    pub message: String,
}

/// The wire shape of an error.
#[derive(Debug, Serialize)]
pub struct ErrorBody {
    /// The error object.
    pub error: ErrorDetail,
}

/// The inner error object.
#[derive(Debug, Serialize)]
pub struct ErrorDetail {
    /// Human-readable text.
    pub message: String,
    /// OpenAI error type.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Offending parameter.
    pub param: Option<String>,
    /// Stable code.
    pub code: &'static str,
}

impl ApiError {
    /// A 400 `invalid_request_error`.
    pub fn bad_request(
        code: &'static str,
        param: Option<&str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            code,
            param: param.map(str::to_string),
            message: message.into(),
        }
    }

    /// A 503 `service_unavailable_error` (sent with `Retry-After`).
    pub fn unavailable(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::SERVICE_UNAVAILABLE,
            kind: "service_unavailable_error",
            code,
            param: None,
            message: message.into(),
        }
    }

    /// A 404 for an unknown route.
    pub fn route_not_found(path: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            kind: "not_found_error",
            code: "route_not_found",
            param: None,
            message: format!("no route for {path}"),
        }
    }

    /// A 500 `server_error`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            kind: "server_error",
            code: "internal_error",
            param: None,
            message: message.into(),
        }
    }

    /// The envelope as a JSON value (also used for in-stream error events).
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                message: self.message.clone(),
                kind: self.kind,
                param: self.param.clone(),
                code: self.code,
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = (self.status, Json(self.body())).into_response();
        if retry {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response
    }
}

impl From<RouteError> for ApiError {
    fn from(err: RouteError) -> Self {
        let message = err.to_string();
        match err {
            RouteError::UnknownModel(_) => Self {
                status: StatusCode::NOT_FOUND,
                kind: "not_found_error",
                code: "model_not_found",
                param: Some("model".to_string()),
                message,
            },
            RouteError::Overloaded(_) => Self::unavailable("server_overloaded", message),
            RouteError::NotReady { restarting, .. } => Self::unavailable(
                if restarting {
                    "model_restarting"
                } else {
                    "model_loading"
                },
                message,
            ),
            RouteError::Unavailable { .. } => Self::unavailable("model_unavailable", message),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> Self {
        let message = err.to_string();
        match err {
            EngineError::Invalid { code, param, .. } => Self::bad_request(code, param, message),
            EngineError::Generation(_) => Self {
                code: "generation_error",
                ..Self::internal(message)
            },
            EngineError::Crashed(_) => Self {
                code: "model_crashed",
                ..Self::internal(message)
            },
            EngineError::Unavailable(_) => Self::unavailable("model_unavailable", message),
            EngineError::Evicted(_) => Self::unavailable("model_evicted", message),
            EngineError::Stalled(_) => Self::unavailable("generation_stalled", message),
            EngineError::OutOfMemory(_) => Self::unavailable("out_of_memory", message),
            EngineError::SlowReader(_) => Self {
                status: StatusCode::REQUEST_TIMEOUT,
                kind: "timeout_error",
                code: "slow_reader",
                param: None,
                message,
            },
        }
    }
}
