//! Keys, bearer tokens compared in constant time (SHA-256 digests, `subtle`'s equality, every
//! configured key compared with no early exit).
//!
//! - The admin key (`LLORCH_ADMIN_KEY`) guards `/admin/*`; an inference key there is a 403.
//!   Without an admin key, admin routes answer only clients on loopback.
//! - Inference keys (`LLORCH_API_KEYS="key1:modelA|modelB,key2"`: a key, optionally limited to
//!   some models) guard `/v1/*` and `/execute` once any key is configured; the admin key works
//!   there too. A key limited to some models gets 403 `model_not_allowed` for the others and
//!   sees only its models in `/v1/models`. `/health` and `/ready` are always public.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

use super::error::ApiError;
use super::rate::Caller;
use super::AppState;

/// The keys the daemon knows.
#[derive(Debug, Clone, Default)]
pub struct Keys {
    /// The admin key, if configured.
    pub admin: Option<String>,
    /// Inference keys.
    pub inference: Vec<InferenceKey>,
}

/// One inference key and the models it may use (`None`: all).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InferenceKey {
    /// The secret.
    pub key: String,
    /// The models it may use.
    pub models: Option<Vec<String>>,
}

/// What an authenticated request may use; handlers read it from the request extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    /// Every model.
    All,
    /// Only these models.
    Models(Vec<String>),
}

impl Access {
    /// Whether `model` may be used.
    pub fn allows(&self, model: &str) -> bool {
        match self {
            Access::All => true,
            Access::Models(models) => models.iter().any(|m| m == model),
        }
    }

    /// Refuses a model this key may not use with 403 `model_not_allowed`.
    pub fn check(&self, model: &str) -> Result<(), ApiError> {
        if self.allows(model) {
            return Ok(());
        }
        Err(ApiError {
            status: StatusCode::FORBIDDEN,
            kind: "permission_error",
            code: "model_not_allowed",
            param: Some("model".to_string()),
            message: format!("this key may not use the model {model:?}"),
        })
    }
}

impl Keys {
    /// Reads `LLORCH_ADMIN_KEY` and `LLORCH_API_KEYS`.
    pub fn from_env() -> Self {
        Self::parse(
            std::env::var("LLORCH_ADMIN_KEY").ok().as_deref(),
            &std::env::var("LLORCH_API_KEYS").unwrap_or_default(),
        )
    }

    /// Parses an admin key and an `LLORCH_API_KEYS` value (`key1:modelA|modelB,key2`).
    pub fn parse(admin: Option<&str>, api_keys: &str) -> Self {
        let inference = api_keys
            .split(',')
            .filter_map(|entry| {
                let (key, models) = match entry.split_once(':') {
                    Some((key, models)) => {
                        let models = models.split('|').map(|m| m.trim().to_string());
                        (key, Some(models.filter(|m| !m.is_empty()).collect()))
                    }
                    None => (entry, None),
                };
                let key = key.trim();
                (!key.is_empty()).then(|| InferenceKey {
                    key: key.to_string(),
                    models,
                })
            })
            .collect();
        Self {
            admin: admin.filter(|key| !key.is_empty()).map(str::to_string),
            inference,
        }
    }

    /// Whether any key is configured (then inference routes need one).
    pub fn any(&self) -> bool {
        self.admin.is_some() || !self.inference.is_empty()
    }
}

/// Compares two secrets as SHA-256 digests with a constant-time equality, so the time taken
/// depends on neither their contents nor their lengths.
fn same_secret(given: &str, expected: &str) -> bool {
    secret_matches(given, expected).into()
}

fn secret_matches(given: &str, expected: &str) -> Choice {
    Sha256::digest(given.as_bytes()).ct_eq(&Sha256::digest(expected.as_bytes()))
}

/// The inference key `token` is, with its index, comparing it with every key (no early exit).
fn find_inference_key<'a>(
    keys: &'a [InferenceKey],
    token: &str,
) -> Option<(usize, &'a InferenceKey)> {
    let mut found = None;
    for (index, key) in keys.iter().enumerate() {
        if bool::from(secret_matches(token, &key.key)) && found.is_none() {
            found = Some((index, key));
        }
    }
    found
}

/// The token of the request's one `Authorization: Bearer` header (the scheme in any letter
/// case); none when the header is missing, repeated, not ASCII or another scheme.
fn bearer(request: &Request) -> Option<&str> {
    let mut values = request.headers().get_all(header::AUTHORIZATION).iter();
    let value = values.next()?.to_str().ok()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token)
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
        Some(token) if find_inference_key(&keys.inference, token).is_some() => {
            forbidden("an inference key cannot use admin routes")
        }
        _ => unauthorized("a valid admin key is required (Authorization: Bearer ...)"),
    }
}

/// Middleware for inference routes: once any key is configured, a valid inference or admin key
/// is required; the request carries what it may use as an [`Access`] extension.
pub async fn require_inference_key(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let keys = &state.keys;
    let access = if !keys.any() {
        request.extensions_mut().insert(Caller::Anonymous);
        Access::All
    } else {
        let token = bearer(&request).unwrap_or("");
        let admin = keys
            .admin
            .as_deref()
            .is_some_and(|key| same_secret(token, key));
        let inference = find_inference_key(&keys.inference, token);
        let caller = match (admin, inference) {
            (true, _) => Some(Caller::Admin),
            (false, Some((index, _))) => Some(Caller::Key(index)),
            (false, None) => None,
        };
        if let Some(caller) = caller {
            request.extensions_mut().insert(caller);
        }
        match (admin, inference) {
            (true, _) => Access::All,
            (false, Some((_, key))) => match &key.models {
                None => Access::All,
                Some(models) => Access::Models(models.clone()),
            },
            (false, None) => {
                return unauthorized("a valid API key is required (Authorization: Bearer ...)")
            }
        }
    };
    request.extensions_mut().insert(access);
    next.run(request).await
}

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError {
        status: StatusCode::UNAUTHORIZED,
        kind: "authentication_error",
        code: "invalid_api_key",
        param: None,
        message: message.to_string(),
    }
    .into_response();
    response
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    response
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
    use super::*;

    #[test]
    fn api_keys_parse_with_model_limits() {
        let keys = Keys::parse(Some("adm"), "k1:alpha|beta, k2 ,,");
        assert_eq!(keys.admin.as_deref(), Some("adm"));
        assert_eq!(
            keys.inference,
            vec![
                InferenceKey {
                    key: "k1".into(),
                    models: Some(vec!["alpha".into(), "beta".into()])
                },
                InferenceKey {
                    key: "k2".into(),
                    models: None
                },
            ]
        );
        assert!(!Keys::parse(None, "").any());
        assert!(Access::Models(vec!["alpha".into()]).check("beta").is_err());
    }

    #[test]
    fn secrets_compare_by_content_and_length() {
        assert!(same_secret("abc", "abc"));
        assert!(!same_secret("abd", "abc"));
        assert!(!same_secret("ab", "abc"));
        assert!(!same_secret("abcd", "abc"));
        assert!(!same_secret("", "abc"));
        assert!(!same_secret("ABC", "abc"));
    }

    #[test]
    fn every_key_is_compared_and_the_first_match_wins() {
        let keys = Keys::parse(None, "k1:alpha,k2,k1");
        let (index, found) = find_inference_key(&keys.inference, "k1").unwrap();
        assert_eq!(
            (index, found.models.clone()),
            (0, Some(vec!["alpha".to_string()]))
        );
        assert_eq!(find_inference_key(&keys.inference, "k2").unwrap().0, 1);
        assert!(find_inference_key(&keys.inference, "k3").is_none());
    }
}
