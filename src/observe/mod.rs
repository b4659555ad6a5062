//! What an operator sees: Prometheus metrics ([`metrics`]), the access log ([`access_log`]),
//! the process log and Pingora's lines in it ([`logging`]), request ids and the leader a
//! waiter or a replay names ([`request_id`]), and OpenTelemetry traces ([`trace`]).

pub(crate) mod access_log;
pub(crate) mod logging;
pub(crate) mod metrics;
pub(crate) mod request_id;
pub(crate) mod trace;
