//! What of a request goes into its key: the scope (authority and the caller's credentials)
//! and the fingerprint's head (method, path in normal form, query, fingerprint headers).
//! The derivation itself is [`crate::key`]'s.
//!
//! **Scope values**: the route's `scope_headers` (default `Authorization`,
//! `Proxy-Authorization`, `X-Api-Key`, `Api-Key`, `X-Auth-Token`, `Cookie`), each as sent,
//! then the `scope_cookies` by name when the route names any (they replace the whole
//! `Cookie` header, so that a rotating analytics cookie does not split a retry from its
//! original). An empty value (`Authorization:`) counts as absent.
//!
//! **Does the scope identify its caller?** Yes when it holds a value of a scope header
//! other than `Cookie`, or of a named session cookie: whoever shares such a scope holds the
//! same credential. A whole `Cookie` header is not a credential (`consent=yes` is the same
//! for everyone), and neither is the authority. What follows (`crate::http::reply`):
//! credentials in responses and `private` responses reach only the leader's client unless
//! the scope identifies its caller.

use crate::config::route::RoutePolicy;
use crate::key::{FingerprintHasher, KeyDeriver, Scope};
use http::header;
use pingora::http::RequestHeader;

/// Who is asking, as far as the request says.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Caller {
    /// The scope.
    pub(crate) scope: Scope,
    /// The scope holds a credential that identifies its caller (see the module doc).
    pub(crate) identified: bool,
}

/// The scope of a request and whether it identifies its caller (see the module doc).
pub(crate) fn caller(keys: &KeyDeriver, req: &RequestHeader, route: &RoutePolicy) -> Caller {
    let authority = req
        .headers
        .get(header::HOST)
        .map(|v| v.as_bytes())
        .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()))
        .unwrap_or_default();
    let named_cookies = !route.scope_cookies.is_empty();
    let mut identified = false;
    let mut values: Vec<Vec<&[u8]>> =
        Vec::with_capacity(route.scope_headers.len() + route.scope_cookies.len());
    for h in &route.scope_headers {
        let cookie = h == header::COOKIE.as_str();
        if cookie && named_cookies {
            continue;
        }
        let sent: Vec<&[u8]> = req
            .headers
            .get_all(h)
            .iter()
            .map(|v| v.as_bytes())
            .filter(|v| !v.trim_ascii().is_empty())
            .collect();
        identified |= !cookie && !sent.is_empty();
        values.push(sent);
    }
    for name in &route.scope_cookies {
        let sent = cookie_values(req, name);
        identified |= !sent.is_empty();
        values.push(sent);
    }
    Caller {
        scope: keys.scope(authority, values.into_iter()),
        identified,
    }
}

/// The non-empty values of the cookie `name` (exact, case-sensitive) in the request's
/// `Cookie` header (split h2 fields are joined by `crate::http::normalize` first).
fn cookie_values<'a>(req: &'a RequestHeader, name: &str) -> Vec<&'a [u8]> {
    req.headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let eq = pair.iter().position(|b| *b == b'=')?;
            let value = pair[eq + 1..].trim_ascii();
            (pair[..eq].trim_ascii() == name.as_bytes() && !value.is_empty()).then_some(value)
        })
        .collect()
}

/// A fingerprint of the request head, ready for the body. The path is in normal form
/// (`crate::http::normalize`): what the backend is asked.
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
                    .get_all(h)
                    .iter()
                    .map(|v| v.as_bytes())
                    .collect(),
            )
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::settings::Settings;
    use std::path::Path;

    fn route(extra: &str) -> RoutePolicy {
        Settings::from_toml_str(&format!("[dedup]\n{extra}"), Path::new("t.toml"))
            .unwrap()
            .default_route
    }

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("POST", b"/x", None).unwrap();
        r.append_header("host", "h").unwrap();
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn credentials_identify_the_caller_cookies_only_when_named_and_empty_is_absent() {
        let keys = KeyDeriver::new(Some("a secret of sixteen+ bytes"));
        let default = route("");
        let of = |r: &RoutePolicy, h: &[(&str, &str)]| caller(&keys, &req(h), r);
        let anonymous = of(&default, &[]);
        assert!(!anonymous.identified);
        // An empty credential is no credential: the anonymous scope.
        for empty in [
            ("authorization", ""),
            ("authorization", "  "),
            ("x-api-key", ""),
        ] {
            let c = of(&default, &[empty]);
            assert_eq!(c.scope, anonymous.scope, "{empty:?}");
            assert!(!c.identified);
        }
        for cred in [
            ("authorization", "Bearer a"),
            ("proxy-authorization", "Basic a"),
            ("x-api-key", "k1"),
            ("api-key", "k1"),
            ("x-auth-token", "t"),
        ] {
            let c = of(&default, &[cred]);
            assert!(c.identified, "{cred:?}");
            assert_ne!(c.scope, anonymous.scope, "{cred:?}");
        }
        // A whole Cookie header separates scopes but identifies nobody.
        let consent = of(&default, &[("cookie", "consent=yes")]);
        assert!(!consent.identified);
        assert_ne!(consent.scope, anonymous.scope);
        // Named session cookies replace the whole header: other cookies do not split the
        // scope, and the session cookie identifies the caller.
        let named = route("scope_cookies = [\"sessionid\"]\n");
        let a = of(&named, &[("cookie", "sessionid=abc; _ga=1")]);
        let b = of(&named, &[("cookie", "_ga=2; sessionid=abc")]);
        assert_eq!(a.scope, b.scope);
        assert!(a.identified);
        let other = of(&named, &[("cookie", "sessionid=def")]);
        assert_ne!(a.scope, other.scope);
        let none = of(&named, &[("cookie", "consent=yes; sessionid=")]);
        assert!(!none.identified);
        assert_eq!(none.scope, of(&named, &[]).scope);
    }
}
