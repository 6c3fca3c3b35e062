//! The `Store` trait: append-only event histories, summaries and owed work.

use async_trait::async_trait;
use futures::stream::BoxStream;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

use crate::model::{Event, NewEvent, Seq, Timestamp, WorkflowId, WorkflowStatus, WorkflowSummary};

/// A boxed error from a backend's client.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of a [`Store`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No workflow with this id.
    #[error("workflow {0} not found")]
    NotFound(WorkflowId),
    /// A conditional append lost the race: someone appended after `expected`.
    #[error("workflow {id}: expected last event {expected}, found {actual}")]
    Conflict {
        /// The workflow.
        id: WorkflowId,
        /// The last sequence the writer had seen.
        expected: Seq,
        /// The last sequence in the store.
        actual: Seq,
    },
    /// The workflow has finished; its history takes no more conditional appends.
    #[error("workflow {0} has already finished")]
    Closed(WorkflowId),
    /// A list cursor that this store did not issue.
    #[error("invalid cursor: {0}")]
    InvalidCursor(String),
    /// The store could not be reached (connection, timeout, failover); retryable.
    #[error("store unreachable: {0}")]
    Unavailable(#[source] BoxError),
    /// The store rejected the operation (script error, wrong type, auth); permanent.
    #[error("store rejected the operation: {0}")]
    Backend(#[source] BoxError),
}

impl StoreError {
    /// Whether trying the same operation again later may succeed.
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }
}

/// A request to create a workflow; the store records `workflow_started` as event 1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewWorkflow {
    /// The new workflow's id.
    pub id: WorkflowId,
    /// Registered workflow name.
    pub name: String,
    /// Input as JSON.
    pub input: Value,
    /// Task queue of its workflow tasks.
    pub task_queue: String,
    /// A start with the same key returns the workflow first created with it.
    pub idempotency_key: Option<String>,
    /// Creation time; the timestamp of event 1.
    pub started_at: Timestamp,
    /// Deadline of the owed first workflow task.
    pub task_deadline: Timestamp,
    /// W3C `traceparent` of the span that started the run, when traced: kept in its
    /// summary, so that what reaches the run later (signals, cancellation, the
    /// sweeper's recovery of a lost first task) continues the run's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<String>,
}

/// The result of [`Store::create`].
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    /// The workflow: the new one, or the one that already had this id or idempotency key.
    pub summary: WorkflowSummary,
    /// Whether this call created it.
    pub created: bool,
}

/// Work a workflow is owed, recorded in the same atomic step as the events that created it.
///
/// The `key` of each kind identifies it within its workflow; setting an existing key replaces it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OwedKind {
    /// A workflow task must run (new input is waiting). Key `wf`.
    WorkflowTask {
        /// How many times the sweeper has sent the task again since the entry was
        /// set (the task may be lost, or still waiting in a backlog): each resend
        /// waits twice as long as the one before, up to 16 times the deadline.
        #[serde(default, skip_serializing_if = "is_zero")]
        resends: u32,
    },
    /// An activity attempt is in flight. Key `a:{activity_id}:{attempt}`; its
    /// outcome is appended only while this entry exists (late results are dropped).
    Activity {
        /// Command id of the call.
        activity_id: u32,
        /// The live attempt.
        attempt: u32,
        /// Sequence of the `activity_scheduled` event.
        scheduled_seq: Seq,
        /// How many times the sweeper has delivered this attempt again after a
        /// worker started it and then neither finished nor renewed it in time.
        #[serde(default)]
        redeliveries: u32,
        /// When a worker marked it started ([`Store::start_attempt`]), since the
        /// sweeper last sent it; `None` while no worker has (it may still be
        /// waiting in a queue's backlog).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        started: Option<Timestamp>,
        /// Which copy of its task the worker that marked it started received
        /// ([`crate::ActivityTask::copy`]); meaningful while `started` is set.
        #[serde(default, skip_serializing_if = "is_zero")]
        started_copy: u32,
        /// How many times the sweeper has sent it again while no worker had marked
        /// it started (lost before a worker took it, or still waiting in a backlog).
        #[serde(default, skip_serializing_if = "is_zero")]
        resends: u32,
    },
    /// A durable timer; its deadline is the fire time. Key `t:{timer_id}`.
    Timer {
        /// Command id of the timer.
        timer_id: u32,
    },
}

impl OwedKind {
    /// The entry's key within its workflow.
    #[must_use]
    pub fn key(&self) -> String {
        match self {
            OwedKind::WorkflowTask { .. } => "wf".to_string(),
            OwedKind::Activity {
                activity_id,
                attempt,
                ..
            } => activity_key(*activity_id, *attempt),
            OwedKind::Timer { timer_id } => format!("t:{timer_id}"),
        }
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl OwedKind {
    /// A workflow task owed afresh (no resends yet).
    pub const WORKFLOW_TASK: OwedKind = OwedKind::WorkflowTask { resends: 0 };
}

/// The owed-work key of an activity attempt.
#[must_use]
pub fn activity_key(activity_id: u32, attempt: u32) -> String {
    format!("a:{activity_id}:{attempt}")
}

/// One owed-work entry of a workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwedEntry {
    /// What is owed.
    pub kind: OwedKind,
    /// Task queue the work runs on.
    pub task_queue: String,
    /// When it is overdue (for a timer: when it fires).
    pub deadline: Timestamp,
    /// W3C `traceparent` the task the sweeper enqueues for it continues: for a timer or
    /// a failed workflow task's retry, the task that owes it; for the first workflow
    /// task and one owed after a signal or cancellation, the run's. `None` elsewhere
    /// (the sweeper then takes the run's from its summary).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<String>,
    /// The run that owes it (its `created_at`), for a timer: the workflow task the
    /// sweeper sends when it fires names its run, so a replica that caches the
    /// workflow need not read its summary to know the instance is of that run.
    /// `None` elsewhere.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Timestamp>,
}

/// An overdue entry returned by [`Store::claim_overdue`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owed {
    /// The workflow that is owed the work.
    pub workflow_id: WorkflowId,
    /// The entry (its deadline as it was before the claim).
    pub entry: OwedEntry,
}

/// Changes to a workflow's owed work, applied atomically with an append.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwedChanges {
    /// Entries to add or replace (by key).
    pub set: Vec<OwedEntry>,
    /// Keys to remove (absent keys are ignored).
    pub clear: Vec<String>,
}

impl OwedChanges {
    /// No change.
    #[must_use]
    pub fn none() -> Self {
        Self::default()
    }

    /// Adds or replaces `entry`.
    #[must_use]
    pub fn set(mut self, entry: OwedEntry) -> Self {
        self.set.push(entry);
        self
    }

    /// Removes the entry with `key`.
    #[must_use]
    pub fn clear(mut self, key: impl Into<String>) -> Self {
        self.clear.push(key.into());
        self
    }
}

/// A keyed append: events appended at the end, whatever the last sequence, at most once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KeyedAppend {
    /// Deduplication key: a second append with the same key is a [`KeyedOutcome::Duplicate`].
    pub key: Option<String>,
    /// Owed-work key that must exist; it is removed by the append (an activity
    /// result consumes its live attempt, a timer firing its timer).
    pub requires: Option<String>,
    /// With `requires`: the entry must still fall due at exactly this deadline (the
    /// end of the lease the sweeper's claim gave it), else nothing is written
    /// ([`KeyedOutcome::NotOwed`]): an entry changed since the claim (a worker
    /// marked the attempt started) is not replaced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requires_deadline: Option<Timestamp>,
    /// The events.
    pub events: Vec<NewEvent>,
    /// Owed-work changes applied after `requires` is consumed.
    pub owed: OwedChanges,
}

/// The result of [`Store::append_keyed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyedOutcome {
    /// Appended; the new last sequence.
    Appended(Seq),
    /// The key was used before; nothing written (also once the workflow has finished).
    Duplicate,
    /// The required owed entry does not exist (a late or repeated result); nothing written.
    NotOwed,
    /// The workflow has finished and the key (if any) was not used before; nothing written.
    Closed,
}

/// The result of [`Store::start_attempt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptStart {
    /// Marked started, its deadline moved: run it.
    Started,
    /// A worker marked it started at `since` and its deadline has not passed: this
    /// copy of the task is a duplicate; run nothing.
    Running {
        /// When that worker started it.
        since: Timestamp,
    },
    /// The attempt is no longer owed (it has an outcome, was given up, or the
    /// workflow has finished or is gone): run nothing.
    NotOwed,
}

/// The result of [`Store::extend_attempt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptExtend {
    /// The deadline moved: the execution that marked the attempt started still holds
    /// it. Also what a summary read would have said of cancellation, in the same step.
    Extended {
        /// Whether the workflow's cancellation has been requested.
        cancel_requested: bool,
    },
    /// The attempt is no longer this execution's: it has an outcome, was given up,
    /// was marked started anew (another copy, or the queue's redelivery of this one,
    /// took it over), or the workflow has finished or is gone. Nothing was written;
    /// the execution should stop (its result would be dropped or run beside another).
    NotOwed,
}

/// A filter and page request for [`Store::list`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListQuery {
    /// Only workflows in this status.
    pub status: Option<WorkflowStatus>,
    /// Only workflows with this registered name.
    pub name: Option<String>,
    /// Continue after this cursor (from a previous page's `next_cursor`).
    pub cursor: Option<String>,
    /// Page size (a store may cap it; 0 means the store's default).
    pub limit: usize,
}

/// About the most JSON the summaries of one [`Store::list`] page take: a page stops
/// before a summary that would take it past this (its first summary always fits),
/// since `limit` summaries with outputs of up to [`crate::MAX_PAYLOAD_BYTES`] would
/// be gigabytes, read into memory and sent in one response.
pub const LIST_PAGE_BYTES: usize = 4 * 1024 * 1024;

/// Counts a [`Store::list`] page's summaries against [`LIST_PAGE_BYTES`].
#[derive(Debug, Clone, Default)]
pub struct ListBudget {
    bytes: usize,
    count: usize,
}

impl ListBudget {
    /// Counts a summary of `len` bytes of JSON (see [`crate::json_len`]) if the page
    /// still holds it: its first summary always, a later one while the page (with
    /// its commas) stays within [`LIST_PAGE_BYTES`].
    pub fn admit(&mut self, len: usize) -> bool {
        let total = self
            .bytes
            .saturating_add(len)
            .saturating_add(usize::from(self.count > 0));
        if self.count > 0 && total > LIST_PAGE_BYTES {
            return false;
        }
        self.bytes = total;
        self.count += 1;
        true
    }
}

/// One page of workflow summaries, newest first.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListPage {
    /// The workflows on this page.
    pub items: Vec<WorkflowSummary>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// A live stream of events.
pub type EventStream = BoxStream<'static, Result<Event, StoreError>>;

/// Append-only event histories, called concurrently from many replicas.
///
/// Every method that writes does so atomically: events, summary
/// ([`crate::model::SummaryPatch`]), owed work and index entries change together or not at all.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates a workflow with `workflow_started` as event 1 and an owed workflow task.
    ///
    /// Idempotent: if the id exists, or `idempotency_key` was used before, nothing
    /// is written and the existing workflow is returned with `created: false`; when
    /// both name one, the key's (it names the start a client made).
    async fn create(&self, new: NewWorkflow) -> Result<Created, StoreError>;

    /// Appends `events` after `expected_last`, all or nothing, and applies `owed`.
    ///
    /// `events` may be empty (a compare-and-set of owed work). A terminal event
    /// clears all of the workflow's owed work.
    ///
    /// # Errors
    /// [`StoreError::Conflict`] if anyone appended after `expected_last`;
    /// [`StoreError::Closed`] if the workflow has finished; [`StoreError::NotFound`].
    async fn append(
        &self,
        id: &WorkflowId,
        expected_last: Seq,
        events: Vec<NewEvent>,
        owed: OwedChanges,
    ) -> Result<Seq, StoreError>;

    /// Appends at the end whatever the last sequence is, at most once per key
    /// and only while the required owed entry exists.
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; backend errors.
    async fn append_keyed(
        &self,
        id: &WorkflowId,
        append: KeyedAppend,
    ) -> Result<KeyedOutcome, StoreError>;

    /// Up to `limit` events with sequence greater than `after`, in order.
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; backend errors.
    async fn read(
        &self,
        id: &WorkflowId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError>;

    /// Events after `after` as they are appended, by any replica; the stream ends
    /// after a terminal event.
    ///
    /// # Errors
    /// [`StoreError::NotFound`]; backend errors.
    async fn subscribe(&self, id: &WorkflowId, after: Seq) -> Result<EventStream, StoreError>;

    /// The workflow's summary, or `None`.
    async fn get(&self, id: &WorkflowId) -> Result<Option<WorkflowSummary>, StoreError>;

    /// Summaries newest first (by creation time, then id), filtered, one page at a time.
    ///
    /// Paging with `next_cursor` returns every workflow that matches the filter
    /// throughout the paging exactly once, even while others change status. A page
    /// holds at most `limit` summaries and stops at about [`LIST_PAGE_BYTES`] of
    /// JSON ([`ListBudget`]; at least one summary), with a `next_cursor` after its
    /// last summary.
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError>;

    /// Marks the owed activity attempt `key` of workflow `id` as started at `now` by
    /// a worker about to run copy `copy` of its task, and moves its deadline to
    /// `deadline` (a millisecond later if that is its deadline already, so that a
    /// claim's `requires_deadline` sees the change): from then on its deadline counts
    /// from its start, not from when it was sent.
    ///
    /// An attempt marked started whose deadline has not passed is left alone
    /// ([`AttemptStart::Running`]), unless `redelivered` and the mark is of this same
    /// copy: the queue delivered that message again, so the worker that started it
    /// is gone. A missing workflow, entry, or an entry that is not an activity
    /// attempt is [`AttemptStart::NotOwed`].
    async fn start_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        now: Timestamp,
        deadline: Timestamp,
        redelivered: bool,
    ) -> Result<AttemptStart, StoreError>;

    /// Moves the deadline of the owed activity attempt `key` of workflow `id` to
    /// `deadline` (a millisecond later if that is its deadline already, as
    /// [`Store::start_attempt`] does) while it is still the mark of the execution that
    /// started it: marked started at `started` by copy `copy`. A worker's durable
    /// heartbeat: the attempt stays owed to it for as long as it heartbeats, and the
    /// sweeper finds it overdue soon after it stops.
    ///
    /// Atomic with a read of the workflow's `cancel_requested`, returned with
    /// [`AttemptExtend::Extended`] so that the heartbeat needs no summary read besides.
    /// A missing workflow or entry, an entry that is not an activity attempt, one not
    /// marked started or marked by another start (`started` or `copy` differ) is
    /// [`AttemptExtend::NotOwed`], and nothing is written.
    async fn extend_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        started: Timestamp,
        deadline: Timestamp,
    ) -> Result<AttemptExtend, StoreError>;

    /// Claims up to `limit` owed entries whose deadline is at or before `now`:
    /// each claimed entry's deadline moves to `now + lease`, so that it goes to one
    /// claimant until the lease runs out.
    async fn claim_overdue(
        &self,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Owed>, StoreError>;

    /// Deletes up to `limit` finished workflows closed before `closed_before`
    /// (history, summary, index entries, keys); returns how many.
    async fn purge_closed(
        &self,
        closed_before: Timestamp,
        limit: usize,
    ) -> Result<usize, StoreError>;

    /// Checks that the store answers.
    async fn ping(&self) -> Result<(), StoreError>;
}
