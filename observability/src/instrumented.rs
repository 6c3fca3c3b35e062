//! [`InstrumentedStore`] and [`InstrumentedQueue`]: any backend, timed per operation.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use marathon_core::model::{Event, NewEvent, Seq, Task, Timestamp, WorkflowId, WorkflowSummary};
use marathon_core::queue::{Delivery, OutgoingMessage, Queue, QueueError, Receipt};
use marathon_core::store::{
    AttemptExtend, AttemptStart, Created, EventStream, KeyedAppend, KeyedOutcome, ListPage,
    ListQuery, NewWorkflow, Owed, OwedChanges, Store, StoreError,
};

use crate::Metrics;
use crate::sharded::{ShardedHistogram, ShardedHistogramVec};

/// A [`Store`] that records the latency of every call of the store it wraps in
/// `marathon_store_operation_seconds{operation, backend, outcome}`.
///
/// Generic over the backend; `S` may be `dyn Store` (see [`InstrumentedStore::boxed`]).
pub struct InstrumentedStore<S: ?Sized> {
    inner: Arc<S>,
    backend: &'static str,
    ops: Table,
}

impl<S: ?Sized> std::fmt::Debug for InstrumentedStore<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstrumentedStore")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl<S: Store + ?Sized> InstrumentedStore<S> {
    /// Wraps `inner`, labelling its measurements `backend` (`memory`, `redis`, ...).
    #[must_use]
    pub fn new(inner: Arc<S>, backend: &'static str, metrics: &Metrics) -> Self {
        Self {
            inner,
            backend,
            ops: Table::new(&metrics.store_ops, backend, STORE_OPS, STORE_OUTCOMES),
        }
    }

    /// The wrapped store.
    #[must_use]
    pub fn inner(&self) -> &Arc<S> {
        &self.inner
    }
}

impl InstrumentedStore<dyn Store> {
    /// Wraps a shared store chosen at run time and returns it shared again.
    #[must_use]
    pub fn boxed(
        inner: Arc<dyn Store>,
        backend: &'static str,
        metrics: &Metrics,
    ) -> Arc<dyn Store> {
        Arc::new(Self::new(inner, backend, metrics))
    }
}

const STORE_OPS: &[&str] = &[
    "create",
    "append",
    "append_keyed",
    "read",
    "subscribe",
    "get",
    "list",
    "start_attempt",
    "extend_attempt",
    "claim_overdue",
    "purge_closed",
    "ping",
];
/// `invalid_cursor` is the caller's mistake (a `list` cursor the store did not issue),
/// not a failing store: as `error` it fired `MarathonStoreErrors` on a client's bad input.
const STORE_OUTCOMES: &[&str] = &[
    "ok",
    "conflict",
    "not_found",
    "closed",
    "error",
    "invalid_cursor",
];
const QUEUE_OPS: &[&str] = &[
    "enqueue",
    "receive",
    "ack",
    "nack",
    "extend",
    "depth",
    "drain_dead_letters",
    "ping",
];
const QUEUE_OUTCOMES: &[&str] = &["ok", "invalid_receipt", "error"];

/// One histogram per (operation, outcome) of one backend, each resolved on first use:
/// the hot path then indexes an array instead of hashing label values, and the
/// exposition holds only series that were used.
struct Table {
    vec: ShardedHistogramVec,
    backend: &'static str,
    ops: &'static [&'static str],
    outcomes: &'static [&'static str],
    cells: Vec<OnceLock<ShardedHistogram>>,
}

impl Table {
    fn new(
        vec: &ShardedHistogramVec,
        backend: &'static str,
        ops: &'static [&'static str],
        outcomes: &'static [&'static str],
    ) -> Table {
        Table {
            vec: vec.clone(),
            backend,
            ops,
            outcomes,
            cells: (0..ops.len() * outcomes.len())
                .map(|_| OnceLock::new())
                .collect(),
        }
    }

    fn observe(&self, op: usize, outcome: usize, started: Instant) {
        let Some(cell) = self.cells.get(op * self.outcomes.len() + outcome) else {
            return;
        };
        cell.get_or_init(|| {
            self.vec
                .with_label_values(&[self.ops[op], self.backend, self.outcomes[outcome]])
        })
        .observe(started.elapsed().as_secs_f64());
    }
}

fn store_outcome<T>(r: &Result<T, StoreError>) -> usize {
    match r {
        Ok(_) => 0,
        Err(StoreError::Conflict { .. }) => 1,
        Err(StoreError::NotFound(_)) => 2,
        Err(StoreError::Closed(_)) => 3,
        Err(StoreError::InvalidCursor(_)) => 5,
        Err(_) => 4,
    }
}

fn queue_outcome<T>(r: &Result<T, QueueError>) -> usize {
    match r {
        Ok(_) => 0,
        Err(QueueError::InvalidReceipt) => 1,
        Err(_) => 2,
    }
}

macro_rules! timed_store {
    ($self:ident, $op:literal, $call:expr) => {{
        const OP: usize = match_op(STORE_OPS, $op);
        let started = Instant::now();
        let r = $call.await;
        $self.ops.observe(OP, store_outcome(&r), started);
        r
    }};
}

macro_rules! timed_queue {
    ($self:ident, $op:literal, $call:expr) => {{
        const OP: usize = match_op(QUEUE_OPS, $op);
        let started = Instant::now();
        let r = $call.await;
        $self.ops.observe(OP, queue_outcome(&r), started);
        r
    }};
}

/// The index of `op` in `ops`, at compile time (a typo fails the build).
const fn match_op(ops: &[&str], op: &str) -> usize {
    let mut i = 0;
    while i < ops.len() {
        if ops[i].len() == op.len() {
            let (a, b) = (ops[i].as_bytes(), op.as_bytes());
            let mut j = 0;
            while j < a.len() && a[j] == b[j] {
                j += 1;
            }
            if j == a.len() {
                return i;
            }
        }
        i += 1;
    }
    panic!("unknown operation")
}

#[async_trait]
impl<S: Store + ?Sized> Store for InstrumentedStore<S> {
    async fn create(&self, new: NewWorkflow) -> Result<Created, StoreError> {
        timed_store!(self, "create", self.inner.create(new))
    }

    async fn append(
        &self,
        id: &WorkflowId,
        expected_last: Seq,
        events: Vec<NewEvent>,
        owed: OwedChanges,
    ) -> Result<Seq, StoreError> {
        timed_store!(
            self,
            "append",
            self.inner.append(id, expected_last, events, owed)
        )
    }

    async fn append_keyed(
        &self,
        id: &WorkflowId,
        append: KeyedAppend,
    ) -> Result<KeyedOutcome, StoreError> {
        timed_store!(self, "append_keyed", self.inner.append_keyed(id, append))
    }

    async fn read(
        &self,
        id: &WorkflowId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        timed_store!(self, "read", self.inner.read(id, after, limit))
    }

    async fn subscribe(&self, id: &WorkflowId, after: Seq) -> Result<EventStream, StoreError> {
        // Times setting the subscription up, not the life of the stream.
        timed_store!(self, "subscribe", self.inner.subscribe(id, after))
    }

    async fn get(&self, id: &WorkflowId) -> Result<Option<WorkflowSummary>, StoreError> {
        timed_store!(self, "get", self.inner.get(id))
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        timed_store!(self, "list", self.inner.list(query))
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
        timed_store!(
            self,
            "start_attempt",
            self.inner
                .start_attempt(id, key, copy, now, deadline, redelivered)
        )
    }

    async fn extend_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        started: Timestamp,
        deadline: Timestamp,
    ) -> Result<AttemptExtend, StoreError> {
        timed_store!(
            self,
            "extend_attempt",
            self.inner.extend_attempt(id, key, copy, started, deadline)
        )
    }

    async fn claim_overdue(
        &self,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Owed>, StoreError> {
        timed_store!(
            self,
            "claim_overdue",
            self.inner.claim_overdue(now, lease, limit)
        )
    }

    async fn purge_closed(
        &self,
        closed_before: Timestamp,
        limit: usize,
    ) -> Result<usize, StoreError> {
        timed_store!(
            self,
            "purge_closed",
            self.inner.purge_closed(closed_before, limit)
        )
    }

    async fn ping(&self) -> Result<(), StoreError> {
        timed_store!(self, "ping", self.inner.ping())
    }
}

/// A [`Queue`] that records the latency of every call of the queue it wraps in
/// `marathon_queue_operation_seconds{operation, backend, outcome}`.
///
/// Generic over the backend; `Q` may be `dyn Queue` (see [`InstrumentedQueue::boxed`]).
pub struct InstrumentedQueue<Q: ?Sized> {
    inner: Arc<Q>,
    backend: &'static str,
    ops: Table,
}

impl<Q: ?Sized> std::fmt::Debug for InstrumentedQueue<Q> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstrumentedQueue")
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl<Q: Queue + ?Sized> InstrumentedQueue<Q> {
    /// Wraps `inner`, labelling its measurements `backend` (`memory`, `sqs`, `redis`, ...).
    #[must_use]
    pub fn new(inner: Arc<Q>, backend: &'static str, metrics: &Metrics) -> Self {
        Self {
            inner,
            backend,
            ops: Table::new(&metrics.queue_ops, backend, QUEUE_OPS, QUEUE_OUTCOMES),
        }
    }

    /// The wrapped queue.
    #[must_use]
    pub fn inner(&self) -> &Arc<Q> {
        &self.inner
    }
}

impl InstrumentedQueue<dyn Queue> {
    /// Wraps a shared queue chosen at run time and returns it shared again.
    #[must_use]
    pub fn boxed(
        inner: Arc<dyn Queue>,
        backend: &'static str,
        metrics: &Metrics,
    ) -> Arc<dyn Queue> {
        Arc::new(Self::new(inner, backend, metrics))
    }
}

#[async_trait]
impl<Q: Queue + ?Sized> Queue for InstrumentedQueue<Q> {
    async fn enqueue(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        timed_queue!(self, "enqueue", self.inner.enqueue(queue, messages))
    }

    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        timed_queue!(
            self,
            "receive",
            self.inner.receive(queue, max, wait, visibility)
        )
    }

    async fn ack(&self, queue: &str, receipts: Vec<Receipt>) -> Result<(), QueueError> {
        timed_queue!(self, "ack", self.inner.ack(queue, receipts))
    }

    async fn nack(
        &self,
        queue: &str,
        receipt: &Receipt,
        delay: Duration,
    ) -> Result<(), QueueError> {
        timed_queue!(self, "nack", self.inner.nack(queue, receipt, delay))
    }

    async fn extend(
        &self,
        queue: &str,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        timed_queue!(
            self,
            "extend",
            self.inner.extend(queue, receipt, visibility)
        )
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        timed_queue!(self, "depth", self.inner.depth(queue))
    }

    async fn drain_dead_letters(&self, queue: &str, max: usize) -> Result<Vec<Task>, QueueError> {
        timed_queue!(
            self,
            "drain_dead_letters",
            self.inner.drain_dead_letters(queue, max)
        )
    }

    fn max_message_bytes(&self) -> usize {
        self.inner.max_message_bytes()
    }

    fn finish_receive_when_stopping(&self) -> bool {
        self.inner.finish_receive_when_stopping()
    }

    fn is_in_process(&self) -> bool {
        self.inner.is_in_process()
    }

    fn check_task_queue(&self, task_queue: &str) -> Result<(), String> {
        self.inner.check_task_queue(task_queue)
    }

    async fn ping(&self) -> Result<(), QueueError> {
        timed_queue!(self, "ping", self.inner.ping())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use marathon_core::memory::MemoryStore;
    use marathon_core::store::{ListQuery, Store, StoreError};

    use super::InstrumentedStore;
    use crate::Metrics;

    /// A `list` cursor the store did not issue (a client's stale or made-up cursor, a 400
    /// from the API) is not a store failure: it was counted `outcome="error"`, which
    /// `MarathonStoreErrors` pages on.
    #[tokio::test]
    async fn a_bad_list_cursor_is_not_a_store_error() {
        let metrics = Metrics::new().expect("fresh registry");
        let store = InstrumentedStore::new(Arc::new(MemoryStore::default()), "memory", &metrics);
        let r = store
            .list(&ListQuery {
                cursor: Some("not a cursor".into()),
                ..ListQuery::default()
            })
            .await;
        assert!(matches!(r, Err(StoreError::InvalidCursor(_))), "{r:?}");
        let text = metrics.render();
        assert!(
            text.contains(
                r#"marathon_store_operation_seconds_count{backend="memory",operation="list",outcome="invalid_cursor"} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains(r#"outcome="error""#), "{text}");
    }
}
