//! Metrics of the Redis store, registered beside idem's own families only when
//! `store.kind = "redis"` (a memory-store idem exports exactly what it did before).
//!
//! * `idem_store_operations_total{op, result}`: the family DESIGN section 7 names, with the
//!   Redis operations: `claim` (claimed, hit, inflight, mismatch, full: Redis refused the
//!   write, error), `settle` (ok, fenced, full, error), `peek` (ok, error), `liveness`
//!   (alive, dead, error), `heartbeat`, `subscribe`, `connect` (ok, error), `purge`
//!   (deleted, absent, busy: a claim or a held key, error), `forget` (deleted, absent,
//!   error: a record deleted because this replica's copy was evicted). Errors are the
//!   `result="error"` series.
//! * `idem_store_operation_duration_seconds{op}`: round-trip latency per operation.
//! * `idem_store_unavailable_total{policy}`: leaders that could not use Redis, by the
//!   `on_store_error` policy applied (`fail-open`: served with local dedup only;
//!   `fail-closed`: answered 503).
//! * `idem_store_connected`: 1 while the connection to Redis is up.
//! * `idem_store_primary_switches_total`: failovers this replica followed (Sentinel named
//!   another primary on a reconnection).

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};
use std::time::Instant;

/// Every op with its possible results, for series pre-registration.
const OPS: [(&str, &[&str]); 9] = [
    (
        "claim",
        &["claimed", "hit", "inflight", "mismatch", "full", "error"],
    ),
    ("settle", &["ok", "fenced", "full", "error"]),
    ("peek", &["ok", "error"]),
    ("liveness", &["alive", "dead", "error"]),
    ("heartbeat", &["ok", "error"]),
    ("subscribe", &["ok", "error"]),
    ("connect", &["ok", "error"]),
    ("purge", &["deleted", "absent", "busy", "error"]),
    ("forget", &["deleted", "absent", "error"]),
];

/// The Redis store's metric handles.
pub(crate) struct StoreMetrics {
    operations: IntCounterVec,
    duration: HistogramVec,
    unavailable: IntCounterVec,
    /// 1 while connected.
    pub(crate) connected: IntGauge,
    /// Primaries Sentinel named other than the one before (failovers seen).
    pub(crate) primary_switches: IntCounter,
}

impl StoreMetrics {
    /// Registers the families in `registry` and creates every series; `operations` is idem's
    /// `idem_store_operations_total` family, already registered there.
    pub(crate) fn register(registry: &Registry, operations: IntCounterVec) -> StoreMetrics {
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "idem_store_operation_duration_seconds",
                "Round-trip time of Redis store operations.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5,
            ]),
            &["op"],
        )
        .expect("valid metric");
        let unavailable = IntCounterVec::new(
            Opts::new(
                "idem_store_unavailable_total",
                "Leaders that could not use the Redis store, by the on_store_error policy applied.",
            ),
            &["policy"],
        )
        .expect("valid metric");
        let connected = IntGauge::new(
            "idem_store_connected",
            "1 while the connection to the Redis store is up.",
        )
        .expect("valid metric");
        let primary_switches = IntCounter::new(
            "idem_store_primary_switches_total",
            "Times Redis Sentinel named a primary other than the one before (failovers seen by this replica).",
        )
        .expect("valid metric");
        for c in [
            Box::new(duration.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(unavailable.clone()),
            Box::new(connected.clone()),
            Box::new(primary_switches.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        for (op, results) in OPS {
            duration.with_label_values(&[op]);
            for result in results {
                operations.with_label_values(&[op, result]);
            }
        }
        for policy in ["fail-open", "fail-closed"] {
            unavailable.with_label_values(&[policy]);
        }
        StoreMetrics {
            operations,
            duration,
            unavailable,
            connected,
            primary_switches,
        }
    }

    /// One operation that started at `started`.
    pub(crate) fn observe(&self, op: &str, result: &str, started: Instant) {
        self.operations.with_label_values(&[op, result]).inc();
        self.duration
            .with_label_values(&[op])
            .observe(started.elapsed().as_secs_f64());
    }

    /// A leader could not use Redis; `policy` is what it did.
    pub(crate) fn unavailable(&self, policy: &str) {
        self.unavailable.with_label_values(&[policy]).inc();
    }
}
