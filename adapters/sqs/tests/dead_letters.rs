//! Draining dead letters when SQS fails part-way through. Needs `scripts/localstack.sh start`.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use marathon_core::{Queue, Task, WorkflowId};
use marathon_sqs::SqsQueue;

const Q: &str = "dl";

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// While armed, lets `allowed` ReceiveMessage requests on a dead-letter queue
/// through and fails every later one before it is sent.
/// Clones share their state: the test keeps one to arm the one the client holds.
#[derive(Debug, Default, Clone)]
struct FailDlqReceives {
    armed: Arc<AtomicBool>,
    allowed: Arc<AtomicUsize>,
}

impl aws_sdk_sqs::config::Intercept for FailDlqReceives {
    fn name(&self) -> &'static str {
        "FailDlqReceives"
    }

    fn modify_before_transmit(
        &self,
        ctx: &mut aws_sdk_sqs::config::interceptors::BeforeTransmitInterceptorContextMut<'_>,
        _: &aws_sdk_sqs::config::RuntimeComponents,
        _: &mut aws_sdk_sqs::config::ConfigBag,
    ) -> Result<(), BoxError> {
        let req = ctx.request();
        let on_dlq = req
            .body()
            .bytes()
            .is_some_and(|b| String::from_utf8_lossy(b).contains("-dlq\""));
        if !self.armed.load(Ordering::SeqCst)
            || req.headers().get("x-amz-target") != Some("AmazonSQS.ReceiveMessage")
            || !on_dlq
        {
            return Ok(());
        }
        match self
            .allowed
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        {
            Ok(_) => Ok(()),
            Err(_) => Err("injected: SQS unreachable".into()),
        }
    }
}

async fn queue_with(faults: FailDlqReceives) -> SqsQueue {
    let sdk = common::loader()
        .endpoint_url(common::endpoint())
        .load()
        .await;
    let conf = aws_sdk_sqs::config::Builder::from(&sdk)
        .interceptor(faults)
        .build();
    SqsQueue::from_client(
        common::config(5, false),
        aws_sdk_sqs::Client::from_conf(conf),
    )
    .expect("config")
}

/// A drain takes ten dead letters off the DLQ and deletes them, then its next
/// ReceiveMessage fails (SQS unreachable for a moment). The ten were deleted, so no
/// later drain can report them: the drain must return them. It returned the error
/// alone, and those ten dead-lettered tasks were never reported (no `ERROR` log,
/// no `dead_lettered` count) although they were gone from the DLQ.
#[tokio::test]
async fn dead_letters_deleted_before_a_failure_are_still_reported() {
    let faults = FailDlqReceives::default();
    let q = queue_with(faults.clone()).await;
    // Creates the queue and its DLQ.
    q.depth(Q).await.expect("depth");
    let dlq = dlq_url(&q).await;
    let tasks: Vec<Task> = (0..15)
        .map(|_| Task::workflow(WorkflowId::random()))
        .collect();
    for t in &tasks {
        q.client()
            .send_message()
            .queue_url(&dlq)
            .message_body(serde_json::to_string(t).expect("json"))
            .send()
            .await
            .expect("send to the DLQ");
    }
    let ids = |ts: &[Task]| -> BTreeSet<String> {
        ts.iter().map(|t| t.workflow_id().to_string()).collect()
    };
    // One receive of ten goes through; the next fails.
    faults.allowed.store(1, Ordering::SeqCst);
    faults.armed.store(true, Ordering::SeqCst);
    let first = q.drain_dead_letters(Q, 100).await;
    faults.armed.store(false, Ordering::SeqCst);
    let mut reported = Vec::new();
    if let Ok(t) = &first {
        reported.extend(t.iter().cloned());
    }
    // SQS answers again: drain what is left.
    for _ in 0..5 {
        let more = q.drain_dead_letters(Q, 100).await.expect("drain");
        if more.is_empty() {
            break;
        }
        reported.extend(more);
    }
    common::teardown(&q).await;
    // The injected failure cut the first drain short.
    assert!(
        first.as_ref().is_ok_and(|t| t.len() < tasks.len()),
        "first drain: {first:?}"
    );
    assert_eq!(reported.len(), tasks.len(), "first drain: {first:?}");
    assert_eq!(ids(&reported), ids(&tasks));
}

/// The URL of the DLQ of `q`'s queue [`Q`].
async fn dlq_url(q: &SqsQueue) -> String {
    q.client()
        .get_queue_url()
        .queue_name(format!("{}{Q}-dlq", q.config().queue_prefix))
        .send()
        .await
        .expect("dlq url")
        .queue_url
        .expect("a url")
}

/// Messages now visible on the DLQ of `q`'s queue [`Q`].
async fn visible_on_dlq(q: &SqsQueue, dlq: &str) -> u64 {
    q.client()
        .get_queue_attributes()
        .queue_url(dlq)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
        .send()
        .await
        .expect("attributes")
        .attributes
        .and_then(|mut a| {
            a.remove(&aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
        })
        .and_then(|v| v.parse().ok())
        .expect("a count")
}

/// A DLQ holding many undecodable messages (another producer's, left there for an
/// operator): a drain of `max` reads at most `max` messages. It read the whole
/// DLQ on every drain, since only decoded tasks counted towards `max`: with
/// thousands of such messages, each replica's drain (every 30 s) sent a
/// ReceiveMessage per ten of them and logged an `ERROR` for every one.
#[tokio::test]
async fn a_drain_reads_at_most_max_messages_when_they_are_undecodable() {
    let q = common::fresh(5, false).await;
    q.depth(Q).await.expect("depth");
    let dlq = dlq_url(&q).await;
    for i in 0..30 {
        q.client()
            .send_message()
            .queue_url(&dlq)
            .message_body(format!("{{\"poison\": {i}}}"))
            .send()
            .await
            .expect("send to the DLQ");
    }
    let drained = q.drain_dead_letters(Q, 5).await;
    let visible = visible_on_dlq(&q, &dlq).await;
    common::teardown(&q).await;
    assert!(drained.expect("drain").is_empty());
    assert!(
        visible >= 25,
        "a drain of 5 read {} undecodable messages",
        30 - visible
    );
}
