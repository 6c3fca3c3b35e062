//! What finished workflows leave behind in Redis.

mod common;

use std::time::Duration;

use marathon_core::{
    EventData, NewEvent, NewWorkflow, OwedChanges, Seq, Store, Timestamp, WorkflowId,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use serde_json::json;

fn new_wf(id: &WorkflowId, key: Option<String>, at: u64) -> NewWorkflow {
    NewWorkflow {
        id: id.clone(),
        name: "leak".into(),
        input: json!({}),
        task_queue: "tq".into(),
        idempotency_key: key,
        started_at: Timestamp(at),
        task_deadline: Timestamp(at + 1000),
        trace_context: None,
    }
}

/// Members of every sorted set under `prefix` (index sets, the closed set, owed work).
async fn zset_members(prefix: &str) -> Vec<(String, i64)> {
    let mut c = redis::Client::open(common::url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut out = Vec::new();
    for k in common::keys_under(prefix).await {
        let t: String = redis::cmd("TYPE")
            .arg(&k)
            .query_async(&mut c)
            .await
            .unwrap();
        if t == "zset" {
            let n: i64 = redis::cmd("ZCARD")
                .arg(&k)
                .query_async(&mut c)
                .await
                .unwrap();
            out.push((k, n));
        }
    }
    out.sort();
    out
}

/// Retention expires a finished workflow's own keys, but not its entries in the
/// shard's sorted sets (`closed`, `idx:all`, `idx:st:*`, `idx:nm:*`, `idx:ns:*`);
/// `purge_closed` (which the worker runs when `worker.retention_ms` is set, and the
/// server sets it from `store.retention` when it is not) removes what is left.
/// Before, the chart set only the store's retention, so nothing ever purged and every
/// finished workflow left five members for good.
#[tokio::test]
async fn expired_workflows_leave_nothing_once_purged() {
    let prefix = common::prefix();
    let store = RedisStore::connect(RedisStoreConfig {
        url: common::url(),
        key_prefix: prefix.clone(),
        retention: Some(Duration::from_millis(100)),
        ..Default::default()
    })
    .await
    .expect("redis");
    for n in 0..20u64 {
        let id = WorkflowId::random();
        store
            .create(new_wf(&id, Some(format!("k{n}")), 1 + n))
            .await
            .unwrap();
        store
            .append(
                &id,
                Seq(1),
                vec![NewEvent::new(
                    Timestamp(100 + n),
                    EventData::WorkflowCompleted { output: json!(1) },
                )],
                OwedChanges::none(),
            )
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // What a worker with retention does every dead_letter_interval.
    let purged = store
        .purge_closed(Timestamp(u64::MAX), 1000)
        .await
        .expect("purge");
    assert_eq!(purged, 20);
    let left = zset_members(&prefix).await;
    let other: Vec<String> = common::keys_under(&prefix)
        .await
        .into_iter()
        .filter(|k| !k.ends_with(":stream"))
        .collect();
    common::teardown(&prefix).await;
    let total: i64 = left.iter().map(|(_, n)| n).sum();
    assert_eq!(
        total, 0,
        "20 expired workflows left {total} sorted-set members: {left:?}; keys: {other:?}"
    );
}

/// One owed entry the running version cannot read (written by a newer version
/// during a rolling upgrade with a new kind, or damaged) is the oldest overdue
/// entry, so every sweep picks it first: `claim_overdue` fails as a whole, after
/// its scripts already moved every entry it picked to the lease end. No overdue
/// work (lost tasks, due timers) of any workflow is ever delivered again.
#[tokio::test]
async fn one_unreadable_owed_entry_does_not_stop_the_sweeper() {
    let (store, prefix) = common::fresh().await;
    let good = WorkflowId::random();
    store.create(new_wf(&good, None, 10)).await.unwrap(); // owes "wf" at 1010
    let bad = WorkflowId::random();
    store.create(new_wf(&bad, None, 5)).await.unwrap(); // owes "wf" at 1005
    // A newer version's entry for `bad`: a kind this version does not know.
    let shard = {
        // The shard the store put `bad` in: find its summary key.
        let keys = common::keys_under(&prefix).await;
        keys.into_iter()
            .find(|k| k.ends_with(&format!(":wf:{bad}:sum")))
            .expect("bad's summary")
    };
    let owed_key = shard.replace(":sum", ":owed");
    let mut c = redis::Client::open(common::url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("HSET")
        .arg(&owed_key)
        .arg("wf")
        .arg(r#"{"kind":{"kind":"workflow_task_v2"},"task_queue":"tq","deadline":1005}"#)
        .query_async(&mut c)
        .await
        .unwrap();
    let mut results = Vec::new();
    for round in 0..3u64 {
        // Each sweep a lease (1 s of store time) after the last.
        let now = Timestamp(2_000 + round * 2_000);
        results.push(
            store
                .claim_overdue(now, Duration::from_secs(1), 256)
                .await
                .map(|v| v.into_iter().map(|o| o.workflow_id).collect::<Vec<_>>()),
        );
    }
    common::teardown(&prefix).await;
    assert!(
        results
            .iter()
            .any(|r| r.as_ref().is_ok_and(|ids| ids.contains(&good))),
        "the good workflow's overdue task is never claimed: {results:?}"
    );
}

/// The `{sN}` shard tag in a key of this store.
fn shard_tag(key: &str) -> &str {
    let start = key.find('{').expect("a hash tag");
    let end = key[start..].find('}').expect("a closed hash tag");
    &key[start..=start + end]
}

/// One shard's claim script fails (here its workflow's owed hash has the wrong
/// type; in production, say, a node failing over) after another shard's script
/// already moved its entries to the lease end. Those entries are handed out, not
/// dropped with the error to wait out their lease.
#[tokio::test]
async fn a_failing_shard_does_not_hold_back_what_the_others_claimed() {
    let (store, prefix) = common::fresh().await;
    let good = WorkflowId::random();
    store.create(new_wf(&good, None, 10)).await.unwrap(); // owes "wf" at 1010
    let sum_key = |keys: &[String], id: &WorkflowId| {
        keys.iter()
            .find(|k| k.ends_with(&format!(":wf:{id}:sum")))
            .cloned()
            .expect("a summary")
    };
    let good_shard = shard_tag(&sum_key(&common::keys_under(&prefix).await, &good)).to_string();
    // A second workflow on another shard.
    let bad_sum = loop {
        let bad = WorkflowId::random();
        store.create(new_wf(&bad, None, 5)).await.unwrap(); // owes "wf" at 1005
        let key = sum_key(&common::keys_under(&prefix).await, &bad);
        if shard_tag(&key) != good_shard {
            break key;
        }
    };
    let owed_key = bad_sum.replace(":sum", ":owed");
    let mut c = redis::Client::open(common::url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let () = redis::cmd("DEL")
        .arg(&owed_key)
        .query_async(&mut c)
        .await
        .unwrap();
    let () = redis::cmd("SET")
        .arg(&owed_key)
        .arg("not a hash")
        .query_async(&mut c)
        .await
        .unwrap();
    let first = store
        .claim_overdue(Timestamp(2_000), Duration::from_secs(1), 256)
        .await
        .map(|v| v.into_iter().map(|o| o.workflow_id).collect::<Vec<_>>());
    common::teardown(&prefix).await;
    let ids = first.expect("the good shard's claim is handed out");
    assert!(ids.contains(&good), "claimed {ids:?}, not {good}");
}
