//! A store command applied by Redis whose reply is lost (response timeout, a
//! connection reset after the script ran): what the engine does with it.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::*;
use marathon_core::memory::MemoryQueue;
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, Engine, EngineConfig, EventData, KeyedAppend,
    KeyedOutcome, NewEvent, NewWorkflow, Seq, StartWorkflow, Store, StoreError, Timestamp, Worker,
    WorkerConfig, WorkflowContext, WorkflowError, WorkflowId, WorkflowStatus,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use serde_json::json;

async fn one_call(ctx: WorkflowContext, (): ()) -> Result<u32, WorkflowError> {
    let opts = ActivityOptions::default().start_to_close(Duration::from_secs(30));
    ctx.activity_with::<_, u32>("llm", &1u32, opts).await
}

async fn run_through_cut(pattern: &'static [u8]) -> (WorkflowStatus, Duration) {
    let prefix = prefix();
    let (proxy, store) = cut_store(pattern, RedisStoreConfig::default(), &prefix).await;
    let engine = Engine::builder()
        .store(Arc::new(store))
        .queue(Arc::new(MemoryQueue::default()))
        .config(EngineConfig {
            activity_grace: Duration::from_millis(200),
            task_failure_retry: Duration::from_millis(200),
            workflow_task_deadline: Duration::from_secs(30),
            ..EngineConfig::default()
        })
        .workflow("one", one_call)
        .activity("llm", |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n + 1)
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
    proxy.armed.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let id = engine
        .start(StartWorkflow::new("one", json!(null)))
        .await
        .unwrap()
        .summary
        .id;
    let mut status = WorkflowStatus::Running;
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(s) = engine.get(&id).await
            && s.status.is_terminal()
        {
            status = s.status;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t0.elapsed();
    let fired = !proxy.armed.load(Ordering::SeqCst);
    worker.shutdown().await;
    teardown(&prefix).await;
    assert!(fired, "the connection was never cut");
    (status, took)
}

/// The connection drops between Redis applying a workflow task's append (activity
/// scheduled) and its reply. The task is handed back and replayed: the activity is
/// recorded as scheduled, so nothing new is sent, and the activity task is never
/// enqueued. Only the sweeper sends it, once its owed deadline (start_to_close +
/// grace: 30 s here, 300 s by default) has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_after_the_schedule_does_not_stall_the_activity() {
    let (status, took) = run_through_cut(b"activity_scheduled").await;
    assert_eq!(status, WorkflowStatus::Completed);
    assert!(
        took < Duration::from_secs(10),
        "completed only after {took:?}"
    );
}

/// The connection dropped between Redis applying an activity's result
/// (`append_keyed`) and its reply: the retry answers NotOwed, the result counts as
/// dropped, and the workflow task it owes waits for its deadline (30 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_after_an_activity_result_does_not_stall_the_workflow() {
    let (status, took) = run_through_cut(b"activity_completed").await;
    assert_eq!(status, WorkflowStatus::Completed);
    assert!(
        took < Duration::from_secs(10),
        "completed only after {took:?}"
    );
}

fn signal(name: &str) -> NewEvent {
    NewEvent::new(
        Timestamp(20),
        EventData::SignalReceived {
            name: name.into(),
            payload: json!(null),
        },
    )
}

/// Signal names in the history of `id`, in order.
async fn signal_names(store: &RedisStore, id: &WorkflowId) -> Vec<String> {
    store
        .read(id, Seq(0), 1000)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.data {
            EventData::SignalReceived { name, .. } => Some(name),
            _ => None,
        })
        .collect()
}

/// A signal sent without a key (a keyed append with neither dedupe key nor required
/// owed entry) whose reply is lost after Redis applied it, and another append to the
/// same workflow lands before the store sends it again (50 ms later): that append
/// replaced the batch token in the summary, so the retry found nothing telling it the
/// batch was in, and appended the signal a second time. The workflow saw it twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_unkeyed_signal_is_not_appended_twice_after_another_append() {
    let (proxy, cut, direct, prefix) = cut_and_direct(b"sent-once-without-key").await;
    let new = new_wf("w", None);
    let id = new.id.clone();
    direct.create(new).await.unwrap();
    let sending = {
        let id = id.clone();
        tokio::spawn(async move {
            cut.append_keyed(
                &id,
                KeyedAppend {
                    events: vec![signal("sent-once-without-key")],
                    ..KeyedAppend::default()
                },
            )
            .await
        })
    };
    // Once Redis has applied the signal (its reply is being cut), another append
    // lands before the store's first retry.
    another_append_once_landed(&direct, &id).await;
    let outcome = sending.await.unwrap();
    let names = signal_names(&direct, &id).await;
    let fired = !proxy.armed.load(Ordering::SeqCst);
    teardown(&prefix).await;
    assert!(fired, "the connection was never cut");
    assert_eq!(
        names,
        ["sent-once-without-key", "other"],
        "outcome {outcome:?}"
    );
    // The retry found the batch in by its own dedupe key (its token in the summary
    // had been replaced): nothing appended, and the caller is not told it failed.
    assert!(
        matches!(outcome, Ok(KeyedOutcome::Duplicate)),
        "{outcome:?}"
    );
}

/// A store whose connection goes through a proxy that cuts the reply of the first
/// request holding `pattern` (armed), and a direct store on the same prefix.
async fn cut_and_direct(pattern: &'static [u8]) -> (FaultProxy, RedisStore, RedisStore, String) {
    let prefix = prefix();
    let (proxy, cut) = cut_store(pattern, RedisStoreConfig::default(), &prefix).await;
    let direct = fresh_on(prefix.clone()).await;
    proxy.armed.store(true, Ordering::SeqCst);
    (proxy, cut, direct, prefix)
}

/// A store with `config` on `prefix` whose connection goes through a proxy that, once
/// armed, cuts the reply of the first request holding `pattern`.
async fn cut_store(
    pattern: &'static [u8],
    config: RedisStoreConfig,
    prefix: &str,
) -> (FaultProxy, RedisStore) {
    let target: u16 = url()
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(6379);
    let proxy = FaultProxy::cutting(target, pattern).await;
    let store = RedisStore::connect(RedisStoreConfig {
        url: proxy.url(),
        key_prefix: prefix.to_string(),
        ..config
    })
    .await
    .unwrap();
    (proxy, store)
}

/// Waits until a signal of `id` is in (a batch whose reply is being cut), then appends
/// another signal, "other", through `direct`: it lands before the cut store's retry.
async fn another_append_once_landed(direct: &RedisStore, id: &WorkflowId) {
    let t0 = Instant::now();
    while signal_names(direct, id).await.is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the batch never landed"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let other = direct
        .append_keyed(
            id,
            KeyedAppend {
                key: Some("s:other".into()),
                events: vec![signal("other")],
                ..KeyedAppend::default()
            },
        )
        .await
        .unwrap();
    assert!(matches!(other, KeyedOutcome::Appended(_)), "{other:?}");
}

fn new_wf(name: &str, key: Option<&str>) -> NewWorkflow {
    NewWorkflow {
        id: WorkflowId::random(),
        name: name.into(),
        input: json!(null),
        task_queue: "tq".into(),
        idempotency_key: key.map(Into::into),
        started_at: Timestamp(10),
        task_deadline: Timestamp(1_000),
        trace_context: None,
    }
}

/// Redis created the workflow (`create.lua`) and the reply was lost: the store
/// answered `Unavailable`, so the API answered 503 for a start that had started, and
/// a client retrying a start without id or key started the workflow a second time.
/// Now the store sends the call again, like an append's, and recognises its own
/// creation: `created: true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_whose_reply_is_lost_answers_created() {
    let (proxy, cut, direct, prefix) = cut_and_direct(b"created-once-reply-lost").await;
    let new = new_wf("created-once-reply-lost", None);
    let created = cut.create(new.clone()).await;
    let stored = direct.get(&new.id).await.unwrap();
    let fired = !proxy.armed.load(Ordering::SeqCst);
    teardown(&prefix).await;
    assert!(fired, "the connection was never cut");
    assert!(stored.is_some(), "Redis created it");
    let created = created.expect("the creation Redis applied is not reported failed");
    assert!(created.created, "{created:?}");
    assert_eq!(created.summary.id, new.id);
}

/// The same with an idempotency key, its reply lost at each of the two steps: the
/// claim (`SET NX GET`), then `create.lua`. Each is sent again; the claim found is
/// this call's own, and the creation too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_create_whose_replies_are_lost_answers_created() {
    for (pattern, name) in [
        (&b"\r\nSET\r\n"[..], "claim-reply-lost"),
        (&b"create-reply-lost"[..], "create-reply-lost"),
    ] {
        let (proxy, cut, direct, prefix) = cut_and_direct(pattern).await;
        let new = new_wf(name, Some(name));
        let created = cut.create(new.clone()).await;
        let stored = direct.get(&new.id).await.unwrap();
        let fired = !proxy.armed.load(Ordering::SeqCst);
        teardown(&prefix).await;
        assert!(fired, "{name}: the connection was never cut");
        let created = created.unwrap_or_else(|e| panic!("{name}: reported failed: {e}"));
        assert!(created.created, "{name}: {created:?}");
        assert_eq!(created.summary.id, new.id, "{name}");
        assert!(stored.is_some(), "{name}: created in Redis");
    }
}

/// A workflow's closing append whose reply is lost: the store's retry finds its
/// batch in by its token. That answer left out the idempotency key the closing
/// batch owes an expiry (under retention), so the claim outlived its workflow and
/// was never released: with purging off, the key named a gone workflow forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_on_the_closing_append_still_expires_the_idempotency_key() {
    let prefix = prefix();
    let retained = RedisStoreConfig {
        retention: Some(Duration::from_secs(3_600)),
        ..Default::default()
    };
    let (proxy, cut) = cut_store(b"closing-reply-lost", retained, &prefix).await;
    let new = new_wf("closing", Some("closing-key"));
    cut.create(new.clone()).await.unwrap();
    proxy.armed.store(true, Ordering::SeqCst);
    let closed = cut
        .append(
            &new.id,
            Seq(1),
            vec![NewEvent::new(
                Timestamp(20),
                EventData::WorkflowCompleted {
                    output: json!("closing-reply-lost"),
                },
            )],
            marathon_core::OwedChanges::none(),
        )
        .await;
    let fired = !proxy.armed.load(Ordering::SeqCst);
    let idem = keys_under(&prefix)
        .await
        .into_iter()
        .find(|k| k.contains(":idem:"));
    let ttl: i64 = match &idem {
        Some(key) => {
            let mut c = redis::Client::open(url())
                .unwrap()
                .get_multiplexed_async_connection()
                .await
                .unwrap();
            redis::cmd("PTTL")
                .arg(key)
                .query_async(&mut c)
                .await
                .unwrap()
        }
        None => -2,
    };
    teardown(&prefix).await;
    assert!(fired, "the connection was never cut");
    assert_eq!(
        closed.expect("the applied append is not reported failed"),
        Seq(2)
    );
    assert!(
        ttl > 0 && ttl <= 3_600_000,
        "idempotency key {idem:?} has PTTL {ttl}, not the retention"
    );
}

/// A workflow task's conditional append whose reply is lost after Redis applied it,
/// and another append (a signal) lands before the store sends it again: that append
/// replaced the batch token in the summary, so the retry answered `Conflict`. The
/// engine dropped the task, and the activities its batch scheduled were sent only
/// when their owed deadline passed (5.5 minutes by default). Now the store finds its
/// batch in, right after the sequence it expected, and answers it appended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_append_followed_by_another_is_not_a_conflict() {
    let (proxy, cut, direct, prefix) = cut_and_direct(b"scheduled-reply-lost").await;
    let new = new_wf("scheduled", None);
    let id = new.id.clone();
    direct.create(new).await.unwrap();
    let sending = {
        let id = id.clone();
        tokio::spawn(async move {
            cut.append(
                &id,
                Seq(1),
                vec![
                    signal("scheduled-reply-lost"),
                    signal("second of the batch"),
                ],
                marathon_core::OwedChanges::none(),
            )
            .await
        })
    };
    another_append_once_landed(&direct, &id).await;
    let outcome = sending.await.unwrap();
    let names = signal_names(&direct, &id).await;
    let fired = !proxy.armed.load(Ordering::SeqCst);
    // A real conflict is still one: the batch is not in after Seq(1) any more.
    let stale = direct
        .append(
            &id,
            Seq(1),
            vec![
                signal("scheduled-reply-lost"),
                signal("second of the batch"),
            ],
            marathon_core::OwedChanges::none(),
        )
        .await;
    teardown(&prefix).await;
    assert!(fired, "the connection was never cut");
    assert_eq!(
        names,
        ["scheduled-reply-lost", "second of the batch", "other"],
        "outcome {outcome:?}"
    );
    assert_eq!(
        outcome.expect("the applied batch is not a conflict"),
        Seq(3)
    );
    assert!(
        matches!(stale, Err(StoreError::Conflict { .. })),
        "{stale:?}"
    );
}
