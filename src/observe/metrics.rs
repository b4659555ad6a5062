//! Prometheus metrics (DESIGN section 7).
//!
//! One [`Metrics`] value owns a private registry; methods are named for events. Labels are
//! bounded: route names come from the config and outcomes from [`Answered`], never keys or
//! paths. Every route x outcome series is created at start-up so that rates and ratios are
//! defined from the first scrape. Gauges that mirror state (in flight, waiters, store size)
//! are read from their owners at scrape time rather than updated on every request.

use crate::config::route::RouteId;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use std::sync::Arc;
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
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
}

/// One route's request series, indexed by `Answered as usize` (the order of [`Answered::ALL`]).
struct RequestSeries {
    count: [IntCounter; 11],
    duration: [Histogram; 11],
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
                "Problem answers idem wrote itself, by problem type (README: Problem types).",
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

    /// One request answered.
    pub(crate) fn request(&self, route: RouteId, outcome: Answered, took: Duration) {
        let series = self.request_series.read();
        // Ids are issued by `register_routes` only, which creates the series first.
        if let Some(s) = series.get(route.0) {
            let i = outcome as usize;
            s.count[i].inc();
            s.duration[i].observe(took.as_secs_f64());
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
        m.request(RouteId(1), Answered::Replayed, Duration::from_millis(3));
        let c = |r: &str, o: &str| m.requests.with_label_values(&[r, o]).get();
        assert_eq!(c("api", "replayed"), 1);
        assert_eq!(c("api", "leader"), 0);
        // A reload that keeps a name keeps its id and its series.
        assert_eq!(
            m.register_routes(&["api".into(), "new".into()]),
            [RouteId(1), RouteId(2)]
        );
        let h = m.request_duration.with_label_values(&["api", "replayed"]);
        assert_eq!(h.get_sample_count(), 1);
    }
}
