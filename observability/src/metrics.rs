//! [`Metrics`]: Marathon's Prometheus metrics, fed by the engine through [`Observer`].

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use marathon_core::{AttemptOutcome, Observer, Task, TaskOutcome, TaskScope, WorkflowStatus};
use prometheus::{
    Encoder, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::sharded::{ShardedHistogram, ShardedHistogramVec};

/// Errors of this crate's metrics.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MetricsError {
    /// A metric could not be created or registered (a name clash in a shared registry).
    #[error("registering a metric failed: {0}")]
    Register(#[from] prometheus::Error),
}

/// Spans the trace pipeline lost, by reason: one process-wide counter (the pipeline is
/// set up once per process, apart from any [`Metrics`]), registered in every
/// [`Metrics`]' registry. Both reasons are present from the start, at 0.
static SPANS_DROPPED: LazyLock<Result<IntCounterVec, prometheus::Error>> = LazyLock::new(|| {
    let c = IntCounterVec::new(
        Opts::new(
            "marathon_trace_spans_dropped_total",
            "Finished spans that never reached the collector, by reason (queue_full: the export queue was full; export_failed: the collector did not take the batch, or rejected spans in it).",
        ),
        &["reason"],
    )?;
    for reason in ["queue_full", "export_failed"] {
        c.with_label_values(&[reason]);
    }
    Ok(c)
});

/// Counts `n` spans the trace pipeline lost for `reason` (`queue_full`, `export_failed`).
#[cfg_attr(
    not(feature = "otel"),
    expect(dead_code, reason = "only the otel pipeline drops spans")
)]
pub(crate) fn spans_dropped(reason: &str, n: u64) {
    if let Ok(c) = &*SPANS_DROPPED {
        c.with_label_values(&[reason]).inc_by(n);
    }
}

/// Spans counted as lost for `reason` so far.
#[cfg(all(test, feature = "otel"))]
pub(crate) fn spans_dropped_so_far(reason: &str) -> u64 {
    match &*SPANS_DROPPED {
        Ok(c) => c.with_label_values(&[reason]).get(),
        Err(_) => 0,
    }
}

/// The text exposition's content type, for the `Content-Type` of a `/metrics` response.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Buckets of whole-workflow durations: 10 ms to a day.
const WORKFLOW_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
    14400.0, 86400.0,
];
/// Buckets of activity attempts: 1 ms to an hour.
const ACTIVITY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    300.0, 900.0, 3600.0,
];
/// Buckets of in-process work (replay) and backend calls: 50 µs to 10 s.
const FAST_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];
/// Buckets of queue receives, which long-poll: 1 ms to 30 s.
const RECEIVE_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0,
];
/// Buckets of history lengths, in events.
const HISTORY_BUCKETS: &[f64] = &[
    1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 50000.0,
];

/// Timeout kinds reported as such; any other `timeout.*` kind is counted as `other`,
/// so that user-chosen error kinds cannot grow the label set.
const TIMEOUT_KINDS: &[&str] = &["start_to_close", "schedule_to_close", "heartbeat", "lost"];

/// Marathon's Prometheus metrics in their own [`Registry`].
///
/// Implements [`Observer`]: give it to the engine with
/// `Engine::builder().observer(metrics.clone())` (as `Arc<Metrics>`), wrap the
/// backends in [`crate::InstrumentedStore`] / [`crate::InstrumentedQueue`], and serve
/// [`Metrics::render`] on `/metrics`. Every name starts with `marathon_`; labels
/// carry registered names (workflow, activity, queue), outcomes and backends, never ids.
///
/// With the `otel` feature, [`Observer::task_scope`] and [`Observer::trace_context`]
/// carry W3C trace context through queue messages (see [`crate::init_tracing`]).
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub(crate) workflows_started: IntCounterVec,
    workflows_closed: IntCounterVec,
    workflow_duration: ShardedHistogramVec,
    workflow_tasks: IntCounterVec,
    workflow_task_duration: ShardedHistogramVec,
    workflow_history: ShardedHistogramVec,
    activity_attempts: IntCounterVec,
    activity_duration: ShardedHistogramVec,
    activity_retries: IntCounterVec,
    activity_timeouts: IntCounterVec,
    activities_in_flight: IntGaugeVec,
    overdue: IntCounterVec,
    queue_depth: IntGaugeVec,
    queue_receive: ShardedHistogramVec,
    queue_received: IntCounterVec,
    dead_lettered: IntCounterVec,
    pub(crate) store_ops: ShardedHistogramVec,
    pub(crate) queue_ops: ShardedHistogramVec,
    llm_tokens: IntCounterVec,
    /// The label sets `llm_tokens` has taken (see [`MAX_LLM_LABEL_SETS`]).
    llm_labels: Arc<LlmLabels>,
    /// Label children resolved once per workflow or activity name (the hot path's lookups).
    series: Arc<SeriesCache>,
}

/// Most label sets `marathon_llm_tokens_total` takes (see [`Metrics::record_llm_tokens`]).
pub const MAX_LLM_LABEL_SETS: usize = 256;
/// Longest label value of `marathon_llm_tokens_total`, in bytes; longer ones are cut.
pub const MAX_LLM_LABEL_LEN: usize = 128;

/// The label sets `marathon_llm_tokens_total` has taken.
#[derive(Debug, Default)]
struct LlmLabels {
    seen: std::sync::Mutex<std::collections::HashSet<[String; 3]>>,
    warned: std::sync::atomic::AtomicBool,
}

impl LlmLabels {
    /// The labels to count under: `labels` cut to length, or `other` for a new set
    /// past the limit.
    fn admit(&self, labels: [&str; 3]) -> [String; 3] {
        let cut = |v: &str| {
            let mut end = v.len().min(MAX_LLM_LABEL_LEN);
            while !v.is_char_boundary(end) {
                end -= 1;
            }
            v[..end].to_string()
        };
        let labels = labels.map(cut);
        let mut seen = self
            .seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if seen.contains(&labels) {
            return labels;
        }
        if seen.len() < MAX_LLM_LABEL_SETS {
            seen.insert(labels.clone());
            return labels;
        }
        drop(seen);
        if !self.warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::warn!(
                provider = %labels[0],
                model = %labels[1],
                kind = %labels[2],
                "marathon_llm_tokens_total has {MAX_LLM_LABEL_SETS} label sets: tokens under new ones count as provider/model/kind \"other\" (logged once)"
            );
        }
        ["other", "other", "other"].map(String::from)
    }
}

/// One workflow name's series, resolved on first use.
#[derive(Debug, Default)]
struct WorkflowSeries {
    started: OnceLock<IntCounter>,
    tasks: [OnceLock<IntCounter>; 4],
    task_duration: OnceLock<ShardedHistogram>,
    history: OnceLock<ShardedHistogram>,
    closed: [OnceLock<(IntCounter, ShardedHistogram)>; 4],
}

/// One activity name's series, resolved on first use.
#[derive(Debug, Default)]
struct ActivitySeries {
    attempts: [OnceLock<(IntCounter, ShardedHistogram)>; 4],
    retries: OnceLock<IntCounter>,
    timeouts: [OnceLock<IntCounter>; 5],
    in_flight: OnceLock<IntGauge>,
}

/// One queue's receive series, resolved on first use.
#[derive(Debug, Default)]
struct QueueSeries {
    receive: OnceLock<ShardedHistogram>,
    received: OnceLock<IntCounter>,
}

/// Per-name series, so that an observer call costs one map lookup instead of one
/// label-hashing lookup per metric.
#[derive(Debug, Default)]
struct SeriesCache {
    workflows: Names<WorkflowSeries>,
    activities: Names<ActivitySeries>,
    queues: Names<QueueSeries>,
}

/// Series by workflow, activity or queue name.
///
/// Read without locking: a lookup loads the current map (`ArcSwap`) and borrows the
/// series from it, while a new name copies the map (names are few, and new ones rare).
/// A read lock, and cloning the series' `Arc`, would each write to a cache line that
/// every worker thread shares, on every observer call. Hashed with foldhash (seeded at
/// random per process) rather than SipHash, which cost about 3 k instructions per W3
/// workflow.
#[derive(Debug, Default)]
struct Names<T>(ArcSwap<HashMap<String, Arc<T>, foldhash::fast::RandomState>>);

impl<T: Default> Names<T> {
    /// Calls `f` with the series of `name`, created on first use.
    fn with<R>(&self, name: &str, f: impl FnOnce(&T) -> R) -> R {
        if let Some(s) = self.0.load().get(name) {
            return f(s);
        }
        self.0.rcu(|names| {
            let mut names = HashMap::clone(names);
            names.entry(name.to_string()).or_default();
            names
        });
        match self.0.load().get(name) {
            Some(s) => f(s),
            // Names are never removed, so this is not reached; uncached then.
            None => f(&T::default()),
        }
    }
}

fn task_index(o: TaskOutcome) -> usize {
    match o {
        TaskOutcome::Recorded => 0,
        TaskOutcome::Nothing => 1,
        TaskOutcome::Conflict => 2,
        TaskOutcome::Failed => 3,
    }
}

fn attempt_index(o: AttemptOutcome) -> usize {
    match o {
        AttemptOutcome::Completed => 0,
        AttemptOutcome::Retrying => 1,
        AttemptOutcome::Failed => 2,
        AttemptOutcome::Dropped => 3,
    }
}

fn status_index(s: WorkflowStatus) -> usize {
    match s {
        WorkflowStatus::Running => 0,
        WorkflowStatus::Completed => 1,
        WorkflowStatus::Failed => 2,
        WorkflowStatus::Canceled => 3,
    }
}

/// Registers metrics in a registry all or nothing: what it registered is unregistered
/// again when it is dropped before [`Registrar::done`], so that a name clash halfway
/// leaves the registry as it was.
struct Registrar<'a> {
    registry: &'a Registry,
    registered: Vec<Box<dyn prometheus::core::Collector>>,
}

impl<'a> Registrar<'a> {
    fn new(registry: &'a Registry) -> Self {
        Registrar {
            registry,
            registered: Vec::new(),
        }
    }

    /// Registers `c`, to be unregistered unless [`Registrar::done`] is called.
    fn add<C>(&mut self, c: &C) -> Result<(), MetricsError>
    where
        C: prometheus::core::Collector + Clone + 'static,
    {
        self.registry.register(Box::new(c.clone()))?;
        self.registered.push(Box::new(c.clone()));
        Ok(())
    }

    /// Keeps everything registered.
    fn done(mut self) {
        self.registered.clear();
    }

    fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntCounterVec, MetricsError> {
        let c = IntCounterVec::new(Opts::new(name, help), labels)?;
        self.add(&c)?;
        Ok(c)
    }

    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> Result<IntGaugeVec, MetricsError> {
        let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
        self.add(&g)?;
        Ok(g)
    }

    fn histogram(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        buckets: &[f64],
    ) -> Result<ShardedHistogramVec, MetricsError> {
        let h = ShardedHistogramVec::new(
            &HistogramOpts::new(name, help).buckets(buckets.to_vec()),
            labels,
        )?;
        self.add(&h)?;
        Ok(h)
    }
}

impl Drop for Registrar<'_> {
    fn drop(&mut self) {
        for c in self.registered.drain(..) {
            // It was registered by this registrar a moment ago, so this succeeds.
            let _ = self.registry.unregister(c);
        }
    }
}

impl Metrics {
    /// All of Marathon's metrics in a new registry of their own.
    ///
    /// # Errors
    /// Never in practice: the names are fixed and the registry is new.
    pub fn new() -> Result<Metrics, MetricsError> {
        Metrics::with_registry(Registry::new())
    }

    /// All of Marathon's metrics, registered in `registry` (which may hold others too).
    ///
    /// # Errors
    /// [`MetricsError::Register`] if `registry` already has a metric of one of these
    /// names; nothing is registered then.
    pub fn with_registry(registry: Registry) -> Result<Metrics, MetricsError> {
        let mut r = Registrar::new(&registry);
        match &*SPANS_DROPPED {
            Ok(c) => r.add(c)?,
            Err(e) => return Err(prometheus::Error::Msg(e.to_string()).into()),
        }
        let metrics = Metrics {
            workflows_started: r.counter(
                "marathon_workflows_started_total",
                "Workflows created, by workflow name.",
                &["workflow"],
            )?,
            workflows_closed: r.counter(
                "marathon_workflows_closed_total",
                "Workflows finished, by workflow name and final status (completed, failed, canceled).",
                &["workflow", "status"],
            )?,
            workflow_duration: r.histogram(
                "marathon_workflow_duration_seconds",
                "Time from a workflow's start to its close, by workflow name and final status.",
                &["workflow", "status"],
                WORKFLOW_BUCKETS,
            )?,
            workflow_tasks: r.counter(
                "marathon_workflow_tasks_total",
                "Workflow tasks run, by workflow name and outcome (recorded, nothing, conflict, failed).",
                &["workflow", "outcome"],
            )?,
            workflow_task_duration: r.histogram(
                "marathon_workflow_task_seconds",
                "Time a workflow task spent running (replaying) the workflow code, by workflow name.",
                &["workflow"],
                FAST_BUCKETS,
            )?,
            workflow_history: r.histogram(
                "marathon_workflow_history_events",
                "History length in events after each workflow task, by workflow name.",
                &["workflow"],
                HISTORY_BUCKETS,
            )?,
            activity_attempts: r.counter(
                "marathon_activity_attempts_total",
                "Activity attempts ended, by activity name and outcome (completed, retrying, failed, dropped).",
                &["activity", "outcome"],
            )?,
            activity_duration: r.histogram(
                "marathon_activity_attempt_seconds",
                "Duration of activity attempts, by activity name and outcome.",
                &["activity", "outcome"],
                ACTIVITY_BUCKETS,
            )?,
            activity_retries: r.counter(
                "marathon_activity_retries_total",
                "Activity attempts that failed and were scheduled to run again, by activity name.",
                &["activity"],
            )?,
            activity_timeouts: r.counter(
                "marathon_activity_timeouts_total",
                "Activity attempts that timed out, by activity name and timeout (start_to_close, schedule_to_close, heartbeat, lost, other).",
                &["activity", "timeout"],
            )?,
            activities_in_flight: r.gauge(
                "marathon_activities_in_flight",
                "Activity attempts running on this replica now, by activity name.",
                &["activity"],
            )?,
            overdue: r.counter(
                "marathon_overdue_total",
                "Overdue owed work the sweeper claimed, by kind (workflow_task and activity: a task sent again, lost or still waiting in a backlog; timer: a timer to fire); an entry changed meanwhile is left as it is.",
                &["kind"],
            )?,
            queue_depth: r.gauge(
                "marathon_queue_depth",
                "Approximate number of tasks waiting on a task queue, sampled periodically.",
                &["queue"],
            )?,
            queue_receive: r.histogram(
                "marathon_queue_receive_seconds",
                "Latency of a worker's receive on a task queue (includes long-poll waiting).",
                &["queue"],
                RECEIVE_BUCKETS,
            )?,
            queue_received: r.counter(
                "marathon_queue_received_tasks_total",
                "Tasks received from a task queue.",
                &["queue"],
            )?,
            dead_lettered: r.counter(
                "marathon_dead_lettered_total",
                "Tasks found on a task queue's dead-letter queue after too many deliveries.",
                &["queue"],
            )?,
            store_ops: r.histogram(
                "marathon_store_operation_seconds",
                "Latency of Store calls, by operation, backend and outcome (ok, conflict, not_found, closed, invalid_cursor, error).",
                &["operation", "backend", "outcome"],
                FAST_BUCKETS,
            )?,
            queue_ops: r.histogram(
                "marathon_queue_operation_seconds",
                "Latency of Queue calls, by operation, backend and outcome (ok, error, invalid_receipt).",
                &["operation", "backend", "outcome"],
                QUEUE_OP_BUCKETS,
            )?,
            llm_tokens: r.counter(
                "marathon_llm_tokens_total",
                "LLM tokens used, by provider, model and kind (input, output, ...).",
                &["provider", "model", "kind"],
            )?,
            llm_labels: Arc::default(),
            series: Arc::default(),
            registry: registry.clone(),
        };
        r.done();
        Ok(metrics)
    }

    /// The registry holding these metrics (to register more, or to gather them).
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of every metric in the registry; serve it
    /// on `/metrics` with `Content-Type: ` [`CONTENT_TYPE`].
    #[must_use]
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec fails only on a metric family without metrics, which
        // `gather` never returns; an empty exposition is the safe answer then.
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }

    /// Counts `n` LLM tokens of `kind` (`input`, `output`, `cached_input`, ...) used
    /// with `model` of `provider`. Called by the AI layer after each completion.
    ///
    /// The labels come from activity code, which may take a model name from a
    /// workflow's input: each value is cut to [`MAX_LLM_LABEL_LEN`] bytes, and once
    /// [`MAX_LLM_LABEL_SETS`] label sets are in use, tokens under a new one count as
    /// `provider="other", model="other", kind="other"` (logged once), so that the series
    /// Prometheus scrapes stay bounded.
    pub fn record_llm_tokens(&self, provider: &str, model: &str, kind: &str, n: u64) {
        let labels = self.llm_labels.admit([provider, model, kind]);
        self.llm_tokens
            .with_label_values(&[&labels[0], &labels[1], &labels[2]])
            .inc_by(n);
    }
}

/// Buckets of queue calls other than receive (enqueue, ack, ...), which may also long-poll.
const QUEUE_OP_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 20.0, 30.0,
];

fn status_label(status: WorkflowStatus) -> &'static str {
    match status {
        WorkflowStatus::Running => "running",
        WorkflowStatus::Completed => "completed",
        WorkflowStatus::Failed => "failed",
        WorkflowStatus::Canceled => "canceled",
    }
}

impl Observer for Metrics {
    fn workflow_started(&self, name: &str) {
        self.series.workflows.with(name, |s| {
            s.started
                .get_or_init(|| self.workflows_started.with_label_values(&[name]))
                .inc();
        });
    }

    fn workflow_closed(&self, name: &str, status: WorkflowStatus, duration: Duration) {
        self.series.workflows.with(name, |s| {
            let (closed, hist) = s.closed[status_index(status)].get_or_init(|| {
                let status = status_label(status);
                (
                    self.workflows_closed.with_label_values(&[name, status]),
                    self.workflow_duration.with_label_values(&[name, status]),
                )
            });
            closed.inc();
            hist.observe(duration.as_secs_f64());
        });
    }

    fn workflow_task(
        &self,
        name: &str,
        outcome: TaskOutcome,
        duration: Duration,
        history_len: u64,
    ) {
        self.series.workflows.with(name, |s| {
            s.tasks[task_index(outcome)]
                .get_or_init(|| {
                    self.workflow_tasks
                        .with_label_values(&[name, outcome.as_str()])
                })
                .inc();
            s.task_duration
                .get_or_init(|| self.workflow_task_duration.with_label_values(&[name]))
                .observe(duration.as_secs_f64());
            #[expect(
                clippy::cast_precision_loss,
                reason = "history lengths stay far below 2^52"
            )]
            s.history
                .get_or_init(|| self.workflow_history.with_label_values(&[name]))
                .observe(history_len as f64);
        });
    }

    fn activity_running(&self, name: &str, delta: i64) {
        self.series.activities.with(name, |s| {
            s.in_flight
                .get_or_init(|| self.activities_in_flight.with_label_values(&[name]))
                .add(delta);
        });
    }

    fn activity_attempt(
        &self,
        name: &str,
        outcome: AttemptOutcome,
        duration: Option<Duration>,
        error_kind: Option<&str>,
    ) {
        self.series.activities.with(name, |s| {
            let (attempts, hist) = s.attempts[attempt_index(outcome)].get_or_init(|| {
                let o = outcome.as_str();
                (
                    self.activity_attempts.with_label_values(&[name, o]),
                    self.activity_duration.with_label_values(&[name, o]),
                )
            });
            attempts.inc();
            // An attempt the sweeper gave up was not measured: no 0 s to pull the
            // quantiles down.
            if let Some(d) = duration {
                hist.observe(d.as_secs_f64());
            }
            if outcome == AttemptOutcome::Retrying {
                s.retries
                    .get_or_init(|| self.activity_retries.with_label_values(&[name]))
                    .inc();
            }
            // A dropped result's timeout is not the attempt's: the attempt ended
            // as the result recorded for it says (another copy's, or the sweeper's
            // give-up, which counts its own timeout).
            if outcome != AttemptOutcome::Dropped
                && let Some(which) = error_kind.and_then(|k| k.strip_prefix("timeout."))
            {
                let i = TIMEOUT_KINDS
                    .iter()
                    .position(|k| *k == which)
                    .unwrap_or(TIMEOUT_KINDS.len());
                let label = TIMEOUT_KINDS.get(i).copied().unwrap_or("other");
                s.timeouts[i]
                    .get_or_init(|| self.activity_timeouts.with_label_values(&[name, label]))
                    .inc();
            }
        });
    }

    fn overdue(&self, kind: &'static str) {
        self.overdue.with_label_values(&[kind]).inc();
    }

    fn queue_received(&self, queue: &str, count: usize, latency: Duration) {
        self.series.queues.with(queue, |s| {
            s.receive
                .get_or_init(|| self.queue_receive.with_label_values(&[queue]))
                .observe(latency.as_secs_f64());
            s.received
                .get_or_init(|| self.queue_received.with_label_values(&[queue]))
                .inc_by(count as u64);
        });
    }

    fn queue_depth(&self, queue: &str, depth: u64) {
        self.queue_depth
            .with_label_values(&[queue])
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    fn queue_depth_unknown(&self, queue: &str) {
        // Not shown rather than stale: an alert on it then neither fires nor holds on
        // a value nobody measures; the failed reads count in
        // `marathon_queue_operation_seconds{operation="depth",outcome="error"}`.
        let _ = self.queue_depth.remove_label_values(&[queue]);
    }

    fn dead_lettered(&self, queue: &str, count: usize) {
        self.dead_lettered
            .with_label_values(&[queue])
            .inc_by(count as u64);
    }

    fn llm_tokens(&self, provider: &str, model: &str, kind: &str, count: u64) {
        self.record_llm_tokens(provider, model, kind, count);
    }

    fn task_scope(&self, task: &Task, trace_context: Option<&str>) -> TaskScope {
        crate::tracing::task_scope(task, trace_context)
    }

    fn trace_context(&self) -> Option<String> {
        crate::tracing::current_trace_context()
    }

    fn link(&self, trace_context: &str) {
        crate::tracing::link_current(trace_context);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_name_gets_one_series_when_threads_race_to_create_it() {
        let names = Names::<OnceLock<usize>>::default();
        let seen: Vec<Vec<usize>> = std::thread::scope(|s| {
            let threads: Vec<_> = (0..8)
                .map(|t| {
                    let names = &names;
                    s.spawn(move || {
                        (0..50)
                            .map(|i| {
                                // Every thread creates the same 50 names, in different orders.
                                let name = format!("n{}", (i * 7 + t) % 50);
                                names.with(&name, |cell| {
                                    cell.get_or_init(|| t * 1000 + i);
                                });
                                names.with(&name, |cell| std::ptr::from_ref(cell) as usize)
                            })
                            .collect()
                    })
                })
                .collect();
            threads.into_iter().map(|h| h.join().unwrap()).collect()
        });
        // Each name resolved to the same series on every thread, first set wins.
        let all = names.0.load();
        assert_eq!(all.len(), 50);
        for (t, per_thread) in seen.iter().enumerate() {
            for (i, addr) in per_thread.iter().enumerate() {
                let name = format!("n{}", (i * 7 + t) % 50);
                assert_eq!(*addr, std::ptr::from_ref(&*all[&name]) as usize, "{name}");
            }
        }
    }

    /// A name clash halfway through leaves a shared registry as it was: the metrics
    /// registered before the clash are taken out again (the dropped-spans counter,
    /// registered first, is the one with series from the start, so it would show).
    #[test]
    fn a_name_clash_registers_nothing() {
        let registry = Registry::new();
        // The last of Marathon's metrics, so that every other one comes first.
        let theirs = IntCounter::new("marathon_llm_tokens_total", "someone else's").unwrap();
        registry.register(Box::new(theirs)).unwrap();
        assert!(matches!(
            Metrics::with_registry(registry.clone()),
            Err(MetricsError::Register(_))
        ));
        let names: Vec<String> = registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        assert_eq!(names, ["marathon_llm_tokens_total"]);
    }

    #[test]
    fn timeouts_are_bounded_and_retries_counted() {
        let m = Metrics::new().unwrap();
        m.activity_attempt(
            "a",
            AttemptOutcome::Retrying,
            Some(Duration::from_millis(3)),
            Some("timeout.start_to_close"),
        );
        m.activity_attempt(
            "a",
            AttemptOutcome::Failed,
            Some(Duration::from_millis(3)),
            Some("timeout.made_up"),
        );
        m.activity_attempt(
            "a",
            AttemptOutcome::Failed,
            Some(Duration::from_millis(3)),
            Some("bad_request"),
        );
        assert_eq!(m.activity_retries.with_label_values(&["a"]).get(), 1);
        assert_eq!(
            m.activity_timeouts
                .with_label_values(&["a", "start_to_close"])
                .get(),
            1
        );
        assert_eq!(
            m.activity_timeouts.with_label_values(&["a", "other"]).get(),
            1
        );
        assert_eq!(
            m.activity_attempts
                .with_label_values(&["a", "failed"])
                .get(),
            2
        );
        let text = m.render();
        assert!(text.contains("# TYPE marathon_activity_attempt_seconds histogram"));
    }

    #[test]
    fn llm_token_labels_stay_bounded() {
        let m = Metrics::new().unwrap();
        // Model names from user input: each a new label set.
        for i in 0..MAX_LLM_LABEL_SETS + 50 {
            m.record_llm_tokens("openai", &format!("user-model-{i}"), "input", 1);
        }
        let long = "m".repeat(10_000);
        m.record_llm_tokens("openai", &long, "output", 1);
        let text = m.render();
        let series = text
            .lines()
            .filter(|l| l.starts_with("marathon_llm_tokens_total{"))
            .count();
        assert_eq!(series, MAX_LLM_LABEL_SETS + 1, "{series} series");
        assert!(text.contains(
            "marathon_llm_tokens_total{kind=\"other\",model=\"other\",provider=\"other\"} 51"
        ));
        assert!(!text.contains(&long));
        // A set already in use keeps counting under its own labels.
        m.record_llm_tokens("openai", "user-model-0", "input", 2);
        assert!(m.render().contains(
            "marathon_llm_tokens_total{kind=\"input\",model=\"user-model-0\",provider=\"openai\"} 3"
        ));
        // Cut at a character boundary.
        let labels = LlmLabels::default().admit(["p", &"é".repeat(100), "k"]);
        assert!(labels[1].len() <= MAX_LLM_LABEL_LEN && labels[1].chars().all(|c| c == 'é'));
    }

    #[test]
    fn llm_tokens_add_up() {
        let m = Metrics::new().unwrap();
        m.record_llm_tokens("openai", "gpt-x", "input", 10);
        m.record_llm_tokens("openai", "gpt-x", "input", 5);
        assert!(m.render().contains(
            "marathon_llm_tokens_total{kind=\"input\",model=\"gpt-x\",provider=\"openai\"} 15"
        ));
    }
}
