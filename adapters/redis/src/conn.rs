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
                let (generation, mut c) = h.current();
                let h = h.clone();
                Box::pin(async move {
                    let r = c.req_packed_command(cmd).await;
                    h.check(generation, r.as_ref().map_or_else(stale_err, stale_value));
                    r
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
                let (generation, mut c) = h.current();
                let h = h.clone();
                Box::pin(async move {
                    let r = c.req_packed_commands(pipeline, offset, count).await;
                    h.check(
                        generation,
                        r.as_ref()
                            .map_or_else(stale_err, |vs| vs.iter().any(stale_value)),
                    );
                    r
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
/// now leads elsewhere) or times out (a silently dropped flow that nothing resets).
/// The manager itself reconnects only on errors that close the socket.
#[derive(Clone)]
pub(crate) struct Healing(Arc<HealingInner>);

/// What a [`Healing`] connection shares between its clones.
struct HealingInner {
    client: Client,
    config: ConnectionManagerConfig,
    /// The generation (how many times it was replaced) and the current manager.
    current: parking_lot::Mutex<(u64, ConnectionManager)>,
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
        }))
    }

    fn current(&self) -> (u64, ConnectionManager) {
        let g = self.0.current.lock();
        (g.0, g.1.clone())
    }

    /// Replaces the manager used for a request that failed this way, once per generation.
    fn check(&self, generation: u64, stale: bool) {
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
        }
    }
}

/// Whether a reply says the connection leads to the wrong node or nowhere.
fn stale_err(e: &redis::RedisError) -> bool {
    e.is_timeout()
        || matches!(
            e.kind(),
            redis::ErrorKind::Server(redis::ServerErrorKind::ReadOnly)
        )
}

fn stale_value(v: &Value) -> bool {
    matches!(v, Value::ServerError(e) if e.kind() == Some(redis::ServerErrorKind::ReadOnly))
}

impl Conn {
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
