//! The span batch processor: finished spans wait in a bounded queue for a thread of
//! their own, which sends them to the exporter in batches, so that a slow or absent
//! collector never blocks a workflow. A full queue drops new spans, and unlike the
//! SDK's processor (which counts them only for its compiled-out internal logs) this one
//! reports them: `marathon_trace_spans_dropped_total{reason="queue_full"}`, and a
//! warning at the first drop, then at most one a minute with the spans dropped since.
//!
//! Settings are the standard `OTEL_BSP_*` variables ([`BatchSettings::from_env`]).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use opentelemetry::Context;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Span, SpanData, SpanProcessor};

use crate::TelemetryError;

/// Spans the queue holds before it drops new ones, unless `OTEL_BSP_MAX_QUEUE_SIZE`
/// says otherwise. With the spec's 2,048 the overhead bench delivered 9.5–12 % of its
/// spans; with this, 63 % (sessions 2 and 4, with the SDK's processor; docs/BENCHMARKS.md).
pub(crate) const DEFAULT_QUEUE_SIZE: usize = 16_384;
/// Spans per export request, unless `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` says otherwise:
/// larger than the spec's 512, so that the queue drains in fewer round trips.
pub(crate) const DEFAULT_EXPORT_BATCH_SIZE: usize = 2_048;
/// The longest a span waits for a batch to fill, unless `OTEL_BSP_SCHEDULE_DELAY` (ms)
/// says otherwise: the spec's 5 s.
pub(crate) const DEFAULT_SCHEDULE_DELAY: Duration = Duration::from_secs(5);
/// The largest `OTEL_BSP_MAX_QUEUE_SIZE` taken: the queue is allocated whole at
/// start-up (about 360 bytes a slot, some 380 MB at this size), so a mistyped size
/// would abort the process (or panic, past `isize::MAX` bytes) instead of being refused.
pub(crate) const MAX_QUEUE_SIZE: usize = 1 << 20;
/// How long a `force_flush` waits for the export thread.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(30);
/// How often, at most, dropped spans are reported in the log.
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// The batch processor's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BatchSettings {
    /// Spans queued at most (`OTEL_BSP_MAX_QUEUE_SIZE`).
    pub(crate) max_queue_size: usize,
    /// Spans per export at most (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`; at most the queue size).
    pub(crate) max_export_batch_size: usize,
    /// The longest a span waits before it is exported (`OTEL_BSP_SCHEDULE_DELAY`, ms).
    pub(crate) schedule_delay: Duration,
}

impl Default for BatchSettings {
    fn default() -> Self {
        Self {
            max_queue_size: DEFAULT_QUEUE_SIZE,
            max_export_batch_size: DEFAULT_EXPORT_BATCH_SIZE,
            schedule_delay: DEFAULT_SCHEDULE_DELAY,
        }
    }
}

impl BatchSettings {
    /// The settings `env` gives (unset or blank: Marathon's default). The SDK's own
    /// `OTEL_BSP_EXPORT_TIMEOUT` is not used by a thread-based processor; each export
    /// is bounded by `OTEL_EXPORTER_OTLP_TIMEOUT` instead.
    ///
    /// # Errors
    /// [`TelemetryError::Exporter`] naming a variable that is not a positive whole
    /// number (the delay in milliseconds), or a queue size above [`MAX_QUEUE_SIZE`].
    pub(crate) fn from_env(env: impl Fn(&str) -> Option<String>) -> Result<Self, TelemetryError> {
        let number = |name: &str, default: usize, max: usize| -> Result<usize, TelemetryError> {
            let Some(raw) = env(name) else {
                return Ok(default);
            };
            match raw.trim().parse::<usize>() {
                Ok(n) if (1..=max).contains(&n) => Ok(n),
                _ if max < usize::MAX => Err(TelemetryError::Exporter {
                    setting: name.into(),
                    reason: format!("{raw:?} is not a whole number from 1 to {max}"),
                }),
                _ => Err(TelemetryError::Exporter {
                    setting: name.into(),
                    reason: format!("{raw:?} is not a whole number of at least 1"),
                }),
            }
        };
        let d = Self::default();
        let max_queue_size = number("OTEL_BSP_MAX_QUEUE_SIZE", d.max_queue_size, MAX_QUEUE_SIZE)?;
        let batch = number(
            "OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
            d.max_export_batch_size,
            usize::MAX,
        )?;
        // At least 1 ms: with 0 the export thread would spin.
        let delay_ms = number(
            "OTEL_BSP_SCHEDULE_DELAY",
            usize::try_from(d.schedule_delay.as_millis()).unwrap_or(usize::MAX),
            usize::MAX,
        )?;
        Ok(Self {
            max_queue_size,
            // As the SDK does: a batch never exceeds the queue.
            max_export_batch_size: batch.min(max_queue_size),
            schedule_delay: Duration::from_millis(u64::try_from(delay_ms).unwrap_or(u64::MAX)),
        })
    }
}

/// Where the batch processor sends its batches: the OTLP exporter, or a test's.
pub(crate) trait BatchExporter: Send + 'static {
    /// Sends one batch; blocks the export thread until it is done. Returns how many
    /// of its spans the receiver rejected (an OTLP partial success): those are lost
    /// too, and counted as such.
    ///
    /// # Errors
    /// The batch was not delivered: it is lost (the processor counts it; the exporter
    /// may log why).
    fn export(&mut self, batch: Vec<SpanData>) -> Result<u64, OTelSdkError>;

    /// The resource every later batch is sent with.
    fn set_resource(&mut self, resource: &Resource);

    /// Hands the exporter a flag that turns true when shutdown begins: an exporter
    /// that waits between tries gives up then, so that what is queued is still sent
    /// (or counted as lost) within the shutdown's time.
    fn watch_shutdown(&mut self, _stopping: Arc<AtomicBool>) {}
}

/// What the export thread is asked to do besides exporting on schedule.
enum Control {
    /// A batch's worth of spans is queued.
    Export,
    /// Export everything queued, then answer.
    Flush(SyncSender<OTelSdkResult>),
    /// Export everything queued, answer, and stop.
    Shutdown(SyncSender<OTelSdkResult>),
    /// Use this resource from now on.
    Resource(Resource),
}

/// Counts the processor shares with its export thread.
#[derive(Debug, Default)]
struct Shared {
    /// Spans in the queue.
    queued: AtomicUsize,
    /// Whether an [`Control::Export`] is on its way.
    export_requested: AtomicBool,
    /// Spans dropped because the queue was full, in all.
    dropped: AtomicU64,
    /// Shutdown has begun: no more flushes, and see [`BatchExporter::watch_shutdown`].
    stopping: Arc<AtomicBool>,
}

/// A span processor that exports sampled spans in batches from a thread of its own.
#[derive(Debug)]
pub(crate) struct BatchProcessor {
    spans: SyncSender<SpanData>,
    control: Sender<Control>,
    shared: Arc<Shared>,
    max_export_batch_size: usize,
}

impl BatchProcessor {
    /// Starts the export thread, sending to `exporter`.
    ///
    /// # Errors
    /// [`TelemetryError::Exporter`] when the thread cannot be started.
    pub(crate) fn new<E: BatchExporter>(
        mut exporter: E,
        settings: BatchSettings,
    ) -> Result<Self, TelemetryError> {
        let (spans, spans_rx) = mpsc::sync_channel(settings.max_queue_size);
        let (control, control_rx) = mpsc::channel();
        let shared = Arc::new(Shared::default());
        exporter.watch_shutdown(shared.stopping.clone());
        let worker = Worker {
            exporter,
            spans: spans_rx,
            control: control_rx,
            shared: shared.clone(),
            settings,
            dropped_reported: 0,
            reported_at: None,
        };
        std::thread::Builder::new()
            .name("marathon-otlp-export".into())
            .spawn(move || worker.run())
            .map_err(|e| TelemetryError::Exporter {
                setting: "batch processor".into(),
                reason: format!("cannot start the export thread: {e}"),
            })?;
        Ok(Self {
            spans,
            control,
            shared,
            max_export_batch_size: settings.max_export_batch_size,
        })
    }

    /// Spans dropped so far because the queue was full.
    #[cfg(test)]
    fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Sends `make(reply)` to the export thread and waits up to `timeout` for the answer.
    fn ask(
        &self,
        make: impl FnOnce(SyncSender<OTelSdkResult>) -> Control,
        timeout: Duration,
    ) -> OTelSdkResult {
        let (reply, answer) = mpsc::sync_channel(1);
        self.control
            .send(make(reply))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
        match answer.recv_timeout(timeout) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => Err(OTelSdkError::Timeout(timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(OTelSdkError::AlreadyShutdown),
        }
    }
}

impl SpanProcessor for BatchProcessor {
    fn on_start(&self, _span: &mut Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        // Counted before it is sent, so that the count never falls below what the
        // queue holds when the thread takes the span at once.
        let queued = self.shared.queued.fetch_add(1, Ordering::Relaxed) + 1;
        match self.spans.try_send(span) {
            Ok(()) => {
                if queued >= self.max_export_batch_size
                    && !self.shared.export_requested.swap(true, Ordering::AcqRel)
                {
                    // A batch is ready: wake the thread before its schedule.
                    let _ = self.control.send(Control::Export);
                }
            }
            Err(TrySendError::Full(_)) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
                self.shared.dropped.fetch_add(1, Ordering::Relaxed);
                crate::metrics::spans_dropped("queue_full", 1);
            }
            // After shutdown: nothing exports any more.
            Err(TrySendError::Disconnected(_)) => {
                self.shared.queued.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        self.ask(Control::Flush, FLUSH_TIMEOUT)
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        if self.shared.stopping.swap(true, Ordering::AcqRel) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        self.ask(Control::Shutdown, timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        let _ = self.control.send(Control::Resource(resource.clone()));
    }
}

/// The export thread's state.
struct Worker<E> {
    exporter: E,
    spans: Receiver<SpanData>,
    control: Receiver<Control>,
    shared: Arc<Shared>,
    settings: BatchSettings,
    /// Dropped spans already reported in the log.
    dropped_reported: u64,
    /// When dropped spans were last reported.
    reported_at: Option<Instant>,
}

impl<E: BatchExporter> Worker<E> {
    fn run(mut self) {
        let mut due = Instant::now() + self.settings.schedule_delay;
        loop {
            let wait = due.saturating_duration_since(Instant::now());
            match self.control.recv_timeout(wait) {
                Ok(Control::Export) => {
                    self.shared.export_requested.store(false, Ordering::Release);
                    // Whole batches only; the rest waits for the schedule.
                    let size = self.settings.max_export_batch_size;
                    let _ = self.export_queued(self.queued() / size * size);
                }
                Ok(Control::Flush(reply)) => {
                    let _ = reply.send(self.export_queued(self.queued()));
                }
                Ok(Control::Shutdown(reply)) => {
                    let _ = reply.send(self.export_queued(self.queued()));
                    self.report_drops(true);
                    return;
                }
                Ok(Control::Resource(resource)) => self.exporter.set_resource(&resource),
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.export_queued(self.queued());
                    due = Instant::now() + self.settings.schedule_delay;
                }
                // The processor is gone without a shutdown: send what is left.
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.export_queued(self.queued());
                    self.report_drops(true);
                    return;
                }
            }
            self.report_drops(false);
        }
    }

    /// Spans in the queue now.
    fn queued(&self) -> usize {
        self.shared.queued.load(Ordering::Relaxed)
    }

    /// Takes up to `max` spans off the queue.
    fn take_batch(&mut self, max: usize) -> Vec<SpanData> {
        let mut batch = Vec::with_capacity(max.min(self.queued()));
        while batch.len() < max {
            match self.spans.try_recv() {
                Ok(span) => batch.push(span),
                Err(_) => break,
            }
        }
        self.shared.queued.fetch_sub(batch.len(), Ordering::Relaxed);
        batch
    }

    /// Exports `count` queued spans in batches: a count taken before, so that spans
    /// arriving meanwhile (a steady stream) do not hold up a flush or shutdown behind
    /// it. The first failure, if any.
    fn export_queued(&mut self, count: usize) -> OTelSdkResult {
        let mut left = count;
        let mut result = Ok(());
        while left > 0 {
            let batch = self.take_batch(left.min(self.settings.max_export_batch_size));
            if batch.is_empty() {
                break;
            }
            left -= batch.len();
            let r = self.export(batch);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }

    /// Sends one batch; a batch that was not delivered is counted as lost. An exporter
    /// that panics loses the batch but not the thread, which would otherwise take
    /// every later span with it.
    fn export(&mut self, batch: Vec<SpanData>) -> OTelSdkResult {
        let spans = batch.len() as u64;
        let exporter = &mut self.exporter;
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exporter.export(batch)))
                .unwrap_or_else(|_| {
                    Err(OTelSdkError::InternalFailure(
                        "the span exporter panicked".into(),
                    ))
                });
        match result {
            Ok(0) => Ok(()),
            Ok(rejected) => {
                crate::metrics::spans_dropped("export_failed", rejected.min(spans));
                Ok(())
            }
            Err(e) => {
                crate::metrics::spans_dropped("export_failed", spans);
                Err(e)
            }
        }
    }

    /// Logs spans dropped since the last report: the first drop at once, then at most
    /// once a [`DROP_REPORT_INTERVAL`]; `last` reports whatever is left.
    fn report_drops(&mut self, last: bool) {
        let dropped = self.shared.dropped.load(Ordering::Relaxed);
        let new = dropped - self.dropped_reported;
        if new == 0 {
            return;
        }
        let now = Instant::now();
        if !last
            && self
                .reported_at
                .is_some_and(|at| now.duration_since(at) < DROP_REPORT_INTERVAL)
        {
            return;
        }
        self.dropped_reported = dropped;
        self.reported_at = Some(now);
        tracing::warn!(
            target: "marathon::otlp",
            dropped_spans = new,
            queue_size = self.settings.max_queue_size,
            "the span queue was full and spans were dropped; workflows are not affected \
             (raise OTEL_BSP_MAX_QUEUE_SIZE and OTEL_BSP_MAX_EXPORT_BATCH_SIZE, or sample; \
             reported at most once a minute)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{SpanContext, SpanId, SpanKind, TraceFlags, TraceId, TraceState};
    use opentelemetry::{InstrumentationScope, KeyValue};
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use std::borrow::Cow;
    use std::sync::Mutex;
    use std::time::SystemTime;

    fn span(i: u64, sampled: bool) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(u128::from(i) + 1),
                SpanId::from(i + 1),
                if sampled {
                    TraceFlags::SAMPLED
                } else {
                    TraceFlags::default()
                },
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Internal,
            name: Cow::Owned(format!("span {i}")),
            start_time: SystemTime::UNIX_EPOCH,
            end_time: SystemTime::UNIX_EPOCH,
            attributes: vec![KeyValue::new("i", i64::try_from(i).unwrap_or(0))],
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: opentelemetry::trace::Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("test").build(),
        }
    }

    /// What a [`Recorder`] saw.
    #[derive(Default)]
    struct Seen {
        batches: Vec<Vec<String>>,
        resources: Vec<Resource>,
    }

    /// An exporter that records batches, and blocks while `gate` is closed (a
    /// collector that does not answer), saying on `entered` that an export began.
    struct Recorder {
        seen: Arc<Mutex<Seen>>,
        gate: Option<Receiver<()>>,
        entered: Option<SyncSender<()>>,
        /// Time each export takes.
        slow: Duration,
        /// Panics in the first export.
        panic_once: bool,
    }

    impl BatchExporter for Recorder {
        fn export(&mut self, batch: Vec<SpanData>) -> Result<u64, OTelSdkError> {
            if let Some(entered) = &self.entered {
                let _ = entered.send(());
            }
            if let Some(gate) = self.gate.take() {
                let _ = gate.recv();
            }
            if std::mem::take(&mut self.panic_once) {
                panic!("the exporter broke");
            }
            std::thread::sleep(self.slow);
            let names = batch.into_iter().map(|s| s.name.into_owned()).collect();
            self.seen.lock().unwrap().batches.push(names);
            Ok(0)
        }

        fn set_resource(&mut self, resource: &Resource) {
            self.seen.lock().unwrap().resources.push(resource.clone());
        }
    }

    fn recorder() -> (Recorder, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let r = Recorder {
            seen: seen.clone(),
            gate: None,
            entered: None,
            slow: Duration::ZERO,
            panic_once: false,
        };
        (r, seen)
    }

    fn start(exporter: Recorder, settings: BatchSettings) -> BatchProcessor {
        BatchProcessor::new(exporter, settings).expect("processor")
    }

    fn settings(queue: usize, batch: usize, delay: Duration) -> BatchSettings {
        BatchSettings {
            max_queue_size: queue,
            max_export_batch_size: batch,
            schedule_delay: delay,
        }
    }

    #[test]
    fn exports_sampled_spans_in_batches_and_flushes_the_rest() {
        let (exporter, seen) = recorder();
        let mut p = start(exporter, settings(100, 4, Duration::from_secs(3600)));
        p.set_resource(&Resource::builder_empty().with_service_name("svc").build());
        for i in 0..10 {
            p.on_end(span(i, i != 3));
        }
        p.force_flush().expect("flush");
        let seen = seen.lock().unwrap();
        let all: Vec<&String> = seen.batches.iter().flatten().collect();
        // Every sampled span once, in order; the unsampled one is not exported.
        let want: Vec<String> = (0..10)
            .filter(|i| *i != 3)
            .map(|i| format!("span {i}"))
            .collect();
        assert_eq!(all, want.iter().collect::<Vec<_>>());
        assert!(
            seen.batches.iter().all(|b| b.len() <= 4),
            "{:?}",
            seen.batches
        );
        assert_eq!(seen.resources.len(), 1);
        assert_eq!(p.dropped(), 0);
    }

    #[test]
    fn spans_are_exported_after_the_schedule_delay_without_a_flush() {
        let (exporter, seen) = recorder();
        let p = start(exporter, settings(100, 50, Duration::from_millis(50)));
        p.on_end(span(1, true));
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().batches.is_empty() {
            assert!(Instant::now() < deadline, "never exported");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(
            seen.lock().unwrap().batches,
            vec![vec!["span 1".to_string()]]
        );
    }

    #[test]
    fn a_full_queue_drops_and_counts_new_spans_without_blocking() {
        let (mut exporter, seen) = recorder();
        let (open, gate) = mpsc::sync_channel(1);
        let (entered, export_began) = mpsc::sync_channel(16);
        exporter.gate = Some(gate);
        exporter.entered = Some(entered);
        let before = crate::metrics::spans_dropped_so_far("queue_full");
        let p = start(exporter, settings(4, 2, Duration::from_secs(3600)));
        // Two spans make a batch: the thread takes them and blocks in the export.
        p.on_end(span(0, true));
        p.on_end(span(1, true));
        export_began
            .recv_timeout(Duration::from_secs(10))
            .expect("the export began");
        // The queue holds four more; the other six are dropped, at once.
        let start = Instant::now();
        for i in 2..12 {
            p.on_end(span(i, true));
        }
        assert!(start.elapsed() < Duration::from_secs(1), "on_end blocked");
        assert_eq!(p.dropped(), 6);
        assert!(crate::metrics::spans_dropped_so_far("queue_full") >= before + 6);
        open.send(()).expect("open the gate");
        p.force_flush().expect("flush");
        let seen = seen.lock().unwrap();
        let all: Vec<String> = seen.batches.iter().flatten().cloned().collect();
        let want: Vec<String> = (0..6).map(|i| format!("span {i}")).collect();
        assert_eq!(all, want);
    }

    #[test]
    fn every_span_is_exported_once_or_counted_as_dropped_under_contention() {
        let (exporter, seen) = recorder();
        let p = Arc::new(start(exporter, settings(256, 64, Duration::from_millis(1))));
        let threads: Vec<_> = (0..4_u64)
            .map(|t| {
                let p = p.clone();
                std::thread::spawn(move || {
                    for i in 0..5_000 {
                        p.on_end(span(t * 5_000 + i, true));
                        if i % 1_000 == 0 {
                            p.force_flush().expect("flush");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        p.force_flush().expect("flush");
        let seen = seen.lock().unwrap();
        let exported: Vec<&String> = seen.batches.iter().flatten().collect();
        let unique: std::collections::HashSet<&&String> = exported.iter().collect();
        assert_eq!(unique.len(), exported.len(), "a span exported twice");
        assert_eq!(exported.len() as u64 + p.dropped(), 20_000);
        assert!(seen.batches.iter().all(|b| b.len() <= 64));
        assert_eq!(p.shared.queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_flush_is_answered_while_spans_keep_coming_faster_than_they_export() {
        let (mut exporter, _seen) = recorder();
        exporter.slow = Duration::from_millis(1);
        let p = Arc::new(start(exporter, settings(256, 1, Duration::from_secs(3600))));
        let stop = Arc::new(AtomicBool::new(false));
        let producer = {
            let (p, stop) = (p.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    p.on_end(span(i, true));
                    i += 1;
                }
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        let start = Instant::now();
        let flushed = p.force_flush();
        let took = start.elapsed();
        stop.store(true, Ordering::Relaxed);
        producer.join().expect("producer");
        flushed.expect("flush answered");
        assert!(took < Duration::from_secs(10), "flush took {took:?}");
        p.shutdown_with_timeout(Duration::from_secs(10))
            .expect("shutdown answered");
    }

    #[test]
    fn an_exporter_that_panics_loses_its_batch_not_the_thread() {
        let (mut exporter, seen) = recorder();
        exporter.panic_once = true;
        let before = crate::metrics::spans_dropped_so_far("export_failed");
        let p = start(exporter, settings(100, 10, Duration::from_secs(3600)));
        p.on_end(span(1, true));
        assert!(p.force_flush().is_err(), "the panicking export failed");
        assert!(crate::metrics::spans_dropped_so_far("export_failed") > before);
        p.on_end(span(2, true));
        p.force_flush().expect("the thread exports again");
        assert_eq!(
            seen.lock().unwrap().batches,
            vec![vec!["span 2".to_string()]]
        );
    }

    #[test]
    fn shutdown_exports_the_rest_and_then_takes_nothing() {
        let (exporter, seen) = recorder();
        let p = start(exporter, settings(100, 50, Duration::from_secs(3600)));
        p.on_end(span(1, true));
        p.shutdown_with_timeout(Duration::from_secs(10))
            .expect("shutdown");
        p.on_end(span(2, true));
        assert!(matches!(
            p.shutdown_with_timeout(Duration::from_secs(1)),
            Err(OTelSdkError::AlreadyShutdown)
        ));
        assert!(matches!(
            p.force_flush(),
            Err(OTelSdkError::AlreadyShutdown)
        ));
        assert_eq!(
            seen.lock().unwrap().batches,
            vec![vec!["span 1".to_string()]]
        );
    }

    #[test]
    fn a_shutdown_that_outlasts_its_timeout_says_so() {
        let (mut exporter, _seen) = recorder();
        let (_open, gate) = mpsc::sync_channel::<()>(1);
        exporter.gate = Some(gate);
        let p = start(exporter, settings(100, 1, Duration::from_secs(3600)));
        p.on_end(span(1, true));
        let start = Instant::now();
        assert!(matches!(
            p.shutdown_with_timeout(Duration::from_millis(200)),
            Err(OTelSdkError::Timeout(_))
        ));
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn settings_come_from_the_variables_with_marathons_defaults() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_string())
            }
        };
        assert_eq!(
            BatchSettings::from_env(|_| None).expect("defaults"),
            BatchSettings::default()
        );
        assert_eq!(
            BatchSettings::from_env(env(&[
                ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
                ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "500"),
                ("OTEL_BSP_SCHEDULE_DELAY", " 250 "),
            ]))
            .expect("valid"),
            settings(100, 100, Duration::from_millis(250))
        );
        for (name, value) in [
            ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
            ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "-1"),
            ("OTEL_BSP_SCHEDULE_DELAY", "5s"),
            ("OTEL_BSP_SCHEDULE_DELAY", "0"),
        ] {
            let vars: &'static [(&'static str, &'static str)] =
                Box::leak(Box::new([(name, value)]));
            let err = BatchSettings::from_env(env(vars)).expect_err(value);
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    /// The queue is allocated whole when the processor starts: a size with a few zeros
    /// too many panicked there (`capacity overflow`) or aborted the process (an
    /// allocation of terabytes), instead of being refused as a setting.
    #[test]
    fn a_queue_size_too_large_to_allocate_is_refused() {
        for value in ["18446744073709551615", "10000000000", "1048577"] {
            let env = move |name: &str| (name == "OTEL_BSP_MAX_QUEUE_SIZE").then(|| value.into());
            match BatchSettings::from_env(env) {
                Err(TelemetryError::Exporter { setting, reason }) => {
                    assert_eq!(setting, "OTEL_BSP_MAX_QUEUE_SIZE", "{value}: {reason}");
                    assert!(reason.contains("1048576"), "{value}: {reason}");
                }
                other => panic!("{value}: accepted as {other:?}"),
            }
        }
        let env = |name: &str| (name == "OTEL_BSP_MAX_QUEUE_SIZE").then(|| "1048576".into());
        let s = BatchSettings::from_env(env).expect("the largest size");
        assert_eq!(s.max_queue_size, MAX_QUEUE_SIZE);
    }
}
