//! The append reader's failures show in the log when they last.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marathon_core::{NewWorkflow, Store, Timestamp, WorkflowId};
use marathon_redis::{RedisStore, RedisStoreConfig};

/// A log sink the test reads back.
#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("not poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A Redis on which the reader's `XREAD` always fails (here the command is renamed
/// away; in production an ACL without it, say): subscriptions still work, woken by
/// their fallback, but only every few seconds. The reader says so at `warn` once the
/// failure has lasted 10 s. Before, it logged every failure at `debug` only, so the
/// slow wake-ups had no visible cause at the default log level.
#[tokio::test]
async fn a_reader_that_keeps_failing_says_so() {
    let sink = Sink::default();
    let writer = sink.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let port = common::free_port();
    let dir = std::env::temp_dir().join(format!("marathon-redis-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("a data directory");
    let mut server =
        common::PrivateRedis::start_with(port, dir.clone(), &["--rename-command", "XREAD", ""])
            .await;
    let url = format!("redis://127.0.0.1:{port}");
    let store = RedisStore::connect(RedisStoreConfig {
        url: url.clone(),
        ..Default::default()
    })
    .await
    .expect("connect");
    let id = WorkflowId::random();
    store
        .create(NewWorkflow {
            id: id.clone(),
            name: "w".into(),
            input: serde_json::Value::Null,
            task_queue: "tq".into(),
            idempotency_key: None,
            started_at: Timestamp(1),
            task_deadline: Timestamp(1_000),
            trace_context: None,
        })
        .await
        .expect("create");
    // A subscription starts the reader.
    let _events = store
        .subscribe(&id, marathon_core::Seq::ZERO)
        .await
        .expect("subscribe");
    let warned = |sink: &Sink| {
        String::from_utf8_lossy(&sink.0.lock().expect("not poisoned"))
            .lines()
            .any(|l| l.contains("WARN") && l.contains("append reader keeps failing"))
    };
    let t0 = std::time::Instant::now();
    while !warned(&sink) && t0.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    let log = String::from_utf8_lossy(&sink.0.lock().expect("not poisoned")).to_string();
    assert!(warned(&sink), "no warning in 20 s:\n{log}");
}
