//! Built-in defaults, one place, quoted by docs/configuration.md.

use std::time::Duration;
/// `[server] listen`
pub(crate) const LISTEN: &str = "127.0.0.1:8080";
/// `[server] unix_socket_mode`: owner and group may connect (a front proxy running as
/// another user joins idem's group, or the mode is widened on purpose).
pub(crate) const UNIX_SOCKET_MODE: u32 = 0o660;
/// `[server] grace_period`
pub(crate) const GRACE_PERIOD: Duration = Duration::from_secs(330);
/// `[server] keepalive_timeout`
pub(crate) const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(60);
/// `[server] body_read_timeout`
pub(crate) const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// `[server] max_waiters`
pub(crate) const MAX_WAITERS: usize = 100_000;
/// `[server] max_waiters_per_client` for `max_waiters`: a tenth, so that one address can
/// never take the whole budget.
pub(crate) fn max_waiters_per_client(max_waiters: usize) -> usize {
    (max_waiters / 10).max(1)
}
/// `[server] max_body_buffer`: request bodies idem holds at once (being read, hashed, or
/// waiting to be written upstream by a leader).
pub(crate) const MAX_BODY_BUFFER: u64 = 256 * 1024 * 1024;
/// `[server] max_body_buffer_per_client` for `max_body_buffer`: a tenth.
pub(crate) fn max_body_buffer_per_client(max_body_buffer: u64) -> u64 {
    (max_body_buffer / 10).max(1)
}
/// `[server] trusted_proxies`: loopback, where a front proxy on the same host connects from.
pub(crate) const TRUSTED_PROXIES: [&str; 2] = ["127.0.0.0/8", "::1/128"];
/// `[upstream] backends`
pub(crate) const BACKEND: &str = "127.0.0.1:8000";
/// `[upstream] connect_timeout`
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// `[upstream] read_timeout`
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(300);
/// `[upstream] total_timeout`
pub(crate) const TOTAL_TIMEOUT: Duration = Duration::from_secs(310);
/// `[upstream] pool_idle_timeout`: below the shortest keep-alive timeout of the common app
/// servers (gunicorn 2 s; uvicorn, Node and Apache 5 s), so that an idle connection is
/// closed by idem before its backend closes it. idem also learns each backend's own
/// behaviour (`upstream::reuse`), which only ever shortens this.
pub(crate) const POOL_IDLE_TIMEOUT: Duration = Duration::from_millis(1500);
/// `[upstream] resolve_interval`: how often backend names are resolved again.
pub(crate) const RESOLVE_INTERVAL: Duration = Duration::from_secs(10);
/// `[upstream] health_check_interval`
pub(crate) const HEALTH_CHECK_INTERVAL: Duration = Duration::from_secs(5);
/// `[metrics] listen`
pub(crate) const METRICS_LISTEN: &str = "127.0.0.1:9464";
/// `[store] max_entries`
pub(crate) const MAX_ENTRIES: usize = 100_000;
/// `[store] max_bytes`
pub(crate) const MAX_BYTES: u64 = 256 * 1024 * 1024;
/// `[store] on_store_error`
pub(crate) const ON_STORE_ERROR: crate::config::file::OnStoreError =
    crate::config::file::OnStoreError::FailOpen;
/// `[store] timeout`
pub(crate) const STORE_TIMEOUT: Duration = Duration::from_secs(1);
/// `[store] liveness_ttl`
pub(crate) const LIVENESS_TTL: Duration = Duration::from_secs(3);
/// `[store] key_prefix`
pub(crate) const KEY_PREFIX: &str = "idem:";
/// `[store] poll_interval`
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(250);
/// `[store] max_keys_per_scope`: a tenth of `max_entries`, but at least this many, so
/// that a small store is not split into tiny shares.
pub(crate) const MIN_KEYS_PER_SCOPE: usize = 1000;
/// `[store] max_keys_per_scope` for a store of `max_entries`.
pub(crate) fn max_keys_per_scope(max_entries: usize) -> usize {
    (max_entries / 10).max(MIN_KEYS_PER_SCOPE)
}
/// `[store] max_bytes_per_client` for a store of `max_bytes`: a tenth.
pub(crate) fn max_bytes_per_client(max_bytes: u64) -> u64 {
    (max_bytes / 10).max(1)
}
/// `[store] max_pinned` for a store of `max_entries`: half, so that at least the other half
/// of the store keeps stored responses whatever is in flight or held.
pub(crate) fn max_pinned(max_entries: usize) -> usize {
    (max_entries / 2).max(1)
}
/// `[dedup] key_header`
pub(crate) const KEY_HEADER: &str = "idempotency-key";
/// `[dedup] methods`
pub(crate) const METHODS: [&str; 4] = ["POST", "PUT", "PATCH", "DELETE"];
/// `[dedup] scope_headers`: the credentials HTTP and the usual APIs send, and the cookies.
pub(crate) const SCOPE_HEADERS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "x-auth-token",
    "cookie",
];
/// Response headers that carry a credential minted for one client, always: they reach only
/// the leader's client unless the scope identifies the caller (`http::reply`).
pub(crate) const CREDENTIAL_HEADERS_ALWAYS: [&str; 4] = [
    "set-cookie",
    "set-cookie2",
    "authentication-info",
    "proxy-authentication-info",
];
/// `[dedup] credential_headers`: response headers treated as credentials besides those.
pub(crate) const CREDENTIAL_HEADERS: [&str; 1] = ["x-auth-token"];
/// `[dedup] fingerprint_headers`
pub(crate) const FINGERPRINT_HEADERS: [&str; 1] = ["content-type"];
/// `[dedup] ttl`
pub(crate) const TTL: Duration = Duration::from_secs(24 * 3600);
/// `[dedup] fingerprint_ttl`
pub(crate) const FINGERPRINT_TTL: Duration = Duration::from_secs(60);
/// `[dedup] max_waiters_per_key`
pub(crate) const MAX_WAITERS_PER_KEY: usize = 10_000;
/// `[dedup] max_body`
pub(crate) const MAX_BODY: u64 = 1024 * 1024;
/// `[dedup] max_response_body`
pub(crate) const MAX_RESPONSE_BODY: u64 = 1024 * 1024;
/// `[dedup] store_statuses`
/// 401 and 403 are not kept: the request was refused before it ran, so a retry may run,
/// and keeping them would let a caller fill the store by minting credentials
/// (`Authorization: Bearer <random>`) that the app refuses.
pub(crate) const STORE_STATUSES: [&str; 8] =
    ["2xx", "3xx", "4xx", "!401", "!403", "!408", "!425", "!429"];
