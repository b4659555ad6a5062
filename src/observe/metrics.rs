//! Prometheus metrics (DESIGN section 7) and the metrics listener's small HTTP app.
//!
//! One [`Metrics`] value owns a private registry; methods are named for events. Labels are
//! bounded: route names come from the config and outcomes from [`Outcome`], never keys or
//! paths. Every route x outcome series is created at start-up so that rates and ratios are
//! defined from the first scrape. Gauges that mirror state (in flight, waiters, store size)
//! are read from their owners at scrape time rather than updated on every request.

use crate::dedup::coordinator::Coordinator;
use crate::store::memory::StoreStats;
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Index of a route name in [`Metrics`]' label table (0 is the default route). The table
/// only grows: a configuration reload appends the names it introduces
/// ([`Metrics::register_routes`]), so an id taken before a reload stays valid after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteId(pub usize);

/// How idem answered one request: the `outcome` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
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

impl Outcome {
    /// Every outcome, for series pre-registration.
    pub const ALL: [Outcome; 11] = [
        Outcome::Leader,
        Outcome::Collapsed,
        Outcome::Replayed,
        Outcome::Bypass,
        Outcome::Conflict,
        Outcome::Mismatch,
        Outcome::MissingKey,
        Outcome::TooLarge,
        Outcome::OutcomeUnknown,
        Outcome::NotReplayable,
        Outcome::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Leader => "leader",
            Outcome::Collapsed => "collapsed",
            Outcome::Replayed => "replayed",
            Outcome::Bypass => "bypass",
            Outcome::Conflict => "conflict",
            Outcome::Mismatch => "mismatch",
            Outcome::MissingKey => "missing_key",
            Outcome::TooLarge => "too_large",
            Outcome::OutcomeUnknown => "outcome_unknown",
            Outcome::NotReplayable => "not_replayable",
            Outcome::Error => "error",
        }
    }
}

/// What a shadow route would have done with a duplicate: the `kind` label of
/// `idem_shadow_duplicates_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowKind {
    /// The same key was in flight: it would have waited for that call.
    Collapsed,
    /// The same key had a stored response: it would have been replayed.
    Replayed,
}

impl ShadowKind {
    /// Every kind, for series pre-registration.
    pub const ALL: [ShadowKind; 2] = [ShadowKind::Collapsed, ShadowKind::Replayed];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            ShadowKind::Collapsed => "collapsed",
            ShadowKind::Replayed => "replayed",
        }
    }
}

const UPSTREAM_CLASSES: [&str; 5] = ["2xx", "3xx", "4xx", "5xx", "failed"];

/// Results of the `lookup` store operation, pre-registered so that error ratios and alerts
/// are defined from the first scrape (`error` comes from a remote store only).
const STORE_LOOKUP_RESULTS: [&str; 5] = ["hit", "miss", "inflight", "full", "error"];

/// One route's request series, indexed by `Outcome as usize` (the order of [`Outcome::ALL`]).
struct RequestSeries {
    count: [IntCounter; 11],
    duration: [Histogram; 11],
}

/// All of idem's metric families.
pub struct Metrics {
    registry: Registry,
    /// Route label values by [`RouteId`]; append-only.
    routes: parking_lot::RwLock<Vec<Arc<str>>>,
    /// The `idem_requests_total` and `idem_request_duration_seconds` series of each route by
    /// [`RouteId`], then by [`Outcome`]: looked up once, not hashed on every request.
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
    /// The `op="lookup"` series by `STORE_LOOKUP_RESULTS`, resolved once (one per request).
    lookups: Vec<IntCounter>,
    shadow_duplicates: IntCounterVec,
    /// Configured bounds, so dashboards and alerts can relate usage to them.
    store_max_entries: IntGauge,
    store_max_bytes: IntGauge,
    max_waiters: IntGauge,
    /// Requests refused before idem could answer (client gone while idem read the body).
    client_aborts: IntCounter,
}

impl Metrics {
    /// Registers every family and pre-creates every route x outcome series.
    pub fn new(route_names: Vec<String>) -> Arc<Metrics> {
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
            lookups: Vec::new(),
            routes: parking_lot::RwLock::new(Vec::new()),
            request_series: parking_lot::RwLock::new(Vec::new()),
            registry,
        };
        m.register_routes(&route_names);
        for reason in ["capacity", "expired"] {
            m.store_evictions.with_label_values(&[reason]);
        }
        m.lookups = STORE_LOOKUP_RESULTS
            .iter()
            .map(|result| m.store_operations.with_label_values(&["lookup", result]))
            .collect();
        Arc::new(m)
    }

    /// The id of each of `names`, in order, adding the names not seen before and creating
    /// their series (every route x outcome series exists from the moment a route does).
    /// Called at start-up and on every configuration reload.
    pub fn register_routes(&self, names: &[String]) -> Vec<RouteId> {
        let mut routes = self.routes.write();
        names
            .iter()
            .map(|name| {
                if let Some(i) = routes.iter().position(|r| **r == **name) {
                    return RouteId(i);
                }
                self.create_route_series(name);
                self.request_series.write().push(RequestSeries {
                    count: Outcome::ALL
                        .map(|o| self.requests.with_label_values(&[name, o.as_str()])),
                    duration: Outcome::ALL
                        .map(|o| self.request_duration.with_label_values(&[name, o.as_str()])),
                });
                routes.push(Arc::from(name.as_str()));
                RouteId(routes.len() - 1)
            })
            .collect()
    }

    fn create_route_series(&self, route: &str) {
        for o in Outcome::ALL {
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
    pub fn set_bounds(&self, max_entries: usize, max_bytes: u64, max_waiters: usize) {
        let clamp = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        self.store_max_entries.set(clamp(max_entries as u64));
        self.store_max_bytes.set(clamp(max_bytes));
        self.max_waiters.set(clamp(max_waiters as u64));
    }

    /// The label value of `r` ("default" for an id this table never issued).
    pub fn route_name(&self, r: RouteId) -> Arc<str> {
        let routes = self.routes.read();
        routes
            .get(r.0)
            .or_else(|| routes.first())
            .cloned()
            .unwrap_or_else(|| Arc::from("default"))
    }

    fn route(&self, r: RouteId) -> Arc<str> {
        self.route_name(r)
    }

    /// One request answered.
    pub fn request(&self, route: RouteId, outcome: Outcome, took: Duration) {
        let series = self.request_series.read();
        if let Some(s) = series.get(route.0).or_else(|| series.first()) {
            let i = outcome as usize;
            s.count[i].inc();
            s.duration[i].observe(took.as_secs_f64());
            return;
        }
        drop(series);
        let route = self.route(route);
        let labels = [&*route, outcome.as_str()];
        self.requests.with_label_values(&labels).inc();
        self.request_duration
            .with_label_values(&labels)
            .observe(took.as_secs_f64());
    }

    /// A leader's upstream call got a response header.
    pub fn upstream_answered(&self, route: RouteId, status: u16, took: Duration) {
        let class = match status {
            200..=299 => "2xx",
            300..=399 => "3xx",
            400..=499 => "4xx",
            _ => "5xx",
        };
        self.upstream_requests
            .with_label_values(&[&*self.route(route), class])
            .inc();
        self.upstream_duration
            .with_label_values(&[&*self.route(route)])
            .observe(took.as_secs_f64());
    }

    /// A leader's upstream call failed without a response header.
    pub fn upstream_failed(&self, route: RouteId, took: Duration) {
        self.upstream_requests
            .with_label_values(&[&*self.route(route), "failed"])
            .inc();
        self.upstream_duration
            .with_label_values(&[&*self.route(route)])
            .observe(took.as_secs_f64());
    }

    /// A leader's call completed after its client left.
    pub fn detached_completion(&self, route: RouteId) {
        self.detached
            .with_label_values(&[&*self.route(route)])
            .inc();
    }

    /// A shadow route saw a request it would have collapsed or replayed.
    pub fn shadow_duplicate(&self, route: RouteId, kind: ShadowKind) {
        self.shadow_duplicates
            .with_label_values(&[&*self.route(route), kind.as_str()])
            .inc();
    }

    /// A store operation (`op`: lookup) and its result (hit, miss, inflight, full, error).
    pub fn store_op(&self, op: &'static str, result: &'static str) {
        if op == "lookup" {
            if let Some(i) = STORE_LOOKUP_RESULTS.iter().position(|r| *r == result) {
                self.lookups[i].inc();
                return;
            }
        }
        self.store_operations.with_label_values(&[op, result]).inc();
    }

    /// The registry and the `idem_store_operations_total` family, for the Redis store's own
    /// families ([`crate::store::redis::metrics`]), registered only in Redis mode.
    pub fn store_families(&self) -> (&Registry, IntCounterVec) {
        (&self.registry, self.store_operations.clone())
    }

    /// A client left while idem read its request body.
    pub fn client_abort(&self) {
        self.client_aborts.inc();
    }

    /// Renders the text exposition, refreshing state gauges from their owners.
    pub fn render(&self, coordinator: &Coordinator, store: &StoreStats) -> Vec<u8> {
        let counts = coordinator.counts();
        self.inflight.set(counts.inflight as i64);
        self.waiters.set(counts.waiters as i64);
        self.held.set(store.held.load(Ordering::Relaxed) as i64);
        self.store_entries
            .set(store.entries.load(Ordering::Relaxed) as i64);
        self.store_bytes
            .set(store.bytes.load(Ordering::Relaxed) as i64);
        for (reason, total) in [
            ("capacity", &store.evicted_capacity),
            ("expired", &store.evicted_expired),
        ] {
            let c = self.store_evictions.with_label_values(&[reason]);
            let now = total.load(Ordering::Relaxed);
            c.inc_by(now.saturating_sub(c.get()));
        }
        let mut out = Vec::with_capacity(16 * 1024);
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding cannot fail");
        out
    }
}

/// The metrics listener: `/metrics`, `/healthz` (process up), `/readyz` (listeners bound and
/// at least one healthy backend).
pub struct MetricsApp {
    /// Metric families.
    pub metrics: Arc<Metrics>,
    /// For the in-flight gauges.
    pub coordinator: Arc<Coordinator>,
    /// For the store gauges.
    pub store: Arc<StoreStats>,
    /// Readiness: set once listeners are bound.
    pub ready: Arc<AtomicBool>,
    /// Readiness: at least one backend healthy.
    pub upstream: Arc<crate::upstream::Upstream>,
}

#[async_trait::async_trait]
impl ServeHttp for MetricsApp {
    async fn response(&self, session: &mut ServerSession) -> http::Response<Vec<u8>> {
        let path = session.req_header().uri.path().to_string();
        let (status, ctype, body) = match path.as_str() {
            "/metrics" => (
                200,
                "text/plain; version=0.0.4",
                self.metrics.render(&self.coordinator, &self.store),
            ),
            "/healthz" => (200, "text/plain", b"ok\n".to_vec()),
            "/readyz" => {
                if !self.ready.load(Ordering::Relaxed) {
                    (503, "text/plain", b"listeners not bound\n".to_vec())
                } else if !self.upstream.any_healthy() {
                    (503, "text/plain", b"no healthy backend\n".to_vec())
                } else {
                    (200, "text/plain", b"ready\n".to_vec())
                }
            }
            _ => (404, "text/plain", b"not found\n".to_vec()),
        };
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, ctype)
            .header(http::header::CONTENT_LENGTH, body.len())
            .body(body)
            .expect("static response parts")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_discriminants_index_the_cached_series() {
        for (i, o) in Outcome::ALL.into_iter().enumerate() {
            assert_eq!(o as usize, i, "{o:?}");
        }
    }

    #[test]
    fn requests_land_in_their_route_and_outcome_series() {
        let m = Metrics::new(vec!["default".into(), "api".into()]);
        m.request(RouteId(1), Outcome::Replayed, Duration::from_millis(3));
        m.request(RouteId(7), Outcome::Leader, Duration::from_millis(3));
        let c = |r: &str, o: &str| m.requests.with_label_values(&[r, o]).get();
        assert_eq!(c("api", "replayed"), 1);
        assert_eq!(c("api", "leader"), 0);
        // An id this table never issued counts as the default route, as its label says.
        assert_eq!(c("default", "leader"), 1);
        let h = m.request_duration.with_label_values(&["api", "replayed"]);
        assert_eq!(h.get_sample_count(), 1);
    }
}
