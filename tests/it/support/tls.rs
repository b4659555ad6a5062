//! TLS for the tests: certificates made with `openssl` at test time ([`Pki`]: private CAs
//! and leaves signed by them, with chosen serials and validity), a rustls client that shows
//! what a TLS listener presented ([`TlsClient`]), and curl over TLS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use pingora::tls::TlsConnector;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;

use super::client::{RawConn, RawResponse};
use super::tools::{require_tool, run_bounded};
use super::TempDir;

/// A directory of keys and certificates made with `openssl`.
pub struct Pki {
    dir: TempDir,
}

/// What a leaf certificate is for and how long.
pub struct Leaf<'a> {
    /// File names: `<name>.pem` (the certificate), `<name>.key`.
    pub name: &'a str,
    /// The CA that signs it (`<ca>.pem`, `<ca>.key`).
    pub ca: &'a str,
    pub serial: u32,
    /// Validity in days from now; negative: already expired.
    pub days: i32,
    /// `subjectAltName` value.
    pub san: &'a str,
    /// `extendedKeyUsage`, e.g. `serverAuth` or `clientAuth`.
    pub usage: &'a str,
}

impl Leaf<'_> {
    /// A server certificate for `127.0.0.1` and `localhost`, valid for two days.
    pub fn server<'a>(name: &'a str, ca: &'a str, serial: u32) -> Leaf<'a> {
        Leaf {
            name,
            ca,
            serial,
            days: 2,
            san: "IP:127.0.0.1,DNS:localhost",
            usage: "serverAuth",
        }
    }
}

impl Pki {
    pub fn new() -> Pki {
        require_tool("openssl", "version", "openssl");
        Pki {
            dir: TempDir::new(),
        }
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("spawn openssl");
        assert!(
            out.status.success(),
            "openssl {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed CA: `<name>.pem`, `<name>.key`.
    pub fn ca(&self, name: &str) -> &Pki {
        let (key, pem, subj) = (
            format!("{name}.key"),
            format!("{name}.pem"),
            format!("/CN=idem test {name}"),
        );
        self.openssl(&[
            "req",
            "-x509",
            "-days",
            "2",
            "-subj",
            &subj,
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &pem,
        ]);
        self
    }

    /// A leaf signed by its CA.
    pub fn leaf(&self, leaf: Leaf<'_>) -> &Pki {
        let name = leaf.name;
        let (key, csr, pem, ext) = (
            format!("{name}.key"),
            format!("{name}.csr"),
            format!("{name}.pem"),
            format!("{name}.ext"),
        );
        self.dir.write(
            &ext,
            &format!(
                "subjectAltName={}\nextendedKeyUsage={}\n",
                leaf.san, leaf.usage
            ),
        );
        let subj = format!("/CN={name}");
        self.openssl(&[
            "req",
            "-subj",
            &subj,
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        let (ca_pem, ca_key) = (format!("{}.pem", leaf.ca), format!("{}.key", leaf.ca));
        let (days, serial) = (leaf.days.to_string(), leaf.serial.to_string());
        self.openssl(&[
            "x509",
            "-req",
            "-days",
            &days,
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-set_serial",
            &serial,
            "-extfile",
            &ext,
            "-out",
            &pem,
        ]);
        self
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    }

    /// The DER of the first certificate in `<name>.pem`.
    pub fn der(&self, name: &str) -> Vec<u8> {
        CertificateDer::pem_slice_iter(&self.read(&format!("{name}.pem")))
            .next()
            .expect("a certificate")
            .expect("PEM")
            .to_vec()
    }
}

/// A TLS client that trusts one CA and tells what the server presented.
pub struct TlsClient {
    connector: TlsConnector,
}

/// An established TLS connection and what its handshake said.
pub struct TlsConn {
    pub conn: RawConn<pingora::tls::ClientTlsStream<TcpStream>>,
    /// The ALPN protocol the server chose.
    pub alpn: Option<Vec<u8>>,
    /// The leaf certificate the server presented (DER).
    pub leaf: Vec<u8>,
}

impl TlsClient {
    /// Trusts the CA in `ca_pem`; offers `alpn`.
    pub fn new(ca_pem: &[u8], alpn: &[&[u8]]) -> TlsClient {
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            roots.add(cert.expect("CA PEM")).expect("a CA");
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Every connection a full handshake: a resumed session shows the certificate of
        // the session it resumes, not the one the server presents now.
        config.resumption = rustls::client::Resumption::disabled();
        TlsClient {
            connector: TlsConnector::from(Arc::new(config)),
        }
    }

    /// Connects and completes the handshake for `name` (SNI), or says why it failed.
    pub async fn try_connect(&self, addr: SocketAddr, name: &str) -> Result<TlsConn, String> {
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(name.to_string()).expect("a server name");
        let tls = tokio::time::timeout(Duration::from_secs(10), self.connector.connect(name, tcp))
            .await
            .map_err(|_| "no TLS handshake within 10s".to_string())?
            .map_err(|e| format!("TLS handshake: {e}"))?;
        let (_, session) = tls.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let leaf = session
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|c| c.to_vec())
            .unwrap_or_default();
        Ok(TlsConn {
            conn: RawConn::over(tls),
            alpn,
            leaf,
        })
    }

    pub async fn connect(&self, addr: SocketAddr, name: &str) -> TlsConn {
        self.try_connect(addr, name)
            .await
            .unwrap_or_else(|e| panic!("TLS client: {e}"))
    }

    /// One request on a new connection.
    pub async fn request(&self, addr: SocketAddr, request: &[u8]) -> RawResponse {
        let mut c = self.connect(addr, "localhost").await;
        c.conn.send(request).await;
        c.conn.read_response().await
    }
}

/// What curl said about one transfer over TLS.
pub struct CurlResult {
    pub status: u16,
    /// `1.1` or `2`.
    pub http_version: String,
    pub body: String,
    pub headers: String,
}

/// curl over TLS to `url`, trusting `ca`; `args` add options (`--http2`, `-d`, `-H`).
pub async fn curl_tls(url: &str, ca: &std::path::Path, args: &[&str]) -> CurlResult {
    require_tool("curl", "--version", "curl");
    let dir = TempDir::new();
    let headers = dir.path().join("headers");
    let out = run_bounded(
        tokio::process::Command::new("curl")
            .args(["-sS", "--cacert"])
            .arg(ca)
            .arg("-D")
            .arg(&headers)
            .args(["-w", "\n%{http_code} %{http_version}"])
            .args(args)
            .arg(url),
        Duration::from_secs(20),
    )
    .await;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "curl {url} {args:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, last) = stdout.rsplit_once('\n').expect("curl's -w line");
    let (status, version) = last.split_once(' ').expect("status and version");
    CurlResult {
        status: status.parse().expect("a status"),
        http_version: version.to_string(),
        body: body.to_string(),
        headers: std::fs::read_to_string(&headers).unwrap_or_default(),
    }
}
