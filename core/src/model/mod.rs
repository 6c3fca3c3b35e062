//! The data model shared by the engine, the backends and the API: ids, time,
//! events, options, errors, summaries and queue tasks.

mod error;
mod event;
mod ids;
mod options;
mod summary;
mod task;

pub use error::{ActivityError, WorkflowError};
pub use event::{Event, EventData, NewEvent};
pub use ids::{IdError, MAX_WORKFLOW_ID_LEN, Seq, Timestamp, WorkflowId};
pub use options::{ActivityOptions, RetryPolicy};
pub use summary::{SummaryPatch, WorkflowStatus, WorkflowSummary};
pub use task::{ActivityCall, ActivityTask, Task};

/// Serde helpers that write a [`std::time::Duration`] as whole milliseconds.
pub mod duration_ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    /// Serializes a duration as milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Deserializes milliseconds into a duration.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }

    /// The same for `Option<Duration>` (`null` when absent).
    pub mod option {
        use serde::{Deserialize, Deserializer, Serializer};
        use std::time::Duration;

        /// Serializes an optional duration as milliseconds or `null`.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
                None => s.serialize_none(),
            }
        }

        /// Deserializes optional milliseconds.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
        }
    }
}
