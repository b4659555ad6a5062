//! What a new client connection speaks, decided from its first bytes, within a deadline.
//!
//! idem's listeners speak HTTP/1.1 and h2c (HTTP/2 with prior knowledge). Left to itself,
//! Pingora tells them apart by waiting for 24 bytes (the length of the HTTP/2 preface) with
//! no timeout, which has two faults: a connection that sends nothing, or a few bytes, stays
//! open for good; and a complete HTTP/1 request shorter than 24 bytes (`OPTIONS /
//! HTTP/1.0` and an empty line, HAProxy's default health check, is 22) is never answered.
//!
//! idem decides itself: it reads until the bytes stop matching the preface (HTTP/1: no
//! request starts with `PRI * HTTP/2.0`, which RFC 9113 3.4 reserves for the preface) or
//! all 24 match (h2c), puts them back, and hands the connection to the matching Pingora
//! app: one with h2c detection off for HTTP/1 (no second wait), one with it on for h2c
//! (whose own peek finds the bytes at once). The first byte must come within
//! `[server] keepalive_timeout` (the value in force when the connection arrives), like any
//! idle keep-alive connection; a connection that sends nothing by then, or stops inside a
//! would-be preface, is closed without an answer and logged at debug. This runs once per
//! connection, not per request.
//!
//! With `[server] proxy_protocol = true`, the PROXY protocol header comes first and is read
//! within the same deadline ([`crate::http::proxy_protocol`]); the sniffing starts after it.
//!
//! On a TLS listener (`[server.tls]`) the TLS handshake takes the place of the sniffing
//! ([`crate::http::tls`]): after the PROXY header, if any, it must complete within the same
//! deadline, and ALPN then says HTTP/2 or HTTP/1.1 (the HTTP/1 app serves both: Pingora
//! reads the negotiated protocol). idem runs the handshake itself rather than letting
//! Pingora's listener do it: Pingora would log every failed handshake (a scanner, a client
//! that distrusts the certificate) at ERROR and wait 60 s for a silent one. Here a failed
//! or late handshake closes the connection with one debug line.

use crate::config::live::Live;
use crate::http::proxy_protocol;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::listeners::tls::Acceptor;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use std::sync::Arc;
use tokio::io::AsyncReadExt;

/// The HTTP/2 connection preface (RFC 9113 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    /// Anything that is not the HTTP/2 preface.
    Http1,
    /// The HTTP/2 preface, whole.
    H2c,
}

/// The protocol `first` bytes show, or `None` while they are still a prefix of the preface.
pub(crate) fn sniff(first: &[u8]) -> Option<Protocol> {
    let n = first.len().min(PREFACE.len());
    if first[..n] != PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == PREFACE.len() {
        Some(Protocol::H2c)
    } else {
        None
    }
}

/// Sends each new connection to the HTTP/1 or the h2c app, within the first-bytes deadline.
pub(crate) struct FirstBytesDeadline<H1, H2> {
    http1: Arc<H1>,
    h2c: Arc<H2>,
    live: Arc<Live>,
    /// Fixed at start-up, like the listeners themselves.
    proxy_protocol: bool,
    /// A TLS listener's handshake; `None` on cleartext listeners.
    tls: Option<Acceptor>,
}

impl<H1, H2> FirstBytesDeadline<H1, H2> {
    /// `http1` must not look for the h2c preface itself; `h2c` must. With `proxy_protocol`,
    /// every connection must start with a PROXY protocol header.
    pub(crate) fn new(
        http1: H1,
        h2c: H2,
        live: Arc<Live>,
        proxy_protocol: bool,
    ) -> FirstBytesDeadline<H1, H2> {
        FirstBytesDeadline {
            http1: Arc::new(http1),
            h2c: Arc::new(h2c),
            live,
            proxy_protocol,
            tls: None,
        }
    }

    /// The same for TLS listeners: each connection's handshake comes first.
    pub(crate) fn with_tls(mut self, acceptor: Acceptor) -> FirstBytesDeadline<H1, H2> {
        self.tls = Some(acceptor);
        self
    }
}

/// Why a new connection is closed before any request.
enum Unread {
    /// Closed, reset or unreadable: nothing to answer.
    Io,
    /// No valid PROXY protocol header on a listener that requires one.
    Proxy(String),
    /// The TLS handshake failed.
    Tls(String),
}

/// Reads until [`sniff`] decides, then puts the bytes back.
async fn read_first_bytes(stream: &mut TcpStream) -> std::io::Result<Protocol> {
    let mut buf = [0u8; PREFACE.len()];
    let mut have = 0;
    let protocol = loop {
        let n = stream.read(&mut buf[have..]).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        have += n;
        if let Some(p) = sniff(&buf[..have]) {
            break p;
        }
    };
    stream.rewind(&buf[..have]);
    Ok(protocol)
}

impl<H1, H2> FirstBytesDeadline<H1, H2>
where
    H1: ServerApp + Send + Sync + 'static,
{
    /// A TLS listener's connection: the PROXY header if required, then the handshake, both
    /// within `deadline`; then HTTP/2 or HTTP/1.1 as ALPN says.
    async fn serve_tls(
        self: &Arc<Self>,
        acceptor: &Acceptor,
        mut tcp: Box<TcpStream>,
        deadline: std::time::Duration,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let handshake = async {
            if self.proxy_protocol {
                proxy_protocol::accept(&mut tcp)
                    .await
                    .map_err(Unread::Proxy)?;
            }
            acceptor
                .tls_handshake(*tcp)
                .await
                .map_err(|e| Unread::Tls(e.to_string()))
        };
        let tls = match tokio::time::timeout(deadline, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(Unread::Tls(why))) => {
                tracing::debug!(reason = %why, "closing a client connection whose TLS handshake failed");
                return None;
            }
            Ok(Err(Unread::Proxy(why))) => {
                tracing::debug!(
                    reason = %why,
                    "closing a client connection without a valid PROXY protocol header"
                );
                return None;
            }
            Ok(Err(Unread::Io)) => return None,
            Err(_) => {
                tracing::debug!(
                    ?deadline,
                    "closing a client connection that did not complete its TLS handshake within keepalive_timeout"
                );
                return None;
            }
        };
        self.http1.process_new(Box::new(tls), shutdown).await
    }
}

#[async_trait]
impl<H1, H2> ServerApp for FirstBytesDeadline<H1, H2>
where
    H1: ServerApp + Send + Sync + 'static,
    H2: ServerApp + Send + Sync + 'static,
{
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        // idem's listeners give plain (L4) streams; anything else keeps Pingora's own
        // detection, except where a PROXY header is required and could not be read.
        // A TLS stream handed back for another round was set up here already.
        if self.tls.is_some() && stream.get_ssl_digest().is_some() {
            return self.http1.process_new(stream, shutdown).await;
        }
        if !(*stream).as_any().is::<TcpStream>() {
            if self.proxy_protocol {
                tracing::warn!("closing a connection that is not a plain stream: its PROXY protocol header cannot be read");
                return None;
            }
            return self.h2c.process_new(stream, shutdown).await;
        }
        let mut tcp: Box<TcpStream> = stream.into_any().downcast().ok()?;
        let deadline = self.live.load().settings.keepalive_timeout;
        if let Some(acceptor) = &self.tls {
            // Boxed: the handshake's future must not size the cleartext connections' one.
            return Box::pin(self.serve_tls(acceptor, tcp, deadline, shutdown)).await;
        }
        let first = async {
            if self.proxy_protocol {
                proxy_protocol::accept(&mut tcp)
                    .await
                    .map_err(Unread::Proxy)?;
            }
            read_first_bytes(&mut tcp).await.map_err(|_| Unread::Io)
        };
        let protocol = match tokio::time::timeout(deadline, first).await {
            Ok(Ok(p)) => p,
            // Closed or reset before sending a request: nothing to answer.
            Ok(Err(Unread::Io)) => return None,
            Ok(Err(Unread::Proxy(why) | Unread::Tls(why))) => {
                tracing::debug!(
                    reason = %why,
                    "closing a client connection without a valid PROXY protocol header"
                );
                return None;
            }
            Err(_) => {
                tracing::debug!(
                    ?deadline,
                    "closing a client connection that sent no request within keepalive_timeout"
                );
                return None;
            }
        };
        let stream: Stream = tcp;
        match protocol {
            Protocol::Http1 => self.http1.process_new(stream, shutdown).await,
            Protocol::H2c => self.h2c.process_new(stream, shutdown).await,
        }
    }

    async fn cleanup(&self) {
        self.http1.cleanup().await;
        self.h2c.cleanup().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniff_decides_at_the_first_byte_that_differs_from_the_preface() {
        assert_eq!(sniff(b"G"), Some(Protocol::Http1));
        assert_eq!(sniff(b"OPTIONS / HTTP/1.0\r\n\r\n"), Some(Protocol::Http1));
        assert_eq!(sniff(b"P"), None);
        assert_eq!(sniff(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(sniff(b"POST / HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(sniff(b"PRI * HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(sniff(PREFACE), Some(Protocol::H2c));
        let mut more = PREFACE.to_vec();
        more.extend_from_slice(b"\x00\x00\x12\x04");
        assert_eq!(sniff(&more), Some(Protocol::H2c));
    }
}
