//! A real local Redis Cluster for tests: three `redis-server --cluster-enabled
//! yes` masters in a temp dir, joined by `redis-cli --cluster create`.
//!
//! One cluster per test binary ([`shared`]), started once; each case uses its
//! own random key prefix and deletes its keys on every master afterwards.
//! The servers stop when the [`LocalCluster`] is dropped, and, for the shared
//! (never dropped) one, when the test process exits: each server runs under a
//! small shell watchdog that stops it once the test process is gone.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use marathon_redis::{RedisStore, RedisStoreConfig};

/// Three masters of a local Redis Cluster.
pub struct LocalCluster {
    pub ports: Vec<u16>,
    pub dir: PathBuf,
    /// TLS only: the password every node requires (the CA is `dir/ca.pem`).
    pub tls_password: Option<String>,
    watchdogs: Vec<Child>,
}

/// A free port whose cluster bus port (+10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let p = super::free_port();
        if p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok() {
            return p;
        }
    }
}

fn cli(conn: &[String], port: u16, args: &[&str]) -> Option<String> {
    let out = Command::new("redis-cli")
        .args(conn)
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `redis-cli` connection options: none, or TLS with the cluster's CA and password.
fn cli_conn(dir: &std::path::Path, tls_password: Option<&str>) -> Vec<String> {
    match tls_password {
        None => Vec::new(),
        Some(pw) => vec![
            "--tls".into(),
            "--cacert".into(),
            dir.join("ca.pem").to_string_lossy().into_owned(),
            "--no-auth-warning".into(),
            "-a".into(),
            pw.into(),
        ],
    }
}

/// Probes every `interval` until `ok()` or panics after `within`.
fn probe(what: &str, within: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < within, "{what} not ready within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

impl LocalCluster {
    /// Starts three masters and creates the cluster; returns once every node
    /// reports `cluster_state:ok` and knows the other two.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// Like [`Self::start`]; with `Some(password)` every node speaks TLS only
    /// (clients and cluster bus, certificates from a private CA made in the
    /// cluster dir) and requires that password.
    pub fn start_with(tls_password: Option<&str>) -> Self {
        let dir = std::env::temp_dir().join(format!("marathon-cluster-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("create the cluster dir");
        let server_args = match tls_password {
            None => "--port {port}".to_string(),
            Some(pw) => {
                super::certificates(&dir);
                format!(
                    "--port 0 --tls-port {{port}} --tls-cluster yes --tls-cert-file server.pem \
                     --tls-key-file server.key --tls-ca-cert-file ca.pem --tls-auth-clients no \
                     --requirepass {pw} --masterauth {pw}"
                )
            }
        };
        let conn = cli_conn(&dir, tls_password);
        let me = std::process::id();
        let mut ports = Vec::new();
        let mut watchdogs = Vec::new();
        for _ in 0..3 {
            let port = cluster_port();
            let conf = format!("nodes-{port}.conf");
            // The watchdog stops its server once the test process is gone.
            // It then removes its node file and, being the last, the empty dir.
            let script = format!(
                "redis-server --cluster-enabled yes --cluster-config-file {conf} {} \
                 --bind 127.0.0.1 --save '' --appendonly no & r=$!; \
                 cleanup() {{ kill $r 2>/dev/null; wait $r; rm -f {conf}; rmdir \"$PWD\" 2>/dev/null; }}; \
                 trap 'cleanup; exit 0' TERM INT; \
                 while kill -0 {me} 2>/dev/null && kill -0 $r 2>/dev/null; do sleep 0.5; done; \
                 cleanup",
                server_args.replace("{port}", &port.to_string())
            );
            let child = Command::new("sh")
                .arg("-c")
                .arg(script)
                .current_dir(&dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("sh and redis-server on the PATH (apt-get install -y redis-server)");
            watchdogs.push(child);
            ports.push(port);
        }
        let cluster = Self {
            ports,
            dir,
            tls_password: tls_password.map(String::from),
            watchdogs,
        };
        let cli = |port: u16, args: &[&str]| cli(&conn, port, args);
        for &p in &cluster.ports {
            probe(
                &format!("redis-server on {p}"),
                Duration::from_secs(10),
                || cli(p, &["PING"]).is_some_and(|s| s.trim() == "PONG"),
            );
        }
        let mut create = Command::new("redis-cli");
        create.args(&conn).arg("--cluster").arg("create");
        for p in &cluster.ports {
            create.arg(format!("127.0.0.1:{p}"));
        }
        // Bounded: `--cluster create` waits forever if the nodes cannot meet.
        let log = cluster.dir.join("create.log");
        let mut child = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(std::fs::File::create(&log).expect("create.log"))
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-cli --cluster create");
        let t0 = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if t0.elapsed() < Duration::from_secs(30) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => {
                    let _ = child.kill();
                    let _ = child.wait();
                    break None;
                }
            }
        };
        assert!(
            status.is_some_and(|s| s.success()),
            "cluster create failed: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let _ = std::fs::remove_file(&log);
        for &p in &cluster.ports {
            probe(
                &format!("cluster_state:ok on {p}"),
                Duration::from_secs(20),
                || {
                    cli(p, &["CLUSTER", "INFO"]).is_some_and(|s| {
                        s.contains("cluster_state:ok")
                            && s.contains("cluster_slots_ok:16384")
                            && s.contains("cluster_known_nodes:3")
                    })
                },
            );
        }
        cluster
    }

    /// `redis://127.0.0.1:<port>` (`rediss://:<password>@…` with TLS) of every master.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| match &self.tls_password {
                None => format!("redis://127.0.0.1:{p}"),
                Some(pw) => format!("rediss://:{pw}@127.0.0.1:{p}"),
            })
            .collect()
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        let conn = cli_conn(&self.dir, self.tls_password.as_deref());
        for &p in &self.ports {
            let _ = cli(&conn, p, &["SHUTDOWN", "NOSAVE"]);
        }
        for w in &mut self.watchdogs {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The cluster shared by every case of this test binary (started on first use).
pub fn shared() -> &'static LocalCluster {
    static CLUSTER: OnceLock<LocalCluster> = OnceLock::new();
    CLUSTER.get_or_init(LocalCluster::start)
}

/// A store in cluster mode on the shared cluster, on `key_prefix`.
pub async fn store_on(key_prefix: String) -> RedisStore {
    let urls = tokio::task::spawn_blocking(|| shared().urls())
        .await
        .expect("start the cluster");
    RedisStore::connect(RedisStoreConfig {
        cluster_nodes: urls,
        key_prefix,
        ..Default::default()
    })
    .await
    .expect("connect to the local cluster")
}

/// A store on a fresh random prefix of the shared cluster.
pub async fn fresh() -> (RedisStore, String) {
    let p = super::prefix();
    (store_on(p.clone()).await, p)
}

/// Every key under `prefix` on the master at `port` (SCAN MATCH).
pub async fn keys_on(port: u16, prefix: &str) -> Vec<String> {
    marathon_redis::testkit::keys_under(&format!("redis://127.0.0.1:{port}"), prefix)
        .await
        .expect("SCAN a master")
}

/// Deletes every key under `prefix` on every master (SCAN + UNLINK per key,
/// since one UNLINK cannot span slots); never FLUSHALL.
pub async fn teardown(prefix: &str) {
    for &port in &shared().ports {
        marathon_redis::testkit::delete_prefix(&format!("redis://127.0.0.1:{port}"), prefix)
            .await
            .expect("delete the run's keys on a master");
    }
}
