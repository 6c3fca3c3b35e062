//! The metrics of a known run, read back through a real exposition parser and
//! linted by `promtool check metrics`.

mod common;

use common::*;
use marathon_core::testkit::{ForwardingQueue, ForwardingStore};
use marathon_core::{Observer, WorkflowStatus};
use marathon_observability::Metrics;
use prometheus_parse::{Scrape, Value};
use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// The value of the one sample of `name` whose labels are exactly `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    sample_value(s, name, labels, true)
}

#[track_caller]
fn exact(s: &Scrape, name: &str, labels: &[(&str, &str)], want: f64) {
    assert_eq!(value(s, name, labels), Some(want), "{name}{labels:?}");
}

/// A histogram's `_count`, checked against its `+Inf` bucket.
#[track_caller]
fn count(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    let c = value(s, &format!("{name}_count"), labels)
        .unwrap_or_else(|| panic!("{name}_count{labels:?} missing"));
    assert_eq!(
        value(s, name, labels),
        Some(c),
        "{name}{labels:?}: +Inf bucket != _count"
    );
    c
}

fn sum_of(s: &Scrape, name: &str, label: (&str, &str)) -> f64 {
    s.samples
        .iter()
        .filter(|x| x.metric == name && x.labels.get(label.0) == Some(label.1))
        .map(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_known_run_yields_exact_counts() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = engine(&metrics);
    let w = worker(&engine);
    run_known_set(&engine).await;
    // Until the depth sampler (every 100 ms) has seen the queue empty: a fixed wait
    // can pass with no sample on a loaded machine.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let depth = [("queue", "default")];
    while value(&parse(&metrics.render()), "marathon_queue_depth", &depth) != Some(0.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "the queue depth was never sampled as 0"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    w.shutdown().await;
    metrics.record_llm_tokens("openai", "gpt-test", "input", 120);
    metrics.record_llm_tokens("openai", "gpt-test", "output", 30);
    metrics.record_llm_tokens("openai", "gpt-test", "input", 5);

    let text = metrics.render();
    let s = parse(&text);

    exact(
        &s,
        "marathon_workflows_started_total",
        &[("workflow", "ok")],
        3.0,
    );
    exact(
        &s,
        "marathon_workflows_started_total",
        &[("workflow", "flaky")],
        1.0,
    );
    exact(
        &s,
        "marathon_workflows_started_total",
        &[("workflow", "waiter")],
        1.0,
    );
    let closed = "marathon_workflows_closed_total";
    exact(
        &s,
        closed,
        &[("workflow", "ok"), ("status", "completed")],
        3.0,
    );
    exact(
        &s,
        closed,
        &[("workflow", "flaky"), ("status", "failed")],
        1.0,
    );
    exact(
        &s,
        closed,
        &[("workflow", "waiter"), ("status", "canceled")],
        1.0,
    );
    assert_eq!(
        s.samples.iter().filter(|x| x.metric == closed).count(),
        3,
        "no other closes"
    );
    let dur = "marathon_workflow_duration_seconds";
    assert_eq!(
        count(&s, dur, &[("workflow", "ok"), ("status", "completed")]),
        3.0
    );
    assert_eq!(
        count(&s, dur, &[("workflow", "flaky"), ("status", "failed")]),
        1.0
    );
    assert_eq!(
        count(&s, dur, &[("workflow", "waiter"), ("status", "canceled")]),
        1.0
    );

    // Activities: 3 × 3 adds; boom times out, fails, fails for good.
    let att = "marathon_activity_attempts_total";
    exact(
        &s,
        att,
        &[("activity", "add"), ("outcome", "completed")],
        9.0,
    );
    exact(
        &s,
        att,
        &[("activity", "boom"), ("outcome", "retrying")],
        2.0,
    );
    exact(&s, att, &[("activity", "boom"), ("outcome", "failed")], 1.0);
    assert_eq!(
        s.samples.iter().filter(|x| x.metric == att).count(),
        3,
        "no dropped attempts"
    );
    let ad = "marathon_activity_attempt_seconds";
    assert_eq!(
        count(&s, ad, &[("activity", "add"), ("outcome", "completed")]),
        9.0
    );
    assert_eq!(
        count(&s, ad, &[("activity", "boom"), ("outcome", "retrying")]),
        2.0
    );
    assert_eq!(
        count(&s, ad, &[("activity", "boom"), ("outcome", "failed")]),
        1.0
    );
    exact(
        &s,
        "marathon_activity_retries_total",
        &[("activity", "boom")],
        2.0,
    );
    exact(
        &s,
        "marathon_activity_timeouts_total",
        &[("activity", "boom"), ("timeout", "start_to_close")],
        1.0,
    );
    exact(
        &s,
        "marathon_activities_in_flight",
        &[("activity", "add")],
        0.0,
    );
    exact(
        &s,
        "marathon_activities_in_flight",
        &[("activity", "boom")],
        0.0,
    );

    // Workflow tasks: each `ok` records 4 (3 schedules and the completion); every
    // task, whatever its outcome, is one replay and one history observation.
    exact(
        &s,
        "marathon_workflow_tasks_total",
        &[("workflow", "ok"), ("outcome", "recorded")],
        12.0,
    );
    for wf in ["ok", "flaky", "waiter"] {
        let tasks = sum_of(&s, "marathon_workflow_tasks_total", ("workflow", wf));
        assert!(tasks >= 2.0, "{wf}: {tasks} tasks");
        assert_eq!(
            count(&s, "marathon_workflow_task_seconds", &[("workflow", wf)]),
            tasks,
            "{wf}"
        );
        assert_eq!(
            count(&s, "marathon_workflow_history_events", &[("workflow", wf)]),
            tasks,
            "{wf}"
        );
    }
    assert!(
        value(
            &s,
            "marathon_workflow_tasks_total",
            &[("workflow", "flaky"), ("outcome", "failed")]
        )
        .is_none(),
        "no task failed to run"
    );

    // Store and queue calls through the wrappers.
    let store = "marathon_store_operation_seconds";
    assert_eq!(
        count(
            &s,
            store,
            &[
                ("operation", "create"),
                ("backend", "memory"),
                ("outcome", "ok")
            ]
        ),
        5.0
    );
    assert!(
        count(
            &s,
            store,
            &[
                ("operation", "append"),
                ("backend", "memory"),
                ("outcome", "ok")
            ]
        ) >= 12.0 + 2.0 + 2.0
    );
    assert!(
        count(
            &s,
            store,
            &[
                ("operation", "claim_overdue"),
                ("backend", "memory"),
                ("outcome", "ok")
            ]
        ) >= 1.0
    );
    let queue = "marathon_queue_operation_seconds";
    // 5 first workflow tasks, 9 + 3 activity tasks, and a workflow task after each result and the cancel.
    assert!(
        count(
            &s,
            queue,
            &[
                ("operation", "enqueue"),
                ("backend", "memory"),
                ("outcome", "ok")
            ]
        ) >= 5.0 + 12.0
    );
    assert!(
        count(
            &s,
            queue,
            &[
                ("operation", "receive"),
                ("backend", "memory"),
                ("outcome", "ok")
            ]
        ) >= 1.0
    );
    assert!(
        count(
            &s,
            queue,
            &[
                ("operation", "ack"),
                ("backend", "memory"),
                ("outcome", "ok")
            ]
        ) >= 1.0
    );
    // Every task received was counted, and each receive timed.
    let received = value(
        &s,
        "marathon_queue_received_tasks_total",
        &[("queue", "default")],
    )
    .unwrap();
    assert!(received >= 5.0 + 12.0, "{received}");
    assert!(
        count(
            &s,
            "marathon_queue_receive_seconds",
            &[("queue", "default")]
        ) >= 1.0
    );
    exact(&s, "marathon_queue_depth", &[("queue", "default")], 0.0);

    exact(
        &s,
        "marathon_llm_tokens_total",
        &[
            ("provider", "openai"),
            ("model", "gpt-test"),
            ("kind", "input"),
        ],
        125.0,
    );
    exact(
        &s,
        "marathon_llm_tokens_total",
        &[
            ("provider", "openai"),
            ("model", "gpt-test"),
            ("kind", "output"),
        ],
        30.0,
    );

    // Nothing was overdue or dead-lettered (the served queue's count is shown at 0), no
    // span was lost (nothing traces here: both reasons are shown at 0), and no label
    // carries a workflow id.
    assert!(!text.contains("marathon_overdue_total{"));
    exact(
        &s,
        "marathon_dead_lettered_total",
        &[("queue", "default")],
        0.0,
    );
    for reason in ["queue_full", "export_failed"] {
        exact(
            &s,
            "marathon_trace_spans_dropped_total",
            &[("reason", reason)],
            0.0,
        );
    }
    for sample in &s.samples {
        for (k, _) in sample.labels.iter() {
            assert!(
                [
                    "workflow",
                    "status",
                    "outcome",
                    "activity",
                    "timeout",
                    "kind",
                    "queue",
                    "operation",
                    "backend",
                    "provider",
                    "model",
                    "reason",
                    "le"
                ]
                .contains(&k.as_str()),
                "unexpected label {k} on {}",
                sample.metric
            );
        }
    }

    promtool_check(&text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sweeper_and_dead_letter_hooks_count_by_kind() {
    let metrics = Metrics::new().unwrap();
    metrics.overdue("timer");
    metrics.overdue("timer");
    metrics.overdue("workflow_task");
    metrics.dead_lettered("default", 3);
    metrics.queue_depth("default", 42);
    let s = parse(&metrics.render());
    exact(&s, "marathon_overdue_total", &[("kind", "timer")], 2.0);
    exact(
        &s,
        "marathon_overdue_total",
        &[("kind", "workflow_task")],
        1.0,
    );
    exact(
        &s,
        "marathon_dead_lettered_total",
        &[("queue", "default")],
        3.0,
    );
    exact(&s, "marathon_queue_depth", &[("queue", "default")], 42.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_fired_by_the_sweeper_is_counted_as_overdue() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = marathon_core::Engine::builder()
        .observer(metrics.clone())
        .workflow(
            "nap",
            |ctx: marathon_core::WorkflowContext, (): ()| async move {
                ctx.sleep(Duration::from_millis(100)).await?;
                Ok::<_, marathon_core::WorkflowError>(())
            },
        )
        .build();
    run_one(&engine, "nap").await;
    let s = parse(&metrics.render());
    exact(&s, "marathon_overdue_total", &[("kind", "timer")], 1.0);
    exact(
        &s,
        "marathon_workflows_closed_total",
        &[("workflow", "nap"), ("status", "completed")],
        1.0,
    );
}

/// An activity reports the tokens its model call used through its context; they reach
/// `marathon_llm_tokens_total` by provider, model and kind, once per attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_an_activity_reports_are_counted() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = marathon_core::Engine::builder()
        .observer(metrics.clone())
        .workflow(
            "ask",
            |ctx: marathon_core::WorkflowContext, (): ()| async move {
                let a: String = ctx.activity("complete", &"first").await?;
                let b: String = ctx.activity("complete", &"second").await?;
                Ok::<_, marathon_core::WorkflowError>(format!("{a} {b}"))
            },
        )
        .activity(
            "complete",
            |ctx: marathon_core::ActivityContext, prompt: String| async move {
                // A fake model's usage block: 12 prompt tokens, 7 completion tokens.
                ctx.record_llm_tokens("fake", "m1", "input", 12);
                ctx.record_llm_tokens("fake", "m1", "output", 7);
                Ok::<_, marathon_core::ActivityError>(prompt.to_uppercase())
            },
        )
        .build();
    assert_eq!(run_one(&engine, "ask").await, WorkflowStatus::Completed);
    let text = metrics.render();
    let s = parse(&text);
    for (kind, n) in [("input", 24.0), ("output", 14.0)] {
        exact(
            &s,
            "marathon_llm_tokens_total",
            &[("provider", "fake"), ("model", "m1"), ("kind", kind)],
            n,
        );
    }
    promtool_check(&text);
}

/// `promtool check metrics` must accept the exposition without a lint.
fn promtool_check(text: &str) {
    let mut child = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `marathon_activities_in_flight` sample of activity `name`, as exposed.
fn in_flight(m: &Metrics, name: &str) -> Option<String> {
    let needle = format!("marathon_activities_in_flight{{activity=\"{name}\"}} ");
    m.render()
        .lines()
        .find_map(|l| l.strip_prefix(&needle).map(str::to_string))
}

/// An activity still running when the worker's shutdown grace runs out is stopped
/// (its future dropped, the task handed back): `marathon_activities_in_flight` no longer
/// counts it (it kept counting it: the -1 only ran when the attempt returned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_gauge_returns_to_zero_after_a_hard_stop() {
    use marathon_core::memory::{MemoryQueue, MemoryStore};
    use marathon_core::{
        ActivityContext, ActivityError, Engine, StartWorkflow, Worker, WorkerConfig,
        WorkflowContext, WorkflowError,
    };
    use marathon_observability::{InstrumentedQueue, InstrumentedStore};
    use std::time::Instant;
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = Engine::builder()
        .store(InstrumentedStore::boxed(
            Arc::new(MemoryStore::default()),
            "memory",
            &metrics,
        ))
        .queue(InstrumentedQueue::boxed(
            Arc::new(MemoryQueue::default()),
            "memory",
            &metrics,
        ))
        .observer(metrics.clone())
        .workflow("slowflow", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, ()>("slow", &()).await?;
            Ok::<_, WorkflowError>(())
        })
        .activity("slow", |_ctx: ActivityContext, (): ()| async move {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, ActivityError>(())
        })
        .build();
    let w = Worker::start(
        engine.clone(),
        WorkerConfig {
            poll_wait: Duration::from_millis(100),
            shutdown_grace: Duration::from_millis(200),
            ..WorkerConfig::default()
        },
    );
    engine
        .start(StartWorkflow::new("slowflow", serde_json::json!(null)))
        .await
        .expect("start");
    let deadline = Instant::now() + Duration::from_secs(20);
    while in_flight(&metrics, "slow").as_deref() != Some("1") {
        assert!(Instant::now() < deadline, "the activity never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = w.shutdown().await;
    assert_eq!(report.handed_back, 1, "{report:?}");
    assert_eq!(
        in_flight(&metrics, "slow").as_deref(),
        Some("0"),
        "no attempt runs on this replica after shutdown"
    );
}

/// A timer the sweeper fires sends a workflow task that names its run, so the replica
/// caching the workflow continues it without reading the workflow's summary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fired_timer_continues_a_cached_workflow_without_reading_its_summary() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = engine(&metrics);
    let w = worker(&engine);
    let id = engine
        .start(marathon_core::StartWorkflow::new(
            "napper",
            serde_json::json!(1),
        ))
        .await
        .expect("start")
        .summary
        .id;
    wait_for_event(&engine, &id, "workflow_completed").await;
    w.shutdown().await;
    let s = parse(&metrics.render());
    let gets = value(
        &s,
        "marathon_store_operation_seconds_count",
        &[
            ("operation", "get"),
            ("backend", "memory"),
            ("outcome", "ok"),
        ],
    );
    assert_eq!(gets.unwrap_or(0.0), 0.0, "summary reads");
}

/// A workflow task whose code fails while replaying the history (here the code no
/// longer issues the call the history recorded: non-determinism after a deploy) is
/// counted as `failed`, like one that fails in its live step (it was not counted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_failing_in_replay_is_counted_failed() {
    use marathon_core::memory::{MemoryQueue, MemoryStore};
    use marathon_core::{Engine, StartWorkflow, Task, WorkflowContext, WorkflowError};
    let store: Arc<dyn marathon_core::Store> = Arc::new(MemoryStore::default());
    let queue: Arc<dyn marathon_core::Queue> = Arc::new(MemoryQueue::default());
    // The old code calls `a`; its first task records that call.
    let old = Engine::builder()
        .store(store.clone())
        .queue(queue.clone())
        .workflow("drift", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, ()>("a", &()).await?;
            Ok::<_, WorkflowError>(())
        })
        .build();
    let id = old
        .start(StartWorkflow::new("drift", serde_json::json!(null)))
        .await
        .expect("start")
        .summary
        .id;
    old.handle("default", Task::workflow(id.clone()))
        .await
        .expect("first task");
    // The new code calls `b`: replaying the history fails.
    let metrics = Arc::new(Metrics::new().unwrap());
    let new = Engine::builder()
        .store(store)
        .queue(queue)
        .observer(metrics.clone())
        .workflow("drift", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, ()>("b", &()).await?;
            Ok::<_, WorkflowError>(())
        })
        .build();
    new.handle("default", Task::workflow(id.clone()))
        .await
        .expect("the failure is recorded");
    let events = new
        .events(&id, marathon_core::Seq::ZERO, 100)
        .await
        .expect("history");
    assert!(
        events
            .iter()
            .any(|e| e.data.type_name() == "workflow_task_failed"),
        "{events:?}"
    );
    let s = parse(&metrics.render());
    exact(
        &s,
        "marathon_workflow_tasks_total",
        &[("workflow", "drift"), ("outcome", "failed")],
        1.0,
    );
    assert_eq!(
        count(
            &s,
            "marathon_workflow_task_seconds",
            &[("workflow", "drift")]
        ),
        1.0
    );
}

/// An activity name the workflow code made up (a model's tool call, say) that no
/// activity here is registered under does not become a label value of its own: each
/// such name would be a new series. Its attempts count as `unregistered`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_activity_name_is_not_a_label_value() {
    use marathon_core::{Engine, StartWorkflow, WorkflowContext, WorkflowError};
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = Engine::builder()
        .observer(metrics.clone())
        .workflow("tools", |ctx: WorkflowContext, tool: String| async move {
            // Not retried (an unknown name is retryable, for rolling upgrades).
            let options = marathon_core::ActivityOptions {
                retry: marathon_core::RetryPolicy {
                    non_retryable_kinds: vec!["unknown_activity".into()],
                    ..marathon_core::RetryPolicy::default()
                },
                ..marathon_core::ActivityOptions::default()
            };
            ctx.activity_with::<_, ()>(&tool, &(), options).await?;
            Ok::<_, WorkflowError>(())
        })
        .build();
    let w = worker(&engine);
    for n in 0..3 {
        let id = engine
            .start(StartWorkflow::new(
                "tools",
                serde_json::json!(format!("tool-{n}")),
            ))
            .await
            .expect("start")
            .summary
            .id;
        assert_eq!(finish(&engine, &id).await, WorkflowStatus::Failed);
    }
    w.shutdown().await;
    let text = metrics.render();
    assert!(!text.contains("tool-"), "{text}");
    let s = parse(&text);
    exact(
        &s,
        "marathon_activity_attempts_total",
        &[("activity", "unregistered"), ("outcome", "failed")],
        3.0,
    );
    exact(
        &s,
        "marathon_activities_in_flight",
        &[("activity", "unregistered")],
        0.0,
    );
}

/// A worker shows `marathon_dead_lettered_total` of each queue it serves at 0 before
/// anything is dead-lettered: a series that first appears at its first dead letter
/// starts at that count, which `increase()` (the `MarathonDeadLetters` alert) never sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_are_shown_at_zero_from_the_start() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = engine(&metrics);
    let w = worker(&engine);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let s = parse(&metrics.render());
    w.shutdown().await;
    exact(
        &s,
        "marathon_dead_lettered_total",
        &[("queue", "default")],
        0.0,
    );
}

/// A store whose history reads take 100 ms.
struct SlowReads(marathon_core::memory::MemoryStore);

#[async_trait::async_trait]
impl ForwardingStore for SlowReads {
    fn inner(&self) -> &dyn marathon_core::Store {
        &self.0
    }
    async fn read(
        &self,
        id: &marathon_core::WorkflowId,
        after: marathon_core::Seq,
        limit: usize,
    ) -> Result<Vec<marathon_core::model::Event>, marathon_core::StoreError> {
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.inner().read(id, after, limit).await
    }
}

/// `marathon_workflow_task_seconds` is the time the workflow code ran, as the table
/// says, not the store's reads of the history before it: with reads of 100 ms, tasks
/// that replay (no cache) stay far below that (they measured the reads too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflow_task_seconds_leave_out_history_reads() {
    use marathon_core::{
        ActivityContext, ActivityError, Engine, EngineConfig, StartWorkflow, WorkflowContext,
        WorkflowError,
    };
    let metrics = Arc::new(Metrics::new().unwrap());
    let engine = Engine::builder()
        .store(Arc::new(SlowReads(
            marathon_core::memory::MemoryStore::default(),
        )))
        .observer(metrics.clone())
        .config(EngineConfig {
            cache_capacity: 0,
            ..EngineConfig::default()
        })
        .workflow("two", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, ()>("noop", &()).await?;
            ctx.activity::<_, ()>("noop", &()).await?;
            Ok::<_, WorkflowError>(())
        })
        .activity("noop", |_ctx: ActivityContext, (): ()| async move {
            Ok::<_, ActivityError>(())
        })
        .build();
    let w = worker(&engine);
    let id = engine
        .start(StartWorkflow::new("two", serde_json::json!(null)))
        .await
        .expect("start")
        .summary
        .id;
    assert_eq!(finish(&engine, &id).await, WorkflowStatus::Completed);
    w.shutdown().await;
    let s = parse(&metrics.render());
    let tasks = count(&s, "marathon_workflow_task_seconds", &[("workflow", "two")]);
    assert!(tasks >= 3.0, "{tasks} tasks");
    let secs = value(
        &s,
        "marathon_workflow_task_seconds_sum",
        &[("workflow", "two")],
    )
    .unwrap();
    assert!(secs < 0.1, "{secs} s for {tasks} tasks");
}

/// The system clock plus a skew the test moves forward: the store, the sweeper and
/// workflow time jump ahead, while a running attempt's budget (tokio time) does not.
#[derive(Default)]
struct SkewClock(std::sync::atomic::AtomicU64);

impl marathon_core::Clock for SkewClock {
    fn now(&self) -> marathon_core::model::Timestamp {
        marathon_core::model::Timestamp::now().plus(Duration::from_millis(
            self.0.load(std::sync::atomic::Ordering::SeqCst),
        ))
    }
}

impl SkewClock {
    fn skip(&self, d: Duration) {
        self.0.fetch_add(
            u64::try_from(d.as_millis()).unwrap(),
            std::sync::atomic::Ordering::SeqCst,
        );
    }
}

/// Polls `metrics` until the sample `name{labels}` is `want` (10 s at most).
async fn until_value(metrics: &Metrics, name: &str, labels: &[(&str, &str)], want: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while value(&parse(&metrics.render()), name, labels) != Some(want) {
        assert!(
            std::time::Instant::now() < deadline,
            "{name}{labels:?} never reached {want}: {}",
            metrics.render()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The sweeper gives an attempt up at its schedule-to-close while a worker still runs
/// it; the worker's own timeout then comes too late and its result is dropped. One
/// attempt timed out once: `marathon_activity_timeouts_total` counts it once (it
/// counted the dropped result again), and the give-up, which no worker measured, is
/// not observed as a 0 s attempt in `marathon_activity_attempt_seconds`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_timeout_is_not_counted_again_and_a_give_up_has_no_duration() {
    use marathon_core::{ActivityContext, ActivityOptions, Engine, StartWorkflow, WorkflowContext};
    let metrics = Arc::new(Metrics::new().unwrap());
    let clock = Arc::new(SkewClock::default());
    let engine = Engine::builder()
        .observer(metrics.clone())
        .clock(clock.clone())
        .workflow("patient", |ctx: WorkflowContext, (): ()| async move {
            let opts = ActivityOptions::default()
                .start_to_close(Duration::from_secs(60))
                .schedule_to_close(Duration::from_secs(3));
            let given_up = ctx.activity_with::<_, ()>("stall", &(), opts).await;
            assert!(given_up.is_err());
            ctx.sleep(Duration::from_secs(3600)).await?;
            Ok::<_, marathon_core::WorkflowError>(())
        })
        .activity("stall", |_c: ActivityContext, (): ()| async move {
            std::future::pending::<Result<(), marathon_core::ActivityError>>().await
        })
        .build();
    let w = worker(&engine);
    let id = engine
        .start(StartWorkflow::new("patient", serde_json::json!(null)))
        .await
        .expect("start")
        .summary
        .id;
    let stall = [("activity", "stall")];
    until_value(&metrics, "marathon_activities_in_flight", &stall, 1.0).await;
    // Past the attempt's schedule-to-close and its owed deadline: the sweeper gives it up.
    clock.skip(Duration::from_secs(300));
    wait_for_event(&engine, &id, "activity_failed").await;
    // The worker's budget (3 s) runs out after that: its result is dropped.
    until_value(
        &metrics,
        "marathon_activity_attempts_total",
        &[("activity", "stall"), ("outcome", "dropped")],
        1.0,
    )
    .await;
    w.shutdown().await;
    let s = parse(&metrics.render());
    exact(
        &s,
        "marathon_activity_attempts_total",
        &[("activity", "stall"), ("outcome", "failed")],
        1.0,
    );
    exact(
        &s,
        "marathon_activity_timeouts_total",
        &[("activity", "stall"), ("timeout", "schedule_to_close")],
        1.0,
    );
    assert_eq!(
        value(
            &s,
            "marathon_activity_attempt_seconds_count",
            &[("activity", "stall"), ("outcome", "failed")]
        )
        .unwrap_or(0.0),
        0.0,
        "a give-up observed as an attempt of 0 s"
    );
    // The dropped attempt ran about 3 s, and is measured.
    assert_eq!(
        count(
            &s,
            "marathon_activity_attempt_seconds",
            &[("activity", "stall"), ("outcome", "dropped")]
        ),
        1.0
    );
}

/// An attempt the sweeper gives up is labelled like any other: a name no activity
/// here is registered under counts as `unregistered`, not as a label value of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_up_attempt_of_an_unregistered_name_is_not_a_label_value() {
    use marathon_core::{ActivityOptions, Engine, StartWorkflow, WorkflowContext};
    let metrics = Arc::new(Metrics::new().unwrap());
    let clock = Arc::new(SkewClock::default());
    let engine = Engine::builder()
        .observer(metrics.clone())
        .clock(clock.clone())
        .workflow("tools", |ctx: WorkflowContext, tool: String| async move {
            // A queue no worker serves: only the sweeper ends the attempt.
            let opts = ActivityOptions::default()
                .task_queue("nowhere")
                .schedule_to_close(Duration::from_secs(1));
            ctx.activity_with::<_, ()>(&tool, &(), opts).await?;
            Ok::<_, marathon_core::WorkflowError>(())
        })
        .build();
    let w = worker(&engine);
    let id = engine
        .start(StartWorkflow::new("tools", serde_json::json!("tool-x")))
        .await
        .expect("start")
        .summary
        .id;
    wait_for_event(&engine, &id, "activity_scheduled").await;
    clock.skip(Duration::from_secs(3600));
    assert_eq!(finish(&engine, &id).await, WorkflowStatus::Failed);
    w.shutdown().await;
    let text = metrics.render();
    assert!(!text.contains("tool-x"), "{text}");
    let s = parse(&text);
    exact(
        &s,
        "marathon_activity_attempts_total",
        &[("activity", "unregistered"), ("outcome", "failed")],
        1.0,
    );
    exact(
        &s,
        "marathon_activity_timeouts_total",
        &[
            ("activity", "unregistered"),
            ("timeout", "schedule_to_close"),
        ],
        1.0,
    );
}

/// A memory queue whose `depth` fails while `fail_depth` is set.
#[derive(Default)]
struct FlakyDepth {
    inner: marathon_core::memory::MemoryQueue,
    fail_depth: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl ForwardingQueue for FlakyDepth {
    fn inner(&self) -> &dyn marathon_core::Queue {
        &self.inner
    }
    async fn depth(&self, queue: &str) -> Result<u64, marathon_core::QueueError> {
        if self.fail_depth.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(marathon_core::QueueError::Unavailable("down".into()));
        }
        self.inner().depth(queue).await
    }
}

/// While the queue's depth cannot be read, `marathon_queue_depth` is not shown: its
/// last sample, held on, would keep `MarathonQueueDepthHigh` firing (or quiet) on a
/// value nobody measures any more. The failed reads are counted, and the next sample
/// shows it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_depth_is_not_shown_while_it_cannot_be_read() {
    let metrics = Arc::new(Metrics::new().unwrap());
    let queue = Arc::new(FlakyDepth::default());
    let engine = engine_with(
        &metrics,
        queue.clone(),
        marathon_core::EngineConfig::default(),
    );
    let w = worker(&engine);
    let depth = [("queue", "default")];
    until_value(&metrics, "marathon_queue_depth", &depth, 0.0).await;
    queue
        .fail_depth
        .store(true, std::sync::atomic::Ordering::SeqCst);
    // Two sampling rounds (every 100 ms).
    tokio::time::sleep(Duration::from_millis(350)).await;
    let s = parse(&metrics.render());
    assert_eq!(
        value(&s, "marathon_queue_depth", &depth),
        None,
        "a depth that cannot be read is still shown"
    );
    let errors = [
        ("operation", "depth"),
        ("backend", "memory"),
        ("outcome", "error"),
    ];
    assert!(count(&s, "marathon_queue_operation_seconds", &errors) >= 1.0);
    queue
        .fail_depth
        .store(false, std::sync::atomic::Ordering::SeqCst);
    until_value(&metrics, "marathon_queue_depth", &depth, 0.0).await;
    w.shutdown().await;
}
