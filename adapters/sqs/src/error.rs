//! Classification of SDK errors into [`QueueError`], done once at the boundary.

use aws_sdk_sqs::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
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

/// What went wrong, with the operation and the SDK's full error chain.
#[derive(Debug, thiserror::Error)]
#[error("SQS {op}: {detail}")]
pub(crate) struct SqsError {
    op: &'static str,
    detail: String,
    /// The queue addressed does not exist (any more).
    missing_queue: bool,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
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
        detail: DisplayErrorContext(&err).to_string(),
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
