//! In-memory `Store` and `Queue`: single process, no setup; the default backends.
