//! One shared reader of the shards' append streams per store: a single
//! dedicated connection runs a blocking `XREAD` over every shard's stream and
//! wakes the subscriptions of the workflows it sees. Subscriptions therefore
//! cost no connection and no blocking command of their own.
//!
//! On a Redis Cluster one command cannot read streams of different slots, and
//! a blocked command holds its whole connection, so there is one reader per
//! shard stream instead, each on its own dedicated cluster connection (routed
//! to the node owning that shard's slot, following it when slots move).
//!
//! No announcement is lost: a subscription registers before its first read,
//! and the reader's positions were taken before that registration completed,
//! so every append after the read is announced past the reader's position.
//! Announcements are only hints (subscriptions always read by sequence and
//! re-read after a quiet period), so a trimmed stream or a Redis outage loses
//! nothing either: on a read error the reader wakes every subscription.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::time::Instant;

use parking_lot::Mutex;
use redis::Value;
use redis::streams::StreamReadReply;
use tokio::sync::{Notify, OnceCell, watch};

use marathon_core::StoreError;

use crate::conn::{Conn, Target};

/// How long one blocking read of the reader waits.
pub(crate) const BLOCK: Duration = Duration::from_secs(2);
/// Most entries read per stream per round.
const COUNT: usize = 1000;

type Waiters = HashMap<String, Vec<(u64, Arc<Notify>)>>;

/// The shared reader of one store and the subscriptions waiting on it.
pub(crate) struct Notifier {
    target: Target,
    /// On a single node: changes whenever the store's shared connection is
    /// re-established; the reader then connects again too, so that both talk to
    /// the server the endpoint leads to now (see [`run`]).
    follow: Option<watch::Receiver<u64>>,
    streams: Vec<String>,
    connect_timeout: Duration,
    response_timeout: Duration,
    waiters: Mutex<(u64, Waiters)>,
    started: OnceCell<()>,
}

/// A subscription's registration; dropping it unregisters.
pub(crate) struct Registration {
    notifier: Arc<Notifier>,
    id: String,
    key: u64,
    notify: Arc<Notify>,
}

impl Registration {
    /// Waits until an append to the workflow is announced since the last wait
    /// (or registration), or until `max` has passed.
    pub(crate) async fn wait(&self, max: Duration) {
        let _ = tokio::time::timeout(max, self.notify.notified()).await;
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut w = self.notifier.waiters.lock();
        if let Some(v) = w.1.get_mut(&self.id) {
            v.retain(|(k, _)| *k != self.key);
            if v.is_empty() {
                w.1.remove(&self.id);
            }
        }
    }
}

impl Notifier {
    pub(crate) fn new(
        target: Target,
        follow: Option<watch::Receiver<u64>>,
        streams: Vec<String>,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Self {
        Self {
            target,
            follow,
            streams,
            connect_timeout,
            response_timeout,
            waiters: Mutex::new((0, HashMap::new())),
            started: OnceCell::new(),
        }
    }

    /// Registers interest in appends to workflow `id`, starting the reader if needed.
    ///
    /// # Errors
    /// When the reader's connection cannot be opened (first call only).
    pub(crate) async fn register(self: &Arc<Self>, id: &str) -> Result<Registration, StoreError> {
        let notify = Arc::new(Notify::new());
        let key = {
            let mut w = self.waiters.lock();
            w.0 += 1;
            let key = w.0;
            w.1.entry(id.to_string())
                .or_default()
                .push((key, notify.clone()));
            key
        };
        let reg = Registration {
            notifier: self.clone(),
            id: id.to_string(),
            key,
            notify,
        };
        self.started
            .get_or_try_init(|| self.start())
            .await
            .map(|()| reg)
    }

    async fn connect(&self) -> Result<Conn, StoreError> {
        self.target
            .dedicated(self.connect_timeout, BLOCK + self.response_timeout)
            .await
    }

    /// Spawns the readers: one over every stream on a single node, one per
    /// stream (hence per slot) on a cluster. Either every reader starts or
    /// none does (a later registration then tries again).
    async fn start(self: &Arc<Self>) -> Result<(), StoreError> {
        let groups: Vec<Vec<String>> = if self.target.is_cluster() {
            self.streams.iter().map(|s| vec![s.clone()]).collect()
        } else {
            vec![self.streams.clone()]
        };
        let ready = futures::future::join_all(groups.into_iter().map(|g| self.prepare(g)))
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        for (streams, conn, positions) in ready {
            tokio::spawn(run(
                Arc::downgrade(self),
                self.follow.clone(),
                streams,
                conn,
                positions,
            ));
        }
        Ok(())
    }

    /// Opens a reader's connection and takes every stream's last id as its starting position.
    async fn prepare(
        &self,
        streams: Vec<String>,
    ) -> Result<(Vec<String>, Conn, Vec<String>), StoreError> {
        let mut conn = self.connect().await?;
        let positions = last_ids(&mut conn, &streams).await?;
        Ok((streams, conn, positions))
    }

    fn wake(&self, id: &[u8]) {
        let Ok(id) = std::str::from_utf8(id) else {
            return;
        };
        if let Some(v) = self.waiters.lock().1.get(id) {
            for (_, n) in v {
                n.notify_one();
            }
        }
    }

    fn wake_all(&self) {
        for v in self.waiters.lock().1.values() {
            for (_, n) in v {
                n.notify_one();
            }
        }
    }
}

/// Every stream's last entry id ("0-0" for an empty or missing stream).
async fn last_ids(conn: &mut Conn, streams: &[String]) -> Result<Vec<String>, StoreError> {
    let mut pipe = redis::pipe();
    for s in streams {
        pipe.cmd("XREVRANGE")
            .arg(s)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1);
    }
    let lasts: Vec<Vec<(String, HashMap<String, Value>)>> = pipe
        .query_async(conn)
        .await
        .map_err(crate::store::classify)?;
    Ok(lasts
        .into_iter()
        .map(|l| {
            l.into_iter()
                .next()
                .map_or_else(|| "0-0".to_string(), |(id, _)| id)
        })
        .collect())
}

/// A stream entry id as `(ms, seq)`; `None` if it is not one.
fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

/// After a reconnect: moves back every position that is past its stream's last entry
/// on the server now reached (it restarted without its data, or the endpoint leads
/// to another server, and the old one's clock, which stream ids are made of, was
/// ahead). Reading after such a position would announce no append until the new
/// server's clock passed it. Returns whether any position moved back.
async fn realign(
    conn: &mut Conn,
    streams: &[String],
    positions: &mut [String],
) -> Result<bool, StoreError> {
    let lasts = last_ids(conn, streams).await?;
    let mut moved = false;
    for (pos, last) in positions.iter_mut().zip(lasts) {
        if let (Some(p), Some(l)) = (parse_id(pos), parse_id(&last))
            && l < p
        {
            *pos = last;
            moved = true;
        }
    }
    Ok(moved)
}

/// Resolves when the store's shared connection was re-established since the reader
/// last looked; never without one to follow (cluster mode) or once the store is gone.
async fn moved(follow: &mut Option<watch::Receiver<u64>>) {
    if let Some(f) = follow
        && f.changed().await.is_ok()
    {
        return;
    }
    std::future::pending::<()>().await;
}

/// How long the reader fails without a break before it says so at `warn`: a blip (a
/// failover, a restart) stays at `debug`; a lasting failure (an ACL without `XREAD`, a
/// node gone) shows, since subscriptions then wake only every few seconds.
const WARN_AFTER: Duration = Duration::from_secs(10);
/// Least time between two such warnings.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The reader's run of failures, for its warnings.
#[derive(Default)]
struct Failing {
    since: Option<Instant>,
    warned: Option<Instant>,
}

impl Failing {
    fn failed(&mut self, e: &dyn std::fmt::Display) {
        let now = Instant::now();
        let since = *self.since.get_or_insert(now);
        if now.duration_since(since) >= WARN_AFTER
            && self
                .warned
                .is_none_or(|w| now.duration_since(w) >= WARN_EVERY)
        {
            self.warned = Some(now);
            tracing::warn!(
                error = %e,
                failing_for_s = now.duration_since(since).as_secs(),
                "the Redis append reader keeps failing: subscriptions (result waits, event streams) wake only every few seconds"
            );
        }
    }

    fn recovered(&mut self) {
        if self.warned.is_some() {
            tracing::info!("the Redis append reader works again");
        }
        *self = Self::default();
    }
}

/// The reader loop; ends once the store and every subscription are gone.
///
/// On a single node the reader follows the store's shared connection: when that one
/// is re-established (it was closed or broken, or replaced after READONLY or
/// timeouts), the endpoint may lead to another server now, so the reader stops its
/// blocking read and connects again too, then wakes every subscription. Its own
/// connection, never idle, may well stay open to the old server, which no append
/// reaches any more (until 2026-11-28 it kept reading there, and subscriptions woke
/// only by their fallback re-read).
async fn run(
    notifier: Weak<Notifier>,
    mut follow: Option<watch::Receiver<u64>>,
    streams: Vec<String>,
    conn: Conn,
    mut positions: Vec<String>,
) {
    let mut conn = Some(conn);
    let mut backoff = Duration::from_millis(100);
    let mut failing = Failing::default();
    // Whether to wake every subscription once connected again.
    let mut rewake = false;
    if let Some(f) = &mut follow {
        f.borrow_and_update();
    }
    loop {
        let mut c = match conn.take() {
            Some(c) => c,
            None => {
                let Some(n) = notifier.upgrade() else { return };
                // Moves from now on make this connection stale in turn.
                if let Some(f) = &mut follow {
                    f.borrow_and_update();
                }
                let connected = match n.connect().await {
                    Ok(mut c) => realign(&mut c, &streams, &mut positions)
                        .await
                        .map(|moved| (c, moved)),
                    Err(e) => Err(e),
                };
                match connected {
                    Ok((c, moved)) => {
                        if moved || rewake {
                            // Appends made on this server before the new positions (or
                            // while the reader watched another) are not announced:
                            // every subscription reads again.
                            n.wake_all();
                            rewake = false;
                        }
                        c
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "append reader cannot reconnect yet");
                        failing.failed(&e);
                        n.wake_all();
                        drop(n);
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                }
            }
        };
        let mut xread = redis::cmd("XREAD");
        xread
            .arg("COUNT")
            .arg(COUNT)
            .arg("BLOCK")
            .arg(u64::try_from(BLOCK.as_millis()).unwrap_or(u64::MAX))
            .arg("STREAMS")
            .arg(&streams)
            .arg(&positions);
        let reply: Result<Option<StreamReadReply>, _> = tokio::select! {
            r = xread.query_async(&mut c) => r,
            () = moved(&mut follow) => {
                tracing::debug!("the store's Redis connection was re-established; so is the append reader's");
                rewake = true;
                continue;
            }
        };
        // Held only between reads, so that dropping the store ends the loop.
        let Some(n) = notifier.upgrade() else { return };
        match reply {
            Ok(reply) => {
                backoff = Duration::from_millis(100);
                failing.recovered();
                conn = Some(c);
                for key in reply.map(|r| r.keys).unwrap_or_default() {
                    let Some(i) = streams.iter().position(|s| *s == key.key) else {
                        continue;
                    };
                    for entry in key.ids {
                        if let Some(Value::BulkString(w)) = entry.map.get("w") {
                            n.wake(w);
                        }
                        positions[i] = entry.id;
                    }
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "append reader failed; waking every subscription");
                failing.failed(&e);
                n.wake_all();
                drop(n);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
