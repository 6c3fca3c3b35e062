//! Probes, metrics, the registry and the OpenAPI document.

use axum::Json;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use std::time::Duration;
use utoipa::{OpenApi, ToSchema};

use super::{ApiError, AppState, NoParams, no_params};

/// How long `/readyz` waits for each backend.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Body of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ReadyResponse {
    /// `ok`, or `unavailable` when a check failed.
    status: &'static str,
    /// The store's check: `ok` or `unavailable` (absent on `/healthz`).
    #[serde(skip_serializing_if = "Option::is_none")]
    store: Option<&'static str>,
    /// The queue's check: `ok` or `unavailable` (absent on `/healthz`).
    #[serde(skip_serializing_if = "Option::is_none")]
    queue: Option<&'static str>,
}

/// Workflow and activity names this server runs.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RegistryResponse {
    /// Registered workflow names, sorted.
    workflows: Vec<String>,
    /// Registered activity names, sorted.
    activities: Vec<String>,
}

/// Liveness: the process is up.
#[utoipa::path(get, path = "/healthz", tag = "probes", security(()),
    responses((status = 200, description = "Up", body = ReadyResponse)))]
pub(crate) async fn healthz() -> Json<ReadyResponse> {
    Json(ReadyResponse {
        status: "ok",
        store: None,
        queue: None,
    })
}

/// Readiness: the store and the queue answer.
#[utoipa::path(get, path = "/readyz", tag = "probes", security(()),
    responses(
        (status = 200, description = "Ready", body = ReadyResponse),
        (status = 503, description = "A backend does not answer", body = ReadyResponse),
    ))]
pub(crate) async fn readyz(State(st): State<AppState>) -> impl IntoResponse {
    let engine = &st.engine;
    let (store, queue) = tokio::join!(
        tokio::time::timeout(PING_TIMEOUT, engine.store().ping()),
        tokio::time::timeout(PING_TIMEOUT, engine.queue().ping()),
    );
    let store_ok = matches!(store, Ok(Ok(())));
    let queue_ok = matches!(queue, Ok(Ok(())));
    if !store_ok {
        tracing::warn!(result = ?store, "readiness: store ping failed");
    }
    if !queue_ok {
        tracing::warn!(result = ?queue, "readiness: queue ping failed");
    }
    let word = |ok: bool| if ok { "ok" } else { "unavailable" };
    let ready = store_ok && queue_ok;
    (
        if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        Json(ReadyResponse {
            status: word(ready),
            store: Some(word(store_ok)),
            queue: Some(word(queue_ok)),
        }),
    )
}

/// Prometheus metrics in the text exposition format (see `docs/OBSERVABILITY.md`).
#[utoipa::path(get, path = "/metrics", tag = "probes",
    responses((status = 200, description = "Prometheus text exposition", content_type = "text/plain", body = String)))]
pub(crate) async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, marathon_observability::CONTENT_TYPE)],
        state.metrics.render(),
    )
}

/// Workflow and activity names known to this server.
#[utoipa::path(get, path = "/v1/registry", tag = "registry",
    responses(
        (status = 200, description = "The registry", body = RegistryResponse),
        (status = 400, description = "A query parameter (this route takes none)", body = super::error::ErrorBody),
    ))]
pub(crate) async fn registry(
    State(st): State<AppState>,
    query: Result<Query<NoParams>, QueryRejection>,
) -> Result<Json<RegistryResponse>, ApiError> {
    no_params(query)?;
    let r = st.engine.registry();
    Ok(Json(RegistryResponse {
        workflows: r.workflow_names().map(str::to_string).collect(),
        activities: r.activity_names().map(str::to_string).collect(),
    }))
}

/// This OpenAPI document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta",
    responses((status = 200, description = "OpenAPI 3 document", body = Object)))]
pub(crate) async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(super::docs::ApiDoc::openapi())
}
