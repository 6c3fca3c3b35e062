#![doc = include_str!("../README.md")]

#[cfg(feature = "otel")]
mod batch;
mod fields;
mod filter;
mod instrumented;
mod metrics;
#[cfg(feature = "otel")]
mod otlp;
mod sharded;
#[cfg(test)]
mod test_support;
mod tracing;

pub use filter::check_filter;
pub use instrumented::{InstrumentedQueue, InstrumentedStore};
pub use metrics::{CONTENT_TYPE, MAX_LLM_LABEL_LEN, MAX_LLM_LABEL_SETS, Metrics, MetricsError};
pub use tracing::{
    LogFormat, TelemetryConfig, TelemetryError, TelemetryGuard, continue_trace, init_tracing,
    tracing_dispatch,
};
