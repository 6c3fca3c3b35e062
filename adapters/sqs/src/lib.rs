#![doc = include_str!("../README.md")]

mod config;
mod error;
mod message;
mod queue;

pub use config::SqsQueueConfig;
pub use queue::SqsQueue;
