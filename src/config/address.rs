//! Addresses as written in proxy.toml: `host:port` (an IP literal, `[IPv6]:port`, or a DNS
//! name) or `unix:/absolute/path` for a Unix-domain socket.
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
    fn local_means_loopback_localhost_or_a_unix_socket() {
        let local = |t: &str| Address::parse(t, Port::AnyAllowed).unwrap().is_local();
        assert!(local("127.0.0.1:1") && local("127.3.2.1:1") && local("[::1]:1"));
        assert!(local("LOCALHOST:1") && local("unix:/tmp/x"));
        assert!(!local("0.0.0.0:1") && !local("10.0.0.1:1") && !local("app.internal:1"));
    }
}
