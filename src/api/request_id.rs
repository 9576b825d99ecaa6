//! `x-request-id`: echoed when the client sends a sane one (at most 128 visible ASCII
//! characters), generated otherwise, set on every response and carried in the request's
//! tracing span. Every answer is logged at info level with its status and latency (never its
//! headers or body).

use axum::extract::Request;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use rand::Rng;
use tracing::Instrument;

/// The header name.
const HEADER: &str = "x-request-id";
/// Longest client-supplied id that is echoed.
const MAX_LEN: usize = 128;

/// A client's id, if it is usable.
fn sane(value: &HeaderValue) -> Option<String> {
    let text = value.to_str().ok()?;
    let visible = text.bytes().all(|b| b.is_ascii_graphic());
    (!text.is_empty() && text.len() <= MAX_LEN && visible).then(|| text.to_string())
}

fn generate() -> String {
    let bytes: [u8; 16] = rand::rng().random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Middleware that assigns and echoes the request id.
pub async fn request_id(mut request: Request, next: Next) -> Response {
    let id = request
        .headers()
        .get(HEADER)
        .and_then(sane)
        .unwrap_or_else(generate);
    if let Ok(value) = HeaderValue::from_str(&id) {
        request.headers_mut().insert(HEADER, value);
    }
    let span = tracing::info_span!("request", request_id = %id, method = %request.method(), path = %request.uri().path());
    let started = std::time::Instant::now();
    let mut response = next.run(request).instrument(span.clone()).await;
    span.in_scope(|| {
        tracing::info!(
            status = response.status().as_u16(),
            millis = started.elapsed().as_millis() as u64,
            "answered"
        )
    });
    if let Ok(value) = HeaderValue::from_str(&id) {
        response.headers_mut().insert(HEADER, value);
    }
    response
}
