//! Who sent a request: the peer idem received it from, whether that peer is a trusted
//! proxy, and the client address derived through trusted hops.
//!
//! Pure rules over addresses and header values, no sockets: the peer comes in as the
//! address Pingora reports for the connection (the PROXY header's source when the listener
//! speaks the PROXY protocol, see `crate::http::proxy_protocol`).
//!
//! **Client address** (decision; nginx's `real_ip_recursive on` does the same): from an
//! untrusted peer, the peer itself. From a trusted one, `X-Forwarded-For` is read right to
//! left (its lines in order, each line's entries in order): trusted addresses are skipped,
//! and the first untrusted one is the client; when every entry is trusted, the leftmost is.
//! An entry that is not an address (`unknown`, an obfuscated identifier, garbage) ends the
//! walk: the client is then the last hop idem could vouch for (the trusted address to its
//! right), never something a client could have written. Entries may carry a port
//! (`192.0.2.1:5000`, `[2001:db8::1]:443`), which is dropped. `Forwarded` is not read for
//! this: the front proxies people run all write `X-Forwarded-For`, and two sources could
//! disagree. It is computed once per request into the request context, for the access
//! log and for per-client limits.

use crate::config::trusted::TrustedProxies;
use std::net::{IpAddr, SocketAddr};

/// The hop a request came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Peer {
    /// Its address; `None` for a peer without one (a Unix-socket client).
    pub(crate) addr: Option<IpAddr>,
    /// Whether its forwarding headers are believed.
    pub(crate) trusted: bool,
    /// Whether the request came over TLS (a `[server.tls]` listener): `https` as idem saw it.
    pub(crate) tls: bool,
}

impl Peer {
    /// The peer at `addr` under `trusted`. An IPv4-mapped IPv6 address (a dual-stack
    /// listener's view of an IPv4 client) is the IPv4 address it carries, for the trust
    /// decision and in every header idem writes.
    pub(crate) fn of(addr: Option<IpAddr>, trusted: &TrustedProxies, tls: bool) -> Peer {
        let addr = addr.map(|a| a.to_canonical());
        Peer {
            addr,
            tls,
            trusted: match addr {
                Some(a) => trusted.contains(a),
                None => trusted.trusts_local(),
            },
        }
    }
}

/// The client address of a request from `peer` whose `X-Forwarded-For` lines are
/// `forwarded_for` (in the order received). See the module doc.
pub(crate) fn client_addr<'a, I>(
    peer: Peer,
    forwarded_for: I,
    trusted: &TrustedProxies,
) -> Option<IpAddr>
where
    I: DoubleEndedIterator<Item = &'a [u8]>,
{
    if !peer.trusted {
        return peer.addr;
    }
    let mut client = peer.addr;
    for line in forwarded_for.rev() {
        for entry in line.rsplit(|b| *b == b',') {
            let entry = entry.trim_ascii();
            if entry.is_empty() {
                continue;
            }
            let Some(ip) = parse_entry(entry) else {
                return client;
            };
            client = Some(ip);
            if !trusted.contains(ip) {
                return client;
            }
        }
    }
    client
}

/// One `X-Forwarded-For` entry: an address, optionally bracketed (IPv6) and with a port.
fn parse_entry(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?;
    let ip = text
        .parse::<IpAddr>()
        .ok()
        .or_else(|| text.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            text.strip_prefix('[')
                .and_then(|t| t.strip_suffix(']'))
                .and_then(|t| t.parse::<IpAddr>().ok())
        })?;
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted(list: &[&str]) -> TrustedProxies {
        TrustedProxies::new(
            list.iter()
                .map(|e| TrustedProxies::parse_entry(e).unwrap())
                .collect(),
        )
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    /// The client of a request from `peer` with `lines` of `X-Forwarded-For`.
    fn client(t: &TrustedProxies, peer: Option<&str>, lines: &[&str]) -> Option<IpAddr> {
        let peer = Peer::of(peer.map(ip), t, false);
        client_addr(peer, lines.iter().map(|l| l.as_bytes()), t)
    }

    #[test]
    fn an_untrusted_peer_is_the_client_whatever_it_claims() {
        let t = trusted(&["10.0.0.0/8"]);
        assert_eq!(
            client(&t, Some("203.0.113.9"), &["198.51.100.1"]),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            client(&t, Some("203.0.113.9"), &[]),
            Some(ip("203.0.113.9"))
        );
    }

    #[test]
    fn trusted_hops_are_skipped_right_to_left_across_lines() {
        let t = trusted(&["10.0.0.0/8", "127.0.0.0/8"]);
        // client 198.51.100.1 -> proxy 10.0.0.2 -> proxy 10.0.0.3 -> idem
        assert_eq!(
            client(
                &t,
                Some("10.0.0.3"),
                &["203.0.113.7, 198.51.100.1", "10.0.0.2"]
            ),
            Some(ip("198.51.100.1")),
            "a spoofed entry left of the first untrusted one is never the client"
        );
        // Every hop trusted: the leftmost.
        assert_eq!(
            client(&t, Some("127.0.0.1"), &["10.0.0.9, 10.0.0.2"]),
            Some(ip("10.0.0.9"))
        );
        // A trusted peer that forwarded nothing: the peer.
        assert_eq!(client(&t, Some("127.0.0.1"), &[]), Some(ip("127.0.0.1")));
    }

    #[test]
    fn entries_with_ports_brackets_and_spaces_are_addresses() {
        let t = trusted(&["127.0.0.0/8"]);
        for entry in ["198.51.100.1:5000", " 198.51.100.1 ", "::ffff:198.51.100.1"] {
            assert_eq!(
                client(&t, Some("127.0.0.1"), &[entry]),
                Some(ip("198.51.100.1")),
                "{entry:?}"
            );
        }
        for entry in ["[2001:db8::1]:443", "[2001:db8::1]", "2001:db8::1"] {
            assert_eq!(
                client(&t, Some("127.0.0.1"), &[entry]),
                Some(ip("2001:db8::1")),
                "{entry:?}"
            );
        }
        // Empty entries (a trailing comma) are skipped.
        assert_eq!(
            client(&t, Some("127.0.0.1"), &["198.51.100.1,,"]),
            Some(ip("198.51.100.1"))
        );
    }

    #[test]
    fn a_malformed_entry_stops_at_the_last_hop_idem_can_vouch_for() {
        let t = trusted(&["10.0.0.0/8", "127.0.0.0/8"]);
        assert_eq!(
            client(&t, Some("127.0.0.1"), &["198.51.100.1, unknown, 10.0.0.2"]),
            Some(ip("10.0.0.2"))
        );
        assert_eq!(
            client(&t, Some("127.0.0.1"), &["_hidden"]),
            Some(ip("127.0.0.1"))
        );
    }

    #[test]
    fn peers_are_canonical_and_unix_peers_trusted_as_loopback() {
        let t = trusted(&["127.0.0.0/8"]);
        let p = Peer::of(Some(ip("::ffff:127.0.0.1")), &t, false);
        assert_eq!(
            p,
            Peer {
                addr: Some(ip("127.0.0.1")),
                trusted: true,
                tls: false
            }
        );
        assert!(Peer::of(None, &t, false).trusted);
        assert!(!Peer::of(None, &trusted(&[]), false).trusted);
        // A trusted Unix-socket peer: the walk starts at the first entry.
        assert_eq!(
            client(&t, None, &["198.51.100.1"]),
            Some(ip("198.51.100.1"))
        );
        assert_eq!(client(&trusted(&[]), None, &["198.51.100.1"]), None);
    }
}
