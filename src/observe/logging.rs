//! The process's log: `tracing` events to stderr, text or JSON (`[server] log_format`; JSON
//! fields flat at the top level), filtered by `IDEM_LOG` (an `EnvFilter`: `warn`,
//! `info,pingora_core=warn`, ...; default `info`).
//!
//! Pingora logs through the `log` crate; its records are turned into `tracing` events with
//! their own targets (`pingora_core::...`, `pingora_proxy::...`), so `IDEM_LOG` filters them
//! like idem's. A few are logged at a level that says "something is wrong" for what is, in
//! a proxy, ordinary; they are lowered here (decision, see [`level_for`]):
//! * "failed to acquire reusable stream" (ERROR): the pool's idle watcher still held a
//!   connection Pingora wanted to reuse; a new connection is made and nothing failed.
//!   Frequent under load. DEBUG.
//! * "Fail to proxy: ... downstream session type" (ERROR): the client closed or stalled
//!   before sending a whole request head. A client's doing. DEBUG.
//!
//! Pingora's per-request error and retry lines are not lowered here but never written:
//! idem's `ProxyHttp` hooks suppress them (`crate::http::proxy`) and idem writes its own
//! (a client leaving: the access line, INFO; an upstream failure: one WARN naming the
//! backend; a retry: DEBUG).

use crate::config::file::LogFormat;
use std::fmt::Write as _;

/// Installs the subscriber and the bridge for Pingora's `log` records. Once, at start.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("IDEM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let installed = match format {
        LogFormat::Json => tracing::subscriber::set_global_default(
            builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .finish(),
        ),
        LogFormat::Text => tracing::subscriber::set_global_default(builder.finish()),
    };
    if installed.is_ok() {
        // The most verbose level any filter lets through: `log` drops the rest before they
        // are formatted.
        log::set_max_level(tracing_log::AsLog::as_log(
            &tracing::level_filters::LevelFilter::current(),
        ));
        let _ = log::set_boxed_logger(Box::new(Bridge(tracing_log::LogTracer::new())));
    }
}

/// Pingora's `log` records, at the level [`level_for`] gives, as `tracing` events.
struct Bridge(tracing_log::LogTracer);

impl log::Log for Bridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        self.0.enabled(metadata)
    }

    fn log(&self, record: &log::Record<'_>) {
        let mut text = String::new();
        let message = match record.args().as_str() {
            Some(s) => s,
            None if lowered_candidate(record) => {
                let _ = write!(text, "{}", record.args());
                &text
            }
            None => "",
        };
        let level = level_for(record.target(), record.level(), message);
        if level == record.level() {
            return self.0.log(record);
        }
        let metadata = log::Metadata::builder()
            .level(level)
            .target(record.target())
            .build();
        if !self.0.enabled(&metadata) {
            return;
        }
        self.0.log(
            &log::Record::builder()
                .metadata(metadata)
                .args(*record.args())
                .module_path(record.module_path())
                .file(record.file())
                .line(record.line())
                .build(),
        );
    }

    fn flush(&self) {}
}

/// Whether a record with a formatted message may be lowered (only those are formatted to
/// find out).
fn lowered_candidate(record: &log::Record<'_>) -> bool {
    record.level() == log::Level::Error && record.target().starts_with("pingora_proxy")
}

/// The level a Pingora record is logged at (see the module doc).
pub(crate) fn level_for(target: &str, level: log::Level, message: &str) -> log::Level {
    let pingora_error = level == log::Level::Error && target.starts_with("pingora");
    if pingora_error && message == "failed to acquire reusable stream" {
        return log::Level::Debug;
    }
    if pingora_error
        && message.starts_with("Fail to proxy:")
        && message.contains("downstream session type")
    {
        return log::Level::Debug;
    }
    level
}

#[cfg(test)]
mod tests {
    use super::*;
    use log::Level::{Debug, Error, Warn};

    #[test]
    fn ordinary_proxy_events_are_lowered_and_nothing_else() {
        assert_eq!(
            level_for(
                "pingora_core::connectors",
                Error,
                "failed to acquire reusable stream"
            ),
            Debug
        );
        assert_eq!(
            level_for(
                "pingora_proxy",
                Error,
                "Fail to proxy: Downstream ReadError context: ..., downstream session type: HTTP/1.1"
            ),
            Debug
        );
        // Everything else keeps its level, from Pingora or not.
        assert_eq!(
            level_for(
                "pingora_core::server",
                Error,
                "Accept() failed Too many open files"
            ),
            Error
        );
        assert_eq!(
            level_for("pingora_proxy", Warn, "failed to acquire reusable stream"),
            Warn
        );
        assert_eq!(
            level_for("idem::x", Error, "failed to acquire reusable stream"),
            Error
        );
    }
}
