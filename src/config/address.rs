//! Addresses as written in proxy.toml: `host:port` (an IP literal, `[IPv6]:port`, or a DNS
//! name) or `unix:/absolute/path` for a Unix-domain socket; a backend may also be written
//! as an origin, `https://host[:port]` (TLS, port 443 by default) or `http://host[:port]`.
//!
//! Only the form is checked here. Whether a name resolves is a question for start-up and
//! `idem check`: a backend whose name does not resolve yet starts as down and is resolved
//! again every `upstream.resolve_interval` (`upstream::backends`); a listener must resolve
//! at start-up.

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;

/// Where to connect or listen.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum Address {
    /// A TCP address; `host` is an IP literal (without brackets) or a DNS name.
    Tcp {
        /// IP literal or name.
        host: String,
        /// Port; 0 (listeners only) asks for any free port.
        port: u16,
    },
    /// A Unix-domain socket.
    Unix(PathBuf),
}

/// Whether port 0 is acceptable: only where idem listens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Port {
    /// A listener: 0 picks a free port (announced on the `listening` line).
    AnyAllowed,
    /// A backend: a real port.
    Required,
}

impl Address {
    /// Parses `text`; the error says what to write instead.
    pub(crate) fn parse(text: &str, port: Port) -> Result<Address, String> {
        if let Some(path) = text.strip_prefix("unix:") {
            if !path.starts_with('/') {
                return Err(format!(
                    "{text:?}: a Unix socket path must be absolute, like \"unix:/run/app.sock\""
                ));
            }
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let form = || {
            format!(
                "{text:?} is not an address; write it like \"127.0.0.1:8000\", \"app.internal:8000\", \"[::1]:8000\" or \"unix:/run/app.sock\""
            )
        };
        if text.contains("://") {
            return Err(format!(
                "{text:?}: write the address without a scheme, like \"app.internal:8000\" (or \"unix:/run/app.sock\")"
            ));
        }
        let (host, port_text) = match text.strip_prefix('[') {
            Some(rest) => {
                let (v6, after) = rest.split_once(']').ok_or_else(form)?;
                let port_text = after.strip_prefix(':').ok_or_else(form)?;
                v6.parse::<std::net::Ipv6Addr>().map_err(|_| form())?;
                (v6, port_text)
            }
            None => text.rsplit_once(':').ok_or_else(form)?,
        };
        if host.is_empty() || !(host.parse::<IpAddr>().is_ok() || is_dns_name(host)) {
            return Err(form());
        }
        let n: u16 = port_text
            .parse()
            .map_err(|_| format!("{text:?}: {port_text:?} is not a port (1 to 65535)"))?;
        if n == 0 && port == Port::Required {
            return Err(format!(
                "{text:?}: port 0 is only meaningful where idem listens"
            ));
        }
        Ok(Address::Tcp {
            host: host.to_string(),
            port: n,
        })
    }

    /// Whether this address only ever reaches this host: a loopback IP, `localhost`, or a
    /// Unix socket.
    pub(crate) fn is_local(&self) -> bool {
        match self {
            Address::Tcp { host, .. } => match host.parse::<IpAddr>() {
                Ok(ip) => ip.is_loopback(),
                Err(_) => host.eq_ignore_ascii_case("localhost"),
            },
            Address::Unix(_) => true,
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A backend as written in `[upstream] backends`: where it is, and whether idem speaks TLS
/// to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Backend {
    /// Its address.
    pub(crate) address: Address,
    /// `https://`: TLS, the certificate verified against the host as written.
    pub(crate) tls: bool,
}

impl Backend {
    /// Parses `host:port`, `unix:/path`, `https://host[:port]` or `http://host[:port]`.
    pub(crate) fn parse(text: &str) -> Result<Backend, String> {
        let origin = [("https://", true, 443), ("http://", false, 80)]
            .into_iter()
            .find_map(|(scheme, tls, port)| Some((text.strip_prefix(scheme)?, tls, port)));
        let Some((rest, tls, default_port)) = origin else {
            if text.contains("://") {
                return Err(format!(
                    "{text:?}: write a backend as \"host:port\", \"https://host:port\" or \"unix:/run/app.sock\""
                ));
            }
            return Address::parse(text, Port::Required).map(|address| Backend {
                address,
                tls: false,
            });
        };
        if rest.contains('/') || rest.contains('@') || rest.starts_with("unix:") {
            return Err(format!(
                "{text:?}: a backend origin is a scheme, a host and a port, without a path or credentials, like \"https://app.internal:443\""
            ));
        }
        // Without a port: the scheme's (a bare IPv6 literal must be bracketed).
        let has_port = match rest.strip_prefix('[') {
            Some(v6) => v6.contains("]:"),
            None => rest.contains(':'),
        };
        let with_port = if has_port {
            rest.to_string()
        } else {
            format!("{rest}:{default_port}")
        };
        let address = Address::parse(&with_port, Port::Required)
            .map_err(|e| e.replace(&format!("{with_port:?}"), &format!("{text:?}")))?;
        Ok(Backend { address, tls })
    }

    /// The host as written (what a TLS backend's certificate must name), for TCP backends.
    pub(crate) fn host(&self) -> Option<&str> {
        match &self.address {
            Address::Tcp { host, .. } => Some(host),
            Address::Unix(_) => None,
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.tls {
            write!(f, "https://{}", self.address)
        } else {
            write!(f, "{}", self.address)
        }
    }
}

/// RFC 1123 host name: dot-separated labels of letters, digits and hyphens.
fn is_dns_name(host: &str) -> bool {
    host.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(text: &str) -> String {
        Address::parse(text, Port::AnyAllowed).unwrap().to_string()
    }

    #[test]
    fn the_forms_that_are_accepted_print_back_as_written() {
        for text in [
            "127.0.0.1:8000",
            "app.internal:8000",
            "localhost:0",
            "[::1]:9000",
            "unix:/run/app.sock",
        ] {
            assert_eq!(ok(text), text);
        }
    }

    #[test]
    fn errors_say_what_to_write() {
        let err = |t: &str, p| Address::parse(t, p).unwrap_err();
        assert!(err("app.internal", Port::Required).contains("is not an address"));
        assert!(err("http://app:80", Port::Required).contains("without a scheme"));
        assert!(err("unix:run/app.sock", Port::Required).contains("absolute"));
        assert!(err("app:99999", Port::Required).contains("is not a port"));
        assert!(err("app:0", Port::Required).contains("port 0"));
        assert!(err("a b:80", Port::Required).contains("is not an address"));
        assert!(err("[::1:80", Port::Required).contains("is not an address"));
    }

    #[test]
    fn backends_take_an_origin_with_a_scheme() {
        let b = |t: &str| Backend::parse(t).map(|b| (b.to_string(), b.tls));
        assert_eq!(
            b("https://app.internal"),
            Ok(("https://app.internal:443".into(), true))
        );
        assert_eq!(
            b("https://10.0.0.5:8443"),
            Ok(("https://10.0.0.5:8443".into(), true))
        );
        assert_eq!(b("https://[::1]"), Ok(("https://[::1]:443".into(), true)));
        assert_eq!(b("http://app"), Ok(("app:80".into(), false)));
        assert_eq!(b("127.0.0.1:8000"), Ok(("127.0.0.1:8000".into(), false)));
        assert_eq!(
            b("unix:/run/app.sock"),
            Ok(("unix:/run/app.sock".into(), false))
        );
        let err = |t: &str| Backend::parse(t).unwrap_err();
        assert!(err("https://app/api").contains("without a path"));
        assert!(err("https://u:p@app").contains("without a path"));
        assert!(err("https://unix:/run/a.sock").contains("without a path"));
        assert!(err("ftp://app:21").contains("https://host:port"));
        assert!(err("https://app:0").contains("port 0"));
        assert!(err("https://a b").contains("\"https://a b\""));
    }

    #[test]
    fn local_means_loopback_localhost_or_a_unix_socket() {
        let local = |t: &str| Address::parse(t, Port::AnyAllowed).unwrap().is_local();
        assert!(local("127.0.0.1:1") && local("127.3.2.1:1") && local("[::1]:1"));
        assert!(local("LOCALHOST:1") && local("unix:/tmp/x"));
        assert!(!local("0.0.0.0:1") && !local("10.0.0.1:1") && !local("app.internal:1"));
    }
}
