//! Workers: receive tasks from the queue with bounded concurrency per task
//! queue, run them on the engine, sweep overdue work (timers, lost tasks) and
//! shut down gracefully.

use futures::FutureExt as _;
use serde::{Deserialize, Serialize};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::engine::Engine;
use crate::observe::{TaskFuture, TaskScope};
use crate::queue::Delivery;

/// One task queue a worker serves, and how many of its tasks may run at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    /// Task queue name.
    pub name: String,
    /// Most tasks of this queue running at once on this worker.
    pub concurrency: usize,
    /// Receive calls kept in flight at once on this queue, sharing `concurrency`
    /// (several long polls hide a remote queue's round-trip latency). Default 1.
    #[serde(default = "one")]
    pub receivers: usize,
}

fn one() -> usize {
    1
}

impl QueueSpec {
    /// Serves `name` with at most `concurrency` tasks at once and one receiver.
    pub fn new(name: impl Into<String>, concurrency: usize) -> Self {
        Self {
            name: name.into(),
            concurrency,
            receivers: 1,
        }
    }
}

/// The shortest `poll_wait`, `visibility`, `sweep_interval` and
/// `dead_letter_interval` a [`Worker`] uses; shorter ones are taken as it.
pub const MIN_WORKER_INTERVAL: Duration = Duration::from_millis(1);

/// Tunables of a worker; every field has a documented default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct WorkerConfig {
    /// Task queues served. Default: `default` with concurrency 64.
    pub queues: Vec<QueueSpec>,
    /// Most messages asked for per receive. Default 10 (SQS's limit).
    pub receive_batch: usize,
    /// Longest a receive waits for a message. Default 5 s.
    #[serde(with = "crate::model::duration_ms", rename = "poll_wait_ms")]
    pub poll_wait: Duration,
    /// Visibility timeout of received messages; extended while a task runs. Default 30 s.
    #[serde(with = "crate::model::duration_ms", rename = "visibility_ms")]
    pub visibility: Duration,
    /// Run the sweeper (timers and recovery of lost tasks) on this worker. Default true.
    pub sweeper: bool,
    /// How often the sweeper looks for due timers and overdue work. Default 200 ms.
    #[serde(with = "crate::model::duration_ms", rename = "sweep_interval_ms")]
    pub sweep_interval: Duration,
    /// Most overdue entries claimed per sweep. Default 256.
    pub sweep_batch: usize,
    /// How long in-flight tasks may finish after shutdown begins; `Duration::MAX` waits
    /// for all of them. Default 30 s.
    #[serde(with = "crate::model::duration_ms", rename = "shutdown_grace_ms")]
    pub shutdown_grace: Duration,
    /// How often dead-lettered tasks are drained and reported and queue depth is sampled. Default 10 s.
    #[serde(with = "crate::model::duration_ms", rename = "dead_letter_interval_ms")]
    pub dead_letter_interval: Duration,
    /// Finished workflows are deleted this long after they close; `None` keeps them. Default none.
    #[serde(
        with = "crate::model::duration_ms::option",
        rename = "retention_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub retention: Option<Duration>,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            queues: vec![QueueSpec::new("default", 64)],
            receive_batch: 10,
            poll_wait: Duration::from_secs(5),
            visibility: Duration::from_secs(30),
            sweeper: true,
            sweep_interval: Duration::from_millis(200),
            sweep_batch: 256,
            shutdown_grace: Duration::from_secs(30),
            dead_letter_interval: Duration::from_secs(10),
            retention: None,
        }
    }
}

/// What a graceful shutdown did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ShutdownReport {
    /// Tasks that were running when shutdown began and finished within the grace period.
    pub finished: usize,
    /// Tasks still running after the grace period, stopped and handed back to the queue.
    pub handed_back: usize,
}

#[derive(Default)]
struct Counters {
    in_flight: AtomicUsize,
    handed_back: AtomicUsize,
}

/// A running worker; dropping it does not stop it, [`Worker::shutdown`] does.
pub struct Worker {
    stop: CancellationToken,
    hard_stop: CancellationToken,
    tracker: TaskTracker,
    loops: TaskTracker,
    counters: Arc<Counters>,
    grace: Duration,
}

impl Worker {
    /// Starts receiving and sweeping on the current tokio runtime.
    ///
    /// `poll_wait`, `visibility`, `sweep_interval` and `dead_letter_interval` below
    /// [`MIN_WORKER_INTERVAL`] are taken as it, as a concurrency, `receivers` or
    /// `sweep_batch` of 0 is taken as 1: a zero `poll_wait` would spin the receive
    /// loop on an empty in-memory queue, and the other loops would be paced only by
    /// the timer's resolution.
    #[must_use]
    pub fn start(engine: Engine, mut config: WorkerConfig) -> Worker {
        for interval in [
            &mut config.poll_wait,
            &mut config.visibility,
            &mut config.sweep_interval,
            &mut config.dead_letter_interval,
        ] {
            *interval = (*interval).max(MIN_WORKER_INTERVAL);
        }
        let stop = CancellationToken::new();
        let hard_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let loops = TaskTracker::new();
        let counters = Arc::new(Counters::default());
        let config = Arc::new(config);
        for spec in &config.queues {
            // The receivers of one queue share its concurrency bound.
            let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
            for _ in 0..spec.receivers.max(1) {
                loops.spawn(receive_loop(
                    engine.clone(),
                    spec.clone(),
                    sem.clone(),
                    config.clone(),
                    stop.clone(),
                    hard_stop.clone(),
                    tracker.clone(),
                    counters.clone(),
                ));
            }
        }
        if config.sweeper {
            loops.spawn(sweep_loop(engine.clone(), config.clone(), stop.clone()));
        }
        loops.spawn(maintenance_loop(engine, config.clone(), stop.clone()));
        loops.close();
        Worker {
            stop,
            hard_stop,
            tracker,
            loops,
            counters,
            grace: config.shutdown_grace,
        }
    }

    /// Tasks running right now.
    #[must_use]
    pub fn in_flight(&self) -> usize {
        self.counters.in_flight.load(Ordering::Relaxed)
    }

    /// Stops receiving, lets in-flight tasks finish within the grace period, then
    /// stops the rest and hands their messages back to the queue for another replica.
    pub async fn shutdown(self) -> ShutdownReport {
        self.stop.cancel();
        // The grace counts from now: the receive loops end their current poll
        // (within `poll_wait`) meanwhile, handing back what it brings. A grace too
        // long to fall due (`Duration::MAX`: wait for every task) has no deadline.
        let deadline = tokio::time::Instant::now().checked_add(self.grace);
        let running = self.counters.in_flight.load(Ordering::Relaxed);
        self.loops.wait().await;
        self.tracker.close();
        let drained = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, self.tracker.wait())
                .await
                .is_ok(),
            None => {
                self.tracker.wait().await;
                true
            }
        };
        if !drained {
            self.hard_stop.cancel();
            self.tracker.wait().await;
        }
        let handed_back = self.counters.handed_back.load(Ordering::Relaxed);
        ShutdownReport {
            finished: running.saturating_sub(handed_back),
            handed_back,
        }
    }
}

#[expect(
    clippy::too_many_arguments,
    reason = "one receive loop's fixed wiring, called from one place"
)]
async fn receive_loop(
    engine: Engine,
    spec: QueueSpec,
    sem: Arc<Semaphore>,
    config: Arc<WorkerConfig>,
    stop: CancellationToken,
    hard_stop: CancellationToken,
    tracker: TaskTracker,
    counters: Arc<Counters>,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let first = tokio::select! {
            p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            () = stop.cancelled() => return,
        };
        let mut permits = vec![first];
        while permits.len() < config.receive_batch.max(1) {
            match sem.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        let asked = std::time::Instant::now();
        let receive = engine.queue().receive(
            &spec.name,
            permits.len(),
            config.poll_wait,
            config.visibility,
        );
        tokio::pin!(receive);
        let received = tokio::select! {
            r = &mut receive => r,
            () = stop.cancelled() => {
                if !engine.queue().finish_receive_when_stopping() {
                    return;
                }
                // Not dropped: a dropped SQS long poll stays open at the server, which
                // may still hand it messages that then stay hidden for a whole
                // visibility. It ends within `poll_wait`; what it brought is handed
                // back at once below.
                receive.await
            }
        };
        if stop.is_cancelled() {
            if let Ok(deliveries) = received {
                for d in deliveries {
                    let _ = engine
                        .queue()
                        .nack(&spec.name, &d.receipt, Duration::ZERO)
                        .await;
                }
            }
            return;
        }
        let deliveries = match received {
            Ok(d) => {
                backoff = Duration::from_millis(100);
                engine
                    .observer()
                    .queue_received(&spec.name, d.len(), asked.elapsed());
                d
            }
            Err(e) => {
                tracing::warn!(queue = %spec.name, error = %e, "receive failed; retrying in {backoff:?}");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        for d in deliveries {
            let Some(permit) = permits.pop() else {
                // A queue returned more than asked for: hand the extra back.
                let _ = engine
                    .queue()
                    .nack(&spec.name, &d.receipt, Duration::ZERO)
                    .await;
                continue;
            };
            counters.in_flight.fetch_add(1, Ordering::Relaxed);
            let engine = engine.clone();
            let name = spec.name.clone();
            let config = config.clone();
            let hard_stop = hard_stop.clone();
            let counters = counters.clone();
            tracker.spawn(async move {
                run_delivery(&engine, &name, &config, d, &hard_stop, &counters).await;
                counters.in_flight.fetch_sub(1, Ordering::Relaxed);
                drop(permit);
            });
        }
    }
}

async fn run_delivery(
    engine: &Engine,
    queue: &str,
    config: &WorkerConfig,
    d: Delivery,
    hard_stop: &CancellationToken,
    counters: &Counters,
) {
    let receipt = d.receipt.clone();
    let extend = async {
        // Halfway through the visibility, however short (a floor of 500 ms let a
        // visibility under a second lapse first, so the task ran again meanwhile).
        let every = (config.visibility / 2).max(Duration::from_millis(10));
        // After a failed extension, try again soon: waiting a whole half-visibility
        // more lets the delivery lapse, and another worker runs the task meanwhile.
        let retry = (config.visibility / 10).max(Duration::from_millis(10));
        let mut wait = every;
        loop {
            tokio::time::sleep(wait).await;
            match engine
                .queue()
                .extend(queue, &receipt, config.visibility)
                .await
            {
                Ok(()) => wait = every,
                Err(crate::queue::QueueError::InvalidReceipt) => {
                    tracing::warn!(queue, "a task's delivery lapsed; it may run elsewhere too");
                    std::future::pending::<()>().await;
                }
                Err(e) => {
                    // Retryable (unreachable, throttled): soon; permanent (SQS's 12 h
                    // cap): at the usual cadence.
                    wait = if e.is_retryable() { retry } else { every };
                    tracing::warn!(queue, error = %e, "could not extend a task's visibility; trying again in {wait:?}");
                }
            }
        }
    };
    let observer = engine.observer();
    let TaskScope { span, wrap } = observer.task_scope(&d.task, d.trace_context.as_deref());
    let work: TaskFuture<'_> = Box::pin(InSpan {
        span,
        work: engine.handle_delivery(queue, d.task, d.receive_count),
    });
    let work = match wrap {
        Some(wrap) => wrap(work),
        None => work,
    };
    // A panic anywhere in the task (the engine's own code included) hands the task
    // back like an error, instead of ending this worker task without an ack or nack.
    let result = tokio::select! {
        biased;
        r = AssertUnwindSafe(work).catch_unwind() => Some(r),
        () = extend => None,
        () = hard_stop.cancelled() => None,
    };
    let failed = |e: &dyn std::fmt::Display| {
        let delay = Duration::from_secs(u64::from(d.receive_count.min(60)));
        tracing::warn!(queue, error = %e, "task failed; handing it back for {delay:?}");
        delay
    };
    match result {
        Some(Ok(Ok(()))) => {
            if let Err(e) = engine.queue().ack(queue, vec![receipt]).await {
                tracing::warn!(queue, error = %e, "ack failed; the task will be delivered again");
            }
        }
        Some(Ok(Err(e))) => {
            let delay = failed(&e);
            let _ = engine.queue().nack(queue, &receipt, delay).await;
        }
        Some(Err(_)) => {
            let delay = failed(&"the task panicked");
            let _ = engine.queue().nack(queue, &receipt, delay).await;
        }
        None => {
            counters.handed_back.fetch_add(1, Ordering::Relaxed);
            let _ = engine.queue().nack(queue, &receipt, Duration::ZERO).await;
        }
    }
}

async fn sweep_loop(engine: Engine, config: Arc<WorkerConfig>, stop: CancellationToken) {
    loop {
        let batch = config.sweep_batch.max(1);
        let claimed = match engine.sweep(batch).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "sweep failed");
                0
            }
        };
        // A full batch: more is overdue, so go on at once, but let other tasks run
        // and a shutdown be seen.
        if claimed >= batch && !stop.is_cancelled() {
            tokio::task::yield_now().await;
            continue;
        }
        tokio::select! {
            () = tokio::time::sleep(config.sweep_interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Finished workflows one `purge_closed` call deletes at most.
const PURGE_BATCH: usize = 1000;

/// `purge_closed` calls a maintenance round makes at most while each deletes a full
/// batch: at most 100,000 workflows a `dead_letter_interval` (a ceiling; how fast the
/// store deletes them is not measured).
const PURGE_BATCHES: usize = 100;

async fn maintenance_loop(engine: Engine, config: Arc<WorkerConfig>, stop: CancellationToken) {
    // Each served queue's dead-letter count exists from the start, at 0: a count that
    // first appeared at its first dead letter would start there, and `increase()` (an
    // alert on dead letters) would never see that one.
    for spec in &config.queues {
        engine.observer().dead_lettered(&spec.name, 0);
    }
    loop {
        tokio::select! {
            () = tokio::time::sleep(config.dead_letter_interval) => {}
            () = stop.cancelled() => return,
        }
        for spec in &config.queues {
            match engine.queue().depth(&spec.name).await {
                Ok(depth) => engine.observer().queue_depth(&spec.name, depth),
                Err(e) => {
                    tracing::warn!(queue = %spec.name, error = %e, "sampling the queue depth failed");
                    engine.observer().queue_depth_unknown(&spec.name);
                }
            }
            match engine.queue().drain_dead_letters(&spec.name, 100).await {
                Ok(tasks) => {
                    if !tasks.is_empty() {
                        engine.observer().dead_lettered(&spec.name, tasks.len());
                    }
                    for task in tasks {
                        tracing::error!(
                            queue = %spec.name,
                            workflow_id = %task.workflow_id(),
                            ?task,
                            "task was dead-lettered after too many deliveries; its owed work is re-delivered by the sweeper"
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(queue = %spec.name, error = %e, "draining dead letters failed")
                }
            }
        }
        if let Some(retention) = config.retention {
            let cutoff = Timestamp(
                engine
                    .now()
                    .as_millis()
                    .saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX)),
            );
            // Full batches go on at once (up to PURGE_BATCHES a round), so a fleet
            // that closes more than a batch per interval does not fall behind for good.
            for _ in 0..PURGE_BATCHES {
                match engine.store().purge_closed(cutoff, PURGE_BATCH).await {
                    Ok(n) if n >= PURGE_BATCH && !stop.is_cancelled() => {
                        tokio::task::yield_now().await;
                    }
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "purging finished workflows failed");
                        break;
                    }
                }
            }
        }
    }
}

use crate::model::Timestamp;

pin_project_lite::pin_project! {
    /// Polls `work` inside `span`. Unlike `tracing::Instrumented`, dropping it does not
    /// enter the span once more: a task's future is dropped after it finished, holding
    /// nothing whose drop could log, and every enter and exit is a call into each
    /// layer of the subscriber (about 5 k instructions per W3 workflow with logs and
    /// traces). A task stopped before it finished (at shutdown) is dropped as it is.
    struct InSpan<F> {
        span: tracing::Span,
        #[pin]
        work: F,
    }
}

impl<F: Future> Future for InSpan<F> {
    type Output = F::Output;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        let this = self.project();
        let _entered = this.span.enter();
        this.work.poll(cx)
    }
}
