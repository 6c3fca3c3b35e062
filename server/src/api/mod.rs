//! The HTTP API: one module per resource, one router, one error type.

mod docs;
pub mod error;
mod health;
mod workflows;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{MethodRouter, get, post};
use marathon_core::Engine;
use std::collections::HashMap;
use std::sync::Arc;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;

use crate::StartValidator;
use crate::config::{Config, Role};
pub use error::ApiError;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) engine: Engine,
    /// The Prometheus registry behind `/metrics`.
    pub(crate) metrics: Arc<marathon_observability::Metrics>,
    pub(crate) config: Arc<Config>,
    pub(crate) validators: Arc<HashMap<String, StartValidator>>,
    /// Cancelled when shutdown begins: long polls and SSE streams end.
    pub(crate) shutdown: CancellationToken,
}

/// The query of a `/v1` route that takes no parameters: any parameter is a 400, as on
/// the routes that take some, so that a misplaced one (`?idempotency_key=` on a start
/// or a signal, `?wait=` on a summary) is not dropped silently.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NoParams {}

/// Refuses any query parameter (an empty query is none); see [`NoParams`].
pub(crate) fn no_params(
    query: Result<axum::extract::Query<NoParams>, axum::extract::rejection::QueryRejection>,
) -> Result<(), ApiError> {
    query.map(|_| ()).map_err(|r| {
        ApiError::invalid(format!(
            "{}; this route takes no query parameters",
            r.body_text()
        ))
    })
}

/// Who may call a route.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// No token needed (probes).
    Open,
    /// A bearer token when auth is on.
    Protected,
}

struct RouteDef {
    path: &'static str,
    method: Method,
    access: Access,
    handler: MethodRouter<AppState>,
}

fn route(
    path: &'static str,
    method: Method,
    access: Access,
    handler: MethodRouter<AppState>,
) -> RouteDef {
    RouteDef {
        path,
        method,
        access,
        handler,
    }
}

/// Every route of `role`; the router and [`route_table`] are both built from it.
fn routes(role: Role) -> Vec<RouteDef> {
    use Access::{Open, Protected};
    let mut r = vec![
        route("/healthz", Method::GET, Open, get(health::healthz)),
        route("/readyz", Method::GET, Open, get(health::readyz)),
        route("/metrics", Method::GET, Protected, get(health::metrics)),
    ];
    if role.runs_api() {
        r.extend([
            route(
                "/openapi.json",
                Method::GET,
                Protected,
                get(health::openapi),
            ),
            route(
                "/v1/registry",
                Method::GET,
                Protected,
                get(health::registry),
            ),
            route(
                "/v1/workflows",
                Method::POST,
                Protected,
                post(workflows::start),
            ),
            route(
                "/v1/workflows",
                Method::GET,
                Protected,
                get(workflows::list),
            ),
            route(
                "/v1/workflows/{id}",
                Method::GET,
                Protected,
                get(workflows::get),
            ),
            route(
                "/v1/workflows/{id}/cancel",
                Method::POST,
                Protected,
                post(workflows::cancel),
            ),
            route(
                "/v1/workflows/{id}/signals/{name}",
                Method::POST,
                Protected,
                post(workflows::signal),
            ),
            route(
                "/v1/workflows/{id}/result",
                Method::GET,
                Protected,
                get(workflows::result),
            ),
            route(
                "/v1/workflows/{id}/events",
                Method::GET,
                Protected,
                get(workflows::events),
            ),
            route(
                "/v1/workflows/{id}/events/stream",
                Method::GET,
                Protected,
                get(workflows::stream),
            ),
        ]);
    }
    r
}

/// `(path, method)` of every route a server of `role` answers, e.g. `("/v1/workflows/{id}", "get")`.
#[must_use]
pub fn route_table(role: Role) -> Vec<(String, String)> {
    routes(role)
        .into_iter()
        .map(|r| (r.path.to_string(), r.method.as_str().to_ascii_lowercase()))
        .collect()
}

/// The OpenAPI document as JSON.
#[must_use]
pub fn openapi_json() -> serde_json::Value {
    use utoipa::OpenApi;
    serde_json::to_value(docs::ApiDoc::openapi()).unwrap_or_default()
}

pub(crate) fn router(state: AppState) -> Router {
    let role = state.config.server.role;
    let tokens: Arc<Vec<Vec<u8>>> = Arc::new(
        state
            .config
            .server
            .auth_tokens
            .iter()
            .map(|t| t.as_bytes().to_vec())
            .collect(),
    );
    let mut open = Router::new();
    let mut protected = Router::new();
    for r in routes(role) {
        match r.access {
            Access::Open => open = open.route(r.path, r.handler),
            Access::Protected => protected = protected.route(r.path, r.handler),
        }
    }
    if !tokens.is_empty() {
        protected = protected.route_layer(middleware::from_fn_with_state(tokens, require_token));
    }
    open.merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(state.config.server.body_limit))
        .layer(middleware::from_fn(catch_panic))
        .layer(middleware::from_fn(request_span))
        .with_state(state)
}

/// Paths that Prometheus and orchestrators poll every few seconds: a trace of each
/// would bury the workflows' traces (and cost a span per probe), so they get no span.
const UNTRACED_PATHS: [&str; 3] = ["/metrics", "/healthz", "/readyz"];

/// Runs each request in an `http.request` span: the root of the trace of a
/// workflow it starts (the span's context travels on in queue messages), or, when the
/// caller sent a W3C `traceparent` header, a child of the caller's span. Scrapes and
/// health probes ([`UNTRACED_PATHS`]) run without one.
async fn request_span(req: Request, next: middleware::Next) -> axum::response::Response {
    use tracing::Instrument;
    if UNTRACED_PATHS.contains(&req.uri().path()) {
        return next.run(req).await;
    }
    let span = tracing::info_span!(
        "http.request",
        otel.kind = "server",
        method = %req.method(),
        path = %req.uri().path(),
        status = tracing::field::Empty,
    );
    if let Some(tp) = req
        .headers()
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
    {
        marathon_observability::continue_trace(&span, tp);
    }
    let response = next.run(req).instrument(span.clone()).await;
    span.record("status", response.status().as_u16());
    response
}

/// Answers a panic of a handler (a bug, Marathon's or that of an embedder's
/// validator) with a 500 `internal`, logging its message, instead of letting it
/// unwind out of the router, which dropped the connection without a response. A
/// panic while an SSE body streams, after the answer has begun, still ends that
/// connection.
async fn catch_panic(req: Request, next: Next) -> Response {
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .await
    {
        Ok(response) => response,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)");
            ApiError::internal(&format!("a request handler panicked: {message}")).into_response()
        }
    }
}

/// Whether `given` equals one of `tokens`, in time independent of where they differ.
fn token_matches(given: &[u8], tokens: &[Vec<u8>]) -> bool {
    let mut ok = subtle::Choice::from(0u8);
    for t in tokens {
        ok |= t.as_slice().ct_eq(given);
    }
    ok.into()
}

async fn require_token(
    State(tokens): State<Arc<Vec<Vec<u8>>>>,
    req: Request,
    next: Next,
) -> Response {
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            // The scheme name is case-insensitive (RFC 7235 2.1).
            let (scheme, token) = v.trim_start().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then_some(token)
        })
        .map(str::trim);
    match given {
        Some(t) if token_matches(t.as_bytes(), &tokens) => next.run(req).await,
        _ => (
            [(header::WWW_AUTHENTICATE, "Bearer")],
            ApiError::unauthorized(),
        )
            .into_response(),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see /openapi.json")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route; see /openapi.json",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare() {
        let tokens = vec![b"alpha".to_vec(), b"beta".to_vec()];
        assert!(token_matches(b"beta", &tokens));
        assert!(!token_matches(b"bet", &tokens));
        assert!(!token_matches(b"", &tokens));
    }
}
