//! Redis-specific tests: behaviour, cluster key layout, a Redis restart, and
//! two stores sharing one Redis. Conformance lives in `conformance.rs`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::PrivateRedis;
use futures::StreamExt;
use marathon_core::{
    EventData, KeyedAppend, KeyedOutcome, ListQuery, NewEvent, NewWorkflow, OwedChanges, OwedEntry,
    OwedKind, Seq, Store, StoreError, Timestamp, WorkflowId, WorkflowStatus,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use serde_json::json;

fn new_wf(id: &WorkflowId, name: &str, key: Option<&str>, at: u64) -> NewWorkflow {
    NewWorkflow {
        id: id.clone(),
        name: name.into(),
        input: json!({"big": 12345678901234567u64, "f": 0.1, "empty": [], "o": {}}),
        task_queue: "tq".into(),
        idempotency_key: key.map(Into::into),
        started_at: Timestamp(at),
        task_deadline: Timestamp(at + 1000),
        trace_context: None,
    }
}

fn signal(at: u64, n: u64) -> NewEvent {
    NewEvent::new(
        Timestamp(at),
        EventData::SignalReceived {
            name: "s".into(),
            payload: json!(n),
        },
    )
}

fn done(at: u64) -> NewEvent {
    NewEvent::new(
        Timestamp(at),
        EventData::WorkflowCompleted {
            output: json!({"ok": true}),
        },
    )
}

fn timer(id: u32, at: u64) -> OwedEntry {
    OwedEntry {
        kind: OwedKind::Timer { timer_id: id },
        task_queue: "tq".into(),
        deadline: Timestamp(at),
        trace_context: None,
        run: None,
    }
}

#[tokio::test]
async fn histories_summaries_and_appends() {
    let (store, prefix) = common::fresh().await;
    let id = WorkflowId::random();
    let c = store.create(new_wf(&id, "n", None, 100)).await.unwrap();
    assert!(c.created);
    let again = store.create(new_wf(&id, "n", None, 999)).await.unwrap();
    assert!(!again.created);
    assert_eq!(again.summary, c.summary);
    assert_eq!(store.get(&id).await.unwrap().unwrap(), c.summary);

    // Conditional appends: seqs without gaps, conflicts write nothing.
    let s = store
        .append(
            &id,
            Seq(1),
            vec![signal(101, 1), signal(102, 2)],
            OwedChanges::none(),
        )
        .await
        .unwrap();
    assert_eq!(s, Seq(3));
    match store
        .append(&id, Seq(1), vec![signal(103, 3)], OwedChanges::none())
        .await
    {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => {
            assert_eq!((expected, actual), (Seq(1), Seq(3)));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    let events = store.read(&id, Seq::ZERO, 100).await.unwrap();
    assert_eq!(
        events.iter().map(|e| e.seq.0).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        matches!(events[0].data, EventData::WorkflowStarted { ref input, .. } if input["big"] == json!(12345678901234567u64))
    );
    assert_eq!(store.read(&id, Seq(2), 1).await.unwrap()[0].seq, Seq(3));

    // Keyed appends: requires, duplicate, not owed.
    store
        .append(&id, Seq(3), vec![], OwedChanges::none().set(timer(1, 50)))
        .await
        .unwrap();
    let fire = |key: &str| KeyedAppend {
        key: Some(key.into()),
        requires: Some("t:1".into()),
        requires_deadline: None,
        events: vec![NewEvent::new(
            Timestamp(104),
            EventData::TimerFired { timer_id: 1 },
        )],
        owed: OwedChanges::none(),
    };
    let claimed = store
        .claim_overdue(Timestamp(60), Duration::from_secs(5), 10)
        .await
        .unwrap();
    let ours: Vec<_> = claimed.iter().filter(|o| o.workflow_id == id).collect();
    assert_eq!(ours.len(), 1, "{claimed:?}");
    assert_eq!(ours[0].entry.deadline, Timestamp(50));
    assert!(
        store
            .claim_overdue(Timestamp(60), Duration::from_secs(5), 10)
            .await
            .unwrap()
            .iter()
            .all(|o| o.workflow_id != id)
    );
    assert_eq!(
        store.append_keyed(&id, fire("k1")).await.unwrap(),
        KeyedOutcome::Appended(Seq(4))
    );
    assert_eq!(
        store.append_keyed(&id, fire("k1")).await.unwrap(),
        KeyedOutcome::Duplicate
    );
    assert_eq!(
        store.append_keyed(&id, fire("k2")).await.unwrap(),
        KeyedOutcome::NotOwed
    );

    // Terminal: closed for both kinds, owed cleared, summary patched.
    let s = store
        .append(
            &id,
            Seq(4),
            vec![done(200)],
            OwedChanges::none().set(timer(2, 10)),
        )
        .await
        .unwrap();
    assert_eq!(s, Seq(5));
    let sum = store.get(&id).await.unwrap().unwrap();
    assert_eq!(sum.status, WorkflowStatus::Completed);
    assert_eq!(sum.closed_at, Some(Timestamp(200)));
    assert_eq!(sum.output, Some(json!({"ok": true})));
    assert!(matches!(
        store
            .append(&id, Seq(5), vec![signal(1, 1)], OwedChanges::none())
            .await,
        Err(StoreError::Closed(_))
    ));
    assert_eq!(
        store
            .append_keyed(
                &id,
                KeyedAppend {
                    events: vec![signal(1, 1)],
                    ..Default::default()
                }
            )
            .await
            .unwrap(),
        KeyedOutcome::Closed
    );
    assert!(
        store
            .claim_overdue(Timestamp(u64::MAX / 2), Duration::from_secs(1), 100)
            .await
            .unwrap()
            .is_empty()
    );

    let missing = WorkflowId::random();
    assert!(matches!(
        store.read(&missing, Seq::ZERO, 10).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(store.get(&missing).await.unwrap().is_none());

    // Purge.
    assert_eq!(store.purge_closed(Timestamp(200), 10).await.unwrap(), 0);
    assert_eq!(store.purge_closed(Timestamp(201), 10).await.unwrap(), 1);
    assert!(store.get(&id).await.unwrap().is_none());
    assert!(
        common::keys_under(&prefix)
            .await
            .iter()
            .all(|k| !k.contains(id.as_str()))
    );
    common::teardown(&prefix).await;
}

#[tokio::test]
async fn idempotency_keys_name_one_workflow() {
    let (store, prefix) = common::fresh().await;
    let store = Arc::new(store);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let store = store.clone();
        set.spawn(async move {
            store
                .create(new_wf(&WorkflowId::random(), "n", Some("key-1"), 5))
                .await
                .unwrap()
        });
    }
    let results = set.join_all().await;
    assert_eq!(results.iter().filter(|c| c.created).count(), 1);
    let first = &results[0].summary.id;
    assert!(results.iter().all(|c| &c.summary.id == first));
    let listed = store.list(&ListQuery::default()).await.unwrap();
    assert_eq!(listed.items.len(), 1);
    common::teardown(&prefix).await;
}

#[tokio::test]
async fn list_pages_newest_first_while_statuses_change() {
    let (store, prefix) = common::fresh().await;
    let mut ids = Vec::new();
    for i in 0..25u64 {
        let id = WorkflowId::parse(format!("wf-{i:02}")).unwrap();
        // Several per millisecond, to exercise the (created_at, id) tie-break.
        store
            .create(new_wf(
                &id,
                if i % 2 == 0 { "even" } else { "odd" },
                None,
                1000 + i / 3,
            ))
            .await
            .unwrap();
        ids.push(id);
    }
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store
            .list(&ListQuery {
                status: Some(WorkflowStatus::Running),
                cursor: cursor.clone(),
                limit: 4,
                ..Default::default()
            })
            .await
            .unwrap();
        // Complete a workflow not yet seen: it leaves the filter, the rest must still come once.
        if let Some(last) = page.items.last() {
            let victim = &ids[0];
            if victim != &last.id && !seen.contains(victim) && seen.len() == 4 {
                store
                    .append(victim, Seq(1), vec![done(5000)], OwedChanges::none())
                    .await
                    .unwrap();
            }
        }
        seen.extend(page.items.iter().map(|s| s.id.clone()));
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    let mut expected: Vec<_> = ids[1..].to_vec();
    expected.sort_by_key(|id| {
        std::cmp::Reverse((
            1000 + id.as_str()[3..].parse::<u64>().unwrap() / 3,
            id.clone(),
        ))
    });
    assert_eq!(seen, expected);
    let odd = store
        .list(&ListQuery {
            name: Some("odd".into()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(odd.items.len(), 12);
    assert!(odd.next_cursor.is_none());
    let done_even = store
        .list(&ListQuery {
            name: Some("even".into()),
            status: Some(WorkflowStatus::Completed),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        done_even
            .items
            .iter()
            .map(|s| s.id.clone())
            .collect::<Vec<_>>(),
        vec![ids[0].clone()]
    );
    assert!(matches!(
        store
            .list(&ListQuery {
                cursor: Some("nope".into()),
                ..Default::default()
            })
            .await,
        Err(StoreError::InvalidCursor(_))
    ));
    common::teardown(&prefix).await;
}

/// CRC16/XMODEM of the key's hash tag (or the whole key): Redis Cluster's slot.
fn slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let tagged = b.iter().position(|&c| c == b'{').and_then(|s| {
        b[s + 1..]
            .iter()
            .position(|&c| c == b'}')
            .filter(|&l| l > 0)
            .map(|l| &b[s + 1..s + 1 + l])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(b) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

#[tokio::test]
async fn every_key_of_a_workflow_and_its_shard_shares_one_slot() {
    assert_eq!(slot("123456789"), 0x31C3);
    assert_eq!(slot("{user1000}.following"), slot("{user1000}.followers"));
    let (store, prefix) = common::fresh().await;
    let id = WorkflowId::random();
    store.create(new_wf(&id, "layout", None, 10)).await.unwrap();
    store
        .append(
            &id,
            Seq(1),
            vec![signal(11, 1)],
            OwedChanges::none().set(timer(1, 5)),
        )
        .await
        .unwrap();
    store
        .append_keyed(
            &id,
            KeyedAppend {
                key: Some("k".into()),
                events: vec![signal(12, 2)],
                ..Default::default()
            },
        )
        .await
        .unwrap();
    store
        .append(&id, Seq(3), vec![done(13)], OwedChanges::none())
        .await
        .unwrap();
    let keys = common::keys_under(&prefix).await;
    let ours: Vec<_> = keys.iter().filter(|k| !k.contains(":idem:")).collect();
    // sum ev dk; shard: owed(emptied), stream, closed, idx all/st/nm/ns.
    for part in [
        ":sum",
        ":ev",
        ":dk",
        ":stream",
        ":closed",
        ":idx:all",
        ":idx:st:completed",
        ":idx:nm:layout",
        ":idx:ns:completed:layout",
    ] {
        assert!(
            ours.iter().any(|k| k.ends_with(part)),
            "no key ending {part} in {ours:?}"
        );
    }
    let slots: std::collections::BTreeSet<_> = ours.iter().map(|k| slot(k)).collect();
    assert_eq!(slots.len(), 1, "keys over several slots: {ours:?}");
    common::teardown(&prefix).await;
}

#[tokio::test]
async fn two_stores_on_one_redis() {
    let prefix = common::prefix();
    let a = Arc::new(common::fresh_on(prefix.clone()).await);
    let b = Arc::new(common::fresh_on(prefix.clone()).await);
    let id = WorkflowId::random();
    a.create(new_wf(&id, "two", None, 1)).await.unwrap();
    assert!(!b.create(new_wf(&id, "two", None, 1)).await.unwrap().created);

    let mut events = a.subscribe(&id, Seq::ZERO).await.unwrap();
    assert_eq!(events.next().await.unwrap().unwrap().seq, Seq(1));

    let barrier = Arc::new(tokio::sync::Barrier::new(8));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (barrier, id) = (barrier.clone(), id.clone());
        set.spawn(async move {
            barrier.wait().await;
            store
                .append(&id, Seq(1), vec![signal(2, i)], OwedChanges::none())
                .await
        });
    }
    let results = set.join_all().await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(Seq(2)) | Err(StoreError::Conflict { .. })))
    );

    // Events appended through b reach a's subscription without polling.
    let got = tokio::time::timeout(Duration::from_secs(5), events.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(got.seq, Seq(2));
    let bb = b.clone();
    let id2 = id.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        bb.append(
            &id2,
            Seq(2),
            vec![signal(3, 9), done(4)],
            OwedChanges::none(),
        )
        .await
        .unwrap();
    });
    let rest: Vec<_> = tokio::time::timeout(Duration::from_secs(5), events.collect::<Vec<_>>())
        .await
        .unwrap();
    assert_eq!(
        rest.iter()
            .map(|e| e.as_ref().unwrap().seq.0)
            .collect::<Vec<_>>(),
        vec![3, 4]
    );
    common::teardown(&prefix).await;
}

/// A store on `prefix` whose finished workflows expire `ms` after they close.
async fn with_retention(prefix: &str, ms: u64) -> RedisStore {
    RedisStore::connect(RedisStoreConfig {
        url: common::url(),
        key_prefix: prefix.to_string(),
        retention: Some(Duration::from_millis(ms)),
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{}: {e}", common::HOW_TO_START))
}

#[tokio::test]
async fn retention_expires_finished_workflows() {
    let prefix = common::prefix();
    let store = with_retention(&prefix, 300).await;
    let id = WorkflowId::random();
    store.create(new_wf(&id, "r", Some("rk"), 1)).await.unwrap();
    store
        .append(&id, Seq(1), vec![done(2)], OwedChanges::none())
        .await
        .unwrap();
    assert!(store.get(&id).await.unwrap().is_some());
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(store.get(&id).await.unwrap().is_none());
    assert!(
        store
            .list(&ListQuery::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    // The leftover index entries go with purge.
    assert_eq!(store.purge_closed(Timestamp(3), 10).await.unwrap(), 1);
    let left = common::keys_under(&prefix).await;
    assert!(left.iter().all(|k| k.ends_with(":stream")), "{left:?}");
    common::teardown(&prefix).await;
}

/// Retention removes a finished run's keys but not its entry in the closed set; when
/// the id (and its idempotency key) is used again, purging that old entry must leave
/// the new, running workflow alone: its summary, history, owed work, index entries
/// and idempotency claim (it deleted all of them).
#[tokio::test]
async fn purging_an_expired_run_spares_a_new_run_with_its_id() {
    let prefix = common::prefix();
    let store = with_retention(&prefix, 100).await;
    let id = WorkflowId::random();
    store
        .create(new_wf(&id, "r", Some("again"), 1))
        .await
        .unwrap();
    store
        .append(&id, Seq(1), vec![done(2)], OwedChanges::none())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        store.get(&id).await.unwrap().is_none(),
        "the first run expired"
    );
    let second = store
        .create(new_wf(&id, "r", Some("again"), 10_000))
        .await
        .unwrap();
    assert!(second.created);
    // The maintenance loop purges what closed before its cutoff: the first run only.
    let purged = store.purge_closed(Timestamp(5_000), 100).await.unwrap();
    let now = store.get(&id).await.unwrap();
    let events = store.read(&id, Seq::ZERO, 10).await;
    let owed = store
        .claim_overdue(Timestamp(u64::MAX / 4), Duration::from_secs(1), 10)
        .await
        .unwrap();
    let listed = store.list(&ListQuery::default()).await.unwrap().items;
    // The old run's entry in the completed index went too (the new one is running).
    let stale_index: Vec<String> = common::keys_under(&prefix)
        .await
        .into_iter()
        .filter(|k| k.contains(":idx:st:completed") || k.contains(":idx:ns:completed"))
        .collect();
    let other = WorkflowId::random();
    let repeat = store
        .create(new_wf(&other, "r", Some("again"), 10_001))
        .await
        .unwrap();
    common::teardown(&prefix).await;
    assert_eq!(purged, 1, "the old entry is gone");
    assert_eq!(
        now.map(|s| s.status),
        Some(WorkflowStatus::Running),
        "events {events:?}"
    );
    assert_eq!(events.map(|e| e.len()).ok(), Some(1));
    assert_eq!(owed.len(), 1, "the new run's first task is still owed");
    assert_eq!(listed.len(), 1, "the new run is listed");
    assert!(stale_index.is_empty(), "{stale_index:?}");
    assert!(
        !repeat.created && repeat.summary.id == id,
        "the key still names the new run: {repeat:?}"
    );
}

/// An index entry an expired run left behind (its purge has not run yet) does not
/// list the id's newer run under the old run's name or status: before, `?name=old`
/// listed the new run, named `new`, until the purge.
#[tokio::test]
async fn a_stale_index_entry_does_not_list_a_newer_run_of_its_id() {
    let prefix = common::prefix();
    let store = with_retention(&prefix, 100).await;
    let id = WorkflowId::random();
    store.create(new_wf(&id, "old", None, 1)).await.unwrap();
    store
        .append(&id, Seq(1), vec![done(2)], OwedChanges::none())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(store.get(&id).await.unwrap().is_none(), "expired");
    store
        .create(new_wf(&id, "new", None, 10_000))
        .await
        .unwrap();
    let list = |name: &str, status: Option<WorkflowStatus>| ListQuery {
        name: Some(name.to_string()),
        status,
        ..ListQuery::default()
    };
    let by_old_name = store.list(&list("old", None)).await.unwrap().items;
    let by_old_both = store
        .list(&list("old", Some(WorkflowStatus::Completed)))
        .await
        .unwrap()
        .items;
    let by_new_name = store.list(&list("new", None)).await.unwrap().items;
    common::teardown(&prefix).await;
    assert!(by_old_name.is_empty(), "{by_old_name:?}");
    assert!(by_old_both.is_empty(), "{by_old_both:?}");
    assert_eq!(by_new_name.len(), 1);
    assert_eq!(by_new_name[0].name, "new");
}

/// Runs one Redis command on the shared server (for setting up states a crash or a
/// failed command would leave).
async fn redis_cmd(cmd: &mut redis::Cmd) -> redis::Value {
    let mut c = redis::Client::open(common::url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|e| panic!("{}: {e}", common::HOW_TO_START));
    cmd.query_async(&mut c).await.expect("redis command")
}

/// The idempotency claim keys under `prefix`.
async fn claims(prefix: &str) -> Vec<String> {
    let mut keys = common::keys_under(prefix).await;
    keys.retain(|k| k.contains(":idem:"));
    keys
}

/// A start that finds its idempotency key claimed but the claimed workflow missing
/// finishes that creation while the claim is younger than the retention (its
/// claimant crashed between its two steps), and otherwise takes the key over: a
/// claim outlived by its workflow (closed and expired, while the claim's own expiry
/// failed) must not re-create, and so re-run, the finished workflow.
#[tokio::test]
async fn a_claim_without_its_workflow_is_finished_only_while_the_workflow_cannot_have_expired() {
    let prefix = common::prefix();
    let store = with_retention(&prefix, 100).await;

    // A claimant that crashed between claiming "young" and creating its workflow.
    let x = WorkflowId::random();
    store
        .create(new_wf(&x, "n", Some("young"), 1_000))
        .await
        .unwrap();
    for k in common::keys_under(&prefix).await {
        if k.contains(&format!(":wf:{x}:")) {
            redis_cmd(redis::cmd("DEL").arg(&k)).await;
        }
    }
    assert!(store.get(&x).await.unwrap().is_none());
    let y = WorkflowId::random();
    let c = store
        .create(new_wf(&y, "n", Some("young"), 1_050))
        .await
        .unwrap();
    assert_eq!(
        (c.created, &c.summary.id),
        (false, &x),
        "the creation is finished"
    );

    // A finished workflow whose claim did not get its expiry.
    let old = WorkflowId::random();
    store
        .create(new_wf(&old, "n", Some("old"), 2_000))
        .await
        .unwrap();
    store
        .append(&old, Seq(1), vec![done(2_001)], OwedChanges::none())
        .await
        .unwrap();
    for k in claims(&prefix).await {
        redis_cmd(redis::cmd("PERSIST").arg(&k)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        store.get(&old).await.unwrap().is_none(),
        "retention expired it"
    );
    let new = WorkflowId::random();
    let c = store
        .create(new_wf(&new, "n", Some("old"), 10_000))
        .await
        .unwrap();
    let resurrected = store.get(&old).await.unwrap();
    let again = store
        .create(new_wf(&WorkflowId::random(), "n", Some("old"), 10_001))
        .await
        .unwrap();
    common::teardown(&prefix).await;
    assert!(
        resurrected.is_none(),
        "the finished workflow ran again: {resurrected:?}"
    );
    assert_eq!((c.created, &c.summary.id), (true, &new));
    assert_eq!(
        (again.created, &again.summary.id),
        (false, &new),
        "the key names it"
    );
}

/// Starters racing to take over an outlived claim with the same id and key (a retried
/// request, several API replicas) create the workflow once: only one of them reports
/// `created`. (The takeover releases only the very claim it read: releasing by id
/// alone could delete the claim another starter had just made, an interleaving this
/// test does not manage to force.)
#[tokio::test]
async fn racing_starters_take_over_an_outlived_claim_once() {
    let prefix = common::prefix();
    let store = Arc::new(with_retention(&prefix, 50).await);
    let mut doubled = Vec::new();
    for round in 0..20u64 {
        let x = WorkflowId::random();
        let key = format!("race-{round}");
        store.create(new_wf(&x, "n", Some(&key), 1)).await.unwrap();
        store
            .append(&x, Seq(1), vec![done(2)], OwedChanges::none())
            .await
            .unwrap();
        for k in claims(&prefix).await {
            redis_cmd(redis::cmd("PERSIST").arg(&k)).await;
        }
        tokio::time::sleep(Duration::from_millis(120)).await;
        let mut set = tokio::task::JoinSet::new();
        for i in 0..16 {
            let (store, x, key) = (store.clone(), x.clone(), key.clone());
            set.spawn(async move { store.create(new_wf(&x, "n", Some(&key), 10_000 + i)).await });
        }
        let results = set.join_all().await;
        let created = results
            .iter()
            .filter(|r| r.as_ref().is_ok_and(|c| c.created))
            .count();
        if created != 1
            || !results
                .iter()
                .all(|r| r.as_ref().is_ok_and(|c| c.summary.id == x))
        {
            doubled.push((round, results));
        }
    }
    common::teardown(&prefix).await;
    assert!(doubled.is_empty(), "{doubled:#?}");
}

/// A start with an idempotency key whose id is taken by a workflow without that key
/// gets that workflow (not created) and leaves no claim: the key stays free for the
/// next start, and no claim is left behind for ever.
#[tokio::test]
async fn a_start_that_finds_its_id_taken_leaves_its_key_free() {
    let (store, prefix) = common::fresh().await;
    let x = WorkflowId::random();
    store.create(new_wf(&x, "n", None, 1)).await.unwrap();
    let taken = store.create(new_wf(&x, "n", Some("k"), 2)).await.unwrap();
    let left = claims(&prefix).await;
    let y = WorkflowId::random();
    let fresh = store.create(new_wf(&y, "n", Some("k"), 3)).await.unwrap();
    common::teardown(&prefix).await;
    assert_eq!((taken.created, &taken.summary.id), (false, &x));
    assert!(left.is_empty(), "{left:?}");
    assert_eq!((fresh.created, &fresh.summary.id), (true, &y));
}

#[tokio::test]
async fn survives_a_redis_restart() {
    let port = common::low_port();
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
    let id = WorkflowId::random();
    store.create(new_wf(&id, "restart", None, 1)).await.unwrap();
    let mut last = Seq(1);
    for i in 0..20 {
        last = store
            .append(&id, last, vec![signal(i, i)], OwedChanges::none())
            .await
            .unwrap();
    }
    server.kill().await;
    // While down: retryable errors, no panic.
    for _ in 0..3 {
        match store
            .append(&id, last, vec![signal(50, 50)], OwedChanges::none())
            .await
        {
            Err(e) => assert!(e.is_retryable(), "not retryable: {e:?}"),
            Ok(s) => panic!("append succeeded with Redis down: {s}"),
        }
    }
    assert!(store.ping().await.unwrap_err().is_retryable());
    let server2 = PrivateRedis::start(port, server.dir.clone()).await;
    // Works again after reconnecting (the manager reconnects in the background).
    let mut ok = false;
    for _ in 0..100 {
        match store.ping().await {
            Ok(()) => {
                ok = true;
                break;
            }
            Err(e) => {
                assert!(e.is_retryable(), "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    assert!(ok, "store did not recover after the restart");
    let mut last = store
        .get(&id)
        .await
        .unwrap()
        .expect("history survived")
        .last_seq;
    for i in 0..10 {
        loop {
            match store
                .append(&id, last, vec![signal(100 + i, i)], OwedChanges::none())
                .await
            {
                Ok(s) => {
                    last = s;
                    break;
                }
                Err(StoreError::Conflict { actual, .. }) => last = actual,
                Err(e) if e.is_retryable() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("{e:?}"),
            }
        }
    }
    let events = store.read(&id, Seq::ZERO, 1000).await.unwrap();
    assert_eq!(events.len() as u64, last.0);
    assert!(
        events
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq.0 == i as u64 + 1),
        "gap in history"
    );
    drop(server2);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Batches larger than one Redis command takes in a script (the scripts write them in
/// chunks): thousands of events and owed entries in one append, then cleared in one.
#[tokio::test]
async fn batches_of_thousands_of_events_and_owed_entries() {
    let (store, prefix) = common::fresh().await;
    let id = WorkflowId::random();
    store.create(new_wf(&id, "n", None, 100)).await.unwrap();
    let events: Vec<NewEvent> = (0..5_000).map(|n| signal(101, n)).collect();
    let mut set = OwedChanges::none();
    for t in 0..4_500 {
        set = set.set(timer(t, 50));
    }
    // Creation owes a workflow task ("wf"); this batch replaces nothing of it.
    let last = store.append(&id, Seq(1), events, set).await.unwrap();
    assert_eq!(last, Seq(5_001));
    let mut seqs = Vec::new();
    let mut after = Seq::ZERO;
    loop {
        let page = store.read(&id, after, 1_000).await.unwrap();
        let Some(e) = page.last() else { break };
        after = e.seq;
        seqs.extend(page.iter().map(|e| e.seq.0));
    }
    assert_eq!(seqs, (1..=5_001).collect::<Vec<_>>());
    let mut clear = OwedChanges::none();
    for t in 0..4_500 {
        clear.clear.push(timer(t, 50).kind.key());
    }
    store
        .append(&id, last, vec![signal(102, 0)], clear)
        .await
        .unwrap();
    // Only the workflow task is owed now.
    let owed = store
        .claim_overdue(Timestamp(10_000), Duration::from_secs(30), 10_000)
        .await
        .unwrap();
    assert_eq!(
        owed.iter().map(|o| o.entry.kind.key()).collect::<Vec<_>>(),
        vec!["wf".to_string()]
    );
    common::teardown(&prefix).await;
}

/// `total_net_output_bytes` of the Redis at `url` (INFO stats).
async fn bytes_sent(client: &redis::Client) -> u64 {
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let info: String = redis::cmd("INFO")
        .arg("stats")
        .query_async(&mut conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("total_net_output_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("INFO stats has total_net_output_bytes")
}

#[tokio::test]
async fn a_subscription_reads_about_what_it_hands_out() {
    // A private server: its INFO counts only this test's traffic.
    let port = common::free_port();
    let dir = std::env::temp_dir().join(format!("marathon-redis-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut server = PrivateRedis::start(port, dir.clone()).await;
    let url = format!("redis://127.0.0.1:{port}");
    let store = RedisStore::connect(RedisStoreConfig {
        url: url.clone(),
        ..Default::default()
    })
    .await
    .expect("private redis-server");
    let id = WorkflowId::random();
    store.create(new_wf(&id, "big", None, 1)).await.unwrap();
    const MIB: usize = 1024 * 1024;
    let mut last = Seq(1);
    for i in 0..20 {
        let big = NewEvent::new(
            Timestamp(2 + i),
            EventData::SignalReceived {
                name: "s".into(),
                payload: json!("x".repeat(MIB)),
            },
        );
        last = store
            .append(&id, last, vec![big], OwedChanges::none())
            .await
            .unwrap();
    }
    let client = redis::Client::open(url).unwrap();
    let before = bytes_sent(&client).await;
    let mut sub = store.subscribe(&id, Seq(1)).await.unwrap();
    assert_eq!(sub.next().await.unwrap().unwrap().seq, Seq(2));
    // The first read is a few events (8), not all 20 MiB of them.
    let sent = bytes_sent(&client).await - before;
    // Then about 4 MiB at a time, and every event arrives in order.
    let mut seqs = vec![2];
    while let Some(Ok(e)) = tokio::time::timeout(Duration::from_secs(5), sub.next())
        .await
        .ok()
        .flatten()
    {
        seqs.push(e.seq.0);
        if e.seq == last {
            break;
        }
    }
    drop(sub);
    drop(store);
    server.kill().await;
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        sent < 12 * MIB as u64,
        "{sent} bytes read to hand out one event"
    );
    assert_eq!(seqs, (2..=21).collect::<Vec<u64>>());
}

/// An idempotency claim naming a workflow that exists without that key (its
/// claimant found the id taken and crashed before releasing the claim) names
/// nothing: a start with the key takes the claim over and creates its workflow,
/// instead of answering with the unrelated workflow for as long as the claim lasts.
#[tokio::test]
async fn a_claim_naming_a_workflow_without_its_key_is_taken_over() {
    let prefix = common::prefix();
    let store = RedisStore::connect(RedisStoreConfig {
        url: common::url(),
        key_prefix: prefix.clone(),
        shards: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let taken = WorkflowId::parse("taken").unwrap();
    store
        .create(new_wf(&taken, "other", None, 1_000))
        .await
        .unwrap();
    // What a start of `taken` with key K left: its claim, written before it found
    // the id taken, never released.
    let claimant = new_wf(&taken, "n", Some("K"), 2_000);
    let claim = format!("{taken}\n{}", serde_json::to_string(&claimant).unwrap());
    let mut conn = redis::Client::open(common::url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{prefix}{{s0}}:idem:K"))
        .arg(claim)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mine = WorkflowId::parse("mine").unwrap();
    let got = store.create(new_wf(&mine, "n", Some("K"), 3_000)).await;
    let again = store
        .create(new_wf(
            &WorkflowId::parse("again").unwrap(),
            "n",
            Some("K"),
            4_000,
        ))
        .await;
    common::teardown(&prefix).await;
    let got = got.unwrap();
    assert_eq!(
        (got.summary.id.as_str(), got.created),
        ("mine", true),
        "{got:?}"
    );
    let again = again.unwrap();
    assert_eq!(
        (again.summary.id.as_str(), again.created),
        ("mine", false),
        "{again:?}"
    );
}

/// The tests' clean-up (`testkit::delete_prefix`) takes its prefix literally: a glob
/// character in it (`?`, `*`, `[`) matches only itself. Before, `SCAN MATCH
/// <prefix>*` took it as a pattern, and deleting `…:a?` deleted `…:ab` too, a key of
/// another prefix on the shared Redis.
#[tokio::test]
async fn delete_prefix_takes_its_prefix_literally() {
    let base = common::prefix();
    let bystander = format!("{base}ab");
    let ours = format!("{base}a?");
    for key in [&bystander, &format!("{ours}x")] {
        redis_cmd(redis::cmd("SET").arg(key).arg("1")).await;
    }
    let deleted = marathon_redis::testkit::delete_prefix(&common::url(), &ours)
        .await
        .expect("delete_prefix");
    let left = common::keys_under(&base).await;
    common::teardown(&base).await;
    assert_eq!(left, vec![bystander], "deleted {deleted}");
}
