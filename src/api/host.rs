//! DNS-rebinding guard: a server bound to loopback answers only requests whose `Host` is a
//! loopback name (`localhost`, `127.0.0.1`, `[::1]`, any port) or one of `allowed_hosts`, so a
//! web page on another origin cannot reach it through a rebound DNS name (403
//! `host_not_allowed`).

use axum::extract::{Request, State};
use axum::http::header::HOST;
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

/// Middleware applying the guard when the server listens on loopback.
pub async fn check_host(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if !state.server.listen.ip().is_loopback() {
        return next.run(request).await;
    }
    let host = request
        .headers()
        .get(HOST)
        .and_then(|value| value.to_str().ok())
        .map(hostname);
    let allowed = match host {
        None => true,
        Some(name) => {
            matches!(name.as_str(), "localhost" | "127.0.0.1" | "::1")
                || state
                    .server
                    .allowed_hosts
                    .iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(&name))
        }
    };
    if allowed {
        return next.run(request).await;
    }
    ApiError {
        status: StatusCode::FORBIDDEN,
        kind: "permission_error",
        code: "host_not_allowed",
        param: None,
        message: "this server answers only loopback host names (see server.allowed_hosts)"
            .to_string(),
    }
    .into_response()
}

/// The host name of a `Host` value, without port or IPv6 brackets, in lower case.
fn hostname(value: &str) -> String {
    let value = value.trim();
    let name = match value.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => value.rsplit_once(':').map_or(value, |(name, _)| name),
    };
    name.to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::hostname;

    #[test]
    fn host_names_lose_port_and_brackets() {
        assert_eq!(hostname("localhost:8080"), "localhost");
        assert_eq!(hostname("[::1]:8080"), "::1");
        assert_eq!(hostname("127.0.0.1"), "127.0.0.1");
        assert_eq!(hostname("Evil.Example:80"), "evil.example");
    }
}
