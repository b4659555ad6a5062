//! What of a request goes into its key: the scope (authority and scope headers) and the
//! fingerprint's head (method, path, query, fingerprint headers), read from the request
//! head as sent. The derivation itself is [`crate::key`]'s.

use crate::config::route::RoutePolicy;
use crate::key::{FingerprintHasher, KeyDeriver, Scope};
use http::header;
use pingora::http::RequestHeader;

/// The scope of a request: its authority and the route's scope headers.
pub(crate) fn scope(keys: &KeyDeriver, req: &RequestHeader, route: &RoutePolicy) -> Scope {
    let authority = req
        .headers
        .get(header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or_default();
    keys.scope(
        authority,
        route.scope_headers.iter().map(|h| {
            req.headers
                .get_all(h.as_str())
                .iter()
                .map(|v| v.as_bytes())
                .collect()
        }),
    )
}

/// A fingerprint of the request head, ready for the body.
pub(crate) fn fingerprint(
    keys: &KeyDeriver,
    req: &RequestHeader,
    route: &RoutePolicy,
) -> FingerprintHasher {
    keys.fingerprint(
        req.method.as_str().as_bytes(),
        req.uri.path().as_bytes(),
        req.uri.query().unwrap_or("").as_bytes(),
        route.fingerprint_headers.iter().map(|h| {
            (
                h.as_str(),
                req.headers
                    .get_all(h.as_str())
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect(),
            )
        }),
    )
}
