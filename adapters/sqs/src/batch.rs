//! Coalescing of single sends and deletes from concurrent callers into SQS
//! batch requests (SendMessageBatch, DeleteMessageBatch).
//!
//! A worker acks each task on its own and the engine enqueues one follow-up
//! task at a time, so without this every message costs its own request. A
//! [`Batcher`] serves one queue URL and one operation: callers hand it entries
//! and await their own outcome; a background task takes the first waiting
//! entry, waits for a free request slot, then fills the batch with whatever
//! else is waiting, for at most `window` (up to ten entries and the byte
//! limit), and sends it. Under load batches fill at once; when idle, an entry
//! waits at most `window`. The task ends when the [`Batcher`] is dropped.

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use marathon_core::QueueError;
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::time::Instant;

use crate::error::{SqsError, is_missing_queue};

/// Most entries of one batch request.
pub(crate) const MAX_BATCH: usize = 10;

/// A cloneable outcome of one entry, turned into a [`QueueError`] per waiter.
#[derive(Debug, Clone)]
pub(crate) enum Failure {
    /// The receipt is unknown or expired.
    InvalidReceipt,
    /// Retryable: unreachable, throttled, 5xx.
    Unavailable(String),
    /// Permanent.
    Backend(String),
    /// The queue does not exist (any more).
    MissingQueue(String),
}

impl Failure {
    /// Keeps what callers match on from `e`: its class and its message.
    pub(crate) fn of(e: &QueueError) -> Self {
        match e {
            QueueError::InvalidReceipt => Failure::InvalidReceipt,
            QueueError::Unavailable(_) => Failure::Unavailable(e.to_string()),
            e if is_missing_queue(e) => Failure::MissingQueue(e.to_string()),
            e => Failure::Backend(e.to_string()),
        }
    }

    /// The error a caller sees.
    pub(crate) fn into_error(self, op: &'static str) -> QueueError {
        match self {
            Failure::InvalidReceipt => QueueError::InvalidReceipt,
            Failure::Unavailable(m) => QueueError::Unavailable(Box::new(SqsError::new(op, m))),
            Failure::Backend(m) => QueueError::Backend(Box::new(SqsError::new(op, m))),
            Failure::MissingQueue(m) => {
                QueueError::Backend(Box::new(SqsError::missing_queue(op, m)))
            }
        }
    }
}

/// Sends one batch; returns one outcome per entry, in order.
pub(crate) type FlushFn<E> =
    Arc<dyn Fn(Vec<E>) -> BoxFuture<'static, Vec<Result<(), Failure>>> + Send + Sync>;

struct Item<E> {
    entry: E,
    size: usize,
    done: oneshot::Sender<Result<(), Failure>>,
}

/// Coalesces entries for one queue URL and one batch operation.
pub(crate) struct Batcher<E> {
    tx: mpsc::UnboundedSender<Item<E>>,
}

impl<E: Send + 'static> Batcher<E> {
    /// Starts the background task on the current tokio runtime. At most
    /// `in_flight` requests run at once; a batch holds at most `max_bytes`.
    pub(crate) fn start(
        flush: FlushFn<E>,
        window: Duration,
        in_flight: usize,
        max_bytes: usize,
    ) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, flush, window, in_flight.max(1), max_bytes));
        Self { tx }
    }

    /// Whether the background task has stopped (its runtime shut down); a
    /// stopped batcher answers every entry with [`Failure::Unavailable`].
    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Hands `entry` (of `size` bytes) to the next batch; resolves when its request is answered.
    pub(crate) fn submit(
        &self,
        entry: E,
        size: usize,
    ) -> impl Future<Output = Result<(), Failure>> + Send + 'static {
        let (done, rx) = oneshot::channel();
        let sent = self.tx.send(Item { entry, size, done });
        async move {
            if sent.is_err() {
                return Err(Failure::Unavailable("batcher stopped".into()));
            }
            rx.await
                .unwrap_or_else(|_| Err(Failure::Unavailable("batch request dropped".into())))
        }
    }
}

async fn run<E: Send + 'static>(
    mut rx: mpsc::UnboundedReceiver<Item<E>>,
    flush: FlushFn<E>,
    window: Duration,
    in_flight: usize,
    max_bytes: usize,
) {
    let slots = Arc::new(Semaphore::new(in_flight));
    let mut carry: Option<Item<E>> = None;
    loop {
        let first = match carry.take() {
            Some(i) => i,
            None => match rx.recv().await {
                Some(i) => i,
                None => return,
            },
        };
        let deadline = Instant::now() + window;
        // Waiting for a slot first lets entries pile up meanwhile: fuller batches under load.
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let mut size = first.size;
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            let next = match rx.try_recv() {
                Ok(i) => Some(i),
                Err(_) if window.is_zero() => None,
                Err(_) => tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten(),
            };
            let Some(item) = next else { break };
            if size + item.size > max_bytes {
                carry = Some(item);
                break;
            }
            size += item.size;
            batch.push(item);
        }
        let flush = flush.clone();
        tokio::spawn(async move {
            let (entries, dones): (Vec<E>, Vec<_>) =
                batch.into_iter().map(|i| (i.entry, i.done)).unzip();
            let results = flush(entries).await;
            let mut results = results.into_iter();
            for done in dones {
                let r = results
                    .next()
                    .unwrap_or_else(|| Err(Failure::Backend("no result for a batch entry".into())));
                let _ = done.send(r);
            }
            drop(slot);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    #[tokio::test(start_paused = true)]
    async fn concurrent_entries_share_requests_and_get_their_own_outcome() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let s = sizes.clone();
        let flush: FlushFn<u32> = Arc::new(move |entries: Vec<u32>| {
            s.lock().push(entries.len());
            Box::pin(async move {
                tokio::time::sleep(Duration::from_millis(10)).await;
                entries
                    .into_iter()
                    .map(|e| {
                        if e == 13 {
                            Err(Failure::InvalidReceipt)
                        } else {
                            Ok(())
                        }
                    })
                    .collect()
            })
        });
        let b = Batcher::start(flush, Duration::from_millis(5), 1, 1000);
        let waits: Vec<_> = (0..25).map(|i| b.submit(i, 1)).collect();
        let results = futures::future::join_all(waits).await;
        assert!(matches!(results[13], Err(Failure::InvalidReceipt)));
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 24);
        assert_eq!(*sizes.lock(), vec![10, 10, 5]);
    }

    #[tokio::test(start_paused = true)]
    async fn byte_limit_cuts_batches_and_a_lone_entry_waits_one_window() {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let s = sizes.clone();
        let flush: FlushFn<u32> = Arc::new(move |entries: Vec<u32>| {
            s.lock().push(entries.len());
            Box::pin(async move { entries.iter().map(|_| Ok(())).collect() })
        });
        let b = Batcher::start(flush, Duration::from_millis(5), 4, 100);
        let waits: Vec<_> = (0..4).map(|i| b.submit(i, 40)).collect();
        futures::future::join_all(waits).await;
        assert_eq!(*sizes.lock(), vec![2, 2]);
        let t0 = Instant::now();
        b.submit(9, 1).await.expect("flushed");
        assert_eq!(t0.elapsed(), Duration::from_millis(5));
    }

    #[test]
    fn a_batcher_started_on_a_finished_runtime_reports_closed() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let flush: FlushFn<u32> =
            Arc::new(|e: Vec<u32>| Box::pin(async move { e.iter().map(|_| Ok(())).collect() }));
        let b = rt.block_on(async { Batcher::start(flush, Duration::ZERO, 1, 10) });
        assert!(!b.is_closed());
        drop(rt);
        assert!(b.is_closed());
    }
}
