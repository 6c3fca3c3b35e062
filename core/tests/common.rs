//! Helpers shared by the engine tests.
#![allow(dead_code, unreachable_pub)]

use async_trait::async_trait;
use marathon_core::memory::{MemoryQueue, MemoryStore};
use marathon_core::testkit::ForwardingStore;
use marathon_core::{
    AttemptStart, Created, NewEvent, NewWorkflow, OwedChanges, StoreError, Timestamp,
};
use marathon_core::{
    Delivery, Engine, EngineBuilder, EngineConfig, Event, EventData, OutgoingMessage, Queue,
    QueueError, Receipt, Seq, StartWorkflow, Store, Task, TokioClock, Worker, WorkerConfig,
    WorkflowId, WorkflowSummary,
};
use parking_lot::Mutex;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, Semaphore};

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

/// `v` inside `n` arrays, one in another.
pub fn wrap(mut v: Value, n: usize) -> Value {
    for _ in 0..n {
        v = Value::Array(vec![v]);
    }
    v
}

/// Event type names, in order.
pub fn types(events: &[Event]) -> Vec<&'static str> {
    events.iter().map(|e| e.data.type_name()).collect()
}

/// How many events satisfy `f`.
pub fn count(events: &[Event], f: impl Fn(&EventData) -> bool) -> usize {
    events.iter().filter(|e| f(&e.data)).count()
}

/// A queue the test delivers from by hand: enqueued tasks pile up in `pending`.
#[derive(Default)]
pub struct HandQueue {
    /// `(queue, task)` in the order enqueued.
    pub pending: Mutex<Vec<(String, Task)>>,
    /// Task queues it cannot carry ([`Queue::check_task_queue`]).
    pub refused: Mutex<Vec<String>>,
}

impl HandQueue {
    /// Pending workflow tasks (`true`) or activity tasks (`false`).
    pub fn count(&self, workflow: bool) -> usize {
        self.pending
            .lock()
            .iter()
            .filter(|(_, t)| matches!(t, Task::Workflow { .. }) == workflow)
            .count()
    }
}

#[async_trait]
impl Queue for HandQueue {
    async fn enqueue(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        let mut p = self.pending.lock();
        for m in messages {
            p.push((queue.to_string(), m.task));
        }
        Ok(())
    }
    async fn receive(
        &self,
        _: &str,
        _: usize,
        _: Duration,
        _: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        Ok(Vec::new())
    }
    async fn ack(&self, _: &str, _: Vec<Receipt>) -> Result<(), QueueError> {
        Ok(())
    }
    async fn nack(&self, _: &str, _: &Receipt, _: Duration) -> Result<(), QueueError> {
        Ok(())
    }
    async fn extend(&self, _: &str, _: &Receipt, _: Duration) -> Result<(), QueueError> {
        Ok(())
    }
    async fn depth(&self, _: &str) -> Result<u64, QueueError> {
        Ok(self.pending.lock().len() as u64)
    }
    async fn drain_dead_letters(&self, _: &str, _: usize) -> Result<Vec<Task>, QueueError> {
        Ok(Vec::new())
    }
    fn max_message_bytes(&self) -> usize {
        usize::MAX
    }
    fn check_task_queue(&self, task_queue: &str) -> Result<(), String> {
        if self.refused.lock().iter().any(|q| q == task_queue) {
            return Err(format!("queue {task_queue:?} is refused by this test"));
        }
        Ok(())
    }
    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

/// A memory store with hooks: one `get` can be held (the sweeper reads the summary
/// between its claim and its resend), one `start_attempt` can fail, one `create`'s
/// reply can be lost, as can one closing append's; it counts reads.
pub struct HookStore {
    /// The store it forwards to.
    pub inner: MemoryStore,
    /// Set: the next `get` notifies `held` and waits for a permit of `release`.
    pub hold_get: AtomicBool,
    /// Notified when a `get` is held.
    pub held: Notify,
    /// A permit lets a held `get` go on.
    pub release: Semaphore,
    /// Set: the next `start_attempt` fails as unavailable.
    pub fail_start: AtomicBool,
    /// `read` calls made.
    pub reads: AtomicU32,
    /// Set: the next `create` is applied but answers unavailable (its reply was lost).
    pub lose_create_reply: AtomicBool,
    /// Set: the next `append` that closes a run is applied but answers unavailable.
    pub lose_close_reply: AtomicBool,
}

impl Default for HookStore {
    fn default() -> Self {
        Self {
            inner: MemoryStore::default(),
            hold_get: AtomicBool::new(false),
            held: Notify::new(),
            release: Semaphore::new(0),
            fail_start: AtomicBool::new(false),
            reads: AtomicU32::new(0),
            lose_create_reply: AtomicBool::new(false),
            lose_close_reply: AtomicBool::new(false),
        }
    }
}

#[async_trait]
impl ForwardingStore for HookStore {
    fn inner(&self) -> &dyn Store {
        &self.inner
    }
    async fn create(&self, new: NewWorkflow) -> Result<Created, StoreError> {
        let created = self.inner.create(new).await?;
        if self.lose_create_reply.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("reply lost".into()));
        }
        Ok(created)
    }
    async fn append(
        &self,
        id: &WorkflowId,
        expected: Seq,
        events: Vec<NewEvent>,
        owed: OwedChanges,
    ) -> Result<Seq, StoreError> {
        let closes = events.iter().any(|e| e.data.is_terminal());
        let last = self.inner.append(id, expected, events, owed).await?;
        if closes && self.lose_close_reply.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("reply lost".into()));
        }
        Ok(last)
    }
    async fn read(
        &self,
        id: &WorkflowId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<marathon_core::Event>, StoreError> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.inner.read(id, after, limit).await
    }
    async fn get(&self, id: &WorkflowId) -> Result<Option<WorkflowSummary>, StoreError> {
        if self.hold_get.swap(false, Ordering::SeqCst) {
            self.held.notify_one();
            self.release.acquire().await.expect("open").forget();
        }
        self.inner.get(id).await
    }
    async fn start_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        now: Timestamp,
        deadline: Timestamp,
        redelivered: bool,
    ) -> Result<AttemptStart, StoreError> {
        if self.fail_start.swap(false, Ordering::SeqCst) {
            return Err(StoreError::Unavailable("connection reset".into()));
        }
        self.inner
            .start_attempt(id, key, copy, now, deadline, redelivered)
            .await
    }
}
