//! `Store` conformance cases: each takes a fresh, empty store.
//!
//! Times are explicit [`Timestamp`]s (nothing sleeps) and ids are random, so a
//! backend may run the cases in parallel in separate namespaces.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::json;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

use crate::model::{
    ActivityOptions, Event, EventData, NewEvent, Seq, Timestamp, WorkflowError, WorkflowId,
    WorkflowStatus, WorkflowSummary,
};
use crate::store::{
    AttemptExtend, AttemptStart, KeyedAppend, KeyedOutcome, ListQuery, NewWorkflow, Owed,
    OwedChanges, OwedEntry, OwedKind, Store, StoreError,
};

/// A fixed epoch the cases count from.
const T0: Timestamp = Timestamp(1_700_000_000_000);
/// How long a subscription may take to deliver what it owes.
const STREAM_TIMEOUT: Duration = Duration::from_secs(10);
/// A lease used by claims.
const LEASE: Duration = Duration::from_secs(60);

fn at(ms: u64) -> Timestamp {
    Timestamp(T0.0 + ms)
}

fn new_workflow(name: &str, started_at: Timestamp) -> NewWorkflow {
    NewWorkflow {
        id: WorkflowId::random(),
        name: name.to_string(),
        input: json!({"question": 42}),
        task_queue: "tq".to_string(),
        idempotency_key: None,
        started_at,
        task_deadline: started_at.plus(Duration::from_secs(30)),
        trace_context: None,
    }
}

async fn start(store: &Arc<dyn Store>, name: &str, started_at: Timestamp) -> WorkflowId {
    let new = new_workflow(name, started_at);
    let id = new.id.clone();
    let created = store.create(new).await.expect("create");
    assert!(created.created);
    id
}

fn ev(ts: Timestamp, data: EventData) -> NewEvent {
    NewEvent::new(ts, data)
}

fn signal(ts: Timestamp, n: u64) -> NewEvent {
    ev(
        ts,
        EventData::SignalReceived {
            name: "poke".into(),
            payload: json!(n),
        },
    )
}

fn completed(ts: Timestamp) -> NewEvent {
    ev(
        ts,
        EventData::WorkflowCompleted {
            output: json!({"answer": 42}),
        },
    )
}

fn workflow_task(deadline: Timestamp) -> OwedEntry {
    OwedEntry {
        kind: OwedKind::WORKFLOW_TASK,
        task_queue: "tq".into(),
        deadline,
        trace_context: None,
        run: None,
    }
}

/// The `traceparent` every test timer carries.
const TIMER_TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

fn timer(timer_id: u32, deadline: Timestamp) -> OwedEntry {
    OwedEntry {
        kind: OwedKind::Timer { timer_id },
        task_queue: "tq".into(),
        deadline,
        // Kept by every backend: a fired timer's task continues the trace it names.
        trace_context: Some(TIMER_TRACEPARENT.into()),
        // Kept too: the task sent when it fires names its run.
        run: Some(T0),
    }
}

fn activity(activity_id: u32, attempt: u32, deadline: Timestamp) -> OwedEntry {
    OwedEntry {
        kind: OwedKind::Activity {
            activity_id,
            attempt,
            scheduled_seq: Seq(2),
            redeliveries: 0,
            started: None,
            started_copy: 0,
            resends: 0,
        },
        task_queue: "tq".into(),
        deadline,
        trace_context: None,
        run: None,
    }
}

async fn summary(store: &Arc<dyn Store>, id: &WorkflowId) -> WorkflowSummary {
    store.get(id).await.expect("get").expect("workflow exists")
}

async fn all_events(store: &Arc<dyn Store>, id: &WorkflowId) -> Vec<Event> {
    store.read(id, Seq::ZERO, 10_000).await.expect("read")
}

/// Claims everything overdue at `now` (with [`LEASE`]).
async fn claim_all(store: &Arc<dyn Store>, now: Timestamp) -> Vec<Owed> {
    store
        .claim_overdue(now, LEASE, 1000)
        .await
        .expect("claim_overdue")
}

async fn keyed(store: &Arc<dyn Store>, id: &WorkflowId, append: KeyedAppend) -> KeyedOutcome {
    store.append_keyed(id, append).await.expect("append_keyed")
}

/// Records the result of attempt 1 of activity 1 at `ts`, consuming its owed entry
/// (`a:1:1`) as a worker's result does.
async fn record_first_result(store: &Arc<dyn Store>, id: &WorkflowId, ts: Timestamp) {
    let result = KeyedAppend {
        key: None,
        requires: Some("a:1:1".into()),
        requires_deadline: None,
        events: vec![ev(
            ts,
            EventData::ActivityCompleted {
                activity_id: 1,
                attempt: 1,
                output: json!(1),
            },
        )],
        owed: OwedChanges::none(),
    };
    assert!(matches!(
        keyed(store, id, result).await,
        KeyedOutcome::Appended(_)
    ));
}

async fn collect_stream(store: &Arc<dyn Store>, id: &WorkflowId, after: Seq) -> Vec<Event> {
    let stream = store.subscribe(id, after).await.expect("subscribe");
    let events = tokio::time::timeout(STREAM_TIMEOUT, stream.collect::<Vec<_>>())
        .await
        .expect("the stream ends after the terminal event");
    events
        .into_iter()
        .map(|e| e.expect("stream item"))
        .collect()
}

fn seqs(events: &[Event]) -> Vec<u64> {
    events.iter().map(|e| e.seq.0).collect()
}

/// `create` with an existing id writes nothing and returns the existing workflow, with
/// its own name and task queue (the engine refuses a start whose differ).
pub async fn create_is_idempotent_on_id(store: Arc<dyn Store>) {
    let new = new_workflow("greet", at(0));
    let first = store.create(new.clone()).await.expect("create");
    assert!(first.created);
    let again = store
        .create(NewWorkflow {
            name: "other".into(),
            task_queue: format!("not-{}", new.task_queue),
            input: json!("different"),
            started_at: at(5),
            task_deadline: at(6),
            ..new.clone()
        })
        .await
        .expect("create again");
    assert!(!again.created);
    assert_eq!(again.summary, first.summary);
    assert_eq!(
        (
            again.summary.name.as_str(),
            again.summary.task_queue.as_str()
        ),
        ("greet", new.task_queue.as_str())
    );
    assert_eq!(all_events(&store, &new.id).await.len(), 1);
    assert_eq!(summary(&store, &new.id).await.name, "greet");
}

/// `create` with an existing id and an idempotency key another workflow holds returns
/// the key's workflow: the key names the start a client made, so the engine can tell
/// the caller its key belongs to another id. (The memory store returned the id's.)
pub async fn create_checks_the_idempotency_key_before_the_id(store: Arc<dyn Store>) {
    let by_id = new_workflow("greet", at(0));
    assert!(store.create(by_id.clone()).await.expect("create").created);
    let key = format!("key-{}", WorkflowId::random());
    let by_key = NewWorkflow {
        idempotency_key: Some(key.clone()),
        ..new_workflow("greet", at(10))
    };
    assert!(store.create(by_key.clone()).await.expect("create").created);
    let both = NewWorkflow {
        idempotency_key: Some(key),
        ..by_id.clone()
    };
    let again = store.create(both).await.expect("create again");
    assert!(!again.created);
    assert_eq!(again.summary.id, by_key.id);
    // An unused key with an existing id returns the id's workflow, and the key stays
    // unused.
    let fresh_key = format!("key-{}", WorkflowId::random());
    let again = store
        .create(NewWorkflow {
            idempotency_key: Some(fresh_key.clone()),
            ..by_id.clone()
        })
        .await
        .expect("create again");
    assert!(!again.created);
    assert_eq!(again.summary.id, by_id.id);
    let other = NewWorkflow {
        idempotency_key: Some(fresh_key),
        ..new_workflow("greet", at(20))
    };
    assert!(store.create(other).await.expect("create").created);
}

/// `create` with a used idempotency key returns the workflow first created with it.
pub async fn create_is_idempotent_on_idempotency_key(store: Arc<dyn Store>) {
    let key = format!("key-{}", WorkflowId::random());
    let first = NewWorkflow {
        idempotency_key: Some(key.clone()),
        ..new_workflow("greet", at(0))
    };
    let created = store.create(first.clone()).await.expect("create");
    assert!(created.created);
    // Another name and task queue: the existing workflow is returned as it is.
    let second = NewWorkflow {
        idempotency_key: Some(key),
        task_queue: "other-tq".into(),
        ..new_workflow("other", at(10))
    };
    let again = store.create(second.clone()).await.expect("create again");
    assert!(!again.created);
    assert_eq!(again.summary.id, first.id);
    assert_eq!(again.summary, created.summary);
    assert_eq!(store.get(&second.id).await.expect("get"), None);
    // A different key (or none) creates a new workflow.
    let third = new_workflow("greet", at(20));
    assert!(store.create(third).await.expect("create third").created);
}

/// Event 1 is `workflow_started`; the summary is running at sequence 1; a workflow task is owed.
pub async fn create_records_started_event_summary_and_owed_task(store: Arc<dyn Store>) {
    let new = NewWorkflow {
        idempotency_key: Some(format!("key-{}", WorkflowId::random())),
        ..new_workflow("greet", at(100))
    };
    let created = store.create(new.clone()).await.expect("create");
    assert!(created.created);
    let events = all_events(&store, &new.id).await;
    assert_eq!(
        events,
        vec![Event {
            seq: Seq(1),
            timestamp: new.started_at,
            data: EventData::WorkflowStarted {
                name: new.name.clone(),
                input: new.input.clone(),
                task_queue: new.task_queue.clone(),
                idempotency_key: new.idempotency_key.clone(),
            },
        }]
    );
    let s = summary(&store, &new.id).await;
    assert_eq!(s, created.summary);
    assert_eq!(s.id, new.id);
    assert_eq!(s.name, new.name);
    assert_eq!(s.status, WorkflowStatus::Running);
    assert_eq!(s.task_queue, new.task_queue);
    assert_eq!(s.idempotency_key, new.idempotency_key);
    assert_eq!(s.created_at, new.started_at);
    assert_eq!(s.updated_at, new.started_at);
    assert_eq!(s.closed_at, None);
    assert_eq!(s.last_seq, Seq(1));
    assert!(!s.cancel_requested);
    assert_eq!((s.output, s.error, s.task_failure), (None, None, None));

    let before = Timestamp(new.task_deadline.0 - 1);
    assert_eq!(claim_all(&store, before).await, vec![]);
    assert_eq!(
        claim_all(&store, new.task_deadline).await,
        vec![Owed {
            workflow_id: new.id.clone(),
            entry: workflow_task(new.task_deadline),
        }]
    );
}

/// The run's trace context given to `create` is kept in its summary (also when a repeat
/// create returns the existing workflow, and after appends), and the owed first
/// workflow task carries it; without one, neither has any.
pub async fn create_keeps_the_runs_trace_context(store: Arc<dyn Store>) {
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let new = NewWorkflow {
        trace_context: Some(tp.into()),
        ..new_workflow("greet", at(0))
    };
    let created = store.create(new.clone()).await.expect("create");
    assert_eq!(created.summary.trace_context.as_deref(), Some(tp));
    let again = store.create(new.clone()).await.expect("create again");
    assert!(!again.created);
    assert_eq!(again.summary.trace_context.as_deref(), Some(tp));
    let owed = claim_all(&store, new.task_deadline).await;
    assert_eq!(
        owed,
        vec![Owed {
            workflow_id: new.id.clone(),
            entry: OwedEntry {
                trace_context: Some(tp.into()),
                run: None,
                ..workflow_task(new.task_deadline)
            },
        }]
    );
    store
        .append(&new.id, Seq(1), vec![signal(at(1), 1)], OwedChanges::none())
        .await
        .expect("append");
    let s = summary(&store, &new.id).await;
    assert_eq!((s.last_seq, s.trace_context.as_deref()), (Seq(2), Some(tp)));

    let plain = new_workflow("greet", at(0));
    let created = store.create(plain.clone()).await.expect("create");
    assert_eq!(created.summary.trace_context, None);
    assert_eq!(summary(&store, &plain.id).await.trace_context, None);
    let owed = claim_all(&store, plain.task_deadline).await;
    let ours: Vec<_> = owed.iter().filter(|o| o.workflow_id == plain.id).collect();
    assert_eq!(ours.len(), 1, "{owed:?}");
    assert_eq!(ours[0].entry.trace_context, None);
}

/// A conditional append after a stale sequence writes nothing and reports the actual one.
pub async fn stale_append_writes_nothing(store: Arc<dyn Store>) {
    let id = start(&store, "greet", at(0)).await;
    let seq = store
        .append(&id, Seq(1), vec![signal(at(1), 1)], OwedChanges::none())
        .await
        .expect("append");
    assert_eq!(seq, Seq(2));
    let stale = store
        .append(
            &id,
            Seq(1),
            vec![signal(at(2), 2), completed(at(2))],
            OwedChanges::none().set(timer(9, at(2))),
        )
        .await;
    match stale {
        Err(StoreError::Conflict {
            id: got,
            expected,
            actual,
        }) => {
            assert_eq!((got, expected, actual), (id.clone(), Seq(1), Seq(2)));
        }
        other => panic!("expected Conflict, got {other:?}"),
    }
    let events = all_events(&store, &id).await;
    assert_eq!(seqs(&events), vec![1, 2]);
    let s = summary(&store, &id).await;
    assert_eq!((s.last_seq, s.status), (Seq(2), WorkflowStatus::Running));
    assert!(
        claim_all(&store, at(10)).await.is_empty(),
        "the rejected append set no timer"
    );
}

/// Of 16 concurrent conditional appenders with the same expected sequence, exactly one wins.
pub async fn one_of_concurrent_appenders_wins(store: Arc<dyn Store>) {
    const N: u32 = 16;
    let id = start(&store, "race", at(0)).await;
    let barrier = Arc::new(Barrier::new(N as usize));
    let mut set = JoinSet::new();
    for i in 0..N {
        let (store, id, barrier) = (store.clone(), id.clone(), barrier.clone());
        set.spawn(async move {
            let events = vec![
                ev(at(1), EventData::WorkflowTaskCompleted {}),
                ev(
                    at(1),
                    EventData::TimerStarted {
                        timer_id: i,
                        fire_at: at(1000),
                    },
                ),
            ];
            barrier.wait().await;
            let r = store
                .append(
                    &id,
                    Seq(1),
                    events,
                    OwedChanges::none().clear("wf").set(timer(i, at(1000))),
                )
                .await;
            (i, r)
        });
    }
    let mut winners = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (i, r) = joined.expect("appender task");
        match r {
            Ok(seq) => {
                assert_eq!(seq, Seq(3));
                winners.push(i);
            }
            Err(StoreError::Conflict { actual, .. }) => assert_eq!(actual, Seq(3)),
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "winners: {winners:?}");
    let events = all_events(&store, &id).await;
    assert_eq!(seqs(&events), vec![1, 2, 3]);
    assert_eq!(
        events[2].data,
        EventData::TimerStarted {
            timer_id: winners[0],
            fire_at: at(1000),
        }
    );
    let owed = claim_all(&store, at(1000)).await;
    assert_eq!(owed.len(), 1);
    assert_eq!(owed[0].entry, timer(winners[0], at(1000)));
}

/// Events read back in order without gaps, and `read(after, limit)` pages through them.
pub async fn events_read_in_order_and_paged(store: Arc<dyn Store>) {
    let id = start(&store, "pager", at(0)).await;
    let mut last = Seq(1);
    for batch in 0..3u64 {
        let events = (0..2).map(|i| signal(at(batch * 10 + i), batch * 10 + i));
        last = store
            .append(&id, last, events.collect(), OwedChanges::none())
            .await
            .expect("append");
        let r = keyed(
            &store,
            &id,
            KeyedAppend {
                key: Some(format!("k{batch}")),
                events: vec![signal(at(batch * 10 + 5), 100 + batch)],
                ..KeyedAppend::default()
            },
        )
        .await;
        assert_eq!(r, KeyedOutcome::Appended(Seq(last.0 + 1)));
        last = Seq(last.0 + 1);
    }
    assert_eq!(last, Seq(10));
    let events = all_events(&store, &id).await;
    assert_eq!(seqs(&events), (1..=10).collect::<Vec<_>>());
    assert_eq!(
        events[3].data,
        EventData::SignalReceived {
            name: "poke".into(),
            payload: json!(100),
        }
    );
    assert_eq!(events[4].timestamp, at(10));

    let mut paged = Vec::new();
    let mut after = Seq::ZERO;
    loop {
        let page = store.read(&id, after, 3).await.expect("read page");
        assert!(page.len() <= 3);
        let Some(e) = page.last() else { break };
        after = e.seq;
        paged.extend(page);
    }
    assert_eq!(paged, events);
    assert_eq!(seqs(&store.read(&id, Seq(9), 3).await.expect("read")), [10]);
    assert!(store.read(&id, Seq(10), 3).await.expect("read").is_empty());
    assert!(store.read(&id, Seq(50), 3).await.expect("read").is_empty());
}

/// Every operation on an unknown workflow reports it as not found.
pub async fn unknown_workflow_is_not_found(store: Arc<dyn Store>) {
    let id = WorkflowId::random();
    let r = store
        .append(&id, Seq(1), vec![signal(at(1), 1)], OwedChanges::none())
        .await;
    assert!(
        matches!(r, Err(StoreError::NotFound(ref x)) if *x == id),
        "{r:?}"
    );
    let r = store
        .append_keyed(
            &id,
            KeyedAppend {
                key: Some("k".into()),
                events: vec![signal(at(1), 1)],
                ..KeyedAppend::default()
            },
        )
        .await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
    let r = store.read(&id, Seq::ZERO, 10).await;
    assert!(matches!(r, Err(StoreError::NotFound(_))), "{r:?}");
    assert!(matches!(
        store.subscribe(&id, Seq::ZERO).await,
        Err(StoreError::NotFound(_))
    ));
    assert_eq!(store.get(&id).await.expect("get"), None);
    store.ping().await.expect("ping");
}

/// After a terminal event conditional appends fail with `Closed`, and no work is owed.
pub async fn terminal_event_closes_and_clears_owed_work(store: Arc<dyn Store>) {
    let id = start(&store, "finisher", at(0)).await;
    let seq = store
        .append(
            &id,
            Seq(1),
            vec![
                ev(at(1), EventData::WorkflowTaskCompleted {}),
                ev(
                    at(1),
                    EventData::TimerStarted {
                        timer_id: 1,
                        fire_at: at(500),
                    },
                ),
            ],
            OwedChanges::none()
                .clear("wf")
                .set(timer(1, at(500)))
                .set(activity(2, 1, at(600))),
        )
        .await
        .expect("append");
    assert_eq!(seq, Seq(3));
    let seq = store
        .append(
            &id,
            seq,
            vec![completed(at(2))],
            OwedChanges::none().set(workflow_task(at(3))),
        )
        .await
        .expect("append terminal");
    assert_eq!(seq, Seq(4));
    assert!(
        claim_all(&store, at(1_000_000)).await.is_empty(),
        "a terminal event clears all owed work, even entries set with it"
    );
    for expected in [Seq(4), Seq(1)] {
        let r = store
            .append(&id, expected, vec![signal(at(5), 5)], OwedChanges::none())
            .await;
        assert!(
            matches!(r, Err(StoreError::Closed(ref x)) if *x == id),
            "{r:?}"
        );
    }
    let r = store
        .append(
            &id,
            Seq(4),
            vec![],
            OwedChanges::none().set(workflow_task(at(5))),
        )
        .await;
    assert!(matches!(r, Err(StoreError::Closed(_))), "{r:?}");
    assert_eq!(seqs(&all_events(&store, &id).await), vec![1, 2, 3, 4]);
    assert!(claim_all(&store, at(1_000_000)).await.is_empty());
    assert_eq!(summary(&store, &id).await.status, WorkflowStatus::Completed);
}

/// A keyed append is written at most once per key, at the end, whatever the last sequence.
pub async fn keyed_append_at_most_once_per_key(store: Arc<dyn Store>) {
    let id = start(&store, "keys", at(0)).await;
    let sig = |n| KeyedAppend {
        key: Some("signal-1".into()),
        events: vec![signal(at(n), n)],
        owed: OwedChanges::none().set(workflow_task(at(n))),
        ..KeyedAppend::default()
    };
    assert_eq!(
        keyed(&store, &id, sig(1)).await,
        KeyedOutcome::Appended(Seq(2))
    );
    assert_eq!(keyed(&store, &id, sig(2)).await, KeyedOutcome::Duplicate);
    // A used key wins over a missing requirement.
    let dup_and_not_owed = KeyedAppend {
        requires: Some("t:77".into()),
        requires_deadline: None,
        ..sig(3)
    };
    assert_eq!(
        keyed(&store, &id, dup_and_not_owed).await,
        KeyedOutcome::Duplicate
    );
    let other = KeyedAppend {
        key: Some("signal-2".into()),
        ..sig(4)
    };
    assert_eq!(
        keyed(&store, &id, other).await,
        KeyedOutcome::Appended(Seq(3))
    );
    // Without a key there is no deduplication.
    for expected in [4, 5] {
        let unkeyed = KeyedAppend {
            key: None,
            ..sig(5)
        };
        assert_eq!(
            keyed(&store, &id, unkeyed).await,
            KeyedOutcome::Appended(Seq(expected))
        );
    }
    let events = all_events(&store, &id).await;
    assert_eq!(seqs(&events), vec![1, 2, 3, 4, 5]);
    assert_eq!(events[1].data, signal(at(1), 1).data);
    assert_eq!(events[2].data, signal(at(4), 4).data);
    // Keys are per workflow.
    let other_wf = start(&store, "keys", at(0)).await;
    assert_eq!(
        keyed(&store, &other_wf, sig(1)).await,
        KeyedOutcome::Appended(Seq(2))
    );
}

/// A keyed append with `requires` is written only while that owed entry exists, and consumes it.
pub async fn keyed_append_requires_and_consumes_owed_entry(store: Arc<dyn Store>) {
    let id = start(&store, "activity", at(0)).await;
    let seq = store
        .append(
            &id,
            Seq(1),
            vec![
                ev(at(1), EventData::WorkflowTaskCompleted {}),
                ev(
                    at(1),
                    EventData::ActivityScheduled {
                        activity_id: 1,
                        name: "llm".into(),
                        input: json!("hi"),
                        options: ActivityOptions::default(),
                        task_queue: "tq".into(),
                    },
                ),
            ],
            OwedChanges::none().clear("wf").set(activity(1, 1, at(300))),
        )
        .await
        .expect("schedule");
    assert_eq!(seq, Seq(3));
    let result = |key: &str, requires: &str| KeyedAppend {
        key: Some(key.to_string()),
        requires: Some(requires.to_string()),
        requires_deadline: None,
        events: vec![ev(
            at(10),
            EventData::ActivityCompleted {
                activity_id: 1,
                attempt: 1,
                output: json!("hello"),
            },
        )],
        owed: OwedChanges::none().set(workflow_task(at(40))),
    };
    assert_eq!(
        keyed(&store, &id, result("r-late", "a:1:2")).await,
        KeyedOutcome::NotOwed
    );
    assert_eq!(seqs(&all_events(&store, &id).await), vec![1, 2, 3]);
    assert_eq!(
        keyed(&store, &id, result("r-1", "a:1:1")).await,
        KeyedOutcome::Appended(Seq(4))
    );
    // The entry is consumed: another result for the same attempt is not owed.
    assert_eq!(
        keyed(&store, &id, result("r-2", "a:1:1")).await,
        KeyedOutcome::NotOwed
    );
    // The key "r-late" was never recorded, since nothing was written.
    let late = KeyedAppend {
        requires: None,
        requires_deadline: None,
        ..result("r-late", "a:1:1")
    };
    assert_eq!(
        keyed(&store, &id, late).await,
        KeyedOutcome::Appended(Seq(5))
    );
    // The second result replaced `wf` due at 40 by one due at 40: a millisecond later.
    assert_eq!(
        claim_all(&store, at(1_000_000)).await,
        vec![Owed {
            workflow_id: id.clone(),
            entry: workflow_task(at(41)),
        }]
    );
    assert_eq!(summary(&store, &id).await.last_seq, Seq(5));
}

/// An entry replaced since a sweeper's claim by one due at the claim's lease end (new
/// input owed in the claim's millisecond) falls due a millisecond later, so that the
/// sweeper's append that requires the claimed deadline does not take it for the
/// claimed one.
pub async fn an_entry_replaced_since_the_claim_is_not_owed_at_the_claimed_deadline(
    store: Arc<dyn Store>,
) {
    let id = start(&store, "replaced", at(0)).await;
    let now = at(40_000);
    let until = now.plus(LEASE);
    assert_eq!(claim_all(&store, now).await.len(), 1);
    store
        .append(
            &id,
            Seq(1),
            vec![signal(now, 1)],
            OwedChanges::none().set(workflow_task(until)),
        )
        .await
        .expect("new input");
    let resend = KeyedAppend {
        key: None,
        requires: Some("wf".into()),
        requires_deadline: Some(until),
        events: Vec::new(),
        owed: OwedChanges::none().set(OwedEntry {
            kind: OwedKind::WorkflowTask { resends: 1 },
            ..workflow_task(now.plus(LEASE * 2))
        }),
    };
    assert_eq!(keyed(&store, &id, resend).await, KeyedOutcome::NotOwed);
    assert_eq!(
        claim_all(&store, until.plus(Duration::from_millis(1))).await,
        vec![Owed {
            workflow_id: id.clone(),
            entry: workflow_task(until.plus(Duration::from_millis(1))),
        }]
    );
}

/// A keyed append without events swaps owed work (the sweeper re-delivering an
/// activity attempt): it consumes `requires`, applies `owed` and writes no event.
pub async fn empty_keyed_append_swaps_owed_work(store: Arc<dyn Store>) {
    let id = start(&store, "redeliver", at(0)).await;
    store
        .append(
            &id,
            Seq(1),
            vec![ev(at(1), EventData::WorkflowTaskCompleted {})],
            OwedChanges::none().clear("wf").set(activity(1, 1, at(100))),
        )
        .await
        .expect("schedule");
    let before = summary(&store, &id).await;
    let swap = |deadline| KeyedAppend {
        key: None,
        requires: Some("a:1:1".into()),
        requires_deadline: None,
        events: Vec::new(),
        owed: OwedChanges::none().set(activity(1, 1, deadline)),
    };
    assert_eq!(
        keyed(&store, &id, swap(at(500))).await,
        KeyedOutcome::Appended(Seq(2))
    );
    assert_eq!(seqs(&all_events(&store, &id).await), vec![1, 2]);
    let after = summary(&store, &id).await;
    assert_eq!(after.last_seq, Seq(2));
    assert_eq!(after.status, before.status);
    // The entry now falls due at the new deadline, not the old one.
    assert!(claim_all(&store, at(200)).await.is_empty());
    assert_eq!(
        claim_all(&store, at(500)).await,
        vec![Owed {
            workflow_id: id.clone(),
            entry: activity(1, 1, at(500)),
        }]
    );
    // A swap that requires a missing entry writes nothing.
    assert_eq!(
        keyed(
            &store,
            &id,
            KeyedAppend {
                requires: Some("a:9:9".into()),
                requires_deadline: None,
                ..swap(at(900))
            }
        )
        .await,
        KeyedOutcome::NotOwed
    );
}

/// `start_attempt` marks an owed activity attempt started by one copy of its task and
/// moves its deadline; another copy is told it runs while that deadline stands, and
/// so is a redelivery of another copy; the queue's redelivery of the copy that marked
/// it takes it over; once the deadline has passed any copy may start it; a start at
/// the deadline the entry has already moves it a millisecond on; the sweeper's claim
/// returns the mark, and a keyed append that requires the claimed deadline is refused
/// once a start moved it; a missing entry, a timer, a finished or unknown workflow
/// owe nothing.
pub async fn start_attempt_marks_and_dedupes(store: Arc<dyn Store>) {
    let id = start(&store, "start", at(0)).await;
    store
        .append(
            &id,
            Seq(1),
            vec![ev(at(1), EventData::WorkflowTaskCompleted {})],
            OwedChanges::none()
                .clear("wf")
                .set(activity(1, 1, at(100)))
                .set(timer(1, at(500_000))),
        )
        .await
        .expect("schedule");
    let start_at = |copy, now, deadline, redelivered| {
        let (store, id) = (store.clone(), id.clone());
        async move {
            store
                .start_attempt(&id, "a:1:1", copy, at(now), at(deadline), redelivered)
                .await
                .expect("start_attempt")
        }
    };
    let running = |since| AttemptStart::Running { since: at(since) };
    assert_eq!(start_at(0, 90, 1_090, false).await, AttemptStart::Started);
    // The deadline moved: nothing is overdue at the old one.
    assert!(claim_all(&store, at(500)).await.is_empty());
    // Another copy does not run while that start stands, even delivered again...
    assert_eq!(start_at(1, 95, 1_095, false).await, running(90));
    assert_eq!(start_at(1, 95, 1_095, true).await, running(90));
    // ... but the queue's redelivery of the copy that started it takes over.
    assert_eq!(start_at(0, 96, 1_096, true).await, AttemptStart::Started);
    assert_eq!(start_at(0, 97, 1_097, false).await, running(96));
    // Past the deadline, the start is stale: any copy marks it anew.
    assert_eq!(
        start_at(1, 1_097, 2_097, false).await,
        AttemptStart::Started
    );
    let marked = marked_activity(at(2_097), at(1_097), 1);
    assert_eq!(
        claim_all(&store, at(2_097)).await,
        vec![Owed {
            workflow_id: id.clone(),
            entry: marked,
        }]
    );
    // Claimed by the sweeper (its lease is the deadline now): still running.
    let until = 2_097 + LEASE.as_millis() as u64;
    assert_eq!(start_at(2, 2_098, 3_098, false).await, running(1_097));
    // A take-over at exactly the claimed deadline moves it on by a millisecond, so
    // the sweeper's append that requires the claimed deadline is refused.
    assert_eq!(start_at(1, 2_099, until, true).await, AttemptStart::Started);
    let resend = |deadline: u64| KeyedAppend {
        key: None,
        requires: Some("a:1:1".into()),
        requires_deadline: Some(at(deadline)),
        events: Vec::new(),
        owed: OwedChanges::none().set(activity(1, 1, at(900_000))),
    };
    assert_eq!(
        keyed(&store, &id, resend(until)).await,
        KeyedOutcome::NotOwed
    );
    assert!(claim_all(&store, at(until)).await.is_empty());
    assert!(matches!(
        keyed(&store, &id, resend(until + 1)).await,
        KeyedOutcome::Appended(_)
    ));
    // Not owed: another attempt, a timer's key, an unknown workflow.
    for (id, key) in [
        (id.clone(), "a:1:2"),
        (id.clone(), "t:1"),
        (WorkflowId::random(), "a:1:1"),
    ] {
        let answer = store
            .start_attempt(&id, key, 0, at(1), at(2), true)
            .await
            .expect("start_attempt");
        assert_eq!(answer, AttemptStart::NotOwed, "{key}");
    }
    // The result consumes the entry as any other; then it is not owed.
    record_first_result(&store, &id, at(3_000)).await;
    assert_eq!(start_at(0, 3_001, 4_000, true).await, AttemptStart::NotOwed);
    // The timer is untouched by all of it.
    assert_eq!(
        claim_all(&store, at(500_000)).await,
        vec![Owed {
            workflow_id: id.clone(),
            entry: timer(1, at(500_000)),
        }]
    );
    // A finished workflow owes nothing.
    store
        .append_keyed(
            &id,
            KeyedAppend {
                events: vec![completed(at(500_001))],
                ..KeyedAppend::default()
            },
        )
        .await
        .expect("complete");
    assert_eq!(
        start_at(0, 500_002, 600_000, true).await,
        AttemptStart::NotOwed
    );
}

/// `extend_attempt` moves the deadline of an attempt marked started only for the
/// execution that marked it (its copy and start time), and says whether the
/// workflow's cancellation was requested: an unmarked attempt, another copy or
/// another start (a take-over) is not owed and nothing moves; an extension to the
/// deadline the entry has moves it a millisecond on, so a sweeper's append that
/// requires its claimed deadline is refused; it may also bring the deadline nearer;
/// a timer's key, another attempt, an unknown workflow, a consumed entry and a
/// finished workflow owe nothing.
pub async fn extend_attempt_moves_only_its_own_mark(store: Arc<dyn Store>) {
    let id = start(&store, "extend", at(0)).await;
    store
        .append(
            &id,
            Seq(1),
            vec![ev(at(1), EventData::WorkflowTaskCompleted {})],
            OwedChanges::none()
                .clear("wf")
                .set(activity(1, 1, at(100)))
                .set(timer(1, at(900_000))),
        )
        .await
        .expect("schedule");
    let extend = |copy, started, deadline| {
        let (store, id) = (store.clone(), id.clone());
        async move {
            store
                .extend_attempt(&id, "a:1:1", copy, at(started), at(deadline))
                .await
                .expect("extend_attempt")
        }
    };
    let extended = AttemptExtend::Extended {
        cancel_requested: false,
    };
    // Not marked started yet: nothing to extend, and it still falls due at 100.
    assert_eq!(extend(0, 0, 5_000).await, AttemptExtend::NotOwed);
    assert_eq!(
        store
            .start_attempt(&id, "a:1:1", 2, at(90), at(1_090), false)
            .await
            .expect("start_attempt"),
        AttemptStart::Started
    );
    assert_eq!(extend(2, 90, 2_000).await, extended);
    assert!(claim_all(&store, at(1_999)).await.is_empty());
    // Another copy, or another start of this copy, moves nothing.
    assert_eq!(extend(0, 90, 9_000).await, AttemptExtend::NotOwed);
    assert_eq!(extend(2, 91, 9_000).await, AttemptExtend::NotOwed);
    // The same deadline again moves it a millisecond on.
    assert_eq!(extend(2, 90, 2_000).await, extended);
    assert!(claim_all(&store, at(2_000)).await.is_empty());
    let marked = marked_activity(at(2_001), at(90), 2);
    assert_eq!(
        claim_all(&store, at(2_001)).await,
        vec![Owed {
            workflow_id: id.clone(),
            entry: marked.clone(),
        }]
    );
    // Claimed (due at the lease's end): a heartbeat at exactly that deadline moves it
    // on, and the sweeper's give-up that requires the claimed deadline is refused.
    let until = 2_001 + LEASE.as_millis() as u64;
    assert_eq!(extend(2, 90, until).await, extended);
    let give_up = KeyedAppend {
        key: None,
        requires: Some("a:1:1".into()),
        requires_deadline: Some(at(until)),
        events: Vec::new(),
        owed: OwedChanges::none().set(activity(1, 2, at(900_000))),
    };
    assert_eq!(keyed(&store, &id, give_up).await, KeyedOutcome::NotOwed);
    // An extension may bring the deadline nearer: it is set, not only pushed on.
    assert_eq!(extend(2, 90, 3_000).await, extended);
    assert_eq!(
        claim_all(&store, at(3_000)).await,
        vec![Owed {
            workflow_id: id.clone(),
            entry: activity_with_deadline(&marked, at(3_000)),
        }]
    );
    // The workflow's cancel request comes with the answer.
    let cancel = KeyedAppend {
        key: Some("cancel".into()),
        events: vec![ev(at(3_001), EventData::CancelRequested { reason: None })],
        ..KeyedAppend::default()
    };
    assert!(matches!(
        keyed(&store, &id, cancel).await,
        KeyedOutcome::Appended(_)
    ));
    assert_eq!(
        extend(2, 90, 10_000).await,
        AttemptExtend::Extended {
            cancel_requested: true
        }
    );
    // A take-over (the queue's redelivery of copy 2) is another start: the lost
    // execution's heartbeats no longer extend it, the new one's do.
    assert_eq!(
        store
            .start_attempt(&id, "a:1:1", 2, at(4_000), at(14_000), true)
            .await
            .expect("start_attempt"),
        AttemptStart::Started
    );
    assert_eq!(extend(2, 90, 20_000).await, AttemptExtend::NotOwed);
    assert!(claim_all(&store, at(13_999)).await.is_empty());
    assert!(matches!(
        extend(2, 4_000, 20_000).await,
        AttemptExtend::Extended { .. }
    ));
    // Not owed: a timer's key, another attempt, an unknown workflow.
    for (id, key) in [
        (id.clone(), "t:1"),
        (id.clone(), "a:1:2"),
        (WorkflowId::random(), "a:1:1"),
    ] {
        let answer = store
            .extend_attempt(&id, key, 2, at(4_000), at(30_000))
            .await
            .expect("extend_attempt");
        assert_eq!(answer, AttemptExtend::NotOwed, "{key}");
    }
    // The result consumes the entry: then it is not owed.
    record_first_result(&store, &id, at(5_000)).await;
    assert_eq!(extend(2, 4_000, 30_000).await, AttemptExtend::NotOwed);
    // The timer is untouched by all of it.
    assert_eq!(
        claim_all(&store, at(900_000)).await,
        vec![Owed {
            workflow_id: id.clone(),
            entry: timer(1, at(900_000)),
        }]
    );
    // A finished workflow owes nothing, also an attempt marked started.
    let id = start(&store, "extend-closed", at(0)).await;
    store
        .append(
            &id,
            Seq(1),
            vec![ev(at(1), EventData::WorkflowTaskCompleted {})],
            OwedChanges::none().clear("wf").set(activity(1, 1, at(100))),
        )
        .await
        .expect("schedule");
    assert_eq!(
        store
            .start_attempt(&id, "a:1:1", 0, at(10), at(1_000), false)
            .await
            .expect("start_attempt"),
        AttemptStart::Started
    );
    assert!(matches!(
        keyed(
            &store,
            &id,
            KeyedAppend {
                events: vec![completed(at(20))],
                ..KeyedAppend::default()
            }
        )
        .await,
        KeyedOutcome::Appended(_)
    ));
    assert_eq!(
        store
            .extend_attempt(&id, "a:1:1", 0, at(10), at(2_000))
            .await
            .expect("extend_attempt"),
        AttemptExtend::NotOwed
    );
}

/// Attempt 1 of activity 1 due at `deadline`, marked started at `started` by copy `copy`.
fn marked_activity(deadline: Timestamp, started: Timestamp, copy: u32) -> OwedEntry {
    let mut marked = activity(1, 1, deadline);
    if let OwedKind::Activity {
        started: at,
        started_copy,
        ..
    } = &mut marked.kind
    {
        *at = Some(started);
        *started_copy = copy;
    }
    marked
}

/// `entry` with deadline `deadline`.
fn activity_with_deadline(entry: &OwedEntry, deadline: Timestamp) -> OwedEntry {
    OwedEntry {
        deadline,
        ..entry.clone()
    }
}

/// A keyed terminal append clears owed work; later keyed appends report `Closed`, but a
/// repeat of a recorded key stays a `Duplicate` (a signal's retry after it finished the workflow).
pub async fn keyed_append_closed_after_terminal(store: Arc<dyn Store>) {
    let id = start(&store, "cancel", at(0)).await;
    let r = keyed(
        &store,
        &id,
        KeyedAppend {
            key: Some("cancel".into()),
            requires: Some("wf".into()),
            requires_deadline: None,
            events: vec![
                ev(at(1), EventData::CancelRequested { reason: None }),
                ev(
                    at(2),
                    EventData::WorkflowCanceled {
                        error: WorkflowError::canceled(None),
                    },
                ),
            ],
            owed: OwedChanges::none().set(timer(1, at(5))),
        },
    )
    .await;
    assert_eq!(r, KeyedOutcome::Appended(Seq(3)));
    assert!(claim_all(&store, at(1_000_000)).await.is_empty());
    let s = summary(&store, &id).await;
    assert_eq!(s.status, WorkflowStatus::Canceled);
    assert_eq!(s.closed_at, Some(at(2)));
    for key in [Some("cancel"), Some("new"), None] {
        let r = keyed(
            &store,
            &id,
            KeyedAppend {
                key: key.map(Into::into),
                events: vec![signal(at(3), 3)],
                ..KeyedAppend::default()
            },
        )
        .await;
        let want = if key == Some("cancel") {
            KeyedOutcome::Duplicate
        } else {
            KeyedOutcome::Closed
        };
        assert_eq!(r, want, "key {key:?}");
    }
    assert_eq!(seqs(&all_events(&store, &id).await), vec![1, 2, 3]);
}

/// The summary follows the events: status, output, error, cancel, task failure, times, last sequence.
pub async fn summary_follows_events(store: Arc<dyn Store>) {
    let id = start(&store, "summary", at(0)).await;
    let seq = store
        .append(
            &id,
            Seq(1),
            vec![ev(
                at(1),
                EventData::WorkflowTaskFailed {
                    kind: "non_determinism".into(),
                    message: "boom".into(),
                },
            )],
            OwedChanges::none(),
        )
        .await
        .expect("append");
    let s = summary(&store, &id).await;
    assert_eq!(s.task_failure.as_deref(), Some("non_determinism: boom"));
    assert_eq!((s.last_seq, s.updated_at), (seq, at(1)));
    assert_eq!((s.status, s.closed_at), (WorkflowStatus::Running, None));

    let r = keyed(
        &store,
        &id,
        KeyedAppend {
            key: Some("cancel".into()),
            events: vec![ev(
                at(2),
                EventData::CancelRequested {
                    reason: Some("user".into()),
                },
            )],
            ..KeyedAppend::default()
        },
    )
    .await;
    assert_eq!(r, KeyedOutcome::Appended(Seq(3)));
    let s = summary(&store, &id).await;
    assert!(s.cancel_requested);
    assert_eq!(s.task_failure.as_deref(), Some("non_determinism: boom"));
    assert_eq!((s.last_seq, s.updated_at), (Seq(3), at(2)));

    store
        .append(
            &id,
            Seq(3),
            vec![ev(at(3), EventData::WorkflowTaskCompleted {})],
            OwedChanges::none(),
        )
        .await
        .expect("append");
    let s = summary(&store, &id).await;
    assert_eq!(s.task_failure, None);
    assert!(s.cancel_requested);

    let error = WorkflowError::new("it broke").with_kind("error");
    store
        .append(
            &id,
            Seq(4),
            vec![ev(
                at(4),
                EventData::WorkflowFailed {
                    error: error.clone(),
                },
            )],
            OwedChanges::none(),
        )
        .await
        .expect("append");
    let s = summary(&store, &id).await;
    assert_eq!(s.status, WorkflowStatus::Failed);
    assert_eq!(s.error, Some(error));
    assert_eq!(s.output, None);
    assert_eq!(
        (s.closed_at, s.updated_at, s.last_seq),
        (Some(at(4)), at(4), Seq(5))
    );
    assert_eq!(s.created_at, at(0));

    let done = start(&store, "summary", at(10)).await;
    store
        .append(
            &done,
            Seq(1),
            vec![
                ev(at(11), EventData::WorkflowTaskCompleted {}),
                completed(at(12)),
            ],
            OwedChanges::none(),
        )
        .await
        .expect("complete");
    let s = summary(&store, &done).await;
    assert_eq!(s.status, WorkflowStatus::Completed);
    assert_eq!(s.output, Some(json!({"answer": 42})));
    assert_eq!(
        (s.error, s.closed_at, s.last_seq),
        (None, Some(at(12)), Seq(3))
    );

    let canceled = start(&store, "summary", at(20)).await;
    let error = WorkflowError::canceled(Some("user"));
    store
        .append(
            &canceled,
            Seq(1),
            vec![ev(
                at(21),
                EventData::WorkflowCanceled {
                    error: error.clone(),
                },
            )],
            OwedChanges::none(),
        )
        .await
        .expect("cancel");
    let s = summary(&store, &canceled).await;
    assert_eq!(s.status, WorkflowStatus::Canceled);
    assert_eq!((s.error, s.closed_at), (Some(error), Some(at(21))));
}

/// `claim_overdue` returns only overdue entries, in deadline order, and leases them.
pub async fn claim_overdue_leases_entries(store: Arc<dyn Store>) {
    let a = start(&store, "claims", at(0)).await;
    let b = start(&store, "claims", at(0)).await;
    let c = start(&store, "claims", at(0)).await;
    for (id, deadline) in [(&a, at(20)), (&b, at(10)), (&c, at(10_000_000))] {
        store
            .append(
                id,
                Seq(1),
                vec![],
                OwedChanges::none().set(workflow_task(deadline)),
            )
            .await
            .expect("set deadline");
    }
    let now = at(20);
    let claimed = store.claim_overdue(now, LEASE, 10).await.expect("claim");
    assert_eq!(
        claimed,
        vec![
            Owed {
                workflow_id: b.clone(),
                entry: workflow_task(at(10)),
            },
            Owed {
                workflow_id: a.clone(),
                entry: workflow_task(at(20)),
            },
        ]
    );
    assert!(
        store
            .claim_overdue(now, LEASE, 10)
            .await
            .expect("claim")
            .is_empty(),
        "claimed entries are leased"
    );
    let just_before = Timestamp(now.plus(LEASE).0 - 1);
    assert!(
        store
            .claim_overdue(just_before, LEASE, 10)
            .await
            .expect("claim")
            .is_empty()
    );
    let later = now.plus(LEASE);
    let mut again = store.claim_overdue(later, LEASE, 10).await.expect("claim");
    again.sort_by(|x, y| x.workflow_id.cmp(&y.workflow_id));
    let mut expected = vec![
        Owed {
            workflow_id: a.clone(),
            entry: workflow_task(later),
        },
        Owed {
            workflow_id: b.clone(),
            entry: workflow_task(later),
        },
    ];
    expected.sort_by(|x, y| x.workflow_id.cmp(&y.workflow_id));
    assert_eq!(
        again, expected,
        "after the lease the entries are overdue again"
    );
    // `limit` caps a claim, earliest deadline first.
    let far = at(20_000_000);
    let one = store.claim_overdue(far, LEASE, 1).await.expect("claim");
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].entry.deadline, later.plus(LEASE));
    let rest = store.claim_overdue(far, LEASE, 10).await.expect("claim");
    assert_eq!(rest.len(), 2);
    assert!(rest.iter().any(|o| o.workflow_id == c));
}

/// Owed entries are set, replaced and cleared by appends, and consumed by keyed appends.
pub async fn owed_entries_follow_appends(store: Arc<dyn Store>) {
    let id = start(&store, "owed", at(0)).await;
    let seq = store
        .append(
            &id,
            Seq(1),
            vec![
                ev(at(1), EventData::WorkflowTaskCompleted {}),
                ev(
                    at(1),
                    EventData::TimerStarted {
                        timer_id: 1,
                        fire_at: at(500),
                    },
                ),
            ],
            OwedChanges::none()
                .clear("wf")
                .set(timer(1, at(400)))
                .set(timer(1, at(500)))
                .set(timer(2, at(700))),
        )
        .await
        .expect("append");
    assert_eq!(seq, Seq(3));
    assert!(
        claim_all(&store, at(499)).await.is_empty(),
        "wf cleared, timer replaced"
    );
    assert_eq!(
        claim_all(&store, at(500)).await,
        vec![Owed {
            workflow_id: id.clone(),
            entry: timer(1, at(500)),
        }]
    );
    // The timer fires: its entry is consumed and a workflow task is owed.
    let fired = KeyedAppend {
        key: Some("t:1".into()),
        requires: Some("t:1".into()),
        requires_deadline: None,
        events: vec![ev(at(501), EventData::TimerFired { timer_id: 1 })],
        owed: OwedChanges::none().set(workflow_task(at(600))),
    };
    assert_eq!(
        keyed(&store, &id, fired).await,
        KeyedOutcome::Appended(Seq(4))
    );
    let seq = store
        .append(
            &id,
            Seq(4),
            vec![],
            OwedChanges::none().clear("t:2").clear("nope"),
        )
        .await
        .expect("clear");
    assert_eq!(seq, Seq(4));
    assert_eq!(
        claim_all(&store, at(1_000_000)).await,
        vec![Owed {
            workflow_id: id.clone(),
            entry: workflow_task(at(600)),
        }]
    );
}

/// A due timer claimed by two concurrent claimants goes to exactly one of them.
pub async fn due_timer_goes_to_one_claimant(store: Arc<dyn Store>) {
    const TIMERS: u32 = 20;
    let mut expected = BTreeSet::new();
    for i in 0..TIMERS {
        let id = start(&store, "timers", at(0)).await;
        store
            .append(
                &id,
                Seq(1),
                vec![ev(
                    at(1),
                    EventData::TimerStarted {
                        timer_id: i,
                        fire_at: at(50),
                    },
                )],
                OwedChanges::none().clear("wf").set(timer(i, at(50))),
            )
            .await
            .expect("start timer");
        expected.insert((id.to_string(), i));
    }
    let barrier = Arc::new(Barrier::new(2));
    let mut set = JoinSet::new();
    for _ in 0..2 {
        let (store, barrier) = (store.clone(), barrier.clone());
        set.spawn(async move {
            barrier.wait().await;
            let mut got = Vec::new();
            // Small claims interleave the two claimants.
            for _ in 0..TIMERS {
                got.extend(
                    store
                        .claim_overdue(at(100), LEASE, 3)
                        .await
                        .expect("claim_overdue"),
                );
            }
            got
        });
    }
    let mut all = Vec::new();
    while let Some(joined) = set.join_next().await {
        all.extend(joined.expect("claimant"));
    }
    let claimed: Vec<_> = all
        .iter()
        .map(|o| match o.entry.kind {
            OwedKind::Timer { timer_id } => (o.workflow_id.to_string(), timer_id),
            ref k => panic!("unexpected entry {k:?}"),
        })
        .collect();
    assert_eq!(
        claimed.len(),
        expected.len(),
        "each timer claimed exactly once"
    );
    assert_eq!(claimed.into_iter().collect::<BTreeSet<_>>(), expected);
}

/// Completes `id` (at sequence `last`) at `ts`.
async fn complete(store: &Arc<dyn Store>, id: &WorkflowId, last: Seq, ts: Timestamp) {
    store
        .append(id, last, vec![completed(ts)], OwedChanges::none())
        .await
        .expect("complete");
}

async fn list_ids(store: &Arc<dyn Store>, query: ListQuery) -> Vec<WorkflowId> {
    let page = store.list(&query).await.expect("list");
    assert_eq!(page.next_cursor, None, "one page expected");
    page.items.into_iter().map(|s| s.id).collect()
}

/// `list` filters by status and name, newest first by creation time then id.
pub async fn list_filters_by_status_and_name(store: Arc<dyn Store>) {
    let a1 = start(&store, "alpha", at(1)).await;
    let a2 = start(&store, "alpha", at(2)).await;
    let a3 = start(&store, "alpha", at(3)).await;
    let b1 = start(&store, "beta", at(4)).await;
    let b2 = start(&store, "beta", at(5)).await;
    complete(&store, &a2, Seq(1), at(6)).await;
    complete(&store, &b2, Seq(1), at(7)).await;
    let q = |status: Option<WorkflowStatus>, name: Option<&str>| ListQuery {
        status,
        name: name.map(Into::into),
        cursor: None,
        limit: 50,
    };
    assert_eq!(
        list_ids(&store, q(None, None)).await,
        vec![b2.clone(), b1.clone(), a3.clone(), a2.clone(), a1.clone()]
    );
    assert_eq!(
        list_ids(&store, q(None, Some("alpha"))).await,
        vec![a3.clone(), a2.clone(), a1.clone()]
    );
    assert_eq!(
        list_ids(&store, q(Some(WorkflowStatus::Completed), None)).await,
        vec![b2.clone(), a2.clone()]
    );
    assert_eq!(
        list_ids(&store, q(Some(WorkflowStatus::Running), Some("alpha"))).await,
        vec![a3.clone(), a1.clone()]
    );
    assert!(
        list_ids(&store, q(Some(WorkflowStatus::Failed), None))
            .await
            .is_empty()
    );
    assert!(list_ids(&store, q(None, Some("gamma"))).await.is_empty());
    let page = store.list(&q(None, Some("beta"))).await.expect("list");
    assert_eq!(page.items[0], summary(&store, &b2).await);

    // Equal creation times are ordered by id, descending.
    let same1 = start(&store, "tie", at(9)).await;
    let same2 = start(&store, "tie", at(9)).await;
    let mut expected = vec![same1, same2];
    expected.sort();
    expected.reverse();
    assert_eq!(list_ids(&store, q(None, Some("tie"))).await, expected);
}

/// Pages through `query`, calling `between(page_no)` after each page but the
/// last and completing the workflows it returns (if still running).
async fn page_through(
    store: &Arc<dyn Store>,
    mut query: ListQuery,
    mut between: impl FnMut(usize) -> Vec<WorkflowId>,
) -> Vec<WorkflowSummary> {
    let mut out = Vec::new();
    for page_no in 0.. {
        assert!(page_no < 100, "paging does not end");
        let page = store.list(&query).await.expect("list");
        assert!(page.items.len() <= query.limit);
        out.extend(page.items);
        let Some(cursor) = page.next_cursor else {
            break;
        };
        query.cursor = Some(cursor);
        for id in between(page_no) {
            let s = summary(store, &id).await;
            if s.status == WorkflowStatus::Running {
                complete(store, &id, s.last_seq, at(1_000)).await;
            }
        }
    }
    out
}

/// Paging with `next_cursor` returns every workflow exactly once, newest first.
pub async fn list_pages_cover_everything_once(store: Arc<dyn Store>) {
    let mut ids = Vec::new();
    for i in 0..25u64 {
        // Several workflows share a creation time.
        ids.push(start(&store, "many", at(i / 3)).await);
    }
    let items = page_through(
        &store,
        ListQuery {
            limit: 7,
            ..ListQuery::default()
        },
        |_| Vec::new(),
    )
    .await;
    let keys: Vec<_> = items.iter().map(|s| (s.created_at, s.id.clone())).collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.reverse();
    sorted.dedup();
    assert_eq!(keys, sorted, "strictly newest first, no duplicates");
    let got: HashSet<_> = items.into_iter().map(|s| s.id).collect();
    assert_eq!(got, ids.into_iter().collect::<HashSet<_>>());

    let exact = page_through(
        &store,
        ListQuery {
            limit: 5,
            ..ListQuery::default()
        },
        |_| Vec::new(),
    )
    .await;
    assert_eq!(exact.len(), 25);
}

/// Paging stays exact while other workflows change status between pages.
pub async fn list_paging_is_stable_while_status_changes(store: Arc<dyn Store>) {
    let mut ids = Vec::new();
    for i in 0..20u64 {
        ids.push(start(&store, "churn", at(i)).await);
    }
    // Newest first: ids[19] is on the first page. Between pages, finish one
    // workflow already listed and one not yet listed.
    let unfiltered = page_through(
        &store,
        ListQuery {
            limit: 4,
            ..ListQuery::default()
        },
        |page_no| vec![ids[19 - page_no].clone(), ids[page_no].clone()],
    )
    .await;
    let got: Vec<_> = unfiltered.iter().map(|s| s.id.clone()).collect();
    assert_eq!(got.len(), 20, "every workflow exactly once: {got:?}");
    assert_eq!(got.iter().collect::<HashSet<_>>().len(), 20);

    // With a status filter: every workflow that stays running is listed once.
    let mut finished: Vec<WorkflowId> = Vec::new();
    let mut more = Vec::new();
    for i in 0..20u64 {
        more.push(start(&store, "churn2", at(100 + i)).await);
    }
    let running = page_through(
        &store,
        ListQuery {
            status: Some(WorkflowStatus::Running),
            name: Some("churn2".into()),
            limit: 3,
            cursor: None,
        },
        |page_no| {
            // Finish a workflow that may or may not have been listed yet.
            let id = more[(page_no * 7) % 20].clone();
            finished.push(id.clone());
            vec![id]
        },
    )
    .await;
    let listed: Vec<_> = running.iter().map(|s| s.id.clone()).collect();
    assert_eq!(
        listed.iter().collect::<HashSet<_>>().len(),
        listed.len(),
        "no duplicates"
    );
    for id in &more {
        if !finished.contains(id) {
            assert!(
                listed.contains(id),
                "{id} stayed running and must be listed"
            );
        }
    }
}

/// A page stops at about [`LIST_PAGE_BYTES`](crate::store::LIST_PAGE_BYTES) of
/// summaries' JSON (at least one), whatever `limit` allows, and paging still returns
/// every workflow once, newest first (before, 1,000 summaries with outputs of up to
/// 2 MiB were read into one page of gigabytes).
pub async fn list_pages_stop_at_their_byte_budget(store: Arc<dyn Store>) {
    use crate::store::LIST_PAGE_BYTES;
    let big = "x".repeat(1_500_000);
    let mut ids = Vec::new();
    for i in 0..6u64 {
        let id = start(&store, "heavy", at(i)).await;
        store
            .append(
                &id,
                Seq(1),
                vec![ev(
                    at(10 + i),
                    EventData::WorkflowCompleted { output: json!(big) },
                )],
                OwedChanges::none(),
            )
            .await
            .expect("complete");
        ids.push(id);
    }
    // A small one, listed with the big ones: its page is not cut below it.
    ids.push(start(&store, "heavy", at(6)).await);
    let mut query = ListQuery {
        name: Some("heavy".into()),
        limit: 100,
        ..ListQuery::default()
    };
    let mut listed = Vec::new();
    let mut pages = 0;
    loop {
        assert!(pages < 20, "paging does not end");
        let page = store.list(&query).await.expect("list");
        pages += 1;
        assert!(!page.items.is_empty(), "a page holds at least one summary");
        let bytes: usize = page.items.iter().map(crate::json_len).sum();
        assert!(
            page.items.len() == 1 || bytes <= LIST_PAGE_BYTES,
            "a page of {} summaries, {bytes} bytes",
            page.items.len()
        );
        listed.extend(page.items.into_iter().map(|s| s.id));
        match page.next_cursor {
            Some(c) => query.cursor = Some(c),
            None => break,
        }
    }
    ids.reverse();
    assert_eq!(listed, ids, "every workflow once, newest first");
    assert!(pages >= 3, "{pages} pages for 9 MB of outputs");
}

/// A cursor the store did not issue is rejected.
pub async fn list_rejects_invalid_cursor(store: Arc<dyn Store>) {
    start(&store, "cursor", at(0)).await;
    let r = store
        .list(&ListQuery {
            cursor: Some("definitely not a cursor!".into()),
            ..ListQuery::default()
        })
        .await;
    assert!(matches!(r, Err(StoreError::InvalidCursor(_))), "{r:?}");
}

/// `subscribe` yields events appended later by others, in order, and ends after a terminal one.
pub async fn subscribe_sees_live_events_and_ends(store: Arc<dyn Store>) {
    let id = start(&store, "live", at(0)).await;
    let stream = store.subscribe(&id, Seq::ZERO).await.expect("subscribe");
    let tail = store.subscribe(&id, Seq(2)).await.expect("subscribe");
    let writer = {
        let (store, id) = (store.clone(), id.clone());
        tokio::spawn(async move {
            for n in 0..3u64 {
                tokio::task::yield_now().await;
                let r = store
                    .append_keyed(
                        &id,
                        KeyedAppend {
                            key: Some(format!("s{n}")),
                            events: vec![signal(at(n + 1), n)],
                            ..KeyedAppend::default()
                        },
                    )
                    .await
                    .expect("append_keyed");
                assert_eq!(r, KeyedOutcome::Appended(Seq(n + 2)));
            }
            store
                .append(&id, Seq(4), vec![completed(at(9))], OwedChanges::none())
                .await
                .expect("complete");
        })
    };
    let events: Vec<Event> = tokio::time::timeout(STREAM_TIMEOUT, stream.collect::<Vec<_>>())
        .await
        .expect("the stream ends after the terminal event")
        .into_iter()
        .map(|e| e.expect("stream item"))
        .collect();
    writer.await.expect("writer");
    assert_eq!(events, all_events(&store, &id).await);
    assert_eq!(seqs(&events), vec![1, 2, 3, 4, 5]);
    let tail: Vec<Event> = tokio::time::timeout(STREAM_TIMEOUT, tail.collect::<Vec<_>>())
        .await
        .expect("the tail stream ends")
        .into_iter()
        .map(|e| e.expect("stream item"))
        .collect();
    assert_eq!(seqs(&tail), vec![3, 4, 5]);
    assert!(tail[2].data.is_terminal());
}

/// `subscribe` on a finished workflow yields the rest of its history and ends.
pub async fn subscribe_to_finished_workflow_replays_tail(store: Arc<dyn Store>) {
    let id = start(&store, "done", at(0)).await;
    store
        .append(
            &id,
            Seq(1),
            vec![signal(at(1), 1), signal(at(2), 2), completed(at(3))],
            OwedChanges::none(),
        )
        .await
        .expect("append");
    let all = all_events(&store, &id).await;
    assert_eq!(collect_stream(&store, &id, Seq(2)).await, all[2..].to_vec());
    assert_eq!(collect_stream(&store, &id, Seq::ZERO).await, all);
    assert!(collect_stream(&store, &id, Seq(4)).await.is_empty());
}

/// `purge_closed` removes only workflows closed before the cutoff, with all they own.
pub async fn purge_removes_only_old_closed_workflows(store: Arc<dyn Store>) {
    let key = format!("key-{}", WorkflowId::random());
    let old = NewWorkflow {
        idempotency_key: Some(key.clone()),
        ..new_workflow("purge", at(0))
    };
    store.create(old.clone()).await.expect("create");
    let old = old.id;
    keyed(
        &store,
        &old,
        KeyedAppend {
            key: Some("sig".into()),
            events: vec![signal(at(50), 1)],
            ..KeyedAppend::default()
        },
    )
    .await;
    complete(&store, &old, Seq(2), at(100)).await;
    let recent = start(&store, "purge", at(1)).await;
    complete(&store, &recent, Seq(1), at(300)).await;
    let running = start(&store, "purge", at(2)).await;
    store
        .append(
            &running,
            Seq(1),
            vec![],
            OwedChanges::none().set(timer(1, at(5))),
        )
        .await
        .expect("set timer");

    assert_eq!(store.purge_closed(at(200), 100).await.expect("purge"), 1);
    assert_eq!(store.get(&old).await.expect("get"), None);
    assert!(matches!(
        store.read(&old, Seq::ZERO, 10).await,
        Err(StoreError::NotFound(_))
    ));
    assert!(store.get(&recent).await.expect("get").is_some());
    assert_eq!(
        summary(&store, &running).await.status,
        WorkflowStatus::Running
    );
    let listed: Vec<_> = store
        .list(&ListQuery::default())
        .await
        .expect("list")
        .items
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(listed, vec![running.clone(), recent.clone()]);
    // The idempotency key and the dedupe keys went with it.
    let reuse = NewWorkflow {
        idempotency_key: Some(key),
        ..new_workflow("purge", at(400))
    };
    let created = store.create(reuse.clone()).await.expect("create");
    assert!(created.created);
    assert_eq!(created.summary.id, reuse.id);

    // Closed exactly at the cutoff is not "before" it.
    assert_eq!(store.purge_closed(at(300), 100).await.expect("purge"), 0);
    assert_eq!(store.purge_closed(at(301), 100).await.expect("purge"), 1);
    assert_eq!(store.get(&recent).await.expect("get"), None);
    assert_eq!(
        store.purge_closed(at(1_000_000), 100).await.expect("purge"),
        0
    );
    assert_eq!(
        summary(&store, &running).await.status,
        WorkflowStatus::Running
    );
    let owed = claim_all(&store, at(1_000_000)).await;
    assert!(
        owed.iter()
            .any(|o| o.workflow_id == running && o.entry == timer(1, at(5)))
    );
    assert!(
        owed.iter()
            .all(|o| o.workflow_id != old && o.workflow_id != recent)
    );
}

/// A conditional append without events changes owed work only, and is still conditional.
pub async fn empty_append_changes_owed_work_only(store: Arc<dyn Store>) {
    let id = start(&store, "cas", at(0)).await;
    let before = summary(&store, &id).await;
    let seq = store
        .append(
            &id,
            Seq(1),
            vec![],
            OwedChanges::none().clear("wf").set(timer(7, at(5))),
        )
        .await
        .expect("empty append");
    assert_eq!(seq, Seq(1));
    assert_eq!(summary(&store, &id).await, before);
    assert_eq!(seqs(&all_events(&store, &id).await), vec![1]);
    let r = store
        .append(
            &id,
            Seq::ZERO,
            vec![],
            OwedChanges::none().set(workflow_task(at(1))),
        )
        .await;
    assert!(
        matches!(r, Err(StoreError::Conflict { actual: Seq(1), .. })),
        "{r:?}"
    );
    assert_eq!(
        claim_all(&store, at(1_000_000)).await,
        vec![Owed {
            workflow_id: id,
            entry: timer(7, at(5)),
        }]
    );
}
