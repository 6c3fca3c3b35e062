//! [`PlainFields`]: tracing-subscriber's default text field format, written without
//! `core::fmt` where the output is the same.
//!
//! The log layer formats the fields of every span when it is created and again on
//! every `record`, whether or not anything is ever logged inside it: with a few spans
//! per workflow task that is a measurable share of the engine's CPU. For the usual
//! fields (plain strings, integers, booleans) this writes exactly what
//! [`DefaultFields`] writes without colours; anything else (messages, errors, `Debug`
//! values, strings that need escaping) goes to [`DefaultFields`] itself.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};

/// Default text fields (`name=value`, strings quoted), fast for simple values.
#[derive(Debug, Default)]
pub(crate) struct PlainFields {
    fallback: DefaultFields,
}

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        // Colours change the output; leave them to the default formatter.
        if writer.has_ansi_escapes() {
            return self.fallback.format_fields(writer, fields);
        }
        // One pass into a buffer on the stack, handed over in one write: the span's
        // field text starts as an empty `String`, which writing field by field grows by
        // doubling from 8 bytes: four or five allocations for a task span's 50–90 bytes.
        let mut out = Plain {
            buf: [0; CAPACITY],
            len: 0,
            simple: true,
        };
        fields.record(&mut out);
        match out.text() {
            Some(text) => writer.write_str(text),
            None => self.fallback.format_fields(writer, fields),
        }
    }
}

/// The longest field text written through the stack buffer; longer goes to the
/// default formatter (same output).
const CAPACITY: usize = 384;

/// Whether `DefaultFields` writes `s` (as `{:?}`) as `"s"`: printable ASCII without
/// quotes or backslashes.
///
/// Every byte is looked at, without stopping at the first bad one: the loop then has no
/// early exit and the compiler checks many bytes per instruction (a workflow id is 36).
fn plain_str(s: &str) -> bool {
    s.bytes().fold(true, |ok, b| {
        ok & (0x20..0x7f).contains(&b) & (b != b'"') & (b != b'\\')
    })
}

/// Field names the default formatter treats specially.
fn special(field: &Field) -> bool {
    let name = field.name();
    name == "message" || name.starts_with("r#") || name.starts_with("log.")
}

/// Simple fields as `name=value`, space-separated, into a fixed buffer; `simple`
/// turns false on a field [`DefaultFields`] writes differently, or when it is full.
struct Plain {
    buf: [u8; CAPACITY],
    len: usize,
    simple: bool,
}

impl Plain {
    fn push(&mut self, bytes: &[u8]) {
        match self.buf.get_mut(self.len..self.len + bytes.len()) {
            Some(dst) => {
                dst.copy_from_slice(bytes);
                self.len += bytes.len();
            }
            None => self.simple = false,
        }
    }

    /// Starts a field: `false` (and nothing written) when it cannot be written here.
    fn name(&mut self, field: &Field) -> bool {
        self.simple &= !special(field);
        if !self.simple {
            return false;
        }
        if self.len > 0 {
            self.push(b" ");
        }
        self.push(field.name().as_bytes());
        self.push(b"=");
        self.simple
    }

    fn decimal(&mut self, mut v: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }

    /// The text, when every field was simple and it fitted.
    fn text(&self) -> Option<&str> {
        if !self.simple {
            return None;
        }
        // Only whole UTF-8 strings and ASCII were copied in.
        std::str::from_utf8(&self.buf[..self.len]).ok()
    }
}

impl Visit for Plain {
    fn record_str(&mut self, field: &Field, value: &str) {
        if !plain_str(value) {
            self.simple = false;
        }
        if self.name(field) {
            self.push(b"\"");
            self.push(value.as_bytes());
            self.push(b"\"");
        }
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        if self.name(field) {
            self.decimal(value);
        }
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        if self.name(field) {
            if value < 0 {
                self.push(b"-");
            }
            self.decimal(value.unsigned_abs());
        }
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        if self.name(field) {
            self.push(if value { b"true" } else { b"false" });
        }
    }
    fn record_debug(&mut self, _: &Field, _: &dyn fmt::Debug) {
        // Messages, errors, `Debug` and `Display` values: the default formatter's.
        self.simple = false;
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::fmt::format::DefaultFields;

    use super::{CAPACITY, PlainFields};
    use crate::test_support::Buf;

    /// Spans and events with every kind of field, as log lines.
    fn log_lines<N>(fields: N) -> String
    where
        N: for<'w> tracing_subscriber::fmt::FormatFields<'w> + Send + Sync + 'static,
    {
        let buf = Buf::default();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .without_time()
            .fmt_fields(fields)
            .with_writer(buf.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let outer = tracing::info_span!(
                "marathon.activity",
                workflow_id = "0193a5f2-7f4e-7c3a-9d1e-2b3c4d5e6f70",
                activity = "noop",
                activity_id = 3u32,
                attempt = 1u32,
                delta = -4i64,
                retry = true,
                outcome = tracing::field::Empty,
            );
            let _o = outer.enter();
            tracing::info!("plain message");
            outer.record("outcome", "completed");
            tracing::info!(n = 7u64, ok = false, "after a record");
            let inner = tracing::info_span!(
                "inner",
                quoted = "say \"hi\"",
                slash = "a\\b",
                newline = "a\nb",
                unicode = "café",
                debug = ?vec![1, 2],
                display = %"shown",
                float = 1.5f64,
                r#type = "raw",
            );
            let _i = inner.enter();
            let long = "x".repeat(CAPACITY + 10);
            let edges = tracing::info_span!(
                "edges",
                big = u64::MAX,
                small = i64::MIN,
                zero = 0u64,
                long = long.as_str(),
            );
            let _e = edges.enter();
            tracing::info!(fits = 1u64, "in a span too long for the buffer");
            drop(_e);
            let short = tracing::info_span!("edges", big = u64::MAX, small = i64::MIN, zero = 0i64);
            let _s = short.enter();
            tracing::info!("numbers at their limits");
            drop(_s);
            let err = std::io::Error::other("disk full");
            tracing::warn!(error = &err as &(dyn std::error::Error + 'static), "failed");
            tracing::info!(message = "explicit", empty = "", "ignored");
        });
        buf.text()
    }

    #[test]
    fn writes_exactly_what_the_default_format_writes() {
        let ours = log_lines(PlainFields::default());
        let theirs = log_lines(DefaultFields::new());
        assert_eq!(ours, theirs);
        assert!(
            ours.contains("edges{big=18446744073709551615 small=-9223372036854775808 zero=0}"),
            "{ours}"
        );
        // The fast path was taken for the simple span (its fields, unquoted numbers).
        assert!(
            ours.contains(
                "marathon.activity{workflow_id=\"0193a5f2-7f4e-7c3a-9d1e-2b3c4d5e6f70\" \
                 activity=\"noop\" activity_id=3 attempt=1 delta=-4 retry=true \
                 outcome=\"completed\"}"
            ),
            "{ours}"
        );
    }
}
