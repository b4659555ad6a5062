//! Shared harness for idem's integration tests: a fault-injecting backend,
//! a supervisor for the real `idem` binary, config builders and clients.
//!
//! Everything lives in one test binary so the crate links once; each test
//! module uses only part of this API, hence the blanket allowances.
#![allow(dead_code, unused_imports)]

pub mod appserver;
pub mod backend;
pub mod client;
pub mod config;
pub mod haproxy;
pub mod metrics;
pub mod nginx;
pub mod problem;
pub mod proxy;
pub mod tls;
pub mod tools;
// Private, so that `use crate::support::*` does not shadow the `redis` crate.
mod redis;

use std::time::Duration;

pub use self::redis::{value_kind, RedisCluster, RedisSentinel, RedisServer, TlsFiles};
pub use appserver::{AppServer, AppServerKind, Execution, KEEP_ALIVE, POST_RESPONSE_WORK};
pub use backend::{free_addr, free_port, pattern, Backend, Counts, Gate, RecordedRequest, Row};
pub use client::{
    chunked_body, client, client_from, client_with_timeout, h2c_client, http_request, raw_request,
    send_and_abort, send_expecting_continue, RawConn, RawError, RawResponse,
};
pub use config::{config_for, Config, Route};
pub use haproxy::HaProxy;
pub use metrics::{
    find_metric, log_tail, metric, metric_or_zero, parse_sample, sample, scrape, series_id,
    wait_metric, wait_metric_sum, Exposition, Sample,
};
pub use nginx::Nginx;
pub use problem::{
    assert_problem, assert_problem_members, problem_json, refusal_cache_status, Answered,
    ReadResponse, PROBLEM_BASE,
};
pub use proxy::{Idem, IdemBuilder, TempDir};
pub use tls::{curl_tls, CurlResult, Leaf, Pki, TlsClient, TlsConn};
pub use tools::{
    app_path, python, require_tool, run_bounded, run_python, App, Inherited, Supervised,
};

/// Upper bound for every event-driven wait in the harness. Generous on
/// purpose: the machine is shared, and a wait that expires is a test failure,
/// never a way of pacing a test.
pub const WAIT_TIMEOUT: Duration = Duration::from_secs(10);
