//! Engine throughput and latency on Redis (`RedisStore` + in-memory queue).
//!
//! Run with: `cargo bench -p marathon-redis --bench engine`
//! (`MARATHON_BENCH_WORKFLOWS`, default 10000; `MARATHON_BENCH_IN_FLIGHT`, default 64;
//! `MARATHON_TEST_REDIS_URL`, default `redis://127.0.0.1:6379`).
//!
//! - W1: one no-op activity per workflow; W3: three sequential no-op activities.
//!   Reports workflows/s, p50/p99 start-to-completion latency (start until
//!   `Engine::result` returns), and Redis round trips: the store's own count
//!   (`RedisStore::round_trips`, exact for this process) and the server's
//!   `INFO commandstats` deltas (every client of that Redis, so run it on a quiet one).
//! - Keys live under a random `marathon-bench:<uuid>:` prefix, removed at the end
//!   (SCAN + UNLINK, never FLUSHDB).

#![allow(missing_docs)]

use async_trait::async_trait;
use marathon_core::memory::MemoryQueue;
use marathon_core::{
    ActivityContext, ActivityError, Engine, QueueSpec, StartWorkflow, Worker, WorkerConfig,
    WorkflowContext, WorkflowError,
};
use marathon_core::{
    AttemptExtend, AttemptStart, Created, Event, EventStream, KeyedAppend, KeyedOutcome, ListPage,
    ListQuery, NewEvent, NewWorkflow, Owed, OwedChanges, Seq, Store, StoreError, Timestamp,
    WorkflowId, WorkflowSummary,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

async fn steps(ctx: WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    let mut acc = 0;
    for i in 0..n {
        acc += ctx.activity::<_, u32>("noop", &i).await?;
    }
    Ok(acc)
}

/// Calls the engine makes on its store, by method.
#[derive(Default)]
struct Calls([AtomicU64; 9]);

const METHODS: [&str; 9] = [
    "create",
    "append",
    "append_keyed",
    "read",
    "get",
    "subscribe",
    "claim_overdue",
    "other",
    "start_attempt",
];

impl Calls {
    fn bump(&self, i: usize) {
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }
    fn snapshot(&self) -> [u64; 9] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// Counts the engine's store calls, then delegates to Redis.
struct Counting {
    inner: RedisStore,
    calls: Arc<Calls>,
}

#[async_trait]
impl Store for Counting {
    async fn create(&self, new: NewWorkflow) -> Result<Created, StoreError> {
        self.calls.bump(0);
        self.inner.create(new).await
    }
    async fn append(
        &self,
        id: &WorkflowId,
        expected_last: Seq,
        events: Vec<NewEvent>,
        owed: OwedChanges,
    ) -> Result<Seq, StoreError> {
        self.calls.bump(1);
        self.inner.append(id, expected_last, events, owed).await
    }
    async fn append_keyed(
        &self,
        id: &WorkflowId,
        append: KeyedAppend,
    ) -> Result<KeyedOutcome, StoreError> {
        self.calls.bump(2);
        self.inner.append_keyed(id, append).await
    }
    async fn read(
        &self,
        id: &WorkflowId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        self.calls.bump(3);
        self.inner.read(id, after, limit).await
    }
    async fn subscribe(&self, id: &WorkflowId, after: Seq) -> Result<EventStream, StoreError> {
        self.calls.bump(5);
        self.inner.subscribe(id, after).await
    }
    async fn get(&self, id: &WorkflowId) -> Result<Option<WorkflowSummary>, StoreError> {
        self.calls.bump(4);
        self.inner.get(id).await
    }
    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        self.calls.bump(7);
        self.inner.list(query).await
    }
    async fn start_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        now: Timestamp,
        deadline: Timestamp,
        redelivered: bool,
    ) -> Result<AttemptStart, StoreError> {
        self.calls.bump(8);
        self.inner
            .start_attempt(id, key, copy, now, deadline, redelivered)
            .await
    }
    async fn extend_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        started: Timestamp,
        deadline: Timestamp,
    ) -> Result<AttemptExtend, StoreError> {
        // The bench's activities do not heartbeat: counted with the rest.
        self.calls.bump(7);
        self.inner
            .extend_attempt(id, key, copy, started, deadline)
            .await
    }
    async fn claim_overdue(
        &self,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Owed>, StoreError> {
        self.calls.bump(6);
        self.inner.claim_overdue(now, lease, limit).await
    }
    async fn purge_closed(
        &self,
        closed_before: Timestamp,
        limit: usize,
    ) -> Result<usize, StoreError> {
        self.calls.bump(7);
        self.inner.purge_closed(closed_before, limit).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.calls.bump(7);
        self.inner.ping().await
    }
}

fn engine(store: &RedisStore, calls: &Arc<Calls>) -> Engine {
    Engine::builder()
        .store(Arc::new(Counting {
            inner: store.clone(),
            calls: calls.clone(),
        }))
        .queue(Arc::new(MemoryQueue::default()))
        .workflow("steps", steps)
        .activity("noop", |_c: ActivityContext, i: u32| async move {
            Ok::<_, ActivityError>(i)
        })
        .build()
}

fn worker(engine: &Engine) -> Worker {
    Worker::start(
        engine.clone(),
        WorkerConfig {
            queues: vec![QueueSpec::new("default", 512)],
            ..WorkerConfig::default()
        },
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `INFO commandstats` as command -> calls.
async fn commandstats(conn: &mut redis::aio::MultiplexedConnection) -> BTreeMap<String, u64> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .expect("INFO commandstats");
    let mut out = BTreeMap::new();
    for line in info.lines() {
        let Some(rest) = line.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((cmd, fields)) = rest.split_once(':') else {
            continue;
        };
        let calls = fields
            .split(',')
            .find_map(|f| f.strip_prefix("calls="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        out.insert(cmd.to_string(), calls);
    }
    out
}

async fn throughput(
    label: &str,
    store: &RedisStore,
    admin: &mut redis::aio::MultiplexedConnection,
    activities: u32,
    total: usize,
    in_flight: usize,
) {
    let calls = Arc::new(Calls::default());
    let engine = engine(store, &calls);
    let w = worker(&engine);
    let sem = Arc::new(Semaphore::new(in_flight));
    let rt0 = store.round_trips();
    let stats0 = commandstats(admin).await;
    let started = Instant::now();
    let mut handles = Vec::with_capacity(total);
    for _ in 0..total {
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let engine = engine.clone();
        handles.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let id = engine
                .start(StartWorkflow::new("steps", json!(activities)))
                .await
                .expect("start")
                .summary
                .id;
            let s = engine
                .result(&id, Duration::from_secs(60))
                .await
                .expect("result");
            assert!(s.status.is_terminal(), "workflow did not finish: {s:?}");
            drop(permit);
            t0.elapsed()
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for h in handles {
        latencies.push(h.await.expect("join"));
    }
    let elapsed = started.elapsed();
    let rts = store.round_trips() - rt0;
    let stats1 = commandstats(admin).await;
    let by_method = calls.snapshot();
    w.shutdown().await;
    latencies.sort();
    println!(
        "{label}: {total} workflows, {in_flight} in flight: {:.0} workflows/s, p50 {:.2} ms, p99 {:.2} ms, total {:.2} s",
        total as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        elapsed.as_secs_f64()
    );
    let wf = total as f64;
    let step = (total * activities as usize) as f64;
    println!(
        "{label}: store round trips {rts}: {:.2} per workflow, {:.2} per activity step (all, incl. start and result wait)",
        rts as f64 / wf,
        rts as f64 / step
    );
    let shown: Vec<String> = METHODS
        .iter()
        .zip(by_method)
        .filter(|(_, n)| *n > 0)
        .map(|(m, n)| format!("{m} {:.2}", n as f64 / wf))
        .collect();
    println!(
        "{label}: engine store calls per workflow: {}",
        shown.join(", ")
    );
    // Each of these is one round trip on Redis (create without an idempotency key included).
    let hot = by_method[0] + by_method[1] + by_method[2] + by_method[3] + by_method[8];
    println!(
        "{label}: hot path (create + append + append_keyed + workflow-task reads + start_attempt): {:.2} round trips per workflow, {:.2} per activity step",
        hot as f64 / wf,
        hot as f64 / step
    );
    let mut deltas: Vec<(String, u64)> = stats1
        .iter()
        .map(|(k, v)| (k.clone(), v - stats0.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect();
    deltas.sort_by_key(|d| std::cmp::Reverse(d.1));
    let shown: Vec<String> = deltas
        .iter()
        .map(|(k, d)| format!("{k} {:.2}", *d as f64 / wf))
        .collect();
    println!(
        "{label}: server commands per workflow (INFO commandstats): {}",
        shown.join(", ")
    );
}

async fn teardown(prefix: &str) {
    marathon_redis::testkit::delete_prefix(&marathon_redis::testkit::url(), prefix)
        .await
        .expect("delete the run's keys");
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let total = env_usize("MARATHON_BENCH_WORKFLOWS", 10_000);
    let in_flight = env_usize("MARATHON_BENCH_IN_FLIGHT", 64);
    rt.block_on(async {
        let prefix = format!("marathon-bench:{}:", uuid::Uuid::new_v4());
        let store = RedisStore::connect(RedisStoreConfig {
            url: marathon_redis::testkit::url(),
            key_prefix: prefix.clone(),
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| {
            panic!("no Redis at MARATHON_TEST_REDIS_URL (default redis://127.0.0.1:6379): {e}")
        });
        let mut admin = redis::Client::open(marathon_redis::testkit::url())
            .expect("valid URL")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        throughput("warm-up", &store, &mut admin, 3, 1000, in_flight).await;
        throughput("W1", &store, &mut admin, 1, total, in_flight).await;
        throughput("W3", &store, &mut admin, 3, total, in_flight).await;
        teardown(&prefix).await;
    });
}
