//! A rolling upgrade: replicas of two versions share one store and queue.

mod common;

use common::*;
use marathon_core::{ActivityContext, ActivityError, EventData, WorkflowContext, WorkflowStatus};
use serde_json::{Value, json};

/// A new version adds an activity and calls it; a replica of the old version, which
/// does not register it, receives the first attempt. That attempt fails with kind
/// `unknown_activity` and the call is retried (under its retry policy), so a replica
/// of the new version runs it. Before, the old replica failed the call for good, and
/// the workflow with it, in the middle of every rollout that added an activity.
#[tokio::test(start_paused = true)]
async fn an_activity_unknown_to_the_replica_that_received_it_is_retried() {
    let (store, queue) = backends();
    let workflow = |ctx: WorkflowContext, (): ()| async move {
        ctx.activity::<_, Value>("added_in_v2", &json!("hi")).await
    };
    let old = builder(&store, &queue).workflow("w", workflow).build();
    let new = builder(&store, &queue)
        .workflow("w", workflow)
        .activity(
            "added_in_v2",
            |_ctx: ActivityContext, v: Value| async move { Ok::<_, ActivityError>(v) },
        )
        .build();
    // Only the old replica runs at first: it takes the first attempt.
    let w_old = worker(&old);
    let id = start(&new, "w", json!(null)).await;
    let t0 = tokio::time::Instant::now();
    loop {
        let h = history(&new, &id).await;
        let kinds: Vec<_> = h.iter().map(|e| e.data.type_name()).collect();
        if kinds.contains(&"activity_retrying") || kinds.contains(&"activity_failed") {
            break;
        }
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(60),
            "no attempt recorded: {kinds:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    w_old.shutdown().await;
    let w_new = worker(&new);
    let done = finished(&new, &id).await;
    w_new.shutdown().await;
    let h = history(&new, &id).await;
    assert_eq!(
        done.status,
        WorkflowStatus::Completed,
        "{:?}: {:?}",
        done.error,
        types(&h)
    );
    assert_eq!(done.output, Some(json!("hi")));
    let retried = h.iter().find_map(|e| match &e.data {
        EventData::ActivityRetrying { error, .. } => Some(error.kind.clone()),
        _ => None,
    });
    assert_eq!(retried.as_deref(), Some("unknown_activity"));
}
