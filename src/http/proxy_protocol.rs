//! `[server] proxy_protocol = true`: every connection to a proxy listener starts with a
//! PROXY protocol header (HAProxy's `send-proxy` / `send-proxy-v2`, AWS NLB, ...), version 1
//! (text) or 2 (binary), parsed by the `ppp` crate.
//!
//! The header's source address becomes the connection's peer: in the socket digest Pingora
//! reports as the client address, so the trust decision, `X-Forwarded-For` and the access
//! log all see it. A `LOCAL` (v2) or `UNKNOWN` (v1) header, and a v2 header for a family
//! without an IP source (Unix), keep the connection's own peer, as the specification asks
//! (the proxy's own health checks send them).
//!
//! A connection whose first bytes are not a valid PROXY header is closed without an answer
//! (logged at debug): on such a listener, anything else is a client that bypassed the
//! proxy, and answering it would let it claim any address in `X-Forwarded-For`. The header
//! must arrive within the first-bytes deadline (`keepalive_timeout`,
//! `crate::http::first_bytes`). Bytes after the header are put back for the HTTP layer.

use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::{GetSocketDigest, SocketDigest};
use ppp::{v1, v2, HeaderResult, PartialResult};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use tokio::io::AsyncReadExt;

/// Largest v2 header: 16 fixed bytes and a 16-bit length. (v1 is at most 107 bytes.)
const MAX_HEADER: usize = 16 + u16::MAX as usize;

/// What the bytes read so far are.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// A prefix of a valid header: read more.
    Incomplete,
    /// Not a PROXY header, and no more bytes can make one.
    Invalid(String),
    /// A header of `len` bytes naming `source` (`None`: keep the connection's own peer).
    Complete {
        /// Header length; what follows belongs to the client.
        len: usize,
        /// The client's address as the proxy saw it.
        source: Option<SocketAddr>,
    },
}

/// Parses the start of a connection.
pub(crate) fn parse(buf: &[u8]) -> Parsed {
    let result = HeaderResult::parse(buf);
    if result.is_incomplete() {
        return Parsed::Incomplete;
    }
    match result {
        HeaderResult::V1(Ok(h)) => Parsed::Complete {
            len: h.header.len(),
            source: match h.addresses {
                v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                v1::Addresses::Unknown => None,
            },
        },
        HeaderResult::V2(Ok(h)) => Parsed::Complete {
            len: h.len(),
            source: match (h.command, h.addresses) {
                (v2::Command::Local, _) => None,
                (_, v2::Addresses::IPv4(a)) => {
                    Some(SocketAddr::new(IpAddr::V4(a.source_address), a.source_port))
                }
                (_, v2::Addresses::IPv6(a)) => {
                    Some(SocketAddr::new(IpAddr::V6(a.source_address), a.source_port))
                }
                (_, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
            },
        },
        HeaderResult::V1(Err(e)) => Parsed::Invalid(format!("PROXY v1: {e}")),
        HeaderResult::V2(Err(e)) => Parsed::Invalid(format!("PROXY v2: {e}")),
    }
}

/// Reads the PROXY header off `stream`, makes its source the peer, and puts back what
/// follows it. An `Err` means the connection must be closed (the reason, for the log).
pub(crate) async fn accept(stream: &mut L4Stream) -> Result<(), String> {
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 256];
    let (len, source) = loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
        if n == 0 {
            return Err("closed before a complete PROXY header".to_string());
        }
        buf.extend_from_slice(&chunk[..n]);
        match parse(&buf) {
            Parsed::Incomplete if buf.len() < MAX_HEADER => continue,
            Parsed::Incomplete => return Err("PROXY header too long".to_string()),
            Parsed::Invalid(why) => return Err(why),
            Parsed::Complete { len, source } => break (len, source),
        }
    };
    stream.rewind(&buf[len..]);
    if let Some(source) = source {
        let digest = SocketDigest::from_raw_fd(stream.as_raw_fd());
        // A fresh digest: nothing has read the peer yet, so the cell is empty.
        let _ = digest.peer_addr.set(Some(PeerAddr::Inet(source)));
        stream.set_socket_digest(digest);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(len: usize, source: Option<&str>) -> Parsed {
        Parsed::Complete {
            len,
            source: source.map(|s| s.parse().unwrap()),
        }
    }

    #[test]
    fn v1_headers_name_the_source() {
        let tcp4 = b"PROXY TCP4 198.51.100.9 127.0.0.1 40000 8080\r\nGET / HTTP/1.1\r\n";
        assert_eq!(parse(tcp4), complete(46, Some("198.51.100.9:40000")));
        let tcp6 = b"PROXY TCP6 2001:db8::1 ::1 443 8080\r\n";
        assert_eq!(parse(tcp6), complete(tcp6.len(), Some("[2001:db8::1]:443")));
        let unknown = b"PROXY UNKNOWN\r\nGET";
        assert_eq!(parse(unknown), complete(15, None));
    }

    #[test]
    fn v2_headers_name_the_source_unless_local() {
        // HAProxy's send-proxy-v2 for 127.0.0.3:51000 -> 127.0.0.1:8080 (as the fixture test
        // in tests/it/forwarding.rs captures it).
        let mut v2 = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
        v2.extend_from_slice(&[127, 0, 0, 3, 127, 0, 0, 1]);
        v2.extend_from_slice(&51000u16.to_be_bytes());
        v2.extend_from_slice(&8080u16.to_be_bytes());
        let len = v2.len();
        v2.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(parse(&v2), complete(len, Some("127.0.0.3:51000")));
        // LOCAL: the proxy speaking for itself.
        let mut local = b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00".to_vec();
        let len = local.len();
        local.extend_from_slice(b"GET");
        assert_eq!(parse(&local), complete(len, None));
    }

    #[test]
    fn prefixes_wait_for_more_and_anything_else_is_refused() {
        assert_eq!(parse(b"PROXY TCP4 198.51"), Parsed::Incomplete);
        assert_eq!(parse(b"\r\n\r\n\0\r\nQU"), Parsed::Incomplete);
        assert_eq!(parse(b"PRO"), Parsed::Incomplete);
        for not_proxy in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"PROXY TCP4 not-an-ip 127.0.0.1 1 2\r\n",
        ] {
            assert!(
                matches!(parse(not_proxy), Parsed::Invalid(_)),
                "{:?}",
                String::from_utf8_lossy(not_proxy)
            );
        }
    }
}
