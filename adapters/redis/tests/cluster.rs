//! `RedisStore` in cluster mode on a real local Redis Cluster (three
//! `redis-server --cluster-enabled yes` masters, started once per test binary):
//! the shared `Store` conformance suite, an engine end to end, and the key
//! layout (one slot per workflow, shards spread over the masters).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::cluster;
use marathon_core::memory::MemoryQueue;
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, Engine, EngineConfig, EventData, NewWorkflow,
    RetryPolicy, Seq, StartWorkflow, Store, Timestamp, Worker, WorkerConfig, WorkflowContext,
    WorkflowError, WorkflowId, WorkflowStatus, WorkflowSummary,
};
use marathon_redis::RedisStore;
use serde_json::json;

async fn fresh_cluster() -> RedisStore {
    cluster::fresh().await.0
}

async fn teardown_cluster(store: &RedisStore) {
    cluster::teardown(store.key_prefix()).await;
}

marathon_core::store_conformance!(fresh_cluster(), teardown_cluster);

fn options() -> ActivityOptions {
    ActivityOptions::default()
        .retry(RetryPolicy {
            initial_interval: Duration::from_millis(50),
            backoff_coefficient: 2.0,
            maximum_interval: Duration::from_millis(500),
            maximum_attempts: 10,
            non_retryable_kinds: Vec::new(),
        })
        .start_to_close(Duration::from_millis(500))
}

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

/// Activities, a timer and a signal: a workflow completes on the cluster store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_with_activities_a_timer_and_a_signal_completes_on_the_cluster() {
    let (store, prefix) = cluster::fresh().await;
    let engine = Engine::builder()
        .store(Arc::new(store.clone()) as Arc<dyn Store>)
        .queue(Arc::new(MemoryQueue::default()))
        .config(EngineConfig {
            workflow_task_deadline: Duration::from_secs(2),
            activity_grace: Duration::from_millis(200),
            task_failure_retry: Duration::from_millis(200),
            ..EngineConfig::default()
        })
        .workflow("order", |ctx: WorkflowContext, n: u32| async move {
            let mut sum = 0;
            for i in 0..n {
                sum += ctx.activity_with::<_, u32>("double", &i, options()).await?;
            }
            ctx.sleep(Duration::from_millis(200)).await?;
            let approved: String = ctx.signal("approve").await?;
            Ok::<_, WorkflowError>(json!({ "sum": sum, "approved": approved }))
        })
        .activity("double", |_ctx: ActivityContext, i: u32| async move {
            Ok::<_, ActivityError>(i * 2)
        })
        .build();
    let worker = Worker::start(
        engine.clone(),
        WorkerConfig {
            sweep_interval: Duration::from_millis(50),
            poll_wait: Duration::from_millis(200),
            shutdown_grace: Duration::from_millis(200),
            ..WorkerConfig::default()
        },
    );
    // Several workflows, so that they land on shards of different masters.
    let mut ids = Vec::new();
    for _ in 0..6 {
        let id = engine
            .start(StartWorkflow::new("order", json!(4)))
            .await
            .unwrap()
            .summary
            .id;
        ids.push(id);
    }
    for id in &ids {
        engine
            .signal(id, "approve", json!("yes"), Some("a".into()))
            .await
            .unwrap();
    }
    for id in &ids {
        let s = wait_done(&engine, id, Duration::from_secs(60)).await;
        assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
        assert_eq!(s.output, Some(json!({ "sum": 12, "approved": "yes" })));
        let h = engine.events(id, Seq::ZERO, 1000).await.unwrap();
        let n = |f: fn(&EventData) -> bool| h.iter().filter(|e| f(&e.data)).count();
        assert_eq!(n(|d| matches!(d, EventData::ActivityCompleted { .. })), 4);
        assert_eq!(n(|d| matches!(d, EventData::TimerFired { .. })), 1);
        assert_eq!(n(|d| matches!(d, EventData::SignalReceived { .. })), 1);
    }
    // A subscription (the per-shard append readers) sees a whole history.
    let mut sub = store.subscribe(&ids[0], Seq::ZERO).await.unwrap();
    let mut last = None;
    while let Some(e) = futures::StreamExt::next(&mut sub).await {
        last = Some(e.unwrap());
    }
    assert!(last.is_some_and(|e| e.data.is_terminal()));
    worker.shutdown().await;
    cluster::teardown(&prefix).await;
}

/// Every key of a workflow sits on one slot, and the shards spread over the masters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_keys_share_one_slot_and_shards_spread_over_masters() {
    let (store, prefix) = cluster::fresh().await;
    for i in 0..40 {
        store
            .create(NewWorkflow {
                id: WorkflowId::parse(format!("wf-{i}")).unwrap(),
                name: "n".into(),
                input: json!(null),
                task_queue: "q".into(),
                idempotency_key: (i % 2 == 0).then(|| format!("ik-{i}")),
                started_at: Timestamp(1_000 + i),
                task_deadline: Timestamp(2_000 + i),
                trace_context: None,
            })
            .await
            .unwrap();
    }
    let client = redis::Client::open(cluster::shared().urls()[0].as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut masters_with_keys = 0;
    let mut workflows_seen = HashSet::new();
    for &port in &cluster::shared().ports {
        let keys = cluster::keys_on(port, &prefix).await;
        if !keys.is_empty() {
            masters_with_keys += 1;
        }
        // Slot of each workflow's keys, on this master.
        let mut slots: HashMap<String, HashSet<u16>> = HashMap::new();
        for k in &keys {
            let slot: u16 = redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(k)
                .query_async(&mut conn)
                .await
                .unwrap();
            if let Some(rest) = k.split_once(":wf:").map(|(_, r)| r) {
                let id = rest.rsplit_once(':').unwrap().0.to_string();
                slots.entry(id).or_default().insert(slot);
            }
        }
        for (id, s) in &slots {
            assert_eq!(s.len(), 1, "keys of {id} span slots {s:?}");
            assert!(workflows_seen.insert(id.clone()), "{id} on two masters");
        }
    }
    assert_eq!(workflows_seen.len(), 40);
    assert!(
        masters_with_keys >= 2,
        "16 shards should spread over several masters"
    );
    let page = store
        .list(&marathon_core::ListQuery::default())
        .await
        .unwrap();
    assert_eq!(page.items.len(), 40);
    cluster::teardown(&prefix).await;
}

/// A cluster node given as a single `url` is refused at connect, naming
/// `store.cluster_nodes`: it would answer PING, then send most commands elsewhere
/// (MOVED) while the server reported ready.
#[tokio::test]
async fn a_cluster_node_given_as_a_single_url_is_refused() {
    let urls = tokio::task::spawn_blocking(|| cluster::shared().urls())
        .await
        .expect("start the cluster");
    let err = RedisStore::connect(marathon_redis::RedisStoreConfig {
        url: urls[0].clone(),
        key_prefix: common::prefix(),
        ..Default::default()
    })
    .await
    .expect_err("a cluster node as a single url");
    assert!(err.to_string().contains("cluster_nodes"), "{err}");
    assert!(!err.is_retryable(), "{err}");
}

/// The per-shard append readers' blocking `XREAD` (2 s) is not cut short by the
/// cluster client's overall request timeout, which is `response_timeout` unless
/// told otherwise: with `response_timeout` 500 ms every idle read timed out, so the
/// readers woke every subscription and opened new cluster connections in a loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_subscription_is_not_woken_by_reader_timeouts_on_the_cluster() {
    use futures::StreamExt;
    let urls = tokio::task::spawn_blocking(|| cluster::shared().urls())
        .await
        .expect("start the cluster");
    let prefix = common::prefix();
    let store = RedisStore::connect(marathon_redis::RedisStoreConfig {
        cluster_nodes: urls,
        key_prefix: prefix.clone(),
        shards: 2,
        response_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await
    .unwrap();
    let id = WorkflowId::parse("idle-1").unwrap();
    store
        .create(NewWorkflow {
            id: id.clone(),
            name: "n".into(),
            input: json!(null),
            task_queue: "q".into(),
            idempotency_key: None,
            started_at: Timestamp(1_000),
            task_deadline: Timestamp(2_000),
            trace_context: None,
        })
        .await
        .unwrap();
    let mut sub = store.subscribe(&id, Seq::ZERO).await.unwrap();
    assert_eq!(sub.next().await.unwrap().unwrap().seq, Seq(1));
    // Nothing is appended: the subscription waits, and reads nothing meanwhile.
    let before = store.round_trips();
    let got = tokio::time::timeout(Duration::from_secs(6), sub.next()).await;
    let reads = store.round_trips() - before;
    cluster::teardown(&prefix).await;
    assert!(got.is_err(), "{got:?}");
    assert_eq!(reads, 0, "an idle subscription read {reads} times in 6 s");
}
