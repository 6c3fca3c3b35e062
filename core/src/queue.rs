//! The `Queue` trait: at-least-once delivery of tasks between replicas.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::model::Task;
use crate::store::BoxError;

/// Errors of a [`Queue`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum QueueError {
    /// The receipt is unknown or expired (the message was delivered again elsewhere).
    #[error("unknown or expired receipt")]
    InvalidReceipt,
    /// The message is larger than the queue accepts.
    #[error("message of {size} bytes exceeds the limit of {limit}")]
    TooLarge {
        /// Serialized size.
        size: usize,
        /// The queue's limit.
        limit: usize,
    },
    /// The queue could not be reached; retryable.
    #[error("queue unreachable: {0}")]
    Unavailable(#[source] BoxError),
    /// The queue rejected the operation; permanent.
    #[error("queue rejected the operation: {0}")]
    Backend(#[source] BoxError),
}

impl QueueError {
    /// Whether trying the same operation again later may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, QueueError::Unavailable(_))
    }
}

/// Identifies one delivery of a message, for ack, nack and extend.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Receipt(pub String);

/// A message to enqueue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutgoingMessage {
    /// The task.
    pub task: Task,
    /// Deliver no sooner than this.
    pub delay: Duration,
    /// W3C `traceparent` of the span that sent it.
    pub trace_context: Option<String>,
}

impl OutgoingMessage {
    /// A message delivered as soon as possible, without trace context.
    #[must_use]
    pub fn now(task: Task) -> Self {
        Self {
            task,
            delay: Duration::ZERO,
            trace_context: None,
        }
    }

    /// The same message carrying `trace_context` (a W3C `traceparent`), when it has
    /// one to carry; [`OutgoingMessage::now`] leaves it to the engine to fill in from
    /// the current span.
    #[must_use]
    pub fn traced(mut self, trace_context: Option<String>) -> Self {
        self.trace_context = trace_context;
        self
    }

    /// The same message delivered after `delay`.
    #[must_use]
    pub fn delayed(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// One delivery of a message.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Receipt for ack, nack and extend.
    pub receipt: Receipt,
    /// The task.
    pub task: Task,
    /// How many times this message has been received, this time included.
    pub receive_count: u32,
    /// W3C `traceparent` it was sent with.
    pub trace_context: Option<String>,
}

/// At-least-once task delivery between replicas, over named queues.
///
/// A received message stays invisible for its visibility timeout; if it is
/// neither acked nor extended by then, it is delivered again. A message received
/// more often than the queue's configured maximum goes to its dead-letter queue.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// Enqueues `messages` on `queue`, each after its delay.
    async fn enqueue(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<(), QueueError>;

    /// Receives up to `max` messages, waiting up to `wait` for the first; each
    /// stays invisible for `visibility`.
    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError>;

    /// Deletes delivered messages for good.
    async fn ack(&self, queue: &str, receipts: Vec<Receipt>) -> Result<(), QueueError>;

    /// Hands a delivery back, to be delivered again after `delay`.
    async fn nack(&self, queue: &str, receipt: &Receipt, delay: Duration)
    -> Result<(), QueueError>;

    /// Keeps a delivery invisible for `visibility` from now (a heartbeat).
    async fn extend(
        &self,
        queue: &str,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError>;

    /// Approximate number of messages waiting (visible or delayed) on `queue`.
    async fn depth(&self, queue: &str) -> Result<u64, QueueError>;

    /// Takes up to `max` dead-lettered messages off `queue`'s dead-letter queue, for reporting.
    async fn drain_dead_letters(&self, queue: &str, max: usize) -> Result<Vec<Task>, QueueError>;

    /// Largest serialized message the queue accepts, in bytes.
    fn max_message_bytes(&self) -> usize {
        256 * 1024
    }

    /// Whether the queue lives in this process, so its calls cannot fail for a while
    /// and then succeed: the engine keeps no copy of a send to try it again.
    /// `false` (the default) for a remote queue.
    fn is_in_process(&self) -> bool {
        false
    }

    /// Checks that the queue can carry the tasks of task queue `task_queue` (SQS
    /// refuses some names on every send), so that a start on one it cannot carry is
    /// refused before anything is recorded. `Ok` (the default) for a queue that takes
    /// any name.
    ///
    /// # Errors
    /// Why the queue cannot carry it, naming the rule.
    fn check_task_queue(&self, _task_queue: &str) -> Result<(), String> {
        Ok(())
    }

    /// Whether a [`Queue::receive`] dropped before it returns may still take messages
    /// (an SQS long poll goes on at the server and hides what it is handed for a whole
    /// visibility): a stopping worker then lets its poll finish and hands back what
    /// it brings, instead of dropping it. `false` (the default) lets it drop the poll.
    fn finish_receive_when_stopping(&self) -> bool {
        false
    }

    /// Checks that the queue answers.
    async fn ping(&self) -> Result<(), QueueError>;
}
