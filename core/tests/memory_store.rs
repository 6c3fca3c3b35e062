//! Behaviours of the in-memory `Store` under concurrency that the shared conformance
//! suite cannot pin down through the trait alone.

use std::sync::Arc;
use std::time::Duration;

use marathon_core::memory::MemoryStore;
use marathon_core::{
    EventData, ListQuery, NewEvent, NewWorkflow, OwedChanges, Seq, Store, Timestamp, WorkflowId,
    WorkflowStatus,
};
use serde_json::json;

fn new_workflow(started_at: u64) -> NewWorkflow {
    NewWorkflow {
        id: WorkflowId::random(),
        name: "list".into(),
        input: json!(null),
        task_queue: "tq".into(),
        idempotency_key: None,
        started_at: Timestamp(started_at),
        task_deadline: Timestamp(started_at).plus(Duration::from_secs(30)),
        trace_context: None,
    }
}

/// A list filtered by status never returns a workflow in another status, also while
/// workflows finish during the call: the memory store picked candidates by its index
/// and copied their summaries afterwards, so one that finished in between was listed
/// as `completed` among the `running` ones (the Redis store skips it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_status_filtered_list_returns_only_that_status_while_workflows_finish() {
    let store = Arc::new(MemoryStore::default());
    let mut ids = Vec::new();
    for i in 0..4000 {
        let new = new_workflow(1_000 + i);
        ids.push(new.id.clone());
        store.create(new).await.expect("create");
    }
    let completer = {
        let store = store.clone();
        tokio::spawn(async move {
            for id in ids {
                store
                    .append(
                        &id,
                        Seq(1),
                        vec![NewEvent::new(
                            Timestamp(9_000),
                            EventData::WorkflowCompleted { output: json!(1) },
                        )],
                        OwedChanges::none(),
                    )
                    .await
                    .expect("complete");
                tokio::task::yield_now().await;
            }
        })
    };
    let query = ListQuery {
        status: Some(WorkflowStatus::Running),
        limit: 1000,
        ..ListQuery::default()
    };
    let (mut lists, mut wrong) = (0, Vec::new());
    while !completer.is_finished() {
        let page = store.list(&query).await.expect("list");
        lists += 1;
        wrong.extend(
            page.items
                .into_iter()
                .filter(|s| s.status != WorkflowStatus::Running)
                .map(|s| s.status),
        );
    }
    completer.await.expect("completer");
    assert!(
        wrong.is_empty(),
        "{} of {lists} lists of running workflows held finished ones: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}
