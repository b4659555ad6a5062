//! Real `redis-server` processes for the multi-replica tests: one node, or a three-master
//! Redis Cluster, each on free loopback ports in its own temporary directory, with no
//! persistence and `noeviction` (what README asks of production). Killed on drop.
//!
//! A machine without `redis-server` fails these tests with a message naming the Debian
//! package; they are never skipped silently (.ci/run installs it).

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use super::{free_port, TempDir, WAIT_TIMEOUT};

const SERVER: &str = "redis-server";
const CLI: &str = "redis-cli";

fn require(bin: &str) {
    let found = Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        found,
        "`{bin}` is not installed: the multi-replica tests run real Redis servers. \
         Install the Debian package `redis-server` (apt-get install redis-server; \
         .ci/run does this) and run the tests again."
    );
}

/// One `redis-server` process.
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: TempDir,
    extra: Vec<String>,
}

impl RedisServer {
    /// A standalone node on a free port.
    pub async fn start() -> RedisServer {
        RedisServer::spawn(free_port(), TempDir::new(), Vec::new()).await
    }

    async fn spawn(port: u16, dir: TempDir, extra: Vec<String>) -> RedisServer {
        require(SERVER);
        let mut cmd = Command::new(SERVER);
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

    /// `redis://127.0.0.1:PORT`, for `store.url` / `store.nodes`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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
        *self = RedisServer::spawn(self.port, TempDir::new(), self.extra.clone()).await;
    }

    /// One command on a fresh connection to this node (RESP2; no cluster redirection).
    pub async fn command(&self, args: &[&str]) -> redis::RedisResult<redis::Value> {
        let client = redis::Client::open(self.url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await
    }

    /// The `idem:{...}` keys this node holds, with their values (claims and records; not
    /// the liveness keys).
    pub async fn idem_entries(&self) -> Vec<(String, Vec<u8>)> {
        let client = redis::Client::open(self.url()).expect("redis url");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connect to redis on {}: {e}", self.port));
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("idem:{*}")
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        let mut out = Vec::new();
        for k in keys {
            let v: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&k)
                .query_async(&mut conn)
                .await
                .expect("GET");
            if let Some(v) = v {
                out.push((k, v));
            }
        }
        out.sort();
        out
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
        require(SERVER);
        require(CLI);
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let dir = TempDir::new();
            let extra = vec![
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
            nodes.push(RedisServer::spawn(free_port(), dir, extra).await);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let out = tokio::process::Command::new(CLI)
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
