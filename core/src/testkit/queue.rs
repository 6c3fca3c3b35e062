//! `Queue` conformance cases: each takes a fresh backend and uses its own queue names.
//!
//! Durations are whole seconds (SQS has 1-second granularity) and each case
//! takes well under ten seconds of real time.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::model::{ActivityCall, ActivityOptions, ActivityTask, Seq, Task, Timestamp, WorkflowId};
use crate::queue::{Delivery, OutgoingMessage, Queue, QueueError};

/// A fixture's queue must dead-letter a message after this many receives.
pub const MAX_RECEIVES: u32 = 3;

const SEC: Duration = Duration::from_secs(1);
/// Visibility long enough that a message never reappears within a case.
const LONG: Duration = Duration::from_secs(30);
/// How long depth and dead letters may take to catch up.
const EVENTUALLY: Duration = Duration::from_secs(5);

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

fn task() -> Task {
    Task::workflow(WorkflowId::random())
}

async fn enqueue(q: &Arc<dyn Queue>, name: &str, messages: Vec<OutgoingMessage>) {
    q.enqueue(name, messages).await.expect("enqueue");
}

async fn receive(
    q: &Arc<dyn Queue>,
    name: &str,
    max: usize,
    wait: Duration,
    visibility: Duration,
) -> Vec<Delivery> {
    let got = q
        .receive(name, max, wait, visibility)
        .await
        .expect("receive");
    assert!(got.len() <= max, "received {} > max {max}", got.len());
    got
}

/// Receives until `task` arrives (waiting up to `within`), acking nothing.
async fn receive_task(
    q: &Arc<dyn Queue>,
    name: &str,
    task: &Task,
    within: Duration,
    visibility: Duration,
) -> Delivery {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{task:?} was not delivered within {within:?}"
        );
        let wait = left.min(secs(5)).max(SEC);
        let got = receive(q, name, 1, Duration::from_secs(wait.as_secs()), visibility).await;
        if let Some(d) = got.into_iter().next() {
            assert_eq!(&d.task, task);
            return d;
        }
    }
}

async fn ack(q: &Arc<dyn Queue>, name: &str, d: &Delivery) {
    q.ack(name, vec![d.receipt.clone()]).await.expect("ack");
}

/// Waits until `depth(name) == expected`, retrying for a few seconds.
async fn eventually_depth(q: &Arc<dyn Queue>, name: &str, expected: u64) {
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let d = q.depth(name).await.expect("depth");
        if d == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "depth of {name} is {d}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A message is received once and is gone after its ack.
pub async fn enqueue_receive_ack(q: Arc<dyn Queue>) {
    let name = "q-basic";
    let t = task();
    enqueue(&q, name, vec![OutgoingMessage::now(t.clone())]).await;
    let got = receive(&q, name, 10, secs(5), SEC).await;
    assert_eq!(got.len(), 1);
    let d = &got[0];
    assert_eq!((&d.task, d.receive_count, &d.trace_context), (&t, 1, &None));
    ack(&q, name, d).await;
    // Acking again is harmless.
    ack(&q, name, d).await;
    // Had the ack been lost, the message would reappear after its 1 s visibility.
    assert!(receive(&q, name, 10, secs(3), SEC).await.is_empty());
    q.ping().await.expect("ping");
}

/// A receive on an empty queue returns nothing after about `wait`.
pub async fn receive_on_empty_queue_waits(q: Arc<dyn Queue>) {
    let started = Instant::now();
    let got = receive(&q, "q-empty", 10, secs(2), LONG).await;
    let took = started.elapsed();
    assert!(got.is_empty());
    assert!(
        took >= Duration::from_millis(1500),
        "returned after {took:?}"
    );
    assert!(took < secs(6), "returned after {took:?}");
}

/// 25 messages are all received exactly once by receives of up to 10.
pub async fn batch_is_received_exactly_once(q: Arc<dyn Queue>) {
    let name = "q-batch";
    let tasks: Vec<Task> = (0..25).map(|_| task()).collect();
    enqueue(
        &q,
        name,
        tasks.iter().cloned().map(OutgoingMessage::now).collect(),
    )
    .await;
    let mut seen = Vec::new();
    let deadline = Instant::now() + secs(8);
    while seen.len() < tasks.len() && Instant::now() < deadline {
        let got = receive(&q, name, 10, SEC, LONG).await;
        q.ack(name, got.iter().map(|d| d.receipt.clone()).collect())
            .await
            .expect("ack");
        for d in got {
            assert_eq!(d.receive_count, 1);
            seen.push(d.task);
        }
    }
    assert_eq!(seen.len(), tasks.len(), "each message once");
    let seen: HashSet<String> = seen.iter().map(|t| t.workflow_id().to_string()).collect();
    let sent: HashSet<String> = tasks.iter().map(|t| t.workflow_id().to_string()).collect();
    assert_eq!(seen, sent);
    assert!(receive(&q, name, 10, SEC, LONG).await.is_empty());
}

/// A delayed message is invisible before its delay and delivered after it.
pub async fn delayed_message_is_invisible_until_due(q: Arc<dyn Queue>) {
    let name = "q-delay";
    let t = task();
    let sent = Instant::now();
    enqueue(
        &q,
        name,
        vec![OutgoingMessage::now(t.clone()).delayed(secs(3))],
    )
    .await;
    assert!(receive(&q, name, 10, SEC, LONG).await.is_empty());
    let d = receive_task(&q, name, &t, secs(8), LONG).await;
    let took = sent.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "delivered after {took:?}"
    );
    assert_eq!(d.receive_count, 1);
    ack(&q, name, &d).await;
}

/// A message neither acked nor extended is delivered again after its visibility.
pub async fn unacked_message_is_redelivered(q: Arc<dyn Queue>) {
    let name = "q-redeliver";
    let t = task();
    enqueue(&q, name, vec![OutgoingMessage::now(t.clone())]).await;
    let first = receive_task(&q, name, &t, secs(5), SEC).await;
    assert_eq!(first.receive_count, 1);
    let second = receive_task(&q, name, &t, secs(6), LONG).await;
    assert_eq!(second.receive_count, 2);
    assert_ne!(
        first.receipt, second.receipt,
        "each delivery has its own receipt"
    );
    ack(&q, name, &second).await;
    assert!(receive(&q, name, 10, SEC, LONG).await.is_empty());
}

/// `extend` keeps a delivery invisible past its original visibility.
pub async fn extend_keeps_message_invisible(q: Arc<dyn Queue>) {
    let name = "q-extend";
    let t = task();
    enqueue(&q, name, vec![OutgoingMessage::now(t.clone())]).await;
    let d = receive_task(&q, name, &t, secs(5), secs(1)).await;
    let extended = Instant::now();
    q.extend(name, &d.receipt, secs(4))
        .await
        .expect("extend a live receipt");
    // The original 1 s visibility passes without a redelivery.
    assert!(receive(&q, name, 10, secs(2), LONG).await.is_empty());
    let again = receive_task(&q, name, &t, secs(6), LONG).await;
    let took = extended.elapsed();
    assert!(
        took >= Duration::from_millis(3500),
        "redelivered after {took:?}"
    );
    assert_eq!(again.receive_count, 2);
    ack(&q, name, &again).await;
}

/// A receive already waiting when another takes the message gets it again once that
/// delivery's visibility runs out, not only when its own wait ends (an SQS long poll
/// hands out a message as soon as it is visible again).
pub async fn a_waiting_receive_gets_a_message_whose_visibility_ran_out(q: Arc<dyn Queue>) {
    let name = "q-reappear";
    let t = task();
    let waiters: Vec<_> = (0..2)
        .map(|_| {
            let q = q.clone();
            tokio::spawn(async move {
                let got = receive(&q, name, 1, secs(15), SEC).await;
                (got, Instant::now())
            })
        })
        .collect();
    // Both receives are waiting when the message arrives: one takes it for 1 s.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sent = Instant::now();
    enqueue(&q, name, vec![OutgoingMessage::now(t.clone())]).await;
    let mut got = Vec::new();
    for w in waiters {
        let (deliveries, at) = w.await.expect("receiver");
        for d in deliveries {
            got.push((d.receive_count, at.duration_since(sent)));
            assert_eq!(d.task, t);
        }
    }
    got.sort();
    assert_eq!(got.len(), 2, "received by both waiting receives: {got:?}");
    assert_eq!((got[0].0, got[1].0), (1, 2), "{got:?}");
    assert!(
        got[1].1 < secs(6),
        "received again {:?} after it was sent, its visibility being 1 s",
        got[1].1
    );
}

/// `nack` with a delay delivers the message again after that delay.
pub async fn nack_redelivers_after_delay(q: Arc<dyn Queue>) {
    let name = "q-nack";
    let t = task();
    enqueue(&q, name, vec![OutgoingMessage::now(t.clone())]).await;
    let d = receive_task(&q, name, &t, secs(5), LONG).await;
    let nacked = Instant::now();
    q.nack(name, &d.receipt, secs(2)).await.expect("nack");
    assert!(receive(&q, name, 10, SEC, LONG).await.is_empty());
    let again = receive_task(&q, name, &t, secs(6), LONG).await;
    let took = nacked.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "redelivered after {took:?}"
    );
    assert_eq!(again.receive_count, 2);
    ack(&q, name, &again).await;
    assert!(receive(&q, name, 10, SEC, LONG).await.is_empty());
}

/// An acked receipt cannot bring its message back through `nack` or `extend`.
///
/// A backend may reject it with [`QueueError::InvalidReceipt`] or (like SQS)
/// accept it silently; either way the message is not delivered again.
pub async fn acked_receipt_is_spent(q: Arc<dyn Queue>) {
    let name = "q-spent";
    let t = task();
    enqueue(&q, name, vec![OutgoingMessage::now(t.clone())]).await;
    let d = receive_task(&q, name, &t, secs(5), SEC).await;
    ack(&q, name, &d).await;
    match q.nack(name, &d.receipt, Duration::ZERO).await {
        Ok(()) | Err(QueueError::InvalidReceipt) => {}
        Err(e) => panic!("nack with an acked receipt: {e}"),
    }
    match q.extend(name, &d.receipt, SEC).await {
        Ok(()) | Err(QueueError::InvalidReceipt) => {}
        Err(e) => panic!("extend with an acked receipt: {e}"),
    }
    assert!(receive(&q, name, 10, secs(3), SEC).await.is_empty());
}

/// After `MAX_RECEIVES` receives a message is dead-lettered: drained, never received.
pub async fn dead_letters_after_max_receives(q: Arc<dyn Queue>) {
    let name = "q-dead";
    let t = task();
    enqueue(&q, name, vec![OutgoingMessage::now(t.clone())]).await;
    for n in 1..=MAX_RECEIVES {
        let d = receive_task(&q, name, &t, secs(5), SEC).await;
        assert_eq!(d.receive_count, n);
    }
    // Receivers go on asking, as a worker does: SQS moves a message to its dead-letter
    // queue only when a receive finds it visible again and over the limit, and under
    // load that can be after any one receive's wait has ended. It is never delivered.
    let deadline = Instant::now() + EVENTUALLY * 2;
    let mut dead = Vec::new();
    while dead.is_empty() {
        assert!(Instant::now() < deadline, "no dead letter");
        let got = receive(&q, name, 10, SEC, SEC).await;
        assert!(
            got.is_empty(),
            "delivered more than {MAX_RECEIVES} times: {got:?}"
        );
        dead = q.drain_dead_letters(name, 10).await.expect("drain");
    }
    assert_eq!(dead, vec![t]);
    assert!(
        q.drain_dead_letters(name, 10)
            .await
            .expect("drain")
            .is_empty()
    );
    assert!(receive(&q, name, 10, SEC, SEC).await.is_empty());
}

/// `depth` counts ready and delayed messages, not those in flight.
pub async fn depth_counts_waiting_messages(q: Arc<dyn Queue>) {
    let name = "q-depth";
    eventually_depth(&q, name, 0).await;
    let ready: Vec<Task> = (0..3).map(|_| task()).collect();
    let mut messages: Vec<_> = ready.iter().cloned().map(OutgoingMessage::now).collect();
    messages.push(OutgoingMessage::now(task()).delayed(secs(60)));
    enqueue(&q, name, messages).await;
    eventually_depth(&q, name, 4).await;
    let got = receive(&q, name, 1, secs(2), LONG).await;
    assert_eq!(got.len(), 1);
    eventually_depth(&q, name, 3).await;
    ack(&q, name, &got[0]).await;
    eventually_depth(&q, name, 3).await;
}

/// The trace context and the whole task come back as sent.
pub async fn trace_context_round_trips(q: Arc<dyn Queue>) {
    let name = "q-trace";
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_string();
    let t = Task::Activity(ActivityTask {
        workflow_id: WorkflowId::random(),
        activity_id: 3,
        attempt: 2,
        scheduled_seq: Seq(7),
        workflow_task_queue: "default".into(),
        call: Some(ActivityCall {
            name: "chat".into(),
            input: json!({"messages": [{"role": "user", "content": "héllo \"world\""}]}),
            options: ActivityOptions::default().heartbeat_timeout(secs(2)),
            scheduled_at: Timestamp(1_700_000_000_123),
        }),
        run: Some(Timestamp(1_700_000_000_001)),
        deadline: Some(Timestamp(1_700_000_090_123)),
        copy: 2,
    });
    let mut traced = OutgoingMessage::now(t.clone());
    traced.trace_context = Some(traceparent.clone());
    let plain = task();
    enqueue(&q, name, vec![traced, OutgoingMessage::now(plain.clone())]).await;
    let mut got = Vec::new();
    let deadline = Instant::now() + secs(6);
    while got.len() < 2 && Instant::now() < deadline {
        got.extend(receive(&q, name, 10, SEC, LONG).await);
    }
    assert_eq!(got.len(), 2);
    for d in &got {
        if d.task == t {
            assert_eq!(d.trace_context.as_deref(), Some(traceparent.as_str()));
        } else {
            assert_eq!(d.task, plain);
            assert_eq!(d.trace_context, None);
        }
        ack(&q, name, d).await;
    }
}

/// Two named queues do not share messages.
pub async fn named_queues_are_isolated(q: Arc<dyn Queue>) {
    let (a, b) = ("q-iso-a", "q-iso-b");
    let (ta, tb) = (task(), task());
    enqueue(&q, a, vec![OutgoingMessage::now(ta.clone())]).await;
    enqueue(&q, b, vec![OutgoingMessage::now(tb.clone())]).await;
    let da = receive_task(&q, a, &ta, secs(5), LONG).await;
    assert!(receive(&q, a, 10, SEC, LONG).await.is_empty());
    let db = receive_task(&q, b, &tb, secs(5), LONG).await;
    ack(&q, a, &da).await;
    ack(&q, b, &db).await;
    eventually_depth(&q, a, 0).await;
    eventually_depth(&q, b, 0).await;
    assert!(receive(&q, b, 10, SEC, LONG).await.is_empty());
}
