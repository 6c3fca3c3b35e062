#![doc = include_str!("../README.md")]

mod config;
mod conn;
mod keys;
mod notify;
mod store;

pub use config::RedisStoreConfig;
pub use store::RedisStore;
