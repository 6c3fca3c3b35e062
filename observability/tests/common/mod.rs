//! Helpers shared by the observability tests: an instrumented in-memory engine with a
//! known set of workflows, tiny blocking HTTP servers and clients on 127.0.0.1, and
//! the external tools (promtool, prometheus, rotel-agent), which must be installed.
#![allow(dead_code, unreachable_pub)]

use marathon_core::memory::{MemoryQueue, MemoryStore};
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, Engine, EngineConfig, Queue, RetryPolicy,
    StartWorkflow, Worker, WorkerConfig, WorkflowContext, WorkflowError, WorkflowId,
    WorkflowStatus,
};
use marathon_observability::{InstrumentedQueue, InstrumentedStore, Metrics};
use prost::Message as _;
use serde_json::json;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Whether the `stumbler` workflow has failed its one workflow task yet.
static STUMBLED: AtomicBool = AtomicBool::new(false);

/// An engine on instrumented in-memory backends, reporting to `metrics`, with the
/// workflows `ok` (three `add` activities), `napper` (`add`, a 100 ms timer, `add`),
/// `stumbler` (its first workflow task in the process panics, then one `add`), `flaky` (`boom`: a timeout, then two
/// failures, then it gives up), `hasty` (two `add`s with a start-to-close of 300 ms),
/// `listener` (waits for signal `go`, then one `add`) and
/// `waiter` (sleeps an hour; canceled by the tests).
pub fn engine(metrics: &Arc<Metrics>) -> Engine {
    let config = EngineConfig {
        task_failure_retry: Duration::from_millis(200),
        ..EngineConfig::default()
    };
    engine_with(metrics, Arc::new(MemoryQueue::default()), config)
}

/// [`engine`] on `queue` (instrumented here) with `config`.
pub fn engine_with(metrics: &Arc<Metrics>, queue: Arc<dyn Queue>, config: EngineConfig) -> Engine {
    let store = InstrumentedStore::boxed(Arc::new(MemoryStore::default()), "memory", metrics);
    let queue = InstrumentedQueue::boxed(queue, "memory", metrics);
    Engine::builder()
        .store(store)
        .queue(queue)
        .observer(metrics.clone())
        .config(config)
        .workflow("ok", |ctx: WorkflowContext, n: i64| async move {
            let a: i64 = ctx.activity("add", &(n, 1)).await?;
            let b: i64 = ctx.activity("add", &(a, 10)).await?;
            let c: i64 = ctx.activity("add", &(b, 100)).await?;
            Ok::<_, WorkflowError>(c)
        })
        .workflow("flaky", |ctx: WorkflowContext, (): ()| async move {
            let opts = ActivityOptions::default()
                .start_to_close(Duration::from_millis(300))
                .retry(RetryPolicy {
                    initial_interval: Duration::from_millis(50),
                    backoff_coefficient: 1.0,
                    maximum_interval: Duration::from_millis(50),
                    maximum_attempts: 3,
                    non_retryable_kinds: vec![],
                });
            ctx.activity_with::<_, ()>("boom", &(), opts).await?;
            Ok::<_, WorkflowError>(())
        })
        .workflow("napper", |ctx: WorkflowContext, n: i64| async move {
            let a: i64 = ctx.activity("add", &(n, 1)).await?;
            ctx.sleep(Duration::from_millis(100)).await?;
            let b: i64 = ctx.activity("add", &(a, 10)).await?;
            Ok::<_, WorkflowError>(b)
        })
        .workflow("stumbler", |ctx: WorkflowContext, n: i64| async move {
            // The first workflow task of the process fails (a panic), its retry runs.
            if !STUMBLED.swap(true, Ordering::SeqCst) {
                panic!("the first workflow task stumbles");
            }
            let a: i64 = ctx.activity("add", &(n, 1)).await?;
            Ok::<_, WorkflowError>(a)
        })
        .workflow("hasty", |ctx: WorkflowContext, n: i64| async move {
            let opts = ActivityOptions::default().start_to_close(Duration::from_millis(300));
            let a: i64 = ctx.activity_with("add", &(n, 1), opts.clone()).await?;
            let b: i64 = ctx.activity_with("add", &(a, 10), opts).await?;
            Ok::<_, WorkflowError>(b)
        })
        .workflow("listener", |ctx: WorkflowContext, n: i64| async move {
            let m: i64 = ctx.signal("go").await?;
            let a: i64 = ctx.activity("add", &(n, m)).await?;
            Ok::<_, WorkflowError>(a)
        })
        .workflow("waiter", |ctx: WorkflowContext, (): ()| async move {
            ctx.sleep(Duration::from_secs(3600)).await?;
            Ok::<_, WorkflowError>(())
        })
        .activity(
            "add",
            |_ctx: ActivityContext, (a, b): (i64, i64)| async move {
                // A span of the activity's own, as user code opens them.
                let _step = tracing::info_span!("user.step").entered();
                Ok::<_, ActivityError>(a + b)
            },
        )
        .activity("boom", |ctx: ActivityContext, (): ()| async move {
            if ctx.attempt() == 1 {
                // Outlives start_to_close: the first attempt times out.
                tokio::time::sleep(Duration::from_secs(5)).await;
            }
            Err::<(), _>(ActivityError::retryable("the service is down").with_kind("unavailable"))
        })
        .build()
}

/// A worker with quick sweeps and queue-depth samples every 100 ms.
pub fn worker(engine: &Engine) -> Worker {
    Worker::start(
        engine.clone(),
        WorkerConfig {
            sweep_interval: Duration::from_millis(50),
            poll_wait: Duration::from_millis(200),
            shutdown_grace: Duration::from_secs(2),
            dead_letter_interval: Duration::from_millis(100),
            ..WorkerConfig::default()
        },
    )
}

/// Waits until the workflow finishes and returns its status.
pub async fn finish(engine: &Engine, id: &WorkflowId) -> WorkflowStatus {
    let s = engine
        .result(id, Duration::from_secs(30))
        .await
        .expect("result");
    assert!(
        s.status.is_terminal(),
        "workflow {id} did not finish: {s:?}"
    );
    s.status
}

/// Runs one `name` workflow (input `null`) on `engine` with a worker of its own, to
/// its end; returns how it ended.
pub async fn run_one(engine: &Engine, name: &str) -> WorkflowStatus {
    let w = worker(engine);
    let id = engine
        .start(StartWorkflow::new(name, json!(null)))
        .await
        .expect("start")
        .summary
        .id;
    let status = finish(engine, &id).await;
    w.shutdown().await;
    status
}

/// Runs the known set: 3 `ok` completed, 1 `flaky` failed after retries, 1 `waiter` canceled.
pub async fn run_known_set(engine: &Engine) {
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push((
            engine
                .start(StartWorkflow::new("ok", json!(n)))
                .await
                .expect("start ok")
                .summary
                .id,
            WorkflowStatus::Completed,
        ));
    }
    ids.push((
        engine
            .start(StartWorkflow::new("flaky", json!(null)))
            .await
            .expect("start flaky")
            .summary
            .id,
        WorkflowStatus::Failed,
    ));
    let waiter = engine
        .start(StartWorkflow::new("waiter", json!(null)))
        .await
        .expect("start waiter")
        .summary
        .id;
    // Cancel once the timer is recorded, so that the cancellation ends a sleeping workflow.
    wait_for_event(engine, &waiter, "timer_started").await;
    engine.cancel(&waiter, None).await.expect("cancel");
    ids.push((waiter, WorkflowStatus::Canceled));
    for (id, want) in ids {
        assert_eq!(finish(engine, &id).await, want, "workflow {id}");
    }
}

/// One span an OTLP receiver got.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: String,
    pub trace_id: Vec<u8>,
    pub span_id: Vec<u8>,
    pub parent: Vec<u8>,
    pub service: Option<String>,
    /// Attributes, values as text.
    pub attrs: std::collections::BTreeMap<String, String>,
    /// The attributes whose value is an integer.
    pub ints: std::collections::BTreeSet<String>,
    /// Links: the trace and span id each names.
    pub links: Vec<(Vec<u8>, Vec<u8>)>,
    /// The span's kind, as OTLP numbers it (1 internal, 2 server, 3 client, ...).
    pub kind: i32,
}

/// An in-process OTLP/HTTP receiver on a free port, decoding every export with
/// `opentelemetry-proto`: every span it was sent.
pub fn receiver() -> (u16, Arc<Mutex<Vec<Span>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let seen = spans.clone();
    let port = serve(move |req| {
        assert_eq!(req.method, "POST");
        assert_eq!(req.path, "/v1/traces");
        let msg =
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                req.body.as_slice(),
            )
            .expect("OTLP protobuf");
        let mut out = seen.lock().expect("not poisoned");
        for rs in msg.resource_spans {
            let service = rs.resource.as_ref().and_then(|r| {
                r.attributes
                    .iter()
                    .find(|a| a.key == "service.name")
                    .and_then(|a| match a.value.as_ref()?.value.as_ref()? {
                        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                            s,
                        ) => Some(s.clone()),
                        _ => None,
                    })
            });
            for ss in rs.scope_spans {
                for s in ss.spans {
                    use opentelemetry_proto::tonic::common::v1::any_value::Value;
                    let attrs = s
                        .attributes
                        .iter()
                        .map(|a| {
                            let v = match a.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(Value::StringValue(s)) => s.clone(),
                                Some(Value::IntValue(i)) => i.to_string(),
                                Some(Value::BoolValue(b)) => b.to_string(),
                                Some(Value::DoubleValue(d)) => d.to_string(),
                                other => format!("{other:?}"),
                            };
                            (a.key.clone(), v)
                        })
                        .collect();
                    let ints = s
                        .attributes
                        .iter()
                        .filter(|a| {
                            matches!(
                                a.value.as_ref().and_then(|v| v.value.as_ref()),
                                Some(Value::IntValue(_))
                            )
                        })
                        .map(|a| a.key.clone())
                        .collect();
                    out.push(Span {
                        attrs,
                        ints,
                        links: s
                            .links
                            .into_iter()
                            .map(|l| (l.trace_id, l.span_id))
                            .collect(),
                        kind: s.kind,
                        name: s.name,
                        trace_id: s.trace_id,
                        span_id: s.span_id,
                        parent: s.parent_span_id,
                        service: service.clone(),
                    });
                }
            }
        }
        (200, "application/x-protobuf", Vec::new())
    });
    (port, spans)
}

/// Lowercase hex of `bytes` (a trace or span id).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits (up to 10 s) until workflow `id` has an event of type `type_name`.
pub async fn wait_for_event(engine: &Engine, id: &WorkflowId, type_name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = engine
            .events(id, marathon_core::Seq::ZERO, 1000)
            .await
            .expect("events");
        if events.iter().any(|e| e.data.type_name() == type_name) {
            return;
        }
        assert!(Instant::now() < deadline, "{id}: no {type_name} event");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A text exposition, parsed by `prometheus-parse`.
pub fn parse(text: &str) -> prometheus_parse::Scrape {
    prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_string())))
        .expect("exposition parses")
}

/// The value of the one sample of `name` whose labels include every `labels` pair (with
/// `only`, no others): a histogram's value is its `+Inf` count.
pub fn sample_value(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    labels: &[(&str, &str)],
    only: bool,
) -> Option<f64> {
    use prometheus_parse::Value as V;
    let found: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|x| {
            x.metric == name
                && (!only || x.labels.len() == labels.len())
                && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v))
        })
        .map(|x| match &x.value {
            V::Counter(v) | V::Gauge(v) | V::Untyped(v) => *v,
            V::Histogram(buckets) => buckets
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map_or(f64::NAN, |b| b.count),
            V::Summary(_) => f64::NAN,
        })
        .collect();
    assert!(
        found.len() <= 1,
        "{name}{labels:?} matches {} samples",
        found.len()
    );
    found.first().copied()
}

/// A free 127.0.0.1 port (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// One parsed HTTP request.
pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Serves HTTP/1.1 on a 127.0.0.1 port in background threads (keep-alive, Content-Length
/// bodies): `handle` returns the status, content type and body of each response.
pub fn serve(
    handle: impl Fn(Request) -> (u16, &'static str, Vec<u8>) + Send + Sync + 'static,
) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let handle = handle.clone();
            std::thread::spawn(move || {
                let _ = serve_conn(conn, &*handle);
            });
        }
    });
    port
}

fn serve_conn(
    conn: TcpStream,
    handle: &dyn Fn(Request) -> (u16, &'static str, Vec<u8>),
) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut out = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut parts = line.split_whitespace();
        let method = parts.next().unwrap_or_default().to_string();
        let path = parts.next().unwrap_or_default().to_string();
        let mut len = 0usize;
        let mut close = false;
        loop {
            let mut h = String::new();
            reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').unwrap_or((h, ""));
            match k.trim().to_ascii_lowercase().as_str() {
                "content-length" => len = v.trim().parse().unwrap_or(0),
                "connection" => close = v.trim().eq_ignore_ascii_case("close"),
                "transfer-encoding" => panic!("chunked requests are not supported here"),
                _ => {}
            }
        }
        let mut body = vec![0; len];
        reader.read_exact(&mut body)?;
        let (status, ctype, resp) = handle(Request { method, path, body });
        write!(
            out,
            "HTTP/1.1 {status} X\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
            resp.len()
        )?;
        out.write_all(&resp)?;
        out.flush()?;
        if close {
            return Ok(());
        }
    }
}

/// A blocking `GET http://127.0.0.1:{port}{path}`; the status and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok((status, body))
}

pub fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// Percent-encodes a query parameter.
/// Lowercase hex (a trace or span id) as bytes.
pub fn hex_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex digits"))
        .collect()
}

pub fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A tool the tests need; fails (never skips) when it is missing.
pub fn tool(env: &str, default: &str) -> PathBuf {
    let path = std::env::var(env).map_or_else(|_| PathBuf::from(default), PathBuf::from);
    let found = if path.components().count() > 1 {
        path.exists()
    } else {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {}", path.display()))
            .output()
            .is_ok_and(|o| o.status.success())
    };
    assert!(
        found,
        "{} not found (set {env}); install it with scripts/observability-tools.sh",
        path.display()
    );
    path
}

pub fn promtool() -> PathBuf {
    tool("MARATHON_PROMTOOL", "promtool")
}

pub fn prometheus() -> PathBuf {
    tool("MARATHON_PROMETHEUS", "prometheus")
}

pub fn rotel() -> PathBuf {
    let default = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../.venv-rotel/bin/rotel-agent"
    );
    tool("MARATHON_ROTEL", default)
}

/// A child process killed (by its id) when dropped.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until something accepts connections on `port`.
pub fn wait_listening(port: u16, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A fresh temporary directory under the target directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "marathon-obs-{name}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
