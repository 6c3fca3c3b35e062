//! Marathon's OTLP/HTTP span exporter: the SDK's batch processor hands it finished
//! spans, and it writes them straight into the protobuf wire format of an
//! `ExportTraceServiceRequest` and posts that to the collector.
//!
//! `opentelemetry-otlp` first converts every span into `opentelemetry-proto`'s message
//! structs (cloning each name, key and string value), groups them through hash maps,
//! and only then encodes: under callgrind that was 73 k instructions per W3 workflow
//! (8 spans), a third of what tracing cost. Writing the bytes directly from the
//! `SpanData` takes a small fraction of that (docs/OBSERVABILITY.md, "Overhead"). The
//! output is checked against `opentelemetry-proto`'s own conversion in the tests.
//!
//! Settings follow the OTLP exporter specification: `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
//! (as is) or `OTEL_EXPORTER_OTLP_ENDPOINT` (plus `/v1/traces`), `…_HEADERS`,
//! `…_TIMEOUT` (ms, default 10 s), each with its `TRACES_` form first.

use std::io::Read as _;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanContext, SpanKind, Status};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::SpanData;

use crate::batch::BatchExporter;
use marathon_core::masked_url;

use crate::tracing::TelemetryError;

/// The largest bytes-per-span guess used to size a request body up front.
const MAX_SPAN_ESTIMATE: usize = 4 * 1024;
/// The most a request body reserves up front; larger bodies grow as they are written.
const MAX_INITIAL_BODY: usize = 8 * 1024 * 1024;

/// The timeout of one export request when no variable sets one (the spec's default).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how spans are posted, resolved from the config and `OTEL_EXPORTER_OTLP_*`.
#[derive(Clone, PartialEq)]
pub(crate) struct Settings {
    /// The full traces URL.
    pub(crate) url: String,
    /// Extra request headers (`OTEL_EXPORTER_OTLP_HEADERS`: `key=value,…`, values
    /// percent-decoded).
    pub(crate) headers: Vec<(String, String)>,
    /// Longest one export request may take.
    pub(crate) timeout: Duration,
}

/// Credentials never reach a log line or an error: the URL's password and the
/// headers' values are masked.
impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let headers: Vec<_> = self.headers.iter().map(|(k, _)| (k, "***")).collect();
        f.debug_struct("Settings")
            .field("url", &masked_url(&self.url))
            .field("headers", &headers)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl Settings {
    /// Resolves the settings: `base` (the config's `otlp_endpoint`, `/v1/traces`
    /// appended) over the traces endpoint variable (as is) over the general one
    /// (`/v1/traces` appended). `env` reads a variable (blank counts as unset).
    /// `None` when no endpoint is given: nothing is exported.
    ///
    /// # Errors
    /// An endpoint that is not an `http://` URL, a header or timeout that cannot be
    /// read, compression or a protocol other than http/protobuf.
    pub(crate) fn resolve(
        base: Option<&str>,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TelemetryError> {
        let invalid = |variable: &str, reason: String| TelemetryError::Exporter {
            setting: variable.to_string(),
            reason,
        };
        let traces_url = |base: &str| {
            let base = base.trim().trim_end_matches('/');
            if base.ends_with("/v1/traces") {
                base.to_string()
            } else {
                format!("{base}/v1/traces")
            }
        };
        let (setting, url) = if let Some(base) = base {
            ("otlp_endpoint", traces_url(base))
        } else if let Some(url) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", url.trim().to_string())
        } else if let Some(base) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            ("OTEL_EXPORTER_OTLP_ENDPOINT", traces_url(&base))
        } else {
            return Ok(None);
        };
        let shown = masked_url(&url);
        match reqwest::Url::parse(&url) {
            Ok(u) if u.scheme() == "http" && u.host().is_some() => {}
            Ok(u) if u.scheme() == "https" => {
                return Err(invalid(
                    setting,
                    format!(
                        "{shown:?}: this build exports over plain http only; \
                         send to a collector (an OpenTelemetry Collector or rotel) \
                         beside Marathon and let it forward over TLS"
                    ),
                ));
            }
            Ok(_) => return Err(invalid(setting, format!("{shown:?} is not an http:// URL"))),
            Err(e) => return Err(invalid(setting, format!("{shown:?}: {e}"))),
        }
        // The signal's own variable first, then the general one.
        let pick = |name: &str| {
            let traces = format!("OTEL_EXPORTER_OTLP_TRACES_{name}");
            let general = format!("OTEL_EXPORTER_OTLP_{name}");
            env(&traces)
                .map(|v| (traces, v))
                .or_else(|| env(&general).map(|v| (general, v)))
        };
        let mut headers = Vec::new();
        if let Some((var, list)) = pick("HEADERS") {
            for (i, pair) in list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .enumerate()
            {
                // Values are credentials: errors name the entry, never its value.
                let (k, v) = pair
                    .split_once('=')
                    .map(|(k, v)| (k.trim(), v.trim()))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| {
                        invalid(
                            &var,
                            format!("entry {} is not key=value (value not shown)", i + 1),
                        )
                    })?;
                let v = percent_decode(v).ok_or_else(|| {
                    invalid(
                        &var,
                        format!("header {k:?}: bad percent-encoding (value not shown)"),
                    )
                })?;
                reqwest::header::HeaderName::from_bytes(k.as_bytes())
                    .map_err(|e| invalid(&var, format!("header name {k:?}: {e}")))?;
                reqwest::header::HeaderValue::from_str(&v)
                    .map_err(|e| invalid(&var, format!("header {k:?}: {e}")))?;
                headers.push((k.to_string(), v));
            }
        }
        let timeout = match pick("TIMEOUT") {
            None => DEFAULT_TIMEOUT,
            // 0 would time every export out at once.
            Some((var, ms)) => match ms.trim().parse::<u64>() {
                Ok(n) if n > 0 => Duration::from_millis(n),
                _ => {
                    return Err(invalid(
                        &var,
                        format!("{ms:?} is not a positive number of milliseconds"),
                    ));
                }
            },
        };
        if let Some((var, c)) = pick("COMPRESSION")
            && !c.trim().eq_ignore_ascii_case("none")
        {
            return Err(invalid(
                &var,
                format!("{c:?}: Marathon sends spans uncompressed (`none`)"),
            ));
        }
        if let Some((var, p)) = pick("PROTOCOL")
            && p.trim() != "http/protobuf"
        {
            return Err(invalid(
                &var,
                format!("{p:?}: Marathon exports over `http/protobuf` only"),
            ));
        }
        Ok(Some(Self {
            url,
            headers,
            timeout,
        }))
    }
}

/// `%XX` escapes decoded; `None` when one is malformed or the result is not UTF-8.
pub(crate) fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = char::from(bytes.next()?).to_digit(16)?;
            let lo = char::from(bytes.next()?).to_digit(16)?;
            out.push(u8::try_from(hi * 16 + lo).ok()?);
        } else {
            out.push(b);
        }
    }
    String::from_utf8(out).ok()
}

/// The span exporter: posts each batch as one protobuf `ExportTraceServiceRequest`.
pub(crate) struct OtlpExporter {
    settings: Settings,
    /// `settings.url` as logs and errors show it ([`masked_url`]).
    shown: String,
    client: reqwest::blocking::Client,
    /// The encoded `Resource` message, set by the provider before the first export.
    resource: Vec<u8>,
    /// The resource's schema URL.
    resource_schema: String,
    /// Bytes per span of the last request body (at first a guess): the next one is
    /// allocated at that size per span plus a quarter, so that it is rarely grown
    /// (growing copies it: 1.5 k instructions per W3 workflow when sized by the last
    /// body instead, as batches vary in length).
    span_len: AtomicUsize,
    /// Failed exports, reported in the log (the SDK's own reports are compiled out).
    health: ExportHealth,
    /// True once shutdown has begun: no more waiting between tries.
    stopping: Arc<AtomicBool>,
}

/// How often, at most, a collector that keeps failing is reported in the log.
const FAILURE_REPORT_INTERVAL: Duration = Duration::from_secs(60);

/// Reports failed exports as warnings: the first failure at once, then at most one a
/// [`FAILURE_REPORT_INTERVAL`] with the spans lost since the last report, and the first
/// success after failures. A collector that is down thus shows in the log without a
/// line per batch.
#[derive(Debug, Default)]
pub(crate) struct ExportHealth {
    state: Mutex<HealthState>,
}

#[derive(Debug, Default)]
struct HealthState {
    /// Whether the last export failed.
    failing: bool,
    /// When a failure was last reported.
    reported: Option<Instant>,
    /// Spans lost since the last report.
    lost_unreported: u64,
    /// Spans lost since exports last succeeded.
    lost: u64,
}

impl ExportHealth {
    /// An export of `spans` spans failed with `error`; returns the spans lost that this
    /// call reported, if it logged.
    pub(crate) fn failed(&self, spans: usize, error: &OTelSdkError, url: &str) -> Option<u64> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.failing = true;
        st.lost += spans as u64;
        st.lost_unreported += spans as u64;
        let now = Instant::now();
        if st
            .reported
            .is_some_and(|at| now.duration_since(at) < FAILURE_REPORT_INTERVAL)
        {
            return None;
        }
        let lost = std::mem::take(&mut st.lost_unreported);
        st.reported = Some(now);
        drop(st);
        tracing::warn!(
            target: "marathon::otlp",
            url,
            %error,
            lost_spans = lost,
            "exporting spans failed; those spans are lost, workflows are not affected (reported at most once a minute)"
        );
        Some(lost)
    }

    /// An export succeeded; returns the spans lost while it failed, if this call
    /// logged the recovery.
    pub(crate) fn succeeded(&self, url: &str) -> Option<u64> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !std::mem::take(&mut st.failing) {
            return None;
        }
        let lost = std::mem::take(&mut st.lost);
        *st = HealthState::default();
        drop(st);
        tracing::info!(
            target: "marathon::otlp",
            url,
            lost_spans = lost,
            "exporting spans works again"
        );
        Some(lost)
    }
}

impl std::fmt::Debug for OtlpExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OtlpExporter")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl OtlpExporter {
    /// Waits `wait` before asking the collector again, in short steps, ending early
    /// when shutdown begins.
    fn pause(&self, wait: Duration) {
        const STEP: Duration = Duration::from_millis(50);
        let until = std::time::Instant::now() + wait;
        while !self.stopping.load(Ordering::Acquire) {
            let left = until.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(STEP));
        }
    }

    /// An exporter posting to `settings.url`.
    ///
    /// # Errors
    /// The HTTP client cannot be built.
    pub(crate) fn new(settings: Settings) -> Result<Self, TelemetryError> {
        let timeout = settings.timeout;
        // The blocking client runs a runtime of its own, which must not be created
        // inside another: build it on a plain thread (the export thread is one too).
        let client = std::thread::spawn(move || {
            reqwest::blocking::Client::builder()
                .timeout(timeout)
                // A redirect of a POST is followed as a GET without the spans; a
                // collector that moved must be configured, not guessed at.
                .redirect(reqwest::redirect::Policy::none())
                .build()
        })
        .join()
        .map_err(|_| TelemetryError::Exporter {
            setting: "http client".into(),
            reason: "building the HTTP client panicked".into(),
        })?
        .map_err(|e| TelemetryError::Exporter {
            setting: "http client".into(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            shown: masked_url(&settings.url),
            settings,
            client,
            resource: Vec::new(),
            resource_schema: String::new(),
            span_len: AtomicUsize::new(256),
            health: ExportHealth::default(),
            stopping: Arc::default(),
        })
    }

    /// The request body for `batch`.
    pub(crate) fn encode(&self, batch: &[SpanData]) -> Vec<u8> {
        // The guess is capped: one batch of a single large span (a prompt in a field,
        // many events) must not make the next full batch reserve that size per span
        // (2,048 x 10 MB aborts the process). Beyond the cap the buffer grows as needed.
        let per_span = self.span_len.load(Ordering::Relaxed).min(MAX_SPAN_ESTIMATE);
        let mut buf = Vec::with_capacity(
            batch
                .len()
                .saturating_mul(per_span + per_span / 4)
                .saturating_add(256)
                .min(MAX_INITIAL_BODY),
        );
        encode_request(&mut buf, &self.resource, &self.resource_schema, batch);
        self.span_len
            .store(buf.len() / batch.len().max(1), Ordering::Relaxed);
        buf
    }
}

impl BatchExporter for OtlpExporter {
    fn export(&mut self, batch: Vec<SpanData>) -> Result<u64, OTelSdkError> {
        if batch.is_empty() {
            return Ok(0);
        }
        let body = self.encode(&batch);
        let spans = batch.len();
        drop(batch);
        let mut request = self
            .client
            .post(&self.settings.url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .body(body);
        for (k, v) in &self.settings.headers {
            request = request.header(k, v);
        }
        // The batch processor's own thread blocks here, never a workflow. A collector
        // that is restarting or shedding load (refused, 429, 502, 503, 504) is asked
        // again, twice at most, after its `Retry-After` (up to 5 s) or 0.5 s, then 1 s.
        let mut pauses = RETRY_PAUSES.into_iter();
        let sent = loop {
            // Once shutdown has begun, or after the last pause, this try decides.
            let pause = pauses
                .next()
                .filter(|_| !self.stopping.load(Ordering::Acquire));
            // The body is in memory: cloning the request shares it.
            let (Some(pause), Some(attempt)) = (pause, request.try_clone()) else {
                break request.send();
            };
            let sent = attempt.send();
            match retry_after(&sent, pause) {
                Some(wait) => self.pause(wait),
                None => break sent,
            }
        };
        let result = match sent {
            // Reading the (small) answer lets the connection be used again, and says
            // whether the collector took every span (an OTLP partial success).
            Ok(r) if r.status().is_success() => {
                // A real answer is a few bytes; whatever else answers 200 is not read
                // into memory whole.
                let mut answer = Vec::new();
                std::io::Read::take(r, MAX_ANSWER)
                    .read_to_end(&mut answer)
                    .map(|_| partial_success(&answer))
                    .map_err(|e| {
                        OTelSdkError::InternalFailure(format!(
                            "reading the OTLP answer from {} failed: {e}",
                            self.shown
                        ))
                    })
            }
            Ok(r) => Err(OTelSdkError::InternalFailure(format!(
                "OTLP export to {} answered HTTP {}",
                self.shown,
                r.status()
            ))),
            Err(e) if e.is_timeout() => Err(OTelSdkError::Timeout(self.settings.timeout)),
            // The client's error names the URL itself, password included: without it.
            Err(e) => Err(OTelSdkError::InternalFailure(format!(
                "OTLP export to {} failed: {}",
                self.shown,
                e.without_url()
            ))),
        };
        match result {
            Ok(None) => {
                let _ = self.health.succeeded(&self.shown);
                Ok(0)
            }
            Ok(Some((rejected, why))) => {
                let error = OTelSdkError::InternalFailure(format!(
                    "the collector rejected {rejected} of {spans} spans: {why}"
                ));
                let rejected = usize::try_from(rejected).unwrap_or(spans).min(spans);
                let _ = self.health.failed(rejected, &error, &self.shown);
                Ok(rejected as u64)
            }
            Err(e) => {
                let _ = self.health.failed(spans, &e, &self.shown);
                Err(e)
            }
        }
    }

    fn watch_shutdown(&mut self, stopping: Arc<AtomicBool>) {
        self.stopping = stopping;
    }

    fn set_resource(&mut self, resource: &Resource) {
        let mut buf = Vec::new();
        for (k, v) in resource.iter() {
            message(&mut buf, 1, |b| key_value(b, k.as_str(), v));
        }
        self.resource = buf;
        self.resource_schema = resource.schema_url().unwrap_or_default().to_string();
    }
}

/// Pauses before asking a collector that answered with a [`RETRY_STATUSES`] status (or
/// refused the connection) again: two retries.
const RETRY_PAUSES: [Duration; 2] = [Duration::from_millis(500), Duration::from_secs(1)];

/// How long to wait before asking again after `sent`, if it is worth asking again:
/// a refused connection or a [`RETRY_STATUSES`] answer, after its `Retry-After`
/// (at most [`MAX_RETRY_AFTER`]) or else `pause`.
fn retry_after(
    sent: &Result<reqwest::blocking::Response, reqwest::Error>,
    pause: Duration,
) -> Option<Duration> {
    match sent {
        Ok(r) if RETRY_STATUSES.contains(&r.status().as_u16()) => Some(
            r.headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map_or(pause, |s| Duration::from_secs(s).min(MAX_RETRY_AFTER)),
        ),
        Err(e) if e.is_connect() => Some(pause),
        _ => None,
    }
}

/// Answers that mean "not now" (OTLP/HTTP's retryable statuses).
const RETRY_STATUSES: [u16; 4] = [429, 502, 503, 504];

/// The longest `Retry-After` honoured between attempts.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(5);

/// The most of a successful answer read (an `ExportTraceServiceResponse` is a few bytes).
const MAX_ANSWER: u64 = 64 * 1024;

/// The spans an OTLP/HTTP answer (an `ExportTraceServiceResponse`) says were rejected,
/// and why: `partial_success` (field 1) holds `rejected_spans` (1, int64) and
/// `error_message` (2). `None` for a full success: an empty answer, no rejected spans,
/// or one that is not protobuf (not ours to judge).
fn partial_success(answer: &[u8]) -> Option<(u64, String)> {
    let partial = fields(answer)?
        .into_iter()
        .find_map(|(n, f)| match (n, f) {
            (1, Field::Bytes(b)) => Some(b),
            _ => None,
        })?;
    let (mut rejected, mut why) = (0, String::new());
    for (n, f) in fields(partial)? {
        match (n, f) {
            // An int64: a negative count (a broken collector) rejects nothing.
            (1, Field::Varint(v)) => rejected = u64::try_from(v as i64).unwrap_or(0),
            (2, Field::Bytes(b)) => why = String::from_utf8_lossy(b).into_owned(),
            _ => {}
        }
    }
    (rejected > 0).then_some((rejected, why))
}

/// A decoded protobuf field value (what [`partial_success`] needs of one).
enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of one protobuf message, by number; `None` if it is not well formed.
fn fields(mut buf: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    fn read_varint(buf: &mut &[u8]) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf.split_first()?;
            *buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let mut out = Vec::new();
    while !buf.is_empty() {
        let k = read_varint(&mut buf)?;
        let value = match k & 7 {
            0 => Field::Varint(read_varint(&mut buf)?),
            1 | 5 => {
                let n = if k & 7 == 1 { 8 } else { 4 };
                buf = buf.get(n..)?;
                Field::Fixed
            }
            2 => {
                let n = usize::try_from(read_varint(&mut buf)?).ok()?;
                let (b, rest) = (buf.get(..n)?, buf.get(n..)?);
                buf = rest;
                Field::Bytes(b)
            }
            _ => return None,
        };
        out.push((k >> 3, value));
    }
    Some(out)
}

// Protobuf wire format: field keys are `number << 3 | wire type`; 0 = varint,
// 1 = 64-bit, 2 = length-delimited, 5 = 32-bit. Fields are written in the order the
// .proto files declare them, as prost does; scalars at their default are left out.

fn varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn key(buf: &mut Vec<u8>, field: u32, wire: u8) {
    varint(buf, u64::from(field << 3 | u32::from(wire)));
}

fn bytes(buf: &mut Vec<u8>, field: u32, v: &[u8]) {
    key(buf, field, 2);
    varint(buf, v.len() as u64);
    buf.extend_from_slice(v);
}

fn string(buf: &mut Vec<u8>, field: u32, v: &str) {
    if !v.is_empty() {
        bytes(buf, field, v.as_bytes());
    }
}

fn uint(buf: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(buf, field, 0);
        varint(buf, v);
    }
}

fn fixed64(buf: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(buf, field, 1);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

fn fixed32(buf: &mut Vec<u8>, field: u32, v: u32) {
    if v != 0 {
        key(buf, field, 5);
        buf.extend_from_slice(&v.to_le_bytes());
    }
}

/// An embedded message: its length is only known once written, so one byte is
/// reserved for it (most of ours are shorter than 128 bytes) and the body is moved
/// along when the length needs more.
fn message(buf: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    key(buf, field, 2);
    buf.push(0);
    let start = buf.len();
    body(buf);
    let len = buf.len() - start;
    if len < 0x80 {
        buf[start - 1] = len as u8;
        return;
    }
    let mut prefix = [0u8; 10];
    let mut n = 0;
    let mut v = len;
    while v >= 0x80 {
        prefix[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    prefix[n] = v as u8;
    buf.resize(buf.len() + n, 0);
    buf.copy_within(start..start + len, start + n);
    buf[start - 1..start + n].copy_from_slice(&prefix[..=n]);
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// `KeyValue { key = 1, value = 2 }`.
fn key_value(buf: &mut Vec<u8>, k: &str, v: &Value) {
    string(buf, 1, k);
    message(buf, 2, |b| any_value(b, v));
}

fn attributes(buf: &mut Vec<u8>, field: u32, kvs: &[KeyValue]) {
    for kv in kvs {
        message(buf, field, |b| key_value(b, kv.key.as_str(), &kv.value));
    }
}

/// `AnyValue`, a oneof: the chosen field is written even at its default value.
fn any_value(buf: &mut Vec<u8>, v: &Value) {
    match v {
        Value::String(s) => bytes(buf, 1, s.as_str().as_bytes()),
        Value::Bool(b) => {
            key(buf, 2, 0);
            varint(buf, u64::from(*b));
        }
        Value::I64(i) => {
            key(buf, 3, 0);
            // int64: two's complement, ten bytes for negatives.
            varint(buf, *i as u64);
        }
        Value::F64(f) => {
            key(buf, 4, 1);
            buf.extend_from_slice(&f.to_le_bytes());
        }
        // ArrayValue { values = 1 }, each an AnyValue.
        Value::Array(a) => message(buf, 5, |b| {
            fn each<T>(b: &mut Vec<u8>, vs: &[T], one: impl Fn(&mut Vec<u8>, &T)) {
                for v in vs {
                    message(b, 1, |b| one(b, v));
                }
            }
            match a {
                Array::Bool(vs) => each(b, vs, |b, v| any_value(b, &Value::Bool(*v))),
                Array::I64(vs) => each(b, vs, |b, v| any_value(b, &Value::I64(*v))),
                Array::F64(vs) => each(b, vs, |b, v| any_value(b, &Value::F64(*v))),
                Array::String(vs) => each(b, vs, |b, v| bytes(b, 1, v.as_str().as_bytes())),
                // A kind of array added after this was written: as its text.
                other => message(b, 1, |b| bytes(b, 1, other.to_string().as_bytes())),
            }
        }),
        // A kind of value added after this was written: as its text.
        other => bytes(buf, 1, other.to_string().as_bytes()),
    }
}

/// The span flags field: the W3C trace flags, plus whether the parent is remote.
fn span_flags(sc_flags: u8, parent_is_remote: bool) -> u32 {
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    u32::from(sc_flags) | HAS_IS_REMOTE | if parent_is_remote { IS_REMOTE } else { 0 }
}

fn trace_state(buf: &mut Vec<u8>, field: u32, sc: &SpanContext) {
    let header = sc.trace_state().header();
    string(buf, field, &header);
}

/// `Span` (opentelemetry/proto/trace/v1/trace.proto).
fn span(buf: &mut Vec<u8>, s: &SpanData) {
    let sc = &s.span_context;
    bytes(buf, 1, &sc.trace_id().to_bytes());
    bytes(buf, 2, &sc.span_id().to_bytes());
    trace_state(buf, 3, sc);
    if s.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        bytes(buf, 4, &s.parent_span_id.to_bytes());
    }
    fixed32(
        buf,
        16,
        span_flags(sc.trace_flags().to_u8(), s.parent_span_is_remote),
    );
    string(buf, 5, &s.name);
    let kind = match s.span_kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    };
    uint(buf, 6, kind);
    fixed64(buf, 7, nanos(s.start_time));
    fixed64(buf, 8, nanos(s.end_time));
    attributes(buf, 9, &s.attributes);
    uint(buf, 10, u64::from(s.dropped_attributes_count));
    for e in s.events.iter() {
        message(buf, 11, |b| {
            fixed64(b, 1, nanos(e.timestamp));
            string(b, 2, &e.name);
            attributes(b, 3, &e.attributes);
            uint(b, 4, u64::from(e.dropped_attributes_count));
        });
    }
    uint(buf, 12, u64::from(s.events.dropped_count));
    for l in s.links.iter() {
        message(buf, 13, |b| {
            let lc = &l.span_context;
            bytes(b, 1, &lc.trace_id().to_bytes());
            bytes(b, 2, &lc.span_id().to_bytes());
            trace_state(b, 3, lc);
            attributes(b, 4, &l.attributes);
            uint(b, 5, u64::from(l.dropped_attributes_count));
            fixed32(b, 6, span_flags(lc.trace_flags().to_u8(), lc.is_remote()));
        });
    }
    uint(buf, 14, u64::from(s.links.dropped_count));
    message(buf, 15, |b| match &s.status {
        Status::Unset => {}
        Status::Ok => uint(b, 3, 1),
        Status::Error { description } => {
            string(b, 2, description);
            uint(b, 3, 2);
        }
    });
}

/// `InstrumentationScope { name = 1, version = 2, attributes = 3 }`.
fn scope(buf: &mut Vec<u8>, s: &InstrumentationScope) {
    string(buf, 1, s.name());
    string(buf, 2, s.version().unwrap_or_default());
    for kv in s.attributes() {
        message(buf, 3, |b| key_value(b, kv.key.as_str(), &kv.value));
    }
}

/// Whether two spans' scopes are equal. Every span carries a clone of its tracer's
/// scope, whose name is usually the same `&'static str`: the same address and no
/// attributes settle it without comparing strings (which was 340 instructions a span).
fn same_scope(a: &InstrumentationScope, b: &InstrumentationScope) -> bool {
    let (an, bn) = (a.name(), b.name());
    let quick = std::ptr::eq(an, bn)
        && a.version() == b.version()
        && a.schema_url() == b.schema_url()
        && a.attributes().next().is_none()
        && b.attributes().next().is_none();
    quick || a == b
}

/// `ExportTraceServiceRequest { resource_spans = 1 }` holding one `ResourceSpans`
/// (`resource = 1`, `scope_spans = 2`, `schema_url = 3`), with one `ScopeSpans`
/// (`scope = 1`, `spans = 2`, `schema_url = 3`) per instrumentation scope, in the
/// order the scopes first appear.
fn encode_request(buf: &mut Vec<u8>, resource: &[u8], resource_schema: &str, batch: &[SpanData]) {
    // Nearly always one scope (Marathon's tracer): a list beats a map.
    let mut scopes: Vec<&InstrumentationScope> = Vec::new();
    for s in batch {
        if !scopes
            .iter()
            .any(|sc| same_scope(sc, &s.instrumentation_scope))
        {
            scopes.push(&s.instrumentation_scope);
        }
    }
    message(buf, 1, |b| {
        message(b, 1, |b| b.extend_from_slice(resource));
        for sc in &scopes {
            message(b, 2, |b| {
                message(b, 1, |b| scope(b, sc));
                for s in batch
                    .iter()
                    .filter(|s| same_scope(sc, &s.instrumentation_scope))
                {
                    message(b, 2, |b| span(b, s));
                }
                string(b, 3, sc.schema_url().unwrap_or_default());
            });
        }
        string(b, 3, resource_schema);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{Link, SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
    use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
    use opentelemetry_sdk::trace::{SpanEvents, SpanLinks};
    use prost::Message as _;
    use std::borrow::Cow;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.to_string())
                .filter(|v| !v.trim().is_empty())
        }
    }

    fn span_data(i: u64, scope: &InstrumentationScope) -> SpanData {
        let sc = SpanContext::new(
            TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128 + u128::from(i)),
            SpanId::from(0x00f0_67aa_0ba9_02b7_u64 + i),
            TraceFlags::SAMPLED,
            false,
            if i.is_multiple_of(2) {
                TraceState::default()
            } else {
                TraceState::from_key_value([("vendor", "x")]).expect("valid")
            },
        );
        let long = "a".repeat(300 * usize::try_from(i % 3).expect("small"));
        let mut events = SpanEvents::default();
        events.events.push(opentelemetry::trace::Event::new(
            "retrying",
            UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_500),
            vec![KeyValue::new("attempt", 2_i64)],
            1,
        ));
        events.dropped_count = u32::try_from(i % 2).expect("small");
        let mut links = SpanLinks::default();
        if i % 2 == 1 {
            links
                .links
                .push(Link::new(sc.clone(), vec![KeyValue::new("k", "v")], 0));
        }
        SpanData {
            span_context: sc,
            parent_span_id: if i == 0 {
                SpanId::INVALID
            } else {
                SpanId::from(7 + i)
            },
            parent_span_is_remote: i % 3 == 1,
            span_kind: [
                SpanKind::Internal,
                SpanKind::Server,
                SpanKind::Client,
                SpanKind::Producer,
                SpanKind::Consumer,
            ][usize::try_from(i % 5).expect("small")]
            .clone(),
            name: Cow::Owned(format!("marathon.activity{i}")),
            start_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_000_000 + i),
            end_time: UNIX_EPOCH + Duration::from_nanos(1_700_000_000_000_100_000 + i),
            attributes: vec![
                KeyValue::new("workflow_id", format!("wf-{i}{long}")),
                KeyValue::new("attempt", i64::try_from(i).expect("small") - 2),
                KeyValue::new("ratio", 0.5),
                KeyValue::new("retry", i.is_multiple_of(2)),
                KeyValue::new("empty", ""),
                KeyValue::new(
                    "names",
                    Value::Array(Array::String(vec!["a".into(), "".into()])),
                ),
                KeyValue::new("ints", Value::Array(Array::I64(vec![0, -1, i64::MAX]))),
                KeyValue::new("flags", Value::Array(Array::Bool(vec![true, false]))),
                KeyValue::new("floats", Value::Array(Array::F64(vec![0.0, -2.5]))),
            ],
            dropped_attributes_count: u32::try_from(i % 2).expect("small"),
            events,
            links,
            status: match i % 3 {
                0 => Status::Unset,
                1 => Status::Ok,
                _ => Status::error(format!("failed {i}")),
            },
            instrumentation_scope: scope.clone(),
        }
    }

    #[test]
    fn requests_decode_to_what_the_sdk_conversion_builds() {
        let marathon = InstrumentationScope::builder("marathon").build();
        let other = InstrumentationScope::builder("user")
            .with_version("1.2.3")
            .with_schema_url("https://opentelemetry.io/schemas/1.0.0")
            .with_attributes([KeyValue::new("lib", "x")])
            .build();
        let resource = Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", "marathon-test"),
                KeyValue::new("host.cores", 2_i64),
            ])
            .with_schema_url([], "https://opentelemetry.io/schemas/1.2.0")
            .build();
        let batch: Vec<SpanData> = (0..12)
            .map(|i| span_data(i, if i % 4 == 3 { &other } else { &marathon }))
            .collect();
        let mut exporter = unreachable_exporter();
        exporter.set_resource(&resource);
        let ours = ExportTraceServiceRequest::decode(exporter.encode(&batch).as_slice())
            .expect("a valid ExportTraceServiceRequest");
        let sdk = ExportTraceServiceRequest {
            resource_spans: group_spans_by_resource_and_scope(
                batch,
                &ResourceAttributesWithSchema::from(&resource),
            ),
        };
        assert_eq!(ours, sdk);
        // Scopes in order of first appearance, every span once.
        assert_eq!(ours.resource_spans[0].scope_spans.len(), 2);
        assert_eq!(ours.resource_spans[0].scope_spans[0].spans.len(), 9);
    }

    /// Serves one HTTP request on a free port, answering `status`; the request's head
    /// and body come back through the handle.
    fn serve_once(status: u16) -> (u16, std::thread::JoinHandle<(String, Vec<u8>)>) {
        serve_once_with(status, Vec::new(), String::new())
    }

    /// [`serve_once`] answering with `answer` as the body, after the header lines
    /// `extra` (each ending in CRLF).
    fn serve_once_with(
        status: u16,
        answer: Vec<u8>,
        extra: String,
    ) -> (u16, std::thread::JoinHandle<Seen>) {
        let (port, server) = serve_each(vec![(status, answer, extra)]);
        (
            port,
            std::thread::spawn(move || server.join().expect("server").pop().expect("one request")),
        )
    }

    /// A request as the test collector saw it: its lowercased head, and its body.
    type Seen = (String, Vec<u8>);

    /// A collector answering one request per connection, each with the next of
    /// `answers` (status, body, extra header lines ending in CRLF); the thread returns
    /// each request it saw.
    fn serve_each(
        answers: Vec<(u16, Vec<u8>, String)>,
    ) -> (u16, std::thread::JoinHandle<Vec<Seen>>) {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let handle = std::thread::spawn(move || {
            let mut seen = Vec::new();
            for (status, answer, extra) in answers {
                let (stream, _) = listener.accept().expect("accept");
                let mut reader = BufReader::new(stream.try_clone().expect("clone"));
                let mut head = String::new();
                loop {
                    let mut line = String::new();
                    reader.read_line(&mut line).expect("read");
                    if line == "\r\n" || line.is_empty() {
                        break;
                    }
                    head.push_str(&line.to_ascii_lowercase());
                }
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let mut body = vec![0; len];
                reader.read_exact(&mut body).expect("body");
                let mut stream = stream;
                write!(
                    stream,
                    "HTTP/1.1 {status} X\r\n{extra}connection: close\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\n\r\n",
                    answer.len()
                )
                .expect("answer");
                stream.write_all(&answer).expect("answer body");
                seen.push((head, body));
            }
            seen
        });
        (port, handle)
    }

    /// A collector that is restarting or shedding load is asked again: a 503 (after
    /// its `Retry-After`) and a 429, then the batch is delivered, once; a collector
    /// answering 503 every time loses the batch after three tries.
    #[test]
    fn a_collector_saying_not_now_is_asked_again() {
        let scope = InstrumentationScope::builder("marathon").build();
        let not_now = |status| (status, Vec::new(), "retry-after: 1\r\n".to_string());
        let (port, server) = serve_each(vec![
            not_now(503),
            (429, Vec::new(), String::new()),
            (200, Vec::new(), String::new()),
        ]);
        let started = std::time::Instant::now();
        let rejected = exporter_to(port)
            .export(vec![span_data(0, &scope)])
            .expect("delivered on the third try");
        assert_eq!(rejected, 0);
        let seen = server.join().expect("server");
        assert_eq!(seen.len(), 3);
        assert!(seen.windows(2).all(|w| w[0].1 == w[1].1), "the same body");
        // 1 s (Retry-After) + 1 s (the second pause).
        assert!(started.elapsed() >= Duration::from_secs(2));

        let (port, server) = serve_each(vec![not_now(503), not_now(503), not_now(503)]);
        let err = exporter_to(port)
            .export(vec![span_data(0, &scope)])
            .expect_err("lost");
        assert!(err.to_string().contains("503"), "{err}");
        assert_eq!(server.join().expect("server").len(), 3);

        // Once shutdown has begun, one try: what is queued must go (or be counted
        // lost) within the shutdown's time.
        let (port, server) = serve_each(vec![not_now(503)]);
        let mut exporter = exporter_to(port);
        exporter.watch_shutdown(Arc::new(AtomicBool::new(true)));
        let started = std::time::Instant::now();
        let err = exporter
            .export(vec![span_data(0, &scope)])
            .expect_err("lost");
        assert!(err.to_string().contains("503"), "{err}");
        // Below the 1 s `Retry-After` a second try would wait first, with room for one
        // local request on a loaded machine (500 ms left it little).
        assert!(started.elapsed() < Duration::from_millis(900));
        assert_eq!(server.join().expect("server").len(), 1);
    }

    #[test]
    fn exports_post_protobuf_with_the_configured_headers() {
        let (port, server) = serve_once(200);
        let settings = Settings::resolve(
            Some(&format!("http://127.0.0.1:{port}")),
            env(&[("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer%20abc")]),
        )
        .expect("valid")
        .expect("an endpoint");
        let mut exporter = OtlpExporter::new(settings).expect("exporter");
        let scope = InstrumentationScope::builder("marathon").build();
        let batch: Vec<SpanData> = (0..3).map(|i| span_data(i, &scope)).collect();
        let expected = exporter.encode(&batch);
        exporter.export(batch).expect("exported");
        let (head, body) = server.join().expect("server");
        assert!(head.starts_with("post /v1/traces http/1.1"), "{head}");
        assert!(
            head.contains("content-type: application/x-protobuf"),
            "{head}"
        );
        assert!(head.contains("authorization: bearer abc"), "{head}");
        assert_eq!(body, expected);
    }

    #[test]
    fn failed_exports_are_errors_not_panics() {
        let (port, server) = serve_once(500);
        let mut exporter = exporter_to(port);
        let scope = InstrumentationScope::builder("marathon").build();
        let err = exporter
            .export(vec![span_data(0, &scope)])
            .expect_err("500");
        assert!(err.to_string().contains("500"), "{err}");
        server.join().expect("server");
        // Nobody listening (the port was just freed).
        let err = exporter
            .export(vec![span_data(0, &scope)])
            .expect_err("refused");
        assert!(err.to_string().contains("failed"), "{err}");
        // Nothing to send, nothing sent.
        exporter.export(Vec::new()).expect("empty batch");
    }

    /// A collector's partial success (HTTP 200 saying it rejected some spans) is a loss:
    /// the exporter returns the rejected count and the batch processor counts those
    /// spans as dropped (they were taken as delivered).
    #[test]
    fn spans_a_collector_rejects_are_lost_and_counted() {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTracePartialSuccess, ExportTraceServiceResponse,
        };
        use prost::Message as _;
        let answer = |rejected| {
            ExportTraceServiceResponse {
                partial_success: Some(ExportTracePartialSuccess {
                    rejected_spans: rejected,
                    error_message: "2 spans had invalid ids".into(),
                }),
            }
            .encode_to_vec()
        };
        assert_eq!(
            partial_success(&answer(2)),
            Some((2, "2 spans had invalid ids".to_string()))
        );
        for full in [
            answer(0),
            answer(-3),
            Vec::new(),
            b"{}".to_vec(),
            vec![0x0a, 0x05, 0x08],
        ] {
            assert_eq!(partial_success(&full), None, "{full:?}");
        }
        let scope = InstrumentationScope::builder("marathon").build();
        let batch = || (0..5).map(|i| span_data(i, &scope)).collect::<Vec<_>>();
        let (port, server) = serve_once_with(200, answer(2), String::new());
        let rejected = exporter_to(port).export(batch()).expect("delivered");
        server.join().expect("server");
        assert_eq!(rejected, 2);

        let (port, server) = serve_once_with(200, answer(2), String::new());
        let before = crate::metrics::spans_dropped_so_far("export_failed");
        let processor = crate::batch::BatchProcessor::new(
            exporter_to(port),
            crate::batch::BatchSettings {
                max_queue_size: 100,
                max_export_batch_size: 10,
                schedule_delay: Duration::from_secs(3600),
            },
        )
        .expect("processor");
        for span in batch() {
            opentelemetry_sdk::trace::SpanProcessor::on_end(&processor, span);
        }
        opentelemetry_sdk::trace::SpanProcessor::force_flush(&processor).expect("flushed");
        server.join().expect("server");
        assert!(crate::metrics::spans_dropped_so_far("export_failed") >= before + 2);
    }

    /// A redirect is an error, not followed: reqwest follows a 301 to a POST as a GET
    /// without the spans, which a collector there could answer with 200.
    #[test]
    fn a_redirect_is_a_failed_export() {
        let (elsewhere, _) = serve_once(200);
        let (port, server) = serve_once_with(
            301,
            Vec::new(),
            format!("location: http://127.0.0.1:{elsewhere}/v1/traces\r\n"),
        );
        let scope = InstrumentationScope::builder("marathon").build();
        let err = exporter_to(port)
            .export(vec![span_data(0, &scope)])
            .expect_err("not delivered");
        assert!(err.to_string().contains("301"), "{err}");
        server.join().expect("server");
    }

    /// An exporter posting to `http://127.0.0.1:{port}`.
    fn exporter_to(port: u16) -> OtlpExporter {
        OtlpExporter::new(
            Settings::resolve(Some(&format!("http://127.0.0.1:{port}")), env(&[]))
                .expect("valid")
                .expect("an endpoint"),
        )
        .expect("exporter")
    }

    /// Failed exports are reported once, then at most once a minute with the spans
    /// lost since; the first success after them is reported with every span lost.
    /// (What each call logged is checked through its return value: a log capture here
    /// would race with other tests over `tracing`'s shared callsite interest.)
    #[test]
    fn a_failing_collector_is_reported_once_then_its_recovery() {
        // Nobody listening: refused at once.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut exporter = exporter_to(port);
        let scope = InstrumentationScope::builder("marathon").build();
        for n in [3, 2] {
            let batch = (0..n).map(|i| span_data(i, &scope)).collect();
            exporter.export(batch).expect_err("refused");
        }
        let health = &exporter.health;
        let err = OTelSdkError::Timeout(DEFAULT_TIMEOUT);
        // Both failed exports were counted; within the minute, no new report.
        assert_eq!(health.failed(1, &err, "http://c"), None);
        // The collector comes back: reported once, with all 6 spans lost meanwhile.
        assert_eq!(health.succeeded("http://c"), Some(6));
        assert_eq!(health.succeeded("http://c"), None);
        // Failing again is reported again at once, then not within the minute.
        assert_eq!(health.failed(4, &err, "http://c"), Some(4));
        assert_eq!(health.failed(2, &err, "http://c"), None);
    }

    /// `OTEL_EXPORTER_OTLP_HEADERS` carries credentials (API keys, bearer
    /// tokens). A malformed entry stops start-up with an error the server prints to
    /// stderr (and so into the log pipeline): the error must name the header, not
    /// repeat the secret.
    #[test]
    fn a_bad_header_entry_does_not_echo_the_secret() {
        for list in [
            "x-honeycomb-team:SECRET-abc123",
            "authorization=Bearer%2SECRET-abc123",
        ] {
            let err = Settings::resolve(
                Some("http://c:4318"),
                env(&[("OTEL_EXPORTER_OTLP_HEADERS", list)]),
            )
            .expect_err("invalid");
            let text = err.to_string();
            assert!(!text.contains("SECRET-abc123"), "{text}");
        }
    }

    /// A password in the endpoint URL (`http://user:secret@collector:4318`, sent as
    /// basic auth) is a credential like a header's value: the failed-export error
    /// (which the warning logs), a refused endpoint's error and the settings' `Debug`
    /// all showed it.
    #[test]
    fn a_password_in_the_endpoint_is_never_shown() {
        let settings = Settings {
            url: "http://user:SECRET-abc123@127.0.0.1:9/v1/traces".into(),
            headers: vec![("x-api-key".into(), "SECRET-def456".into())],
            timeout: Duration::from_secs(2),
        };
        let debug = format!("{settings:?}");
        assert!(!debug.contains("SECRET"), "{debug}");
        assert!(debug.contains("user:***@127.0.0.1:9"), "{debug}");
        let mut exporter = OtlpExporter::new(settings).expect("exporter");
        exporter.stopping.store(true, Ordering::Release);
        let scope = InstrumentationScope::builder("marathon").build();
        let err = exporter
            .export(vec![span_data(0, &scope)])
            .expect_err("nothing listens on port 9");
        let text = err.to_string();
        assert!(!text.contains("SECRET"), "{text}");
        assert!(text.contains("user:***@127.0.0.1:9"), "{text}");
        for base in [
            "https://user:SECRET-abc123@c:4318",
            "ftp://user:SECRET-abc123@c:4318",
            "http://user:SECRET-abc123@[::1",
        ] {
            let err = Settings::resolve(Some(base), env(&[])).expect_err("refused");
            let text = err.to_string();
            assert!(!text.contains("SECRET"), "{base}: {text}");
        }
    }

    /// An exporter to a port nothing listens on (for encoding only).
    fn unreachable_exporter() -> OtlpExporter {
        OtlpExporter::new(Settings {
            url: "http://127.0.0.1:9/v1/traces".into(),
            headers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        })
        .expect("exporter")
    }

    /// Encodes one span with a `prompt` of `bytes`, then a full batch (2,048) of
    /// ordinary spans: that batch's body.
    fn full_batch_after_a_span_of(bytes: usize) -> Vec<u8> {
        let scope = InstrumentationScope::builder("marathon").build();
        let exporter = unreachable_exporter();
        let mut big = span_data(0, &scope);
        big.attributes
            .push(KeyValue::new("prompt", "x".repeat(bytes)));
        assert!(exporter.encode(&[big]).len() > bytes);
        let batch: Vec<SpanData> = (0..2048).map(|_| span_data(0, &scope)).collect();
        exporter.encode(&batch)
    }

    /// One batch holding a single large span (a prompt recorded as a field, or
    /// many span events) must not make every later request reserve that span's size
    /// once per span of the next batch.
    #[test]
    fn one_large_span_does_not_inflate_later_request_buffers() {
        let body = full_batch_after_a_span_of(4 << 20);
        assert!(
            body.capacity() <= 16 << 20,
            "a {} byte request reserved {} bytes",
            body.len(),
            body.capacity()
        );
    }

    /// The same with a 32 MB span: the next full batch asked the allocator for
    /// 2,048 × 40 MB and the process aborted.
    #[test]
    fn one_huge_span_then_a_full_batch_does_not_abort() {
        assert!(!full_batch_after_a_span_of(32 << 20).is_empty());
    }

    #[test]
    fn long_messages_get_multi_byte_lengths() {
        for len in [0, 1, 127, 128, 300, 16_383, 16_384, 70_000] {
            let mut buf = vec![9];
            message(&mut buf, 3, |b| b.extend(std::iter::repeat_n(7, len)));
            let mut expected = vec![9, 3 << 3 | 2];
            varint(&mut expected, len as u64);
            expected.extend(std::iter::repeat_n(7, len));
            assert_eq!(buf, expected, "{len}");
        }
    }

    #[test]
    fn settings_follow_the_otlp_variables() {
        let s = Settings::resolve(
            None,
            env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/"),
                ("OTEL_EXPORTER_OTLP_HEADERS", "api-key=a%20b, x-tenant = t1"),
                ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_COMPRESSION", "none"),
            ]),
        )
        .expect("valid")
        .expect("an endpoint");
        assert_eq!(
            s,
            Settings {
                url: "http://collector:4318/v1/traces".into(),
                headers: vec![
                    ("api-key".into(), "a b".into()),
                    ("x-tenant".into(), "t1".into())
                ],
                timeout: Duration::from_millis(2500),
            }
        );
        // The traces variables win over the general ones and the URL is kept as is;
        // the config's endpoint wins over both.
        let vars = [
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://general:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://traces:4318/custom",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "1"),
            ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "3"),
        ];
        let s = Settings::resolve(None, env(&vars))
            .expect("valid")
            .expect("an endpoint");
        assert_eq!(s.url, "http://traces:4318/custom");
        assert_eq!(s.timeout, Duration::from_millis(3));
        let s = Settings::resolve(Some("http://127.0.0.1:4318/v1/traces"), env(&vars))
            .expect("valid")
            .expect("an endpoint");
        assert_eq!(s.url, "http://127.0.0.1:4318/v1/traces");
    }

    #[test]
    fn bad_settings_name_the_variable() {
        // No endpoint: nothing to export, and no error.
        assert_eq!(Settings::resolve(None, env(&[])).expect("valid"), None);
        for (vars, variable) in [
            (
                vec![("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318")],
                "OTEL_EXPORTER_OTLP_ENDPOINT",
            ),
            (
                vec![(
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    "https://c:4318/v1/traces",
                )],
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_EXPORTER_OTLP_HEADERS", "novalue"),
                ],
                "OTEL_EXPORTER_OTLP_HEADERS",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "k=%zz"),
                ],
                "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
                ],
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
                ],
                "OTEL_EXPORTER_OTLP_TIMEOUT",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
                ],
                "OTEL_EXPORTER_OTLP_COMPRESSION",
            ),
            (
                vec![
                    ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                    ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
                ],
                "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
            ),
        ] {
            match Settings::resolve(None, env(&vars)) {
                Err(TelemetryError::Exporter { setting, reason }) => {
                    assert_eq!(setting, variable, "{vars:?}: {reason}");
                }
                other => panic!("{vars:?}: expected an exporter error, got {other:?}"),
            }
        }
        match Settings::resolve(Some("ftp://c"), env(&[])) {
            Err(TelemetryError::Exporter { setting, .. }) => assert_eq!(setting, "otlp_endpoint"),
            other => panic!("expected an exporter error, got {other:?}"),
        }
    }
}
