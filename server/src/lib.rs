//! Marathon's HTTP API (axum) and the `marathon` binary. (Work in progress: see the HTTP server issue.)
