//! The server's configuration: plain serde data with documented defaults, read
//! from a TOML file, then `MARATHON_*` environment variables, then flags (each
//! layer wins over the one before), and validated before anything starts.
//!
//! Environment variables name a key by its TOML path, upper-cased, with `__`
//! between the levels: `MARATHON_STORE__KEY_PREFIX` sets `[store] key_prefix`,
//! `MARATHON_SERVER__BODY_LIMIT` sets `[server] body_limit`. Short aliases:
//! `MARATHON_LISTEN` (`server.listen`), `MARATHON_ROLE` (`server.role`),
//! `MARATHON_AUTH_TOKENS` (`server.auth_tokens`, comma-separated) and
//! `MARATHON_LOG` (`log.filter`). Variables without `__` (other than the
//! aliases and `MARATHON_CONFIG`) are ignored.

use marathon_core::{EngineConfig, WorkerConfig, duration_ms};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Why a configuration could not be loaded or is invalid.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The configuration file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configuration file is not valid TOML.
    #[error("config file {path} is not valid TOML: {message}")]
    Parse {
        /// The file.
        path: String,
        /// The parser's message.
        message: String,
    },
    /// A value from the environment or a flag does not fit its key.
    #[error("{source_name}: {message}")]
    Override {
        /// The variable or flag.
        source_name: String,
        /// What is wrong.
        message: String,
    },
    /// A key has a value of the wrong type or an unknown key was given. Shown as
    /// "`{path}`: {message}" (the caller says it is the configuration).
    #[error("`{path}`: {message}")]
    Invalid {
        /// Dotted path of the key.
        path: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole configuration of a `marathon` process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `[server]`: HTTP listener, role, auth and limits.
    pub server: ServerConfig,
    /// `[engine]`: the core engine's tunables.
    pub engine: EngineConfig,
    /// `[worker]`: the core worker's tunables (task queues, sweeper, grace).
    pub worker: WorkerConfig,
    /// `[store]`: which store and its settings.
    pub store: StoreConfig,
    /// `[queue]`: which queue and its settings.
    pub queue: QueueConfig,
    /// `[log]`: log format and filter.
    pub log: LogConfig,
}

/// What a process runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The HTTP API only; no worker.
    Api,
    /// Workers and the sweeper; only `/healthz`, `/readyz` and `/metrics` on HTTP.
    Worker,
    /// Both (the default).
    #[default]
    All,
}

impl Role {
    /// Whether this role serves the `/v1` API.
    #[must_use]
    pub fn runs_api(self) -> bool {
        matches!(self, Role::Api | Role::All)
    }

    /// Whether this role runs workers and the sweeper.
    #[must_use]
    pub fn runs_worker(self) -> bool {
        matches!(self, Role::Worker | Role::All)
    }

    /// The `snake_case` name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Api => "api",
            Role::Worker => "worker",
            Role::All => "all",
        }
    }
}

/// `[server]`: the HTTP side of the process.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on. Default `127.0.0.1:8080`.
    pub listen: String,
    /// What this process runs. Default `all`.
    pub role: Role,
    /// Bearer tokens accepted; empty turns auth off. Default empty.
    pub auth_tokens: Vec<String>,
    /// Largest accepted request body, in bytes. Default 1 MiB.
    pub body_limit: usize,
    /// How long in-flight requests may finish after shutdown begins. Default 30 s.
    #[serde(with = "duration_ms", rename = "shutdown_grace_ms")]
    pub shutdown_grace: Duration,
    /// Longest `?wait=` of `GET /v1/workflows/{id}/result`. Default 50 s, below the
    /// 60 s idle timeout of an AWS ALB, which would cut a long poll held that long.
    #[serde(with = "duration_ms", rename = "result_wait_max_ms")]
    pub result_wait_max: Duration,
    /// Interval of SSE heartbeat comments. Default 15 s.
    #[serde(with = "duration_ms", rename = "sse_heartbeat_ms")]
    pub sse_heartbeat: Duration,
    /// How long a connection may take to send a request's headers (an idle
    /// keep-alive connection waiting for its next request included). Default 75 s:
    /// above a load balancer's idle timeout (AWS ALB: 60 s), which must not find
    /// its pooled connection closed under a request.
    #[serde(with = "duration_ms", rename = "header_read_timeout_ms")]
    pub header_read_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            role: Role::All,
            auth_tokens: Vec::new(),
            body_limit: 1024 * 1024,
            shutdown_grace: Duration::from_secs(30),
            result_wait_max: Duration::from_secs(50),
            sse_heartbeat: Duration::from_secs(15),
            header_read_timeout: Duration::from_secs(75),
        }
    }
}

impl fmt::Debug for ServerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerConfig")
            .field("listen", &self.listen)
            .field("role", &self.role)
            .field(
                "auth_tokens",
                &format!("[{} masked]", self.auth_tokens.len()),
            )
            .field("body_limit", &self.body_limit)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("result_wait_max", &self.result_wait_max)
            .field("sse_heartbeat", &self.sse_heartbeat)
            .field("header_read_timeout", &self.header_read_timeout)
            .finish()
    }
}

/// Settings of the Redis store (`marathon_redis::RedisStoreConfig` when built
/// with the `redis` feature; kept as raw TOML otherwise, so that the variant exists in every build).
#[cfg(feature = "redis")]
pub type RedisSettings = marathon_redis::RedisStoreConfig;
/// Settings of the Redis store (raw TOML: this build has no `redis` feature).
#[cfg(not(feature = "redis"))]
pub type RedisSettings = toml::Table;

/// Settings of the SQS queue (`marathon_sqs::SqsQueueConfig` with the `sqs` feature).
#[cfg(feature = "sqs")]
pub type SqsSettings = marathon_sqs::SqsQueueConfig;
/// Settings of the SQS queue (raw TOML: this build has no `sqs` feature).
#[cfg(not(feature = "sqs"))]
pub type SqsSettings = toml::Table;

/// `[store]`: `kind = "memory"` (default) or `kind = "redis"` with the Redis settings beside it.
#[derive(Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StoreConfig {
    /// In-process store; nothing is shared or kept across restarts.
    #[default]
    Memory,
    /// Redis (feature `redis`): `url`, `key_prefix`, `shards`, timeouts, `retention`.
    Redis(RedisSettings),
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreConfig::Memory => f.write_str("Memory"),
            #[cfg(feature = "redis")]
            StoreConfig::Redis(c) => f.debug_tuple("Redis").field(c).finish(),
            #[cfg(not(feature = "redis"))]
            StoreConfig::Redis(_) => f.write_str("Redis(..)"),
        }
    }
}

/// `[queue]`: `kind = "memory"` (default) or `kind = "sqs"` with the SQS settings beside it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum QueueConfig {
    /// In-process queue (`max_receives`); nothing is shared between processes.
    Memory(marathon_core::memory::MemoryQueueConfig),
    /// AWS SQS (feature `sqs`): `queue_prefix`, `queue_urls`, `region`, `endpoint_url`, ….
    Sqs(SqsSettings),
}

impl StoreConfig {
    /// The backend's name, as the `backend` label of store metrics.
    pub fn backend_name(&self) -> &'static str {
        match self {
            StoreConfig::Memory => "memory",
            StoreConfig::Redis(_) => "redis",
        }
    }
}

impl QueueConfig {
    /// The backend's name, as the `backend` label of queue metrics.
    pub fn backend_name(&self) -> &'static str {
        match self {
            QueueConfig::Memory(_) => "memory",
            QueueConfig::Sqs(_) => "sqs",
        }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig::Memory(Default::default())
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines (default).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// `[log]`: how the process logs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `text` or `json`. Default `text`.
    pub format: LogFormat,
    /// A `tracing` filter (`RUST_LOG` syntax). Default `info`.
    pub filter: String,
    /// Which spans are exported over OTLP (same syntax; needs the `otel` feature and an
    /// OTLP endpoint), independently of `filter`. Default `info`.
    pub trace_filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
            trace_filter: "info".into(),
        }
    }
}

/// Environment variables that are short names for a key.
const ENV_ALIASES: &[(&str, &str)] = &[
    ("MARATHON_LISTEN", "server.listen"),
    ("MARATHON_ROLE", "server.role"),
    ("MARATHON_AUTH_TOKENS", "server.auth_tokens"),
    ("MARATHON_LOG", "log.filter"),
];

/// The configuration's sources, lowest precedence first.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// Contents of the TOML file and its name, if one was given.
    pub file: Option<(String, String)>,
    /// Environment variables (all of them; those not for Marathon are ignored).
    pub env: Vec<(String, String)>,
    /// Overrides from flags: `(dotted.key, value)`.
    pub flags: Vec<(String, String)>,
}

impl Sources {
    /// Reads `file` (if any) and takes the process environment (a variable that is
    /// not UTF-8 is left out, unless it is one of Marathon's).
    ///
    /// # Errors
    /// [`ConfigError::Read`] when the file cannot be read; [`ConfigError::Override`]
    /// when a `MARATHON_*` variable is not UTF-8.
    pub fn from_process(
        file: Option<&Path>,
        flags: Vec<(String, String)>,
    ) -> Result<Self, ConfigError> {
        let file = match file {
            Some(p) => Some((
                p.display().to_string(),
                std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?,
            )),
            None => None,
        };
        // `std::env::vars` panics on a variable that is not UTF-8, however unrelated
        // to Marathon: such a variable is skipped, unless Marathon would read it.
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            match (name.into_string(), value.into_string()) {
                (Ok(name), Ok(value)) => env.push((name, value)),
                (Ok(name), Err(_)) if env_key(&name).is_some() => {
                    return Err(ConfigError::Override {
                        source_name: format!("environment variable {name}"),
                        message: "is not valid UTF-8".into(),
                    });
                }
                _ => {}
            }
        }
        Ok(Self { file, env, flags })
    }
}

impl Config {
    /// Loads and validates the configuration: file, then environment, then flags.
    ///
    /// # Errors
    /// A [`ConfigError`] naming the source and key of the first bad value.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        let mut table = match &sources.file {
            Some((path, text)) => {
                toml::from_str::<toml::Table>(text).map_err(|e| ConfigError::Parse {
                    path: path.clone(),
                    message: parse_error(text, &e),
                })?
            }
            None => toml::Table::new(),
        };
        let template = template();
        let mut env: Vec<(&String, &String)> = sources.env.iter().map(|(a, b)| (a, b)).collect();
        env.sort();
        // Which variable set each key: an alias and the full name both set, to
        // different values, would otherwise be settled by their names' order.
        let mut set_by: std::collections::HashMap<String, (&String, &String)> =
            std::collections::HashMap::new();
        for (name, value) in env {
            let Some(path) = env_key(name) else { continue };
            if let Some((other, first)) = set_by.insert(path.clone(), (name, value))
                && first != value
            {
                return Err(ConfigError::Override {
                    source_name: format!("environment variable {name}"),
                    message: format!(
                        "sets {path}, as {other} does, to another value; set only one of them"
                    ),
                });
            }
            // An empty secret (a missing secret rendered as "") would silently turn
            // authentication off.
            if path == "server.auth_tokens" && holds_no_token(value) {
                return Err(ConfigError::Override {
                    source_name: format!("environment variable {name}"),
                    message: "is set but holds no token: unset it to run without authentication"
                        .into(),
                });
            }
            set_path(&mut table, &template, &path, value).map_err(|message| {
                ConfigError::Override {
                    source_name: format!("environment variable {name}"),
                    message,
                }
            })?;
        }
        for (key, value) in &sources.flags {
            // As for the variables: `--set server.auth_tokens=$TOKEN` with the secret
            // missing must not turn authentication off.
            if key == "server.auth_tokens" && holds_no_token(value) {
                return Err(ConfigError::Override {
                    source_name: format!("flag setting {key}"),
                    message: "holds no token: leave it out to run without authentication".into(),
                });
            }
            set_path(&mut table, &template, key, value).map_err(|message| {
                ConfigError::Override {
                    source_name: format!("flag setting {key}"),
                    message,
                }
            })?;
        }
        check_kinds(&mut table)?;
        #[cfg_attr(
            not(feature = "redis"),
            expect(unused_mut, reason = "only the Redis store's retention is taken over")
        )]
        let mut config: Config =
            serde_path_to_error::deserialize(toml::Value::Table(table.clone())).map_err(|e| {
                let path = e.path().to_string();
                let (path, message) = section_error(&table, &path)
                    .unwrap_or_else(|| (path, e.inner().message().to_string()));
                let message = without_secrets(&table, &path, message);
                ConfigError::Invalid { path, message }
            })?;
        // Closed workflows' keys expire after the store's retention, but their index
        // entries go only when the worker purges them: unless told otherwise, it purges
        // them after the same time. The store's 0 keeps the keys (as unset does): a
        // worker retention of 0 would instead purge every workflow as it closes.
        #[cfg(feature = "redis")]
        if config.worker.retention.is_none()
            && let StoreConfig::Redis(redis) = &config.store
        {
            config.worker.retention = redis.retention.filter(|r| !r.is_zero());
        }
        config.validate()?;
        Ok(config)
    }

    /// The task queues this process sends to or serves, each with the key that names
    /// it: the engine's default task queue and, for a worker role, the served ones.
    pub fn task_queues_used(&self) -> impl Iterator<Item = (&'static str, &str)> {
        let served = self
            .worker
            .queues
            .iter()
            .filter(|_| self.server.role.runs_worker())
            .map(|q| ("worker.queues", q.name.as_str()));
        std::iter::once((
            "engine.default_task_queue",
            self.engine.default_task_queue.as_str(),
        ))
        .chain(served)
    }

    /// Checks values that types alone cannot: addresses, limits, and backends that share nothing.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] for the first bad value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |path: &str, message: String| {
            Err(ConfigError::Invalid {
                path: path.into(),
                message,
            })
        };
        if self.server.listen.parse::<SocketAddr>().is_err() {
            return bad(
                "server.listen",
                format!(
                    "{:?} is not an address like 127.0.0.1:8080",
                    self.server.listen
                ),
            );
        }
        if self.server.body_limit == 0 {
            return bad("server.body_limit", "must be at least 1 byte".into());
        }
        if self.server.auth_tokens.iter().any(|t| t.trim().is_empty()) {
            return bad("server.auth_tokens", "tokens must not be empty".into());
        }
        // A request's token is read without surrounding blanks: such a token could
        // never match.
        if self.server.auth_tokens.iter().any(|t| t.trim() != t) {
            return bad(
                "server.auth_tokens",
                "tokens must not start or end with blanks".into(),
            );
        }
        // A request's header is read as ASCII (clients send other bytes as UTF-8 or
        // Latin-1, as they please): such a token would never match.
        if self
            .server
            .auth_tokens
            .iter()
            .any(|t| !t.bytes().all(|b| (b' '..=b'~').contains(&b)))
        {
            return bad(
                "server.auth_tokens",
                "tokens may hold only printable ASCII characters (letters, digits, punctuation)"
                    .into(),
            );
        }
        if self.server.result_wait_max.is_zero() {
            return bad("server.result_wait_max_ms", "must be at least 1 ms".into());
        }
        if self.server.sse_heartbeat.is_zero() {
            return bad("server.sse_heartbeat_ms", "must be at least 1 ms".into());
        }
        if self.server.header_read_timeout.is_zero() {
            return bad(
                "server.header_read_timeout_ms",
                "must be at least 1 ms".into(),
            );
        }
        if self.engine.default_task_queue.is_empty() {
            return bad("engine.default_task_queue", "must not be empty".into());
        }
        // 0 would have the sweeper send every owed workflow task again on each pass,
        // and its claims would hold nothing off for any time.
        if self.engine.workflow_task_deadline.is_zero() {
            return bad(
                "engine.workflow_task_deadline_ms",
                "must be at least 1 ms".into(),
            );
        }
        // 0 would fail every run at its first workflow task.
        if self.engine.max_history_events == 0 {
            return bad("engine.max_history_events", "must be at least 1".into());
        }
        if self.server.role.runs_worker() {
            if self.worker.queues.is_empty() {
                return bad(
                    "worker.queues",
                    "a worker needs at least one task queue".into(),
                );
            }
            if let Some(q) = self
                .worker
                .queues
                .iter()
                .find(|q| q.concurrency == 0 || q.name.is_empty())
            {
                return bad(
                    "worker.queues",
                    format!(
                        "queue {:?} needs a name and a concurrency of at least 1",
                        q.name
                    ),
                );
            }
            // The worker would run 1: a 0 that seems to turn the queue off does not.
            if let Some(q) = self.worker.queues.iter().find(|q| q.receivers == 0) {
                return bad(
                    "worker.queues",
                    format!(
                        "queue {:?} needs receivers of at least 1 (leave it out for 1)",
                        q.name
                    ),
                );
            }
            // The worker bounds a queue's tasks with a semaphore, which panics above this.
            let most = tokio::sync::Semaphore::MAX_PERMITS;
            if let Some(q) = self.worker.queues.iter().find(|q| q.concurrency > most) {
                return bad(
                    "worker.queues",
                    format!(
                        "queue {:?} has a concurrency of {}, more than a worker can bound ({most})",
                        q.name, q.concurrency
                    ),
                );
            }
            let queues = &self.worker.queues;
            if let Some((i, q)) = queues
                .iter()
                .enumerate()
                .find(|(i, q)| queues[..*i].iter().any(|p| p.name == q.name))
            {
                return bad(
                    "worker.queues",
                    format!(
                        "queue {:?} is listed twice (entries {} and {}); list each queue once",
                        q.name,
                        queues.iter().position(|p| p.name == q.name).unwrap_or(i) + 1,
                        i + 1
                    ),
                );
            }
            // Zero would spin: a receive loop that never waits on an empty queue, a
            // sweeper asking the store without a pause, a maintenance round (queue
            // depth, dead letters: two queue calls per served queue) without a pause.
            for (key, value) in [
                ("worker.poll_wait_ms", self.worker.poll_wait),
                ("worker.sweep_interval_ms", self.worker.sweep_interval),
                ("worker.visibility_ms", self.worker.visibility),
                (
                    "worker.dead_letter_interval_ms",
                    self.worker.dead_letter_interval,
                ),
            ] {
                if value.is_zero() {
                    return bad(key, "must be at least 1 ms".into());
                }
            }
            // SQS counts visibility in whole seconds (rounded up): extending a
            // shorter one twice a visibility would call SQS for nothing.
            if matches!(self.queue, QueueConfig::Sqs(_))
                && self.worker.visibility < Duration::from_secs(1)
            {
                return bad(
                    "worker.visibility_ms",
                    "SQS counts visibility in whole seconds: at least 1000".into(),
                );
            }
        }
        // What the store's connect would refuse, named by its key (exit 2, not a
        // backend that cannot connect).
        #[cfg(feature = "redis")]
        if let StoreConfig::Redis(redis) = &self.store
            && let Err((field, message)) = redis.check()
        {
            return bad(&format!("store.{field}"), message);
        }
        // What SQS (or the SDK) would refuse on every request, or `SqsQueue::connect`
        // at start, named by its key (exit 2, not a backend that cannot connect).
        #[cfg(feature = "sqs")]
        if let QueueConfig::Sqs(sqs) = &self.queue
            && let Err((field, message)) = sqs.check()
        {
            return bad(&format!("queue.{field}"), message);
        }
        // SQS refuses such a name on every call: a worker would retry it forever.
        // (A prefix no name can fix was refused by `check` above.)
        #[cfg(feature = "sqs")]
        if let QueueConfig::Sqs(sqs) = &self.queue {
            for (path, name) in self.task_queues_used() {
                if let Err(message) = sqs.check_queue_name(name) {
                    return bad(path, message);
                }
            }
        }
        if self.server.role != Role::All {
            if matches!(self.store, StoreConfig::Memory) {
                return bad(
                    "store.kind",
                    format!(
                        "role {} with the memory store shares nothing with other processes; use role all or a shared store (redis)",
                        self.server.role.as_str()
                    ),
                );
            }
            if matches!(self.queue, QueueConfig::Memory(_)) {
                return bad(
                    "queue.kind",
                    format!(
                        "role {} with the memory queue shares nothing with other processes; use role all or a shared queue (sqs)",
                        self.server.role.as_str()
                    ),
                );
            }
        }
        // A memory backend is this process's alone (role all, checked above): work
        // this process does not do, no other process does either.
        if self.server.role.runs_worker() {
            if matches!(self.queue, QueueConfig::Memory(_))
                && !self
                    .worker
                    .queues
                    .iter()
                    .any(|q| q.name == self.engine.default_task_queue)
            {
                let served: Vec<&str> =
                    self.worker.queues.iter().map(|q| q.name.as_str()).collect();
                return bad(
                    "engine.default_task_queue",
                    format!(
                        "{:?} is not served by worker.queues ({}): with the memory queue no other process serves it, so a workflow started without a task_queue would never run",
                        self.engine.default_task_queue,
                        served.join(", ")
                    ),
                );
            }
            if matches!(self.store, StoreConfig::Memory) && !self.worker.sweeper {
                return bad(
                    "worker.sweeper",
                    "false with the memory store: no other process sweeps it, so its timers would never fire and lost tasks never be sent again".into(),
                );
            }
        }
        // An empty filter parses, as one that enables nothing: not even errors would be
        // logged (an unset variable rendered as "" would silence the process).
        for (key, filter, what) in [
            (
                "log.filter",
                &self.log.filter,
                "log nothing, errors included",
            ),
            ("log.trace_filter", &self.log.trace_filter, "export no span"),
        ] {
            if filter.trim().is_empty() {
                return bad(
                    key,
                    format!("is empty, which would {what}: leave it unset for info, or write off"),
                );
            }
        }
        // As the tracing set-up reads them (spaces around a directive are ignored).
        if let Err(e) = marathon_observability::check_filter(&self.log.filter) {
            return bad("log.filter", e);
        }
        if let Err(e) = marathon_observability::check_filter(&self.log.trace_filter) {
            return bad("log.trace_filter", e);
        }
        crate::backends::check_compiled(self).map_err(|e| ConfigError::Invalid {
            path: e.0.into(),
            message: e.1,
        })
    }

    /// The configuration as TOML, with secrets (auth tokens, passwords in URLs) shown as `***`.
    #[must_use]
    pub fn to_masked_toml(&self) -> String {
        let mut value = match toml::Value::try_from(self) {
            Ok(v) => v,
            Err(e) => return format!("# cannot show the configuration: {e}\n"),
        };
        if let Some(server) = value.get_mut("server").and_then(toml::Value::as_table_mut)
            && let Some(toml::Value::Array(tokens)) = server.get_mut("auth_tokens")
        {
            for t in tokens.iter_mut() {
                *t = toml::Value::String("***".into());
            }
        }
        for section in ["store", "queue"] {
            if let Some(v) = value.get_mut(section) {
                mask_urls(v);
            }
        }
        toml::to_string_pretty(&value)
            .unwrap_or_else(|e| format!("# cannot show the configuration: {e}\n"))
    }
}

/// Whether `raw`, a value for `server.auth_tokens` from a variable or a flag, names
/// no token at all (blank, only commas, `[]`, `[""]`).
fn holds_no_token(raw: &str) -> bool {
    raw.trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .split(',')
        .all(|t| t.trim().trim_matches(['"', '\'']).trim().is_empty())
}

/// Masks the credentials of every URL in `v`, however deep (`store.cluster_nodes` is a
/// list of them).
fn mask_urls(v: &mut toml::Value) {
    match v {
        toml::Value::String(s) if s.contains("://") => *s = masked_url(s),
        toml::Value::Array(items) => items.iter_mut().for_each(mask_urls),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| mask_urls(v)),
        _ => {}
    }
}

/// The URL with any password (or lone credential) replaced by `***`.
pub use marathon_core::masked_url;

/// The dotted key an environment variable sets, if it is one of Marathon's.
fn env_key(name: &str) -> Option<String> {
    if let Some((_, key)) = ENV_ALIASES.iter().find(|(n, _)| *n == name) {
        return Some((*key).to_string());
    }
    let rest = name.strip_prefix("MARATHON_")?;
    if !rest.contains("__") {
        return None;
    }
    Some(
        rest.split("__")
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// The default configuration with every backend's settings, as TOML: the
/// types of its values say how to read a string from the environment or a flag.
fn template() -> toml::Table {
    #[cfg_attr(
        not(any(feature = "redis", feature = "sqs")),
        expect(unused_mut, reason = "only backends' settings extend it")
    )]
    let mut t = toml::Value::try_from(Config::default())
        .ok()
        .and_then(|v| v.as_table().cloned())
        .unwrap_or_default();
    #[cfg(feature = "redis")]
    if let Ok(toml::Value::Table(r)) = toml::Value::try_from(StoreConfig::Redis(Default::default()))
        && let Some(toml::Value::Table(s)) = t.get_mut("store")
    {
        s.extend(r.into_iter().filter(|(k, _)| k != "kind"));
        // Left out of the serialized defaults while empty; still a list of strings
        // (comma-separated in an environment variable).
        s.entry("cluster_nodes")
            .or_insert_with(|| toml::Value::Array(Vec::new()));
    }
    #[cfg(feature = "sqs")]
    if let Ok(toml::Value::Table(r)) = toml::Value::try_from(QueueConfig::Sqs(Default::default()))
        && let Some(toml::Value::Table(s)) = t.get_mut("queue")
    {
        s.extend(r.into_iter().filter(|(k, _)| k != "kind"));
    }
    t
}

/// The settings of each kind of store and queue, by section: a key that the chosen
/// kind lacks is refused, naming the kind that has it (known in every build).
const KIND_KEYS: &[(&str, &str, &[&str])] = &[
    ("store", "memory", &[]),
    (
        "store",
        "redis",
        &[
            "url",
            "cluster_nodes",
            "key_prefix",
            "shards",
            "connect_timeout",
            "response_timeout",
            "retention",
            "tls_ca_file",
        ],
    ),
    ("queue", "memory", &["max_receives"]),
    (
        "queue",
        "sqs",
        &[
            "queue_prefix",
            "queue_urls",
            "create_if_missing",
            "max_receives",
            "region",
            "endpoint_url",
            "wait_time_ms",
            "fifo",
            "batch_window_ms",
        ],
    ),
];

/// Gives a `[store]` or `[queue]` without `kind` the default kind (memory), and
/// refuses a key its kind lacks but another kind has (a Redis setting on the memory
/// store would otherwise be dropped without a word).
fn check_kinds(table: &mut toml::Table) -> Result<(), ConfigError> {
    for section in ["store", "queue"] {
        let Some(toml::Value::Table(settings)) = table.get_mut(section) else {
            continue;
        };
        let kind = settings
            .entry("kind")
            .or_insert_with(|| toml::Value::String("memory".into()));
        let Some(kind) = kind.as_str().map(str::to_string) else {
            continue;
        };
        let keys_of = |kind: &str| {
            KIND_KEYS
                .iter()
                .find(|(s, k, _)| *s == section && *k == kind)
                .map(|(_, _, keys)| *keys)
        };
        // An unknown kind is named by the deserializer.
        let Some(own) = keys_of(&kind) else { continue };
        for key in settings.keys().filter(|k| *k != "kind") {
            if own.contains(&key.as_str()) {
                continue;
            }
            let message = match KIND_KEYS
                .iter()
                .find(|(s, _, keys)| *s == section && keys.contains(&key.as_str()))
            {
                Some((_, other, _)) => format!(
                    "is a setting of the {other} {section}, not of the {kind} one; set {section}.kind = \"{other}\""
                ),
                None if own.is_empty() => {
                    format!("unknown key: the {kind} {section} has no settings")
                }
                None => format!(
                    "unknown key of the {kind} {section}, whose keys are {}",
                    own.join(", ")
                ),
            };
            return Err(ConfigError::Invalid {
                path: format!("{section}.{key}"),
                message,
            });
        }
    }
    Ok(())
}

/// Where and why `text` is not TOML, without the parser's quote of the line: that
/// line may hold a secret (`auth_tokens = [s3cret]`, an unclosed URL with a password).
fn parse_error(text: &str, e: &toml::de::Error) -> String {
    let Some(span) = e.span() else {
        return e.message().to_string();
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit_once('\n')
        .map_or(before, |(_, l)| l)
        .chars()
        .count()
        + 1;
    format!("line {line}, column {column}: {}", e.message())
}

/// Whether string `s`, in the value of key `key` of section `section`, may be a
/// secret: any of `server.auth_tokens`, and in `[store]` and `[queue]` any URL (which
/// may hold a password), as [`Config::to_masked_toml`] masks them.
fn may_be_secret(section: &str, key: &str, s: &str) -> bool {
    match section {
        "server" => key == "auth_tokens",
        "store" | "queue" => s.contains("://") || s.contains('@'),
        _ => false,
    }
}

/// `message` (a deserializer's, which quotes the value it refused: `auth_tokens =
/// "s3cret"` gives `invalid type: string "s3cret", expected a sequence`) with every
/// string of the key at `path` that may be a secret ([`may_be_secret`]) shown as `***`.
fn without_secrets(table: &toml::Table, path: &str, mut message: String) -> String {
    fn strings<'a>(v: &'a toml::Value, out: &mut Vec<&'a str>) {
        match v {
            toml::Value::String(s) if !s.is_empty() => out.push(s),
            toml::Value::Array(items) => items.iter().for_each(|v| strings(v, out)),
            toml::Value::Table(t) => t.values().for_each(|v| strings(v, out)),
            _ => {}
        }
    }
    let mut parts = path.splitn(2, '.');
    let (Some(section), Some(rest)) = (parts.next(), parts.next()) else {
        return message;
    };
    let key = rest.split(['.', '[']).next().unwrap_or(rest);
    let mut found = Vec::new();
    if let Some(v) = table.get(section).and_then(|s| s.get(key)) {
        strings(v, &mut found);
    }
    found.retain(|s| may_be_secret(section, key, s));
    // Longest first, so that a secret holding another is masked whole.
    found.sort_by_key(|s| std::cmp::Reverse(s.len()));
    for s in found {
        message = message
            .replace(&format!("{s:?}"), "\"***\"")
            .replace(s, "***");
    }
    message
}

/// The key at fault inside `[store]` or `[queue]` when `path` names only the section:
/// serde reads those through their `kind` tag and loses the path inside. Reading the
/// section's settings on their own finds it.
fn section_error(table: &toml::Table, path: &str) -> Option<(String, String)> {
    fn inner<T: serde::de::DeserializeOwned>(
        section: &str,
        settings: toml::Table,
    ) -> Option<(String, String)> {
        let e = serde_path_to_error::deserialize::<_, T>(toml::Value::Table(settings)).err()?;
        Some((
            format!("{section}.{}", e.path()),
            e.inner().message().to_string(),
        ))
    }
    if path != "store" && path != "queue" {
        return None;
    }
    let mut settings = table.get(path)?.as_table()?.clone();
    let kind = settings.remove("kind")?;
    match (path, kind.as_str()?) {
        ("store", "redis") => inner::<RedisSettings>(path, settings),
        ("queue", "sqs") => inner::<SqsSettings>(path, settings),
        ("queue", "memory") => inner::<marathon_core::memory::MemoryQueueConfig>(path, settings),
        _ => None,
    }
}

/// Sets `path` (dotted) in `table` to `raw`, read as the type the template has there.
fn set_path(
    table: &mut toml::Table,
    template: &toml::Table,
    path: &str,
    raw: &str,
) -> Result<(), String> {
    let parts: Vec<&str> = path.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("`{path}` is not a valid key"));
    }
    let (last, parents) = parts.split_last().ok_or_else(|| "empty key".to_string())?;
    let mut t = table;
    let mut tpl = Some(template);
    for p in parents {
        let entry = t
            .entry((*p).to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        t = entry
            .as_table_mut()
            .ok_or_else(|| format!("`{p}` is not a section"))?;
        tpl = tpl.and_then(|x| x.get(*p)).and_then(toml::Value::as_table);
    }
    let value = typed(tpl.and_then(|x| x.get(*last)), raw).map_err(|e| format!("`{path}`: {e}"))?;
    t.insert((*last).to_string(), value);
    Ok(())
}

/// Reads `raw` as the type of `like`, or guesses when there is no example.
fn typed(like: Option<&toml::Value>, raw: &str) -> Result<toml::Value, String> {
    use toml::Value as V;
    match like {
        Some(V::String(_)) => Ok(V::String(raw.to_string())),
        Some(V::Integer(_)) => raw
            .trim()
            .parse::<i64>()
            .map(V::Integer)
            .map_err(|_| format!("{raw:?} is not an integer")),
        Some(V::Float(_)) => raw
            .trim()
            .parse::<f64>()
            .map(V::Float)
            .map_err(|_| format!("{raw:?} is not a number")),
        Some(V::Boolean(_)) => match raw.trim() {
            "true" | "1" => Ok(V::Boolean(true)),
            "false" | "0" => Ok(V::Boolean(false)),
            _ => Err(format!("{raw:?} is not true or false")),
        },
        Some(V::Array(a)) if !raw.trim_start().starts_with('[') => {
            let item = a.first().cloned().unwrap_or(V::String(String::new()));
            if let V::Table(t) = &item {
                return Err(format!(
                    "is a list of tables: write it as a TOML array, e.g. [{}]",
                    toml::Value::Table(t.clone())
                ));
            }
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| typed(Some(&item), s))
                .collect::<Result<Vec<_>, _>>()
                .map(V::Array)
        }
        Some(V::Table(_)) => Err("is a section, not a value".into()),
        _ => {
            // No example: a TOML literal (number, bool, array, inline table) or else a string.
            match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
                Ok(mut t) => Ok(t.remove("v").unwrap_or(V::String(raw.to_string()))),
                Err(_) => Ok(V::String(raw.to_string())),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(a, b)| ((*a).into(), (*b).into()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(&Sources::default()).expect("defaults load");
        assert_eq!(c, Config::default());
    }

    #[test]
    fn file_then_env_then_flags() {
        let sources = Sources {
            file: Some((
                "f.toml".into(),
                "[server]\nlisten = \"127.0.0.1:1\"\nbody_limit = 10\n[engine]\ncache_capacity = 5\n".into(),
            )),
            env: env(&[
                ("MARATHON_SERVER__BODY_LIMIT", "20"),
                ("MARATHON_LISTEN", "127.0.0.1:2"),
                ("MARATHON_AUTH_TOKENS", "a, b"),
                ("MARATHON_TEST_REDIS_URL", "ignored"),
                ("HOME", "/root"),
            ]),
            flags: vec![("server.listen".into(), "127.0.0.1:3".into())],
        };
        let c = Config::load(&sources).expect("loads");
        assert_eq!(c.server.listen, "127.0.0.1:3");
        assert_eq!(c.server.body_limit, 20);
        assert_eq!(c.engine.cache_capacity, 5);
        assert_eq!(c.server.auth_tokens, vec!["a".to_string(), "b".to_string()]);
    }

    /// A file that is not TOML is refused naming the place, without quoting the line.
    #[test]
    fn a_toml_error_does_not_quote_the_line() {
        for text in [
            "[server]\nauth_tokens = [s3cret]\n",
            "[server]\nlisten = \"127.0.0.1:1\"\n\n[store]\nurl = \"redis://:s3cret@h:1\n",
        ] {
            let e = Config::load(&Sources {
                file: Some(("f.toml".into(), text.into())),
                ..Default::default()
            })
            .expect_err("not TOML");
            let shown = e.to_string();
            assert!(
                shown.contains("f.toml") && shown.contains("line "),
                "{shown}"
            );
            assert!(!shown.contains("s3cret"), "{shown}");
        }
    }

    /// A secret given with the wrong type is not echoed by the error that names it.
    #[cfg(feature = "redis")]
    #[test]
    fn a_mistyped_redis_url_is_not_echoed() {
        let e = Config::load(&Sources {
            file: Some((
                "f".into(),
                "[store]\nkind = \"redis\"\ncluster_nodes = \"redis://:pw-s3cret@h:1\"\n".into(),
            )),
            ..Default::default()
        })
        .expect_err("a string is not a list of nodes");
        assert!(e.to_string().contains("store.cluster_nodes"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    /// The same for a queue URL with credentials given where a table is read.
    #[cfg(feature = "sqs")]
    #[test]
    fn a_mistyped_queue_url_is_not_echoed() {
        let e = Config::load(&Sources {
            file: Some((
                "f".into(),
                "[queue]\nkind = \"sqs\"\nqueue_urls = \"http://k:s3cret@h:1/q\"\n".into(),
            )),
            ..Default::default()
        })
        .expect_err("a string is not a table of URLs");
        assert!(e.to_string().contains("queue.queue_urls"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn auth_tokens_that_would_turn_auth_off_or_never_match_are_refused() {
        for name in ["MARATHON_AUTH_TOKENS", "MARATHON_SERVER__AUTH_TOKENS"] {
            for blank in ["", " ", " , ", "[]", "[ \"\" ]"] {
                let e = Config::load(&Sources {
                    file: Some(("f".into(), "[server]\nauth_tokens = [\"t0ken\"]\n".into())),
                    env: env(&[(name, blank)]),
                    ..Default::default()
                })
                .expect_err("an empty secret must not turn auth off");
                assert!(e.to_string().contains(name), "{e}");
            }
        }
        // A token given as a string, not a list: the error names the key, not the token.
        let e = Config::load(&Sources {
            file: Some(("f".into(), "[server]\nauth_tokens = \"s3cret\"\n".into())),
            ..Default::default()
        })
        .expect_err("a string is not a list of tokens");
        assert!(e.to_string().contains("server.auth_tokens"), "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        // A flag (`--set server.auth_tokens=$TOKEN`, the secret missing) likewise.
        for blank in ["", " ", " , ", "[]", "[ \"\" ]"] {
            let e = Config::load(&Sources {
                file: Some(("f".into(), "[server]\nauth_tokens = [\"t0ken\"]\n".into())),
                flags: vec![("server.auth_tokens".into(), blank.into())],
                ..Default::default()
            })
            .expect_err("an empty flag must not turn auth off");
            assert!(e.to_string().contains("server.auth_tokens"), "{e}");
        }
        let e = Config::load(&Sources {
            file: Some(("f".into(), "[server]\nauth_tokens = [\" t0ken\"]\n".into())),
            ..Default::default()
        })
        .expect_err("a token with a blank around it never matches");
        assert!(e.to_string().contains("server.auth_tokens"), "{e}");
        // The header is read as ASCII: these never matched (every request a 401).
        for odd in ["p\u{e4}sswort", "tab\\tinside", "\u{1f511}"] {
            let e = Config::load(&Sources {
                file: Some(("f".into(), format!("[server]\nauth_tokens = [\"{odd}\"]\n"))),
                ..Default::default()
            })
            .expect_err("a token outside printable ASCII never matches");
            assert!(e.to_string().contains("server.auth_tokens"), "{e}");
        }
        let c = Config::load(&Sources {
            file: Some((
                "f".into(),
                "[server]\nauth_tokens = [\"a-Z_0.9~+/=\"]\n".into(),
            )),
            ..Default::default()
        })
        .expect("printable ASCII");
        assert_eq!(c.server.auth_tokens, vec!["a-Z_0.9~+/=".to_string()]);
    }

    #[cfg(feature = "redis")]
    #[test]
    fn a_bad_backend_setting_names_its_key() {
        let e = Config::load(&Sources {
            file: Some((
                "f".into(),
                "[store]\nkind = \"redis\"\nshards = -1\n".into(),
            )),
            ..Default::default()
        })
        .expect_err("negative shards");
        assert!(e.to_string().contains("store.shards"), "{e}");
    }

    #[test]
    fn worker_intervals_of_zero_are_refused() {
        for key in [
            "worker.poll_wait_ms",
            "worker.sweep_interval_ms",
            "worker.visibility_ms",
            "worker.dead_letter_interval_ms",
        ] {
            let e = Config::load(&Sources {
                flags: vec![(key.into(), "0".into())],
                ..Default::default()
            })
            .expect_err("zero spins");
            assert!(e.to_string().contains(key), "{e}");
        }
        let e = Config::load(&Sources {
            flags: vec![
                ("queue.kind".into(), "sqs".into()),
                ("worker.visibility_ms".into(), "500".into()),
            ],
            ..Default::default()
        })
        .expect_err("SQS visibility under a second");
        assert!(e.to_string().contains("worker.visibility_ms"), "{e}");
    }

    /// SQS refuses names with other characters than letters, digits, '-' and '_' on
    /// every call: such a prefix or queue name stops start-up instead of leaving a
    /// worker to retry forever.
    #[cfg(feature = "sqs")]
    #[test]
    fn sqs_queue_names_sqs_refuses_are_refused() {
        for (key, value) in [
            ("queue.queue_prefix", "dev:"),
            ("engine.default_task_queue", "llm.calls"),
            ("worker.queues", r#"[{name = "a.b", concurrency = 1}]"#),
        ] {
            let flags = vec![(key, value)];
            let mut flags: Vec<(String, String)> = flags
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            flags.push(("queue.kind".into(), "sqs".into()));
            let e = Config::load(&Sources {
                flags,
                ..Default::default()
            })
            .expect_err("a name SQS refuses");
            assert!(e.to_string().contains(key), "{e}");
            assert!(e.to_string().contains("letters, digits"), "{e}");
        }
    }

    #[cfg(feature = "sqs")]
    fn sqs_flags(pairs: &[(&str, &str)]) -> Sources {
        let mut flags: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect();
        flags.push(("queue.kind".into(), "sqs".into()));
        Sources {
            flags,
            ..Default::default()
        }
    }

    /// Names SQS takes are not refused: long ones of queues that exist already (no
    /// dead-letter queue is created), and worker queues of a role that serves none.
    #[cfg(feature = "sqs")]
    #[test]
    fn sqs_queue_names_sqs_takes_are_accepted() {
        let name = "q".repeat(70);
        Config::load(&sqs_flags(&[("engine.default_task_queue", &name)]))
            .expect("a 79-character SQS queue name that exists already");
        let name = "q".repeat(66);
        Config::load(&sqs_flags(&[
            ("engine.default_task_queue", &name),
            ("queue.fifo", "true"),
        ]))
        .expect("an 80-character FIFO queue name that exists already");
        Config::load(&sqs_flags(&[
            ("server.role", "api"),
            ("store.kind", "redis"),
            ("worker.queues", r#"[{name = "a.b", concurrency = 1}]"#),
        ]))
        .expect("role api with a worker queue it never serves");
    }

    #[test]
    fn bad_values_name_their_key() {
        let e = Config::load(&Sources {
            env: env(&[("MARATHON_SERVER__BODY_LIMIT", "lots")]),
            ..Default::default()
        })
        .expect_err("bad int");
        assert!(e.to_string().contains("MARATHON_SERVER__BODY_LIMIT"), "{e}");
        let e = Config::load(&Sources {
            file: Some(("f".into(), "[server]\nlisten = \"nowhere\"\n".into())),
            ..Default::default()
        })
        .expect_err("bad addr");
        assert!(e.to_string().contains("server.listen"), "{e}");
        let e = Config::load(&Sources {
            file: Some(("f".into(), "[server]\nlisen = \"x\"\n".into())),
            ..Default::default()
        })
        .expect_err("unknown key");
        assert!(e.to_string().contains("lisen"), "{e}");
        let e = Config::load(&Sources {
            flags: vec![("server.role".into(), "api".into())],
            ..Default::default()
        })
        .expect_err("memory with api role");
        assert!(e.to_string().contains("memory"), "{e}");
        let e = Config::load(&Sources {
            env: env(&[("MARATHON_LOG__TRACE_FILTER", "info,[=")]),
            ..Default::default()
        })
        .expect_err("bad trace filter");
        assert!(e.to_string().contains("log.trace_filter"), "{e}");
        for (name, key) in [
            ("MARATHON_LOG", "log.filter"),
            ("MARATHON_LOG__FILTER", "log.filter"),
            ("MARATHON_LOG__TRACE_FILTER", "log.trace_filter"),
        ] {
            let e = Config::load(&Sources {
                env: env(&[(name, "")]),
                ..Default::default()
            })
            .expect_err("an empty filter enables nothing");
            assert_eq!(invalid_path(&e), key, "{e}");
            assert!(e.to_string().contains("empty"), "{e}");
        }
        let off = Config::load(&Sources {
            env: env(&[("MARATHON_LOG", "off")]),
            ..Default::default()
        })
        .expect("off turns logs off on purpose");
        assert_eq!(off.log.filter, "off");
        let ok = Config::load(&Sources {
            env: env(&[("MARATHON_LOG__TRACE_FILTER", "debug")]),
            ..Default::default()
        })
        .expect("a trace filter from the environment");
        assert_eq!(ok.log.trace_filter, "debug");
        // Spaces around a span directive, as the tracing set-up takes them (raw
        // `EnvFilter` read the level of `warn, a[s]=debug` as "=debug").
        for name in ["MARATHON_LOG", "MARATHON_LOG__TRACE_FILTER"] {
            Config::load(&Sources {
                env: env(&[(name, "warn, marathon_core[s]=debug")]),
                ..Default::default()
            })
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// An alias and the full variable name both set to different values are refused,
    /// naming both: before, the one sorting last won silently.
    #[test]
    fn an_alias_and_its_full_name_must_agree() {
        let e = Config::load(&Sources {
            env: env(&[("MARATHON_LOG", "debug"), ("MARATHON_LOG__FILTER", "warn")]),
            ..Default::default()
        })
        .expect_err("two values for log.filter");
        let text = e.to_string();
        assert!(
            text.contains("MARATHON_LOG__FILTER")
                && text.contains("log.filter, as MARATHON_LOG does"),
            "{text}"
        );
        let c = Config::load(&Sources {
            env: env(&[("MARATHON_LOG", "debug"), ("MARATHON_LOG__FILTER", "debug")]),
            ..Default::default()
        })
        .expect("the same value twice");
        assert_eq!(c.log.filter, "debug");
    }

    /// The history limit is read from `engine.max_history_events`; 0, which would fail
    /// every run at its first workflow task, is refused.
    #[test]
    fn the_history_limit_is_read_and_zero_is_refused() {
        let c = Config::load(&flags(&[("engine.max_history_events", "1000")])).expect("valid");
        assert_eq!(c.engine.max_history_events, 1000);
        assert_eq!(
            Config::load(&Sources::default())
                .expect("defaults")
                .engine
                .max_history_events,
            50_000
        );
        let e = Config::load(&flags(&[("engine.max_history_events", "0")])).expect_err("zero");
        assert_eq!(invalid_path(&e), "engine.max_history_events");
    }

    /// A workflow-task deadline of 0 would have every sweep send each owed workflow
    /// task again: it is refused.
    #[test]
    fn a_zero_workflow_task_deadline_is_refused() {
        let e =
            Config::load(&flags(&[("engine.workflow_task_deadline_ms", "0")])).expect_err("zero");
        assert_eq!(invalid_path(&e), "engine.workflow_task_deadline_ms");
    }

    /// With memory backends this process is the only worker: a default task queue it
    /// does not serve, or no sweeper, leaves workflows waiting forever.
    #[test]
    fn memory_backends_refuse_work_no_process_would_do() {
        let e = Config::load(&flags(&[("engine.default_task_queue", "other")]))
            .expect_err("a default task queue no worker serves");
        assert_eq!(invalid_path(&e), "engine.default_task_queue", "{e}");
        assert!(e.to_string().contains("\"other\""), "{e}");
        Config::load(&flags(&[
            ("engine.default_task_queue", "other"),
            ("worker.queues", r#"[{name = "other", concurrency = 4}]"#),
        ]))
        .expect("a default task queue this process serves");
        let e = Config::load(&Sources {
            env: env(&[("MARATHON_WORKER__SWEEPER", "false")]),
            ..Default::default()
        })
        .expect_err("no sweeper on the memory store");
        assert_eq!(invalid_path(&e), "worker.sweeper", "{e}");
    }

    /// Shared backends may be served and swept by other processes.
    #[cfg(all(feature = "redis", feature = "sqs"))]
    #[test]
    fn shared_backends_may_leave_work_to_other_processes() {
        Config::load(&flags(&[
            ("store.kind", "redis"),
            ("queue.kind", "sqs"),
            ("engine.default_task_queue", "other"),
            ("worker.sweeper", "false"),
        ]))
        .expect("another worker may serve the queue and sweep the store");
    }

    fn flags(pairs: &[(&str, &str)]) -> Sources {
        Sources {
            flags: pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
            ..Default::default()
        }
    }

    /// The key a configuration error names (`Invalid` only).
    fn invalid_path(e: &ConfigError) -> &str {
        match e {
            ConfigError::Invalid { path, .. } => path,
            other => panic!("not an invalid value: {other}"),
        }
    }

    /// Redis settings that connect would refuse stop the configuration, naming the key
    /// (exit 2), instead of failing as a backend that cannot connect (exit 1).
    #[cfg(feature = "redis")]
    #[test]
    fn redis_settings_connect_would_refuse_name_their_key() {
        for (key, value) in [
            ("store.url", "notaurl"),
            ("store.url", "http://127.0.0.1:6379"),
            ("store.shards", "0"),
            ("store.key_prefix", "re{vD"),
            ("store.tls_ca_file", "/nonexistent/ca.pem"),
            ("store.retention", "100000000000000000"),
            ("store.response_timeout", "0"),
            (
                "store.cluster_nodes",
                "redis://127.0.0.1:7000,http://127.0.0.1:7001",
            ),
        ] {
            let e = Config::load(&flags(&[("store.kind", "redis"), (key, value)]))
                .expect_err(&format!("{key} = {value:?}"));
            assert_eq!(invalid_path(&e), key, "{e}");
        }
    }

    /// A `[store]` or `[queue]` without `kind` is of the default kind (memory); a key
    /// that kind lacks names the kind that has it.
    #[test]
    fn a_section_without_kind_is_memory_and_foreign_keys_are_refused() {
        let c = Config::load(&flags(&[("queue.max_receives", "3")]))
            .expect("a memory queue setting without queue.kind");
        assert_eq!(
            c.queue,
            QueueConfig::Memory(marathon_core::memory::MemoryQueueConfig { max_receives: 3 })
        );
        let c = Config::load(&Sources {
            file: Some(("f".into(), "[queue]\nmax_receives = 2\n".into())),
            ..Default::default()
        })
        .expect("[queue] without kind");
        assert_eq!(
            c.queue,
            QueueConfig::Memory(marathon_core::memory::MemoryQueueConfig { max_receives: 2 })
        );
        for sources in [
            Sources {
                env: env(&[("MARATHON_STORE__KEY_PREFIX", "prod:")]),
                ..Default::default()
            },
            flags(&[("store.kind", "memory"), ("store.key_prefix", "x")]),
        ] {
            let e = Config::load(&sources).expect_err("a redis setting on the memory store");
            assert_eq!(invalid_path(&e), "store.key_prefix", "{e}");
            assert!(e.to_string().contains("redis store"), "{e}");
            assert!(e.to_string().contains(r#"store.kind = "redis""#), "{e}");
        }
        let e = Config::load(&flags(&[("queue.queue_prefix", "p-")]))
            .expect_err("an sqs setting on the memory queue");
        assert_eq!(invalid_path(&e), "queue.queue_prefix", "{e}");
        assert!(e.to_string().contains(r#"queue.kind = "sqs""#), "{e}");
        let e = Config::load(&flags(&[("store.colour", "blue")])).expect_err("no kind has it");
        assert!(e.to_string().contains("colour"), "{e}");
    }

    /// The chart sets only `store.retention`: the worker then purges closed workflows'
    /// index entries after the same time (their keys expire then).
    #[cfg(feature = "redis")]
    #[test]
    fn worker_retention_defaults_to_the_redis_stores() {
        let day = Duration::from_secs(86_400);
        let c = Config::load(&Sources {
            env: env(&[
                ("MARATHON_STORE__KIND", "redis"),
                ("MARATHON_STORE__RETENTION", "86400000"),
            ]),
            ..Default::default()
        })
        .expect("loads");
        assert_eq!(c.worker.retention, Some(day));
        let shown = c.to_masked_toml();
        assert!(shown.contains("retention_ms = 86400000"), "{shown}");
        let c = Config::load(&flags(&[
            ("store.kind", "redis"),
            ("store.retention", "86400000"),
            ("worker.retention_ms", "3600000"),
        ]))
        .expect("loads");
        assert_eq!(c.worker.retention, Some(Duration::from_secs(3600)));
        let c = Config::load(&flags(&[("store.kind", "redis")])).expect("loads");
        assert_eq!(c.worker.retention, None);
        // The store keeps keys with a retention of 0 (the chart's "keep them"): the
        // worker must not take it as "purge each workflow as it closes".
        let c = Config::load(&Sources {
            env: env(&[
                ("MARATHON_STORE__KIND", "redis"),
                ("MARATHON_STORE__RETENTION", "0"),
            ]),
            ..Default::default()
        })
        .expect("loads");
        assert_eq!(c.worker.retention, None);
    }

    /// An SQS endpoint or queue URL that is not an http(s) URL, a region that is no
    /// region, or a `max_receives` of 0 stops start-up.
    #[cfg(feature = "sqs")]
    #[test]
    fn an_sqs_endpoint_that_is_not_a_url_is_refused() {
        for bad in ["notaurl", "127.0.0.1:4566", "ftp://h:1", "http://"] {
            let e = Config::load(&sqs_flags(&[("queue.endpoint_url", bad)]))
                .expect_err(&format!("endpoint {bad:?}"));
            assert_eq!(invalid_path(&e), "queue.endpoint_url", "{e}");
        }
        Config::load(&sqs_flags(&[(
            "queue.endpoint_url",
            "http://127.0.0.1:4566",
        )]))
        .expect("an http endpoint");
        for bad in ["", " ", "eu west 1", "-eu"] {
            let e = Config::load(&sqs_flags(&[("queue.region", bad)]))
                .expect_err(&format!("region {bad:?}"));
            assert_eq!(invalid_path(&e), "queue.region", "{e}");
        }
        Config::load(&sqs_flags(&[("queue.region", "eu-west-1")])).expect("a region");
        let e = Config::load(&sqs_flags(&[("queue.max_receives", "0")]))
            .expect_err("no receive before the dead-letter queue");
        assert_eq!(invalid_path(&e), "queue.max_receives", "{e}");
        let e = Config::load(&sqs_flags(&[(
            "queue.queue_urls.default",
            "marathon-default",
        )]))
        .expect_err("a queue URL that is a name");
        assert_eq!(invalid_path(&e), "queue.queue_urls.default", "{e}");
        Config::load(&sqs_flags(&[(
            "queue.queue_urls.default",
            "https://sqs.eu-west-1.amazonaws.com/123456789012/marathon-default",
        )]))
        .expect("an https queue URL");
        Config::load(&sqs_flags(&[(
            "queue.endpoint_url",
            "https://sqs.eu-west-1.amazonaws.com",
        )]))
        .expect("an https endpoint");
    }

    /// A `queue.wait_time_ms` outside SQS's long polls of 1 to 20 s stops start-up
    /// (it used to be clamped silently), and so does a `queue.queue_prefix` too long
    /// to leave room for a queue name, whichever queues are used.
    #[cfg(feature = "sqs")]
    #[test]
    fn sqs_settings_sqs_cannot_take_are_refused_not_clamped() {
        for bad in ["0", "999", "20001"] {
            let e = Config::load(&sqs_flags(&[("queue.wait_time_ms", bad)]))
                .expect_err(&format!("wait_time_ms {bad}"));
            assert_eq!(invalid_path(&e), "queue.wait_time_ms", "{e}");
        }
        for good in ["1000", "20000"] {
            Config::load(&sqs_flags(&[("queue.wait_time_ms", good)]))
                .expect("a long poll SQS takes");
        }
        let prefix = "p".repeat(80);
        let e = Config::load(&sqs_flags(&[
            ("queue.queue_prefix", &prefix),
            (
                "queue.queue_urls.default",
                "https://sqs.eu-west-1.amazonaws.com/123456789012/marathon-default",
            ),
        ]))
        .expect_err("a prefix without room for a name");
        assert_eq!(invalid_path(&e), "queue.queue_prefix", "{e}");
    }

    #[test]
    fn worker_queues_without_receivers_or_twice_are_refused() {
        let e = Config::load(&flags(&[(
            "worker.queues",
            r#"[{name = "default", concurrency = 4, receivers = 0}]"#,
        )]))
        .expect_err("no receiver");
        assert_eq!(invalid_path(&e), "worker.queues", "{e}");
        assert!(e.to_string().contains("\"default\""), "{e}");
        assert!(e.to_string().contains("receivers"), "{e}");
        let e = Config::load(&flags(&[(
            "worker.queues",
            r#"[{name = "a", concurrency = 4}, {name = "b", concurrency = 1}, {name = "a", concurrency = 2}]"#,
        )]))
        .expect_err("a queue twice");
        assert_eq!(invalid_path(&e), "worker.queues", "{e}");
        assert!(e.to_string().contains("\"a\""), "{e}");
        let e = Config::load(&flags(&[(
            "worker.queues",
            r#"[{name = "default", concurrency = 9223372036854775807}]"#,
        )]))
        .expect_err("a concurrency the worker's semaphore cannot hold");
        assert_eq!(invalid_path(&e), "worker.queues", "{e}");
        assert!(e.to_string().contains("concurrency"), "{e}");
    }

    /// What `marathon` prints: "invalid configuration" once, the key once.
    #[test]
    fn an_error_says_invalid_configuration_and_its_key_once() {
        let e = Config::load(&flags(&[("store.kind", "bogus")])).expect_err("bogus kind");
        let shown = crate::ServerError::from(e).to_string();
        assert_eq!(shown.matches("invalid configuration").count(), 1, "{shown}");
        assert_eq!(shown.matches("store.kind").count(), 1, "{shown}");
        assert!(!shown.contains('\n'), "{shown}");
        let e = Config::load(&Sources {
            env: env(&[("MARATHON_WORKER__QUEUES", "garbage")]),
            ..Default::default()
        })
        .expect_err("not a list");
        let shown = e.to_string();
        assert!(shown.contains("list"), "{shown}");
        assert!(!shown.contains("section"), "{shown}");
        assert!(shown.contains("[{"), "{shown}");
    }

    /// `KIND_KEYS` lists every setting of each backend's config type.
    #[cfg(all(feature = "redis", feature = "sqs"))]
    #[test]
    fn kind_keys_are_the_backends_settings() {
        let redis = RedisSettings {
            tls_ca_file: Some("ca.pem".into()),
            cluster_nodes: vec!["redis://h:1".into()],
            retention: Some(Duration::from_secs(1)),
            ..Default::default()
        };
        let sqs = SqsSettings {
            region: Some("r".into()),
            endpoint_url: Some("http://h:1".into()),
            ..Default::default()
        };
        for (section, kind, value) in [
            (
                "store",
                "redis",
                toml::Value::try_from(redis).expect("toml"),
            ),
            ("queue", "sqs", toml::Value::try_from(sqs).expect("toml")),
            (
                "queue",
                "memory",
                toml::Value::try_from(marathon_core::memory::MemoryQueueConfig::default())
                    .expect("toml"),
            ),
        ] {
            let listed = KIND_KEYS
                .iter()
                .find(|(s, k, _)| *s == section && *k == kind)
                .map(|(_, _, keys)| keys.to_vec())
                .expect("listed");
            let mut keys: Vec<&str> = value
                .as_table()
                .expect("a table")
                .keys()
                .map(String::as_str)
                .collect();
            keys.sort_unstable();
            let mut listed = listed;
            listed.sort_unstable();
            assert_eq!(keys, listed, "{section} {kind}");
        }
    }

    #[test]
    fn print_masks_secrets() {
        let mut c = Config::default();
        c.server.auth_tokens = vec!["s3cret-token".into()];
        let shown = c.to_masked_toml();
        assert!(!shown.contains("s3cret-token"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
        assert_eq!(masked_url("redis://u:pw@h:1/0"), "redis://u:***@h:1/0");
        assert_eq!(masked_url("redis://pw@h:1"), "redis://***@h:1");
        assert_eq!(masked_url("redis://h:1"), "redis://h:1");
    }
}
