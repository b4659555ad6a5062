//! Routes: each one's policy, filled from `[dedup]` and the built-in defaults, and the one
//! longest-prefix match that picks the route of a request.

use crate::config::file::{Mode, OnConcurrent};
use http::Method;
use std::time::Duration;

/// Index of a route name in the metrics' label table (0 is the default route). The table
/// only grows: a configuration reload appends the names it introduces, so an id taken
/// before a reload stays valid after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RouteId(pub(crate) usize);

/// The route a request path matched.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteMatch<'a> {
    /// Metric label id.
    pub(crate) id: RouteId,
    /// The route's policy.
    pub(crate) policy: &'a RoutePolicy,
}

/// The index in `routes` of the route for `path` (in normal form, [`crate::path`]): the
/// longest matching `path_prefix`; `None` means the default route.
pub(crate) fn longest_prefix(routes: &[RoutePolicy], path: &str) -> Option<usize> {
    routes
        .iter()
        .enumerate()
        .filter(|(_, r)| on_segment_boundary(&r.path_prefix, path))
        .max_by_key(|(_, r)| r.path_prefix.len())
        .map(|(i, _)| i)
}

/// Whether `prefix` matches `path` on a segment boundary: `/api` matches `/api`, `/api/`
/// and `/api/x`, never `/apiary`; `/api/` matches what starts with it.
pub(crate) fn on_segment_boundary(prefix: &str, path: &str) -> bool {
    path.starts_with(prefix)
        && (prefix.ends_with('/')
            || path.len() == prefix.len()
            || path.as_bytes()[prefix.len()] == b'/')
}

/// One route with every field filled.
#[derive(Debug, Clone)]
pub(crate) struct RoutePolicy {
    /// Metric label and log name.
    pub(crate) name: String,
    /// Matched against the request path; the longest match wins.
    pub(crate) path_prefix: String,
    /// How eligible requests are treated.
    pub(crate) mode: Mode,
    /// The request header that carries the client's idempotency key (`Idempotency-Key` by
    /// default; `X-Idempotency-Key` where gateways use that name).
    pub(crate) key_header: http::HeaderName,
    /// Methods eligible for dedup.
    pub(crate) methods: Vec<Method>,
    /// Headers whose values join the authority in the scope, lowercase. Each but `cookie`
    /// identifies the caller when sent with a value (`crate::http::key_inputs`).
    pub(crate) scope_headers: Vec<http::HeaderName>,
    /// Cookies (by exact name) that join the scope instead of the whole `Cookie` header;
    /// each identifies the caller when sent with a value. Empty: the whole header, if
    /// `cookie` is in `scope_headers`.
    pub(crate) scope_cookies: Vec<String>,
    /// Response headers that carry a credential for one client (the four always withheld
    /// plus the configured ones), lowercase: withheld from every other client of a scope
    /// that does not identify its caller.
    pub(crate) credential_headers: Vec<http::HeaderName>,
    /// Headers whose values are part of the fingerprint, lowercase.
    pub(crate) fingerprint_headers: Vec<http::HeaderName>,
    /// Retention of keyed entries, from completion.
    pub(crate) ttl: Duration,
    /// Retention of fingerprint entries, from completion.
    pub(crate) fingerprint_ttl: Duration,
    /// What a request for a key in flight does.
    pub(crate) on_concurrent: OnConcurrent,
    /// How long a waiter waits before 409 in-progress.
    pub(crate) wait_timeout: Duration,
    /// Cap on waiters for one key.
    pub(crate) max_waiters_per_key: usize,
    /// Largest request body idem buffers and hashes.
    pub(crate) max_body: u64,
    /// Largest response body idem stores.
    pub(crate) max_response_body: u64,
    /// Which response statuses are stored.
    pub(crate) store_statuses: StatusSet,
    /// The upstream group: 0 is `[upstream]`, `i + 1` the i-th `[upstreams.NAME]` in name
    /// order (`Settings::groups`).
    pub(crate) upstream: usize,
}

impl RoutePolicy {
    /// How long a settled key is kept from completion: `ttl` for a request that carried an
    /// `Idempotency-Key`, `fingerprint_ttl` for one keyed by its fingerprint.
    pub(crate) fn retention(&self, idempotency_key: Option<&[u8]>) -> crate::outcome::Retention {
        crate::outcome::Retention {
            ttl: match idempotency_key {
                Some(_) => self.ttl,
                None => self.fingerprint_ttl,
            },
        }
    }

    /// Whether `method` is eligible for dedup on this route.
    pub(crate) fn is_eligible_method(&self, method: &Method) -> bool {
        self.methods.iter().any(|m| m == method)
    }
}

/// A set of HTTP status codes 100..=599, as a bitset.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct StatusSet([u64; 10]);

impl std::fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let codes: Vec<u16> = (100..600).filter(|c| self.contains(*c)).collect();
        write!(f, "StatusSet({} codes)", codes.len())
    }
}

impl StatusSet {
    /// Whether `code` is in the set.
    pub(crate) fn contains(&self, code: u16) -> bool {
        (100..600).contains(&code) && self.0[(code / 64) as usize] & (1 << (code % 64)) != 0
    }

    fn set(&mut self, code: u16, on: bool) {
        let (w, b) = ((code / 64) as usize, code % 64);
        if on {
            self.0[w] |= 1 << b;
        } else {
            self.0[w] &= !(1 << b);
        }
    }

    /// Parses entries like `"2xx"`, `"404"` and exclusions like `"!429"`, applied in order.
    pub(crate) fn parse(items: &[String]) -> Result<Self, String> {
        let mut set = StatusSet([0; 10]);
        for item in items {
            let (on, body) = match item.strip_prefix('!') {
                Some(rest) => (false, rest),
                None => (true, item.as_str()),
            };
            let range = if let Some(class) = body.strip_suffix("xx") {
                match class.parse::<u16>() {
                    Ok(c @ 1..=5) => c * 100..=c * 100 + 99,
                    _ => return Err(format!("{item:?} is not a status class; use 1xx to 5xx")),
                }
            } else {
                match body.parse::<u16>() {
                    Ok(c @ 100..=599) => c..=c,
                    _ => {
                        return Err(format!(
                            "{item:?} is not a status; use a code like \"404\", a class like \"2xx\" or an exclusion like \"!429\""
                        ))
                    }
                }
            };
            for code in range {
                set.set(code, on);
            }
        }
        Ok(set)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_match_on_segment_boundaries_only() {
        for (prefix, path, matched) in [
            ("/api", "/api", true),
            ("/api", "/api/", true),
            ("/api", "/api/x", true),
            ("/api", "/apiary", false),
            ("/api", "/ap", false),
            ("/api/", "/api/x", true),
            ("/api/", "/api", false),
            ("/", "/anything", true),
        ] {
            assert_eq!(
                on_segment_boundary(prefix, path),
                matched,
                "{prefix} {path}"
            );
        }
    }

    #[test]
    fn status_set_parses_classes_and_exclusions() {
        let s = StatusSet::parse(&["2xx".into(), "!204".into(), "404".into()]).unwrap();
        assert!(s.contains(200) && !s.contains(204) && s.contains(404) && !s.contains(403));
        assert!(StatusSet::parse(&["6xx".into()]).is_err());
        assert!(StatusSet::parse(&["99".into()]).is_err());
    }
}
