//! Marathon's HTTP API (axum) and the `marathon` binary.
//!
//! Users with their own workflows and activities embed the server in their own binary:
//!
//! ```no_run
//! use marathon_core::{ActivityContext, ActivityError, WorkflowContext, WorkflowError};
//! use marathon_server::{Config, Server};
//! use serde_json::Value;
//!
//! # async fn run() -> Result<(), marathon_server::ServerError> {
//! Server::builder()
//!     .activity("greet", |_ctx: ActivityContext, name: String| async move {
//!         Ok::<_, ActivityError>(format!("hello, {name}"))
//!     })
//!     .workflow("hello", |ctx: WorkflowContext, name: String| async move {
//!         ctx.activity::<_, Value>("greet", &name).await
//!     })
//!     .config(Config::default())
//!     .serve()
//!     .await
//! # }
//! ```
//!
//! [`ServerBuilder::build`] gives a [`Server`] whose [`Server::router`] is the
//! axum app, for tests that `oneshot` it.

pub mod api;
pub mod backends;
pub mod builtins;
pub mod config;

use axum::Router;
use marathon_core::{
    ActivityContext, ActivityError, Engine, Queue, Registry, Store, Worker, WorkflowContext,
    WorkflowError,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::{Config, ConfigError, LogFormat, QueueConfig, Role, Sources, StoreConfig};

/// Errors of building and running a server.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A backend could not be connected.
    #[error("cannot connect a backend: {0}")]
    Backend(String),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP server failed.
    #[error("http server failed: {0}")]
    Io(#[from] std::io::Error),
}

impl From<ConfigError> for ServerError {
    fn from(e: ConfigError) -> Self {
        ServerError::Config(e.to_string())
    }
}

/// Checks a workflow's input when it is started through the API; `Err` is a 400's message.
pub type StartValidator = Arc<dyn Fn(&Value, &Registry) -> Result<(), String> + Send + Sync>;

/// Builds a [`Server`]: workflows, activities, configuration and, optionally, backends.
#[must_use]
pub struct ServerBuilder {
    registry: Registry,
    validators: HashMap<String, StartValidator>,
    config: Config,
    store: Option<Arc<dyn Store>>,
    queue: Option<Arc<dyn Queue>>,
}

impl ServerBuilder {
    /// Registers workflow `name`; see [`Registry::workflow`].
    pub fn workflow<I, O, F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(WorkflowContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, WorkflowError>> + Send + 'static,
    {
        self.registry.workflow(name, f);
        self
    }

    /// Registers activity `name`; see [`Registry::activity`].
    pub fn activity<I, O, F, Fut>(mut self, name: impl Into<String>, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(ActivityContext, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, ActivityError>> + Send + 'static,
    {
        self.registry.activity(name, f);
        self
    }

    /// Registers the built-in demo workflows and activities (see [`builtins`]).
    pub fn builtins(mut self) -> Self {
        builtins::register(&mut self.registry);
        self.validators.insert(
            "pipeline".into(),
            Arc::new(builtins::validate_pipeline_input),
        );
        self
    }

    /// Checks the input of workflow `name` when the API starts it (a 400 on `Err`),
    /// beyond its type, which the engine checks for every workflow registered with one.
    pub fn validator(
        mut self,
        name: impl Into<String>,
        check: impl Fn(&Value, &Registry) -> Result<(), String> + Send + Sync + 'static,
    ) -> Self {
        self.validators.insert(name.into(), Arc::new(check));
        self
    }

    /// Uses `config` (default: [`Config::default`]).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self
    }

    /// Uses `store` instead of the one `[store]` names.
    pub fn store(mut self, store: Arc<dyn Store>) -> Self {
        self.store = Some(store);
        self
    }

    /// Uses `queue` instead of the one `[queue]` names.
    pub fn queue(mut self, queue: Arc<dyn Queue>) -> Self {
        self.queue = Some(queue);
        self
    }

    /// Validates the configuration, connects the backends and builds the engine.
    ///
    /// # Errors
    /// [`ServerError::Config`], [`ServerError::Backend`].
    pub async fn build(self) -> Result<Server, ServerError> {
        self.config.validate()?;
        let (store, store_backend) = match self.store {
            Some(s) => (s, "custom"),
            None => (
                backends::store(&self.config.store).await?,
                self.config.store.backend_name(),
            ),
        };
        let (queue, queue_backend) = match self.queue {
            Some(q) => (q, "custom"),
            None => (
                backends::queue(&self.config).await?,
                self.config.queue.backend_name(),
            ),
        };
        let metrics = Arc::new(
            marathon_observability::Metrics::new()
                .map_err(|e| ServerError::Config(format!("metrics: {e}")))?,
        );
        let store =
            marathon_observability::InstrumentedStore::boxed(store, store_backend, &metrics);
        let queue =
            marathon_observability::InstrumentedQueue::boxed(queue, queue_backend, &metrics);
        let engine = Engine::builder()
            .store(store)
            .queue(queue)
            .observer(metrics.clone())
            .config(self.config.engine.clone())
            .registry(self.registry)
            .build();
        Ok(Server {
            engine,
            metrics,
            config: Arc::new(self.config),
            validators: Arc::new(self.validators),
            shutdown: CancellationToken::new(),
        })
    }

    /// Builds the server and serves until SIGTERM or SIGINT; see [`Server::serve`].
    ///
    /// # Errors
    /// See [`ServerBuilder::build`] and [`Server::serve`].
    pub async fn serve(self) -> Result<(), ServerError> {
        self.build().await?.serve().await
    }

    /// Builds the server and returns its axum app (no worker runs).
    ///
    /// # Errors
    /// See [`ServerBuilder::build`].
    pub async fn router(self) -> Result<Router, ServerError> {
        Ok(self.build().await?.router())
    }
}

/// A built server: the engine, its configuration and the HTTP app.
pub struct Server {
    engine: Engine,
    metrics: Arc<marathon_observability::Metrics>,
    config: Arc<Config>,
    validators: Arc<HashMap<String, StartValidator>>,
    shutdown: CancellationToken,
}

impl Server {
    /// A builder with no workflows, the default configuration and in-memory backends.
    pub fn builder() -> ServerBuilder {
        ServerBuilder {
            registry: Registry::new(),
            validators: HashMap::new(),
            config: Config::default(),
            store: None,
            queue: None,
        }
    }

    /// The engine (to start workers in tests, or to call it directly).
    #[must_use]
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The configuration in force.
    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Cancelling this token begins shutdown: SSE streams and long polls end.
    #[must_use]
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// The axum app of this server's role (no worker is started).
    pub fn router(&self) -> Router {
        api::router(api::AppState {
            engine: self.engine.clone(),
            metrics: self.metrics.clone(),
            config: self.config.clone(),
            validators: self.validators.clone(),
            shutdown: self.shutdown.clone(),
        })
    }

    /// Binds `[server] listen` and serves until SIGTERM or SIGINT; see [`Server::serve_on`].
    ///
    /// # Errors
    /// [`ServerError::Bind`], [`ServerError::Io`].
    pub async fn serve(self) -> Result<(), ServerError> {
        self.serve_until(shutdown_signal()).await
    }

    /// Binds `[server] listen` and serves until `signal` completes; see
    /// [`Server::serve_on`]. For a caller that watches signals itself from before
    /// the server is built (as `marathon serve` does), so that none is lost.
    ///
    /// # Errors
    /// [`ServerError::Bind`], [`ServerError::Io`].
    pub async fn serve_until(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let addr = self.config.server.listen.clone();
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|source| ServerError::Bind { addr, source })?;
        self.serve_on(listener, signal).await
    }

    /// Serves on `listener` (and runs workers when the role says so) until `signal`
    /// completes or the shutdown token is cancelled; then stops accepting, ends SSE
    /// streams and long polls, drains in-flight requests within `[server]
    /// shutdown_grace_ms` (closing the connections of those still running then) and
    /// stops workers with [`Worker::shutdown`].
    ///
    /// # Errors
    /// [`ServerError::Io`] when the HTTP server fails.
    pub async fn serve_on(
        self,
        listener: TcpListener,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServerError> {
        let role = self.config.server.role;
        let addr = listener.local_addr().ok();
        let worker = role
            .runs_worker()
            .then(|| Worker::start(self.engine.clone(), self.config.worker.clone()));
        let token = self.shutdown.clone();
        let on_signal = token.clone();
        tokio::spawn(async move {
            signal.await;
            on_signal.cancel();
        });
        let app = self.router();
        let stop = token.clone();
        let header_timeout = self.config.server.header_read_timeout;
        let mut http = tokio::spawn(serve_http(listener, app, header_timeout, stop));
        let addr = addr.map_or_else(|| "?".to_string(), |a| a.to_string());
        tracing::info!(%addr, role = role.as_str(), "marathon serving");
        let early = tokio::select! {
            r = &mut http => Some(r),
            () = token.cancelled() => None,
        };
        token.cancel();
        tracing::info!("shutting down");
        let grace = self.config.server.shutdown_grace;
        let drain = async {
            match early {
                Some(r) => r,
                None => match tokio::time::timeout(grace, &mut http).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(
                            ?grace,
                            "requests still running after the grace period; closing them"
                        );
                        http.abort();
                        Ok(Ok(()))
                    }
                },
            }
        };
        let stop_workers = async {
            if let Some(w) = worker {
                let report = w.shutdown().await;
                tracing::info!(
                    finished = report.finished,
                    handed_back = report.handed_back,
                    "workers stopped"
                );
            }
        };
        let (served, ()) = tokio::join!(drain, stop_workers);
        match served {
            Ok(r) => r.map_err(ServerError::Io),
            Err(e) => Err(ServerError::Io(std::io::Error::other(e))),
        }
    }
}

/// Serves HTTP/1 connections from `listener` until `stop`, then waits for the
/// open ones to finish their requests. Unlike `axum::serve`, a connection that
/// does not send a request's headers within `header_timeout` (a stalled client,
/// an idle keep-alive connection) is closed, so stalled clients cannot pile up
/// connections and tasks. Dropping the future (as [`Server::serve_on`] does when
/// the shutdown grace runs out) closes every connection still open.
async fn serve_http(
    listener: TcpListener,
    app: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    // The connections' tasks: dropped with this future, they are aborted, so requests
    // still running past the shutdown grace are closed rather than left running.
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                // A connection reset before it was accepted: only that one is lost.
                Err(e) if matches!(
                    e.kind(),
                    std::io::ErrorKind::ConnectionRefused
                        | std::io::ErrorKind::ConnectionAborted
                        | std::io::ErrorKind::ConnectionReset
                ) => continue,
                Err(e) => {
                    // Out of descriptors, say: keep serving the open connections and
                    // try again in a second (as axum::serve does), without spinning
                    // or flooding the log.
                    tracing::error!(error = %e, "accepting a connection failed; trying again in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let conn = http1.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
        let conn = graceful.watch(conn);
        // Reap the tasks of connections that have closed since the last accept.
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection closed with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
}
