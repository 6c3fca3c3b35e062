//! Helpers for tests that run against LocalStack (feature `testkit`): each run makes
//! its queues under a random `mt-` prefix of its own and deletes them afterwards.

use aws_config::BehaviorVersion;
use aws_sdk_sqs::config::Credentials;

use marathon_core::Queue;

use crate::{SqsQueue, SqsQueueConfig};

/// Where LocalStack listens unless `MARATHON_TEST_SQS_ENDPOINT` says otherwise.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:4566";

/// The SQS endpoint tests use: `MARATHON_TEST_SQS_ENDPOINT`, or [`DEFAULT_ENDPOINT`].
#[must_use]
pub fn endpoint() -> String {
    std::env::var("MARATHON_TEST_SQS_ENDPOINT").unwrap_or_else(|_| DEFAULT_ENDPOINT.to_owned())
}

/// A loader with a static region and the test credentials, so the SDK reads no
/// environment and never probes an instance metadata address.
#[must_use]
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

/// A fresh queue prefix, `mt-` and 12 random hex digits (what [`delete_queues`] accepts).
#[must_use]
pub fn prefix() -> String {
    let id = uuid::Uuid::new_v4().simple().to_string();
    format!("mt-{}-", &id[..12])
}

/// A config for [`endpoint`] under a fresh [`prefix`], creating queues on first use.
#[must_use]
pub fn config(max_receives: u32, fifo: bool) -> SqsQueueConfig {
    SqsQueueConfig {
        queue_prefix: prefix(),
        create_if_missing: true,
        max_receives,
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint()),
        fifo,
        ..SqsQueueConfig::default()
    }
}

/// Connects with `cfg` and the test credentials.
///
/// # Panics
/// When `cfg` is invalid or nothing answers at its endpoint: tests fail, never skip,
/// without LocalStack.
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

/// An SQS client for [`endpoint`] with the test credentials.
pub async fn client() -> aws_sdk_sqs::Client {
    aws_sdk_sqs::Client::new(&loader().endpoint_url(endpoint()).load().await)
}

/// Deletes every queue (dead-letter queues included) whose name starts with `prefix`.
///
/// # Panics
/// When `prefix` does not start with `mt-` (a guard against deleting someone else's
/// queues), or listing or deleting fails.
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
