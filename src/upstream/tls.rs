//! The peer of an `https://` backend: TLS 1.2 or 1.3 through Pingora's rustls connector,
//! SNI and the verified name from the backend's host as written (`tls_server_name`
//! overrides both), trust from `tls_ca` or the system's roots, and the client certificate
//! of `tls_client_cert` / `tls_client_key` for backends that ask for one.
//!
//! A handshake that fails (an unknown issuer, a name mismatch, an expired certificate, a
//! client certificate refused) is a connect failure: nothing was sent. Leaders try the next
//! backend and then answer 502 `upstream-unreachable` with the key freed; pass-through does
//! the same (`http::pass_through`). The health check connects the same way, so such a
//! backend is also reported down with the handshake's error.

use crate::config::address::Backend;
use crate::config::tls::UpstreamTls;
use pingora::upstreams::peer::HttpPeer;
use pingora::utils::tls::{CertKey, WrappedX509};
use std::net::SocketAddr;
use std::sync::Arc;

/// The peer template for `backend`, resolved to `addr`.
pub(crate) fn peer(addr: SocketAddr, backend: &Backend, tls: &UpstreamTls) -> HttpPeer {
    let sni = tls
        .server_name
        .clone()
        .or_else(|| backend.host().map(str::to_string))
        .unwrap_or_default();
    let mut peer = HttpPeer::new(addr, true, sni);
    peer.options.verify_cert = tls.verify;
    peer.options.verify_hostname = true;
    if let Some(ca) = &tls.ca {
        let roots: Vec<WrappedX509> = ca
            .iter()
            .map(|der| WrappedX509::new(der.clone(), pingora::utils::tls::parse_x509))
            .collect();
        peer.options.ca = Some(Arc::from(roots.into_boxed_slice()));
    }
    if let Some((chain, key)) = &tls.client {
        peer.client_cert_key = Some(Arc::new(CertKey::new(chain.clone(), key.0.clone())));
    }
    peer
}

/// What a failed handshake said (`invalid peer certificate: UnknownIssuer`), from
/// Pingora's message for it; `None` for other errors.
pub(crate) fn handshake_error(e: &pingora::Error) -> Option<String> {
    if !matches!(
        e.etype(),
        pingora::ErrorType::TLSHandshakeFailure | pingora::ErrorType::InvalidCert
    ) {
        return None;
    }
    let text = e.to_string();
    // "... tls connect error cause: <what rustls said>, SNI: <name> ..."
    let head = &text[..text.find(", SNI:")?];
    Some(head.rsplit("cause: ").next()?.trim().to_string())
}
