//! The shared `Store` conformance suite against Redis, one random key prefix per case.

mod common;

use marathon_redis::RedisStore;

async fn fresh() -> RedisStore {
    common::fresh().await.0
}

async fn teardown(store: &RedisStore) {
    common::teardown(store.key_prefix()).await;
}

marathon_core::store_conformance!(fresh(), teardown);
