//! End-to-end behaviour of the engine on the in-memory backends: durability,
//! retries, timeouts, timers, signals, cancellation, idempotency, non-determinism.

mod common;

use common::*;
use futures::future::{Either, join_all, select};
use marathon_core::engine::pipeline::Step;
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, EventData, Pipeline, RetryPolicy,
    StartWorkflow, Worker, WorkflowContext, WorkflowError, WorkflowId, WorkflowStatus,
};
use parking_lot::Mutex;
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

fn fast_retry(max: u32) -> RetryPolicy {
    RetryPolicy {
        initial_interval: Duration::from_millis(100),
        backoff_coefficient: 2.0,
        maximum_interval: Duration::from_secs(1),
        maximum_attempts: max,
        non_retryable_kinds: vec!["bad_request".into()],
    }
}

async fn three_steps(ctx: WorkflowContext, n: i64) -> Result<i64, WorkflowError> {
    let a: i64 = ctx.activity("add", &(n, 1)).await?;
    let b: i64 = ctx.activity("add", &(a, 10)).await?;
    let c: i64 = ctx.activity("add", &(b, 100)).await?;
    Ok(c)
}

#[tokio::test(start_paused = true)]
async fn sequential_activities_complete_with_a_clean_history() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("three", three_steps)
        .activity("add", |_ctx: ActivityContext, (a, b): (i64, i64)| async move {
            Ok::<_, ActivityError>(a + b)
        })
        .build();
    let w = worker(&engine);
    let started = engine
        .start(StartWorkflow::new("three", json!(1)))
        .await
        .unwrap();
    let s = finished(&engine, &started.summary.id).await;
    assert_eq!(s.status, WorkflowStatus::Completed);
    assert_eq!(s.output, Some(json!(112)));
    let h = history(&engine, &s.id).await;
    assert_eq!(
        types(&h),
        [
            "workflow_started",
            "workflow_task_completed",
            "activity_scheduled",
            "activity_started",
            "activity_completed",
            "workflow_task_completed",
            "activity_scheduled",
            "activity_started",
            "activity_completed",
            "workflow_task_completed",
            "activity_scheduled",
            "activity_started",
            "activity_completed",
            "workflow_task_completed",
            "workflow_completed",
        ]
    );
    assert_eq!(s.last_seq, h.last().unwrap().seq);
    w.shutdown().await;
}

/// The first engine runs step 1, then dies while step 2 is running; a second
/// engine on the same store finishes the workflow without running step 1 again.
async fn survives_engine_loss(lose_queue: bool) {
    let (store, queue) = backends();
    let runs: Arc<[AtomicU32; 3]> = Arc::new(Default::default());
    let register = |hang_on_step_2: bool, runs: Arc<[AtomicU32; 3]>| {
        builder(&store, &queue)
            .workflow("steps", |ctx: WorkflowContext, (): ()| async move {
                let mut out = Vec::new();
                for i in 0..3u32 {
                    out.push(ctx.activity::<_, u32>("step", &i).await?);
                }
                Ok(out)
            })
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
    };
    let first = register(true, runs.clone()).build();
    let w1 = worker(&first);
    let id = start(&first, "steps", json!(null)).await;
    while runs[1].load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Crash: stop the worker without letting step 2 finish.
    let report = w1.shutdown().await;
    assert_eq!(report.handed_back, 1);
    drop(first);

    let second = if lose_queue {
        // A broker restart: the queue comes back empty; the store's owed work recovers it.
        let (_, empty) = backends();
        builder(&store, &empty)
    } else {
        register(false, runs.clone())
    };
    let second = if lose_queue {
        let runs = runs.clone();
        second
            .workflow("steps", |ctx: WorkflowContext, (): ()| async move {
                let mut out = Vec::new();
                for i in 0..3u32 {
                    out.push(ctx.activity::<_, u32>("step", &i).await?);
                }
                Ok(out)
            })
            .activity("step", move |_ctx: ActivityContext, i: u32| {
                let runs = runs.clone();
                async move {
                    runs[i as usize].fetch_add(1, Ordering::SeqCst);
                    Ok::<_, ActivityError>(i * 10)
                }
            })
            .build()
    } else {
        second.build()
    };
    let w2 = worker(&second);
    let s = finished(&second, &id).await;
    assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
    assert_eq!(s.output, Some(json!([0, 10, 20])));
    assert_eq!(
        runs[0].load(Ordering::SeqCst),
        1,
        "a completed activity ran again"
    );
    assert_eq!(runs[2].load(Ordering::SeqCst), 1);
    let h = history(&second, &id).await;
    assert_eq!(
        count(&h, |d| matches!(d, EventData::ActivityCompleted { .. })),
        3
    );
    w2.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_workflow_survives_its_engine_being_dropped() {
    survives_engine_loss(false).await;
}

#[tokio::test(start_paused = true)]
async fn a_workflow_survives_losing_the_queue_too() {
    survives_engine_loss(true).await;
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_and_honour_retry_after() {
    let (store, queue) = backends();
    let attempts = Arc::new(AtomicU32::new(0));
    let a = attempts.clone();
    let engine = builder(&store, &queue)
        .workflow("flaky", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity_with::<_, String>(
                "flaky",
                &(),
                ActivityOptions::default().retry(fast_retry(5)),
            )
            .await
        })
        .activity("flaky", move |ctx: ActivityContext, (): ()| {
            let a = a.clone();
            async move {
                a.fetch_add(1, Ordering::SeqCst);
                match ctx.attempt() {
                    1 | 2 => Err(ActivityError::retryable("503 from provider")),
                    3 => Err(ActivityError::retryable("429")
                        .with_kind("rate_limited")
                        .with_retry_after(Duration::from_secs(7))),
                    _ => Ok(format!("ok on attempt {}", ctx.attempt())),
                }
            }
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "flaky", json!(null)).await;
    let s = finished(&engine, &id).await;
    assert_eq!(s.output, Some(json!("ok on attempt 4")));
    assert_eq!(attempts.load(Ordering::SeqCst), 4);
    let h = history(&engine, &id).await;
    let delays: Vec<u64> = h
        .iter()
        .filter_map(|e| match &e.data {
            EventData::ActivityRetrying { delay_ms, .. } => Some(*delay_ms),
            _ => None,
        })
        .collect();
    assert_eq!(
        delays,
        [100, 200, 7000],
        "backoff, then the retry-after hint"
    );
    // The retry really waited: attempt 4 started at least 7.3 s after the start.
    let started4 = h
        .iter()
        .find(|e| matches!(e.data, EventData::ActivityStarted { attempt: 4, .. }))
        .unwrap();
    assert!(started4.timestamp.since(h[0].timestamp) >= Duration::from_millis(7300));
    w.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn non_retryable_errors_and_exhausted_attempts_fail_the_call() {
    let (store, queue) = backends();
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let engine = builder(&store, &queue)
        .workflow("wf", |ctx: WorkflowContext, kind: String| async move {
            let r = ctx
                .activity_with::<_, ()>(
                    "fail",
                    &kind,
                    ActivityOptions::default().retry(fast_retry(3)),
                )
                .await;
            let e = r.expect_err("the activity always fails");
            Ok(json!({"kind": e.kind, "inner": e.activity_error().map(|a| a.kind)}))
        })
        .activity("fail", move |_ctx: ActivityContext, kind: String| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Err::<(), _>(match kind.as_str() {
                    "permanent" => ActivityError::permanent("nope"),
                    "bad_request" => ActivityError::retryable("400").with_kind("bad_request"),
                    _ => ActivityError::retryable("flaky"),
                })
            }
        })
        .build();
    let w = worker(&engine);
    for (kind, expected_calls) in [("permanent", 1), ("bad_request", 1), ("flaky", 3)] {
        calls.store(0, Ordering::SeqCst);
        let id = start(&engine, "wf", json!(kind)).await;
        let s = finished(&engine, &id).await;
        assert_eq!(calls.load(Ordering::SeqCst), expected_calls, "{kind}");
        assert_eq!(s.output.unwrap()["kind"], "activity_failed");
        let h = history(&engine, &id).await;
        assert_eq!(
            count(&h, |d| matches!(d, EventData::ActivityFailed { .. })),
            1
        );
    }
    w.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn each_timeout_kind_fires() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow(
            "timeouts",
            |ctx: WorkflowContext, which: String| async move {
                let no_retry = RetryPolicy::no_retries();
                let opts = match which.as_str() {
                    "start_to_close" => ActivityOptions::default()
                        .retry(no_retry)
                        .start_to_close(Duration::from_secs(2)),
                    "heartbeat" => ActivityOptions::default()
                        .retry(no_retry)
                        .heartbeat_timeout(Duration::from_secs(1)),
                    _ => ActivityOptions::default()
                        .retry(fast_retry(0))
                        .start_to_close(Duration::from_secs(2))
                        .schedule_to_close(Duration::from_secs(5)),
                };
                let e = ctx
                    .activity_with::<_, ()>("slow", &which, opts)
                    .await
                    .expect_err("times out");
                Ok(e.activity_error().map(|a| a.kind))
            },
        )
        .activity("slow", |ctx: ActivityContext, which: String| async move {
            if which == "heartbeat" {
                // Heartbeats twice, then goes silent.
                for _ in 0..2 {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    ctx.heartbeat().await?;
                }
            }
            tokio::time::sleep(Duration::from_secs(3600)).await;
            Ok::<_, ActivityError>(())
        })
        .build();
    let w = worker(&engine);
    for which in ["start_to_close", "heartbeat", "schedule_to_close"] {
        let id = start(&engine, "timeouts", json!(which)).await;
        let s = finished(&engine, &id).await;
        assert_eq!(s.output, Some(json!(format!("timeout.{which}"))), "{which}");
        let h = history(&engine, &id).await;
        let span = h.last().unwrap().timestamp.since(h[0].timestamp);
        match which {
            "start_to_close" => {
                assert!(span >= Duration::from_secs(2) && span < Duration::from_secs(3))
            }
            "heartbeat" => assert!(span >= Duration::from_secs(2) && span < Duration::from_secs(3)),
            _ => {
                // Attempts of 2 s with short backoff until the 5 s budget runs out.
                assert!(
                    span >= Duration::from_secs(4) && span <= Duration::from_secs(6),
                    "{span:?}"
                );
                assert!(count(&h, |d| matches!(d, EventData::ActivityRetrying { .. })) >= 1);
            }
        }
    }
    w.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn durable_sleep_uses_workflow_time() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("nap", |ctx: WorkflowContext, secs: u64| async move {
            let before = ctx.now();
            ctx.sleep(Duration::from_secs(secs)).await?;
            Ok(ctx.now().since(before).as_secs())
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "nap", json!(600)).await;
    let s = finished(&engine, &id).await;
    assert!(s.output.unwrap().as_u64().unwrap() >= 600);
    let h = history(&engine, &id).await;
    assert_eq!(
        count(&h, |d| matches!(d, EventData::TimerStarted { .. })),
        1
    );
    assert_eq!(count(&h, |d| matches!(d, EventData::TimerFired { .. })), 1);
    w.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn signals_are_delivered_in_order_and_buffered() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("approval", |ctx: WorkflowContext, (): ()| async move {
            let first: String = ctx.signal("note").await?;
            let second: String = ctx.signal("note").await?;
            let ok: bool = ctx.signal("approve").await?;
            Ok(json!([first, second, ok]))
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "approval", json!(null)).await;
    // "approve" arrives before the workflow waits for it: it is buffered.
    engine
        .signal(&id, "approve", json!(true), None)
        .await
        .unwrap();
    engine
        .signal(&id, "note", json!("a"), Some("k1".into()))
        .await
        .unwrap();
    engine
        .signal(&id, "note", json!("a"), Some("k1".into()))
        .await
        .unwrap(); // duplicate key
    engine.signal(&id, "note", json!("b"), None).await.unwrap();
    let s = finished(&engine, &id).await;
    assert_eq!(s.output, Some(json!(["a", "b", true])));
    let h = history(&engine, &id).await;
    assert_eq!(
        count(&h, |d| matches!(d, EventData::SignalReceived { .. })),
        3
    );
    assert!(matches!(
        engine.signal(&id, "note", json!(1), None).await,
        Err(marathon_core::EngineError::Closed(_))
    ));
    w.shutdown().await;
}

async fn cancellation_reaches_running_activity(cross_replica: bool) {
    let (store, queue) = backends();
    let saw_cancel = Arc::new(AtomicU32::new(0));
    let make = |saw: Arc<AtomicU32>| {
        builder(&store, &queue)
            .workflow("long", |ctx: WorkflowContext, (): ()| async move {
                let opts = ActivityOptions::default().task_queue("activities");
                ctx.activity_with::<_, ()>("long", &(), opts).await?;
                Ok(())
            })
            .activity("long", move |ctx: ActivityContext, (): ()| {
                let saw = saw.clone();
                async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        if let Err(e) = ctx.heartbeat().await {
                            saw.fetch_add(1, Ordering::SeqCst);
                            return Err::<(), _>(e);
                        }
                    }
                }
            })
            .build()
    };
    let serve = |engine: &marathon_core::Engine, queue: &str| {
        let mut cfg = worker_config();
        cfg.queues = vec![marathon_core::QueueSpec::new(queue, 8)];
        Worker::start(engine.clone(), cfg)
    };
    // Workflow tasks and activities on different replicas when `cross_replica`.
    let workflows = make(saw_cancel.clone());
    let activities = if cross_replica {
        make(saw_cancel.clone())
    } else {
        workflows.clone()
    };
    let w1 = serve(&workflows, "default");
    let w2 = serve(&activities, "activities");
    let id = start(&workflows, "long", json!(null)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(w2.in_flight(), 1, "the activity is running");
    // Cancel through the replica that runs workflow tasks (never the activity's own
    // replica when `cross_replica`): the activity learns of it by heartbeat.
    workflows
        .cancel(&id, Some("user asked".into()))
        .await
        .unwrap();
    let s = finished(&workflows, &id).await;
    assert_eq!(s.status, WorkflowStatus::Canceled, "{s:?}");
    assert!(s.cancel_requested);
    assert_eq!(s.error.unwrap().kind, "canceled");
    tokio::time::timeout(Duration::from_secs(10), async {
        while w2.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("the activity stopped");
    if cross_replica {
        assert_eq!(
            saw_cancel.load(Ordering::SeqCst),
            1,
            "the heartbeat reported the cancellation"
        );
    }
    w1.shutdown().await;
    w2.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn cancellation_reaches_a_running_activity_locally() {
    cancellation_reaches_running_activity(false).await;
}

#[tokio::test(start_paused = true)]
async fn cancellation_reaches_a_running_activity_across_replicas() {
    cancellation_reaches_running_activity(true).await;
}

/// Clean-up work runs to the end: an activity the workflow calls after it has seen its
/// cancellation heartbeats without being told it is canceled (the workflow's summary
/// says cancel requested, but the request came before the call), and a repeated cancel
/// request does not stop it either.
#[tokio::test(start_paused = true)]
async fn a_clean_up_activity_is_not_canceled_by_the_cancellation_it_handles() {
    let (store, queue) = backends();
    let beats = Arc::new(AtomicU32::new(0));
    let b = beats.clone();
    let engine = builder(&store, &queue)
        .workflow("refund", |ctx: WorkflowContext, (): ()| async move {
            match ctx.sleep(Duration::from_secs(3600)).await {
                Err(e) if e.is_canceled() => {
                    let cleaned: i64 = ctx.activity("clean_up", &2).await?;
                    Ok(json!({"cleaned": cleaned}))
                }
                other => other.map(|()| json!(null)),
            }
        })
        .activity("clean_up", move |ctx: ActivityContext, n: i64| {
            let beats = b.clone();
            async move {
                // Long enough for several store checks (at most one a second).
                for _ in 0..15 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    ctx.heartbeat().await?;
                    beats.fetch_add(1, Ordering::SeqCst);
                }
                Ok::<_, ActivityError>(n)
            }
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "refund", json!(null)).await;
    wait_for_event(&engine, &id, "timer_started").await;
    engine.cancel(&id, None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(60), async {
        while beats.load(Ordering::SeqCst) < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the clean-up activity stopped: {:?}", beats));
    // A repeated request (deduplicated, the workflow still running) stops nothing.
    engine.cancel(&id, Some("again".into())).await.unwrap();
    let s = finished(&engine, &id).await;
    let h = history(&engine, &id).await;
    assert_eq!(
        (s.status, s.output.clone()),
        (WorkflowStatus::Completed, Some(json!({"cleaned": 2}))),
        "{s:?}\n{:?}",
        types(&h)
    );
    assert_eq!(beats.load(Ordering::SeqCst), 15);
    w.shutdown().await;
}

/// A cancel request repeated on the replica that runs the attempts (the first went
/// through another replica, and the attempt does not heartbeat) stops the attempt of
/// the call made before the request and leaves the clean-up called after it running.
#[tokio::test(start_paused = true)]
async fn a_repeated_cancel_stops_only_the_attempts_called_before_the_request() {
    let (store, queue) = backends();
    let long_stopped = Arc::new(AtomicU32::new(0));
    let release = Arc::new(tokio::sync::Notify::new());
    let make = |stopped: Arc<AtomicU32>, release: Arc<tokio::sync::Notify>| {
        builder(&store, &queue)
            .workflow("undo", |ctx: WorkflowContext, (): ()| async move {
                let on = || ActivityOptions::default().task_queue("activities");
                match ctx.activity_with::<_, ()>("long", &(), on()).await {
                    Err(e) if e.is_canceled() => {
                        let n: i64 = ctx.activity_with("clean", &(), on()).await?;
                        Ok(json!({"cleaned": n}))
                    }
                    other => other.map(|()| json!(null)),
                }
            })
            .activity("long", move |ctx: ActivityContext, (): ()| {
                let stopped = stopped.clone();
                async move {
                    // Never heartbeats: only a local stop reaches it.
                    ctx.cancelled().await;
                    stopped.fetch_add(1, Ordering::SeqCst);
                    Err::<(), _>(ActivityError::canceled())
                }
            })
            .activity("clean", move |ctx: ActivityContext, (): ()| {
                let release = release.clone();
                async move {
                    tokio::select! {
                        () = release.notified() => Ok::<_, ActivityError>(7),
                        () = ctx.cancelled() => Err(ActivityError::canceled()),
                    }
                }
            })
            .build()
    };
    let workflows = make(long_stopped.clone(), release.clone());
    let activities = make(long_stopped.clone(), release.clone());
    let mut cfg = worker_config();
    cfg.queues = vec![marathon_core::QueueSpec::new("default", 8)];
    let w1 = Worker::start(workflows.clone(), cfg.clone());
    cfg.queues = vec![marathon_core::QueueSpec::new("activities", 8)];
    let w2 = Worker::start(activities.clone(), cfg);
    let id = start(&workflows, "undo", json!(null)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(w2.in_flight(), 1, "long runs on the activities replica");
    // Recorded through the other replica: the workflow moves on to its clean-up,
    // while `long` goes on (it never heartbeats).
    workflows.cancel(&id, None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while w2.in_flight() < 2 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("clean runs beside long");
    assert_eq!(long_stopped.load(Ordering::SeqCst), 0);
    // The repeat, on the replica that runs both.
    activities.cancel(&id, Some("again".into())).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), async {
        while long_stopped.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("long was stopped");
    assert_eq!(w2.in_flight(), 1, "clean goes on");
    release.notify_one();
    let s = finished(&workflows, &id).await;
    assert_eq!(
        (s.status, s.output),
        (WorkflowStatus::Completed, Some(json!({"cleaned": 7})))
    );
    w1.shutdown().await;
    w2.shutdown().await;
}

/// A cancellation the workflow has not seen yet fails the next wait it starts, which is
/// not recorded: one that arrives before the first workflow task runs ends a workflow
/// that would otherwise sleep an hour. Once the workflow has seen it (a pending wait
/// failed with it), the clean-up calls it makes run normally.
#[tokio::test(start_paused = true)]
async fn a_cancellation_the_workflow_has_not_seen_fails_its_next_wait() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("sleeper", |ctx: WorkflowContext, (): ()| async move {
            ctx.sleep(Duration::from_secs(3600)).await?;
            ctx.activity::<_, i64>("step", &1).await
        })
        .workflow("pair", |ctx: WorkflowContext, (): ()| async move {
            // Both calls are made before either is polled.
            let a = ctx.activity::<_, i64>("step", &1);
            let b = ctx.activity::<_, i64>("step", &2);
            let (a, b) = futures::join!(a, b);
            Ok(json!([a?, b?]))
        })
        .workflow("cleaner", |ctx: WorkflowContext, (): ()| async move {
            match ctx.sleep(Duration::from_secs(3600)).await {
                Err(e) if e.is_canceled() => {
                    let cleaned: i64 = ctx.activity("step", &2).await?;
                    assert_eq!(cleaned, 2);
                    Err(e)
                }
                other => other.map(|()| json!(null)),
            }
        })
        .activity("step", |_ctx: ActivityContext, n: i64| async move {
            Ok::<_, ActivityError>(n)
        })
        .build();
    // Canceled before any worker ran its first workflow task.
    let id = start(&engine, "sleeper", json!(null)).await;
    engine
        .cancel(&id, Some("changed my mind".into()))
        .await
        .unwrap();
    let pair = start(&engine, "pair", json!(null)).await;
    engine.cancel(&pair, None).await.unwrap();
    let w = worker(&engine);
    let s = finished(&engine, &id).await;
    assert_eq!(s.status, WorkflowStatus::Canceled, "{s:?}");
    assert_eq!(
        types(&history(&engine, &id).await),
        [
            "workflow_started",
            "cancel_requested",
            "workflow_task_completed",
            "workflow_canceled"
        ]
    );

    // Two calls made before the code polls either: both fail, neither is recorded.
    let s = finished(&engine, &pair).await;
    assert_eq!(s.status, WorkflowStatus::Canceled, "{s:?}");
    let h = history(&engine, &pair).await;
    assert_eq!(
        count(&h, |d| matches!(d, EventData::ActivityScheduled { .. })),
        0,
        "{:?}",
        types(&h)
    );

    // Canceled while it sleeps: the timer fails, and the clean-up activity runs.
    let id = start(&engine, "cleaner", json!(null)).await;
    wait_for_event(&engine, &id, "timer_started").await;
    engine.cancel(&id, None).await.unwrap();
    let s = finished(&engine, &id).await;
    assert_eq!(s.status, WorkflowStatus::Canceled, "{s:?}");
    let h = history(&engine, &id).await;
    assert_eq!(
        count(&h, |d| matches!(d, EventData::ActivityCompleted { .. })),
        1,
        "{:?}",
        types(&h)
    );
    w.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn start_is_idempotent_on_id_and_key() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow(
            "noop",
            |_ctx: WorkflowContext, (): ()| async move { Ok(()) },
        )
        .build();
    let id = WorkflowId::parse("order-1").unwrap();
    let a = engine
        .start(StartWorkflow::new("noop", json!(null)).id(id.clone()))
        .await
        .unwrap();
    let b = engine
        .start(StartWorkflow::new("noop", json!(null)).id(id.clone()))
        .await
        .unwrap();
    assert!(a.created && !b.created);
    let k1 = engine
        .start(StartWorkflow::new("noop", json!(null)).idempotency_key("req-7"))
        .await
        .unwrap();
    let k2 = engine
        .start(StartWorkflow::new("noop", json!(null)).idempotency_key("req-7"))
        .await
        .unwrap();
    assert!(k1.created && !k2.created);
    assert_eq!(k1.summary.id, k2.summary.id);
    assert!(matches!(
        engine
            .start(StartWorkflow::new("missing", json!(null)))
            .await,
        Err(marathon_core::EngineError::UnknownWorkflow(_))
    ));
}

/// A start that reuses the id (or idempotency key) of a workflow started with another
/// name or task queue is refused, not handed the other workflow's run; a repeat with
/// the same name and task queue stays idempotent, whatever its input.
#[tokio::test(start_paused = true)]
async fn a_start_reusing_an_id_with_another_name_or_task_queue_is_refused() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow(
            "noop",
            |_ctx: WorkflowContext, _: serde_json::Value| async move { Ok(()) },
        )
        .workflow(
            "other",
            |_ctx: WorkflowContext, (): ()| async move { Ok(()) },
        )
        .build();
    let id = WorkflowId::parse("reused-1").expect("id");
    let first = engine
        .start(StartWorkflow::new("noop", json!(null)).id(id.clone()))
        .await
        .expect("start");
    assert!(first.created);
    let refused = |r: Result<marathon_core::Started, marathon_core::EngineError>| {
        let err = r.expect_err("a start with the id of another workflow is refused");
        assert!(!err.is_retryable(), "{err:?}");
        assert!(
            matches!(&err, marathon_core::EngineError::AlreadyStarted { id: got, name, task_queue }
                if got == &id && name == "noop" && task_queue == "default"),
            "{err:?}"
        );
    };
    refused(
        engine
            .start(StartWorkflow::new("other", json!(null)).id(id.clone()))
            .await,
    );
    refused(
        engine
            .start(
                StartWorkflow::new("noop", json!(null))
                    .id(id.clone())
                    .task_queue("elsewhere"),
            )
            .await,
    );
    // The documented repeat: same name and task queue (the default, named or not).
    for repeat in [
        StartWorkflow::new("noop", json!(null)).id(id.clone()),
        StartWorkflow::new("noop", json!({"other": "input"}))
            .id(id.clone())
            .task_queue("default"),
    ] {
        let again = engine.start(repeat).await.expect("a repeat");
        assert!(!again.created);
        assert_eq!(again.summary.id, id);
    }
    let s = engine.get(&id).await.expect("get");
    assert_eq!(
        (s.name.as_str(), s.task_queue.as_str()),
        ("noop", "default")
    );

    // The same for an idempotency key.
    let k1 = engine
        .start(StartWorkflow::new("noop", json!(null)).idempotency_key("req-8"))
        .await
        .expect("start");
    let err = engine
        .start(StartWorkflow::new("other", json!(null)).idempotency_key("req-8"))
        .await
        .expect_err("the key of another workflow is refused");
    assert!(
        matches!(&err, marathon_core::EngineError::AlreadyStarted { id, name, .. }
            if id == &k1.summary.id && name == "noop"),
        "{err:?}"
    );
    // A start naming its own id with the key of another workflow is not a repeat of it.
    let own = WorkflowId::parse("own-id").expect("id");
    let err = engine
        .start(
            StartWorkflow::new("noop", json!(null))
                .id(own.clone())
                .idempotency_key("req-8"),
        )
        .await
        .expect_err("the key of another workflow is refused for another id");
    assert!(
        matches!(&err, marathon_core::EngineError::AlreadyStarted { id, .. } if id == &k1.summary.id),
        "{err:?}"
    );
    assert!(engine.get(&own).await.is_err(), "nothing was created");
}

/// A start on a task queue the queue cannot carry is refused by `Engine::start`
/// before anything is recorded or sent, with a typed error.
#[tokio::test]
async fn a_start_on_a_task_queue_the_queue_cannot_carry_creates_nothing() {
    let hand = Arc::new(HandQueue::default());
    hand.refused.lock().push("gpu.jobs".into());
    let store: Arc<dyn marathon_core::Store> =
        Arc::new(marathon_core::memory::MemoryStore::default());
    let queue: Arc<dyn marathon_core::Queue> = hand.clone();
    let engine = builder(&store, &queue)
        .workflow(
            "noop",
            |_ctx: WorkflowContext, (): ()| async move { Ok(()) },
        )
        .build();
    let id = WorkflowId::parse("unserved-1").expect("id");
    let err = engine
        .start(
            StartWorkflow::new("noop", json!(null))
                .id(id.clone())
                .task_queue("gpu.jobs"),
        )
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, marathon_core::EngineError::UnservedTaskQueue { task_queue, reason }
            if task_queue == "gpu.jobs" && reason.contains("refused by this test")),
        "{err:?}"
    );
    assert!(!err.is_retryable());
    assert!(engine.get(&id).await.is_err(), "no run was created");
    assert_eq!(hand.pending.lock().len(), 0, "nothing was sent");
    let ok = engine
        .start(StartWorkflow::new("noop", json!(null)).task_queue("gpu"))
        .await
        .expect("a task queue the queue carries");
    assert!(ok.created);
}

#[tokio::test(start_paused = true)]
async fn non_determinism_is_reported_and_recovers_when_the_code_is_fixed() {
    let (store, queue) = backends();
    let v1 = |b: marathon_core::EngineBuilder| {
        b.workflow("wf", |ctx: WorkflowContext, (): ()| async move {
            let a: u32 = ctx.activity("a", &()).await?;
            ctx.sleep(Duration::from_secs(10)).await?;
            let b: u32 = ctx.activity("b", &()).await?;
            Ok(a + b)
        })
        .activity("a", |_c: ActivityContext, (): ()| async {
            Ok::<_, ActivityError>(1u32)
        })
        .activity("b", |_c: ActivityContext, (): ()| async {
            Ok::<_, ActivityError>(2u32)
        })
    };
    let old = v1(builder(&store, &queue)).build();
    let w = worker(&old);
    let id = start(&old, "wf", json!(null)).await;
    // Wait until the timer is recorded, then "deploy" incompatible code.
    loop {
        let h = history(&old, &id).await;
        if count(&h, |d| matches!(d, EventData::TimerStarted { .. })) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    w.shutdown().await;
    let changed = builder(&store, &queue)
        .workflow("wf", |ctx: WorkflowContext, (): ()| async move {
            // Calls "b" where the history has "a".
            let b: u32 = ctx.activity("b", &()).await?;
            Ok(b)
        })
        .activity("b", |_c: ActivityContext, (): ()| async {
            Ok::<_, ActivityError>(2u32)
        })
        .build();
    let w = worker(&changed);
    tokio::time::sleep(Duration::from_secs(12)).await;
    let s = changed.get(&id).await.unwrap();
    assert_eq!(
        s.status,
        WorkflowStatus::Running,
        "a task failure does not end the workflow"
    );
    let failure = s
        .task_failure
        .expect("task failure is visible on the summary");
    assert!(
        failure.contains("non_determinism") && failure.contains("\"a\""),
        "{failure}"
    );
    let h = history(&changed, &id).await;
    // Retried several times, recorded once.
    assert_eq!(
        count(&h, |d| matches!(d, EventData::WorkflowTaskFailed { .. })),
        1
    );
    w.shutdown().await;

    let fixed = v1(builder(&store, &queue)).build();
    let w = worker(&fixed);
    let s = finished(&fixed, &id).await;
    assert_eq!(s.output, Some(json!(3)));
    assert_eq!(s.task_failure, None);
    w.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn parallel_join_and_select() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("fanout", |ctx: WorkflowContext, n: u64| async move {
            let calls: Vec<_> = (0..n).map(|i| ctx.activity::<_, u64>("square", &i)).collect();
            let squares: Vec<u64> = join_all(calls)
                .await
                .into_iter()
                .collect::<Result<_, _>>()?;
            // A race between a slow activity and a timer: the timer wins.
            let slow = ctx.activity::<_, u64>("square", &1000);
            let timer = ctx.sleep(Duration::from_millis(500));
            let winner = match select(slow, timer).await {
                Either::Left(_) => "activity",
                Either::Right(_) => "timer",
            };
            Ok(json!({"sum": squares.iter().sum::<u64>(), "winner": winner, "id": ctx.uuid().to_string()}))
        })
        .activity("square", |_c: ActivityContext, i: u64| async move {
            if i == 1000 {
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Ok::<_, ActivityError>(i * i)
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "fanout", json!(10)).await;
    let s = finished(&engine, &id).await;
    let out = s.output.unwrap();
    assert_eq!(out["sum"], 285);
    assert_eq!(out["winner"], "timer");
    let h = history(&engine, &id).await;
    // All ten calls were scheduled by the first workflow task, in parallel.
    let first_task: Vec<_> = h
        .iter()
        .skip(2)
        .take_while(|e| matches!(e.data, EventData::ActivityScheduled { .. }))
        .collect();
    assert_eq!(first_task.len(), 10);
    // A fresh engine replaying the same history from event 1 reaches the same result.
    let replayer = builder(&store, &queue)
        .workflow("fanout", |ctx: WorkflowContext, _n: u64| async move {
            Ok(ctx.uuid().to_string())
        })
        .build();
    drop(replayer);
    w.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn pipelines_run_steps_in_sequence_and_parallel() {
    let (store, queue) = backends();
    let pipeline: Pipeline = serde_json::from_value(json!({
        "steps": [
            {"type": "activity", "name": "upper", "activity": "upper", "input": "$input.text"},
            {"type": "parallel", "steps": [
                {"type": "activity", "name": "len", "activity": "len", "input": "$steps.upper"},
                {"type": "activity", "name": "again", "activity": "upper", "input": "$input.text"}
            ]}
        ],
        "output": {"upper": "$steps.upper", "len": "$steps.len", "same": ["$steps.again", "$$steps"]}
    }))
    .unwrap();
    let mut registry = marathon_core::Registry::new();
    registry
        .activity("upper", |_c: ActivityContext, s: String| async move {
            Ok::<_, ActivityError>(s.to_uppercase())
        })
        .activity("len", |_c: ActivityContext, s: String| async move {
            Ok::<_, ActivityError>(s.len())
        })
        .pipeline("pipe", pipeline)
        .unwrap();
    let engine = builder(&store, &queue).registry(registry).build();
    let w = worker(&engine);
    let id = start(&engine, "pipe", json!({"text": "hello"})).await;
    let s = finished(&engine, &id).await;
    assert_eq!(
        s.output,
        Some(json!({"upper": "HELLO", "len": 5, "same": ["HELLO", "$steps"]}))
    );
    w.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn a_panicking_workflow_is_a_task_failure_not_a_crash() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("boom", |_ctx: WorkflowContext, (): ()| async move {
            if true {
                panic!("bug in workflow code");
            }
            Ok::<_, WorkflowError>(())
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "boom", json!(null)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let s = engine.get(&id).await.unwrap();
    assert_eq!(s.status, WorkflowStatus::Running);
    assert!(s.task_failure.unwrap().contains("bug in workflow code"));
    w.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_short_tasks_finish_and_hands_back_long_ones() {
    let (store, queue) = backends();
    let make = |hang: bool| {
        builder(&store, &queue)
            .workflow("two", |ctx: WorkflowContext, (): ()| async move {
                let (a, b) = futures::join!(
                    ctx.activity::<_, u32>("quick", &()),
                    ctx.activity::<_, u32>("slow", &())
                );
                Ok(a? + b?)
            })
            .activity("quick", |_c: ActivityContext, (): ()| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                Ok::<_, ActivityError>(1u32)
            })
            .activity("slow", move |_c: ActivityContext, (): ()| async move {
                if hang {
                    tokio::time::sleep(Duration::from_secs(60)).await;
                }
                Ok::<_, ActivityError>(2u32)
            })
            .build()
    };
    let first = make(true);
    let w = worker(&first);
    let id = start(&first, "two", json!(null)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(w.in_flight(), 2);
    let report = w.shutdown().await;
    assert_eq!(report.finished, 1, "{report:?}");
    assert_eq!(report.handed_back, 1, "{report:?}");
    let second = make(false);
    let w = Worker::start(second.clone(), worker_config());
    let s = finished(&second, &id).await;
    assert_eq!(s.output, Some(json!(3)));
    w.shutdown().await;
}

#[tokio::test(start_paused = true)]
async fn progress_events_are_recorded_and_streamed() {
    use futures::StreamExt;
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("stream", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity::<_, String>("tokens", &()).await
        })
        .activity("tokens", |ctx: ActivityContext, (): ()| async move {
            let mut text = String::new();
            for t in ["Hel", "lo"] {
                ctx.progress(&json!({"token": t})).await?;
                text.push_str(t);
            }
            Ok::<_, ActivityError>(text)
        })
        .build();
    let id = start(&engine, "stream", json!(null)).await;
    let mut stream = engine
        .subscribe(&id, marathon_core::Seq::ZERO)
        .await
        .unwrap();
    let w = worker(&engine);
    let mut tokens = Vec::new();
    let mut last = None;
    while let Some(e) = stream.next().await {
        let e = e.unwrap();
        if let EventData::Progress { data, .. } = &e.data {
            tokens.push(data["token"].clone());
        }
        last = Some(e);
    }
    assert_eq!(tokens, [json!("Hel"), json!("lo")]);
    assert!(
        matches!(last.unwrap().data, EventData::WorkflowCompleted { ref output } if *output == "Hello")
    );
    w.shutdown().await;
}

/// Records what the engine reports, and hands out a fixed trace context.
#[derive(Default)]
struct Recorder {
    log: parking_lot::Mutex<Vec<String>>,
}

impl marathon_core::Observer for Recorder {
    fn workflow_started(&self, name: &str) {
        self.log.lock().push(format!("started {name}"));
    }
    fn workflow_closed(&self, name: &str, status: WorkflowStatus, _d: Duration) {
        self.log.lock().push(format!("closed {name} {status}"));
    }
    fn workflow_task(
        &self,
        name: &str,
        outcome: marathon_core::TaskOutcome,
        _d: Duration,
        _len: u64,
    ) {
        self.log
            .lock()
            .push(format!("workflow task {name} {}", outcome.as_str()));
    }
    fn activity_attempt(
        &self,
        name: &str,
        outcome: marathon_core::AttemptOutcome,
        _d: Option<Duration>,
        kind: Option<&str>,
    ) {
        self.log.lock().push(format!(
            "attempt {name} {} {}",
            outcome.as_str(),
            kind.unwrap_or("-")
        ));
    }
    fn task_scope(
        &self,
        task: &marathon_core::Task,
        trace_context: Option<&str>,
    ) -> marathon_core::TaskScope {
        let kind = match task {
            marathon_core::Task::Workflow { .. } => "workflow",
            marathon_core::Task::Activity(_) => "activity",
        };
        self.log
            .lock()
            .push(format!("task {kind} {}", trace_context.unwrap_or("none")));
        marathon_core::TaskScope::new(tracing::Span::none())
    }
    fn trace_context(&self) -> Option<String> {
        Some("00-trace-span-01".into())
    }
}

#[tokio::test(start_paused = true)]
async fn the_observer_sees_workflows_attempts_and_trace_context() {
    let (store, queue) = backends();
    let rec = Arc::new(Recorder::default());
    let engine = builder(&store, &queue)
        .observer(rec.clone())
        .workflow("wf", |ctx: WorkflowContext, (): ()| async move {
            ctx.activity_with::<_, u32>(
                "flaky",
                &(),
                ActivityOptions::default().retry(fast_retry(3)),
            )
            .await
        })
        .activity("flaky", |ctx: ActivityContext, (): ()| async move {
            if ctx.attempt() == 1 {
                Err(ActivityError::retryable("503").with_kind("unavailable"))
            } else {
                Ok(7u32)
            }
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "wf", json!(null)).await;
    finished(&engine, &id).await;
    w.shutdown().await;
    let log = rec.log.lock().clone();
    for expected in [
        "started wf",
        "attempt flaky retrying unavailable",
        "attempt flaky completed -",
        "closed wf completed",
        "task workflow 00-trace-span-01",
        "task activity 00-trace-span-01",
    ] {
        assert!(
            log.iter().any(|l| l == expected),
            "missing {expected:?} in {log:#?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn several_receivers_share_one_concurrency_bound() {
    let (store, queue) = backends();
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let (r, p) = (running.clone(), peak.clone());
    let engine = builder(&store, &queue)
        .workflow("one", |ctx: WorkflowContext, i: u32| async move {
            ctx.activity::<_, u32>("slow", &i).await
        })
        .activity("slow", move |_c: ActivityContext, i: u32| {
            let (r, p) = (r.clone(), p.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                p.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(200)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                Ok::<_, ActivityError>(i)
            }
        })
        .build();
    let mut cfg = worker_config();
    cfg.queues = vec![marathon_core::QueueSpec {
        receivers: 4,
        ..marathon_core::QueueSpec::new("default", 2)
    }];
    let w = Worker::start(engine.clone(), cfg);
    let mut ids = Vec::new();
    for i in 0..10u32 {
        ids.push(start(&engine, "one", json!(i)).await);
    }
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(finished(&engine, id).await.output, Some(json!(i)));
    }
    assert_eq!(
        peak.load(Ordering::SeqCst),
        2,
        "at most `concurrency` tasks at once"
    );
    w.shutdown().await;
}

/// The results of parallel calls that arrive after the workflow closed (their tasks
/// are still queued) do not each replay the run: the code runs a handful of times,
/// not once per call, and the replica that closed it reads no history for them.
#[tokio::test(start_paused = true)]
async fn a_closed_workflow_is_not_replayed_for_each_leftover_task() {
    let hooked = Arc::new(HookStore::default());
    let store: Arc<dyn marathon_core::Store> = hooked.clone();
    let (_, queue) = backends();
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let engine = builder(&store, &queue)
        .workflow("fanout", move |ctx: WorkflowContext, n: u64| {
            counted.fetch_add(1, Ordering::SeqCst);
            async move {
                let calls: Vec<_> = (0..n).map(|i| ctx.activity::<_, u64>("id", &i)).collect();
                let out: Vec<u64> = join_all(calls)
                    .await
                    .into_iter()
                    .collect::<Result<_, _>>()?;
                Ok(out.len())
            }
        })
        .activity("id", |_c: ActivityContext, i: u64| async move {
            Ok::<_, ActivityError>(i)
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "fanout", json!(200)).await;
    let s = finished(&engine, &id).await;
    assert_eq!(s.output, Some(json!(200)));
    let reads_at_close = hooked.reads.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(10)).await;
    w.shutdown().await;
    let runs = runs.load(Ordering::SeqCst);
    assert!(
        runs <= 5,
        "the workflow function ran {runs} times for one run of 200 parallel calls"
    );
    let reads = hooked.reads.load(Ordering::SeqCst) - reads_at_close;
    assert_eq!(reads, 0, "history reads for tasks after the close");
}

/// A pipeline's templates can feed each step's output into the next step wrapped
/// deeper, or copied twice: the run fails with `invalid_argument` once a rendered
/// value would nest deeper than `MAX_VALUE_DEPTH` or hold more than
/// `MAX_RENDERED_VALUES` values, instead of growing without bound (a stack overflow,
/// or a history no store can read back, or memory).
#[tokio::test(start_paused = true)]
async fn a_pipeline_cannot_grow_values_without_bound() {
    let deeper = (1..4).fold(Pipeline::new().step("s0", "echo", json!("x")), |p, k| {
        p.step(
            &format!("s{k}"),
            "echo",
            wrap(json!(format!("$steps.s{}", k - 1)), 60),
        )
    });
    let doubling = (1..30).fold(Pipeline::new().step("s0", "echo", json!(1)), |p, k| {
        let prev = format!("$steps.s{}", k - 1);
        p.step(&format!("s{k}"), "echo", json!([prev, prev]))
    });
    let mut registry = marathon_core::Registry::new();
    registry
        .activity(
            "echo",
            |_c: ActivityContext, v: serde_json::Value| async move { Ok::<_, ActivityError>(v) },
        )
        .pipeline("deeper", deeper.output(json!(1)))
        .expect("valid")
        .pipeline("doubling", doubling.output(json!(1)))
        .expect("valid");
    let (store, queue) = backends();
    let engine = builder(&store, &queue).registry(registry).build();
    let w = worker(&engine);
    for (name, problem) in [
        (
            "deeper",
            "s2: the rendered value nests deeper than 100 levels",
        ),
        (
            "doubling",
            "the rendered value holds more than 1000000 values",
        ),
    ] {
        let id = start(&engine, name, json!(null)).await;
        let s = finished(&engine, &id).await;
        assert_eq!(s.status, WorkflowStatus::Failed, "{name}: {s:?}");
        let error = s.error.expect("an error");
        assert_eq!(error.kind, "invalid_argument", "{name}: {error:?}");
        assert!(error.message.contains(problem), "{name}: {error:?}");
    }
    w.shutdown().await;
}

/// A start whose reply was lost after the store created the run (a timeout, a
/// dropped connection) is retried by its client: the repeat finds the run with
/// nothing done yet and sends its first task again, so the run starts at once
/// instead of when the sweeper finds its first task overdue (30 s by default).
#[tokio::test(start_paused = true)]
async fn a_start_repeated_after_its_reply_was_lost_runs_at_once() {
    let hooked = Arc::new(HookStore::default());
    let store: Arc<dyn marathon_core::Store> = hooked.clone();
    let queue: Arc<dyn marathon_core::Queue> =
        Arc::new(marathon_core::memory::MemoryQueue::default());
    let engine = builder(&store, &queue)
        .workflow(
            "one",
            |_ctx: WorkflowContext, n: i64| async move { Ok(n + 1) },
        )
        .build();
    let _worker = worker(&engine);
    let id = WorkflowId::parse("lost-reply-1").expect("id");
    let request = || StartWorkflow::new("one", json!(1)).id(id.clone());
    hooked.lose_create_reply.store(true, Ordering::SeqCst);
    assert!(engine.start(request()).await.is_err(), "the reply is lost");
    let again = engine.start(request()).await.expect("the client's retry");
    assert!(!again.created);
    let done = tokio::time::timeout(
        Duration::from_secs(5),
        engine.result(&id, Duration::from_secs(3600)),
    )
    .await
    .expect("the run starts at once, not at its first task's deadline")
    .expect("result");
    assert_eq!(done.status, WorkflowStatus::Completed);
}

#[derive(serde::Deserialize, serde::Serialize)]
struct Approval {
    by: String,
}

/// A start whose input is not the workflow's input type is refused (a 400 over
/// HTTP), instead of creating a run that fails at its first task.
#[tokio::test]
async fn a_start_with_input_of_the_wrong_type_is_refused() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("approve", |_ctx: WorkflowContext, a: Approval| async move {
            Ok(a.by)
        })
        .build();
    let err = engine
        .start(
            StartWorkflow::new("approve", json!({"who": 1}))
                .id(WorkflowId::parse("typed-1").expect("id")),
        )
        .await
        .expect_err("refused");
    assert!(
        matches!(&err, marathon_core::EngineError::InvalidArgument(m) if m.contains("missing field `by`")),
        "{err:?}"
    );
    assert!(
        engine
            .get(&WorkflowId::parse("typed-1").expect("id"))
            .await
            .is_err(),
        "no run was created"
    );
    engine
        .start(StartWorkflow::new("approve", json!({"by": "ana"})))
        .await
        .expect("a good input starts");
}

/// A signal whose payload is not the type the workflow waits for is skipped, and the
/// wait goes on: before, any client could fail a run with one malformed signal.
#[tokio::test]
async fn a_signal_of_the_wrong_type_does_not_fail_the_run() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("wait", |ctx: WorkflowContext, (): ()| async move {
            let a: Approval = ctx.signal("approve").await?;
            Ok(a.by)
        })
        .build();
    let _worker = worker(&engine);
    let id = start(&engine, "wait", json!(null)).await;
    engine
        .signal(&id, "approve", json!({"who": 1}), None)
        .await
        .expect("signal");
    engine
        .signal(&id, "approve", json!({"by": "ana"}), None)
        .await
        .expect("signal");
    let done = finished(&engine, &id).await;
    assert_eq!(done.status, WorkflowStatus::Completed, "{done:?}");
    assert_eq!(done.output, Some(json!("ana")));
}

/// A parallel group whose second step's input cannot be rendered (it nests too deep)
/// fails the run before any step of the group is called: its first step (an LLM
/// call, say) is not scheduled and does not run for a run that has already failed.
#[tokio::test(start_paused = true)]
async fn a_parallel_group_that_cannot_render_calls_none_of_its_steps() {
    let pipeline = Pipeline::new()
        .step("s0", "echo", json!("x"))
        .step("s1", "echo", wrap(json!("$steps.s0"), 60))
        .parallel(vec![
            Step::activity("costly", "count", json!(1)),
            Step::activity("deep", "echo", wrap(json!("$steps.s1"), 60)),
        ]);
    let runs = Arc::new(AtomicU32::new(0));
    let counted = runs.clone();
    let mut registry = marathon_core::Registry::new();
    registry
        .activity(
            "echo",
            |_c: ActivityContext, v: serde_json::Value| async move { Ok::<_, ActivityError>(v) },
        )
        .activity("count", move |_c: ActivityContext, v: u32| {
            let runs = counted.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
                Ok::<_, ActivityError>(v)
            }
        })
        .pipeline("p", pipeline)
        .expect("valid");
    let (store, queue) = backends();
    let engine = builder(&store, &queue).registry(registry).build();
    let w = worker(&engine);
    let id = start(&engine, "p", json!(null)).await;
    let s = finished(&engine, &id).await;
    assert_eq!(s.status, WorkflowStatus::Failed, "{s:?}");
    assert!(
        s.error
            .as_ref()
            .is_some_and(|e| e.message.contains("deep: the rendered value")),
        "{s:?}"
    );
    tokio::time::sleep(Duration::from_secs(5)).await;
    w.shutdown().await;
    let scheduled: Vec<String> = history(&engine, &id)
        .await
        .iter()
        .filter_map(|e| match &e.data {
            EventData::ActivityScheduled { name, .. } => Some(name.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(runs.load(Ordering::SeqCst), 0, "{scheduled:?}");
    assert_eq!(scheduled, ["echo", "echo"], "only s0 and s1 are called");
}

/// A signal wait whose name no signal can have (empty, or over 200 bytes: `Engine::signal`
/// and the API refuse such names) fails the run with `invalid_argument` at once instead
/// of waiting forever.
#[tokio::test(start_paused = true)]
async fn a_wait_for_a_signal_name_that_cannot_be_sent_fails() {
    let (store, queue) = backends();
    let engine = builder(&store, &queue)
        .workflow("wait", |ctx: WorkflowContext, name: String| async move {
            ctx.signal::<serde_json::Value>(&name).await
        })
        .build();
    let w = worker(&engine);
    for name in [String::new(), "é".repeat(101)] {
        assert!(
            engine
                .signal(&WorkflowId::random(), &name, json!(1), None)
                .await
                .is_err()
        );
        let id = start(&engine, "wait", json!(name)).await;
        let s = finished(&engine, &id).await;
        assert_eq!(s.status, WorkflowStatus::Failed, "{s:?}");
        assert_eq!(s.error.map(|e| e.kind), Some("invalid_argument".into()));
    }
    w.shutdown().await;
}

/// The append that closes a run is applied but its reply is lost: the task fails and
/// is delivered again, finds the run closed and stops. Nobody knows the close was
/// this task's (another task could have closed it), so it is not counted: at-least-once
/// delivery lets `marathon_workflows_closed_total` count a close at most once, never
/// twice, and miss one in this case (`docs/OBSERVABILITY.md`).
#[tokio::test(start_paused = true)]
async fn a_close_whose_reply_was_lost_is_not_counted_twice() {
    let hooked = Arc::new(HookStore::default());
    let store: Arc<dyn marathon_core::Store> = hooked.clone();
    let (_, queue) = backends();
    let rec = Arc::new(Recorder::default());
    let engine = builder(&store, &queue)
        .observer(rec.clone())
        .workflow("quick", |_ctx: WorkflowContext, (): ()| async move {
            Ok::<_, WorkflowError>(1u32)
        })
        .build();
    hooked.lose_close_reply.store(true, Ordering::SeqCst);
    let w = worker(&engine);
    let id = start(&engine, "quick", json!(null)).await;
    assert_eq!(
        finished(&engine, &id).await.status,
        WorkflowStatus::Completed
    );
    // The failed task's redelivery, and anything after it.
    tokio::time::sleep(Duration::from_secs(120)).await;
    w.shutdown().await;
    assert!(!hooked.lose_close_reply.load(Ordering::SeqCst), "no close");
    let log = rec.log.lock().clone();
    let closed = log.iter().filter(|l| l.starts_with("closed ")).count();
    assert_eq!(closed, 0, "{log:#?}");
}

/// Tasks of a run that is closed (the results of parallel calls that arrive after the
/// close) run no code and are not counted in `marathon_workflow_tasks_total`: its
/// `nothing` is a task of an open run with nothing new to record
/// (`docs/OBSERVABILITY.md`).
#[tokio::test(start_paused = true)]
async fn tasks_of_a_closed_run_are_not_counted() {
    let (store, queue) = backends();
    let rec = Arc::new(Recorder::default());
    let engine = builder(&store, &queue)
        .observer(rec.clone())
        .workflow("first", |ctx: WorkflowContext, n: u64| async move {
            // Returns with the first result; the others arrive after the close.
            let calls: Vec<_> = (0..n)
                .map(|i| Box::pin(ctx.activity::<_, u64>("id", &i)))
                .collect();
            let (first, _, _) = futures::future::select_all(calls).await;
            first
        })
        .activity("id", |_c: ActivityContext, i: u64| async move {
            Ok::<_, ActivityError>(i)
        })
        .build();
    let w = worker(&engine);
    let id = start(&engine, "first", json!(20)).await;
    finished(&engine, &id).await;
    tokio::time::sleep(Duration::from_secs(10)).await;
    w.shutdown().await;
    let log = rec.log.lock().clone();
    let delivered = log
        .iter()
        .filter(|l| l.starts_with("task workflow "))
        .count();
    let counted = log
        .iter()
        .filter(|l| l.starts_with("workflow task "))
        .count();
    assert!(
        counted < delivered,
        "every task counted ({counted} of {delivered}): {log:#?}"
    );
}

/// An activity scheduled on a task queue the queue cannot carry (SQS refuses the name
/// on every send) is not sent; the sweeper fails the attempt at once with
/// `invalid_argument`, not retried, and the workflow sees the error. Before, each
/// send failed and the sweeper sent it again, less and less often, forever.
#[tokio::test]
async fn an_activity_on_a_task_queue_the_queue_cannot_carry_fails() {
    let hand = Arc::new(HandQueue::default());
    hand.refused.lock().push("gpu.jobs".into());
    let store: Arc<dyn marathon_core::Store> =
        Arc::new(marathon_core::memory::MemoryStore::default());
    let queue: Arc<dyn marathon_core::Queue> = hand.clone();
    let engine = builder(&store, &queue)
        .workflow("gpu", |ctx: WorkflowContext, (): ()| async move {
            let r: Result<u32, WorkflowError> = ctx
                .activity_with(
                    "work",
                    &1u32,
                    ActivityOptions::default()
                        .task_queue("gpu.jobs")
                        .retry(fast_retry(5)),
                )
                .await;
            Ok(r.map_err(|e| e.activity_error().map(|a| a.kind)))
        })
        .activity("work", |_ctx: ActivityContext, x: u32| async move {
            Ok::<_, ActivityError>(x)
        })
        .build();
    let id = start(&engine, "gpu", json!(null)).await;
    let take = || {
        let mut p = hand.pending.lock();
        (!p.is_empty()).then(|| p.remove(0))
    };
    let (q, task) = take().expect("first workflow task");
    engine.handle(&q, task).await.expect("workflow task");
    assert!(
        hand.pending.lock().iter().all(|(q, _)| q != "gpu.jobs"),
        "nothing is sent to a task queue the queue cannot carry"
    );
    engine.sweep(100).await.expect("sweep");
    while let Some((q, task)) = take() {
        assert_ne!(q, "gpu.jobs");
        engine.handle(&q, task).await.expect("task");
    }
    let s = engine.get(&id).await.expect("get");
    assert_eq!(s.status, WorkflowStatus::Completed, "{s:?}");
    assert_eq!(
        s.output,
        Some(json!({"Err": "invalid_argument"})),
        "one attempt, failed for good: {s:?}"
    );
}

/// A call waiting out its retry backoff when the workflow is canceled does not run its
/// next attempt: the attempt is recorded as `canceled` without running, while a
/// clean-up call made after the cancellation retries as usual; once the workflow has
/// closed, a retry still queued does not run either. Before, the retry was delivered
/// after its backoff and ran in full (only a heartbeat would have stopped it), also
/// after the workflow had closed.
#[tokio::test(start_paused = true)]
async fn a_retry_due_after_the_cancellation_does_not_run() {
    let (store, queue) = backends();
    let runs = Arc::new(Mutex::new(Vec::<(String, u32)>::new()));
    let r = runs.clone();
    let slow_retry = || {
        ActivityOptions::default().retry(RetryPolicy {
            initial_interval: Duration::from_secs(60),
            ..RetryPolicy::default()
        })
    };
    let engine = builder(&store, &queue)
        .workflow(
            "wf",
            move |ctx: WorkflowContext, clean_up: bool| async move {
                let sent = ctx.activity_with::<_, ()>("send", &(), slow_retry()).await;
                let e = sent.expect_err("canceled");
                assert!(e.is_canceled(), "{e:?}");
                if clean_up {
                    ctx.activity_with::<_, ()>("clean_up", &(), slow_retry())
                        .await?;
                }
                Err::<(), _>(e)
            },
        )
        .activity("send", {
            let r = r.clone();
            move |ctx: ActivityContext, (): ()| {
                let r = r.clone();
                async move {
                    r.lock().push(("send".into(), ctx.attempt()));
                    Err::<(), _>(ActivityError::retryable("503"))
                }
            }
        })
        .activity("clean_up", move |ctx: ActivityContext, (): ()| {
            let r = r.clone();
            async move {
                r.lock().push(("clean_up".into(), ctx.attempt()));
                if ctx.attempt() == 1 {
                    return Err(ActivityError::retryable("503"));
                }
                Ok(())
            }
        })
        .build();
    let w = worker(&engine);
    for clean_up in [false, true] {
        runs.lock().clear();
        let id = start(&engine, "wf", json!(clean_up)).await;
        wait_for_event(&engine, &id, "activity_retrying").await;
        engine.cancel(&id, None).await.unwrap();
        let s = finished(&engine, &id).await;
        assert_eq!(s.status, WorkflowStatus::Canceled, "{s:?}");
        // Well past the 60 s backoff of a queued retry.
        tokio::time::sleep(Duration::from_secs(600)).await;
        let ran = runs.lock().clone();
        let mut expected = vec![("send".to_string(), 1)];
        if clean_up {
            expected.extend([("clean_up".to_string(), 1), ("clean_up".to_string(), 2)]);
        }
        assert_eq!(ran, expected, "clean_up: {clean_up}");
        if clean_up {
            // The canceled call's second attempt was recorded as canceled, not run.
            let h = history(&engine, &id).await;
            let failed: Vec<_> = h
                .iter()
                .filter_map(|e| match &e.data {
                    EventData::ActivityFailed {
                        activity_id,
                        attempt,
                        error,
                    } => Some((*activity_id, *attempt, error.kind.clone())),
                    _ => None,
                })
                .collect();
            assert_eq!(failed, [(1, 2, "canceled".to_string())]);
        }
    }
    w.shutdown().await;
}
