//! Who may use the admin listener, checked before anything it serves.
//!
//! Listening on loopback keeps other hosts out, not other programs on this host, and not a
//! browser on it: a page on any site can make the browser send requests to 127.0.0.1, and
//! with DNS rebinding (its own name re-resolved to 127.0.0.1) read the answers as
//! same-origin. So:
//! * **`Host` must name loopback**: `localhost`, an address in 127.0.0.0/8 or `[::1]`, with
//!   any port. A rebinding page's requests carry its own name: refused (403). So are
//!   requests without a `Host`.
//! * **No `Origin`**: browsers send it on cross-origin requests and on every non-GET
//!   request; curl, scripts and monitoring do not. Refused (403).
//! * **A bearer token** when configured (`[admin] token` or `token_file`): `Authorization:
//!   Bearer <token>`, compared in constant time; missing or wrong: 401 with
//!   `WWW-Authenticate: Bearer`. It keeps out local users and processes that can reach
//!   loopback but should not purge keys.
//!
//! Each refusal is logged at WARN (a browser or a process probing the admin listener is
//! worth knowing about) and counted in `idem_admin_refusals_total{reason}`.

use crate::config::settings::Secret;
use http::header;
use pingora::http::RequestHeader;
use std::net::IpAddr;

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// `Host` missing or not a loopback name (403).
    Host,
    /// An `Origin` header: a browser (403).
    Origin,
    /// The bearer token is missing or wrong (401).
    Token,
}

impl Refused {
    /// The metric label.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Refused::Host => "host",
            Refused::Origin => "origin",
            Refused::Token => "token",
        }
    }

    /// Status and the JSON error text.
    pub(crate) fn answer(self) -> (u16, &'static str) {
        match self {
            Refused::Host => (403, "the admin listener answers only requests whose Host names loopback (localhost, 127.0.0.1, [::1])"),
            Refused::Origin => (403, "the admin listener refuses requests from web pages (an Origin header)"),
            Refused::Token => (401, "the admin listener requires Authorization: Bearer <[admin] token>"),
        }
    }
}

/// Checks `req` (see the module doc).
pub(crate) fn check(req: &RequestHeader, token: Option<&Secret<String>>) -> Result<(), Refused> {
    let host = req
        .headers
        .get(header::HOST)
        .map(|h| h.as_bytes())
        .or_else(|| req.uri.authority().map(|a| a.as_str().as_bytes()));
    if !host.is_some_and(is_loopback_host) {
        return Err(Refused::Host);
    }
    if req.headers.contains_key(header::ORIGIN) {
        return Err(Refused::Origin);
    }
    if let Some(token) = token {
        let sent = req
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        // Equality of blake3 hashes is constant-time: no timing tells how much matched.
        if blake3::hash(sent.trim().as_bytes()) != blake3::hash(token.0.as_bytes()) {
            return Err(Refused::Token);
        }
    }
    Ok(())
}

/// `localhost`, an IPv4 loopback address or `[::1]`, with an optional port.
fn is_loopback_host(host: &[u8]) -> bool {
    let Ok(host) = std::str::from_utf8(host) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((v6, port)) if port.is_empty() || is_port(port) => v6,
            _ => return false,
        },
        None => match host.rsplit_once(':') {
            Some((name, port)) if is_port(port) => name,
            Some(_) => return false,
            None => host,
        },
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

fn is_port(s: &str) -> bool {
    s.strip_prefix(':').unwrap_or(s).parse::<u16>().is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(headers: &[(&str, &str)]) -> RequestHeader {
        let mut r = RequestHeader::build("GET", b"/flights", None).unwrap();
        for (n, v) in headers {
            r.append_header(n.to_string(), *v).unwrap();
        }
        r
    }

    #[test]
    fn only_loopback_host_names_are_served() {
        for ok in [
            "127.0.0.1:9465",
            "127.0.0.1",
            "127.1.2.3:1",
            "localhost",
            "LOCALHOST:9465",
            "[::1]:9465",
            "[::1]",
        ] {
            assert_eq!(check(&req(&[("host", ok)]), None), Ok(()), "{ok}");
        }
        for bad in [
            "attacker.example:9465",
            "attacker.example",
            "127.0.0.1.attacker.example",
            "localhost.attacker.example:9465",
            "10.0.0.1:9465",
            "[::2]:9465",
            "[::1]x",
            "127.0.0.1:99999",
            "",
        ] {
            assert_eq!(
                check(&req(&[("host", bad)]), None),
                Err(Refused::Host),
                "{bad}"
            );
        }
        assert_eq!(check(&req(&[]), None), Err(Refused::Host), "no Host");
    }

    #[test]
    fn browsers_are_refused_and_the_token_is_required_when_set() {
        let host = ("host", "127.0.0.1:9465");
        assert_eq!(
            check(&req(&[host, ("origin", "http://127.0.0.1:9465")]), None),
            Err(Refused::Origin)
        );
        let token = Secret("0123456789abcdef-admin".to_string());
        assert_eq!(check(&req(&[host]), Some(&token)), Err(Refused::Token));
        let wrong = ("authorization", "Bearer 0123456789abcdef-admiN");
        assert_eq!(
            check(&req(&[host, wrong]), Some(&token)),
            Err(Refused::Token)
        );
        let right = ("authorization", "Bearer 0123456789abcdef-admin");
        assert_eq!(check(&req(&[host, right]), Some(&token)), Ok(()));
        let basic = ("authorization", "Basic 0123456789abcdef-admin");
        assert_eq!(
            check(&req(&[host, basic]), Some(&token)),
            Err(Refused::Token)
        );
    }
}
