//! Where the engine reads wall-clock time from.

use std::sync::Arc;

use crate::model::Timestamp;

/// A source of wall-clock time for event timestamps, deadlines and timers.
pub trait Clock: Send + Sync + 'static {
    /// The current time.
    fn now(&self) -> Timestamp;
}

/// The system clock (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        Timestamp::now()
    }
}

/// Wall time at creation plus tokio's monotonic time since: follows tokio's
/// paused and advanced time in tests (`#[tokio::test(start_paused = true)]`).
#[derive(Debug, Clone, Copy)]
pub struct TokioClock {
    base: Timestamp,
    start: tokio::time::Instant,
}

impl TokioClock {
    /// A clock anchored at the current system time.
    #[must_use]
    pub fn new() -> Self {
        Self {
            base: Timestamp::now(),
            start: tokio::time::Instant::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Timestamp {
        self.base.plus(self.start.elapsed())
    }
}

/// A shared clock.
pub type SharedClock = Arc<dyn Clock>;
