//! How a task travels as an SQS message: JSON body, attributes, and delays
//! beyond SQS's 15-minute limit.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_sqs::types::MessageAttributeValue;
use marathon_core::{OutgoingMessage, QueueError, Task};

/// Message attribute carrying the W3C `traceparent` of the sender.
pub(crate) const TRACEPARENT: &str = "traceparent";
/// Message attribute carrying when a message is really due (Unix milliseconds),
/// set when its delay exceeds what SQS can delay natively.
pub(crate) const DUE_AT: &str = "marathon-due-ms";
/// Longest `DelaySeconds` SQS accepts on a standard queue.
pub(crate) const MAX_NATIVE_DELAY: Duration = Duration::from_secs(900);
/// Longest visibility timeout SQS accepts.
pub(crate) const MAX_VISIBILITY: Duration = Duration::from_secs(12 * 60 * 60);

/// A task ready to send.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    /// JSON of the task.
    pub(crate) body: String,
    /// `DelaySeconds` to send with.
    pub(crate) delay_seconds: i32,
    /// Message attributes (trace context, due time).
    pub(crate) attributes: HashMap<String, MessageAttributeValue>,
    /// Size as SQS counts it: body plus attribute names, types and values.
    pub(crate) size: usize,
}

/// Whole seconds, rounded up, so "no sooner than" holds.
pub(crate) fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// Whole seconds rounded up and clamped to `max`, as the `i32` the SDK wants.
pub(crate) fn secs_i32(d: Duration, max: Duration) -> i32 {
    i32::try_from(ceil_secs(d.min(max))).unwrap_or(i32::MAX)
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn string_attr(value: &str, data_type: &str) -> Result<MessageAttributeValue, QueueError> {
    MessageAttributeValue::builder()
        .data_type(data_type)
        .string_value(value)
        .build()
        .map_err(|e| QueueError::Backend(Box::new(e)))
}

fn attributes_size(attributes: &HashMap<String, MessageAttributeValue>) -> usize {
    attributes
        .iter()
        .map(|(k, v)| k.len() + v.data_type().len() + v.string_value().map_or(0, str::len))
        .sum()
}

/// Encodes `msg`; delays longer than `max_native_delay` are sent with that delay
/// and a [`DUE_AT`] attribute that [`due_in`] checks on receipt.
///
/// # Errors
/// [`QueueError::TooLarge`] above `limit` bytes; [`QueueError::Backend`] if the
/// task does not serialize.
pub(crate) fn encode(
    msg: &OutgoingMessage,
    now: SystemTime,
    max_native_delay: Duration,
    limit: usize,
) -> Result<Encoded, QueueError> {
    let mut body =
        serde_json::to_string(&msg.task).map_err(|e| QueueError::Backend(Box::new(e)))?;
    // SQS refuses U+FFFE and U+FFFF in a body (serde_json escapes only control
    // characters); outside strings JSON is ASCII, so escaping them keeps the value.
    if body.contains(['\u{FFFE}', '\u{FFFF}']) {
        body = body
            .replace('\u{FFFE}', "\\uFFFE")
            .replace('\u{FFFF}', "\\uFFFF");
    }
    let mut attributes = HashMap::new();
    if let Some(tp) = &msg.trace_context {
        attributes.insert(TRACEPARENT.to_owned(), string_attr(tp, "String")?);
    }
    let native = if ceil_secs(msg.delay) <= max_native_delay.as_secs() {
        msg.delay
    } else {
        let due = unix_ms(now + msg.delay);
        attributes.insert(DUE_AT.to_owned(), string_attr(&due.to_string(), "Number")?);
        max_native_delay
    };
    let size = body.len() + attributes_size(&attributes);
    if size > limit {
        return Err(QueueError::TooLarge { size, limit });
    }
    Ok(Encoded {
        body,
        delay_seconds: secs_i32(native, MAX_NATIVE_DELAY),
        attributes,
        size,
    })
}

/// How long until a received message is due; `None` if it is due now.
pub(crate) fn due_in(
    attributes: Option<&HashMap<String, MessageAttributeValue>>,
    now: SystemTime,
) -> Option<Duration> {
    let due_ms = due_ms(attributes)?;
    let now_ms = unix_ms(now);
    (due_ms > now_ms).then(|| Duration::from_millis(due_ms - now_ms))
}

/// The due time (Unix ms) a long-delayed message carries.
pub(crate) fn due_ms(attributes: Option<&HashMap<String, MessageAttributeValue>>) -> Option<u64> {
    attributes?.get(DUE_AT)?.string_value()?.parse().ok()
}

/// Receives a FIFO message spent hidden before its due time: it was hidden for
/// at most 12 h at a time from its first receive until `due_ms`.
pub(crate) fn early_receives(due_ms: u64, first_receive_ms: u64) -> u32 {
    if first_receive_ms >= due_ms {
        return 0;
    }
    let max_ms = u64::try_from(MAX_VISIBILITY.as_millis()).unwrap_or(u64::MAX);
    u32::try_from((due_ms - first_receive_ms).div_ceil(max_ms)).unwrap_or(u32::MAX)
}

/// The trace context a message was sent with.
pub(crate) fn trace_context(
    attributes: Option<&HashMap<String, MessageAttributeValue>>,
) -> Option<String> {
    attributes?
        .get(TRACEPARENT)?
        .string_value()
        .map(str::to_owned)
}

/// Decodes a message body.
///
/// # Errors
/// The JSON error if the body is not a [`Task`].
pub(crate) fn decode(body: &str) -> Result<Task, serde_json::Error> {
    serde_json::from_str(body)
}

#[cfg(test)]
mod tests {
    use super::*;
    use marathon_core::WorkflowId;

    fn task() -> Task {
        Task::workflow(WorkflowId::parse("wf-1").expect("valid id"))
    }

    const LIMIT: usize = 256 * 1024;

    #[test]
    fn short_delay_is_native_and_rounded_up() {
        let now = SystemTime::now();
        let m = OutgoingMessage::now(task()).delayed(Duration::from_millis(1500));
        let e = encode(&m, now, MAX_NATIVE_DELAY, LIMIT).expect("encodes");
        assert_eq!(e.delay_seconds, 2);
        assert!(!e.attributes.contains_key(DUE_AT));
        assert_eq!(due_in(Some(&e.attributes), now), None);
        assert_eq!(decode(&e.body).expect("decodes"), task());
    }

    #[test]
    fn long_delay_is_capped_and_carries_due_time() {
        let now = SystemTime::now();
        let delay = Duration::from_secs(3600);
        let m = OutgoingMessage::now(task()).delayed(delay);
        let e = encode(&m, now, MAX_NATIVE_DELAY, LIMIT).expect("encodes");
        assert_eq!(e.delay_seconds, 900);
        let left = due_in(Some(&e.attributes), now).expect("not due yet");
        assert!(left <= delay && left > delay - Duration::from_millis(2));
        // After the native delay it is still not due: 45 minutes are left.
        let later = now + Duration::from_secs(900);
        let left = due_in(Some(&e.attributes), later).expect("not due yet");
        assert_eq!(ceil_secs(left), 2700);
        assert_eq!(due_in(Some(&e.attributes), now + delay), None);
    }

    #[test]
    fn small_threshold_exercises_the_same_path() {
        let now = SystemTime::now();
        let m = OutgoingMessage::now(task()).delayed(Duration::from_secs(3));
        let e = encode(&m, now, Duration::from_secs(1), LIMIT).expect("encodes");
        assert_eq!(e.delay_seconds, 1);
        assert!(due_in(Some(&e.attributes), now + Duration::from_secs(1)).is_some());
        // FIFO queues delay nothing natively.
        let e = encode(&m, now, Duration::ZERO, LIMIT).expect("encodes");
        assert_eq!(e.delay_seconds, 0);
        assert!(due_in(Some(&e.attributes), now).is_some());
    }

    #[test]
    fn trace_context_round_trips_and_size_counts_attributes() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut m = OutgoingMessage::now(task());
        m.trace_context = Some(tp.to_owned());
        let e = encode(&m, SystemTime::now(), MAX_NATIVE_DELAY, LIMIT).expect("encodes");
        assert_eq!(trace_context(Some(&e.attributes)).as_deref(), Some(tp));
        assert_eq!(
            e.size,
            e.body.len() + TRACEPARENT.len() + "String".len() + tp.len()
        );
    }

    #[test]
    fn too_large_is_refused() {
        let e = encode(
            &OutgoingMessage::now(task()),
            SystemTime::now(),
            MAX_NATIVE_DELAY,
            10,
        );
        assert!(matches!(e, Err(QueueError::TooLarge { limit: 10, .. })));
    }

    #[test]
    fn early_receives_count_twelve_hour_hides() {
        let h = 3_600_000;
        assert_eq!(early_receives(1000, 1000), 0);
        assert_eq!(early_receives(1000, 2000), 0);
        assert_eq!(early_receives(3000, 1000), 1);
        assert_eq!(early_receives(12 * h, 0), 1);
        assert_eq!(early_receives(12 * h + 1, 0), 2);
        assert_eq!(early_receives(30 * h, 0), 3);
    }

    #[test]
    fn seconds_round_up_and_clamp() {
        assert_eq!(secs_i32(Duration::ZERO, MAX_VISIBILITY), 0);
        assert_eq!(secs_i32(Duration::from_millis(1), MAX_VISIBILITY), 1);
        assert_eq!(
            secs_i32(Duration::from_secs(86_400), MAX_VISIBILITY),
            43_200
        );
    }
}
