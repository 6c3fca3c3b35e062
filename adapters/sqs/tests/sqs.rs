//! SqsQueue against LocalStack: the trait's contract plus what is SQS-specific.
//! Needs `scripts/localstack.sh start`.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use marathon_core::model::{ActivityCall, ActivityOptions, ActivityTask, Seq, Timestamp};
use marathon_core::{OutgoingMessage, Queue, QueueError, Receipt, Task, WorkflowId};
use marathon_sqs::{SqsQueue, SqsQueueConfig};

const Q: &str = "work";
const VIS: Duration = Duration::from_secs(30);

fn wf(id: &str) -> Task {
    Task::workflow(WorkflowId::parse(id).expect("valid id"))
}

fn random_task() -> Task {
    Task::workflow(WorkflowId::random())
}

async fn receive_n(q: &SqsQueue, n: usize, vis: Duration) -> Vec<marathon_core::Delivery> {
    let mut got = Vec::new();
    // Generous for a loaded machine (LocalStack is slow then); it returns at once.
    let end = Instant::now() + Duration::from_secs(30);
    while got.len() < n && Instant::now() < end {
        got.extend(
            q.receive(Q, n - got.len(), Duration::from_secs(1), vis)
                .await
                .expect("receive"),
        );
    }
    got
}

#[tokio::test]
async fn batched_round_trip_ack_and_depth() {
    let q = common::fresh(3, false).await;
    let tasks: Vec<Task> = (0..25).map(|_| random_task()).collect();
    q.enqueue(Q, tasks.iter().cloned().map(OutgoingMessage::now).collect())
        .await
        .expect("enqueue");
    assert_eq!(q.depth(Q).await.expect("depth"), 25);

    let got = receive_n(&q, 25, VIS).await;
    assert_eq!(got.len(), 25);
    assert!(
        got.iter()
            .all(|d| d.receive_count == 1 && d.trace_context.is_none())
    );
    let sent: HashSet<String> = tasks.iter().map(|t| t.workflow_id().to_string()).collect();
    let recv: HashSet<String> = got
        .iter()
        .map(|d| d.task.workflow_id().to_string())
        .collect();
    assert_eq!(sent, recv);

    q.ack(Q, got.into_iter().map(|d| d.receipt).collect())
        .await
        .expect("ack");
    assert_eq!(q.depth(Q).await.expect("depth"), 0);
    assert!(
        q.receive(Q, 10, Duration::ZERO, VIS)
            .await
            .expect("receive")
            .is_empty()
    );
    common::teardown(&q).await;
}

#[tokio::test]
async fn trace_context_round_trips() {
    let q = common::fresh(3, false).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut m = OutgoingMessage::now(wf("traced"));
    m.trace_context = Some(tp.to_owned());
    q.enqueue(Q, vec![m]).await.expect("enqueue");
    let got = receive_n(&q, 1, VIS).await;
    assert_eq!(got[0].trace_context.as_deref(), Some(tp));
    assert_eq!(got[0].task, wf("traced"));
    common::teardown(&q).await;
}

#[tokio::test]
async fn visibility_nack_and_extend() {
    let q = common::fresh(5, false).await;
    q.enqueue(Q, vec![OutgoingMessage::now(wf("a"))])
        .await
        .expect("enqueue");
    let first = receive_n(&q, 1, Duration::from_secs(1)).await.remove(0);
    assert_eq!(first.receive_count, 1);
    // Not acked: back after the visibility timeout, counted again.
    let second = receive_n(&q, 1, VIS).await.remove(0);
    assert_eq!((second.task.clone(), second.receive_count), (wf("a"), 2));

    // nack with no delay: visible at once.
    q.nack(Q, &second.receipt, Duration::ZERO)
        .await
        .expect("nack");
    let third = receive_n(&q, 1, Duration::from_secs(1)).await.remove(0);
    assert_eq!(third.receive_count, 3);

    // extend keeps it hidden past its first timeout (1 s). Extended by far more than
    // the wait, so that a slow receive cannot reach LocalStack after the extension
    // ran out (4 s left 2.2 s for it).
    q.extend(Q, &third.receipt, Duration::from_secs(30))
        .await
        .expect("extend");
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert!(
        q.receive(Q, 1, Duration::ZERO, VIS)
            .await
            .expect("receive")
            .is_empty()
    );
    q.ack(Q, vec![third.receipt]).await.expect("ack");
    common::teardown(&q).await;
}

#[tokio::test]
async fn nack_with_delay_hides_the_message() {
    let q = common::fresh(5, false).await;
    q.enqueue(Q, vec![OutgoingMessage::now(wf("n"))])
        .await
        .expect("enqueue");
    let d = receive_n(&q, 1, VIS).await.remove(0);
    let start = Instant::now();
    q.nack(Q, &d.receipt, Duration::from_secs(2))
        .await
        .expect("nack");
    assert!(
        q.receive(Q, 1, Duration::ZERO, VIS)
            .await
            .expect("receive")
            .is_empty()
    );
    let again = receive_n(&q, 1, VIS).await.remove(0);
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(again.task, wf("n"));
    common::teardown(&q).await;
}

#[tokio::test]
async fn bad_receipts_are_invalid_receipt() {
    let q = common::fresh(3, false).await;
    // Make sure the queue exists so the error is about the receipt.
    q.enqueue(Q, vec![OutgoingMessage::now(wf("r"))])
        .await
        .expect("enqueue");
    let bogus = Receipt("not-a-receipt".into());
    assert!(matches!(
        q.ack(Q, vec![bogus.clone()]).await,
        Err(QueueError::InvalidReceipt)
    ));
    assert!(matches!(
        q.extend(Q, &bogus, Duration::from_secs(5)).await,
        Err(QueueError::InvalidReceipt)
    ));
    assert!(matches!(
        q.nack(Q, &bogus, Duration::ZERO).await,
        Err(QueueError::InvalidReceipt)
    ));
    common::teardown(&q).await;
}

#[tokio::test]
async fn delayed_message_is_not_delivered_early() {
    let q = common::fresh(3, false).await;
    let start = Instant::now();
    q.enqueue(
        Q,
        vec![OutgoingMessage::now(wf("later")).delayed(Duration::from_secs(2))],
    )
    .await
    .expect("enqueue");
    assert!(
        q.receive(Q, 1, Duration::ZERO, VIS)
            .await
            .expect("receive")
            .is_empty()
    );
    assert_eq!(
        q.depth(Q).await.expect("depth"),
        1,
        "delayed messages count in depth"
    );
    let got = q
        .receive(Q, 1, Duration::from_secs(5), VIS)
        .await
        .expect("receive");
    assert_eq!(got.len(), 1);
    assert!(
        start.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    common::teardown(&q).await;
}

#[tokio::test]
async fn exhausted_messages_are_dead_lettered_and_drained() {
    let q = common::fresh(2, false).await;
    q.enqueue(
        Q,
        vec![
            OutgoingMessage::now(wf("poison")),
            OutgoingMessage::now(wf("fine")),
        ],
    )
    .await
    .expect("enqueue");
    let mut fine = None;
    for _ in 0..2 {
        for d in receive_n(&q, 2, Duration::from_secs(1)).await {
            if d.task == wf("fine") && fine.is_none() {
                fine = Some(d.receipt);
            }
        }
    }
    q.ack(Q, fine.into_iter().collect()).await.expect("ack");
    // The third receive moves "poison" to the dead-letter queue instead.
    let dead = common::eventually(Duration::from_secs(10), || async {
        let got = q
            .receive(Q, 10, Duration::from_secs(1), Duration::from_secs(1))
            .await
            .expect("receive");
        assert!(
            got.iter().all(|d| d.receive_count <= 2),
            "delivered beyond max_receives: {got:?}"
        );
        let dead = q.drain_dead_letters(Q, 10).await.expect("drain");
        (!dead.is_empty()).then_some(dead)
    })
    .await
    .expect("dead-lettered within 10 s");
    assert_eq!(dead, vec![wf("poison")]);
    assert!(q.drain_dead_letters(Q, 10).await.expect("drain").is_empty());
    common::teardown(&q).await;
}

#[tokio::test]
async fn too_large_is_refused_and_nothing_is_sent() {
    let q = common::fresh(3, false).await;
    let big = Task::Activity(ActivityTask {
        workflow_id: WorkflowId::random(),
        activity_id: 1,
        attempt: 1,
        scheduled_seq: Seq(3),
        workflow_task_queue: "default".into(),
        call: Some(ActivityCall {
            name: "big".into(),
            input: serde_json::Value::String("x".repeat(q.max_message_bytes())),
            options: ActivityOptions::default(),
            scheduled_at: Timestamp(0),
        }),
        run: None,
        deadline: None,
        copy: 0,
    });
    let res = q
        .enqueue(
            Q,
            vec![OutgoingMessage::now(wf("small")), OutgoingMessage::now(big)],
        )
        .await;
    assert!(
        matches!(res, Err(QueueError::TooLarge { limit: 262_144, .. })),
        "{res:?}"
    );
    assert_eq!(q.depth(Q).await.expect("depth"), 0);
    common::teardown(&q).await;
}

#[tokio::test]
async fn batches_respect_the_total_size_limit() {
    let q = common::fresh(3, false).await;
    // Ten messages of 60 KiB: more than 256 KiB together, so several requests.
    let msgs: Vec<_> = (0..10)
        .map(|i| {
            OutgoingMessage::now(Task::Activity(ActivityTask {
                workflow_id: WorkflowId::random(),
                activity_id: i,
                attempt: 1,
                scheduled_seq: Seq(1),
                workflow_task_queue: "default".into(),
                call: Some(ActivityCall {
                    name: "mid".into(),
                    input: serde_json::Value::String("y".repeat(60 * 1024)),
                    options: ActivityOptions::default(),
                    scheduled_at: Timestamp(0),
                }),
                run: None,
                deadline: None,
                copy: 0,
            }))
        })
        .collect();
    q.enqueue(Q, msgs).await.expect("enqueue");
    assert_eq!(q.depth(Q).await.expect("depth"), 10);
    common::teardown(&q).await;
}

#[tokio::test]
async fn fifo_round_trip_keeps_order_and_never_merges() {
    let q = common::fresh(3, true).await;
    // Same workflow, equal tasks: both delivered, in order with the rest.
    let msgs = [wf("g1"), wf("g1"), wf("g2")];
    let mut tagged: Vec<OutgoingMessage> = msgs.iter().cloned().map(OutgoingMessage::now).collect();
    for (i, m) in tagged.iter_mut().enumerate() {
        m.trace_context = Some(format!("00-{:032x}-{:016x}-01", i + 1, i + 1));
    }
    q.enqueue(Q, tagged).await.expect("enqueue");
    let got = receive_n(&q, 3, VIS).await;
    assert_eq!(got.len(), 3, "{got:?}");
    let g1: Vec<_> = got
        .iter()
        .filter(|d| d.task == wf("g1"))
        .map(|d| d.trace_context.clone())
        .collect();
    assert_eq!(
        g1,
        vec![
            Some(format!("00-{:032x}-{:016x}-01", 1, 1)),
            Some(format!("00-{:032x}-{:016x}-01", 2, 2))
        ]
    );
    q.ack(Q, got.into_iter().map(|d| d.receipt).collect())
        .await
        .expect("ack");
    assert_eq!(q.depth(Q).await.expect("depth"), 0);
    assert!(q.config().fifo);
    common::teardown(&q).await;
}

#[tokio::test]
async fn fifo_delays_are_honoured() {
    let q = common::fresh(3, true).await;
    let start = Instant::now();
    q.enqueue(
        Q,
        vec![OutgoingMessage::now(wf("f")).delayed(Duration::from_secs(2))],
    )
    .await
    .expect("enqueue");
    let got = receive_n(&q, 1, VIS).await;
    assert_eq!(got.len(), 1);
    assert!(
        start.elapsed() >= Duration::from_millis(1900),
        "{:?}",
        start.elapsed()
    );
    common::teardown(&q).await;
}

#[tokio::test]
async fn explicit_urls_and_existing_queues() {
    let creator = common::fresh(3, false).await;
    creator
        .enqueue(Q, vec![])
        .await
        .expect("empty enqueue is a no-op");
    creator.depth(Q).await.expect("creates the queue");
    let url = creator
        .client()
        .get_queue_url()
        .queue_name(format!("{}{Q}", creator.config().queue_prefix))
        .send()
        .await
        .expect("queue exists")
        .queue_url
        .expect("url");

    // No prefix match, no creation: only the explicit URL can work.
    let cfg = SqsQueueConfig {
        queue_prefix: "mt-none-".into(),
        queue_urls: BTreeMap::from([
            ("jobs".to_owned(), url),
            (
                "gone".to_owned(),
                format!("{}/000000000000/mt-none-gone", common::endpoint()),
            ),
        ]),
        create_if_missing: false,
        region: Some("us-east-1".into()),
        endpoint_url: Some(common::endpoint()),
        ..SqsQueueConfig::default()
    };
    let q = common::connect(cfg).await;
    // Start-up's look-up asks SQS about an explicit URL too.
    assert!(q.resolve("jobs").await.expect("resolve jobs"));
    assert!(!q.resolve("gone").await.expect("resolve gone"));
    q.enqueue("jobs", vec![OutgoingMessage::now(wf("x"))])
        .await
        .expect("enqueue");
    assert_eq!(
        creator
            .receive(Q, 1, Duration::from_secs(2), VIS)
            .await
            .expect("receive")
            .len(),
        1
    );
    assert!(
        q.drain_dead_letters("jobs", 10)
            .await
            .expect("DLQ found via RedrivePolicy")
            .is_empty()
    );

    // A missing queue is a permanent error when creation is off.
    let err = q.depth("missing").await.expect_err("no such queue");
    assert!(matches!(err, QueueError::Backend(_)), "{err:?}");
    common::teardown(&creator).await;
}

#[tokio::test]
async fn unreachable_endpoint_is_retryable() {
    let cfg = SqsQueueConfig {
        endpoint_url: Some("http://127.0.0.1:9".into()),
        region: Some("us-east-1".into()),
        ..SqsQueueConfig::default()
    };
    let q = SqsQueue::connect_with(cfg, common::loader())
        .await
        .expect("config");
    let err = q.ping().await.expect_err("nothing listens on port 9");
    assert!(err.is_retryable(), "{err:?}");
}

#[tokio::test]
async fn expired_and_spent_receipts_are_invalid() {
    let q = common::fresh(5, false).await;
    q.enqueue(Q, vec![OutgoingMessage::now(wf("e"))])
        .await
        .expect("enqueue");
    let d = receive_n(&q, 1, Duration::from_secs(1)).await.remove(0);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // Expired (even before anyone received it again): it can no longer be extended.
    assert!(matches!(
        q.extend(Q, &d.receipt, Duration::from_secs(5)).await,
        Err(QueueError::InvalidReceipt)
    ));
    let d2 = receive_n(&q, 1, VIS).await.remove(0);
    assert!(matches!(
        q.nack(Q, &d.receipt, Duration::ZERO).await,
        Err(QueueError::InvalidReceipt)
    ));
    q.extend(Q, &d2.receipt, Duration::from_secs(60))
        .await
        .expect("live receipt extends");
    q.ack(Q, vec![d2.receipt.clone()]).await.expect("ack");
    q.ack(Q, vec![d2.receipt.clone()])
        .await
        .expect("ack is idempotent");
    assert!(matches!(
        q.extend(Q, &d2.receipt, Duration::from_secs(5)).await,
        Err(QueueError::InvalidReceipt)
    ));
    assert!(matches!(
        q.nack(Q, &d2.receipt, Duration::ZERO).await,
        Err(QueueError::InvalidReceipt)
    ));
    common::teardown(&q).await;
}

/// A delivery that arrived late in a long poll is live for `visibility` from its
/// arrival (SQS starts the timer when it hands the message out): the adapter's own
/// lease, which refuses extends of expired receipts, must not date it from the poll's
/// start (it did, and refused every heartbeat of such a delivery).
#[tokio::test]
async fn a_delivery_that_arrives_late_in_a_long_poll_can_be_extended() {
    let q = std::sync::Arc::new(common::fresh(3, false).await);
    // Create the queue before the poll.
    assert_eq!(q.depth(Q).await.expect("depth"), 0);
    let sender = q.clone();
    let send = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        sender
            .enqueue(Q, vec![OutgoingMessage::now(wf("late-arrival"))])
            .await
            .expect("enqueue");
    });
    // Long poll of up to 6 s, visibility 2 s: the message arrives after ~3 s.
    let got = q
        .receive(Q, 1, Duration::from_secs(6), Duration::from_secs(2))
        .await
        .expect("receive");
    send.await.expect("sender");
    assert_eq!(got.len(), 1, "the message arrived during the poll");
    // It is in flight right now: nobody else can receive it ...
    assert!(
        q.receive(Q, 10, Duration::ZERO, VIS)
            .await
            .expect("receive")
            .is_empty(),
        "the delivery is live"
    );
    // ... so a heartbeat on it must succeed.
    let r = q.extend(Q, &got[0].receipt, Duration::from_secs(30)).await;
    // SQS itself accepts the very same change on that receipt.
    let url = q
        .client()
        .get_queue_url()
        .queue_name(format!("{}{Q}", q.config().queue_prefix))
        .send()
        .await
        .expect("url")
        .queue_url
        .expect("url");
    let raw = q
        .client()
        .change_message_visibility()
        .queue_url(url)
        .receipt_handle(&got[0].receipt.0)
        .visibility_timeout(30)
        .send()
        .await;
    common::teardown(&q).await;
    assert!(raw.is_ok(), "SQS refused too: {raw:?}");
    assert!(r.is_ok(), "extend of a live delivery failed: {r:?}");
}
