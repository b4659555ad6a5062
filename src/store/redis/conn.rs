//! The connection to Redis: one multiplexed RESP3 connection to a single node (given by
//! `url`, or the primary Redis Sentinel names), or a Redis Cluster connection (one
//! multiplexed connection per node, routed by slot). Commands and pub/sub share it: with
//! RESP3, published messages arrive as push frames on the same connection, which is what
//! lets redis-rs' cluster client subscribe at all.
//!
//! Health: every operation runs under `store.timeout`. A connection-level failure (I/O,
//! refused, dropped, timeout; under Sentinel also READONLY, a write that reached a primary
//! demoted by a failover) marks the link down; while down, operations fail at once (no
//! request waits on a dead Redis) and a background task reconnects with exponential backoff
//! (50 ms doubling to 2 s, with jitter). On reconnecting to a single node the channels still
//! awaited are subscribed again; the cluster client resubscribes by itself.
//!
//! A connection counts as up only once a probe (the replica's liveness write) succeeds on
//! it: a user that may log in but not write is down, with the reason. A series of failed
//! attempts is logged once, when it starts (and again if the reason changes): at ERROR when
//! the reason is the operator's to fix (authentication: WRONGPASS, NOAUTH, NOPERM; TLS
//! certificates), at WARN otherwise; each attempt at DEBUG. A permission error on a later
//! command (an ACL that allows the probe but not a script) is logged at ERROR once per
//! connection.
//!
//! Sentinel: each (re)connection asks the sentinels for the primary of `master_name`
//! (redis-rs' `SentinelClient`, which also checks the node's `ROLE`), then connects to it
//! like a single node. While connected, the sentinels are asked every second whether the
//! primary moved (Sentinel leaves a demoted primary's clients connected until it
//! reconfigures that node, up to 10 s later): if so, the link goes down and reconnects to the
//! new one. A primary other than the previous one is a failover: logged and counted
//! (`idem_store_primary_switches_total`).

use crate::store::redis::metrics::StoreMetrics;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{
    Cmd, ErrorKind, Pipeline, PushInfo, PushKind, RedisError, RedisFuture, RedisResult,
    ServerErrorKind, Value,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};

/// Where Redis is.
#[derive(Clone)]
pub(crate) enum Target {
    /// One node: `redis://host:port[/db]` or `rediss://`.
    Single(String),
    /// Redis Cluster seed nodes.
    Cluster(Vec<String>),
    /// The primary that these sentinels name `master_name`.
    Sentinel {
        /// Sentinel URLs.
        sentinels: Vec<String>,
        /// The primary's name at the sentinels.
        master_name: String,
    },
}

/// Addresses only: URLs may hold a password, and this goes to logs.
impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addrs = |urls: &[String]| -> Vec<String> { urls.iter().map(|u| address(u)).collect() };
        match self {
            Target::Single(url) => write!(f, "{}", address(url)),
            Target::Cluster(nodes) => write!(f, "cluster {:?}", addrs(nodes)),
            Target::Sentinel {
                sentinels,
                master_name,
            } => write!(
                f,
                "primary {master_name:?} of sentinels {:?}",
                addrs(sentinels)
            ),
        }
    }
}

/// `host:port` of a URL (checked by the configuration), without its credentials.
fn address(url: &str) -> String {
    redis::IntoConnectionInfo::into_connection_info(url)
        .map_or_else(|_| "?".to_string(), |i| i.addr().to_string())
}

/// How idem logs in and which TLS material it uses, on every Redis node (not the sentinels,
/// which use their URLs' credentials).
#[derive(Clone, Default)]
pub(crate) struct Access {
    /// Replaces the URLs' user.
    pub(crate) username: Option<String>,
    /// Replaces the URLs' password.
    pub(crate) password: Option<String>,
    /// A CA and/or a client certificate for `rediss://`; `None`: the system's roots.
    pub(crate) tls: Option<redis::TlsCertificates>,
}

impl std::fmt::Debug for Access {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Access")
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A connection handle (cheap to clone).
#[derive(Clone)]
pub(crate) enum Conn {
    /// One node.
    Single(MultiplexedConnection),
    /// Redis Cluster.
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Conn {
    async fn subscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.subscribe(channel).await,
            Conn::Cluster(c) => c.subscribe(channel).await,
        }
    }

    async fn unsubscribe(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Conn::Single(c) => c.unsubscribe(channel).await,
            Conn::Cluster(c) => c.unsubscribe(channel).await,
        }
    }
}

/// Why an operation did not reach Redis or got no usable answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// The link is down and reconnecting; why (the last attempt's failure), so that a
    /// request's log line says what the operator must fix, not just "unreachable".
    #[error("redis is not connected (reconnecting; {0})")]
    Down(String),
    /// The operation did not finish within `store.timeout`.
    #[error("redis did not answer within the store timeout")]
    Timeout,
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] RedisError),
    /// A value idem cannot read.
    #[error(transparent)]
    Codec(#[from] crate::store::redis::codec::CodecError),
    /// A script answered something it never returns.
    #[error("unexpected reply from a store script")]
    Reply,
    /// Redis refused a write: it is full (`maxmemory` with `noeviction`).
    #[error("redis refused the write, it is full (maxmemory with noeviction): {0}")]
    Full(String),
}

/// Pub/sub channels awaited by this replica, each with a wake-up counter.
#[derive(Default)]
struct Channels {
    map: parking_lot::Mutex<HashMap<String, (watch::Sender<u64>, usize)>>,
}

/// The shared connection state.
pub(crate) struct Link {
    /// The store's own runtime: connection drivers, reconnects, pub/sub dispatch.
    handle: tokio::runtime::Handle,
    target: Target,
    access: Access,
    /// Run on each new connection before it is used (see the module doc).
    probe: redis::Cmd,
    timeout: Duration,
    /// Why the link is down (the last failed attempt), for `/readyz` and logs.
    last_error: parking_lot::Mutex<String>,
    /// The primary Sentinel named last (`host:port`).
    primary: parking_lot::Mutex<Option<String>>,
    /// The connection generation whose permission error was logged (0: none).
    denied_logged: AtomicU64,
    /// The channel purges are announced on, and what to do with each message.
    purges: (String, PurgeHandler),
    conn: parking_lot::RwLock<Option<Conn>>,
    up: AtomicBool,
    kick: Notify,
    channels: Channels,
    /// Bumped on every new connection, so a stale failure report does not drop a fresh one.
    generation: AtomicU64,
    metrics: Arc<StoreMetrics>,
}

/// A subscription held by one waiter; unsubscribes when the last holder of the channel drops.
pub(crate) struct Subscription {
    link: Arc<Link>,
    channel: String,
    /// Changes on every message published on the channel.
    pub(crate) wake: watch::Receiver<u64>,
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let last = {
            let mut map = self.link.channels.map.lock();
            match map.get_mut(&self.channel) {
                Some((_, n)) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    map.remove(&self.channel);
                    true
                }
                None => false,
            }
        };
        if last {
            if let Some(mut conn) = self.link.current() {
                let channel = std::mem::take(&mut self.channel);
                let timeout = self.link.timeout;
                self.link.handle.spawn(async move {
                    let _ = tokio::time::timeout(timeout, conn.unsubscribe(&channel)).await;
                });
            }
        }
    }
}

/// Called with the payload of each message on the purge channel.
pub(crate) type PurgeHandler = Box<dyn Fn(&[u8]) + Send + Sync>;

impl Link {
    /// Starts the link: connects in the background (retrying with backoff) and returns at
    /// once; operations fail with [`StoreError::Down`] until the first connection is up.
    ///
    /// `purges`: a channel subscribed for good (on every connection, before it is used) and
    /// the handler of each message's payload.
    pub(crate) fn start(
        handle: tokio::runtime::Handle,
        target: Target,
        access: Access,
        probe: redis::Cmd,
        timeout: Duration,
        metrics: Arc<StoreMetrics>,
        purges: (String, PurgeHandler),
    ) -> Arc<Link> {
        let channels = Channels::default();
        // Never removed (its count never drops to zero), so every connection subscribes it.
        channels
            .map
            .lock()
            .insert(purges.0.clone(), (watch::channel(0).0, 1));
        let link = Arc::new(Link {
            handle: handle.clone(),
            target,
            access,
            probe,
            timeout,
            last_error: parking_lot::Mutex::new("not connected yet".to_string()),
            primary: parking_lot::Mutex::new(None),
            denied_logged: AtomicU64::new(0),
            purges,
            conn: parking_lot::RwLock::new(None),
            up: AtomicBool::new(false),
            kick: Notify::new(),
            channels,
            generation: AtomicU64::new(0),
            metrics,
        });
        handle.spawn(reconnect_loop(Arc::downgrade(&link)));
        link
    }

    /// Whether the link is up.
    pub(crate) fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Why the link is down: the reason of the last failed attempt.
    pub(crate) fn last_error(&self) -> String {
        self.last_error.lock().clone()
    }

    /// Where the link goes, for logs (addresses only).
    pub(crate) fn target(&self) -> &Target {
        &self.target
    }

    /// Runs `f` on the store's runtime (work that must outlive the request that starts it).
    pub(crate) fn spawn(&self, f: impl std::future::Future<Output = ()> + Send + 'static) {
        self.handle.spawn(f);
    }

    fn current(&self) -> Option<Conn> {
        self.conn.read().clone()
    }

    /// Runs `op` on the connection under the store timeout; a connection-level failure marks
    /// the link down and wakes the reconnect task.
    pub(crate) async fn run<T, F, Fut>(&self, op: F) -> Result<T, StoreError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = RedisResult<T>>,
    {
        let generation = self.generation.load(Ordering::Acquire);
        let Some(conn) = self.current() else {
            return Err(StoreError::Down(self.last_error()));
        };
        match tokio::time::timeout(self.timeout, op(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if self.is_connection_failure(&e) {
                    self.down(generation, &e.to_string());
                } else if is_denied(&e)
                    && self.denied_logged.swap(generation + 1, Ordering::AcqRel) != generation + 1
                {
                    tracing::error!(error = %e, "redis store: permission denied: the Redis user may log in but not run what idem needs (GET, SET, EVALSHA, SCRIPT LOAD, PUBLISH, SUBSCRIBE, EXISTS, DEL on keys and channels under the key prefix); logged once per connection");
                }
                Err(StoreError::Redis(e))
            }
            Err(_) => {
                self.down(generation, "timeout");
                Err(StoreError::Timeout)
            }
        }
    }

    fn down(&self, generation: u64, why: &str) {
        let mut conn = self.conn.write();
        if self.generation.load(Ordering::Acquire) != generation || conn.is_none() {
            return;
        }
        *conn = None;
        drop(conn);
        *self.last_error.lock() = format!("connection lost: {why}");
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(error = why, "redis store: connection lost; reconnecting");
        }
        self.metrics.connected.set(0);
        self.kick.notify_one();
    }

    /// Subscribes to `channel` (shared by every holder on this replica). Best effort: on
    /// failure the waiter still polls.
    pub(crate) async fn subscribe(self: &Arc<Self>, channel: String) -> Subscription {
        let (wake, first) = {
            let mut map = self.channels.map.lock();
            match map.get_mut(&channel) {
                Some((tx, n)) => {
                    *n += 1;
                    (tx.subscribe(), false)
                }
                None => {
                    let (tx, rx) = watch::channel(0);
                    map.insert(channel.clone(), (tx, 1));
                    (rx, true)
                }
            }
        };
        if first {
            let ch = channel.clone();
            let started = std::time::Instant::now();
            let r = self
                .run(|mut c| async move { c.subscribe(&ch).await })
                .await;
            self.metrics
                .observe("subscribe", if r.is_ok() { "ok" } else { "error" }, started);
        }
        Subscription {
            link: self.clone(),
            channel,
            wake,
        }
    }

    /// A push frame from the connection of `generation`.
    fn deliver(&self, push: PushInfo, generation: u64) {
        match push.kind {
            PushKind::Message => {
                let Some(Value::BulkString(channel)) = push.data.first() else {
                    return;
                };
                let Ok(channel) = std::str::from_utf8(channel) else {
                    return;
                };
                let (purges, handler) = &self.purges;
                if purges == channel {
                    if let Some(Value::BulkString(payload)) = push.data.get(1) {
                        handler(payload);
                    }
                    return;
                }
                if let Some((tx, _)) = self.channels.map.lock().get(channel) {
                    tx.send_modify(|n| *n = n.wrapping_add(1));
                }
            }
            // The single-node connection closed; the cluster client reconnects its nodes itself.
            // (A late notice from an older connection leaves the current one alone.)
            PushKind::Disconnection if matches!(self.target, Target::Single(_)) => {
                self.down(generation, "disconnected");
            }
            _ => {}
        }
    }
}

impl Link {
    fn is_connection_failure(&self, e: &RedisError) -> bool {
        e.is_io_error()
            || e.is_timeout()
            || e.is_connection_dropped()
            || e.is_connection_refusal()
            || e.is_unrecoverable_error()
            // The server forgot who we are (a restart with a new password, say): log in again.
            || e.code() == Some("NOAUTH")
            // A failover demoted the node we write to: ask the sentinels again. (With `url`,
            // a read-only node is a configuration mistake, answered per operation.)
            || (matches!(self.target, Target::Sentinel { .. })
                && e.kind() == ErrorKind::Server(ServerErrorKind::ReadOnly))
    }
}

/// A permission error: the operator's to fix, so logged at ERROR.
fn is_denied(e: &RedisError) -> bool {
    e.kind() == ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
}

/// Why an attempt failed, in a few words, and whether the operator must act: what a series
/// of attempts is logged by (once per distinct cause).
fn cause(e: &RedisError) -> (&'static str, bool) {
    if is_denied(e) {
        return ("authentication or permission refused", true);
    }
    let text = e.to_string();
    // rustls' verification errors ("invalid peer certificate: UnknownIssuer", ...): a CA,
    // a certificate or a name to fix, never a transient failure.
    if text.contains("certificate") || text.contains("InvalidCertificate") {
        return ("TLS certificate refused", true);
    }
    if e.kind() == ErrorKind::MasterNameNotFoundBySentinel {
        return ("the sentinels know no primary by that name", true);
    }
    ("unreachable", false)
}

/// The connection info of `url` with idem's protocol and `access` applied.
fn node_info(url: &str, access: &Access) -> RedisResult<redis::ConnectionInfo> {
    let info = redis::IntoConnectionInfo::into_connection_info(url)?;
    let mut settings = info
        .redis_settings()
        .clone()
        .set_protocol(redis::ProtocolVersion::RESP3);
    if let Some(u) = &access.username {
        settings = settings.set_username(u);
    }
    if let Some(p) = &access.password {
        settings = settings.set_password(p);
    }
    Ok(info.set_redis_settings(settings))
}

/// A client for one node (given, or named by Sentinel).
fn node_client(info: redis::ConnectionInfo, access: &Access) -> RedisResult<redis::Client> {
    match &access.tls {
        Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
        None => redis::Client::open(info),
    }
}

/// Asks the sentinels for the primary; returns a client for it and its address.
async fn sentinel_primary(
    sentinels: &[String],
    master_name: &str,
    access: &Access,
) -> RedisResult<(redis::Client, String)> {
    use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
    let infos = sentinels
        .iter()
        .map(|u| redis::IntoConnectionInfo::into_connection_info(u.as_str()))
        .collect::<RedisResult<Vec<_>>>()?;
    let tls = infos
        .first()
        .is_some_and(|i| matches!(i.addr(), redis::ConnectionAddr::TcpTls { .. }));
    let mut b = SentinelClientBuilder::new(
        infos.iter().map(|i| i.addr().clone()),
        master_name,
        SentinelServerType::Master,
    )?
    .set_client_to_redis_protocol(redis::ProtocolVersion::RESP3);
    // The sentinels log in with their URLs' credentials (the first URL's: the builder takes
    // one set), the primary with idem's.
    if let Some(first) = infos.first().map(|i| i.redis_settings()) {
        if let Some(u) = first.username() {
            b = b.set_client_to_sentinel_username(u);
        }
        if let Some(p) = first.password() {
            b = b.set_client_to_sentinel_password(p);
        }
    }
    if let Some(u) = &access.username {
        b = b.set_client_to_redis_username(u);
    }
    if let Some(p) = &access.password {
        b = b.set_client_to_redis_password(p);
    }
    // With rediss:// sentinels the primary is reached over TLS too, with the same material.
    if tls {
        b = b.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
        if let Some(certs) = &access.tls {
            b = b
                .set_client_to_sentinel_certificates(certs.clone())
                .set_client_to_redis_certificates(certs.clone());
        }
    }
    let client = b.build()?.async_get_client().await?;
    let addr = client.get_connection_info().addr().to_string();
    Ok((client, addr))
}

async fn connect(link: &Arc<Link>) -> RedisResult<Conn> {
    let (tx, mut rx) = mpsc::unbounded_channel::<PushInfo>();
    let weak = Arc::downgrade(link);
    // The generation this connection gets if it succeeds (see `reconnect_loop`).
    let generation = link.generation.load(Ordering::Acquire) + 1;
    tokio::spawn(async move {
        while let Some(push) = rx.recv().await {
            let Some(link) = weak.upgrade() else { return };
            link.deliver(push, generation);
        }
    });
    let timeout = link.timeout;
    let access = &link.access;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(timeout))
        .set_response_timeout(Some(timeout));
    let mut conn = match &link.target {
        Target::Single(url) => {
            let client = node_client(node_info(url, access)?, access)?;
            let config = config.set_push_sender(tx);
            Conn::Single(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            )
        }
        Target::Sentinel {
            sentinels,
            master_name,
        } => {
            let (client, addr) = sentinel_primary(sentinels, master_name, access).await?;
            let config = config.set_push_sender(tx);
            let conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            link.primary_is(addr);
            Conn::Single(conn)
        }
        Target::Cluster(nodes) => {
            let infos = nodes
                .iter()
                .map(|n| node_info(n, access))
                .collect::<RedisResult<Vec<_>>>()?;
            let mut b = redis::cluster::ClusterClientBuilder::new(infos)
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(2);
            if let Some(certs) = &access.tls {
                b = b.certs(certs.clone());
            }
            Conn::Cluster(b.build()?.get_async_connection().await?)
        }
    };
    conn.req_packed_command(&link.probe).await?;
    // Channels awaited while the link was down (the cluster client would resubscribe them
    // itself, but only those it had seen subscribed).
    let channels: Vec<String> = link.channels.map.lock().keys().cloned().collect();
    for ch in channels {
        conn.subscribe(&ch).await?;
    }
    Ok(conn)
}

impl Link {
    /// Sentinel named `addr` as the primary: a change from the last one is a failover.
    fn primary_is(&self, addr: String) {
        let mut primary = self.primary.lock();
        if let Some(before) = primary.as_ref().filter(|b| **b != addr) {
            self.metrics.primary_switches.inc();
            tracing::warn!(from = %before, to = %addr, "redis store: the primary changed (Sentinel failover); claims and records not yet replicated to the new primary are lost: a retry of such a key runs again (docs/redis.md, Sentinel)");
        }
        *primary = Some(addr);
    }
}

/// How often the sentinels are asked where the primary is, while connected.
const SENTINEL_CHECK: Duration = Duration::from_secs(1);

/// A connection to one sentinel, kept between checks.
#[derive(Default)]
struct SentinelWatch {
    conn: Option<MultiplexedConnection>,
    /// The sentinel it goes to, an index into the list.
    at: usize,
}

impl SentinelWatch {
    /// `host:port` of the primary the sentinels name now; `None` when none answers (the
    /// connection to the primary decides then).
    async fn primary(
        &mut self,
        sentinels: &[String],
        master_name: &str,
        tls: Option<&redis::TlsCertificates>,
    ) -> Option<String> {
        for _ in 0..sentinels.len() {
            if self.conn.is_none() {
                // The sentinel's own URL credentials; the TLS material is shared.
                let info =
                    redis::IntoConnectionInfo::into_connection_info(sentinels[self.at].as_str())
                        .ok()?;
                let client = match tls {
                    Some(certs) => redis::Client::build_with_tls(info, certs.clone()),
                    None => redis::Client::open(info),
                };
                if let Ok(client) = client {
                    self.conn = client.get_multiplexed_async_connection().await.ok();
                }
            }
            if let Some(conn) = self.conn.as_mut() {
                let named: RedisResult<Option<(String, u16)>> = redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(master_name)
                    .query_async(conn)
                    .await;
                if let Ok(Some((host, port))) = named {
                    return Some(format!("{host}:{port}"));
                }
            }
            // This sentinel is gone or does not know the name: the next one.
            self.conn = None;
            self.at = (self.at + 1) % sentinels.len();
        }
        None
    }
}

async fn reconnect_loop(weak: Weak<Link>) {
    const MIN: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);
    let mut backoff = MIN;
    // The cause this series of failed attempts was logged with.
    let mut logged: Option<&'static str> = None;
    let mut watch = SentinelWatch::default();
    loop {
        let Some(link) = weak.upgrade() else { return };
        if link.current().is_some() {
            match &link.target {
                // Up: sleep until a failure is reported (the link lives as long as the
                // process).
                Target::Single(_) | Target::Cluster(_) => link.kick.notified().await,
                // Also ask the sentinels every second whether the primary moved: a primary
                // demoted by a failover keeps its clients until Sentinel reconfigures it
                // (its next INFO poll, up to 10 s), and every claim written there meanwhile
                // would be lost.
                Target::Sentinel {
                    sentinels,
                    master_name,
                } => {
                    let generation = link.generation.load(Ordering::Acquire);
                    tokio::select! {
                        _ = link.kick.notified() => {}
                        _ = tokio::time::sleep(SENTINEL_CHECK) => {
                            let named = tokio::time::timeout(
                                link.timeout,
                                watch.primary(sentinels, master_name, link.access.tls.as_ref()),
                            )
                            .await;
                            let current = link.primary.lock().clone();
                            if let (Ok(Some(named)), Some(current)) = (named, current) {
                                if named != current {
                                    link.down(generation, &format!("Sentinel names {named} as the primary"));
                                }
                            }
                        }
                    }
                }
            }
            backoff = MIN;
            continue;
        }
        let started = std::time::Instant::now();
        match tokio::time::timeout(link.timeout * 2, connect(&link)).await {
            Ok(Ok(conn)) => {
                link.metrics.observe("connect", "ok", started);
                link.generation.fetch_add(1, Ordering::AcqRel);
                *link.conn.write() = Some(conn);
                link.up.store(true, Ordering::Release);
                link.metrics.connected.set(1);
                let primary = link.primary.lock().clone();
                match primary {
                    Some(p) => {
                        tracing::info!(target = ?link.target, primary = %p, "redis store: connected")
                    }
                    None => tracing::info!(target = ?link.target, "redis store: connected"),
                }
                backoff = MIN;
                logged = None;
            }
            failed => {
                link.metrics.observe("connect", "error", started);
                let (why, (cause, operator)) = match failed {
                    Ok(Err(e)) => (e.to_string(), cause(&e)),
                    _ => (
                        format!("no connection within {:?}", link.timeout * 2),
                        ("unreachable", false),
                    ),
                };
                *link.last_error.lock() = format!("{cause}: {why}");
                if logged != Some(cause) {
                    logged = Some(cause);
                    if operator {
                        tracing::error!(target = ?link.target, error = %why, "redis store: cannot connect: {cause}; check [store] username, password_file / IDEM_REDIS_PASSWORD, tls_* and the Redis ACL. Retrying; logged again only if the cause changes");
                    } else {
                        tracing::warn!(target = ?link.target, error = %why, "redis store: cannot connect: {cause}. Retrying every {MAX:?} at most; logged again only if the cause changes");
                    }
                }
                tracing::debug!(error = %why, retry_in = ?backoff, "redis store: connect failed");
                drop(link);
                // Spreads the replicas' reconnects; any varying number will do.
                let nanos = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.subsec_nanos());
                let jitter = Duration::from_millis(u64::from(nanos) % 20);
                tokio::time::sleep(backoff + jitter).await;
                backoff = (backoff * 2).min(MAX);
            }
        }
    }
}
