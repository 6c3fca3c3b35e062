//! The OpenAPI document, and schemas of core types (which do not derive `ToSchema`).
//!
//! The schema structs here mirror the JSON of `marathon_core` types; the
//! `openapi` test checks that real responses carry the documented fields.

use serde_json::Value;
use utoipa::{OpenApi, ToSchema};

use super::error::{ErrorBody, ErrorDetail};
use super::health::{ReadyResponse, RegistryResponse};
use super::workflows::{
    AcceptedResponse, CancelRequest, EventsResponse, ListResponse, StartRequest, StartResponse,
};

/// A workflow's summary (`marathon_core::WorkflowSummary`).
#[derive(ToSchema)]
#[expect(dead_code, reason = "documentation only")]
pub(crate) struct WorkflowSummaryDoc {
    /// Workflow id.
    id: String,
    /// Registered workflow name.
    name: String,
    /// `running`, `completed`, `failed` or `canceled`.
    status: String,
    /// Task queue of its workflow tasks.
    task_queue: String,
    /// The start's idempotency key, if any.
    idempotency_key: Option<String>,
    /// When it was started (ms since the Unix epoch).
    created_at: u64,
    /// When its last event was recorded (ms since the Unix epoch).
    updated_at: u64,
    /// When it finished (ms since the Unix epoch).
    closed_at: Option<u64>,
    /// Sequence number of its last event.
    last_seq: u64,
    /// Whether cancellation was requested.
    cancel_requested: bool,
    /// Output, once completed.
    output: Option<Value>,
    /// Error (`kind`, `message`, `details`), once failed or canceled.
    error: Option<WorkflowErrorDoc>,
    /// The last workflow-task failure (e.g. non-determinism) while it is unresolved.
    task_failure: Option<String>,
    /// W3C `traceparent` of the span that started it, when traces are exported: the
    /// run's trace id is its second field.
    trace_context: Option<String>,
}

/// Why a workflow failed (`marathon_core::WorkflowError`).
#[derive(ToSchema)]
#[expect(dead_code, reason = "documentation only")]
pub(crate) struct WorkflowErrorDoc {
    /// Machine-readable kind (`canceled`, `activity_failed`, `serialization`, `invalid_argument`, …).
    kind: String,
    /// Human-readable message.
    message: String,
    /// Optional structured details.
    details: Option<Value>,
}

/// One event of a history (`marathon_core::Event`).
#[derive(ToSchema)]
#[expect(dead_code, reason = "documentation only")]
pub(crate) struct EventDoc {
    /// Position in the history, from 1, without gaps.
    seq: u64,
    /// When it was recorded (ms since the Unix epoch).
    timestamp: u64,
    /// `workflow_started`, `activity_scheduled`, `activity_completed`, `timer_fired`,
    /// `signal_received`, `cancel_requested`, `progress`, `workflow_completed`, …
    #[schema(rename = "type")]
    r#type: String,
    /// The type's payload.
    payload: Value,
}

/// The OpenAPI document of the HTTP API.
#[derive(OpenApi)]
#[openapi(
    info(title = "Marathon API", description = "Durable workflows over HTTP. Errors are `{\"error\": {\"code\", \"message\"}}`."),
    paths(
        super::workflows::start,
        super::workflows::list,
        super::workflows::get,
        super::workflows::cancel,
        super::workflows::signal,
        super::workflows::result,
        super::workflows::events,
        super::workflows::stream,
        super::health::registry,
        super::health::healthz,
        super::health::readyz,
        super::health::metrics,
        super::health::openapi,
    ),
    components(schemas(
        StartRequest, StartResponse, AcceptedResponse, ListResponse, EventsResponse, CancelRequest,
        ErrorBody, ErrorDetail, ReadyResponse, RegistryResponse,
        WorkflowSummaryDoc, WorkflowErrorDoc, EventDoc,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
)]
pub(crate) struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        // Every operation under the document's bearer requirement (those without a
        // `security(())` of their own) answers 401 when auth is on.
        let unauthorized = utoipa::openapi::ResponseBuilder::new()
            .description(
                "Auth is on and the bearer token is missing or wrong (with `WWW-Authenticate: Bearer`)",
            )
            .content(
                "application/json",
                utoipa::openapi::ContentBuilder::new()
                    .schema(Some(utoipa::openapi::Ref::from_schema_name("ErrorBody")))
                    .build(),
            )
            .build();
        for item in openapi.paths.paths.values_mut() {
            for op in [&mut item.get, &mut item.post].into_iter().flatten() {
                if op.security.is_none() {
                    op.responses
                        .responses
                        .entry("401".into())
                        .or_insert_with(|| unauthorized.clone().into());
                }
            }
        }
    }
}
