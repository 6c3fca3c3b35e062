//! Marathon's observability: Prometheus metrics, OpenTelemetry traces and structured logs. (Work in progress: see the observability issue.)
