//! Helpers for tests and benchmarks that run against a shared Redis (feature `testkit`):
//! each run works under a key prefix of its own and deletes it afterwards, never with
//! `FLUSHALL`/`FLUSHDB`.

use redis::RedisResult;

/// The Redis tests and benchmarks use: `MARATHON_TEST_REDIS_URL`, or the local default.
#[must_use]
pub fn url() -> String {
    std::env::var("MARATHON_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `prefix` as a `SCAN MATCH` pattern that matches itself only: the glob characters
/// `*`, `?`, `[`, `]` and `\` are escaped.
fn literal_pattern(prefix: &str) -> String {
    let mut p = String::with_capacity(prefix.len() + 1);
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            p.push('\\');
        }
        p.push(c);
    }
    p
}

/// Every key under `prefix` on the Redis (or the one cluster node) at `url` (`SCAN MATCH`).
/// The prefix is taken literally: until 2026-11-28 its glob characters were not
/// escaped, and `delete_prefix("run?")` deleted other runs' keys (`runA…`, `runB…`).
///
/// # Errors
/// The connection or a `SCAN` failed.
pub async fn keys_under(url: &str, prefix: &str) -> RedisResult<Vec<String>> {
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    let mut cursor: u64 = 0;
    let mut keys = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{}*", literal_pattern(prefix)))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await?;
        keys.extend(batch.into_iter().filter(|k| k.starts_with(prefix)));
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// Deletes every key under `prefix` on the Redis (or the one cluster node) at `url`
/// and returns how many there were. One `UNLINK` per key, pipelined, so that keys of
/// different hash slots on a cluster node are fine too.
///
/// # Errors
/// The connection, a `SCAN` or an `UNLINK` failed.
pub async fn delete_prefix(url: &str, prefix: &str) -> RedisResult<usize> {
    let keys = keys_under(url, prefix).await?;
    if keys.is_empty() {
        return Ok(0);
    }
    let mut conn = redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?;
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("UNLINK").arg(k).ignore();
        }
        let () = pipe.query_async(&mut conn).await?;
    }
    Ok(keys.len())
}
