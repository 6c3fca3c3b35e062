//! Picks the store and queue named by the configuration among those compiled in.

use std::sync::Arc;

use marathon_core::memory::{MemoryQueue, MemoryStore};
use marathon_core::{Queue, Store};

use crate::ServerError;
use crate::config::{Config, QueueConfig, StoreConfig};

/// Connects the configured store.
///
/// # Errors
/// [`ServerError::Config`] for a backend this build lacks, [`ServerError::Backend`] when it cannot connect.
pub async fn store(cfg: &StoreConfig) -> Result<Arc<dyn Store>, ServerError> {
    match cfg {
        StoreConfig::Memory => Ok(Arc::new(MemoryStore::default())),
        #[cfg(feature = "redis")]
        StoreConfig::Redis(c) => Ok(Arc::new(
            marathon_redis::RedisStore::connect(c.clone())
                .await
                .map_err(|e| ServerError::Backend(format!("redis store: {e}")))?,
        )),
        #[cfg(not(feature = "redis"))] // the variant exists in every build
        StoreConfig::Redis(_) => Err(ServerError::Config(not_compiled("store", "redis"))),
    }
}

/// Connects the configured queue. With SQS it checks, before anything runs, what
/// would otherwise fail every request forever: a region, and the queues this
/// process uses (the engine's default task queue and, for a worker, the served
/// ones), which must exist unless `queue.create_if_missing` creates them.
///
/// # Errors
/// [`ServerError::Config`] for a backend this build lacks, no SQS region or a
/// missing queue; [`ServerError::Backend`] when it cannot connect.
pub async fn queue(cfg: &Config) -> Result<Arc<dyn Queue>, ServerError> {
    match &cfg.queue {
        // Role all (validate): this process's workers are the only ones.
        QueueConfig::Memory(c) => Ok(Arc::new(
            MemoryQueue::new(*c).serving(cfg.worker.queues.iter().map(|q| q.name.clone())),
        )),
        #[cfg(feature = "sqs")]
        QueueConfig::Sqs(c) => Ok(Arc::new(sqs(cfg, c).await?)),
        #[cfg(not(feature = "sqs"))] // the variant exists in every build
        QueueConfig::Sqs(_) => Err(ServerError::Config(not_compiled("queue", "sqs"))),
    }
}

/// Connects the SQS queue and checks its region and the queues `cfg` uses.
#[cfg(feature = "sqs")]
async fn sqs(
    cfg: &Config,
    settings: &marathon_sqs::SqsQueueConfig,
) -> Result<marathon_sqs::SqsQueue, ServerError> {
    let queue = marathon_sqs::SqsQueue::connect(settings.clone())
        .await
        .map_err(|e| ServerError::Backend(format!("sqs queue: {e}")))?;
    // Every request would fail with "missing signing region", retried forever.
    if queue.client().config().region().is_none() {
        return Err(ServerError::Config(
            "`queue.region`: no AWS region is set: set queue.region, AWS_REGION or a region in the AWS profile"
                .into(),
        ));
    }
    let mut checked = Vec::new();
    for (key, name) in cfg.task_queues_used() {
        if checked.contains(&name) {
            continue;
        }
        checked.push(name);
        match queue.resolve(name).await {
            Ok(true) => {}
            // `create_if_missing` never creates a queue given by URL.
            Ok(false) => match queue.config().queue_urls.get(name) {
                Some(url) => {
                    return Err(ServerError::Config(format!(
                        "`queue.queue_urls.{name}`: SQS queue {url:?} (of task queue {name:?}, used by `{key}`) does not exist: create it, or fix the URL"
                    )));
                }
                None => {
                    return Err(ServerError::Config(format!(
                        "`{key}`: SQS queue {:?} (of task queue {name:?}) does not exist: create it, or set queue.create_if_missing = true",
                        queue.sqs_name(name)
                    )));
                }
            },
            Err(e) => {
                return Err(ServerError::Backend(format!(
                    "sqs queue {:?}: {e}",
                    queue.sqs_name(name)
                )));
            }
        }
    }
    Ok(queue)
}

#[cfg_attr(
    all(feature = "redis", feature = "sqs"),
    expect(dead_code, reason = "every backend is compiled in")
)]
fn not_compiled(what: &str, kind: &str) -> String {
    format!(
        "{what}.kind = {kind:?} but this binary was built without the `{kind}` feature \
         (rebuild with `cargo build -p marathon-server --features {kind}`)"
    )
}

/// Checks, without connecting, that the configured backends are compiled in:
/// `Err((key, message))` otherwise.
pub(crate) fn check_compiled(cfg: &Config) -> Result<(), (&'static str, String)> {
    #[cfg(not(feature = "redis"))]
    if matches!(cfg.store, StoreConfig::Redis(_)) {
        return Err(("store.kind", not_compiled("store", "redis")));
    }
    #[cfg(not(feature = "sqs"))]
    if matches!(cfg.queue, QueueConfig::Sqs(_)) {
        return Err(("queue.kind", not_compiled("queue", "sqs")));
    }
    let _ = cfg;
    Ok(())
}
