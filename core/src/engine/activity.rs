//! `ActivityContext` and the running of one activity attempt under its timeouts.

use parking_lot::Mutex;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::engine::EngineInner;
use crate::model::{ActivityError, EventData, NewEvent, Seq, Timestamp, WorkflowId};
use crate::store::{AttemptExtend, KeyedAppend, KeyedOutcome, StoreError};

/// What a running activity can ask of the engine: who it is, heartbeats,
/// cancellation and progress events.
///
/// Once the attempt has ended (its result was returned, it timed out, it was canceled
/// or its worker stopped it), every clone of its context is canceled: work the
/// activity left running (a spawned task) learns through [`ActivityContext::is_cancelled`],
/// [`ActivityContext::cancelled`] or [`ActivityContext::heartbeat`] that the attempt is
/// over, and [`ActivityContext::progress`] records nothing more.
pub struct ActivityContext {
    inner: Arc<ActivityInner>,
    /// Whether this is the engine's own handle on a running attempt (the one
    /// [`ActivityContext::new`] returns, not a clone): the engine drops it when the
    /// attempt ends, however it ends, and that ends the attempt for every clone.
    ends_attempt: bool,
}

impl Clone for ActivityContext {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            ends_attempt: false,
        }
    }
}

impl Drop for ActivityContext {
    fn drop(&mut self) {
        if self.ends_attempt {
            self.inner.ended.store(true, Ordering::Release);
            self.inner.cancel.cancel();
        }
    }
}

struct ActivityInner {
    workflow_id: WorkflowId,
    /// The run that called it: its `created_at` (a workflow id may name a new run
    /// once retention has removed a finished one).
    run: Timestamp,
    activity_id: u32,
    attempt: u32,
    /// Sequence of the call's `activity_scheduled` event.
    scheduled_seq: Seq,
    /// Whether the call was made after the workflow's cancellation (clean-up work,
    /// which a cancellation does not stop), once a heartbeat has had to find out.
    clean_up: Mutex<Option<bool>>,
    name: String,
    cancel: CancellationToken,
    /// Whether the attempt has ended (see [`ActivityContext`]).
    ended: AtomicBool,
    last_heartbeat: Mutex<Instant>,
    last_cancel_check: Mutex<Option<Instant>>,
    progress_seq: AtomicU32,
    /// Whether a progress append found the history at [`progress_cutoff`]: this
    /// attempt records no more progress.
    progress_full: AtomicBool,
    /// How heartbeats keep the attempt owed to this execution in the store, when they do.
    durable: Option<Durable>,
    /// Whether the store said the attempt is no longer this execution's (a durable
    /// heartbeat found it given up or taken over): its outcome is not recorded.
    superseded: AtomicBool,
    /// This execution of the attempt (random, not zero; drawn at its first progress):
    /// its progress keys and events carry it, so a take-over's progress is neither
    /// dropped as repeats of the lost execution's nor mistaken for it.
    execution: OnceLock<u32>,
    engine: Option<Arc<EngineInner>>,
}

/// A random execution number, never zero (zero marks progress recorded before
/// executions were numbered).
fn new_execution() -> u32 {
    let n = uuid::Uuid::new_v4().as_u128() as u32;
    n.max(1)
}

/// How often a heartbeat may ask the store whether the workflow was canceled.
const CANCEL_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// How the heartbeats of an attempt marked started, whose `heartbeat_timeout` is
/// shorter than its budget, keep its owed entry's deadline ahead in the store
/// ([`crate::Store::extend_attempt`]), so that the sweeper notices a lost worker
/// about a heartbeat timeout after its last heartbeat, not at the budget's end.
#[derive(Debug, Clone)]
pub(crate) struct DurableHeartbeat {
    /// The attempt's owed key.
    pub(crate) key: String,
    /// The copy of the task that marked it started, and when: this execution's mark.
    pub(crate) copy: u32,
    /// When the mark was made (its `started`).
    pub(crate) started: Timestamp,
    /// How far ahead of a heartbeat its write sets the deadline: the heartbeat
    /// timeout + `engine.activity_grace`.
    pub(crate) window: Duration,
    /// The latest deadline a write sets: the mark's start + the attempt's budget +
    /// grace, the deadline the attempt would have had without heartbeats.
    pub(crate) latest: Timestamp,
    /// Least time between two writes: half the shorter of the heartbeat timeout and
    /// the grace, so a live worker's deadline stays at least half the grace ahead of
    /// its own heartbeat timeout.
    pub(crate) every: Duration,
}

impl DurableHeartbeat {
    /// The deadline the mark sets: a window after it.
    pub(crate) fn marked(&self) -> Timestamp {
        self.started.plus(self.window)
    }
}

/// A [`DurableHeartbeat`] and where its writes stand.
struct Durable {
    plan: DurableHeartbeat,
    /// When the next write may be made (`None`: never), and the deadline last written.
    state: Mutex<(Option<Instant>, Timestamp)>,
}

impl ActivityContext {
    /// The context of an attempt about to run; the caller keeps it for as long as the
    /// attempt runs and hands clones to the activity: dropping it ends the attempt
    /// (cancels `cancel`, for the clones too).
    pub(crate) fn new(
        engine: Option<Arc<EngineInner>>,
        (workflow_id, run): (WorkflowId, Timestamp),
        (activity_id, attempt, scheduled_seq): (u32, u32, Seq),
        name: String,
        cancel: CancellationToken,
        durable: Option<DurableHeartbeat>,
    ) -> Self {
        let durable = durable.map(|plan| Durable {
            // The mark was the first write.
            state: Mutex::new((Instant::now().checked_add(plan.every), plan.marked())),
            plan,
        });
        Self {
            inner: Arc::new(ActivityInner {
                workflow_id,
                run,
                activity_id,
                attempt,
                scheduled_seq,
                clean_up: Mutex::new(None),
                name,
                cancel,
                ended: AtomicBool::new(false),
                last_heartbeat: Mutex::new(Instant::now()),
                last_cancel_check: Mutex::new(None),
                progress_seq: AtomicU32::new(0),
                progress_full: AtomicBool::new(false),
                durable,
                superseded: AtomicBool::new(false),
                execution: OnceLock::new(),
                engine,
            }),
            ends_attempt: true,
        }
    }

    /// A context for calling an activity function directly in a unit test:
    /// heartbeats and progress go nowhere; `cancel` cancels it (and nothing else does:
    /// dropping it does not).
    #[must_use]
    pub fn for_test(attempt: u32, cancel: CancellationToken) -> Self {
        let mut ctx = Self::new(
            None,
            (WorkflowId::random(), Timestamp::now()),
            (1, attempt, Seq(2)),
            "test".to_string(),
            cancel,
            None,
        );
        ctx.ends_attempt = false;
        ctx
    }

    /// Reports `count` LLM tokens of `kind` (`input`, `output`, `cached_input`, ...)
    /// used with `model` of `provider`, e.g. from a completion's usage block, to the
    /// engine's observer (`marathon_llm_tokens_total` on `/metrics`). Counted per call,
    /// so an attempt that is retried counts the tokens every attempt used. Keep the
    /// labels few: provider and model names, not prompts or ids.
    pub fn record_llm_tokens(&self, provider: &str, model: &str, kind: &str, count: u64) {
        if let Some(engine) = &self.inner.engine {
            engine.observer.llm_tokens(provider, model, kind, count);
        }
    }

    /// The workflow that called this activity.
    #[must_use]
    pub fn workflow_id(&self) -> &WorkflowId {
        &self.inner.workflow_id
    }

    /// The call's command id within its workflow.
    #[must_use]
    pub fn activity_id(&self) -> u32 {
        self.inner.activity_id
    }

    /// The registered activity name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// This attempt's number, from 1.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// A key that is the same for every attempt of this call and unique across
    /// calls, also across runs of a reused workflow id: pass it to providers that
    /// deduplicate requests. `{workflow_id}:{run}:{activity_id}`, where `run` is the
    /// run's `created_at` in ms.
    #[must_use]
    pub fn idempotency_key(&self) -> String {
        format!(
            "{}:{}:{}",
            self.inner.workflow_id, self.inner.run.0, self.inner.activity_id
        )
    }

    /// Whether cancellation has reached this attempt, or the attempt has ended.
    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.inner.cancel.is_cancelled()
    }

    /// Resolves when cancellation reaches this attempt, or the attempt ends.
    pub async fn cancelled(&self) {
        self.inner.cancel.cancelled().await;
    }

    pub(crate) fn last_heartbeat(&self) -> Instant {
        *self.inner.last_heartbeat.lock()
    }

    /// Whether the store said this attempt is no longer this execution's (given up or
    /// taken over, found by a durable heartbeat): its outcome is not to be recorded.
    pub(crate) fn superseded(&self) -> bool {
        self.inner.superseded.load(Ordering::Acquire)
    }

    /// Reports liveness (resets the heartbeat timeout) and learns of cancellation.
    ///
    /// With a `heartbeat_timeout` shorter than the attempt's budget, the heartbeat is
    /// also recorded in the store (at most once per half of the shorter of that timeout
    /// and `engine.activity_grace`; that write also stands for the cancellation check),
    /// so that if this worker is lost, another notices about a heartbeat timeout later.
    ///
    /// A call the workflow made after it had seen its cancellation (clean-up work) is
    /// not canceled by it; it is stopped only if the workflow closes.
    ///
    /// # Errors
    /// A `canceled` [`ActivityError`] once the workflow has been canceled (or has
    /// closed), the attempt has ended, or the store says the attempt is no longer this
    /// execution's (it was given up or taken over); return it.
    pub async fn heartbeat(&self) -> Result<(), ActivityError> {
        let now = Instant::now();
        *self.inner.last_heartbeat.lock() = now;
        if self.inner.cancel.is_cancelled() {
            return Err(ActivityError::canceled());
        }
        let Some(engine) = &self.inner.engine else {
            return Ok(());
        };
        if let Some(extended) = self.extend(engine, now).await {
            // The write read the cancel request too: it is this second's check.
            *self.inner.last_cancel_check.lock() = Some(now);
            return match extended {
                AttemptExtend::Extended { cancel_requested } => {
                    if self.stopped_by_request(engine, cancel_requested).await {
                        return Err(self.stop());
                    }
                    Ok(())
                }
                AttemptExtend::NotOwed => {
                    tracing::info!(workflow_id = %self.inner.workflow_id, activity_id = self.inner.activity_id, attempt = self.inner.attempt, "stopping an attempt the store no longer owes this execution (given up, taken over, or its workflow closed)");
                    self.inner.superseded.store(true, Ordering::Release);
                    Err(self.stop())
                }
            };
        }
        let due = {
            let mut last = self.inner.last_cancel_check.lock();
            let due = last.is_none_or(|t| t.elapsed() >= CANCEL_CHECK_INTERVAL);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            // Cancellation requested through another replica reaches us through the store.
            // So does the end of the run that called it: closed, removed by retention, or
            // replaced by a newer run of its id (whose history its result cannot join).
            let stop = match engine.store.get(&self.inner.workflow_id).await {
                Ok(None) => true,
                Ok(Some(s)) => {
                    s.created_at != self.inner.run
                        || s.status.is_terminal()
                        || self.stopped_by_request(engine, s.cancel_requested).await
                }
                // Asked again at the next check.
                Err(_) => false,
            };
            if stop {
                return Err(self.stop());
            }
        }
        Ok(())
    }

    /// Writes the durable heartbeat if one is due ([`DurableHeartbeat`]); what the
    /// store said, or `None` when no write was due or it failed (tried again after
    /// the cancellation check's interval, or `every` if shorter).
    async fn extend(&self, engine: &EngineInner, now: Instant) -> Option<AttemptExtend> {
        let durable = self.inner.durable.as_ref()?;
        let plan = &durable.plan;
        let deadline = engine.clock.now().plus(plan.window).min(plan.latest);
        {
            let mut state = durable.state.lock();
            // Not yet, or nothing to move (the deadline has reached the budget's end).
            if state.0.is_none_or(|next| now < next) || deadline <= state.1 {
                return None;
            }
            state.0 = now.checked_add(plan.every);
        }
        match engine
            .store
            .extend_attempt(
                &self.inner.workflow_id,
                &plan.key,
                plan.copy,
                plan.started,
                deadline,
            )
            .await
        {
            Ok(extended) => {
                durable.state.lock().1 = deadline;
                Some(extended)
            }
            Err(e) => {
                let retry = plan.every.min(CANCEL_CHECK_INTERVAL);
                tracing::warn!(workflow_id = %self.inner.workflow_id, activity_id = self.inner.activity_id, attempt = self.inner.attempt, error = %e, "could not record a heartbeat in the store; trying again in {retry:?}");
                durable.state.lock().0 = now.checked_add(retry);
                None
            }
        }
    }

    /// Cancels this attempt's context (work it spawned sees it) and returns the
    /// `canceled` error its caller returns.
    fn stop(&self) -> ActivityError {
        self.inner.cancel.cancel();
        ActivityError::canceled()
    }

    /// Whether the workflow's cancellation, if `cancel_requested`, stops this call: it
    /// does unless the call is clean-up work ([`Self::clean_up`]) or the store cannot
    /// tell yet.
    async fn stopped_by_request(&self, engine: &EngineInner, cancel_requested: bool) -> bool {
        cancel_requested && self.clean_up(engine).await == Some(false)
    }

    /// Whether this call was made after the workflow's `cancel_requested` (clean-up),
    /// read from the history once: it is canceled only if the request came after its
    /// `activity_scheduled`. `None` when the store cannot tell now (asked again on the
    /// next heartbeat).
    async fn clean_up(&self, engine: &EngineInner) -> Option<bool> {
        if let Some(known) = *self.inner.clean_up.lock() {
            return Some(known);
        }
        let request = engine
            .cancel_requested_after(&self.inner.workflow_id, self.inner.scheduled_seq)
            .await
            .ok()?;
        let clean_up = request.is_none();
        *self.inner.clean_up.lock() = Some(clean_up);
        Some(clean_up)
    }

    /// Appends a `progress` event to the workflow's history (streamed tokens,
    /// status); it is visible to event subscribers at once and not replayed.
    ///
    /// # Errors
    /// A retryable [`ActivityError`] when the store cannot be reached; a permanent one
    /// (kind `invalid_argument`) for data nested deeper than
    /// [`crate::MAX_VALUE_DEPTH`] levels or larger than [`crate::MAX_PAYLOAD_BYTES`]
    /// as JSON, which is not recorded; a `canceled` one, recording nothing, once the
    /// attempt has ended (work it left running must not add to the history of the
    /// attempts after it); a `canceled` one, recording nothing, once the run has closed
    /// or is gone (the attempt's context is canceled too).
    ///
    /// Progress is best effort once the history is long: after an append finds the
    /// history at 90 % of [`crate::EngineConfig::max_history_events`], this attempt's
    /// further progress is not recorded (a warning is logged once, and the call returns
    /// `Ok`), so that streaming never takes the room the run needs for its own events
    /// and fails it with `history_limit`.
    pub async fn progress<T: Serialize>(&self, data: &T) -> Result<(), ActivityError> {
        if self.inner.ended.load(Ordering::Acquire) {
            return Err(ActivityError::canceled());
        }
        let Some(engine) = &self.inner.engine else {
            return Ok(());
        };
        if self.inner.progress_full.load(Ordering::Acquire) {
            return Ok(());
        }
        let data = serde_json::to_value(data)?;
        if crate::nests_deeper_than(&data, crate::MAX_VALUE_DEPTH) {
            return Err(ActivityError::permanent(format!(
                "progress data nests deeper than {} levels",
                crate::MAX_VALUE_DEPTH
            ))
            .with_kind("invalid_argument"));
        }
        if crate::json_larger_than(&data, crate::MAX_PAYLOAD_BYTES) {
            return Err(ActivityError::permanent(format!(
                "progress data takes more than {} bytes as JSON",
                crate::MAX_PAYLOAD_BYTES
            ))
            .with_kind("invalid_argument"));
        }
        let n = self.inner.progress_seq.fetch_add(1, Ordering::Relaxed);
        let execution = *self.inner.execution.get_or_init(new_execution);
        let append = KeyedAppend {
            key: Some(format!(
                "p:{}:{}:{:x}:{n}",
                self.inner.activity_id, self.inner.attempt, execution
            )),
            requires: None,
            requires_deadline: None,
            events: vec![NewEvent::new(
                engine.clock.now(),
                EventData::Progress {
                    activity_id: self.inner.activity_id,
                    attempt: self.inner.attempt,
                    execution,
                    data,
                },
            )],
            owed: Default::default(),
        };
        let outcome = match engine
            .store
            .append_keyed(&self.inner.workflow_id, append)
            .await
        {
            // The run has ended (closed, or removed by retention): the attempt stops,
            // as its next heartbeat would have it.
            Ok(KeyedOutcome::Closed) | Err(StoreError::NotFound(_)) => return Err(self.stop()),
            Ok(outcome) => outcome,
            Err(e) => {
                return Err(
                    ActivityError::retryable(format!("recording progress: {e}")).with_kind("store")
                );
            }
        };
        if let KeyedOutcome::Appended(seq) = outcome
            && seq.0 >= progress_cutoff(engine.config.max_history_events)
            && !self.inner.progress_full.swap(true, Ordering::AcqRel)
        {
            tracing::warn!(
                workflow_id = %self.inner.workflow_id,
                activity_id = self.inner.activity_id,
                attempt = self.inner.attempt,
                events = seq.0,
                "the workflow's history is near engine.max_history_events: this attempt's further progress is not recorded, leaving the room to the run's own events"
            );
        }
        Ok(())
    }
}

/// The history length from which an attempt stops recording progress: 90 % of
/// `max_history_events` (the rest is the run's own), at least 1.
fn progress_cutoff(max_history_events: u64) -> u64 {
    (max_history_events - max_history_events / 10).max(1)
}
