//! Classification of SDK errors into [`QueueError`], done once at the boundary.

use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use marathon_core::QueueError;

/// Error codes SQS (and LocalStack) use for throttling, and for the in-flight limit
/// (`OverLimit`: 120,000 received and not yet deleted messages), which clears as
/// messages are acked: both are worth retrying.
const THROTTLING: &[&str] = &[
    "OverLimit",
    "AWS.SimpleQueueService.OverLimit",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "RequestThrottled",
    "RequestThrottledException",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "SlowDown",
    "AWS.SimpleQueueService.RequestThrottled",
];

/// Error codes meaning the receipt handle is unknown, malformed or expired.
const BAD_RECEIPT: &[&str] = &[
    "ReceiptHandleIsInvalid",
    "InvalidReceiptHandle",
    "MessageNotInflight",
    "AWS.SimpleQueueService.MessageNotInflight",
    "AWS.SimpleQueueService.ReceiptHandleIsInvalid",
];

/// Error codes meaning the queue does not exist (deleted, or lost with a broker restart).
const MISSING_QUEUE: &[&str] = &[
    "QueueDoesNotExist",
    "AWS.SimpleQueueService.NonExistentQueue",
    "NonExistentQueue",
];

/// What went wrong, with the operation and the SDK's chain of messages.
#[derive(thiserror::Error)]
#[error("SQS {op}: {detail}")]
pub(crate) struct SqsError {
    op: &'static str,
    detail: String,
    /// The queue addressed does not exist (any more).
    missing_queue: bool,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

/// The text, not the SDK error's fields: its `Debug` holds the whole HTTP response.
impl std::fmt::Debug for SqsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SqsError").field(&self.to_string()).finish()
    }
}

/// `err`'s message and its sources', joined by ": ", a message its source repeats
/// shown once. Unlike the SDK's `DisplayErrorContext`, no `Debug` dump of the error
/// (kilobytes of response headers and body, on every retried log line).
fn messages(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        let m = s.to_string();
        if !m.is_empty() && !out.ends_with(&m) {
            out.push_str(": ");
            out.push_str(&m);
        }
        source = s.source();
    }
    out
}

impl SqsError {
    /// An error without an SDK cause (a failed batch entry, a bad attribute).
    pub(crate) fn new(op: &'static str, detail: impl Into<String>) -> Self {
        Self {
            op,
            detail: detail.into(),
            missing_queue: false,
            source: None,
        }
    }

    /// The error of addressing a queue that does not exist.
    pub(crate) fn missing_queue(op: &'static str, detail: impl Into<String>) -> Self {
        Self {
            missing_queue: true,
            ..Self::new(op, detail)
        }
    }
}

/// Whether `e` says the queue addressed does not exist (it was deleted, or lost
/// with a broker restart), so a cached URL is stale.
pub(crate) fn is_missing_queue(e: &QueueError) -> bool {
    match e {
        QueueError::Backend(b) => b
            .downcast_ref::<SqsError>()
            .is_some_and(|s| s.missing_queue),
        _ => false,
    }
}

/// Whether an error code is a throttling code.
pub(crate) fn is_throttling(code: &str) -> bool {
    THROTTLING.contains(&code)
}

/// Whether an error code (and message) say the receipt handle is bad.
pub(crate) fn is_bad_receipt(code: &str, message: &str) -> bool {
    BAD_RECEIPT.contains(&code)
        || (code.contains("InvalidParameterValue")
            && message.to_ascii_lowercase().contains("receipt"))
}

/// Classifies an SDK error: dispatch, timeout, unparseable response, throttling
/// and 5xx are [`QueueError::Unavailable`]; a bad receipt is
/// [`QueueError::InvalidReceipt`] when `receipt_op`; the rest is [`QueueError::Backend`].
pub(crate) fn classify<E>(op: &'static str, receipt_op: bool, err: SdkError<E>) -> QueueError
where
    E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static,
{
    let mut missing_queue = false;
    let retryable = match &err {
        SdkError::DispatchFailure(_) | SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            true
        }
        SdkError::ServiceError(se) => {
            let code = se.err().code().unwrap_or_default();
            missing_queue = MISSING_QUEUE.contains(&code);
            let message = se.err().message().unwrap_or_default();
            if receipt_op && is_bad_receipt(code, message) {
                return QueueError::InvalidReceipt;
            }
            se.raw().status().as_u16() >= 500 || is_throttling(code)
        }
        _ => false,
    };
    let e = SqsError {
        op,
        detail: messages(&err),
        missing_queue,
        source: Some(Box::new(err)),
    };
    if retryable {
        QueueError::Unavailable(Box::new(e))
    } else {
        QueueError::Backend(Box::new(e))
    }
}

/// Classifies a failed entry of a batch request.
pub(crate) fn classify_entry(
    op: &'static str,
    receipt_op: bool,
    code: &str,
    message: Option<&str>,
    sender_fault: bool,
) -> QueueError {
    let message = message.unwrap_or_default();
    if receipt_op && is_bad_receipt(code, message) {
        return QueueError::InvalidReceipt;
    }
    let e = Box::new(SqsError::new(op, format!("{code}: {message}")));
    if MISSING_QUEUE.contains(&code) {
        return QueueError::Backend(Box::new(SqsError::missing_queue(
            op,
            format!("{code}: {message}"),
        )));
    }
    if !sender_fault || is_throttling(code) {
        QueueError::Unavailable(e)
    } else {
        QueueError::Backend(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An SDK error's text is its chain of messages, not the response's `Debug` dump
    /// (kilobytes of headers and body on every retried log line).
    #[test]
    fn an_sdk_errors_text_is_its_messages_without_debug() {
        let err = SdkError::<aws_sdk_sqs::operation::get_queue_url::GetQueueUrlError>::construction_failure(
            "no endpoint",
        );
        let e = classify("get_queue_url", false, err);
        let shown = e.to_string();
        assert!(shown.contains("no endpoint"), "{shown}");
        assert!(!shown.contains("ConstructionFailure"), "{shown}");
        let debug = format!("{e:?}");
        assert!(!debug.contains("ConstructionFailure {"), "{debug}");
    }

    #[test]
    fn entries_are_classified() {
        assert!(matches!(
            classify_entry("ack", true, "ReceiptHandleIsInvalid", None, true),
            QueueError::InvalidReceipt
        ));
        assert!(matches!(
            classify_entry("enqueue", false, "ReceiptHandleIsInvalid", None, true),
            QueueError::Backend(_)
        ));
        assert!(classify_entry("enqueue", false, "InternalError", None, false).is_retryable());
        assert!(classify_entry("enqueue", false, "RequestThrottled", None, true).is_retryable());
        assert!(classify_entry("receive", false, "OverLimit", None, true).is_retryable());
        assert!(
            !classify_entry("enqueue", false, "InvalidMessageContents", None, true).is_retryable()
        );
        let missing = classify_entry("enqueue", false, "QueueDoesNotExist", None, true);
        assert!(is_missing_queue(&missing) && !missing.is_retryable());
        assert!(!is_missing_queue(&classify_entry(
            "enqueue",
            false,
            "InternalError",
            None,
            false
        )));
    }
}
