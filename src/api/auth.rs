//! Keys: the admin key (`LLORCH_ADMIN_KEY`) guards `/admin/*`; inference keys
//! (`LLORCH_API_KEYS`, comma separated) are recognised so that using one on an admin route is a
//! 403, not a 401. Without an admin key, admin routes answer only clients on loopback.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

/// The keys the daemon knows.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// The admin key, if configured.
    pub admin: Option<String>,
    /// Inference keys (the part before any `:model|model` restriction).
    pub inference: Vec<String>,
}

impl Keys {
    /// Reads `LLORCH_ADMIN_KEY` and `LLORCH_API_KEYS`.
    pub fn from_env() -> Self {
        let admin = std::env::var("LLORCH_ADMIN_KEY")
            .ok()
            .filter(|key| !key.is_empty());
        let inference = std::env::var("LLORCH_API_KEYS")
            .unwrap_or_default()
            .split(',')
            .map(|entry| entry.split(':').next().unwrap_or("").trim().to_string())
            .filter(|key| !key.is_empty())
            .collect();
        Self { admin, inference }
    }
}

/// Compares two secrets in time that depends only on their lengths.
fn same_secret(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, byte) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ byte);
    }
    diff == 0
}

fn bearer(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// Middleware for `/admin/*`.
pub async fn require_admin(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let keys = &state.keys;
    let Some(admin) = &keys.admin else {
        if peer.ip().is_loopback() {
            return next.run(request).await;
        }
        return forbidden("admin routes answer only on loopback when LLORCH_ADMIN_KEY is unset");
    };
    match bearer(&request) {
        Some(token) if same_secret(token, admin) => next.run(request).await,
        Some(token) if keys.inference.iter().any(|key| same_secret(token, key)) => {
            forbidden("an inference key cannot use admin routes")
        }
        _ => {
            let mut response = ApiError {
                status: StatusCode::UNAUTHORIZED,
                kind: "authentication_error",
                code: "invalid_api_key",
                param: None,
                message: "a valid admin key is required (Authorization: Bearer ...)".to_string(),
            }
            .into_response();
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            response
        }
    }
}

fn forbidden(message: &str) -> Response {
    ApiError {
        status: StatusCode::FORBIDDEN,
        kind: "permission_error",
        code: "admin_key_required",
        param: None,
        message: message.to_string(),
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secrets_compare_by_content_and_length() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("abcd", "abc"));
        assert!(!same_secret("", "abc"));
    }
}
