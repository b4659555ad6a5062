//! Real `redis-server` processes for the multi-replica tests: one node (plain, TLS-only, or
//! with an ACL user), a three-master Redis Cluster, or a primary with a replica watched by a
//! `redis-sentinel`, each on free loopback ports in its own temporary directory, with no
//! persistence and `noeviction` (what docs/redis.md asks of production). Killed on drop.
//!
//! TLS material is made at test time with `openssl` ([`TlsFiles::generate`]): a private CA,
//! a server certificate for 127.0.0.1 and a client certificate; nothing is committed.
//!
//! A machine without `redis-server`, `redis-sentinel` or `openssl` fails these tests with a
//! message naming the Debian package; they are never skipped silently (.ci/run installs
//! them).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::tls::{Leaf, Pki};
use super::{free_port, TempDir, WAIT_TIMEOUT};

const SERVER: &str = "redis-server";
const CLI: &str = "redis-cli";
const SENTINEL: &str = "redis-sentinel";

fn require(bin: &str, package: &str) {
    // `openssl` has a `version` command, the Redis tools a `--version` flag.
    let version = if bin == "openssl" {
        "version"
    } else {
        "--version"
    };
    let found = Command::new(bin)
        .arg(version)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{bin}` is not installed: the multi-replica tests run real Redis servers. \
         Install the Debian package `{package}` (apt-get install {package}; \
         .ci/run does this) and run the tests again."
    );
}

/// A private CA, a server certificate (127.0.0.1, localhost) and a client certificate,
/// made with `openssl` in a temporary directory (through [`Pki`], shared with the TLS
/// listener and backend tests).
pub struct TlsFiles {
    pki: Pki,
}

impl TlsFiles {
    pub fn generate() -> TlsFiles {
        let pki = Pki::new();
        // Cluster nodes present their server certificate as clients too (the cluster bus).
        pki.ca("ca")
            .leaf(Leaf {
                usage: "serverAuth,clientAuth",
                ..Leaf::server("server", "ca", 1)
            })
            .leaf(Leaf {
                name: "client",
                ca: "ca",
                serial: 2,
                days: 2,
                san: "DNS:idem",
                usage: "clientAuth",
            });
        TlsFiles { pki }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.pki.path(name)
    }

    /// `ca.pem`, `server.pem`, `server.key`, `client.pem`, `client.key`.
    pub fn read(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.path(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
    }

    /// The redis-server arguments of a TLS-only server (no plain port), which requires a
    /// client certificate from the same CA.
    fn server_args(&self, port: u16) -> Vec<String> {
        let p = |n: &str| self.path(n).display().to_string();
        [
            "--port".to_string(),
            "0".to_string(),
            "--tls-port".to_string(),
            port.to_string(),
            "--tls-cert-file".to_string(),
            p("server.pem"),
            "--tls-key-file".to_string(),
            p("server.key"),
            "--tls-ca-cert-file".to_string(),
            p("ca.pem"),
            "--tls-auth-clients".to_string(),
            "yes".to_string(),
        ]
        .into()
    }

    /// redis-cli's TLS arguments.
    pub fn cli_args(&self) -> Vec<String> {
        let p = |n: &str| self.path(n).display().to_string();
        vec![
            "--tls".to_string(),
            "--cacert".to_string(),
            p("ca.pem"),
            "--cert".to_string(),
            p("client.pem"),
            "--key".to_string(),
            p("client.key"),
        ]
    }

    fn certificates(&self) -> redis::TlsCertificates {
        redis::TlsCertificates {
            client_tls: Some(redis::ClientTlsConfig {
                client_cert: self.read("client.pem"),
                client_key: self.read("client.key"),
            }),
            root_cert: Some(self.read("ca.pem")),
        }
    }
}

/// How the tests themselves reach a server.
#[derive(Clone, Default)]
struct Access {
    tls: Option<redis::TlsCertificates>,
    /// `user:password@`, for the URL.
    login: Option<String>,
}

/// One `redis-server` process.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    extra: Vec<String>,
    access: Access,
}

impl RedisServer {
    /// A standalone node on a free port.
    pub async fn start() -> RedisServer {
        RedisServer::spawn(free_port(), TempDir::new(), Vec::new(), Access::default()).await
    }

    /// A standalone node with `extra` arguments (`--replicaof`, say).
    pub async fn start_with(extra: &[&str]) -> RedisServer {
        let extra = extra.iter().map(|a| a.to_string()).collect();
        RedisServer::spawn(free_port(), TempDir::new(), extra, Access::default()).await
    }

    /// A TLS-only node (`--port 0 --tls-port N`) with the certificates of `tls`; clients
    /// need a certificate from its CA.
    pub async fn start_tls(tls: &TlsFiles) -> RedisServer {
        let port = free_port();
        let access = Access {
            tls: Some(tls.certificates()),
            login: None,
        };
        RedisServer::spawn(port, TempDir::new(), tls.server_args(port), access).await
    }

    /// A node whose only user is `user` with `password` (the default user is off).
    pub async fn start_with_user(user: &str, password: &str) -> RedisServer {
        let extra = vec![
            "--user".to_string(),
            "default".to_string(),
            "off".to_string(),
            "--user".to_string(),
            user.to_string(),
            "on".to_string(),
            format!(">{password}"),
            "~*".to_string(),
            "&*".to_string(),
            "+@all".to_string(),
        ];
        let access = Access {
            tls: None,
            login: Some(format!("{user}:{password}@")),
        };
        RedisServer::spawn(free_port(), TempDir::new(), extra, access).await
    }

    async fn spawn(port: u16, dir: TempDir, extra: Vec<String>, access: Access) -> RedisServer {
        require(SERVER, "redis-server");
        let mut cmd = Command::new(SERVER);
        // A TLS-only server has its own `--port 0` in `extra` (the last one wins).
        cmd.arg("--port")
            .arg(port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--maxmemory-policy")
            .arg("noeviction")
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(dir.path().join("redis.log"))
            .args(&extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {SERVER}: {e}"));
        let mut server = RedisServer {
            child: Some(child),
            port,
            dir,
            extra,
            access,
        };
        server.wait_ping().await;
        server
    }

    async fn wait_ping(&mut self) {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        let mut backoff = Duration::from_millis(2);
        loop {
            if let Ok(Ok(pong)) =
                tokio::time::timeout(Duration::from_secs(1), self.command(&["PING"])).await
            {
                if pong == redis::Value::SimpleString("PONG".into()) {
                    return;
                }
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "redis-server on port {} exited ({status}) during start-up; log:\n{}",
                    self.port,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within {WAIT_TIMEOUT:?}; log:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` for a TLS node), without credentials, for
    /// `store.url` / `store.nodes`.
    pub fn url(&self) -> String {
        let scheme = if self.access.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    fn client(&self) -> redis::RedisResult<redis::Client> {
        let login = self.access.login.as_deref().unwrap_or("");
        let url = self.url().replacen("://", &format!("://{login}"), 1);
        match &self.access.tls {
            Some(certs) => redis::Client::build_with_tls(url, certs.clone()),
            None => redis::Client::open(url),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// SIGKILL and reap: every key is gone (no persistence), clients see a reset.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a fresh, empty server on the same port (after [`RedisServer::kill`]).
    pub async fn restart(&mut self) {
        self.kill();
        *self = RedisServer::spawn(
            self.port,
            TempDir::new(),
            self.extra.clone(),
            self.access.clone(),
        )
        .await;
    }

    /// One command on a fresh connection to this node (RESP2; no cluster redirection).
    pub async fn command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let mut conn = self.client()?.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// `SET key value PX px_ms` with a binary value (a record written behind idem's back).
    pub async fn set_raw(&self, key: &str, value: &[u8], px_ms: u64) {
        let mut conn = self
            .client()
            .expect("redis client")
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to redis on {}: {e}", self.port));
        let () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(px_ms)
            .query_async(&mut conn)
            .await
            .expect("SET");
    }

    /// `used_memory` of `INFO memory`, in bytes.
    pub async fn used_memory(&self) -> u64 {
        let info = match self.command(&["INFO", "memory"]).await.expect("INFO") {
            redis::Value::BulkString(b) => String::from_utf8_lossy(&b).into_owned(),
            redis::Value::VerbatimString { text, .. } => text,
            other => panic!("INFO memory: {other:?}"),
        };
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .expect("used_memory in INFO memory")
    }

    /// The `idem:{...}` keys this node holds, with their values (claims and records; not
    /// the liveness keys).
    pub async fn idem_entries(&self) -> Vec<(String, Vec<u8>)> {
        self.entries("idem:{*}").await
    }

    /// The keys matching `pattern`, with their values (keys that hold no string are left
    /// out), sorted by name.
    pub async fn entries(&self, pattern: &str) -> Vec<(String, Vec<u8>)> {
        let mut conn = self
            .client()
            .expect("redis client")
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to redis on {}: {e}", self.port));
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(pattern)
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        let mut out = Vec::new();
        for k in keys {
            let v: redis::RedisResult<Option<Vec<u8>>> =
                redis::cmd("GET").arg(&k).query_async(&mut conn).await;
            if let Ok(Some(v)) = v {
                out.push((k, v));
            }
        }
        out.sort();
        out
    }

    /// Runs `redis-cli` against this node with `args` after the connection options (TLS
    /// ones when given); returns stdout.
    pub async fn cli(&self, tls: Option<&TlsFiles>, args: &[&str]) -> String {
        require(CLI, "redis-server");
        let mut cmd = tokio::process::Command::new(CLI);
        cmd.arg("-h")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.port.to_string());
        if let Some(t) = tls {
            cmd.args(t.cli_args());
        }
        let out = cmd
            .args(args)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(WAIT_TIMEOUT, out)
            .await
            .expect("redis-cli did not finish")
            .expect("spawn redis-cli");
        assert!(
            out.status.success(),
            "redis-cli {args:?} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The kind byte of an idem value in Redis: `C` claim, `S` stored, `N` not replayable,
/// `H` held, `F` freed.
pub fn value_kind(v: &[u8]) -> char {
    v.get(1).map_or('?', |b| *b as char)
}

/// A Redis Cluster of three masters (no replicas), slots split by `redis-cli --cluster
/// create` (0-5460, 5461-10922, 10923-16383).
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub async fn start() -> RedisCluster {
        RedisCluster::start_with(None).await
    }

    /// A cluster that speaks TLS only, clients and cluster bus alike.
    pub async fn start_tls(tls: &TlsFiles) -> RedisCluster {
        RedisCluster::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<&TlsFiles>) -> RedisCluster {
        require(SERVER, "redis-server");
        require(CLI, "redis-server");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let dir = TempDir::new();
            let port = free_port();
            let mut extra = vec![
                "--cluster-enabled".to_string(),
                "yes".to_string(),
                "--cluster-config-file".to_string(),
                dir.path().join("nodes.conf").display().to_string(),
                "--cluster-node-timeout".to_string(),
                "2000".to_string(),
                // The bus port would be port+10000, which may be taken or out of range.
                "--cluster-port".to_string(),
                free_port().to_string(),
            ];
            let mut access = Access::default();
            if let Some(t) = tls {
                extra.extend(t.server_args(port));
                extra
                    .extend(["--tls-cluster", "yes", "--tls-replication", "yes"].map(String::from));
                access.tls = Some(t.certificates());
            }
            nodes.push(RedisServer::spawn(port, dir, extra, access).await);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = tokio::process::Command::new(CLI)
            .args(tls.map(TlsFiles::cli_args).unwrap_or_default())
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .arg("--cluster-replicas")
            .arg("0")
            .arg("--cluster-yes")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(WAIT_TIMEOUT, out)
            .await
            .expect("redis-cli --cluster create did not finish")
            .expect("spawn redis-cli");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster { nodes };
        cluster.wait_ok().await;
        cluster
    }

    async fn wait_ok(&self) {
        let deadline = Instant::now() + WAIT_TIMEOUT;
        loop {
            let mut ok = true;
            for n in &self.nodes {
                let info = match n.command(&["CLUSTER", "INFO"]).await {
                    Ok(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
                    Ok(redis::Value::VerbatimString { text, .. }) => text,
                    other => format!("{other:?}"),
                };
                ok &= info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3");
            }
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not reach cluster_state:ok within {WAIT_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The seed URLs, for `store.nodes`.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }
}

/// A `redis-sentinel` watching one primary under a name, with quorum 1 (enough for a
/// `SENTINEL FAILOVER`), on a free port. Killed on drop.
pub struct RedisSentinel {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    name: String,
}

impl RedisSentinel {
    pub async fn start(primary: &RedisServer, name: &str) -> RedisSentinel {
        require(SENTINEL, "redis-sentinel");
        let dir = TempDir::new();
        let port = free_port();
        // Sentinel rewrites its configuration file: it lives in the test's directory.
        let conf = dir.write(
            "sentinel.conf",
            &format!(
                "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
                 sentinel monitor {name} 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds {name} 2000\n\
                 sentinel failover-timeout {name} 20000\n",
                dir = dir.path().display(),
                log = dir.path().join("sentinel.log").display(),
                primary = primary.port(),
            ),
        );
        let child = Command::new(SENTINEL)
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {SENTINEL}: {e}"));
        let mut sentinel = RedisSentinel {
            child: Some(child),
            port,
            dir,
            name: name.to_string(),
        };
        let deadline = Instant::now() + WAIT_TIMEOUT;
        let mut backoff = Duration::from_millis(2);
        loop {
            if let Ok(Ok(redis::Value::SimpleString(pong))) =
                tokio::time::timeout(Duration::from_secs(1), sentinel.command(&["PING"])).await
            {
                if pong == "PONG" {
                    return sentinel;
                }
            }
            if let Some(status) = sentinel
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("redis-sentinel exited ({status}); log:\n{}", sentinel.log());
            }
            assert!(
                Instant::now() < deadline,
                "redis-sentinel did not answer PING; log:\n{}",
                sentinel.log()
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("sentinel.log")).unwrap_or_default()
    }

    /// `redis://127.0.0.1:PORT`, for `store.sentinels`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// The primary's port, as the sentinel names it now.
    pub async fn primary_port(&self) -> u16 {
        let client = redis::Client::open(self.url()).expect("sentinel url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the sentinel");
        let (_, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("GET-MASTER-ADDR-BY-NAME")
            .arg(&self.name)
            .query_async(&mut conn)
            .await
            .expect("SENTINEL GET-MASTER-ADDR-BY-NAME");
        port
    }

    /// Waits until the sentinel knows `n` healthy replicas of the primary, in sync: only
    /// then can it promote one.
    pub async fn wait_replicas(&self, n: usize) {
        let deadline = Instant::now() + WAIT_TIMEOUT * 3;
        loop {
            let client = redis::Client::open(self.url()).expect("sentinel url");
            let replicas: Vec<std::collections::HashMap<String, String>> =
                match client.get_multiplexed_async_connection().await {
                    Ok(mut conn) => redis::cmd("SENTINEL")
                        .arg("REPLICAS")
                        .arg(&self.name)
                        .query_async(&mut conn)
                        .await
                        .unwrap_or_default(),
                    Err(_) => Vec::new(),
                };
            let healthy = replicas
                .iter()
                .filter(|r| {
                    r.get("flags").map(String::as_str) == Some("slave")
                        && r.get("master-link-status").map(String::as_str) == Some("ok")
                })
                .count();
            if healthy >= n {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the sentinel knows {healthy} healthy replicas of {}, not {n}: {replicas:?}\nlog:\n{}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `SENTINEL FAILOVER`: promotes a replica without waiting for the primary to fail.
    pub async fn failover(&self) {
        let r = self.command(&["SENTINEL", "FAILOVER", &self.name]).await;
        assert!(
            matches!(r, Ok(redis::Value::Okay)),
            "SENTINEL FAILOVER: {r:?}\nlog:\n{}",
            self.log()
        );
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
