//! `RedisStore` on a Redis Cluster whose slot is being migrated to another master
//! (resharding, the way a sharded store grows): a script must write all or nothing.
//!
//! A cluster of its own (not the one `cluster.rs` shares): marking a slot migrating
//! would disturb every other case using that shard.

mod common;

use common::cluster::LocalCluster;
use marathon_core::{
    EventData, KeyedAppend, NewEvent, NewWorkflow, OwedChanges, Seq, Store, StoreError, Timestamp,
    WorkflowId, WorkflowStatus,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use serde_json::json;

fn new_wf(id: &WorkflowId, name: &str, at: u64) -> NewWorkflow {
    NewWorkflow {
        id: id.clone(),
        name: name.into(),
        input: json!(null),
        task_queue: "tq".into(),
        idempotency_key: None,
        started_at: Timestamp(at),
        task_deadline: Timestamp(at + 1_000),
        trace_context: None,
    }
}

fn completed(at: u64) -> NewEvent {
    NewEvent::new(
        Timestamp(at),
        EventData::WorkflowCompleted { output: json!(1) },
    )
}

async fn node(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

async fn cmd(port: u16, args: &[&str]) -> redis::Value {
    let mut c = redis::cmd(args[0]);
    for a in &args[1..] {
        c.arg(*a);
    }
    c.query_async(&mut node(port).await)
        .await
        .unwrap_or_else(|e| panic!("{args:?} on {port}: {e}"))
}

async fn text(port: u16, args: &[&str]) -> String {
    match cmd(port, args).await {
        redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("{args:?}: {other:?}"),
    }
}

/// The master serving `slot` and another one: `(port, node id)` each.
async fn owner_and_other(ports: &[u16], slot: u16) -> ((u16, String), (u16, String)) {
    let mut owner = None;
    let mut other = None;
    for &p in ports {
        let id = text(p, &["CLUSTER", "MYID"]).await;
        let nodes = text(p, &["CLUSTER", "NODES"]).await;
        let mine = nodes
            .lines()
            .find(|l| l.starts_with(&id))
            .expect("own line in CLUSTER NODES");
        let serves = mine.split_whitespace().skip(8).any(|range| {
            let (a, b) = range.split_once('-').unwrap_or((range, range));
            match (a.parse::<u16>(), b.parse::<u16>()) {
                (Ok(a), Ok(b)) => (a..=b).contains(&slot),
                _ => false,
            }
        });
        if serves {
            owner = Some((p, id));
        } else {
            other = Some((p, id));
        }
    }
    (owner.expect("an owner"), other.expect("another master"))
}

/// A workflow completes while its shard's slot is migrating, before any key has
/// moved. Every key the append script declares is still on the source master, so
/// Redis runs it there; the index keys it builds itself (`idx:ns:completed:<name>`,
/// which no workflow of this name has needed yet) are not, and Redis stopped the
/// script at that command after the events and the summary were written: the
/// workflow read `completed` but still owed its workflow task (the sweeper claimed
/// it every lease, for ever), had no entry in the closed set (never purged, never
/// expired) and no stream notification. The script must leave nothing written, and
/// say it may be tried again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_append_during_a_slot_migration_writes_all_or_nothing() {
    let cluster = tokio::task::spawn_blocking(LocalCluster::start)
        .await
        .expect("start a cluster");
    let prefix = common::prefix();
    // One shard: every key of the store in the slot of hash tag `s0`.
    let store = RedisStore::connect(RedisStoreConfig {
        cluster_nodes: cluster.urls(),
        key_prefix: prefix.clone(),
        shards: 1,
        ..Default::default()
    })
    .await
    .expect("connect to the local cluster");
    // A finished workflow: the shard's closed set and `idx:st:completed` exist.
    let first = WorkflowId::random();
    store.create(new_wf(&first, "first", 10)).await.unwrap();
    store
        .append(&first, Seq(1), vec![completed(11)], OwedChanges::none())
        .await
        .unwrap();
    // The workflow under test, with a dedupe set (a keyed signal): every key the
    // append script declares exists.
    let id = WorkflowId::random();
    store.create(new_wf(&id, "second", 20)).await.unwrap();
    store
        .append_keyed(
            &id,
            KeyedAppend {
                key: Some("s:k".into()),
                events: vec![NewEvent::new(
                    Timestamp(21),
                    EventData::SignalReceived {
                        name: "s".into(),
                        payload: json!(null),
                    },
                )],
                ..KeyedAppend::default()
            },
        )
        .await
        .unwrap();

    let port = cluster.ports[0];
    let slot = match cmd(port, &["CLUSTER", "KEYSLOT", "{s0}"]).await {
        redis::Value::Int(n) => u16::try_from(n).unwrap(),
        other => panic!("KEYSLOT: {other:?}"),
    };
    let slot_s = slot.to_string();
    let ((src, src_id), (dst, dst_id)) = owner_and_other(&cluster.ports, slot).await;
    cmd(dst, &["CLUSTER", "SETSLOT", &slot_s, "IMPORTING", &src_id]).await;
    cmd(src, &["CLUSTER", "SETSLOT", &slot_s, "MIGRATING", &dst_id]).await;
    let during = store
        .append(&id, Seq(2), vec![completed(30)], OwedChanges::none())
        .await;
    cmd(src, &["CLUSTER", "SETSLOT", &slot_s, "STABLE"]).await;
    cmd(dst, &["CLUSTER", "SETSLOT", &slot_s, "STABLE"]).await;

    let after = store.get(&id).await.unwrap().expect("the workflow");
    // Whatever the append answered, the store must be in one piece: completed with
    // nothing owed and a closed entry, or still running as it was.
    let owed: Vec<WorkflowId> = store
        .claim_overdue(Timestamp(1_000_000), std::time::Duration::from_secs(1), 100)
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.workflow_id)
        .collect();
    let retried = match &during {
        Ok(_) => None,
        Err(_) => Some(
            store
                .append(&id, Seq(2), vec![completed(30)], OwedChanges::none())
                .await,
        ),
    };
    let purged = store.purge_closed(Timestamp(1_000_000), 100).await.unwrap();
    drop(store);
    drop(cluster);
    match &during {
        Ok(seq) => {
            assert_eq!(*seq, Seq(3));
            assert_eq!(after.status, WorkflowStatus::Completed);
        }
        Err(e) => {
            assert_eq!(
                (after.status, after.last_seq, owed.contains(&id)),
                (WorkflowStatus::Running, Seq(2), true),
                "the failed append wrote part of itself (status, last seq, owes its task): {e}"
            );
            assert!(
                matches!(e, StoreError::Unavailable(_)),
                "a slot in migration is transient, so retryable: {e:?}"
            );
            assert!(
                matches!(retried, Some(Ok(Seq(3)))),
                "once the slot is stable the append goes in: {retried:?}"
            );
        }
    }
    assert!(
        during.is_err() || !owed.contains(&id),
        "a completed workflow still owes work: {during:?}"
    );
    assert_eq!(purged, 2, "both finished workflows are purged");
}
