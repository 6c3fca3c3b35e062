use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

use crate::model::{EventData, NewEvent, Seq, Timestamp, WorkflowError, WorkflowId};

/// Where a workflow is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkflowStatus {
    /// Started and not yet finished.
    Running,
    /// Returned a value.
    Completed,
    /// Returned an error.
    Failed,
    /// Ended by cancellation.
    Canceled,
}

impl WorkflowStatus {
    /// Every status, in a fixed order.
    pub const ALL: [WorkflowStatus; 4] = [
        WorkflowStatus::Running,
        WorkflowStatus::Completed,
        WorkflowStatus::Failed,
        WorkflowStatus::Canceled,
    ];

    /// Whether the workflow has finished.
    #[must_use]
    pub fn is_terminal(self) -> bool {
        self != WorkflowStatus::Running
    }

    /// The `snake_case` name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            WorkflowStatus::Running => "running",
            WorkflowStatus::Completed => "completed",
            WorkflowStatus::Failed => "failed",
            WorkflowStatus::Canceled => "canceled",
        }
    }
}

impl fmt::Display for WorkflowStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for WorkflowStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| {
                format!("unknown status {s:?}; expected running, completed, failed or canceled")
            })
    }
}

/// The summary row of a workflow, derived from its history and kept beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowSummary {
    /// Workflow id.
    pub id: WorkflowId,
    /// Registered workflow name.
    pub name: String,
    /// Current status.
    pub status: WorkflowStatus,
    /// Task queue of its workflow tasks.
    pub task_queue: String,
    /// The start's idempotency key, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// When it was started.
    pub created_at: Timestamp,
    /// When its last event was recorded.
    pub updated_at: Timestamp,
    /// When it finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_at: Option<Timestamp>,
    /// Sequence number of its last event.
    pub last_seq: Seq,
    /// Whether cancellation was requested.
    #[serde(default)]
    pub cancel_requested: bool,
    /// Output, once completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Value>,
    /// Error, once failed or canceled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WorkflowError>,
    /// The last workflow-task failure (e.g. non-determinism) while it is unresolved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_failure: Option<String>,
    /// W3C `traceparent` of the span that started it, when it was traced: its trace
    /// id names the run's trace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_context: Option<String>,
}

impl WorkflowSummary {
    /// Applies a patch computed by [`SummaryPatch::of`] for events ending at `last_seq`.
    pub fn apply(&mut self, patch: &SummaryPatch, last_seq: Seq) {
        self.last_seq = last_seq;
        if let Some(t) = patch.updated_at {
            self.updated_at = t;
        }
        if let Some(s) = patch.status {
            self.status = s;
            self.closed_at = patch.updated_at;
        }
        if patch.cancel_requested {
            self.cancel_requested = true;
        }
        if let Some(o) = &patch.output {
            self.output = Some(o.clone());
        }
        if let Some(e) = &patch.error {
            self.error = Some(e.clone());
        }
        match &patch.task_failure {
            Some(Some(f)) => self.task_failure = Some(f.clone()),
            Some(None) => self.task_failure = None,
            None => {}
        }
    }
}

/// How a batch of appended events changes a summary; every Store applies it in
/// the same atomic step as the append (the Redis store writes these fields from its script).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SummaryPatch {
    /// Timestamp of the last event of the batch.
    pub updated_at: Option<Timestamp>,
    /// New status, when the batch ends the workflow.
    pub status: Option<WorkflowStatus>,
    /// The batch requests cancellation.
    pub cancel_requested: bool,
    /// Output of a completed workflow.
    pub output: Option<Value>,
    /// Error of a failed or canceled workflow.
    pub error: Option<WorkflowError>,
    /// `Some(Some(msg))` records a workflow-task failure, `Some(None)` clears it.
    pub task_failure: Option<Option<String>>,
}

impl SummaryPatch {
    /// The patch for appending `events`.
    #[must_use]
    pub fn of(events: &[NewEvent]) -> Self {
        let mut p = SummaryPatch {
            updated_at: events.last().map(|e| e.timestamp),
            ..Self::default()
        };
        for e in events {
            match &e.data {
                EventData::WorkflowCompleted { output } => {
                    p.status = Some(WorkflowStatus::Completed);
                    p.output = Some(output.clone());
                }
                EventData::WorkflowFailed { error } => {
                    p.status = Some(WorkflowStatus::Failed);
                    p.error = Some(error.clone());
                }
                EventData::WorkflowCanceled { error } => {
                    p.status = Some(WorkflowStatus::Canceled);
                    p.error = Some(error.clone());
                }
                EventData::CancelRequested { .. } => p.cancel_requested = true,
                EventData::WorkflowTaskFailed { kind, message } => {
                    p.task_failure = Some(Some(format!("{kind}: {message}")));
                }
                EventData::WorkflowTaskCompleted {} => p.task_failure = Some(None),
                _ => {}
            }
        }
        p
    }

    /// Whether the batch ends the workflow.
    #[must_use]
    pub fn is_terminal(&self) -> bool {
        self.status.is_some()
    }
}
