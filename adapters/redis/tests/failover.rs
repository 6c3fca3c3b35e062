//! Failure modes of the shared connection that a plain kill/restart does not show:
//! the endpoint moves to another server while the old TCP connection stays open.
//!
//! A small TCP proxy stands in for a managed Redis endpoint (ElastiCache primary
//! endpoint, a Sentinel-fed VIP, a k8s Service): new connections go to the current
//! target; existing flows keep going where they went, or are silently dropped.

mod common;

use common::low_port;
use common::proxy::FaultProxy;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use marathon_core::{
    EventData, NewEvent, NewWorkflow, OwedChanges, Seq, Store, StoreError, Timestamp, WorkflowId,
};
use marathon_redis::{RedisStore, RedisStoreConfig};
use serde_json::json;

/// A fresh directory under the system's temporary one, for a private server's files.
fn scratch_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("marathon-failover-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A private `redis-server` on a [`low_port`], killed when dropped.
struct Server {
    port: u16,
    redis: common::PrivateRedis,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.redis.dir);
    }
}

impl Server {
    async fn start() -> Self {
        let port = low_port();
        Self {
            port,
            redis: common::PrivateRedis::start(port, scratch_dir()).await,
        }
    }

    async fn cmd(&self, args: &[&str]) -> redis::Value {
        cmd_on(self.port, args).await
    }
}

/// Runs one command on the server at `port`.
async fn cmd_on(port: u16, args: &[&str]) -> redis::Value {
    let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut c).await.unwrap()
}

fn new_wf(id: &WorkflowId) -> NewWorkflow {
    NewWorkflow {
        id: id.clone(),
        name: "failover".into(),
        input: json!({}),
        task_queue: "tq".into(),
        idempotency_key: None,
        started_at: Timestamp(1),
        task_deadline: Timestamp(1000),
        trace_context: None,
    }
}

fn signal(n: u64) -> NewEvent {
    NewEvent::new(
        Timestamp(10 + n),
        EventData::SignalReceived {
            name: "s".into(),
            payload: json!(n),
        },
    )
}

async fn store_via(proxy: &FaultProxy) -> RedisStore {
    RedisStore::connect(RedisStoreConfig {
        url: proxy.url(),
        key_prefix: format!("marathon-failover-{}:", proxy.port),
        connect_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(300),
        ..Default::default()
    })
    .await
    .expect("store via proxy")
}

/// A store through `proxy` holding a new workflow, and that workflow's id.
async fn store_with_workflow(proxy: &FaultProxy) -> (RedisStore, WorkflowId) {
    let store = store_via(proxy).await;
    let id = WorkflowId::random();
    store.create(new_wf(&id)).await.unwrap();
    (store, id)
}

/// Appends one event, retrying retryable errors (as the engine does) for up to `max`;
/// returns the last error seen if it never succeeded.
async fn append_with_retries(
    store: &RedisStore,
    id: &WorkflowId,
    mut last: Seq,
    max: Duration,
) -> Result<Seq, String> {
    let start = Instant::now();
    let mut seen = String::new();
    while start.elapsed() < max {
        match store
            .append(id, last, vec![signal(last.0)], OwedChanges::none())
            .await
        {
            Ok(s) => return Ok(s),
            Err(StoreError::Conflict { actual, .. }) => last = actual,
            Err(e) if e.is_retryable() => {
                seen = format!("{e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(format!("not retryable: {e:?}")),
        }
    }
    Err(format!("still failing after {max:?}: {seen}"))
}

/// A failover where the old primary stays up as a replica (manual failover, a
/// Sentinel/ElastiCache promotion that does not reboot the old node): the endpoint
/// now leads to the new primary, but the store's one shared connection still talks
/// to the old node and every write answers READONLY. READONLY is classified as
/// retryable, yet the connection is never replaced, so the store never recovers.
#[tokio::test]
async fn recovers_when_the_old_primary_is_demoted_to_replica() {
    let a = Server::start().await;
    let b = Server::start().await;
    let pa = a.port.to_string();
    let pb = b.port.to_string();
    // Redis 7 delays a diskless full sync by 5 s by default (waiting for more
    // replicas); start it at once on both sides of the failover.
    for s in [&a, &b] {
        s.cmd(&["CONFIG", "SET", "repl-diskless-sync-delay", "0"])
            .await;
    }
    b.cmd(&["REPLICAOF", "127.0.0.1", &pa]).await;
    let proxy = FaultProxy::start(a.port).await;
    let (store, id) = store_with_workflow(&proxy).await;
    let last = store
        .append(&id, Seq(1), vec![signal(1)], OwedChanges::none())
        .await
        .unwrap();
    // Wait until B has the workflow (replication caught up).
    let mut synced = false;
    for _ in 0..600 {
        let pat = format!("*:wf:{id}:sum");
        if let redis::Value::Array(keys) = b.cmd(&["KEYS", &pat]).await
            && !keys.is_empty()
        {
            synced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(synced, "replica never synced");
    // Failover: B becomes primary, A its replica; the endpoint now leads to B.
    b.cmd(&["REPLICAOF", "NO", "ONE"]).await;
    a.cmd(&["REPLICAOF", "127.0.0.1", &pb]).await;
    proxy.target.store(b.port, Ordering::SeqCst);
    let r = append_with_retries(&store, &id, last, Duration::from_secs(30)).await;
    // A fresh store through the same endpoint works at once.
    let fresh = store_via(&proxy).await;
    let fresh_ok = append_with_retries(&fresh, &id, last, Duration::from_secs(30)).await;
    drop((a, b));
    assert!(fresh_ok.is_ok(), "a new connection fails too: {fresh_ok:?}");
    assert!(r.is_ok(), "store stuck after failover: {r:?}");
}

/// The store's connection is silently cut (a NAT/conntrack/load-balancer entry
/// dropped, a network partition healed by re-routing): nothing resets the socket,
/// every request times out. New connections work at once, but the store keeps
/// using the dead one (a timeout never makes the ConnectionManager reconnect).
#[tokio::test]
async fn recovers_when_its_connection_is_silently_dropped() {
    let a = Server::start().await;
    let proxy = FaultProxy::start(a.port).await;
    let (store, id) = store_with_workflow(&proxy).await;
    let last = store
        .append(&id, Seq(1), vec![signal(1)], OwedChanges::none())
        .await
        .unwrap();
    proxy.epoch.fetch_add(1, Ordering::SeqCst);
    let r = append_with_retries(&store, &id, last, Duration::from_secs(30)).await;
    let fresh = store_via(&proxy).await;
    let fresh_ok = append_with_retries(&fresh, &id, last, Duration::from_secs(30)).await;
    drop(a);
    assert!(fresh_ok.is_ok(), "a new connection fails too: {fresh_ok:?}");
    assert!(r.is_ok(), "store stuck on a dead connection: {r:?}");
}

/// The script cache is lost (SCRIPT FLUSH, a restart of a persistent Redis, a
/// failover to a node that never saw the scripts): every script still runs.
#[tokio::test]
async fn scripts_survive_script_flush() {
    let a = Server::start().await;
    let proxy = FaultProxy::start(a.port).await;
    let (store, id) = store_with_workflow(&proxy).await;
    a.cmd(&["SCRIPT", "FLUSH"]).await;
    let last = store
        .append(&id, Seq(1), vec![signal(1)], OwedChanges::none())
        .await
        .expect("append after SCRIPT FLUSH");
    a.cmd(&["SCRIPT", "FLUSH"]).await;
    let r = store
        .append_keyed(
            &id,
            marathon_core::KeyedAppend {
                key: Some("k".into()),
                requires: None,
                requires_deadline: None,
                events: vec![signal(2)],
                owed: OwedChanges::none(),
            },
        )
        .await
        .expect("keyed append after SCRIPT FLUSH");
    assert!(matches!(r, marathon_core::KeyedOutcome::Appended(s) if s.0 == last.0 + 1));
    a.cmd(&["SCRIPT", "FLUSH"]).await;
    store
        .claim_overdue(Timestamp(u64::MAX / 4), Duration::from_secs(1), 10)
        .await
        .expect("claim after SCRIPT FLUSH");
}

/// Redis out of memory (maxmemory, noeviction): a keyed append fails as unavailable
/// (retryable) without recording its dedupe key, so its retry is appended, not
/// dropped as a duplicate.
#[tokio::test]
async fn out_of_memory_leaves_no_half_written_keyed_append() {
    let a = Server::start().await;
    let proxy = FaultProxy::start(a.port).await;
    let (store, id) = store_with_workflow(&proxy).await;
    a.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await;
    a.cmd(&["CONFIG", "SET", "maxmemory", "1"]).await;
    let keyed = || marathon_core::KeyedAppend {
        key: Some("sig-1".into()),
        requires: None,
        requires_deadline: None,
        events: vec![signal(2)],
        owed: OwedChanges::none(),
    };
    let err = store.append_keyed(&id, keyed()).await.unwrap_err();
    // Transient (memory frees as retention purges): retried, a 503 over HTTP, not a 500.
    assert!(err.is_retryable(), "OOM error: {err:?}");
    a.cmd(&["CONFIG", "SET", "maxmemory", "0"]).await;
    let again = store.append_keyed(&id, keyed()).await.unwrap();
    assert!(
        matches!(again, marathon_core::KeyedOutcome::Appended(_)),
        "retry after OOM: {again:?}"
    );
    let events = store.read(&id, Seq::ZERO, 100).await.unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
}

/// Redis out of memory (maxmemory, noeviction) when an activity's result arrives:
/// `append_keyed.lua` consumes the attempt's owed entry (HDEL + ZREM, allowed when
/// out of memory) before its RPUSH. Redis lets a script that has already written go
/// on (no half-written append): the result is recorded once. (Passes: checked.)
#[tokio::test]
async fn out_of_memory_does_not_consume_an_activity_attempt() {
    let a = Server::start().await;
    let proxy = FaultProxy::start(a.port).await;
    let (store, id) = store_with_workflow(&proxy).await;
    let attempt = marathon_core::OwedEntry {
        kind: marathon_core::OwedKind::Activity {
            activity_id: 1,
            attempt: 1,
            scheduled_seq: Seq(2),
            redeliveries: 0,
            started: None,
            started_copy: 0,
            resends: 0,
        },
        task_queue: "tq".into(),
        deadline: Timestamp(5_000),
        trace_context: None,
        run: None,
    };
    let key = attempt.kind.key();
    let mut owed = OwedChanges::none().set(attempt);
    owed.clear.push("wf".into());
    // The workflow task schedules the activity (the attempt is now owed).
    let last = store
        .append(&id, Seq(1), vec![signal(1)], owed)
        .await
        .unwrap();
    a.cmd(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await;
    a.cmd(&["CONFIG", "SET", "maxmemory", "1"]).await;
    let result = || marathon_core::KeyedAppend {
        key: None,
        requires: Some(key.clone()),
        requires_deadline: None,
        events: vec![signal(2)],
        owed: OwedChanges::none().set(marathon_core::OwedEntry {
            kind: marathon_core::OwedKind::WORKFLOW_TASK,
            task_queue: "tq".into(),
            deadline: Timestamp(6_000),
            trace_context: None,
            run: None,
        }),
    };
    let first = store.append_keyed(&id, result()).await;
    a.cmd(&["CONFIG", "SET", "maxmemory", "0"]).await;
    let again = match first {
        Ok(r) => r,
        // The activity worker hands the task back; its retry records the result.
        Err(_) => store.append_keyed(&id, result()).await.unwrap(),
    };
    let events = store.read(&id, Seq::ZERO, 100).await.unwrap();
    let owed = store
        .claim_overdue(Timestamp(u64::MAX / 4), Duration::from_secs(1), 10)
        .await
        .unwrap();
    assert!(
        matches!(again, marathon_core::KeyedOutcome::Appended(s) if s.0 == last.0 + 1),
        "the activity's result after OOM: {again:?}; history has {} events (last {last}); \
         owed work left: {owed:?}",
        events.len()
    );
}

/// After a Redis restart the shared append reader reconnects: a new subscription is
/// woken by the next append at once, not by its 10 s fallback re-read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_append_reader_reconnects_after_a_restart() {
    use futures::StreamExt;
    let port = low_port();
    let dir = scratch_dir();
    let mut server = common::PrivateRedis::start(port, dir.clone()).await;
    let store = RedisStore::connect(RedisStoreConfig {
        url: format!("redis://127.0.0.1:{port}"),
        key_prefix: "marathon-sub:".into(),
        connect_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await
    .unwrap();
    let id = WorkflowId::random();
    store.create(new_wf(&id)).await.unwrap();
    let mut old = store.subscribe(&id, Seq(1)).await.unwrap();
    server.kill().await;
    let ended = tokio::time::timeout(Duration::from_secs(5), old.next()).await;
    let _server2 = common::PrivateRedis::start(port, dir.clone()).await;
    let last;
    let t0 = Instant::now();
    loop {
        match store.get(&id).await {
            Ok(Some(s)) => {
                last = s.last_seq;
                break;
            }
            _ if t0.elapsed() < Duration::from_secs(30) => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            other => panic!("no recovery: {other:?}"),
        }
    }
    // Wait until the reader is back, blocked in its XREAD on the new server (its
    // backoff is at most 2 s, but a reconnect that times out on a loaded machine
    // waits another round: a fixed sleep is not enough).
    let t0 = Instant::now();
    loop {
        let mut c = redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let clients: String = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut c)
            .await
            .unwrap();
        if clients.contains("cmd=xread") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the append reader did not reconnect: {clients}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sub = store.subscribe(&id, last).await.unwrap();
    let t = Instant::now();
    store
        .append(&id, last, vec![signal(9)], OwedChanges::none())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(15), sub.next()).await;
    let waited = t.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!("old subscription after kill: {ended:?}; woken after {waited:?}");
    assert!(matches!(got, Ok(Some(Ok(_)))), "{got:?}");
    // Well below the 10 s fallback re-read that would wake it otherwise.
    assert!(
        waited < Duration::from_secs(5),
        "woken only after {waited:?}"
    );
}

/// A longer outage (8 s, requests failing all along): the store recovers soon after
/// Redis is back.
#[tokio::test]
async fn recovers_after_a_long_outage() {
    let port = low_port();
    let dir = scratch_dir();
    let mut server = common::PrivateRedis::start(port, dir.clone()).await;
    let store = RedisStore::connect(RedisStoreConfig {
        url: format!("redis://127.0.0.1:{port}"),
        key_prefix: "marathon-long:".into(),
        connect_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(500),
        ..Default::default()
    })
    .await
    .unwrap();
    server.kill().await;
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(8) {
        assert!(store.ping().await.unwrap_err().is_retryable());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _s2 = common::PrivateRedis::start(port, dir.clone()).await;
    let t = Instant::now();
    let mut ok = false;
    // It takes well under a second; the margin is for a loaded machine.
    while t.elapsed() < Duration::from_secs(20) {
        if store.ping().await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(ok, "no recovery 20 s after Redis came back");
    eprintln!("recovered after {:?}", t.elapsed());
}

/// The append reader reconnects to a server whose streams are behind the position it
/// had read up to: the server restarted without its data, or the endpoint moved to
/// another server, and the old server's clock ran ahead (stream ids are its clock in
/// ms; here a notification written with an id a day ahead stands for it). New
/// appends get ids below that position, and the reader, reading after it, announced
/// none of them: subscriptions woke only by their 10 s fallback re-read, until the
/// new server's clock passed the old position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_append_reader_follows_a_stream_that_went_back_after_a_restart() {
    use futures::StreamExt;
    let port = low_port();
    let dir = scratch_dir();
    let mut server = common::PrivateRedis::start(port, dir.clone()).await;
    let prefix = "marathon-back:";
    let store = RedisStore::connect(RedisStoreConfig {
        url: format!("redis://127.0.0.1:{port}"),
        key_prefix: prefix.into(),
        connect_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(500),
        shards: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    let stream = format!("{prefix}{{s0}}:stream");
    let id = WorkflowId::random();
    store.create(new_wf(&id)).await.unwrap();
    let mut sub = store.subscribe(&id, Seq(1)).await.unwrap();
    // The old server's clock is a day ahead: its next notification says so.
    let ahead = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 86_400_000;
    cmd_on(
        port,
        &[
            "XADD",
            &stream,
            &format!("{ahead}-0"),
            "w",
            "none",
            "s",
            "0",
        ],
    )
    .await;
    store
        .append(&id, Seq(1), vec![signal(1)], OwedChanges::none())
        .await
        .unwrap();
    // The reader has read past the entry from the future (it announced this append).
    let first = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
    assert!(matches!(first, Ok(Some(Ok(_)))), "{first:?}");
    drop(sub);
    // Restarted without its data (a new directory: no append-only file).
    server.kill().await;
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    let _server2 = common::PrivateRedis::start(port, dir.clone()).await;
    let t0 = Instant::now();
    while store.create(new_wf(&id)).await.is_err() {
        assert!(t0.elapsed() < Duration::from_secs(30), "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Wait until the reader is back, blocked in its XREAD on the new server.
    let t0 = Instant::now();
    loop {
        let clients: String =
            redis::from_redis_value(cmd_on(port, &["CLIENT", "LIST"]).await).expect("CLIENT LIST");
        if clients.contains("cmd=xread") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the append reader did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut sub = store.subscribe(&id, Seq(1)).await.unwrap();
    let t = Instant::now();
    store
        .append(&id, Seq(1), vec![signal(2)], OwedChanges::none())
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(15), sub.next()).await;
    let waited = t.elapsed();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(matches!(got, Ok(Some(Ok(_)))), "{got:?}");
    // Well below the 10 s fallback re-read that would wake it otherwise.
    assert!(
        waited < Duration::from_secs(5),
        "woken only after {waited:?}"
    );
}

/// Redis closes the store's idle connection (its `timeout` setting, a managed
/// service's idle limit, a proxy's idle timeout, a restart while nothing was asked;
/// `CLIENT KILL` here): reads that come next are answered. Before, the first request
/// after the close failed with `Unavailable` ("broken pipe": the connection was
/// known closed only once a request had failed on it), a 503 for the API's first
/// `GET` after a quiet period; the next one worked.
#[tokio::test]
async fn reads_after_the_server_closed_an_idle_connection_are_answered() {
    let a = Server::start().await;
    let store = RedisStore::connect(RedisStoreConfig {
        url: format!("redis://127.0.0.1:{}", a.port),
        key_prefix: "marathon-idle:".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let id = WorkflowId::random();
    store.create(new_wf(&id)).await.unwrap();
    a.cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        .await;
    let got = store.get(&id).await.map(|s| s.map(|s| s.last_seq));
    a.cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        .await;
    let read = store.read(&id, Seq::ZERO, 10).await.map(|e| e.len());
    a.cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        .await;
    let listed = store
        .list(&marathon_core::ListQuery::default())
        .await
        .map(|p| p.items.len());
    assert!(matches!(got, Ok(Some(Seq(1)))), "get: {got:?}");
    assert!(matches!(read, Ok(1)), "read: {read:?}");
    assert!(matches!(listed, Ok(1)), "list: {listed:?}");
}

/// The endpoint moves to another server (a promoted replica) while the old one stays
/// up as a primary, and the store's shared connection, closed on the old server (an
/// idle limit; `CLIENT KILL` here), reconnects to the new one. The append reader's
/// connection, busy with its blocking reads, was never closed: it kept reading the old
/// server's streams, which no append reaches any more, so subscriptions woke only by
/// their 10 s fallback re-read, for as long as the old server lived. The reader now
/// follows the shared connection: when that one reconnects, so does the reader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_append_reader_follows_the_shared_connection_to_a_new_server() {
    use futures::StreamExt;
    let a = Server::start().await;
    let b = Server::start().await;
    let pa = a.port.to_string();
    for s in [&a, &b] {
        s.cmd(&["CONFIG", "SET", "repl-diskless-sync-delay", "0"])
            .await;
    }
    b.cmd(&["REPLICAOF", "127.0.0.1", &pa]).await;
    let proxy = FaultProxy::start(a.port).await;
    let (store, id) = store_with_workflow(&proxy).await;
    let mut sub = store.subscribe(&id, Seq(1)).await.unwrap();
    let last = store
        .append(&id, Seq(1), vec![signal(1)], OwedChanges::none())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), sub.next()).await;
    assert!(matches!(first, Ok(Some(Ok(_)))), "{first:?}");
    // B has the history (replication caught up).
    let t0 = Instant::now();
    loop {
        let ev: Vec<String> =
            redis::from_redis_value(b.cmd(&["KEYS", &format!("*:wf:{id}:ev")]).await).unwrap();
        if let Some(k) = ev.first()
            && matches!(b.cmd(&["LLEN", k]).await, redis::Value::Int(2))
        {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "replica never synced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The endpoint moves to B, promoted; A stays up, as a primary.
    b.cmd(&["REPLICAOF", "NO", "ONE"]).await;
    proxy.target.store(b.port, Ordering::SeqCst);
    // A closes the store's shared connection (not the reader's, busy in XREAD).
    let clients: String = redis::from_redis_value(a.cmd(&["CLIENT", "LIST"]).await).unwrap();
    for line in clients.lines() {
        if line.contains("cmd=xread") || line.contains("cmd=client|list") {
            continue;
        }
        if let Some(cid) = line.split(' ').find_map(|f| f.strip_prefix("id=")) {
            a.cmd(&["CLIENT", "KILL", "ID", cid]).await;
        }
    }
    let last = append_with_retries(&store, &id, last, Duration::from_secs(30))
        .await
        .unwrap();
    let ev: Vec<String> =
        redis::from_redis_value(b.cmd(&["KEYS", &format!("*:wf:{id}:ev")]).await).unwrap();
    assert!(
        matches!(b.cmd(&["LLEN", &ev[0]]).await, redis::Value::Int(3)),
        "the append went to B"
    );
    let t = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(15), sub.next()).await;
    let waited = t.elapsed();
    assert!(
        matches!(got, Ok(Some(Ok(ref e))) if e.seq == last),
        "{got:?}"
    );
    // Well below the 10 s fallback re-read that would wake it otherwise.
    assert!(
        waited < Duration::from_secs(5),
        "woken only after {waited:?}"
    );
    drop((a, b));
}
