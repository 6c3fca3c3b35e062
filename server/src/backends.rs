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

/// Connects the configured queue.
///
/// # Errors
/// [`ServerError::Config`] for a backend this build lacks, [`ServerError::Backend`] when it cannot connect.
pub async fn queue(cfg: &QueueConfig) -> Result<Arc<dyn Queue>, ServerError> {
    match cfg {
        QueueConfig::Memory(c) => Ok(Arc::new(MemoryQueue::new(*c))),
        #[cfg(feature = "sqs")]
        QueueConfig::Sqs(c) => Ok(Arc::new(
            marathon_sqs::SqsQueue::connect(c.clone())
                .await
                .map_err(|e| ServerError::Backend(format!("sqs queue: {e}")))?,
        )),
        #[cfg(not(feature = "sqs"))] // the variant exists in every build
        QueueConfig::Sqs(_) => Err(ServerError::Config(not_compiled("queue", "sqs"))),
    }
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
