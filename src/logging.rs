//! Logging setup: `tracing` events, filtered by `log.level` or, when set, `RUST_LOG`, go
//! to the systemd journal with structured fields when the process runs under systemd,
//! else to stderr as human-readable lines (colour only on a terminal).
//!
//! Under systemd: when stderr is the journal's stream (`JOURNAL_STREAM` names stderr's
//! device and inode, as `systemd.exec(5)` sets it), each event is sent natively to
//! journald through `systemd-journal-logger`. That crate speaks the `log` facade, not
//! `tracing`, so [`JournalLayer`] bridges: it turns an event and the fields of its spans
//! into a `log::Record` whose key-values the crate writes as journal fields (upper case:
//! `request_id` → `REQUEST_ID`, `station` → `STATION`, `terminal`, `intent_id`...).
//! `journalctl -u pointgate REQUEST_ID=...` then finds one charge's story. The level
//! becomes the journal priority; `SYSLOG_IDENTIFIER=pointgate`.
//!
//! Invariants: a field's value is written as the event gave it; nothing here adds data
//! (callers never log a secret: the access token has no `Display`/`Debug` that shows
//! it). An event's own field wins over a span's field of the same name.

use std::fmt::{self, Write as _};
use std::io::IsTerminal;

use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record as SpanRecord};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::EnvFilter;

/// The journal's `SYSLOG_IDENTIFIER` (`journalctl -t pointgate`).
pub const SYSLOG_IDENTIFIER: &str = "pointgate";

/// Where the log goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sink {
    Journal,
    Stderr,
}

/// Installs the global subscriber. `level` is a tracing filter (`info`,
/// `pointgate=debug,info`); a non-empty `RUST_LOG` replaces it. Returns where the log
/// goes. Calling it again does nothing: the first subscriber stays.
pub fn init(level: &str) -> Sink {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, rust_log_refused) = choose_filter(level, rust_log.as_deref());

    let mut journal_error = None;
    if systemd_journal_logger::connected_to_journal() {
        match systemd_journal_logger::JournalLog::new() {
            Ok(journal) => {
                let journal = journal.with_syslog_identifier(SYSLOG_IDENTIFIER.to_string());
                let installed = tracing_subscriber::registry()
                    .with(filter)
                    .with(JournalLayer::new(journal))
                    .try_init()
                    .is_ok();
                if installed && rust_log_refused {
                    tracing::warn!("RUST_LOG is not a valid filter: using log.level instead");
                }
                return Sink::Journal;
            }
            // No journald socket (a container): stderr still reaches the journal.
            Err(e) => journal_error = Some(e),
        }
    }

    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init()
        .is_ok();
    if installed && rust_log_refused {
        tracing::warn!("RUST_LOG is not a valid filter: using log.level instead");
    }
    if let Some(e) = journal_error {
        tracing::warn!(error = %e, "cannot reach journald: logging to stderr");
    }
    Sink::Stderr
}

/// The filter in force: `RUST_LOG` when set, non-empty and valid, else `level`, else
/// `info`. The flag is true when a set `RUST_LOG` was refused.
fn choose_filter(level: &str, rust_log: Option<&str>) -> (EnvFilter, bool) {
    let mut refused = false;
    if let Some(rust_log) = rust_log.filter(|s| !s.trim().is_empty()) {
        match EnvFilter::try_new(rust_log) {
            Ok(filter) => return (filter, false),
            Err(_) => refused = true,
        }
    }
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    (filter, refused)
}

/// A `tracing` layer that hands every event, with the fields of its spans, to a `log`
/// logger as one record: the message (followed by ` key=value` pairs, for a readable
/// `journalctl` line) and every field as a record key-value. With
/// `systemd_journal_logger::JournalLog` as the logger, the key-values become journal
/// fields.
pub struct JournalLayer<L> {
    logger: L,
}

impl<L: log::Log> JournalLayer<L> {
    pub fn new(logger: L) -> Self {
        JournalLayer { logger }
    }
}

/// The fields recorded on a span, kept in its extensions.
struct SpanFields(Vec<(&'static str, String)>);

/// Collects an event's or a span's fields as text; `message` apart.
#[derive(Default)]
struct Fields {
    message: Option<String>,
    pairs: Vec<(&'static str, String)>,
}

impl Fields {
    fn set(&mut self, key: &'static str, value: String) {
        if key == "message" {
            self.message = Some(value);
        } else if let Some(slot) = self.pairs.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            self.pairs.push((key, value));
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.set(field.name(), value.to_string());
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.set(field.name(), format!("{value:?}"));
    }
}

/// Merges `from` into `into`; `from` wins on a shared key.
fn merge(into: &mut Vec<(&'static str, String)>, from: &[(&'static str, String)]) {
    for (k, v) in from {
        match into.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.clone(),
            None => into.push((k, v.clone())),
        }
    }
}

/// The journal field a tracing field becomes (after the journal logger upper-cases it)
/// must not be one the logger writes itself: those names get a `FIELD_` prefix.
fn field_key(key: &'static str) -> String {
    const RESERVED: &[&str] = &[
        "MESSAGE",
        "PRIORITY",
        "SYSLOG_PID",
        "SYSLOG_IDENTIFIER",
        "CODE_FILE",
        "CODE_LINE",
        "CODE_MODULE",
        "TARGET",
    ];
    if RESERVED.contains(&key.to_ascii_uppercase().as_str()) {
        format!("field_{key}")
    } else {
        key.to_string()
    }
}

fn log_level(level: &Level) -> log::Level {
    match *level {
        Level::ERROR => log::Level::Error,
        Level::WARN => log::Level::Warn,
        Level::INFO => log::Level::Info,
        Level::DEBUG => log::Level::Debug,
        Level::TRACE => log::Level::Trace,
    }
}

impl<S, L> Layer<S> for JournalLayer<L>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    L: log::Log + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        attrs.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(SpanFields(fields.pairs));
        }
    }

    fn on_record(&self, id: &Id, values: &SpanRecord<'_>, ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        values.record(&mut fields);
        if let Some(span) = ctx.span(id) {
            let mut ext = span.extensions_mut();
            match ext.get_mut::<SpanFields>() {
                Some(existing) => merge(&mut existing.0, &fields.pairs),
                None => ext.insert(SpanFields(fields.pairs)),
            }
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut pairs = Vec::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(f) = span.extensions().get::<SpanFields>() {
                    merge(&mut pairs, &f.0);
                }
            }
        }
        let mut own = Fields::default();
        event.record(&mut own);
        merge(&mut pairs, &own.pairs);

        let mut line = own.message.unwrap_or_default();
        for (k, v) in &pairs {
            let _ = write!(line, " {k}={v}");
        }
        let kvs: Vec<(String, String)> =
            pairs.into_iter().map(|(k, v)| (field_key(k), v)).collect();
        let meta = event.metadata();
        self.logger.log(
            &log::Record::builder()
                .args(format_args!("{line}"))
                .level(log_level(meta.level()))
                .target(meta.target())
                .module_path(meta.module_path())
                .file(meta.file())
                .line(meta.line())
                .key_values(&kvs)
                .build(),
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn rust_log_replaces_the_configured_level() {
        let (filter, refused) = choose_filter("info", Some("pointgate=trace"));
        assert_eq!(filter.to_string(), "pointgate=trace");
        assert!(!refused);
    }

    #[test]
    fn the_configured_level_stands_without_rust_log() {
        assert_eq!(choose_filter("warn", None).0.to_string(), "warn");
        assert_eq!(choose_filter("warn", Some("  ")).0.to_string(), "warn");
    }

    #[test]
    fn an_invalid_rust_log_falls_back_to_the_level_and_says_so() {
        let (filter, refused) = choose_filter("debug", Some("pointgate=loud"));
        assert_eq!(filter.to_string(), "debug");
        assert!(refused);
    }

    #[test]
    fn an_invalid_level_falls_back_to_info() {
        assert_eq!(choose_filter("x=loud", None).0.to_string(), "info");
    }

    /// One record as the journal logger would receive it.
    #[derive(Debug, Clone)]
    struct Captured {
        level: log::Level,
        message: String,
        fields: Vec<(String, String)>,
    }

    impl Captured {
        fn field(&self, key: &str) -> Option<&str> {
            self.fields
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        }
    }

    /// A `log::Log` that keeps records, in the journal logger's place.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<Captured>>>);

    struct KvCollect<'a>(&'a mut Vec<(String, String)>);

    impl<'kvs> log::kv::VisitSource<'kvs> for KvCollect<'_> {
        fn visit_pair(
            &mut self,
            key: log::kv::Key<'kvs>,
            value: log::kv::Value<'kvs>,
        ) -> Result<(), log::kv::Error> {
            self.0.push((key.as_str().to_string(), value.to_string()));
            Ok(())
        }
    }

    impl log::Log for Capture {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, record: &log::Record<'_>) {
            let mut fields = Vec::new();
            let _ = record.key_values().visit(&mut KvCollect(&mut fields));
            self.0.lock().expect("not poisoned").push(Captured {
                level: record.level(),
                message: record.args().to_string(),
                fields,
            });
        }
        fn flush(&self) {}
    }

    fn capture(f: impl FnOnce()) -> Vec<Captured> {
        let sink = Capture::default();
        let subscriber = tracing_subscriber::registry().with(JournalLayer::new(sink.clone()));
        tracing::subscriber::with_default(subscriber, f);
        let records = sink.0.lock().expect("not poisoned").clone();
        records
    }

    #[test]
    fn event_fields_become_record_key_values_and_the_line_shows_them() {
        let records = capture(|| {
            tracing::info!(
                station = "kiosk-1",
                request_id = %"r-42",
                terminal = "PAX_A910__0001",
                intent_id = "7f2c",
                "charge accepted"
            );
        });
        assert_eq!(records.len(), 1);
        let r = &records[0];
        assert_eq!(r.level, log::Level::Info);
        assert_eq!(r.field("station"), Some("kiosk-1"));
        assert_eq!(r.field("request_id"), Some("r-42"));
        assert_eq!(r.field("terminal"), Some("PAX_A910__0001"));
        assert_eq!(r.field("intent_id"), Some("7f2c"));
        assert_eq!(
            r.message,
            "charge accepted station=kiosk-1 request_id=r-42 terminal=PAX_A910__0001 intent_id=7f2c"
        );
        assert!(r.field("message").is_none());
    }

    #[test]
    fn span_fields_reach_the_events_inside_and_an_event_field_wins() {
        let records = capture(|| {
            let span = tracing::info_span!("charge", request_id = "r-1", station = "kiosk-2");
            let _enter = span.enter();
            let inner = tracing::info_span!("api", intent_id = tracing::field::Empty);
            let _in = inner.enter();
            inner.record("intent_id", "i-9");
            tracing::warn!(station = "kiosk-3", "poll failed");
        });
        let r = &records[0];
        assert_eq!(r.level, log::Level::Warn);
        assert_eq!(r.field("request_id"), Some("r-1"));
        assert_eq!(r.field("intent_id"), Some("i-9"));
        assert_eq!(r.field("station"), Some("kiosk-3"));
        assert_eq!(
            r.fields.iter().filter(|(k, _)| k == "station").count(),
            1,
            "{:?}",
            r.fields
        );
    }

    #[test]
    fn fields_named_like_the_loggers_own_get_a_prefix() {
        let records = capture(|| {
            tracing::error!(priority = 1, target = "x", "odd names");
        });
        let r = &records[0];
        assert_eq!(r.field("field_priority"), Some("1"));
        assert_eq!(r.field("field_target"), Some("x"));
        assert!(r.field("priority").is_none());
    }

    #[test]
    fn events_outside_any_span_carry_only_their_own_fields() {
        let records = capture(|| {
            tracing::debug!("plain");
        });
        assert_eq!(records[0].message, "plain");
        assert!(records[0].fields.is_empty());
        assert_eq!(records[0].level, log::Level::Debug);
    }
}
