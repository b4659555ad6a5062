//! TLS material named by the configuration, read and checked with it: `[server.tls]` (the
//! certificates idem presents on its TLS listeners) and the `tls_*` keys of an upstream
//! group (how idem verifies `https://` backends and which certificate it shows them).
//!
//! Files are read through [`Env`] (relative names from the configuration file's directory)
//! and checked here, so that `idem check`, a start and a SIGHUP reload all refuse a
//! missing, unreadable or malformed file, a key that does not fit its certificate, or a
//! certificate outside its validity period, at the line that names it. A reload that
//! refuses keeps the running configuration, certificates included.
//!
//! Decisions: a server certificate that has expired (or is not valid yet) is an error, not
//! a warning: every client would refuse it, and a reload that brought it in would replace
//! a working pair with one that fails every handshake. One that expires within
//! [`EXPIRY_WARNING`] is a warning (`idem check`, start-up and reload logs).

use crate::config::address::Address;
use crate::config::file::{Opt, RawServerTls};
use crate::config::resolve::{at, invalid, Env, Invalid};
use crate::config::settings::Secret;
use crate::config::store::{certificates, private_key};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use toml::Spanned;

/// A certificate closer than this to its end is worth a warning.
pub(crate) const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

/// `[server.tls]`, resolved.
#[derive(Debug, Clone)]
pub(crate) struct ServerTls {
    /// The TLS listeners (TCP).
    pub(crate) listen: Vec<Address>,
    /// The certificates, the default (`cert` and `key`) first; the others are chosen by the
    /// name the client asks for.
    pub(crate) certs: Vec<ServerCert>,
}

/// One certificate chain and its key, ready for handshakes.
#[derive(Clone)]
pub(crate) struct ServerCert {
    /// Chain and signing key.
    pub(crate) key: Arc<CertifiedKey>,
    /// The DNS names (lowercase, `*.` wildcards kept) and IP addresses the leaf is for.
    pub(crate) names: Vec<String>,
    /// The file it came from, for logs.
    pub(crate) file: String,
}

impl std::fmt::Debug for ServerCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCert")
            .field("file", &self.file)
            .field("names", &self.names)
            .finish()
    }
}

/// The `tls_*` keys of an upstream group, as written.
pub(crate) struct RawUpstreamTls<'a> {
    pub(crate) ca: &'a Opt<String>,
    pub(crate) client_cert: &'a Opt<String>,
    pub(crate) client_key: &'a Opt<String>,
    pub(crate) verify: &'a Opt<bool>,
    pub(crate) server_name: &'a Opt<String>,
}

/// A client certificate: the DER chain, leaf first, and its DER private key.
pub(crate) type ClientCert = (Vec<Vec<u8>>, Secret<Vec<u8>>);

/// How idem speaks TLS to a group's `https://` backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct UpstreamTls {
    /// DER certificates of the CAs to trust (`tls_ca`); `None`: the system's roots.
    pub(crate) ca: Option<Vec<Vec<u8>>>,
    /// DER client certificate chain and private key (`tls_client_cert`, `tls_client_key`).
    pub(crate) client: Option<ClientCert>,
    /// Whether the backend's certificate is verified (`tls_verify`).
    pub(crate) verify: bool,
    /// SNI and the name verified (`tls_server_name`); `None`: each backend's host.
    pub(crate) server_name: Option<String>,
}

/// Resolves `[server.tls]`.
pub(crate) fn server_tls(
    raw: &Opt<RawServerTls>,
    env: &Env,
    warnings: &mut Vec<Invalid>,
) -> Result<Option<ServerTls>, Invalid> {
    let Some(section) = raw else {
        return Ok(None);
    };
    let span = Some(section.span());
    let t = section.get_ref();
    let listen = match &t.listen {
        Some(l) => l.get_ref().clone().into_vec(),
        None => Vec::new(),
    };
    if listen.is_empty() {
        return Err(invalid(
            "server.tls.listen",
            at(&t.listen).or(span.clone()),
            "needs at least one address, like \"0.0.0.0:8443\"",
        ));
    }
    let listen = listen
        .iter()
        .map(
            |a| match Address::parse(a, crate::config::address::Port::AnyAllowed)? {
                Address::Unix(_) => Err(format!(
                    "{a:?}: a TLS listener takes a host:port address, like \"0.0.0.0:8443\""
                )),
                a => Ok(a),
            },
        )
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| invalid("server.tls.listen", at(&t.listen), m))?;
    let mut pairs: Vec<(String, &Spanned<String>, &Spanned<String>)> = Vec::new();
    match (&t.cert, &t.key) {
        (Some(c), Some(k)) => pairs.push(("server.tls".to_string(), c, k)),
        (None, None) => {}
        (Some(c), None) => {
            return Err(invalid(
                "server.tls.key",
                Some(c.span()),
                "cert needs key (the certificate's private key)",
            ))
        }
        (None, Some(k)) => {
            return Err(invalid(
                "server.tls.cert",
                Some(k.span()),
                "key needs cert (the certificate chain it belongs to)",
            ))
        }
    }
    for (i, p) in t.certs.iter().flat_map(|c| c.get_ref().iter()).enumerate() {
        pairs.push((format!("server.tls.certs[{i}]"), &p.cert, &p.key));
    }
    if pairs.is_empty() {
        return Err(invalid(
            "server.tls.cert",
            span,
            "a TLS listener needs a certificate: set cert and key (PEM files)",
        ));
    }
    let certs = pairs
        .into_iter()
        .map(|(section, c, k)| server_cert(&section, c, k, env, warnings))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(ServerTls { listen, certs }))
}

fn server_cert(
    section: &str,
    cert: &Spanned<String>,
    key: &Spanned<String>,
    env: &Env,
    warnings: &mut Vec<Invalid>,
) -> Result<ServerCert, Invalid> {
    let (cert_key, key_key) = (format!("{section}.cert"), format!("{section}.key"));
    let chain = read_chain(&cert_key, cert, env)?;
    let names = leaf_check(&cert_key, cert, &chain[0], SystemTime::now(), warnings)?;
    let pem = env
        .files
        .read(key.get_ref())
        .map_err(|m| invalid(&key_key, Some(key.span()), m))?;
    let der = private_key(&pem).map_err(|m| {
        invalid(
            &key_key,
            Some(key.span()),
            format!("{:?}: {m}", key.get_ref()),
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let certified = CertifiedKey::from_der(chain, der, &provider).map_err(|e| {
        invalid(
            &key_key,
            Some(key.span()),
            format!(
                "{:?} does not go with {:?}: {e}",
                key.get_ref(),
                cert.get_ref()
            ),
        )
    })?;
    Ok(ServerCert {
        key: Arc::new(certified),
        names,
        file: cert.get_ref().clone(),
    })
}

/// Reads a PEM chain, leaf first.
fn read_chain(
    key: &str,
    v: &Spanned<String>,
    env: &Env,
) -> Result<Vec<CertificateDer<'static>>, Invalid> {
    let pem = env
        .files
        .read(v.get_ref())
        .map_err(|m| invalid(key, Some(v.span()), m))?;
    certificates(&pem).map_err(|m| invalid(key, Some(v.span()), format!("{:?}: {m}", v.get_ref())))
}

/// Checks the leaf's validity period at `now` (an error outside it, a warning close to its
/// end) and returns the names it is for.
fn leaf_check(
    key: &str,
    v: &Spanned<String>,
    leaf: &CertificateDer<'_>,
    now: SystemTime,
    warnings: &mut Vec<Invalid>,
) -> Result<Vec<String>, Invalid> {
    let file = v.get_ref();
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| {
        invalid(
            key,
            Some(v.span()),
            format!("{file:?}: the first certificate cannot be read ({e})"),
        )
    })?;
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let validity = cert.validity();
    if validity.not_after.timestamp() < now {
        return Err(invalid(
            key,
            Some(v.span()),
            format!(
                "{file:?}: the certificate expired on {}; every client would refuse it",
                validity.not_after
            ),
        ));
    }
    if validity.not_before.timestamp() > now {
        return Err(invalid(
            key,
            Some(v.span()),
            format!(
                "{file:?}: the certificate is not valid before {}",
                validity.not_before
            ),
        ));
    }
    let left = validity.not_after.timestamp() - now;
    if left < EXPIRY_WARNING.as_secs() as i64 {
        warnings.push(invalid(
            key,
            Some(v.span()),
            format!(
                "{file:?}: the certificate expires on {} (in {} days); replace it and reload",
                validity.not_after,
                left / 86400
            ),
        ));
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                x509_parser::extensions::GeneralName::DNSName(d) => {
                    names.push(d.to_ascii_lowercase())
                }
                x509_parser::extensions::GeneralName::IPAddress(ip) => {
                    let ip: Option<std::net::IpAddr> = match ip.len() {
                        4 => <[u8; 4]>::try_from(*ip).ok().map(Into::into),
                        16 => <[u8; 16]>::try_from(*ip).ok().map(Into::into),
                        _ => None,
                    };
                    names.extend(ip.map(|ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    Ok(names)
}

/// Resolves an upstream group's `tls_*` keys in `section`; `any_tls` says whether one of
/// its backends is `https://` (the keys mean nothing otherwise, and are refused).
pub(crate) fn upstream_tls(
    section: &str,
    raw: RawUpstreamTls<'_>,
    any_tls: bool,
    env: &Env,
    warnings: &mut Vec<Invalid>,
) -> Result<Option<UpstreamTls>, Invalid> {
    let key = |k: &str| format!("{section}.{k}");
    let written: [(&str, Option<Range<usize>>); 5] = [
        ("tls_ca", at(raw.ca)),
        ("tls_client_cert", at(raw.client_cert)),
        ("tls_client_key", at(raw.client_key)),
        ("tls_verify", at(raw.verify)),
        ("tls_server_name", at(raw.server_name)),
    ];
    if !any_tls {
        return match written.into_iter().find(|(_, s)| s.is_some()) {
            Some((k, span)) => Err(invalid(
                key(k),
                span,
                "is only used with TLS backends: write them as \"https://host:port\"",
            )),
            None => Ok(None),
        };
    }
    let ca = match raw.ca {
        Some(v) => {
            let roots = read_chain(&key("tls_ca"), v, env)?;
            let mut store = rustls::RootCertStore::empty();
            for cert in &roots {
                store.add(cert.clone()).map_err(|e| {
                    invalid(
                        key("tls_ca"),
                        Some(v.span()),
                        format!("{:?}: a certificate is not a usable CA ({e})", v.get_ref()),
                    )
                })?;
            }
            Some(roots.into_iter().map(|c| c.to_vec()).collect())
        }
        None => None,
    };
    let client = match (raw.client_cert, raw.client_key) {
        (None, None) => None,
        (Some(c), None) => {
            return Err(invalid(
                key("tls_client_key"),
                Some(c.span()),
                "tls_client_cert needs tls_client_key (the certificate's private key)",
            ))
        }
        (None, Some(k)) => {
            return Err(invalid(
                key("tls_client_cert"),
                Some(k.span()),
                "tls_client_key needs tls_client_cert (the certificate it belongs to)",
            ))
        }
        (Some(c), Some(k)) => {
            let chain = read_chain(&key("tls_client_cert"), c, env)?;
            for cert in &chain {
                x509_parser::parse_x509_certificate(cert).map_err(|e| {
                    invalid(
                        key("tls_client_cert"),
                        Some(c.span()),
                        format!("{:?}: a certificate cannot be read ({e})", c.get_ref()),
                    )
                })?;
            }
            let pem = env
                .files
                .read(k.get_ref())
                .map_err(|m| invalid(key("tls_client_key"), Some(k.span()), m))?;
            let der = private_key(&pem).map_err(|m| {
                invalid(
                    key("tls_client_key"),
                    Some(k.span()),
                    format!("{:?}: {m}", k.get_ref()),
                )
            })?;
            let provider = rustls::crypto::ring::default_provider();
            CertifiedKey::from_der(chain.clone(), der.clone_key(), &provider).map_err(|e| {
                invalid(
                    key("tls_client_key"),
                    Some(k.span()),
                    format!("{:?} does not go with {:?}: {e}", k.get_ref(), c.get_ref()),
                )
            })?;
            // The connector takes the key as bare DER and guesses its kind again.
            let bare = der.secret_der().to_vec();
            if PrivateKeyDer::try_from(bare.clone()).is_err() {
                return Err(invalid(
                    key("tls_client_key"),
                    Some(k.span()),
                    format!(
                        "{:?}: write the key as PKCS#8, SEC1 or PKCS#1 PEM",
                        k.get_ref()
                    ),
                ));
            }
            Some((
                chain.into_iter().map(|c| c.to_vec()).collect(),
                Secret(bare),
            ))
        }
    };
    let server_name = match raw.server_name {
        Some(n) => {
            rustls::pki_types::ServerName::try_from(n.get_ref().as_str()).map_err(|_| {
                invalid(
                    key("tls_server_name"),
                    Some(n.span()),
                    format!("{:?} is not a DNS name or an IP address", n.get_ref()),
                )
            })?;
            Some(n.get_ref().to_ascii_lowercase())
        }
        None => None,
    };
    let verify = raw.verify.as_ref().is_none_or(|v| *v.get_ref());
    if !verify {
        warnings.push(invalid(
            key("tls_verify"),
            at(raw.verify),
            "is false: idem accepts any certificate from the https:// backends, so anyone on the path can read and change the traffic. Give their CA as tls_ca instead",
        ));
    }
    Ok(Some(UpstreamTls {
        ca,
        client,
        verify,
        server_name,
    }))
}

/// Whether `name` (lowercase, no trailing dot) is one of `names`, a `*.` wildcard covering
/// exactly one leftmost label.
pub(crate) fn name_matches(names: &[String], name: &str) -> bool {
    names.iter().any(|n| match n.strip_prefix("*.") {
        Some(parent) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == parent),
        None => n == name,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_cover_one_label() {
        let names = vec!["*.example.com".to_string(), "api.test".to_string()];
        assert!(name_matches(&names, "a.example.com"));
        assert!(!name_matches(&names, "example.com"));
        assert!(!name_matches(&names, "a.b.example.com"));
        assert!(name_matches(&names, "api.test"));
        assert!(!name_matches(&names, "www.api.test"));
    }
}
