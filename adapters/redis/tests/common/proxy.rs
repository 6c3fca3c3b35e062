//! A TCP proxy in front of a Redis server that breaks the network as tests need:
//! it can move to another server (a managed endpoint failing over), black-hole the
//! connections it already holds, or cut one connection right after a request reaches
//! Redis, so the command runs and its reply is lost, or hold one request back until
//! the test lets it go (to run something else in between two steps of a store call).

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

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
    /// What [`FaultProxy::hold_next`] holds back.
    hold: Arc<Hold>,
}

/// One request to hold back before it reaches Redis.
#[derive(Default)]
struct Hold {
    /// The pattern of the request to hold; empty: none.
    pattern: Mutex<Vec<u8>>,
    /// Signalled once that request is held.
    held: Notify,
    /// Signalled by the test: the held request goes on.
    go: Notify,
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
    /// On the client-to-Redis direction: the request to hold back.
    hold: Option<Arc<Hold>>,
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
            hold: Arc::new(Hold::default()),
        };
        let (target, epoch, armed, hold) = (
            proxy.target.clone(),
            proxy.epoch.clone(),
            proxy.armed.clone(),
            proxy.hold.clone(),
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
                    hold: None,
                };
                let watch = (!pattern.is_empty()).then(|| (armed.clone(), pattern));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(pump(
                    cr,
                    sw,
                    Faults {
                        watch,
                        hold: Some(hold.clone()),
                        ..faults.clone()
                    },
                ));
                tokio::spawn(pump(sr, cw, faults));
            }
        });
        proxy
    }

    /// Holds back the next request (of any connection) holding `pattern`, before it
    /// reaches Redis, until [`FaultProxy::release`]; [`FaultProxy::until_held`] waits
    /// for it.
    pub fn hold_next(&self, pattern: &[u8]) {
        *self.hold.pattern.lock().expect("not poisoned") = pattern.to_vec();
    }

    /// Waits until the request given to [`FaultProxy::hold_next`] is held.
    pub async fn until_held(&self) {
        self.hold.held.notified().await;
    }

    /// Lets the held request go on to Redis.
    pub fn release(&self) {
        self.hold.go.notify_one();
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
        let held = faults.hold.as_ref().filter(|h| {
            let mut p = h.pattern.lock().expect("not poisoned");
            let found = !p.is_empty() && buf[..n].windows(p.len()).any(|w| w == p.as_slice());
            if found {
                p.clear();
            }
            found
        });
        if let Some(h) = held {
            h.held.notify_one();
            h.go.notified().await;
        }
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
