use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{ActivityError, ActivityOptions, Seq, Timestamp, WorkflowError};

/// One recorded event of a workflow history.
///
/// Serialized as `{"seq": 3, "timestamp": 1700000000000, "type": "activity_completed", "payload": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the history, from 1, without gaps.
    pub seq: Seq,
    /// When the event was recorded (ms since the epoch); replay's clock.
    pub timestamp: Timestamp,
    /// The event's type and payload.
    #[serde(flatten)]
    pub data: EventData,
}

/// An event about to be appended: the store assigns its sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewEvent {
    /// When the event happened.
    pub timestamp: Timestamp,
    /// The event's type and payload.
    #[serde(flatten)]
    pub data: EventData,
}

impl NewEvent {
    /// An event stamped `timestamp`.
    #[must_use]
    pub fn new(timestamp: Timestamp, data: EventData) -> Self {
        Self { timestamp, data }
    }
}

/// The type and payload of an event; `type` names are the `snake_case` of the variant.
///
/// Activities and timers share one per-workflow counter of command ids, so a
/// replayed call can be matched with the event recorded for it by position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "payload", rename_all = "snake_case")]
#[non_exhaustive]
pub enum EventData {
    /// The workflow was created; always event 1.
    WorkflowStarted {
        /// Registered workflow name.
        name: String,
        /// Input as JSON.
        input: Value,
        /// Task queue of its workflow tasks (and, by default, its activities).
        task_queue: String,
        /// The `Idempotency-Key` the start was made with, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<String>,
    },
    /// A workflow task ran: the inputs before this event were delivered to the
    /// workflow code, and the commands right after it are what the code did next.
    WorkflowTaskCompleted {},
    /// A workflow task could not run the code (non-determinism, panic,
    /// unknown workflow); the task is retried later and the workflow stays running.
    WorkflowTaskFailed {
        /// Machine-readable kind, e.g. `non_determinism`.
        kind: String,
        /// What went wrong.
        message: String,
    },
    /// The workflow called an activity (a command).
    ActivityScheduled {
        /// Command id of the call.
        activity_id: u32,
        /// Registered activity name.
        name: String,
        /// Input as JSON.
        input: Value,
        /// Retry policy, timeouts, task queue.
        options: ActivityOptions,
        /// Task queue the activity runs on.
        task_queue: String,
    },
    /// An attempt began (recorded together with its outcome).
    ActivityStarted {
        /// Command id of the call.
        activity_id: u32,
        /// Attempt number, from 1.
        attempt: u32,
    },
    /// The activity returned a value.
    ActivityCompleted {
        /// Command id of the call.
        activity_id: u32,
        /// Attempt that succeeded.
        attempt: u32,
        /// Output as JSON.
        output: Value,
    },
    /// The activity failed for good: permanent error, attempts used up or schedule-to-close passed.
    ActivityFailed {
        /// Command id of the call.
        activity_id: u32,
        /// Last attempt.
        attempt: u32,
        /// The last attempt's error.
        error: ActivityError,
    },
    /// An attempt failed and another follows after `delay_ms`.
    ActivityRetrying {
        /// Command id of the call.
        activity_id: u32,
        /// The attempt that failed.
        attempt: u32,
        /// Its error.
        error: ActivityError,
        /// Backoff before the next attempt.
        delay_ms: u64,
    },
    /// The workflow started a durable timer (a command).
    TimerStarted {
        /// Command id of the timer.
        timer_id: u32,
        /// When it fires.
        fire_at: Timestamp,
    },
    /// A timer fired.
    TimerFired {
        /// Command id of the timer.
        timer_id: u32,
    },
    /// A signal was delivered to the workflow.
    SignalReceived {
        /// Signal name.
        name: String,
        /// Signal payload.
        payload: Value,
    },
    /// Someone asked for the workflow to be canceled.
    CancelRequested {
        /// Optional reason.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Progress reported by a running activity (streamed tokens, status); not replayed.
    Progress {
        /// Command id of the activity.
        activity_id: u32,
        /// Attempt reporting it.
        attempt: u32,
        /// Which execution of the attempt reported it: random, the same for all of one
        /// execution's progress. A new value for the same attempt means the worker
        /// running it was lost and another took it over from the start, so a reader
        /// drops what the earlier execution streamed. 0 in events recorded before
        /// 2026-11-27.
        #[serde(default)]
        execution: u32,
        /// Free-form data.
        data: Value,
    },
    /// The workflow returned a value (a command; terminal).
    WorkflowCompleted {
        /// Output as JSON.
        output: Value,
    },
    /// The workflow returned an error (a command; terminal).
    WorkflowFailed {
        /// The error.
        error: WorkflowError,
    },
    /// The workflow ended canceled (a command; terminal).
    WorkflowCanceled {
        /// The cancellation error.
        error: WorkflowError,
    },
}

impl EventData {
    /// The event's `type` name as serialized (`activity_completed`).
    #[must_use]
    pub fn type_name(&self) -> &'static str {
        match self {
            Self::WorkflowStarted { .. } => "workflow_started",
            Self::WorkflowTaskCompleted {} => "workflow_task_completed",
            Self::WorkflowTaskFailed { .. } => "workflow_task_failed",
            Self::ActivityScheduled { .. } => "activity_scheduled",
            Self::ActivityStarted { .. } => "activity_started",
            Self::ActivityCompleted { .. } => "activity_completed",
            Self::ActivityFailed { .. } => "activity_failed",
            Self::ActivityRetrying { .. } => "activity_retrying",
            Self::TimerStarted { .. } => "timer_started",
            Self::TimerFired { .. } => "timer_fired",
            Self::SignalReceived { .. } => "signal_received",
            Self::CancelRequested { .. } => "cancel_requested",
            Self::Progress { .. } => "progress",
            Self::WorkflowCompleted { .. } => "workflow_completed",
            Self::WorkflowFailed { .. } => "workflow_failed",
            Self::WorkflowCanceled { .. } => "workflow_canceled",
        }
    }

    /// Whether this event ends the workflow.
    #[must_use]
    pub fn is_terminal(&self) -> bool {
        self.closing_status().is_some()
    }

    /// The status this event ends the workflow with, if it ends it.
    #[must_use]
    pub fn closing_status(&self) -> Option<crate::model::WorkflowStatus> {
        use crate::model::WorkflowStatus;
        match self {
            Self::WorkflowCompleted { .. } => Some(WorkflowStatus::Completed),
            Self::WorkflowFailed { .. } => Some(WorkflowStatus::Failed),
            Self::WorkflowCanceled { .. } => Some(WorkflowStatus::Canceled),
            _ => None,
        }
    }

    /// Whether this event is new input for the workflow code (it owes a workflow task).
    #[must_use]
    pub fn is_input(&self) -> bool {
        matches!(
            self,
            Self::WorkflowStarted { .. }
                | Self::ActivityCompleted { .. }
                | Self::ActivityFailed { .. }
                | Self::TimerFired { .. }
                | Self::SignalReceived { .. }
                | Self::CancelRequested { .. }
        )
    }

    /// Whether this event is bookkeeping an activity's worker records between workflow
    /// tasks (`activity_started`, `activity_retrying`, `progress`): the workflow code
    /// never sees it, so it changes nothing a workflow task would do.
    #[must_use]
    pub fn is_bookkeeping(&self) -> bool {
        matches!(
            self,
            Self::ActivityStarted { .. } | Self::ActivityRetrying { .. } | Self::Progress { .. }
        )
    }

    /// Whether this event records a command of the workflow code (matched on replay).
    #[must_use]
    pub fn is_command(&self) -> bool {
        matches!(
            self,
            Self::ActivityScheduled { .. } | Self::TimerStarted { .. }
        ) || self.is_terminal()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_serialize_with_type_and_payload() {
        let e = Event {
            seq: Seq(3),
            timestamp: Timestamp(7),
            data: EventData::TimerFired { timer_id: 2 },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"seq": 3, "timestamp": 7, "type": "timer_fired", "payload": {"timer_id": 2}})
        );
        assert_eq!(serde_json::from_value::<Event>(v).unwrap(), e);
        let marker = serde_json::to_value(EventData::WorkflowTaskCompleted {}).unwrap();
        assert_eq!(marker["type"], "workflow_task_completed");
        assert_eq!(
            EventData::WorkflowTaskCompleted {}.type_name(),
            marker["type"].as_str().unwrap()
        );
    }
}
