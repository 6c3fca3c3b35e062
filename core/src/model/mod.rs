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

/// The deepest a JSON value recorded in a history may nest (arrays and objects inside
/// each other): stores and queues read histories and messages back with
/// `serde_json`, which stops at 128 levels, and events and tasks wrap a value in a
/// few levels of their own. Starts and signals with deeper values are refused.
pub const MAX_VALUE_DEPTH: usize = 100;

/// Whether `value` nests arrays and objects more than `max` levels deep (a scalar
/// is 0 levels, `[1]` one). Walks with a stack of its own, so any depth is safe.
#[must_use]
pub fn nests_deeper_than(value: &serde_json::Value, max: usize) -> bool {
    matches!(value_within(value, max, usize::MAX), Err(ValueLimit::Depth))
}

/// The largest JSON value (serialized) a history records: a workflow's input and
/// output, a signal's payload, an activity's input and output. Every workflow task
/// reads a run's history back, and an events page holds up to 1,000 events, so a
/// value of hundreds of megabytes (a model's runaway output) would make each of them
/// that large. Larger values are refused or fail what made them, with a clear error.
pub const MAX_PAYLOAD_BYTES: usize = 2 * 1024 * 1024;

/// The longest error message (in bytes) a history records for an activity or a
/// workflow; a longer one (a provider's whole error page) is cut at a character
/// boundary, saying so. An activity's message is repeated in each retry's event and
/// in the workflow's `activity_failed` error, so it is kept far below
/// [`MAX_PAYLOAD_BYTES`].
pub const MAX_ERROR_MESSAGE_BYTES: usize = 64 * 1024;

/// Whether `value`, serialized as JSON, takes more than `max` bytes. Stops counting
/// as soon as it does, and needs no serialization for scalars and short strings.
#[must_use]
pub fn json_larger_than(value: &serde_json::Value, max: usize) -> bool {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(_) | Value::Number(_) if max >= 32 => false,
        // At most 6 bytes a byte (`\u001f`), plus the quotes.
        Value::String(s) if s.len().saturating_mul(6).saturating_add(2) <= max => false,
        _ => serde_json::to_writer(&mut Counter { written: 0, max }, value).is_err(),
    }
}

/// `url` as logs, errors and printed configurations show it: a password in it, or a
/// lone credential (`redis://secret@host`), replaced by `***`; in a string that is not a
/// URL at all (a typo such as `rediss//u:secret@h`), everything before an `@`. Every
/// backend and the server show URLs through this one function.
#[must_use]
pub fn masked_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return match url.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => url.to_string(),
        };
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_string();
    };
    let user = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_string(),
    };
    format!("{scheme}://{user}@{host}{tail}")
}

/// The length of `value` as JSON, counted without building it (0 for a value that
/// cannot be serialized).
#[must_use]
pub fn json_len<T: serde::Serialize + ?Sized>(value: &T) -> usize {
    let mut c = Counter {
        written: 0,
        max: usize::MAX,
    };
    match serde_json::to_writer(&mut c, value) {
        Ok(()) => c.written,
        Err(_) => 0,
    }
}

/// Counts bytes written; fails once past `max`.
struct Counter {
    written: usize,
    max: usize,
}

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.written = self.written.saturating_add(buf.len());
        if self.written > self.max {
            return Err(std::io::Error::other("over the limit"));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The limit of [`value_within`] a value goes past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueLimit {
    /// It nests deeper than allowed.
    Depth,
    /// It holds more values (arrays, objects and scalars, one each) than allowed.
    Values,
}

/// Checks that `value` nests at most `max_depth` levels and holds at most
/// `max_values` values, walking with a stack of its own and stopping at the first
/// limit it goes past.
///
/// # Errors
/// The limit it goes past.
pub fn value_within(
    value: &serde_json::Value,
    max_depth: usize,
    max_values: usize,
) -> Result<(), ValueLimit> {
    walk(value, max_depth, max_values).map(|_| ())
}

/// How many values (arrays, objects and scalars, one each) `value` holds, or `None`
/// when more than `max`.
pub(crate) fn values_within(value: &serde_json::Value, max: usize) -> Option<usize> {
    walk(value, usize::MAX, max).ok()
}

/// The walk of [`value_within`]: how many values `value` holds.
fn walk(
    value: &serde_json::Value,
    max_depth: usize,
    max_values: usize,
) -> Result<usize, ValueLimit> {
    use serde_json::Value;
    // Scalars (most values on the hot path) need no walk and no stack.
    if !matches!(value, Value::Array(_) | Value::Object(_)) {
        return if max_values == 0 {
            Err(ValueLimit::Values)
        } else {
            Ok(1)
        };
    }
    let mut count = 0usize;
    let mut stack: Vec<(&Value, usize)> = vec![(value, 0)];
    while let Some((v, depth)) = stack.pop() {
        count += 1;
        if count > max_values {
            return Err(ValueLimit::Values);
        }
        let children: Box<dyn Iterator<Item = &Value>> = match v {
            Value::Array(items) => Box::new(items.iter()),
            Value::Object(fields) => Box::new(fields.values()),
            _ => continue,
        };
        if depth + 1 > max_depth {
            return Err(ValueLimit::Depth);
        }
        stack.extend(children.map(|c| (c, depth + 1)));
    }
    Ok(count)
}

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

#[cfg(test)]
mod tests {
    use super::{json_larger_than, nests_deeper_than};

    #[test]
    fn json_larger_than_counts_serialized_bytes() {
        assert!(!json_larger_than(&json!(null), 4));
        assert!(!json_larger_than(&json!("abc"), 5));
        assert!(json_larger_than(&json!("abcd"), 5));
        assert!(json_larger_than(&json!("\u{1}"), 7));
        assert!(!json_larger_than(&json!([1, 2]), 5));
        assert!(json_larger_than(&json!([1, 22]), 5));
        assert!(json_larger_than(&json!({"k": "x".repeat(100)}), 100));
        assert!(!json_larger_than(&json!({"k": "x".repeat(100)}), 108));
        assert!(!json_larger_than(&json!(1.5), 100));
    }
    use serde_json::json;

    #[test]
    fn depth_counts_arrays_and_objects() {
        assert!(!nests_deeper_than(&json!(1), 0));
        assert!(nests_deeper_than(&json!([]), 0));
        assert!(!nests_deeper_than(&json!([1, {"a": 2}]), 2));
        assert!(nests_deeper_than(&json!([1, {"a": [2]}]), 2));
        let mut deep = json!("leaf");
        for _ in 0..10_000 {
            deep = serde_json::Value::Array(vec![deep]);
        }
        assert!(nests_deeper_than(&deep, 100));
        assert!(!nests_deeper_than(&deep, 10_000));
        assert_eq!(
            super::value_within(&json!([1, 2, [3]]), 10, 4),
            Err(super::ValueLimit::Values)
        );
        assert_eq!(super::value_within(&json!([1, 2, [3]]), 10, 5), Ok(()));
        // Dropping so deep a value recurses; forget it (a test, not the engine).
        std::mem::forget(deep);
    }
}
