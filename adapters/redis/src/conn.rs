//! One connection type for a single Redis node or a Redis Cluster, so the
//! store's code (commands, pipelines, scripts) runs unchanged on both.
//!
//! On a cluster every request must touch one hash slot: a script or command is
//! routed by its first key, and a pipeline by its commands' common slot. Work
//! that spans several shards is therefore split per shard in cluster mode
//! (see [`Conn::query_per_shard`]), and sent as one pipeline on a single node.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{
    ConnectionLike, ConnectionManager, ConnectionManagerConfig, MultiplexedConnection,
};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{AsyncConnectionConfig, Client, Cmd, FromRedisValue, Pipeline, RedisFuture, Value};

use marathon_core::StoreError;

use crate::store::classify;

/// A connection to a single node (auto-reconnecting or plain) or to a cluster.
#[derive(Clone)]
pub(crate) enum Conn {
    /// The store's shared, auto-reconnecting connection to a single node.
    Manager(Healing),
    /// A dedicated connection to a single node (the append reader's).
    Multiplexed(MultiplexedConnection),
    /// A connection to a Redis Cluster: routes every request to its slot's node.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Manager(h) => {
                let h = h.clone();
                Box::pin(async move {
                    let r = h.send(cmd).await;
                    match r {
                        // The connection was closed while idle (see `read_only`): the
                        // manager reconnects now, and a read goes again, once.
                        Err(e) if e.is_connection_dropped() && read_only(cmd) => {
                            tracing::debug!(error = %e, "the Redis connection was closed; reading again");
                            h.send(cmd).await
                        }
                        r => r,
                    }
                })
            }
            Self::Multiplexed(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Manager(h) => {
                let h = h.clone();
                Box::pin(async move {
                    let r = h.send_pipeline(pipeline, offset, count).await;
                    match r {
                        Err(e)
                            if e.is_connection_dropped() && pipeline.cmd_iter().all(read_only) =>
                        {
                            tracing::debug!(error = %e, "the Redis connection was closed; reading again");
                            h.send_pipeline(pipeline, offset, count).await
                        }
                        r => r,
                    }
                })
            }
            Self::Multiplexed(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Manager(h) => h.current().1.get_db(),
            Self::Multiplexed(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// A `ConnectionManager` that is replaced by a new one (a new TCP connection) when
/// its connection answers READONLY (the node was demoted to replica: the endpoint
/// now leads elsewhere) or times out [`TIMEOUTS_TO_REPLACE`] times in a row with no
/// answer between (a silently dropped flow that nothing resets; one slow command or
/// an overloaded server, which still answers other requests, does not churn it).
/// The manager itself reconnects only on errors that close the socket.
#[derive(Clone)]
pub(crate) struct Healing(Arc<HealingInner>);

/// What a [`Healing`] connection shares between its clones.
struct HealingInner {
    client: Client,
    config: ConnectionManagerConfig,
    /// The generation (how many times it was replaced) and the current manager.
    current: parking_lot::Mutex<(u64, ConnectionManager)>,
    /// Requests timed out since the last answer.
    timeouts: std::sync::atomic::AtomicU32,
    /// Bumped whenever the connection is re-established (the manager reconnects after
    /// a dropped connection, or is replaced): the append reader follows it there.
    moves: tokio::sync::watch::Sender<u64>,
}

/// Timeouts in a row, with no answer between, that replace the connection.
const TIMEOUTS_TO_REPLACE: u32 = 3;

/// What a reply says of the connection it came on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Health {
    /// The server answered (an error included): the connection works.
    Answered,
    /// No answer in time.
    TimedOut,
    /// The node is a replica now.
    ReadOnly,
    /// Any other failure: the manager reconnects by itself where it must.
    Failed,
}

impl Healing {
    pub(crate) fn new(
        client: Client,
        config: ConnectionManagerConfig,
        first: ConnectionManager,
    ) -> Self {
        Self(Arc::new(HealingInner {
            client,
            config,
            current: parking_lot::Mutex::new((0, first)),
            timeouts: std::sync::atomic::AtomicU32::new(0),
            moves: tokio::sync::watch::Sender::new(0),
        }))
    }

    /// Changes whenever the connection is re-established, possibly to another server
    /// behind the same endpoint.
    pub(crate) fn moves(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.moves.subscribe()
    }

    /// Says that the connection is being re-established.
    fn moved(&self) {
        self.0.moves.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Sends one command on the current manager and checks what its reply says.
    async fn send(&self, cmd: &Cmd) -> redis::RedisResult<Value> {
        let (generation, mut c) = self.current();
        let r = c.req_packed_command(cmd).await;
        self.check(generation, r.as_ref().map_or_else(health_of_err, health_of));
        self.dropped(&r);
        r
    }

    /// Says the connection moves when `r` failed with an error after which the manager
    /// reconnects (the connection was closed or broken).
    fn dropped<T>(&self, r: &redis::RedisResult<T>) {
        if let Err(e) = r
            && (e.is_connection_dropped() || e.is_unrecoverable_error())
        {
            self.moved();
        }
    }

    /// Sends a pipeline on the current manager and checks what its replies say.
    async fn send_pipeline(
        &self,
        pipeline: &Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisResult<Vec<Value>> {
        let (generation, mut c) = self.current();
        let r = c.req_packed_commands(pipeline, offset, count).await;
        self.check(
            generation,
            r.as_ref().map_or_else(health_of_err, |vs| {
                if vs.iter().any(|v| health_of(v) == Health::ReadOnly) {
                    Health::ReadOnly
                } else {
                    Health::Answered
                }
            }),
        );
        self.dropped(&r);
        r
    }

    fn current(&self) -> (u64, ConnectionManager) {
        let g = self.0.current.lock();
        (g.0, g.1.clone())
    }

    /// Replaces the manager a request went on when its reply says so (see
    /// [`Healing`]), once per generation.
    fn check(&self, generation: u64, health: Health) {
        use std::sync::atomic::Ordering;
        let stale = match health {
            Health::Answered => {
                self.0.timeouts.store(0, Ordering::Relaxed);
                false
            }
            Health::Failed => false,
            Health::TimedOut => {
                self.0.timeouts.fetch_add(1, Ordering::Relaxed) + 1 >= TIMEOUTS_TO_REPLACE
            }
            Health::ReadOnly => true,
        };
        if !stale || self.0.current.lock().0 != generation {
            return;
        }
        let Ok(fresh) =
            ConnectionManager::new_lazy_with_config(self.0.client.clone(), self.0.config.clone())
        else {
            return;
        };
        let mut g = self.0.current.lock();
        if g.0 == generation {
            tracing::warn!("replacing the Redis connection (READONLY or timed out)");
            *g = (generation + 1, fresh);
            self.0.timeouts.store(0, Ordering::Relaxed);
            drop(g);
            self.moved();
        }
    }
}

/// Whether `cmd` only reads, so that sending it twice is harmless. Such a command is
/// sent again, once, when it fails because the connection was closed: a connection
/// the server closed while it was idle (Redis's `timeout`, a managed service's or a
/// proxy's idle limit, a restart) is known closed only once a request has failed on
/// it (RESP2 has no notice of it), and the manager reconnects only then. Writes are
/// not sent again here: the store's own retries of appends and creations recognise
/// a copy that went in; a script like `start.lua` would not.
fn read_only(cmd: &Cmd) -> bool {
    const READS: [&[u8]; 11] = [
        b"GET",
        b"HGET",
        b"HGETALL",
        b"HMGET",
        b"HSTRLEN",
        b"LRANGE",
        b"ZRANGEBYSCORE",
        b"ZREVRANGEBYSCORE",
        b"ZSCORE",
        b"XREVRANGE",
        b"PING",
    ];
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => READS.iter().any(|r| r.eq_ignore_ascii_case(name)),
        _ => false,
    }
}

/// What a failed request says of its connection.
fn health_of_err(e: &redis::RedisError) -> Health {
    if e.is_timeout() {
        Health::TimedOut
    } else if matches!(
        e.kind(),
        redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
    ) {
        Health::ReadOnly
    } else if matches!(e.kind(), redis::ErrorKind::Server(_)) {
        // The server answered with an error: the connection works.
        Health::Answered
    } else {
        Health::Failed
    }
}

/// What an answered request says of its connection.
fn health_of(v: &Value) -> Health {
    match v {
        Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::ReadOnly) => {
            Health::ReadOnly
        }
        _ => Health::Answered,
    }
}

impl Conn {
    /// For the shared single-node connection: changes whenever it is re-established.
    pub(crate) fn moves(&self) -> Option<tokio::sync::watch::Receiver<u64>> {
        match self {
            Self::Manager(h) => Some(h.moves()),
            Self::Multiplexed(_) | Self::Cluster(_) => None,
        }
    }

    /// Whether requests must stay within one hash slot.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Runs `cmds` (each tagged with the shard whose keys it touches) and
    /// returns their replies in order. One pipeline on a single node; on a
    /// cluster one pipeline per shard, sent concurrently. Returns the number
    /// of round trips made with the replies.
    pub(crate) async fn query_per_shard<T: FromRedisValue>(
        &self,
        cmds: Vec<(u32, Cmd)>,
    ) -> Result<(Vec<T>, u64), StoreError> {
        if cmds.is_empty() {
            return Ok((Vec::new(), 0));
        }
        if !self.is_cluster() {
            let mut pipe = redis::pipe();
            for (_, c) in cmds {
                pipe.add_command(c);
            }
            let replies: Vec<T> = pipe
                .query_async(&mut self.clone())
                .await
                .map_err(classify)?;
            return Ok((replies, 1));
        }
        let n = cmds.len();
        let mut by_shard: BTreeMap<u32, (Vec<usize>, Pipeline)> = BTreeMap::new();
        for (i, (shard, c)) in cmds.into_iter().enumerate() {
            let e = by_shard
                .entry(shard)
                .or_insert_with(|| (Vec::new(), redis::pipe()));
            e.0.push(i);
            e.1.add_command(c);
        }
        let trips = by_shard.len() as u64;
        let calls = by_shard.into_values().map(|(idx, pipe)| {
            let mut conn = self.clone();
            async move {
                let replies: Vec<T> = pipe.query_async(&mut conn).await?;
                Ok::<_, redis::RedisError>((idx, replies))
            }
        });
        let mut slots: Vec<Option<T>> = std::iter::repeat_with(|| None).take(n).collect();
        for r in futures::future::join_all(calls).await {
            let (idx, replies) = r.map_err(classify)?;
            for (i, v) in idx.into_iter().zip(replies) {
                if let Some(s) = slots.get_mut(i) {
                    *s = Some(v);
                }
            }
        }
        let out = slots
            .into_iter()
            .collect::<Option<Vec<T>>>()
            .ok_or_else(|| {
                crate::store::bad_reply("a shard's pipeline answered too few replies")
            })?;
        Ok((out, trips))
    }
}

/// Where the store connects: a single node or a cluster (from the config).
#[derive(Clone)]
pub(crate) enum Target {
    /// A single Redis node (or a proxy in front of several).
    Single(Box<Client>),
    /// A Redis Cluster, reached through its seed nodes.
    Cluster(Box<ClusterClient>),
}

impl Target {
    /// Whether this is a cluster.
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Opens a dedicated (not shared, not auto-reconnecting) connection whose
    /// responses may take `response_timeout` (blocking reads).
    pub(crate) async fn dedicated(
        &self,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Conn, StoreError> {
        match self {
            Self::Single(client) => {
                let cfg = AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(response_timeout));
                client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await
                    .map(Conn::Multiplexed)
                    .map_err(classify)
            }
            Self::Cluster(client) => {
                let cfg = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect_timeout)
                    .set_response_timeout(response_timeout);
                client
                    .get_async_connection_with_config(cfg)
                    .await
                    .map(Conn::Cluster)
                    .map_err(classify)
            }
        }
    }
}
