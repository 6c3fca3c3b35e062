//! Raw SQS throughput on LocalStack: batched send (10 per request) and batched
//! receive + delete, with N concurrent tasks; then the same through `SqsQueue`.
//!
//! Run with: `scripts/localstack.sh start && cargo bench -p marathon-sqs --bench raw`
//! Environment: `MARATHON_TEST_SQS_ENDPOINT` (default `http://127.0.0.1:4566`),
//! `MARATHON_BENCH_MESSAGES` (default 4000), `MARATHON_BENCH_CONCURRENCY` (default `1,4,16`).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use aws_config::{BehaviorVersion, Region};
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::Credentials;
use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use marathon_core::{OutgoingMessage, Queue, Task, WorkflowId};
use marathon_sqs::{SqsQueue, SqsQueueConfig};
use tokio::task::JoinSet;

const BATCH: usize = 10;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn body() -> anyhow::Result<String> {
    Ok(serde_json::to_string(
        &Task::workflow(WorkflowId::random()),
    )?)
}

/// Sends `total` messages in batches of ten from `tasks` concurrent senders.
async fn send(client: &Client, url: &str, total: usize, tasks: usize) -> anyhow::Result<Duration> {
    let batches = Arc::new(AtomicUsize::new(total.div_ceil(BATCH)));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let (client, url, batches) = (client.clone(), url.to_owned(), batches.clone());
        set.spawn(async move {
            while batches
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                .is_ok()
            {
                let entries = (0..BATCH)
                    .map(|i| {
                        Ok(SendMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .message_body(body()?)
                            .build()?)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                let out = client
                    .send_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await?;
                if !out.failed.is_empty() {
                    bail!("{} entries failed", out.failed.len());
                }
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok(start.elapsed())
}

/// Receives (10 per request) and deletes (one batch per receive) `total` messages.
async fn receive_delete(
    client: &Client,
    url: &str,
    total: usize,
    tasks: usize,
) -> anyhow::Result<Duration> {
    let left = Arc::new(AtomicUsize::new(total));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let (client, url, left) = (client.clone(), url.to_owned(), left.clone());
        set.spawn(async move {
            let deadline = Instant::now() + Duration::from_secs(300);
            while left.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
                let out = client
                    .receive_message()
                    .queue_url(&url)
                    .max_number_of_messages(10)
                    .wait_time_seconds(1)
                    .visibility_timeout(60)
                    .send()
                    .await?;
                let msgs = out.messages.unwrap_or_default();
                if msgs.is_empty() {
                    continue;
                }
                let entries = msgs
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        Ok(DeleteMessageBatchRequestEntry::builder()
                            .id(i.to_string())
                            .set_receipt_handle(m.receipt_handle.clone())
                            .build()?)
                    })
                    .collect::<anyhow::Result<Vec<_>>>()?;
                client
                    .delete_message_batch()
                    .queue_url(&url)
                    .set_entries(Some(entries))
                    .send()
                    .await?;
                let n = msgs.len();
                let _ = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                    Some(l.saturating_sub(n))
                });
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    if left.load(Ordering::SeqCst) > 0 {
        bail!(
            "{} messages not received within 300 s",
            left.load(Ordering::SeqCst)
        );
    }
    Ok(start.elapsed())
}

/// The same two phases through `SqsQueue` (enqueue of 10, receive + ack).
async fn through_queue(
    q: Arc<SqsQueue>,
    total: usize,
    tasks: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let batches = Arc::new(AtomicUsize::new(total.div_ceil(BATCH)));
    let start = Instant::now();
    let mut set = JoinSet::new();
    for _ in 0..tasks {
        let (q, batches) = (q.clone(), batches.clone());
        set.spawn(async move {
            while batches
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| b.checked_sub(1))
                .is_ok()
            {
                let msgs = (0..BATCH)
                    .map(|_| OutgoingMessage::now(Task::workflow(WorkflowId::random())))
                    .collect();
                q.enqueue("bench", msgs).await?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    let sent = start.elapsed();
    let left = Arc::new(AtomicUsize::new(total));
    let start = Instant::now();
    for _ in 0..tasks {
        let (q, left) = (q.clone(), left.clone());
        set.spawn(async move {
            while left.load(Ordering::SeqCst) > 0 {
                let got = q
                    .receive("bench", 10, Duration::from_secs(1), Duration::from_secs(60))
                    .await?;
                let n = got.len();
                q.ack("bench", got.into_iter().map(|d| d.receipt).collect())
                    .await?;
                let _ = left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |l| {
                    Some(l.saturating_sub(n))
                });
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = set.join_next().await {
        r??;
    }
    Ok((sent, start.elapsed()))
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let endpoint = std::env::var("MARATHON_TEST_SQS_ENDPOINT")
        .unwrap_or_else(|_| "http://127.0.0.1:4566".into());
    let total: usize = env_or("MARATHON_BENCH_MESSAGES", 4000);
    let levels: Vec<usize> = std::env::var("MARATHON_BENCH_CONCURRENCY")
        .unwrap_or_else(|_| "1,4,16".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let sdk = aws_config::defaults(BehaviorVersion::latest())
        .empty_test_environment()
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "marathon-bench",
        ))
        .endpoint_url(&endpoint)
        .load()
        .await;
    let client = Client::new(&sdk);
    client
        .list_queues()
        .max_results(1)
        .send()
        .await
        .with_context(|| format!("no SQS at {endpoint}; run `scripts/localstack.sh start`"))?;
    let prefix = format!(
        "mt-bench-{}-",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    println!("raw SQS on {endpoint}: {total} messages of ~60 bytes per run, batches of {BATCH}");
    println!(
        "{:<8} {:>6} {:>16} {:>22}",
        "path", "tasks", "send msg/s", "receive+delete msg/s"
    );
    let result = async {
        for &tasks in &levels {
            let url = client
                .create_queue()
                .queue_name(format!("{prefix}raw-{tasks}"))
                .send()
                .await?
                .queue_url
                .context("no queue url")?;
            let s = send(&client, &url, total, tasks).await?;
            let r = receive_delete(&client, &url, total, tasks).await?;
            println!(
                "{:<8} {:>6} {:>16.0} {:>22.0}",
                "raw",
                tasks,
                rate(total, s),
                rate(total, r)
            );
        }
        for &tasks in &levels {
            let cfg = SqsQueueConfig {
                queue_prefix: format!("{prefix}q{tasks}-"),
                create_if_missing: true,
                region: Some("us-east-1".into()),
                endpoint_url: Some(endpoint.clone()),
                ..SqsQueueConfig::default()
            };
            let loader = aws_config::defaults(BehaviorVersion::latest())
                .empty_test_environment()
                .credentials_provider(Credentials::new(
                    "test",
                    "test",
                    None,
                    None,
                    "marathon-bench",
                ));
            let q = Arc::new(SqsQueue::connect_with(cfg, loader).await?);
            let (s, r) = through_queue(q, total, tasks).await?;
            println!(
                "{:<8} {:>6} {:>16.0} {:>22.0}",
                "SqsQueue",
                tasks,
                rate(total, s),
                rate(total, r)
            );
        }
        anyhow::Ok(())
    }
    .await;
    let urls = client
        .list_queues()
        .queue_name_prefix(&prefix)
        .send()
        .await?
        .queue_urls
        .unwrap_or_default();
    for url in urls {
        client.delete_queue().queue_url(url).send().await?;
    }
    result
}
