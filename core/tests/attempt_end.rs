//! The end of an activity attempt reaches the work the activity left running.

mod common;

use common::*;
use marathon_core::{ActivityContext, ActivityError, ActivityOptions, EventData, WorkflowContext};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

/// An attempt that times out while a task it spawned streams progress (an LLM stream
/// read beside the call): the spawned task learns the attempt is over
/// (`ctx.cancelled()`), and its progress is not recorded after the attempt's outcome.
/// Before, the context of a timed-out attempt was never canceled and its progress
/// went on being appended, among the retry's, for as long as the workflow ran.
#[tokio::test(start_paused = true)]
async fn work_left_running_by_a_timed_out_attempt_learns_it_ended() {
    let (store, queue) = backends();
    let told = Arc::new(AtomicBool::new(false));
    let refused = Arc::new(AtomicU32::new(0));
    let (t, r) = (told.clone(), refused.clone());
    let engine = builder(&store, &queue)
        .workflow("one", |ctx: WorkflowContext, (): ()| async move {
            let options = ActivityOptions {
                start_to_close: Duration::from_secs(2),
                ..ActivityOptions::default()
            };
            let out = ctx.activity_with::<_, u32>("stream", &(), options).await;
            // The run stays open, as an agent's does between steps.
            ctx.sleep(Duration::from_secs(3600)).await?;
            out
        })
        .activity("stream", move |ctx: ActivityContext, (): ()| {
            let (told, refused) = (t.clone(), r.clone());
            async move {
                if ctx.attempt() > 1 {
                    return Ok::<_, ActivityError>(1u32);
                }
                // A reader that reports progress and does not look for cancellation.
                let c = ctx.clone();
                tokio::spawn(async move {
                    for n in 0..100u32 {
                        if c.progress(&n).await.is_err() {
                            refused.fetch_add(1, Ordering::SeqCst);
                        }
                        tokio::time::sleep(Duration::from_millis(250)).await;
                    }
                });
                // One that waits for the end of the attempt.
                let c = ctx.clone();
                tokio::spawn(async move {
                    c.cancelled().await;
                    told.store(true, Ordering::SeqCst);
                });
                // The call itself hangs past its start-to-close timeout.
                std::future::pending::<Result<u32, ActivityError>>().await
            }
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "one", json!(null)).await;
    wait_for_event(&engine, &id, "timer_started").await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let h = history(&engine, &id).await;
    let ended = h
        .iter()
        .position(|e| matches!(e.data, EventData::ActivityRetrying { attempt: 1, .. }))
        .expect("attempt 1 timed out and is retried");
    let late = h[ended..]
        .iter()
        .filter(|e| matches!(e.data, EventData::Progress { attempt: 1, .. }))
        .count();
    // (told, progress of attempt 1 recorded after its outcome); the old code: (false, 92).
    assert_eq!(
        (told.load(Ordering::SeqCst), late),
        (true, 0),
        "the timed-out attempt's context was not canceled: {:?}",
        types(&h)
    );
    assert!(refused.load(Ordering::SeqCst) > 0);
    w.shutdown().await;
}
