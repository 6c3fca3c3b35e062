//! What observability costs: the core benchmark's W3 (three sequential no-op
//! activities per workflow, in memory) without an observer or subscriber (`plain`),
//! with the log subscriber `marathon` installs when tracing is off (`logs`), with
//! [`Metrics`] (observer plus instrumented store and queue, no subscriber), and with
//! metrics, logs and traces sampled at 100 % exported over OTLP/HTTP to a live
//! in-process receiver (`traces`).
//!
//! `MARATHON_BENCH_STORE=redis` runs the same on the Redis store (Redis at
//! `MARATHON_TEST_REDIS_URL` or 127.0.0.1:6379, a fresh key prefix per run, deleted after).
//!
//! Run with: `cargo bench -p marathon-observability --all-features --bench overhead`
//! (`MARATHON_BENCH_WORKFLOWS`, default 10000; `MARATHON_BENCH_IN_FLIGHT`, default 64;
//! `MARATHON_BENCH_ROUNDS`, default 5: the median counts; `MARATHON_BENCH_VARIANTS`,
//! default `plain,logs,metrics,traces`).
//!
//! Every run is a process of its own (this binary again, with `MARATHON_BENCH_CHILD`
//! naming the variant), so that each has a global subscriber of its own or none, and
//! a round runs the variants one after another: on a shared machine whose speed
//! drifts, neighbouring runs compare fairly. Each run warms up on 1,000 workflows
//! first.
//!
//! Each variant's cost is printed two ways: as the ratio of its median rate to the
//! plain run's median, and as the median over rounds of each round's own ratio ("by
//! round"), which cancels most of the drift of a shared machine's speed between
//! minutes, since a round runs the variants back to back.
//!
//! Besides throughput it prints the process CPU time per workflow (all threads,
//! including the span exporter's, but not the receiver's), the receiver's own CPU time
//! per workflow (it shares the 2 cores, where a collector would run elsewhere), and how many of the spans
//! the traced runs made reached the receiver: spans the batch processor drops would
//! make tracing look cheaper than it is. The batch processor follows the standard
//! `OTEL_BSP_*` variables.

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
    /// No metrics, but the subscriber `marathon` installs with tracing off: text logs
    /// at `info` (to a sink here), which still see every task span.
    Logs,
    Metrics,
    MetricsAndTraces,
}

/// The store of one round: in memory, or on Redis under a fresh prefix.
async fn store() -> (Arc<dyn marathon_core::Store>, &'static str, Option<String>) {
    if std::env::var("MARATHON_BENCH_STORE").as_deref() == Ok("redis") {
        let prefix = format!("marathon-bench:{}:", uuid::Uuid::new_v4());
        let s = marathon_redis::RedisStore::connect(marathon_redis::RedisStoreConfig {
            url: marathon_redis::testkit::url(),
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
    marathon_redis::testkit::delete_prefix(&marathon_redis::testkit::url(), prefix)
        .await
        .expect("delete the run's keys");
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

/// One run's result.
#[derive(Clone, Copy, Debug)]
struct Run {
    /// Workflows per second.
    rate: f64,
    /// CPU time the OTLP receiver's threads used per workflow, in µs: a collector on
    /// another machine in a deployment, here it takes its share of the same 2 cores.
    receiver_us: f64,
    /// CPU time of the process per workflow, in µs, the receiver's excluded
    /// (kernel clock ticks of 10 ms: runs of a second or more keep this within ~1 %).
    cpu_us: f64,
}

/// User plus system CPU time in a `/proc/.../stat` file, in clock ticks (1/100 s).
fn stat_ticks(path: &str) -> u64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may hold spaces):
    // utime and stime are the 12th and 13th of them.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse::<u64>().ok())
        .sum()
}

/// CPU ticks the OTLP receiver's threads used so far, by thread (it stands for a
/// collector on another machine, so its cost is not Marathon's).
static RECEIVER_TICKS: std::sync::Mutex<Vec<(std::thread::ThreadId, u64)>> =
    std::sync::Mutex::new(Vec::new());

/// CPU ticks of the receiver's threads, as of the last request each handled.
fn receiver_ticks() -> u64 {
    RECEIVER_TICKS
        .lock()
        .expect("not poisoned")
        .iter()
        .map(|(_, t)| t)
        .sum()
}

/// Process CPU time (every thread, live or ended) less the receiver's.
fn cpu_excluding_receiver() -> Duration {
    Duration::from_millis(10 * stat_ticks("/proc/self/stat").saturating_sub(receiver_ticks()))
}

/// W3: throughput and CPU per workflow.
async fn w3(variant: Variant, total: usize, in_flight: usize) -> Run {
    let metrics = matches!(variant, Variant::Metrics | Variant::MetricsAndTraces)
        .then(|| Arc::new(Metrics::new().expect("metrics")));
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
    let cpu_before = cpu_excluding_receiver();
    let receiver_before = receiver_ticks();
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
    let cpu_us = (cpu_excluding_receiver() - cpu_before).as_secs_f64() * 1e6 / total as f64;
    let receiver_us = (receiver_ticks() - receiver_before) as f64 * 10.0 * 1e3 / total as f64;
    w.shutdown().await;
    if let Some(prefix) = prefix {
        delete_prefix(&prefix).await;
    }
    if let Some(m) = metrics {
        assert!(m.render().contains("marathon_workflows_closed_total"));
    }
    Run {
        rate,
        cpu_us,
        receiver_us,
    }
}

/// The spans in an OTLP `ExportTraceServiceRequest`, counted by walking the protobuf
/// wire format (resource_spans = 1, scope_spans = 2, spans = 2) without decoding them:
/// the receiver stands for a collector on another machine and should cost little here.
fn count_spans(buf: &[u8]) -> usize {
    /// The length-delimited fields numbered `field` of one message.
    fn each(mut buf: &[u8], field: u64, f: &mut dyn FnMut(&[u8])) {
        fn varint(buf: &mut &[u8]) -> u64 {
            let mut v = 0u64;
            for shift in (0..64).step_by(7) {
                let Some((&b, rest)) = buf.split_first() else {
                    return v;
                };
                *buf = rest;
                v |= u64::from(b & 0x7f) << shift;
                if b < 0x80 {
                    break;
                }
            }
            v
        }
        while !buf.is_empty() {
            let key = varint(&mut buf);
            let len = match key & 7 {
                0 => {
                    varint(&mut buf);
                    0
                }
                1 => 8,
                2 => varint(&mut buf) as usize,
                5 => 4,
                _ => panic!("unexpected protobuf wire type in an OTLP export"),
            };
            let (value, rest) = buf.split_at(len.min(buf.len()));
            if key & 7 == 2 && key >> 3 == field {
                f(value);
            }
            buf = rest;
        }
    }
    let mut n = 0;
    each(buf, 1, &mut |resource_spans| {
        each(resource_spans, 2, &mut |scope_spans| {
            each(scope_spans, 2, &mut |_span| n += 1);
        });
    });
    n
}

const VARIANTS: [(&str, Variant); 4] = [
    ("plain", Variant::Plain),
    ("logs", Variant::Logs),
    ("metrics", Variant::Metrics),
    ("traces", Variant::MetricsAndTraces),
];

/// One run in this process: prints
/// `RESULT <rate> <cpu µs> <spans received> <spans made> <receiver cpu µs>`.
fn child(variant: Variant, total: usize, in_flight: usize) {
    const WARMUP: usize = 1000;
    // A live OTLP receiver that counts the spans it is sent.
    let spans = Arc::new(AtomicU64::new(0));
    let endpoint = (variant == Variant::MetricsAndTraces).then(|| {
        let seen = spans.clone();
        let port = common::serve(move |req| {
            seen.fetch_add(count_spans(&req.body) as u64, Ordering::Relaxed);
            let ticks = stat_ticks("/proc/thread-self/stat");
            let me = std::thread::current().id();
            let mut all = RECEIVER_TICKS.lock().expect("not poisoned");
            match all.iter_mut().find(|(t, _)| *t == me) {
                Some(entry) => entry.1 = ticks,
                None => all.push((me, ticks)),
            }
            (200, "application/x-protobuf", Vec::new())
        });
        format!("http://127.0.0.1:{port}")
    });
    // Logs (and with an endpoint, traces) as `marathon` sets them up, written to a sink.
    let guard = matches!(variant, Variant::Logs | Variant::MetricsAndTraces).then(|| {
        let (dispatch, guard) = marathon_observability::tracing_dispatch(
            &marathon_observability::TelemetryConfig {
                otlp_endpoint: endpoint,
                ..Default::default()
            },
            std::io::sink,
        )
        .expect("tracing");
        assert_eq!(guard.exporting(), variant == Variant::MetricsAndTraces);
        tracing::dispatcher::set_global_default(dispatch).expect("first subscriber");
        guard
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(w3(variant, WARMUP, in_flight));
    let run = rt.block_on(w3(variant, total, in_flight));
    // Flushes what the batch processor still holds.
    drop(rt);
    if let Some(guard) = guard {
        guard.shutdown();
    }
    // Eight spans per W3 workflow: the request, four workflow tasks, three activities.
    let made = if variant == Variant::MetricsAndTraces {
        8 * (WARMUP + total) as u64
    } else {
        0
    };
    println!(
        "RESULT {} {} {} {made} {}",
        run.rate,
        run.cpu_us,
        spans.load(Ordering::Relaxed),
        run.receiver_us
    );
}

fn main() {
    let total = env_usize("MARATHON_BENCH_WORKFLOWS", 10_000);
    let in_flight = env_usize("MARATHON_BENCH_IN_FLIGHT", 64);
    if let Ok(name) = std::env::var("MARATHON_BENCH_CHILD") {
        let (_, variant) = VARIANTS
            .into_iter()
            .find(|(n, _)| *n == name)
            .expect("a known variant");
        child(variant, total, in_flight);
        return;
    }
    let rounds = env_usize("MARATHON_BENCH_ROUNDS", 5).max(1);
    let wanted = std::env::var("MARATHON_BENCH_VARIANTS")
        .unwrap_or_else(|_| "plain,logs,metrics,traces".into());
    let variants: Vec<(&str, Variant)> = VARIANTS
        .into_iter()
        .filter(|(n, _)| wanted.split(',').any(|w| w.trim() == *n))
        .collect();
    let exe = std::env::current_exe().expect("own path");
    let mut results: Vec<Vec<Run>> = vec![Vec::new(); variants.len()];
    let (mut received, mut made) = (0u64, 0u64);
    for _ in 0..rounds {
        for (i, (name, _)) in variants.iter().enumerate() {
            let out = std::process::Command::new(&exe)
                .env("MARATHON_BENCH_CHILD", name)
                // Only the traces run exports, whatever the caller's environment says.
                .env(
                    "OTEL_TRACES_EXPORTER",
                    if *name == "traces" { "otlp" } else { "none" },
                )
                .stderr(std::process::Stdio::inherit())
                .output()
                .expect("run a child");
            assert!(out.status.success(), "the {name} run failed");
            let stdout = String::from_utf8_lossy(&out.stdout);
            let line = stdout
                .lines()
                .find_map(|l| l.strip_prefix("RESULT "))
                .expect("a RESULT line");
            let v: Vec<f64> = line
                .split_whitespace()
                .map(|x| x.parse().expect("a number"))
                .collect();
            results[i].push(Run {
                rate: v[0],
                cpu_us: v[1],
                receiver_us: v[4],
            });
            received += v[2] as u64;
            made += v[3] as u64;
        }
    }
    let median = |runs: &[Run], f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let base_rate = median(&results[0], |r| r.rate);
    let base_cpu = median(&results[0], |r| r.cpu_us);
    println!(
        "W3 on the {} store, {total} workflows, {in_flight} in flight, {rounds} rounds (median), {} CPUs",
        std::env::var("MARATHON_BENCH_STORE").unwrap_or_else(|_| "memory".into()),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    // With the log-only run there, the cost of turning metrics and traces on in a
    // deployment (which logs either way) is read against it too.
    let logs_runs = variants
        .iter()
        .position(|(n, _)| *n == "logs")
        .map(|i| &results[i]);
    let logs = logs_runs.map(|runs| median(runs, |r| r.rate));
    // The machine's speed drifts between minutes; a round runs the variants back to
    // back, so the median of each round's own ratio cancels most of that drift.
    let paired = |runs: &[Run], base: &[Run]| {
        let mut v: Vec<f64> = runs
            .iter()
            .zip(base)
            .map(|(r, b)| (r.rate / b.rate - 1.0) * 100.0)
            .collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    for ((name, _), runs) in variants.iter().zip(&results) {
        let rate = median(runs, |r| r.rate);
        let cpu = median(runs, |r| r.cpu_us);
        let vs_logs = logs.map_or(String::new(), |l| {
            format!(" ({:+5.1} % vs logs)", (rate / l - 1.0) * 100.0)
        });
        let by_round = logs_runs.map_or(String::new(), |l| {
            format!(", {:+5.1} % vs logs", paired(runs, l))
        });
        println!(
            "{name:<8} {rate:>7.0} workflows/s ({:+5.1} %){vs_logs}  {cpu:>6.1} µs CPU/workflow ({:+5.1} %)  by round: {:+5.1} %{by_round}  rates: {:?}",
            (rate / base_rate - 1.0) * 100.0,
            (cpu / base_cpu - 1.0) * 100.0,
            paired(runs, &results[0]),
            runs.iter()
                .map(|r| r.rate.round() as u64)
                .collect::<Vec<_>>()
        );
    }
    if let Some(i) = variants.iter().position(|(n, _)| *n == "traces") {
        let receiver = median(&results[i], |r| r.receiver_us);
        let traced = median(&results[i], |r| r.cpu_us);
        // Clock ticks are 10 ms: per workflow, that is the finest step of the figure.
        let step = 10.0 * 1e3 / total as f64;
        println!(
            "receiver: {receiver:.1} µs CPU/workflow (in steps of {step:.1} µs) on the same cores, against the traced process's own {traced:.1} µs; a collector runs elsewhere in a deployment"
        );
    }
    if made > 0 {
        println!(
            "spans: {received} of {made} reached the OTLP receiver ({:.1} %; the batch processor drops spans when its queue is full)",
            received as f64 * 100.0 / made as f64
        );
    }
}
