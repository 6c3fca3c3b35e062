//! The shared `Queue` conformance suite on LocalStack, one queue prefix per case.
//! Needs `scripts/localstack.sh start`; fails (never skips) without it.

mod common;

use marathon_core::testkit::queue::MAX_RECEIVES;
use marathon_sqs::SqsQueue;

async fn fresh() -> SqsQueue {
    common::fresh(MAX_RECEIVES, false).await
}

async fn teardown(q: &SqsQueue) {
    common::teardown(q).await;
}

marathon_core::queue_conformance!(fresh(), teardown);

/// The same suite on FIFO queues.
mod fifo {
    use super::*;

    async fn fresh() -> SqsQueue {
        common::fresh(MAX_RECEIVES, true).await
    }

    marathon_core::queue_conformance!(fresh(), teardown);
}
