#![doc = include_str!("../README.md")]

mod batch;
mod config;
mod error;
mod message;
mod queue;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

pub use config::{SqsConfigError, SqsQueueConfig};
pub use queue::SqsQueue;
