#![doc = include_str!("../README.md")]

mod batch;
mod config;
mod error;
mod message;
mod queue;

pub use config::SqsQueueConfig;
pub use queue::SqsQueue;
