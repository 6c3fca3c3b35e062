//! The `Store` and `Queue` conformance suites against the in-memory backends.

use marathon_core::memory::{MemoryQueue, MemoryQueueConfig, MemoryStore};
use marathon_core::testkit::queue::MAX_RECEIVES;

async fn fresh_store() -> MemoryStore {
    MemoryStore::default()
}

async fn fresh_queue() -> MemoryQueue {
    MemoryQueue::new(MemoryQueueConfig {
        max_receives: MAX_RECEIVES,
    })
}

marathon_core::store_conformance!(fresh_store());
marathon_core::queue_conformance!(fresh_queue());
