//! LocalStack fixtures shared by the integration tests.
#![allow(
    dead_code,
    unused_imports,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

use std::time::Duration;

use marathon_sqs::SqsQueue;
pub use marathon_sqs::testkit::{config, connect, delete_queues, endpoint, loader};

/// A fresh, empty queue backend under its own prefix.
pub async fn fresh(max_receives: u32, fifo: bool) -> SqsQueue {
    connect(config(max_receives, fifo)).await
}

/// Deletes every queue `q` created.
pub async fn teardown(q: &SqsQueue) {
    delete_queues(q.client(), &q.config().queue_prefix).await;
}

/// Polls `f` until it returns `Some`, for at most `deadline`.
pub async fn eventually<T, F, Fut>(deadline: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
