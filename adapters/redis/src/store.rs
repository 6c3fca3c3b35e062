//! [`RedisStore`]: the [`Store`] trait on Redis, one Lua script per atomic step.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use marathon_core::{
    AttemptExtend, AttemptStart, Created, Event, EventData, EventStream, KeyedAppend, KeyedOutcome,
    ListBudget, ListPage, ListQuery, NewEvent, NewWorkflow, Owed, OwedChanges, OwedEntry, OwedKind,
    Seq, Store, StoreError, SummaryPatch, Timestamp, WorkflowId, WorkflowStatus, WorkflowSummary,
    json_len,
};
use redis::aio::ConnectionManagerConfig;
use redis::cluster::ClusterClientBuilder;
use redis::{Client, Cmd, ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind, Value};

use crate::config::{RedisStoreConfig, masked_url};
use crate::conn::{Conn, Target};
use crate::keys::{Keys, WfKeys};
use crate::notify::{Notifier, Registration};

const COMMON: &str = include_str!("scripts/common.lua");
const STREAM_MAXLEN: &str = "10000";
const DEFAULT_LIST_LIMIT: usize = 100;
const MAX_LIST_LIMIT: usize = 1000;
const CURSOR_PREFIX: &str = "c1:";
/// Most events a subscription reads at a time.
const SUBSCRIBE_BATCH: u64 = 256;
/// Events a subscription reads first, before their size says how many to read.
const SUBSCRIBE_FIRST_READ: u64 = 8;
/// About the most event JSON a subscription reads at a time (at least one event):
/// a slow reader holds what was read until it takes it.
const SUBSCRIBE_BYTES: u64 = 4 * 1024 * 1024;
const SUBSCRIBE_BLOCK: Duration = Duration::from_secs(10);
const CLAIM_ROUNDS: usize = 4;
/// Summary fields that can be large (output, error, task failure), whose lengths
/// `list` reads before the summaries.
const LARGE_SUMMARY_FIELDS: [&str; 3] = ["out", "err", "tf"];
/// What `list`'s estimate counts for a summary's other fields and its JSON keys (id,
/// name, task queue, idempotency key, times, trace context); the summaries read are
/// then measured exactly.
const SUMMARY_OVERHEAD: usize = 1024;

/// Why a Redis reply or stored value could not be understood (a [`StoreError::Backend`]).
#[derive(Debug, thiserror::Error)]
enum DataError {
    #[error("unexpected reply from Redis: {0}")]
    Reply(String),
    #[error("invalid JSON in Redis: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid configuration: {0}")]
    Config(String),
}

fn backend(e: impl Into<DataError>) -> StoreError {
    StoreError::Backend(Box::new(e.into()))
}

pub(crate) fn bad_reply(what: impl Into<String>) -> StoreError {
    backend(DataError::Reply(what.into()))
}

/// Classifies a client error once, at the boundary: transient ones are retryable.
pub(crate) fn classify(e: RedisError) -> StoreError {
    let transient = e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_cluster_error()
        || matches!(
            e.kind(),
            ErrorKind::Io
                | ErrorKind::ClusterConnectionNotFound
                | ErrorKind::Server(
                    ServerErrorKind::BusyLoading
                        | ServerErrorKind::MasterDown
                        | ServerErrorKind::ReadOnly
                        | ServerErrorKind::TryAgain
                        | ServerErrorKind::ClusterDown
                )
        )
        // Out of memory (noeviction) passes as memory frees; a busy script ends.
        || matches!(e.code(), Some("OOM" | "BUSY"))
        // A script stopped before its first write by a key of a Redis Cluster slot
        // being migrated (see `batch_prepare` in common.lua): it goes in once the
        // migration is over, or is sent to the slot's new node.
        || e
            .detail()
            .is_some_and(|d| d.contains("Script attempted to access a non local key"));
    if transient {
        StoreError::Unavailable(Box::new(e))
    } else {
        StoreError::Backend(Box::new(e))
    }
}

struct Scripts {
    create: Script,
    append: Script,
    keyed: Script,
    claim: Script,
    purge: Script,
    idem_release: Script,
    start: Script,
    extend: Script,
}

impl Scripts {
    fn new() -> Self {
        let with_common = |s: &str| Script::new(&format!("{COMMON}\n{s}"));
        Self {
            create: with_common(include_str!("scripts/create.lua")),
            append: with_common(include_str!("scripts/append.lua")),
            keyed: with_common(include_str!("scripts/append_keyed.lua")),
            claim: Script::new(include_str!("scripts/claim.lua")),
            purge: Script::new(include_str!("scripts/purge.lua")),
            idem_release: Script::new(include_str!("scripts/idem_release.lua")),
            start: with_common(include_str!("scripts/start.lua")),
            extend: with_common(include_str!("scripts/extend.lua")),
        }
    }
}

struct Inner {
    /// Round trips made on `conn` (see [`RedisStore::round_trips`]).
    round_trips: AtomicU64,
    /// The shared connection: a `ConnectionManager` or a cluster connection.
    conn: Conn,
    keys: Keys,
    scripts: Scripts,
    retention_ms: u64,
    /// The shared reader of the shards' append streams (wakes subscriptions).
    notifier: Arc<Notifier>,
}

/// Marathon's [`Store`] on Redis: cheap to clone, shares one auto-reconnecting connection.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("keys", &self.inner.keys)
            .finish_non_exhaustive()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl RedisStore {
    /// Whether a claim found without its workflow was outlived by it: the workflow
    /// was created, closed and expired by retention (its keys expire `retention`
    /// after it closed, so never sooner than `retention` after `theirs.started_at`),
    /// while the claim's own expiry, set by a second command after the close, failed
    /// or has not happened yet. Anything younger is a creation in progress (or whose
    /// claimant crashed between its two steps), which the finder finishes.
    fn outlived(&self, theirs: &NewWorkflow, now: Timestamp) -> bool {
        self.inner.retention_ms > 0
            && now.0.saturating_sub(theirs.started_at.0) >= self.inner.retention_ms
    }

    /// Deletes the idempotency claim of `key` if it still names workflow `id` (and,
    /// given `exact`, is still that very claim: a starter taking over an outlived
    /// claim must not delete one another starter just made for the same id).
    async fn release_claim(
        &self,
        key: &str,
        id: &str,
        exact: Option<&str>,
    ) -> Result<(), StoreError> {
        let mut inv = self.inner.scripts.idem_release.prepare_invoke();
        inv.key(self.keys().idem(key)).arg(id);
        if let Some(claim) = exact {
            inv.arg(claim);
        }
        inv.invoke_async::<i64>(&mut self.conn())
            .await
            .map(|_| ())
            .map_err(classify)
    }

    /// Releases the idempotency claim `ik` of a closed run of `id` that purge is about
    /// to delete (`status`, closed at `closed_at` ms, created at `created_at` ms when its
    /// closed entry says), if the claim is still that run's own: the claim made for it,
    /// whose request's start time is the run's creation time. Read first, then deleted
    /// only if it is still that very claim (`idem_release.lua`, compared whole), so a
    /// claim made meanwhile for a newer run of the id (retention expired the old run
    /// and the id and key were used again) is never released; until 2026-11-28 purge
    /// released any claim naming the id after checking the summary, and a newer run
    /// started between that check and the release lost its claim.
    async fn release_run_claim(
        &self,
        ik: &str,
        id: &str,
        status: &str,
        closed_at: u64,
        created_at: Option<u64>,
    ) -> Result<(), StoreError> {
        let claim: Option<String> = redis::cmd("GET")
            .arg(self.keys().idem(ik))
            .query_async(&mut self.conn())
            .await
            .map_err(classify)?;
        let Some(claim) = claim else { return Ok(()) };
        let Some((named, json)) = claim.split_once('\n') else {
            return Ok(());
        };
        if named != id {
            return Ok(());
        }
        // A claim that cannot be read is released, as before: no start can use it.
        let started = serde_json::from_str::<NewWorkflow>(json)
            .ok()
            .map(|r| r.started_at.0);
        let ours = match (started, created_at) {
            (None, _) => true,
            (Some(started), Some(ca)) => started == ca,
            // A closed entry written before it carried the creation time: the run's
            // summary has it while the run is still there; once it is gone, a claim
            // made no later than the run closed is its own (a newer run of the id can
            // only start once the old one's keys are gone).
            (Some(started), None) => {
                let (st, cl, ca): (Option<String>, Option<u64>, Option<u64>) = redis::cmd("HMGET")
                    .arg(&self.keys().workflow(id).sum)
                    .arg("st")
                    .arg("cl")
                    .arg("ca")
                    .query_async(&mut self.conn())
                    .await
                    .map_err(classify)?;
                match (st, ca) {
                    (Some(st), Some(ca)) if st == status && cl == Some(closed_at) => started == ca,
                    (Some(_), _) => false,
                    (None, _) => started <= closed_at,
                }
            }
        };
        if ours {
            self.release_claim(ik, id, Some(&claim)).await?;
        }
        Ok(())
    }

    /// Connects to `cfg.url` (or, when `cfg.cluster_nodes` is set, to that
    /// Redis Cluster) and checks that Redis answers.
    ///
    /// # Errors
    /// [`StoreError::Unavailable`] when Redis cannot be reached;
    /// [`StoreError::Backend`] for an invalid URL or configuration, or failed auth.
    pub async fn connect(cfg: RedisStoreConfig) -> Result<Self, StoreError> {
        cfg.check().map_err(|(field, message)| {
            backend(DataError::Config(format!("{field}: {message}")))
        })?;
        let (conn, target) = if cfg.is_cluster() {
            connect_cluster(&cfg).await?
        } else {
            connect_single(&cfg).await?
        };
        let keys = Keys::new(&cfg.key_prefix, cfg.shards);
        let follow = conn.moves();
        let store = Self {
            inner: Arc::new(Inner {
                round_trips: AtomicU64::new(0),
                conn,
                scripts: Scripts::new(),
                retention_ms: cfg.retention.map_or(0, ms),
                notifier: Arc::new(Notifier::new(
                    target,
                    follow,
                    (0..keys.shards()).map(|n| keys.stream(n)).collect(),
                    cfg.connect_timeout,
                    cfg.response_timeout,
                )),
                keys,
            }),
        };
        store.ping().await?;
        Ok(store)
    }

    /// The prefix of every key this store writes (from its config).
    #[must_use]
    pub fn key_prefix(&self) -> &str {
        self.inner.keys.prefix()
    }

    /// Round trips this store (and its clones) made on its shared connection
    /// since it connected: one per command, pipeline or script call (in
    /// cluster mode a multi-shard read counts one per shard pipeline). Blocking
    /// stream reads of subscriptions (on their own connections) are not counted.
    #[must_use]
    pub fn round_trips(&self) -> u64 {
        self.inner.round_trips.load(Ordering::Relaxed)
    }

    /// The shared connection, for exactly one round trip (counted here).
    fn conn(&self) -> Conn {
        self.inner.round_trips.fetch_add(1, Ordering::Relaxed);
        self.inner.conn.clone()
    }

    /// Runs commands on several shards: one pipeline on a single node, one
    /// pipeline per shard (concurrently) on a cluster; replies in order.
    async fn per_shard<T: FromRedisValue>(
        &self,
        cmds: Vec<(u32, Cmd)>,
    ) -> Result<Vec<T>, StoreError> {
        let (replies, trips) = self.inner.conn.query_per_shard(cmds).await?;
        self.inner.round_trips.fetch_add(trips, Ordering::Relaxed);
        Ok(replies)
    }

    fn keys(&self) -> &Keys {
        &self.inner.keys
    }

    /// Best effort: lets an idempotency claim expire with its retained workflow.
    async fn expire_idem(&self, key: &str) {
        let r: Result<i64, RedisError> = redis::cmd("PEXPIRE")
            .arg(self.keys().idem(key))
            .arg(self.inner.retention_ms)
            .query_async(&mut self.conn())
            .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not set the expiry of an idempotency claim");
        }
    }

    async fn create_workflow(
        &self,
        new: &NewWorkflow,
    ) -> Result<(WorkflowSummary, bool), StoreError> {
        let wk = self.keys().workflow(new.id.as_str());
        let event = NewEvent::new(
            new.started_at,
            EventData::WorkflowStarted {
                name: new.name.clone(),
                input: new.input.clone(),
                task_queue: new.task_queue.clone(),
                idempotency_key: new.idempotency_key.clone(),
            },
        );
        let owed = OwedEntry {
            kind: OwedKind::WORKFLOW_TASK,
            task_queue: new.task_queue.clone(),
            deadline: new.task_deadline,
            trace_context: new.trace_context.clone(),
            run: None,
        };
        let mut inv = self.inner.scripts.create.prepare_invoke();
        inv.key(&wk.sum)
            .key(&wk.ev)
            .key(&wk.owed)
            .key(&wk.zowed)
            .key(&wk.stream)
            .arg(new.id.as_str())
            .arg(&new.name)
            .arg(&new.task_queue)
            .arg(new.idempotency_key.as_deref().unwrap_or(""))
            .arg(new.started_at.0)
            .arg(new.task_deadline.0)
            .arg(serde_json::to_string(&event).map_err(backend)?)
            .arg(serde_json::to_string(&owed).map_err(backend)?)
            .arg(&wk.base)
            .arg(STREAM_MAXLEN)
            .arg(new.trace_context.as_deref().unwrap_or(""))
            .arg(batch_token());
        // Sent again after a lost reply: the token tells the script the workflow it
        // finds is the one this call created.
        let reply: Vec<Value> = retrying("create", || async {
            inv.invoke_async(&mut self.conn()).await.map_err(classify)
        })
        .await?;
        match reply.as_slice() {
            [Value::Int(1)] => Ok((
                WorkflowSummary {
                    id: new.id.clone(),
                    name: new.name.clone(),
                    status: WorkflowStatus::Running,
                    task_queue: new.task_queue.clone(),
                    idempotency_key: new.idempotency_key.clone(),
                    created_at: new.started_at,
                    updated_at: new.started_at,
                    closed_at: None,
                    last_seq: Seq(1),
                    cancel_requested: false,
                    output: None,
                    error: None,
                    task_failure: None,
                    trace_context: new.trace_context.clone(),
                },
                true,
            )),
            [Value::Int(0), fields] => {
                let map: HashMap<String, String> =
                    redis::from_redis_value_ref(fields).map_err(|e| bad_reply(e.to_string()))?;
                let summary = summary_from(map)?
                    .ok_or_else(|| bad_reply("create: existing workflow without summary"))?;
                Ok((summary, false))
            }
            other => Err(bad_reply(format!("create: {other:?}"))),
        }
    }

    /// The ARGV tail every append script shares (see `apply_batch` in common.lua).
    fn batch_args(
        &self,
        id: &WorkflowId,
        wk: &WfKeys,
        events: &[NewEvent],
        owed: &OwedChanges,
    ) -> Result<Vec<String>, StoreError> {
        let patch = SummaryPatch::of(events);
        let json = |v: &dyn erased::Json| v.to_json().map_err(backend);
        let mut a = vec![
            id.as_str().to_string(),
            wk.base.clone(),
            self.inner.retention_ms.to_string(),
            STREAM_MAXLEN.to_string(),
            patch
                .updated_at
                .map(|t| t.0.to_string())
                .unwrap_or_default(),
            patch
                .status
                .map(|s| s.as_str().to_string())
                .unwrap_or_default(),
            if patch.cancel_requested { "1" } else { "0" }.to_string(),
            match &patch.output {
                Some(o) => json(o)?,
                None => String::new(),
            },
            match &patch.error {
                Some(e) => json(e)?,
                None => String::new(),
            },
        ];
        match &patch.task_failure {
            Some(Some(msg)) => a.extend(["set".to_string(), msg.clone()]),
            Some(None) => a.extend(["clear".to_string(), String::new()]),
            None => a.extend([String::new(), String::new()]),
        }
        a.push(events.len().to_string());
        for e in events {
            a.push(json(e)?);
        }
        a.push(owed.clear.len().to_string());
        a.extend(owed.clear.iter().cloned());
        a.push(owed.set.len().to_string());
        for entry in &owed.set {
            a.push(entry.kind.key());
            a.push(entry.deadline.0.to_string());
            a.push(json(entry)?);
        }
        Ok(a)
    }

    /// Runs an append script; returns its reply (`["ok", seq, ik]` or an outcome word).
    /// Callers send it through [`retrying`] with one batch token: a batch Redis applied
    /// although its reply was lost is then answered `ok` instead of being reported
    /// failed, and the caller goes on (enqueues the tasks it created).
    async fn run_append(
        &self,
        script: &Script,
        wk: &WfKeys,
        head: &[&str],
        tail: &[String],
    ) -> Result<Vec<String>, StoreError> {
        let mut inv = script.prepare_invoke();
        inv.key(&wk.sum)
            .key(&wk.ev)
            .key(&wk.owed)
            .key(&wk.dk)
            .key(&wk.zowed)
            .key(&wk.stream)
            .key(&wk.closed);
        for a in head {
            inv.arg(*a);
        }
        for a in tail {
            inv.arg(a);
        }
        let reply: Vec<String> = inv.invoke_async(&mut self.conn()).await.map_err(classify)?;
        if let [ok, _, ik] = reply.as_slice()
            && ok == "ok"
            && !ik.is_empty()
        {
            self.expire_idem(ik).await;
        }
        Ok(reply)
    }

    /// Whether the events right after `after` are `events`, byte for byte as
    /// `apply_batch` stores them: a conditional append sent again after a lost reply
    /// that answers `conflict` asks this to tell its own batch (in, then followed by
    /// another append) from another writer's. Only that retry path reads it.
    async fn batch_landed(
        &self,
        wk: &WfKeys,
        after: Seq,
        events: &[NewEvent],
    ) -> Result<bool, StoreError> {
        let (Ok(n @ 1..), Ok(start)) = (isize::try_from(events.len()), isize::try_from(after.0))
        else {
            return Ok(false);
        };
        let stored: Vec<String> = redis::cmd("LRANGE")
            .arg(&wk.ev)
            .arg(start)
            .arg(start + n - 1)
            .query_async(&mut self.conn())
            .await
            .map_err(classify)?;
        if stored.len() != events.len() {
            return Ok(false);
        }
        for (k, (event, stored)) in events.iter().zip(&stored).enumerate() {
            let json = serde_json::to_string(event).map_err(backend)?;
            let seq = after.0 + k as u64 + 1;
            let ours = format!("{{\"seq\":{seq},{}", json.get(1..).unwrap_or(""));
            if ours != *stored {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The status (`None`: no such workflow) and up to `limit` events after `after`, in one round trip.
    async fn read_with_status(
        &self,
        wk: &WfKeys,
        after: Seq,
        limit: u64,
    ) -> Result<(Option<String>, Vec<Event>, u64), StoreError> {
        let start = i64::try_from(after.0).unwrap_or(i64::MAX);
        let stop = i64::try_from(after.0.saturating_add(limit).saturating_sub(1)).unwrap_or(-1);
        let mut pipe = redis::pipe();
        pipe.hget(&wk.sum, "st");
        if limit > 0 {
            pipe.lrange(
                &wk.ev,
                isize::try_from(start).unwrap_or(isize::MAX),
                isize::try_from(stop).unwrap_or(-1),
            );
        }
        let (st, raw): (Option<String>, Vec<String>) = if limit > 0 {
            pipe.query_async(&mut self.conn()).await.map_err(classify)?
        } else {
            let (st,): (Option<String>,) =
                pipe.query_async(&mut self.conn()).await.map_err(classify)?;
            (st, Vec::new())
        };
        let bytes = raw.iter().map(|s| s.len() as u64).sum();
        let events = raw
            .iter()
            .map(|s| serde_json::from_str::<Event>(s).map_err(backend))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((st, events, bytes))
    }
}

/// Reads the PEM CA file of `cfg.tls_ca_file`, if set.
fn ca_file(cfg: &RedisStoreConfig) -> Result<Option<Vec<u8>>, StoreError> {
    cfg.tls_ca_file
        .as_ref()
        .map(|path| {
            std::fs::read(path)
                .map_err(|e| backend(DataError::Config(format!("tls_ca_file {path:?}: {e}"))))
        })
        .transpose()
}

/// Single-node mode: an auto-reconnecting `ConnectionManager` on `cfg.url`.
async fn connect_single(cfg: &RedisStoreConfig) -> Result<(Conn, Target), StoreError> {
    if cfg.url.starts_with("rediss://") {
        // rustls needs a process-wide crypto provider; another crate may have installed one.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let client = match ca_file(cfg)? {
        None => Client::open(cfg.url.as_str()),
        Some(root_cert) => Client::build_with_tls(
            cfg.url.as_str(),
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert),
            },
        ),
    }
    .map_err(|e| {
        tracing::warn!(url = %masked_url(&cfg.url), "invalid Redis URL or TLS settings");
        StoreError::Backend(Box::new(e))
    })?;
    let mcfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(cfg.connect_timeout))
        .set_response_timeout(Some(cfg.response_timeout))
        .set_number_of_retries(1)
        .set_max_delay(Duration::from_secs(2));
    let mut conn = client
        .get_connection_manager_with_config(mcfg.clone())
        .await
        .map_err(classify)?;
    // A node of a Redis Cluster of several shards answers PING, but most of the
    // store's commands get MOVED: refuse it at start instead of failing later. A
    // cluster of one shard serves every key on that node and works as it is. An
    // INFO this user may not run (ACLs) or a proxy that hides the cluster leaves the
    // check to the commands.
    if let Ok(info) = redis::cmd("INFO")
        .arg("cluster")
        .query_async::<String>(&mut conn)
        .await
        && info.lines().any(|l| l.trim() == "cluster_enabled:1")
        && let Ok(cluster) = redis::cmd("CLUSTER")
            .arg("INFO")
            .query_async::<String>(&mut conn)
            .await
        && cluster
            .lines()
            .filter_map(|l| l.trim().strip_prefix("cluster_size:"))
            .any(|n| n.parse::<u32>().is_ok_and(|n| n > 1))
    {
        return Err(backend(DataError::Config(format!(
            "the Redis at {} is a node of a Redis Cluster of several shards: set store.cluster_nodes to the cluster's node URLs; a single url would run in single-node mode and most commands would fail with MOVED",
            masked_url(&cfg.url)
        ))));
    }
    Ok((
        Conn::Manager(crate::conn::Healing::new(client.clone(), mcfg, conn)),
        Target::Single(Box::new(client)),
    ))
}

/// Cluster mode: a cluster connection seeded by `cfg.cluster_nodes`; it
/// follows MOVED/ASK redirections and reconnects by itself.
async fn connect_cluster(cfg: &RedisStoreConfig) -> Result<(Conn, Target), StoreError> {
    if cfg.cluster_nodes.iter().any(|u| u.starts_with("rediss://")) {
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
    let masked: Vec<String> = cfg.cluster_nodes.iter().map(|u| masked_url(u)).collect();
    let root_cert = ca_file(cfg)?;
    let build = |overall: Duration| {
        let mut builder = ClusterClientBuilder::new(cfg.cluster_nodes.iter().map(String::as_str))
            .connection_timeout(cfg.connect_timeout)
            .response_timeout(cfg.response_timeout)
            .overall_response_timeout(Some(overall));
        if let Some(root_cert) = &root_cert {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(root_cert.clone()),
            });
        }
        builder.build().map_err(|e| {
            tracing::warn!(nodes = ?masked, "invalid Redis Cluster node URLs or TLS settings");
            StoreError::Backend(Box::new(e))
        })
    };
    let client = build(cfg.response_timeout)?;
    // The append readers' blocking reads wait up to `BLOCK` for an answer: the
    // client's overall bound on a request (which a connection's config cannot
    // change) must allow for it, or every idle read times out and its reader
    // reconnects in a loop.
    let readers = build(crate::notify::BLOCK + cfg.response_timeout)?;
    let conn = client.get_async_connection().await.map_err(classify)?;
    Ok((Conn::Cluster(conn), Target::Cluster(Box::new(readers))))
}

/// `serde_json::to_string` behind a trait object, so one closure serializes any field.
mod erased {
    pub(super) trait Json {
        fn to_json(&self) -> Result<String, serde_json::Error>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Result<String, serde_json::Error> {
            serde_json::to_string(self)
        }
    }
}

/// Runs `call`, and again up to three times (50, 100, 200 ms apart) after a retryable
/// error. Only for a write whose second copy finds the first if Redis applied it
/// although its reply was lost (a timeout, a dropped connection): an append or a
/// creation by its token, an idempotency claim by its whole value.
async fn retrying<T, F, Fut>(what: &str, mut call: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut delay = Duration::from_millis(50);
    for _ in 0..3 {
        match call().await {
            Err(e) if e.is_retryable() => {
                tracing::debug!(error = %e, "{what} failed; sending it again");
                tokio::time::sleep(delay).await;
                delay *= 2;
            }
            other => return other,
        }
    }
    call().await
}

/// A token unique to one append or create call (and its retries).
fn batch_token() -> String {
    use std::hash::BuildHasher;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let random = std::collections::hash_map::RandomState::new().hash_one((n, nanos));
    format!("{random:016x}{n:x}")
}

fn parse_u64(s: &str, what: &str) -> Result<u64, StoreError> {
    s.parse::<u64>()
        .or_else(|_| {
            // Sorted-set scores may come back as floats (`1e+15`).
            s.parse::<f64>()
                .ok()
                .filter(|f| f.is_finite() && *f >= 0.0)
                .map(|f| f as u64)
                .ok_or(())
        })
        .map_err(|()| bad_reply(format!("{what}: not a number: {s:?}")))
}

fn workflow_id(s: &str) -> Result<WorkflowId, StoreError> {
    WorkflowId::parse(s).map_err(|e| bad_reply(format!("stored workflow id {s:?}: {e}")))
}

/// Rebuilds a summary from its hash fields (`None` when the hash is empty).
fn summary_from(mut m: HashMap<String, String>) -> Result<Option<WorkflowSummary>, StoreError> {
    if m.is_empty() {
        return Ok(None);
    }
    let mut take = |k: &str| m.remove(k);
    let need =
        |v: Option<String>, k: &str| v.ok_or_else(|| bad_reply(format!("summary lacks {k}")));
    let id = workflow_id(&need(take("id"), "id")?)?;
    let status = need(take("st"), "st")?
        .parse::<WorkflowStatus>()
        .map_err(bad_reply)?;
    let summary = WorkflowSummary {
        id,
        name: need(take("name"), "name")?,
        status,
        task_queue: need(take("tq"), "tq")?,
        idempotency_key: take("ik"),
        created_at: Timestamp(parse_u64(&need(take("ca"), "ca")?, "ca")?),
        updated_at: Timestamp(parse_u64(&need(take("ua"), "ua")?, "ua")?),
        closed_at: take("cl")
            .map(|s| parse_u64(&s, "cl"))
            .transpose()?
            .map(Timestamp),
        last_seq: Seq(parse_u64(&need(take("ls"), "ls")?, "ls")?),
        cancel_requested: take("cr").as_deref() == Some("1"),
        output: take("out")
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(backend)?,
        error: take("err")
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(backend)?,
        task_failure: take("tf"),
        trace_context: take("tc"),
    };
    Ok(Some(summary))
}

fn encode_cursor(created_at: u64, id: &str) -> String {
    format!("{CURSOR_PREFIX}{created_at}:{id}")
}

fn decode_cursor(cursor: &str) -> Result<(u64, WorkflowId), StoreError> {
    let invalid = || StoreError::InvalidCursor(cursor.to_string());
    let rest = cursor.strip_prefix(CURSOR_PREFIX).ok_or_else(invalid)?;
    let (ts, id) = rest.split_once(':').ok_or_else(invalid)?;
    let ts = ts.parse::<u64>().map_err(|_| invalid())?;
    let id = WorkflowId::parse(id).map_err(|_| invalid())?;
    Ok((ts, id))
}

/// What `claim_overdue` returns when a read or a shard's claim fails part way: the
/// entries already leased, which would otherwise wait out their lease unworked, or
/// the error when nothing was leased.
fn claimed_or(claimed: Vec<Owed>, e: StoreError) -> Result<Vec<Owed>, StoreError> {
    if claimed.is_empty() {
        return Err(e);
    }
    tracing::warn!(error = %e, claimed = claimed.len(), "claiming overdue work failed on a shard; handing out what the others leased");
    Ok(claimed)
}

/// Splits a flat `[member, score, member, score, …]` reply.
fn pairs(flat: Vec<String>, what: &str) -> Result<Vec<(String, u64)>, StoreError> {
    if !flat.len().is_multiple_of(2) {
        return Err(bad_reply(format!("{what}: odd WITHSCORES reply")));
    }
    let mut out = Vec::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(m), Some(s)) = (it.next(), it.next()) {
        let score = parse_u64(&s, what)?;
        out.push((m, score));
    }
    Ok(out)
}

#[async_trait]
impl Store for RedisStore {
    async fn create(&self, new: NewWorkflow) -> Result<Created, StoreError> {
        let Some(key) = new.idempotency_key.clone() else {
            let (summary, created) = self.create_workflow(&new).await?;
            return Ok(Created { summary, created });
        };
        // The claim holds the whole request, so whoever finds it without its
        // workflow (the claimant crashed or is between its two steps) can
        // finish that creation: the key always ends up naming one workflow.
        let claim = format!(
            "{}\n{}",
            new.id,
            serde_json::to_string(&new).map_err(backend)?
        );
        // A claim outlived by its workflow is released and claimed again; only a
        // key changing hands that often in a row gives up.
        for _ in 0..3 {
            let mut set = redis::cmd("SET");
            set.arg(self.keys().idem(&key))
                .arg(&claim)
                .arg("NX")
                .arg("GET");
            let prev: Option<String> = retrying("idempotency claim", || async {
                set.query_async(&mut self.conn()).await.map_err(classify)
            })
            .await?;
            // This very claim, made by a try whose reply was lost: ours. (The claim
            // holds the whole request, its start time included.)
            let prev = prev.filter(|p| *p != claim);
            let Some(prev) = prev else {
                let (summary, created) = self.create_workflow(&new).await?;
                // Someone may have finished our creation for us: it is still ours.
                let ours = summary.id == new.id && summary.idempotency_key.as_deref() == Some(&key);
                if !created && !ours {
                    // The id was taken by a workflow without this key: the key
                    // names nothing, so our claim goes again.
                    self.release_claim(&key, new.id.as_str(), Some(&claim))
                        .await?;
                }
                return Ok(Created {
                    created: created || ours,
                    summary,
                });
            };
            let (_, json) = prev
                .split_once('\n')
                .ok_or_else(|| bad_reply("malformed idempotency claim"))?;
            let theirs: NewWorkflow = serde_json::from_str(json).map_err(backend)?;
            match self.get(&theirs.id).await? {
                Some(summary) if summary.idempotency_key.as_deref() == Some(&key) => {
                    return Ok(Created {
                        summary,
                        created: false,
                    });
                }
                // The id is held by a workflow without this key: its claimant found
                // it taken and releases the claim (or crashed before it could), so
                // the key names nothing and goes to this start.
                Some(_) => {
                    self.release_claim(&key, theirs.id.as_str(), Some(&prev))
                        .await?;
                    continue;
                }
                None => {}
            }
            if !self.outlived(&theirs, new.started_at) {
                let (summary, _) = self.create_workflow(&theirs).await?;
                return Ok(Created {
                    summary,
                    created: false,
                });
            }
            self.release_claim(&key, theirs.id.as_str(), Some(&prev))
                .await?;
        }
        Err(StoreError::Unavailable(
            format!("idempotency key {key:?} changed hands three times during one start").into(),
        ))
    }

    async fn append(
        &self,
        id: &WorkflowId,
        expected_last: Seq,
        events: Vec<NewEvent>,
        owed: OwedChanges,
    ) -> Result<Seq, StoreError> {
        let wk = self.keys().workflow(id.as_str());
        let tail = self.batch_args(id, &wk, &events, &owed)?;
        let expected = expected_last.0.to_string();
        let token = batch_token();
        let head: [&str; 2] = [&expected, &token];
        let sends = AtomicU64::new(0);
        let reply = retrying("append", || {
            sends.fetch_add(1, Ordering::Relaxed);
            self.run_append(&self.inner.scripts.append, &wk, &head, &tail)
        })
        .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(Seq(parse_u64(reply.get(1).map_or("", |s| s), "seq")?)),
            Some("notfound") => Err(StoreError::NotFound(id.clone())),
            Some("closed") => Err(StoreError::Closed(id.clone())),
            Some("conflict")
                if sends.load(Ordering::Relaxed) > 1
                    && self.batch_landed(&wk, expected_last, &events).await? =>
            {
                // An earlier send whose reply was lost went in, then another append
                // replaced its token in `lb`: the batch is in, right after `expected`.
                Ok(Seq(expected_last.0 + events.len() as u64))
            }
            Some("conflict") => Err(StoreError::Conflict {
                id: id.clone(),
                expected: expected_last,
                actual: Seq(parse_u64(reply.get(1).map_or("", |s| s), "actual")?),
            }),
            _ => Err(bad_reply(format!("append: {reply:?}"))),
        }
    }

    async fn append_keyed(
        &self,
        id: &WorkflowId,
        append: KeyedAppend,
    ) -> Result<KeyedOutcome, StoreError> {
        let wk = self.keys().workflow(id.as_str());
        let tail = self.batch_args(id, &wk, &append.events, &append.owed)?;
        let requires = append.requires.as_deref().unwrap_or("");
        let due = append
            .requires_deadline
            .map(|d| d.0.to_string())
            .unwrap_or_default();
        let token = batch_token();
        // With neither a key nor a required entry, nothing makes a second copy of the
        // batch a no-op once another append has replaced its token in `lb`: a retry
        // after a lost reply would append it again (an unkeyed signal twice). Its own
        // token is then its dedupe key, so such a retry answers Duplicate.
        let own_key = format!("b:{token}");
        let key = match (append.key.as_deref(), append.requires.is_some()) {
            (Some(key), _) => key,
            (None, false) => &own_key,
            (None, true) => "",
        };
        let head = [key, requires, &due, &token];
        let reply = retrying("append", || {
            self.run_append(&self.inner.scripts.keyed, &wk, &head, &tail)
        })
        .await?;
        match reply.first().map(String::as_str) {
            Some("ok") => Ok(KeyedOutcome::Appended(Seq(parse_u64(
                reply.get(1).map_or("", |s| s),
                "seq",
            )?))),
            Some("notfound") => Err(StoreError::NotFound(id.clone())),
            Some("closed") => Ok(KeyedOutcome::Closed),
            Some("duplicate") => Ok(KeyedOutcome::Duplicate),
            Some("notowed") => Ok(KeyedOutcome::NotOwed),
            _ => Err(bad_reply(format!("append_keyed: {reply:?}"))),
        }
    }

    async fn read(
        &self,
        id: &WorkflowId,
        after: Seq,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let wk = self.keys().workflow(id.as_str());
        let limit = u64::try_from(limit).unwrap_or(u64::MAX);
        match self.read_with_status(&wk, after, limit).await? {
            (None, ..) => Err(StoreError::NotFound(id.clone())),
            (Some(_), events, _) => Ok(events),
        }
    }

    async fn subscribe(&self, id: &WorkflowId, after: Seq) -> Result<EventStream, StoreError> {
        let wk = self.keys().workflow(id.as_str());
        // Registered before the first read, so any append after that read wakes us.
        let reg = self.inner.notifier.register(id.as_str()).await?;
        let (st, events, bytes) = self
            .read_with_status(&wk, after, SUBSCRIBE_FIRST_READ)
            .await?;
        let Some(st) = st else {
            return Err(StoreError::NotFound(id.clone()));
        };
        let mut sub = Subscription {
            store: self.clone(),
            wk,
            after,
            batch: SUBSCRIBE_FIRST_READ,
            buf: VecDeque::new(),
            stale: false,
            closed: false,
            reg,
            done: false,
        };
        sub.take_read(&st, events, bytes);
        Ok(Box::pin(futures::stream::unfold(sub, Subscription::next)))
    }

    async fn get(&self, id: &WorkflowId) -> Result<Option<WorkflowSummary>, StoreError> {
        let wk = self.keys().workflow(id.as_str());
        let map: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(&wk.sum)
            .query_async(&mut self.conn())
            .await
            .map_err(classify)?;
        summary_from(map)
    }

    async fn list(&self, query: &ListQuery) -> Result<ListPage, StoreError> {
        let limit = match query.limit {
            0 => DEFAULT_LIST_LIMIT,
            n => n.min(MAX_LIST_LIMIT),
        };
        let cursor = query.cursor.as_deref().map(decode_cursor).transpose()?;
        let status = query.status.map(WorkflowStatus::as_str);
        let shards = self.keys().shards();
        let mut cmds = Vec::new();
        for shard in 0..shards {
            let idx = self.keys().index(shard, status, query.name.as_deref());
            let max = cursor
                .as_ref()
                .map_or("+inf".to_string(), |(ts, _)| format!("({ts}"));
            let mut c = redis::cmd("ZREVRANGEBYSCORE");
            c.arg(&idx)
                .arg(max)
                .arg("-inf")
                .arg("WITHSCORES")
                .arg("LIMIT")
                .arg(0)
                .arg(limit + 1);
            cmds.push((shard, c));
            if let Some((ts, _)) = &cursor {
                // Workflows created in the cursor's millisecond (usually few).
                let mut c = redis::cmd("ZRANGEBYSCORE");
                c.arg(&idx).arg(*ts).arg(*ts).arg("WITHSCORES");
                cmds.push((shard, c));
            }
        }
        let replies: Vec<Vec<String>> = self.per_shard(cmds).await?;
        let mut candidates: Vec<(u64, String)> = Vec::new();
        for (i, flat) in replies.into_iter().enumerate() {
            let same_ms = cursor.is_some() && i % 2 == 1;
            for (member, score) in pairs(flat, "list")? {
                if same_ms
                    && let Some((_, cid)) = &cursor
                    && member.as_str() >= cid.as_str()
                {
                    continue;
                }
                candidates.push((score, member));
            }
        }
        candidates.sort_unstable_by(|a, b| b.cmp(a));
        let mut more = candidates.len() > limit;
        candidates.truncate(limit);
        if candidates.is_empty() {
            return Ok(ListPage {
                items: Vec::new(),
                next_cursor: None,
            });
        }
        // The page stops at about LIST_PAGE_BYTES of JSON: the lengths of the large
        // summary fields, read first, say how many summaries to read at all.
        let cmds = candidates
            .iter()
            .flat_map(|(_, id)| {
                let sum = self.keys().workflow(id).sum;
                let shard = self.keys().shard_of(id);
                LARGE_SUMMARY_FIELDS.map(|f| {
                    let mut c = redis::cmd("HSTRLEN");
                    c.arg(&sum).arg(f);
                    (shard, c)
                })
            })
            .collect();
        let lens: Vec<usize> = self.per_shard(cmds).await?;
        let mut budget = ListBudget::default();
        let fit = lens
            .chunks(LARGE_SUMMARY_FIELDS.len())
            .take_while(|l| {
                budget.admit(SUMMARY_OVERHEAD.saturating_add(l.iter().copied().sum::<usize>()))
            })
            .count();
        if fit < candidates.len() {
            more = true;
            candidates.truncate(fit);
        }
        let cmds = candidates
            .iter()
            .map(|(_, id)| {
                let mut c = redis::cmd("HGETALL");
                c.arg(self.keys().workflow(id).sum);
                (self.keys().shard_of(id), c)
            })
            .collect();
        let maps: Vec<HashMap<String, String>> = self.per_shard(cmds).await?;
        let mut items = Vec::with_capacity(maps.len());
        // Measured exactly now (the estimate may fall short for a string with escapes).
        let mut budget = ListBudget::default();
        let mut last = None;
        for (candidate, map) in candidates.iter().zip(maps) {
            // Gone (purged or expired) or changed status since the index read: skip.
            // So is an entry a run that expired left in an index (its purge removes
            // it): the id may name a newer run now, with another name or status, and
            // the entry's score is not that run's creation time.
            if let Some(s) = summary_from(map)?
                && s.created_at.0 == candidate.0
                && query.status.is_none_or(|st| st == s.status)
            {
                if !budget.admit(json_len(&s)) {
                    more = true;
                    break;
                }
                items.push(s);
            }
            last = Some(candidate);
        }
        let next_cursor = more
            .then(|| last.map(|(ts, id)| encode_cursor(*ts, id)))
            .flatten();
        Ok(ListPage { items, next_cursor })
    }

    async fn start_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        now: Timestamp,
        deadline: Timestamp,
        redelivered: bool,
    ) -> Result<AttemptStart, StoreError> {
        let wk = self.keys().workflow(id.as_str());
        let mut inv = self.inner.scripts.start.prepare_invoke();
        inv.key(&wk.owed)
            .key(&wk.zowed)
            .arg(id.as_str())
            .arg(key)
            .arg(copy)
            .arg(now.0)
            .arg(deadline.0)
            .arg(if redelivered { "1" } else { "0" });
        let reply: Vec<String> = inv.invoke_async(&mut self.conn()).await.map_err(classify)?;
        match reply.first().map(String::as_str) {
            Some("started") => Ok(AttemptStart::Started),
            Some("running") => Ok(AttemptStart::Running {
                since: Timestamp(parse_u64(reply.get(1).map_or("", |s| s), "started")?),
            }),
            Some("notowed") => Ok(AttemptStart::NotOwed),
            _ => Err(bad_reply(format!("start_attempt: {reply:?}"))),
        }
    }

    async fn extend_attempt(
        &self,
        id: &WorkflowId,
        key: &str,
        copy: u32,
        started: Timestamp,
        deadline: Timestamp,
    ) -> Result<AttemptExtend, StoreError> {
        let wk = self.keys().workflow(id.as_str());
        let mut inv = self.inner.scripts.extend.prepare_invoke();
        inv.key(&wk.owed)
            .key(&wk.zowed)
            .key(&wk.sum)
            .arg(id.as_str())
            .arg(key)
            .arg(copy)
            .arg(started.0)
            .arg(deadline.0);
        let reply: Vec<String> = inv.invoke_async(&mut self.conn()).await.map_err(classify)?;
        match (
            reply.first().map(String::as_str),
            reply.get(1).map(String::as_str),
        ) {
            (Some("extended"), Some(cr)) => Ok(AttemptExtend::Extended {
                cancel_requested: cr == "1",
            }),
            (Some("notowed"), _) => Ok(AttemptExtend::NotOwed),
            _ => Err(bad_reply(format!("extend_attempt: {reply:?}"))),
        }
    }

    async fn claim_overdue(
        &self,
        now: Timestamp,
        lease: Duration,
        limit: usize,
    ) -> Result<Vec<Owed>, StoreError> {
        let until = now.plus(lease);
        let shards = self.keys().shards();
        let mut claimed = Vec::new();
        for _ in 0..CLAIM_ROUNDS {
            let want = limit - claimed.len();
            if want == 0 {
                break;
            }
            let cmds = (0..shards)
                .map(|shard| {
                    let mut c = redis::cmd("ZRANGEBYSCORE");
                    c.arg(self.keys().zowed(shard))
                        .arg("-inf")
                        .arg(now.0)
                        .arg("WITHSCORES")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(want);
                    (shard, c)
                })
                .collect();
            let replies: Vec<Vec<String>> = match self.per_shard(cmds).await {
                Ok(replies) => replies,
                Err(e) => return claimed_or(claimed, e),
            };
            let mut candidates: Vec<(u64, String, u32)> = Vec::new();
            for (shard, flat) in (0..shards).zip(replies) {
                for (member, deadline) in pairs(flat, "claim")? {
                    candidates.push((deadline, member, shard));
                }
            }
            if candidates.is_empty() {
                break;
            }
            // Oldest first across shards, as the memory store does.
            candidates.sort_unstable();
            candidates.truncate(want);
            let picked = candidates.len();
            let mut by_shard: BTreeMap<u32, Vec<(u64, String)>> = BTreeMap::new();
            for (deadline, member, shard) in candidates {
                by_shard.entry(shard).or_default().push((deadline, member));
            }
            let calls = by_shard.into_iter().map(|(shard, picks)| {
                let mut conn = self.conn();
                let mut inv = self.inner.scripts.claim.prepare_invoke();
                inv.key(self.keys().zowed(shard))
                    .arg(self.keys().wf_prefix(shard))
                    .arg(until.0);
                for (deadline, member) in &picks {
                    inv.arg(member).arg(*deadline);
                }
                async move { inv.invoke_async::<Vec<String>>(&mut conn).await }
            });
            let mut got = 0;
            let mut round = Vec::new();
            let mut failed = None;
            for reply in futures::future::join_all(calls).await {
                // A shard that fails leased nothing; the entries the others leased
                // are still handed out rather than left leased until the lease ends.
                let flat = match reply {
                    Ok(flat) => flat,
                    Err(e) => {
                        failed = Some(classify(e));
                        continue;
                    }
                };
                let mut it = flat.into_iter();
                while let (Some(member), Some(deadline), Some(json)) =
                    (it.next(), it.next(), it.next())
                {
                    let (id, _) = member
                        .split_once('|')
                        .ok_or_else(|| bad_reply("owed member without '|'"))?;
                    got += 1;
                    // An entry this version cannot read (a newer version's kind, or
                    // damaged) stays leased and is reported; it must not stop every
                    // other workflow's overdue work from being delivered.
                    let parsed = serde_json::from_str::<OwedEntry>(&json)
                        .map_err(backend)
                        .and_then(|mut entry| {
                            entry.deadline = Timestamp(parse_u64(&deadline, "deadline")?);
                            Ok(Owed {
                                workflow_id: workflow_id(id)?,
                                entry,
                            })
                        });
                    match parsed {
                        Ok(owed) => round.push(owed),
                        Err(e) => tracing::error!(
                            member = %member,
                            error = %e,
                            "skipping an owed entry this version cannot read"
                        ),
                    }
                }
            }
            round.sort_by_key(|o| o.entry.deadline);
            claimed.extend(round);
            if let Some(e) = failed {
                return claimed_or(claimed, e);
            }
            if got == picked {
                break;
            }
        }
        Ok(claimed)
    }

    async fn purge_closed(
        &self,
        closed_before: Timestamp,
        limit: usize,
    ) -> Result<usize, StoreError> {
        if limit == 0 {
            return Ok(0);
        }
        let shards = self.keys().shards();
        let cmds = (0..shards)
            .map(|shard| {
                let mut c = redis::cmd("ZRANGEBYSCORE");
                c.arg(self.keys().closed(shard))
                    .arg("-inf")
                    .arg(format!("({}", closed_before.0))
                    .arg("WITHSCORES")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit);
                (shard, c)
            })
            .collect();
        let replies: Vec<Vec<String>> = self.per_shard(cmds).await?;
        let mut victims: Vec<(u64, u32, String)> = Vec::new();
        for (shard, flat) in (0..shards).zip(replies) {
            for (member, closed_at) in pairs(flat, "purge")? {
                victims.push((closed_at, shard, member));
            }
        }
        victims.sort_unstable();
        victims.truncate(limit);
        let mut by_shard: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (closed_at, shard, member) in victims {
            // Release the idempotency claim first: a claim without its workflow
            // would be finished (re-created) by the next start with that key.
            let m: Vec<serde_json::Value> = serde_json::from_str(&member).map_err(backend)?;
            if let (Some(id), Some(status), Some(ik)) = (
                m.first().and_then(|v| v.as_str()),
                m.get(1).and_then(|v| v.as_str()),
                m.get(3).and_then(|v| v.as_str()),
            ) {
                let created_at = m.get(4).and_then(|v| v.as_str()?.parse::<u64>().ok());
                self.release_run_claim(ik, id, status, closed_at, created_at)
                    .await?;
            }
            by_shard.entry(shard).or_default().push(member);
        }
        let mut purged = 0;
        for (shard, members) in by_shard {
            let mut inv = self.inner.scripts.purge.prepare_invoke();
            inv.key(self.keys().closed(shard))
                .arg(self.keys().base(shard))
                .arg(closed_before.0);
            for m in &members {
                inv.arg(m);
            }
            let n: usize = inv.invoke_async(&mut self.conn()).await.map_err(classify)?;
            purged += n;
        }
        Ok(purged)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pong: String = redis::cmd("PING")
            .query_async(&mut self.conn())
            .await
            .map_err(classify)?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(bad_reply(format!("PING answered {pong:?}")))
        }
    }
}

/// How many events a subscription reads next: about [`SUBSCRIBE_BYTES`] at the mean
/// size of the `n` events (`bytes` of JSON) just read, 1 to [`SUBSCRIBE_BATCH`];
/// `batch` again if none were read.
fn next_batch(batch: u64, n: usize, bytes: u64) -> u64 {
    match n as u64 {
        0 => batch,
        n => (SUBSCRIBE_BYTES / (bytes / n).max(1)).clamp(1, SUBSCRIBE_BATCH),
    }
}

/// One live subscription: reads by sequence, waits for the shared reader's wake-ups.
struct Subscription {
    store: RedisStore,
    wk: WfKeys,
    after: Seq,
    /// Events to read next time, from the size of those read so far.
    batch: u64,
    buf: VecDeque<Event>,
    /// Events may exist after `after` that are not in `buf` (read again before waiting).
    stale: bool,
    /// The workflow had finished when last read and every event was read: end after `buf`.
    closed: bool,
    reg: Registration,
    done: bool,
}

impl Subscription {
    /// Takes in a read of `self.batch` events after `after` (`bytes` of JSON) that
    /// found the workflow with status `st`: whether more may follow at once, whether
    /// the stream ends after them, and how many to read next time.
    fn take_read(&mut self, st: &str, events: Vec<Event>, bytes: u64) {
        let caught_up = (events.len() as u64) < self.batch;
        self.batch = next_batch(self.batch, events.len(), bytes);
        self.stale = !caught_up;
        self.closed = caught_up && st != WorkflowStatus::Running.as_str();
        self.buf.extend(events);
    }

    async fn next(mut self) -> Option<(Result<Event, StoreError>, Self)> {
        loop {
            if let Some(e) = self.buf.pop_front() {
                if e.data.is_terminal() {
                    self.done = true;
                    self.buf.clear();
                }
                self.after = e.seq;
                return Some((Ok(e), self));
            }
            if self.done || self.closed {
                return None;
            }
            if !self.stale {
                // Woken by an announced append to this workflow, or after a
                // quiet period (re-read anyway: robust to a trimmed stream).
                self.reg.wait(SUBSCRIBE_BLOCK).await;
            }
            match self
                .store
                .read_with_status(&self.wk, self.after, self.batch)
                .await
            {
                // Purged or expired: the history is gone, the stream ends.
                Ok((None, ..)) => return None,
                Ok((Some(st), events, bytes)) => self.take_read(&st, events, bytes),
                Err(e) => {
                    self.done = true;
                    return Some((Err(e), self));
                }
            }
        }
    }
}
