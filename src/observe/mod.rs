//! What an operator sees: Prometheus metrics ([`metrics`]) and the access log ([`access_log`]).

pub(crate) mod access_log;
pub(crate) mod metrics;
