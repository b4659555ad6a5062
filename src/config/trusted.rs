//! `[server] trusted_proxies`: the networks whose forwarding headers idem believes.
//!
//! A peer in one of them is a front proxy (nginx, HAProxy, a load balancer): its
//! `X-Forwarded-*` and `Forwarded` claims are kept and extended, and the client address is
//! derived through it. Any other peer is the client itself. The rules that use this are in
//! `crate::http::client_addr` and `crate::http::forward`.
//!
//! Written as CIDRs (`"10.0.0.0/8"`, `"2001:db8::/32"`) or single addresses (`"192.0.2.7"`).
//! A network with host bits set (`"10.0.0.1/8"`) is refused rather than truncated: in a trust
//! list a typo must not silently widen or move what is trusted. IPv4-mapped IPv6 peers
//! (`::ffff:127.0.0.1`, what a dual-stack listener reports for an IPv4 client) are matched as
//! the IPv4 address they carry.

use ipnet::IpNet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The trusted networks, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TrustedProxies {
    nets: Vec<IpNet>,
    local: bool,
}

impl TrustedProxies {
    /// Parses one entry of the list; the error says what to write instead.
    pub(crate) fn parse_entry(entry: &str) -> Result<IpNet, String> {
        let entry = entry.trim();
        if let Ok(ip) = entry.parse::<IpAddr>() {
            return Ok(IpNet::from(ip.to_canonical()));
        }
        let net: IpNet = entry.parse().map_err(|_| {
            format!(
                "{entry:?} is not an IP network; write it like \"10.0.0.0/8\", \"2001:db8::/32\" or \"192.0.2.7\""
            )
        })?;
        if net.trunc() != net {
            return Err(format!(
                "{entry:?} has bits set past its prefix length; write the network as {:?}",
                net.trunc().to_string()
            ));
        }
        Ok(net)
    }

    /// The resolved list.
    pub(crate) fn new(nets: Vec<IpNet>) -> TrustedProxies {
        let mut t = TrustedProxies { nets, local: false };
        t.local = t.contains(Ipv4Addr::LOCALHOST.into()) || t.contains(Ipv6Addr::LOCALHOST.into());
        t
    }

    /// Whether `ip` is a trusted proxy.
    pub(crate) fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.nets.iter().any(|n| n.contains(&ip))
    }

    /// Whether a peer without an IP address (a Unix-socket client) is trusted: such a peer
    /// is a local process, so it is trusted exactly when loopback is (the default list
    /// trusts it, `[]` does not).
    pub(crate) fn trusts_local(&self) -> bool {
        self.local
    }
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

    #[test]
    fn networks_and_single_addresses_match_what_they_cover() {
        let t = trusted(&["10.0.0.0/8", "2001:db8::/32", "192.0.2.7"]);
        assert!(t.contains(ip("10.255.0.1")));
        assert!(t.contains(ip("2001:db8::1")));
        assert!(t.contains(ip("192.0.2.7")));
        assert!(!t.contains(ip("192.0.2.8")));
        assert!(!t.contains(ip("11.0.0.1")));
        assert!(!t.contains(ip("2001:db9::1")));
    }

    #[test]
    fn ipv4_mapped_peers_match_ipv4_networks() {
        let t = trusted(&["127.0.0.0/8"]);
        assert!(t.contains(ip("::ffff:127.0.0.1")));
        assert!(!t.contains(ip("::ffff:128.0.0.1")));
    }

    #[test]
    fn unix_socket_peers_are_trusted_as_loopback_is() {
        assert!(trusted(&["127.0.0.0/8", "::1/128"]).trusts_local());
        assert!(trusted(&["::1/128"]).trusts_local());
        assert!(!trusted(&[]).trusts_local());
        assert!(!trusted(&["10.0.0.0/8"]).trusts_local());
    }

    #[test]
    fn bad_entries_say_what_to_write() {
        let e = TrustedProxies::parse_entry("10.0.0.1/8").unwrap_err();
        assert!(e.contains("\"10.0.0.0/8\""), "{e}");
        let e = TrustedProxies::parse_entry("localhost").unwrap_err();
        assert!(e.contains("is not an IP network"), "{e}");
        assert!(TrustedProxies::parse_entry("10.0.0.0/33").is_err());
    }
}
