//! Prometheus metrics (DESIGN section 7).
//!
//! One [`Metrics`] value owns a private registry; methods are named for events. Labels are
//! bounded: route names come from the config and outcomes from [`Answered`], never keys or
//! paths; backends are the configured `upstream.backends` entries (a name that resolves to
//! several addresses is one series), fixed at start-up. Every route x outcome, route x
//! class and backend x class series is created at start-up so that rates and ratios are
//! defined from the first scrape. Gauges that mirror state (in flight, waiters, store size,
//! backend health, draining) are read from their owners at scrape time rather than updated
//! on every request. The registry also holds the prometheus crate's `process_*` collector
//! (CPU, resident memory, open descriptors, start time; Linux).

use crate::config::route::RouteId;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// How idem answered one request: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Answered {
    /// First request for a key: made the upstream call.
    Leader,
    /// Attached to a call in flight and got its response.
    Collapsed,
    /// Got a stored response.
    Replayed,
    /// Passed through (not eligible, no key on a keyed route, off or shadow route).
    Bypass,
    /// 409 in-progress.
    Conflict,
    /// 422: same key, different request.
    Mismatch,
    /// 400: key required but absent, or malformed.
    MissingKey,
    /// Body over `max_body`: 413, or passed through uncounted by dedup.
    TooLarge,
    /// 502/504 outcome unknown (live or held).
    OutcomeUnknown,
    /// 409 not-replayable.
    NotReplayable,
    /// Everything else idem answered with an error (store full, unreachable, body timeout).
    Error,
}

impl Answered {
    /// Every outcome, for series pre-registration.
    pub(crate) const ALL: [Answered; 11] = [
        Answered::Leader,
        Answered::Collapsed,
        Answered::Replayed,
        Answered::Bypass,
        Answered::Conflict,
        Answered::Mismatch,
        Answered::MissingKey,
        Answered::TooLarge,
        Answered::OutcomeUnknown,
        Answered::NotReplayable,
        Answered::Error,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Answered::Leader => "leader",
            Answered::Collapsed => "collapsed",
            Answered::Replayed => "replayed",
            Answered::Bypass => "bypass",
            Answered::Conflict => "conflict",
            Answered::Mismatch => "mismatch",
            Answered::MissingKey => "missing_key",
            Answered::TooLarge => "too_large",
            Answered::OutcomeUnknown => "outcome_unknown",
            Answered::NotReplayable => "not_replayable",
            Answered::Error => "error",
        }
    }
}

/// What a shadow route would have done with a duplicate: the `kind` label of
/// `idem_shadow_duplicates_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ShadowKind {
    /// The same key was in flight: it would have waited for that call.
    Collapsed,
    /// The same key had a stored response: it would have been replayed.
    Replayed,
}

impl ShadowKind {
    /// Every kind, for series pre-registration.
    pub(crate) const ALL: [ShadowKind; 2] = [ShadowKind::Collapsed, ShadowKind::Replayed];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            ShadowKind::Collapsed => "collapsed",
            ShadowKind::Replayed => "replayed",
        }
    }
}

const UPSTREAM_CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "failed"];

/// The `class` label of `idem_responses_total`: every status idem answers with.
const RESPONSE_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The `class` label of `idem_backend_requests_total`: a response class, or no response.
const BACKEND_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "failed"];
const BACKEND_FAILED: usize = 5;

/// The index of `status`'s class in [`RESPONSE_CLASSES`] (and [`BACKEND_CLASSES`]); `None`
/// outside 100..=599.
fn class_index(status: u16) -> Option<usize> {
    match status {
        100..=599 => Some(usize::from(status / 100 - 1)),
        _ => None,
    }
}

/// The result of looking a key up when a request joins: the `result` label of
/// `idem_store_operations_total{op="lookup"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Lookup {
    /// A record was found (stored, held, not-replayable, or a misuse of it).
    Hit,
    /// No record and no flight: the request leads.
    Miss,
    /// A flight was found (joined, or refused by the route or the waiter caps).
    Inflight,
    /// No room for the key (store full, or its scope at its quota).
    Full,
    /// A remote store failed (Redis only).
    Error,
}

impl Lookup {
    /// Every result, pre-registered so that error ratios and alerts are defined from the
    /// first scrape.
    pub(crate) const ALL: [Lookup; 5] = [
        Lookup::Hit,
        Lookup::Miss,
        Lookup::Inflight,
        Lookup::Full,
        Lookup::Error,
    ];

    /// The label value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Lookup::Hit => "hit",
            Lookup::Miss => "miss",
            Lookup::Inflight => "inflight",
            Lookup::Full => "full",
            Lookup::Error => "error",
        }
    }
}

/// State read from its owners at scrape time (flights, waiters, the store).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Gauges {
    /// Keys with a leader running.
    pub(crate) inflight: usize,
    /// Requests waiting on a leader.
    pub(crate) waiters: usize,
    /// Keys held as outcome unknown.
    pub(crate) held: u64,
    /// Records kept in the store.
    pub(crate) entries: u64,
    /// Bytes of records kept.
    pub(crate) bytes: u64,
    /// Records evicted by capacity since start.
    pub(crate) evicted_capacity: u64,
    /// Records expired since start.
    pub(crate) evicted_expired: u64,
    /// Requests being processed (the drain waits for them).
    pub(crate) active_requests: usize,
    /// SIGTERM received: the process is draining.
    pub(crate) draining: bool,
    /// Whether each configured backend (in `register_backends` order) has an address that
    /// passed its last health check.
    pub(crate) backends_up: Vec<bool>,
}

/// One route's request series, indexed by `Answered as usize` (the order of [`Answered::ALL`]),
/// and its answers by class (the order of [`RESPONSE_CLASSES`]).
struct RequestSeries {
    count: [IntCounter; 11],
    duration: [Histogram; 11],
    responses: [IntCounter; 5],
}

/// One backend's series: calls by class (the order of [`BACKEND_CLASSES`]) and latency.
struct BackendSeries {
    count: [IntCounter; 6],
    duration: Histogram,
}

/// All of idem's metric families.
pub(crate) struct Metrics {
    registry: Registry,
    /// Route label values by [`RouteId`]; append-only.
    routes: parking_lot::RwLock<Vec<Arc<str>>>,
    /// The `idem_requests_total` and `idem_request_duration_seconds` series of each route by
    /// [`RouteId`], then by [`Answered`]: looked up once, not hashed on every request.
    request_series: parking_lot::RwLock<Vec<RequestSeries>>,
    requests: IntCounterVec,
    request_duration: HistogramVec,
    upstream_requests: IntCounterVec,
    upstream_duration: HistogramVec,
    detached: IntCounterVec,
    inflight: IntGauge,
    waiters: IntGauge,
    held: IntGauge,
    store_entries: IntGauge,
    store_bytes: IntGauge,
    store_evictions: IntCounterVec,
    store_operations: IntCounterVec,
    /// The `op="lookup"` series by [`Lookup`], resolved once (one per request).
    lookups: Vec<IntCounter>,
    shadow_duplicates: IntCounterVec,
    /// Configured bounds, so dashboards and alerts can relate usage to them.
    store_max_entries: IntGauge,
    store_max_bytes: IntGauge,
    max_waiters: IntGauge,
    /// Requests refused before idem could answer (client gone while idem read the body).
    client_aborts: IntCounter,
    /// idem's own problem answers by type.
    problems: IntCounterVec,
    /// Admin requests refused by the guard, by reason.
    admin_refusals: IntCounterVec,
    /// Bytes of request bodies held now (`http::body_budget` keeps it current).
    pub(crate) body_buffer: IntGauge,
    responses: IntCounterVec,
    backend_requests: IntCounterVec,
    backend_duration: HistogramVec,
    backend_up: IntGaugeVec,
    /// The series of each backend by its index in the configuration; set once at start-up.
    backend_series: OnceLock<Vec<BackendSeries>>,
    backend_names: OnceLock<Vec<String>>,
    draining: IntGauge,
    active_requests: IntGauge,
}

impl Metrics {
    /// Registers every family and pre-creates every route x outcome series.
    pub(crate) fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let buckets = vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                60.0, 120.0, 300.0,
            ];
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
                .expect("valid metric");
            registry
                .register(Box::new(h.clone()))
                .expect("unique metric");
            h
        };
        // Linux only (procfs); elsewhere the family is absent rather than wrong.
        #[cfg(target_os = "linux")]
        registry
            .register(Box::new(
                prometheus::process_collector::ProcessCollector::for_self(),
            ))
            .expect("unique metric");
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let client_aborts = IntCounter::new(
            "idem_client_aborts_total",
            "Requests whose client left while idem read the request body.",
        )
        .expect("valid metric");
        registry
            .register(Box::new(client_aborts.clone()))
            .expect("unique metric");
        let mut m = Metrics {
            requests: counter(
                "idem_requests_total",
                "Requests by route and how idem answered them.",
                &["route", "outcome"],
            ),
            request_duration: histogram(
                "idem_request_duration_seconds",
                "Time from request head to the end of idem's answer.",
                &["route", "outcome"],
            ),
            upstream_requests: counter(
                "idem_upstream_requests_total",
                "Upstream calls made by leaders, by response class or failed.",
                &["route", "class"],
            ),
            upstream_duration: histogram(
                "idem_upstream_duration_seconds",
                "Time from the start of a leader's upstream call to its response header.",
                &["route"],
            ),
            detached: counter(
                "idem_detached_completions_total",
                "Leader calls that completed after their client had left.",
                &["route"],
            ),
            inflight: gauge(
                "idem_inflight_keys",
                "Keys with an upstream call in flight.",
            ),
            waiters: gauge("idem_waiters", "Requests waiting for a call in flight."),
            held: gauge("idem_held_keys", "Keys held as outcome unknown."),
            store_entries: gauge("idem_store_entries", "Records kept in the store."),
            store_bytes: gauge("idem_store_bytes", "Bytes of records kept in the store."),
            store_evictions: counter(
                "idem_store_evictions_total",
                "Records removed from the store: capacity (weakens the guarantee) or expired.",
                &["reason"],
            ),
            store_operations: counter(
                "idem_store_operations_total",
                "Store operations by result.",
                &["op", "result"],
            ),
            shadow_duplicates: counter(
                "idem_shadow_duplicates_total",
                "Requests a shadow route would have collapsed or replayed.",
                &["route", "kind"],
            ),
            store_max_entries: gauge(
                "idem_store_max_entries",
                "Configured bound on store keys (store.max_entries).",
            ),
            store_max_bytes: gauge(
                "idem_store_max_bytes",
                "Configured bound on stored bytes (store.max_bytes).",
            ),
            max_waiters: gauge(
                "idem_max_waiters",
                "Configured bound on waiters across all keys (server.max_waiters).",
            ),
            client_aborts,
            problems: counter(
                "idem_problems_total",
                "Problem answers idem wrote itself, by problem type (docs/semantics.md: Problem types).",
                &["type"],
            ),
            admin_refusals: counter(
                "idem_admin_refusals_total",
                "Admin listener requests refused: host (not a loopback name), origin (a browser), token.",
                &["reason"],
            ),
            body_buffer: gauge(
                "idem_body_buffer_bytes",
                "Bytes of request bodies idem holds now (read for dedup, or waiting to be sent upstream).",
            ),
            responses: counter(
                "idem_responses_total",
                "Answers idem gave, pass-through included, by route and status class.",
                &["route", "class"],
            ),
            backend_requests: counter(
                "idem_backend_requests_total",
                "Calls to each configured backend (pass-through attempts and leader calls), by response class or failed.",
                &["backend", "class"],
            ),
            backend_duration: histogram(
                "idem_backend_duration_seconds",
                "Time from choosing a backend to its response header (or the failure).",
                &["backend"],
            ),
            backend_up: gauge_vec(
                "idem_backend_up",
                "1 when an address of the configured backend passed its last health check.",
                &["backend"],
            ),
            backend_series: OnceLock::new(),
            backend_names: OnceLock::new(),
            draining: gauge(
                "idem_draining",
                "1 from SIGTERM on: the process is draining and /readyz answers 503.",
            ),
            active_requests: gauge(
                "idem_active_requests",
                "Requests being processed (a drain waits for them and for flights).",
            ),
            lookups: Vec::new(),
            routes: parking_lot::RwLock::new(Vec::new()),
            request_series: parking_lot::RwLock::new(Vec::new()),
            registry,
        };
        for reason in ["capacity", "expired"] {
            m.store_evictions.with_label_values(&[reason]);
        }
        for reason in ["host", "origin", "token"] {
            m.admin_refusals.with_label_values(&[reason]);
        }
        m.lookups = Lookup::ALL
            .iter()
            .map(|r| {
                m.store_operations
                    .with_label_values(&["lookup", r.as_str()])
            })
            .collect();
        Arc::new(m)
    }

    /// The id of each of `names`, in order, adding the names not seen before and creating
    /// their series (every route x outcome series exists from the moment a route does).
    /// Called at start-up and on every configuration reload.
    pub(crate) fn register_routes(&self, names: &[String]) -> Vec<RouteId> {
        let mut routes = self.routes.write();
        names
            .iter()
            .map(|name| {
                if let Some(i) = routes.iter().position(|r| **r == **name) {
                    return RouteId(i);
                }
                self.create_route_series(name);
                self.request_series.write().push(RequestSeries {
                    count: Answered::ALL
                        .map(|o| self.requests.with_label_values(&[name, o.as_str()])),
                    duration: Answered::ALL
                        .map(|o| self.request_duration.with_label_values(&[name, o.as_str()])),
                    responses: RESPONSE_CLASSES
                        .map(|c| self.responses.with_label_values(&[name, c])),
                });
                routes.push(Arc::from(name.as_str()));
                RouteId(routes.len() - 1)
            })
            .collect()
    }

    fn create_route_series(&self, route: &str) {
        for o in Answered::ALL {
            self.requests.with_label_values(&[route, o.as_str()]);
            self.request_duration
                .with_label_values(&[route, o.as_str()]);
        }
        for class in UPSTREAM_CLASSES {
            self.upstream_requests.with_label_values(&[route, class]);
        }
        self.upstream_duration.with_label_values(&[route]);
        self.detached.with_label_values(&[route]);
        for kind in ShadowKind::ALL {
            self.shadow_duplicates
                .with_label_values(&[route, kind.as_str()]);
        }
    }

    /// Publishes the configured bounds (`idem_store_max_entries`, `idem_store_max_bytes`,
    /// `idem_max_waiters`).
    pub(crate) fn set_bounds(&self, max_entries: usize, max_bytes: u64, max_waiters: usize) {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.store_max_entries.set(clamp(max_entries as u64));
        self.store_max_bytes.set(clamp(max_bytes));
        self.max_waiters.set(clamp(max_waiters as u64));
    }

    /// The label value of `r` ("default" for an id this table never issued).
    pub(crate) fn route_name(&self, r: RouteId) -> Arc<str> {
        let routes = self.routes.read();
        routes
            .get(r.0)
            .or_else(|| routes.first())
            .cloned()
            .unwrap_or_else(|| Arc::from("default"))
    }

    /// Creates the series of the configured backends, by their index in `names` (the
    /// `upstream.backends` entries, fixed at start-up). Later calls change nothing.
    pub(crate) fn register_backends(&self, names: &[String]) {
        let series = names
            .iter()
            .map(|name| {
                self.backend_up.with_label_values(&[name]);
                BackendSeries {
                    count: BACKEND_CLASSES
                        .map(|c| self.backend_requests.with_label_values(&[name, c])),
                    duration: self.backend_duration.with_label_values(&[name]),
                }
            })
            .collect();
        let _ = self.backend_series.set(series);
        let _ = self.backend_names.set(names.to_vec());
    }

    /// One request done: its outcome, and `status` when idem gave an answer (`None` when
    /// the client left before one).
    pub(crate) fn request(
        &self,
        route: RouteId,
        outcome: Answered,
        status: Option<u16>,
        took: Duration,
    ) {
        let series = self.request_series.read();
        // Ids are issued by `register_routes` only, which creates the series first.
        if let Some(s) = series.get(route.0) {
            let i = outcome as usize;
            s.count[i].inc();
            s.duration[i].observe(took.as_secs_f64());
            if let Some(c) = status.and_then(class_index) {
                s.responses[c].inc();
            }
        }
    }

    /// A backend (by its index in the configuration) answered with `status` after `took`.
    pub(crate) fn backend_answered(&self, backend: usize, status: u16, took: Duration) {
        if let Some(s) = self.backend_series.get().and_then(|b| b.get(backend)) {
            s.count[class_index(status).unwrap_or(4)].inc();
            s.duration.observe(took.as_secs_f64());
        }
    }

    /// A call to a backend failed without a response header after `took`.
    pub(crate) fn backend_failed(&self, backend: usize, took: Duration) {
        if let Some(s) = self.backend_series.get().and_then(|b| b.get(backend)) {
            s.count[BACKEND_FAILED].inc();
            s.duration.observe(took.as_secs_f64());
        }
    }

    /// A leader's upstream call got a response header.
    pub(crate) fn upstream_answered(&self, route: RouteId, status: u16, took: Duration) {
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.upstream_requests
            .with_label_values(&[&*self.route_name(route), class])
            .inc();
        self.upstream_duration
            .with_label_values(&[&*self.route_name(route)])
            .observe(took.as_secs_f64());
    }

    /// A leader's upstream call failed without a response header.
    pub(crate) fn upstream_failed(&self, route: RouteId, took: Duration) {
        self.upstream_requests
            .with_label_values(&[&*self.route_name(route), "failed"])
            .inc();
        self.upstream_duration
            .with_label_values(&[&*self.route_name(route)])
            .observe(took.as_secs_f64());
    }

    /// A leader's call completed after its client left.
    pub(crate) fn detached_completion(&self, route: RouteId) {
        self.detached
            .with_label_values(&[&*self.route_name(route)])
            .inc();
    }

    /// A shadow route saw a request it would have collapsed or replayed.
    pub(crate) fn shadow_duplicate(&self, route: RouteId, kind: ShadowKind) {
        self.shadow_duplicates
            .with_label_values(&[&*self.route_name(route), kind.as_str()])
            .inc();
    }

    /// The lookup of a joining request's key.
    pub(crate) fn lookup(&self, result: Lookup) {
        self.lookups[result as usize].inc();
    }

    /// The registry and the `idem_store_operations_total` family, for the Redis store's own
    /// families ([`crate::store::redis::metrics`]), registered only in Redis mode.
    pub(crate) fn store_families(&self) -> (&Registry, IntCounterVec) {
        (&self.registry, self.store_operations.clone())
    }

    /// A client left while idem read its request body.
    pub(crate) fn client_abort(&self) {
        self.client_aborts.inc();
    }

    /// Creates the `idem_problems_total` series of every problem type, so that rates are
    /// defined from the first scrape.
    pub(crate) fn register_problems(&self, kinds: &[&str]) {
        for kind in kinds {
            self.problems.with_label_values(&[kind]);
        }
    }

    /// The admin listener refused a request (`reason`: host, origin, token).
    pub(crate) fn admin_refused(&self, reason: &str) {
        self.admin_refusals.with_label_values(&[reason]).inc();
    }

    /// idem answered a request with a problem of type `kind`.
    pub(crate) fn problem(&self, kind: &str) {
        self.problems.with_label_values(&[kind]).inc();
    }

    /// Renders the text exposition with `gauges` read from their owners just before.
    pub(crate) fn render(&self, gauges: &Gauges) -> Vec<u8> {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.inflight.set(clamp(gauges.inflight as u64));
        self.waiters.set(clamp(gauges.waiters as u64));
        self.held.set(clamp(gauges.held));
        self.store_entries.set(clamp(gauges.entries));
        self.store_bytes.set(clamp(gauges.bytes));
        self.active_requests
            .set(clamp(gauges.active_requests as u64));
        self.draining.set(i64::from(gauges.draining));
        if let Some(names) = self.backend_names.get() {
            for (name, up) in names.iter().zip(&gauges.backends_up) {
                self.backend_up
                    .with_label_values(&[name])
                    .set(i64::from(*up));
            }
        }
        for (reason, total) in [
            ("capacity", gauges.evicted_capacity),
            ("expired", gauges.evicted_expired),
        ] {
            let c = self.store_evictions.with_label_values(&[reason]);
            c.inc_by(total.saturating_sub(c.get()));
        }
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discriminants_index_the_cached_series() {
        for (i, o) in Answered::ALL.into_iter().enumerate() {
            assert_eq!(o as usize, i, "{o:?}");
        }
        for (i, r) in Lookup::ALL.into_iter().enumerate() {
            assert_eq!(r as usize, i, "{r:?}");
        }
    }

    #[test]
    fn requests_land_in_their_route_and_outcome_series() {
        let m = Metrics::new();
        let ids = m.register_routes(&["default".into(), "api".into()]);
        assert_eq!(ids, [RouteId(0), RouteId(1)]);
        m.request(
            RouteId(1),
            Answered::Replayed,
            Some(201),
            Duration::from_millis(3),
        );
        m.request(RouteId(1), Answered::Leader, None, Duration::from_millis(3));
        m.request(RouteId(1), Answered::Bypass, Some(101), Duration::ZERO);
        let c = |r: &str, o: &str| m.requests.with_label_values(&[r, o]).get();
        assert_eq!(c("api", "replayed"), 1);
        assert_eq!(c("api", "leader"), 1);
        let class = |c: &str| m.responses.with_label_values(&["api", c]).get();
        assert_eq!(
            RESPONSE_CLASSES.map(class),
            [1, 1, 0, 0, 0],
            "a request without an answer (its client left) has no class"
        );
        // A reload that keeps a name keeps its id and its series.
        assert_eq!(
            m.register_routes(&["api".into(), "new".into()]),
            [RouteId(1), RouteId(2)]
        );
        let h = m.request_duration.with_label_values(&["api", "replayed"]);
        assert_eq!(h.get_sample_count(), 1);
    }

    #[test]
    fn statuses_map_to_their_class_and_nothing_else() {
        assert_eq!(class_index(100), Some(0));
        assert_eq!(class_index(204), Some(1));
        assert_eq!(class_index(399), Some(2));
        assert_eq!(class_index(499), Some(3));
        assert_eq!(class_index(599), Some(4));
        assert_eq!(class_index(0), None);
        assert_eq!(class_index(99), None);
        assert_eq!(class_index(600), None);
    }

    #[test]
    fn backends_count_by_configured_index_and_publish_health() {
        let m = Metrics::new();
        m.register_backends(&["127.0.0.1:8000".into(), "app:8000".into()]);
        m.backend_answered(1, 503, Duration::from_millis(2));
        m.backend_answered(1, 200, Duration::from_millis(2));
        m.backend_failed(0, Duration::from_millis(2));
        // An index the configuration never had is ignored, not a panic.
        m.backend_failed(7, Duration::ZERO);
        let c = |b: &str, class: &str| m.backend_requests.with_label_values(&[b, class]).get();
        assert_eq!(
            BACKEND_CLASSES.map(|k| c("app:8000", k)),
            [0, 1, 0, 0, 1, 0]
        );
        assert_eq!(
            BACKEND_CLASSES.map(|k| c("127.0.0.1:8000", k)),
            [0, 0, 0, 0, 0, 1]
        );
        let text = String::from_utf8(m.render(&Gauges {
            backends_up: vec![true, false],
            draining: true,
            active_requests: 3,
            ..Gauges::default()
        }))
        .unwrap();
        for line in [
            "idem_backend_up{backend=\"127.0.0.1:8000\"} 1",
            "idem_backend_up{backend=\"app:8000\"} 0",
            "idem_draining 1",
            "idem_active_requests 3",
            "idem_backend_duration_seconds_count{backend=\"app:8000\"} 2",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        #[cfg(target_os = "linux")]
        assert!(text.contains("\nprocess_resident_memory_bytes "), "{text}");
    }
}
