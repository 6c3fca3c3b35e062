//! [`RedisStoreConfig`]: where the Redis store connects and how it lays out its keys.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;

use marathon_core::duration_ms;

/// Configuration of a [`crate::RedisStore`]; plain data, no I/O.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisStoreConfig {
    /// `redis://` or `rediss://` (TLS) URL; may embed credentials. Default `redis://127.0.0.1:6379`.
    /// Ignored in cluster mode (see `cluster_nodes`).
    pub url: String,
    /// Seed node URLs of a Redis Cluster (`redis://` or `rediss://`, same
    /// credentials on each); non-empty selects cluster mode and `url` is then
    /// ignored. A few masters are enough: the client discovers the others.
    /// Default empty: single-node mode on `url`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub cluster_nodes: Vec<String>,
    /// Prefix of every key Marathon writes; must not contain `{` or `}`. Default `"marathon:"`.
    pub key_prefix: String,
    /// Fixed number of shards (hash slots used), 1 to 16384; never change it on a live store. Default 16.
    pub shards: u32,
    /// Timeout of establishing a connection, in ms. Default 2000.
    #[serde(with = "duration_ms")]
    pub connect_timeout: Duration,
    /// Timeout of one command's response, in ms. Default 2000.
    #[serde(with = "duration_ms")]
    pub response_timeout: Duration,
    /// When set, a finished workflow's keys expire this long (ms) after it closed; 0 keeps
    /// them, as `None` does. Default none.
    #[serde(with = "duration_ms::option")]
    pub retention: Option<Duration>,
    /// PEM file of the certificate authority that signed the server's TLS
    /// certificate, for `rediss://` with a private CA; default: the public web roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<String>,
}

/// Most `shards`: a Redis Cluster's hash slots.
const MAX_SHARDS: u32 = 16384;

/// Longest `retention`: 100 years.
const MAX_RETENTION: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

impl RedisStoreConfig {
    /// Whether this config selects a Redis Cluster (`cluster_nodes` is not empty).
    #[must_use]
    pub fn is_cluster(&self) -> bool {
        !self.cluster_nodes.is_empty()
    }

    /// Checks what can be checked without connecting: the URL (or the cluster's node
    /// URLs), `key_prefix`, `shards`, the timeouts, `retention` and that
    /// `tls_ca_file` is a file. The store's `connect` runs it first; a server runs it
    /// while validating its configuration.
    ///
    /// # Errors
    /// `(field, message)`: the field at fault (`url`, `cluster_nodes`, `key_prefix`,
    /// `shards`, `connect_timeout`, `response_timeout`, `retention`, `tls_ca_file`)
    /// and what is wrong, passwords masked.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if self.is_cluster() {
            for node in &self.cluster_nodes {
                check_url(node, true).map_err(|m| ("cluster_nodes", m))?;
            }
        } else {
            check_url(&self.url, false).map_err(|m| ("url", m))?;
        }
        if self.key_prefix.contains(['{', '}']) {
            return Err((
                "key_prefix",
                format!(
                    "{:?} must not contain '{{' or '}}' (they delimit the shard hash tag)",
                    self.key_prefix
                ),
            ));
        }
        if self.shards == 0 {
            return Err(("shards", "must be at least 1".into()));
        }
        // Every shard's stream is read, and every shard's indexes and owed work
        // queried, on each subscription round, list page and sweep: a store of
        // millions of shards exhausts memory at connect (u32::MAX: one stream name
        // each) and spreads no further than Redis Cluster's 16384 slots anyway.
        if self.shards > MAX_SHARDS {
            return Err((
                "shards",
                format!(
                    "{} is more than {MAX_SHARDS} (the hash slots of a Redis Cluster)",
                    self.shards
                ),
            ));
        }
        // Every connection attempt would time out before it began.
        if self.connect_timeout.is_zero() {
            return Err((
                "connect_timeout",
                "must be at least 1 ms: every connection attempt would time out".into(),
            ));
        }
        // Every command would time out, and connect report the store unreachable.
        if self.response_timeout.is_zero() {
            return Err((
                "response_timeout",
                "must be at least 1 ms: every command would time out".into(),
            ));
        }
        // The terminal append's script hands it to PEXPIRE as a Lua number, which
        // Redis writes in exponent form from 1e17 on and then refuses, after part of
        // the append was written.
        if let Some(retention) = self.retention
            && retention > MAX_RETENTION
        {
            return Err((
                "retention",
                format!(
                    "{} ms is more than 100 years ({} ms); leave it unset to keep finished workflows",
                    retention.as_millis(),
                    MAX_RETENTION.as_millis()
                ),
            ));
        }
        // A metadata look-up, not a read: a missing file stops start-up with its key
        // instead of failing inside the connection.
        if let Some(path) = &self.tls_ca_file
            && !std::path::Path::new(path).is_file()
        {
            return Err((
                "tls_ca_file",
                format!("{path:?} is not a readable file (a PEM certificate authority)"),
            ));
        }
        Ok(())
    }
}

/// Checks that `url` is a URL the Redis client takes (a Redis Cluster node's only
/// over TCP); the message shows it with its password masked.
fn check_url(url: &str, cluster: bool) -> Result<(), String> {
    let shown = masked_url(url);
    let scheme = url.split_once("://").map(|(s, _)| s);
    let tcp = ["redis", "rediss", "valkey", "valkeys"];
    let unix = ["unix", "redis+unix", "valkey+unix"];
    match scheme {
        Some(s) if tcp.contains(&s) || (!cluster && unix.contains(&s)) => {}
        Some(s) => {
            return Err(format!(
                "{shown:?} has scheme {s:?}: expected redis://host:port or rediss://host:port (TLS)"
            ));
        }
        None => {
            return Err(format!(
                "{shown:?} is not a URL: expected redis://host:port or rediss://host:port (TLS)"
            ));
        }
    }
    redis::IntoConnectionInfo::into_connection_info(url)
        .map(|_| ())
        .map_err(|e| {
            format!(
                "{shown:?} is not a valid Redis URL ({}): expected redis://[user:password@]host:port[/db]",
                e.detail().unwrap_or("it does not parse")
            )
        })
}

impl Default for RedisStoreConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".to_string(),
            cluster_nodes: Vec::new(),
            key_prefix: "marathon:".to_string(),
            shards: 16,
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(2),
            retention: None,
            tls_ca_file: None,
        }
    }
}

impl fmt::Debug for RedisStoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStoreConfig")
            .field("url", &masked_url(&self.url))
            .field(
                "cluster_nodes",
                &self
                    .cluster_nodes
                    .iter()
                    .map(|u| masked_url(u))
                    .collect::<Vec<_>>(),
            )
            .field("key_prefix", &self.key_prefix)
            .field("shards", &self.shards)
            .field("connect_timeout", &self.connect_timeout)
            .field("response_timeout", &self.response_timeout)
            .field("retention", &self.retention)
            .field("tls_ca_file", &self.tls_ca_file)
            .finish()
    }
}

/// The URL with any password (or lone credential) replaced by `***`.
pub(crate) use marathon_core::masked_url;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_the_password() {
        let cfg = RedisStoreConfig {
            url: "rediss://app:s3cr3t@redis.example:6380/0".into(),
            ..Default::default()
        };
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("s3cr3t"), "{shown}");
        assert!(
            shown.contains("rediss://app:***@redis.example:6380/0"),
            "{shown}"
        );
        assert_eq!(masked_url("redis://tok@h:1"), "redis://***@h:1");
        assert_eq!(masked_url("redis://h:1"), "redis://h:1");
        // A typo that is no URL still hides what may be a password.
        assert_eq!(masked_url("rediss//u:s3cret@h:1"), "***@h:1");
        let e = RedisStoreConfig {
            url: "rediss//u:s3cret@h:1".into(),
            ..Default::default()
        }
        .check()
        .expect_err("not a URL");
        assert!(!e.1.contains("s3cret"), "{e:?}");
        let cluster = RedisStoreConfig {
            cluster_nodes: vec!["redis://:pw1@a:7000".into(), "redis://:pw1@b:7001".into()],
            ..Default::default()
        };
        let shown = format!("{cluster:?}");
        assert!(!shown.contains("pw1"), "{shown}");
        assert!(shown.contains("redis://:***@b:7001"), "{shown}");
    }

    #[test]
    fn config_defaults_and_rejects_unknown_fields() {
        let cfg: RedisStoreConfig =
            serde_json::from_str(r#"{"shards": 4, "retention": 60000}"#).expect("valid config");
        assert_eq!(cfg.shards, 4);
        assert_eq!(cfg.retention, Some(Duration::from_secs(60)));
        assert_eq!(cfg.key_prefix, "marathon:");
        assert!(!cfg.is_cluster());
        let cfg: RedisStoreConfig =
            serde_json::from_str(r#"{"cluster_nodes": ["redis://127.0.0.1:7000"]}"#)
                .expect("valid config");
        assert!(cfg.is_cluster());
        assert!(serde_json::from_str::<RedisStoreConfig>(r#"{"shard": 4}"#).is_err());
    }

    #[test]
    fn check_names_the_field_at_fault() {
        assert_eq!(RedisStoreConfig::default().check(), Ok(()));
        let field = |cfg: RedisStoreConfig| cfg.check().map_err(|e| e.0);
        for url in ["notaurl", "http://127.0.0.1:6379", "redis://h:1/notadb"] {
            let cfg = RedisStoreConfig {
                url: url.into(),
                ..Default::default()
            };
            assert_eq!(field(cfg), Err("url"), "{url}");
        }
        let e = RedisStoreConfig {
            url: "http://u:s3cr3t@h:1".into(),
            ..Default::default()
        }
        .check()
        .expect_err("http");
        assert!(!e.1.contains("s3cr3t"), "{}", e.1);
        let cfg = RedisStoreConfig {
            cluster_nodes: vec!["redis://a:1".into(), "unix:///tmp/r.sock".into()],
            ..Default::default()
        };
        assert_eq!(field(cfg), Err("cluster_nodes"));
        let cfg = RedisStoreConfig {
            key_prefix: "re{vD".into(),
            ..Default::default()
        };
        assert_eq!(field(cfg), Err("key_prefix"));
        let cfg = RedisStoreConfig {
            shards: 0,
            ..Default::default()
        };
        assert_eq!(field(cfg), Err("shards"));
        for (shards, ok) in [
            (MAX_SHARDS, true),
            (MAX_SHARDS + 1, false),
            (u32::MAX, false),
        ] {
            let cfg = RedisStoreConfig {
                shards,
                ..Default::default()
            };
            assert_eq!(field(cfg).is_ok(), ok, "shards {shards}");
        }
        let cfg = RedisStoreConfig {
            tls_ca_file: Some("/nonexistent/ca.pem".into()),
            ..Default::default()
        };
        assert_eq!(field(cfg), Err("tls_ca_file"));
        let cfg = RedisStoreConfig {
            connect_timeout: Duration::ZERO,
            ..Default::default()
        };
        assert_eq!(field(cfg), Err("connect_timeout"));
        let cfg = RedisStoreConfig {
            response_timeout: Duration::ZERO,
            ..Default::default()
        };
        assert_eq!(field(cfg), Err("response_timeout"));
        let cfg = RedisStoreConfig {
            retention: Some(Duration::from_millis(100_000_000_000_000_000)),
            ..Default::default()
        };
        assert_eq!(field(cfg), Err("retention"));
        let cfg = RedisStoreConfig {
            retention: Some(MAX_RETENTION),
            ..Default::default()
        };
        assert_eq!(field(cfg), Ok(()));
    }
}
