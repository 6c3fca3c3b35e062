//! Edge cases of the worker, the sweeper and the in-memory queue: settings and
//! values at their extremes, and panics outside the activity's own future.

mod common;

use common::*;
use futures::FutureExt;
use marathon_core::memory::MemoryQueue;
use marathon_core::{
    ActivityContext, ActivityError, OutgoingMessage, Queue, Registry, Task, Worker,
    WorkflowContext, WorkflowId,
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
        tokio::time::timeout(Duration::from_secs(5), w.shutdown())
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
