//! What observability costs: the core benchmark's W3 (three sequential no-op
//! activities per workflow, in memory) without an observer, with [`Metrics`] (observer
//! plus instrumented store and queue), and with metrics and traces sampled at 100 %
//! exported over OTLP/HTTP to a live in-process receiver.
//!
//! `MARATHON_BENCH_STORE=redis` runs the same on the Redis store (Redis at
//! `MARATHON_TEST_REDIS_URL` or 127.0.0.1:6379, a fresh key prefix per round, deleted after).
//!
//! Run with: `cargo bench -p marathon-observability --all-features --bench overhead`
//! (`MARATHON_BENCH_WORKFLOWS`, default 10000; `MARATHON_BENCH_IN_FLIGHT`, default 64;
//! `MARATHON_BENCH_ROUNDS`, default 3: the median counts; plain and metrics alternate,
//! the traced variant runs last since its subscriber is global).

#![allow(missing_docs)]

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/common/mod.rs"]
mod common;

use marathon_core::memory::{MemoryQueue, MemoryStore};
use marathon_core::{
    ActivityContext, ActivityError, Engine, EngineConfig, QueueSpec, StartWorkflow, Worker,
    WorkerConfig, WorkflowContext, WorkflowError,
};
use marathon_observability::{InstrumentedQueue, InstrumentedStore, Metrics};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tracing::Instrument;

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

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    Plain,
    Metrics,
    MetricsAndTraces,
}

fn redis_url() -> String {
    std::env::var("MARATHON_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The store of one round: in memory, or on Redis under a fresh prefix.
async fn store() -> (Arc<dyn marathon_core::Store>, &'static str, Option<String>) {
    if std::env::var("MARATHON_BENCH_STORE").as_deref() == Ok("redis") {
        let prefix = format!("marathon-bench:{}:", uuid::Uuid::new_v4());
        let s = marathon_redis::RedisStore::connect(marathon_redis::RedisStoreConfig {
            url: redis_url(),
            key_prefix: prefix.clone(),
            ..Default::default()
        })
        .await
        .expect("no Redis at MARATHON_TEST_REDIS_URL");
        (Arc::new(s), "redis", Some(prefix))
    } else {
        (Arc::new(MemoryStore::default()), "memory", None)
    }
}

/// Deletes every key under `prefix` (SCAN + UNLINK; never FLUSHALL).
async fn delete_prefix(prefix: &str) {
    let client = redis::Client::open(redis_url()).expect("valid URL");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("SCAN");
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .expect("UNLINK");
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
}

fn engine(
    metrics: Option<&Arc<Metrics>>,
    store: Arc<dyn marathon_core::Store>,
    backend: &'static str,
) -> Engine {
    let mut b = Engine::builder()
        .config(EngineConfig {
            cache_capacity: 10_000,
            ..EngineConfig::default()
        })
        .workflow("steps", steps)
        .activity("noop", |_c: ActivityContext, i: u32| async move {
            Ok::<_, ActivityError>(i)
        });
    if let Some(m) = metrics {
        b = b
            .store(InstrumentedStore::boxed(store, backend, m))
            .queue(InstrumentedQueue::boxed(
                Arc::new(MemoryQueue::default()),
                "memory",
                m,
            ))
            .observer(m.clone());
    } else {
        b = b.store(store);
    }
    b.build()
}

/// W3: workflows per second.
async fn w3(variant: Variant, total: usize, in_flight: usize) -> f64 {
    let metrics = (variant != Variant::Plain).then(|| Arc::new(Metrics::new().expect("metrics")));
    let (store, backend, prefix) = store().await;
    let engine = engine(metrics.as_ref(), store, backend);
    let w = Worker::start(
        engine.clone(),
        WorkerConfig {
            queues: vec![QueueSpec::new("default", 512)],
            ..WorkerConfig::default()
        },
    );
    let sem = Arc::new(Semaphore::new(in_flight));
    let started = Instant::now();
    let mut handles = Vec::with_capacity(total);
    for _ in 0..total {
        let permit = sem.clone().acquire_owned().await.expect("semaphore open");
        let engine = engine.clone();
        handles.push(tokio::spawn(async move {
            // The request that starts the workflow: the root of its trace.
            let root = tracing::info_span!("http.request");
            let id = engine
                .start(StartWorkflow::new("steps", json!(3)))
                .instrument(root)
                .await
                .expect("start")
                .summary
                .id;
            let s = engine
                .result(&id, Duration::from_secs(60))
                .await
                .expect("result");
            assert_eq!(s.output, Some(json!(3)), "workflow did not complete: {s:?}");
            drop(permit);
        }));
    }
    for h in handles {
        h.await.expect("join");
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    w.shutdown().await;
    if let Some(prefix) = prefix {
        delete_prefix(&prefix).await;
    }
    if let Some(m) = metrics {
        assert!(m.render().contains("marathon_workflows_closed_total"));
    }
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let total = env_usize("MARATHON_BENCH_WORKFLOWS", 10_000);
    let in_flight = env_usize("MARATHON_BENCH_IN_FLIGHT", 64);
    let rounds = env_usize("MARATHON_BENCH_ROUNDS", 3).max(1);

    // A live OTLP receiver that decodes what it is sent and counts spans.
    let spans = Arc::new(AtomicU64::new(0));
    let seen = spans.clone();
    let port = common::serve(move |req| {
        use prost::Message;
        let msg =
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                req.body.as_slice(),
            )
            .expect("OTLP protobuf");
        let n: usize = msg
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        seen.fetch_add(n as u64, Ordering::Relaxed);
        (200, "application/x-protobuf", Vec::new())
    });
    let (dispatch, guard) = marathon_observability::tracing_dispatch(
        &marathon_observability::TelemetryConfig {
            otlp_endpoint: Some(format!("http://127.0.0.1:{port}")),
            log_filter: "info".into(),
            ..Default::default()
        },
        std::io::sink,
    )
    .expect("tracing");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut results: Vec<(Variant, Vec<f64>)> =
        [Variant::Plain, Variant::Metrics, Variant::MetricsAndTraces]
            .into_iter()
            .map(|v| (v, Vec::new()))
            .collect();
    // Warm up allocator and code paths.
    rt.block_on(w3(Variant::Plain, 1000, in_flight));
    for _ in 0..rounds {
        for (variant, rates) in &mut results[..2] {
            rates.push(rt.block_on(w3(*variant, total, in_flight)));
        }
    }
    // From here on every thread sees the exporting subscriber (a global one cannot be
    // removed again, so the traced variant runs last).
    tracing::dispatcher::set_global_default(dispatch).expect("first subscriber");
    // Callsites first hit before this are cached as uninteresting: ask again.
    tracing::callsite::rebuild_interest_cache();
    for _ in 0..rounds {
        let rate = rt.block_on(w3(Variant::MetricsAndTraces, total, in_flight));
        results[2].1.push(rate);
    }
    guard.shutdown();
    let base = median(results[0].1.clone());
    println!(
        "W3 on the {} store, {total} workflows, {in_flight} in flight, {rounds} rounds (median), {} CPUs",
        std::env::var("MARATHON_BENCH_STORE").unwrap_or_else(|_| "memory".into()),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for (variant, rates) in &results {
        let m = median(rates.clone());
        println!(
            "{:<20} {:>9.0} workflows/s  ({:+.1} % vs plain)  runs: {:?}",
            format!("{variant:?}"),
            m,
            (m / base - 1.0) * 100.0,
            rates.iter().map(|r| r.round() as u64).collect::<Vec<_>>()
        );
    }
    println!(
        "spans received by the OTLP receiver: {}",
        spans.load(Ordering::Relaxed)
    );
}
