//! Worker faults: a failed visibility extension, a failed send (and one that failed after the queue took it), a failed ack.

mod common;

use async_trait::async_trait;
use common::*;
use futures::future::BoxFuture;
use marathon_core::testkit::ForwardingQueue;
use marathon_core::{
    ActivityContext, ActivityError, Delivery, Engine, OutgoingMessage, Queue, QueueError, Receipt,
    Task, Worker, WorkerConfig, WorkflowContext,
};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// A queue that forwards to another and fails calls as a remote queue can: each
/// counter is how many more calls of its kind fail as unavailable (after the SDK's
/// own retries).
struct Faulty {
    inner: Arc<dyn Queue>,
    /// Extends (ChangeMessageVisibility: a network blip, SQS throttling).
    fail_extends: AtomicU32,
    /// Enqueues of workflow tasks.
    fail_workflow_sends: AtomicU32,
    /// Acks of activity deliveries (DeleteMessage failed; the message stays).
    fail_activity_acks: AtomicU32,
    /// Enqueues of activity tasks that the queue takes and yet answers with an error
    /// (a SendMessageBatch whose reply timed out).
    taken_then_failed: AtomicU32,
    /// With `taken_then_failed`: only the first message of such a send is taken (the
    /// other entries were throttled, as SendMessageBatch reports per entry).
    partial: bool,
    /// Receipts of activity deliveries.
    activity_receipts: parking_lot::Mutex<std::collections::HashSet<String>>,
}

impl Faulty {
    /// Forwards to `inner`, failing nothing.
    fn new(inner: Arc<dyn Queue>) -> Self {
        Self {
            inner,
            fail_extends: AtomicU32::new(0),
            fail_workflow_sends: AtomicU32::new(0),
            fail_activity_acks: AtomicU32::new(0),
            taken_then_failed: AtomicU32::new(0),
            partial: false,
            activity_receipts: Default::default(),
        }
    }
}

/// Takes one from `n` if it is not zero.
fn take(n: &AtomicU32) -> bool {
    n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl ForwardingQueue for Faulty {
    fn inner(&self) -> &dyn Queue {
        &*self.inner
    }
    async fn enqueue(&self, queue: &str, messages: Vec<OutgoingMessage>) -> Result<(), QueueError> {
        let has = |workflow: bool| {
            messages
                .iter()
                .any(|m| matches!(m.task, Task::Workflow { .. }) == workflow)
        };
        if has(true) && take(&self.fail_workflow_sends) {
            return Err(QueueError::Unavailable("injected: send failed once".into()));
        }
        if has(false) && take(&self.taken_then_failed) {
            if self.partial && messages.len() > 1 {
                self.inner.enqueue(queue, messages[..1].to_vec()).await?;
                return Err(QueueError::Unavailable(
                    "injected: entry 2 throttled".into(),
                ));
            }
            self.inner.enqueue(queue, messages).await?;
            return Err(QueueError::Unavailable("injected: reply lost".into()));
        }
        self.inner.enqueue(queue, messages).await
    }
    async fn receive(
        &self,
        queue: &str,
        max: usize,
        wait: Duration,
        visibility: Duration,
    ) -> Result<Vec<Delivery>, QueueError> {
        let got = self.inner.receive(queue, max, wait, visibility).await?;
        for d in &got {
            if matches!(d.task, Task::Activity(_)) {
                self.activity_receipts.lock().insert(d.receipt.0.clone());
            }
        }
        Ok(got)
    }
    async fn ack(&self, queue: &str, receipts: Vec<Receipt>) -> Result<(), QueueError> {
        let activity = receipts
            .iter()
            .any(|r| self.activity_receipts.lock().contains(&r.0));
        if activity && take(&self.fail_activity_acks) {
            return Err(QueueError::Unavailable(
                "injected: delete failed once".into(),
            ));
        }
        self.inner.ack(queue, receipts).await
    }
    async fn extend(
        &self,
        queue: &str,
        receipt: &Receipt,
        visibility: Duration,
    ) -> Result<(), QueueError> {
        if take(&self.fail_extends) {
            return Err(QueueError::Unavailable(
                "injected: extend failed once".into(),
            ));
        }
        self.inner.extend(queue, receipt, visibility).await
    }
    /// Remote: its calls fail for a while, so the engine keeps a copy of each send
    /// to try again (the memory queue inside would say otherwise).
    fn is_in_process(&self) -> bool {
        false
    }
}

/// An activity on `u32` that counts its runs in `runs` and returns its input after
/// `takes` (of test time).
fn counted(
    runs: &Arc<AtomicU32>,
    takes: Duration,
) -> impl Fn(ActivityContext, u32) -> BoxFuture<'static, Result<u32, ActivityError>>
+ Send
+ Sync
+ 'static {
    let runs = runs.clone();
    move |_ctx, n| {
        let runs = runs.clone();
        Box::pin(async move {
            runs.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(takes).await;
            Ok(n)
        })
    }
}

/// Starts workflow `name` on `engine` and runs it to its end with a worker of `config`.
async fn run_to_end(engine: &Engine, name: &str, config: WorkerConfig) {
    let worker = Worker::start(engine.clone(), config);
    let id = start(engine, name, json!(null)).await;
    finished(engine, &id).await;
    worker.shutdown().await;
}

/// One failed visibility extension (transient) must not make a long activity run
/// twice: the worker tries again only a whole half-visibility later, when the
/// delivery has already lapsed, so another receiver takes the attempt over while
/// the first run still goes on (a minutes-long LLM call billed twice).
#[tokio::test(start_paused = true)]
async fn one_failed_extension_does_not_run_a_long_activity_twice() {
    let (store, memory) = backends();
    let queue: Arc<dyn Queue> = Arc::new(Faulty {
        fail_extends: AtomicU32::new(1),
        ..Faulty::new(memory)
    });
    let runs = Arc::new(AtomicU32::new(0));
    let engine = builder(&store, &queue)
        .workflow("one", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, u32>("slow", &1u32).await
        })
        .activity("slow", counted(&runs, Duration::from_secs(20)))
        .build();
    let config = WorkerConfig {
        visibility: Duration::from_secs(4),
        ..worker_config()
    };
    run_to_end(&engine, "one", config).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the activity ran more than once"
    );
}

/// One failed send of a workflow task (SQS unavailable for a moment, after the SDK's
/// retries) is sent again at once: before, the sweeper sent it only at the task's
/// deadline, 30 s later.
#[tokio::test(start_paused = true)]
async fn one_failed_workflow_task_send_does_not_delay_the_workflow() {
    let (store, memory) = backends();
    let queue: Arc<dyn Queue> = Arc::new(Faulty {
        fail_workflow_sends: AtomicU32::new(1),
        ..Faulty::new(memory)
    });
    let engine = builder(&store, &queue)
        .workflow("one", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, u32>("quick", &()).await
        })
        .activity("quick", |_c: ActivityContext, (): ()| async {
            Ok::<_, ActivityError>(1u32)
        })
        .build();
    let w = Worker::start(engine.clone(), worker_config());
    let t0 = tokio::time::Instant::now();
    let id = start(&engine, "one", json!(null)).await;
    finished(&engine, &id).await;
    let took = t0.elapsed();
    w.shutdown().await;
    assert!(
        took < Duration::from_secs(30),
        "a one-off send failure delayed the workflow by {took:?}"
    );
}

/// An activity whose attempt has completed and been recorded is not run again when
/// its message comes back because the ack (DeleteMessage) failed: the redelivery
/// (receive count 2) runs the fast path, with no store call, so the whole attempt
/// (an LLM call) runs a second time and only its result is dropped.
#[tokio::test(start_paused = true)]
async fn a_failed_ack_does_not_run_a_completed_activity_again() {
    let (store, memory) = backends();
    let queue: Arc<dyn Queue> = Arc::new(Faulty {
        fail_activity_acks: AtomicU32::new(1),
        ..Faulty::new(memory)
    });
    let runs = Arc::new(AtomicU32::new(0));
    let engine = builder(&store, &queue)
        .workflow("one", |ctx: WorkflowContext, (): ()| async move {
            let a = ctx.activity::<_, u32>("llm", &1u32).await?;
            ctx.sleep(Duration::from_secs(60)).await?;
            Ok(a)
        })
        .activity("llm", counted(&runs, Duration::from_secs(5)))
        .build();
    let config = WorkerConfig {
        visibility: Duration::from_secs(10),
        ..worker_config()
    };
    run_to_end(&engine, "one", config).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the completed activity ran again"
    );
}

/// One send that SQS took but answered with a retryable error (a timed-out
/// SendMessageBatch; or one throttled entry of a batch, where SqsQueue::enqueue returns
/// the error for the whole call) must not make an activity run twice: a first copy far
/// from its deadline runs without asking the store, so the engine does not send
/// activity tasks again after a failed call (a first version of its send retry did,
/// and both copies ran the activity at the same time).
#[tokio::test(start_paused = true)]
async fn a_send_retried_after_sqs_took_it_does_not_run_the_activity_twice() {
    let (store, memory) = backends();
    let queue: Arc<dyn Queue> = Arc::new(Faulty {
        taken_then_failed: AtomicU32::new(1),
        ..Faulty::new(memory)
    });
    let runs = Arc::new(AtomicU32::new(0));
    let engine = builder(&store, &queue)
        .workflow("one", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, u32>("llm", &1u32).await
        })
        .activity("llm", counted(&runs, Duration::from_secs(5)))
        .build();
    run_to_end(&engine, "one", worker_config()).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the activity ran more than once"
    );
}

/// The same through SqsQueue's partial batch failure: a workflow task schedules two
/// activities at once; SendMessageBatch takes entry 1 and throttles entry 2, so
/// SqsQueue::enqueue returns a retryable error for the call; sending both again ran
/// the first activity twice.
#[tokio::test(start_paused = true)]
async fn a_partly_sent_batch_retried_does_not_run_the_sent_activity_twice() {
    let (store, memory) = backends();
    let queue: Arc<dyn Queue> = Arc::new(Faulty {
        taken_then_failed: AtomicU32::new(1),
        partial: true,
        ..Faulty::new(memory)
    });
    let runs = Arc::new(AtomicU32::new(0));
    let engine = builder(&store, &queue)
        .workflow("two", |ctx: WorkflowContext, (): ()| async move {
            let a = ctx.activity::<_, u32>("llm", &1u32);
            let b = ctx.activity::<_, u32>("llm", &2u32);
            let (a, b) = futures::future::join(a, b).await;
            Ok(a? + b?)
        })
        .activity("llm", counted(&runs, Duration::from_secs(5)))
        .build();
    run_to_end(&engine, "two", worker_config()).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        2,
        "an activity ran more than once"
    );
}
