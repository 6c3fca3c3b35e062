#![doc = include_str!("../README.md")]

mod config;
mod conn;
mod keys;
mod notify;
mod store;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use config::RedisStoreConfig;
pub use store::RedisStore;
