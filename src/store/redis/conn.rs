//! The connection to Redis: one multiplexed RESP3 connection to a single node, or a Redis
//! Cluster connection (one multiplexed connection per node, routed by slot). Commands and
//! pub/sub share it: with RESP3, published messages arrive as push frames on the same
//! connection, which is what lets redis-rs' cluster client subscribe at all.
//!
//! Health: every operation runs under `store.timeout`. A connection-level failure (I/O,
//! refused, dropped, timeout) marks the link down; while down, operations fail at once
//! (no request waits on a dead Redis) and a background task reconnects with exponential
//! backoff (50 ms doubling to 2 s, with jitter). On reconnecting to a single node the
//! channels still awaited are subscribed again; the cluster client resubscribes by itself.

use crate::store::redis::metrics::StoreMetrics;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, PushInfo, PushKind, RedisError, RedisFuture, RedisResult, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, watch, Notify};

/// Where Redis is.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// One node: `redis://host:port[/db]`.
    Single(String),
    /// Redis Cluster seed nodes.
    Cluster(Vec<String>),
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
    /// The link is down and reconnecting.
    #[error("redis is unreachable (reconnecting)")]
    Down,
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
    timeout: Duration,
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

impl Link {
    /// Starts the link: connects in the background (retrying with backoff) and returns at
    /// once; operations fail with [`StoreError::Down`] until the first connection is up.
    pub(crate) fn start(
        handle: tokio::runtime::Handle,
        target: Target,
        timeout: Duration,
        metrics: Arc<StoreMetrics>,
    ) -> Arc<Link> {
        let link = Arc::new(Link {
            handle: handle.clone(),
            target,
            timeout,
            conn: parking_lot::RwLock::new(None),
            up: AtomicBool::new(false),
            kick: Notify::new(),
            channels: Channels::default(),
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
            return Err(StoreError::Down);
        };
        match tokio::time::timeout(self.timeout, op(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => {
                if is_connection_failure(&e) {
                    self.down(generation, &e.to_string());
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

fn is_connection_failure(e: &RedisError) -> bool {
    e.is_io_error()
        || e.is_timeout()
        || e.is_connection_dropped()
        || e.is_connection_refusal()
        || e.is_unrecoverable_error()
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
    match &link.target {
        Target::Single(url) => {
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str())?;
            let settings = info
                .redis_settings()
                .clone()
                .set_protocol(redis::ProtocolVersion::RESP3);
            let info = info.set_redis_settings(settings);
            let client = redis::Client::open(info)?;
            let config = redis::AsyncConnectionConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_push_sender(tx);
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await?;
            // Channels awaited while the link was down.
            let channels: Vec<String> = link.channels.map.lock().keys().cloned().collect();
            for ch in channels {
                conn.subscribe(&ch).await?;
            }
            Ok(Conn::Single(conn))
        }
        Target::Cluster(nodes) => {
            let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                .use_protocol(redis::ProtocolVersion::RESP3)
                .push_sender(tx)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(2)
                .build()?;
            let mut conn = client.get_async_connection().await?;
            let channels: Vec<String> = link.channels.map.lock().keys().cloned().collect();
            for ch in channels {
                conn.subscribe(&ch).await?;
            }
            Ok(Conn::Cluster(conn))
        }
    }
}

async fn reconnect_loop(weak: Weak<Link>) {
    const MIN: Duration = Duration::from_millis(50);
    const MAX: Duration = Duration::from_secs(2);
    let mut backoff = MIN;
    loop {
        let Some(link) = weak.upgrade() else { return };
        if link.current().is_some() {
            // Up: sleep until a failure is reported (the link lives as long as the process).
            link.kick.notified().await;
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
                tracing::info!(target = ?link.target, "redis store: connected");
                backoff = MIN;
            }
            failed => {
                link.metrics.observe("connect", "error", started);
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timeout".to_string(),
                };
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
