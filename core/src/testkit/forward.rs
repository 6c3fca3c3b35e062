//! A queue and a store that pass every call on to another backend, so that a test
//! (or a bench) that breaks, delays or counts some calls writes only those.
//!
//! A wrapper written by hand has to repeat every trait method, and one that forgets
//! a provided method (`is_in_process`, `check_task_queue`, ...) silently answers
//! with the trait's default instead of its backend's. Here every method, provided
//! ones included, forwards unless the wrapper overrides it.
//!
//! ```ignore
//! struct FailingDepth(MemoryQueue);
//!
//! #[async_trait]
//! impl ForwardingQueue for FailingDepth {
//!     fn inner(&self) -> &dyn Queue { &self.0 }
//!     async fn depth(&self, _: &str) -> Result<u64, QueueError> {
//!         Err(QueueError::Unavailable("down".into()))
//!     }
//! }
//! // `FailingDepth` is a `Queue`: `Arc::new(FailingDepth(q)) as Arc<dyn Queue>`.
//! ```
//!
//! A type that implements both traits has each method twice by name; with both
//! traits in scope, call it through the trait (`Queue::depth(&q, ..)`), or through an
//! `Arc<dyn Queue>`.

use std::time::Duration;

use async_trait::async_trait;

use crate::model::{Event, NewEvent, Seq, Task, Timestamp, WorkflowId, WorkflowSummary};
use crate::queue::{Delivery, OutgoingMessage, Queue, QueueError, Receipt};
use crate::store::{
    AttemptExtend, AttemptStart, Created, EventStream, KeyedAppend, KeyedOutcome, ListPage,
    ListQuery, NewWorkflow, Owed, OwedChanges, Store, StoreError,
};

/// A [`Queue`] that passes every call it does not override on to [`ForwardingQueue::inner`].
#[async_trait]
pub trait ForwardingQueue: Send + Sync + 'static {
    /// The queue calls go on to.
    fn inner(&self) -> &dyn Queue;

    /// [`Queue::enqueue`].
    async fn enqueue(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        self.inner().enqueue(queue, messages).await
    }

    /// [`Queue::receive`].
    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        self.inner().receive(queue, max, wait, visibility).await
    }

    /// [`Queue::ack`].
    async fn ack(&self, queue: &str, receipts: Vec<Receipt>) -> Result<(), QueueError> {
        self.inner().ack(queue, receipts).await
    }

    /// [`Queue::nack`].
    async fn nack(
        &self,
        queue: &str,
        receipt: &Receipt,
        delay: Duration,
    ) -> Result<(), QueueError> {
        self.inner().nack(queue, receipt, delay).await
    }

    /// [`Queue::extend`].
    async fn extend(
        &self,
        queue: &str,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        self.inner().extend(queue, receipt, visibility).await
    }

    /// [`Queue::depth`].
    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        self.inner().depth(queue).await
    }

    /// [`Queue::drain_dead_letters`].
    async fn drain_dead_letters(&self, queue: &str, max: usize) -> Result<Vec<Task>, QueueError> {
        self.inner().drain_dead_letters(queue, max).await
    }

    /// [`Queue::max_message_bytes`].
    fn max_message_bytes(&self) -> usize {
        self.inner().max_message_bytes()
    }

    /// [`Queue::is_in_process`].
    fn is_in_process(&self) -> bool {
        self.inner().is_in_process()
    }

    /// [`Queue::check_task_queue`].
    ///
    /// # Errors
    /// As the inner queue's.
    fn check_task_queue(&self, task_queue: &str) -> Result<(), String> {
        self.inner().check_task_queue(task_queue)
    }

    /// [`Queue::finish_receive_when_stopping`].
    fn finish_receive_when_stopping(&self) -> bool {
        self.inner().finish_receive_when_stopping()
    }

    /// [`Queue::ping`].
    async fn ping(&self) -> Result<(), QueueError> {
        self.inner().ping().await
    }
}

#[async_trait]
impl<T: ForwardingQueue> Queue for T {
    async fn enqueue(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        ForwardingQueue::enqueue(self, queue, messages).await
    }
    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        ForwardingQueue::receive(self, queue, max, wait, visibility).await
    }
    async fn ack(&self, queue: &str, receipts: Vec<Receipt>) -> Result<(), QueueError> {
        ForwardingQueue::ack(self, queue, receipts).await
    }
    async fn nack(
        &self,
        queue: &str,
        receipt: &Receipt,
        delay: Duration,
    ) -> Result<(), QueueError> {
        ForwardingQueue::nack(self, queue, receipt, delay).await
    }
    async fn extend(
        &self,
        queue: &str,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        ForwardingQueue::extend(self, queue, receipt, visibility).await
    }
    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        ForwardingQueue::depth(self, queue).await
    }
    async fn drain_dead_letters(&self, queue: &str, max: usize) -> Result<Vec<Task>, QueueError> {
        ForwardingQueue::drain_dead_letters(self, queue, max).await
    }
    fn max_message_bytes(&self) -> usize {
        ForwardingQueue::max_message_bytes(self)
    }
    fn is_in_process(&self) -> bool {
        ForwardingQueue::is_in_process(self)
    }
    fn check_task_queue(&self, task_queue: &str) -> Result<(), String> {
        ForwardingQueue::check_task_queue(self, task_queue)
    }
    fn finish_receive_when_stopping(&self) -> bool {
        ForwardingQueue::finish_receive_when_stopping(self)
    }
    async fn ping(&self) -> Result<(), QueueError> {
        ForwardingQueue::ping(self).await
    }
}

/// A [`Store`] that passes every call it does not override on to [`ForwardingStore::inner`].
#[async_trait]
pub trait ForwardingStore: Send + Sync + 'static {
    /// The store calls go on to.
    fn inner(&self) -> &dyn Store;

    /// [`Store::create`].
    async fn create(&self, new: NewWorkflow) -> Result<Created, StoreError> {
        self.inner().create(new).await
    }

    /// [`Store::append`].
    async fn append(
        &self,
        id: &WorkflowId,
        expected_last: Seq,
        events: Vec<NewEvent>,
        owed: OwedChanges,
    ) -> Result<Seq, StoreError> {
        self.inner().append(id, expected_last, events, owed).await
    }

    /// [`Store::append_keyed`].
    async fn append_keyed(
        &self,
        id: &WorkflowId,
        append: KeyedAppend,
    ) -> Result<KeyedOutcome, StoreError> {
        self.inner().append_keyed(id, append).await
    }

    /// [`Store::read`].
    async fn read(
        &self,
        id: &WorkflowId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.inner().read(id, after, limit).await
    }

    /// [`Store::subscribe`].
    async fn subscribe(&self, id: &WorkflowId, after: Seq) -> Result<EventStream, StoreError> {
        self.inner().subscribe(id, after).await
    }

    /// [`Store::get`].
    async fn get(&self, id: &WorkflowId) -> Result<Option<WorkflowSummary>, StoreError> {
        self.inner().get(id).await
    }

    /// [`Store::list`].
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        self.inner().list(query).await
    }

    /// [`Store::start_attempt`].
    async fn start_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        now: Timestamp,
        deadline: Timestamp,
        redelivered: bool,
    ) -> Result<AttemptStart, StoreError> {
        self.inner()
            .start_attempt(id, key, copy, now, deadline, redelivered)
            .await
    }

    /// [`Store::extend_attempt`].
    async fn extend_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        started: Timestamp,
        deadline: Timestamp,
    ) -> Result<AttemptExtend, StoreError> {
        self.inner()
            .extend_attempt(id, key, copy, started, deadline)
            .await
    }

    /// [`Store::claim_overdue`].
    async fn claim_overdue(
        &self,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Owed>, StoreError> {
        self.inner().claim_overdue(now, lease, limit).await
    }

    /// [`Store::purge_closed`].
    async fn purge_closed(
        &self,
        closed_before: Timestamp,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.inner().purge_closed(closed_before, limit).await
    }

    /// [`Store::ping`].
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner().ping().await
    }
}

#[async_trait]
impl<T: ForwardingStore> Store for T {
    async fn create(&self, new: NewWorkflow) -> Result<Created, StoreError> {
        ForwardingStore::create(self, new).await
    }
    async fn append(
        &self,
        id: &WorkflowId,
        expected_last: Seq,
        events: Vec<NewEvent>,
        owed: OwedChanges,
    ) -> Result<Seq, StoreError> {
        ForwardingStore::append(self, id, expected_last, events, owed).await
    }
    async fn append_keyed(
        &self,
        id: &WorkflowId,
        append: KeyedAppend,
    ) -> Result<KeyedOutcome, StoreError> {
        ForwardingStore::append_keyed(self, id, append).await
    }
    async fn read(
        &self,
        id: &WorkflowId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        ForwardingStore::read(self, id, after, limit).await
    }
    async fn subscribe(&self, id: &WorkflowId, after: Seq) -> Result<EventStream, StoreError> {
        ForwardingStore::subscribe(self, id, after).await
    }
    async fn get(&self, id: &WorkflowId) -> Result<Option<WorkflowSummary>, StoreError> {
        ForwardingStore::get(self, id).await
    }
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        ForwardingStore::list(self, query).await
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
        ForwardingStore::start_attempt(self, id, key, copy, now, deadline, redelivered).await
    }
    async fn extend_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        started: Timestamp,
        deadline: Timestamp,
    ) -> Result<AttemptExtend, StoreError> {
        ForwardingStore::extend_attempt(self, id, key, copy, started, deadline).await
    }
    async fn claim_overdue(
        &self,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Owed>, StoreError> {
        ForwardingStore::claim_overdue(self, now, lease, limit).await
    }
    async fn purge_closed(
        &self,
        closed_before: Timestamp,
        limit: usize,
    ) -> Result<usize, StoreError> {
        ForwardingStore::purge_closed(self, closed_before, limit).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        ForwardingStore::ping(self).await
    }
}
