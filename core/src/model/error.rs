use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;
use std::time::Duration;

/// How an activity attempt failed: retryable or permanent, with an optional retry-after hint.
///
/// `kind` is a short machine-readable name (`"rate_limited"`, `"timeout"`,
/// `"bad_request"`); a [`crate::RetryPolicy`] can list kinds that are never retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityError {
    /// Machine-readable kind of failure.
    pub kind: String,
    /// Human-readable message.
    pub message: String,
    /// Whether another attempt may succeed.
    pub retryable: bool,
    /// Wait at least this long before the next attempt (an LLM provider's `Retry-After`).
    #[serde(
        default,
        with = "crate::model::duration_ms::option",
        rename = "retry_after_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub retry_after: Option<Duration>,
    /// Optional structured details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl ActivityError {
    /// A failure that another attempt may fix (kind `"error"`).
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            kind: "error".into(),
            message: message.into(),
            retryable: true,
            retry_after: None,
            details: None,
        }
    }

    /// A failure that no further attempt can fix (kind `"error"`).
    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            retryable: false,
            ..Self::retryable(message)
        }
    }

    /// Sets the machine-readable kind.
    #[must_use]
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = kind.into();
        self
    }

    /// Asks for the next attempt to wait at least `after`.
    #[must_use]
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }

    /// Attaches structured details.
    #[must_use]
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// A timeout of the given kind (`start_to_close`, `schedule_to_close`, `heartbeat`); retryable.
    pub fn timeout(which: &str) -> Self {
        Self::retryable(format!("activity {which} timeout")).with_kind(format!("timeout.{which}"))
    }

    /// The attempt was canceled because its workflow was canceled; permanent.
    pub fn canceled() -> Self {
        Self::permanent("activity canceled").with_kind("canceled")
    }
}

impl fmt::Display for ActivityError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ActivityError {}

impl From<serde_json::Error> for ActivityError {
    fn from(e: serde_json::Error) -> Self {
        Self::permanent(e.to_string()).with_kind("serialization")
    }
}

/// Why a workflow (or one awaited step in it) failed.
///
/// Well-known kinds: `canceled` (the workflow was canceled; returning it ends
/// the workflow as `canceled`), `activity_failed` (an activity used up its
/// attempts; `details` holds the last [`ActivityError`]), `serialization`,
/// `unknown_workflow`, `panic`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkflowError {
    /// Machine-readable kind.
    pub kind: String,
    /// Human-readable message.
    pub message: String,
    /// Optional structured details.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<Value>,
}

impl WorkflowError {
    /// An application failure (kind `"error"`).
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            kind: "error".into(),
            message: message.into(),
            details: None,
        }
    }

    /// Sets the machine-readable kind.
    #[must_use]
    pub fn with_kind(mut self, kind: impl Into<String>) -> Self {
        self.kind = kind.into();
        self
    }

    /// Attaches structured details.
    #[must_use]
    pub fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    /// The workflow was canceled.
    pub fn canceled(reason: Option<&str>) -> Self {
        Self::new(reason.map_or_else(
            || "workflow canceled".to_string(),
            |r| format!("workflow canceled: {r}"),
        ))
        .with_kind("canceled")
    }

    /// Whether this error means the workflow was canceled.
    #[must_use]
    pub fn is_canceled(&self) -> bool {
        self.kind == "canceled"
    }

    /// An activity used up its attempts (or failed permanently).
    pub fn activity_failed(name: &str, attempts: u32, last: &ActivityError) -> Self {
        Self::new(format!(
            "activity {name} failed after {attempts} attempt(s): {last}"
        ))
        .with_kind("activity_failed")
        .with_details(serde_json::to_value(last).unwrap_or(Value::Null))
    }

    /// The last activity error, when this is an `activity_failed` error.
    #[must_use]
    pub fn activity_error(&self) -> Option<ActivityError> {
        if self.kind != "activity_failed" {
            return None;
        }
        self.details
            .as_ref()
            .and_then(|d| serde_json::from_value(d.clone()).ok())
    }
}

impl fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for WorkflowError {}

impl From<serde_json::Error> for WorkflowError {
    fn from(e: serde_json::Error) -> Self {
        Self::new(e.to_string()).with_kind("serialization")
    }
}
