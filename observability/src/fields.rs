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
        let mut check = Simple(true);
        fields.record(&mut check);
        if !check.0 {
            return self.fallback.format_fields(writer, fields);
        }
        let mut out = Plain {
            writer: &mut writer,
            empty: true,
            result: Ok(()),
        };
        fields.record(&mut out);
        out.result
    }
}

/// Whether every field is one [`Plain`] writes as [`DefaultFields`] would.
struct Simple(bool);

/// Whether `DefaultFields` writes `s` (as `{:?}`) as `"s"`: printable ASCII without
/// quotes or backslashes.
fn plain_str(s: &str) -> bool {
    s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
}

/// Field names the default formatter treats specially.
fn special(field: &Field) -> bool {
    let name = field.name();
    name == "message" || name.starts_with("r#") || name.starts_with("log.")
}

impl Visit for Simple {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0 &= !special(field) && plain_str(value);
    }
    fn record_u64(&mut self, field: &Field, _: u64) {
        self.0 &= !special(field);
    }
    fn record_i64(&mut self, field: &Field, _: i64) {
        self.0 &= !special(field);
    }
    fn record_bool(&mut self, field: &Field, _: bool) {
        self.0 &= !special(field);
    }
    fn record_debug(&mut self, _: &Field, _: &dyn fmt::Debug) {
        self.0 = false;
    }
}

/// Writes simple fields as `name=value`, space-separated.
struct Plain<'a, 'w> {
    writer: &'a mut Writer<'w>,
    empty: bool,
    result: fmt::Result,
}

impl Plain<'_, '_> {
    fn name(&mut self, field: &Field) {
        if self.result.is_err() {
            return;
        }
        if !std::mem::take(&mut self.empty) {
            self.result = self.writer.write_char(' ');
        }
        self.result = self
            .result
            .and_then(|()| self.writer.write_str(field.name()))
            .and_then(|()| self.writer.write_char('='));
    }
}

impl Visit for Plain<'_, '_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.name(field);
        self.result = self
            .result
            .and_then(|()| self.writer.write_char('"'))
            .and_then(|()| self.writer.write_str(value))
            .and_then(|()| self.writer.write_char('"'));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.name(field);
        self.result = self.result.and_then(|()| write!(self.writer, "{value}"));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.name(field);
        self.result = self.result.and_then(|()| write!(self.writer, "{value}"));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.name(field);
        let text = if value { "true" } else { "false" };
        self.result = self.result.and_then(|()| self.writer.write_str(text));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        // Never reached: `Simple` sent such records to the default formatter.
        self.name(field);
        self.result = self.result.and_then(|()| write!(self.writer, "{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::fmt::MakeWriter;
    use tracing_subscriber::fmt::format::DefaultFields;

    use super::PlainFields;

    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Buf {
        type Writer = Buf;
        fn make_writer(&'a self) -> Buf {
            self.clone()
        }
    }

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
            let err = std::io::Error::other("disk full");
            tracing::warn!(error = &err as &(dyn std::error::Error + 'static), "failed");
            tracing::info!(message = "explicit", empty = "", "ignored");
        });
        String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn writes_exactly_what_the_default_format_writes() {
        let ours = log_lines(PlainFields::default());
        let theirs = log_lines(DefaultFields::new());
        assert_eq!(ours, theirs);
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
