//! In-memory `Store` and `Queue`: single process, no setup; the default backends.
//!
//! Nothing is serialized: histories hold [`crate::Event`] values and queues hold
//! [`crate::Task`] values. Both are built for many concurrent callers: the store
//! locks one workflow at a time (plus short-lived index locks), and each named
//! queue has its own lock.

mod queue;
mod store;

pub use queue::{MemoryQueue, MemoryQueueConfig};
pub use store::MemoryStore;
