#![doc = include_str!("../README.md")]

pub mod clock;
pub mod engine;
pub mod memory;
pub mod model;
pub mod observe;
pub mod queue;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod worker;

pub use clock::{Clock, SystemClock, TokioClock};
pub use engine::pipeline::{Pipeline, PipelineError};
pub use engine::{
    ActivityContext, ActivityFuture, Engine, EngineBuilder, EngineConfig, EngineError,
    HISTORY_LIMIT, Registry, StartWorkflow, Started, WorkflowContext,
};
pub use model::*;
pub use observe::{
    AttemptOutcome, NoopObserver, Observer, TaskOutcome, TaskScope, UNREGISTERED_ACTIVITY,
};
pub use queue::{Delivery, OutgoingMessage, Queue, QueueError, Receipt};
pub use store::{
    AttemptExtend, AttemptStart, Created, EventStream, KeyedAppend, KeyedOutcome, LIST_PAGE_BYTES,
    ListBudget, ListPage, ListQuery, NewWorkflow, Owed, OwedChanges, OwedEntry, OwedKind, Store,
    StoreError,
};
pub use worker::{MIN_WORKER_INTERVAL, QueueSpec, ShutdownReport, Worker, WorkerConfig};
