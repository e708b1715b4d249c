//! Logging setup: `tracing` events to stderr, filtered by `log.level` or, when set,
//! `RUST_LOG`. Human-readable lines; colour only on a terminal.
//!
//! Under systemd, stderr is the journal already (one line per event). Writing natively
//! to journald (fields, priorities) is a later change: its seam is marked in [`init`].

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is a tracing filter (`info`,
/// `pointgate=debug,info`); a non-empty `RUST_LOG` replaces it. Calling it again does
/// nothing: the first subscriber stays.
pub fn init(level: &str) {
    let rust_log = std::env::var("RUST_LOG").ok();
    let (filter, rust_log_refused) = choose_filter(level, rust_log.as_deref());

    if std::env::var_os("JOURNAL_STREAM").is_some() {
        // TODO(journald): when stderr is the journal's stream (JOURNAL_STREAM names its
        // device:inode), log to journald natively with systemd-journal-logger, so that
        // levels become priorities and fields become journal fields. Until then the fmt
        // layer below writes plain lines, which the journal stores as they are.
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

#[cfg(test)]
mod tests {
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
}
