//! Engine throughput and latency on the in-memory backends.
//!
//! Run with: `cargo bench -p marathon-core --bench engine`
//! (`MARATHON_BENCH_WORKFLOWS`, default 10000; `MARATHON_BENCH_IN_FLIGHT`, default 64).
//!
//! - W1: one no-op activity per workflow; W3: three sequential no-op activities.
//!   Reports workflows/s and p50/p99 start-to-completion latency.
//! - Replay: one workflow of 10, 100 and 1,000 sequential activities, with the
//!   workflow cache on (the default) and off (every task replays from event 1);
//!   reports wall time per step.

#![allow(missing_docs)]

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use marathon_core::{
    ActivityContext, ActivityError, Engine, EngineConfig, QueueSpec, StartWorkflow, Worker,
    WorkerConfig, WorkflowContext, WorkflowError,
};
use serde_json::json;
use std::sync::Arc;
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

fn engine(cache: usize) -> Engine {
    Engine::builder()
        .config(EngineConfig {
            cache_capacity: cache,
            ..EngineConfig::default()
        })
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

async fn throughput(label: &str, activities: u32, total: usize, in_flight: usize) {
    let engine = engine(10_000);
    let w = worker(&engine);
    let sem = Arc::new(Semaphore::new(in_flight));
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
            let expected = activities * activities.saturating_sub(1) / 2;
            assert_eq!(
                s.output,
                Some(json!(expected)),
                "workflow did not complete: {s:?}"
            );
            let events = engine
                .events(&id, marathon_core::Seq::ZERO, 100)
                .await
                .expect("events");
            assert_eq!(
                events.len(),
                3 + 4 * activities as usize,
                "unexpected history"
            );
            drop(permit);
            t0.elapsed()
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    for h in handles {
        latencies.push(h.await.expect("join"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    println!(
        "{label}: {total} workflows, {in_flight} in flight: {:.0} workflows/s, p50 {:.2} ms, p99 {:.2} ms, total {:.2} s",
        total as f64 / elapsed.as_secs_f64(),
        percentile(&latencies, 0.50).as_secs_f64() * 1e3,
        percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        elapsed.as_secs_f64()
    );
    w.shutdown().await;
}

async fn replay_cost(n: u32, cache: usize) {
    let engine = engine(cache);
    let w = worker(&engine);
    // Several sequential runs of short workflows, so that each figure covers about 2,000 steps.
    let runs = (2000 / n).max(1);
    let t0 = Instant::now();
    for _ in 0..runs {
        let id = engine
            .start(StartWorkflow::new("steps", json!(n)))
            .await
            .expect("start")
            .summary
            .id;
        let s = engine
            .result(&id, Duration::from_secs(600))
            .await
            .expect("result");
        assert!(s.status.is_terminal());
    }
    let per_step = t0.elapsed() / (n * runs);
    println!(
        "replay: {n:>5} sequential activities ({runs:>3} runs), cache {}: {:>8.1} µs per step",
        if cache > 0 { "on " } else { "off" },
        per_step.as_secs_f64() * 1e6
    );
    w.shutdown().await;
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
        // Warm up allocator and code paths.
        throughput("warm-up", 3, 1000, in_flight).await;
        throughput("W1", 1, total, in_flight).await;
        throughput("W3", 3, total, in_flight).await;
        for n in [10, 100, 1000] {
            replay_cost(n, 10_000).await;
        }
        for n in [10, 100, 1000] {
            replay_cost(n, 0).await;
        }
    });
}
