//! The engine: starts workflows, runs workflow and activity tasks by replay,
//! and answers queries. Workers ([`crate::worker`]) feed it tasks from the queue.

pub(crate) mod activity;
pub(crate) mod context;
pub mod pipeline;
pub(crate) mod registry;
pub(crate) mod replay;

use futures::FutureExt;
use futures::StreamExt;
use parking_lot::Mutex;
use serde::Serialize;
use serde_json::Value;
use std::collections::{HashMap, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

pub use activity::ActivityContext;
use activity::DurableHeartbeat;
pub use context::{ActivityFuture, CancelledFuture, SignalFuture, TimerFuture, WorkflowContext};
pub use registry::{ActivityFn, JsonFn, Registry, WorkflowFn};
pub use replay::HISTORY_LIMIT;

use crate::clock::{SharedClock, SystemClock};
use crate::memory::{MemoryQueue, MemoryStore};
use crate::model::{
    ActivityCall, ActivityError, ActivityOptions, ActivityTask, Event, EventData, NewEvent, Seq,
    Task, Timestamp, WorkflowId, WorkflowSummary,
};
use crate::observe::{AttemptOutcome, NoopObserver, Observer, TaskOutcome};
use crate::queue::{OutgoingMessage, Queue, QueueError};
use crate::store::{
    AttemptStart, EventStream, KeyedAppend, KeyedOutcome, ListPage, ListQuery, NewWorkflow, Owed,
    OwedChanges, OwedEntry, OwedKind, Store, StoreError, activity_key,
};
use replay::{Instance, TaskFailure};

/// Longest accepted idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_LEN: usize = 256;

/// Longest accepted signal name, in bytes (names are 1 to this many bytes).
pub const MAX_SIGNAL_NAME_LEN: usize = 200;

/// Rejects an idempotency key (of a start or a signal) outside 1 to
/// [`MAX_IDEMPOTENCY_KEY_LEN`] bytes.
fn check_idempotency_key(key: Option<&str>) -> Result<(), EngineError> {
    match key {
        Some(k) if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY_LEN => {
            Err(EngineError::InvalidArgument(format!(
                "idempotency key must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} bytes"
            )))
        }
        _ => Ok(()),
    }
}

/// The most of a deserialization error's text an error message quotes: serde quotes
/// the offending value whole (a megabyte string, in a 400's body and the logs).
const MAX_ERROR_QUOTE: usize = 500;

/// `text` cut to at most `max` bytes on a character boundary, marked when cut.
fn clipped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let end = text.floor_char_boundary(max);
    format!("{}… ({} bytes in all)", &text[..end], text.len()).into()
}

/// How long an attempt of a call scheduled at `scheduled_at` that starts at `start`
/// may run: its start-to-close timeout, cut to what is left of its schedule-to-close.
fn attempt_budget(
    options: &ActivityOptions,
    scheduled_at: Timestamp,
    start: Timestamp,
) -> Duration {
    attempt_limit(options, scheduled_at, start).0
}

/// [`attempt_budget`], and the timeout that sets it (`start_to_close`, or
/// `schedule_to_close` when what is left of it is no longer).
fn attempt_limit(
    options: &ActivityOptions,
    scheduled_at: Timestamp,
    start: Timestamp,
) -> (Duration, &'static str) {
    match options.schedule_to_close {
        Some(s) if scheduled_at.plus(s).since(start) <= options.start_to_close => {
            (scheduled_at.plus(s).since(start), "schedule_to_close")
        }
        _ => (options.start_to_close, "start_to_close"),
    }
}

/// The heartbeat timeout of an attempt with budget `budget` when it is shorter than
/// the budget: the store then keeps its deadline from heartbeats
/// ([`ActivityContext::heartbeat`]), not from the budget alone.
fn heartbeat_bound(options: &ActivityOptions, budget: Duration) -> Option<Duration> {
    options.heartbeat_timeout.filter(|hb| *hb < budget)
}

/// Rejects a value (`what`) nested deeper than [`crate::MAX_VALUE_DEPTH`] or larger
/// than [`crate::MAX_PAYLOAD_BYTES`] as JSON.
fn check_value(what: &str, value: &Value) -> Result<(), EngineError> {
    if crate::nests_deeper_than(value, crate::MAX_VALUE_DEPTH) {
        return Err(EngineError::InvalidArgument(format!(
            "{what} nests deeper than {} levels",
            crate::MAX_VALUE_DEPTH
        )));
    }
    if crate::json_larger_than(value, crate::MAX_PAYLOAD_BYTES) {
        return Err(EngineError::InvalidArgument(format!(
            "{what} takes more than {} bytes as JSON",
            crate::MAX_PAYLOAD_BYTES
        )));
    }
    Ok(())
}

/// An attempt's result as it may be recorded: an output nested deeper than
/// [`crate::MAX_VALUE_DEPTH`] (a history holding it could not be read back) fails the
/// attempt for good; error details that deep are dropped.
fn within_depth(result: &mut Result<Value, ActivityError>) {
    match result {
        Ok(output) if crate::nests_deeper_than(output, crate::MAX_VALUE_DEPTH) => {
            *result = Err(ActivityError::permanent(format!(
                "the activity's output nests deeper than {} levels",
                crate::MAX_VALUE_DEPTH
            ))
            .with_kind("invalid_output"));
        }
        Ok(output) if crate::json_larger_than(output, crate::MAX_PAYLOAD_BYTES) => {
            *result = Err(ActivityError::permanent(format!(
                "the activity's output takes more than {} bytes as JSON",
                crate::MAX_PAYLOAD_BYTES
            ))
            .with_kind("invalid_output"));
        }
        Err(e) => bound_error(
            &mut e.details,
            &mut e.message,
            crate::MAX_VALUE_DEPTH,
            crate::MAX_PAYLOAD_BYTES,
        ),
        Ok(_) => {}
    }
}

/// Bounds an error before it is recorded, saying what it changed in `message`:
/// `details` nested deeper than `max_depth` levels or larger than `max_bytes` as JSON
/// are dropped, and a message longer than [`crate::MAX_ERROR_MESSAGE_BYTES`] is cut.
pub(crate) fn bound_error(
    details: &mut Option<Value>,
    message: &mut String,
    max_depth: usize,
    max_bytes: usize,
) {
    if message.len() > crate::MAX_ERROR_MESSAGE_BYTES {
        let total = message.len();
        message.truncate(message.floor_char_boundary(crate::MAX_ERROR_MESSAGE_BYTES));
        message.push_str(&format!(" … (message cut from {total} bytes)"));
    }
    let Some(d) = details.as_ref() else {
        return;
    };
    if crate::nests_deeper_than(d, max_depth) {
        *details = None;
        message.push_str(" (details dropped: nested too deep)");
    } else if crate::json_larger_than(d, max_bytes) {
        *details = None;
        message.push_str(&format!(
            " (details dropped: more than {max_bytes} bytes as JSON)"
        ));
    }
}

/// Errors of the engine's operations.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// No workflow with this id.
    #[error("workflow {0} not found")]
    NotFound(WorkflowId),
    /// No workflow registered under this name.
    #[error("workflow {0:?} is not registered")]
    UnknownWorkflow(String),
    /// The workflow has already finished.
    #[error("workflow {0} has already finished")]
    Closed(WorkflowId),
    /// A request argument is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A start reused the id (or idempotency key) of a workflow started with another
    /// workflow name or task queue, or named its own id with the idempotency key of
    /// another workflow; nothing was written.
    #[error(
        "workflow {id} was already started as {name:?} on task queue {task_queue:?}; \
         a start with its id or idempotency key must name the same workflow and task queue"
    )]
    AlreadyStarted {
        /// The existing workflow.
        id: WorkflowId,
        /// Its workflow name.
        name: String,
        /// Its task queue.
        task_queue: String,
    },
    /// The queue cannot carry the tasks of this task queue ([`Queue::check_task_queue`]);
    /// nothing was written.
    #[error("task queue {task_queue:?} cannot be used with this queue: {reason}")]
    UnservedTaskQueue {
        /// The requested task queue.
        task_queue: String,
        /// Why the queue cannot carry it.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The queue failed.
    #[error(transparent)]
    Queue(#[from] QueueError),
    /// A workflow task lost every one of its conditional appends to other writers;
    /// its task is handed back and runs again.
    #[error("workflow {0}: too many concurrent appends; the workflow task will run again")]
    Contended(WorkflowId),
}

impl EngineError {
    /// Whether trying again later may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        match self {
            EngineError::Store(e) => e.is_retryable(),
            EngineError::Queue(e) => e.is_retryable(),
            EngineError::Contended(_) => true,
            _ => false,
        }
    }
}

/// Tunables of the engine; every field has a documented default.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    /// Task queue of workflows started without one. Default `"default"`.
    pub default_task_queue: String,
    /// An owed workflow task not done within this is enqueued again. Default 30 s.
    #[serde(
        with = "crate::model::duration_ms",
        rename = "workflow_task_deadline_ms"
    )]
    pub workflow_task_deadline: Duration,
    /// Slack added to an activity attempt's budget (start-to-close, cut to what the
    /// schedule-to-close leaves) before the sweeper sends it again; a worker that
    /// receives its task with less than the budget + half of this left marks it
    /// started. Also added to a `heartbeat_timeout` shorter than the budget: the
    /// sweeper gives such an attempt up (`timeout.heartbeat`) this long after its
    /// heartbeat timeout passed without a heartbeat reaching the store. Default 30 s.
    #[serde(with = "crate::model::duration_ms", rename = "activity_grace_ms")]
    pub activity_grace: Duration,
    /// How long after a failed workflow task (non-determinism, panic) it is tried again. Default 10 s.
    #[serde(with = "crate::model::duration_ms", rename = "task_failure_retry_ms")]
    pub task_failure_retry: Duration,
    /// Times the sweeper delivers again an activity attempt a worker started and
    /// then lost before it records it as `timeout.lost`; not for an attempt whose
    /// heartbeats keep its deadline, which is recorded as `timeout.heartbeat` at
    /// once. Default 3.
    pub max_redeliveries: u32,
    /// Workflows kept in memory between tasks, to avoid replay from event 1;
    /// 0 replays every task from event 1. Default 10,000.
    pub cache_capacity: usize,
    /// Activity inputs up to this size travel in the queue message; larger ones
    /// are read from the store by the worker. Default 64 KiB.
    pub inline_input_limit: usize,
    /// Most events a running workflow's history may hold: a workflow task that
    /// would record past it fails the run instead (kind `history_limit`), so that a
    /// runaway loop stops growing its history. Closing events may go past it. At
    /// least 1. Default 50,000.
    pub max_history_events: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            default_task_queue: "default".to_string(),
            workflow_task_deadline: Duration::from_secs(30),
            activity_grace: Duration::from_secs(30),
            task_failure_retry: Duration::from_secs(10),
            max_redeliveries: 3,
            cache_capacity: 10_000,
            inline_input_limit: 64 * 1024,
            max_history_events: 50_000,
        }
    }
}

/// A request to start a workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct StartWorkflow {
    /// Registered workflow name.
    pub name: String,
    /// Input as JSON.
    pub input: Value,
    /// Id to use; a random UUID when `None`.
    pub id: Option<WorkflowId>,
    /// A second start with the same key returns the first workflow.
    pub idempotency_key: Option<String>,
    /// Task queue; the engine's default when `None`.
    pub task_queue: Option<String>,
}

impl StartWorkflow {
    /// Starts workflow `name` with a JSON input.
    pub fn new(name: impl Into<String>, input: Value) -> Self {
        Self {
            name: name.into(),
            input,
            id: None,
            idempotency_key: None,
            task_queue: None,
        }
    }

    /// Starts workflow `name` with any serializable input.
    ///
    /// # Errors
    /// When `input` does not serialize to JSON.
    pub fn with_input<T: Serialize>(
        name: impl Into<String>,
        input: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::new(name, serde_json::to_value(input)?))
    }

    /// Uses `id` as the workflow id (a second start with the same id returns the first).
    #[must_use]
    pub fn id(mut self, id: WorkflowId) -> Self {
        self.id = Some(id);
        self
    }

    /// Sets the idempotency key.
    #[must_use]
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Runs the workflow's tasks on `queue`.
    #[must_use]
    pub fn task_queue(mut self, queue: impl Into<String>) -> Self {
        self.task_queue = Some(queue.into());
        self
    }
}

/// The result of [`Engine::start`].
#[derive(Debug, Clone, PartialEq)]
pub struct Started {
    /// The workflow (the existing one when the start was a repeat).
    pub summary: WorkflowSummary,
    /// Whether this call created it.
    pub created: bool,
}

/// Builds an [`Engine`]; in-memory store and queue unless others are given.
#[derive(Default)]
pub struct EngineBuilder {
    store: Option<Arc<dyn Store>>,
    queue: Option<Arc<dyn Queue>>,
    registry: Registry,
    config: EngineConfig,
    clock: Option<SharedClock>,
    observer: Option<Arc<dyn Observer>>,
}

impl EngineBuilder {
    /// Uses `store`.
    #[must_use]
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Uses `queue`.
    #[must_use]
    pub fn queue(mut self, queue: Arc<dyn Queue>) -> Self {
        self.queue = Some(queue);
        self
    }

    /// Uses `clock` (tests pass a [`crate::TokioClock`]).
    #[must_use]
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Reports metrics and carries trace context through `observer`.
    #[must_use]
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Uses `config`.
    #[must_use]
    pub fn config(mut self, config: EngineConfig) -> Self {
        self.config = config;
        self
    }

    /// Adds every workflow and activity of `registry`.
    #[must_use]
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// Registers a workflow; see [`Registry::workflow`].
    #[must_use]
    pub fn workflow<I, O, F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        I: serde::de::DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<O, crate::WorkflowError>> + Send + 'static,
    {
        self.registry.workflow(name, f);
        self
    }

    /// Registers an activity; see [`Registry::activity`].
    #[must_use]
    pub fn activity<I, O, F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        I: serde::de::DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(ActivityContext, I) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<O, ActivityError>> + Send + 'static,
    {
        self.registry.activity(name, f);
        self
    }

    /// Builds the engine.
    #[must_use]
    pub fn build(self) -> Engine {
        Engine {
            inner: Arc::new(EngineInner {
                store: self
                    .store
                    .unwrap_or_else(|| Arc::new(MemoryStore::default())),
                queue: self
                    .queue
                    .unwrap_or_else(|| Arc::new(MemoryQueue::default())),
                registry: self.registry,
                config: self.config,
                clock: self.clock.unwrap_or_else(|| Arc::new(SystemClock)),
                observer: self.observer.unwrap_or_else(|| Arc::new(NoopObserver)),
                cache: Cache::default(),
                closed: Mutex::default(),
                running: Mutex::new(HashMap::new()),
            }),
        }
    }
}

type Slot = Arc<tokio::sync::Mutex<Option<Instance>>>;

/// Workflows kept in memory between tasks; the slot's lock also serializes a
/// workflow's tasks within this replica.
#[derive(Default)]
struct Cache {
    slots: Mutex<HashMap<WorkflowId, Slot>>,
    order: Mutex<VecDeque<WorkflowId>>,
}

impl Cache {
    fn slot(&self, id: &WorkflowId, capacity: usize) -> Slot {
        let mut slots = self.slots.lock();
        if let Some(s) = slots.get(id) {
            return s.clone();
        }
        let s: Slot = Arc::default();
        slots.insert(id.clone(), s.clone());
        let mut order = self.order.lock();
        order.push_back(id.clone());
        // Saturating: a capacity meant as unbounded (`usize::MAX`) must not overflow.
        if order.len() > capacity.max(1).saturating_mul(2).saturating_add(1024) {
            // Ids of finished (removed) workflows pile up here, and an id removed and
            // cached again (each retry of a failing task) once per time: keep the
            // newest entry of each cached id only.
            let mut seen = std::collections::HashSet::with_capacity(slots.len());
            let mut kept: Vec<WorkflowId> = order
                .drain(..)
                .rev()
                .filter(|id| slots.contains_key(id) && seen.insert(id.clone()))
                .collect();
            kept.reverse();
            order.extend(kept);
        }
        // Evict the oldest idle slots beyond capacity; a busy one goes to the back.
        let mut scanned = 0;
        while slots.len() > capacity.max(1) && scanned < order.len() {
            let Some(old) = order.pop_front() else { break };
            scanned += 1;
            match slots.get(&old) {
                Some(s) if Arc::strong_count(s) == 1 => {
                    slots.remove(&old);
                }
                Some(_) => order.push_back(old),
                None => {}
            }
        }
        s
    }

    fn remove(&self, id: &WorkflowId) {
        self.slots.lock().remove(id);
    }
}

/// Counts an attempt in the observer's running activities until dropped: also when a
/// worker's hard stop drops the attempt's future (the gauge stayed up before).
struct RunningGauge<'a> {
    observer: &'a dyn Observer,
    name: &'a str,
}

impl<'a> RunningGauge<'a> {
    fn start(observer: &'a dyn Observer, name: &'a str) -> Self {
        observer.activity_running(name, 1);
        Self { observer, name }
    }
}

impl Drop for RunningGauge<'_> {
    fn drop(&mut self) {
        self.observer.activity_running(self.name, -1);
    }
}

/// An attempt's entry in [`EngineInner::running`], removed when dropped.
struct Registered<'a> {
    running: &'a Mutex<HashMap<WorkflowId, Vec<RunningAttempt>>>,
    workflow_id: &'a WorkflowId,
    /// This execution's entry, not another copy's of the same attempt.
    entry: u64,
}

impl<'a> Registered<'a> {
    /// Registers an execution of an attempt of `workflow_id`'s call scheduled at
    /// `scheduled`, stopped by `token`: until dropped, a cancellation reaches it.
    fn new(
        running: &'a Mutex<HashMap<WorkflowId, Vec<RunningAttempt>>>,
        workflow_id: &'a WorkflowId,
        scheduled: Seq,
        token: CancellationToken,
    ) -> Self {
        static NEXT_ENTRY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let entry = NEXT_ENTRY.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        running
            .lock()
            .entry(workflow_id.clone())
            .or_default()
            .push((entry, scheduled, token));
        Self {
            running,
            workflow_id,
            entry,
        }
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut running = self.running.lock();
        if let Some(v) = running.get_mut(self.workflow_id) {
            v.retain(|(e, _, _)| *e != self.entry);
            if v.is_empty() {
                running.remove(self.workflow_id);
            }
        }
    }
}

/// A running activity attempt of this process: its entry (one per execution, so two
/// copies of one attempt running here are told apart), the sequence of its call's
/// `activity_scheduled`, and its cancellation.
type RunningAttempt = (u64, Seq, CancellationToken);

pub(crate) struct EngineInner {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) queue: Arc<dyn Queue>,
    pub(crate) registry: Registry,
    pub(crate) config: EngineConfig,
    pub(crate) clock: SharedClock,
    pub(crate) observer: Arc<dyn Observer>,
    cache: Cache,
    /// Runs this replica closed lately: tasks of theirs still queued (results of
    /// parallel calls that arrived after the close) are dropped without a replay.
    closed: Mutex<ClosedRuns>,
    running: Mutex<HashMap<WorkflowId, Vec<RunningAttempt>>>,
}

/// The sweeper giving an attempt up ([`EngineInner::record_outcome`]).
struct GiveUp {
    /// The run's trace context, which the outcome continues.
    trace_context: Option<String>,
    /// The end of the sweeper's claim: the outcome is recorded only while the
    /// attempt's entry still falls due then (a worker that marked it started since
    /// keeps it).
    until: Timestamp,
}

/// How many closed runs [`ClosedRuns`] remembers.
const CLOSED_RUNS: usize = 4096;

/// The runs (id and `created_at`) a replica closed most recently.
#[derive(Default)]
struct ClosedRuns {
    runs: HashMap<WorkflowId, Timestamp, foldhash::fast::RandomState>,
    order: VecDeque<WorkflowId>,
}

impl ClosedRuns {
    fn insert(&mut self, id: &WorkflowId, run: Timestamp) {
        if self.runs.insert(id.clone(), run).is_none() {
            self.order.push_back(id.clone());
        }
        while self.order.len() > CLOSED_RUNS {
            if let Some(old) = self.order.pop_front() {
                self.runs.remove(&old);
            }
        }
    }

    fn contains(&self, id: &WorkflowId, run: Timestamp) -> bool {
        self.runs.get(id) == Some(&run)
    }

    fn remove(&mut self, id: &WorkflowId) {
        if self.runs.remove(id).is_some() {
            self.order.retain(|o| o != id);
        }
    }
}

/// The durable workflow engine: cheap to clone, shared by the API and the workers.
#[derive(Clone)]
pub struct Engine {
    pub(crate) inner: Arc<EngineInner>,
}

/// Conflicting appends a workflow task retries before it hands its task back.
const MAX_CONFLICTS: usize = 16;
/// The sweeper sends an attempt no worker has started again after its start-to-close
/// plus grace (a workflow task: after its deadline), then after twice that, four
/// times, ... up to 2^this times.
const MAX_RESEND_DOUBLINGS: u32 = 4;

impl Engine {
    /// A builder with in-memory defaults.
    #[must_use]
    pub fn builder() -> EngineBuilder {
        EngineBuilder::default()
    }

    /// The registered workflows and activities.
    #[must_use]
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The engine's configuration.
    #[must_use]
    pub fn config(&self) -> &EngineConfig {
        &self.inner.config
    }

    /// The store.
    #[must_use]
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.inner.store
    }

    /// The queue.
    #[must_use]
    pub fn queue(&self) -> &Arc<dyn Queue> {
        &self.inner.queue
    }

    /// The engine's observer.
    #[must_use]
    pub fn observer(&self) -> &Arc<dyn Observer> {
        &self.inner.observer
    }

    /// The engine's clock.
    #[must_use]
    pub fn now(&self) -> Timestamp {
        self.inner.clock.now()
    }

    /// Starts a workflow: records it and enqueues its first workflow task.
    ///
    /// Idempotent on the id and on the idempotency key: a repeat with the same
    /// workflow name and task queue (whatever its input) returns the existing
    /// workflow with `created: false`.
    ///
    /// # Errors
    /// [`EngineError::UnknownWorkflow`], [`EngineError::InvalidArgument`];
    /// [`EngineError::UnservedTaskQueue`] if the queue cannot carry the task queue;
    /// [`EngineError::AlreadyStarted`] if the id or idempotency key belongs to a
    /// workflow with another name or task queue (or the key to another id than the
    /// one named); store errors.
    pub async fn start(&self, req: StartWorkflow) -> Result<Started, EngineError> {
        let inner = &self.inner;
        if inner.registry.find_workflow(&req.name).is_none() {
            return Err(EngineError::UnknownWorkflow(req.name));
        }
        check_idempotency_key(req.idempotency_key.as_deref())?;
        check_value("input", &req.input)?;
        inner
            .registry
            .check_input(&req.name, &req.input)
            .map_err(|e| {
                EngineError::InvalidArgument(format!(
                    "input of workflow {:?} does not match its type: {}",
                    req.name,
                    clipped(&e.to_string(), MAX_ERROR_QUOTE)
                ))
            })?;
        let task_queue = req
            .task_queue
            .unwrap_or_else(|| inner.config.default_task_queue.clone());
        if task_queue.is_empty() || task_queue.len() > 80 {
            return Err(EngineError::InvalidArgument(
                "task queue name must be 1 to 80 bytes".into(),
            ));
        }
        inner
            .queue
            .check_task_queue(&task_queue)
            .map_err(|reason| EngineError::UnservedTaskQueue {
                task_queue: task_queue.clone(),
                reason,
            })?;
        let now = inner.clock.now();
        let req_input = req.input;
        // The run's trace: the first task continues it, and the summary keeps it for
        // what reaches the run later (signals, cancellation).
        let trace_context = inner.observer.trace_context();
        // A start naming its id is a repeat only of that workflow (not of another one
        // that holds its idempotency key).
        let named_id = req.id.clone();
        let created = inner
            .store
            .create(NewWorkflow {
                id: req.id.unwrap_or_else(WorkflowId::random),
                name: req.name.clone(),
                input: req_input.clone(),
                task_queue: task_queue.clone(),
                idempotency_key: req.idempotency_key,
                started_at: now,
                task_deadline: now.plus(inner.config.workflow_task_deadline),
                trace_context: trace_context.clone(),
            })
            .await?;
        let existing = &created.summary;
        if !created.created
            && (existing.name != req.name
                || existing.task_queue != task_queue
                || named_id.is_some_and(|id| id != existing.id))
        {
            return Err(EngineError::AlreadyStarted {
                id: existing.id.clone(),
                name: existing.name.clone(),
                task_queue: existing.task_queue.clone(),
            });
        }
        if created.created {
            inner.observer.workflow_started(&created.summary.name);
            inner
                .enqueue_workflow_task(
                    &task_queue,
                    created.summary.id.clone(),
                    vec![NewEvent::new(
                        now,
                        EventData::WorkflowStarted {
                            name: created.summary.name.clone(),
                            input: req_input,
                            task_queue: task_queue.clone(),
                            idempotency_key: created.summary.idempotency_key.clone(),
                        },
                    )],
                    Seq(1),
                    trace_context,
                    Some(now),
                )
                .await;
        } else if created.summary.status == crate::model::WorkflowStatus::Running
            && created.summary.last_seq == Seq(1)
        {
            // A repeat of a start whose run has done nothing yet: perhaps the first
            // start's reply was lost after the store created the run, and its task was
            // never sent. Send it again (a spare copy finds nothing to do) rather than
            // leave the run to the sweeper, at its first task's deadline.
            inner
                .enqueue_workflow_task(
                    &created.summary.task_queue,
                    created.summary.id.clone(),
                    Vec::new(),
                    Seq(1),
                    created.summary.trace_context.clone(),
                    Some(created.summary.created_at),
                )
                .await;
        }
        Ok(Started {
            summary: created.summary,
            created: created.created,
        })
    }

    /// The workflow's summary.
    ///
    /// # Errors
    /// [`EngineError::NotFound`], store errors.
    pub async fn get(&self, id: &WorkflowId) -> Result<WorkflowSummary, EngineError> {
        self.inner
            .store
            .get(id)
            .await?
            .ok_or_else(|| EngineError::NotFound(id.clone()))
    }

    /// Lists workflows newest first; see [`Store::list`].
    ///
    /// # Errors
    /// Store errors, including an invalid cursor.
    pub async fn list(&self, query: &ListQuery) -> Result<ListPage, EngineError> {
        Ok(self.inner.store.list(query).await?)
    }

    /// Up to `limit` events after `after`.
    ///
    /// # Errors
    /// [`EngineError::NotFound`], store errors.
    pub async fn events(
        &self,
        id: &WorkflowId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Event>, EngineError> {
        self.inner
            .store
            .read(id, after, limit)
            .await
            .map_err(|e| not_found(e, id))
    }

    /// Live events after `after`; the stream ends after the terminal event.
    ///
    /// # Errors
    /// [`EngineError::NotFound`], store errors.
    pub async fn subscribe(&self, id: &WorkflowId, after: Seq) -> Result<EventStream, EngineError> {
        self.inner
            .store
            .subscribe(id, after)
            .await
            .map_err(|e| not_found(e, id))
    }

    /// Waits up to `wait` for the workflow to finish; returns its summary, finished or not.
    ///
    /// # Errors
    /// [`EngineError::NotFound`], store errors.
    pub async fn result(
        &self,
        id: &WorkflowId,
        wait: Duration,
    ) -> Result<WorkflowSummary, EngineError> {
        let summary = self.get(id).await?;
        if summary.status.is_terminal() || wait.is_zero() {
            return Ok(summary);
        }
        let mut events = self.subscribe(id, summary.last_seq).await?;
        let finished = async {
            while let Some(e) = events.next().await {
                if e.map(|e| e.data.is_terminal()).unwrap_or(true) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(wait, finished).await;
        self.get(id).await
    }

    /// Requests cancellation: records `cancel_requested` once and runs a workflow task.
    ///
    /// # Errors
    /// [`EngineError::NotFound`], [`EngineError::Closed`] if it has finished,
    /// [`EngineError::InvalidArgument`] for a reason longer than
    /// [`crate::MAX_ERROR_MESSAGE_BYTES`], store errors.
    pub async fn cancel(&self, id: &WorkflowId, reason: Option<String>) -> Result<(), EngineError> {
        if reason
            .as_ref()
            .is_some_and(|r| r.len() > crate::MAX_ERROR_MESSAGE_BYTES)
        {
            return Err(EngineError::InvalidArgument(format!(
                "a cancel reason takes at most {} bytes",
                crate::MAX_ERROR_MESSAGE_BYTES
            )));
        }
        // Record the request before stopping local attempts, so that the workflow
        // sees the cancellation before any "activity canceled" failure. Attempts of
        // calls made after the request (clean-up, which a repeated request may find
        // running) go on.
        let inner = &self.inner;
        let recorded = self
            .input_event(
                id,
                Some("cancel".to_string()),
                EventData::CancelRequested { reason },
            )
            .await?;
        let request = match (recorded, inner.earliest_running(id)) {
            (Some(seq), _) => Some(seq),
            (None, Some(earliest)) => inner
                .cancel_requested_after(id, earliest)
                .await
                .unwrap_or_else(|e| {
                    // Their heartbeats find out instead.
                    tracing::warn!(workflow_id = %id, error = %e, "could not find the cancel request to stop local attempts");
                    None
                }),
            (None, None) => None,
        };
        if let Some(request) = request {
            inner.cancel_local(id, request);
        }
        Ok(())
    }

    /// Sends signal `name` with `payload`; with `key`, a repeat with the same key is ignored.
    ///
    /// # Errors
    /// [`EngineError::NotFound`], [`EngineError::Closed`] if it has finished, store errors.
    pub async fn signal(
        &self,
        id: &WorkflowId,
        name: &str,
        payload: Value,
        key: Option<String>,
    ) -> Result<(), EngineError> {
        if name.is_empty() || name.len() > MAX_SIGNAL_NAME_LEN {
            return Err(EngineError::InvalidArgument(format!(
                "signal name must be 1 to {MAX_SIGNAL_NAME_LEN} bytes"
            )));
        }
        check_idempotency_key(key.as_deref())?;
        check_value("signal payload", &payload)?;
        self.input_event(
            id,
            key.map(|k| format!("s:{k}")),
            EventData::SignalReceived {
                name: name.to_string(),
                payload,
            },
        )
        .await
        .map(|_| ())
    }

    /// Appends an event from outside (a signal, a cancellation) and runs a workflow
    /// task for it; its sequence, or `None` when `key` had been recorded before
    /// (nothing appended).
    async fn input_event(
        &self,
        id: &WorkflowId,
        key: Option<String>,
        data: EventData,
    ) -> Result<Option<Seq>, EngineError> {
        let inner = &self.inner;
        let summary = self.get(id).await?;
        // A keyed input (a signal with a key, any cancellation) on a finished workflow
        // goes to the store, which answers `Duplicate` for a repeat of one it recorded
        // (a client's retry after its signal or cancellation finished the run) and
        // `Closed` otherwise.
        if summary.status.is_terminal() && key.is_none() {
            return Err(EngineError::Closed(id.clone()));
        }
        let now = inner.clock.now();
        let event = NewEvent::new(now, data);
        // The task it runs continues the run's trace, which the request's span links to.
        if let Some(tc) = &summary.trace_context {
            inner.observer.link(tc);
        }
        let owed = OwedEntry {
            trace_context: summary.trace_context.clone(),
            run: None,
            ..inner.workflow_task_owed(&summary.task_queue, now)
        };
        let outcome = inner
            .store
            .append_keyed(
                id,
                KeyedAppend {
                    key,
                    requires: None,
                    requires_deadline: None,
                    events: vec![event.clone()],
                    owed: OwedChanges::none().set(owed),
                },
            )
            .await
            .map_err(|e| not_found(e, id))?;
        match outcome {
            KeyedOutcome::Appended(last) => {
                inner
                    .enqueue_workflow_task(
                        &summary.task_queue,
                        id.clone(),
                        vec![event],
                        last,
                        summary.trace_context,
                        Some(summary.created_at),
                    )
                    .await;
                Ok(Some(last))
            }
            KeyedOutcome::Duplicate | KeyedOutcome::NotOwed => Ok(None),
            KeyedOutcome::Closed => Err(EngineError::Closed(id.clone())),
        }
    }

    /// Runs one task received from `queue`. Idempotent: a duplicate finds nothing new to do.
    ///
    /// # Errors
    /// Store and queue errors; the caller hands the task back to be delivered again.
    pub async fn handle(&self, queue: &str, task: Task) -> Result<(), EngineError> {
        self.handle_delivery(queue, task, 1).await
    }

    /// Runs one task received from `queue` for the `receive_count`-th time (see
    /// [`crate::Delivery::receive_count`]): a task the queue delivers again, after its
    /// worker died or handed it back, takes its attempt over from that worker.
    ///
    /// # Errors
    /// As [`Engine::handle`].
    pub async fn handle_delivery(
        &self,
        queue: &str,
        task: Task,
        receive_count: u32,
    ) -> Result<(), EngineError> {
        // Boxed: these state machines are large, and moving them around costs more than one allocation.
        match task {
            // Workers run this inside the observer's task span (one span per task).
            Task::Workflow {
                workflow_id,
                tail,
                run,
            } => Box::pin(self.inner.workflow_task(&workflow_id, tail, run)).await,
            Task::Activity(t) => {
                Box::pin(
                    self.inner
                        .clone()
                        .activity_task(queue, t, receive_count > 1),
                )
                .await
            }
        }
    }

    /// Acts on owed work whose deadline has passed: re-enqueues lost tasks and fires timers.
    /// Returns how many entries it claimed. Workers call this periodically.
    ///
    /// # Errors
    /// Store errors.
    pub async fn sweep(&self, limit: usize) -> Result<usize, EngineError> {
        let inner = &self.inner;
        let now = inner.clock.now();
        let lease = inner.config.workflow_task_deadline;
        let claimed = inner.store.claim_overdue(now, lease, limit).await?;
        let n = claimed.len();
        // Each claimed entry falls due at the end of the lease until it is acted on.
        let until = now.plus(lease);
        for owed in claimed {
            if let Err(e) = inner.clone().overdue(owed, until).await {
                tracing::warn!(error = %e, "acting on overdue work failed; it is retried after its lease");
            }
        }
        Ok(n)
    }
}

fn not_found(e: StoreError, id: &WorkflowId) -> EngineError {
    match e {
        StoreError::NotFound(_) => EngineError::NotFound(id.clone()),
        e => EngineError::Store(e),
    }
}

/// How a prepared workflow task stands.
#[expect(
    clippy::large_enum_variant,
    reason = "short-lived, built once per workflow task; boxing would allocate on the hot path"
)]
enum Prepared {
    Ready(Instance),
    Failed {
        failure: TaskFailure,
        last: Seq,
        repeated: bool,
        task_queue: String,
        /// The workflow's name, when event 1 gives it (for the task's outcome).
        name: Option<String>,
    },
    Missing,
}

impl EngineInner {
    fn workflow_task_owed(&self, task_queue: &str, now: Timestamp) -> OwedEntry {
        OwedEntry {
            kind: OwedKind::WORKFLOW_TASK,
            task_queue: task_queue.to_string(),
            deadline: now.plus(self.config.workflow_task_deadline),
            trace_context: None,
            run: None,
        }
    }

    /// Enqueues; a failure is logged, not returned: the owed work in the store
    /// makes the sweeper enqueue it again.
    async fn enqueue(&self, queue: &str, mut messages: Vec<OutgoingMessage>) {
        if messages.is_empty() {
            return;
        }
        if let Some(tc) = self.observer.trace_context() {
            for m in &mut messages {
                m.trace_context.get_or_insert_with(|| tc.clone());
            }
        }
        // A short outage is retried here for workflow tasks, which the sweeper would
        // send again only after 30 s. Not for activity tasks: a failed call may still
        // have sent some (a partly sent batch, a lost reply), and a first copy runs
        // without asking the store, so a copy sent again would run the activity twice;
        // the sweeper sends them at their deadline, when a copy that got through has
        // finished and the resend is dropped. An in-process queue's sends do not fail
        // for a while: no copy is kept for it.
        let pending: Vec<OutgoingMessage> = if self.queue.is_in_process() {
            Vec::new()
        } else {
            messages
                .iter()
                .filter(|m| matches!(m.task, Task::Workflow { .. }))
                .cloned()
                .collect()
        };
        let mut result = self.queue.enqueue(queue, messages).await;
        let mut pause = Duration::from_millis(200);
        for _ in 0..3 {
            match &result {
                Err(e) if e.is_retryable() && !pending.is_empty() => {
                    tracing::debug!(queue, error = %e, "enqueue failed; sending the workflow tasks again in {pause:?}");
                }
                _ => break,
            }
            tokio::time::sleep(pause).await;
            pause *= 2;
            result = self.queue.enqueue(queue, pending.clone()).await;
        }
        if let Err(e) = result {
            tracing::warn!(queue, error = %e, "enqueue failed; the sweeper re-enqueues owed work");
        }
    }

    /// Reports a workflow task's outcome to the observer and on the task's span.
    fn task_done(&self, name: &str, outcome: TaskOutcome, replay: Duration, history_len: u64) {
        crate::observe::record_current([("workflow", &name), ("outcome", &outcome.as_str())]);
        self.observer
            .workflow_task(name, outcome, replay, history_len);
    }

    /// Enqueues a workflow task for `workflow_id` carrying `appended`, the events
    /// just appended ending at `last`, as its tail (when they are small enough), and
    /// `trace_context` (`None`: the current span's, as for any message), for `run`
    /// (its `created_at`, when known).
    async fn enqueue_workflow_task(
        &self,
        queue: &str,
        workflow_id: WorkflowId,
        appended: Vec<NewEvent>,
        last: Seq,
        trace_context: Option<String>,
        run: Option<Timestamp>,
    ) {
        let tail = self.tail(appended, last);
        let message = OutgoingMessage::now(Task::Workflow {
            workflow_id,
            tail,
            run,
        });
        self.enqueue(queue, vec![message.traced(trace_context)])
            .await;
    }

    /// The events just appended (ending at `last`) as a workflow task's tail,
    /// or nothing when they would make the message too large.
    fn tail(&self, events: Vec<NewEvent>, last: Seq) -> Vec<Event> {
        let first = last.0 + 1 - events.len() as u64;
        let tail: Vec<Event> = events
            .into_iter()
            .enumerate()
            .map(|(i, e)| Event {
                seq: Seq(first + i as u64),
                timestamp: e.timestamp,
                data: e.data,
            })
            .collect();
        if self.queue.max_message_bytes() == usize::MAX {
            return tail;
        }
        let limit = self
            .config
            .inline_input_limit
            .min(self.queue.max_message_bytes() / 2);
        match serde_json::to_vec(&tail) {
            Ok(v) if v.len() <= limit => tail,
            _ => Vec::new(),
        }
    }

    /// Stops this process's attempts of `id` whose call came before event `request`
    /// (the `cancel_requested`; `u64::MAX`: every attempt).
    fn cancel_local(&self, id: &WorkflowId, request: Seq) {
        if let Some(tokens) = self.running.lock().get(id) {
            for (_, scheduled, t) in tokens {
                if *scheduled < request {
                    t.cancel();
                }
            }
        }
    }

    /// The earliest `activity_scheduled` of this process's running attempts of `id`.
    fn earliest_running(&self, id: &WorkflowId) -> Option<Seq> {
        self.running
            .lock()
            .get(id)
            .and_then(|v| v.iter().map(|(_, seq, _)| *seq).min())
    }

    /// The sequence of `id`'s `cancel_requested`, if it comes after event `after`
    /// (read page by page: a rare path, taken when a running attempt must tell a
    /// call made before the request from clean-up made after it).
    pub(crate) async fn cancel_requested_after(
        &self,
        id: &WorkflowId,
        mut after: Seq,
    ) -> Result<Option<Seq>, StoreError> {
        const PAGE: usize = 500;
        loop {
            let events = self.store.read(id, after, PAGE).await?;
            if let Some(e) = events
                .iter()
                .find(|e| matches!(e.data, EventData::CancelRequested { .. }))
            {
                return Ok(Some(e.seq));
            }
            match events.last() {
                Some(last) if events.len() == PAGE => after = last.seq,
                _ => return Ok(None),
            }
        }
    }

    async fn read_all(&self, id: &WorkflowId, after: Seq) -> Result<Vec<Event>, StoreError> {
        const PAGE: usize = 1000;
        let mut out = self.store.read(id, after, PAGE).await?;
        if out.len() < PAGE {
            return Ok(out);
        }
        loop {
            let last = out.last().map_or(after, |e| e.seq);
            let more = self.store.read(id, last, PAGE).await?;
            let done = more.len() < PAGE;
            out.extend(more);
            if done {
                return Ok(out);
            }
        }
    }

    /// Builds an instance by replaying the whole history; adds the time reading it
    /// took to `reading`.
    async fn replay(
        &self,
        id: &WorkflowId,
        reading: &mut Duration,
    ) -> Result<Prepared, StoreError> {
        let read = std::time::Instant::now();
        let events = self.read_all(id, Seq::ZERO).await;
        *reading += read.elapsed();
        let events = match events {
            Ok(e) => e,
            Err(StoreError::NotFound(_)) => return Ok(Prepared::Missing),
            Err(e) => return Err(e),
        };
        let Some(first) = events.first() else {
            return Ok(Prepared::Missing);
        };
        // Closed: a task that arrived after the close (another call's result) has
        // nothing to do, and running the code again to find that out would cost as
        // much as the whole run for each such task.
        if events.last().is_some_and(|e| e.data.is_terminal()) {
            return Ok(Prepared::Missing);
        }
        let (task_queue, name) = match &first.data {
            EventData::WorkflowStarted {
                task_queue, name, ..
            } => (task_queue.clone(), Some(name.clone())),
            _ => (self.config.default_task_queue.clone(), None),
        };
        let failed = |failure: TaskFailure| {
            let last = events.last().map_or(Seq::ZERO, |e| e.seq);
            // The last failure recorded, unless something the code would see came after.
            let repeated = matches!(
                events.iter().rev().find(|e| !e.data.is_bookkeeping()).map(|e| &e.data),
                Some(EventData::WorkflowTaskFailed { message, .. }) if *message == failure.message
            );
            Prepared::Failed {
                failure,
                last,
                repeated,
                task_queue: task_queue.clone(),
                name: name.clone(),
            }
        };
        let mut inst = match Instance::start(id, first, |n| self.registry.find_workflow(n).cloned())
        {
            Ok(i) => i,
            Err(f) => return Ok(failed(f)),
        };
        for e in &events[1..] {
            if let Err(f) = inst.feed(e) {
                return Ok(failed(f));
            }
        }
        Ok(Prepared::Ready(inst))
    }

    /// Feeds events that directly follow what `inst` has seen.
    fn feed_tail(mut inst: Instance, tail: &[Event]) -> Prepared {
        for e in tail {
            if let Err(failure) = inst.feed(e) {
                return Prepared::Failed {
                    failure,
                    last: tail.last().map_or(e.seq, |l| l.seq),
                    repeated: false,
                    task_queue: inst.task_queue.clone(),
                    name: Some(inst.name.clone()),
                };
            }
        }
        Prepared::Ready(inst)
    }

    /// Brings a cached instance up to date with the store; adds the time reading
    /// took to `reading`.
    async fn catch_up(
        &self,
        mut inst: Instance,
        reading: &mut Duration,
    ) -> Result<Prepared, StoreError> {
        let read = std::time::Instant::now();
        let events = self.read_all(&inst.id, inst.applied).await;
        *reading += read.elapsed();
        let events = events?;
        for e in &events {
            if let Err(failure) = inst.feed(e) {
                let last = events.last().map_or(inst.applied, |e| e.seq);
                return Ok(Prepared::Failed {
                    failure,
                    last,
                    repeated: false,
                    task_queue: inst.task_queue.clone(),
                    name: Some(inst.name.clone()),
                });
            }
        }
        Ok(Prepared::Ready(inst))
    }

    /// Whether an instance of workflow `id` started at `started_at` is of `run`, the
    /// run a task belongs to (its `created_at`, the time of its `workflow_started`);
    /// when the task does not say, of the run the store holds now.
    async fn same_run(
        &self,
        id: &WorkflowId,
        started_at: Timestamp,
        run: Option<Timestamp>,
    ) -> Result<bool, StoreError> {
        Ok(match run {
            Some(run) => run == started_at,
            None => self
                .store
                .get(id)
                .await?
                .is_some_and(|s| s.created_at == started_at),
        })
    }

    async fn workflow_task(
        &self,
        id: &WorkflowId,
        tail: Vec<Event>,
        run: Option<Timestamp>,
    ) -> Result<(), EngineError> {
        let slot = self.cache.slot(id, self.config.cache_capacity);
        let mut cached = slot.lock().await;
        // A cached instance of an earlier run of this id (finished elsewhere, removed
        // by retention, the id used again) would take the new run's events for its own.
        let started_at = cached.as_ref().map(|inst| inst.started_at);
        if let Some(started_at) = started_at
            && !self.same_run(id, started_at, run).await?
        {
            *cached = None;
        }
        // A task of a run this replica closed (the result of a parallel call that
        // arrived after the close) has nothing to do: no replay, no history read. (A
        // tail from event 1 is a run's first task, not such a leftover.)
        if cached.is_none()
            && tail.first().is_none_or(|e| e.seq != Seq(1))
            && let Some(r) = run
            && self.closed.lock().contains(id, r)
        {
            // One summary read, not the history: a run started in the same
            // millisecond after retention removed the closed one has its `created_at`.
            let summary = self.store.get(id).await?;
            if summary.is_none_or(|s| s.created_at != r || s.status.is_terminal()) {
                drop(cached);
                self.cache.remove(id);
                return Ok(());
            }
            self.closed.lock().remove(id);
        }
        let mut tail = Some(tail);
        for _ in 0..MAX_CONFLICTS {
            // The tail continues the cached instance (or starts the history) without
            // a read; anything after it is read by the conflict that follows.
            let tail = tail.take().unwrap_or_default();
            // The code's time: the history reads are left out.
            let started = std::time::Instant::now();
            let mut reading = Duration::ZERO;
            let prepared = match cached.take() {
                Some(inst) if tail.first().is_some_and(|e| e.seq == inst.applied.next()) => {
                    Self::feed_tail(inst, &tail)
                }
                Some(inst) => self.catch_up(inst, &mut reading).await?,
                None if tail.first().is_some_and(|e| e.seq == Seq(1)) => {
                    match Instance::start(id, &tail[0], |n| self.registry.find_workflow(n).cloned())
                    {
                        Ok(inst) => Self::feed_tail(inst, &tail[1..]),
                        Err(_) => self.replay(id, &mut reading).await?,
                    }
                }
                None => self.replay(id, &mut reading).await?,
            };
            let mut inst = match prepared {
                Prepared::Ready(inst) => inst,
                Prepared::Missing => {
                    self.cache.remove(id);
                    return Ok(());
                }
                Prepared::Failed {
                    failure,
                    last,
                    repeated,
                    task_queue,
                    name,
                } => {
                    // The code failed while replaying (non-determinism, a panic in an
                    // earlier batch, an unknown workflow): counted like a failed live step.
                    if let Some(name) = &name {
                        let ran = started.elapsed().saturating_sub(reading);
                        self.task_done(name, TaskOutcome::Failed, ran, last.0);
                    }
                    return self
                        .record_task_failure(id, &task_queue, last, repeated, failure)
                        .await;
                }
            };
            if inst.finished {
                self.cache.remove(id);
                return Ok(());
            }
            let now = self.clock.now();
            let stepped = inst.live_step(now, self.config.max_history_events);
            let replay_time = started.elapsed().saturating_sub(reading);
            let datas = match stepped {
                Ok(Some(d)) => d,
                Ok(None) => {
                    self.task_done(
                        &inst.name,
                        TaskOutcome::Nothing,
                        replay_time,
                        inst.applied.0,
                    );
                    *cached = Some(inst);
                    return Ok(());
                }
                Err(failure) => {
                    self.task_done(&inst.name, TaskOutcome::Failed, replay_time, inst.applied.0);
                    let repeated = inst.last_task_failure.as_deref()
                        == Some(&format!("{}: {}", failure.kind, failure.message));
                    let last = inst.applied;
                    let tq = inst.task_queue.clone();
                    return self
                        .record_task_failure(id, &tq, last, repeated, failure)
                        .await;
                }
            };
            let expected = inst.applied;
            let terminal = inst.has_outcome() && datas.iter().any(EventData::is_terminal);
            let mut owed = OwedChanges::none().clear("wf");
            let mut activities: HashMap<String, Vec<OutgoingMessage>> = HashMap::new();
            // The task's `traceparent` for its timers, read once however many it starts.
            let mut timer_trace: Option<Option<String>> = None;
            let inline_limit = self
                .config
                .inline_input_limit
                .min(self.queue.max_message_bytes() / 2);
            for (i, d) in datas.iter().enumerate() {
                let seq = Seq(expected.0 + 1 + i as u64);
                match d {
                    EventData::ActivityScheduled {
                        activity_id,
                        name,
                        input,
                        options,
                        task_queue,
                    } => {
                        // A task queue the queue cannot carry (SQS refuses the name on
                        // every send) is not sent to: the entry is due at once, and the
                        // sweeper fails the attempt (`invalid_argument`, not retried).
                        let carried = self.queue.check_task_queue(task_queue).is_ok();
                        let deadline = if carried {
                            now.plus(attempt_budget(options, now, now))
                                .plus(self.config.activity_grace)
                        } else {
                            now
                        };
                        owed.set.push(OwedEntry {
                            kind: OwedKind::Activity {
                                activity_id: *activity_id,
                                attempt: 1,
                                scheduled_seq: seq,
                                redeliveries: 0,
                                started: None,
                                started_copy: 0,
                                resends: 0,
                            },
                            task_queue: task_queue.clone(),
                            deadline,
                            trace_context: None,
                            run: None,
                        });
                        if !carried {
                            continue;
                        }
                        let inline = self.queue.max_message_bytes() == usize::MAX
                            || serde_json::to_vec(input).map_or(0, |v| v.len()) <= inline_limit;
                        activities.entry(task_queue.clone()).or_default().push(
                            OutgoingMessage::now(Task::Activity(ActivityTask {
                                workflow_id: id.clone(),
                                activity_id: *activity_id,
                                attempt: 1,
                                scheduled_seq: seq,
                                workflow_task_queue: inst.task_queue.clone(),
                                call: inline.then(|| ActivityCall {
                                    name: name.clone(),
                                    input: input.clone(),
                                    options: options.clone(),
                                    scheduled_at: now,
                                }),
                                run: Some(inst.started_at),
                                deadline: Some(deadline),
                                copy: 0,
                            })),
                        );
                    }
                    EventData::TimerStarted { timer_id, fire_at } => owed.set.push(OwedEntry {
                        kind: OwedKind::Timer {
                            timer_id: *timer_id,
                        },
                        task_queue: inst.task_queue.clone(),
                        deadline: *fire_at,
                        // The sweeper fires it, outside any span: the task it enqueues
                        // then continues this task's trace.
                        trace_context: timer_trace
                            .get_or_insert_with(|| self.observer.trace_context())
                            .clone(),
                        run: Some(inst.started_at),
                    }),
                    _ => {}
                }
            }
            let events = datas.into_iter().map(|d| NewEvent::new(now, d)).collect();
            match self.store.append(id, expected, events, owed).await {
                Ok(last) => {
                    inst.committed(last, terminal);
                    self.task_done(&inst.name, TaskOutcome::Recorded, replay_time, last.0);
                    if terminal && let Some(status) = inst.final_status() {
                        self.observer.workflow_closed(
                            &inst.name,
                            status,
                            now.since(inst.started_at),
                        );
                    }
                    // Calls made as the run closed (never awaited) are recorded but not
                    // sent: the close cleared their owed attempts, and nothing would
                    // take their results.
                    if !terminal {
                        for (queue, msgs) in activities {
                            self.enqueue(&queue, msgs).await;
                        }
                    }
                    if terminal {
                        // Closed: nothing it called may go on.
                        self.cancel_local(id, Seq(u64::MAX));
                        self.closed.lock().insert(id, inst.started_at);
                        drop(cached);
                        self.cache.remove(id);
                    } else if self.config.cache_capacity > 0 {
                        *cached = Some(inst);
                    }
                    return Ok(());
                }
                Err(StoreError::Conflict { .. }) => {
                    self.task_done(&inst.name, TaskOutcome::Conflict, replay_time, expected.0);
                    // Someone appended first; what we polled was never recorded, so replay afresh.
                    continue;
                }
                Err(StoreError::Closed(_) | StoreError::NotFound(_)) => {
                    drop(cached);
                    self.cache.remove(id);
                    return Ok(());
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::Contended(id.clone()))
    }

    async fn record_task_failure(
        &self,
        id: &WorkflowId,
        task_queue: &str,
        last: Seq,
        repeated: bool,
        failure: TaskFailure,
    ) -> Result<(), EngineError> {
        tracing::error!(
            workflow_id = %id,
            kind = failure.kind,
            message = %failure.message,
            "workflow task failed; it is retried after {:?}",
            self.config.task_failure_retry
        );
        self.cache.remove(id);
        let now = self.clock.now();
        let events = if repeated {
            Vec::new()
        } else {
            vec![NewEvent::new(
                now,
                EventData::WorkflowTaskFailed {
                    kind: failure.kind.to_string(),
                    message: failure.message,
                },
            )]
        };
        let owed = OwedChanges::none().set(OwedEntry {
            kind: OwedKind::WORKFLOW_TASK,
            task_queue: task_queue.to_string(),
            deadline: now.plus(self.config.task_failure_retry),
            // Only the sweeper delivers the retry; it stays in this task's trace.
            trace_context: self.observer.trace_context(),
            run: None,
        });
        let mut last = last;
        for _ in 0..MAX_CONFLICTS {
            match self
                .store
                .append(id, last, events.clone(), owed.clone())
                .await
            {
                Ok(_) | Err(StoreError::Closed(_) | StoreError::NotFound(_)) => return Ok(()),
                Err(StoreError::Conflict { .. }) => {
                    // Only bookkeeping since (a streamed token, an attempt's start or
                    // retry): nothing the code would see, so the failure stands and is
                    // recorded after it. New input owes a task of its own, which runs
                    // the code again.
                    let since = match self.read_all(id, last).await {
                        Ok(e) => e,
                        Err(StoreError::NotFound(_)) => return Ok(()),
                        Err(e) => return Err(e.into()),
                    };
                    match since.last() {
                        Some(l) if since.iter().all(|e| e.data.is_bookkeeping()) => last = l.seq,
                        _ => return Ok(()),
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(EngineError::Contended(id.clone()))
    }

    /// Reads an activity call from its `activity_scheduled` event.
    async fn load_call(
        &self,
        id: &WorkflowId,
        scheduled_seq: Seq,
    ) -> Result<Option<ActivityCall>, StoreError> {
        let events = match self.store.read(id, Seq(scheduled_seq.0 - 1), 1).await {
            Ok(e) => e,
            Err(StoreError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        Ok(events.into_iter().next().and_then(|e| match e.data {
            EventData::ActivityScheduled {
                name,
                input,
                options,
                ..
            } => Some(ActivityCall {
                name,
                input,
                options,
                scheduled_at: e.timestamp,
            }),
            _ => None,
        }))
    }

    async fn activity_task(
        self: Arc<Self>,
        queue: &str,
        t: ActivityTask,
        redelivered: bool,
    ) -> Result<(), EngineError> {
        let call = match t.call.clone() {
            Some(c) => c,
            None => match self.load_call(&t.workflow_id, t.scheduled_seq).await? {
                Some(c) => {
                    // The task did not carry the call: its span learns the name now.
                    crate::observe::record_current([("activity", &c.name.as_str())]);
                    c
                }
                None => return Ok(()),
            },
        };
        // The run names the call's idempotency key. A task sent before tasks carried
        // it: the run the store holds now (the one that called it, unless retention
        // removed that one).
        let run = match t.run {
            Some(run) => run,
            None => match self.store.get(&t.workflow_id).await? {
                Some(s) => s.created_at,
                None => return Ok(()),
            },
        };
        let started_at = self.clock.now();
        let limit = attempt_limit(&call.options, call.scheduled_at, started_at);
        // A redelivery (receive count > 1: a failed ack, a worker that died or handed
        // it back) asks the store too, so an attempt already recorded is not run again.
        let late = redelivered || self.received_late(&t, limit.0, started_at);
        // An attempt with a heartbeat timeout shorter than its budget is marked too
        // (one store call), its deadline then kept by its heartbeats.
        let durable = self.durable_heartbeat(&t, &call.options, limit.0, started_at);
        let marked = late || durable.is_some();
        // Boxed: rarely awaited, and kept out of this (hot) future's size.
        // Its deadline counts from now: the heartbeat timeout's when heartbeats keep it.
        let deadline = durable.as_ref().map_or_else(
            || started_at.plus(limit.0).plus(self.config.activity_grace),
            DurableHeartbeat::marked,
        );
        if marked && !Box::pin(self.mark_started(&t, started_at, deadline, redelivered)).await? {
            crate::observe::record_current([("outcome", &AttemptOutcome::Dropped.as_str())]);
            return Ok(());
        }
        // A retry (sent after its backoff) or a task that waited in the queue may come
        // after its workflow was canceled or closed, when no attempt of the call was
        // running to be stopped: it asks the store before it runs.
        let canceled = if t.attempt > 1 || late {
            match Box::pin(self.canceled_before_running(&t)).await? {
                Some(canceled) => canceled,
                None => {
                    crate::observe::record_current([(
                        "outcome",
                        &AttemptOutcome::Dropped.as_str(),
                    )]);
                    return Ok(());
                }
            }
        } else {
            false
        };
        let clock = std::time::Instant::now();
        let name = self.activity_label(&call.name);
        let mut result = if canceled {
            Err(ActivityError::canceled())
        } else {
            let running = RunningGauge::start(self.observer.as_ref(), name);
            let result = self
                .clone()
                .run_attempt(&t, run, &call, limit, durable)
                .await;
            drop(running);
            match result {
                Some(result) => result,
                None => {
                    // The store gave the attempt up or another execution took it over:
                    // this one's outcome is not recorded.
                    crate::observe::record_current([(
                        "outcome",
                        &AttemptOutcome::Dropped.as_str(),
                    )]);
                    self.observer.activity_attempt(
                        name,
                        AttemptOutcome::Dropped,
                        Some(clock.elapsed()),
                        None,
                    );
                    return Ok(());
                }
            }
        };
        within_depth(&mut result);
        let duration = clock.elapsed();
        let error_kind = result.as_ref().err().map(|e| e.kind.clone());
        let outcome = self
            .record_outcome(queue, &t, &call, started_at, result, None)
            .await?;
        crate::observe::record_current([("outcome", &outcome.as_str())]);
        self.observer
            .activity_attempt(name, outcome, Some(duration), error_kind.as_deref());
        Ok(())
    }

    /// The name an attempt of activity `name` is reported under: a name no activity
    /// here is registered under (made up by the code: a model's tool call, say) is
    /// reported as [`crate::observe::UNREGISTERED_ACTIVITY`], not as a label value of
    /// its own.
    fn activity_label<'a>(&self, name: &'a str) -> &'a str {
        if self.registry.find_activity(name).is_some() {
            name
        } else {
            crate::observe::UNREGISTERED_ACTIVITY
        }
    }

    /// Whether the attempt must be marked started before it runs because it may not be
    /// the only copy: its owed deadline no longer leaves its start-to-close timeout
    /// plus half the grace (it waited in a backlog), or the sweeper sent it again. Any
    /// other task without a [`DurableHeartbeat`] runs without a store call.
    fn received_late(&self, t: &ActivityTask, stc: Duration, now: Timestamp) -> bool {
        let grace = self.config.activity_grace;
        // A task without a deadline was sent by an earlier version: it may have
        // waited in a backlog while the sweeper sent copies, so it is marked too.
        t.copy > 0
            || t.deadline
                .is_none_or(|d| d.since(now) < stc.saturating_add(grace / 2))
    }

    /// Whether an attempt that is about to run was canceled before it started: its
    /// workflow's cancellation came after the call (a call made after it is clean-up,
    /// which runs). `None` when the workflow is gone or closed: nothing is owed, and
    /// the attempt does not run.
    async fn canceled_before_running(&self, t: &ActivityTask) -> Result<Option<bool>, EngineError> {
        let Some(summary) = self.store.get(&t.workflow_id).await? else {
            return Ok(None);
        };
        if summary.status.is_terminal() || t.run.is_some_and(|run| run != summary.created_at) {
            return Ok(None);
        }
        if !summary.cancel_requested {
            return Ok(Some(false));
        }
        Ok(Some(
            self.cancel_requested_after(&t.workflow_id, t.scheduled_seq)
                .await?
                .is_some(),
        ))
    }

    /// How the heartbeats of an attempt that starts at `now` with `budget` keep its
    /// deadline in the store: for one whose heartbeat timeout is shorter than its budget.
    fn durable_heartbeat(
        &self,
        t: &ActivityTask,
        options: &ActivityOptions,
        budget: Duration,
        now: Timestamp,
    ) -> Option<DurableHeartbeat> {
        let hb = heartbeat_bound(options, budget)?;
        let grace = self.config.activity_grace;
        let window = hb.saturating_add(grace);
        Some(DurableHeartbeat {
            key: activity_key(t.activity_id, t.attempt),
            copy: t.copy,
            started: now,
            window,
            latest: now.plus(budget).plus(grace),
            every: hb.min(grace) / 2,
        })
    }

    /// Marks the attempt started at `now` in the store with `deadline` (its budget +
    /// grace, or its heartbeat timeout + grace when that is shorter:
    /// [`Self::received_late`], [`Self::durable_heartbeat`]); whether it should run: a
    /// copy of an attempt another worker runs, or of one no longer owed, is not run.
    async fn mark_started(
        &self,
        t: &ActivityTask,
        now: Timestamp,
        deadline: Timestamp,
        redelivered: bool,
    ) -> Result<bool, EngineError> {
        let key = activity_key(t.activity_id, t.attempt);
        match self
            .store
            .start_attempt(&t.workflow_id, &key, t.copy, now, deadline, redelivered)
            .await?
        {
            AttemptStart::Started => Ok(true),
            AttemptStart::Running { since } => {
                tracing::debug!(workflow_id = %t.workflow_id, activity_id = t.activity_id, attempt = t.attempt, since = since.0, "not running a copy of an attempt another worker runs");
                Ok(false)
            }
            AttemptStart::NotOwed => {
                tracing::debug!(workflow_id = %t.workflow_id, activity_id = t.activity_id, attempt = t.attempt, "not running an attempt that is no longer owed");
                Ok(false)
            }
        }
    }

    /// Runs the attempt under its timeouts; `None` when the store said it is no longer
    /// this execution's (a durable heartbeat found it given up or taken over).
    async fn run_attempt(
        self: Arc<Self>,
        t: &ActivityTask,
        run: Timestamp,
        call: &ActivityCall,
        (budget, budget_kind): (Duration, &'static str),
        durable: Option<DurableHeartbeat>,
    ) -> Option<Result<Value, ActivityError>> {
        let Some(f) = self.registry.find_activity(&call.name).cloned() else {
            // Retryable: during a rolling upgrade another replica (of the version that
            // added it) may run the next attempt. A name no replica registers fails
            // once the retry policy's attempts are spent.
            return Some(Err(ActivityError::retryable(format!(
                "activity {:?} is not registered on this worker",
                call.name
            ))
            .with_kind("unknown_activity")));
        };

        if budget.is_zero() {
            return Some(Err(ActivityError::timeout(budget_kind)));
        }
        let token = CancellationToken::new();
        // Removed however the attempt ends, also when a worker's hard stop drops it.
        let _registered = Registered::new(
            &self.running,
            &t.workflow_id,
            t.scheduled_seq,
            token.clone(),
        );
        let ctx = ActivityContext::new(
            Some(self.clone()),
            (t.workflow_id.clone(), run),
            (t.activity_id, t.attempt, t.scheduled_seq),
            call.name.clone(),
            token.clone(),
            durable,
        );
        // The function is called inside the caught future: one that panics before
        // returning its future fails the attempt like one that panics in it.
        let input = call.input.clone();
        let fut = AssertUnwindSafe(async { f(ctx.clone(), input).await }).catch_unwind();
        let heartbeat = call.options.heartbeat_timeout;
        let watchdog = async {
            let Some(hb) = heartbeat else {
                return std::future::pending::<()>().await;
            };
            loop {
                // A timeout too long to fall due (`Duration::MAX`) never fires.
                let Some(due) = ctx.last_heartbeat().checked_add(hb) else {
                    return std::future::pending::<()>().await;
                };
                if tokio::time::Instant::now() >= due {
                    return;
                }
                tokio::time::sleep_until(due).await;
            }
        };
        let result = tokio::select! {
            biased;
            r = fut => match r {
                Ok(r) => r,
                Err(_) => Err(ActivityError::retryable("activity panicked").with_kind("panic")),
            },
            () = tokio::time::sleep(budget) => Err(ActivityError::timeout(budget_kind)),
            () = watchdog => Err(ActivityError::timeout("heartbeat")),
            () = token.cancelled() => Err(ActivityError::canceled()),
        };
        (!ctx.superseded()).then_some(result)
    }

    /// Records an attempt's outcome and sends what it makes due (the next attempt or
    /// a workflow task). `given_up`: the sweeper gives the attempt up; `None`: a
    /// worker's result, in the current span's trace.
    async fn record_outcome(
        &self,
        queue: &str,
        t: &ActivityTask,
        call: &ActivityCall,
        started_at: Timestamp,
        result: Result<Value, ActivityError>,
        given_up: Option<GiveUp>,
    ) -> Result<AttemptOutcome, EngineError> {
        let (trace_context, requires_deadline) = match given_up {
            Some(g) => (g.trace_context, Some(g.until)),
            None => (None, None),
        };
        let now = self.clock.now();
        let started = NewEvent::new(
            started_at,
            EventData::ActivityStarted {
                activity_id: t.activity_id,
                attempt: t.attempt,
            },
        );
        // The attempt's outcome event, and the backoff delay when another attempt follows.
        let (outcome_event, retry_delay) = match result {
            Ok(output) => (
                EventData::ActivityCompleted {
                    activity_id: t.activity_id,
                    attempt: t.attempt,
                    output,
                },
                None,
            ),
            Err(error) => {
                let policy = &call.options.retry;
                let delay = policy
                    .backoff(t.attempt)
                    .max(error.retry_after.unwrap_or_default());
                let within_deadline = call
                    .options
                    .schedule_to_close
                    .is_none_or(|stc| now.plus(delay) < call.scheduled_at.plus(stc));
                let retry = error.retryable
                    && policy.retries_kind(&error.kind)
                    && policy.has_attempts_after(t.attempt)
                    && within_deadline;
                if retry {
                    let delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
                    (
                        EventData::ActivityRetrying {
                            activity_id: t.activity_id,
                            attempt: t.attempt,
                            error,
                            delay_ms,
                        },
                        Some(delay),
                    )
                } else {
                    (
                        EventData::ActivityFailed {
                            activity_id: t.activity_id,
                            attempt: t.attempt,
                            error,
                        },
                        None,
                    )
                }
            }
        };
        let recorded = match (&outcome_event, retry_delay) {
            (_, Some(_)) => AttemptOutcome::Retrying,
            (EventData::ActivityCompleted { .. }, None) => AttemptOutcome::Completed,
            _ => AttemptOutcome::Failed,
        };
        let events = vec![started, NewEvent::new(now, outcome_event)];
        // A retry owes the next attempt (delivered after the backoff); anything else owes
        // the workflow a task, which gets the appended events as its tail.
        let (owed, next_attempt) = match retry_delay {
            Some(delay) => {
                let next = now.plus(delay);
                let deadline = next
                    .plus(attempt_budget(&call.options, call.scheduled_at, next))
                    .plus(self.config.activity_grace);
                (
                    OwedChanges::none().set(OwedEntry {
                        kind: OwedKind::Activity {
                            activity_id: t.activity_id,
                            attempt: t.attempt + 1,
                            scheduled_seq: t.scheduled_seq,
                            redeliveries: 0,
                            started: None,
                            started_copy: 0,
                            resends: 0,
                        },
                        task_queue: queue.to_string(),
                        deadline,
                        trace_context: None,
                        run: None,
                    }),
                    Some(
                        OutgoingMessage::now(Task::Activity(ActivityTask {
                            attempt: t.attempt + 1,
                            deadline: Some(deadline),
                            copy: 0,
                            ..t.clone()
                        }))
                        .delayed(delay),
                    ),
                )
            }
            None => (
                OwedChanges::none().set(self.workflow_task_owed(&t.workflow_task_queue, now)),
                None,
            ),
        };
        let tail_events = next_attempt.is_none().then(|| events.clone());
        let outcome = self
            .store
            .append_keyed(
                &t.workflow_id,
                KeyedAppend {
                    key: None,
                    requires: Some(activity_key(t.activity_id, t.attempt)),
                    requires_deadline,
                    events,
                    owed,
                },
            )
            .await;
        match outcome {
            Ok(KeyedOutcome::Appended(last)) => {
                match next_attempt {
                    Some(message) => {
                        self.enqueue(queue, vec![message.traced(trace_context)])
                            .await;
                    }
                    None => {
                        self.enqueue_workflow_task(
                            &t.workflow_task_queue,
                            t.workflow_id.clone(),
                            tail_events.unwrap_or_default(),
                            last,
                            trace_context,
                            t.run,
                        )
                        .await;
                    }
                }
                Ok(recorded)
            }
            // A late or repeated result, or a finished workflow: dropped, as designed.
            Ok(_) | Err(StoreError::NotFound(_)) => Ok(AttemptOutcome::Dropped),
            Err(e) => Err(e.into()),
        }
    }

    /// Acts on `owed`, which its claim made due at `until`.
    async fn overdue(self: Arc<Self>, owed: Owed, until: Timestamp) -> Result<(), EngineError> {
        let id = owed.workflow_id;
        let now = self.clock.now();
        self.observer.overdue(match owed.entry.kind {
            OwedKind::WorkflowTask { .. } => "workflow_task",
            OwedKind::Timer { .. } => "timer",
            OwedKind::Activity { .. } => "activity",
        });
        match owed.entry.kind {
            OwedKind::WorkflowTask { resends } => {
                // The task may be lost, or still waiting in a backlog: send it again,
                // and wait twice as long before the next copy, so a long backlog costs
                // a few copies per workflow, not one per deadline. Unless the entry
                // changed since the claim (new input owes a task of its own, or the task
                // ran): then nothing is sent.
                let wait = self
                    .config
                    .workflow_task_deadline
                    .saturating_mul(1 << (resends + 1).min(MAX_RESEND_DOUBLINGS));
                let outcome = self
                    .store
                    .append_keyed(
                        &id,
                        KeyedAppend {
                            requires: Some(owed.entry.kind.key()),
                            requires_deadline: Some(until),
                            owed: OwedChanges::none().set(OwedEntry {
                                kind: OwedKind::WorkflowTask {
                                    resends: resends + 1,
                                },
                                deadline: now.plus(wait),
                                ..owed.entry.clone()
                            }),
                            ..KeyedAppend::default()
                        },
                    )
                    .await?;
                if !matches!(outcome, KeyedOutcome::Appended(_)) {
                    return Ok(());
                }
                // The task continues the trace its entry names (a failed task's retry,
                // the first task, one after a signal), else the run's: a lost task's
                // span stays in the run's trace. Reading the summary is not worth
                // failing the recovery for.
                let trace_context = match owed.entry.trace_context {
                    Some(tc) => Some(tc),
                    None => self
                        .store
                        .get(&id)
                        .await
                        .ok()
                        .flatten()
                        .and_then(|s| s.trace_context),
                };
                let message = OutgoingMessage::now(Task::workflow(id));
                self.enqueue(&owed.entry.task_queue, vec![message.traced(trace_context)])
                    .await;
            }
            OwedKind::Timer { timer_id } => {
                // A timer's entry carries the workflow's own task queue.
                let task_queue = owed.entry.task_queue.clone();
                let fired = NewEvent::new(now, EventData::TimerFired { timer_id });
                let outcome = self
                    .store
                    .append_keyed(
                        &id,
                        KeyedAppend {
                            key: None,
                            requires: Some(owed.entry.kind.key()),
                            requires_deadline: None,
                            events: vec![fired.clone()],
                            owed: OwedChanges::none()
                                .set(self.workflow_task_owed(&task_queue, now)),
                        },
                    )
                    .await?;
                if let KeyedOutcome::Appended(last) = outcome {
                    self.enqueue_workflow_task(
                        &task_queue,
                        id,
                        vec![fired],
                        last,
                        owed.entry.trace_context,
                        owed.entry.run,
                    )
                    .await;
                }
            }
            OwedKind::Activity {
                activity_id,
                attempt,
                scheduled_seq,
                redeliveries,
                started,
                started_copy: _,
                resends,
            } => {
                let Some(call) = self.load_call(&id, scheduled_seq).await? else {
                    return Ok(());
                };
                let Some(summary) = self.store.get(&id).await? else {
                    return Ok(());
                };
                let stc = call.options.start_to_close;
                let grace = self.config.activity_grace;
                // A worker that started it and then neither finished nor renewed it in
                // time was lost with it: for an attempt whose heartbeats keep its
                // deadline (a heartbeat timeout shorter than its budget), that is its
                // heartbeat timeout, recorded as such and retried per the retry policy,
                // as the worker's own watchdog would have; other such losses count
                // towards `timeout.lost`. An attempt no worker has marked started may be
                // lost, or may still wait in a backlog: it is sent again (a worker runs
                // one copy), less and less often, and never counted as lost.
                let heartbeat = started.and_then(|s| {
                    heartbeat_bound(
                        &call.options,
                        attempt_budget(&call.options, call.scheduled_at, s),
                    )
                });
                let give_up = if let Err(reason) =
                    self.queue.check_task_queue(&owed.entry.task_queue)
                {
                    Some(
                        ActivityError::permanent(format!(
                            "task queue {:?} cannot be used with this queue: {reason}",
                            owed.entry.task_queue
                        ))
                        .with_kind("invalid_argument"),
                    )
                } else if call
                    .options
                    .schedule_to_close
                    .is_some_and(|s| now >= call.scheduled_at.plus(s))
                {
                    Some(ActivityError::timeout("schedule_to_close"))
                } else if let Some(hb) = heartbeat {
                    Some(
                        ActivityError::retryable(format!(
                            "activity heartbeat timeout: attempt {attempt} recorded no heartbeat for {hb:?} + grace ({grace:?}); its worker was lost"
                        ))
                        .with_kind("timeout.heartbeat"),
                    )
                } else if started.is_some() && redeliveries >= self.config.max_redeliveries {
                    Some(
                        ActivityError::retryable(format!(
                            "attempt {attempt} was started {} times and each time its worker was lost before a result (start-to-close + grace passed)",
                            redeliveries + 1
                        ))
                        .with_kind("timeout.lost"),
                    )
                } else {
                    None
                };
                let mut task = ActivityTask {
                    workflow_id: id.clone(),
                    activity_id,
                    attempt,
                    scheduled_seq,
                    workflow_task_queue: summary.task_queue.clone(),
                    call: None,
                    run: Some(summary.created_at),
                    deadline: None,
                    copy: 0,
                };
                if let Some(error) = give_up {
                    let kind = error.kind.clone();
                    let outcome = self
                        .record_outcome(
                            &owed.entry.task_queue,
                            &task,
                            &call,
                            now,
                            Err(error),
                            Some(GiveUp {
                                trace_context: summary.trace_context,
                                until,
                            }),
                        )
                        .await?;
                    // Not given up after all (a result, or a start since the claim):
                    // no timeout to count. No worker measured how long the attempt
                    // ran (it was lost, or still runs): no duration.
                    if outcome != AttemptOutcome::Dropped {
                        self.observer.activity_attempt(
                            self.activity_label(&call.name),
                            outcome,
                            None,
                            Some(&kind),
                        );
                    }
                    return Ok(());
                }
                let (redeliveries, resends, wait) = match started {
                    Some(_) => (redeliveries + 1, resends, stc.saturating_add(grace)),
                    None => (
                        redeliveries,
                        resends + 1,
                        stc.saturating_add(grace)
                            .saturating_mul(1 << (resends + 1).min(MAX_RESEND_DOUBLINGS)),
                    ),
                };
                // Not past its schedule-to-close: the sweeper records that timeout then.
                let deadline = match call.options.schedule_to_close {
                    Some(s) => now.plus(wait).min(call.scheduled_at.plus(s)),
                    None => now.plus(wait),
                };
                task.deadline = Some(deadline);
                task.copy = redeliveries.saturating_add(resends);
                let outcome = self
                    .store
                    .append_keyed(
                        &id,
                        KeyedAppend {
                            key: None,
                            requires: Some(owed.entry.kind.key()),
                            // Not if a worker marked it started since the claim.
                            requires_deadline: Some(until),
                            events: Vec::new(),
                            owed: OwedChanges::none().set(OwedEntry {
                                kind: OwedKind::Activity {
                                    activity_id,
                                    attempt,
                                    scheduled_seq,
                                    redeliveries,
                                    started: None,
                                    started_copy: 0,
                                    resends,
                                },
                                task_queue: owed.entry.task_queue.clone(),
                                deadline,
                                trace_context: None,
                                run: None,
                            }),
                        },
                    )
                    .await?;
                if let KeyedOutcome::Appended(_) = outcome {
                    if started.is_some() {
                        tracing::warn!(workflow_id = %id, activity_id, attempt, "re-delivering an activity attempt whose worker was lost");
                    } else {
                        tracing::info!(workflow_id = %id, activity_id, attempt, resends, "sending an activity attempt no worker has started again (its task was lost, or still waits in the queue)");
                    }
                    // In the run's trace, under the span that started the run.
                    let message =
                        OutgoingMessage::now(Task::Activity(task)).traced(summary.trace_context);
                    self.enqueue(&owed.entry.task_queue, vec![message]).await;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod cache_tests {
    use super::{Cache, WorkflowId};

    /// `engine.cache_capacity` set to the largest value, meant as unbounded, keeps
    /// every slot (it overflowed: a panic in every workflow task of a debug build,
    /// a compaction on every new slot past 1,022 in a release build).
    #[test]
    fn an_unbounded_capacity_keeps_every_slot() {
        let cache = Cache::default();
        for i in 0..3 {
            let id = WorkflowId::parse(format!("w{i}")).expect("an id");
            let _slot = cache.slot(&id, usize::MAX);
        }
        assert_eq!(cache.slots.lock().len(), 3);
    }

    /// An id removed from the cache and cached again, over and over (a workflow task
    /// failing every `task_failure_retry`, each failure removing its slot), leaves one
    /// entry in the eviction order, not one per time: the compaction kept every entry
    /// of a cached id, and with the cache under capacity the order grew without end.
    #[test]
    fn an_id_cached_again_and_again_keeps_one_entry() {
        let cache = Cache::default();
        let capacity = 10;
        let others: Vec<_> = (0..5)
            .map(|i| WorkflowId::parse(format!("other{i}")).expect("an id"))
            .collect();
        for id in &others {
            let _slot = cache.slot(id, capacity);
        }
        let failing = WorkflowId::parse("failing").expect("an id");
        for _ in 0..5_000 {
            let _slot = cache.slot(&failing, capacity);
            cache.remove(&failing);
        }
        let _slot = cache.slot(&failing, capacity);
        let order = cache.order.lock();
        assert!(
            order.len() <= 2 * capacity + 1024 + 1,
            "{} entries for {} cached ids",
            order.len(),
            cache.slots.lock().len()
        );
        // The oldest first: the ids cached once, then the one cached last.
        assert_eq!(order.back(), Some(&failing));
        assert!(others.iter().all(|id| order.contains(id)));
    }
}

#[cfg(test)]
mod bound_tests {
    use super::bound_error;

    /// A long message is cut at a character boundary, whatever its characters.
    #[test]
    fn a_long_message_is_cut_between_characters() {
        // 3 bytes each: the limit falls inside one.
        let mut message = "€".repeat(crate::MAX_ERROR_MESSAGE_BYTES / 3 + 10);
        let total = message.len();
        let mut details = None;
        bound_error(&mut details, &mut message, 10, 10);
        let (kept, note) = message.split_once(" … ").expect("a note");
        assert!(kept.len() <= crate::MAX_ERROR_MESSAGE_BYTES);
        assert!(kept.chars().all(|c| c == '€'));
        assert_eq!(note, format!("(message cut from {total} bytes)"));
    }
}

#[cfg(test)]
mod running_tests {
    use super::{Mutex, Registered, Seq, WorkflowId};
    use std::collections::HashMap;
    use tokio_util::sync::CancellationToken;

    /// Two executions of one attempt in this process (a redelivery after a lapsed
    /// visibility runs beside the first): the first to end leaves the other's entry,
    /// so a cancellation still reaches it. Before, entries were removed by (activity
    /// id, attempt), both at once.
    #[test]
    fn the_first_copy_to_end_leaves_the_others_entry() {
        let running = Mutex::new(HashMap::new());
        let id = WorkflowId::parse("w").expect("an id");
        let (a, b) = (CancellationToken::new(), CancellationToken::new());
        let first = Registered::new(&running, &id, Seq(5), a);
        let _second = Registered::new(&running, &id, Seq(5), b.clone());
        drop(first);
        let left: Vec<_> = running.lock().get(&id).cloned().unwrap_or_default();
        assert_eq!(left.len(), 1);
        left[0].2.cancel();
        assert!(b.is_cancelled());
    }
}
