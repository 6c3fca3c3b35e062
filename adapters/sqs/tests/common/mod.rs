//! LocalStack fixtures shared by the integration tests.
#![allow(
    dead_code,
    unreachable_pub,
    reason = "each test binary uses a different subset"
)]

use std::env;
use std::time::Duration;

use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::Credentials;
use marathon_core::Queue;
use marathon_sqs::{SqsQueue, SqsQueueConfig};

/// Where LocalStack listens unless `MARATHON_TEST_SQS_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:4566";

/// The LocalStack endpoint of this run.
pub fn endpoint() -> String {
    env::var("MARATHON_TEST_SQS_ENDPOINT").unwrap_or_else(|_| DEFAULT_ENDPOINT.to_owned())
}

/// A loader with a static region and the test credentials, so the SDK reads no
/// environment and never probes an instance metadata address.
pub fn loader() -> aws_config::ConfigLoader {
    aws_config::defaults(BehaviorVersion::latest())
        .empty_test_environment()
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "marathon-test",
        ))
}

/// A config with a fresh random queue prefix, creating queues on first use.
pub fn config(max_receives: u32, fifo: bool) -> SqsQueueConfig {
    let id = uuid::Uuid::new_v4().simple().to_string();
    SqsQueueConfig {
        queue_prefix: format!("mt-{}-", &id[..12]),
        create_if_missing: true,
        max_receives,
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint()),
        fifo,
        ..SqsQueueConfig::default()
    }
}

/// Connects with `cfg`; fails (never skips) when LocalStack does not answer.
pub async fn connect(cfg: SqsQueueConfig) -> SqsQueue {
    let q = SqsQueue::connect_with(cfg, loader())
        .await
        .expect("valid config");
    if let Err(e) = q.ping().await {
        panic!(
            "no SQS at {} ({e}); run `scripts/localstack.sh start` \
             (or set MARATHON_TEST_SQS_ENDPOINT)",
            endpoint()
        );
    }
    q
}

/// A fresh, empty queue backend under its own prefix.
pub async fn fresh(max_receives: u32, fifo: bool) -> SqsQueue {
    connect(config(max_receives, fifo)).await
}

/// Deletes every queue (dead-letter queues included) under `prefix`.
pub async fn delete_queues(client: &aws_sdk_sqs::Client, prefix: &str) {
    assert!(
        prefix.starts_with("mt-"),
        "refusing to delete queues under {prefix:?}"
    );
    let urls = client
        .list_queues()
        .queue_name_prefix(prefix)
        .max_results(1000)
        .send()
        .await
        .expect("list queues")
        .queue_urls
        .unwrap_or_default();
    for url in urls {
        client
            .delete_queue()
            .queue_url(&url)
            .send()
            .await
            .expect("delete queue");
    }
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
