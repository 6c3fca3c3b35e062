//! `purge_closed` racing a new run of the id it purges: the steps of a purge are
//! driven one at a time by a TCP proxy that holds one request back, so the
//! interleaving is the same on every run.

mod common;

use std::time::Duration;

use common::proxy::FaultProxy;
use marathon_core::{
    EventData, NewEvent, NewWorkflow, OwedChanges, Seq, Store, Timestamp, WorkflowId,
    WorkflowStatus,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use serde_json::json;

fn new_wf(id: &WorkflowId, key: &str, at: u64) -> NewWorkflow {
    NewWorkflow {
        id: id.clone(),
        name: "r".into(),
        input: json!({}),
        task_queue: "tq".into(),
        idempotency_key: Some(key.into()),
        started_at: Timestamp(at),
        task_deadline: Timestamp(at + 1000),
        trace_context: None,
    }
}

async fn store(url: String, key_prefix: &str) -> RedisStore {
    RedisStore::connect(RedisStoreConfig {
        url,
        key_prefix: key_prefix.into(),
        retention: Some(Duration::from_secs(3600)),
        ..Default::default()
    })
    .await
    .expect("connect")
}

/// A run of workflow `X` started with idempotency key `K` closed, and retention
/// expired its keys and its claim; its entry in the closed set is left for the purge.
/// The purge reads what it needs about `X`; then `X` is started again with `K` (a
/// client that derives both from its own request id); then the purge releases the
/// claim of the old run. Before, that release deleted any claim of `K` naming `X`,
/// the new run's included: the new run lost its claim, and a later start with `K`
/// (without an id, or with another) started a second workflow instead of answering
/// with the running one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_does_not_release_the_claim_of_a_newer_run_of_its_id() {
    let port = common::free_port();
    let dir = std::env::temp_dir().join(format!("marathon-purge-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let _server = common::PrivateRedis::start(port, dir.clone()).await;
    let url = format!("redis://127.0.0.1:{port}");
    let proxy = FaultProxy::start(port).await;
    let prefix = "marathon-purge:";
    let purger = store(proxy.url(), prefix).await;
    let direct = store(url.clone(), prefix).await;

    let id = WorkflowId::random();
    let key = format!("key-{}", uuid::Uuid::new_v4());
    assert!(direct.create(new_wf(&id, &key, 1)).await.unwrap().created);
    direct
        .append(
            &id,
            Seq(1),
            vec![NewEvent::new(
                Timestamp(2),
                EventData::WorkflowCompleted { output: json!(1) },
            )],
            OwedChanges::none(),
        )
        .await
        .unwrap();
    // Retention expires the run's keys and its claim (the closed entry stays).
    let mut c = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut c)
        .await
        .unwrap();
    let expired: Vec<&String> = keys
        .iter()
        .filter(|k| k.contains(&format!(":wf:{id}:")) || k.ends_with(&format!(":idem:{key}")))
        .collect();
    assert_eq!(expired.len(), 3, "sum, ev, idem: {keys:?}");
    let _: i64 = redis::cmd("DEL")
        .arg(&expired)
        .query_async(&mut c)
        .await
        .unwrap();

    // The purge stops at its first request about the key's claim ...
    proxy.hold_next(format!(":idem:{key}").as_bytes());
    let purge = tokio::spawn(async move { purger.purge_closed(Timestamp(1_000), 100).await });
    tokio::time::timeout(Duration::from_secs(30), proxy.until_held())
        .await
        .expect("the purge touches the idempotency claim of the run it purges");
    // ... meanwhile the id and the key start a new run ...
    let second = direct.create(new_wf(&id, &key, 5_000)).await.unwrap();
    assert!(second.created);
    // ... and the purge goes on.
    proxy.release();
    let purged = purge.await.unwrap().unwrap();

    let now = direct.get(&id).await.unwrap().map(|s| s.status);
    let again = direct
        .create(new_wf(&WorkflowId::random(), &key, 6_000))
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(purged, 1);
    assert_eq!(now, Some(WorkflowStatus::Running), "the new run is intact");
    assert!(
        !again.created && again.summary.id == id,
        "the key must still name the running workflow {id}; a start with it created {} \
         (created: {})",
        again.summary.id,
        again.created
    );
}

/// A closed entry written before entries carried the run's creation time (four
/// elements) still releases its run's own claim, whether the run's summary is still
/// there (purge with retention unset) or gone (expired): the next start with the key
/// starts a new workflow instead of finishing the purged run's creation again.
#[tokio::test]
async fn a_closed_entry_of_the_old_format_releases_its_runs_claim() {
    let prefix = common::prefix();
    let store = common::fresh_on(prefix.clone()).await;
    let mut c = redis::Client::open(common::url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for expired in [false, true] {
        let id = WorkflowId::random();
        let key = format!("key-{}", uuid::Uuid::new_v4());
        store.create(new_wf(&id, &key, 1)).await.unwrap();
        store
            .append(
                &id,
                Seq(1),
                vec![NewEvent::new(
                    Timestamp(2),
                    EventData::WorkflowCompleted { output: json!(1) },
                )],
                OwedChanges::none(),
            )
            .await
            .unwrap();
        // Rewrite the run's closed entry as the old scripts wrote it.
        let keys = common::keys_under(&prefix).await;
        let closed = keys
            .iter()
            .find(|k| k.ends_with(":closed"))
            .expect("a closed set");
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(closed)
            .arg(0)
            .arg(-1)
            .query_async(&mut c)
            .await
            .unwrap();
        let member = members
            .iter()
            .find(|m| m.contains(id.as_str()))
            .expect("the run's closed entry");
        let mut m: Vec<serde_json::Value> = serde_json::from_str(member).unwrap();
        assert_eq!(m.len(), 5, "{member}");
        m.truncate(4);
        let _: i64 = redis::cmd("ZREM")
            .arg(closed)
            .arg(member)
            .query_async(&mut c)
            .await
            .unwrap();
        let _: i64 = redis::cmd("ZADD")
            .arg(closed)
            .arg(2)
            .arg(serde_json::to_string(&m).unwrap())
            .query_async(&mut c)
            .await
            .unwrap();
        if expired {
            let gone: Vec<&String> = keys
                .iter()
                .filter(|k| k.contains(&format!(":wf:{id}:")))
                .collect();
            let _: i64 = redis::cmd("DEL")
                .arg(&gone)
                .query_async(&mut c)
                .await
                .unwrap();
        }
        assert_eq!(store.purge_closed(Timestamp(1_000), 100).await.unwrap(), 1);
        let other = WorkflowId::random();
        let next = store.create(new_wf(&other, &key, 5_000)).await.unwrap();
        assert!(
            next.created && next.summary.id == other,
            "expired: {expired}; the purged run's claim is gone: {next:?}"
        );
    }
    common::teardown(&prefix).await;
}
