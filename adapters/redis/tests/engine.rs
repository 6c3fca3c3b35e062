//! The engine end to end on Redis (`RedisStore` + in-memory queue), in real
//! time: recovery after losing an engine and its queue, two engines on one
//! Redis, timers and signals, and a Redis restart while workflows run.

mod common;

use common::*;
use marathon_core::memory::MemoryQueue;
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, Engine, EngineConfig, Event, EventData, Queue,
    RetryPolicy, Seq, StartWorkflow, Store, Worker, WorkerConfig, WorkflowContext, WorkflowError,
    WorkflowId, WorkflowStatus, WorkflowSummary,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use serde_json::json;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

fn retry() -> RetryPolicy {
    RetryPolicy {
        initial_interval: Duration::from_millis(50),
        backoff_coefficient: 2.0,
        maximum_interval: Duration::from_millis(500),
        maximum_attempts: 10,
        non_retryable_kinds: Vec::new(),
    }
}

/// Short timeouts, so that lost work is recovered within a second.
fn options() -> ActivityOptions {
    ActivityOptions::default()
        .retry(retry())
        .start_to_close(Duration::from_millis(500))
}

fn engine_config() -> EngineConfig {
    EngineConfig {
        workflow_task_deadline: Duration::from_secs(2),
        activity_grace: Duration::from_millis(200),
        task_failure_retry: Duration::from_millis(200),
        ..EngineConfig::default()
    }
}

fn worker_config() -> WorkerConfig {
    WorkerConfig {
        sweep_interval: Duration::from_millis(50),
        poll_wait: Duration::from_millis(200),
        shutdown_grace: Duration::from_millis(200),
        ..WorkerConfig::default()
    }
}

fn store_arc(store: &RedisStore) -> Arc<dyn Store> {
    Arc::new(store.clone())
}

/// Polls the summary until the workflow finishes; store errors (Redis down) are waited out.
async fn wait_done(engine: &Engine, id: &WorkflowId, within: Duration) -> WorkflowSummary {
    let t0 = Instant::now();
    loop {
        if let Ok(s) = engine.get(id).await
            && s.status.is_terminal()
        {
            return s;
        }
        assert!(
            t0.elapsed() < within,
            "workflow {id} did not finish within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The whole history, checked: seqs 1..n without gaps; each activity scheduled
/// once per command id and completed exactly once.
async fn checked_history(engine: &Engine, id: &WorkflowId) -> Vec<Event> {
    let events = engine.events(id, Seq::ZERO, 100_000).await.unwrap();
    for (i, e) in events.iter().enumerate() {
        assert_eq!(
            e.seq,
            Seq(i as u64 + 1),
            "history of {id} has a gap: {events:?}"
        );
    }
    let mut scheduled: HashMap<u32, usize> = HashMap::new();
    let mut completed: HashMap<u32, usize> = HashMap::new();
    for e in &events {
        match &e.data {
            EventData::ActivityScheduled { activity_id, .. } => {
                *scheduled.entry(*activity_id).or_default() += 1;
            }
            EventData::ActivityCompleted { activity_id, .. } => {
                *completed.entry(*activity_id).or_default() += 1;
            }
            _ => {}
        }
    }
    for (aid, n) in &scheduled {
        assert_eq!(*n, 1, "{id}: activity {aid} scheduled {n} times");
        assert_eq!(
            completed.get(aid).copied().unwrap_or(0),
            1,
            "{id}: activity {aid} not completed exactly once: {events:?}"
        );
    }
    assert_eq!(scheduled.len(), completed.len(), "{id}: {events:?}");
    events
}

fn count(events: &[Event], f: impl Fn(&EventData) -> bool) -> usize {
    events.iter().filter(|e| f(&e.data)).count()
}

async fn three_steps(ctx: WorkflowContext, (): ()) -> Result<Vec<u32>, WorkflowError> {
    let mut out = Vec::new();
    for i in 0..3u32 {
        out.push(ctx.activity_with::<_, u32>("step", &i, options()).await?);
    }
    Ok(out)
}

/// An engine on `store` with a new, empty in-memory queue, counting step runs.
fn step_engine(store: &RedisStore, runs: &Arc<[AtomicU32; 3]>, hang_on_step_2: bool) -> Engine {
    let runs = runs.clone();
    Engine::builder()
        .store(store_arc(store))
        .queue(Arc::new(MemoryQueue::default()))
        .config(engine_config())
        .workflow("steps", three_steps)
        .activity("step", move |_ctx: ActivityContext, i: u32| {
            let runs = runs.clone();
            async move {
                runs[i as usize].fetch_add(1, Ordering::SeqCst);
                if i == 1 && hang_on_step_2 {
                    std::future::pending::<()>().await;
                }
                Ok::<_, ActivityError>(i * 10)
            }
        })
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_survives_losing_its_engine_and_queue() {
    let (store1, prefix) = fresh().await;
    let runs: Arc<[AtomicU32; 3]> = Arc::new(Default::default());
    let first = step_engine(&store1, &runs, true);
    let w1 = Worker::start(first.clone(), worker_config());
    let id = first
        .start(StartWorkflow::new("steps", json!(null)))
        .await
        .unwrap()
        .summary
        .id;
    let t0 = Instant::now();
    while runs[1].load(Ordering::SeqCst) == 0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "step 2 never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Crash: stop the worker while step 2 hangs; its queue goes with it.
    let report = w1.shutdown().await;
    assert_eq!(report.handed_back, 1);
    drop(first);
    drop(store1);

    // A new replica: a new connection and a new, empty queue. Only the owed
    // work kept in Redis can bring the workflow back.
    let store2 = fresh_on(prefix.clone()).await;
    let second = step_engine(&store2, &runs, false);
    let w2 = Worker::start(second.clone(), worker_config());
    let s = wait_done(&second, &id, Duration::from_secs(60)).await;
    assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
    assert_eq!(s.output, Some(json!([0, 10, 20])));
    assert_eq!(runs[0].load(Ordering::SeqCst), 1, "step 1 ran again");
    assert_eq!(
        runs[1].load(Ordering::SeqCst),
        2,
        "step 2: the lost attempt and its redelivery"
    );
    assert_eq!(runs[2].load(Ordering::SeqCst), 1);
    let h = checked_history(&second, &id).await;
    assert_eq!(
        count(&h, |d| matches!(d, EventData::ActivityCompleted { .. })),
        3
    );
    w2.shutdown().await;
    teardown(&prefix).await;
}

/// Three sequential steps, then a parallel pair.
async fn mixed(ctx: WorkflowContext, n: u32) -> Result<Vec<u32>, WorkflowError> {
    let a: u32 = ctx.activity_with("inc", &n, options()).await?;
    let b: u32 = ctx.activity_with("inc", &a, options()).await?;
    let c: u32 = ctx.activity_with("inc", &b, options()).await?;
    let left = ctx.activity_with::<_, u32>("inc", &c, options());
    let right = ctx.activity_with::<_, u32>("inc", &(c + 10), options());
    let (x, y) = futures::future::join(left, right).await;
    Ok(vec![x?, y?])
}

fn mixed_engine(store: &RedisStore, queue: &Arc<dyn Queue>, runs: &Arc<AtomicU32>) -> Engine {
    let runs = runs.clone();
    Engine::builder()
        .store(store_arc(store))
        .queue(queue.clone())
        .config(engine_config())
        .workflow("mixed", mixed)
        .activity("inc", move |_ctx: ActivityContext, n: u32| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(u64::from(n % 3))).await;
                Ok::<_, ActivityError>(n + 1)
            }
        })
        .build()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_engines_share_one_redis_without_double_recording() {
    let (store_a, prefix) = fresh().await;
    let store_b = fresh_on(prefix.clone()).await;
    let queue: Arc<dyn Queue> = Arc::new(MemoryQueue::default());
    let runs = Arc::new(AtomicU32::new(0));
    let a = mixed_engine(&store_a, &queue, &runs);
    let b = mixed_engine(&store_b, &queue, &runs);
    let wa = Worker::start(a.clone(), worker_config());
    let wb = Worker::start(b.clone(), worker_config());
    let starts = (0..50u32).map(|n| {
        let engine = if n % 2 == 0 { a.clone() } else { b.clone() };
        async move {
            let id = engine
                .start(StartWorkflow::new("mixed", json!(n * 100)))
                .await
                .unwrap()
                .summary
                .id;
            (n, id)
        }
    });
    let ids = futures::future::join_all(starts).await;
    for (n, id) in &ids {
        let s = wait_done(&a, id, Duration::from_secs(60)).await;
        assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
        let c = n * 100 + 3;
        assert_eq!(s.output, Some(json!([c + 1, c + 11])));
        // Read through the other replica's connection too.
        let h = checked_history(&b, id).await;
        assert_eq!(
            count(&h, |d| matches!(d, EventData::ActivityCompleted { .. })),
            5
        );
        assert_eq!(
            count(&h, |d| matches!(d, EventData::WorkflowCompleted { .. })),
            1
        );
    }
    // At least once: a duplicate run is allowed, a duplicate record is not (checked above).
    assert!(runs.load(Ordering::Relaxed) >= 250);
    wa.shutdown().await;
    wb.shutdown().await;
    teardown(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire_once_and_signals_are_delivered() {
    let (store, prefix) = fresh().await;
    let engine = Engine::builder()
        .store(store_arc(&store))
        .queue(Arc::new(MemoryQueue::default()))
        .config(engine_config())
        .workflow("nap", |ctx: WorkflowContext, (): ()| async move {
            let t0 = ctx.now();
            ctx.sleep(Duration::from_millis(300)).await?;
            Ok(ctx.now().since(t0).as_millis() as u64)
        })
        .workflow("approval", |ctx: WorkflowContext, (): ()| async move {
            let v: String = ctx.signal("go").await?;
            let (): () = ctx.signal("end").await?;
            Ok(v)
        })
        .build();
    // Two workers: both sweep, the timer still fires once.
    let w1 = Worker::start(engine.clone(), worker_config());
    let w2 = Worker::start(engine.clone(), worker_config());
    let t0 = Instant::now();
    let nap = engine
        .start(StartWorkflow::new("nap", json!(null)))
        .await
        .unwrap()
        .summary
        .id;
    let approval = engine
        .start(StartWorkflow::new("approval", json!(null)))
        .await
        .unwrap()
        .summary
        .id;
    engine
        .signal(&approval, "go", json!("yes"), Some("k".into()))
        .await
        .unwrap();
    engine
        .signal(&approval, "go", json!("yes"), Some("k".into()))
        .await
        .unwrap(); // a repeat with the same key is ignored
    engine
        .signal(&approval, "end", json!(null), None)
        .await
        .unwrap();

    let s = wait_done(&engine, &nap, Duration::from_secs(60)).await;
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
    let slept = s
        .output
        .as_ref()
        .and_then(serde_json::Value::as_u64)
        .unwrap();
    assert!(slept >= 300, "slept {slept} ms");
    let h = checked_history(&engine, &nap).await;
    assert_eq!(
        count(&h, |d| matches!(d, EventData::TimerStarted { .. })),
        1
    );
    assert_eq!(count(&h, |d| matches!(d, EventData::TimerFired { .. })), 1);

    let s = wait_done(&engine, &approval, Duration::from_secs(60)).await;
    assert_eq!(s.output, Some(json!("yes")));
    let h = checked_history(&engine, &approval).await;
    assert_eq!(
        count(&h, |d| matches!(d, EventData::SignalReceived { .. })),
        2,
        "go (once, the repeat was dropped) and end"
    );
    w1.shutdown().await;
    w2.shutdown().await;
    teardown(&prefix).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workflows_complete_across_a_redis_restart() {
    let port = low_port();
    let dir = std::env::temp_dir().join(format!("marathon-redis-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = PrivateRedis::start(port, dir.clone()).await;
    let store = RedisStore::connect(RedisStoreConfig {
        url: format!("redis://127.0.0.1:{port}"),
        connect_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await
    .expect("private redis-server");
    let runs = Arc::new(AtomicU32::new(0));
    let r = runs.clone();
    let engine = Engine::builder()
        .store(store_arc(&store))
        .queue(Arc::new(MemoryQueue::default()))
        .config(engine_config())
        .workflow("slow", |ctx: WorkflowContext, n: u32| async move {
            let mut acc = n;
            for _ in 0..4 {
                acc = ctx.activity_with("slow_inc", &acc, options()).await?;
            }
            Ok(acc)
        })
        .activity("slow_inc", move |_ctx: ActivityContext, n: u32| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok::<_, ActivityError>(n + 1)
            }
        })
        .build();
    let w = Worker::start(engine.clone(), worker_config());
    let mut ids = Vec::new();
    for n in 0..20u32 {
        let id = engine
            .start(StartWorkflow::new("slow", json!(n * 10)))
            .await
            .unwrap()
            .summary
            .id;
        ids.push((n, id));
    }
    // Kill Redis while the workflows are between their steps.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let mut running = 0;
    for (_, id) in &ids {
        if !engine.get(id).await.unwrap().status.is_terminal() {
            running += 1;
        }
    }
    assert!(
        running > 0,
        "every workflow finished before Redis went down"
    );
    server.kill().await;
    // While Redis is down the store answers retryable errors.
    let e = engine.get(&ids[0].1).await.unwrap_err();
    assert!(e.is_retryable(), "{e:?}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let server2 = PrivateRedis::start(port, dir.clone()).await;
    for (n, id) in &ids {
        let s = wait_done(&engine, id, Duration::from_secs(60)).await;
        assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
        assert_eq!(s.output, Some(json!(n * 10 + 4)));
        let h = checked_history(&engine, id).await;
        assert_eq!(
            count(&h, |d| matches!(d, EventData::ActivityCompleted { .. })),
            4
        );
    }
    assert!(runs.load(Ordering::Relaxed) >= 80);
    w.shutdown().await;
    drop(server2);
    let _ = std::fs::remove_dir_all(&dir);
}
