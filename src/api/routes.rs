//! The route table, built from one list so that every route gets its guard: a route is public
//! only if the list says so, and a test walks the same list to check that every other route
//! refuses a request without a key (deny by default).

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderValue, Method, StatusCode, Uri};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::error::ApiError;
use super::AppState;
use super::{
    admin, auth, console, execute, health, host, metrics, openai, openapi, rate, request_id,
    shutdown,
};

/// Largest accepted admin request body (64 KiB).
const ADMIN_BODY_LIMIT: usize = 64 * 1024;

/// Who may call a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Anyone (`/health`, `/ready`, the console's page and assets).
    Public,
    /// An inference or admin key, once keys are configured.
    Inference,
    /// The admin key (or loopback when none is set).
    Admin,
    /// The admin key, unless `metrics_public` is set.
    Metrics,
}

/// One route: its path, methods and guard.
#[derive(Debug, Clone, Copy)]
pub struct RouteInfo {
    /// The path (`{name}` for a parameter).
    pub path: &'static str,
    /// The HTTP methods it answers.
    pub methods: &'static [&'static str],
    /// Who may call it.
    pub guard: Guard,
}

/// Every route with its handler, the single source of the route table.
fn table() -> Vec<(RouteInfo, MethodRouter<AppState>)> {
    let route = |path, methods, guard, handler| {
        (
            RouteInfo {
                path,
                methods,
                guard,
            },
            handler,
        )
    };
    vec![
        route("/", &["GET"], Guard::Public, get(console::index)),
        route(
            "/console/{file}",
            &["GET"],
            Guard::Public,
            get(console::asset),
        ),
        route(
            "/openapi.json",
            &["GET"],
            Guard::Public,
            get(openapi::document),
        ),
        route("/health", &["GET"], Guard::Public, get(health::health)),
        route("/ready", &["GET"], Guard::Public, get(health::ready)),
        route("/metrics", &["GET"], Guard::Metrics, get(metrics::metrics)),
        route(
            "/v1/completions",
            &["POST"],
            Guard::Inference,
            post(openai::completions),
        ),
        route(
            "/v1/chat/completions",
            &["POST"],
            Guard::Inference,
            post(openai::chat_completions),
        ),
        route(
            "/v1/models",
            &["GET"],
            Guard::Inference,
            get(health::models),
        ),
        route(
            "/execute",
            &["POST"],
            Guard::Inference,
            post(execute::execute),
        ),
        route(
            "/admin/models",
            &["GET", "POST"],
            Guard::Admin,
            get(admin::list).post(admin::load),
        ),
        route("/admin/events", &["GET"], Guard::Admin, get(admin::events)),
        route(
            "/admin/models/{name}/reload",
            &["POST"],
            Guard::Admin,
            post(admin::reload),
        ),
        route(
            "/admin/models/{name}/evict",
            &["POST"],
            Guard::Admin,
            post(admin::evict),
        ),
        route(
            "/admin/reload",
            &["POST"],
            Guard::Admin,
            post(admin::reload_pool),
        ),
    ]
}

/// The route table without handlers.
pub fn route_inventory() -> Vec<RouteInfo> {
    table().into_iter().map(|(info, _)| info).collect()
}

/// Builds the axum application.
pub fn app(state: AppState) -> axum::Router {
    let mut public = axum::Router::new();
    let mut inference = axum::Router::new();
    let mut admin = axum::Router::new();
    for (info, handler) in table() {
        let guard = match info.guard {
            Guard::Metrics if state.server.metrics_public => Guard::Public,
            Guard::Metrics => Guard::Admin,
            other => other,
        };
        match guard {
            Guard::Public => public = public.route(info.path, handler),
            Guard::Inference => inference = inference.route(info.path, handler),
            Guard::Admin | Guard::Metrics => admin = admin.route(info.path, handler),
        }
    }
    let admin = admin
        .layer(DefaultBodyLimit::max(ADMIN_BODY_LIMIT))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_admin,
        ));
    let inference = inference
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            shutdown::track_in_flight,
        ))
        .route_layer(middleware::from_fn_with_state(state.clone(), rate::limit))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_inference_key,
        ));
    let mut router = public
        .merge(admin)
        .merge(inference)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.server.max_body))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            host::check_host,
        ))
        .layer(CatchPanicLayer::custom(panic_response));
    if !state.server.cors_origins.is_empty() {
        router = router.layer(cors(&state.server.cors_origins));
    }
    router
        .layer(middleware::from_fn(request_id::request_id))
        .with_state(state)
}

/// CORS for the configured origins only; credentials are never allowed.
fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
        ])
        .allow_credentials(false)
}

/// A handler that panicked answers 500 in the envelope; the server keeps serving.
fn panic_response(panic: Box<dyn std::any::Any + Send + 'static>) -> Response {
    let detail = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_default();
    tracing::error!(panic = %detail, "a request handler panicked");
    ApiError::internal("the server failed while handling this request").into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::route_not_found(uri.path())
}

async fn method_not_allowed(uri: Uri) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        code: "method_not_allowed",
        ..ApiError::bad_request("", None, format!("method not allowed on {}", uri.path()))
    }
    .into_response()
}
