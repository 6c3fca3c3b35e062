//! `WorkflowContext`: the only door from workflow code to time, I/O and randomness.
//!
//! Every call is deterministic under replay: activity calls and timers take the
//! next command id and resolve from the recorded history; signals and
//! cancellation are delivered from recorded events; `now` and `random` come
//! from the history and the run (workflow id and creation time).

use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use crate::model::{ActivityOptions, Timestamp, WorkflowError, WorkflowId};

/// What the workflow code asked for during one poll, in call order.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Command {
    /// `ctx.activity(..)`.
    Activity {
        id: u32,
        name: String,
        input: Value,
        options: ActivityOptions,
    },
    /// `ctx.sleep(..)`.
    Timer { id: u32, fire_at: Timestamp },
}

impl Command {
    pub(crate) fn describe(&self) -> String {
        match self {
            Command::Activity { id, name, .. } => format!("activity {name:?} (command {id})"),
            Command::Timer { id, .. } => format!("timer (command {id})"),
        }
    }
}

/// A result slot of one command.
enum Slot<T> {
    Pending(Option<Waker>),
    Ready(T),
    Taken,
}

impl<T> Slot<T> {
    /// Resolves a pending slot; a slot already resolved (canceled, then a late
    /// result) keeps its first resolution.
    fn resolve(&mut self, value: T) {
        if let Slot::Pending(waker) = self {
            if let Some(w) = waker.take() {
                w.wake();
            }
            *self = Slot::Ready(value);
        }
    }

    fn poll_take(&mut self, cx: &Context<'_>) -> Poll<Option<T>> {
        match std::mem::replace(self, Slot::Taken) {
            Slot::Ready(v) => Poll::Ready(Some(v)),
            Slot::Taken => Poll::Ready(None),
            Slot::Pending(_) => {
                *self = Slot::Pending(Some(cx.waker().clone()));
                Poll::Pending
            }
        }
    }
}

/// The wakers of the futures waiting for one kind of input (a signal, the
/// cancellation): one slot per waiting future, so a future polled again (each
/// workflow task polls with a waker of its own) replaces its waker instead of adding
/// one, and a future that resolves or is dropped takes its slot away. Woken in the
/// order the slots were taken since the last wake-up, as a list of every poll's
/// waker would be (a future's later wakers there only repeated its first).
#[derive(Default)]
struct Waiters {
    next: u64,
    wakers: BTreeMap<u64, Waker>,
}

impl Waiters {
    /// Sets the waker of the future whose slot is `slot` (taking a slot if it has
    /// none, or its slot was emptied by a wake-up).
    fn register(&mut self, slot: &mut Option<u64>, waker: &Waker) {
        if let Some(w) = slot.and_then(|k| self.wakers.get_mut(&k)) {
            w.clone_from(waker);
            return;
        }
        let key = self.next;
        self.next += 1;
        self.wakers.insert(key, waker.clone());
        *slot = Some(key);
    }

    /// Gives up the future's slot, if it holds one.
    fn remove(&mut self, slot: &mut Option<u64>) {
        if let Some(k) = slot.take() {
            self.wakers.remove(&k);
        }
    }

    /// Empties every slot; their wakers, in order.
    fn take_all(&mut self) -> impl Iterator<Item = Waker> + use<> {
        std::mem::take(&mut self.wakers).into_values()
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.wakers.len()
    }
}

/// The replay state one workflow's code shares with the engine.
pub(crate) struct WfState {
    pub(crate) next_command: u32,
    pub(crate) now: Timestamp,
    rng: u64,
    /// By command id, ordered: a cancellation fails the pending ones in this order, and
    /// the order they are woken in is the order a `join_all` or `FuturesUnordered` polls
    /// them in, so it must be the same on every replay (a `HashMap`'s is not).
    activities: BTreeMap<u32, (String, Slot<Result<Value, WorkflowError>>)>,
    /// By command id, ordered, like `activities`.
    timers: BTreeMap<u32, Slot<Result<(), WorkflowError>>>,
    signals: HashMap<String, VecDeque<Value>>,
    signal_waiters: Waiters,
    cancel: Option<Option<String>>,
    /// Whether the code has learnt of the cancellation (a wait it polled returned the
    /// `canceled` error, `cancelled()` resolved, `is_cancel_requested()` said so): calls
    /// it makes from then on are clean-up work and run normally; until then, every new
    /// wait fails with it.
    cancel_seen: bool,
    cancel_waiters: Waiters,
    pub(crate) commands: Vec<Command>,
}

impl WfState {
    /// The state of run `started_at` (its `created_at`, the time of its
    /// `workflow_started`, also the workflow time until its first task) of workflow `id`.
    fn new(id: &WorkflowId, started_at: Timestamp) -> Self {
        // FNV-1a of the id and the run's creation time: a seed that is the same in
        // every process and Rust version, and another for a new run of a reused id.
        let mut seed: u64 = 0xcbf2_9ce4_8422_2325;
        for b in id.as_str().bytes().chain(started_at.0.to_be_bytes()) {
            seed ^= u64::from(b);
            seed = seed.wrapping_mul(0x0100_0000_01b3);
        }
        Self {
            next_command: 1,
            now: started_at,
            rng: seed,
            activities: BTreeMap::new(),
            timers: BTreeMap::new(),
            signals: HashMap::new(),
            signal_waiters: Waiters::default(),
            cancel: None,
            cancel_seen: false,
            cancel_waiters: Waiters::default(),
            commands: Vec::new(),
        }
    }

    fn next_random(&mut self) -> u64 {
        // splitmix64
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// How many wakers wait for a signal and for the cancellation.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> (usize, usize) {
        (self.signal_waiters.len(), self.cancel_waiters.len())
    }

    /// The name of the activity with command id `id`, if the code called it.
    pub(crate) fn activity_name(&self, id: u32) -> Option<&str> {
        self.activities.get(&id).map(|(n, _)| n.as_str())
    }

    pub(crate) fn resolve_activity(&mut self, id: u32, result: Result<Value, WorkflowError>) {
        if let Some((_, slot)) = self.activities.get_mut(&id) {
            slot.resolve(result);
        }
    }

    pub(crate) fn resolve_timer(&mut self, id: u32) {
        if let Some(slot) = self.timers.get_mut(&id) {
            slot.resolve(Ok(()));
        }
    }

    pub(crate) fn deliver_signal(&mut self, name: String, payload: Value) {
        self.signals.entry(name).or_default().push_back(payload);
        for w in self.signal_waiters.take_all() {
            w.wake();
        }
    }

    /// Delivers a cancel request: every pending activity, timer and signal wait fails
    /// with `canceled`; with none pending, the next wait the code starts does.
    pub(crate) fn deliver_cancel(&mut self, reason: Option<String>) {
        if self.cancel.is_some() {
            return;
        }
        let err = WorkflowError::canceled(reason.as_deref());
        self.cancel = Some(reason);
        for (_, slot) in self.activities.values_mut() {
            if matches!(slot, Slot::Pending(_)) {
                slot.resolve(Err(err.clone()));
            }
        }
        for slot in self.timers.values_mut() {
            if matches!(slot, Slot::Pending(_)) {
                slot.resolve(Err(err.clone()));
            }
        }
        for w in self
            .signal_waiters
            .take_all()
            .chain(self.cancel_waiters.take_all())
        {
            w.wake();
        }
    }

    /// The `canceled` error a wait started now fails with, without being recorded:
    /// cancellation was requested and the code has not learnt of it yet (it arrived
    /// before the first wait, or together with the result the code was waiting for).
    /// The code learns of it when it polls the wait ([`Self::saw`]); calls it makes
    /// before that fail too.
    fn unseen_cancel(&self) -> Option<WorkflowError> {
        let reason = self.cancel.as_ref().filter(|_| !self.cancel_seen)?;
        Some(WorkflowError::canceled(reason.as_deref()))
    }

    /// Notes that the code is handed `result`: a `canceled` error means it has now
    /// learnt of the cancellation. Only what the code polls counts: a dropped future's
    /// slot, failed by the cancellation, teaches it nothing.
    fn saw<T>(&mut self, result: &Result<T, WorkflowError>) {
        if let Err(e) = result
            && e.is_canceled()
            && self.cancel.is_some()
        {
            self.cancel_seen = true;
        }
    }
}

/// The handle workflow code uses for everything that is not pure computation.
///
/// Cheap to clone; all clones share one workflow's replay state.
#[derive(Clone)]
pub struct WorkflowContext {
    id: WorkflowId,
    state: Arc<Mutex<WfState>>,
}

impl WorkflowContext {
    /// The context of run `started_at` of workflow `id`; see [`WfState::new`].
    pub(crate) fn new(id: WorkflowId, started_at: Timestamp) -> Self {
        let state = Arc::new(Mutex::new(WfState::new(&id, started_at)));
        Self { id, state }
    }

    pub(crate) fn state(&self) -> &Arc<Mutex<WfState>> {
        &self.state
    }

    /// This workflow's id.
    #[must_use]
    pub fn workflow_id(&self) -> &WorkflowId {
        &self.id
    }

    /// Calls activity `name` with default [`ActivityOptions`].
    pub fn activity<I: Serialize, O: DeserializeOwned>(
        &self,
        name: &str,
        input: &I,
    ) -> ActivityFuture<O> {
        self.activity_with(name, input, ActivityOptions::default())
    }

    /// Calls activity `name` with `options` (retries, timeouts, task queue).
    ///
    /// The call is recorded when this method is called, not when the future is
    /// first polled, so calls made before a `join` are scheduled in parallel.
    pub fn activity_with<I: Serialize, O: DeserializeOwned>(
        &self,
        name: &str,
        input: &I,
        options: ActivityOptions,
    ) -> ActivityFuture<O> {
        let input = match serde_json::to_value(input) {
            Ok(v) => v,
            Err(e) => {
                return ActivityFuture {
                    state: self.state.clone(),
                    id: 0,
                    early: Some(Err(e.into())),
                    _out: PhantomData,
                };
            }
        };
        let mut st = self.state.lock();
        if let Some(err) = st.unseen_cancel() {
            return ActivityFuture {
                state: self.state.clone(),
                id: 0,
                early: Some(Err(err)),
                _out: PhantomData,
            };
        }
        let id = st.next_command;
        st.next_command += 1;
        st.activities
            .insert(id, (name.to_string(), Slot::Pending(None)));
        st.commands.push(Command::Activity {
            id,
            name: name.to_string(),
            input,
            options,
        });
        drop(st);
        ActivityFuture {
            state: self.state.clone(),
            id,
            early: None,
            _out: PhantomData,
        }
    }

    /// A durable timer: resolves `duration` after the current workflow time.
    ///
    /// Fails with a `canceled` error if the workflow is canceled first.
    pub fn sleep(&self, duration: Duration) -> TimerFuture {
        let mut st = self.state.lock();
        if let Some(err) = st.unseen_cancel() {
            return TimerFuture {
                state: self.state.clone(),
                id: 0,
                early: Some(err),
            };
        }
        if duration.is_zero() {
            return TimerFuture {
                state: self.state.clone(),
                id: 0,
                early: None,
            };
        }
        let id = st.next_command;
        st.next_command += 1;
        let fire_at = st.now.plus(duration);
        st.timers.insert(id, Slot::Pending(None));
        st.commands.push(Command::Timer { id, fire_at });
        drop(st);
        TimerFuture {
            state: self.state.clone(),
            id,
            early: None,
        }
    }

    /// The current workflow time: the time of the workflow task being run, the same on replay.
    #[must_use]
    pub fn now(&self) -> Timestamp {
        self.state.lock().now
    }

    /// A deterministic pseudo-random number: the same sequence on every replay of
    /// this run, another for each run (a new run of a reused id included).
    #[must_use]
    pub fn random(&self) -> u64 {
        self.state.lock().next_random()
    }

    /// A deterministic UUID (v4 layout) drawn from [`Self::random`].
    #[must_use]
    pub fn uuid(&self) -> uuid::Uuid {
        let hi = self.random();
        let lo = self.random();
        uuid::Builder::from_random_bytes(((u128::from(hi) << 64) | u128::from(lo)).to_be_bytes())
            .into_uuid()
    }

    /// Waits for the next signal called `name` (signals that arrived earlier are buffered).
    ///
    /// Fails with a `canceled` error if the workflow is canceled first. A signal whose
    /// payload is not a `T` is skipped (logged, and still in the history) and the wait
    /// goes on, so a client's malformed signal cannot fail the run; wait for a
    /// `serde_json::Value` to see every payload. A name no signal can have (empty, or
    /// over [`crate::engine::MAX_SIGNAL_NAME_LEN`] bytes) fails with `invalid_argument`.
    pub fn signal<T: DeserializeOwned>(&self, name: &str) -> SignalFuture<T> {
        SignalFuture {
            state: self.state.clone(),
            name: name.to_string(),
            waiter: None,
            _out: PhantomData,
        }
    }

    /// Whether cancellation of this workflow has been requested.
    #[must_use]
    pub fn is_cancel_requested(&self) -> bool {
        let mut st = self.state.lock();
        let requested = st.cancel.is_some();
        st.cancel_seen |= requested;
        requested
    }

    /// Resolves once cancellation is requested, with the reason given.
    pub fn cancelled(&self) -> CancelledFuture {
        CancelledFuture {
            state: self.state.clone(),
            waiter: None,
        }
    }
}

/// The result of an activity call; see [`WorkflowContext::activity`].
#[must_use = "an activity result is only delivered when awaited"]
pub struct ActivityFuture<O> {
    state: Arc<Mutex<WfState>>,
    id: u32,
    early: Option<Result<Value, WorkflowError>>,
    _out: PhantomData<fn() -> O>,
}

impl<O> ActivityFuture<O> {
    /// The command id of this call (also its activity id in the history); 0 for a
    /// call that failed at once and was not recorded (an input that does not
    /// serialize, or a cancellation the code had not seen yet).
    #[must_use]
    pub fn activity_id(&self) -> u32 {
        self.id
    }
}

impl<O: DeserializeOwned> Future for ActivityFuture<O> {
    type Output = Result<O, WorkflowError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut st = this.state.lock();
        let result = if let Some(r) = this.early.take() {
            r
        } else {
            let Some((_, slot)) = st.activities.get_mut(&this.id) else {
                return Poll::Ready(Err(WorkflowError::new("activity future polled twice")));
            };
            match slot.poll_take(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    return Poll::Ready(Err(WorkflowError::new(
                        "activity result already taken (future polled after completion)",
                    )));
                }
                Poll::Ready(Some(r)) => r,
            }
        };
        st.saw(&result);
        drop(st);
        Poll::Ready(result.and_then(|v| serde_json::from_value(v).map_err(WorkflowError::from)))
    }
}

/// A durable timer; see [`WorkflowContext::sleep`].
#[must_use = "a timer only delays the workflow when awaited"]
pub struct TimerFuture {
    state: Arc<Mutex<WfState>>,
    id: u32,
    /// Set when it failed at once (a cancellation the code had not seen).
    early: Option<WorkflowError>,
}

impl Future for TimerFuture {
    type Output = Result<(), WorkflowError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut st = this.state.lock();
        let result = if this.id == 0 {
            this.early.take().map_or(Ok(()), Err)
        } else {
            let Some(slot) = st.timers.get_mut(&this.id) else {
                return Poll::Ready(Ok(()));
            };
            match slot.poll_take(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => Ok(()),
                Poll::Ready(Some(r)) => r,
            }
        };
        st.saw(&result);
        Poll::Ready(result)
    }
}

/// The next signal of one name; see [`WorkflowContext::signal`].
#[must_use = "a signal is only received when awaited"]
pub struct SignalFuture<T> {
    state: Arc<Mutex<WfState>>,
    name: String,
    /// Its slot among the signal waiters, while it waits.
    waiter: Option<u64>,
    _out: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Future for SignalFuture<T> {
    type Output = Result<T, WorkflowError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        // No signal can have such a name (`Engine::signal` refuses it): fail, not wait forever.
        if this.name.is_empty() || this.name.len() > crate::engine::MAX_SIGNAL_NAME_LEN {
            return Poll::Ready(Err(WorkflowError::new(format!(
                "signal name {:?} must be 1 to {} bytes: no signal can be sent with it",
                this.name,
                crate::engine::MAX_SIGNAL_NAME_LEN
            ))
            .with_kind("invalid_argument")));
        }
        let mut st = this.state.lock();
        // A payload that is not a `T` is consumed and skipped: a signal from outside
        // must not be able to fail the run (the code sees every payload with `Value`).
        while let Some(v) = st.signals.get_mut(&this.name).and_then(VecDeque::pop_front) {
            match serde_json::from_value(v) {
                Ok(t) => {
                    st.signal_waiters.remove(&mut this.waiter);
                    return Poll::Ready(Ok(t));
                }
                Err(e) => tracing::warn!(
                    signal = %this.name,
                    error = %e,
                    "skipping a signal whose payload does not match the type the workflow waits for"
                ),
            }
        }
        // Like a timer or an activity: canceled until the code has seen the
        // cancellation, then a wait like any other (clean-up may wait for a signal).
        if let Some(err) = st.unseen_cancel() {
            let result = Err(err);
            st.saw(&result);
            st.signal_waiters.remove(&mut this.waiter);
            return Poll::Ready(result);
        }
        st.signal_waiters.register(&mut this.waiter, cx.waker());
        Poll::Pending
    }
}

impl<T> Drop for SignalFuture<T> {
    fn drop(&mut self) {
        if self.waiter.is_some() {
            self.state.lock().signal_waiters.remove(&mut self.waiter);
        }
    }
}

/// Resolves when cancellation is requested; see [`WorkflowContext::cancelled`].
#[must_use = "does nothing unless awaited"]
pub struct CancelledFuture {
    state: Arc<Mutex<WfState>>,
    /// Its slot among the cancellation's waiters, while it waits.
    waiter: Option<u64>,
}

impl Future for CancelledFuture {
    type Output = Option<String>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut st = this.state.lock();
        match &st.cancel {
            Some(reason) => {
                let reason = reason.clone();
                st.cancel_seen = true;
                st.cancel_waiters.remove(&mut this.waiter);
                Poll::Ready(reason)
            }
            None => {
                st.cancel_waiters.register(&mut this.waiter, cx.waker());
                Poll::Pending
            }
        }
    }
}

impl Drop for CancelledFuture {
    fn drop(&mut self) {
        if self.waiter.is_some() {
            self.state.lock().cancel_waiters.remove(&mut self.waiter);
        }
    }
}
