//! Values at the engine's depth limit, runs recorded before the limit existed, and
//! the closed-run shortcut when an id is used again in the same millisecond.

mod common;

use common::*;
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, EventData, NewEvent, NewWorkflow,
    OutgoingMessage, OwedChanges, OwedEntry, OwedKind, Seq, Task, Timestamp, WorkflowContext,
    WorkflowId, WorkflowStatus,
};
use serde_json::{Value, json};
use std::time::Duration;

/// A run recorded by the previous version: its code called an activity with a
/// 101-level input, which that version scheduled (and a store reads back: the
/// event adds 2 levels). After the upgrade, the replay of that run must still
/// match its history; the run must go on and complete.
#[tokio::test(start_paused = true)]
async fn a_run_recorded_before_the_depth_limit_still_replays() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow(
            "deep_call",
            |ctx: WorkflowContext, depth: usize| async move {
                let _: Value = ctx.activity("echo", &wrap(json!("leaf"), depth)).await?;
                Ok(json!("done"))
            },
        )
        .activity("echo", |_ctx: ActivityContext, v: Value| async move {
            Ok::<_, ActivityError>(v)
        })
        .build();
    // The history the previous version recorded, up to the activity's result.
    let id = WorkflowId::random();
    let now = engine.now();
    store
        .create(NewWorkflow {
            id: id.clone(),
            name: "deep_call".into(),
            input: json!(101),
            task_queue: "default".into(),
            idempotency_key: None,
            started_at: now,
            task_deadline: now.plus(Duration::from_secs(10)),
            trace_context: None,
        })
        .await
        .unwrap();
    let scheduled = vec![
        NewEvent::new(now, EventData::WorkflowTaskCompleted {}),
        NewEvent::new(
            now,
            EventData::ActivityScheduled {
                activity_id: 1,
                name: "echo".into(),
                input: wrap(json!("leaf"), 101),
                options: ActivityOptions::default(),
                task_queue: "default".into(),
            },
        ),
    ];
    let last = store
        .append(&id, Seq(1), scheduled, OwedChanges::none().clear("wf"))
        .await
        .unwrap();
    let result = vec![
        NewEvent::new(
            now,
            EventData::ActivityStarted {
                activity_id: 1,
                attempt: 1,
            },
        ),
        NewEvent::new(
            now,
            EventData::ActivityCompleted {
                activity_id: 1,
                attempt: 1,
                output: json!("ok"),
            },
        ),
    ];
    let owed = OwedEntry {
        kind: OwedKind::WORKFLOW_TASK,
        task_queue: "default".into(),
        deadline: now.plus(Duration::from_secs(10)),
        trace_context: None,
        run: None,
    };
    store
        .append(&id, last, result, OwedChanges::none().set(owed))
        .await
        .unwrap();
    queue
        .enqueue(
            "default",
            vec![OutgoingMessage::now(Task::workflow(id.clone()))],
        )
        .await
        .unwrap();
    let w = worker(&engine);
    let s = engine.result(&id, Duration::from_secs(60)).await.unwrap();
    let h = history(&engine, &id).await;
    let failures: Vec<String> = h
        .iter()
        .filter_map(|e| match &e.data {
            EventData::WorkflowTaskFailed { kind, message } => Some(format!("{kind}: {message}")),
            _ => None,
        })
        .collect();
    assert!(
        failures.is_empty(),
        "the upgrade broke the run: {failures:?}"
    );
    assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
    w.shutdown().await;
    let _ = Timestamp(0);
}

/// A clock that stands still (two things in one millisecond).
struct StillClock(Timestamp);

impl marathon_core::Clock for StillClock {
    fn now(&self) -> Timestamp {
        self.0
    }
}

/// Runs the hand queue's tasks until none is left.
async fn drain(engine: &marathon_core::Engine, queue: &HandQueue) {
    loop {
        let next = {
            let mut p = queue.pending.lock();
            if p.is_empty() {
                None
            } else {
                Some(p.remove(0))
            }
        };
        let Some((q, task)) = next else { return };
        engine.handle(&q, task).await.unwrap();
    }
}

/// Retention removed a closed run and the id was started again within the same
/// millisecond: the new run has the old run's `created_at`, and the closing
/// replica's memory of closed runs must not swallow the new run's tasks.
#[tokio::test]
async fn a_new_run_of_an_id_is_not_taken_for_the_closed_one() {
    let store: std::sync::Arc<dyn marathon_core::Store> =
        std::sync::Arc::new(marathon_core::memory::MemoryStore::default());
    let hand = std::sync::Arc::new(HandQueue::default());
    let queue: std::sync::Arc<dyn marathon_core::Queue> = hand.clone();
    let engine = marathon_core::Engine::builder()
        .store(store.clone())
        .queue(queue)
        .clock(std::sync::Arc::new(StillClock(Timestamp(
            1_800_000_000_000,
        ))))
        .workflow("echo", |ctx: WorkflowContext, v: Value| async move {
            ctx.activity::<_, Value>("echo", &v).await
        })
        .activity("echo", |_ctx: ActivityContext, v: Value| async move {
            Ok::<_, ActivityError>(v)
        })
        .build();
    let id = WorkflowId::parse("reused").unwrap();
    let start = || marathon_core::StartWorkflow::new("echo", json!(1)).id(id.clone());
    assert!(engine.start(start()).await.unwrap().created);
    drain(&engine, &hand).await;
    assert_eq!(
        engine.get(&id).await.unwrap().status,
        WorkflowStatus::Completed
    );
    assert_eq!(
        store.purge_closed(Timestamp(u64::MAX), 10).await.unwrap(),
        1
    );
    assert!(
        engine.start(start()).await.unwrap().created,
        "the id is free again"
    );
    drain(&engine, &hand).await;
    let s = engine.get(&id).await.unwrap();
    assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
}

/// Deepest value `make(d)` that reads back, by serde_json, when wrapped by `make`.
fn deepest(make: impl Fn(Value) -> String, parse: impl Fn(&str) -> bool) -> usize {
    (1..200)
        .take_while(|d| parse(&make(wrap(json!(1), *d))))
        .last()
        .unwrap()
}

#[test]
fn a_value_at_the_depth_limit_reads_back_in_tasks_and_events() {
    use marathon_core::{ActivityCall, ActivityTask, Event};
    let call = |v: Value| {
        serde_json::to_string(&Task::Activity(ActivityTask {
            workflow_id: WorkflowId::random(),
            activity_id: 1,
            attempt: 1,
            scheduled_seq: Seq(2),
            workflow_task_queue: "q".into(),
            call: Some(ActivityCall {
                name: "a".into(),
                input: v,
                options: ActivityOptions::default(),
                scheduled_at: Timestamp(0),
            }),
            run: None,
            deadline: None,
            copy: 0,
        }))
        .unwrap()
    };
    let tail = |v: Value| {
        serde_json::to_string(&Task::Workflow {
            workflow_id: WorkflowId::random(),
            tail: vec![Event {
                seq: Seq(3),
                timestamp: Timestamp(0),
                data: EventData::ActivityFailed {
                    activity_id: 1,
                    attempt: 1,
                    error: ActivityError::permanent("x").with_details(v),
                },
            }],
            run: None,
        })
        .unwrap()
    };
    let scheduled = |v: Value| {
        serde_json::to_string(&Event {
            seq: Seq(2),
            timestamp: Timestamp(0),
            data: EventData::ActivityScheduled {
                activity_id: 1,
                name: "a".into(),
                input: v,
                options: ActivityOptions::default(),
                task_queue: "q".into(),
            },
        })
        .unwrap()
    };
    let task_ok = |s: &str| serde_json::from_str::<Task>(s).is_ok();
    let event_ok = |s: &str| serde_json::from_str::<Event>(s).is_ok();
    // A value at the limit reads back wherever it travels: as a queued activity's
    // input, as error details one level inside `activity_failed` in a task's tail,
    // as a recorded call's input (125, 122 and 125 levels when this was written).
    let max = marathon_core::MAX_VALUE_DEPTH;
    assert!(deepest(call, task_ok) >= max);
    assert!(deepest(tail, task_ok) > max);
    assert!(deepest(scheduled, event_ok) >= max);
}

/// An activity's error details at the limit are recorded; a workflow that passes
/// the failure on (`?`) keeps them (the engine's `activity_failed` wrapper adds a
/// level of its own, still far from what a store can read back).
#[tokio::test(start_paused = true)]
async fn details_at_the_limit_survive_the_activity_failed_wrapper() {
    let max = marathon_core::MAX_VALUE_DEPTH;
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("pass_on", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, Value>("fail", &()).await
        })
        .activity("fail", move |_ctx: ActivityContext, (): ()| async move {
            Err::<Value, _>(ActivityError::permanent("no").with_details(wrap(json!(1), max)))
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "pass_on", json!(null)).await;
    let s = finished(&engine, &id).await;
    w.shutdown().await;
    let error = s.error.expect("failed");
    let last = error
        .activity_error()
        .unwrap_or_else(|| panic!("no activity error in {error:?}"));
    assert_eq!(last.details, Some(wrap(json!(1), max)));
}

/// Values larger than `MAX_PAYLOAD_BYTES` as JSON never reach a history: a start's
/// input and a signal's payload are refused, an activity's output fails the attempt
/// for good (`invalid_output`, no retry), and a workflow's output or an activity
/// input its code makes fails the run. Before, any size was recorded, and every
/// later task and events page carried it.
#[tokio::test(start_paused = true)]
async fn values_larger_than_the_payload_limit_are_not_recorded() {
    fn big() -> Value {
        json!("x".repeat(marathon_core::MAX_PAYLOAD_BYTES))
    }
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow(
            "echo_big",
            |ctx: WorkflowContext, what: String| async move {
                match what.as_str() {
                    "output" => {
                        let r: Result<Value, _> = ctx.activity("big", &()).await;
                        Ok(json!(r.map_err(|e| {
                            e.activity_error().map(|a| (a.kind, a.retryable))
                        })))
                    }
                    "input" => ctx.activity::<_, Value>("echo", &big()).await,
                    _ => Ok(big()),
                }
            },
        )
        .workflow("wait", |ctx: WorkflowContext, (): ()| async move {
            ctx.signal::<Value>("go").await
        })
        .activity("big", |_ctx: ActivityContext, (): ()| async move {
            Ok::<_, ActivityError>(json!("y".repeat(marathon_core::MAX_PAYLOAD_BYTES)))
        })
        .activity("echo", |_ctx: ActivityContext, v: Value| async move {
            Ok::<_, ActivityError>(v)
        })
        .build();
    let w = worker(&engine);

    let refused = engine
        .start(marathon_core::StartWorkflow::new("wait", big()))
        .await
        .expect_err("a start with a too large input is refused");
    assert!(
        matches!(&refused, marathon_core::EngineError::InvalidArgument(m) if m.contains("bytes")),
        "{refused:?}"
    );
    // A mistyped input is quoted in the error only in part.
    let mistyped = engine
        .start(marathon_core::StartWorkflow::new(
            "wait",
            json!("x".repeat(100_000)),
        ))
        .await
        .expect_err("a mistyped input is refused");
    assert!(
        mistyped.to_string().len() < 1000,
        "the error quotes {} bytes",
        mistyped.to_string().len()
    );
    let waiting = start(&engine, "wait", json!(null)).await;
    let refused = engine
        .signal(&waiting, "go", big(), None)
        .await
        .expect_err("a too large signal is refused");
    assert!(
        matches!(&refused, marathon_core::EngineError::InvalidArgument(m) if m.contains("bytes")),
        "{refused:?}"
    );

    let id = start(&engine, "echo_big", json!("output")).await;
    let s = finished(&engine, &id).await;
    assert_eq!(
        s.output,
        Some(json!({"Err": ["invalid_output", false]})),
        "{s:?}"
    );
    let attempts = history(&engine, &id)
        .await
        .iter()
        .filter(|e| matches!(e.data, EventData::ActivityStarted { .. }))
        .count();
    assert!(attempts <= 1, "not retried: {attempts} attempts");

    for (what, kind) in [("input", "invalid_argument"), ("run", "invalid_output")] {
        let id = start(&engine, "echo_big", json!(what)).await;
        let s = finished(&engine, &id).await;
        assert_eq!(s.status, WorkflowStatus::Failed, "{what}: {s:?}");
        assert_eq!(
            s.error.as_ref().map(|e| e.kind.as_str()),
            Some(kind),
            "{what}: {s:?}"
        );
        let recorded = serde_json::to_vec(&history(&engine, &id).await)
            .expect("json")
            .len();
        assert!(
            recorded < marathon_core::MAX_PAYLOAD_BYTES,
            "{what}: {recorded} bytes recorded"
        );
    }
    w.shutdown().await;
}

/// An agent loop that never ends (an activity per turn, forever) is failed once its
/// history would grow past `max_history_events`, with kind `history_limit` and a
/// message naming the setting; its history stops within the limit plus the closing
/// events. A run that finishes under the limit is untouched. Before, such a loop grew
/// its history, and every replay of it, without end.
#[tokio::test(start_paused = true)]
async fn a_runaway_loop_is_failed_at_the_history_limit() {
    let (store, queue) = backends();
    let limit = 40;
    let engine = builder(&store, &queue)
        .config(marathon_core::EngineConfig {
            max_history_events: limit,
            ..marathon_core::EngineConfig::default()
        })
        .workflow("runaway", |ctx: WorkflowContext, turns: u32| async move {
            let mut n = 0u32;
            while n < turns {
                n = ctx.activity("think", &n).await?;
            }
            Ok(json!(n))
        })
        .activity("think", |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n + 1)
        })
        .build();
    let w = worker(&engine);
    let forever = start(&engine, "runaway", json!(u32::MAX)).await;
    let short = start(&engine, "runaway", json!(3)).await;
    let failed = finished(&engine, &forever).await;
    let done = finished(&engine, &short).await;
    w.shutdown().await;
    assert_eq!(failed.status, WorkflowStatus::Failed);
    let error = failed.error.expect("an error");
    assert_eq!(error.kind, marathon_core::HISTORY_LIMIT);
    assert!(
        error.message.contains("engine.max_history_events"),
        "{}",
        error.message
    );
    let events = history(&engine, &forever).await;
    // Each turn records a marker, the call, its start and its result (the last two
    // by the activity's worker, between workflow tasks); the step that would have
    // scheduled the next call records its marker and the failure instead.
    assert!(
        events.len() as u64 > limit && events.len() as u64 <= limit + 4,
        "{} events: {:?}",
        events.len(),
        types(&events)
    );
    assert_eq!(
        count(&events, |d| matches!(
            d,
            EventData::WorkflowTaskFailed { .. }
        )),
        0
    );
    assert_eq!(done.status, WorkflowStatus::Completed);
    assert_eq!(done.output, Some(json!(3)));
}

/// Errors and progress are bounded like other values: an activity error's message
/// past `MAX_ERROR_MESSAGE_BYTES` is cut and its details past `MAX_PAYLOAD_BYTES`
/// dropped, each saying so; a workflow's own error likewise; progress data past
/// `MAX_PAYLOAD_BYTES` is refused to the activity. Before, only their depth was
/// checked: a provider's 10 MB error page was recorded in each retry's event, in the
/// workflow's failure, in every events page and task that carried them.
#[tokio::test(start_paused = true)]
async fn errors_and_progress_larger_than_the_limits_are_bounded() {
    let huge = || "e".repeat(marathon_core::MAX_ERROR_MESSAGE_BYTES * 4);
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("fails", |ctx: WorkflowContext, what: String| async move {
            match what.as_str() {
                "activity" => ctx.activity::<_, Value>("page", &()).await,
                "progress" => ctx.activity::<_, Value>("chatty", &()).await,
                _ => Err(marathon_core::WorkflowError::new(
                    "w".repeat(marathon_core::MAX_ERROR_MESSAGE_BYTES * 4),
                )),
            }
        })
        .activity("page", move |_ctx: ActivityContext, (): ()| async move {
            Err::<Value, _>(
                ActivityError::permanent(huge())
                    .with_details(json!("d".repeat(marathon_core::MAX_PAYLOAD_BYTES + 1))),
            )
        })
        .activity("chatty", |ctx: ActivityContext, (): ()| async move {
            let r = ctx
                .progress(&"p".repeat(marathon_core::MAX_PAYLOAD_BYTES + 1))
                .await;
            Ok::<_, ActivityError>(json!(r.map_err(|e| e.kind)))
        })
        .build();
    let w = worker(&engine);
    let cut = |m: &str| {
        m.len() < marathon_core::MAX_ERROR_MESSAGE_BYTES + 1024
            && m.contains(&format!(
                "message cut from {} bytes",
                marathon_core::MAX_ERROR_MESSAGE_BYTES * 4
            ))
    };

    let id = start(&engine, "fails", json!("activity")).await;
    let s = finished(&engine, &id).await;
    let events = history(&engine, &id).await;
    let failed = events
        .iter()
        .find_map(|e| match &e.data {
            EventData::ActivityFailed { error, .. } => Some(error.clone()),
            _ => None,
        })
        .expect("activity_failed");
    assert!(cut(&failed.message), "{}", &failed.message[..200]);
    assert!(failed.details.is_none());
    assert!(
        failed.message.ends_with(&format!(
            "(details dropped: more than {} bytes as JSON)",
            marathon_core::MAX_PAYLOAD_BYTES
        )),
        "{}",
        &failed.message[failed.message.len() - 200..]
    );
    let error = s.error.expect("failed");
    assert!(error.message.len() < 2 * marathon_core::MAX_ERROR_MESSAGE_BYTES);
    assert_eq!(
        error.activity_error().map(|a| a.message),
        Some(failed.message.clone())
    );

    let id = start(&engine, "fails", json!("workflow")).await;
    let s = finished(&engine, &id).await;
    let error = s.error.expect("failed");
    assert!(cut(&error.message), "{}", &error.message[..200]);

    let id = start(&engine, "fails", json!("progress")).await;
    let s = finished(&engine, &id).await;
    w.shutdown().await;
    assert_eq!(s.output, Some(json!({"Err": "invalid_argument"})), "{s:?}");
    let events = history(&engine, &id).await;
    assert_eq!(
        count(&events, |d| matches!(d, EventData::Progress { .. })),
        0
    );
}

/// A cancel reason longer than `MAX_ERROR_MESSAGE_BYTES` is refused, nothing
/// recorded; one at the limit is recorded whole. Before, any length went into
/// `cancel_requested` and the run's `canceled` error.
#[tokio::test(start_paused = true)]
async fn a_cancel_reason_past_the_message_limit_is_refused() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("wait", |ctx: WorkflowContext, (): ()| async move {
            ctx.signal::<Value>("go").await
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "wait", json!(null)).await;
    let max = marathon_core::MAX_ERROR_MESSAGE_BYTES;
    let refused = engine
        .cancel(&id, Some("r".repeat(max + 1)))
        .await
        .expect_err("too long");
    assert!(
        matches!(&refused, marathon_core::EngineError::InvalidArgument(m) if m.contains("cancel reason")),
        "{refused:?}"
    );
    assert_eq!(
        count(&history(&engine, &id).await, |d| matches!(
            d,
            EventData::CancelRequested { .. }
        )),
        0
    );
    engine
        .cancel(&id, Some("r".repeat(max)))
        .await
        .expect("at the limit");
    let s = finished(&engine, &id).await;
    w.shutdown().await;
    assert_eq!(s.status, WorkflowStatus::Canceled);
}

/// A new call whose options cannot mean anything (a zero start-to-close,
/// schedule-to-close or heartbeat timeout, an empty task queue) fails the run with
/// `invalid_argument` naming the option, before anything is scheduled. Before, it was
/// scheduled: each attempt timed out at once, and with unlimited attempts it retried
/// forever (an empty task queue waited forever on the memory queue).
#[tokio::test(start_paused = true)]
async fn a_call_with_options_that_cannot_mean_anything_fails_the_run() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("call", |ctx: WorkflowContext, which: String| async move {
            let mut opts = ActivityOptions::default();
            opts.retry.maximum_attempts = 0;
            match which.as_str() {
                "start_to_close_ms" => opts.start_to_close = Duration::ZERO,
                "schedule_to_close_ms" => opts.schedule_to_close = Some(Duration::ZERO),
                "heartbeat_timeout_ms" => opts.heartbeat_timeout = Some(Duration::ZERO),
                _ => opts.task_queue = Some(String::new()),
            }
            ctx.activity_with::<_, Value>("echo", &json!(1), opts).await
        })
        .activity("echo", |_ctx: ActivityContext, v: Value| async move {
            Ok::<_, ActivityError>(v)
        })
        .build();
    let w = worker(&engine);
    for which in [
        "start_to_close_ms",
        "schedule_to_close_ms",
        "heartbeat_timeout_ms",
        "task_queue",
    ] {
        let id = start(&engine, "call", json!(which)).await;
        let s = finished(&engine, &id).await;
        let error = s.error.expect("failed");
        assert_eq!(error.kind, "invalid_argument", "{which}: {error:?}");
        assert!(error.message.contains(which), "{which}: {}", error.message);
        assert_eq!(
            count(&history(&engine, &id).await, |d| matches!(
                d,
                EventData::ActivityScheduled { .. }
            )),
            0,
            "{which}"
        );
    }
    w.shutdown().await;
}

/// An activity that streams more progress than the history has room for (an LLM
/// reply streamed a token per event) stops recording progress at 90 % of
/// `max_history_events` and the run goes on to complete. Before, every token was
/// appended, and the next workflow task failed the run with `history_limit`.
#[tokio::test(start_paused = true)]
async fn streaming_progress_does_not_fail_the_run_at_the_history_limit() {
    let (store, queue) = backends();
    let limit = 50;
    let engine = builder(&store, &queue)
        .config(marathon_core::EngineConfig {
            max_history_events: limit,
            ..marathon_core::EngineConfig::default()
        })
        .workflow("streams", |ctx: WorkflowContext, (): ()| async move {
            let first: u32 = ctx.activity("stream", &100u32).await?;
            let second: u32 = ctx.activity("stream", &10u32).await?;
            Ok(json!(first + second))
        })
        .activity("stream", |ctx: ActivityContext, tokens: u32| async move {
            for t in 0..tokens {
                ctx.progress(&json!({ "token": t })).await?;
            }
            Ok::<_, ActivityError>(tokens)
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "streams", json!(null)).await;
    let done = finished(&engine, &id).await;
    w.shutdown().await;
    let events = history(&engine, &id).await;
    assert_eq!(
        done.status,
        WorkflowStatus::Completed,
        "{:?}; {} events",
        done.error,
        events.len()
    );
    assert_eq!(done.output, Some(json!(110)));
    let progress = count(&events, |d| matches!(d, EventData::Progress { .. }));
    // The first attempt streams up to the cut-off (45 events in all) and one more
    // append finds it; the second attempt records one before it finds it too.
    assert!(
        (40..=47).contains(&progress),
        "{progress} progress events: {:?}",
        types(&events)
    );
    // The run's own events after the cut-off (result, markers, the second call, its
    // one progress, the close) take it a few past the limit, as closing events may.
    assert!(events.len() as u64 <= limit + 5, "{} events", events.len());
}
