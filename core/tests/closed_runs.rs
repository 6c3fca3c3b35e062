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
