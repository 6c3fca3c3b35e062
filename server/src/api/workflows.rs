//! `/v1/workflows`: start, get, list, cancel, signal, result, events and the SSE stream.

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use marathon_core::{
    EventStream, ListQuery, Seq, StartWorkflow, WorkflowId, WorkflowStatus, WorkflowSummary,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::convert::Infallible;
use std::time::Duration;
use utoipa::{IntoParams, ToSchema};

use super::docs::{EventDoc, WorkflowSummaryDoc};
use super::error::{ApiError, ErrorBody};
use super::{AppState, NoParams, no_params};

/// Default page size of lists and event pages.
const DEFAULT_PAGE: usize = 100;
/// Largest page size of lists and event pages.
const MAX_PAGE: usize = 1000;

/// Body of `POST /v1/workflows`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct StartRequest {
    /// Registered workflow name (see `GET /v1/registry`).
    name: String,
    /// Input as any JSON value. Default `null`.
    #[serde(default)]
    input: Value,
    /// Workflow id: 1 to 200 characters from `A-Z a-z 0-9 - _ . : @`; a random UUID when absent.
    /// A second start with the same id (and the same name and task queue) returns the first workflow.
    #[serde(default)]
    id: Option<String>,
    /// Task queue of the workflow's tasks; the engine's default when absent.
    #[serde(default)]
    task_queue: Option<String>,
}

/// Response of `POST /v1/workflows`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct StartResponse {
    /// The workflow id.
    id: String,
    /// Whether this call created the workflow (false for a repeat).
    created: bool,
    /// The workflow's summary.
    #[schema(value_type = WorkflowSummaryDoc)]
    workflow: WorkflowSummary,
}

/// Response of cancel and signal requests.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct AcceptedResponse {
    /// The workflow id.
    id: String,
    /// Always true: the request was recorded (or was a repeat of one).
    accepted: bool,
}

/// A page of workflows.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ListResponse {
    /// Workflows, newest first.
    #[schema(value_type = Vec<WorkflowSummaryDoc>)]
    items: Vec<WorkflowSummary>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    next_cursor: Option<String>,
}

/// A page of events.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct EventsResponse {
    /// Events in sequence order.
    #[schema(value_type = Vec<EventDoc>)]
    events: Vec<marathon_core::Event>,
    /// Pass as `after` to get the next page (the last returned sequence, or `after` when none).
    next_after: u64,
}

/// Optional body of `POST /v1/workflows/{id}/cancel`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CancelRequest {
    /// Why; recorded in the `cancel_requested` event.
    #[serde(default)]
    reason: Option<String>,
}

/// Query of `GET /v1/workflows`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListParams {
    /// Only workflows in this status: `running`, `completed`, `failed`, `canceled`
    /// (empty: any).
    status: Option<String>,
    /// Only workflows with this name (empty: any).
    name: Option<String>,
    /// `next_cursor` of the previous page (empty: the first page).
    cursor: Option<String>,
    /// Page size, 1 to 1000. Default 100. A page also stops at about 4 MiB of JSON
    /// (at least one workflow); read on while `next_cursor` is not null.
    limit: Option<usize>,
}

/// Query of `GET /v1/workflows/{id}/result`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct ResultParams {
    /// How long to wait for the workflow to finish: `30s`, `500ms`, `2m` or a number of seconds.
    /// Capped at the server's maximum (default 50 s). Default 0 (answer at once).
    wait: Option<String>,
}

/// Query of `GET /v1/workflows/{id}/events`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventsParams {
    /// Only events with a sequence greater than this. Default 0.
    after: Option<u64>,
    /// Page size, 1 to 1000. Default 100.
    limit: Option<usize>,
}

/// Query of `GET /v1/workflows/{id}/events/stream`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct StreamParams {
    /// Stream events after this sequence; the `Last-Event-ID` header wins over it. Default 0.
    after: Option<u64>,
}

fn workflow_id(path: Result<Path<String>, PathRejection>) -> Result<WorkflowId, ApiError> {
    let Path(id) = path?;
    Ok(WorkflowId::parse(id)?)
}

fn header(headers: &HeaderMap, name: &str) -> Result<Option<String>, ApiError> {
    match headers.get(name) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .map(|s| Some(s.to_string()))
            .map_err(|_| ApiError::invalid(format!("header {name} must be visible ASCII"))),
    }
}

/// The `Idempotency-Key` header; an empty one (some proxies add it) counts as absent.
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    Ok(header(headers, "idempotency-key")?.filter(|k| !k.is_empty()))
}

fn page_size(limit: Option<usize>) -> Result<usize, ApiError> {
    match limit {
        None => Ok(DEFAULT_PAGE),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(format!(
            "limit {n} is out of range; use 1 to {MAX_PAGE}"
        ))),
    }
}

/// An optional JSON body (signal payloads, cancel reasons): `None` when empty or blank,
/// else the body read as JSON whatever its `Content-Type` (`curl -d` and a browser's
/// `fetch` send other types; these routes have always taken them), 400 naming `what`
/// if it is not JSON.
fn optional_json<T: serde::de::DeserializeOwned>(
    body: &Bytes,
    what: &str,
) -> Result<Option<T>, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| ApiError::invalid(format!("{what}: {e}")))
}

/// Parses `30s`, `500ms`, `2m` or a plain number of seconds.
pub(crate) fn parse_wait(s: &str) -> Result<Duration, ApiError> {
    let s = s.trim();
    let bad = || {
        ApiError::invalid(format!(
            "wait {s:?} is not a duration like 30s, 500ms or 2m"
        ))
    };
    let (num, unit_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else {
        (s, 1000)
    };
    let num = num.trim();
    // All digits but too big for u64: the longest wait there is (capped by the caller).
    let n: u64 = match num.parse() {
        Ok(n) => n,
        Err(_) if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) => u64::MAX,
        Err(_) => return Err(bad()),
    };
    Ok(Duration::from_millis(n.saturating_mul(unit_ms)))
}

/// Starts a workflow.
#[utoipa::path(
    post, path = "/v1/workflows", tag = "workflows",
    request_body = StartRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "A repeat with the same key returns the first workflow (at most 256 bytes)")),
    responses(
        (status = 202, description = "Started", body = StartResponse),
        (status = 200, description = "A repeat (same id or idempotency key): the existing workflow", body = StartResponse),
        (status = 400, description = "Malformed body, unknown workflow, bad id, input or task queue, a query parameter (this route takes none)", body = ErrorBody),
        (status = 409, description = "The id or idempotency key belongs to a workflow with another name or task queue", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 415, description = "The body is not sent as `Content-Type: application/json`", body = ErrorBody),
        (status = 500, description = "Internal error (the store rejected the call); the cause is logged, not returned", body = ErrorBody),
        (status = 503, description = "The store is unavailable; try again later", body = ErrorBody),
    )
)]
pub(crate) async fn start(
    State(st): State<AppState>,
    query: Result<Query<NoParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Json<StartRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    no_params(query)?;
    let Json(req) = body?;
    if let Some(check) = st.validators.get(&req.name) {
        check(&req.input, st.engine.registry()).map_err(ApiError::invalid)?;
    }
    let mut start = StartWorkflow::new(req.name, req.input);
    if let Some(id) = req.id {
        start = start.id(WorkflowId::parse(id)?);
    }
    if let Some(q) = req.task_queue {
        if q.is_empty() {
            return Err(ApiError::invalid("task_queue must not be empty"));
        }
        // A name the queue cannot carry (SQS refuses some on every send) is refused
        // by the engine: `EngineError::UnservedTaskQueue`, a 400.
        start = start.task_queue(q);
    }
    if let Some(key) = idempotency_key(&headers)? {
        start = start.idempotency_key(key);
    }
    let started = st.engine.start(start).await?;
    let status = if started.created {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(StartResponse {
            id: started.summary.id.to_string(),
            created: started.created,
            workflow: started.summary,
        }),
    )
        .into_response())
}

/// A workflow's summary.
#[utoipa::path(
    get, path = "/v1/workflows/{id}", tag = "workflows",
    params(("id" = String, Path, description = "Workflow id")),
    responses(
        (status = 200, description = "The summary", body = WorkflowSummaryDoc),
        (status = 400, description = "Invalid id, a query parameter (this route takes none)", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 500, description = "Internal error (the store rejected the call); the cause is logged, not returned", body = ErrorBody),
        (status = 503, description = "The store is unavailable; try again later", body = ErrorBody),
    )
)]
pub(crate) async fn get(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<NoParams>, QueryRejection>,
) -> Result<Json<WorkflowSummary>, ApiError> {
    let id = workflow_id(path)?;
    no_params(query)?;
    Ok(Json(st.engine.get(&id).await?))
}

/// Lists workflows newest first, one page at a time.
#[utoipa::path(
    get, path = "/v1/workflows", tag = "workflows",
    params(ListParams),
    responses(
        (status = 200, description = "A page", body = ListResponse),
        (status = 400, description = "Bad status, limit or cursor; an unknown or repeated query parameter", body = ErrorBody),
        (status = 500, description = "Internal error (the store rejected the call); the cause is logged, not returned", body = ErrorBody),
        (status = 503, description = "The store is unavailable; try again later", body = ErrorBody),
    )
)]
pub(crate) async fn list(
    State(st): State<AppState>,
    query: Result<Query<ListParams>, QueryRejection>,
) -> Result<Json<ListResponse>, ApiError> {
    let Query(p) = query?;
    // An empty value counts as absent: a client that fills in `?cursor=` from a
    // `null` next_cursor on its first request, or an empty filter, wants every page.
    let given = |v: Option<String>| v.filter(|v| !v.is_empty());
    let status = match given(p.status).as_deref() {
        None => None,
        Some(s) => Some(s.parse::<WorkflowStatus>().map_err(ApiError::invalid)?),
    };
    let page = st
        .engine
        .list(&ListQuery {
            status,
            name: given(p.name),
            cursor: given(p.cursor),
            limit: page_size(p.limit)?,
        })
        .await?;
    Ok(Json(ListResponse {
        items: page.items,
        next_cursor: page.next_cursor,
    }))
}

/// Requests cancellation of a running workflow.
#[utoipa::path(
    post, path = "/v1/workflows/{id}/cancel", tag = "workflows",
    params(("id" = String, Path, description = "Workflow id")),
    request_body(content = Option<CancelRequest>, description = "Optional reason"),
    responses(
        (status = 202, description = "Recorded", body = AcceptedResponse),
        (status = 400, description = "Bad id, malformed body, a query parameter (this route takes none)", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 409, description = "The workflow has already finished", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 500, description = "Internal error (the store rejected the call); the cause is logged, not returned", body = ErrorBody),
        (status = 503, description = "The store is unavailable; try again later", body = ErrorBody),
    )
)]
pub(crate) async fn cancel(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<NoParams>, QueryRejection>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<AcceptedResponse>), ApiError> {
    let id = workflow_id(path)?;
    no_params(query)?;
    let req: CancelRequest = optional_json(&body?, "invalid cancel body")?.unwrap_or_default();
    st.engine.cancel(&id, req.reason).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(AcceptedResponse {
            id: id.to_string(),
            accepted: true,
        }),
    ))
}

/// Sends a signal with a JSON payload (the body; empty means `null`).
#[utoipa::path(
    post, path = "/v1/workflows/{id}/signals/{name}", tag = "workflows",
    params(
        ("id" = String, Path, description = "Workflow id"),
        ("name" = String, Path, description = "Signal name, 1 to 200 bytes"),
        ("Idempotency-Key" = Option<String>, Header, description = "A repeat with the same key is ignored"),
    ),
    request_body(content = Option<Object>, description = "Payload: any JSON value"),
    responses(
        (status = 202, description = "Recorded (or a repeat)", body = AcceptedResponse),
        (status = 400, description = "Malformed payload, bad id, name or idempotency key, a query parameter (this route takes none)", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 409, description = "The workflow has already finished", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 500, description = "Internal error (the store rejected the call); the cause is logged, not returned", body = ErrorBody),
        (status = 503, description = "The store is unavailable; try again later", body = ErrorBody),
    )
)]
pub(crate) async fn signal(
    State(st): State<AppState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<NoParams>, QueryRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<AcceptedResponse>), ApiError> {
    let Path((id, name)) = path?;
    let id = WorkflowId::parse(id)?;
    no_params(query)?;
    let payload: Value =
        optional_json(&body?, "signal payload is not valid JSON")?.unwrap_or(Value::Null);
    let key = idempotency_key(&headers)?;
    st.engine.signal(&id, &name, payload, key).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(AcceptedResponse {
            id: id.to_string(),
            accepted: true,
        }),
    ))
}

/// Waits (long poll) up to `wait` for the workflow to finish and returns its summary.
#[utoipa::path(
    get, path = "/v1/workflows/{id}/result", tag = "workflows",
    params(("id" = String, Path, description = "Workflow id"), ResultParams),
    responses(
        (status = 200, description = "Finished: the summary with output or error", body = WorkflowSummaryDoc),
        (status = 202, description = "Still running after the wait", body = WorkflowSummaryDoc),
        (status = 400, description = "Bad id or wait; an unknown query parameter", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 500, description = "Internal error (the store rejected the call); the cause is logged, not returned", body = ErrorBody),
        (status = 503, description = "The store is unavailable; try again later", body = ErrorBody),
    )
)]
pub(crate) async fn result(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ResultParams>, QueryRejection>,
) -> Result<(StatusCode, Json<WorkflowSummary>), ApiError> {
    let id = workflow_id(path)?;
    let Query(p) = query?;
    let wait = match p.wait.as_deref() {
        None => Duration::ZERO,
        Some(w) => parse_wait(w)?.min(st.config.server.result_wait_max),
    };
    let summary = tokio::select! {
        r = st.engine.result(&id, wait) => r?,
        // Shutdown ends long polls early with the current state.
        () = st.shutdown.cancelled() => st.engine.get(&id).await?,
    };
    let status = if summary.status.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, Json(summary)))
}

/// A page of the workflow's event history.
#[utoipa::path(
    get, path = "/v1/workflows/{id}/events", tag = "events",
    params(("id" = String, Path, description = "Workflow id"), EventsParams),
    responses(
        (status = 200, description = "Events after `after`", body = EventsResponse),
        (status = 400, description = "Bad id, after or limit; an unknown query parameter", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 500, description = "Internal error (the store rejected the call); the cause is logged, not returned", body = ErrorBody),
        (status = 503, description = "The store is unavailable; try again later", body = ErrorBody),
    )
)]
pub(crate) async fn events(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<EventsParams>, QueryRejection>,
) -> Result<Response, ApiError> {
    let id = workflow_id(path)?;
    let Query(p) = query?;
    let after = p.after.unwrap_or(0);
    let limit = page_size(p.limit)?;
    // The body of an `EventsResponse`, written event by event (each serialized once):
    // read in chunks, it stops at about PAGE_BYTES of events (at least one), since a
    // page of 1,000 events of up to 2 MiB each would otherwise be gigabytes.
    let mut body = b"{\"events\":[".to_vec();
    let head = body.len();
    let (mut count, mut next_after) = (0usize, after);
    'read: while count < limit {
        // A few events first, then as many as the rest of the page likely holds at
        // the size seen so far: a read of 100 events of up to 2 MiB each would hold
        // 200 MiB in memory to send 4.
        let fit = match count {
            0 => PAGE_FIRST_READ,
            n => (PAGE_BYTES.saturating_sub(body.len() - head) / ((body.len() - head) / n).max(1))
                .max(1),
        };
        let want = (limit - count).min(PAGE_READ_CHUNK).min(fit);
        let chunk = st.engine.events(&id, Seq(next_after), want).await?;
        let got = chunk.len();
        for e in chunk {
            let mark = body.len();
            if count > 0 {
                body.push(b',');
            }
            serde_json::to_writer(&mut body, &e).map_err(|e| ApiError::internal(&e))?;
            if count > 0 && body.len() - head > PAGE_BYTES {
                body.truncate(mark);
                break 'read;
            }
            count += 1;
            next_after = e.seq.0;
        }
        if got < want {
            break;
        }
    }
    body.extend_from_slice(format!("],\"next_after\":{next_after}}}").as_bytes());
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// About the most JSON an events page carries (a page holds at least one event).
const PAGE_BYTES: usize = 4 * 1024 * 1024;
/// Most events read from the store at a time for a page.
const PAGE_READ_CHUNK: usize = 100;
/// Events read first for a page, before their size says how many more to read.
const PAGE_FIRST_READ: usize = 8;

enum StreamState {
    Live(EventStream),
    /// The workflow has finished: `done` with this data comes next.
    Finish(Value),
    End,
}

/// The data of the `done` event that ends a stream on a finished workflow.
fn done_data(id: &WorkflowId, status: WorkflowStatus, last_seq: Seq) -> Value {
    json!({"id": id, "status": status, "last_seq": last_seq})
}

/// The `error` event that ends a stream on a store failure (or a store stream that
/// ended before the workflow did): the error shape of the API, and what to do.
fn stream_error(id: &WorkflowId, cause: Option<marathon_core::EngineError>) -> SseEvent {
    let (code, message) = match cause {
        Some(e) => {
            tracing::warn!(error = %e, workflow = %id, "event stream failed");
            let api = ApiError::from(e);
            let message = if api.code() == "unavailable" {
                "the event stream failed; reconnect with Last-Event-ID".to_string()
            } else {
                api.message().to_string()
            };
            (api.code(), message)
        }
        None => {
            tracing::warn!(workflow = %id, "event stream ended before the workflow finished");
            (
                "unavailable",
                "the event stream ended before the workflow finished; reconnect with Last-Event-ID"
                    .to_string(),
            )
        }
    };
    let data = json!({"error": {"code": code, "message": message}});
    SseEvent::default().event("error").data(data.to_string())
}

/// Live events as Server-Sent Events; ends with `event: done` after the terminal event.
#[utoipa::path(
    get, path = "/v1/workflows/{id}/events/stream", tag = "events",
    params(
        ("id" = String, Path, description = "Workflow id"),
        ("Last-Event-ID" = Option<u64>, Header, description = "Resume after this sequence (wins over `after`)"),
        StreamParams,
    ),
    responses(
        (status = 200, description = "`text/event-stream`: `id:` the sequence, `event:` the type, `data:` the event JSON; \
            `: heartbeat` comments; a final `event: done`", content_type = "text/event-stream", body = String),
        (status = 400, description = "Bad id, after or Last-Event-ID (not a sequence number, or past the workflow's last event)", body = ErrorBody),
        (status = 404, description = "No such workflow", body = ErrorBody),
        (status = 500, description = "Internal error (the store rejected the call); the cause is logged, not returned", body = ErrorBody),
        (status = 503, description = "The store is unavailable; try again later", body = ErrorBody),
    )
)]
pub(crate) async fn stream(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<StreamParams>, QueryRejection>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let id = workflow_id(path)?;
    let Query(p) = query?;
    // An empty Last-Event-ID is no resume point (the SSE spec's "reset"): a client that
    // saw no event with an id sends it so.
    let after = match header(&headers, "last-event-id")?.filter(|v| !v.trim().is_empty()) {
        Some(v) => v
            .trim()
            .parse::<u64>()
            .map_err(|_| ApiError::invalid("Last-Event-ID must be an event sequence number"))?,
        None => p.after.unwrap_or(0),
    };
    let summary = st.engine.get(&id).await?;
    // Every replica reads one store, so an event the client saw is never past the
    // last one; such a number belongs to something else (an earlier run of the id),
    // and waiting for it would skip events silently.
    if after > summary.last_seq.0 {
        return Err(ApiError::invalid(format!(
            "resume point {after} (Last-Event-ID or after) is past the workflow's last event, {}",
            summary.last_seq.0
        )));
    }
    let first = if summary.status.is_terminal() && after >= summary.last_seq.0 {
        StreamState::Finish(done_data(&id, summary.status, summary.last_seq))
    } else {
        StreamState::Live(st.engine.subscribe(&id, Seq(after)).await?)
    };
    let engine = st.engine.clone();
    let events = futures::stream::unfold(first, move |state| {
        let engine = engine.clone();
        let id = id.clone();
        async move {
            match state {
                StreamState::Live(mut events) => match events.next().await {
                    Some(Ok(e)) => {
                        // The terminal event is the last: `done` says what it says,
                        // without asking the store again.
                        let next = match e.data.closing_status() {
                            Some(status) => StreamState::Finish(done_data(&id, status, e.seq)),
                            None => StreamState::Live(events),
                        };
                        let sse = SseEvent::default()
                            .id(e.seq.to_string())
                            .event(e.data.type_name())
                            .data(serde_json::to_string(&e).unwrap_or_default());
                        Some((sse, next))
                    }
                    Some(Err(err)) => Some((stream_error(&id, Some(err.into())), StreamState::End)),
                    // The store's stream ended without a terminal event in view:
                    // `done` if the workflow has finished, else the client is told
                    // to reconnect rather than left with a stream that just stops.
                    None => {
                        let event = match engine.get(&id).await {
                            Ok(s) if s.status.is_terminal() => {
                                done_event(done_data(&id, s.status, s.last_seq))
                            }
                            Ok(_) => stream_error(&id, None),
                            Err(e) => stream_error(&id, Some(e)),
                        };
                        Some((event, StreamState::End))
                    }
                },
                StreamState::Finish(data) => Some((done_event(data), StreamState::End)),
                StreamState::End => None,
            }
        }
    })
    .take_until(st.shutdown.clone().cancelled_owned())
    .map(Ok::<_, Infallible>);
    Ok(Sse::new(events).keep_alive(
        KeepAlive::new()
            .interval(st.config.server.sse_heartbeat)
            .text("heartbeat"),
    ))
}

fn done_event(data: Value) -> SseEvent {
    SseEvent::default().event("done").data(data.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_parse() {
        assert_eq!(parse_wait("30s").ok(), Some(Duration::from_secs(30)));
        assert_eq!(parse_wait("500ms").ok(), Some(Duration::from_millis(500)));
        assert_eq!(parse_wait("2m").ok(), Some(Duration::from_secs(120)));
        assert_eq!(parse_wait("7").ok(), Some(Duration::from_secs(7)));
        assert!(parse_wait("soon").is_err());
        assert!(parse_wait("-1s").is_err());
    }
}
