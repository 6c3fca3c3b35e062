use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::model::duration_ms;

/// When and how often a failed activity is tried again.
///
/// The delay before attempt `n + 1` is `initial_interval * backoff_coefficient^(n - 1)`,
/// capped at `maximum_interval`, and never shorter than the failed attempt's
/// `retry_after` hint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay before the second attempt. Default 1 s.
    #[serde(with = "duration_ms", rename = "initial_interval_ms")]
    pub initial_interval: Duration,
    /// Growth factor of the delay per attempt (at least 1.0). Default 2.0.
    pub backoff_coefficient: f64,
    /// Largest delay between attempts. Default 100 s.
    #[serde(with = "duration_ms", rename = "maximum_interval_ms")]
    pub maximum_interval: Duration,
    /// Attempts in all, the first included; 0 means unlimited. Default 5.
    pub maximum_attempts: u32,
    /// Error kinds that are never retried, whatever `retryable` says.
    pub non_retryable_kinds: Vec<String>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_secs(1),
            backoff_coefficient: 2.0,
            maximum_interval: Duration::from_secs(100),
            maximum_attempts: 5,
            non_retryable_kinds: Vec::new(),
        }
    }
}

impl RetryPolicy {
    /// A policy that never retries.
    #[must_use]
    pub fn no_retries() -> Self {
        Self {
            maximum_attempts: 1,
            ..Self::default()
        }
    }

    /// The backoff delay after attempt `attempt` (1-based) failed, before any retry-after hint.
    #[must_use]
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = i32::try_from(attempt.saturating_sub(1)).unwrap_or(i32::MAX);
        let factor = self.backoff_coefficient.max(1.0).powi(exp);
        let secs = self.initial_interval.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.maximum_interval.as_secs_f64() {
            self.maximum_interval
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// Whether attempt `attempt` (1-based) may be followed by another.
    #[must_use]
    pub fn has_attempts_after(&self, attempt: u32) -> bool {
        self.maximum_attempts == 0 || attempt < self.maximum_attempts
    }

    /// Whether errors of `kind` may be retried under this policy.
    #[must_use]
    pub fn retries_kind(&self, kind: &str) -> bool {
        !self.non_retryable_kinds.iter().any(|k| k == kind)
    }
}

/// How one activity call is run: retries, timeouts and task queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ActivityOptions {
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Longest one attempt may run. Default 5 minutes.
    #[serde(with = "duration_ms", rename = "start_to_close_ms")]
    pub start_to_close: Duration,
    /// Longest the whole call may take, all attempts and backoff included. Default none.
    #[serde(
        with = "duration_ms::option",
        rename = "schedule_to_close_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub schedule_to_close: Option<Duration>,
    /// An attempt that does not heartbeat within this interval is failed. Default none.
    #[serde(
        with = "duration_ms::option",
        rename = "heartbeat_timeout_ms",
        skip_serializing_if = "Option::is_none"
    )]
    pub heartbeat_timeout: Option<Duration>,
    /// Task queue that runs the activity; `None` means the workflow's own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_queue: Option<String>,
}

impl ActivityOptions {
    /// Checks what a call's options cannot mean: a zero timeout (every attempt would
    /// time out at once, and with unlimited attempts forever) or an empty task queue.
    ///
    /// # Errors
    /// What is wrong, naming the option as serialized (`start_to_close_ms`, ...).
    pub fn check(&self) -> Result<(), String> {
        if self.start_to_close.is_zero() {
            return Err("start_to_close_ms must be more than 0".into());
        }
        if self.schedule_to_close.is_some_and(|d| d.is_zero()) {
            return Err("schedule_to_close_ms must be more than 0 (leave it out for none)".into());
        }
        if self.heartbeat_timeout.is_some_and(|d| d.is_zero()) {
            return Err("heartbeat_timeout_ms must be more than 0 (leave it out for none)".into());
        }
        if self.task_queue.as_deref() == Some("") {
            return Err("task_queue must not be empty (leave it out for the workflow's)".into());
        }
        Ok(())
    }
}

impl Default for ActivityOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            start_to_close: Duration::from_secs(300),
            schedule_to_close: None,
            heartbeat_timeout: None,
            task_queue: None,
        }
    }
}

impl ActivityOptions {
    /// Sets the retry policy.
    #[must_use]
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Sets the start-to-close timeout.
    #[must_use]
    pub fn start_to_close(mut self, d: Duration) -> Self {
        self.start_to_close = d;
        self
    }

    /// Sets the schedule-to-close timeout.
    #[must_use]
    pub fn schedule_to_close(mut self, d: Duration) -> Self {
        self.schedule_to_close = Some(d);
        self
    }

    /// Sets the heartbeat timeout.
    #[must_use]
    pub fn heartbeat_timeout(mut self, d: Duration) -> Self {
        self.heartbeat_timeout = Some(d);
        self
    }

    /// Runs the activity on another task queue.
    #[must_use]
    pub fn task_queue(mut self, q: impl Into<String>) -> Self {
        self.task_queue = Some(q.into());
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            initial_interval: Duration::from_millis(100),
            backoff_coefficient: 2.0,
            maximum_interval: Duration::from_millis(500),
            maximum_attempts: 4,
            non_retryable_kinds: vec!["bad_request".into()],
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(3), Duration::from_millis(400));
        assert_eq!(p.backoff(4), Duration::from_millis(500));
        assert_eq!(p.backoff(1000), Duration::from_millis(500));
        assert!(p.has_attempts_after(3));
        assert!(!p.has_attempts_after(4));
        assert!(!p.retries_kind("bad_request"));
        assert!(
            RetryPolicy {
                maximum_attempts: 0,
                ..p
            }
            .has_attempts_after(u32::MAX - 1)
        );
    }

    #[test]
    fn options_round_trip_as_milliseconds() {
        let o = ActivityOptions::default().heartbeat_timeout(Duration::from_secs(2));
        let v = serde_json::to_value(&o).unwrap();
        assert_eq!(v["start_to_close_ms"], 300_000);
        assert_eq!(v["heartbeat_timeout_ms"], 2000);
        let back: ActivityOptions = serde_json::from_value(v).unwrap();
        assert_eq!(back, o);
        assert!(serde_json::from_str::<ActivityOptions>(r#"{"bogus":1}"#).is_err());
    }
}
