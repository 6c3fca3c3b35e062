//! Worker shutdown at the extremes of its settings.

mod common;

use common::*;
use marathon_core::{
    ActivityContext, ActivityError, EventData, ShutdownReport, Worker, WorkflowContext,
};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A `shutdown_grace` of `Duration::MAX` (wait for every in-flight task) lets a long
/// activity finish and records its result. Before, `shutdown` panicked computing the
/// grace's deadline (an `Instant` overflow) right after it had stopped receiving, so
/// the running task was neither waited for nor handed back.
#[tokio::test(start_paused = true)]
async fn an_unbounded_grace_waits_for_the_running_task() {
    let (store, queue) = backends();
    let running = Arc::new(AtomicBool::new(false));
    let r = running.clone();
    let engine = builder(&store, &queue)
        .workflow("one", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, u32>("slow", &()).await
        })
        .activity("slow", move |_c: ActivityContext, (): ()| {
            let r = r.clone();
            async move {
                r.store(true, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(120)).await;
                Ok::<_, ActivityError>(7u32)
            }
        })
        .build();
    let mut cfg = worker_config();
    cfg.shutdown_grace = Duration::MAX;
    let w = Worker::start(engine.clone(), cfg);
    let id = start(&engine, "one", json!(null)).await;
    while !running.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = tokio::spawn(w.shutdown()).await;
    assert!(report.is_ok(), "shutdown panicked");
    assert_eq!(
        report.ok(),
        Some(ShutdownReport {
            finished: 1,
            handed_back: 0
        })
    );
    let h = history(&engine, &id).await;
    assert!(
        h.iter()
            .any(|e| matches!(e.data, EventData::ActivityCompleted { .. })),
        "{:?}",
        types(&h)
    );
}
