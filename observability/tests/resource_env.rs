//! The resource Marathon exports under the standard `OTEL_*` resource
//! variables (each case runs in a child process, as the variables are read from the
//! process environment), and trace ids in JSON logs.
#![cfg(feature = "otel")]
#![allow(missing_docs)]

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use marathon_observability::{LogFormat, TelemetryConfig, tracing_dispatch};
use prost::Message as _;

/// An OTLP/HTTP receiver recording each request's resource attributes (values as text).
/// The resource attributes of each request received, values as text.
type Seen = Arc<Mutex<Vec<BTreeMap<String, String>>>>;

fn resource_receiver() -> (u16, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let out = seen.clone();
    let port = common::serve(move |req| {
        let msg =
            opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest::decode(
                req.body.as_slice(),
            )
            .expect("OTLP protobuf");
        for rs in msg.resource_spans {
            let attrs = rs
                .resource
                .map(|r| {
                    r.attributes
                        .into_iter()
                        .map(|a| {
                            use opentelemetry_proto::tonic::common::v1::any_value::Value;
                            let v = match a.value.and_then(|v| v.value) {
                                Some(Value::StringValue(s)) => s,
                                other => format!("{other:?}"),
                            };
                            (a.key, v)
                        })
                        .collect()
                })
                .unwrap_or_default();
            out.lock().unwrap().push(attrs);
        }
        (200, "application/x-protobuf", Vec::new())
    });
    (port, seen)
}

/// Runs in a child only: exports one span with `service_name` = `marathon-config` in
/// the config, and prints the resource the collector received.
#[test]
fn child_prints_the_exported_resource() {
    if std::env::var("MARATHON_TEST_CHILD").is_err() {
        return;
    }
    let (port, seen) = resource_receiver();
    let cfg = TelemetryConfig {
        otlp_endpoint: Some(format!("http://127.0.0.1:{port}")),
        service_name: "marathon-config".into(),
        ..TelemetryConfig::default()
    };
    let (dispatch, guard) = tracing_dispatch(&cfg, std::io::sink).unwrap();
    tracing::dispatcher::with_default(&dispatch, || {
        let _s = tracing::info_span!("probe").entered();
    });
    guard.shutdown();
    let seen = seen.lock().unwrap();
    let attrs = seen.first().expect("one export");
    println!("RESOURCE={}", serde_json::to_string(attrs).unwrap());
}

/// The resource a child exporting under `vars` sent.
fn exported_resource(vars: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "child_prints_the_exported_resource",
        "--nocapture",
    ]);
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("MARATHON_TEST_CHILD", "1");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESOURCE="))
        .unwrap_or_else(|| panic!("no resource printed: {stdout}"));
    serde_json::from_str(line).unwrap()
}

/// Spec (resource SDK, `OTEL_SERVICE_NAME`): "If `service.name` is also provided in
/// `OTEL_RESOURCE_ATTRIBUTES`, then `OTEL_SERVICE_NAME` takes precedence."
#[test]
fn otel_service_name_wins_over_service_name_in_resource_attributes() {
    let r = exported_resource(&[
        ("OTEL_SERVICE_NAME", "from-service-name"),
        (
            "OTEL_RESOURCE_ATTRIBUTES",
            "service.name=from-attributes,deployment.environment=prod",
        ),
    ]);
    assert_eq!(
        r.get("service.name").map(String::as_str),
        Some("from-service-name"),
        "{r:?}"
    );
}

/// Spec: `OTEL_RESOURCE_ATTRIBUTES` values are percent-encoded (W3C Baggage) and must
/// be decoded.
#[test]
fn resource_attribute_values_are_percent_decoded() {
    let r = exported_resource(&[(
        "OTEL_RESOURCE_ATTRIBUTES",
        "service.name=billing%20api,deployment.environment=eu%2Cwest",
    )]);
    assert_eq!(
        r.get("service.name").map(String::as_str),
        Some("billing api"),
        "{r:?}"
    );
    assert_eq!(
        r.get("deployment.environment").map(String::as_str),
        Some("eu,west"),
        "{r:?}"
    );
}

/// Another key that merely ends in `service.name=` does not name the service: the
/// configured default (`service_name`) must still apply.
#[test]
fn a_key_ending_in_service_name_keeps_the_configured_default() {
    let r = exported_resource(&[(
        "OTEL_RESOURCE_ATTRIBUTES",
        "app.service.name=web,deployment.environment=prod",
    )]);
    assert_eq!(
        r.get("service.name").map(String::as_str),
        Some("marathon-config"),
        "{r:?}"
    );
}

/// `service.name = billing` (spaces around `=`, which the SDK trims) names the service:
/// the configured default must not replace it.
#[test]
fn service_name_with_spaces_in_resource_attributes_is_kept() {
    let r = exported_resource(&[("OTEL_RESOURCE_ATTRIBUTES", "service.name = billing")]);
    assert_eq!(
        r.get("service.name").map(String::as_str),
        Some("billing"),
        "{r:?}"
    );
}

/// Logs captured in memory.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

/// docs/OBSERVABILITY.md: JSON lines carry `trace_id` and `span_id` "when the event
/// happened inside an exported span". With logs at `debug` and traces at `info` (the
/// separate filters the docs advertise), an event inside a debug span that is itself
/// inside an exported request span has no `trace_id`, so it cannot be joined to its trace.
#[test]
fn json_logs_in_a_debug_span_inside_an_exported_span_carry_the_trace_id() {
    let (port, _seen) = resource_receiver();
    let logs = Captured::default();
    let cfg = TelemetryConfig {
        log_format: LogFormat::Json,
        log_filter: "debug".into(),
        trace_filter: "info".into(),
        otlp_endpoint: Some(format!("http://127.0.0.1:{port}")),
        shutdown_timeout: Duration::from_secs(5),
        ..TelemetryConfig::default()
    };
    let (dispatch, guard) = tracing_dispatch(&cfg, logs.clone()).unwrap();
    tracing::dispatcher::with_default(&dispatch, || {
        let _req = tracing::info_span!("http.request").entered();
        tracing::info!("in the request span");
        let _inner = tracing::debug_span!("parse_body").entered();
        tracing::info!("in a debug span under it");
    });
    guard.shutdown();
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let line = |msg: &str| {
        lines
            .iter()
            .find(|l| l["fields"]["message"] == msg)
            .unwrap_or_else(|| panic!("no line {msg:?}: {text}"))
            .clone()
    };
    let outer = line("in the request span");
    let inner = line("in a debug span under it");
    assert!(outer.get("trace_id").is_some(), "{outer}");
    assert_eq!(inner.get("trace_id"), outer.get("trace_id"), "{inner}");
}

/// Runs in a child only: what `tracing_dispatch` makes of the environment, printed as
/// `RESULT=exporting`, `RESULT=off` or `RESULT=error: ...`.
#[test]
fn child_prints_the_setup_result() {
    if std::env::var("MARATHON_TEST_CHILD").is_err() {
        return;
    }
    let cfg = TelemetryConfig {
        otlp_endpoint: Some(format!("http://127.0.0.1:{}", common::free_port())),
        shutdown_timeout: Duration::from_millis(200),
        ..TelemetryConfig::default()
    };
    match tracing_dispatch(&cfg, std::io::sink) {
        Ok((_, guard)) if guard.exporting() => println!("RESULT=exporting"),
        Ok(_) => println!("RESULT=off"),
        Err(e) => println!("RESULT=error: {e}"),
    }
}

fn setup_result(vars: &[(&str, &str)]) -> String {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "child_prints_the_setup_result", "--nocapture"]);
    for (k, _) in std::env::vars() {
        if k.starts_with("OTEL_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("MARATHON_TEST_CHILD", "1");
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT="))
        .unwrap_or_else(|| panic!("no result: {stdout}"))
        .to_string()
}

/// `OTEL_TRACES_EXPORTER` names the exporter (`otlp`, `console`, `zipkin`, `none`):
/// a value this build does not have must not silently turn into OTLP export (the docs
/// reject unknown samplers, protocols and compressions for the same reason).
#[test]
fn an_unsupported_traces_exporter_is_not_silently_otlp() {
    assert_eq!(setup_result(&[]), "exporting");
    assert_eq!(
        setup_result(&[("OTEL_TRACES_EXPORTER", "otlp")]),
        "exporting"
    );
    assert_eq!(setup_result(&[("OTEL_TRACES_EXPORTER", "none")]), "off");
    assert_eq!(setup_result(&[("OTEL_TRACES_EXPORTER", " none ")]), "off");
    for value in ["console", "zipkin", "jaeger", "nonee"] {
        let r = setup_result(&[("OTEL_TRACES_EXPORTER", value)]);
        assert!(
            r != "exporting",
            "OTEL_TRACES_EXPORTER={value}: spans are exported over OTLP anyway"
        );
    }
}

/// With logs at `debug` and traces at `info` (separate filters, as the docs advertise),
/// a workflow started from inside a `debug` span that is itself inside the exported
/// request span must still carry the request's trace: `Engine::start` asks the observer
/// for the current `traceparent`, and a `None` there starts the workflow in a trace of
/// its own, cut off from the request that started it.
#[test]
fn trace_context_inside_a_logged_only_span_is_the_exported_parents() {
    use marathon_core::Observer as _;
    let (port, _seen) = resource_receiver();
    let cfg = TelemetryConfig {
        log_filter: "debug".into(),
        trace_filter: "info".into(),
        otlp_endpoint: Some(format!("http://127.0.0.1:{port}")),
        shutdown_timeout: Duration::from_secs(5),
        ..TelemetryConfig::default()
    };
    let (dispatch, guard) = tracing_dispatch(&cfg, std::io::sink).unwrap();
    let metrics = marathon_observability::Metrics::new().unwrap();
    let (outer, inner) = tracing::dispatcher::with_default(&dispatch, || {
        let _req = tracing::info_span!("http.request").entered();
        let outer = metrics.trace_context();
        let _handler = tracing::debug_span!("handler").entered();
        (outer, metrics.trace_context())
    });
    guard.shutdown();
    let outer = outer.expect("the request span has a traceparent");
    let inner =
        inner.unwrap_or_else(|| panic!("no traceparent inside the debug span (request: {outer})"));
    assert_eq!(inner[3..35], outer[3..35], "same trace: {inner} vs {outer}");
}
