//! Hooks through which the engine reports what it does, without depending on
//! any exporter: `marathon-observability` implements [`Observer`] with
//! Prometheus metrics and OpenTelemetry context propagation.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::engine::EngineError;
use crate::model::{Task, WorkflowStatus};

/// The future that runs one task (see [`TaskScope`]).
pub type TaskFuture<'a> = Pin<Box<dyn Future<Output = Result<(), EngineError>> + Send + 'a>>;

/// Wraps the future that runs one task (see [`TaskScope::wrap`]).
pub type WrapTask = Box<dyn for<'a> FnOnce(TaskFuture<'a>) -> TaskFuture<'a> + Send>;

/// How one task runs, as [`Observer::task_scope`] sets it up from the task and the
/// trace context its message carried: the span it runs in and, optionally, a wrapper
/// around its future.
pub struct TaskScope {
    /// The span the task runs in (see [`task_span`]).
    pub span: tracing::Span,
    /// Wraps the task's future, which already runs inside `span`: to make the context
    /// the message carried current while the task runs, say. `None` runs it as it is.
    pub wrap: Option<WrapTask>,
}

impl TaskScope {
    /// The task runs in `span`, its future as it is.
    #[must_use]
    pub fn new(span: tracing::Span) -> Self {
        Self { span, wrap: None }
    }

    /// The task runs in `span`, its future wrapped by `wrap`.
    #[must_use]
    pub fn wrapped(
        span: tracing::Span,
        wrap: impl for<'a> FnOnce(TaskFuture<'a>) -> TaskFuture<'a> + Send + 'static,
    ) -> Self {
        Self {
            span,
            wrap: Some(Box::new(wrap)),
        }
    }
}

impl std::fmt::Debug for TaskScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskScope")
            .field("span", &self.span)
            .field("wrap", &self.wrap.is_some())
            .finish()
    }
}

/// The activity name [`Observer::activity_running`] and [`Observer::activity_attempt`]
/// get for an attempt of an activity not registered on this worker: names the code
/// makes up (from a model's tool call, say) are unbounded, so not reported as such.
pub const UNREGISTERED_ACTIVITY: &str = "unregistered";

/// How one activity attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// The activity returned a value.
    Completed,
    /// It failed and another attempt follows.
    Retrying,
    /// It failed for good.
    Failed,
    /// Its result was not recorded (a late or repeated attempt, or a finished workflow).
    Dropped,
}

impl AttemptOutcome {
    /// The outcome's label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Completed => "completed",
            AttemptOutcome::Retrying => "retrying",
            AttemptOutcome::Failed => "failed",
            AttemptOutcome::Dropped => "dropped",
        }
    }
}

/// How one workflow task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    /// New events were recorded.
    Recorded,
    /// Nothing new to record (a duplicate delivery to an open run; tasks of a closed
    /// or missing run report no outcome).
    Nothing,
    /// It lost a conditional append and replayed.
    Conflict,
    /// The code could not run (non-determinism, panic, unknown workflow).
    Failed,
}

impl TaskOutcome {
    /// The outcome's label value.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            TaskOutcome::Recorded => "recorded",
            TaskOutcome::Nothing => "nothing",
            TaskOutcome::Conflict => "conflict",
            TaskOutcome::Failed => "failed",
        }
    }
}

/// Receives the engine's measurements and carries trace context; every method has a no-op default.
///
/// Called on hot paths: implementations must not block.
pub trait Observer: Send + Sync + 'static {
    /// A workflow was created.
    fn workflow_started(&self, _name: &str) {}

    /// A workflow finished, `duration` after it started: reported by the task whose
    /// append closed it, once the store answered (not when that reply was lost).
    fn workflow_closed(&self, _name: &str, _status: WorkflowStatus, _duration: Duration) {}

    /// A workflow task ran the code for `duration` over a history of `history_len` events.
    fn workflow_task(
        &self,
        _name: &str,
        _outcome: TaskOutcome,
        _duration: Duration,
        _history_len: u64,
    ) {
    }

    /// An activity attempt began (`delta` = 1) or ended (`delta` = -1); `name` is
    /// [`UNREGISTERED_ACTIVITY`] for an activity not registered here.
    fn activity_running(&self, _name: &str, _delta: i64) {}

    /// An activity attempt ended after `duration`; `error_kind` is set when it failed.
    /// `name` is [`UNREGISTERED_ACTIVITY`] for an activity not registered here.
    /// `duration` is `None` for an attempt the sweeper gave up (`timeout.lost`,
    /// `timeout.schedule_to_close`): no worker measured it.
    fn activity_attempt(
        &self,
        _name: &str,
        _outcome: AttemptOutcome,
        _duration: Option<Duration>,
        _error_kind: Option<&str>,
    ) {
    }

    /// The sweeper acted on overdue work of `kind` (`workflow_task`, `timer`, `activity`).
    fn overdue(&self, _kind: &'static str) {}

    /// A receive on `queue` returned `count` messages after `latency`.
    fn queue_received(&self, _queue: &str, _count: usize, _latency: Duration) {}

    /// The approximate depth of `queue`, sampled.
    fn queue_depth(&self, _queue: &str, _depth: u64) {}

    /// Sampling the depth of `queue` failed: the last sample no longer holds.
    fn queue_depth_unknown(&self, _queue: &str) {}

    /// `count` tasks were found dead-lettered on `queue` (0 when a worker starts
    /// serving it, so that the count exists before the first dead letter).
    fn dead_lettered(&self, _queue: &str, _count: usize) {}

    /// An activity used `count` LLM tokens of `kind` (`input`, `output`,
    /// `cached_input`, ...) with `model` of `provider`
    /// ([`ActivityContext::record_llm_tokens`](crate::ActivityContext::record_llm_tokens)).
    fn llm_tokens(&self, _provider: &str, _model: &str, _kind: &str, _count: u64) {}

    /// How a task runs, given the trace context its message carried (a W3C
    /// `traceparent`): the span it runs in, a child of that context, and anything its
    /// future should run inside. Called once per task, so that the context is read
    /// once. The default: [`task_span`], the future as it is.
    fn task_scope(&self, task: &Task, _trace_context: Option<&str>) -> TaskScope {
        TaskScope::new(task_span(task))
    }

    /// The W3C `traceparent` of the current span, put into outgoing messages.
    fn trace_context(&self) -> Option<String> {
        None
    }

    /// Links the current span to the span `trace_context` (a W3C `traceparent`)
    /// names: the span of a signal or cancellation, which is a trace of its own, to
    /// the run it reaches, whose trace the task it causes continues.
    fn link(&self, _trace_context: &str) {}
}

/// The one span of a task: `marathon.workflow_task` (fields `workflow_id`,
/// `workflow`, `outcome`) for a workflow task, `marathon.activity` (`workflow_id`,
/// `activity`, `activity_id`, `attempt`, `outcome`) for an activity attempt.
///
/// Every field the task itself carries is set here, so that the engine records only
/// what it learns while running the task (the outcome, and the workflow's name):
/// each later record is another call into every layer of the subscriber.
#[must_use]
pub fn task_span(task: &Task) -> tracing::Span {
    task_span_in!("marathon_core::observe", task)
}

/// Records fields of the current span (the running task's [`task_span`]), given by
/// name, in one call; names the span does not have are left out (and without any of
/// its names, nothing is recorded).
///
/// Through the dispatcher and the current span's id: `Span::current()` would take a
/// reference to the span and release it again through every layer of the subscriber
/// (about 600 instructions a record under callgrind), and every record is a call into
/// each layer, the log layer formatting the fields again: hence one call for all.
pub(crate) fn record_current<const N: usize>(values: [(&str, &dyn tracing::field::Value); N]) {
    tracing::dispatcher::get_default(|dispatch| {
        let Some((id, meta)) = dispatch.current_span().into_inner() else {
            return;
        };
        let fields = meta.fields();
        let Some(first) = fields.iter().next() else {
            return;
        };
        // A name the span does not have becomes an absent value (which no layer sees)
        // under one of its own fields.
        let found = values.map(|(name, value)| match fields.field(name) {
            Some(field) => (field, Some(value)),
            None => (first.clone(), None),
        });
        if found.iter().all(|(_, value)| value.is_none()) {
            return;
        }
        let set = found.each_ref().map(|(field, value)| (field, *value));
        dispatch.record(&id, &tracing::span::Record::new(&fields.value_set(&set)));
    });
}

/// The target of [`untraced_task_span`]: a subscriber's trace exporter leaves it out.
pub const UNTRACED_TARGET: &str = "marathon::untraced";

/// [`task_span`] with target [`UNTRACED_TARGET`], for a task whose trace is not
/// sampled: logs still show it around what the task logs, and a trace exporter that
/// filters the target out spends nothing on it.
#[must_use]
pub fn untraced_task_span(task: &Task) -> tracing::Span {
    task_span_in!("marathon::untraced", task)
}

/// The span of `task` with the given target (a literal: each target is a callsite).
macro_rules! task_span_in {
    ($target:literal, $task:expr) => {{
        use tracing::field::Empty;
        match $task {
            Task::Activity(t) => tracing::info_span!(
                target: $target,
                "marathon.activity",
                workflow_id = t.workflow_id.as_str(),
                activity = t.call.as_ref().map(|c| c.name.as_str()),
                // As i64: the OpenTelemetry layer exports integers it gets as i64;
                // a u32 would reach it through `Debug`, as text, via `format!`.
                activity_id = i64::from(t.activity_id),
                attempt = i64::from(t.attempt),
                outcome = Empty,
            ),
            Task::Workflow { workflow_id, .. } => tracing::info_span!(
                target: $target,
                "marathon.workflow_task",
                workflow_id = workflow_id.as_str(),
                workflow = Empty,
                outcome = Empty,
            ),
        }
    }};
}
use task_span_in;

/// The default observer: records nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoopObserver;

impl Observer for NoopObserver {}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::field::{Field, Visit};
    use tracing_subscriber::layer::{Context, SubscriberExt as _};

    use super::record_current;
    use crate::model::{Task, WorkflowId};

    /// Every record a span gets, as `name=value` pairs.
    #[derive(Clone, Default)]
    struct Records(Arc<Mutex<Vec<Vec<String>>>>);

    struct Pairs(Vec<String>);

    impl Visit for Pairs {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            self.0.push(format!("{}={value:?}", field.name()));
        }
    }

    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Records {
        fn on_record(
            &self,
            _: &tracing::span::Id,
            values: &tracing::span::Record<'_>,
            _: Context<'_, S>,
        ) {
            let mut pairs = Pairs(Vec::new());
            values.record(&mut pairs);
            self.0.lock().expect("not poisoned").push(pairs.0);
        }
    }

    #[test]
    fn records_named_fields_of_the_current_span_in_one_call() {
        let records = Records::default();
        let subscriber = tracing_subscriber::registry().with(records.clone());
        tracing::subscriber::with_default(subscriber, || {
            // Outside any span: nothing to record on, and no panic.
            record_current([("outcome", &"recorded")]);
            let task = Task::workflow(WorkflowId::parse("w-1").expect("valid id"));
            let span = super::task_span(&task);
            let _entered = span.enter();
            record_current([("workflow", &"checkout"), ("outcome", &"recorded")]);
            // A name the span does not have is left out; the others are recorded, and
            // nothing is when none is the span's, nor in a span without fields.
            record_current([("nope", &1_i64), ("outcome", &"conflict")]);
            record_current([("nope", &1_i64)]);
            let plain = tracing::info_span!("plain");
            let _inner = plain.enter();
            record_current([("outcome", &"failed")]);
        });
        let seen = records.0.lock().expect("not poisoned").clone();
        assert_eq!(
            seen,
            [
                vec![
                    r#"workflow="checkout""#.to_string(),
                    r#"outcome="recorded""#.to_string()
                ],
                vec![r#"outcome="conflict""#.to_string()],
            ]
        );
    }
}
