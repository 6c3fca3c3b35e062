#![doc = include_str!("../README.md")]

pub mod memory;
pub mod model;
pub mod queue;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use model::*;
pub use queue::{Delivery, OutgoingMessage, Queue, QueueError, Receipt};
pub use store::{
    Created, EventStream, KeyedAppend, KeyedOutcome, ListPage, ListQuery, NewWorkflow, Owed,
    OwedChanges, OwedEntry, OwedKind, Store, StoreError,
};
