//! [`LogFilter`]: the subscriber's `RUST_LOG`-style filters, as [`Targets`] when that
//! is enough.
//!
//! `EnvFilter` keeps a map of the spans it has seen, to apply span and field
//! directives (`target[span{field=value}]=level`), and takes a lock on it on every
//! span's creation, entry, exit, record and close, even when no directive needs it:
//! with a workflow task's span entered on every poll, that is a write to a cache line
//! every worker thread shares, many times per task (about 1 % of the traced W3's time
//! under `perf`, and 2 k instructions per workflow). `Targets` reads the same plain
//! `target=level` directives and decides once per callsite.

use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{ParseError, Targets};
use tracing_subscriber::layer::Layer;

/// Checks a `RUST_LOG`-style log or trace filter as [`crate::init_tracing`] reads it
/// (spaces around directives ignored, span and field directives allowed): what is
/// wrong with it, for a configuration check at start-up.
///
/// # Errors
/// The parse error's text, when the tracing set-up would refuse `spec`.
pub fn check_filter(spec: &str) -> Result<(), String> {
    LogFilter::parse(spec).map(drop).map_err(|e| e.to_string())
}

/// A parsed log or trace filter (see the module docs).
#[derive(Debug)]
pub(crate) enum LogFilter {
    /// Only `target=level` and bare-level directives.
    Targets(Box<Targets>),
    /// Directives on spans or fields too.
    Env(Box<EnvFilter>),
    /// Directives on spans or fields, with a target (and the targets under it) off
    /// whatever they say: `EnvFilter` lets a span directive (`[marathon.activity]=debug`)
    /// win over `target=off`.
    #[cfg_attr(
        not(any(feature = "otel", test)),
        expect(dead_code, reason = "only the trace filter turns a target off")
    )]
    EnvExcept(Box<EnvFilter>, &'static str),
}

/// Whether an `off=off` directive turns `target` off: `EnvFilter` and `Targets` match a
/// directive's target as a prefix.
fn is_under(target: &str, off: &str) -> bool {
    target.starts_with(off)
}

impl LogFilter {
    /// Parses `RUST_LOG`-style directives, as `EnvFilter` reads them.
    pub(crate) fn parse(spec: &str) -> Result<LogFilter, ParseError> {
        // Span and field directives, and anything `Targets` does not read, go to
        // `EnvFilter` (which also names what is wrong with an invalid filter).
        let plain = !spec.contains(['[', ']', '{', '}', '"']);
        // Empty directives (`info,`, `a=debug,,info`) are skipped, as `EnvFilter` skips
        // them: `Targets` would read each as a bare `error` level.
        let directives: Vec<&str> = spec
            .split(',')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect();
        let directives = directives.join(",");
        if plain
            && !directives.is_empty()
            && let Ok(targets) = directives.parse::<Targets>()
        {
            return Ok(LogFilter::Targets(Box::new(targets)));
        }
        // Trimmed here too: `EnvFilter` trims a directive but then slices the untrimmed
        // text at the trimmed one's offsets, so `warn, a[span]=debug` was refused (its
        // level read as "=debug") and `warn, a[span]` matched nothing (target " ",
        // span "[spa").
        EnvFilter::try_new(directives).map(|e| LogFilter::Env(Box::new(e)))
    }

    /// The same filter with `target` (and the targets under it) turned off.
    #[cfg(any(feature = "otel", test))]
    pub(crate) fn without(self, target: &'static str) -> Result<LogFilter, ParseError> {
        Ok(match self {
            LogFilter::Targets(t) => LogFilter::Targets(Box::new(
                t.with_target(target, tracing_subscriber::filter::LevelFilter::OFF),
            )),
            // The directive turns the target's callsites off once, where no span
            // directive names them; the target check covers those that one does.
            LogFilter::Env(e) | LogFilter::EnvExcept(e, _) => LogFilter::EnvExcept(
                Box::new(e.add_directive(format!("{target}=off").parse()?)),
                target,
            ),
        })
    }

    /// As a layer filtering everything above it (one filter for every layer).
    pub(crate) fn into_layer<S>(self) -> Box<dyn Layer<S> + Send + Sync>
    where
        S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        match self {
            LogFilter::Targets(t) => t,
            LogFilter::Env(e) => e,
            LogFilter::EnvExcept(e, off) => {
                Box::new(e.and_then(tracing_subscriber::filter::filter_fn(move |m| {
                    !is_under(m.target(), off)
                })))
            }
        }
    }

    /// As one layer's own filter.
    #[cfg(any(feature = "otel", test))]
    pub(crate) fn into_filter<S>(
        self,
    ) -> Box<dyn tracing_subscriber::layer::Filter<S> + Send + Sync>
    where
        S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    {
        use tracing_subscriber::filter::FilterExt as _;
        match self {
            LogFilter::Targets(t) => t,
            LogFilter::Env(e) => e,
            LogFilter::EnvExcept(e, off) => {
                Box::new(e.and(tracing_subscriber::filter::filter_fn(move |m| {
                    !is_under(m.target(), off)
                })))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::{Level, Subscriber};
    use tracing_subscriber::layer::{Context, Layer, SubscriberExt as _};

    use super::LogFilter;

    /// The events and spans that got through, as `target level`.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<String>>>);

    impl<S: Subscriber> Layer<S> for Seen {
        fn on_event(&self, e: &tracing::Event<'_>, _: Context<'_, S>) {
            let m = e.metadata();
            let mut seen = self.0.lock().expect("not poisoned");
            seen.push(format!("event {} {}", m.target(), m.level()));
        }
        fn on_new_span(
            &self,
            a: &tracing::span::Attributes<'_>,
            _: &tracing::span::Id,
            _: Context<'_, S>,
        ) {
            let m = a.metadata();
            let mut seen = self.0.lock().expect("not poisoned");
            seen.push(format!("span {} {}", m.target(), m.level()));
        }
    }

    macro_rules! each_level {
        ($target:literal) => {
            tracing::event!(target: $target, Level::TRACE, "x");
            tracing::event!(target: $target, Level::DEBUG, "x");
            tracing::event!(target: $target, Level::INFO, "x");
            tracing::event!(target: $target, Level::WARN, "x");
            tracing::event!(target: $target, Level::ERROR, "x");
            let _ = tracing::span!(target: $target, Level::DEBUG, "s");
            let _ = tracing::span!(target: $target, Level::INFO, "s");
        };
    }

    /// What gets through `filter` of a fixed set of events and spans.
    fn seen(filter: LogFilter) -> Vec<String> {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(filter.into_layer())
            .with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            each_level!("marathon_core::engine");
            each_level!("marathon_core::observe");
            each_level!("marathon::untraced");
            each_level!("marathon_server");
            each_level!("hyper::proto::h1");
            each_level!("other");
        });
        seen.0.lock().expect("not poisoned").clone()
    }

    #[test]
    fn plain_directives_are_read_by_targets_exactly_as_env_filter_reads_them() {
        for spec in [
            "info",
            "warn",
            "trace",
            "off",
            "debug,hyper=warn",
            "marathon_core=debug",
            "marathon=trace,info",
            "info,marathon_core::engine=off",
            "error,marathon_server=4",
            "marathon_core",
            "hyper=off,debug",
        ] {
            let ours = LogFilter::parse(spec).expect("valid");
            assert!(matches!(ours, LogFilter::Targets(_)), "{spec}");
            let env = tracing_subscriber::EnvFilter::try_new(spec).expect("valid");
            let ours = seen(ours);
            assert_eq!(ours.is_empty(), spec == "off", "{spec}: {ours:?}");
            assert_eq!(ours, seen(LogFilter::Env(Box::new(env))), "{spec}");
            // With a target turned off, as for the trace filter.
            let ours = LogFilter::parse(spec)
                .and_then(|f| f.without("marathon::untraced"))
                .expect("valid");
            let env = tracing_subscriber::EnvFilter::try_new(spec).expect("valid");
            let env = LogFilter::Env(Box::new(env))
                .without("marathon::untraced")
                .expect("valid");
            let ours = seen(ours);
            assert!(
                !ours.iter().any(|s| s.contains("marathon::untraced")),
                "{spec}"
            );
            assert_eq!(ours, seen(env), "{spec}");
        }
    }

    /// a trailing or doubled comma (`MARATHON_LOG="info,"`) is an empty
    /// directive, which `EnvFilter` skips; `Targets` reads it as a bare level, `error`
    /// (tracing's `LevelFilter` parses "" as ERROR), silencing every info log and span.
    #[test]
    fn an_empty_directive_is_read_as_env_filter_reads_it() {
        for spec in ["info,", "warn,,marathon_core=debug", ",info"] {
            let ours = LogFilter::parse(spec).expect("valid");
            let env = tracing_subscriber::EnvFilter::try_new(spec).expect("valid");
            assert_eq!(seen(ours), seen(LogFilter::Env(Box::new(env))), "{spec}");
        }
    }

    /// `info, marathon_core=debug` (a space after the comma, as people write
    /// lists) is accepted, and its second directive silently matches nothing (target
    /// " marathon_core"): it must either apply or be refused.
    #[test]
    fn a_space_after_a_comma_is_not_silently_ignored() {
        let spec = "warn, marathon_core=debug";
        if let Ok(f) = LogFilter::parse(spec) {
            let seen = seen(f);
            assert!(
                seen.iter()
                    .any(|s| s == "event marathon_core::engine DEBUG"),
                "{spec}: accepted, but marathon_core debug is off: {seen:?}"
            );
        }
    }

    /// What gets through `filter` of debug events inside a span `s` and outside it.
    fn seen_in_span(filter: LogFilter) -> Vec<String> {
        let seen = Seen::default();
        let subscriber = tracing_subscriber::registry()
            .with(filter.into_layer())
            .with(seen.clone());
        tracing::subscriber::with_default(subscriber, || {
            tracing::event!(target: "marathon_core::engine", Level::DEBUG, "outside");
            let s = tracing::span!(target: "marathon_core::engine", Level::INFO, "s", outcome = "failed");
            let _entered = s.enter();
            tracing::event!(target: "marathon_core::engine", Level::DEBUG, "inside");
            tracing::event!(target: "other", Level::DEBUG, "inside");
        });
        seen.0.lock().expect("not poisoned").clone()
    }

    /// Spaces around a span or field directive (`info, marathon_core[s]=debug`) are
    /// ignored as for plain ones: `EnvFilter` itself refused that one (it read the
    /// level as "=debug").
    #[test]
    fn spaces_around_span_and_field_directives_are_ignored() {
        for (spaced, tight) in [
            (
                "warn, marathon_core[s]=debug",
                "warn,marathon_core[s]=debug",
            ),
            (
                " warn , marathon_core[s]=debug ",
                "warn,marathon_core[s]=debug",
            ),
            (
                "warn,  [s{outcome=failed}]=debug",
                "warn,[s{outcome=failed}]=debug",
            ),
        ] {
            let ours = LogFilter::parse(spaced).unwrap_or_else(|e| panic!("{spaced:?}: {e}"));
            assert!(matches!(ours, LogFilter::Env(_)), "{spaced}");
            let want = seen_in_span(LogFilter::parse(tight).expect("valid"));
            assert!(
                want.iter()
                    .any(|s| s == "event marathon_core::engine DEBUG"),
                "{tight}: {want:?}"
            );
            assert_eq!(seen_in_span(ours), want, "{spaced}");
        }
    }

    /// A span directive does not bring back the target the trace filter turns off
    /// (untraced task spans share the traced ones' names): `EnvFilter` lets a dynamic
    /// directive win over `marathon::untraced=off`, so `[s]=debug` exported them.
    #[test]
    fn a_span_directive_does_not_bring_back_a_target_turned_off() {
        for spec in [
            "info,[s]=debug",
            "warn,marathon[s]=debug",
            "info,marathon::untraced[s]=trace",
            "[{outcome=failed}]=debug,info",
        ] {
            let without = || LogFilter::parse(spec).and_then(|f| f.without("marathon::untraced"));
            // As a layer filtering everything above it, and as one layer's own filter
            // (how the trace exporter's is set up).
            let global = seen(without().expect("valid"));
            let own = Seen::default();
            let subscriber = tracing_subscriber::registry().with(
                own.clone()
                    .with_filter(without().expect("valid").into_filter()),
            );
            tracing::subscriber::with_default(subscriber, || {
                each_level!("marathon::untraced");
                each_level!("marathon::untraced::x");
                each_level!("other");
                let s = tracing::span!(target: "marathon::untraced", Level::INFO, "s", outcome = "failed");
                let _entered = s.enter();
            });
            let own = own.0.lock().expect("not poisoned").clone();
            for seen in [&global, &own] {
                assert!(
                    !seen
                        .iter()
                        .any(|s| s.contains("marathon::untraced ")
                            || s.contains("marathon::untraced::")),
                    "{spec}: {seen:?}"
                );
            }
            // Other targets still get through.
            assert!(
                own.iter().any(|s| s == "event other ERROR"),
                "{spec}: {own:?}"
            );
        }
    }

    #[test]
    fn span_and_field_directives_go_to_env_filter_and_bad_ones_are_errors() {
        for spec in [
            "info,marathon_core[marathon.activity]=debug",
            "warn,[{outcome=failed}]=trace",
        ] {
            assert!(
                matches!(LogFilter::parse(spec), Ok(LogFilter::Env(_))),
                "{spec}"
            );
        }
        for spec in ["info,marathon=loud", "a=b=c"] {
            assert!(LogFilter::parse(spec).is_err(), "{spec}");
        }
    }
}
