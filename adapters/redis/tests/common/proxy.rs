//! A TCP proxy in front of a Redis server that breaks the network as tests need:
//! it can move to another server (a managed endpoint failing over), black-hole the
//! connections it already holds, or cut one connection right after a request reaches
//! Redis, so the command runs and its reply is lost.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

/// Forwards each new connection to the server on `target`.
pub struct FaultProxy {
    /// The port clients connect to.
    pub port: u16,
    /// Where new connections go; connections already open stay where they are.
    pub target: Arc<AtomicU16>,
    /// Bumped: every connection opened before has its bytes silently dropped, both
    /// ways, while its socket stays open (a failover behind a DNS name, seen from a
    /// client that still holds the old connection).
    pub epoch: Arc<AtomicU64>,
    /// Set: the next request holding the pattern given to [`FaultProxy::cutting`] is
    /// passed to Redis, then that connection is closed before the reply.
    pub armed: Arc<AtomicBool>,
}

/// What one connection watches for and how it breaks.
#[derive(Clone)]
struct Faults {
    /// The epoch the connection was opened in.
    mine: u64,
    epoch: Arc<AtomicU64>,
    /// Set once the connection is cut: both directions stop.
    cut: Arc<AtomicBool>,
    /// On the client-to-Redis direction: the armed flag and the request pattern.
    watch: Option<(Arc<AtomicBool>, &'static [u8])>,
}

impl FaultProxy {
    /// A proxy to `target` that breaks nothing until told to.
    pub async fn start(target: u16) -> Self {
        Self::cutting(target, b"").await
    }

    /// A proxy to `target` that, once `armed`, cuts the first connection whose
    /// request holds `pattern` (an empty pattern never matches).
    pub async fn cutting(target: u16, pattern: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a port");
        let port = listener.local_addr().expect("local address").port();
        let proxy = Self {
            port,
            target: Arc::new(AtomicU16::new(target)),
            epoch: Arc::new(AtomicU64::new(0)),
            armed: Arc::new(AtomicBool::new(false)),
        };
        let (target, epoch, armed) = (
            proxy.target.clone(),
            proxy.epoch.clone(),
            proxy.armed.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let to = target.load(Ordering::SeqCst);
                let Ok(server) = TcpStream::connect(("127.0.0.1", to)).await else {
                    continue;
                };
                let faults = Faults {
                    mine: epoch.load(Ordering::SeqCst),
                    epoch: epoch.clone(),
                    cut: Arc::new(AtomicBool::new(false)),
                    watch: None,
                };
                let watch = (!pattern.is_empty()).then(|| (armed.clone(), pattern));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(
                    cr,
                    sw,
                    Faults {
                        watch,
                        ..faults.clone()
                    },
                ));
                tokio::spawn(pump(sr, cw, faults));
            }
        });
        proxy
    }

    /// The URL of a Redis client connecting through the proxy.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

/// Writes all of `buf`; `false` once `to` is closed.
async fn write_all(to: &OwnedWriteHalf, buf: &[u8]) -> bool {
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

/// Copies `from` to `to` until either closes, breaking as `faults` says.
async fn pump(from: OwnedReadHalf, to: OwnedWriteHalf, faults: Faults) {
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
        if faults.cut.load(Ordering::SeqCst) {
            return;
        }
        if faults.epoch.load(Ordering::SeqCst) != faults.mine {
            continue; // black hole: read and drop
        }
        let hit = faults.watch.as_ref().is_some_and(|(armed, pattern)| {
            armed.load(Ordering::SeqCst)
                && buf[..n].windows(pattern.len()).any(|w| w == *pattern)
                && armed.swap(false, Ordering::SeqCst)
        });
        if hit {
            // Before the request goes on: a fast reply must not slip through.
            faults.cut.store(true, Ordering::SeqCst);
        }
        if !write_all(&to, &buf[..n]).await {
            return;
        }
        if hit {
            // Let Redis read the request before its side closes too.
            tokio::time::sleep(Duration::from_millis(100)).await;
            return;
        }
    }
}
