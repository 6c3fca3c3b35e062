//! Helpers shared by the Redis store's integration tests.
#![allow(dead_code, unreachable_pub, missing_docs)]

pub mod cluster;
pub mod proxy;

use marathon_redis::{RedisStore, RedisStoreConfig};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub const HOW_TO_START: &str = "no Redis at MARATHON_TEST_REDIS_URL (default redis://127.0.0.1:6379); \
start one with `redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save '' --appendonly no`";

pub fn url() -> String {
    marathon_redis::testkit::url()
}

pub fn prefix() -> String {
    format!("marathon-test:{}:", uuid::Uuid::new_v4())
}

/// A store on a fresh random prefix; panics (never skips) without Redis.
pub async fn fresh_on(key_prefix: String) -> RedisStore {
    RedisStore::connect(RedisStoreConfig {
        url: url(),
        key_prefix,
        ..Default::default()
    })
    .await
    .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"))
}

pub async fn fresh() -> (RedisStore, String) {
    let p = prefix();
    (fresh_on(p.clone()).await, p)
}

/// Every key under `prefix` (SCAN MATCH).
pub async fn keys_under(prefix: &str) -> Vec<String> {
    marathon_redis::testkit::keys_under(&url(), prefix)
        .await
        .unwrap_or_else(|e| panic!("{HOW_TO_START}: {e}"))
}

/// Deletes every key under `prefix` (SCAN MATCH + UNLINK); never FLUSHDB.
pub async fn teardown(prefix: &str) {
    marathon_redis::testkit::delete_prefix(&url(), prefix)
        .await
        .expect("delete the run's keys");
}

/// A private `redis-server` with an append-only file, so data survives a kill.
pub struct PrivateRedis {
    pub dir: std::path::PathBuf,
    pub child: Option<tokio::process::Child>,
}

impl PrivateRedis {
    pub async fn start(port: u16, dir: std::path::PathBuf) -> Self {
        Self::start_with(port, dir, &[]).await
    }

    /// [`Self::start`] with `extra` arguments for `redis-server` (e.g.
    /// `["--rename-command", "XREAD", ""]`).
    pub async fn start_with(port: u16, dir: std::path::PathBuf, extra: &[&str]) -> Self {
        let mut child = tokio::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
            ])
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("redis-server on the PATH (apt-get install -y redis-server)");
        // Probe until it answers, never a fixed sleep; generous, since a loaded
        // machine can take seconds to start a process (only a failure waits it out).
        let t0 = std::time::Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("redis-server on port {port} exited at start: {status}");
            }
            assert!(
                t0.elapsed() < Duration::from_secs(30),
                "redis-server on port {port} did not answer within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Self {
            dir,
            child: Some(child),
        }
    }

    pub async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().await.expect("kill redis-server");
        }
    }
}

/// A free port below the ephemeral range (20000..30000), for a server that is killed
/// and started again on it: a port from the ephemeral range can meanwhile become the
/// local end of an outgoing connection (the store reconnecting to it connects to
/// itself), and the restart can no longer bind it.
pub fn low_port() -> u16 {
    loop {
        let p = 20_000 + (uuid::Uuid::new_v4().as_u128() % 10_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("local addr")
        .port()
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl on the PATH (apt-get install -y openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`), and a server certificate for 127.0.0.1 signed by it.
pub fn certificates(dir: &Path) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "1",
            "-subj",
            "/CN=marathon-test-ca",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .expect("write ext.cnf");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
        ],
    );
}
