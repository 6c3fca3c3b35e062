//! The engine end to end on the production backends: Redis store, SQS queue
//! (LocalStack), real time. Needs Redis on 127.0.0.1:6379
//! (`MARATHON_TEST_REDIS_URL`) and `scripts/localstack.sh start`; fails (never
//! skips) without them. Each case uses its own key prefix and queue prefix and
//! deletes them afterwards; the restart case runs a private LocalStack on a
//! free port so the shared one is never disturbed.

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, Engine, EngineConfig, EventData, Queue,
    RetryPolicy, Seq, StartWorkflow, Store, Worker, WorkerConfig, WorkflowContext, WorkflowError,
    WorkflowId, WorkflowStatus,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use marathon_sqs::SqsQueueConfig;
use parking_lot::Mutex;
use serde_json::json;

// ---------------------------------------------------------------- fixtures

/// A Redis store under a fresh key prefix; panics (never skips) without Redis.
async fn redis_store() -> RedisStore {
    let key_prefix = format!("marathon-test:{}:", uuid::Uuid::new_v4());
    RedisStore::connect(RedisStoreConfig {
        url: marathon_redis::testkit::url(),
        key_prefix,
        ..RedisStoreConfig::default()
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "no Redis at {} ({e}); start one with `redis-server --daemonize yes --bind 127.0.0.1 \
             --port 6379 --save '' --appendonly no` (or set MARATHON_TEST_REDIS_URL)",
            marathon_redis::testkit::url()
        )
    })
}

/// Deletes every key under `prefix` (SCAN MATCH + UNLINK; never FLUSHALL).
async fn redis_teardown(prefix: &str) {
    assert!(prefix.starts_with("marathon-test:"), "refusing {prefix:?}");
    marathon_redis::testkit::delete_prefix(&marathon_redis::testkit::url(), prefix)
        .await
        .expect("delete the run's keys");
}

/// Engine settings for tests: quick recovery of lost work.
fn engine_config() -> EngineConfig {
    EngineConfig {
        workflow_task_deadline: Duration::from_secs(3),
        activity_grace: Duration::from_secs(2),
        task_failure_retry: Duration::from_millis(500),
        ..EngineConfig::default()
    }
}

/// Worker settings for tests: short polls, quick sweeps, short grace.
fn worker_config() -> WorkerConfig {
    WorkerConfig {
        poll_wait: Duration::from_secs(1),
        sweep_interval: Duration::from_millis(100),
        shutdown_grace: Duration::from_secs(1),
        ..WorkerConfig::default()
    }
}

fn fast_retry() -> RetryPolicy {
    RetryPolicy {
        initial_interval: Duration::from_millis(200),
        backoff_coefficient: 2.0,
        maximum_interval: Duration::from_secs(1),
        maximum_attempts: 5,
        non_retryable_kinds: Vec::new(),
    }
}

/// Waits until the workflow is finished; fails after `within`.
async fn finished(
    engine: &Engine,
    id: &WorkflowId,
    within: Duration,
) -> marathon_core::WorkflowSummary {
    let s = engine.result(id, within).await.expect("result");
    assert!(
        s.status.is_terminal(),
        "workflow {id} did not finish within {within:?}: {s:?}"
    );
    s
}

/// Log lines of this test binary, for checking what is reported.
static LOGS: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();

fn logs() -> &'static Mutex<Vec<u8>> {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        struct Capture;
        impl Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                LOGS.get_or_init(Mutex::default)
                    .lock()
                    .extend_from_slice(buf);
                std::io::stderr().write_all(buf)?;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "warn".into()),
            )
            .with_ansi(false)
            .with_writer(|| Capture)
            .try_init()
            .ok();
    });
    LOGS.get_or_init(Mutex::default)
}

fn logged(needle: &str) -> Option<String> {
    let logs = logs().lock();
    String::from_utf8_lossy(&logs)
        .lines()
        .find(|l| l.contains(needle))
        .map(str::to_owned)
}

// ---------------------------------------------------------------- workflows

/// Three sequential steps, a parallel pair, a step that fails once (retryable), and a sleep.
async fn mixed(ctx: WorkflowContext, n: i64) -> Result<i64, WorkflowError> {
    let a: i64 = ctx.activity("add", &(n, 1)).await?;
    let b: i64 = ctx.activity("add", &(a, 10)).await?;
    let c: i64 = ctx.activity("add", &(b, 100)).await?;
    let (x, y) = futures::join!(
        ctx.activity::<_, i64>("add", &(c, 1000)),
        ctx.activity::<_, i64>("add", &(c, 2000))
    );
    let f: i64 = ctx
        .activity_with("flaky", &x?, ActivityOptions::default().retry(fast_retry()))
        .await?;
    ctx.sleep(Duration::from_millis(300)).await?;
    Ok(f + y?)
}

fn expected(n: i64) -> i64 {
    let c = n + 111;
    (c + 1000) + (c + 2000)
}

fn mixed_engine(store: Arc<dyn Store>, queue: Arc<dyn Queue>) -> Engine {
    Engine::builder()
        .store(store)
        .queue(queue)
        .config(engine_config())
        .workflow("mixed", mixed)
        .activity(
            "add",
            |_c: ActivityContext, (a, b): (i64, i64)| async move { Ok::<_, ActivityError>(a + b) },
        )
        .activity("flaky", |c: ActivityContext, x: i64| async move {
            if c.attempt() == 1 {
                Err(ActivityError::retryable("503 from the provider"))
            } else {
                Ok(x)
            }
        })
        .build()
}

// ---------------------------------------------------------------- cases

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_complete_on_redis_and_sqs() {
    let store = redis_store().await;
    let prefix = store.key_prefix().to_owned();
    let queue = common::fresh(5, false).await;
    let sqs_prefix = queue.config().queue_prefix.clone();
    let client = queue.client().clone();
    let engine = mixed_engine(Arc::new(store), Arc::new(queue));
    let worker = Worker::start(engine.clone(), worker_config());

    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push((
            n,
            engine
                .start(StartWorkflow::new("mixed", json!(n)))
                .await
                .expect("start")
                .summary
                .id,
        ));
    }
    for (n, id) in &ids {
        let s = finished(&engine, id, Duration::from_secs(60)).await;
        assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
        assert_eq!(s.output, Some(json!(expected(*n))));
        let h = engine.events(id, Seq::ZERO, 1000).await.expect("events");
        let count = |f: fn(&EventData) -> bool| h.iter().filter(|e| f(&e.data)).count();
        assert_eq!(
            count(|d| matches!(d, EventData::ActivityCompleted { .. })),
            6
        );
        assert_eq!(
            count(|d| matches!(d, EventData::ActivityRetrying { .. })),
            1
        );
        assert_eq!(count(|d| matches!(d, EventData::TimerFired { .. })), 1);
        for (i, e) in h.iter().enumerate() {
            assert_eq!(e.seq, Seq(i as u64 + 1), "history has a gap");
        }
    }
    worker.shutdown().await;
    common::delete_queues(&client, &sqs_prefix).await;
    redis_teardown(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_activity_is_not_run_twice_while_its_visibility_is_extended() {
    let store = redis_store().await;
    let prefix = store.key_prefix().to_owned();
    let queue = common::fresh(5, false).await;
    let sqs_prefix = queue.config().queue_prefix.clone();
    let client = queue.client().clone();
    let (store, queue): (Arc<dyn Store>, Arc<dyn Queue>) = (Arc::new(store), Arc::new(queue));
    let runs = Arc::new(AtomicU32::new(0));
    let build = |runs: Arc<AtomicU32>| {
        Engine::builder()
            .store(store.clone())
            .queue(queue.clone())
            .config(engine_config())
            .workflow("long", |ctx: WorkflowContext, (): ()| async move {
                ctx.activity_with::<_, u32>(
                    "long",
                    &(),
                    ActivityOptions::default()
                        .start_to_close(Duration::from_secs(30))
                        .heartbeat_timeout(Duration::from_secs(2)),
                )
                .await
            })
            .activity("long", move |ctx: ActivityContext, (): ()| {
                let runs = runs.clone();
                async move {
                    let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    // 6 s of work, three times the visibility timeout, with heartbeats.
                    for _ in 0..12 {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        ctx.heartbeat().await?;
                    }
                    Ok::<_, ActivityError>(n)
                }
            })
            .build()
    };
    // Two replicas: a lapsed visibility would hand the message to either.
    let config = WorkerConfig {
        visibility: Duration::from_secs(2),
        ..worker_config()
    };
    let (e1, e2) = (build(runs.clone()), build(runs.clone()));
    let w1 = Worker::start(e1.clone(), config.clone());
    let w2 = Worker::start(e2.clone(), config);
    let t0 = Instant::now();
    let id = e1
        .start(StartWorkflow::new("long", json!(null)))
        .await
        .expect("start")
        .summary
        .id;
    let s = finished(&e1, &id, Duration::from_secs(60)).await;
    assert!(t0.elapsed() >= Duration::from_secs(6));
    assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
    assert_eq!(s.output, Some(json!(1)));
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the activity ran more than once"
    );
    // Nothing is left to run again: no message visible, delayed or in flight.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        runs.load(Ordering::SeqCst),
        1,
        "the activity ran again later"
    );
    w1.shutdown().await;
    w2.shutdown().await;
    common::delete_queues(&client, &sqs_prefix).await;
    redis_teardown(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_message_is_dead_lettered_and_reported_without_stopping_the_worker() {
    logs();
    let store = redis_store().await;
    let prefix = store.key_prefix().to_owned();
    let max_receives = 2;
    let queue = common::fresh(max_receives, false).await;
    let sqs_prefix = queue.config().queue_prefix.clone();
    let client = queue.client().clone();
    // Creates the queues, then a message no Marathon version could have written.
    assert_eq!(queue.depth("default").await.expect("depth"), 0);
    let url = client
        .get_queue_url()
        .queue_name(format!("{sqs_prefix}default"))
        .send()
        .await
        .expect("queue url")
        .queue_url
        .expect("url");
    let body = format!("{{\"poison\": \"{}\"}}", uuid::Uuid::new_v4());
    let message_id = client
        .send_message()
        .queue_url(&url)
        .message_body(&body)
        .send()
        .await
        .expect("send")
        .message_id
        .expect("message id");

    let queue: Arc<dyn Queue> = Arc::new(queue);
    let engine = mixed_engine(Arc::new(store), queue.clone());
    let worker = Worker::start(
        engine.clone(),
        WorkerConfig {
            dead_letter_interval: Duration::from_secs(1),
            ..worker_config()
        },
    );
    // The receive loop keeps going: workflows complete meanwhile.
    let id = engine
        .start(StartWorkflow::new("mixed", json!(1)))
        .await
        .expect("start")
        .summary
        .id;
    let s = finished(&engine, &id, Duration::from_secs(60)).await;
    assert_eq!(s.output, Some(json!(expected(1))));

    // Seen, logged, made visible again after 1 s; dead-lettered by SQS after
    // `max_receives` receives; then reported by the worker's dead-letter drain.
    let reported = common::eventually(Duration::from_secs(30), || async {
        let logs = logs().lock();
        String::from_utf8_lossy(&logs)
            .lines()
            .find(|l| {
                l.contains(&message_id) && l.contains("dead-letter queue (not a Marathon task)")
            })
            .map(str::to_owned)
    })
    .await
    .expect("the worker did not report the dead-lettered message");
    assert!(reported.contains("ERROR"), "{reported}");
    assert!(
        reported.contains("poison"),
        "the report quotes the body: {reported}"
    );
    let first_seen = logged(&message_id).expect("seen on receive");
    assert!(first_seen.contains("undecodable message"), "{first_seen}");

    // Not deleted: it stays on the dead-letter queue for an operator.
    let dlq = client
        .get_queue_url()
        .queue_name(format!("{sqs_prefix}default-dlq"))
        .send()
        .await
        .expect("dlq url")
        .queue_url
        .expect("url");
    let attrs = client
        .get_queue_attributes()
        .queue_url(&dlq)
        .attribute_names(aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessages)
        .attribute_names(
            aws_sdk_sqs::types::QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        )
        .send()
        .await
        .expect("attributes")
        .attributes
        .unwrap_or_default();
    let total: u64 = attrs.values().filter_map(|v| v.parse::<u64>().ok()).sum();
    assert_eq!(total, 1, "{attrs:?}");
    assert_eq!(queue.depth("default").await.expect("depth"), 0);
    worker.shutdown().await;
    common::delete_queues(&client, &sqs_prefix).await;
    redis_teardown(&prefix).await;
}

/// A LocalStack of this test alone, on a free port; stopped when dropped.
struct PrivateLocalStack {
    port: u16,
}

impl PrivateLocalStack {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/localstack.sh")
    }

    fn run(port: u16, action: &str) {
        let out = Command::new(Self::script())
            .arg(action)
            .env("LOCALSTACK_PORT", port.to_string())
            .output()
            .expect("run scripts/localstack.sh");
        assert!(
            out.status.success(),
            "scripts/localstack.sh {action} on port {port} failed (install it with \
             `scripts/localstack.sh install`): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    async fn start() -> Self {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        tokio::task::spawn_blocking(move || Self::run(port, "start"))
            .await
            .expect("join");
        Self { port }
    }

    async fn restart(&self) {
        let port = self.port;
        tokio::task::spawn_blocking(move || {
            Self::run(port, "stop");
            // Down for a moment, as a broker restart would be.
            std::thread::sleep(Duration::from_secs(1));
            Self::run(port, "start");
        })
        .await
        .expect("join");
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for PrivateLocalStack {
    fn drop(&mut self) {
        let _ = Command::new(Self::script())
            .arg("stop")
            .env("LOCALSTACK_PORT", self.port.to_string())
            .output();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_workflow_completes_after_sqs_restarts_and_loses_its_queues() {
    let ls = PrivateLocalStack::start().await;
    let store = redis_store().await;
    let prefix = store.key_prefix().to_owned();
    let queue = common::connect(SqsQueueConfig {
        endpoint_url: Some(ls.endpoint()),
        ..common::config(5, false)
    })
    .await;
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let engine = Engine::builder()
        .store(Arc::new(store))
        .queue(Arc::new(queue))
        .config(engine_config())
        .workflow("steps", |ctx: WorkflowContext, n: u32| async move {
            let opts = ActivityOptions::default().start_to_close(Duration::from_secs(3));
            let mut acc = n;
            for i in 0..3u32 {
                acc = ctx
                    .activity_with::<_, u32>("step", &(acc, i), opts.clone())
                    .await?;
                if i == 1 {
                    ctx.sleep(Duration::from_millis(500)).await?;
                }
            }
            Ok(acc)
        })
        .activity("step", move |_c: ActivityContext, (acc, i): (u32, u32)| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, ActivityError>(acc + 10u32.pow(i))
            }
        })
        .build();
    let worker = Worker::start(engine.clone(), worker_config());
    let mut ids = Vec::new();
    for n in 0..10u32 {
        ids.push((
            n,
            engine
                .start(StartWorkflow::new("steps", json!(n * 1000)))
                .await
                .expect("start")
                .summary
                .id,
        ));
    }
    // Let them get going, then lose every queue and every message in flight.
    while runs.load(Ordering::SeqCst) < 10 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = runs.load(Ordering::SeqCst);
    ls.restart().await;
    // Started while the queue was down or just back: the store owes them a task.
    for n in 10..12u32 {
        ids.push((
            n,
            engine
                .start(StartWorkflow::new("steps", json!(n * 1000)))
                .await
                .expect("start")
                .summary
                .id,
        ));
    }
    for (n, id) in &ids {
        let s = finished(&engine, id, Duration::from_secs(90)).await;
        assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
        assert_eq!(s.output, Some(json!(n * 1000 + 111)), "{s:?}");
    }
    let after = runs.load(Ordering::SeqCst);
    assert!(
        before < 36 && after >= 36,
        "runs before the restart {before}, after {after}"
    );
    worker.shutdown().await;
    redis_teardown(&prefix).await;
    drop(ls);
}

/// A start on a task queue whose SQS name SQS refuses is refused by `Engine::start`
/// itself, before anything is recorded, not created and left to fail at its first send.
#[tokio::test]
async fn a_start_on_a_task_queue_sqs_refuses_creates_nothing() {
    let queue = common::fresh(5, false).await;
    let sqs_prefix = queue.config().queue_prefix.clone();
    let client = queue.client().clone();
    let engine = Engine::builder()
        .store(Arc::new(marathon_core::memory::MemoryStore::default()))
        .queue(Arc::new(queue))
        .config(engine_config())
        .workflow(
            "noop",
            |_ctx: WorkflowContext, (): ()| async move { Ok(()) },
        )
        .build();
    for bad in ["llm.calls", "bad name/x"] {
        let id = WorkflowId::random();
        let err = engine
            .start(
                StartWorkflow::new("noop", json!(null))
                    .id(id.clone())
                    .task_queue(bad),
            )
            .await
            .expect_err("refused before anything is recorded");
        assert!(err.to_string().contains(bad), "{err}");
        assert!(
            engine.get(&id).await.is_err(),
            "no run of {bad:?} was created"
        );
    }
    let ok = engine
        .start(StartWorkflow::new("noop", json!(null)).task_queue("llm_calls-2"))
        .await
        .expect("a name SQS accepts");
    assert!(ok.created);
    common::delete_queues(&client, &sqs_prefix).await;
}
