//! Logs and traces: [`init_tracing`] installs a `tracing` subscriber that writes
//! human-readable or JSON logs and, with the `otel` feature, exports spans over OTLP.

use std::io::IsTerminal;
use std::time::Duration;

use marathon_core::{Task, TaskScope};
use serde::{Deserialize, Serialize};

use crate::filter::LogFilter;
#[cfg(feature = "otel")]
use tracing_subscriber::Layer as _;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One human-readable line per event. The default.
    #[default]
    Text,
    /// One JSON object per line, with `trace_id` and `span_id` when a span is exported.
    Json,
}

/// Logging and tracing settings; plain data, no I/O. The OTLP exporter itself is
/// configured by the standard `OTEL_*` environment variables.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Log line format. Default [`LogFormat::Text`].
    pub log_format: LogFormat,
    /// Which events and spans to log, in `RUST_LOG` syntax (`info,marathon_core=debug`).
    /// Default `info`.
    pub log_filter: String,
    /// Which spans (and events, as span events) to export over OTLP, in the same syntax,
    /// independently of `log_filter`. Default `info`: the request and task spans.
    pub trace_filter: String,
    /// OTLP/HTTP base URL (`http://127.0.0.1:4318`; `/v1/traces` is appended), overriding
    /// `OTEL_EXPORTER_OTLP_ENDPOINT`. Default none: export only when
    /// `OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set.
    /// Needs the `otel` feature.
    pub otlp_endpoint: Option<String>,
    /// `service.name` when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES`
    /// names one. Default `marathon`.
    pub service_name: String,
    /// Longest the guard's shutdown waits for spans to be flushed. Default 5 s.
    #[serde(with = "millis", rename = "shutdown_timeout_ms")]
    pub shutdown_timeout: Duration,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info".to_string(),
            trace_filter: "info".to_string(),
            otlp_endpoint: None,
            service_name: "marathon".to_string(),
            shutdown_timeout: Duration::from_secs(5),
        }
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// Errors of [`init_tracing`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TelemetryError {
    /// `log_filter` is not a valid filter.
    #[error("invalid log filter {filter:?}: {source}")]
    Filter {
        /// The filter given.
        filter: String,
        /// Why it was rejected.
        #[source]
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was installed before.
    #[error("a global tracing subscriber is already installed")]
    AlreadyInstalled(#[from] tracing::subscriber::SetGlobalDefaultError),
    /// The OTLP exporter could not be set up: an invalid endpoint, header, timeout,
    /// or an unsupported protocol or compression.
    #[cfg(feature = "otel")]
    #[error("invalid OTLP exporter setting {setting}: {reason}")]
    Exporter {
        /// The setting at fault: `otlp_endpoint` or an `OTEL_EXPORTER_OTLP_*` variable.
        setting: String,
        /// What is wrong with it.
        reason: String,
    },
    /// `OTEL_TRACES_SAMPLER` names a sampler this build does not have, or a ratio
    /// sampler's `OTEL_TRACES_SAMPLER_ARG` is missing or not a number from 0 to 1. (The
    /// SDK would sample everything instead, without a word.)
    #[cfg(feature = "otel")]
    #[error("invalid trace sampler setting {setting}: {reason}")]
    Sampler {
        /// The variable at fault: `OTEL_TRACES_SAMPLER` or `OTEL_TRACES_SAMPLER_ARG`.
        setting: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// Keeps the span exporter alive; dropping it (or [`TelemetryGuard::shutdown`]) flushes
/// buffered spans, waiting at most the configured shutdown timeout.
#[must_use = "dropping the guard stops exporting spans"]
pub struct TelemetryGuard {
    #[cfg(feature = "otel")]
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
    #[cfg_attr(
        not(feature = "otel"),
        expect(dead_code, reason = "used by the exporter only")
    )]
    timeout: Duration,
}

impl std::fmt::Debug for TelemetryGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryGuard")
            .field("exporting", &self.exporting())
            .finish_non_exhaustive()
    }
}

impl TelemetryGuard {
    /// Whether spans are exported over OTLP.
    #[must_use]
    pub fn exporting(&self) -> bool {
        #[cfg(feature = "otel")]
        return self.provider.is_some();
        #[cfg(not(feature = "otel"))]
        false
    }

    /// Sends buffered spans now, without stopping (blocking; call it from a blocking context).
    pub fn flush(&self) {
        #[cfg(feature = "otel")]
        if let Some(p) = &self.provider
            && let Err(e) = p.force_flush()
        {
            tracing::warn!(error = %e, "flushing spans failed");
        }
    }

    /// Flushes buffered spans and stops exporting, waiting at most the configured timeout.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        #[cfg(feature = "otel")]
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown_with_timeout(self.timeout)
        {
            // The subscriber may be gone by now: stderr is the one place left.
            eprintln!("marathon: flushing spans at shutdown failed: {e}");
        }
    }
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the global `tracing` subscriber: logs to stdout as configured and, with the
/// `otel` feature and an OTLP endpoint configured (see [`TelemetryConfig::otlp_endpoint`]),
/// spans exported over OTLP/HTTP (protobuf) through a batch processor on its own thread,
/// so a slow or absent collector never delays a workflow (spans beyond its queue are dropped).
///
/// The exporter follows the standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT`,
/// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS`,
/// `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
/// `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*`; `OTEL_SDK_DISABLED=true`
/// or `OTEL_TRACES_EXPORTER=none` turn exporting off.
///
/// # Errors
/// An invalid filter, an invalid endpoint, or a subscriber installed before.
pub fn init_tracing(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    let (dispatch, guard) = tracing_dispatch(config, std::io::stdout)?;
    tracing::dispatcher::set_global_default(dispatch)?;
    // Setting the global default does not revisit callsites already hit (cached as
    // uninteresting while no subscriber was set, or while the dispatch was being built).
    tracing::callsite::rebuild_interest_cache();
    #[cfg(not(feature = "otel"))]
    {
        // Set and not blank, as the `otel` build reads these variables.
        let is_set = |k: &str| std::env::var(k).is_ok_and(|v| !v.trim().is_empty());
        if let Some(setting) = ignored_export_setting(config, is_set) {
            tracing::warn!(
                setting,
                "traces are not exported: this build has no `otel` feature (build with --features otel)"
            );
        }
    }
    Ok(guard)
}

/// The setting that asks for span export, if any: `otlp_endpoint` or an
/// `OTEL_EXPORTER_OTLP_*ENDPOINT` variable (`is_set` tells which variables are set). A
/// build without the `otel` feature warns about it instead of ignoring it silently.
#[cfg_attr(
    all(feature = "otel", not(test)),
    expect(dead_code, reason = "only a build without otel warns")
)]
fn ignored_export_setting(
    config: &TelemetryConfig,
    is_set: impl Fn(&str) -> bool,
) -> Option<&'static str> {
    if config.otlp_endpoint.is_some() {
        return Some("otlp_endpoint");
    }
    [
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ]
    .into_iter()
    .find(|k| is_set(k))
}

/// What [`init_tracing`] installs, without installing it: the subscriber writing logs to
/// `writer`, and its guard. For tests and for embedding (`tracing::dispatcher::set_default`).
///
/// # Errors
/// An invalid filter or endpoint.
pub fn tracing_dispatch<W>(
    config: &TelemetryConfig,
    writer: W,
) -> Result<(tracing::Dispatch, TelemetryGuard), TelemetryError>
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let parse = |filter: &str| {
        LogFilter::parse(filter).map_err(|source| TelemetryError::Filter {
            filter: filter.to_string(),
            source,
        })
    };
    let log_filter = parse(&config.log_filter)?;
    // Checked whether or not spans are exported: a bad `trace_filter` must not wait to
    // stop start-up until the day an OTLP endpoint is configured.
    let trace_filter = parse(&config.trace_filter)?;
    #[cfg(feature = "otel")]
    {
        let provider = otel::provider(config)?;
        let guard = TelemetryGuard {
            provider: provider.clone(),
            timeout: config.shutdown_timeout,
        };
        let registry = tracing_subscriber::registry();
        let dispatch = match provider {
            None => tracing::Dispatch::new(
                registry
                    .with(log_filter.into_layer())
                    .with(log_layer(config.log_format, writer)),
            ),
            // One filter for both layers when they would filter alike: per-layer filters
            // cost about 17 k instructions per W3 workflow (docs/OBSERVABILITY.md).
            Some(p)
                if !otel::untraced_spans()
                    && config.log_filter.trim() == config.trace_filter.trim() =>
            {
                tracing::Dispatch::new(
                    // The OpenTelemetry layer outermost: every outgoing `traceparent`
                    // and parent link finds it by downcasting the subscriber, which
                    // asks each layer from the outside in (downcasts took 2.7 k
                    // instructions per W3 workflow with the boxed log layer first, 1.2 k
                    // now; docs/BENCHMARKS.md).
                    registry
                        .with(log_filter.into_layer())
                        .with(log_layer(config.log_format, writer))
                        .with(otel::layer(&p)),
                )
            }
            // One filter per layer: logs follow `log_filter`, exported spans
            // `trace_filter`, so quiet logs (`warn`) do not silence traces and verbose
            // logs do not flood them; untraced task spans never reach the exporter.
            Some(p) => {
                let trace_filter = trace_filter
                    .without(marathon_core::observe::UNTRACED_TARGET)
                    .map_err(|source| TelemetryError::Filter {
                        filter: config.trace_filter.clone(),
                        source,
                    })?;
                tracing::Dispatch::new(
                    // The OpenTelemetry layer outermost, as above.
                    registry
                        .with(
                            log_layer(config.log_format, writer)
                                .with_filter(log_filter.into_filter()),
                        )
                        .with(otel::layer(&p).with_filter(trace_filter.into_filter())),
                )
            }
        };
        Ok((dispatch, guard))
    }
    #[cfg(not(feature = "otel"))]
    {
        // Not used without exporting.
        drop(trace_filter);
        let subscriber = tracing_subscriber::registry()
            .with(log_filter.into_layer())
            .with(log_layer(config.log_format, writer));
        let guard = TelemetryGuard {
            timeout: config.shutdown_timeout,
        };
        Ok((tracing::Dispatch::new(subscriber), guard))
    }
}

/// The fmt layer, boxed so that both formats have one type.
fn log_layer<S, W>(
    format: LogFormat,
    writer: W,
) -> Box<dyn tracing_subscriber::Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    match format {
        // Colours only on a terminal: escape codes cost on every span and mean nothing in a file.
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_ansi(std::io::stdout().is_terminal())
                .fmt_fields(crate::fields::PlainFields::default())
                .with_writer(writer),
        ),
        LogFormat::Json => Box::new(json::layer(writer)),
    }
}

/// How a task runs (see [`marathon_core::Observer::task_scope`]): with the `otel`
/// feature, in a span that is a child of the W3C `traceparent` its message carried.
///
/// When that context is not sampled and the sampler follows the parent and may decline
/// (`parentbased_traceidratio`), the span is one the trace exporter leaves out
/// ([`marathon_core::observe::untraced_task_span`]), since nothing under it would be
/// exported anyway, and the task runs with the unsampled context current: that context
/// then travels on in the messages the task sends, and spans opened inside it (the
/// activity's own) are its unsampled children rather than new traces.
///
/// The header is parsed once here, for both.
pub(crate) fn task_scope(task: &Task, trace_context: Option<&str>) -> TaskScope {
    #[cfg(feature = "otel")]
    if let Some(sc) = trace_context.and_then(otel::parse_traceparent) {
        if !sc.is_sampled() && otel::untraced_spans() {
            use opentelemetry::context::FutureExt as _;
            let cx = otel::remote_context(sc);
            return TaskScope::wrapped(
                marathon_core::observe::untraced_task_span(task),
                move |work| Box::pin(work.with_context(cx)),
            );
        }
        let span = marathon_core::observe::task_span(task);
        otel::set_parent_context(&span, sc);
        return TaskScope::new(span);
    }
    #[cfg(not(feature = "otel"))]
    let _ = trace_context;
    TaskScope::new(marathon_core::observe::task_span(task))
}

/// Makes `span` (an incoming request's span, not yet entered) a child of the W3C
/// `traceparent` header the caller sent, so that the caller's trace continues through
/// the request into the workflows it starts. An invalid header is ignored (the span
/// stays a root), as is everything without the `otel` feature.
pub fn continue_trace(span: &tracing::Span, traceparent: &str) {
    #[cfg(feature = "otel")]
    otel::set_parent(span, traceparent);
    #[cfg(not(feature = "otel"))]
    let _ = (span, traceparent);
}

/// Adds to the current span a link to the span the W3C `traceparent` names (see
/// [`marathon_core::Observer::link`]); an invalid header, or no `otel` feature, adds none.
pub(crate) fn link_current(traceparent: &str) {
    #[cfg(feature = "otel")]
    if let Some(sc) = otel::parse_traceparent(traceparent) {
        tracing_opentelemetry::OpenTelemetrySpanExt::add_link(&tracing::Span::current(), sc);
    }
    #[cfg(not(feature = "otel"))]
    let _ = traceparent;
}

/// The W3C `traceparent` of the current span, when spans are exported.
pub(crate) fn current_trace_context() -> Option<String> {
    #[cfg(feature = "otel")]
    return otel::current_traceparent();
    #[cfg(not(feature = "otel"))]
    None
}

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::{TelemetryConfig, TelemetryError};

    fn env(name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.trim().is_empty())
    }

    /// The tracer provider, or `None` when exporting is not configured or turned off.
    pub(super) fn provider(
        config: &TelemetryConfig,
    ) -> Result<Option<SdkTracerProvider>, TelemetryError> {
        let disabled = env("OTEL_SDK_DISABLED")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
            || env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim().eq_ignore_ascii_case("none"));
        if disabled {
            return Ok(None);
        }
        // `otlp` is the one exporter this build has: `console`, `zipkin` or a typo must
        // not turn into OTLP export without a word.
        if let Some(v) = env("OTEL_TRACES_EXPORTER")
            && !v.split(',').all(|e| e.trim().eq_ignore_ascii_case("otlp"))
        {
            return Err(TelemetryError::Exporter {
                setting: "OTEL_TRACES_EXPORTER".into(),
                reason: format!("{v:?}: this build exports over `otlp` only (or `none`)"),
            });
        }
        let Some(settings) = crate::otlp::Settings::resolve(config.otlp_endpoint.as_deref(), env)?
        else {
            return Ok(None);
        };
        check_sampler(
            env("OTEL_TRACES_SAMPLER").as_deref(),
            env("OTEL_TRACES_SAMPLER_ARG").as_deref(),
        )?;
        let exporter = crate::otlp::OtlpExporter::new(settings)?;
        // The SDK's detectors read OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES, but
        // neither percent-decode the values nor let OTEL_SERVICE_NAME win over a
        // `service.name` in the attributes, as the specification asks: both are applied
        // again here, decoded, and the service named by OTEL_SERVICE_NAME, else by the
        // attributes, else by the config.
        let mut attributes = Vec::new();
        let mut named_in_attributes = None;
        if let Some(list) = env("OTEL_RESOURCE_ATTRIBUTES") {
            for pair in list.split(',').filter(|p| !p.trim().is_empty()) {
                let invalid = |reason: String| TelemetryError::Exporter {
                    setting: "OTEL_RESOURCE_ATTRIBUTES".into(),
                    reason,
                };
                let (k, v) = pair
                    .split_once('=')
                    .map(|(k, v)| (k.trim(), v.trim()))
                    .filter(|(k, _)| !k.is_empty())
                    .ok_or_else(|| invalid(format!("{pair:?} is not key=value")))?;
                let v = crate::otlp::percent_decode(v)
                    .ok_or_else(|| invalid(format!("{pair:?}: bad percent-encoding")))?;
                if k == "service.name" {
                    named_in_attributes = Some(v.clone());
                }
                attributes.push(opentelemetry::KeyValue::new(k.to_string(), v));
            }
        }
        let service = env("OTEL_SERVICE_NAME")
            .map(|s| s.trim().to_string())
            .or(named_in_attributes)
            .unwrap_or_else(|| config.service_name.clone());
        let resource = opentelemetry_sdk::Resource::builder()
            .with_attributes(attributes)
            .with_service_name(service);
        // The sampler comes from OTEL_TRACES_SAMPLER / _ARG (the SDK's default config);
        // the batch processor runs on its own thread and drops (and counts) spans when
        // its queue is full.
        let processor = crate::batch::BatchProcessor::new(
            exporter,
            crate::batch::BatchSettings::from_env(env)?,
        )?;
        Ok(Some(
            SdkTracerProvider::builder()
                .with_span_processor(processor)
                .with_resource(resource.build())
                .build(),
        ))
    }

    /// Samplers the SDK builds from `OTEL_TRACES_SAMPLER`, spelled as it matches them.
    const SAMPLERS: [&str; 6] = [
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ];

    /// Rejects a sampler setting the SDK would quietly replace by sampling every trace:
    /// an unknown or unsupported name (`jaeger_remote`, `xray`), or a ratio sampler
    /// without a ratio from 0 to 1 in `OTEL_TRACES_SAMPLER_ARG`. Unset means the SDK's
    /// default, `parentbased_always_on`.
    pub(super) fn check_sampler(
        sampler: Option<&str>,
        arg: Option<&str>,
    ) -> Result<(), TelemetryError> {
        let Some(sampler) = sampler else {
            return Ok(());
        };
        if !SAMPLERS.contains(&sampler) {
            return Err(TelemetryError::Sampler {
                setting: "OTEL_TRACES_SAMPLER",
                reason: format!(
                    "{sampler:?} is not one of {} (lowercase, as written)",
                    SAMPLERS.join(", ")
                ),
            });
        }
        if sampler.ends_with("traceidratio") {
            // Parsed as the SDK parses it (no trimming), or it samples everything.
            let ratio = arg.and_then(|a| a.parse::<f64>().ok());
            if !ratio.is_some_and(|r| (0.0..=1.0).contains(&r)) {
                return Err(TelemetryError::Sampler {
                    setting: "OTEL_TRACES_SAMPLER_ARG",
                    reason: format!(
                        "{sampler} needs the share of traces to sample, a number from 0 to 1 (e.g. 0.01); {}",
                        arg.map_or_else(|| "it is not set".to_string(), |a| format!("got {a:?}"))
                    ),
                });
            }
        }
        Ok(())
    }

    pub(super) fn set_parent(span: &tracing::Span, traceparent: &str) {
        if let Some(sc) = parse_traceparent(traceparent) {
            set_parent_context(span, sc);
        }
    }

    pub(super) fn set_parent_context(span: &tracing::Span, sc: SpanContext) {
        // Fails only when no OpenTelemetry layer is installed: then there is nothing to link.
        let _ = span.set_parent(remote_context(sc));
    }

    /// A context whose span is `sc`, received from elsewhere (a message, a caller).
    pub(super) fn remote_context(sc: SpanContext) -> opentelemetry::Context {
        opentelemetry::Context::new().with_remote_span_context(sc)
    }

    pub(super) fn current_traceparent() -> Option<String> {
        // The current span's id is enough: `Span::current()` would take a reference to
        // the span (and release it again through every layer) just to ask this.
        let cx = tracing::dispatcher::get_default(|d| {
            let (id, meta) = d.current_span().into_inner()?;
            // An untraced task's span has no OpenTelemetry context to ask for: asking
            // took `get_otel_context` 4.0 k instructions per W3 workflow at 1 % to find
            // that out (`current_traceparent` 8.1 k -> 5.9 k; docs/BENCHMARKS.md).
            if meta.target() == marathon_core::observe::UNTRACED_TARGET {
                return None;
            }
            tracing_opentelemetry::get_otel_context(&id, d)
                .or_else(|| exported_ancestor_context(&id, d))
        });
        if let Some(cx) = cx {
            let span = cx.span();
            let sc = span.span_context();
            if sc.is_valid() {
                return Some(format_traceparent(sc));
            }
        }
        // An untraced task: the unsampled context it arrived with, made current by
        // its `task_scope`, goes on unchanged.
        let cx = opentelemetry::Context::current();
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid().then(|| format_traceparent(sc))
    }

    /// The OpenTelemetry context of the nearest ancestor of `id` that the exporter's
    /// layer has: a span that is only logged (a `debug` span under `trace_filter =
    /// info`) is in its exported parent's trace. An untraced task's span ends the search.
    fn exported_ancestor_context(
        id: &tracing::span::Id,
        d: &tracing::Dispatch,
    ) -> Option<opentelemetry::Context> {
        use tracing_subscriber::registry::LookupSpan as _;
        let registry = d.downcast_ref::<tracing_subscriber::Registry>()?;
        let span = registry.span(id)?;
        span.scope()
            .skip(1)
            .take_while(|s| s.metadata().target() != marathon_core::observe::UNTRACED_TARGET)
            .find_map(|s| tracing_opentelemetry::get_otel_context(&s.id(), d))
    }

    /// Whether a task whose incoming context is not sampled gets an untraced span
    /// (see [`super::task_scope`]): when the sampler follows the parent's decision and
    /// may decline (`parentbased_traceidratio`, `parentbased_always_off`), so that most
    /// tasks can arrive unsampled. Under the default `parentbased_always_on` only a
    /// caller's unsampled `traceparent` does that, and the SDK's non-recording span
    /// handles it; the subscriber then needs no per-layer filters. Read once from
    /// `OTEL_TRACES_SAMPLER`, as the SDK reads it.
    pub(super) fn untraced_spans() -> bool {
        static UNTRACED: std::sync::LazyLock<bool> =
            std::sync::LazyLock::new(|| untraced_for(env("OTEL_TRACES_SAMPLER").as_deref()));
        *UNTRACED
    }

    /// [`untraced_spans`] for the sampler `OTEL_TRACES_SAMPLER` names.
    pub(super) fn untraced_for(sampler: Option<&str>) -> bool {
        sampler.is_some_and(|s| {
            let s = s.trim().to_ascii_lowercase();
            s.starts_with("parentbased_") && s != "parentbased_always_on"
        })
    }

    /// The OpenTelemetry layer exporting through `provider`'s tracer.
    ///
    /// Per span, only what a trace viewer shows: no source location, thread or `target`
    /// attributes, no busy/idle timing and no OpenTelemetry context attached on every
    /// poll (parents come from the tracing span tree and from the `traceparent` a task
    /// carried). Each of these costs clock reads, locks or allocations on every enter
    /// and exit of a task's span.
    pub(super) fn layer<S>(
        provider: &SdkTracerProvider,
    ) -> tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>
    where
        S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use opentelemetry::trace::TracerProvider as _;
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("marathon"))
            .with_location(false)
            .with_threads(false)
            .with_target(false)
            .with_tracked_inactivity(false)
            .with_context_activation(false)
    }

    /// Each byte's two lowercase hex digits.
    const HEX_PAIRS: [[u8; 2]; 256] = {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut t = [[0; 2]; 256];
        let mut b = 0;
        while b < 256 {
            t[b] = [HEX[b >> 4], HEX[b & 0xf]];
            b += 1;
        }
        t
    };

    /// The W3C `traceparent` header of `sc` (version 00; trace state is not carried).
    /// Written a digit pair at a time from a table: this runs for every message the
    /// engine enqueues. Under callgrind `format!` with padded 128-bit hex cost about
    /// three times as much, and digit by digit 1.45 k more instructions per W3
    /// workflow (about 530 instead of 330 a call).
    pub(super) fn format_traceparent(sc: &SpanContext) -> String {
        fn hex(out: &mut [u8], bytes: &[u8]) {
            for (pair, &b) in out.as_chunks_mut::<2>().0.iter_mut().zip(bytes) {
                *pair = HEX_PAIRS[usize::from(b)];
            }
        }
        let mut buf = *b"00-00000000000000000000000000000000-0000000000000000-00";
        hex(&mut buf[3..35], &sc.trace_id().to_bytes());
        hex(&mut buf[36..52], &sc.span_id().to_bytes());
        hex(
            &mut buf[53..55],
            &[(sc.trace_flags() & TraceFlags::SAMPLED).to_u8()],
        );
        // Only ASCII hex digits and dashes: this never falls back.
        String::from_utf8(buf.to_vec()).unwrap_or_default()
    }

    /// Parses a W3C `traceparent` header as the W3C Trace Context spec reads it:
    /// lowercase hex fields, exactly four of them at version 00, non-zero ids, and only
    /// the sampled flag kept. `None` when it is not one.
    ///
    /// The fields sit at fixed offsets (`vv-<32>-<16>-ff`), so they are read in place
    /// through a digit table: this runs for every task a worker receives, and splitting
    /// on `-` was half of the parse under callgrind (35 M of its 72 M instructions in
    /// one overhead-bench child run, docs/BENCHMARKS.md).
    pub(super) fn parse_traceparent(header: &str) -> Option<SpanContext> {
        /// Each byte's value as a lowercase hex digit, or 0xff.
        const DIGITS: [u8; 256] = {
            let mut t = [0xff; 256];
            let mut c = 0;
            while c < 10 {
                t[b'0' as usize + c] = c as u8;
                c += 1;
            }
            let mut c = 0;
            while c < 6 {
                t[b'a' as usize + c] = 10 + c as u8;
                c += 1;
            }
            t
        };
        fn hex<const N: usize>(s: &[u8]) -> Option<[u8; N]> {
            let mut out = [0u8; N];
            let mut bad = 0u8;
            for (o, &[a, b]) in out.iter_mut().zip(s.as_chunks::<2>().0) {
                let (hi, lo) = (DIGITS[usize::from(a)], DIGITS[usize::from(b)]);
                bad |= hi | lo;
                *o = (hi << 4) | (lo & 0xf);
            }
            (bad & 0xf0 == 0).then_some(out)
        }
        let h = header.trim().as_bytes();
        // Version 00 is exactly 55 bytes; a later version may add `-`-separated fields.
        if h.len() < 55 || h[2] != b'-' || h[35] != b'-' || h[52] != b'-' {
            return None;
        }
        let [version] = hex::<1>(&h[..2])?;
        if version == 0xff || (h.len() > 55 && (version == 0 || h[55] != b'-')) {
            return None;
        }
        let trace_id = TraceId::from_bytes(hex::<16>(&h[3..35])?);
        let span_id = SpanId::from_bytes(hex::<8>(&h[36..52])?);
        let [flags] = hex::<1>(&h[53..55])?;
        let sc = SpanContext::new(
            trace_id,
            span_id,
            TraceFlags::new(flags) & TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        sc.is_valid().then_some(sc)
    }

    /// The OpenTelemetry trace and span ids of `span`, as lowercase hex.
    pub(crate) fn ids(
        id: &tracing::span::Id,
        dispatch: &tracing::Dispatch,
    ) -> Option<(String, String)> {
        let cx = tracing_opentelemetry::get_otel_context(id, dispatch)?;
        let span = cx.span();
        let sc = span.span_context();
        sc.is_valid()
            .then(|| (sc.trace_id().to_string(), sc.span_id().to_string()))
    }
}

mod json {
    //! JSON log lines: tracing-subscriber's JSON format, plus `trace_id` and `span_id`
    //! of the current span when it is exported over OpenTelemetry.

    use std::fmt;
    use std::sync::{Arc, OnceLock};

    use tracing::{Event, Subscriber};
    use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, JsonFields, Writer};
    use tracing_subscriber::fmt::{FmtContext, MakeWriter};
    use tracing_subscriber::layer::{Context, Layer};
    use tracing_subscriber::registry::LookupSpan;

    /// The dispatcher the layer ends up in, needed to ask the OpenTelemetry layer for ids.
    type Slot = Arc<OnceLock<tracing::dispatcher::WeakDispatch>>;

    pub(super) struct JsonWithIds {
        inner: format::Format<format::Json>,
        #[cfg_attr(
            not(feature = "otel"),
            expect(dead_code, reason = "ids come from OpenTelemetry")
        )]
        dispatch: Slot,
    }

    pub(super) struct DispatchSlot<L> {
        inner: L,
        slot: Slot,
    }

    pub(super) fn layer<S, W>(writer: W) -> impl Layer<S> + Send + Sync
    where
        S: Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
        W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
    {
        let slot: Slot = Arc::default();
        let fmt = tracing_subscriber::fmt::layer()
            .fmt_fields(JsonFields::new())
            .event_format(JsonWithIds {
                inner: format::format()
                    .json()
                    .with_current_span(true)
                    .with_span_list(true),
                dispatch: slot.clone(),
            })
            .with_writer(writer);
        DispatchSlot { inner: fmt, slot }
    }

    impl<S: Subscriber, L: Layer<S>> Layer<S> for DispatchSlot<L> {
        fn on_register_dispatch(&self, subscriber: &tracing::Dispatch) {
            let _ = self.slot.set(subscriber.downgrade());
            self.inner.on_register_dispatch(subscriber);
        }
        fn on_layer(&mut self, subscriber: &mut S) {
            self.inner.on_layer(subscriber);
        }
        fn register_callsite(
            &self,
            m: &'static tracing::Metadata<'static>,
        ) -> tracing::subscriber::Interest {
            self.inner.register_callsite(m)
        }
        fn enabled(&self, m: &tracing::Metadata<'_>, cx: Context<'_, S>) -> bool {
            self.inner.enabled(m, cx)
        }
        fn on_new_span(
            &self,
            a: &tracing::span::Attributes<'_>,
            id: &tracing::span::Id,
            cx: Context<'_, S>,
        ) {
            self.inner.on_new_span(a, id, cx);
        }
        fn on_record(
            &self,
            id: &tracing::span::Id,
            v: &tracing::span::Record<'_>,
            cx: Context<'_, S>,
        ) {
            self.inner.on_record(id, v, cx);
        }
        fn on_follows_from(
            &self,
            id: &tracing::span::Id,
            f: &tracing::span::Id,
            cx: Context<'_, S>,
        ) {
            self.inner.on_follows_from(id, f, cx);
        }
        fn on_event(&self, e: &Event<'_>, cx: Context<'_, S>) {
            self.inner.on_event(e, cx);
        }
        fn on_enter(&self, id: &tracing::span::Id, cx: Context<'_, S>) {
            self.inner.on_enter(id, cx);
        }
        fn on_exit(&self, id: &tracing::span::Id, cx: Context<'_, S>) {
            self.inner.on_exit(id, cx);
        }
        fn on_close(&self, id: tracing::span::Id, cx: Context<'_, S>) {
            self.inner.on_close(id, cx);
        }
        fn on_id_change(
            &self,
            old: &tracing::span::Id,
            new: &tracing::span::Id,
            cx: Context<'_, S>,
        ) {
            self.inner.on_id_change(old, new, cx);
        }
    }

    impl<S, N> FormatEvent<S, N> for JsonWithIds
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
        N: for<'a> FormatFields<'a> + 'static,
    {
        fn format_event(
            &self,
            ctx: &FmtContext<'_, S, N>,
            mut writer: Writer<'_>,
            event: &Event<'_>,
        ) -> fmt::Result {
            // Ask for the ids first, holding no span extensions: the OpenTelemetry layer locks them.
            #[cfg(feature = "otel")]
            // The nearest exported span: an event in a span only logged (a `debug` span
            // under `trace_filter = info`) carries the ids of the exported span it is in.
            // An untraced task's span ends the search: it is in no exported trace.
            // Looked up in the registry, not through `ctx`, which sees only the spans
            // this layer's own filter enables: under `log_filter = warn` the exported
            // request and task spans are not logged, and lines lost their ids.
            let ids = self
                .dispatch
                .get()
                .and_then(|d| d.upgrade())
                .and_then(|dispatch| {
                    use tracing_subscriber::registry::LookupSpan as _;
                    let id = if event.is_contextual() {
                        dispatch.current_span().id().cloned()
                    } else {
                        event.parent().cloned()
                    }?;
                    let registry = dispatch.downcast_ref::<tracing_subscriber::Registry>()?;
                    registry
                        .span(&id)?
                        .scope()
                        .take_while(|s| {
                            s.metadata().target() != marathon_core::observe::UNTRACED_TARGET
                        })
                        .find_map(|s| super::otel::ids(&s.id(), &dispatch))
                });
            #[cfg(not(feature = "otel"))]
            let ids: Option<(String, String)> = None;
            let Some((trace_id, span_id)) = ids else {
                return self.inner.format_event(ctx, writer, event);
            };
            let mut line = String::new();
            self.inner
                .format_event(ctx, Writer::new(&mut line), event)?;
            // The ids (hex, nothing to escape) go in before the object's closing brace:
            // the line keeps tracing-subscriber's key order, and is not parsed again
            // (a `serde_json` map sorted the keys, `timestamp` last but for the ids).
            let object = line.trim_end();
            match object.strip_suffix('}') {
                Some(open) if object.starts_with('{') && open.len() > 1 => writeln!(
                    writer,
                    r#"{open},"trace_id":"{trace_id}","span_id":"{span_id}"}}"#
                ),
                _ => writer.write_str(&line),
            }
        }
    }
}

#[cfg(test)]
mod config_tests {
    use super::{TelemetryConfig, TelemetryError, tracing_dispatch};

    /// An invalid `trace_filter` stops start-up also when no spans are exported (it was
    /// read only when exporting with a filter unlike `log_filter`, so a config passed
    /// until an OTLP endpoint was set).
    #[test]
    fn an_invalid_trace_filter_is_an_error_without_exporting() {
        let config = TelemetryConfig {
            trace_filter: "info,marathon=loud".into(),
            ..TelemetryConfig::default()
        };
        match tracing_dispatch(&config, std::io::sink) {
            Err(TelemetryError::Filter { filter, .. }) => assert_eq!(filter, config.trace_filter),
            Err(e) => panic!("another error: {e}"),
            Ok((_, guard)) => panic!("accepted (exporting: {})", guard.exporting()),
        }
    }
}

#[cfg(all(test, feature = "otel"))]
mod tests {
    use std::collections::HashMap;

    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_sdk::propagation::TraceContextPropagator;

    use super::otel::{format_traceparent, parse_traceparent};

    #[test]
    fn export_settings_a_build_without_otel_ignores_are_named() {
        use super::{TelemetryConfig, ignored_export_setting};
        let none = |_: &str| false;
        let cfg = TelemetryConfig::default();
        assert_eq!(ignored_export_setting(&cfg, none), None);
        let set = |k: &str| k == "OTEL_EXPORTER_OTLP_ENDPOINT";
        assert_eq!(
            ignored_export_setting(&cfg, set),
            Some("OTEL_EXPORTER_OTLP_ENDPOINT")
        );
        let cfg = TelemetryConfig {
            otlp_endpoint: Some("http://c:4318".into()),
            ..TelemetryConfig::default()
        };
        assert_eq!(ignored_export_setting(&cfg, none), Some("otlp_endpoint"));
    }

    #[test]
    fn sampler_settings_the_sdk_would_ignore_are_rejected() {
        use super::otel::check_sampler;
        for (sampler, arg) in [
            (None, None),
            (None, Some("junk")),
            (Some("always_on"), None),
            (Some("parentbased_always_off"), Some("ignored")),
            (Some("traceidratio"), Some("0.25")),
            (Some("parentbased_traceidratio"), Some("1")),
            (Some("traceidratio"), Some("0")),
        ] {
            assert!(check_sampler(sampler, arg).is_ok(), "{sampler:?} {arg:?}");
        }
        for (sampler, arg, setting) in [
            (Some("alwayson"), None, "OTEL_TRACES_SAMPLER"),
            (Some("Always_On"), None, "OTEL_TRACES_SAMPLER"),
            (Some("xray"), None, "OTEL_TRACES_SAMPLER"),
            (
                Some("parentbased_jaeger_remote"),
                None,
                "OTEL_TRACES_SAMPLER",
            ),
            (Some("traceidratio"), None, "OTEL_TRACES_SAMPLER_ARG"),
            (
                Some("parentbased_traceidratio"),
                Some("1%"),
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                Some("parentbased_traceidratio"),
                Some("1.5"),
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (
                Some("traceidratio"),
                Some("-0.1"),
                "OTEL_TRACES_SAMPLER_ARG",
            ),
            (Some("traceidratio"), Some("NaN"), "OTEL_TRACES_SAMPLER_ARG"),
            (
                Some("traceidratio"),
                Some(" 0.5"),
                "OTEL_TRACES_SAMPLER_ARG",
            ),
        ] {
            match check_sampler(sampler, arg) {
                Err(super::TelemetryError::Sampler { setting: s, reason }) => {
                    assert_eq!(s, setting, "{sampler:?} {arg:?}: {reason}");
                }
                other => panic!("{sampler:?} {arg:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_task_whose_trace_is_not_sampled_gets_an_untraced_span() {
        use marathon_core::observe::UNTRACED_TARGET;
        use marathon_core::{Task, WorkflowId};
        let task = Task::workflow(WorkflowId::parse("w-1").unwrap());
        let target = |tc: Option<&str>| {
            tracing::subscriber::with_default(tracing_subscriber::registry(), || {
                let scope = super::task_scope(&task, tc);
                // Only an untraced task runs with its context made current.
                let untraced = scope.span.metadata().map(|m| m.target()) == Some(UNTRACED_TARGET);
                assert_eq!(scope.wrap.is_some(), untraced, "{tc:?}");
                scope.span.metadata().map(|m| m.target().to_string())
            })
        };
        let sampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let unsampled = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        // Untraced under a ratio sampler (tests/otel.rs runs one in a child process);
        // under the default one the SDK's non-recording span takes care of it.
        let expected = if super::otel::untraced_spans() {
            UNTRACED_TARGET
        } else {
            "marathon_core::observe"
        };
        assert_eq!(target(Some(unsampled)).as_deref(), Some(expected));
        for (sampler, untraced) in [
            (None, false),
            (Some("parentbased_always_on"), false),
            (Some(" ParentBased_TraceIdRatio "), true),
            (Some("parentbased_always_off"), true),
            (Some("traceidratio"), false),
            (Some("always_on"), false),
        ] {
            assert_eq!(super::otel::untraced_for(sampler), untraced, "{sampler:?}");
        }
        assert_eq!(
            target(Some(sampled)).as_deref(),
            Some("marathon_core::observe")
        );
        assert_eq!(target(None).as_deref(), Some("marathon_core::observe"));
        assert_eq!(
            target(Some("garbage")).as_deref(),
            Some("marathon_core::observe")
        );
    }

    /// What the SDK's own W3C propagator reads from `header`.
    fn sdk_parse(header: &str) -> Option<SpanContext> {
        let carrier = HashMap::from([("traceparent".to_string(), header.to_string())]);
        let cx = TraceContextPropagator::new().extract(&carrier);
        let sc = cx.span().span_context().clone();
        sc.is_valid().then_some(sc)
    }

    #[test]
    fn traceparent_is_written_as_the_sdk_propagator_writes_it() {
        for flags in [TraceFlags::SAMPLED, TraceFlags::default()] {
            let sc = SpanContext::new(
                TraceId::from(0x0af7_6519_16cd_43dd_8448_eb21_1c80_319c_u128),
                SpanId::from(0x00f0_67aa_0ba9_02b7_u64),
                flags,
                false,
                TraceState::default(),
            );
            let mut carrier = HashMap::new();
            TraceContextPropagator::new().inject_context(
                &opentelemetry::Context::new().with_remote_span_context(sc.clone()),
                &mut carrier,
            );
            assert_eq!(Some(&format_traceparent(&sc)), carrier.get("traceparent"));
        }
    }

    #[test]
    fn traceparent_is_read_as_the_sdk_propagator_reads_it() {
        let valid = "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01";
        let cases = [
            valid,
            "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-00",
            // Unknown flags are dropped, only `sampled` is kept.
            "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-ff",
            // A later version may add fields.
            "01-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01-extra",
            "01-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-00",
            "01-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01extra",
            "00_0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01",
            "  00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01  ",
            // Invalid: uppercase, zero ids, version ff, extra field at 00, short fields.
            "00-0AF7651916CD43DD8448EB211C80319C-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "ff-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01",
            "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-01-extra",
            "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7",
            "0af7651916cd43dd8448eb211c80319c",
            "",
            "00-0af7651916cd43dd8448eb211c80319c-00f067aa0ba902b7-0g",
        ];
        for header in cases {
            assert_eq!(parse_traceparent(header), sdk_parse(header), "{header:?}");
        }
        // The spec asks for exactly 32 and 16 hex digits; the SDK pads shorter ids.
        for short in [
            "00-0af7651916cd43dd8448eb211c8031-00f067aa0ba902b7-01",
            "00-0af7651916cd43dd8448eb211c80319c-f067aa0ba902b7-01",
        ] {
            assert_eq!(parse_traceparent(short), None, "{short:?}");
        }
        let sc = parse_traceparent(valid).expect("valid");
        assert!(sc.is_remote() && sc.is_sampled());
        assert_eq!(format_traceparent(&sc), valid);
    }
}
