#![doc = include_str!("../README.md")]

mod config;
mod keys;
mod notify;
mod store;

pub use config::RedisStoreConfig;
pub use store::RedisStore;
