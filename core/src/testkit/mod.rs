//! The conformance suites every `Store` and `Queue` backend runs unchanged.
