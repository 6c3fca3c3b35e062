//! Durable heartbeats: an attempt whose `heartbeat_timeout` is shorter than its budget
//! keeps its owed deadline in the store through its heartbeats, so a worker lost
//! mid-attempt is noticed about a heartbeat timeout after its last heartbeat, not at
//! the end of the attempt's start-to-close.

mod common;

use async_trait::async_trait;
use common::*;
use marathon_core::memory::{MemoryQueue, MemoryStore};
use marathon_core::testkit::{ForwardingQueue, ForwardingStore};
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, AttemptExtend, AttemptStart, Created,
    Delivery, Engine, EventData, KeyedAppend, KeyedOutcome, NewEvent, NewWorkflow, OutgoingMessage,
    Owed, OwedChanges, Queue, QueueError, QueueSpec, Receipt, Seq, Store, StoreError, Task,
    Timestamp, Worker, WorkerConfig, WorkflowContext, WorkflowError, WorkflowId, WorkflowStatus,
    WorkflowSummary,
};
use serde_json::json;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

const HOUR: Duration = Duration::from_secs(3600);
const HEARTBEAT: Duration = Duration::from_secs(30);
/// The engine's default `activity_grace`.
const GRACE: Duration = Duration::from_secs(30);

/// Hangs forever once `dead` is set: a replica that froze or lost its network.
async fn gate(dead: &AtomicBool) {
    if dead.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
}

/// One replica's view of the shared store: counts its attempt calls, and once `dead`
/// every call hangs (the replica writes nothing more).
struct ReplicaStore {
    inner: Arc<dyn Store>,
    dead: Arc<AtomicBool>,
    starts: AtomicU32,
    extends: AtomicU32,
}

impl ReplicaStore {
    fn new(inner: Arc<dyn Store>, dead: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            dead,
            starts: AtomicU32::new(0),
            extends: AtomicU32::new(0),
        }
    }
}

#[async_trait]
impl ForwardingStore for ReplicaStore {
    fn inner(&self) -> &dyn Store {
        &*self.inner
    }
    async fn create(&self, new: NewWorkflow) -> Result<Created, StoreError> {
        gate(&self.dead).await;
        self.inner.create(new).await
    }
    async fn append(
        &self,
        id: &WorkflowId,
        expected: Seq,
        events: Vec<NewEvent>,
        owed: OwedChanges,
    ) -> Result<Seq, StoreError> {
        gate(&self.dead).await;
        self.inner.append(id, expected, events, owed).await
    }
    async fn append_keyed(
        &self,
        id: &WorkflowId,
        append: KeyedAppend,
    ) -> Result<KeyedOutcome, StoreError> {
        gate(&self.dead).await;
        self.inner.append_keyed(id, append).await
    }
    async fn read(
        &self,
        id: &WorkflowId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<marathon_core::Event>, StoreError> {
        gate(&self.dead).await;
        self.inner.read(id, after, limit).await
    }
    async fn get(&self, id: &WorkflowId) -> Result<Option<WorkflowSummary>, StoreError> {
        gate(&self.dead).await;
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
        gate(&self.dead).await;
        self.starts.fetch_add(1, Ordering::SeqCst);
        self.inner
            .start_attempt(id, key, copy, now, deadline, redelivered)
            .await
    }
    async fn extend_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        started: Timestamp,
        deadline: Timestamp,
    ) -> Result<AttemptExtend, StoreError> {
        gate(&self.dead).await;
        self.extends.fetch_add(1, Ordering::SeqCst);
        self.inner
            .extend_attempt(id, key, copy, started, deadline)
            .await
    }
    async fn claim_overdue(
        &self,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Owed>, StoreError> {
        gate(&self.dead).await;
        self.inner.claim_overdue(now, lease, limit).await
    }
    async fn purge_closed(
        &self,
        closed_before: Timestamp,
        limit: usize,
    ) -> Result<usize, StoreError> {
        gate(&self.dead).await;
        self.inner.purge_closed(closed_before, limit).await
    }
}

/// One replica's view of the shared queue: once `dead`, every call hangs (it receives,
/// acks and extends nothing more, so what it holds stays hidden for its visibility).
struct ReplicaQueue {
    inner: Arc<dyn Queue>,
    dead: Arc<AtomicBool>,
}

#[async_trait]
impl ForwardingQueue for ReplicaQueue {
    fn inner(&self) -> &dyn Queue {
        &*self.inner
    }
    async fn enqueue(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        gate(&self.dead).await;
        self.inner.enqueue(queue, messages).await
    }
    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        gate(&self.dead).await;
        let received = self.inner.receive(queue, max, wait, visibility).await;
        gate(&self.dead).await;
        received
    }
    async fn ack(&self, queue: &str, receipts: Vec<Receipt>) -> Result<(), QueueError> {
        gate(&self.dead).await;
        self.inner.ack(queue, receipts).await
    }
    async fn nack(
        &self,
        queue: &str,
        receipt: &Receipt,
        delay: Duration,
    ) -> Result<(), QueueError> {
        gate(&self.dead).await;
        self.inner.nack(queue, receipt, delay).await
    }
    async fn extend(
        &self,
        queue: &str,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        gate(&self.dead).await;
        self.inner.extend(queue, receipt, visibility).await
    }
    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        gate(&self.dead).await;
        self.inner.depth(queue).await
    }
    async fn drain_dead_letters(&self, queue: &str, max: usize) -> Result<Vec<Task>, QueueError> {
        gate(&self.dead).await;
        self.inner.drain_dead_letters(queue, max).await
    }
}

/// Options of the long call: start-to-close 1 h, heartbeat timeout 30 s, on task
/// queue `work`.
fn long_call() -> ActivityOptions {
    ActivityOptions::default()
        .start_to_close(HOUR)
        .heartbeat_timeout(HEARTBEAT)
        .task_queue("work")
}

/// A workflow's future.
type WorkflowFuture = Pin<Box<dyn Future<Output = Result<u32, WorkflowError>> + Send>>;

/// A workflow that calls `work` once with `options` and returns its output.
fn calls_work(
    options: ActivityOptions,
) -> impl Fn(WorkflowContext, ()) -> WorkflowFuture + Send + Sync + 'static {
    move |ctx: WorkflowContext, (): ()| {
        let options = options.clone();
        Box::pin(async move {
            let out: u32 = ctx.activity_with("work", &(), options).await?;
            Ok(out)
        })
    }
}

/// A worker on `engine` serving the task queues `queues`.
fn worker_on(engine: &Engine, queues: &[&str], sweeper: bool, visibility: Duration) -> Worker {
    Worker::start(
        engine.clone(),
        WorkerConfig {
            queues: queues.iter().map(|q| QueueSpec::new(*q, 8)).collect(),
            sweeper,
            visibility,
            ..worker_config()
        },
    )
}

/// The error kinds of the attempts' failures, in order.
fn failure_kinds(h: &[marathon_core::Event]) -> Vec<(u32, String)> {
    h.iter()
        .filter_map(|e| match &e.data {
            EventData::ActivityRetrying { attempt, error, .. }
            | EventData::ActivityFailed { attempt, error, .. } => {
                Some((*attempt, error.kind.clone()))
            }
            _ => None,
        })
        .collect()
}

/// A worker that heartbeats its attempt (start-to-close 1 h, heartbeat timeout 30 s)
/// and then dies is noticed by another replica's sweeper about a heartbeat timeout +
/// grace later: the attempt fails with `timeout.heartbeat`, is retried per its retry
/// policy, and the other replica finishes the call. The dead worker's message stays
/// hidden for its visibility (two hours here: a long visibility, or a message the
/// queue lost), so only the store can tell. Before, the attempt was owed for its whole
/// start-to-close + grace: the call finished about an hour after the worker died.
#[tokio::test(start_paused = true)]
async fn a_worker_lost_mid_attempt_is_noticed_at_its_heartbeat_timeout() {
    let shared: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::default());
    let dead = Arc::new(AtomicBool::new(false));
    let store_a = Arc::new(ReplicaStore::new(shared.clone(), dead.clone()));
    let dyn_store_a: Arc<dyn Store> = store_a.clone();
    let queue_a: Arc<dyn Queue> = Arc::new(ReplicaQueue {
        inner: queue.clone(),
        dead: dead.clone(),
    });
    let heartbeats = Arc::new(AtomicU32::new(0));
    // Replica A's `work` heartbeats every 10 ms until its replica dies.
    let engine_a = builder(&dyn_store_a, &queue_a)
        .workflow("one", calls_work(long_call()))
        .activity("work", {
            let heartbeats = heartbeats.clone();
            move |ctx: ActivityContext, (): ()| {
                let heartbeats = heartbeats.clone();
                async move {
                    loop {
                        ctx.heartbeat().await?;
                        heartbeats.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    #[expect(unreachable_code, reason = "names the closure's result type")]
                    Ok::<u32, ActivityError>(0)
                }
            }
        })
        .build();
    // Replica B's finishes at once with its attempt number.
    let engine_b = builder(&shared, &queue)
        .workflow("one", calls_work(long_call()))
        .activity("work", |ctx: ActivityContext, (): ()| async move {
            Ok::<_, ActivityError>(ctx.attempt())
        })
        .build();
    let a = worker_on(&engine_a, &["work"], true, 2 * HOUR);
    let b = worker_on(&engine_b, &["default"], true, 2 * HOUR);
    let id = start(&engine_b, "one", json!(null)).await;
    while heartbeats.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // A runs attempt 1; now B serves `work` too.
    let b_work = worker_on(&engine_b, &["work"], false, 2 * HOUR);
    // Two minutes of heartbeats (longer than heartbeat timeout + grace): attempt 1 is
    // not given up meanwhile, and its heartbeats reach the store about every 15 s
    // (half the shorter of the heartbeat timeout and the grace), not every 10 ms.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let h = history(&engine_b, &id).await;
    assert!(failure_kinds(&h).is_empty(), "{:?}", types(&h));
    let extends = store_a.extends.load(Ordering::SeqCst);
    // A dies.
    dead.store(true, Ordering::SeqCst);
    let died = tokio::time::Instant::now();
    let summary = engine_b.result(&id, 2 * HOUR).await.expect("result");
    let took = died.elapsed();
    assert_eq!(summary.status, WorkflowStatus::Completed, "{summary:?}");
    assert!(
        took <= HEARTBEAT + GRACE + Duration::from_secs(5),
        "the call finished {took:?} after its worker died"
    );
    let h = history(&engine_b, &id).await;
    assert_eq!(
        failure_kinds(&h),
        [(1, "timeout.heartbeat".to_string())],
        "{:?}",
        types(&h)
    );
    assert_eq!(summary.output, Some(json!(2)));
    assert!(
        (7..=9).contains(&extends),
        "{extends} heartbeat writes in 120 s"
    );
    drop(a); // dead: its shutdown would hang
    b.shutdown().await;
    b_work.shutdown().await;
}

/// A live attempt that heartbeats every 10 ms for three minutes (far longer than its
/// heartbeat timeout + grace) is neither given up nor run again: its heartbeats keep
/// its deadline ahead, about one store write per 15 s. Without the writes (or with a
/// deadline they do not move) the sweeper would record `timeout.heartbeat` after a
/// minute and run attempt 2 beside it.
#[tokio::test(start_paused = true)]
async fn a_live_heartbeating_attempt_is_not_given_up() {
    let (store, queue) = backends();
    let counting = Arc::new(ReplicaStore::new(store, Arc::new(AtomicBool::new(false))));
    let dyn_store: Arc<dyn Store> = counting.clone();
    let runs = Arc::new(AtomicU32::new(0));
    let engine = builder(&dyn_store, &queue)
        .workflow("one", calls_work(long_call()))
        .activity("work", {
            let runs = runs.clone();
            move |ctx: ActivityContext, (): ()| {
                let runs = runs.clone();
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    let end = tokio::time::Instant::now() + Duration::from_secs(180);
                    while tokio::time::Instant::now() < end {
                        ctx.heartbeat().await?;
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok::<_, ActivityError>(ctx.attempt())
                }
            }
        })
        .build();
    let w = worker_on(&engine, &["default", "work"], true, Duration::from_secs(30));
    let id = start(&engine, "one", json!(null)).await;
    let summary = finished(&engine, &id).await;
    assert_eq!(summary.status, WorkflowStatus::Completed, "{summary:?}");
    assert_eq!(summary.output, Some(json!(1)));
    let h = history(&engine, &id).await;
    assert!(failure_kinds(&h).is_empty(), "{:?}", types(&h));
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    // Marked started once (the hot path's one extra call for such an attempt), and
    // about one write per 15 s after.
    assert_eq!(counting.starts.load(Ordering::SeqCst), 1);
    let extends = counting.extends.load(Ordering::SeqCst);
    assert!(
        (11..=13).contains(&extends),
        "{extends} heartbeat writes in 180 s"
    );
    w.shutdown().await;
}

/// An attempt without a heartbeat timeout (or with one no shorter than its budget)
/// received in time makes no attempt call to the store, however often it heartbeats.
#[tokio::test(start_paused = true)]
async fn attempts_without_a_shorter_heartbeat_timeout_make_no_attempt_calls() {
    for options in [
        ActivityOptions::default().task_queue("work"),
        ActivityOptions::default()
            .start_to_close(Duration::from_secs(60))
            .heartbeat_timeout(Duration::from_secs(60))
            .task_queue("work"),
    ] {
        let (store, queue) = backends();
        let counting = Arc::new(ReplicaStore::new(store, Arc::new(AtomicBool::new(false))));
        let dyn_store: Arc<dyn Store> = counting.clone();
        let engine = builder(&dyn_store, &queue)
            .workflow("one", calls_work(options))
            .activity("work", |ctx: ActivityContext, (): ()| async move {
                for _ in 0..3000 {
                    ctx.heartbeat().await?;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Ok::<_, ActivityError>(ctx.attempt())
            })
            .build();
        let w = worker_on(&engine, &["default", "work"], true, Duration::from_secs(30));
        let id = start(&engine, "one", json!(null)).await;
        let summary = finished(&engine, &id).await;
        assert_eq!(summary.output, Some(json!(1)), "{summary:?}");
        assert_eq!(
            (
                counting.starts.load(Ordering::SeqCst),
                counting.extends.load(Ordering::SeqCst)
            ),
            (0, 0)
        );
        w.shutdown().await;
    }
}

/// An execution whose attempt was taken over (the queue delivered its task again, say
/// after its worker's visibility extensions failed, while it still ran) learns so at
/// its next heartbeat write: `ctx.heartbeat()` returns `canceled`, it stops, and its
/// outcome is not recorded; the execution that took over finishes the call. Recording
/// the stopped execution's `canceled` error would consume the attempt, which is still
/// owed to the other execution, and fail the call for good.
#[tokio::test(start_paused = true)]
async fn an_execution_whose_attempt_was_taken_over_stops_without_a_result() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let queue = Arc::new(HandQueue::default());
    let dyn_queue: Arc<dyn Queue> = queue.clone();
    let executions = Arc::new(AtomicU32::new(0));
    let stopped = Arc::new(AtomicU32::new(0));
    let engine = builder(&store, &dyn_queue)
        .workflow("one", calls_work(long_call()))
        .activity("work", {
            let (executions, stopped) = (executions.clone(), stopped.clone());
            move |ctx: ActivityContext, (): ()| {
                let (executions, stopped) = (executions.clone(), stopped.clone());
                async move {
                    let n = executions.fetch_add(1, Ordering::SeqCst) + 1;
                    let end = tokio::time::Instant::now() + Duration::from_secs(100);
                    while tokio::time::Instant::now() < end {
                        if let Err(e) = ctx.heartbeat().await {
                            stopped.fetch_add(1, Ordering::SeqCst);
                            return Err(e);
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Ok::<_, ActivityError>(n)
                }
            }
        })
        .build();
    let take = || {
        let mut pending = queue.pending.lock();
        (!pending.is_empty()).then(|| pending.remove(0))
    };
    let id = start(&engine, "one", json!(null)).await;
    let (q, task) = take().expect("first workflow task");
    engine.handle(&q, task).await.expect("workflow task");
    let (q, task) = take().expect("the activity task");
    let first = tokio::spawn({
        let (engine, q, task) = (engine.clone(), q.clone(), task.clone());
        async move { engine.handle_delivery(&q, task, 1).await }
    });
    tokio::time::sleep(Duration::from_secs(20)).await;
    // The queue delivers the task again while the first execution runs: it takes over.
    let second = tokio::spawn({
        let engine = engine.clone();
        async move { engine.handle_delivery(&q, task, 2).await }
    });
    first
        .await
        .expect("joined")
        .expect("first execution handled");
    assert_eq!(stopped.load(Ordering::SeqCst), 1);
    let h = history(&engine, &id).await;
    assert!(failure_kinds(&h).is_empty(), "{:?}", types(&h));
    second
        .await
        .expect("joined")
        .expect("second execution handled");
    while let Some((q, task)) = take() {
        engine.handle(&q, task).await.expect("task handled");
    }
    let summary = engine.get(&id).await.expect("summary");
    assert_eq!(summary.status, WorkflowStatus::Completed, "{summary:?}");
    assert_eq!(summary.output, Some(json!(2)));
    assert_eq!(executions.load(Ordering::SeqCst), 2);
}

/// What `get` answers for the workflow a replica's heartbeats ask about.
#[derive(Clone, Copy, PartialEq)]
enum Seen {
    /// As the store has it.
    Same,
    /// Gone: retention removed the closed run between two heartbeats.
    Gone,
    /// A newer run of the same id (the old one closed and was removed, the id reused).
    NewerRun,
}

/// A store whose `get` answers as `seen` says.
struct RunStore {
    inner: MemoryStore,
    seen: parking_lot::Mutex<Seen>,
}

#[async_trait]
impl ForwardingStore for RunStore {
    fn inner(&self) -> &dyn Store {
        &self.inner
    }
    async fn get(&self, id: &WorkflowId) -> Result<Option<WorkflowSummary>, StoreError> {
        let seen = *self.seen.lock();
        let summary = self.inner.get(id).await?;
        Ok(match seen {
            Seen::Same => summary,
            Seen::Gone => None,
            Seen::NewerRun => summary.map(|mut s| {
                s.created_at = s.created_at.plus(HOUR);
                s
            }),
        })
    }
}

/// The once-a-second check of a heartbeat without a shorter `heartbeat_timeout`
/// stops the attempt when the run that called it is no longer in the store: gone,
/// or replaced by a newer run of the same id. Before, it stopped only on a summary
/// that said canceled or closed, and such an attempt ran on to its start-to-close
/// (an hour here) for a result nobody could record.
#[tokio::test(start_paused = true)]
async fn a_heartbeat_stops_an_attempt_whose_run_is_gone_or_replaced() {
    for seen in [Seen::Gone, Seen::NewerRun] {
        let store = Arc::new(RunStore {
            inner: MemoryStore::default(),
            seen: parking_lot::Mutex::new(Seen::Same),
        });
        let store_dyn: Arc<dyn Store> = store.clone();
        let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::default());
        let running = Arc::new(AtomicBool::new(false));
        let stopped = Arc::new(AtomicBool::new(false));
        let (r, st) = (running.clone(), stopped.clone());
        let engine = builder(&store_dyn, &queue)
            .workflow("long", |ctx: WorkflowContext, (): ()| async move {
                ctx.activity_with::<_, serde_json::Value>(
                    "beat",
                    &(),
                    ActivityOptions {
                        start_to_close: HOUR,
                        ..ActivityOptions::default()
                    },
                )
                .await
            })
            .activity("beat", move |ctx: ActivityContext, (): ()| {
                let (r, st) = (r.clone(), st.clone());
                async move {
                    r.store(true, Ordering::SeqCst);
                    loop {
                        if let Err(e) = ctx.heartbeat().await {
                            st.store(true, Ordering::SeqCst);
                            return Err::<(), _>(e);
                        }
                        tokio::time::sleep(Duration::from_secs(2)).await;
                    }
                }
            })
            .build();
        let w = worker(&engine);
        start(&engine, "long", json!(null)).await;
        while !running.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        *store.seen.lock() = seen;
        let t0 = tokio::time::Instant::now();
        while !stopped.load(Ordering::SeqCst) && t0.elapsed() < Duration::from_secs(600) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let took = t0.elapsed();
        w.shutdown().await;
        assert!(
            stopped.load(Ordering::SeqCst) && took < Duration::from_secs(10),
            "{}: still running after {took:?}",
            if seen == Seen::Gone {
                "gone"
            } else {
                "newer run"
            }
        );
    }
}
