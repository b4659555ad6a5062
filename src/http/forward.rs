//! The request head idem forwards upstream: end-to-end headers only, `Host`, and the
//! forwarding headers that tell the app who the client is.
//!
//! One set of rules ([`set_forwarding_headers`]) for every request idem forwards: the
//! pass-through path (Pingora's copy of the request, in `upstream_request_filter`), a
//! leader's detached call ([`upstream_request`]) and a consumed body forwarded by idem
//! itself (`crate::http::body`). Whether the peer is trusted is decided once per request
//! ([`crate::http::client_addr::Peer`]).
//!
//! From a **trusted** peer (`[server] trusted_proxies`):
//! * `X-Forwarded-For`: every line, in order, joined into one with `", "`, and the peer's
//!   address appended (a Unix-socket peer has none to append).
//! * `X-Forwarded-Proto`, `-Host`, `-Port`: kept as sent. A missing `X-Forwarded-Proto` is
//!   set to what idem saw: `https` on a TLS listener, `http` otherwise. A missing `-Host` or `-Port` stays
//!   missing: filling it from idem's own view would mix two hops' answers (behind nginx,
//!   `Host` is often idem's own address, not the one the client asked for).
//! * `Forwarded` (RFC 7239): every line joined, and `for=<peer>` appended (IPv6 quoted and
//!   bracketed, `for="[2001:db8::1]"`).
//!
//! From **any other** peer, its claims are replaced with what idem saw:
//! `X-Forwarded-For: <peer>`, `X-Forwarded-Proto: https` on a TLS listener and `http`
//! otherwise, and `X-Forwarded-Host` / `-Port`, when it sent either, become the `Host` the
//! request carried (or its h2 `:authority`) and that authority's port, the scheme's (443 or
//! 80) when it names none (the port the client addressed). A `Forwarded` it sent becomes `for=<peer>`.
//!
//! Decisions: idem adds `X-Forwarded-Host`, `-Port` and `Forwarded` only where a request
//! carried them (a claim to keep or to replace). idem forwards `Host` unchanged, so the
//! first two would only repeat it, at a cost on every request. And apps that read both
//! forwarding styles (Spring's `ForwardedHeaderFilter`) prefer `Forwarded`: a
//! `Forwarded: for=...` idem invented beside a front proxy's `X-Forwarded-Proto: https`
//! would hide the proxy's scheme and host from them.

use crate::http::client_addr::Peer;
use crate::message::{connection_nominated, is_hop_by_hop};
use http::header::{self, GetAll, HeaderName};
use http::HeaderValue;
use pingora::http::RequestHeader;
use pingora::{Error, ErrorType};
use std::io::Write;
use std::net::IpAddr;

pub(crate) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");

/// Builds the request idem sends upstream for a buffered body: end-to-end headers, exact
/// `Content-Length`, forwarding headers, and `Accept-Encoding: identity` so that a stored
/// body can be replayed to any client (see docs/semantics.md, "Keys", content negotiation).
pub(crate) fn upstream_request(
    req: &RequestHeader,
    peer: Peer,
    body_len: usize,
) -> pingora::Result<RequestHeader> {
    let mut out = forwarded_request(req, peer)?;
    out.remove_header(&header::ACCEPT_ENCODING);
    out.insert_header(header::CONTENT_LENGTH, HeaderValue::from(body_len))?;
    out.insert_header(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    )?;
    Ok(out)
}

/// The request head as forwarded: end-to-end headers, `Host`, forwarding headers; framing
/// is left to the caller.
pub(crate) fn forwarded_request(req: &RequestHeader, peer: Peer) -> pingora::Result<RequestHeader> {
    let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut out = RequestHeader::build(
        req.method.clone(),
        path.as_bytes(),
        Some(req.headers.len() + 5),
    )?;
    let nominated = connection_nominated(&req.headers);
    for (name, value) in req.headers.iter() {
        if is_hop_by_hop(name) || nominated.contains(name) {
            continue;
        }
        out.append_header(name.clone(), value.clone())?;
    }
    if out.headers.get(header::HOST).is_none() {
        if let Some(auth) = req.uri.authority() {
            out.insert_header(header::HOST, auth.as_str())?;
        }
    }
    set_forwarding_headers(&mut out, peer)?;
    Ok(out)
}

/// Rewrites `req`'s forwarding headers in place for a request from `peer` (see the module
/// doc for the rules).
pub(crate) fn set_forwarding_headers(req: &mut RequestHeader, peer: Peer) -> pingora::Result<()> {
    match forwarded_for(req, peer)? {
        Edit::Keep => {}
        // Names as `&'static str`: Pingora's case-preserving map then keeps them without
        // a copy (a custom `HeaderName` is copied into it on every insert).
        Edit::Set(v) => req.insert_header("x-forwarded-for", v)?,
        Edit::Remove => {
            req.remove_header(&X_FORWARDED_FOR);
        }
    }
    match forwarded(req, peer)? {
        Edit::Keep => {}
        Edit::Set(v) => req.insert_header("forwarded", v)?,
        Edit::Remove => {
            req.remove_header(&header::FORWARDED);
        }
    }
    let (proto, default_port) = if peer.tls {
        ("https", "443")
    } else {
        ("http", "80")
    };
    if peer.trusted {
        if !req.headers.contains_key(X_FORWARDED_PROTO) {
            req.insert_header("x-forwarded-proto", HeaderValue::from_static(proto))?;
        }
        return Ok(());
    }
    req.insert_header("x-forwarded-proto", HeaderValue::from_static(proto))?;
    if !req.headers.contains_key(X_FORWARDED_HOST) && !req.headers.contains_key(X_FORWARDED_PORT) {
        return Ok(());
    }
    let host = req.headers.get(header::HOST).cloned().or_else(|| {
        req.uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    });
    match host {
        Some(host) => {
            let port = match authority_port(host.as_bytes()) {
                // A few bytes, copied: `HeaderValue` cannot share a slice of another one.
                Some(p) => HeaderValue::from_bytes(p).map_err(invalid("x-forwarded-port"))?,
                None => HeaderValue::from_static(default_port),
            };
            req.insert_header("x-forwarded-host", host)?;
            req.insert_header("x-forwarded-port", port)?;
        }
        None => {
            req.remove_header(&X_FORWARDED_HOST);
            req.remove_header(&X_FORWARDED_PORT);
        }
    }
    Ok(())
}

/// What to do with one forwarding header.
enum Edit {
    Keep,
    Set(HeaderValue),
    Remove,
}

fn forwarded_for(req: &RequestHeader, peer: Peer) -> pingora::Result<Edit> {
    let lines = req.headers.get_all(&X_FORWARDED_FOR);
    let mut buf = [0u8; 64];
    let addr = peer.addr.map(|ip| {
        // On the stack: the only allocation is the header value itself.
        let n = write_to(&mut buf, |w| write!(w, "{ip}"));
        &buf[..n]
    });
    if !peer.trusted {
        return Ok(match addr {
            Some(a) => Edit::Set(HeaderValue::from_bytes(a).map_err(invalid("x-forwarded-for"))?),
            None => Edit::Remove,
        });
    }
    let count = lines.iter().count();
    match (count, addr) {
        (0, None) | (1, None) => Ok(Edit::Keep),
        (0, Some(a)) => Ok(Edit::Set(
            HeaderValue::from_bytes(a).map_err(invalid("x-forwarded-for"))?,
        )),
        (_, addr) => joined(&lines, addr, "x-forwarded-for").map(Edit::Set),
    }
}

fn forwarded(req: &RequestHeader, peer: Peer) -> pingora::Result<Edit> {
    let lines = req.headers.get_all(header::FORWARDED);
    let count = lines.iter().count();
    if count == 0 {
        return Ok(Edit::Keep);
    }
    let mut buf = [0u8; 64];
    let node = peer.addr.map(|ip| {
        let n = write_to(&mut buf, |w| match ip {
            IpAddr::V4(v4) => write!(w, "for={v4}"),
            IpAddr::V6(v6) => write!(w, "for=\"[{v6}]\""),
        });
        &buf[..n]
    });
    if !peer.trusted {
        return Ok(match node {
            Some(n) => Edit::Set(HeaderValue::from_bytes(n).map_err(invalid("forwarded"))?),
            None => Edit::Remove,
        });
    }
    if count == 1 && node.is_none() {
        return Ok(Edit::Keep);
    }
    joined(&lines, node, "forwarded").map(Edit::Set)
}

/// `lines` joined with `", "`, then `last`.
fn joined(
    lines: &GetAll<'_, HeaderValue>,
    last: Option<&[u8]>,
    name: &'static str,
) -> pingora::Result<HeaderValue> {
    let len = lines.iter().map(|l| l.len() + 2).sum::<usize>() + last.map_or(0, <[u8]>::len);
    let mut out = Vec::with_capacity(len);
    for part in lines.iter().map(HeaderValue::as_bytes).chain(last) {
        if !out.is_empty() {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(part.trim_ascii());
    }
    HeaderValue::from_maybe_shared(bytes::Bytes::from(out)).map_err(invalid(name))
}

/// Formats into `buf`, returning the length written (an address fits in 64 bytes).
fn write_to(buf: &mut [u8; 64], f: impl FnOnce(&mut &mut [u8]) -> std::io::Result<()>) -> usize {
    let mut w = &mut buf[..];
    let _ = f(&mut w);
    64 - w.len()
}

/// The client's header values could not make one: a bad request, not idem's failure.
fn invalid<E>(name: &'static str) -> impl Fn(E) -> Box<Error> {
    move |_| Error::explain(ErrorType::InvalidHTTPHeader, name).into_down()
}

/// The port an authority (`host`, `host:port`, `[v6]:port`) names, if any. Hand-written:
/// `http::uri::Authority` would copy the value to parse it, on every request.
fn authority_port(authority: &[u8]) -> Option<&[u8]> {
    let colon = authority.iter().rposition(|b| *b == b':')?;
    let (host, port) = (&authority[..colon], &authority[colon + 1..]);
    // A bare IPv6 address has colons of its own; a port follows only a bracketed one.
    let bracketed_or_plain = host.ends_with(b"]") || !host.contains(&b':');
    let numeric = !port.is_empty() && port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
    (bracketed_or_plain && numeric).then_some(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The forwarding headers of a request with `headers` from `peer` after the rules: each
    /// name with every line it has, in order.
    fn rewrite(headers: &[(&str, &str)], peer: Option<&str>, trusted: bool) -> Vec<String> {
        let mut req = RequestHeader::build("POST", b"/", None).unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        let peer = Peer {
            addr: peer.map(|p| p.parse().unwrap()),
            trusted,
            tls: false,
        };
        set_forwarding_headers(&mut req, peer).unwrap();
        let names = [
            "x-forwarded-for",
            "x-forwarded-proto",
            "x-forwarded-host",
            "x-forwarded-port",
            "forwarded",
        ];
        names
            .iter()
            .flat_map(|n| {
                req.headers
                    .get_all(*n)
                    .iter()
                    .map(move |v| format!("{n}: {}", v.to_str().unwrap()))
            })
            .collect()
    }

    #[test]
    fn an_untrusted_peers_claims_are_replaced_with_what_idem_saw() {
        let claims = [
            ("host", "shop.example:8080"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "bank.example"),
            ("x-forwarded-port", "443"),
            ("forwarded", "for=203.0.113.7;proto=https"),
        ];
        assert_eq!(
            rewrite(&claims, Some("192.0.2.9"), false),
            [
                "x-forwarded-for: 192.0.2.9",
                "x-forwarded-proto: http",
                "x-forwarded-host: shop.example:8080",
                "x-forwarded-port: 8080",
                "forwarded: for=192.0.2.9",
            ]
        );
        // An authority without a port: the scheme's.
        assert_eq!(
            rewrite(
                &[("host", "shop.example"), ("x-forwarded-port", "443")],
                Some("2001:db8::1"),
                false
            ),
            [
                "x-forwarded-for: 2001:db8::1",
                "x-forwarded-proto: http",
                "x-forwarded-host: shop.example",
                "x-forwarded-port: 80",
            ]
        );
        // Nothing claimed: no host, port or Forwarded is added (Host says it already).
        assert_eq!(
            rewrite(&[("host", "shop.example")], Some("2001:db8::1"), false),
            ["x-forwarded-for: 2001:db8::1", "x-forwarded-proto: http"]
        );
        // No authority at all: no host or port to report.
        assert_eq!(
            rewrite(
                &[("x-forwarded-host", "bank.example")],
                Some("192.0.2.9"),
                false
            ),
            ["x-forwarded-for: 192.0.2.9", "x-forwarded-proto: http"]
        );
    }

    #[test]
    fn a_trusted_peers_lines_are_joined_in_order_and_extended() {
        let sent = [
            ("host", "127.0.0.1:8080"),
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.1, 192.0.2.5"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "shop.example"),
            ("forwarded", "for=203.0.113.7;proto=https"),
            ("forwarded", "for=198.51.100.1"),
        ];
        assert_eq!(
            rewrite(&sent, Some("::1"), true),
            [
                "x-forwarded-for: 203.0.113.7, 198.51.100.1, 192.0.2.5, ::1",
                "x-forwarded-proto: https",
                // Sent without a port: left out, not filled from idem's view.
                "x-forwarded-host: shop.example",
                "forwarded: for=203.0.113.7;proto=https, for=198.51.100.1, for=\"[::1]\"",
            ]
        );
    }

    #[test]
    fn a_trusted_peer_that_claimed_no_scheme_gets_what_idem_saw() {
        assert_eq!(
            rewrite(&[("host", "shop.example")], Some("127.0.0.1"), true),
            ["x-forwarded-for: 127.0.0.1", "x-forwarded-proto: http"]
        );
        assert_eq!(
            rewrite(
                &[
                    ("host", "127.0.0.1:8080"),
                    ("x-forwarded-for", "203.0.113.7"),
                    ("x-forwarded-port", "443")
                ],
                Some("127.0.0.1"),
                true
            ),
            [
                "x-forwarded-for: 203.0.113.7, 127.0.0.1",
                "x-forwarded-proto: http",
                "x-forwarded-port: 443",
            ]
        );
    }

    #[test]
    fn a_peer_without_an_address_appends_nothing() {
        let sent = [
            ("x-forwarded-for", "203.0.113.7"),
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-proto", "https"),
            ("forwarded", "for=203.0.113.7"),
        ];
        assert_eq!(
            rewrite(&sent, None, true),
            [
                "x-forwarded-for: 203.0.113.7, 198.51.100.1",
                "x-forwarded-proto: https",
                "forwarded: for=203.0.113.7",
            ]
        );
        assert_eq!(rewrite(&sent, None, false), ["x-forwarded-proto: http"]);
    }

    #[test]
    fn authority_ports() {
        let port = |a: &str| authority_port(a.as_bytes()).map(|p| p.to_vec());
        assert_eq!(port("a.example:8443"), Some(b"8443".to_vec()));
        assert_eq!(port("[2001:db8::1]:443"), Some(b"443".to_vec()));
        assert_eq!(port("a.example"), None);
        assert_eq!(port("[2001:db8::1]"), None);
        assert_eq!(port("2001:db8::1"), None);
        assert_eq!(port("a.example:"), None);
        assert_eq!(port("a.example:x"), None);
    }

    #[test]
    fn the_forwarded_head_keeps_end_to_end_headers_and_adds_forwarding() {
        let mut req = RequestHeader::build("POST", b"/p?q=1", None).unwrap();
        for (n, v) in [
            ("host", "shop.example"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "dropped"),
            ("accept-encoding", "gzip"),
            ("content-type", "text/plain"),
        ] {
            req.append_header(n.to_string(), v).unwrap();
        }
        let peer = Peer {
            addr: Some("203.0.113.9".parse().unwrap()),
            trusted: false,
            tls: false,
        };
        let out = upstream_request(&req, peer, 3).unwrap();
        let mut got: Vec<String> = out
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        got.sort();
        assert_eq!(
            got,
            [
                "accept-encoding: identity",
                "content-length: 3",
                "content-type: text/plain",
                "host: shop.example",
                "x-forwarded-for: 203.0.113.9",
                "x-forwarded-proto: http",
            ]
        );
        assert_eq!(out.uri, "/p?q=1");
    }

    #[test]
    fn a_request_over_tls_is_https_as_idem_saw_it() {
        let over_tls = |headers: &[(&str, &str)], trusted: bool| {
            let mut req = RequestHeader::build("POST", b"/", None).unwrap();
            for (n, v) in headers {
                req.append_header(n.to_string(), *v).unwrap();
            }
            let peer = Peer {
                addr: Some("203.0.113.9".parse().unwrap()),
                trusted,
                tls: true,
            };
            set_forwarding_headers(&mut req, peer).unwrap();
            ["x-forwarded-proto", "x-forwarded-port"]
                .map(|n| req.headers.get(n).map(|v| v.to_str().unwrap().to_string()))
        };
        let s = |v: &str| Some(v.to_string());
        // An untrusted peer's claims give way to what idem saw, the scheme's port included.
        assert_eq!(
            over_tls(
                &[
                    ("host", "shop.example"),
                    ("x-forwarded-proto", "http"),
                    ("x-forwarded-port", "80")
                ],
                false
            ),
            [s("https"), s("443")]
        );
        // A trusted proxy that said nothing: https; one that spoke: its word.
        assert_eq!(over_tls(&[], true), [s("https"), None]);
        assert_eq!(
            over_tls(&[("x-forwarded-proto", "http")], true),
            [s("http"), None]
        );
    }
}
