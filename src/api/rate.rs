//! Per-caller rate limiting (off unless `server.rate_limit` is set): a token bucket per key, or
//! per client address when no keys are configured. A request over the rate gets 429
//! `rate_limit_exceeded` with `Retry-After`; other callers are not affected.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

/// Who is calling, as the auth middleware established it (a key's index, or none).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    /// The admin key.
    Admin,
    /// The inference key at this index of `LLORCH_API_KEYS`.
    Key(usize),
    /// No keys are configured: callers are told apart by address.
    Anonymous,
}

impl Caller {
    /// The prefix-cache salt of this caller's requests: callers with different keys never
    /// reuse each other's cached prompts (a short time to first token would tell one caller
    /// what another sent). Callers of a pool without keys share one salt.
    pub fn cache_salt(&self) -> u64 {
        match self {
            Caller::Anonymous => 0,
            Caller::Admin => 1,
            Caller::Key(index) => 2 + *index as u64,
        }
    }
}

pub use crate::config::Rate;

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// Token buckets by caller.
#[derive(Debug, Default)]
pub struct Limiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl Limiter {
    /// Takes a token for `caller`, or returns how long until one is available.
    pub fn take(&self, caller: &str, rate: Rate) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let bucket = buckets.entry(caller.to_string()).or_insert(Bucket {
            tokens: rate.burst,
            updated: now,
        });
        let refill = now.duration_since(bucket.updated).as_secs_f64() * rate.per_second;
        bucket.tokens = (bucket.tokens + refill).min(rate.burst);
        bucket.updated = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            return Ok(());
        }
        Err(Duration::from_secs_f64(
            (1.0 - bucket.tokens) / rate.per_second,
        ))
    }
}

/// Middleware for inference routes, after authentication.
pub async fn limit(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let Some(rate) = state.server.rate_limit else {
        return next.run(request).await;
    };
    let caller = match request.extensions().get::<Caller>() {
        Some(Caller::Admin) => "admin".to_string(),
        Some(Caller::Key(index)) => format!("key#{index}"),
        Some(Caller::Anonymous) | None => format!("ip:{}", peer.ip()),
    };
    match state.limiter.take(&caller, rate) {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            let mut response = ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                kind: "rate_limit_error",
                code: "rate_limit_exceeded",
                param: None,
                message: format!(
                    "more than {} requests per second; retry in {} ms",
                    rate.per_second,
                    wait.as_millis()
                ),
            }
            .into_response();
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds.max(1)));
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refuses_until_it_refills() {
        let limiter = Limiter::default();
        let rate = Rate {
            per_second: 10.0,
            burst: 3.0,
        };
        for _ in 0..3 {
            assert!(limiter.take("a", rate).is_ok());
        }
        let wait = limiter.take("a", rate).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(
            limiter.take("b", rate).is_ok(),
            "another caller has its own bucket"
        );
        std::thread::sleep(Duration::from_millis(120));
        assert!(limiter.take("a", rate).is_ok());
    }
}
