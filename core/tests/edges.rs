//! Edge cases of the worker, the sweeper and the in-memory queue: settings and
//! values at their extremes, and panics outside the activity's own future.

mod common;

use common::*;
use futures::FutureExt;
use marathon_core::memory::MemoryQueue;
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, OutgoingMessage, Queue, Registry, Task,
    Worker, WorkflowContext, WorkflowId,
};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The Queue trait accepts any delay; a far-future one parks the message instead of
/// panicking the caller (an `Instant` overflow).
#[tokio::test(start_paused = true)]
async fn memory_queue_accepts_a_far_future_delay() {
    let q = MemoryQueue::default();
    let t = Task::workflow(WorkflowId::random());
    let r = std::panic::AssertUnwindSafe(
        q.enqueue("a", vec![OutgoingMessage::now(t).delayed(Duration::MAX)]),
    )
    .catch_unwind()
    .await;
    assert!(r.is_ok(), "enqueue with a far-future delay panicked");
    assert_eq!(q.depth("a").await.unwrap(), 1);
}

/// An activity asking for a huge Retry-After: the attempt is recorded as retrying and
/// the worker's task ends (it died mid-way on the queue's overflow, its in-flight
/// count never returned).
#[tokio::test(start_paused = true)]
async fn huge_retry_after_does_not_kill_the_worker_task() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("one", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, u32>("limited", &()).await
        })
        .activity("limited", |_c: ActivityContext, (): ()| async move {
            Err::<u32, _>(ActivityError::retryable("429").with_retry_after(Duration::MAX))
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "one", json!(null)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let h = history(&engine, &id).await;
    assert!(types(&h).contains(&"activity_retrying"), "{:?}", types(&h));
    assert_eq!(w.in_flight(), 0, "a worker task never finished");
    w.shutdown().await;
}

/// A visibility under 1 s is extended in time (every max(visibility/2, 500 ms) let
/// the message reappear while the activity still ran, so it ran again and again).
#[tokio::test(start_paused = true)]
async fn short_visibility_is_extended_in_time() {
    let (store, queue) = backends();
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let engine = builder(&store, &queue)
        .workflow("one", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, u32>("slow", &()).await
        })
        .activity("slow", move |_c: ActivityContext, (): ()| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok::<_, ActivityError>(1u32)
            }
        })
        .build();
    let mut cfg = worker_config();
    cfg.visibility = Duration::from_millis(400);
    let w = Worker::start(engine.clone(), cfg);
    let id = start(&engine, "one", json!(null)).await;
    finished(&engine, &id).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the activity ran more than once"
    );
    w.shutdown().await;
}

/// `sweep_batch: 0` is taken as 1 (the sweep loop spun without yielding and never saw
/// the stop, so shutdown never returned).
#[test]
fn shutdown_returns_with_zero_sweep_batch() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let done = rt.block_on(async {
        let (store, queue) = backends();
        let engine = builder(&store, &queue).build();
        let mut cfg = worker_config();
        cfg.sweep_batch = 0;
        let w = Worker::start(engine, cfg);
        tokio::time::sleep(Duration::from_millis(100)).await;
        // A hang shows as a timeout; generous, as a loaded machine is slow to stop.
        tokio::time::timeout(Duration::from_secs(30), w.shutdown())
            .await
            .is_ok()
    });
    rt.shutdown_timeout(Duration::from_millis(100));
    assert!(done, "shutdown hung well past its 1 s grace");
}

/// A raw `activity_fn` that panics before returning its future fails the attempt as
/// a panic (the panic escaped, no outcome was recorded and the worker task died).
#[tokio::test(start_paused = true)]
async fn a_synchronously_panicking_activity_fn_is_recorded_as_a_panic() {
    let (store, queue) = backends();
    let mut reg = Registry::default();
    reg.workflow("one", |ctx: WorkflowContext, (): ()| async move {
        ctx.activity::<_, u32>("boom", &()).await
    });
    reg.activity_fn(
        "boom",
        Arc::new(|_c, _v| -> futures::future::BoxFuture<'static, _> { panic!("bad input") }),
    );
    let engine = builder(&store, &queue).registry(reg).build();
    let w = worker(&engine);
    let id = start(&engine, "one", json!(null)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let h = history(&engine, &id).await;
    assert!(
        types(&h).contains(&"activity_retrying") || types(&h).contains(&"activity_failed"),
        "no outcome recorded: {:?}",
        types(&h)
    );
    assert_eq!(w.in_flight(), 0, "a worker task never finished");
    w.shutdown().await;
}

/// A raw `workflow_fn` that panics before returning its future fails the workflow
/// task as a panic, reported in the summary's `task_failure`, without killing the
/// worker task.
#[tokio::test(start_paused = true)]
async fn a_synchronously_panicking_workflow_fn_is_a_task_failure() {
    let (store, queue) = backends();
    let mut reg = Registry::default();
    reg.workflow_fn(
        "boom",
        Arc::new(|_c, _v| -> futures::future::BoxFuture<'static, _> {
            panic!("bad workflow input")
        }),
    );
    let engine = builder(&store, &queue).registry(reg).build();
    let w = worker(&engine);
    let id = start(&engine, "boom", json!(null)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let s = engine.get(&id).await.unwrap();
    let failure = s.task_failure.expect("a task failure");
    assert!(
        failure.contains("panic") && failure.contains("bad workflow input"),
        "{failure}"
    );
    assert_eq!(w.in_flight(), 0, "a worker task never finished");
    w.shutdown().await;
}

fn nested(depth: usize) -> serde_json::Value {
    wrap(json!("leaf"), depth)
}

/// Values nested deeper than `MAX_VALUE_DEPTH` never reach a history (a store or a
/// queue could not read it back): a start or a signal with one is refused; an activity
/// input, an activity output or a workflow output that deep fails the call or the
/// run with a clear error; at the limit they pass.
#[tokio::test(start_paused = true)]
async fn values_nested_too_deep_are_refused_before_they_are_recorded() {
    let max = marathon_core::MAX_VALUE_DEPTH;
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("out", |_ctx: WorkflowContext, depth: usize| async move {
            Ok(nested(depth))
        })
        .workflow(
            "call",
            |ctx: WorkflowContext, (input, output): (usize, usize)| async move {
                let v: serde_json::Value = ctx.activity("make", &(nested(input), output)).await?;
                Ok(json!(marathon_core::nests_deeper_than(&v, 0)))
            },
        )
        .workflow("wait", |ctx: WorkflowContext, (): ()| async move {
            let v: serde_json::Value = ctx.signal("go").await?;
            Ok(v)
        })
        .activity(
            "make",
            |_ctx: ActivityContext, (_input, output): (serde_json::Value, usize)| async move {
                Ok::<_, ActivityError>(nested(output))
            },
        )
        .build();
    let w = worker(&engine);
    let start_err = engine
        .start(marathon_core::StartWorkflow::new("out", nested(max + 1)))
        .await
        .expect_err("a start with too deep an input");
    assert!(
        matches!(&start_err, marathon_core::EngineError::InvalidArgument(m) if m.contains("nests deeper")),
        "{start_err}"
    );
    let failed_with = |id: WorkflowId| {
        let engine = engine.clone();
        async move {
            let s = finished(&engine, &id).await;
            (s.status, s.error.map(|e| e.kind))
        }
    };
    use marathon_core::WorkflowStatus::{Completed, Failed};
    let at_limit = start(&engine, "out", json!(max)).await;
    assert_eq!(failed_with(at_limit).await, (Completed, None));
    let too_deep = start(&engine, "out", json!(max + 1)).await;
    assert_eq!(
        failed_with(too_deep).await,
        (Failed, Some("invalid_output".into()))
    );
    let input = start(&engine, "call", json!([max + 1, 0])).await;
    assert_eq!(
        failed_with(input).await,
        (Failed, Some("invalid_argument".into()))
    );
    let output = start(&engine, "call", json!([0, max + 1])).await;
    let s = finished(&engine, &output).await;
    assert_eq!(s.status, Failed, "{s:?}");
    let details = s
        .error
        .and_then(|e| e.details)
        .expect("the activity's error");
    assert_eq!(details["kind"], "invalid_output", "{details}");
    // The input travels in a tuple: one level more.
    let fine = start(&engine, "call", json!([max - 1, max])).await;
    assert_eq!(failed_with(fine).await, (Completed, None));
    let waiting = start(&engine, "wait", json!(null)).await;
    let signal_err = engine
        .signal(&waiting, "go", nested(max + 1), None)
        .await
        .expect_err("a signal with too deep a payload");
    assert!(matches!(
        signal_err,
        marathon_core::EngineError::InvalidArgument(_)
    ));
    engine
        .signal(&waiting, "go", nested(max), None)
        .await
        .expect("a signal at the limit");
    assert_eq!(failed_with(waiting).await, (Completed, None));
    w.shutdown().await;
}

/// A worker with retention purges every finished workflow past it in one maintenance
/// round, not one batch of 1,000 a round (before, a fleet closing more than 100
/// workflows a second with the default 10 s interval fell further behind for good).
#[tokio::test(start_paused = true)]
async fn a_maintenance_round_purges_more_than_one_batch() {
    use marathon_core::{EventData, NewEvent, NewWorkflow, OwedChanges, Seq, Timestamp};
    let (store, queue) = backends();
    for n in 0..2_500u64 {
        let id = WorkflowId::random();
        store
            .create(NewWorkflow {
                id: id.clone(),
                name: "done".into(),
                input: json!(null),
                task_queue: "default".into(),
                idempotency_key: None,
                started_at: Timestamp(1 + n),
                task_deadline: Timestamp(1_000 + n),
                trace_context: None,
            })
            .await
            .expect("create");
        store
            .append(
                &id,
                Seq(1),
                vec![NewEvent::new(
                    Timestamp(2 + n),
                    EventData::WorkflowCompleted { output: json!(1) },
                )],
                OwedChanges::none(),
            )
            .await
            .expect("complete");
    }
    let engine = builder(&store, &queue).build();
    let config = marathon_core::WorkerConfig {
        retention: Some(Duration::from_millis(1)),
        dead_letter_interval: Duration::from_secs(10),
        ..worker_config()
    };
    let worker = Worker::start(engine, config);
    // One maintenance round.
    tokio::time::sleep(Duration::from_secs(15)).await;
    worker.shutdown().await;
    let left = store
        .purge_closed(Timestamp(u64::MAX), usize::MAX)
        .await
        .expect("purge");
    assert_eq!(
        left, 0,
        "{left} finished workflows were left after one round"
    );
}

/// A heartbeat timeout too long to add to an `Instant` (`Duration::MAX`, "no limit to
/// speak of") lets the attempt run to its result: the watchdog's `Instant` addition
/// overflowed, which panicked the task's handling on every delivery, so the attempt
/// never recorded an outcome (`timeout.lost` once its redeliveries ran out).
#[tokio::test(start_paused = true)]
async fn a_heartbeat_timeout_of_duration_max_does_not_panic_the_attempt() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("one", |ctx: WorkflowContext, (): ()| async move {
            let opts = ActivityOptions::default().heartbeat_timeout(Duration::MAX);
            ctx.activity_with::<_, u32>("quiet", &(), opts).await
        })
        .activity("quiet", |_c: ActivityContext, (): ()| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            Ok::<u32, ActivityError>(7)
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "one", json!(null)).await;
    let s = engine.result(&id, Duration::from_secs(60)).await.unwrap();
    let h = history(&engine, &id).await;
    assert_eq!(s.output, Some(json!(7)), "{s:?} {:?}", types(&h));
    w.shutdown().await;
}
