//! Replay against a history recorded by other code (a deploy that changed the
//! workflow), driven by hand: tasks are handed to `Engine::handle` directly.

mod common;

use common::*;
use marathon_core::{Engine, EngineConfig, Task, WorkflowContext, WorkflowError};
use serde_json::json;
use std::time::Duration;

/// An engine on `store` and `queue` that replays every task from event 1 and runs
/// `version` as workflow `w`.
fn engine_with<F, Fut>(
    store: &std::sync::Arc<dyn marathon_core::Store>,
    queue: &std::sync::Arc<dyn marathon_core::Queue>,
    version: F,
) -> Engine
where
    F: Fn(WorkflowContext, ()) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), WorkflowError>> + Send + 'static,
{
    builder(store, queue)
        .config(EngineConfig {
            cache_capacity: 0,
            ..EngineConfig::default()
        })
        .workflow("w", version)
        .build()
}

/// Code deployed after the last workflow task now issues a call that task did not
/// record, and a workflow task comes before any new input (a duplicate delivery, the
/// sweeper's retry of the failed task every `task_failure_retry`): the failure is
/// recorded once, not once more per retry. Before 2026-11-28 its message named the
/// event after the end of the history, which the failure itself moved, so every retry
/// recorded a new `workflow_task_failed` (8,640 a day at the default 10 s) for as long
/// as the run waited for its next input.
#[tokio::test(start_paused = true)]
async fn non_determinism_at_the_end_of_the_history_is_recorded_once() {
    let (store, queue) = backends();
    let v1 = engine_with(&store, &queue, |ctx: WorkflowContext, (): ()| async move {
        ctx.sleep(Duration::from_secs(3600)).await
    });
    let v2 = engine_with(&store, &queue, |ctx: WorkflowContext, (): ()| async move {
        let first = ctx.sleep(Duration::from_secs(3600));
        let second = ctx.sleep(Duration::from_secs(3600));
        first.await?;
        second.await
    });
    let id = start(&v1, "w", json!(null)).await;
    v1.handle("default", Task::workflow(id.clone()))
        .await
        .unwrap();
    assert_eq!(
        types(&history(&v1, &id).await),
        [
            "workflow_started",
            "workflow_task_completed",
            "timer_started"
        ]
    );
    for _ in 0..3 {
        v2.handle("default", Task::workflow(id.clone()))
            .await
            .unwrap();
    }
    let h = history(&v2, &id).await;
    let failures: Vec<_> = h
        .iter()
        .filter_map(|e| match &e.data {
            marathon_core::EventData::WorkflowTaskFailed { kind, message } => {
                Some(format!("{kind}: {message}"))
            }
            _ => None,
        })
        .collect();
    assert_eq!(failures.len(), 1, "{failures:#?}");
    assert!(failures[0].starts_with("non_determinism: "), "{failures:?}");
    let summary = v2.get(&id).await.unwrap();
    assert_eq!(summary.task_failure.as_ref(), Some(&failures[0]));
}

/// The same for code that now returns where the history recorded another step.
#[tokio::test(start_paused = true)]
async fn a_return_at_the_end_of_the_history_is_recorded_once() {
    let (store, queue) = backends();
    let v1 = engine_with(&store, &queue, |ctx: WorkflowContext, (): ()| async move {
        ctx.sleep(Duration::from_secs(3600)).await
    });
    let v2 = engine_with(&store, &queue, |ctx: WorkflowContext, (): ()| async move {
        drop(ctx.sleep(Duration::from_secs(3600)));
        Ok(())
    });
    let id = start(&v1, "w", json!(null)).await;
    v1.handle("default", Task::workflow(id.clone()))
        .await
        .unwrap();
    for _ in 0..3 {
        v2.handle("default", Task::workflow(id.clone()))
            .await
            .unwrap();
    }
    let h = history(&v2, &id).await;
    assert_eq!(
        count(&h, |d| d.type_name() == "workflow_task_failed"),
        1,
        "{:?}",
        types(&h)
    );
}

/// Workflow code may coordinate its own branches with `tokio::sync` (a channel, a
/// mutex): deterministic, in memory. Those count against tokio's cooperative budget
/// (128 operations per poll of the task running them), and one over it returns
/// `Pending` and asks to be polled again only once the task running the workflow
/// task has yielded, after the task's polls have ended. Before 2026-11-28 the budget
/// was the worker task's: a run that used more than it in one workflow task stopped
/// there for good (no command, no error), and a replay from event 1, which runs every
/// earlier workflow task in one poll, ran out of it part way through a history the
/// live run had recorded, and failed it as non-determinism.
#[tokio::test(start_paused = true)]
async fn tokio_sync_in_workflow_code_is_not_cut_off_by_the_task_budget() {
    let (store, queue) = backends();
    let engine = engine_with(&store, &queue, |ctx: WorkflowContext, (): ()| async move {
        for _ in 0..20 {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
            for i in 0..20 {
                tx.send(i).map_err(|e| WorkflowError::new(e.to_string()))?;
            }
            drop(tx);
            while rx.recv().await.is_some() {}
            ctx.sleep(Duration::from_secs(1)).await?;
        }
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        for i in 0..1_000 {
            tx.send(i).map_err(|e| WorkflowError::new(e.to_string()))?;
        }
        drop(tx);
        while rx.recv().await.is_some() {}
        Ok(())
    });
    let w = worker(&engine);
    let id = start(&engine, "w", json!(null)).await;
    tokio::time::sleep(Duration::from_secs(120)).await;
    let s = engine.get(&id).await.unwrap();
    w.shutdown().await;
    let h = history(&engine, &id).await;
    assert_eq!(
        s.status,
        marathon_core::WorkflowStatus::Completed,
        "{:?}",
        types(&h)
    );
    assert_eq!(
        count(&h, |d| d.type_name() == "workflow_task_failed"),
        0,
        "{:?}",
        types(&h)
    );
}

/// A workflow task that keeps failing the same way while an activity it called
/// streams progress: the failure is recorded once, not again at every retry that
/// finds progress after it. Before 2026-11-28 the repeat check compared with the last
/// event only, so each retry (every `task_failure_retry`) that followed some progress
/// recorded another `workflow_task_failed`.
#[tokio::test(start_paused = true)]
async fn a_repeated_failure_is_recorded_once_while_progress_streams() {
    let (store, queue) = backends();
    let v1 = engine_with(&store, &queue, |ctx: WorkflowContext, (): ()| async move {
        ctx.activity::<_, ()>("stream", &()).await
    });
    let v2 = engine_with(&store, &queue, |_ctx: WorkflowContext, (): ()| async move {
        Err(WorkflowError::new("unused"))
    });
    let id = start(&v1, "w", json!(null)).await;
    v1.handle("default", Task::workflow(id.clone()))
        .await
        .unwrap();
    for n in 0..3u32 {
        // The v2 code returns where v1 called the activity: non-determinism.
        v2.handle("default", Task::workflow(id.clone()))
            .await
            .unwrap();
        // The activity v1 scheduled streams on meanwhile.
        let appended = store
            .append_keyed(
                &id,
                marathon_core::KeyedAppend {
                    key: Some(format!("p:1:1:1:{n}")),
                    events: vec![marathon_core::NewEvent::new(
                        v1.now(),
                        marathon_core::EventData::Progress {
                            activity_id: 1,
                            attempt: 1,
                            execution: 1,
                            data: json!({ "token": n }),
                        },
                    )],
                    ..marathon_core::KeyedAppend::default()
                },
            )
            .await
            .unwrap();
        assert!(matches!(appended, marathon_core::KeyedOutcome::Appended(_)));
    }
    let h = history(&v2, &id).await;
    assert_eq!(
        count(&h, |d| d.type_name() == "workflow_task_failed"),
        1,
        "{:?}",
        types(&h)
    );
}
