//! Activity tasks that wait in a queue's backlog longer than their deadline, copies
//! the sweeper sends meanwhile, and attempts whose worker is lost after it started.
//! The queue is delivered from by hand and time is tokio's, paused.

mod common;

use common::*;
use marathon_core::memory::{MemoryQueue, MemoryStore};
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, Engine, EngineConfig, EventData,
    OutgoingMessage, Queue, RetryPolicy, Store, Task, WorkflowContext, WorkflowId, WorkflowStatus,
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
/// otherwise) whose runs wait for a permit of the gate, on a memory store.
fn setup(config: EngineConfig, options: ActivityOptions) -> Setup {
    setup_on(Arc::new(MemoryStore::default()), config, options)
}

/// [`setup`] with defaults on a [`HookStore`].
fn hooked() -> (Arc<HookStore>, Setup) {
    let store = Arc::new(HookStore::default());
    let s = setup_on(
        store.clone(),
        EngineConfig::default(),
        ActivityOptions::default(),
    );
    (store, s)
}

/// [`setup`] on `store`.
fn setup_on(store: Arc<dyn Store>, config: EngineConfig, options: ActivityOptions) -> Setup {
    let queue = Arc::new(HandQueue::default());
    let dyn_queue: Arc<dyn Queue> = queue.clone();
    let runs = Arc::new(AtomicU32::new(0));
    let gate = Arc::new(Semaphore::new(0));
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
        self.queue.count(false)
    }

    /// Starts a sweep on `store` (this setup's) and returns once it has claimed and is
    /// held at its summary read, before it writes or sends anything; `store.release`
    /// lets it go on.
    async fn sweep_held(&self, store: &HookStore) -> tokio::task::JoinHandle<usize> {
        store.hold_get.store(true, Ordering::SeqCst);
        let engine = self.engine.clone();
        let held = store.held.notified();
        let sweep = tokio::spawn(async move { engine.sweep(100).await.expect("sweep") });
        held.await;
        sweep
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
    let s = setup(EngineConfig::default(), ActivityOptions::default());
    let id = s.start().await;
    s.sweep_for((STC + GRACE) * 25).await;
    // Sent again at 1, 3, 7 and 15 times the deadline, then every 16 times.
    assert_eq!(s.pending_activity_tasks() - 1, 4, "copies");
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
    let s = setup(EngineConfig::default(), ActivityOptions::default());
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
/// is still given up as `timeout.lost` after `max_redeliveries` copies; the queue's
/// redelivery (receive count 2) of the copy whose worker died takes the attempt over
/// at once, and a redelivery of another copy does not.
#[tokio::test(start_paused = true)]
async fn an_attempt_lost_with_its_worker_each_time_is_given_up() {
    let config = EngineConfig {
        max_redeliveries: 1,
        ..EngineConfig::default()
    };
    let options = ActivityOptions::default().retry(RetryPolicy::no_retries());
    let s = setup(config, options);
    let id = s.start().await;
    // The task waits past its deadline: the sweeper sends a copy.
    s.sweep_for(STC + GRACE + Duration::from_secs(1)).await;
    assert_eq!(s.pending_activity_tasks(), 2);
    // A worker takes the first task and dies while it runs.
    let first = s.take().expect("the first task");
    s.run_elsewhere(first.clone(), 1).await.abort();
    // Neither the copy nor a redelivery of it runs while the first worker's start
    // stands; the queue's redelivery of the first task (its worker died) takes over.
    let (q, copy) = s.take().expect("the copy");
    for receive_count in [1, 2] {
        s.engine
            .handle_delivery(&q, copy.clone(), receive_count)
            .await
            .expect("copy handled");
    }
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
    s.run_elsewhere(first, 2).await.abort();
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
    let s = setup(EngineConfig::default(), options);
    let id = s.start().await;
    s.sweep_for(Duration::from_secs(400)).await;
    s.deliver_all().await;
    assert_eq!(s.runs.load(Ordering::SeqCst), 0);
    let summary = s.engine.get(&id).await.expect("summary");
    assert_eq!(summary.status, WorkflowStatus::Failed, "{summary:?}");
    let h = history(&s.engine, &id).await;
    assert_eq!(failed_kinds(&h), ["timeout.schedule_to_close"]);
}

/// A worker that marks the attempt started between the sweeper's claim and its resend
/// keeps it: the resend is not written, no copy is sent, and nothing runs twice.
#[tokio::test(start_paused = true)]
async fn a_start_between_the_sweepers_claim_and_resend_stands() {
    let (store, s) = hooked();
    s.start().await;
    let original = s.take().expect("the activity task");
    tokio::time::advance(STC + GRACE + Duration::from_secs(1)).await;
    // Claimed, and held before the resend: the late original is marked and runs.
    let sweep = s.sweep_held(&store).await;
    let _running = s.run_elsewhere(original, 1).await;
    store.release.add_permits(1);
    assert_eq!(sweep.await.expect("joined"), 1);
    assert_eq!(s.pending_activity_tasks(), 0, "a copy was sent");
    s.gate.add_permits(1);
    s.deliver_all().await;
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
}

/// A task sent before tasks carried their deadline is marked like a late one, so it
/// does not run beside the sweeper's copy.
#[tokio::test(start_paused = true)]
async fn a_task_without_a_deadline_does_not_run_beside_a_copy() {
    let s = setup(EngineConfig::default(), ActivityOptions::default());
    s.start().await;
    let (q, mut original) = s.take().expect("the activity task");
    if let Task::Activity(t) = &mut original {
        // As the previous version sent it.
        let mut v = serde_json::to_value(&*t).expect("encodes");
        let fields = v.as_object_mut().expect("an object");
        assert!(fields.remove("deadline").is_some());
        *t = serde_json::from_value(v).expect("an old task decodes");
    }
    s.sweep_for(STC + GRACE + Duration::from_secs(1)).await;
    let _copy = s.run_elsewhere(s.take().expect("the copy"), 1).await;
    s.engine.handle(&q, original).await.expect("handled");
    assert_eq!(
        s.runs.load(Ordering::SeqCst),
        1,
        "the old task ran beside the copy"
    );
    s.gate.add_permits(2);
}

/// A copy the queue delivers again after a store error (receive count 2) does not take
/// the attempt over from the worker running another copy of it.
#[tokio::test(start_paused = true)]
async fn a_copy_redelivered_after_an_error_does_not_take_over_another_copys_attempt() {
    let (store, s) = hooked();
    s.start().await;
    let original = s.take().expect("the activity task");
    s.sweep_for(STC + GRACE + Duration::from_secs(1)).await;
    let (q, copy) = s.take().expect("the sweeper's copy");
    let _running = s.run_elsewhere(original, 1).await;
    let queue = MemoryQueue::default();
    queue
        .enqueue(&q, vec![OutgoingMessage::now(copy)])
        .await
        .expect("enqueue");
    let receive = || queue.receive(&q, 1, Duration::ZERO, Duration::from_secs(60));
    let d = receive().await.expect("receive").remove(0);
    store.fail_start.store(true, Ordering::SeqCst);
    assert!(
        s.engine
            .handle_delivery(&q, d.task, d.receive_count)
            .await
            .is_err()
    );
    // Handed back, as a worker does with a task that failed.
    queue
        .nack(&q, &d.receipt, Duration::from_secs(1))
        .await
        .expect("nack");
    tokio::time::advance(Duration::from_secs(2)).await;
    let d = receive().await.expect("receive").remove(0);
    assert_eq!(d.receive_count, 2);
    s.engine
        .handle_delivery(&q, d.task, d.receive_count)
        .await
        .expect("handled");
    assert_eq!(s.runs.load(Ordering::SeqCst), 1, "the redelivered copy ran");
    s.gate.add_permits(2);
}

/// An unstarted attempt is given up at its schedule-to-close, not at the resend after.
#[tokio::test(start_paused = true)]
async fn an_unstarted_attempt_is_given_up_when_its_schedule_to_close_passes() {
    let options = ActivityOptions::default().schedule_to_close(Duration::from_secs(1000));
    let s = setup(EngineConfig::default(), options);
    let id = s.start().await;
    s.sweep_for(Duration::from_secs(1010)).await;
    let h = history(&s.engine, &id).await;
    assert_eq!(
        failed_kinds(&h),
        ["timeout.schedule_to_close"],
        "{:?}",
        types(&h)
    );
}

/// Resends follow the documented doubling: after start-to-close + grace, then after
/// twice that, four times, eight, sixteen, and sixteen from then on.
#[tokio::test(start_paused = true)]
async fn resends_double_their_wait() {
    let s = setup(EngineConfig::default(), ActivityOptions::default());
    s.start().await;
    let sent = tokio::time::Instant::now();
    let d = STC + GRACE;
    let second = Duration::from_secs(1);
    for (i, times) in [1u32, 3, 7, 15, 31, 47].into_iter().enumerate() {
        let due = sent + d * times;
        s.sweep_for(due - second - tokio::time::Instant::now())
            .await;
        assert_eq!(s.pending_activity_tasks() - 1, i, "copies before {times} x");
        s.sweep_for(2 * second).await;
        assert_eq!(
            s.pending_activity_tasks() - 1,
            i + 1,
            "copies after {times} x"
        );
    }
}

/// The queue's redelivery of the copy whose worker was lost takes the attempt over
/// between the sweeper's claim and its give-up (`timeout.lost`): the give-up does not
/// erase that start (as the resend does not), and the attempt's result counts.
#[tokio::test(start_paused = true)]
async fn a_take_over_between_the_sweepers_claim_and_give_up_stands() {
    let store = Arc::new(HookStore::default());
    let config = EngineConfig {
        max_redeliveries: 0,
        ..EngineConfig::default()
    };
    let options = ActivityOptions::default().retry(RetryPolicy::no_retries());
    let s = setup_on(store.clone(), config, options);
    let id = s.start().await;
    let original = s.take().expect("the activity task");
    // Received late (5 s left): marked started by copy 0; its worker dies.
    tokio::time::advance(STC + GRACE - Duration::from_secs(5)).await;
    s.run_elsewhere(original.clone(), 1).await.abort();
    // The mark's deadline passes: the sweeper claims the started-and-lost attempt
    // (max_redeliveries 0: it gives up) and is held before it writes.
    tokio::time::advance(STC + GRACE + Duration::from_secs(1)).await;
    let sweep = s.sweep_held(&store).await;
    // Meanwhile the queue delivers copy 0 again (its worker died): it takes over.
    let running = s.run_elsewhere(original, 2).await;
    store.release.add_permits(1);
    assert_eq!(sweep.await.expect("joined"), 1);
    s.gate.add_permits(1);
    running.await.expect("joined").expect("handled");
    s.deliver_all().await;
    let h = history(&s.engine, &id).await;
    let summary = s.engine.get(&id).await.expect("summary");
    assert_eq!(
        (summary.status, summary.output),
        (WorkflowStatus::Completed, Some(json!(14))),
        "{:?} {:?}",
        failed_kinds(&h),
        types(&h)
    );
}

/// A workflow task that waits in a backlog is sent again less and less often (after
/// its deadline, then twice that, four times, ...), not once per deadline; the
/// copies find nothing to do once it ran.
#[tokio::test(start_paused = true)]
async fn a_waiting_workflow_task_is_sent_again_less_and_less_often() {
    let s = setup(EngineConfig::default(), ActivityOptions::default());
    let id = start(&s.engine, "one", json!(null)).await;
    let deadline = EngineConfig::default().workflow_task_deadline;
    s.sweep_for(deadline * 25 + Duration::from_secs(1)).await;
    // Sent again at 1, 3, 7 and 15 times the deadline.
    assert_eq!(s.queue.count(true) - 1, 4, "copies");
    s.gate.add_permits(1);
    s.deliver_all().await;
    let summary = s.engine.get(&id).await.expect("summary");
    assert_eq!(summary.status, WorkflowStatus::Completed, "{summary:?}");
    assert_eq!(s.runs.load(Ordering::SeqCst), 1);
    let h = history(&s.engine, &id).await;
    assert_eq!(
        count(&h, |d| matches!(d, EventData::ActivityScheduled { .. })),
        1
    );
}

/// A timer fired in the same sweep that claims the workflow's waiting task owes a task
/// of its own: the sweeper's resend of the claimed task does not replace that entry
/// (both were due at the claim's lease end), so one task is sent, and if every task is
/// lost the timer's task is recovered one deadline later, not two.
#[tokio::test(start_paused = true)]
async fn a_timer_fired_in_the_same_sweep_keeps_its_fresh_workflow_task_entry() {
    let (store, _) = backends();
    let queue = Arc::new(HandQueue::default());
    let dyn_queue: Arc<dyn Queue> = queue.clone();
    let engine = builder(&store, &dyn_queue)
        .workflow("sleepy", |ctx: WorkflowContext, (): ()| async move {
            ctx.sleep(Duration::from_secs(60)).await?;
            let v: u32 = ctx.signal("go").await?;
            Ok(v)
        })
        .build();
    let d = EngineConfig::default().workflow_task_deadline;
    let wf_tasks = || queue.count(true);
    let id = start(&engine, "sleepy", json!(null)).await;
    let (q, t) = queue.pending.lock().remove(0);
    engine.handle(&q, t).await.expect("first task");
    tokio::time::advance(Duration::from_secs(31)).await;
    // The signal's task waits in the queue; its entry falls due at 61 s.
    engine
        .signal(&id, "go", json!(7), None)
        .await
        .expect("signal");
    assert_eq!(wf_tasks(), 1);
    // One sweep at 62 s claims the timer and the waiting task.
    tokio::time::advance(Duration::from_secs(31)).await;
    engine.sweep(100).await.expect("sweep");
    assert_eq!(wf_tasks() - 1, 1, "workflow tasks the sweep sent");
    queue.pending.lock().clear();
    tokio::time::advance(d + Duration::from_secs(1)).await;
    engine.sweep(100).await.expect("sweep");
    assert!(
        wf_tasks() >= 1,
        "no workflow task recovered one deadline after the timer owed it"
    );
}

/// The queue's redelivery of a task whose worker died while it streamed progress
/// records its own progress in full, told apart from the lost execution's by
/// `execution` (before, its first events were dropped as repeats of the lost
/// execution's, so a reader saw the lost execution's tokens followed by the rest of
/// the new one's).
#[tokio::test(start_paused = true)]
async fn a_take_over_streams_its_own_progress_in_full() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let queue = Arc::new(HandQueue::default());
    let dyn_queue: Arc<dyn Queue> = queue.clone();
    let gate = Arc::new(Semaphore::new(0));
    let engine = builder(&store, &dyn_queue)
        .workflow("one", |ctx: WorkflowContext, (): ()| async move {
            let out: u32 = ctx.activity("stream", &()).await?;
            Ok(out)
        })
        .activity("stream", {
            let gate = gate.clone();
            move |ctx: ActivityContext, (): ()| {
                let gate = gate.clone();
                async move {
                    for token in ["a", "b"] {
                        ctx.progress(&json!(token)).await?;
                    }
                    gate.acquire().await.expect("gate open").forget();
                    Ok::<_, ActivityError>(1u32)
                }
            }
        })
        .build();
    let take = || {
        let mut pending = queue.pending.lock();
        (!pending.is_empty()).then(|| pending.remove(0))
    };
    let id = start(&engine, "one", json!(null)).await;
    let (q, task) = take().expect("first workflow task");
    engine.handle(&q, task).await.expect("workflow task");
    let (q, task) = take().expect("the activity task");
    // A worker streams both tokens and dies.
    let lost = tokio::spawn({
        let (engine, q, task) = (engine.clone(), q.clone(), task.clone());
        async move { engine.handle_delivery(&q, task, 1).await }
    });
    while count(&history(&engine, &id).await, |d| {
        matches!(d, EventData::Progress { .. })
    }) < 2
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    lost.abort();
    // The queue delivers the task again: it runs to the end.
    gate.add_permits(1);
    engine
        .handle_delivery(&q, task, 2)
        .await
        .expect("redelivery handled");
    while let Some((q, task)) = take() {
        engine.handle(&q, task).await.expect("task handled");
    }
    assert_eq!(
        engine.get(&id).await.expect("summary").status,
        WorkflowStatus::Completed
    );
    let progress: Vec<(u32, serde_json::Value)> = history(&engine, &id)
        .await
        .into_iter()
        .filter_map(|e| match e.data {
            EventData::Progress {
                execution, data, ..
            } => Some((execution, data)),
            _ => None,
        })
        .collect();
    assert_eq!(progress.len(), 4, "{progress:?}");
    let (first, second) = (progress[0].0, progress[2].0);
    assert_ne!(first, second, "{progress:?}");
    assert_eq!(
        progress,
        [
            (first, json!("a")),
            (first, json!("b")),
            (second, json!("a")),
            (second, json!("b"))
        ]
    );
}

/// An attempt that no worker takes is given up once its schedule-to-close (plus the
/// grace) has passed, not a whole start-to-close later: its owed deadline counts the
/// attempt's budget (start-to-close cut to what the schedule-to-close leaves), and so
/// does the deadline of a retry. Before, the first send and every retry were owed for
/// start-to-close + grace, so a call on a task queue no worker served outlived its
/// schedule-to-close by up to that much (5.5 min by default).
#[tokio::test(start_paused = true)]
async fn a_short_schedule_to_close_bounds_an_attempt_no_worker_takes() {
    let config = EngineConfig {
        activity_grace: Duration::from_secs(1),
        ..EngineConfig::default()
    };
    // Start-to-close 10 s, schedule-to-close 3 s: given up at 3 s + 1 s of grace.
    let options = ActivityOptions::default().schedule_to_close(Duration::from_secs(3));
    let s = setup(config, options);
    let id = s.start().await;
    s.sweep_for(Duration::from_secs(5)).await;
    let h = history(&s.engine, &id).await;
    assert_eq!(
        failed_kinds(&h),
        ["timeout.schedule_to_close"],
        "{:?}",
        types(&h)
    );
}

/// A retry is owed no longer than its call has left either: the first attempt fails
/// (1 s backoff), no worker takes the retry, and the call ends at its 5 s
/// schedule-to-close + 1 s of grace. Before, the retry was owed for 1 s + 10 s + 1 s.
#[tokio::test(start_paused = true)]
async fn a_retry_no_worker_takes_ends_at_the_schedule_to_close() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let queue = Arc::new(HandQueue::default());
    let dyn_queue: Arc<dyn Queue> = queue.clone();
    let engine = builder(&store, &dyn_queue)
        .config(EngineConfig {
            activity_grace: Duration::from_secs(1),
            ..EngineConfig::default()
        })
        .workflow("one", |ctx: WorkflowContext, (): ()| async move {
            let options = ActivityOptions::default()
                .start_to_close(STC)
                .schedule_to_close(Duration::from_secs(5))
                .retry(RetryPolicy {
                    initial_interval: Duration::from_secs(1),
                    ..RetryPolicy::default()
                });
            ctx.activity_with::<_, u32>("flaky", &(), options).await
        })
        .activity("flaky", |_ctx: ActivityContext, (): ()| async move {
            Err::<u32, _>(ActivityError::retryable("503"))
        })
        .build();
    let id = start(&engine, "one", json!(null)).await;
    for _ in 0..2 {
        // The workflow task, then the first attempt.
        let (q, task) = queue.pending.lock().remove(0);
        engine.handle(&q, task).await.expect("handled");
    }
    let h = history(&engine, &id).await;
    assert_eq!(
        count(&h, |d| matches!(d, EventData::ActivityRetrying { .. })),
        1
    );
    let end = tokio::time::Instant::now() + Duration::from_secs(7);
    while tokio::time::Instant::now() < end {
        tokio::time::advance(Duration::from_secs(1)).await;
        engine.sweep(100).await.expect("sweep");
    }
    let h = history(&engine, &id).await;
    assert_eq!(
        failed_kinds(&h),
        ["timeout.schedule_to_close"],
        "{:?}",
        types(&h)
    );
}
