//! Activity tasks that wait in a queue's backlog longer than their deadline, copies
//! the sweeper sends meanwhile, and attempts whose worker is lost after it started.
//! The queue is delivered from by hand and time is tokio's, paused.

mod common;

use common::*;
use marathon_core::memory::MemoryStore;
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, Engine, EngineConfig, EventData, Queue,
    RetryPolicy, Store, Task, WorkflowContext, WorkflowId, WorkflowStatus,
};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;

const STC: Duration = Duration::from_secs(10);
/// The engine's default `activity_grace`.
const GRACE: Duration = Duration::from_secs(30);

struct Setup {
    engine: Engine,
    queue: Arc<HandQueue>,
    runs: Arc<AtomicU32>,
    /// Each run of the activity takes a permit before it returns.
    gate: Arc<Semaphore>,
}

/// One workflow calling one activity ("work", start-to-close 10 s, `options`
/// otherwise) whose runs wait for a permit of the gate.
fn setup(config: EngineConfig, options: ActivityOptions, permits: usize) -> Setup {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let queue = Arc::new(HandQueue::default());
    let dyn_queue: Arc<dyn Queue> = queue.clone();
    let runs = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Semaphore::new(permits));
    let engine = builder(&store, &dyn_queue)
        .config(config)
        .workflow("one", move |ctx: WorkflowContext, (): ()| {
            let options = options.clone();
            async move {
                let out: u32 = ctx
                    .activity_with("work", &7u32, options.start_to_close(STC))
                    .await?;
                Ok(out)
            }
        })
        .activity("work", {
            let (runs, gate) = (runs.clone(), gate.clone());
            move |_ctx: ActivityContext, x: u32| {
                let (runs, gate) = (runs.clone(), gate.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    gate.acquire().await.expect("gate open").forget();
                    Ok::<_, ActivityError>(x * 2)
                }
            }
        })
        .build();
    Setup {
        engine,
        queue,
        runs,
        gate,
    }
}

impl Setup {
    /// Starts the workflow and runs its first task: the activity task is then pending.
    async fn start(&self) -> WorkflowId {
        let id = start(&self.engine, "one", json!(null)).await;
        let (q, task) = self.take().expect("first workflow task");
        self.engine.handle(&q, task).await.expect("workflow task");
        id
    }

    fn take(&self) -> Option<(String, Task)> {
        let mut pending = self.queue.pending.lock();
        (!pending.is_empty()).then(|| pending.remove(0))
    }

    fn pending_activity_tasks(&self) -> usize {
        self.queue
            .pending
            .lock()
            .iter()
            .filter(|(_, t)| matches!(t, Task::Activity(_)))
            .count()
    }

    /// Lets `d` of test time pass, sweeping every second as a worker would.
    async fn sweep_for(&self, d: Duration) {
        let end = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < end {
            tokio::time::advance(Duration::from_secs(1)).await;
            self.engine.sweep(100).await.expect("sweep");
        }
    }

    /// Hands `task` to a worker of its own (receive count `receive_count`) and
    /// returns once the activity runs there.
    async fn run_elsewhere(
        &self,
        (q, task): (String, Task),
        receive_count: u32,
    ) -> tokio::task::JoinHandle<Result<(), marathon_core::EngineError>> {
        let before = self.runs.load(Ordering::SeqCst);
        let engine = self.engine.clone();
        let worker =
            tokio::spawn(async move { engine.handle_delivery(&q, task, receive_count).await });
        while self.runs.load(Ordering::SeqCst) == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        worker
    }

    /// Delivers every pending task, in order, until none is left.
    async fn deliver_all(&self) {
        while let Some((q, task)) = self.take() {
            self.engine.handle(&q, task).await.expect("task handled");
        }
    }
}

/// The error kinds of the `activity_failed` events.
fn failed_kinds(h: &[marathon_core::Event]) -> Vec<&str> {
    h.iter()
        .filter_map(|e| match &e.data {
            EventData::ActivityFailed { error, .. } => Some(error.kind.as_str()),
            _ => None,
        })
        .collect()
}

fn failures(h: &[marathon_core::Event]) -> usize {
    count(h, |d| {
        matches!(
            d,
            EventData::ActivityRetrying { .. } | EventData::ActivityFailed { .. }
        )
    })
}

/// A task that waits in the queue 25 times its start-to-close + grace is neither given
/// up as lost nor run twice: the sweeper sends copies, less and less often, and the
/// copies that arrive while it runs, or after it finished, are not run.
#[tokio::test(start_paused = true)]
async fn a_backlog_longer_than_the_deadline_neither_fails_an_attempt_nor_runs_it_twice() {
    let s = setup(EngineConfig::default(), ActivityOptions::default(), 0);
    let id = s.start().await;
    s.sweep_for((STC + GRACE) * 25).await;
    // Sent again at 1, 3, 7 and 15 times the deadline, then every 16 times.
    let copies = s.pending_activity_tasks() - 1;
    assert!((4..=5).contains(&copies), "{copies} copies");
    let h = history(&s.engine, &id).await;
    assert_eq!(failures(&h), 0, "given up while waiting: {:?}", types(&h));

    // The oldest task runs; the copies delivered while it runs are not run.
    let running = s.run_elsewhere(s.take().expect("the first task"), 1).await;
    for _ in 0..2 {
        let (q, copy) = s.take().expect("a copy");
        s.engine.handle(&q, copy).await.expect("copy handled");
    }
    assert_eq!(
        s.runs.load(Ordering::SeqCst),
        1,
        "a copy ran beside the task"
    );
    s.gate.add_permits(100);
    running.await.expect("joined").expect("handled");
    // The remaining copies find the attempt done.
    s.deliver_all().await;
    assert_eq!(
        s.runs.load(Ordering::SeqCst),
        1,
        "a copy ran after the task"
    );
    let summary = s.engine.get(&id).await.expect("summary");
    assert_eq!(summary.status, WorkflowStatus::Completed, "{summary:?}");
    assert_eq!(summary.output, Some(json!(14)));
    let h = history(&s.engine, &id).await;
    assert_eq!(failures(&h), 0);
    assert_eq!(
        count(&h, |d| matches!(d, EventData::ActivityStarted { .. })),
        1
    );
}

/// A task received when its deadline no longer leaves its start-to-close time moves the
/// deadline: the sweeper sends no copy while it runs for nearly its whole timeout.
#[tokio::test(start_paused = true)]
async fn a_task_received_late_is_not_sent_again_while_it_runs() {
    let s = setup(EngineConfig::default(), ActivityOptions::default(), 0);
    let id = s.start().await;
    // Received 35 s after it was sent: 5 s before its deadline.
    s.sweep_for(STC + GRACE - Duration::from_secs(5)).await;
    assert_eq!(s.pending_activity_tasks(), 1);
    let running = s.run_elsewhere(s.take().expect("the task"), 1).await;
    // It runs for 9 s, past the deadline it was sent with.
    s.sweep_for(STC - Duration::from_secs(1)).await;
    assert_eq!(s.pending_activity_tasks(), 0, "sent again while it ran");
    s.gate.add_permits(1);
    running.await.expect("joined").expect("handled");
    s.deliver_all().await;
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
    let summary = s.engine.get(&id).await.expect("summary");
    assert_eq!(summary.status, WorkflowStatus::Completed, "{summary:?}");
}

/// An attempt that a worker started and then lost (the worker died), again and again,
/// is still given up as `timeout.lost` after `max_redeliveries` copies; a copy the
/// queue delivers again (receive count 2) takes the attempt over at once.
#[tokio::test(start_paused = true)]
async fn an_attempt_lost_with_its_worker_each_time_is_given_up() {
    let config = EngineConfig {
        max_redeliveries: 1,
        ..EngineConfig::default()
    };
    let options = ActivityOptions::default().retry(RetryPolicy::no_retries());
    let s = setup(config, options, 0);
    let id = s.start().await;
    // The task waits past its deadline: the sweeper sends a copy.
    s.sweep_for(STC + GRACE + Duration::from_secs(1)).await;
    assert_eq!(s.pending_activity_tasks(), 2);
    // A worker takes the first task and dies while it runs.
    s.run_elsewhere(s.take().expect("the first task"), 1)
        .await
        .abort();
    // The copy is not run while the first worker's start stands; the queue's own
    // redelivery of that copy (its worker died) takes over.
    let (q, copy) = s.take().expect("the copy");
    s.engine
        .handle(&q, copy.clone())
        .await
        .expect("copy handled");
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
    s.run_elsewhere((q, copy), 2).await.abort();
    // Its deadline passes: the sweeper sends it again once (max_redeliveries 1).
    s.sweep_for(STC + GRACE + Duration::from_secs(1)).await;
    let h = history(&s.engine, &id).await;
    assert_eq!(failures(&h), 0, "{:?}", types(&h));
    s.run_elsewhere(s.take().expect("the redelivery"), 1)
        .await
        .abort();
    // Lost again: given up.
    s.sweep_for(STC + GRACE + Duration::from_secs(1)).await;
    s.deliver_all().await;
    let summary = s.engine.get(&id).await.expect("summary");
    assert_eq!(summary.status, WorkflowStatus::Failed, "{summary:?}");
    let h = history(&s.engine, &id).await;
    assert_eq!(failed_kinds(&h), ["timeout.lost"]);
    assert_eq!(s.runs.load(Ordering::SeqCst), 3);
}

/// An attempt no worker has started is given up when its schedule-to-close time has
/// passed, with that timeout, instead of being sent again.
#[tokio::test(start_paused = true)]
async fn an_unstarted_attempt_times_out_at_its_schedule_to_close() {
    let options = ActivityOptions::default().schedule_to_close(Duration::from_secs(300));
    let s = setup(EngineConfig::default(), options, 0);
    let id = s.start().await;
    s.sweep_for(Duration::from_secs(400)).await;
    s.deliver_all().await;
    assert_eq!(s.runs.load(Ordering::SeqCst), 0);
    let summary = s.engine.get(&id).await.expect("summary");
    assert_eq!(summary.status, WorkflowStatus::Failed, "{summary:?}");
    let h = history(&s.engine, &id).await;
    assert_eq!(failed_kinds(&h), ["timeout.schedule_to_close"]);
}
