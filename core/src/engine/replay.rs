//! Replay: runs workflow code against its recorded history, one workflow task at a time.
//!
//! The history is cut into workflow tasks by `workflow_task_completed` markers.
//! Inputs recorded before a marker are delivered together, the code is polled,
//! and the commands it issues must be exactly the command events that follow
//! the marker. Feeding is incremental, so a cached instance continues from
//! where it stopped and ends in the same state as a replay from event 1.

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::Value;
use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use crate::engine::context::{Command, WorkflowContext};
use crate::engine::registry::WorkflowFn;
use crate::model::{Event, EventData, Seq, Timestamp, WorkflowError, WorkflowId};

/// Why a workflow task could not run the code; recorded as `workflow_task_failed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TaskFailure {
    pub(crate) kind: &'static str,
    pub(crate) message: String,
}

impl TaskFailure {
    fn non_determinism(message: String) -> Self {
        Self {
            kind: "non_determinism",
            message,
        }
    }
}

/// How the workflow code ended, once it has.
#[derive(Debug, Clone)]
pub(crate) enum Outcome {
    Completed(Value),
    Failed(WorkflowError),
}

struct FlagWaker(AtomicBool);

impl Wake for FlagWaker {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// Kind of the failure that ends a run whose history would grow past
/// [`crate::EngineConfig::max_history_events`].
pub const HISTORY_LIMIT: &str = "history_limit";

/// Kinds of the failures the engine records for a run whose code had not returned:
/// replay accepts them in place of the code's own outcome.
const ENGINE_FAILURES: [&str; 2] = ["invalid_argument", HISTORY_LIMIT];

/// Most polls one batch of inputs may take before the code is considered stuck.
const MAX_POLLS_PER_BATCH: usize = 10_000;

/// One workflow's code in memory, fed its history.
pub(crate) struct Instance {
    pub(crate) id: WorkflowId,
    pub(crate) name: String,
    pub(crate) started_at: Timestamp,
    pub(crate) task_queue: String,
    ctx: WorkflowContext,
    future: Option<BoxFuture<'static, Result<Value, WorkflowError>>>,
    outcome: Option<Outcome>,
    /// Last event fed.
    pub(crate) applied: Seq,
    /// Inputs fed since the last marker, not yet delivered to the code.
    pending_inputs: Vec<EventData>,
    /// The last marker fed: the workflow task of the commands in `unmatched`.
    marker: Seq,
    /// Commands the code issued at the last marker that the history has not matched yet.
    unmatched: VecDeque<Command>,
    /// Whether the outcome issued at the last marker still awaits its terminal event.
    outcome_unmatched: bool,
    /// The history holds a terminal event.
    pub(crate) finished: bool,
    /// The last event is a `workflow_task_failed` with this message.
    pub(crate) last_task_failure: Option<String>,
}

impl Instance {
    /// Builds the instance from event 1 (which must be `workflow_started`).
    pub(crate) fn start(
        id: &WorkflowId,
        first: &Event,
        lookup: impl Fn(&str) -> Option<WorkflowFn>,
    ) -> Result<Self, TaskFailure> {
        let EventData::WorkflowStarted {
            name,
            input,
            task_queue,
            ..
        } = &first.data
        else {
            return Err(TaskFailure {
                kind: "corrupt_history",
                message: format!(
                    "event 1 is {}, not workflow_started",
                    first.data.type_name()
                ),
            });
        };
        let Some(f) = lookup(name) else {
            return Err(TaskFailure {
                kind: "unknown_workflow",
                message: format!("workflow {name:?} is not registered on this worker"),
            });
        };
        let ctx = WorkflowContext::new(id.clone(), first.timestamp);
        // Called on the first poll, where panics are caught: a function that panics
        // before returning its future fails the task like one that panics in it.
        let (call_ctx, input) = (ctx.clone(), input.clone());
        // Outside tokio's cooperative budget: the budget belongs to the task running
        // the workflow task (a replay from event 1 spends one on every earlier batch),
        // and `tokio::sync` the code uses past it would return `Pending` with a wake-up
        // that only comes after the polls of this batch have ended, so the code would
        // stop where the budget ran out, not where its history says.
        let future: BoxFuture<'static, Result<Value, WorkflowError>> =
            Box::pin(tokio::task::unconstrained(async move {
                f(call_ctx, input).await
            }));
        let mut inst = Self {
            id: id.clone(),
            name: name.clone(),
            started_at: first.timestamp,
            task_queue: task_queue.clone(),
            ctx,
            future: Some(future),
            outcome: None,
            applied: Seq::ZERO,
            pending_inputs: Vec::new(),
            marker: Seq::ZERO,
            unmatched: VecDeque::new(),
            outcome_unmatched: false,
            finished: false,
            last_task_failure: None,
        };
        inst.feed(first)?;
        Ok(inst)
    }

    /// Feeds the next recorded event.
    pub(crate) fn feed(&mut self, e: &Event) -> Result<(), TaskFailure> {
        if e.seq != self.applied.next() {
            return Err(TaskFailure {
                kind: "corrupt_history",
                message: format!("expected event {}, got {}", self.applied.next(), e.seq),
            });
        }
        self.applied = e.seq;
        // Bookkeeping (progress streamed by a running activity, say) changes nothing a
        // retry of the failed task would do: the failure still stands for the repeat check.
        if !e.data.is_bookkeeping() {
            self.last_task_failure = None;
        }
        match &e.data {
            EventData::WorkflowTaskCompleted {} => {
                self.check_all_matched(Some(e.seq))?;
                self.marker = e.seq;
                self.run_batch(e.timestamp)?;
            }
            EventData::ActivityScheduled {
                activity_id, name, ..
            } => match self.unmatched.pop_front() {
                Some(Command::Activity { id, name: n, .. }) if id == *activity_id && n == *name => {
                }
                other => return Err(mismatch(e, other.as_ref())),
            },
            EventData::TimerStarted { timer_id, .. } => match self.unmatched.pop_front() {
                Some(Command::Timer { id, .. }) if id == *timer_id => {}
                other => return Err(mismatch(e, other.as_ref())),
            },
            // The engine, not the code, ended the run (a refused call, the history
            // limit): the code had not returned, and what it issued then was dropped.
            EventData::WorkflowFailed { error }
                if self.outcome.is_none() && ENGINE_FAILURES.contains(&error.kind.as_str()) =>
            {
                self.unmatched.clear();
                self.future = None;
                self.outcome = Some(Outcome::Failed(error.clone()));
                self.finished = true;
            }
            EventData::WorkflowCompleted { .. }
            | EventData::WorkflowFailed { .. }
            | EventData::WorkflowCanceled { .. } => {
                if let Some(c) = self.unmatched.front() {
                    return Err(mismatch(e, Some(c)));
                }
                let matches = match (&self.outcome, &e.data) {
                    (Some(Outcome::Completed(_)), EventData::WorkflowCompleted { .. }) => true,
                    (Some(Outcome::Failed(err)), EventData::WorkflowCanceled { .. }) => {
                        err.is_canceled()
                    }
                    (Some(Outcome::Failed(err)), EventData::WorkflowFailed { .. }) => {
                        !err.is_canceled()
                    }
                    _ => false,
                };
                if !matches || !self.outcome_unmatched {
                    return Err(TaskFailure::non_determinism(format!(
                        "history event {} is {} but the workflow code {}",
                        e.seq,
                        e.data.type_name(),
                        match &self.outcome {
                            None => "has not returned at that point".to_string(),
                            Some(Outcome::Completed(_)) => "returned Ok".to_string(),
                            Some(Outcome::Failed(err)) => format!("returned Err({err})"),
                        }
                    )));
                }
                self.outcome_unmatched = false;
                self.finished = true;
            }
            EventData::WorkflowTaskFailed { message, kind } => {
                self.last_task_failure = Some(format!("{kind}: {message}"));
            }
            data if data.is_input() => {
                self.check_all_matched(Some(e.seq))?;
                self.pending_inputs.push(data.clone());
            }
            // activity_started, activity_retrying, progress: bookkeeping, not replayed.
            _ => {}
        }
        Ok(())
    }

    /// Whether there is input the code has not seen yet (a workflow task is due).
    pub(crate) fn has_pending_input(&self) -> bool {
        !self.pending_inputs.is_empty() && !self.finished
    }

    /// Runs the live step: delivers pending inputs at time `now` and returns the
    /// events to append (marker, commands, terminal event), or `None` if nothing is due.
    ///
    /// A step that would take a running workflow's history past `max_history` events
    /// fails the run instead ([`HISTORY_LIMIT`]); a step that ends the run records its
    /// closing events whatever the length.
    pub(crate) fn live_step(
        &mut self,
        now: Timestamp,
        max_history: u64,
    ) -> Result<Option<Vec<EventData>>, TaskFailure> {
        self.check_all_matched(None)?;
        if !self.has_pending_input() {
            return Ok(None);
        }
        let had_outcome = self.outcome.is_some();
        let mut commands = self.run_batch(now)?;
        // A new call with too deep an input fails the run here, where it would be
        // recorded, not in the code's view: a history an older version recorded may
        // hold such a call, and its replay must issue it as that version did.
        let refused = commands.iter().find_map(|c| match c {
            Command::Activity {
                name,
                options,
                input,
                ..
            } => options
                .check()
                .err()
                .map(|problem| format!("the options of activity {name:?} are invalid: {problem}"))
                .or_else(|| {
                    crate::nests_deeper_than(input, crate::MAX_VALUE_DEPTH).then(|| {
                        format!(
                            "the input of activity {name:?} nests deeper than {} levels",
                            crate::MAX_VALUE_DEPTH
                        )
                    })
                })
                .or_else(|| {
                    crate::json_larger_than(input, crate::MAX_PAYLOAD_BYTES).then(|| {
                        format!(
                            "the input of activity {name:?} takes more than {} bytes as JSON",
                            crate::MAX_PAYLOAD_BYTES
                        )
                    })
                }),
            Command::Timer { .. } => None,
        });
        // A refused call, or a run the code has not ended whose marker and commands
        // would take its history past the limit: the engine fails the run.
        let grown = self.applied.0 + 1 + commands.len() as u64;
        let failure = match refused {
            Some(message) => Some(WorkflowError::new(message).with_kind("invalid_argument")),
            None if self.outcome.is_none() && grown > max_history => Some(
                WorkflowError::new(format!(
                    "the history would grow to {grown} events, past the limit of {max_history} \
                     (engine.max_history_events); the run is failed so that it stops growing"
                ))
                .with_kind(HISTORY_LIMIT),
            ),
            None => None,
        };
        if let Some(error) = failure {
            commands.clear();
            self.future = None;
            self.outcome = Some(Outcome::Failed(error));
        }
        let mut out = Vec::with_capacity(commands.len() + 2);
        out.push(EventData::WorkflowTaskCompleted {});
        for c in commands {
            out.push(match c {
                Command::Activity {
                    id,
                    name,
                    input,
                    options,
                } => {
                    let task_queue = options
                        .task_queue
                        .clone()
                        .unwrap_or_else(|| self.task_queue.clone());
                    EventData::ActivityScheduled {
                        activity_id: id,
                        name,
                        input,
                        options,
                        task_queue,
                    }
                }
                Command::Timer { id, fire_at } => EventData::TimerStarted {
                    timer_id: id,
                    fire_at,
                },
            });
        }
        if !had_outcome {
            match &self.outcome {
                Some(Outcome::Completed(v)) => {
                    out.push(EventData::WorkflowCompleted { output: v.clone() });
                }
                Some(Outcome::Failed(err)) if err.is_canceled() => {
                    out.push(EventData::WorkflowCanceled { error: err.clone() });
                }
                Some(Outcome::Failed(err)) => {
                    out.push(EventData::WorkflowFailed { error: err.clone() });
                }
                None => {}
            }
        }
        // The caller appends `out`; what it records is exactly what we issued.
        self.unmatched.clear();
        self.outcome_unmatched = false;
        Ok(Some(out))
    }

    /// Marks the events returned by [`Self::live_step`] as recorded, ending at `last`.
    pub(crate) fn committed(&mut self, last: Seq, terminal: bool) {
        self.applied = last;
        self.last_task_failure = None;
        if terminal {
            self.finished = true;
        }
    }

    /// Whether the code has returned.
    pub(crate) fn has_outcome(&self) -> bool {
        self.outcome.is_some()
    }

    /// The status the code's outcome ends the workflow with, once it has returned.
    pub(crate) fn final_status(&self) -> Option<crate::model::WorkflowStatus> {
        use crate::model::WorkflowStatus;
        self.outcome.as_ref().map(|o| match o {
            Outcome::Completed(_) => WorkflowStatus::Completed,
            Outcome::Failed(e) if e.is_canceled() => WorkflowStatus::Canceled,
            Outcome::Failed(_) => WorkflowStatus::Failed,
        })
    }

    /// Fails if the code issued commands, or returned, where the history has not
    /// recorded it: before event `at`, or (`None`) by the end of the history. There the
    /// message names the workflow task instead of the end: the failure recorded after
    /// it moves the end, and a message that stays the same on every retry is recorded once.
    fn check_all_matched(&self, at: Option<Seq>) -> Result<(), TaskFailure> {
        let marker = self.marker;
        if let Some(c) = self.unmatched.front() {
            let c = c.describe();
            return Err(TaskFailure::non_determinism(match at {
                Some(at) => format!(
                    "the workflow code now issues {c} which the history does not have before event {at}"
                ),
                None => format!(
                    "the workflow code now issues {c} in the workflow task of event {marker}, \
                     which the history does not have"
                ),
            }));
        }
        if self.outcome_unmatched {
            return Err(TaskFailure::non_determinism(match at {
                Some(at) => {
                    format!("the workflow code now returns, but the history goes on at event {at}")
                }
                None => format!(
                    "the workflow code now returns in the workflow task of event {marker}, \
                     but the history does not record its end"
                ),
            }));
        }
        Ok(())
    }

    /// Delivers pending inputs, polls the code and returns the commands it issued.
    fn run_batch(&mut self, now: Timestamp) -> Result<Vec<Command>, TaskFailure> {
        let inputs = std::mem::take(&mut self.pending_inputs);
        {
            let mut st = self.ctx.state().lock();
            st.now = now;
            for input in inputs {
                match input {
                    EventData::ActivityCompleted {
                        activity_id,
                        output,
                        ..
                    } => st.resolve_activity(activity_id, Ok(output)),
                    EventData::ActivityFailed {
                        activity_id,
                        attempt,
                        error,
                    } => {
                        let name = st.activity_name(activity_id).unwrap_or("?").to_string();
                        st.resolve_activity(
                            activity_id,
                            Err(WorkflowError::activity_failed(&name, attempt, &error)),
                        );
                    }
                    EventData::TimerFired { timer_id } => st.resolve_timer(timer_id),
                    EventData::SignalReceived { name, payload } => st.deliver_signal(name, payload),
                    EventData::CancelRequested { reason } => st.deliver_cancel(reason),
                    _ => {}
                }
            }
        }
        if let Some(fut) = self.future.as_mut() {
            let flag = Arc::new(FlagWaker(AtomicBool::new(true)));
            let waker = Waker::from(flag.clone());
            let mut cx = Context::from_waker(&waker);
            let mut polls = 0;
            while flag.0.swap(false, Ordering::AcqRel) {
                polls += 1;
                if polls > MAX_POLLS_PER_BATCH {
                    break;
                }
                match std::panic::catch_unwind(AssertUnwindSafe(|| fut.poll_unpin(&mut cx))) {
                    Ok(Poll::Pending) => {}
                    Ok(Poll::Ready(r)) => {
                        self.outcome = Some(match r {
                            // Too deep to read back from a history: failed instead.
                            Ok(v) if crate::nests_deeper_than(&v, crate::MAX_VALUE_DEPTH) => {
                                Outcome::Failed(
                                    WorkflowError::new(format!(
                                        "the workflow's output nests deeper than {} levels",
                                        crate::MAX_VALUE_DEPTH
                                    ))
                                    .with_kind("invalid_output"),
                                )
                            }
                            Ok(v) if crate::json_larger_than(&v, crate::MAX_PAYLOAD_BYTES) => {
                                Outcome::Failed(
                                    WorkflowError::new(format!(
                                        "the workflow's output takes more than {} bytes as JSON",
                                        crate::MAX_PAYLOAD_BYTES
                                    ))
                                    .with_kind("invalid_output"),
                                )
                            }
                            Ok(v) => Outcome::Completed(v),
                            Err(mut e) => {
                                // One level more, and room for the activity's
                                // message and kind: `activity_failed` wraps the
                                // activity's error (details up to the limit) in its own.
                                crate::engine::bound_error(
                                    &mut e.details,
                                    &mut e.message,
                                    crate::MAX_VALUE_DEPTH + 1,
                                    crate::MAX_PAYLOAD_BYTES + 2 * crate::MAX_ERROR_MESSAGE_BYTES,
                                );
                                Outcome::Failed(e)
                            }
                        });
                        self.outcome_unmatched = true;
                        self.future = None;
                        break;
                    }
                    Err(panic) => {
                        let msg = panic
                            .downcast_ref::<&str>()
                            .map(|s| (*s).to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "workflow code panicked".to_string());
                        self.future = None;
                        return Err(TaskFailure {
                            kind: "panic",
                            message: format!("workflow code panicked: {msg}"),
                        });
                    }
                }
            }
        }
        let commands = std::mem::take(&mut self.ctx.state().lock().commands);
        self.unmatched = commands.iter().cloned().collect();
        Ok(commands)
    }
}

fn mismatch(e: &Event, issued: Option<&Command>) -> TaskFailure {
    let recorded = match &e.data {
        EventData::ActivityScheduled {
            activity_id, name, ..
        } => format!("activity {name:?} (command {activity_id})"),
        EventData::TimerStarted { timer_id, .. } => format!("timer (command {timer_id})"),
        other => other.type_name().to_string(),
    };
    TaskFailure::non_determinism(format!(
        "history event {} records {recorded} but the workflow code now issues {}",
        e.seq,
        issued.map_or_else(|| "nothing there".to_string(), Command::describe)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::select;
    use std::time::Duration;

    /// An agent that waits for user input with periodic time-outs: each turn of its
    /// loop waits for a signal (one future kept across turns, one new each turn), the
    /// cancellation and a timer, and the timer wins. Every workflow task polls the code
    /// with a waker of its own. Only the futures still waiting may hold a waker: before
    /// 2026-11-27 every poll of a signal or cancellation wait added one, and they were
    /// dropped only when a signal or the cancellation arrived, so they piled up for the
    /// life of the run.
    #[test]
    fn a_loop_on_signals_and_a_timer_keeps_one_waker_per_waiting_future() {
        const TURNS: u64 = 50;
        let f: WorkflowFn = Arc::new(|ctx: WorkflowContext, _input: Value| {
            async move {
                let mut input = ctx.signal::<String>("input");
                for _ in 0..TURNS {
                    let waits = select(
                        select(&mut input, ctx.signal::<String>("other")),
                        ctx.cancelled(),
                    );
                    match select(waits, ctx.sleep(Duration::from_secs(60))).await {
                        futures::future::Either::Left(_) => return Ok(Value::Null),
                        futures::future::Either::Right((fired, _)) => fired?,
                    }
                }
                Ok(Value::Null)
            }
            .boxed()
        });
        let id = WorkflowId::parse("agent").expect("id");
        let event = |seq: u64, data: EventData| Event {
            seq: Seq(seq),
            timestamp: Timestamp(seq),
            data,
        };
        let first = event(
            1,
            EventData::WorkflowStarted {
                name: "agent".into(),
                input: Value::Null,
                task_queue: "default".into(),
                idempotency_key: None,
            },
        );
        let mut inst = Instance::start(&id, &first, |_| Some(f.clone())).expect("start");
        let mut last = 1;
        for _ in 0..TURNS {
            let out = inst
                .live_step(Timestamp(last), u64::MAX)
                .expect("step")
                .expect("due");
            let timer_id = out
                .iter()
                .find_map(|d| match d {
                    EventData::TimerStarted { timer_id, .. } => Some(*timer_id),
                    _ => None,
                })
                .expect("a timer");
            last += out.len() as u64;
            inst.committed(Seq(last), false);
            last += 1;
            inst.feed(&event(last, EventData::TimerFired { timer_id }))
                .expect("feed");
        }
        // Waiting in the last turn: `input` and `other` for a signal, one `cancelled()`.
        assert_eq!(inst.ctx.state().lock().waiting(), (2, 1));
        // The wait kept since the first turn is still woken by its signal.
        last += 1;
        let input = EventData::SignalReceived {
            name: "input".into(),
            payload: Value::from("hi"),
        };
        inst.feed(&event(last, input)).expect("feed");
        let out = inst
            .live_step(Timestamp(last), u64::MAX)
            .expect("step")
            .expect("due");
        assert!(
            matches!(out.last(), Some(EventData::WorkflowCompleted { .. })),
            "{out:?}"
        );
        assert_eq!(inst.ctx.state().lock().waiting(), (0, 0));
    }

    /// Runs `f` live, firing each timer it starts, until its run ends; the history
    /// recorded, with a step limit of `max_history` events.
    fn record(f: &WorkflowFn, max_history: u64) -> Vec<Event> {
        let id = WorkflowId::parse("looper").expect("id");
        let mut history = vec![Event {
            seq: Seq(1),
            timestamp: Timestamp(1),
            data: EventData::WorkflowStarted {
                name: "looper".into(),
                input: Value::Null,
                task_queue: "default".into(),
                idempotency_key: None,
            },
        }];
        let mut inst = Instance::start(&id, &history[0], |_| Some(f.clone())).expect("start");
        for _ in 0..1_000 {
            let now = Timestamp(history.len() as u64);
            let out = inst
                .live_step(now, max_history)
                .expect("step")
                .expect("due");
            let terminal = out.iter().any(EventData::is_terminal);
            let timers: Vec<u32> = out
                .iter()
                .filter_map(|d| match d {
                    EventData::TimerStarted { timer_id, .. } => Some(*timer_id),
                    _ => None,
                })
                .collect();
            for data in out {
                let seq = Seq(history.len() as u64 + 1);
                history.push(Event {
                    seq,
                    timestamp: now,
                    data,
                });
            }
            inst.committed(Seq(history.len() as u64), terminal);
            if terminal {
                return history;
            }
            for timer_id in timers {
                let e = Event {
                    seq: Seq(history.len() as u64 + 1),
                    timestamp: now,
                    data: EventData::TimerFired { timer_id },
                };
                inst.feed(&e).expect("feed");
                history.push(e);
            }
        }
        panic!("the run did not end: {history:?}");
    }

    /// Replays `history` from event 1 on a fresh instance of `f`.
    fn replay(f: &WorkflowFn, history: &[Event]) -> Result<Instance, TaskFailure> {
        let id = WorkflowId::parse("looper").expect("id");
        let mut inst = Instance::start(&id, &history[0], |_| Some(f.clone()))?;
        for e in &history[1..] {
            inst.feed(e)?;
        }
        Ok(inst)
    }

    /// A workflow that sleeps in a loop forever.
    fn forever() -> WorkflowFn {
        Arc::new(|ctx: WorkflowContext, _input: Value| {
            async move {
                loop {
                    ctx.sleep(Duration::from_secs(1)).await?;
                }
            }
            .boxed()
        })
    }

    /// A loop that never ends is failed by the engine at the history limit: the step
    /// that would record past it records the failure instead, and a replay from event
    /// 1 (another replica, a stray task) accepts that failure where the code had not
    /// returned, rather than calling it non-determinism.
    #[test]
    fn a_run_past_the_history_limit_fails_and_replays() {
        let f = forever();
        let history = record(&f, 20);
        // Each turn records its marker, a timer and the timer's firing.
        assert!(history.len() <= 22, "{history:?}");
        let Some(EventData::WorkflowFailed { error }) = history.last().map(|e| &e.data) else {
            panic!("not failed: {history:?}");
        };
        assert_eq!(error.kind, HISTORY_LIMIT);
        assert!(error.message.contains("limit of 20"), "{}", error.message);
        let inst = replay(&f, &history).expect("replays");
        assert!(inst.finished);
        assert_eq!(
            inst.final_status(),
            Some(crate::model::WorkflowStatus::Failed)
        );
    }

    /// A step that ends the run records its closing events past the limit.
    #[test]
    fn a_run_that_returns_at_the_limit_completes() {
        let f: WorkflowFn = Arc::new(|ctx: WorkflowContext, _input: Value| {
            async move {
                for _ in 0..3 {
                    ctx.sleep(Duration::from_secs(1)).await?;
                }
                Ok(Value::from("done"))
            }
            .boxed()
        });
        // started, then 3 × (marker, timer, fired): 10 events; the last step's marker
        // and completion take it to 12.
        let history = record(&f, 10);
        assert_eq!(history.len(), 12, "{history:?}");
        assert!(
            matches!(history[11].data, EventData::WorkflowCompleted { .. }),
            "{history:?}"
        );
    }

    /// A run failed for a new call's over-deep input (`invalid_argument`) replays too:
    /// the code issues the call again, which the history does not hold.
    #[test]
    fn a_run_failed_for_a_refused_call_replays() {
        let f: WorkflowFn = Arc::new(|ctx: WorkflowContext, _input: Value| {
            async move {
                let mut deep = Value::Null;
                for _ in 0..=crate::MAX_VALUE_DEPTH {
                    deep = Value::Array(vec![deep]);
                }
                ctx.sleep(Duration::from_secs(1)).await?;
                ctx.activity::<_, Value>("tool", &deep).await?;
                Ok(Value::Null)
            }
            .boxed()
        });
        let history = record(&f, u64::MAX);
        let Some(EventData::WorkflowFailed { error }) = history.last().map(|e| &e.data) else {
            panic!("not failed: {history:?}");
        };
        assert_eq!(error.kind, "invalid_argument");
        let inst = replay(&f, &history).expect("replays");
        assert!(inst.finished);
    }
}
