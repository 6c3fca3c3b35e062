//! The `marathon` binary: `marathon serve` and `marathon config print`.

use clap::{Args, Parser, Subcommand};
use marathon_observability::{TelemetryConfig, TelemetryGuard, init_tracing};
use marathon_server::{Config, LogFormat, Role, Server, ServerError, Sources};
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Exit code of a configuration error.
const EXIT_CONFIG: u8 = 2;

/// Exit code when a second SIGINT or SIGTERM cuts the drain short (128 + SIGINT).
const EXIT_FORCED: i32 = 130;

/// Watches SIGINT and SIGTERM from now on. The first cancels the returned token: a
/// server still starting stops, a serving one drains (within its grace, which may be
/// minutes). The second exits at once, without waiting for the drain or flushing
/// spans, for an operator who will not wait. One watcher from before start-up: with
/// a second one installed only once serving, a signal during start-up (a slow backend
/// connect) was taken by the first watcher and missed by the drain's, so the server
/// went on starting and served as if it had none.
#[cfg(unix)]
fn watch_signals() -> CancellationToken {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = CancellationToken::new();
    let first = stop.clone();
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // No handlers to install: the first signal as the library watches for it.
        tokio::spawn(async move {
            marathon_server::shutdown_signal().await;
            first.cancel();
        });
        return stop;
    };
    tokio::spawn(async move {
        for n in 1..=2 {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if n == 1 {
                first.cancel();
            } else {
                tracing::warn!("a second signal: exiting now, without waiting for the drain");
                std::process::exit(EXIT_FORCED);
            }
        }
    });
    stop
}

/// The first Ctrl-C cancels the returned token; see the Unix version.
#[cfg(not(unix))]
fn watch_signals() -> CancellationToken {
    let stop = CancellationToken::new();
    let first = stop.clone();
    tokio::spawn(async move {
        marathon_server::shutdown_signal().await;
        first.cancel();
    });
    stop
}

#[derive(Parser)]
#[command(
    name = "marathon",
    version,
    about = "Marathon: durable workflows for AI agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the HTTP API, workers and the timer sweeper (see --role).
    Serve(ConfigArgs),
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Prints the effective configuration as TOML, secrets masked.
    Print(ConfigArgs),
}

/// Flags shared by every command that reads the configuration; they win over
/// the environment, which wins over the file.
#[derive(Args)]
struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "MARATHON_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on (`server.listen`; env MARATHON_LISTEN). Default 127.0.0.1:8080.
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// What to run (`server.role`; env MARATHON_ROLE). Default all.
    #[arg(long, value_enum)]
    role: Option<Role>,
    /// Store backend (`store.kind`): memory or redis.
    #[arg(long, value_name = "KIND")]
    store: Option<String>,
    /// Queue backend (`queue.kind`): memory or sqs.
    #[arg(long, value_name = "KIND")]
    queue: Option<String>,
    /// Log format (`log.format`).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Log filter (`log.filter`; env MARATHON_LOG), e.g. `info,marathon_core=debug`.
    #[arg(long, value_name = "FILTER")]
    log_filter: Option<String>,
    /// Any key: `--set engine.cache_capacity=100` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
}

impl ConfigArgs {
    fn load(&self) -> Result<Config, ServerError> {
        let mut flags = Vec::new();
        let mut push = |k: &str, v: Option<String>| {
            if let Some(v) = v {
                flags.push((k.to_string(), v));
            }
        };
        push("server.listen", self.listen.clone());
        push("server.role", self.role.map(|r| r.as_str().to_string()));
        push("store.kind", self.store.clone());
        push("queue.kind", self.queue.clone());
        push(
            "log.format",
            self.log_format.map(|f| match f {
                LogFormat::Text => "text".to_string(),
                LogFormat::Json => "json".to_string(),
            }),
        );
        push("log.filter", self.log_filter.clone());
        for s in &self.sets {
            let Some((k, v)) = s.split_once('=') else {
                return Err(ServerError::Config(format!(
                    "--set {s:?}: expected KEY=VALUE, e.g. --set server.body_limit=2097152"
                )));
            };
            flags.push((k.trim().to_string(), v.to_string()));
        }
        let sources = Sources::from_process(self.config.as_deref(), flags)?;
        Ok(Config::load(&sources)?)
    }
}

fn init_telemetry(cfg: &Config) -> Result<TelemetryGuard, ServerError> {
    init_tracing(&TelemetryConfig {
        log_format: match cfg.log.format {
            LogFormat::Text => marathon_observability::LogFormat::Text,
            LogFormat::Json => marathon_observability::LogFormat::Json,
        },
        log_filter: cfg.log.filter.clone(),
        trace_filter: cfg.log.trace_filter.clone(),
        ..TelemetryConfig::default()
    })
    .map_err(|e| ServerError::Config(format!("log/tracing: {e}")))
}

fn fail(e: &ServerError) -> ExitCode {
    eprintln!("marathon: {e}");
    match e {
        ServerError::Config(_) => ExitCode::from(EXIT_CONFIG),
        _ => ExitCode::FAILURE,
    }
}

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Config {
            command: ConfigCommand::Print(args),
        } => match args.load() {
            Ok(cfg) => {
                print!("{}", cfg.to_masked_toml());
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        },
        Command::Serve(args) => {
            let cfg = match args.load() {
                Ok(c) => c,
                Err(e) => return fail(&e),
            };
            let telemetry = match init_telemetry(&cfg) {
                Ok(t) => t,
                Err(e) => return fail(&e),
            };
            let stop = watch_signals();
            let run = async {
                let server = tokio::select! {
                    built = Server::builder().builtins().config(cfg).build() => built?,
                    () = stop.cancelled() => {
                        tracing::info!("a signal during start-up: stopping before serving");
                        return Ok(());
                    }
                };
                server.serve_until(stop.cancelled_owned()).await
            };
            let code = match run.await {
                Ok(()) => {
                    tracing::info!("stopped");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    tracing::error!(error = %e, "marathon failed");
                    fail(&e)
                }
            };
            // Flushes buffered spans, within the exporter's shutdown timeout.
            telemetry.shutdown();
            code
        }
    }
}
