//! HTTP tests: every route and every error class, through `oneshot` on the router.

use axum::Router;
use axum::body::Body;
use axum::http::{Request, StatusCode};
use marathon_core::Worker;
use marathon_server::{Config, Role, Server, api};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::time::Duration;
use tower::ServiceExt;

struct App {
    router: Router,
    _worker: Worker,
}

async fn app_with(cfg: Config) -> App {
    app_from(Server::builder().builtins().config(cfg)).await
}

/// An app from `builder`, with a worker.
async fn app_from(builder: marathon_server::ServerBuilder) -> App {
    let server = builder.build().await.expect("server builds");
    let worker = Worker::start(server.engine().clone(), server.config().worker.clone());
    App {
        router: server.router(),
        _worker: worker,
    }
}

async fn app() -> App {
    app_with(Config::default()).await
}

struct Resp {
    status: StatusCode,
    headers: axum::http::HeaderMap,
    text: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    /// Asserts the error shape and code.
    fn error(&self, status: StatusCode, code: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        let v = self.json();
        assert_eq!(v["error"]["code"], code, "{}", self.text);
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{}",
            self.text
        );
    }
}

async fn send(app: &App, req: Request<Body>) -> Resp {
    let resp = app.router.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .expect("body");
    Resp {
        status,
        headers,
        text: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

async fn call(app: &App, method: &str, uri: &str, body: Option<Value>) -> Resp {
    call_with(app, method, uri, body, &[]).await
}

async fn call_with(
    app: &App,
    method: &str,
    uri: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> Resp {
    let mut req = Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .expect("request");
    send(app, req).await
}

async fn raw(app: &App, method: &str, uri: &str, content_type: Option<&str>, body: &str) -> Resp {
    let mut req = Request::builder().method(method).uri(uri);
    if let Some(ct) = content_type {
        req = req.header("content-type", ct);
    }
    send(
        app,
        req.body(Body::from(body.to_string())).expect("request"),
    )
    .await
}

async fn finished(app: &App, id: &str) -> Value {
    let r = call(
        app,
        "GET",
        &format!("/v1/workflows/{id}/result?wait=10s"),
        None,
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    r.json()
}

#[tokio::test]
async fn start_is_idempotent_and_runs() {
    let app = app().await;
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "input": {"x": 1}, "id": "wf-1"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    assert_eq!(r.json()["id"], "wf-1");
    assert_eq!(r.json()["created"], true);
    let again = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "input": {"x": 1}, "id": "wf-1"})),
    )
    .await;
    assert_eq!(again.status, StatusCode::OK);
    assert_eq!(again.json()["created"], false);

    let k = [("idempotency-key", "key-1")];
    let a = call_with(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "input": 1})),
        &k,
    )
    .await;
    assert_eq!(a.status, StatusCode::ACCEPTED);
    let b = call_with(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "input": 1})),
        &k,
    )
    .await;
    assert_eq!(b.status, StatusCode::OK);
    assert_eq!(a.json()["id"], b.json()["id"]);

    let done = finished(&app, "wf-1").await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output"], json!({"x": 1}));
    let got = call(&app, "GET", "/v1/workflows/wf-1", None).await;
    assert_eq!(got.status, StatusCode::OK);
    assert_eq!(got.json()["name"], "echo");
}

/// A start with the id of a workflow started under another name or task queue is a
/// 409 `conflict` naming it, not a 200 handing back the other workflow's run; a
/// repeat with another input is still the documented 200.
#[tokio::test]
async fn a_start_reusing_an_id_with_another_name_is_a_409() {
    // Both task queues served: with the memory queue an unserved one is a 400 first.
    let mut cfg = Config::default();
    cfg.worker
        .queues
        .push(marathon_core::QueueSpec::new("elsewhere", 4));
    let app = app_with(cfg).await;
    let start = |body: Value| call(&app, "POST", "/v1/workflows", Some(body));
    let r = start(json!({"name": "echo", "input": 1, "id": "wf-reuse"})).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    for other in [
        json!({"name": "sleep-then-echo", "input": {"ms": 1, "value": 1}, "id": "wf-reuse"}),
        json!({"name": "echo", "input": 1, "id": "wf-reuse", "task_queue": "elsewhere"}),
    ] {
        let r = start(other).await;
        r.error(StatusCode::CONFLICT, "conflict");
        let message = r.json()["error"]["message"].to_string();
        assert!(
            message.contains("wf-reuse") && message.contains("echo"),
            "{message}"
        );
    }
    let again = start(json!({"name": "echo", "input": 2, "id": "wf-reuse"})).await;
    assert_eq!(again.status, StatusCode::OK, "{}", again.text);
    assert_eq!(again.json()["created"], false);
    assert_eq!(again.json()["workflow"]["name"], "echo");
    // The existing id with a key another workflow holds is a 409 naming that one
    // (the memory store answered with the id's workflow, a 200).
    let keyed = |id: &'static str| {
        call_with(
            &app,
            "POST",
            "/v1/workflows",
            Some(json!({"name": "echo", "input": 1, "id": id})),
            &[("idempotency-key", "held-by-another")],
        )
    };
    assert_eq!(keyed("wf-key-holder").await.status, StatusCode::ACCEPTED);
    let r = keyed("wf-reuse").await;
    r.error(StatusCode::CONFLICT, "conflict");
    assert!(r.text.contains("wf-key-holder"), "{}", r.text);
}

#[tokio::test]
async fn bad_requests_are_json_4xx() {
    let app = app_with(Config {
        server: marathon_server::config::ServerConfig {
            body_limit: 1024,
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let bad = StatusCode::BAD_REQUEST;
    raw(
        &app,
        "POST",
        "/v1/workflows",
        Some("application/json"),
        "{\"name\":",
    )
    .await
    .error(bad, "invalid_argument");
    call(&app, "POST", "/v1/workflows", Some(json!({"name": 5})))
        .await
        .error(bad, "invalid_argument");
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "extra": 1})),
    )
    .await
    .error(bad, "invalid_argument");
    call(&app, "POST", "/v1/workflows", Some(json!({"name": "nope"})))
        .await
        .error(bad, "invalid_argument");
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "id": "a/b"})),
    )
    .await
    .error(bad, "invalid_argument");
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "id": "x".repeat(201)})),
    )
    .await
    .error(bad, "invalid_argument");
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "task_queue": ""})),
    )
    .await
    .error(bad, "invalid_argument");
    call_with(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo"})),
        &[("idempotency-key", &"k".repeat(300))],
    )
    .await
    .error(bad, "invalid_argument");
    raw(&app, "POST", "/v1/workflows", None, "{\"name\":\"echo\"}")
        .await
        .error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let big = json!({"name": "echo", "input": "x".repeat(2000)}).to_string();
    raw(
        &app,
        "POST",
        "/v1/workflows",
        Some("application/json"),
        &big,
    )
    .await
    .error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");

    call(&app, "GET", "/v1/workflows/bad%20id", None)
        .await
        .error(bad, "invalid_argument");
    call(
        &app,
        "GET",
        &format!("/v1/workflows/{}", "y".repeat(201)),
        None,
    )
    .await
    .error(bad, "invalid_argument");
    call(&app, "GET", "/v1/workflows/missing", None)
        .await
        .error(StatusCode::NOT_FOUND, "not_found");
    call(&app, "GET", "/v1/workflows?status=sleeping", None)
        .await
        .error(bad, "invalid_argument");
    call(&app, "GET", "/v1/workflows?limit=0", None)
        .await
        .error(bad, "invalid_argument");
    call(&app, "GET", "/v1/workflows?limit=1001", None)
        .await
        .error(bad, "invalid_argument");
    call(&app, "GET", "/v1/workflows?limit=abc", None)
        .await
        .error(bad, "invalid_argument");
    call(&app, "GET", "/v1/workflows?cursor=garbage", None)
        .await
        .error(bad, "invalid_argument");
    call(&app, "GET", "/v1/workflows/missing/result?wait=soon", None)
        .await
        .error(bad, "invalid_argument");
    call(&app, "GET", "/v1/workflows/missing/events?after=-1", None)
        .await
        .error(bad, "invalid_argument");
    call(&app, "GET", "/v1/workflows/missing/events", None)
        .await
        .error(StatusCode::NOT_FOUND, "not_found");
    call_with(
        &app,
        "GET",
        "/v1/workflows/missing/events/stream",
        None,
        &[("last-event-id", "x")],
    )
    .await
    .error(bad, "invalid_argument");
    call(&app, "GET", "/v1/workflows/missing/events/stream", None)
        .await
        .error(StatusCode::NOT_FOUND, "not_found");
    call(&app, "POST", "/v1/workflows/missing/cancel", None)
        .await
        .error(StatusCode::NOT_FOUND, "not_found");
    call(&app, "POST", "/v1/workflows/missing/signals/go", None)
        .await
        .error(StatusCode::NOT_FOUND, "not_found");
    call(&app, "GET", "/v1/nothing", None)
        .await
        .error(StatusCode::NOT_FOUND, "not_found");
    call(&app, "DELETE", "/v1/workflows", None)
        .await
        .error(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed");
}

#[tokio::test]
async fn list_filters_and_pages() {
    let app = app().await;
    for i in 0..3 {
        call(
            &app,
            "POST",
            "/v1/workflows",
            Some(json!({"name": "echo", "id": format!("e{i}")})),
        )
        .await;
    }
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "s0", "input": {"ms": 600000}})),
    )
    .await;
    for i in 0..3 {
        finished(&app, &format!("e{i}")).await;
    }
    let mut seen = BTreeSet::new();
    let mut cursor: Option<String> = None;
    loop {
        // The first request as a client that fills in a null cursor writes it: empty
        // (before 2026-11-28 a 400).
        let c = cursor.as_deref().unwrap_or_default();
        let uri = format!("/v1/workflows?name=echo&limit=1&status=&cursor={c}");
        let page = call(&app, "GET", &uri, None).await;
        assert_eq!(page.status, StatusCode::OK, "{uri}: {}", page.text);
        let v = page.json();
        let items = v["items"].as_array().expect("items").clone();
        assert!(items.len() <= 1);
        for it in items {
            seen.insert(it["id"].as_str().expect("id").to_string());
        }
        match v["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(
        seen,
        ["e0", "e1", "e2"].into_iter().map(String::from).collect()
    );
    let running = call(&app, "GET", "/v1/workflows?status=running", None)
        .await
        .json();
    let ids: Vec<&str> = running["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|i| i["id"].as_str())
        .collect();
    assert_eq!(ids, vec!["s0"]);
    // An empty name filters nothing out.
    let all = call(&app, "GET", "/v1/workflows?name=", None).await.json();
    assert_eq!(all["items"].as_array().expect("items").len(), 4, "{all}");
}

#[tokio::test]
async fn signal_cancel_and_result() {
    let app = app().await;
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "long", "input": {"ms": 600000, "value": 1}})),
    )
    .await;
    let r = call(&app, "GET", "/v1/workflows/long/result", None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);
    assert_eq!(r.json()["status"], "running");
    let r = call(&app, "GET", "/v1/workflows/long/result?wait=100ms", None).await;
    assert_eq!(r.status, StatusCode::ACCEPTED);

    let s = call_with(
        &app,
        "POST",
        "/v1/workflows/long/signals/go",
        Some(json!({"ok": true})),
        &[("idempotency-key", "s1")],
    )
    .await;
    assert_eq!(s.status, StatusCode::ACCEPTED, "{}", s.text);
    let s = call(&app, "POST", "/v1/workflows/long/signals/empty", None).await;
    assert_eq!(s.status, StatusCode::ACCEPTED, "{}", s.text);
    raw(
        &app,
        "POST",
        "/v1/workflows/long/signals/go",
        Some("application/json"),
        "{nope",
    )
    .await
    .error(StatusCode::BAD_REQUEST, "invalid_argument");
    call(
        &app,
        "POST",
        &format!("/v1/workflows/long/signals/{}", "n".repeat(201)),
        None,
    )
    .await
    .error(StatusCode::BAD_REQUEST, "invalid_argument");
    let events = call(&app, "GET", "/v1/workflows/long/events", None)
        .await
        .json();
    let signals = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["type"] == "signal_received")
        .count();
    assert_eq!(signals, 2);

    let c = call(
        &app,
        "POST",
        "/v1/workflows/long/cancel",
        Some(json!({"reason": "test"})),
    )
    .await;
    assert_eq!(c.status, StatusCode::ACCEPTED, "{}", c.text);
    let done = finished(&app, "long").await;
    assert_eq!(done["status"], "canceled");
    // A repeat of the cancellation is a repeat (202), a new signal is too late (409).
    let again = call(&app, "POST", "/v1/workflows/long/cancel", None).await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.text);
    call(
        &app,
        "POST",
        "/v1/workflows/long/signals/go",
        Some(json!(1)),
    )
    .await
    .error(StatusCode::CONFLICT, "conflict");
}

#[tokio::test]
async fn events_page_by_seq() {
    let app = app().await;
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "id": "ev", "input": "hi"})),
    )
    .await;
    let done = finished(&app, "ev").await;
    let last = done["last_seq"].as_u64().expect("last_seq");
    let mut after = 0;
    let mut seqs = Vec::new();
    loop {
        let page = call(
            &app,
            "GET",
            &format!("/v1/workflows/ev/events?after={after}&limit=2"),
            None,
        )
        .await
        .json();
        let events = page["events"].as_array().expect("events").clone();
        if events.is_empty() {
            assert_eq!(page["next_after"], after);
            break;
        }
        assert!(events.len() <= 2);
        seqs.extend(events.iter().map(|e| e["seq"].as_u64().expect("seq")));
        after = page["next_after"].as_u64().expect("next_after");
    }
    assert_eq!(seqs, (1..=last).collect::<Vec<_>>());
}

fn sse_frames(text: &str) -> Vec<(Option<u64>, String, String)> {
    text.split("\n\n")
        .filter(|f| f.lines().any(|l| l.starts_with("event:")))
        .map(|f| {
            let mut id = None;
            let mut event = String::new();
            let mut data = String::new();
            for l in f.lines() {
                if let Some(v) = l.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = l.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = l.strip_prefix("data:") {
                    data = v.trim().to_string();
                }
            }
            (id, event, data)
        })
        .collect()
}

#[tokio::test]
async fn sse_resumes_and_ends_with_done() {
    let app = app().await;
    // A live stream, opened before the workflow finishes.
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "sse", "input": {"ms": 300, "value": "v"}})),
    )
    .await;
    let live = tokio::time::timeout(
        Duration::from_secs(20),
        call(&app, "GET", "/v1/workflows/sse/events/stream", None),
    )
    .await
    .expect("stream ends after the terminal event");
    assert_eq!(live.status, StatusCode::OK);
    assert!(
        live.headers["content-type"]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/event-stream"))
    );
    let frames = sse_frames(&live.text);
    let (_, last_event, last_data) = frames.last().expect("frames").clone();
    assert_eq!(last_event, "done");
    assert!(last_data.contains("completed"), "{last_data}");
    let ids: Vec<u64> = frames.iter().filter_map(|f| f.0).collect();
    let last = *ids.last().expect("ids");
    assert_eq!(ids, (1..=last).collect::<Vec<_>>());
    let (_, ty, data) = &frames[frames.len() - 2];
    assert_eq!(ty, "workflow_completed");
    let ev: Value = serde_json::from_str(data).expect("event JSON");
    assert_eq!(ev["seq"], last);

    // Resume with Last-Event-ID (wins over ?after=).
    let resumed = call_with(
        &app,
        "GET",
        "/v1/workflows/sse/events/stream?after=1",
        None,
        &[("last-event-id", "3")],
    )
    .await;
    let ids: Vec<u64> = sse_frames(&resumed.text)
        .iter()
        .filter_map(|f| f.0)
        .collect();
    assert_eq!(ids, (4..=last).collect::<Vec<_>>());
    // An empty Last-Event-ID (the SSE spec's reset) is no resume point: ?after= holds.
    let resumed = call_with(
        &app,
        "GET",
        "/v1/workflows/sse/events/stream?after=1",
        None,
        &[("last-event-id", "")],
    )
    .await;
    assert_eq!(resumed.status, StatusCode::OK, "{}", resumed.text);
    let ids: Vec<u64> = sse_frames(&resumed.text)
        .iter()
        .filter_map(|f| f.0)
        .collect();
    assert_eq!(ids, (2..=last).collect::<Vec<_>>());
    let resumed = call(&app, "GET", "/v1/workflows/sse/events/stream?after=5", None).await;
    let ids: Vec<u64> = sse_frames(&resumed.text)
        .iter()
        .filter_map(|f| f.0)
        .collect();
    assert_eq!(ids, (6..=last).collect::<Vec<_>>());
    // Past the end: only done.
    let past = call(
        &app,
        "GET",
        &format!("/v1/workflows/sse/events/stream?after={last}"),
        None,
    )
    .await;
    let frames = sse_frames(&past.text);
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].1, "done");
    // Beyond the last event is someone else's resume point (an earlier run of the id):
    // a 400, not a stream that silently skips what comes before it.
    for (uri, header) in [
        (
            format!("/v1/workflows/sse/events/stream?after={}", last + 1),
            None,
        ),
        (
            "/v1/workflows/sse/events/stream".to_string(),
            Some(("last-event-id", "999")),
        ),
    ] {
        call_with(&app, "GET", &uri, None, header.as_slice())
            .await
            .error(StatusCode::BAD_REQUEST, "invalid_argument");
    }
}

#[tokio::test]
async fn pipeline_runs_and_is_validated_at_start() {
    let app = app().await;
    let p = json!({"steps": [
        {"type": "activity", "name": "up", "activity": "upper", "input": "$input.text"},
        {"type": "parallel", "steps": [
            {"type": "activity", "name": "a", "activity": "echo", "input": "$steps.up"},
            {"type": "activity", "name": "b", "activity": "upper", "input": ["$steps.up", "x"]}
        ]}
    ], "output": {"a": "$steps.a", "b": "$steps.b"}});
    let r = call(&app, "POST", "/v1/workflows", Some(json!({"name": "pipeline", "id": "p1", "input": {"pipeline": p, "input": {"text": "hi"}}}))).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let done = finished(&app, "p1").await;
    assert_eq!(
        done["output"],
        json!({"a": "HI", "b": ["HI", "X"]}),
        "{done}"
    );

    let unknown = json!({"steps": [{"type": "activity", "name": "a", "activity": "nope"}]});
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "pipeline", "input": {"pipeline": unknown}})),
    )
    .await
    .error(StatusCode::BAD_REQUEST, "invalid_argument");
    let bad_ref = json!({"steps": [{"type": "activity", "name": "a", "activity": "echo", "input": "$steps.z"}]});
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "pipeline", "input": {"pipeline": bad_ref}})),
    )
    .await
    .error(StatusCode::BAD_REQUEST, "invalid_argument");
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "pipeline", "input": 3})),
    )
    .await
    .error(StatusCode::BAD_REQUEST, "invalid_argument");
    // Refused at start rather than accepted to hang or misbehave: a step on an empty
    // task queue (no worker serves it), a zero start-to-close (every attempt would time
    // out at once), a name with a dot (`$steps.a.b` is field b of step a).
    let step = |options: Value, name: &str| {
        json!({"steps": [{"type": "activity", "name": name, "activity": "echo", "input": 1,
            "options": options}]})
    };
    for p in [
        step(json!({"task_queue": ""}), "a"),
        step(json!({"start_to_close_ms": 0}), "a"),
        step(json!({}), "a.b"),
    ] {
        let r = call(
            &app,
            "POST",
            "/v1/workflows",
            Some(json!({"name": "pipeline", "input": {"pipeline": p}})),
        )
        .await;
        r.error(StatusCode::BAD_REQUEST, "invalid_argument");
    }
}

/// A start or a signal whose JSON nests deeper than the engine records is a 400.
#[tokio::test]
async fn values_nested_too_deep_are_a_400() {
    let app = app().await;
    let mut deep = json!("leaf");
    for _ in 0..(marathon_core::MAX_VALUE_DEPTH + 1) {
        deep = serde_json::Value::Array(vec![deep]);
    }
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "input": deep.clone()})),
    )
    .await
    .error(StatusCode::BAD_REQUEST, "invalid_argument");
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "deep-signal", "input": {"ms": 60000, "value": 1}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    call(
        &app,
        "POST",
        "/v1/workflows/deep-signal/signals/go",
        Some(deep),
    )
    .await
    .error(StatusCode::BAD_REQUEST, "invalid_argument");
}

#[tokio::test]
async fn probes_registry_and_metrics() {
    let app = app().await;
    let h = call(&app, "GET", "/healthz", None).await;
    assert_eq!(h.status, StatusCode::OK);
    let r = call(&app, "GET", "/readyz", None).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.json()["store"], "ok");
    let m = call(&app, "GET", "/metrics", None).await;
    assert_eq!(m.status, StatusCode::OK);
    assert!(
        m.headers["content-type"]
            .to_str()
            .is_ok_and(|c| c.starts_with("text/plain"))
    );
    assert!(m.text.starts_with('#'));
    let reg = call(&app, "GET", "/v1/registry", None).await.json();
    assert_eq!(
        reg["workflows"],
        json!(["echo", "pipeline", "sleep-then-echo"])
    );
    assert_eq!(reg["activities"], json!(["echo", "sleep", "upper"]));
}

#[tokio::test]
async fn auth_when_configured() {
    let mut cfg = Config::default();
    cfg.server.auth_tokens = vec!["t0ken".into(), "other".into()];
    let app = app_with(cfg).await;
    call(&app, "GET", "/v1/registry", None)
        .await
        .error(StatusCode::UNAUTHORIZED, "unauthorized");
    call_with(
        &app,
        "GET",
        "/v1/registry",
        None,
        &[("authorization", "Bearer wrong")],
    )
    .await
    .error(StatusCode::UNAUTHORIZED, "unauthorized");
    call_with(
        &app,
        "GET",
        "/v1/registry",
        None,
        &[("authorization", "Basic t0ken")],
    )
    .await
    .error(StatusCode::UNAUTHORIZED, "unauthorized");
    call(&app, "POST", "/v1/workflows", Some(json!({"name": "echo"})))
        .await
        .error(StatusCode::UNAUTHORIZED, "unauthorized");
    let ok = call_with(
        &app,
        "GET",
        "/v1/registry",
        None,
        &[("authorization", "Bearer other")],
    )
    .await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(
        call(&app, "GET", "/healthz", None).await.status,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "GET", "/readyz", None).await.status,
        StatusCode::OK
    );
    // Without tokens, no auth.
    let open = app_with(Config::default()).await;
    assert_eq!(
        call(&open, "GET", "/v1/registry", None).await.status,
        StatusCode::OK
    );
}

#[tokio::test]
async fn worker_role_serves_probes_only() {
    let mut cfg = Config::default();
    cfg.server.role = Role::Worker;
    // The memory store is refused for a split role; the router itself can still be built.
    assert!(Server::builder().config(cfg.clone()).build().await.is_err());
    let routes = api::route_table(Role::Worker);
    let paths: BTreeSet<&str> = routes.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        paths,
        ["/healthz", "/metrics", "/readyz"].into_iter().collect()
    );
}

#[tokio::test]
async fn openapi_matches_the_routes() {
    let app = app().await;
    let doc = call(&app, "GET", "/openapi.json", None).await;
    assert_eq!(doc.status, StatusCode::OK);
    let doc = doc.json();
    assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
    assert_eq!(doc, api::openapi_json());
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "id": "doc", "input": 1})),
    )
    .await;
    finished(&app, "doc").await;

    let mut documented = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in item.as_object().expect("item").keys() {
            documented.insert((path.clone(), method.clone()));
        }
    }
    let routes: BTreeSet<(String, String)> = api::route_table(Role::All).into_iter().collect();
    assert_eq!(
        documented, routes,
        "documented routes differ from the router's"
    );
    for (path, method) in &documented {
        let uri = path.replace("{id}", "doc").replace("{name}", "go");
        let body = (method == "post" && path == "/v1/workflows")
            .then(|| json!({"name": "echo", "input": 2}));
        let r = call(&app, &method.to_uppercase(), &uri, body).await;
        assert!(
            r.status != StatusCode::NOT_FOUND && r.status != StatusCode::METHOD_NOT_ALLOWED,
            "{method} {uri}: {} {}",
            r.status,
            r.text
        );
    }
    // Documented summary fields are the ones a real summary has.
    let real = call(&app, "GET", "/v1/workflows/doc", None).await.json();
    let props = &doc["components"]["schemas"]["WorkflowSummaryDoc"]["properties"];
    for key in real.as_object().expect("summary").keys() {
        assert!(
            props.get(key).is_some(),
            "summary field {key} is not documented"
        );
    }
}

/// The same API over the Redis store (feature `redis`; Redis at `MARATHON_TEST_REDIS_URL`
/// or 127.0.0.1:6379), in a namespace of its own.
#[cfg(feature = "redis")]
#[tokio::test]
async fn runs_on_the_redis_store() {
    use futures::FutureExt;
    let url = marathon_redis::testkit::url();
    let prefix = format!("marathon-test:{}:", uuid::Uuid::new_v4());
    let outcome = std::panic::AssertUnwindSafe(Box::pin(redis_api(url.clone(), prefix.clone())))
        .catch_unwind()
        .await;
    // Leave nothing behind in the shared Redis, whatever the outcome.
    marathon_redis::testkit::delete_prefix(&url, &prefix)
        .await
        .expect("delete the run's keys");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

#[cfg(feature = "redis")]
async fn redis_api(url: String, key_prefix: String) {
    let cfg = Config {
        store: marathon_server::StoreConfig::Redis(marathon_server::config::RedisSettings {
            url,
            key_prefix,
            retention: Some(Duration::from_secs(60)),
            ..Default::default()
        }),
        ..Default::default()
    };
    let app = app_with(cfg).await;
    assert_eq!(
        call(&app, "GET", "/readyz", None).await.status,
        StatusCode::OK
    );
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "id": "r1", "input": [1, 2]})),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let done = finished(&app, "r1").await;
    assert_eq!(done["output"], json!([1, 2]));
    let page = call(&app, "GET", "/v1/workflows?name=echo", None)
        .await
        .json();
    assert_eq!(page["items"][0]["id"], "r1");
    call(&app, "GET", "/v1/workflows?cursor=garbage", None)
        .await
        .error(StatusCode::BAD_REQUEST, "invalid_argument");
    let sse = call(&app, "GET", "/v1/workflows/r1/events/stream?after=2", None).await;
    assert_eq!(
        sse_frames(&sse.text).last().map(|f| f.1.as_str()),
        Some("done")
    );
}

/// A signal's idempotency key is held to the same 1 to 256 bytes as a start's (a
/// 4,000-byte key was accepted and stored).
#[tokio::test]
async fn signal_rejects_over_long_idempotency_key() {
    let app = app().await;
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "sig-key", "input": {"ms": 600000}})),
    )
    .await;
    let key = "k".repeat(4000);
    call_with(
        &app,
        "POST",
        "/v1/workflows/sig-key/signals/go",
        Some(json!(1)),
        &[("idempotency-key", key.as_str())],
    )
    .await
    .error(StatusCode::BAD_REQUEST, "invalid_argument");
    let ok = call_with(
        &app,
        "POST",
        "/v1/workflows/sig-key/signals/go",
        Some(json!(1)),
        &[("idempotency-key", "k".repeat(256).as_str())],
    )
    .await;
    assert_eq!(ok.status, StatusCode::ACCEPTED, "256 bytes: {}", ok.text);
    let empty = call_with(
        &app,
        "POST",
        "/v1/workflows/sig-key/signals/go",
        Some(json!(1)),
        &[("idempotency-key", "")],
    )
    .await;
    assert_eq!(
        empty.status,
        StatusCode::ACCEPTED,
        "an empty key (some proxies add one) counts as none: {}",
        empty.text
    );
}

/// RFC 7235 section 2.1 / RFC 6750: the auth scheme is case-insensitive.
#[tokio::test]
async fn bearer_scheme_is_case_insensitive() {
    let mut cfg = Config::default();
    cfg.server.auth_tokens = vec!["t0ken".into()];
    let app = app_with(cfg).await;
    let r = call_with(
        &app,
        "GET",
        "/v1/registry",
        None,
        &[("authorization", "bearer t0ken")],
    )
    .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

/// The OpenAPI document lists the statuses a route answers: cancel answers 400 for a
/// bad id or body (it documented none).
#[tokio::test]
async fn openapi_documents_cancel_400() {
    let app = app().await;
    let r = raw(
        &app,
        "POST",
        "/v1/workflows/bad%20id/cancel",
        Some("application/json"),
        "",
    )
    .await;
    r.error(StatusCode::BAD_REQUEST, "invalid_argument");
    let doc = api::openapi_json();
    let responses = &doc["paths"]["/v1/workflows/{id}/cancel"]["post"]["responses"];
    assert!(
        responses.get("400").is_some(),
        "cancel answers 400 but documents only {:?}",
        responses.as_object().map(|o| o.keys().collect::<Vec<_>>())
    );
}

/// `marathon config print` (`Config::to_masked_toml`) shows no Redis password, also not
/// in the URLs of `store.cluster_nodes` (it showed them).
#[cfg(feature = "redis")]
#[tokio::test]
async fn config_print_masks_cluster_node_passwords() {
    let cfg = Config {
        store: marathon_server::StoreConfig::Redis(marathon_server::config::RedisSettings {
            url: "redis://:urlsecret@127.0.0.1:6379".into(),
            cluster_nodes: vec!["redis://:hunter2@10.0.0.1:6379".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let shown = cfg.to_masked_toml();
    assert!(!shown.contains("urlsecret"), "{shown}");
    assert!(!shown.contains("hunter2"), "password printed:\n{shown}");
}

/// Lists of strings are comma-separated in environment variables, the cluster seed
/// list too (it was read as one string and refused).
#[cfg(feature = "redis")]
#[tokio::test]
async fn cluster_nodes_from_environment() {
    let sources = marathon_server::Sources {
        env: vec![
            ("MARATHON_STORE__KIND".into(), "redis".into()),
            (
                "MARATHON_STORE__CLUSTER_NODES".into(),
                "redis://10.0.0.1:6379,redis://10.0.0.2:6379".into(),
            ),
        ],
        ..Default::default()
    };
    let cfg = Config::load(&sources).expect("a comma-separated list of cluster nodes loads");
    match cfg.store {
        marathon_server::StoreConfig::Redis(r) => assert_eq!(r.cluster_nodes.len(), 2),
        other => panic!("{other:?}"),
    }
}

/// Signal and cancel read their body as JSON whatever its `Content-Type` (`curl -d`
/// sends a form type, a browser's `fetch` `text/plain`), as they always have; a body
/// that is not JSON is a 400.
#[tokio::test]
async fn signal_and_cancel_bodies_are_json_whatever_their_content_type() {
    let app = app().await;
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "sig-ct", "input": {"ms": 600000}})),
    )
    .await;
    for ty in [
        Some("text/plain;charset=UTF-8"),
        Some("application/x-www-form-urlencoded"),
        None,
    ] {
        let r = raw(
            &app,
            "POST",
            "/v1/workflows/sig-ct/signals/go",
            ty,
            "{\"by\": \"ana\"}",
        )
        .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{ty:?}: {}", r.text);
    }
    raw(
        &app,
        "POST",
        "/v1/workflows/sig-ct/signals/go",
        Some("text/plain"),
        "by ana",
    )
    .await
    .error(StatusCode::BAD_REQUEST, "invalid_argument");
    let r = raw(
        &app,
        "POST",
        "/v1/workflows/sig-ct/cancel",
        Some("text/plain"),
        "{\"reason\": \"x\"}",
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
}

/// `sleep-then-echo` checks its input at start: a typo is a 400, not a failed run.
#[tokio::test]
async fn sleep_then_echo_input_is_checked_at_start() {
    let app = app().await;
    for input in [json!({"ms": "x"}), json!({"mss": 5})] {
        call(
            &app,
            "POST",
            "/v1/workflows",
            Some(json!({"name": "sleep-then-echo", "input": input})),
        )
        .await
        .error(StatusCode::BAD_REQUEST, "invalid_argument");
    }
}

/// Every field of `sleep-then-echo`'s input has a default (docs/API.md: `ms` 1000,
/// `value` null), and a start's `input` defaults to null: a start without one runs
/// with the defaults. It was a 400 ("invalid type: null, expected struct").
#[tokio::test]
async fn sleep_then_echo_runs_with_its_defaults_without_an_input() {
    let app = app().await;
    for (id, body) in [
        (
            "ste-none",
            json!({"name": "sleep-then-echo", "id": "ste-none"}),
        ),
        (
            "ste-null",
            json!({"name": "sleep-then-echo", "id": "ste-null", "input": null}),
        ),
    ] {
        let r = call(&app, "POST", "/v1/workflows", Some(body)).await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
        let done = finished(&app, id).await;
        assert_eq!(done["status"], "completed", "{done}");
        assert_eq!(done["output"], Value::Null, "{done}");
        let events = call(&app, "GET", &format!("/v1/workflows/{id}/events"), None)
            .await
            .json();
        let timer = events["events"]
            .as_array()
            .expect("events")
            .iter()
            .find(|e| e["type"] == "timer_started")
            .cloned()
            .expect("a timer");
        let started = events["events"][0]["timestamp"].as_u64().expect("ts");
        let fire_at = timer["payload"]["fire_at"].as_u64().expect("fire_at");
        assert!(
            (1000..2000).contains(&(fire_at - started)),
            "the default 1000 ms: {timer}"
        );
    }
}

/// A misspelled query parameter is a 400, not silently dropped: `?stauts=running`
/// listed every workflow (a script that cancels "the running ones" cancels all), and
/// `?timeout=30s` on /result answered at once instead of long-polling.
#[tokio::test]
async fn unknown_query_parameters_are_a_400() {
    let app = app().await;
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "id": "q-done", "input": 1})),
    )
    .await;
    finished(&app, "q-done").await;
    for uri in [
        "/v1/workflows?stauts=running",
        "/v1/workflows?state=running",
        "/v1/workflows/q-done/result?timeout=30s",
        "/v1/workflows/q-done/events?from=3",
    ] {
        call(&app, "GET", uri, None)
            .await
            .error(StatusCode::BAD_REQUEST, "invalid_argument");
    }
}

/// Routes without query parameters refuse any, as docs/API.md says of every route
/// but the SSE stream. They ignored them: a client that put its idempotency key in the
/// query (`POST /v1/workflows?idempotency_key=k`, or on a signal) got a 202 each time
/// and a second workflow (or signal) on its retry, and `GET /v1/workflows/{id}?wait=30s`
/// answered at once as if it had waited.
#[tokio::test]
async fn query_parameters_on_routes_that_take_none_are_a_400() {
    let app = app().await;
    let start = json!({"name": "sleep-then-echo", "id": "q-run", "input": {"ms": 600000}});
    let r = call(&app, "POST", "/v1/workflows", Some(start)).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    for _ in 0..2 {
        call(
            &app,
            "POST",
            "/v1/workflows?idempotency_key=order-1",
            Some(json!({"name": "echo", "input": 1})),
        )
        .await
        .error(StatusCode::BAD_REQUEST, "invalid_argument");
        call(
            &app,
            "POST",
            "/v1/workflows/q-run/signals/go?idempotency_key=s-1",
            Some(json!(1)),
        )
        .await
        .error(StatusCode::BAD_REQUEST, "invalid_argument");
    }
    for (method, uri) in [
        ("GET", "/v1/workflows/q-run?wait=30s"),
        ("POST", "/v1/workflows/q-run/cancel?reason=done"),
        ("GET", "/v1/registry?verbose=1"),
    ] {
        call(&app, method, uri, None)
            .await
            .error(StatusCode::BAD_REQUEST, "invalid_argument");
    }
    // Nothing was started, signaled or canceled.
    let list = call(&app, "GET", "/v1/workflows", None).await.json();
    assert_eq!(list["items"].as_array().map(Vec::len), Some(1), "{list}");
    let run = call(&app, "GET", "/v1/workflows/q-run", None).await.json();
    assert_eq!(run["cancel_requested"], false, "{run}");
    let events = call(&app, "GET", "/v1/workflows/q-run/events", None)
        .await
        .json();
    let types: Vec<&str> = events["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert!(!types.contains(&"signal_received"), "{types:?}");
    // An empty query is no parameter; probes, metrics and the document ignore theirs.
    let r = call(&app, "GET", "/v1/workflows/q-run?", None).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    for uri in [
        "/healthz?x=1",
        "/readyz?x=1",
        "/metrics?x=1",
        "/openapi.json?x=1",
    ] {
        let r = call(&app, "GET", uri, None).await;
        assert_eq!(r.status, StatusCode::OK, "{uri}: {}", r.text);
    }
}

/// POST /v1/workflows answers 415 without `Content-Type: application/json` (docs/API.md
/// says so) but /openapi.json did not list it.
#[tokio::test]
async fn openapi_documents_start_415() {
    let app = app().await;
    raw(
        &app,
        "POST",
        "/v1/workflows",
        Some("text/plain"),
        "{\"name\":\"echo\"}",
    )
    .await
    .error(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    let doc = api::openapi_json();
    let responses = &doc["paths"]["/v1/workflows"]["post"]["responses"];
    assert!(
        responses.get("415").is_some(),
        "start answers 415 but documents only {:?}",
        responses.as_object().map(|o| o.keys().collect::<Vec<_>>())
    );
}

/// Every route that answers 401 when auth is on documents it; the probes, which
/// never ask for a token, do not.
#[tokio::test]
async fn openapi_documents_401_on_every_protected_route() {
    let app = app_with(Config {
        server: marathon_server::config::ServerConfig {
            auth_tokens: vec!["t0ken".into()],
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let doc = api::openapi_json();
    for (path, method) in api::route_table(Role::All) {
        let uri = path.replace("{id}", "x").replace("{name}", "n");
        let answered = send(
            &app,
            Request::builder()
                .method(method.to_ascii_uppercase().as_str())
                .uri(&uri)
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .status;
        let documented = doc["paths"][&path][&method]["responses"]
            .get("401")
            .is_some();
        assert_eq!(
            answered == StatusCode::UNAUTHORIZED,
            documented,
            "{method} {path} answers {answered} without a token; 401 documented: {documented}"
        );
    }
}

/// `wait` is capped at `server.result_wait_max_ms` (docs/API.md); a number too big for
/// u64 milliseconds was a 400 instead of the cap.
#[tokio::test]
async fn huge_wait_is_capped_not_refused() {
    let mut cfg = Config::default();
    cfg.server.result_wait_max = Duration::from_millis(50);
    let app = app_with(cfg).await;
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "w-cap", "input": {"ms": 600000}})),
    )
    .await;
    for w in [
        "99999999999999999999999",
        "99999999999999999999999m",
        "18446744073709551616ms",
    ] {
        let r = call(
            &app,
            "GET",
            &format!("/v1/workflows/w-cap/result?wait={w}"),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "wait={w}: {}", r.text);
    }
}

/// A signal's Idempotency-Key makes a retry safe: "a repeat with the same key is
/// recorded once" and answers 202 "(or a repeat)". When the signal itself finished the
/// workflow (an approval), the client's retry of that same delivered signal — after a
/// timeout, say — got 409 "already finished": the client is told its signal failed
/// when it was recorded and acted on.
#[tokio::test]
async fn keyed_signal_retry_after_it_finished_the_workflow_is_202() {
    let server = Server::builder()
        .workflow(
            "approval",
            |ctx: marathon_core::WorkflowContext, _: Value| async move {
                ctx.signal::<Value>("approve").await
            },
        )
        .build()
        .await
        .expect("server builds");
    let worker = Worker::start(server.engine().clone(), server.config().worker.clone());
    let app = App {
        router: server.router(),
        _worker: worker,
    };
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "approval", "id": "appr"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let key = [("idempotency-key", "approve-1")];
    let first = call_with(
        &app,
        "POST",
        "/v1/workflows/appr/signals/approve",
        Some(json!({"by": "ana"})),
        &key,
    )
    .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    let done = finished(&app, "appr").await;
    assert_eq!(done["status"], "completed");
    // The client's retry of the very same request (same key, same body).
    let retry = call_with(
        &app,
        "POST",
        "/v1/workflows/appr/signals/approve",
        Some(json!({"by": "ana"})),
        &key,
    )
    .await;
    assert_eq!(
        retry.status,
        StatusCode::ACCEPTED,
        "a repeat of a recorded signal: {}",
        retry.text
    );
    // A new signal (another key, or none) on the finished workflow is still a 409.
    call_with(
        &app,
        "POST",
        "/v1/workflows/appr/signals/approve",
        Some(json!(1)),
        &[("idempotency-key", "approve-2")],
    )
    .await
    .error(StatusCode::CONFLICT, "conflict");
}

/// "A repeat [cancel] is also 202" (docs/API.md): the first cancellation closes a run
/// waiting on a timer almost at once, and a client's retry then got 409 "already
/// finished". A cancel of a run that finished without one is still 409.
#[tokio::test]
async fn a_repeated_cancel_after_the_run_closed_is_202() {
    let app = app().await;
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "c-twice", "input": {"ms": 600000}})),
    )
    .await;
    let first = call(
        &app,
        "POST",
        "/v1/workflows/c-twice/cancel",
        Some(json!({"reason": "r1"})),
    )
    .await;
    assert_eq!(first.status, StatusCode::ACCEPTED, "{}", first.text);
    assert_eq!(finished(&app, "c-twice").await["status"], "canceled");
    let again = call(
        &app,
        "POST",
        "/v1/workflows/c-twice/cancel",
        Some(json!({"reason": "r2"})),
    )
    .await;
    assert_eq!(again.status, StatusCode::ACCEPTED, "{}", again.text);
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "id": "c-done", "input": 1})),
    )
    .await;
    finished(&app, "c-done").await;
    call(&app, "POST", "/v1/workflows/c-done/cancel", None)
        .await
        .error(StatusCode::CONFLICT, "conflict");
}

/// With the SQS queue, a start whose `task_queue` SQS would refuse on every send is
/// a 400 naming `task_queue`, not a 202 whose workflow never runs.
#[cfg(feature = "sqs")]
#[tokio::test]
async fn a_task_queue_sqs_refuses_is_a_400_on_sqs() {
    use marathon_server::config::QueueConfig;
    use std::sync::Arc;
    // The real SQS queue on LocalStack, under a prefix of its own.
    let sqs_cfg = marathon_sqs::testkit::config(5, false);
    let cfg = Config {
        queue: QueueConfig::Sqs(sqs_cfg.clone()),
        ..Config::default()
    };
    let queue = Arc::new(marathon_sqs::testkit::connect(sqs_cfg).await);
    let server = Server::builder()
        .builtins()
        .config(cfg)
        .queue(queue.clone())
        .build()
        .await
        .expect("server builds");
    let app = App {
        router: server.router(),
        _worker: Worker::start(server.engine().clone(), server.config().worker.clone()),
    };
    for bad in ["bad name/x", "llm.calls", &"q".repeat(80)] {
        let r = call(
            &app,
            "POST",
            "/v1/workflows",
            Some(json!({"name": "echo", "input": 1, "task_queue": bad})),
        )
        .await;
        r.error(StatusCode::BAD_REQUEST, "invalid_argument");
        assert!(r.text.contains("task_queue"), "{}", r.text);
    }
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "input": 1, "task_queue": "llm_calls-2"})),
    )
    .await;
    drop(app);
    marathon_sqs::testkit::delete_queues(queue.client(), &queue.config().queue_prefix).await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
}

/// An events page stops at about 4 MiB of JSON (at least one event), however many
/// events `limit` allows; `next_after` continues it. Before, a page read and sent
/// `limit` events whatever their size (up to 1,000 of up to 2 MiB each).
#[tokio::test]
async fn an_events_page_stops_at_its_byte_budget() {
    let mut cfg = Config::default();
    cfg.server.body_limit = 2 * 1024 * 1024;
    let app = app_with(cfg).await;
    let big = "x".repeat(1_500_000);
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "id": "big-events", "input": big})),
    )
    .await;
    assert_eq!(
        r.status,
        StatusCode::ACCEPTED,
        "{}",
        &r.text[..r.text.len().min(300)]
    );
    let done = finished(&app, "big-events").await;
    assert_eq!(done["status"], "completed");
    let mut after = 0;
    let mut pages = Vec::new();
    loop {
        let r = call(
            &app,
            "GET",
            &format!("/v1/workflows/big-events/events?after={after}&limit=1000"),
            None,
        )
        .await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.text.len() < 4 * 1024 * 1024 + 1_600_000,
            "a page of {} bytes",
            r.text.len()
        );
        let v = r.json();
        let events = v["events"].as_array().expect("events").clone();
        if events.is_empty() {
            break;
        }
        after = v["next_after"].as_u64().expect("next_after");
        pages.push(events);
    }
    let seqs: Vec<u64> = pages
        .iter()
        .flatten()
        .map(|e| e["seq"].as_u64().expect("seq"))
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    assert!(pages.len() >= 2, "one page held the whole history");
    assert_eq!(
        pages
            .last()
            .and_then(|p| p.last())
            .map(|e| e["type"].clone()),
        Some(json!("workflow_completed"))
    );
}

/// A list page stops at about 4 MiB of summaries' JSON (at least one summary), however
/// many `limit` allows; `next_cursor` continues it. Before, a page held `limit`
/// summaries whatever their outputs (up to 1,000 of up to 2 MiB each).
#[tokio::test]
async fn a_list_page_stops_at_its_byte_budget() {
    let mut cfg = Config::default();
    cfg.server.body_limit = 2 * 1024 * 1024;
    let app = app_with(cfg).await;
    let big = "x".repeat(1_500_000);
    let mut ids = Vec::new();
    for i in 0..4 {
        let id = format!("big-output-{i}");
        let r = call(
            &app,
            "POST",
            "/v1/workflows",
            Some(json!({"name": "echo", "id": id, "input": big})),
        )
        .await;
        assert_eq!(r.status, StatusCode::ACCEPTED);
        assert_eq!(finished(&app, &id).await["status"], "completed");
        ids.push(id);
    }
    let mut listed = Vec::new();
    let mut pages = 0;
    let mut uri = "/v1/workflows?name=echo&limit=1000".to_string();
    loop {
        let r = call(&app, "GET", &uri, None).await;
        assert_eq!(r.status, StatusCode::OK);
        assert!(
            r.text.len() < 4 * 1024 * 1024 + 1_600_000,
            "a page of {} bytes",
            r.text.len()
        );
        pages += 1;
        let v = r.json();
        let items = v["items"].as_array().expect("items").clone();
        assert!(!items.is_empty());
        listed.extend(
            items
                .iter()
                .map(|s| s["id"].as_str().expect("id").to_string()),
        );
        match v["next_cursor"].as_str() {
            Some(c) => uri = format!("/v1/workflows?name=echo&limit=1000&cursor={c}"),
            None => break,
        }
    }
    assert!(pages >= 2, "one page held every output");
    listed.sort();
    assert_eq!(listed, ids);
}

/// A memory store whose `get` fails while `fail_get` is set, and whose `subscribe`
/// hands back a stream that ends at once while `end_streams` is set; `subscribed`
/// is notified at each subscription; `read_bytes` holds the JSON size of what each
/// `read` returned.
#[derive(Default)]
struct BreakingStore {
    inner: marathon_core::memory::MemoryStore,
    fail_get: std::sync::atomic::AtomicBool,
    end_streams: std::sync::atomic::AtomicBool,
    subscribed: tokio::sync::Notify,
    read_bytes: std::sync::Mutex<Vec<usize>>,
}

#[async_trait::async_trait]
impl marathon_core::testkit::ForwardingStore for BreakingStore {
    fn inner(&self) -> &dyn marathon_core::Store {
        &self.inner
    }
    async fn get(
        &self,
        id: &marathon_core::WorkflowId,
    ) -> Result<Option<marathon_core::WorkflowSummary>, marathon_core::StoreError> {
        if self.fail_get.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(marathon_core::StoreError::Unavailable("down".into()));
        }
        self.inner().get(id).await
    }
    async fn read(
        &self,
        id: &marathon_core::WorkflowId,
        after: marathon_core::Seq,
        limit: usize,
    ) -> Result<Vec<marathon_core::Event>, marathon_core::StoreError> {
        let events = self.inner().read(id, after, limit).await?;
        let bytes = serde_json::to_vec(&events).map_or(0, |v| v.len());
        self.read_bytes.lock().expect("not poisoned").push(bytes);
        Ok(events)
    }
    async fn subscribe(
        &self,
        id: &marathon_core::WorkflowId,
        after: marathon_core::Seq,
    ) -> Result<marathon_core::EventStream, marathon_core::StoreError> {
        let stream = if self.end_streams.load(std::sync::atomic::Ordering::SeqCst) {
            futures::StreamExt::boxed(futures::stream::empty())
        } else {
            self.inner().subscribe(id, after).await?
        };
        self.subscribed.notify_one();
        Ok(stream)
    }
}

/// An app on `store` (memory queue, built-ins, a worker) with `cfg`.
async fn app_on(store: std::sync::Arc<BreakingStore>, cfg: Config) -> App {
    app_from(Server::builder().builtins().config(cfg).store(store)).await
}

/// An events page reads a few events first and then only about as many as the rest
/// of its 4 MiB holds at their size: before, it read 100 at a time, so a history of
/// 2 MiB events held 200 MiB in memory to send two of them.
#[tokio::test]
async fn an_events_page_reads_about_what_it_sends() {
    let mut cfg = Config::default();
    cfg.server.body_limit = 2 * 1024 * 1024;
    let store = std::sync::Arc::new(BreakingStore::default());
    let app = app_on(store.clone(), cfg).await;
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "big-signals", "input": {"ms": 600000, "value": "v"}})),
    )
    .await;
    let big = json!("s".repeat(1_500_000));
    for _ in 0..20 {
        let r = call(
            &app,
            "POST",
            "/v1/workflows/big-signals/signals/s",
            Some(big.clone()),
        )
        .await;
        assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    }
    let mut after = 0;
    let mut seen = 0;
    loop {
        store.read_bytes.lock().expect("not poisoned").clear();
        let r = call(
            &app,
            "GET",
            &format!("/v1/workflows/big-signals/events?after={after}&limit=1000"),
            None,
        )
        .await;
        let v = r.json();
        let events = v["events"].as_array().expect("events").len();
        let read: usize = store.read_bytes.lock().expect("not poisoned").iter().sum();
        // At most the first few events beyond what the page sends.
        assert!(
            read <= r.text.len() + 8 * 1_600_000,
            "read {read} bytes for a page of {}",
            r.text.len()
        );
        if events == 0 {
            break;
        }
        seen += events;
        after = v["next_after"].as_u64().expect("next_after");
    }
    assert!(seen >= 21, "{seen} events");
}

/// A stream keeps its contract when the store fails at its end: `done` after the
/// terminal event says the status and last sequence the event itself gives (before,
/// it read the summary again, and a failed read sent `done` with only the id); a
/// store stream that ends before the workflow does ends with `event: error`, telling
/// the client to reconnect (before, the stream just stopped, as a finished one does).
#[tokio::test]
async fn sse_ends_as_documented_when_the_store_fails() {
    use std::sync::atomic::Ordering;
    let store = std::sync::Arc::new(BreakingStore::default());
    let app = app_on(store.clone(), Config::default()).await;
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "sse-fail", "input": {"ms": 500, "value": "v"}})),
    )
    .await;
    // The store fails once the stream has subscribed: until the workflow is done.
    let (live, ()) = tokio::join!(
        tokio::time::timeout(
            Duration::from_secs(20),
            call(&app, "GET", "/v1/workflows/sse-fail/events/stream", None),
        ),
        async {
            store.subscribed.notified().await;
            store.fail_get.store(true, Ordering::SeqCst);
        }
    );
    let live = live.expect("the stream ends");
    store.fail_get.store(false, Ordering::SeqCst);
    let frames = sse_frames(&live.text);
    let (_, event, data) = frames.last().expect("frames").clone();
    assert_eq!(event, "done", "{frames:?}");
    let done: Value = serde_json::from_str(&data).expect("done JSON");
    let last = frames.iter().filter_map(|f| f.0).max().expect("ids");
    assert_eq!(
        done,
        json!({"id": "sse-fail", "status": "completed", "last_seq": last})
    );

    // A store stream that ends while the workflow runs.
    call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "sse-cut", "input": {"ms": 60000, "value": "v"}})),
    )
    .await;
    store.end_streams.store(true, Ordering::SeqCst);
    let cut = tokio::time::timeout(
        Duration::from_secs(20),
        call(&app, "GET", "/v1/workflows/sse-cut/events/stream", None),
    )
    .await
    .expect("the stream ends");
    let frames = sse_frames(&cut.text);
    let (_, event, data) = frames.last().expect("an error frame").clone();
    assert_eq!(event, "error", "{frames:?}");
    let error: Value = serde_json::from_str(&data).expect("error JSON");
    assert_eq!(error["error"]["code"], "unavailable", "{error}");
    assert!(
        error["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("Last-Event-ID")),
        "{error}"
    );
}

/// With the in-memory queue this process's workers are the only ones: a start on a
/// task queue they do not serve is a 400 naming it, not a 202 whose workflow never
/// runs, and a pipeline step called on one fails the run (`invalid_argument`) instead
/// of waiting for ever. Before, both were taken and never ran.
#[tokio::test]
async fn an_unserved_task_queue_is_refused_with_the_memory_queue() {
    let app = app().await;
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "input": 1, "task_queue": "elsewhere"})),
    )
    .await;
    r.error(StatusCode::BAD_REQUEST, "invalid_argument");
    assert!(
        r.text.contains("task_queue") && r.text.contains("\\\"default\\\""),
        "{}",
        r.text
    );
    let p = json!({"steps": [{"type": "activity", "name": "a", "activity": "echo", "input": 1,
        "options": {"task_queue": "elsewhere"}}]});
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "pipeline", "id": "unserved-step", "input": {"pipeline": p}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let done = finished(&app, "unserved-step").await;
    assert_eq!(done["status"], "failed", "{done}");
    assert!(done.to_string().contains("invalid_argument"), "{done}");
}

/// How [`FaultyStore`] fails the calls of the API's routes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// `StoreError::Unavailable`: a passing failure (the API's 503).
    Unavailable,
    /// `StoreError::Backend`: a permanent one (the API's 500).
    Backend,
}

/// A store whose calls that the API's routes make (create, append, read, subscribe,
/// get, list) fail as `fault` says.
struct FaultyStore {
    inner: std::sync::Arc<dyn marathon_core::Store>,
    fault: std::sync::Mutex<Option<Fault>>,
}

impl FaultyStore {
    fn on(inner: std::sync::Arc<dyn marathon_core::Store>) -> std::sync::Arc<Self> {
        std::sync::Arc::new(Self {
            inner,
            fault: std::sync::Mutex::new(None),
        })
    }

    fn set(&self, fault: Fault) {
        *self.fault.lock().expect("not poisoned") = Some(fault);
    }

    fn check(&self) -> Result<(), marathon_core::StoreError> {
        match *self.fault.lock().expect("not poisoned") {
            None | Some(Fault::None) => Ok(()),
            Some(Fault::Unavailable) => Err(marathon_core::StoreError::Unavailable("down".into())),
            Some(Fault::Backend) => Err(marathon_core::StoreError::Backend("broken".into())),
        }
    }
}

#[async_trait::async_trait]
impl marathon_core::testkit::ForwardingStore for FaultyStore {
    fn inner(&self) -> &dyn marathon_core::Store {
        &*self.inner
    }
    async fn create(
        &self,
        new: marathon_core::NewWorkflow,
    ) -> Result<marathon_core::Created, marathon_core::StoreError> {
        self.check()?;
        self.inner().create(new).await
    }
    async fn append(
        &self,
        id: &marathon_core::WorkflowId,
        expected_last: marathon_core::Seq,
        events: Vec<marathon_core::NewEvent>,
        owed: marathon_core::OwedChanges,
    ) -> Result<marathon_core::Seq, marathon_core::StoreError> {
        self.check()?;
        self.inner().append(id, expected_last, events, owed).await
    }
    async fn append_keyed(
        &self,
        id: &marathon_core::WorkflowId,
        append: marathon_core::KeyedAppend,
    ) -> Result<marathon_core::KeyedOutcome, marathon_core::StoreError> {
        self.check()?;
        self.inner().append_keyed(id, append).await
    }
    async fn read(
        &self,
        id: &marathon_core::WorkflowId,
        after: marathon_core::Seq,
        limit: usize,
    ) -> Result<Vec<marathon_core::Event>, marathon_core::StoreError> {
        self.check()?;
        self.inner().read(id, after, limit).await
    }
    async fn subscribe(
        &self,
        id: &marathon_core::WorkflowId,
        after: marathon_core::Seq,
    ) -> Result<marathon_core::EventStream, marathon_core::StoreError> {
        self.check()?;
        self.inner().subscribe(id, after).await
    }
    async fn get(
        &self,
        id: &marathon_core::WorkflowId,
    ) -> Result<Option<marathon_core::WorkflowSummary>, marathon_core::StoreError> {
        self.check()?;
        self.inner().get(id).await
    }
    async fn list(
        &self,
        query: &marathon_core::ListQuery,
    ) -> Result<marathon_core::ListPage, marathon_core::StoreError> {
        self.check()?;
        self.inner().list(query).await
    }
}

/// One row of the error table: a request, the store's state while it runs, and the
/// status it must get.
struct ErrorCase {
    method: &'static str,
    /// The route as documented (`/v1/workflows/{id}`).
    path: &'static str,
    uri: String,
    headers: Vec<(&'static str, axum::http::HeaderValue)>,
    content_type: Option<&'static str>,
    body: Vec<u8>,
    fault: Fault,
    status: StatusCode,
}

impl ErrorCase {
    fn new(method: &'static str, path: &'static str, uri: impl Into<String>, status: u16) -> Self {
        Self {
            method,
            path,
            uri: uri.into(),
            headers: Vec::new(),
            content_type: None,
            body: Vec::new(),
            fault: Fault::None,
            status: StatusCode::from_u16(status).expect("a status"),
        }
    }

    /// With a JSON body (`Content-Type: application/json`).
    fn json(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.content_type = Some("application/json");
        self.body = body.into();
        self
    }

    /// With a body of another (or no) content type.
    fn raw(mut self, content_type: Option<&'static str>, body: impl Into<Vec<u8>>) -> Self {
        self.content_type = content_type;
        self.body = body.into();
        self
    }

    fn header(mut self, name: &'static str, value: &[u8]) -> Self {
        let value = axum::http::HeaderValue::from_bytes(value).expect("a header value");
        self.headers.push((name, value));
        self
    }

    fn fault(mut self, fault: Fault) -> Self {
        self.fault = fault;
        self
    }

    fn request(&self) -> Request<Body> {
        let mut req = Request::builder().method(self.method).uri(&self.uri);
        if let Some(ct) = self.content_type {
            req = req.header("content-type", ct);
        }
        for (k, v) in &self.headers {
            req = req.header(*k, v.clone());
        }
        req.body(Body::from(self.body.clone())).expect("request")
    }
}

/// The stable code of an error status (docs/API.md, "Errors").
fn error_code(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 => "invalid_argument",
        404 => "not_found",
        409 => "conflict",
        413 => "payload_too_large",
        415 => "unsupported_media_type",
        500 => "internal",
        503 => "unavailable",
        s => panic!("no error code for {s} in the table"),
    }
}

/// Every error status a route answers with the error body is listed for that route in
/// /openapi.json with the `ErrorBody` schema, and every error status listed is one the
/// route answers. A table of requests provokes each: bad bodies, parameters, ids and
/// headers, unknown and finished workflows, oversized bodies, a wrong content type, and
/// a store that is unavailable (503) or rejects the call (500). Before, no route
/// listed its 503 or 500, and the SSE stream not its 400 for a bad query parameter.
#[tokio::test]
async fn openapi_lists_every_error_status_a_route_answers() {
    Box::pin(error_table(FaultyStore::on(std::sync::Arc::new(
        marathon_core::memory::MemoryStore::default(),
    ))))
    .await;
}

/// The error table of `openapi_lists_every_error_status_a_route_answers` on the Redis
/// store (feature `redis`), in a namespace of its own: the same statuses and bodies.
#[cfg(feature = "redis")]
#[tokio::test]
async fn the_error_table_holds_on_the_redis_store() {
    use futures::FutureExt;
    let url = marathon_redis::testkit::url();
    let key_prefix = format!("marathon-test:{}:", uuid::Uuid::new_v4());
    let redis = marathon_redis::RedisStore::connect(marathon_redis::RedisStoreConfig {
        url: url.clone(),
        key_prefix: key_prefix.clone(),
        ..Default::default()
    })
    .await
    .expect("no Redis at MARATHON_TEST_REDIS_URL or 127.0.0.1:6379");
    let outcome = std::panic::AssertUnwindSafe(Box::pin(error_table(FaultyStore::on(
        std::sync::Arc::new(redis),
    ))))
    .catch_unwind()
    .await;
    marathon_redis::testkit::delete_prefix(&url, &key_prefix)
        .await
        .expect("delete the run's keys");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

async fn error_table(store: std::sync::Arc<FaultyStore>) {
    let mut cfg = Config::default();
    // Above a cancel reason's 64 KiB, so that an over-long reason is a 400, not a 413.
    cfg.server.body_limit = 128 * 1024;
    let app = app_on_store(store.clone(), cfg).await;
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "sleep-then-echo", "id": "running", "input": {"ms": 600000}})),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "id": "done", "input": 1})),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
    finished(&app, "done").await;

    let too_big = vec![b' '; 200 * 1024];
    let mut deep = json!(1);
    for _ in 0..=marathon_core::MAX_VALUE_DEPTH {
        deep = json!([deep]);
    }
    let long_id = "x".repeat(201);
    let long_key = "k".repeat(257);
    let long_name = "n".repeat(201);
    let non_ascii: &[u8] = b"caf\xe9";
    let (get, post) = ("GET", "POST");
    let start = "/v1/workflows";
    let list = "/v1/workflows";
    let summary = "/v1/workflows/{id}";
    let cancel = "/v1/workflows/{id}/cancel";
    let signal = "/v1/workflows/{id}/signals/{name}";
    let result = "/v1/workflows/{id}/result";
    let events = "/v1/workflows/{id}/events";
    let stream = "/v1/workflows/{id}/events/stream";
    let registry = "/v1/registry";
    let echo = br#"{"name": "echo"}"#;
    let cases = vec![
        // POST /v1/workflows
        ErrorCase::new(post, start, start, 400).json(&b"{\"name\":"[..]),
        ErrorCase::new(post, start, start, 400).json(&br#"{"name": 5}"#[..]),
        ErrorCase::new(post, start, start, 400).json(&br#"{"name": "echo", "extra": 1}"#[..]),
        ErrorCase::new(post, start, start, 400).json(&br#"{"name": "nope"}"#[..]),
        ErrorCase::new(post, start, start, 400).json(&b"[]"[..]),
        ErrorCase::new(post, start, start, 400).json(Vec::new()),
        ErrorCase::new(post, start, start, 400)
            .json(json!({"name": "echo", "id": long_id}).to_string()),
        ErrorCase::new(post, start, start, 400).json(&br#"{"name": "echo", "id": "a b"}"#[..]),
        ErrorCase::new(post, start, start, 400)
            .json(json!({"name": "echo", "input": deep}).to_string()),
        ErrorCase::new(post, start, start, 400).json(&br#"{"name": "echo", "task_queue": ""}"#[..]),
        ErrorCase::new(post, start, start, 400)
            .json(&echo[..])
            .header("idempotency-key", long_key.as_bytes()),
        ErrorCase::new(post, start, start, 400)
            .json(&echo[..])
            .header("idempotency-key", non_ascii),
        ErrorCase::new(post, start, "/v1/workflows?idempotency_key=k", 400).json(&echo[..]),
        ErrorCase::new(post, start, start, 409)
            .json(&br#"{"name": "sleep-then-echo", "id": "done"}"#[..]),
        ErrorCase::new(post, start, start, 413).json(too_big.clone()),
        ErrorCase::new(post, start, start, 415).raw(Some("text/plain"), &echo[..]),
        ErrorCase::new(post, start, start, 415).raw(None, &echo[..]),
        ErrorCase::new(post, start, start, 503)
            .json(&echo[..])
            .fault(Fault::Unavailable),
        ErrorCase::new(post, start, start, 500)
            .json(&echo[..])
            .fault(Fault::Backend),
        // GET /v1/workflows
        ErrorCase::new(get, list, "/v1/workflows?status=sleeping", 400),
        ErrorCase::new(get, list, "/v1/workflows?limit=0", 400),
        ErrorCase::new(get, list, "/v1/workflows?limit=1001", 400),
        ErrorCase::new(get, list, "/v1/workflows?limit=-1", 400),
        ErrorCase::new(
            get,
            list,
            "/v1/workflows?limit=99999999999999999999999",
            400,
        ),
        ErrorCase::new(get, list, "/v1/workflows?limit=1&limit=2", 400),
        ErrorCase::new(get, list, "/v1/workflows?cursor=garbage", 400),
        ErrorCase::new(get, list, "/v1/workflows?stauts=running", 400),
        ErrorCase::new(get, list, list, 503).fault(Fault::Unavailable),
        ErrorCase::new(get, list, list, 500).fault(Fault::Backend),
        // GET /v1/workflows/{id}
        ErrorCase::new(get, summary, "/v1/workflows/a%20b", 400),
        ErrorCase::new(get, summary, "/v1/workflows/%FF", 400),
        ErrorCase::new(get, summary, "/v1/workflows/%C3%A9t%C3%A9", 400),
        ErrorCase::new(get, summary, format!("/v1/workflows/{long_id}"), 400),
        ErrorCase::new(get, summary, "/v1/workflows/running?wait=30s", 400),
        ErrorCase::new(get, summary, "/v1/workflows/missing", 404),
        ErrorCase::new(get, summary, "/v1/workflows/running", 503).fault(Fault::Unavailable),
        ErrorCase::new(get, summary, "/v1/workflows/running", 500).fault(Fault::Backend),
        // POST /v1/workflows/{id}/cancel
        ErrorCase::new(post, cancel, "/v1/workflows/a%20b/cancel", 400),
        ErrorCase::new(post, cancel, "/v1/workflows/running/cancel", 400).json(&b"{"[..]),
        ErrorCase::new(post, cancel, "/v1/workflows/running/cancel", 400)
            .json(&br#"{"reason": 1}"#[..]),
        ErrorCase::new(post, cancel, "/v1/workflows/running/cancel", 400)
            .json(&br#"{"why": "x"}"#[..]),
        ErrorCase::new(post, cancel, "/v1/workflows/running/cancel", 400)
            .json(json!({"reason": "r".repeat(70 * 1024)}).to_string()),
        ErrorCase::new(post, cancel, "/v1/workflows/running/cancel?reason=x", 400),
        ErrorCase::new(post, cancel, "/v1/workflows/missing/cancel", 404),
        ErrorCase::new(post, cancel, "/v1/workflows/done/cancel", 409),
        ErrorCase::new(post, cancel, "/v1/workflows/running/cancel", 413).json(too_big.clone()),
        ErrorCase::new(post, cancel, "/v1/workflows/running/cancel", 503).fault(Fault::Unavailable),
        ErrorCase::new(post, cancel, "/v1/workflows/running/cancel", 500).fault(Fault::Backend),
        // POST /v1/workflows/{id}/signals/{name}
        ErrorCase::new(post, signal, "/v1/workflows/a%20b/signals/go", 400),
        ErrorCase::new(
            post,
            signal,
            format!("/v1/workflows/running/signals/{long_name}"),
            400,
        ),
        ErrorCase::new(post, signal, "/v1/workflows/running/signals/go", 400).json(&b"{"[..]),
        ErrorCase::new(post, signal, "/v1/workflows/running/signals/go", 400)
            .json(deep.to_string()),
        ErrorCase::new(post, signal, "/v1/workflows/running/signals/go", 400)
            .header("idempotency-key", long_key.as_bytes()),
        ErrorCase::new(post, signal, "/v1/workflows/running/signals/go", 400)
            .header("idempotency-key", non_ascii),
        ErrorCase::new(
            post,
            signal,
            "/v1/workflows/running/signals/go?idempotency_key=k",
            400,
        ),
        ErrorCase::new(post, signal, "/v1/workflows/missing/signals/go", 404),
        ErrorCase::new(post, signal, "/v1/workflows/done/signals/go", 409),
        ErrorCase::new(post, signal, "/v1/workflows/running/signals/go", 413).json(too_big.clone()),
        ErrorCase::new(post, signal, "/v1/workflows/running/signals/go", 503)
            .fault(Fault::Unavailable),
        ErrorCase::new(post, signal, "/v1/workflows/running/signals/go", 500).fault(Fault::Backend),
        // GET /v1/workflows/{id}/result
        ErrorCase::new(get, result, "/v1/workflows/a%20b/result", 400),
        ErrorCase::new(get, result, "/v1/workflows/running/result?wait=soon", 400),
        ErrorCase::new(get, result, "/v1/workflows/running/result?wait=-1s", 400),
        ErrorCase::new(get, result, "/v1/workflows/running/result?timeout=30s", 400),
        ErrorCase::new(get, result, "/v1/workflows/missing/result", 404),
        ErrorCase::new(get, result, "/v1/workflows/running/result", 503).fault(Fault::Unavailable),
        ErrorCase::new(get, result, "/v1/workflows/running/result", 500).fault(Fault::Backend),
        // GET /v1/workflows/{id}/events
        ErrorCase::new(get, events, "/v1/workflows/a%20b/events", 400),
        ErrorCase::new(get, events, "/v1/workflows/running/events?after=-1", 400),
        ErrorCase::new(get, events, "/v1/workflows/running/events?after=x", 400),
        ErrorCase::new(get, events, "/v1/workflows/running/events?limit=0", 400),
        ErrorCase::new(get, events, "/v1/workflows/running/events?limit=1001", 400),
        ErrorCase::new(get, events, "/v1/workflows/running/events?from=3", 400),
        ErrorCase::new(get, events, "/v1/workflows/missing/events", 404),
        ErrorCase::new(get, events, "/v1/workflows/running/events", 503).fault(Fault::Unavailable),
        ErrorCase::new(get, events, "/v1/workflows/running/events", 500).fault(Fault::Backend),
        // GET /v1/workflows/{id}/events/stream
        ErrorCase::new(get, stream, "/v1/workflows/a%20b/events/stream", 400),
        ErrorCase::new(
            get,
            stream,
            "/v1/workflows/running/events/stream?after=-1",
            400,
        ),
        ErrorCase::new(get, stream, "/v1/workflows/running/events/stream", 400)
            .header("last-event-id", b"x"),
        ErrorCase::new(get, stream, "/v1/workflows/running/events/stream", 400)
            .header("last-event-id", non_ascii),
        ErrorCase::new(get, stream, "/v1/workflows/running/events/stream", 400)
            .header("last-event-id", b"999"),
        ErrorCase::new(get, stream, "/v1/workflows/missing/events/stream", 404),
        ErrorCase::new(get, stream, "/v1/workflows/running/events/stream", 503)
            .fault(Fault::Unavailable),
        ErrorCase::new(get, stream, "/v1/workflows/running/events/stream", 500)
            .fault(Fault::Backend),
        // GET /v1/registry
        ErrorCase::new(get, registry, "/v1/registry?verbose=1", 400),
    ];

    let doc = call(&app, "GET", "/openapi.json", None).await.json();
    let mut wrong = Vec::new();
    let mut answered = BTreeSet::new();
    for case in &cases {
        let what = format!(
            "{} {} (fault {:?}, {} body bytes)",
            case.method,
            case.uri.chars().take(80).collect::<String>(),
            case.fault,
            case.body.len()
        );
        store.set(case.fault);
        let r = send(&app, case.request()).await;
        store.set(Fault::None);
        if r.status != case.status {
            wrong.push(format!(
                "{what}: answered {}, not {}: {}",
                r.status, case.status, r.text
            ));
            continue;
        }
        let shaped = serde_json::from_str::<Value>(&r.text).is_ok_and(|v| {
            v.as_object().map(|o| o.len()) == Some(1)
                && v["error"].as_object().map(|o| o.len()) == Some(2)
                && v["error"]["code"] == error_code(r.status)
                && v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| !m.is_empty())
        });
        let json_type = r
            .headers
            .get("content-type")
            .is_some_and(|t| t == "application/json");
        if !shaped || !json_type {
            wrong.push(format!(
                "{what}: not the error body: {:?} {}",
                r.headers, r.text
            ));
        }
        let method = case.method.to_ascii_lowercase();
        let status = case.status.as_str();
        answered.insert((case.path.to_string(), method.clone(), status.to_string()));
        let listed = &doc["paths"][case.path][&method]["responses"][status];
        if listed.is_null() {
            wrong.push(format!(
                "{what}: {status} not listed for {method} {}",
                case.path
            ));
        } else if listed["content"]["application/json"]["schema"]["$ref"]
            != "#/components/schemas/ErrorBody"
        {
            wrong.push(format!(
                "{what}: {status} listed without ErrorBody: {listed}"
            ));
        }
    }
    // And the other way round: every error status listed is one the table provokes
    // (but 401, which `openapi_documents_401_on_every_protected_route` covers, and
    // /readyz's 503, whose body is the readiness answer).
    for (path, method) in api::route_table(Role::All) {
        let listed = doc["paths"][&path][&method]["responses"]
            .as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default();
        for status in listed {
            let error = status.starts_with('4') || status.starts_with('5');
            let exempt = status == "401" || (path == "/readyz" && status == "503");
            if error
                && !exempt
                && !answered.contains(&(path.clone(), method.clone(), status.clone()))
            {
                wrong.push(format!(
                    "{method} {path} lists {status}, which no case provokes"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

/// An app on `store` (memory queue, built-ins, a worker) with `cfg`.
async fn app_on_store(store: std::sync::Arc<FaultyStore>, cfg: Config) -> App {
    app_from(Server::builder().builtins().config(cfg).store(store)).await
}

/// A handler that panics (here an embedder's start validator, on an input it did not
/// expect) answers 500 `internal` with the error body, and the server goes on serving.
/// Before, the panic unwound out of the router: the client's connection was dropped
/// without a response (here, `oneshot` panicked).
#[tokio::test]
async fn a_panicking_handler_answers_500() {
    let app =
        app_from(
            Server::builder()
                .builtins()
                .validator("echo", |input, _| match input.as_str() {
                    Some("boom") => panic!("a validator's bug"),
                    _ => Ok(()),
                }),
        )
        .await;
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "input": "boom"})),
    )
    .await;
    r.error(StatusCode::INTERNAL_SERVER_ERROR, "internal");
    assert!(!r.text.contains("a validator's bug"), "{}", r.text);
    let r = call(
        &app,
        "POST",
        "/v1/workflows",
        Some(json!({"name": "echo", "input": "fine"})),
    )
    .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{}", r.text);
}
