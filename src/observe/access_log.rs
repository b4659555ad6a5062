//! The access log: one line per request, text or JSON (`[server] log_format`), written as a
//! `tracing` event on target `idem::access` to stderr.
//!
//! Fields: method, path (text only), client (the address through trusted hops, `-` when
//! there is none), route, status, outcome, a 12-hex prefix of the dedup
//! key (never the raw `Idempotency-Key` nor the body), total and upstream latency, and how
//! many waiters a leader's outcome served.

use crate::config::file::LogFormat;
use crate::key::DedupKey;
use crate::observe::metrics::Answered;
use pingora::proxy::Session;
use pingora::Error;
use std::time::Duration;

/// What one request contributes to its access line.
pub(crate) struct Entry<'a> {
    /// Text or JSON.
    pub(crate) format: LogFormat,
    /// The request's route (its metric label).
    pub(crate) route: &'a str,
    /// The client address through trusted hops (`crate::http::client_addr`).
    pub(crate) client: Option<std::net::IpAddr>,
    /// Status when no response header was written (idem's own answers record theirs).
    pub(crate) fallback_status: u16,
    /// How idem answered.
    pub(crate) answered: Answered,
    /// Short dedup key hash, when one was derived.
    pub(crate) key: Option<&'a DedupKey>,
    /// From request head to the end of the answer.
    pub(crate) took: Duration,
    /// Upstream latency to the response header (leaders and pass-through).
    pub(crate) upstream: Option<Duration>,
    /// Waiters that received this leader's outcome.
    pub(crate) waiters_served: Option<usize>,
}

/// The client address, or `-`: formatted straight into the line, without a `String`.
struct Client(Option<std::net::IpAddr>);

impl std::fmt::Display for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(ip) => ip.fmt(f),
            None => f.write_str("-"),
        }
    }
}

/// Writes the line, unless `idem::access` is filtered out (then nothing is built).
pub(crate) fn write(session: &Session, e: Option<&Error>, entry: &Entry<'_>) {
    if !tracing::enabled!(target: "idem::access", tracing::Level::INFO) {
        return;
    }
    let status = session
        .response_written()
        .map(|h| h.status.as_u16())
        .unwrap_or(entry.fallback_status);
    let req = session.req_header();
    let route = entry.route;
    let error = e.map(|e| e.to_string());
    let key = entry.key.map(|k| k.short());
    let key = key.as_deref().unwrap_or("-");
    // Milliseconds with microsecond precision.
    let upstream_ms = entry.upstream.map(|d| d.as_micros() as f64 / 1000.0);
    let client = Client(entry.client);
    match entry.format {
        LogFormat::Json => tracing::info!(
            target: "idem::access",
            method = %req.method,
            client = %client,
            route = %route,
            status,
            outcome = entry.answered.as_str(),
            key,
            ms = entry.took.as_millis() as u64,
            upstream_ms,
            waiters_served = entry.waiters_served.map(|n| n as u64),
            // Absent when the request ended without an error (`Option` records only `Some`).
            error = error.as_deref(),
            "request"
        ),
        LogFormat::Text => tracing::info!(
            target: "idem::access",
            "{} {} client={} route={} status={} outcome={} key={} ms={} upstream_ms={} waiters_served={}{}",
            req.method,
            req.uri.path(),
            client,
            route,
            status,
            entry.answered.as_str(),
            key,
            entry.took.as_millis(),
            upstream_ms.map_or_else(|| "-".to_string(), |ms| format!("{ms:.3}")),
            entry
                .waiters_served
                .map_or_else(|| "-".to_string(), |n| n.to_string()),
            error.map(|e| format!(" error={e:?}")).unwrap_or_default()
        ),
    }
}
