//! Property: whatever order tasks are delivered in, however often, and on
//! whichever of two replicas, every activity completion is recorded exactly
//! once and the workflow ends with the same result.

mod common;

use common::HandQueue;
use futures::future::{Either, select};
use marathon_core::memory::MemoryStore;
use marathon_core::{
    ActivityContext, ActivityError, Engine, EventData, Seq, StartWorkflow, Store, Task, Timestamp,
    WorkflowContext, WorkflowId, WorkflowStatus,
};
use proptest::prelude::*;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

fn engine(store: &Arc<dyn Store>, queue: &Arc<HandQueue>, runs: &Arc<AtomicU32>) -> Engine {
    let runs = runs.clone();
    Engine::builder()
        .store(store.clone())
        .queue(queue.clone())
        .workflow("fan", |ctx: WorkflowContext, (): ()| async move {
            let (a, b) = futures::join!(
                ctx.activity::<_, u32>("double", &1u32),
                ctx.activity::<_, u32>("double", &2u32)
            );
            let c: u32 = ctx.activity("double", &(a? + b?)).await?;
            let d: u32 = ctx.activity("double", &c).await?;
            Ok(d)
        })
        .activity("double", move |_c: ActivityContext, x: u32| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ActivityError>(x * 2)
            }
        })
        .build()
}

/// One step of a schedule: which pending task, delivered on which replica, kept for a duplicate or not.
#[derive(Debug, Clone)]
struct Step {
    pick: usize,
    replica: bool,
    duplicate: bool,
}

fn step() -> impl Strategy<Value = Step> {
    (any::<usize>(), any::<bool>(), prop::bool::weighted(0.3)).prop_map(
        |(pick, replica, duplicate)| Step {
            pick,
            replica,
            duplicate,
        },
    )
}

async fn run_schedule(schedule: Vec<Step>) -> Result<(), TestCaseError> {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let queue = Arc::new(HandQueue::default());
    let runs = Arc::new(AtomicU32::new(0));
    let replicas = [engine(&store, &queue, &runs), engine(&store, &queue, &runs)];
    let id = replicas[0]
        .start(StartWorkflow::new("fan", json!(null)))
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .summary
        .id;
    let mut steps = schedule.into_iter();
    for _ in 0..500 {
        let next = {
            let mut pending = queue.pending.lock();
            if pending.is_empty() {
                break;
            }
            let s = steps.next().unwrap_or(Step {
                pick: 0,
                replica: false,
                duplicate: false,
            });
            let i = s.pick % pending.len();
            let task = if s.duplicate {
                pending[i].clone()
            } else {
                pending.remove(i)
            };
            (task, s.replica)
        };
        let ((q, task), replica) = next;
        replicas[usize::from(replica)]
            .handle(&q, task)
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    prop_assert!(queue.pending.lock().is_empty(), "deliveries never ran dry");
    let s = replicas[0]
        .get(&id)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(s.status, WorkflowStatus::Completed, "{:?}", s);
    prop_assert_eq!(s.output, Some(json!(24)));
    let events = store
        .read(&id, Seq::ZERO, 10_000)
        .await
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for (i, e) in events.iter().enumerate() {
        prop_assert_eq!(e.seq, Seq(i as u64 + 1));
    }
    for activity in 1..=4u32 {
        let completions = events
            .iter()
            .filter(|e| matches!(e.data, EventData::ActivityCompleted { activity_id, .. } if activity_id == activity))
            .count();
        prop_assert_eq!(
            completions,
            1,
            "activity {} completed {} times",
            activity,
            completions
        );
        let scheduled = events
            .iter()
            .filter(|e| matches!(e.data, EventData::ActivityScheduled { activity_id, .. } if activity_id == activity))
            .count();
        prop_assert_eq!(scheduled, 1);
    }
    prop_assert_eq!(events.iter().filter(|e| e.data.is_terminal()).count(), 1);
    prop_assert!(runs.load(Ordering::SeqCst) >= 4);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn duplicate_and_reordered_deliveries_never_double_record(schedule in prop::collection::vec(step(), 0..60)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(run_schedule(schedule))?;
    }
}

/// Delivers the oldest pending task to `engine`; false when none is pending.
async fn deliver_next(engine: &Engine, queue: &HandQueue) -> bool {
    let next = {
        let mut pending = queue.pending.lock();
        if pending.is_empty() {
            return false;
        }
        pending.remove(0)
    };
    engine.handle(&next.0, next.1).await.expect("task handled");
    true
}

/// A cancellation that reaches the workflow in the same task as the result it awaited
/// fails the next call, even when a timer the code had dropped (the losing side of a
/// `select`) was failed by it: the code never polled that timer, so it has not seen the
/// cancellation, and `ship` must not run.
#[tokio::test]
async fn a_cancel_that_arrives_with_a_result_fails_the_next_call_despite_a_dropped_timer() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let queue = Arc::new(HandQueue::default());
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let engine = Engine::builder()
        .store(store.clone())
        .queue(queue.clone())
        .workflow("shop", |ctx: WorkflowContext, (): ()| async move {
            let approval = Box::pin(ctx.signal::<bool>("approve"));
            let deadline = Box::pin(ctx.sleep(Duration::from_secs(86_400)));
            match select(approval, deadline).await {
                Either::Left((approved, _timer)) => approved?,
                Either::Right((timed_out, _)) => {
                    timed_out?;
                    false
                }
            };
            let charged: u32 = ctx.activity("double", &1u32).await?;
            let shipped: u32 = ctx.activity("double", &charged).await?;
            Ok(shipped)
        })
        .activity("double", move |_c: ActivityContext, x: u32| {
            let runs = counted.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ActivityError>(x * 2)
            }
        })
        .build();
    let id = engine
        .start(StartWorkflow::new("shop", json!(null)))
        .await
        .expect("start")
        .summary
        .id;
    // The first task starts the timer and waits for the signal.
    assert!(deliver_next(&engine, &queue).await);
    engine
        .signal(&id, "approve", json!(true), None)
        .await
        .expect("signal");
    // The signal's task: the signal wins, the timer future is dropped, `charge` is called.
    assert!(deliver_next(&engine, &queue).await);
    // `charge` runs; its result is recorded and owes a workflow task...
    assert!(deliver_next(&engine, &queue).await);
    // ...which runs only after the cancellation is recorded: one task sees both.
    engine.cancel(&id, None).await.expect("cancel");
    while deliver_next(&engine, &queue).await {}
    let s = engine.get(&id).await.expect("get");
    assert_eq!(s.status, WorkflowStatus::Canceled, "{s:?}");
    assert_eq!(runs.load(Ordering::SeqCst), 1, "only `charge` ran");
    let events = store.read(&id, Seq::ZERO, 1_000).await.expect("read");
    let scheduled = events
        .iter()
        .filter(|e| matches!(e.data, EventData::ActivityScheduled { .. }))
        .count();
    assert_eq!(scheduled, 1, "{events:#?}");
}

/// Once the code has seen its cancellation, a signal wait in its clean-up waits for the
/// signal like any wait (it failed at once before, so clean-up could never wait for,
/// say, an operator's confirmation).
#[tokio::test]
async fn clean_up_after_a_seen_cancel_waits_for_a_signal() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let queue = Arc::new(HandQueue::default());
    let engine = Engine::builder()
        .store(store.clone())
        .queue(queue.clone())
        .workflow("compensate", |ctx: WorkflowContext, (): ()| async move {
            match ctx.sleep(Duration::from_secs(3600)).await {
                Err(e) if e.is_canceled() => {
                    let ok: bool = ctx.signal("confirm_refund").await?;
                    Ok(json!({"refunded": ok}))
                }
                other => other.map(|()| json!(null)),
            }
        })
        .build();
    let id = engine
        .start(StartWorkflow::new("compensate", json!(null)))
        .await
        .expect("start")
        .summary
        .id;
    assert!(deliver_next(&engine, &queue).await, "starts the timer");
    engine.cancel(&id, None).await.expect("cancel");
    while deliver_next(&engine, &queue).await {}
    let s = engine.get(&id).await.expect("get");
    assert_eq!(
        s.status,
        WorkflowStatus::Running,
        "clean-up waits for the signal: {s:?}"
    );
    engine
        .signal(&id, "confirm_refund", json!(true), None)
        .await
        .expect("signal");
    while deliver_next(&engine, &queue).await {}
    let s = engine.get(&id).await.expect("get");
    assert_eq!(
        (s.status, s.output),
        (WorkflowStatus::Completed, Some(json!({"refunded": true})))
    );
}

/// A workflow id used again after retention removed its finished run: a replica that
/// still caches the old run (it ran an early task; another replica finished the run)
/// must not continue the new run from the old run's state (it recorded the old input's
/// result as the new run's), whether the task names its run or not (then the replica
/// asks the store).
async fn stale_cache_after_id_reuse(task_names_its_run: bool) {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let queue = Arc::new(HandQueue::default());
    let make = || {
        Engine::builder()
            .store(store.clone())
            .queue(queue.clone())
            .workflow("greet", |ctx: WorkflowContext, input: String| async move {
                let s: String = ctx.signal("go").await?;
                Ok(format!("{input}+{s}"))
            })
            .build()
    };
    let (a, b) = (make(), make());
    let id = WorkflowId::parse("order-1").expect("id");
    // The old run: replica A runs its first task (and caches it), B finishes it.
    a.start(StartWorkflow::new("greet", json!("old")).id(id.clone()))
        .await
        .expect("start");
    assert!(deliver_next(&a, &queue).await);
    a.signal(&id, "go", json!("x"), None).await.expect("signal");
    assert!(deliver_next(&b, &queue).await);
    assert_eq!(b.get(&id).await.expect("get").output, Some(json!("old+x")));
    // Retention removes it; the id starts a new run, whose first task B runs. (A run
    // is named by its creation time in ms: outside a test, retention keeps the two
    // runs far apart.)
    assert_eq!(
        store
            .purge_closed(Timestamp(u64::MAX), 10)
            .await
            .expect("purge"),
        1
    );
    tokio::time::sleep(Duration::from_millis(5)).await;
    let again = b
        .start(StartWorkflow::new("greet", json!("new")).id(id.clone()))
        .await
        .expect("start again");
    assert!(again.created);
    assert!(deliver_next(&b, &queue).await);
    // The signal's task reaches replica A, which still holds the old run.
    a.signal(&id, "go", json!("y"), None).await.expect("signal");
    let (name, mut task) = queue.pending.lock().remove(0);
    if !task_names_its_run && let Task::Workflow { run, .. } = &mut task {
        *run = None;
    }
    a.handle(&name, task).await.expect("handled");
    while deliver_next(&b, &queue).await {}
    let s = b.get(&id).await.expect("get");
    assert_eq!(
        (s.status, s.output),
        (WorkflowStatus::Completed, Some(json!("new+y")))
    );
}

#[tokio::test]
async fn a_cached_instance_of_a_removed_run_is_not_used_for_a_new_run() {
    stale_cache_after_id_reuse(true).await;
}

#[tokio::test]
async fn a_cached_instance_of_a_removed_run_is_not_used_when_the_task_does_not_name_its_run() {
    stale_cache_after_id_reuse(false).await;
}

/// A cancellation fails many pending calls at once; the branches of a `join_all` (which
/// polls woken futures in the order they were woken, past 30 of them) then each call a
/// clean-up activity. The clean-up calls must be issued in the same order on every
/// replay: before 2026-11-27 the pending calls were woken in `HashMap` order, which
/// differs between instances, so a replay from the history (no cache here) issued the
/// clean-up calls in another order; replay matches calls by name only, so each branch
/// silently got another branch's result (the output came back shuffled).
#[tokio::test]
async fn clean_up_after_a_cancel_of_a_wide_fan_out_replays_the_same() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let queue = Arc::new(HandQueue::default());
    let engine = Engine::builder()
        .store(store.clone())
        .queue(queue.clone())
        .config(marathon_core::EngineConfig {
            cache_capacity: 0,
            ..marathon_core::EngineConfig::default()
        })
        .workflow("fan", |ctx: WorkflowContext, (): ()| async move {
            let branches = (0..40u32).map(|i| {
                let ctx = ctx.clone();
                async move {
                    match ctx.activity::<_, u32>("work", &i).await {
                        Err(e) if e.is_canceled() => ctx.activity::<_, u32>("undo", &i).await,
                        other => other,
                    }
                }
            });
            let undone: Result<Vec<u32>, _> = futures::future::join_all(branches)
                .await
                .into_iter()
                .collect();
            undone
        })
        .activity("undo", |_c: ActivityContext, x: u32| async move {
            Ok::<_, ActivityError>(x)
        })
        .build();
    let id = engine
        .start(StartWorkflow::new("fan", json!(null)))
        .await
        .expect("start")
        .summary
        .id;
    assert!(
        deliver_next(&engine, &queue).await,
        "schedules the 40 calls"
    );
    // The 40 `work` calls stay in flight (their tasks are never delivered).
    queue
        .pending
        .lock()
        .retain(|(_, t)| matches!(t, Task::Workflow { .. }));
    engine.cancel(&id, None).await.expect("cancel");
    while deliver_next(&engine, &queue).await {}
    let s = engine.get(&id).await.expect("get");
    assert_eq!(s.task_failure, None, "{s:?}");
    assert_eq!(
        (s.status, s.output),
        (
            WorkflowStatus::Completed,
            Some(json!((0..40).collect::<Vec<u32>>()))
        )
    );
}

/// Runs workflow `pay` of id `id` to its end by hand; its output. The second attempt's
/// task is stripped of its run, as a message from an earlier version is.
async fn pay_run(engine: &Engine, queue: &HandQueue, id: &WorkflowId) -> serde_json::Value {
    let started = engine
        .start(StartWorkflow::new("pay", json!(null)).id(id.clone()))
        .await
        .expect("start");
    assert!(started.created);
    loop {
        let next = {
            let mut pending = queue.pending.lock();
            if pending.is_empty() {
                break;
            }
            pending.remove(0)
        };
        let (name, mut task) = next;
        if let Task::Activity(a) = &mut task
            && a.attempt == 2
        {
            a.run = None;
        }
        engine.handle(&name, task).await.expect("task handled");
    }
    let s = engine.get(id).await.expect("get");
    assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
    s.output.expect("output")
}

/// A workflow id used again once retention removed its run names a new run: its
/// activities get idempotency keys of their own (a provider that deduplicates on
/// the old run's key would answer with the old run's response) and `ctx.uuid()`
/// draws new values. Within one run both stay the same: on every attempt (also one
/// whose task does not name its run) and on every replay (no cache here). Before
/// 2026-11-27 the key was `{workflow_id}:{activity_id}` and the generator was seeded
/// by the id alone, so the new run repeated the old run's keys and UUIDs.
#[tokio::test]
async fn a_new_run_of_a_reused_id_gets_its_own_idempotency_keys_and_uuids() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::default());
    let queue = Arc::new(HandQueue::default());
    let keys = Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let seen = keys.clone();
    let engine = Engine::builder()
        .store(store.clone())
        .queue(queue.clone())
        .config(marathon_core::EngineConfig {
            cache_capacity: 0,
            ..marathon_core::EngineConfig::default()
        })
        .workflow("pay", |ctx: WorkflowContext, (): ()| async move {
            let uuid = ctx.uuid().to_string();
            let (echo, key): (String, String) = ctx.activity("charge", &uuid).await?;
            Ok(json!({"uuid": uuid, "echo": echo, "key": key}))
        })
        .activity("charge", move |c: ActivityContext, uuid: String| {
            let seen = seen.clone();
            async move {
                seen.lock().push(c.idempotency_key());
                if c.attempt() == 1 {
                    return Err(ActivityError::retryable("provider busy"));
                }
                Ok::<_, ActivityError>((uuid, c.idempotency_key()))
            }
        })
        .build();
    let id = WorkflowId::parse("order-7").expect("id");
    let old = pay_run(&engine, &queue, &id).await;
    assert_eq!(
        store
            .purge_closed(Timestamp(u64::MAX), 10)
            .await
            .expect("purge"),
        1
    );
    // A run is named by its creation time in ms (see `stale_cache_after_id_reuse`).
    tokio::time::sleep(Duration::from_millis(5)).await;
    let new = pay_run(&engine, &queue, &id).await;
    let keys = keys.lock().clone();
    assert_eq!(keys.len(), 4, "{keys:?}");
    for out in [&old, &new] {
        assert_eq!(out["uuid"], out["echo"], "replayed another uuid: {out}");
    }
    assert_eq!(keys[0], keys[1], "attempts of one call share a key");
    assert_eq!(keys[2], keys[3], "attempts of one call share a key");
    assert_eq!(old["key"], json!(keys[1]));
    assert_eq!(new["key"], json!(keys[3]));
    assert_ne!(
        old["key"], new["key"],
        "the new run reuses the old run's key"
    );
    assert_ne!(
        old["uuid"], new["uuid"],
        "the new run repeats the old run's uuid"
    );
}
