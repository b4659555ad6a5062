//! Admission: from the request head alone, does idem deduplicate this request, pass it
//! through untouched, or refuse it?
//!
//! Decided before any body byte is read, because a body idem consumed can never be handed
//! back to Pingora's proxy path. The one decision that needs the body (a chunked body that
//! turns out larger than `max_body`) is made by the body reader.

use crate::config::file::Mode;
use crate::config::route::RoutePolicy;
use crate::http::problem::Problem;
use crate::key::parse_idempotency_key;
use http::{header, HeaderMap, Method};

/// What to do with a request, decided from its head.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// Pass through Pingora's proxy path, streamed.
    PassThrough(Bypass),
    /// Answer with a problem, without reading the body.
    Refuse(Problem),
    /// Read the body, derive the key, and coordinate.
    Dedup {
        /// The decoded key (from the route's `key_header`), if any; `None` on a fingerprint
        /// route.
        key: Option<Vec<u8>>,
    },
    /// Shadow route: pass through untouched (no mark), and derive the key from the body as
    /// it streams through, to count would-be duplicates ([`crate::dedup::shadow::table`]).
    Shadow {
        /// The decoded key (from the route's `key_header`), if any; keyless requests count
        /// by fingerprint.
        key: Option<Vec<u8>>,
    },
}

/// Why a request passes through, which decides its `Cache-Status` and its metric outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Bypass {
    /// The route does not deduplicate (`off`, or `shadow`): nothing is marked.
    Unmarked,
    /// The route deduplicates, this request does not (ineligible method, upgrade, no key on
    /// a `keyed` route): `Cache-Status: idem; fwd=bypass`, outcome `bypass`.
    Marked,
    /// The body is over `max_body` and no protection was asked for: marked as bypass,
    /// counted as `too_large`.
    TooLarge,
}

/// Decides admission for a request on `route`.
pub(crate) fn admit(route: &RoutePolicy, method: &Method, headers: &HeaderMap) -> Admission {
    match route.mode {
        Mode::Off => return Admission::PassThrough(Bypass::Unmarked),
        Mode::Shadow => return shadow(route, method, headers),
        Mode::Keyed | Mode::Fingerprint | Mode::RequireKey => {}
    }
    if !route.is_eligible_method(method) || is_upgrade(headers) {
        return Admission::PassThrough(Bypass::Marked);
    }
    let key = match parse_idempotency_key(
        headers
            .get_all(&route.key_header)
            .iter()
            .map(|v| v.as_bytes()),
    ) {
        Ok(k) => k,
        Err(e) => return Admission::Refuse(Problem::KeyMalformed(e, route.key_header.clone())),
    };
    let protected = key.is_some() || route.mode == Mode::RequireKey;
    match (&key, route.mode) {
        (None, Mode::Keyed) => return Admission::PassThrough(Bypass::Marked),
        (None, Mode::RequireKey) => {
            return Admission::Refuse(Problem::MissingKey(route.key_header.clone()))
        }
        _ => {}
    }
    if declared_length(headers).is_some_and(|n| n > route.max_body) {
        return if protected {
            // A client that asked for protection never silently loses it.
            Admission::Refuse(Problem::TooLarge)
        } else {
            Admission::PassThrough(Bypass::TooLarge)
        };
    }
    Admission::Dedup { key }
}

/// Shadow routes measure what an enforcing `fingerprint` route would deduplicate. Requests it
/// would not deduplicate (ineligible method, upgrade, body over `max_body`) or would refuse
/// (malformed key) are passed through uncounted.
fn shadow(route: &RoutePolicy, method: &Method, headers: &HeaderMap) -> Admission {
    let pass = Admission::PassThrough(Bypass::Unmarked);
    if !route.is_eligible_method(method)
        || is_upgrade(headers)
        || declared_length(headers).is_some_and(|n| n > route.max_body)
    {
        return pass;
    }
    match parse_idempotency_key(
        headers
            .get_all(&route.key_header)
            .iter()
            .map(|v| v.as_bytes()),
    ) {
        Ok(key) => Admission::Shadow { key },
        Err(_) => pass,
    }
}

/// `Content-Length`, when present and valid (Pingora has already rejected conflicting framing).
pub(crate) fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

/// A protocol upgrade (WebSocket) is a tunnel, never deduplicated. An `h2c` upgrade offer
/// is no longer here: `crate::http::normalize` dropped it, so that request is admitted as
/// plain HTTP/1.1.
fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::settings::Settings;
    use crate::key::KeyHeaderError;
    use http::HeaderName;
    use std::path::Path;

    fn route(mode: &str) -> RoutePolicy {
        let toml = format!("[dedup]\nmode = \"{mode}\"\nmax_body = \"10B\"\n");
        Settings::from_toml_str(&toml, Path::new("t.toml"))
            .unwrap()
            .default_route
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in pairs {
            h.append(*n, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn modes_decide_keyless_requests() {
        let none = headers(&[]);
        assert_eq!(
            admit(&route("keyed"), &Method::POST, &none),
            Admission::PassThrough(Bypass::Marked)
        );
        assert_eq!(
            admit(&route("fingerprint"), &Method::POST, &none),
            Admission::Dedup { key: None }
        );
        assert_eq!(
            admit(&route("require-key"), &Method::POST, &none),
            Admission::Refuse(Problem::MissingKey(HeaderName::from_static(
                "idempotency-key"
            )))
        );
        assert_eq!(
            admit(
                &route("off"),
                &Method::POST,
                &headers(&[("idempotency-key", "k")])
            ),
            Admission::PassThrough(Bypass::Unmarked)
        );
    }

    #[test]
    fn shadow_routes_pass_everything_through_and_hash_what_dedup_would_take() {
        let shadow = route("shadow");
        let none = headers(&[]);
        let plain = Admission::PassThrough(Bypass::Unmarked);
        assert_eq!(
            admit(&shadow, &Method::POST, &none),
            Admission::Shadow { key: None }
        );
        assert_eq!(
            admit(
                &shadow,
                &Method::POST,
                &headers(&[("idempotency-key", "k")])
            ),
            Admission::Shadow {
                key: Some(b"k".to_vec())
            }
        );
        assert_eq!(admit(&shadow, &Method::GET, &none), plain);
        assert_eq!(
            admit(
                &shadow,
                &Method::POST,
                &headers(&[("content-length", "11")])
            ),
            plain
        );
        let repeated = headers(&[("idempotency-key", "a"), ("idempotency-key", "b")]);
        assert_eq!(admit(&shadow, &Method::POST, &repeated), plain);
    }

    #[test]
    fn ineligible_methods_pass_through_even_with_a_key() {
        let h = headers(&[("idempotency-key", "k")]);
        assert_eq!(
            admit(&route("require-key"), &Method::GET, &h),
            Admission::PassThrough(Bypass::Marked)
        );
    }

    #[test]
    fn bad_keys_are_refused_before_the_body() {
        let h = headers(&[("idempotency-key", "a"), ("idempotency-key", "b")]);
        assert!(matches!(
            admit(&route("keyed"), &Method::POST, &h),
            Admission::Refuse(Problem::KeyMalformed(_, _))
        ));
    }

    #[test]
    fn the_key_comes_from_the_routes_key_header_only() {
        let toml = "[dedup]\nmode = \"require-key\"\nkey_header = \"X-Idempotency-Key\"\n";
        let route = Settings::from_toml_str(toml, Path::new("t.toml"))
            .unwrap()
            .default_route;
        let x = HeaderName::from_static("x-idempotency-key");
        assert_eq!(
            admit(
                &route,
                &Method::POST,
                &headers(&[("x-idempotency-key", "\"k\"")])
            ),
            Admission::Dedup {
                key: Some(b"k".to_vec())
            }
        );
        // The default header is an ordinary header on this route.
        assert_eq!(
            admit(&route, &Method::POST, &headers(&[("idempotency-key", "k")])),
            Admission::Refuse(Problem::MissingKey(x.clone()))
        );
        let refused = admit(
            &route,
            &Method::POST,
            &headers(&[("x-idempotency-key", "a b")]),
        );
        assert_eq!(
            refused,
            Admission::Refuse(Problem::KeyMalformed(KeyHeaderError::Malformed, x))
        );
        let Admission::Refuse(p) = refused else {
            unreachable!()
        };
        let info = p.info();
        assert_eq!(info.title, "Malformed X-Idempotency-Key");
        assert_eq!(info.detail, "The X-Idempotency-Key must be a quoted string or a token of visible ASCII without quotes, commas or spaces.");
    }

    #[test]
    fn oversized_bodies_refused_only_when_protection_was_asked_for() {
        let big = headers(&[("content-length", "11")]);
        assert_eq!(
            admit(&route("fingerprint"), &Method::POST, &big),
            Admission::PassThrough(Bypass::TooLarge)
        );
        let big_keyed = headers(&[("content-length", "11"), ("idempotency-key", "k")]);
        assert_eq!(
            admit(&route("fingerprint"), &Method::POST, &big_keyed),
            Admission::Refuse(Problem::TooLarge)
        );
        let fits = headers(&[("content-length", "10"), ("idempotency-key", "k")]);
        assert_eq!(
            admit(&route("keyed"), &Method::POST, &fits),
            Admission::Dedup {
                key: Some(b"k".to_vec())
            }
        );
    }
}
