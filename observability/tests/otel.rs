//! Traces over OTLP/HTTP: parent links follow a workflow from the request that started
//! it through queue hops to its activity attempts; a real collector (rotel) receives
//! them; JSON logs carry the ids; a collector that is down costs workflows nothing.

mod common;

use async_trait::async_trait;
use common::*;
use marathon_core::memory::MemoryQueue;
use marathon_core::testkit::ForwardingQueue;
use marathon_core::{
    Engine, EngineConfig, EventData, OutgoingMessage, Queue, QueueError, StartWorkflow, Task,
    WorkflowId, WorkflowStatus,
};
use marathon_observability::{LogFormat, Metrics, TelemetryConfig, tracing_dispatch};
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

/// Logs captured in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

fn config(endpoint: Option<String>, format: LogFormat) -> TelemetryConfig {
    TelemetryConfig {
        log_format: format,
        log_filter: "info".into(),
        trace_filter: "info".into(),
        otlp_endpoint: endpoint,
        service_name: "marathon-test".into(),
        shutdown_timeout: Duration::from_secs(5),
    }
}

/// One `ok` workflow started inside a root span standing in for the HTTP request.
async fn one_traced_workflow(engine: &Engine) {
    traced_workflow(engine, None).await;
}

/// One `ok` workflow started inside a root span standing in for the HTTP request, which
/// continues the caller's trace when `traceparent` is given.
async fn traced_workflow(engine: &Engine, traceparent: Option<&str>) {
    let root = tracing::info_span!("http.request", method = "POST");
    if let Some(tp) = traceparent {
        marathon_observability::continue_trace(&root, tp);
    }
    let id = async {
        tracing::info!("starting a workflow");
        engine
            .start(StartWorkflow::new("ok", json!(1)))
            .await
            .unwrap()
            .summary
            .id
    }
    .instrument(root)
    .await;
    finish(engine, &id).await;
}

/// Starts `name` with `input` inside a root `http.request` span (field `workflow` =
/// `name`) standing in for the HTTP request; returns the workflow's id.
async fn start_in_request(engine: &Engine, name: &str, input: serde_json::Value) -> WorkflowId {
    let root = tracing::info_span!("http.request", workflow = name);
    engine
        .start(StartWorkflow::new(name, input))
        .instrument(root)
        .await
        .unwrap()
        .summary
        .id
}

/// Asserts that every span of `mine` is in `root`'s trace with its parent exported
/// there too: no task of the run (`what`) started a trace of its own.
fn assert_in_trace_of(root: &Span, mine: &[&Span], spans: &[Span], what: &str) {
    for s in mine {
        assert_eq!(
            s.trace_id, root.trace_id,
            "{what}: one trace per run: {s:?}"
        );
        assert!(
            spans
                .iter()
                .any(|p| p.span_id == s.parent && p.trace_id == root.trace_id),
            "{what}: parent of {s:?} exported, in the run's trace"
        );
    }
}

/// Runs `workflows` on an engine and worker (a current-thread runtime) under a
/// subscriber exporting to a fresh in-process receiver, configured by `config` from a
/// base that names the receiver, with logs to `logs`; returns every span received.
fn exported<W>(
    config: impl FnOnce(TelemetryConfig) -> TelemetryConfig,
    logs: W,
    workflows: impl for<'e> FnOnce(&'e Engine) -> futures::future::BoxFuture<'e, ()>,
) -> Vec<Span>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    exported_on(engine, config, logs, workflows)
}

/// [`exported`] on the engine `make` builds.
fn exported_on<W>(
    make: impl FnOnce(&Arc<Metrics>) -> Engine,
    config: impl FnOnce(TelemetryConfig) -> TelemetryConfig,
    logs: W,
    workflows: impl for<'e> FnOnce(&'e Engine) -> futures::future::BoxFuture<'e, ()>,
) -> Vec<Span>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let (port, spans) = receiver();
    let base = self::config(Some(format!("http://127.0.0.1:{port}")), LogFormat::Text);
    let (dispatch, guard) = tracing_dispatch(&config(base), logs).unwrap();
    assert!(guard.exporting());
    let metrics = Arc::new(Metrics::new().unwrap());
    tracing::dispatcher::with_default(&dispatch, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let engine = make(&metrics);
            let w = worker(&engine);
            workflows(&engine).await;
            w.shutdown().await;
        });
    });
    guard.shutdown();
    spans.lock().unwrap().clone()
}

/// Tracing subscribers here are per thread (`set_default`), so these tests run on a
/// current-thread runtime: engine, worker and activities all see the test's subscriber.
#[test]
fn quiet_logs_do_not_silence_traces() {
    let logs = Captured::default();
    let spans = exported(
        |c| TelemetryConfig {
            log_filter: "warn".into(),
            ..c
        },
        logs.clone(),
        |engine| Box::pin(one_traced_workflow(engine)),
    );
    let names: Vec<String> = spans.iter().map(|s| s.name.clone()).collect();
    assert_eq!(
        names.iter().filter(|n| *n == "marathon.activity").count(),
        3,
        "{names:?}"
    );
    assert!(names.iter().any(|n| n == "http.request"), "{names:?}");
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        !logs.contains("starting a workflow"),
        "info is not logged at warn: {logs}"
    );
}

/// JSON logs at `warn` under `trace_filter = info` (quiet logs, full traces) still carry
/// the ids of the exported span an event happens in: the request span is not logged,
/// but it is the trace the line belongs to. (The ids were looked up among the spans
/// the log layer's own filter enables, which were none.)
#[test]
fn quiet_json_logs_still_carry_the_trace_ids() {
    let logs = Captured::default();
    let spans = exported(
        |c| TelemetryConfig {
            log_format: LogFormat::Json,
            log_filter: "warn".into(),
            ..c
        },
        logs.clone(),
        |engine| {
            Box::pin(async move {
                let root = tracing::info_span!("http.request", method = "POST");
                async { tracing::warn!("a warning in a request") }
                    .instrument(root)
                    .await;
                one_traced_workflow(engine).await;
            })
        },
    );
    let root = spans
        .iter()
        .find(|s| s.name == "http.request")
        .expect("the request span is exported");
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = logs
        .lines()
        .find(|l| l.contains("a warning in a request"))
        .unwrap_or_else(|| panic!("the warning is logged: {logs}"));
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(v["trace_id"], hex(&root.trace_id), "{line}");
    assert_eq!(v["span_id"], hex(&root.span_id), "{line}");
    // The line is tracing-subscriber's, with the ids added at the end: its key order
    // (timestamp first) is kept.
    assert!(line.starts_with(r#"{"timestamp":"#), "{line}");
    assert!(line.ends_with(r#""}"#), "{line}");
}

#[test]
fn a_callers_traceparent_is_continued() {
    let spans = exported(
        |c| c,
        std::io::sink,
        |engine| {
            Box::pin(async move {
                let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
                traced_workflow(engine, Some(caller)).await;
                // A malformed header is ignored: the request span is a root of its own.
                traced_workflow(engine, Some("00-not-a-traceparent-01")).await;
            })
        },
    );
    let trace_id = hex_bytes("4bf92f3577b34da6a3ce929d0e0e4736");
    let roots: Vec<&Span> = spans.iter().filter(|s| s.name == "http.request").collect();
    assert_eq!(roots.len(), 2, "{spans:#?}");
    let continued = roots
        .iter()
        .find(|r| r.trace_id == trace_id)
        .expect("the request span joined the caller's trace");
    assert_eq!(continued.parent, hex_bytes("00f067aa0ba902b7"));
    let other = roots.iter().find(|r| r.trace_id != trace_id).unwrap();
    assert!(other.parent.is_empty(), "{other:?}");
    // The caller's trace runs on through the workflow's tasks, and into the spans the
    // activities open themselves.
    let activities: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "marathon.activity" && s.trace_id == trace_id)
        .collect();
    assert_eq!(activities.len(), 3, "{spans:#?}");
    let steps: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "user.step" && s.trace_id == trace_id)
        .collect();
    assert_eq!(steps.len(), 3, "{spans:#?}");
    for step in steps {
        assert!(
            activities.iter().any(|a| a.span_id == step.parent),
            "a user span is a child of its activity's span: {step:?}"
        );
    }
}

/// A caller that did not sample its trace: nothing of the workflow is exported, yet the
/// decision travels through every queue hop (a task without context would start a new,
/// sampled trace) and covers the spans activities open themselves.
#[test]
fn an_unsampled_callers_trace_stays_unsampled_through_the_workflow() {
    let spans = exported(
        |c| c,
        std::io::sink,
        |engine| {
            Box::pin(async move {
                let caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
                traced_workflow(engine, Some(caller)).await;
                // A sampled one afterwards is exported as usual (the receiver works).
                traced_workflow(engine, None).await;
            })
        },
    );
    let unsampled = hex_bytes("4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(
        spans.iter().all(|s| s.trace_id != unsampled),
        "nothing of the unsampled trace is exported: {spans:#?}"
    );
    let names: Vec<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names.iter().filter(|n| **n == "http.request").count(),
        1,
        "only the sampled request's trace: {names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| **n == "marathon.activity").count(),
        3,
        "{names:?}"
    );
    assert_eq!(
        names.iter().filter(|n| **n == "user.step").count(),
        3,
        "{names:?}"
    );
}

/// The same under a ratio sampler (`parentbased_traceidratio`, ratio 1 so that the
/// sampled workflow is kept), where the task spans of unsampled traces are untraced
/// spans kept from the exporter by its per-layer filter, and the unsampled context is
/// made current around the task instead. The sampler comes from the environment, which
/// a test cannot change in its own process: the test above runs again in a child.
#[test]
fn an_unsampled_callers_trace_stays_unsampled_under_a_ratio_sampler() {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "an_unsampled_callers_trace_stays_unsampled_through_the_workflow",
        ])
        .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        .env("OTEL_TRACES_SAMPLER_ARG", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_workflow_is_one_trace_from_request_to_activity_attempts() {
    let logs = Captured::default();
    let spans = exported(
        |c| TelemetryConfig {
            log_format: LogFormat::Json,
            ..c
        },
        logs.clone(),
        |engine| Box::pin(one_traced_workflow(engine)),
    );
    let by_id = |id: &[u8]| spans.iter().find(|s| s.span_id == id);
    let root = spans
        .iter()
        .find(|s| s.name == "http.request")
        .expect("root span exported");
    assert!(root.parent.is_empty(), "the request span is a root");
    assert_eq!(root.service.as_deref(), Some("marathon-test"));
    let attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == "marathon.activity")
        .collect();
    assert_eq!(attempts.len(), 3, "three activity attempts: {spans:#?}");
    // What each span says of its task, and nothing a trace viewer does not need
    // (no source location, thread or busy/idle timing attributes).
    let workflow_id = attempts[0].attrs.get("workflow_id").cloned();
    assert!(workflow_id.as_ref().is_some_and(|id| !id.is_empty()));
    let mut ids: Vec<&str> = Vec::new();
    for a in &attempts {
        let keys: Vec<&str> = a.attrs.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "activity",
                "activity_id",
                "attempt",
                "outcome",
                "workflow_id"
            ],
            "{a:?}"
        );
        assert_eq!(a.attrs.get("workflow_id"), workflow_id.as_ref());
        assert_eq!(a.attrs["activity"], "add");
        assert_eq!(a.attrs["attempt"], "1");
        // Numbers are exported as numbers (a `u32` field would go through `Debug`).
        assert_eq!(
            a.ints.iter().map(String::as_str).collect::<Vec<_>>(),
            ["activity_id", "attempt"],
            "{a:?}"
        );
        assert_eq!(a.attrs["outcome"], "completed");
        ids.push(&a.attrs["activity_id"]);
    }
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 3, "three different calls: {ids:?}");
    for t in spans.iter().filter(|s| s.name == "marathon.workflow_task") {
        let keys: Vec<&str> = t.attrs.keys().map(String::as_str).collect();
        assert_eq!(keys, ["outcome", "workflow", "workflow_id"], "{t:?}");
        assert_eq!(t.attrs.get("workflow_id"), workflow_id.as_ref());
        assert_eq!(t.attrs["workflow"], "ok");
        assert!(
            ["recorded", "nothing"].contains(&t.attrs["outcome"].as_str()),
            "{t:?}"
        );
    }
    for a in attempts {
        assert_eq!(a.trace_id, root.trace_id, "one trace per workflow");
        // Walk up: activity → workflow task (that scheduled it) → activity → ... → root.
        let mut chain = vec![a.name.clone()];
        let mut cur = a;
        while !cur.parent.is_empty() {
            cur =
                by_id(&cur.parent).unwrap_or_else(|| panic!("parent of {} not exported", cur.name));
            assert_eq!(cur.trace_id, root.trace_id);
            chain.push(cur.name.clone());
        }
        assert_eq!(
            cur.span_id, root.span_id,
            "chain ends at the request: {chain:?}"
        );
        assert_eq!(
            &chain[..2],
            ["marathon.activity", "marathon.workflow_task"],
            "{chain:?}"
        );
        assert_eq!(chain.last().map(String::as_str), Some("http.request"));
        assert!(
            !chain.iter().any(|n| n == "marathon.task"),
            "one span per task: {chain:?}"
        );
    }
    let tasks = spans
        .iter()
        .filter(|s| s.name == "marathon.workflow_task")
        .count();
    assert!(tasks >= 4, "{tasks} workflow tasks");

    // JSON log lines carry the ids of the span they were logged in.
    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line = logs
        .lines()
        .find(|l| l.contains("starting a workflow"))
        .expect("the log line");
    let v: serde_json::Value = serde_json::from_str(line).expect("JSON log line");
    assert_eq!(v["trace_id"], hex(&root.trace_id), "{line}");
    assert_eq!(v["span_id"], hex(&root.span_id), "{line}");
    assert_eq!(v["span"]["name"], "http.request", "{line}");
}

/// Work the sweeper delivers, outside any span, stays in the workflow's trace: the
/// workflow task after a timer fires, and the retry of a failed workflow task, are
/// children of the task that started the timer or failed.
#[test]
fn timers_and_task_retries_stay_in_the_workflows_trace() {
    let spans = exported(
        |c| c,
        Captured::default(),
        |engine| {
            Box::pin(async move {
                for name in ["napper", "stumbler"] {
                    let id = start_in_request(engine, name, json!(1)).await;
                    assert_eq!(finish(engine, &id).await, WorkflowStatus::Completed);
                }
            })
        },
    );
    for name in ["napper", "stumbler"] {
        let root = spans
            .iter()
            .find(|s| {
                s.name == "http.request"
                    && s.attrs.get("workflow").map(String::as_str) == Some(name)
            })
            .unwrap_or_else(|| panic!("{name}: request span exported: {spans:#?}"));
        let tasks: Vec<&Span> = spans
            .iter()
            .filter(|s| {
                s.name == "marathon.workflow_task"
                    && s.attrs.get("workflow").map(String::as_str) == Some(name)
            })
            .collect();
        let expected = if name == "napper" {
            // Schedule, start the timer, schedule after it fires, complete.
            4
        } else {
            // Fail, then (retried) schedule, then complete.
            3
        };
        assert!(
            tasks.len() >= expected,
            "{name}: {} workflow tasks: {spans:#?}",
            tasks.len()
        );
        let workflow_id = &tasks[0].attrs["workflow_id"];
        let mine: Vec<&Span> = spans
            .iter()
            .filter(|s| s.attrs.get("workflow_id") == Some(workflow_id))
            .collect();
        assert_in_trace_of(root, &mine, &spans, name);
        if name == "stumbler" {
            let failed = tasks
                .iter()
                .find(|t| t.attrs["outcome"] == "failed")
                .unwrap_or_else(|| panic!("a failed workflow task: {tasks:#?}"));
            assert!(
                tasks.iter().any(|t| t.parent == failed.span_id),
                "the retry is the failed task's child: {tasks:#?}"
            );
        }
    }
}

/// A signal or a cancellation arrives in a request of its own, which is a trace of its
/// own: the workflow task it causes continues the run's trace (kept in the run's
/// summary), and the request's span links to the run.
#[test]
fn signals_and_cancellation_continue_the_runs_trace() {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let seen = runs.clone();
    let spans = exported(
        |c| c,
        Captured::default(),
        move |engine| {
            Box::pin(async move {
                for (name, input) in [("listener", json!(1)), ("waiter", json!(null))] {
                    let id = start_in_request(engine, name, input).await;
                    // Let the first workflow task run (and the waiter's timer start).
                    wait_for_event(engine, &id, "workflow_task_completed").await;
                    let root = tracing::info_span!("http.request", input_for = name);
                    if name == "listener" {
                        engine
                            .signal(&id, "go", json!(10), None)
                            .instrument(root)
                            .await
                    } else {
                        engine.cancel(&id, None).instrument(root).await
                    }
                    .unwrap();
                    let end = finish(engine, &id).await;
                    let summary = engine.get(&id).await.unwrap();
                    seen.lock().unwrap().push((name, end, summary));
                }
            })
        },
    );
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 2);
    for (name, end, summary) in runs {
        let want = if name == "listener" {
            WorkflowStatus::Completed
        } else {
            WorkflowStatus::Canceled
        };
        assert_eq!(end, want, "{name}");
        let request = |key: &str| {
            spans
                .iter()
                .find(|s| {
                    s.name == "http.request" && s.attrs.get(key).map(String::as_str) == Some(name)
                })
                .unwrap_or_else(|| panic!("{name}: {key} request span: {spans:#?}"))
        };
        let (start, input) = (request("workflow"), request("input_for"));
        // The summary names the run's trace: the start request's span.
        let tc = summary
            .trace_context
            .as_deref()
            .expect("the run's trace context");
        assert_eq!(
            tc,
            format!("00-{}-{}-01", hex(&start.trace_id), hex(&start.span_id)),
            "{name}"
        );
        assert_ne!(input.trace_id, start.trace_id, "{name}: its own trace");
        assert_eq!(
            input.links,
            vec![(start.trace_id.clone(), start.span_id.clone())],
            "{name}: the request links to the run"
        );
        let mine: Vec<&Span> = spans
            .iter()
            .filter(|s| s.attrs.get("workflow_id").map(String::as_str) == Some(summary.id.as_str()))
            .collect();
        let tasks = mine
            .iter()
            .filter(|s| s.name == "marathon.workflow_task")
            .count();
        // listener: wait, then the signal's task (schedules `add`), then complete;
        // waiter: start the timer, then the cancellation's task.
        let expected = if name == "listener" { 3 } else { 2 };
        assert!(
            tasks >= expected,
            "{name}: {tasks} workflow tasks: {mine:#?}"
        );
        assert_in_trace_of(start, &mine, &spans, name);
        // The signal's or cancellation's task is the start request's child.
        assert!(
            mine.iter().filter(|s| s.parent == start.span_id).count() >= 2,
            "{name}: the first task and the input's task under the start: {mine:#?}"
        );
    }
}

/// Which messages a [`LossyQueue`] loses.
type Loses = dyn Fn(&Task) -> bool + Send + Sync;

/// A queue that loses messages, as a crashed worker or a lost send would: each
/// predicate loses the first message it matches, once; the owed work in the store
/// makes the sweeper enqueue it again.
struct LossyQueue {
    inner: MemoryQueue,
    losses: std::sync::Mutex<Vec<Box<Loses>>>,
    /// The tasks lost, in order.
    lost: std::sync::Mutex<Vec<Task>>,
}

impl LossyQueue {
    /// An in-memory queue losing one message for each of `losses`.
    fn new(losses: Vec<Box<Loses>>) -> Self {
        Self {
            inner: MemoryQueue::default(),
            losses: std::sync::Mutex::new(losses),
            lost: std::sync::Mutex::default(),
        }
    }
}

#[async_trait]
impl ForwardingQueue for LossyQueue {
    fn inner(&self) -> &dyn Queue {
        &self.inner
    }
    async fn enqueue(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        let mut kept = Vec::new();
        for m in messages {
            let mut losses = self.losses.lock().expect("not poisoned");
            match losses.iter().position(|lose| lose(&m.task)) {
                Some(i) => {
                    drop(losses.remove(i));
                    self.lost.lock().expect("not poisoned").push(m.task);
                }
                None => kept.push(m),
            }
        }
        self.inner.enqueue(queue, kept).await
    }
}

/// Work lost with a worker (here: two messages the queue loses) and enqueued again by
/// the sweeper stays in the run's trace: the lost first attempt of an activity and the
/// lost workflow task after the second activity run as children of the span that
/// started the run.
#[test]
fn recovered_lost_work_stays_in_the_runs_trace() {
    let lossy = Arc::new(LossyQueue::new(vec![
        Box::new(|t: &Task| matches!(t, Task::Activity(a) if a.activity_id == 1 && a.attempt == 1)),
        Box::new(|t: &Task| {
            matches!(t, Task::Workflow { tail, .. } if tail.iter().any(|e| matches!(
                e.data,
                EventData::ActivityCompleted { activity_id: 2, .. }
            )))
        }),
    ]));
    let queue = lossy.clone();
    let make = move |m: &Arc<Metrics>| {
        let config = EngineConfig {
            workflow_task_deadline: Duration::from_millis(300),
            activity_grace: Duration::from_millis(100),
            ..EngineConfig::default()
        };
        engine_with(m, queue, config)
    };
    let spans = exported_on(
        make,
        |c| c,
        Captured::default(),
        |engine| {
            Box::pin(async move {
                let id = start_in_request(engine, "hasty", json!(1)).await;
                assert_eq!(finish(engine, &id).await, WorkflowStatus::Completed);
            })
        },
    );
    assert_eq!(
        lossy.lost.lock().unwrap().len(),
        2,
        "both messages were lost"
    );
    let root = spans
        .iter()
        .find(|s| s.name == "http.request")
        .unwrap_or_else(|| panic!("the request span: {spans:#?}"));
    let mine: Vec<&Span> = spans
        .iter()
        .filter(|s| s.attrs.contains_key("workflow_id"))
        .collect();
    let attempts = mine
        .iter()
        .filter(|s| s.name == "marathon.activity")
        .count();
    assert_eq!(attempts, 2, "{mine:#?}");
    assert_in_trace_of(root, &mine, &spans, "hasty");
    // Under the start: the first workflow task, the re-delivered attempt and the
    // recovered workflow task.
    let under_start: Vec<&str> = mine
        .iter()
        .filter(|s| s.parent == root.span_id)
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(
        under_start
            .iter()
            .filter(|n| **n == "marathon.activity")
            .count(),
        1,
        "{under_start:?}"
    );
    assert!(
        under_start
            .iter()
            .filter(|n| **n == "marathon.workflow_task")
            .count()
            >= 2,
        "{under_start:?}"
    );
}

#[test]
fn spans_reach_a_real_collector() {
    let dir = temp_dir("rotel");
    let log = dir.join("rotel.log");
    // Its ports are picked free, then bound by rotel: one taken meanwhile (by another
    // test's server or an outgoing connection) makes it exit, and another pair is tried.
    let (http, _rotel) = (0..5)
        .find_map(|_| {
            let (http, grpc) = (free_port(), free_port());
            let mut child = std::process::Command::new(rotel())
                .args(["start", "--exporter", "blackhole", "--debug-log", "traces"])
                .args(["--debug-log-verbosity", "detailed"])
                .args(["--otlp-http-endpoint", &format!("127.0.0.1:{http}")])
                .args(["--otlp-grpc-endpoint", &format!("127.0.0.1:{grpc}")])
                .stdout(std::fs::File::create(&log).unwrap())
                .stderr(std::fs::File::create(dir.join("rotel.err")).unwrap())
                .spawn()
                .expect("rotel-agent starts");
            let deadline = Instant::now() + Duration::from_secs(60);
            while std::net::TcpStream::connect(("127.0.0.1", http)).is_err() {
                if child.try_wait().is_ok_and(|s| s.is_some()) {
                    return None;
                }
                assert!(Instant::now() < deadline, "rotel does not listen on {http}");
                std::thread::sleep(Duration::from_millis(50));
            }
            Some((http, Killed(child)))
        })
        .unwrap_or_else(|| {
            panic!(
                "rotel exited at start: {}",
                std::fs::read_to_string(dir.join("rotel.err")).unwrap_or_default()
            )
        });

    let (dispatch, guard) = tracing_dispatch(
        &config(Some(format!("http://127.0.0.1:{http}")), LogFormat::Text),
        std::io::sink,
    )
    .unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    tracing::dispatcher::with_default(&dispatch, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let engine = engine(&metrics);
            let w = worker(&engine);
            one_traced_workflow(&engine).await;
            w.shutdown().await;
        });
    });
    guard.shutdown();

    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = std::fs::read_to_string(&log).unwrap_or_default()
            + &std::fs::read_to_string(dir.join("rotel.err")).unwrap_or_default();
        if [
            "http.request",
            "marathon.workflow_task",
            "marathon.activity",
        ]
        .iter()
        .all(|n| out.contains(n))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rotel did not print our spans:\n{out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `n` `ok` workflows one after another under a subscriber exporting to
/// `endpoint`; returns how long they took and when they were done (before the
/// subscriber's shutdown, which must be bounded).
fn timed_run(endpoint: Option<String>, n: usize) -> (Duration, Instant, Arc<Metrics>) {
    let (dispatch, guard) =
        tracing_dispatch(&config(endpoint, LogFormat::Text), std::io::sink).unwrap();
    let metrics = Arc::new(Metrics::new().unwrap());
    let took = tracing::dispatcher::with_default(&dispatch, || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let engine = engine(&metrics);
            let w = worker(&engine);
            let started = Instant::now();
            for i in 0..n {
                let root = tracing::info_span!("http.request");
                let id = engine
                    .start(StartWorkflow::new("ok", json!(i)))
                    .instrument(root)
                    .await
                    .unwrap()
                    .summary
                    .id;
                finish(&engine, &id).await;
            }
            let took = started.elapsed();
            w.shutdown().await;
            took
        })
    });
    let done = Instant::now();
    let stopping = Instant::now();
    guard.shutdown();
    // The 5 s shutdown timeout, with room for a loaded machine, and still below the
    // 10 s that an export to a silent collector waits out.
    assert!(
        stopping.elapsed() < Duration::from_secs(9),
        "shutdown is bounded"
    );
    (took, done, metrics)
}

/// A collector that accepts connections and never answers; returns its port and when
/// it accepted each connection.
fn black_hole() -> (u16, Arc<Mutex<Vec<Instant>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(Mutex::new(Vec::new()));
    let seen = accepted.clone();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            seen.lock().unwrap().push(Instant::now());
            held.push(stream); // never read, never answered
        }
    });
    (port, accepted)
}

/// A collector that refuses connections, or one that accepts them and never answers
/// (each export then waits out its 10 s timeout on the batch processor's thread), does
/// not slow workflows. 300 workflows make 2,400 spans, more than one export batch
/// (2,048), so the exporter tries to send while they run, not only at shutdown.
#[test]
fn a_collector_that_is_down_does_not_slow_workflows() {
    let closed = free_port(); // bound and released: nothing listens there
    let (hanging, accepted) = black_hole();
    let (live, spans) = receiver();
    let n = 300;
    // Against the same run exporting to a collector that answers: what a collector
    // being down adds, not what tracing costs. The three runs go at once, so that a
    // change in the machine's load hits them alike (one after another, a busy spell
    // during one run alone made it six times slower than the baseline).
    let run = |port: u16| move || timed_run(Some(format!("http://127.0.0.1:{port}")), n);
    let ((baseline, _, _), (refused, _, metrics), (hung, done, _)) = std::thread::scope(|s| {
        let runs = [
            s.spawn(run(live)),
            s.spawn(run(closed)),
            s.spawn(run(hanging)),
        ];
        let [live, closed, hanging] = runs.map(|r| r.join().expect("a timed run"));
        (live, closed, hanging)
    });
    let requests = spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.name == "http.request")
        .count();
    assert_eq!(requests, n, "every trace reached the live collector");
    // The spans sent to the closed port are counted as lost (the counter is the
    // process's, so at least these).
    let text = metrics.render();
    let lost = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("marathon_trace_spans_dropped_total{reason=\"export_failed\"} ")
        })
        .and_then(|v| v.parse::<f64>().ok());
    assert!(lost.is_some_and(|n| n >= 300.0), "{lost:?}\n{text}");
    eprintln!(
        "{n} workflows: {baseline:?} exporting to a live collector, {refused:?} to a closed port, {hung:?} to one that never answers"
    );
    let first = accepted.lock().unwrap().first().copied();
    assert!(
        first.is_some_and(|at| at < done),
        "the exporter sent while the workflows ran"
    );
    for (what, took) in [("a closed port", refused), ("a silent collector", hung)] {
        assert!(
            took < baseline * 2 + Duration::from_secs(1),
            "exporting to {what} slowed workflows: {took:?} vs {baseline:?}"
        );
    }
}

#[test]
fn without_an_endpoint_nothing_is_exported_and_no_context_is_sent() {
    use marathon_core::Observer;
    let (dispatch, guard) =
        tracing_dispatch(&config(None, LogFormat::Json), std::io::sink).unwrap();
    assert!(!guard.exporting());
    let metrics = Metrics::new().unwrap();
    tracing::dispatcher::with_default(&dispatch, || {
        let _s = tracing::info_span!("x").entered();
        assert_eq!(metrics.trace_context(), None);
    });
}
