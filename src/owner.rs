//! Who a key belongs to, for the limits that keep one caller from costing everyone else.
//!
//! Two identities, because neither alone is enough (DESIGN section 2: a scope is not a proof
//! of identity):
//! * the **scope** ([`ScopeId`]): what the request says about who is asking (host and
//!   credentials as sent). Anyone can mint scopes at will (`Authorization: Bearer <random>`),
//!   so a limit per scope protects callers behind one address from each other, never the
//!   deployment from one caller;
//! * the **client** ([`ClientId`]): the address the request came from, derived through
//!   trusted proxies (`crate::http::client_addr`). A caller has only the addresses it
//!   controls: an IPv4 address counts as itself, an IPv6 address by its /64 (one host or
//!   customer is routinely given a whole /64, and picks any address in it); a request
//!   without an address (a local peer on a Unix socket, with no `X-Forwarded-For`) is one
//!   client, "local".
//!
//! Every limit that protects other callers rests on the client, and applies per scope too.

use crate::key::ScopeId;
use std::net::IpAddr;

/// A client address as the limits count it (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct ClientId(pub(crate) [u8; 16]);

/// Requests without an address: `ff..ff` is multicast, never a client's address.
const LOCAL: ClientId = ClientId([0xff; 16]);

impl ClientId {
    /// The client of a request from `addr` (`None`: no address, a local peer).
    pub(crate) fn of(addr: Option<IpAddr>) -> ClientId {
        match addr.map(|a| a.to_canonical()) {
            None => LOCAL,
            Some(IpAddr::V4(v4)) => ClientId(v4.to_ipv6_mapped().octets()),
            Some(IpAddr::V6(v6)) => {
                let mut id = [0u8; 16];
                id[..8].copy_from_slice(&v6.octets()[..8]);
                ClientId(id)
            }
        }
    }
}

impl Default for ClientId {
    fn default() -> ClientId {
        LOCAL
    }
}

impl std::fmt::Debug for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if *self == LOCAL {
            return f.write_str("ClientId(local)");
        }
        let v6 = std::net::Ipv6Addr::from(self.0);
        match v6.to_ipv4_mapped() {
            Some(v4) => write!(f, "ClientId({v4})"),
            None => write!(f, "ClientId({v6}/64)"),
        }
    }
}

/// The scope and the client of a request: what its keys are counted against.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub(crate) struct Owner {
    /// Who the request says it is.
    pub(crate) scope: ScopeId,
    /// Where it came from.
    pub(crate) client: ClientId,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn ipv4_counts_as_itself_ipv6_by_its_64_and_no_address_as_local() {
        assert_ne!(ClientId::of(ip("192.0.2.1")), ClientId::of(ip("192.0.2.2")));
        assert_eq!(
            ClientId::of(ip("::ffff:192.0.2.1")),
            ClientId::of(ip("192.0.2.1")),
            "a dual-stack listener's view of an IPv4 client"
        );
        assert_eq!(
            ClientId::of(ip("2001:db8:1:2::1")),
            ClientId::of(ip("2001:db8:1:2:ffff:ffff:ffff:ffff")),
            "one /64"
        );
        assert_ne!(
            ClientId::of(ip("2001:db8:1:2::1")),
            ClientId::of(ip("2001:db8:1:3::1"))
        );
        assert_eq!(ClientId::of(None), ClientId::default());
        assert_ne!(ClientId::of(ip("::")), ClientId::of(None));
        assert_ne!(ClientId::of(ip("0.0.0.0")), ClientId::of(ip("::")));
        assert_eq!(
            format!("{:?}", ClientId::of(ip("192.0.2.1"))),
            "ClientId(192.0.2.1)"
        );
        assert_eq!(
            format!("{:?}", ClientId::of(ip("2001:db8::7"))),
            "ClientId(2001:db8::/64)"
        );
    }
}
