//! What a closed run leaves behind: calls it made as it closed, tasks of it still
//! queued, and the engine's bookkeeping of it.

mod common;

use common::*;
use marathon_core::{
    ActivityContext, ActivityError, EventData, WorkflowContext, WorkflowError, WorkflowStatus,
};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A call the code makes in the workflow task that closes the run (it returns without
/// awaiting it) is recorded, but its activity does not run: the run is over, nothing
/// would take its result, and the store owes it no attempt. Before, its task was sent
/// and a worker ran it in full after the close (an LLM call paid for, an e-mail sent),
/// its result then dropped.
#[tokio::test(start_paused = true)]
async fn a_call_made_as_the_run_closes_does_not_run() {
    let (store, queue) = backends();
    let ran = Arc::new(AtomicU32::new(0));
    let counted = ran.clone();
    let engine = builder(&store, &queue)
        .workflow(
            "leaves",
            |ctx: WorkflowContext, _: serde_json::Value| async move {
                // Called, never awaited: the code returns at once.
                let _unawaited = ctx.activity::<_, u32>("side", &1);
                Ok::<_, WorkflowError>(json!("done"))
            },
        )
        .activity("side", move |_c: ActivityContext, n: u32| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move { Ok::<_, ActivityError>(n) }
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "leaves", json!(null)).await;
    let s = finished(&engine, &id).await;
    assert_eq!(s.status, WorkflowStatus::Completed);
    // Time for a queued task, and for the sweeper, to act.
    tokio::time::sleep(Duration::from_secs(600)).await;
    w.shutdown().await;
    let h = history(&engine, &id).await;
    assert_eq!(
        count(&h, |d| matches!(d, EventData::ActivityScheduled { .. })),
        1,
        "the call is recorded: {:?}",
        types(&h)
    );
    assert_eq!(
        ran.load(Ordering::SeqCst),
        0,
        "the activity of a call made as the run closed ran"
    );
}

/// An activity that streams progress (and never heartbeats) while its run is closed
/// elsewhere (another replica's workflow task, a terminate) learns it at its next
/// `ctx.progress`, which returns `canceled`. Before, progress to a closed run
/// answered `Ok` and recorded nothing, and the activity streamed on to its end.
#[tokio::test(start_paused = true)]
async fn progress_to_a_closed_run_is_canceled() {
    let (store, queue) = backends();
    let sent = Arc::new(AtomicU32::new(0));
    let ended = Arc::new(parking_lot::Mutex::new(None::<String>));
    let (s, e) = (sent.clone(), ended.clone());
    let engine = builder(&store, &queue)
        .workflow("streams", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, ()>("stream", &()).await
        })
        .activity("stream", move |ctx: ActivityContext, (): ()| {
            let (s, e) = (s.clone(), e.clone());
            async move {
                for n in 0..600u32 {
                    if let Err(err) = ctx.progress(&json!({ "token": n })).await {
                        *e.lock() = Some(err.kind.clone());
                        return Err(err);
                    }
                    s.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                *e.lock() = Some("streamed to the end".into());
                Ok::<_, ActivityError>(())
            }
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "streams", json!(null)).await;
    while sent.load(Ordering::SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Closed by someone else: a terminal event appended straight to the store.
    loop {
        let last = history(&engine, &id).await.last().map(|e| e.seq).unwrap();
        let closing = marathon_core::NewEvent::new(
            engine.now(),
            EventData::WorkflowFailed {
                error: WorkflowError::new("closed elsewhere"),
            },
        );
        match store
            .append(&id, last, vec![closing], marathon_core::OwedChanges::none())
            .await
        {
            Ok(_) => break,
            Err(marathon_core::StoreError::Conflict { .. }) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    let at_close = sent.load(Ordering::SeqCst);
    let t0 = tokio::time::Instant::now();
    while ended.lock().is_none() && t0.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.shutdown().await;
    let ended = ended.lock().clone();
    assert_eq!(ended.as_deref(), Some("canceled"), "{ended:?}");
    assert!(
        sent.load(Ordering::SeqCst) <= at_close + 1,
        "{} tokens sent after the close",
        sent.load(Ordering::SeqCst) - at_close
    );
    assert_eq!(
        engine.get(&id).await.unwrap().status,
        WorkflowStatus::Failed
    );
}
