//! A store command applied by Redis whose reply is lost (response timeout, a
//! connection reset after the script ran): what the engine does with it.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use marathon_core::memory::MemoryQueue;
use marathon_core::{
    ActivityContext, ActivityError, ActivityOptions, Engine, EngineConfig, StartWorkflow, Worker,
    WorkerConfig, WorkflowContext, WorkflowError, WorkflowStatus,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};

async fn one_call(ctx: WorkflowContext, (): ()) -> Result<u32, WorkflowError> {
    let opts = ActivityOptions::default().start_to_close(Duration::from_secs(30));
    ctx.activity_with::<_, u32>("llm", &1u32, opts).await
}

/// Forwards connections to `target`; once armed, the first request holding `pattern`
/// is delivered to Redis, then the client's connection is closed before the reply
/// (Redis applied the command; the client only sees its connection drop).
struct CuttingProxy {
    port: u16,
    armed: Arc<AtomicBool>,
}

async fn write_all(to: &tokio::net::tcp::OwnedWriteHalf, buf: &[u8]) -> bool {
    let mut off = 0;
    while off < buf.len() {
        if to.writable().await.is_err() {
            return false;
        }
        match to.try_write(&buf[off..]) {
            Ok(k) => off += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return false,
        }
    }
    true
}

async fn pump(
    from: tokio::net::tcp::OwnedReadHalf,
    to: tokio::net::tcp::OwnedWriteHalf,
    cut: Arc<AtomicBool>,
    watch: Option<(Arc<AtomicBool>, &'static [u8])>,
) {
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        if from.readable().await.is_err() {
            return;
        }
        let n = match from.try_read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(_) => return,
        };
        if cut.load(Ordering::SeqCst) {
            return;
        }
        let hit = watch.as_ref().is_some_and(|(armed, pat)| {
            armed.load(Ordering::SeqCst)
                && buf[..n].windows(pat.len()).any(|w| w == *pat)
                && armed.swap(false, Ordering::SeqCst)
        });
        if !write_all(&to, &buf[..n]).await {
            return;
        }
        if hit {
            cut.store(true, Ordering::SeqCst);
            // Let Redis read it before its side closes too.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
    }
}

impl CuttingProxy {
    async fn start(target: u16, pattern: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = Arc::new(AtomicBool::new(false));
        let a = armed.clone();
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                let cut = Arc::new(AtomicBool::new(false));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(cr, sw, cut.clone(), Some((a.clone(), pattern))));
                tokio::spawn(pump(sr, cw, cut, None));
            }
        });
        Self { port, armed }
    }
}

async fn run_through_cut(pattern: &'static [u8]) -> (WorkflowStatus, Duration) {
    let prefix = prefix();
    let target: u16 = url()
        .rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or(6379);
    let proxy = CuttingProxy::start(target, pattern).await;
    let store = RedisStore::connect(RedisStoreConfig {
        url: format!("redis://127.0.0.1:{}", proxy.port),
        key_prefix: prefix.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let engine = Engine::builder()
        .store(Arc::new(store))
        .queue(Arc::new(MemoryQueue::default()))
        .config(EngineConfig {
            activity_grace: Duration::from_millis(200),
            task_failure_retry: Duration::from_millis(200),
            workflow_task_deadline: Duration::from_secs(30),
            ..EngineConfig::default()
        })
        .workflow("one", one_call)
        .activity("llm", |_ctx: ActivityContext, n: u32| async move {
            Ok::<_, ActivityError>(n + 1)
        })
        .build();
    let worker = Worker::start(
        engine.clone(),
        WorkerConfig {
            sweep_interval: Duration::from_millis(50),
            poll_wait: Duration::from_millis(200),
            shutdown_grace: Duration::from_millis(200),
            ..WorkerConfig::default()
        },
    );
    proxy.armed.store(true, Ordering::SeqCst);
    let t0 = Instant::now();
    let id = engine
        .start(StartWorkflow::new("one", json!(null)))
        .await
        .unwrap()
        .summary
        .id;
    let mut status = WorkflowStatus::Running;
    while t0.elapsed() < Duration::from_secs(60) {
        if let Ok(s) = engine.get(&id).await
            && s.status.is_terminal()
        {
            status = s.status;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = t0.elapsed();
    let fired = !proxy.armed.load(Ordering::SeqCst);
    worker.shutdown().await;
    teardown(&prefix).await;
    assert!(fired, "the connection was never cut");
    (status, took)
}

/// The connection drops between Redis applying a workflow task's append (activity
/// scheduled) and its reply. The task is handed back and replayed: the activity is
/// recorded as scheduled, so nothing new is sent, and the activity task is never
/// enqueued. Only the sweeper sends it, once its owed deadline (start_to_close +
/// grace: 30 s here, 300 s by default) has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_after_the_schedule_does_not_stall_the_activity() {
    let (status, took) = run_through_cut(b"activity_scheduled").await;
    assert_eq!(status, WorkflowStatus::Completed);
    assert!(
        took < Duration::from_secs(10),
        "completed only after {took:?}"
    );
}

/// The connection dropped between Redis applying an activity's result
/// (`append_keyed`) and its reply: the retry answers NotOwed, the result counts as
/// dropped, and the workflow task it owes waits for its deadline (30 s by default).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_after_an_activity_result_does_not_stall_the_workflow() {
    let (status, took) = run_through_cut(b"activity_completed").await;
    assert_eq!(status, WorkflowStatus::Completed);
    assert!(
        took < Duration::from_secs(10),
        "completed only after {took:?}"
    );
}
