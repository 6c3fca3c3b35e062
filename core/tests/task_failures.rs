//! How a failed workflow task is recorded and retried when other writers append to
//! the history meanwhile.

mod common;

use async_trait::async_trait;
use common::*;
use marathon_core::memory::MemoryStore;
use marathon_core::testkit::ForwardingStore;
use marathon_core::{
    EventData, KeyedAppend, NewEvent, OwedChanges, Seq, Store, StoreError, WorkflowContext,
    WorkflowError, WorkflowId, WorkflowStatus,
};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A memory store that lands a `progress` event (an activity's streamed token) just
/// before the next append that records a `workflow_task_failed`, so that append
/// conflicts with it.
#[derive(Default)]
struct TokenLands {
    inner: MemoryStore,
    armed: AtomicBool,
}

#[async_trait]
impl ForwardingStore for TokenLands {
    fn inner(&self) -> &dyn Store {
        &self.inner
    }
    async fn append(
        &self,
        id: &WorkflowId,
        expected: Seq,
        events: Vec<NewEvent>,
        owed: OwedChanges,
    ) -> Result<Seq, StoreError> {
        let records_failure = events
            .iter()
            .any(|e| matches!(e.data, EventData::WorkflowTaskFailed { .. }));
        if records_failure && self.armed.swap(false, Ordering::SeqCst) {
            let token = NewEvent::new(
                marathon_core::Timestamp(0),
                EventData::Progress {
                    activity_id: 9,
                    attempt: 1,
                    execution: 1,
                    data: json!("token"),
                },
            );
            self.inner
                .append_keyed(
                    id,
                    KeyedAppend {
                        key: Some("p:9:1:1:0".into()),
                        events: vec![token],
                        ..KeyedAppend::default()
                    },
                )
                .await?;
        }
        self.inner.append(id, expected, events, owed).await
    }
}

/// A workflow task that fails while an activity of the run streams progress is
/// recorded at once (`task_failure` on the summary) and retried after
/// `engine.task_failure_retry`: the progress that lands between the failure and its
/// record is bookkeeping, not new input. Before, the record's conditional append lost
/// to the progress event and was dropped, so the failure stayed invisible and the task
/// was retried only at the sweeper's `workflow_task_deadline` (30 s, then 60 s, ...),
/// and never recorded for as long as each retry met another token.
#[tokio::test(start_paused = true)]
async fn a_task_failure_is_recorded_while_progress_streams() {
    let hooked = Arc::new(TokenLands::default());
    let store: Arc<dyn Store> = hooked.clone();
    let (_, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("boom", |ctx: WorkflowContext, (): ()| async move {
            let () = ctx.signal::<()>("go").await?;
            if true {
                panic!("bug in workflow code");
            }
            Ok::<_, WorkflowError>(())
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "boom", json!(null)).await;
    wait_for_event(&engine, &id, "workflow_task_completed").await;
    hooked.armed.store(true, Ordering::SeqCst);
    engine.signal(&id, "go", json!(null), None).await.unwrap();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let s = engine.get(&id).await.unwrap();
    w.shutdown().await;
    assert_eq!(s.status, WorkflowStatus::Running);
    assert!(
        s.task_failure
            .as_deref()
            .is_some_and(|f| f.contains("bug in workflow code")),
        "the failure is not recorded 5 s later: {:?}",
        types(&history(&engine, &id).await)
    );
}
