//! Helpers shared by the engine tests.
#![allow(dead_code, unreachable_pub)]

use marathon_core::memory::{MemoryQueue, MemoryStore};
use marathon_core::{
    Engine, EngineBuilder, EngineConfig, Event, EventData, Queue, Seq, StartWorkflow, Store,
    TokioClock, Worker, WorkerConfig, WorkflowId, WorkflowSummary,
};
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;

/// Fresh in-memory backends.
pub fn backends() -> (Arc<dyn Store>, Arc<dyn Queue>) {
    (
        Arc::new(MemoryStore::default()),
        Arc::new(MemoryQueue::default()),
    )
}

/// An engine builder on the given backends with a tokio-driven clock.
pub fn builder(store: &Arc<dyn Store>, queue: &Arc<dyn Queue>) -> EngineBuilder {
    Engine::builder()
        .store(store.clone())
        .queue(queue.clone())
        .clock(Arc::new(TokioClock::new()))
        .config(EngineConfig {
            task_failure_retry: Duration::from_millis(500),
            ..EngineConfig::default()
        })
}

/// Worker settings for tests: quick sweeps, short grace.
pub fn worker_config() -> WorkerConfig {
    WorkerConfig {
        sweep_interval: Duration::from_millis(50),
        shutdown_grace: Duration::from_secs(1),
        poll_wait: Duration::from_millis(500),
        ..WorkerConfig::default()
    }
}

/// Starts a worker for `engine`.
pub fn worker(engine: &Engine) -> Worker {
    Worker::start(engine.clone(), worker_config())
}

/// Starts workflow `name` with `input` (a new run); its id.
pub async fn start(engine: &Engine, name: &str, input: Value) -> WorkflowId {
    engine
        .start(StartWorkflow::new(name, input))
        .await
        .unwrap()
        .summary
        .id
}

/// Waits (in test time) until the history holds an event of type `ty`.
pub async fn wait_for_event(engine: &Engine, id: &WorkflowId, ty: &str) {
    while !types(&history(engine, id).await).contains(&ty) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits (up to an hour of test time) until the workflow finishes.
pub async fn finished(engine: &Engine, id: &WorkflowId) -> WorkflowSummary {
    let s = engine.result(id, Duration::from_secs(3600)).await.unwrap();
    assert!(
        s.status.is_terminal(),
        "workflow {id} did not finish: {s:?}"
    );
    s
}

/// The whole history.
pub async fn history(engine: &Engine, id: &WorkflowId) -> Vec<Event> {
    let events = engine.events(id, Seq::ZERO, 100_000).await.unwrap();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(e.seq, Seq(i as u64 + 1), "history has a gap");
    }
    events
}

/// Event type names, in order.
pub fn types(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.data.type_name()).collect()
}

/// How many events satisfy `f`.
pub fn count(events: &[Event], f: impl Fn(&EventData) -> bool) -> usize {
    events.iter().filter(|e| f(&e.data)).count()
}
