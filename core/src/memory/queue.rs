//! [`MemoryQueue`]: the in-memory [`Queue`].

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::model::Task;
use crate::queue::{Delivery, OutgoingMessage, Queue, QueueError, Receipt};

/// `now + d`, capped at a century: a delay, wait or visibility of any length is
/// accepted (as by SQS, which caps them), never an `Instant` overflow.
fn later(now: Instant, d: Duration) -> Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    now + d.min(CENTURY)
}

/// Stale heap entries tolerated before a heap is compacted.
const COMPACT_SLACK: usize = 1024;

/// Configuration of a [`MemoryQueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryQueueConfig {
    /// Deliveries of one message before it goes to the dead-letter list; 0 never
    /// dead-letters. Default 5.
    pub max_receives: u32,
}

impl Default for MemoryQueueConfig {
    fn default() -> Self {
        Self { max_receives: 5 }
    }
}

/// The in-memory [`Queue`]: named queues, created on first use, in one process.
///
/// Each named queue has its own lock; receivers wait on a [`Notify`] and a timer
/// (tokio time, so paused-clock tests work), never by polling.
pub struct MemoryQueue {
    cfg: MemoryQueueConfig,
    queues: RwLock<HashMap<String, Arc<NamedQueue>>>,
    /// Message ids and delivery ids, unique across all queues.
    next_id: AtomicU64,
    /// The task queues this process's workers serve, when known ([`MemoryQueue::serving`]).
    served: Option<Vec<String>>,
}

impl MemoryQueue {
    /// A queue with `cfg`.
    #[must_use]
    pub fn new(cfg: MemoryQueueConfig) -> Self {
        Self {
            cfg,
            queues: RwLock::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            served: None,
        }
    }

    /// Declares the task queues this process's workers serve: no other process
    /// reaches an in-memory queue, so [`Queue::check_task_queue`] refuses any other
    /// (a workflow started on one would never run, an activity called on one would
    /// never start). Without it every name is taken.
    #[must_use]
    pub fn serving<I, S>(mut self, task_queues: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.served = Some(task_queues.into_iter().map(Into::into).collect());
        self
    }

    fn named(&self, name: &str) -> Arc<NamedQueue> {
        if let Some(q) = self.queues.read().get(name) {
            return q.clone();
        }
        self.queues
            .write()
            .entry(name.to_string())
            .or_insert_with(|| {
                Arc::new(NamedQueue {
                    state: Mutex::new(QueueState::new(self.cfg.max_receives)),
                    notify: Notify::new(),
                })
            })
            .clone()
    }

    fn id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }
}

impl Default for MemoryQueue {
    fn default() -> Self {
        Self::new(MemoryQueueConfig::default())
    }
}

impl std::fmt::Debug for MemoryQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryQueue")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

struct NamedQueue {
    state: Mutex<QueueState>,
    notify: Notify,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Ready,
    Delayed(Instant),
    InFlight { until: Instant, delivery: u64 },
}

struct Message {
    task: Task,
    trace_context: Option<String>,
    receive_count: u32,
    phase: Phase,
    /// The delivery whose receipt may still ack it (0: none).
    last_delivery: u64,
}

struct QueueState {
    max_receives: u32,
    messages: HashMap<u64, Message>,
    /// Ids of ready messages, oldest first (entries of acked messages are skipped).
    ready: VecDeque<u64>,
    /// Delayed messages by due time; entries that no longer match are skipped.
    delayed: BinaryHeap<Reverse<(Instant, u64)>>,
    /// In-flight messages by visibility expiry; entries that no longer match are skipped.
    in_flight: BinaryHeap<Reverse<(Instant, u64)>>,
    in_flight_count: usize,
    delayed_count: usize,
    dead: VecDeque<Task>,
    /// The latest time a receiver that went to sleep since the last wake-up of all
    /// of them wakes at (it may have woken since): a delivery whose visibility ends
    /// before it must wake them, or the message waits out their whole wait.
    sleeping_until: Option<Instant>,
}

fn parse_receipt(r: &Receipt) -> Option<(u64, u64)> {
    let (id, delivery) = r.0.split_once('.')?;
    Some((id.parse().ok()?, delivery.parse().ok()?))
}

impl QueueState {
    fn new(max_receives: u32) -> Self {
        Self {
            max_receives,
            messages: HashMap::new(),
            ready: VecDeque::new(),
            delayed: BinaryHeap::new(),
            in_flight: BinaryHeap::new(),
            in_flight_count: 0,
            delayed_count: 0,
            dead: VecDeque::new(),
            sleeping_until: None,
        }
    }

    /// Notes that a delivery's visibility now ends at `until`; returns whether the
    /// sleeping receivers must be woken to wait for it (they then sleep again).
    fn expires_at(&mut self, until: Instant) -> bool {
        let wake = self.sleeping_until.is_some_and(|s| s > until);
        if wake {
            self.sleeping_until = None;
        }
        wake
    }

    /// Makes message `id` ready, or dead-letters it if it was received too often.
    /// Returns whether it became ready.
    fn make_ready(&mut self, id: u64) -> bool {
        let Some(m) = self.messages.get_mut(&id) else {
            return false;
        };
        if self.max_receives > 0 && m.receive_count >= self.max_receives {
            if let Some(m) = self.messages.remove(&id) {
                self.dead.push_back(m.task);
            }
            return false;
        }
        m.phase = Phase::Ready;
        self.ready.push_back(id);
        true
    }

    /// Moves due delayed messages and expired deliveries to ready; returns how many became ready.
    fn promote(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(&Reverse((t, id))) = self.delayed.peek() {
            if t > now {
                break;
            }
            self.delayed.pop();
            if self
                .messages
                .get(&id)
                .is_some_and(|m| m.phase == Phase::Delayed(t))
            {
                self.delayed_count -= 1;
                n += usize::from(self.make_ready(id));
            }
        }
        while let Some(&Reverse((t, id))) = self.in_flight.peek() {
            if t > now {
                break;
            }
            self.in_flight.pop();
            if self
                .messages
                .get(&id)
                .is_some_and(|m| matches!(m.phase, Phase::InFlight { until, .. } if until == t))
            {
                self.in_flight_count -= 1;
                n += usize::from(self.make_ready(id));
            }
        }
        n
    }

    /// When the next delayed message is due or delivery expires (perhaps earlier).
    fn next_wake(&self) -> Option<Instant> {
        let d = self.delayed.peek().map(|Reverse((t, _))| *t);
        let f = self.in_flight.peek().map(|Reverse((t, _))| *t);
        match (d, f) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn delay(&mut self, id: u64, until: Instant) {
        if let Some(m) = self.messages.get_mut(&id) {
            m.phase = Phase::Delayed(until);
            self.delayed.push(Reverse((until, id)));
            self.delayed_count += 1;
        }
    }

    /// The message of a live delivery: in flight under `receipt` and not expired.
    fn live(&mut self, receipt: &Receipt, now: Instant) -> Option<(u64, &mut Message)> {
        let (id, delivery) = parse_receipt(receipt)?;
        let m = self.messages.get_mut(&id)?;
        match m.phase {
            Phase::InFlight { until, delivery: d } if d == delivery && until > now => Some((id, m)),
            _ => None,
        }
    }

    /// Drops stale heap entries once they outnumber live ones (acks leave them behind).
    fn compact(&mut self) {
        if self.in_flight.len() > 2 * self.in_flight_count + COMPACT_SLACK {
            let messages = &self.messages;
            self.in_flight.retain(|Reverse((t, id))| {
                messages.get(id).is_some_and(
                    |m| matches!(m.phase, Phase::InFlight { until, .. } if until == *t),
                )
            });
        }
        if self.delayed.len() > 2 * self.delayed_count + COMPACT_SLACK {
            let messages = &self.messages;
            self.delayed.retain(|Reverse((t, id))| {
                messages
                    .get(id)
                    .is_some_and(|m| m.phase == Phase::Delayed(*t))
            });
        }
    }
}

#[async_trait]
impl Queue for MemoryQueue {
    fn is_in_process(&self) -> bool {
        true
    }

    fn check_task_queue(&self, task_queue: &str) -> Result<(), String> {
        match &self.served {
            Some(served) if !served.iter().any(|q| q == task_queue) => Err(format!(
                "no worker serves it (this process serves {}; with the in-memory queue no other process can)",
                served
                    .iter()
                    .map(|q| format!("{q:?}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            _ => Ok(()),
        }
    }

    async fn enqueue(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        let q = self.named(queue);
        let now = Instant::now();
        let (mut ready, mut delayed) = (0usize, false);
        {
            let mut st = q.state.lock();
            for m in messages {
                let id = self.id();
                st.messages.insert(
                    id,
                    Message {
                        task: m.task,
                        trace_context: m.trace_context,
                        receive_count: 0,
                        phase: Phase::Ready,
                        last_delivery: 0,
                    },
                );
                if m.delay.is_zero() {
                    st.ready.push_back(id);
                    ready += 1;
                } else {
                    st.delay(id, later(now, m.delay));
                    delayed = true;
                }
            }
        }
        if delayed {
            // Sleeping receivers recompute when to wake.
            q.notify.notify_waiters();
        }
        for _ in 0..ready {
            q.notify.notify_one();
        }
        Ok(())
    }

    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let q = self.named(queue);
        let deadline = later(Instant::now(), wait);
        loop {
            let notified = q.notify.notified();
            tokio::pin!(notified);
            // Registered before the state is checked, so no enqueue is missed.
            notified.as_mut().enable();
            let now = Instant::now();
            let until = later(now, visibility);
            let mut out = Vec::new();
            let (sleep_until, leftover, wake_sleepers) = {
                let mut st = q.state.lock();
                st.promote(now);
                while out.len() < max {
                    let Some(id) = st.ready.pop_front() else {
                        break;
                    };
                    let delivery = self.id();
                    let Some(m) = st.messages.get_mut(&id) else {
                        continue;
                    };
                    if m.phase != Phase::Ready {
                        continue;
                    }
                    m.receive_count += 1;
                    m.phase = Phase::InFlight { until, delivery };
                    m.last_delivery = delivery;
                    out.push(Delivery {
                        receipt: Receipt(format!("{id}.{delivery}")),
                        task: m.task.clone(),
                        receive_count: m.receive_count,
                        trace_context: m.trace_context.clone(),
                    });
                    st.in_flight.push(Reverse((until, id)));
                    st.in_flight_count += 1;
                }
                let wake_sleepers = !out.is_empty() && st.expires_at(until);
                let sleep_until = st.next_wake().map_or(deadline, |w| w.min(deadline));
                if out.is_empty() && max > 0 && now < deadline {
                    st.sleeping_until = st.sleeping_until.max(Some(sleep_until));
                }
                (sleep_until, !st.ready.is_empty(), wake_sleepers)
            };
            if wake_sleepers {
                q.notify.notify_waiters();
            }
            if !out.is_empty() {
                if leftover {
                    q.notify.notify_one();
                }
                return Ok(out);
            }
            if max == 0 || now >= deadline {
                return Ok(out);
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(sleep_until) => {}
            }
        }
    }

    async fn ack(&self, queue: &str, receipts: Vec<Receipt>) -> Result<(), QueueError> {
        let q = self.named(queue);
        let mut st = q.state.lock();
        for r in &receipts {
            let Some((id, delivery)) = parse_receipt(r) else {
                continue;
            };
            // A delivery that expired but was not delivered again may still be acked.
            let Some(m) = st.messages.get(&id) else {
                continue;
            };
            if m.last_delivery != delivery || delivery == 0 {
                continue;
            }
            let phase = m.phase;
            st.messages.remove(&id);
            match phase {
                Phase::InFlight { .. } => st.in_flight_count -= 1,
                Phase::Delayed(_) => st.delayed_count -= 1,
                Phase::Ready => {}
            }
        }
        st.compact();
        Ok(())
    }

    async fn nack(
        &self,
        queue: &str,
        receipt: &Receipt,
        delay: Duration,
    ) -> Result<(), QueueError> {
        let q = self.named(queue);
        let now = Instant::now();
        let ready = {
            let mut st = q.state.lock();
            let (id, m) = st.live(receipt, now).ok_or(QueueError::InvalidReceipt)?;
            // The receipt is spent: it can no longer ack the message.
            m.last_delivery = 0;
            st.in_flight_count -= 1;
            let ready = if delay.is_zero() {
                st.make_ready(id)
            } else {
                st.delay(id, later(now, delay));
                false
            };
            st.compact();
            ready
        };
        if ready {
            q.notify.notify_one();
        } else {
            q.notify.notify_waiters();
        }
        Ok(())
    }

    async fn extend(
        &self,
        queue: &str,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        let q = self.named(queue);
        let now = Instant::now();
        let wake_sleepers = {
            let mut st = q.state.lock();
            let (id, m) = st.live(receipt, now).ok_or(QueueError::InvalidReceipt)?;
            let Phase::InFlight { delivery, .. } = m.phase else {
                return Err(QueueError::InvalidReceipt);
            };
            let until = later(now, visibility);
            m.phase = Phase::InFlight { until, delivery };
            st.in_flight.push(Reverse((until, id)));
            st.compact();
            st.expires_at(until)
        };
        if wake_sleepers {
            q.notify.notify_waiters();
        }
        Ok(())
    }

    async fn depth(&self, queue: &str) -> Result<u64, QueueError> {
        let q = self.named(queue);
        let mut st = q.state.lock();
        st.promote(Instant::now());
        let waiting = st.messages.len() - st.in_flight_count;
        Ok(u64::try_from(waiting).unwrap_or(u64::MAX))
    }

    async fn drain_dead_letters(&self, queue: &str, max: usize) -> Result<Vec<Task>, QueueError> {
        let q = self.named(queue);
        let mut st = q.state.lock();
        st.promote(Instant::now());
        let n = max.min(st.dead.len());
        Ok(st.dead.drain(..n).collect())
    }

    async fn ping(&self) -> Result<(), QueueError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WorkflowId;

    fn task() -> Task {
        Task::workflow(WorkflowId::random())
    }

    fn queue(max_receives: u32) -> Arc<MemoryQueue> {
        Arc::new(MemoryQueue::new(MemoryQueueConfig { max_receives }))
    }

    const S: Duration = Duration::from_secs(1);

    #[tokio::test(start_paused = true)]
    async fn receive_waits_for_an_enqueue_without_polling() {
        let q = queue(5);
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.receive("a", 10, 60 * S, 30 * S).await })
        };
        tokio::time::sleep(5 * S).await;
        let started = Instant::now();
        let t = task();
        q.enqueue("a", vec![OutgoingMessage::now(t.clone())])
            .await
            .unwrap();
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].task, t);
        assert_eq!(started.elapsed(), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_and_expired_messages_wake_sleeping_receivers() {
        let q = queue(5);
        let started = Instant::now();
        q.enqueue("a", vec![OutgoingMessage::now(task()).delayed(3 * S)])
            .await
            .unwrap();
        let got = q.receive("a", 10, 60 * S, 2 * S).await.unwrap();
        assert_eq!((got.len(), started.elapsed()), (1, 3 * S));
        let got = q.receive("a", 10, 60 * S, 2 * S).await.unwrap();
        assert_eq!((got[0].receive_count, started.elapsed()), (2, 5 * S));
        // A shorter delay enqueued while a receiver sleeps wakes it on time.
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.receive("b", 10, 60 * S, 2 * S).await })
        };
        tokio::task::yield_now().await;
        q.enqueue("b", vec![OutgoingMessage::now(task()).delayed(S)])
            .await
            .unwrap();
        let before = Instant::now();
        assert_eq!(waiter.await.unwrap().unwrap().len(), 1);
        assert_eq!(before.elapsed(), S);
    }

    #[tokio::test(start_paused = true)]
    async fn receipts_expire_and_dead_letters_are_counted_once() {
        let q = queue(2);
        let t = task();
        q.enqueue("a", vec![OutgoingMessage::now(t.clone())])
            .await
            .unwrap();
        let d1 = q.receive("a", 1, S, S).await.unwrap().remove(0);
        tokio::time::sleep(2 * S).await;
        // Expired: no nack or extend, but an ack before the next delivery still works.
        assert!(matches!(
            q.extend("a", &d1.receipt, S).await,
            Err(QueueError::InvalidReceipt)
        ));
        assert!(matches!(
            q.nack("a", &d1.receipt, S).await,
            Err(QueueError::InvalidReceipt)
        ));
        let d2 = q.receive("a", 1, S, S).await.unwrap().remove(0);
        assert_eq!(d2.receive_count, 2);
        // d1 is stale now that the message was delivered again.
        q.ack("a", vec![d1.receipt.clone()]).await.unwrap();
        assert_eq!(q.depth("a").await.unwrap(), 0);
        q.nack("a", &d2.receipt, Duration::ZERO).await.unwrap();
        assert_eq!(q.depth("a").await.unwrap(), 0, "dead-lettered, not waiting");
        assert!(q.receive("a", 1, S, S).await.unwrap().is_empty());
        assert_eq!(q.drain_dead_letters("a", 10).await.unwrap(), vec![t]);
        for bad in ["", "x", "1.x", "99.99"] {
            let r = Receipt(bad.into());
            assert!(matches!(
                q.nack("a", &r, S).await,
                Err(QueueError::InvalidReceipt)
            ));
            q.ack("a", vec![r]).await.unwrap();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_expired_delivery_may_be_acked_until_delivered_again() {
        let q = queue(5);
        q.enqueue("a", vec![OutgoingMessage::now(task())])
            .await
            .unwrap();
        let d = q.receive("a", 1, S, S).await.unwrap().remove(0);
        tokio::time::sleep(2 * S).await;
        assert_eq!(q.depth("a").await.unwrap(), 1);
        q.ack("a", vec![d.receipt]).await.unwrap();
        assert_eq!(q.depth("a").await.unwrap(), 0);
        assert!(q.receive("a", 1, S, S).await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn zero_max_receives_never_dead_letters() {
        let q = queue(0);
        q.enqueue("a", vec![OutgoingMessage::now(task())])
            .await
            .unwrap();
        for n in 1..=20 {
            let d = q.receive("a", 1, 5 * S, S).await.unwrap().remove(0);
            assert_eq!(d.receive_count, n);
        }
        assert!(q.drain_dead_letters("a", 10).await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn acked_deliveries_do_not_pile_up_in_the_heaps() {
        let q = queue(5);
        for _ in 0..5 {
            let batch = (0..1000).map(|_| OutgoingMessage::now(task())).collect();
            q.enqueue("a", batch).await.unwrap();
            let got = q.receive("a", 1000, S, 300 * S).await.unwrap();
            q.ack("a", got.into_iter().map(|d| d.receipt).collect())
                .await
                .unwrap();
        }
        let named = q.named("a");
        let st = named.state.lock();
        assert!(st.in_flight.len() <= COMPACT_SLACK);
        assert!(st.messages.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_receivers_share_a_burst() {
        let q = queue(5);
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..4 {
            let q = q.clone();
            set.spawn(async move {
                let mut n = 0;
                loop {
                    let got = q.receive("a", 3, 2 * S, 60 * S).await.unwrap();
                    if got.is_empty() {
                        return n;
                    }
                    n += got.len();
                }
            });
        }
        tokio::task::yield_now().await;
        let batch = (0..50).map(|_| OutgoingMessage::now(task())).collect();
        q.enqueue("a", batch).await.unwrap();
        let mut total = 0;
        while let Some(n) = set.join_next().await {
            total += n.unwrap();
        }
        assert_eq!(total, 50);
    }
}
