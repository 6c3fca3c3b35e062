use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::{ActivityOptions, Event, Seq, Timestamp, WorkflowId};

/// A unit of work carried by the [`crate::Queue`]: a notification, not the record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[expect(
    clippy::large_enum_variant,
    reason = "a task is built once per message and moved, never stored in bulk"
)]
pub enum Task {
    /// Run the workflow code against its history and record what it does next.
    Workflow {
        /// The workflow.
        workflow_id: WorkflowId,
        /// The events just appended that made this task due, when small: a
        /// replica that has the workflow cached up to the event before them
        /// continues without reading the history.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        tail: Vec<Event>,
        /// The run it belongs to: its `created_at` (the time of its
        /// `workflow_started`). A workflow id names a new run once retention has
        /// removed a finished one; a replica's cached instance of the old run must
        /// not take the new run's task. `None` when the sender did not know (the
        /// receiver then asks the store).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        run: Option<Timestamp>,
    },
    /// Run one attempt of an activity.
    Activity(ActivityTask),
}

impl Task {
    /// A workflow task without a tail.
    #[must_use]
    pub fn workflow(workflow_id: WorkflowId) -> Self {
        Task::Workflow {
            workflow_id,
            tail: Vec::new(),
            run: None,
        }
    }

    /// The workflow this task belongs to.
    #[must_use]
    pub fn workflow_id(&self) -> &WorkflowId {
        match self {
            Task::Workflow { workflow_id, .. } => workflow_id,
            Task::Activity(a) => &a.workflow_id,
        }
    }
}

/// One attempt of one activity call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityTask {
    /// The workflow that called it.
    pub workflow_id: WorkflowId,
    /// Command id of the call.
    pub activity_id: u32,
    /// Attempt number, from 1.
    pub attempt: u32,
    /// Sequence of its `activity_scheduled` event, where the call is read from when not inlined.
    pub scheduled_seq: Seq,
    /// Task queue of the workflow's own tasks (where the result's workflow task goes).
    pub workflow_task_queue: String,
    /// The call itself, inlined unless its input is too large for a queue message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<ActivityCall>,
    /// The run that called it (its `created_at`), handed on to the workflow task its
    /// result makes due; `None` when unknown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<Timestamp>,
    /// The deadline of its owed entry when it was sent: a worker that receives it
    /// late marks the attempt started ([`crate::Store::start_attempt`]), so that a
    /// wait in a queue's backlog does not make it look lost. `None` (a task sent by a
    /// version before this field): always marked, as if late.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline: Option<Timestamp>,
    /// Which copy of the attempt's task this is: 0 the first one sent, then one more
    /// for each the sweeper sends (a copy the sweeper sent is marked started before
    /// it runs, so that it runs once even when the task it replaces still waits). A queue's redelivery of the copy whose worker
    /// marked the attempt started takes the attempt over; any other copy does not.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub copy: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What an activity task runs: name, input, options.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityCall {
    /// Registered activity name.
    pub name: String,
    /// Input as JSON.
    pub input: Value,
    /// Retry policy and timeouts.
    pub options: ActivityOptions,
    /// When the call was scheduled (start of schedule-to-close).
    pub scheduled_at: Timestamp,
}
