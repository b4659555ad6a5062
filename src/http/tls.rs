//! The TLS listeners' handshake: TLS 1.2 and 1.3 (rustls with the ring provider), ALPN `h2`
//! then `http/1.1`, and the certificate chosen per handshake from the configuration in
//! force, so a SIGHUP that renews the files applies to every connection that starts after
//! it (established ones keep theirs).
//!
//! Choosing: the first certificate whose names (its subject alternative names) cover the
//! name the client asks for (SNI); a client that sends none, or a name no certificate
//! covers, gets the first one (`[server.tls] cert`), as nginx's default server does.
//!
//! Session resumption: stateless tickets (rustls' rotating ticketer, 6-hour keys) and the
//! default in-memory session cache, as nginx does by default; a reload keeps them.

use crate::config::live::Live;
use crate::config::tls::name_matches;
use pingora::listeners::tls::Acceptor;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::sync::Arc;

/// The ALPN protocols offered, in order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The acceptor of the TLS listeners, reading its certificates from `live`.
pub(crate) fn acceptor(live: Arc<Live>) -> Acceptor {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(LiveCerts { live }));
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    // Only fails when the system has no randomness, which nothing else here survives.
    config.ticketer = rustls::crypto::ring::Ticketer::new().expect("a session ticket key");
    Acceptor::from_server_config(Arc::new(config))
}

/// The certificates of the configuration in force.
struct LiveCerts {
    live: Arc<Live>,
}

impl std::fmt::Debug for LiveCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveCerts")
    }
}

impl ResolvesServerCert for LiveCerts {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let snapshot = self.live.load();
        let certs = &snapshot.settings.tls.as_ref()?.certs;
        let by_name = hello.server_name().and_then(|name| {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            certs.iter().find(|c| name_matches(&c.names, &name))
        });
        by_name.or(certs.first()).map(|c| c.key.clone())
    }
}
