//! The web console: a page served at `/` with its scripts and styles under `/console/`, all
//! embedded in the binary (it works offline). It reads the admin API with the key typed into
//! the page, so it is public itself; every response carries a strict Content-Security-Policy
//! (scripts, styles and connections from this origin only, no inline script, no frames).

use axum::extract::Path as UrlPath;
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// The policy every console response carries.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; \
     frame-ancestors 'none'";

/// The page and its assets: name under `/console/`, content type, body.
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", JS, include_str!("app.js")),
    ("util.js", JS, include_str!("util.js")),
    ("pool.js", JS, include_str!("pool.js")),
    ("actions.js", JS, include_str!("actions.js")),
    ("playground.js", JS, include_str!("playground.js")),
    ("charts.js", JS, include_str!("charts.js")),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("style.css"),
    ),
];

const JS: &str = "text/javascript; charset=utf-8";

/// `GET /`: the console page.
#[utoipa::path(get, path = "/", tag = "console",
    responses((status = 200, description = "The web console", body = String, content_type = "text/html")))]
pub async fn index() -> Response {
    asset_response("text/html; charset=utf-8", include_str!("index.html"))
}

/// `GET /console/{file}`: one of the page's scripts or its stylesheet.
#[utoipa::path(get, path = "/console/{file}", tag = "console",
    params(("file" = String, Path, description = "A script or stylesheet of the console")),
    responses((status = 200, description = "The asset", body = String, content_type = "text/javascript"),
        (status = 404, description = "No such asset", body = crate::api::openapi::schemas::ErrorResponse)))]
pub async fn asset(UrlPath(file): UrlPath<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, kind, body)) => asset_response(kind, body),
        None => ApiError::route_not_found(&format!("/console/{file}")).into_response(),
    }
}

fn asset_response(kind: &'static str, body: &'static str) -> Response {
    (
        [
            (CONTENT_TYPE, kind),
            (CONTENT_SECURITY_POLICY, CSP),
            (X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (X_FRAME_OPTIONS, "DENY"),
            (REFERRER_POLICY, "no-referrer"),
            (CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
