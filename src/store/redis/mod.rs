//! The shared store (`[store] kind = "redis"`): several replicas, one upstream call per key
//! (DESIGN section 8).
//!
//! Layering: the local [`crate::dedup::coordinator::Coordinator`] still comes first, so many requests
//! for a key on one replica make one flight and one claim. Its leader task
//! ([`crate::dedup::leader`]) takes the shared step before any upstream call: [`RedisStore::lead`].
//!
//! ```text
//! lead ── claim script (1 round trip) ──┬─ claimed ───────────> upstream call, then settle
//!                                       ├─ record found ──────> check its MAC, then answer it
//!                                       │                       (replay, 409, 502/504, 422)
//!                                       ├─ claimed elsewhere ─> wait: pub/sub + polling
//!                                       └─ store error, or ───> fail-open: local dedup only
//!                                          Redis full           fail-closed: 503 store-unavailable
//! settle ── fenced script (1 round trip): write the outcome only if our claim token is
//!           still there, then PUBLISH on the key's channel
//! ```
//!
//! Records are authenticated ([`codec`]: a keyed blake3 MAC from the deployment secret over
//! the key's name and the value), and checked before anything of them is used; a record that
//! fails is a store error, never replayed. What one replica writes is bounded by its own
//! store: a record whose local copy is evicted is deleted here too ([`RedisStore::forget`],
//! fenced by the write's token). A Redis that refuses writes (full) never runs a key twice
//! silently: a refused claim applies `on_store_error` (counted), a refused result keeps the
//! claim for the record's retention, which other replicas read as outcome unknown.
//!
//! Records (see [`codec`]): one Redis string per dedup key, `<prefix>{<64 hex>}` (names in
//! [`names`], under `[store] key_prefix`, default `idem:`), holding a claim or a settled
//! record; the hash tag keeps every key's script on one Cluster slot. A claim
//! records its owner (the replica's random id), its start and its token, and is written with
//! `PX` = the upstream total deadline, so it lives until start plus that deadline whatever
//! happens to its owner. The owner's liveness is a separate key, `<prefix>alive:<owner>`,
//! refreshed every `liveness_ttl / 3`: a waiter that finds the claim's owner gone answers
//! outcome unknown (502) and holds the key locally for the claim's remaining life; nobody
//! executes the key again before the claim expires. The result write replaces the claim only
//! if it still carries the writer's token (a replica that lost its claim, say across a Redis
//! restart, cannot overwrite another's), keeping the claim's expiry for a held outcome
//! (`KEEPTTL`), and setting the route's retention for a stored one.
//!
//! Waiting on another replica: the waiter subscribes to `<prefix>{<hex>}:settled` (one RESP3
//! connection per replica carries every subscription), then re-reads the key (closing the
//! race with a settle that happened in between), and re-reads it on every message and every
//! `poll_interval` (the fallback when a message is lost), checking the owner's liveness on
//! each read that still shows the claim. It ends with the record, with the outcome of a freed
//! key (a 500 or an unreachable backend: the key is free again, the waiter gets that answer),
//! with outcome unknown (owner dead, or the claim vanished without a record), or with 409
//! in-progress after `wait_timeout`. Store errors while waiting are retried at the poll
//! interval: a waiter never starts a call that another replica may be running.
//!
//! Store errors at the claim: `on_store_error` decides (fail-open calls upstream with this
//! replica's local dedup only; fail-closed answers 503). When the claim script may have run
//! (a timeout, a dropped connection), its claim is kept as tentative: fail-open settles it by
//! the fenced write like any claim, fail-closed releases it, so other replicas never wait on
//! a claim nobody will settle. Under fail-closed, `/readyz` reports Redis' state
//! ([`RedisStore::health`]).
//!
//! Where Redis is and how idem logs in ([`conn`]): one node, a Cluster, or the primary Redis
//! Sentinel names (followed across failovers); `rediss://` with a CA and client certificate;
//! a user and a password from a file or the environment. A failover loses what the old
//! primary had not replicated: a claim so lost makes its owner's result write `fenced`, its
//! remote waiters answer outcome unknown, and a later retry executes once more. Admin purges
//! reach every replica through Redis ([`purge`]).

pub(crate) mod codec;
pub(crate) mod conn;
mod heartbeat;
pub(crate) mod metrics;
mod names;
pub(crate) mod purge;
mod scripts;
mod wait;

use heartbeat::heartbeat;
use names::Names;
use scripts::{parse_claim, ClaimReply, Writer, CLAIM, FORGET, PEEK, PURGE, SETTLE};

use crate::config::file::OnStoreError;
use crate::key::{random_bytes, DedupKey, Fingerprint};
use crate::outcome::{Disposition, Held, Outcome, Refusal, Retention};
use crate::store::memory::SharedRef;
use codec::{unix_ms, Body, ClaimInfo, OwnerId, RecordMac, StoredBytes, Token, Value};
use conn::{Access, Link, StoreError, Target};
use metrics::StoreMetrics;
use redis::Script;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a freed key's outcome stays readable for waiters on other replicas.
const FREED_TTL: Duration = Duration::from_secs(10);

/// `[store]` settings the shared store runs with.
#[derive(Debug, Clone)]
pub(crate) struct RedisSettings {
    /// One node, a cluster, or the primary Sentinel names.
    pub(crate) target: Target,
    /// Credentials and TLS material.
    pub(crate) access: Access,
    /// Put before every name idem writes.
    pub(crate) key_prefix: String,
    /// What a leader does when Redis cannot be used.
    pub(crate) on_store_error: OnStoreError,
    /// Deadline of one Redis operation.
    pub(crate) timeout: Duration,
    /// How long a replica counts as alive after its last heartbeat.
    pub(crate) liveness_ttl: Duration,
    /// How often a waiter re-reads a key claimed by another replica.
    pub(crate) poll_interval: Duration,
    /// What records are authenticated with (from the deployment secret).
    pub(crate) mac: RecordMac,
}

impl RedisSettings {
    /// From the resolved `[store]` section (`kind = "redis"`) and the deployment secret
    /// (required with Redis).
    pub(crate) fn from_store(
        s: &crate::config::settings::StoreSettings,
        secret: &str,
    ) -> RedisSettings {
        let target = match (&s.url, &s.master_name) {
            (Some(url), _) => Target::Single(url.clone()),
            (None, Some(master_name)) => Target::Sentinel {
                sentinels: s.sentinels.clone(),
                master_name: master_name.clone(),
            },
            (None, None) => Target::Cluster(s.nodes.clone()),
        };
        let tls = s.tls.as_ref().and_then(|t| {
            // Neither file given: the URL's scheme alone selects TLS, with the system roots.
            (t.ca.is_some() || t.client.is_some()).then(|| redis::TlsCertificates {
                root_cert: t.ca.clone(),
                client_tls: t.client.as_ref().map(|(cert, key)| redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.0.clone(),
                }),
            })
        });
        RedisSettings {
            target,
            access: Access {
                username: s.username.clone(),
                password: s.password.as_ref().map(|p| p.value.0.clone()),
                tls,
            },
            key_prefix: s.key_prefix.clone(),
            on_store_error: s.on_store_error,
            timeout: s.timeout,
            liveness_ttl: s.liveness_ttl,
            poll_interval: s.poll_interval,
            mac: RecordMac::new(secret),
        }
    }
}

/// The shared store of one replica.
pub(crate) struct RedisStore {
    link: Arc<Link>,
    names: Names,
    mac: RecordMac,
    owner: OwnerId,
    on_store_error: OnStoreError,
    poll_interval: Duration,
    liveness_ttl: Duration,
    metrics: Arc<StoreMetrics>,
    token_seed: [u8; 32],
    tokens: AtomicU64,
    claim: Script,
    settle: Script,
    peek: Script,
    purge: Script,
    forget: Script,
}

/// What the local leader asks of the shared store.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LeadRequest {
    /// The dedup key.
    pub(crate) key: DedupKey,
    /// The request's fingerprint.
    pub(crate) fingerprint: Fingerprint,
    /// With an `Idempotency-Key`: another fingerprint is misuse.
    pub(crate) keyed: bool,
    /// The upstream total deadline: a claim lives this long from its start.
    pub(crate) hold_for: Duration,
    /// How long to wait for a call running on another replica.
    pub(crate) wait_timeout: Duration,
}

/// What the local leader does after the shared step.
#[derive(Debug)]
pub(crate) enum Lead {
    /// Make the upstream call. With a claim, settle it ([`RedisStore::settle`]); without one
    /// (fail-open), the key is deduplicated on this replica only.
    Call(Option<Claimed>),
    /// Answer without calling upstream.
    Answer(Answer),
}

/// An outcome that came from the shared store rather than from this replica's call.
#[derive(Debug)]
pub(crate) struct Answer {
    /// What the leader and its local waiters receive.
    pub(crate) outcome: Outcome,
    /// How long this replica keeps it (the record's remaining life in Redis).
    pub(crate) retention: Retention,
    /// How the leader's client gets a response: a stored one found on arrival as a replay,
    /// another replica's fresh one as collapsed.
    pub(crate) how: Disposition,
}

/// A claim this replica holds.
#[derive(Debug, Clone)]
pub(crate) struct Claimed {
    key: DedupKey,
    token: Token,
    fingerprint: Fingerprint,
    /// The claim script failed after it may have run (a timeout, a dropped connection):
    /// the claim may or may not be in Redis. The fenced write settles it if it is, and is
    /// refused harmlessly if it is not.
    tentative: bool,
    /// When the claim expires in Redis (about): result writes are retried until then.
    expires: tokio::time::Instant,
}

fn millis(d: Duration) -> u64 {
    (d.as_millis() as u64).max(1)
}

/// A `PTTL` reply as a duration (no expiry or no key count as none left).
fn pttl(ms: i64) -> Duration {
    Duration::from_millis(ms.max(0) as u64)
}

impl RedisStore {
    /// Starts the connection (in the background, with backoff) and the liveness heartbeat;
    /// `on_purge` is called with each key a replica purges ([`purge`]).
    ///
    /// The store runs its connection on a runtime of its own (one thread): Pingora runs each
    /// service on its own runtimes, and requests from all of them share this connection.
    pub(crate) fn start(
        settings: RedisSettings,
        metrics: Arc<StoreMetrics>,
        on_purge: impl Fn(&DedupKey) + Send + Sync + 'static,
    ) -> Arc<RedisStore> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("idem-redis")
            .enable_all()
            .build()
            .expect("build the Redis store runtime");
        let handle = runtime.handle().clone();
        // Lives as long as the process: the connection it drives is shared by every request.
        std::mem::forget(runtime);
        let names = Names::new(&settings.key_prefix);
        let owner = OwnerId(random_bytes::<16>());
        let on_message: conn::PurgeHandler = Box::new(move |payload| {
            match purge::parse_message(payload) {
                Some(key) => on_purge(&key),
                None => tracing::warn!("redis store: a purge message that names no key was ignored (another program publishing under the key prefix?)"),
            }
        });
        let link = Link::start(
            handle.clone(),
            settings.target,
            settings.access,
            heartbeat::command(&names, &owner, settings.liveness_ttl),
            settings.timeout,
            metrics.clone(),
            (names.purges(), on_message),
        );
        let shared = Arc::new(RedisStore {
            link,
            names,
            mac: settings.mac,
            owner,
            on_store_error: settings.on_store_error,
            poll_interval: settings.poll_interval,
            liveness_ttl: settings.liveness_ttl,
            metrics,
            token_seed: random_bytes::<32>(),
            tokens: AtomicU64::new(0),
            claim: Script::new(CLAIM),
            settle: Script::new(SETTLE),
            peek: Script::new(PEEK),
            purge: Script::new(PURGE),
            forget: Script::new(FORGET),
        });
        handle.spawn(heartbeat(Arc::downgrade(&shared)));
        shared
    }

    /// This replica's owner id.
    pub(crate) fn owner(&self) -> OwnerId {
        self.owner
    }

    /// Where the store connects, for logs (addresses only).
    pub(crate) fn target(&self) -> &Target {
        self.link.target()
    }

    /// Whether Redis can be used now; if not, why (one line, for `/readyz`).
    pub(crate) fn health(&self) -> Result<(), String> {
        if self.link.is_up() {
            Ok(())
        } else {
            Err(self.link.last_error())
        }
    }

    /// What writes a result over a claim (fenced), owned for background retries.
    fn writer(&self) -> Writer {
        Writer {
            link: self.link.clone(),
            script: self.settle.clone(),
            metrics: self.metrics.clone(),
            names: self.names.clone(),
        }
    }

    /// Waits (bounded) for the first connection, so a replica that starts next to a running
    /// Redis does not serve its first requests in fail-open. Blocking: call before serving.
    pub(crate) fn wait_up(&self, within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while !self.link.is_up() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    fn token(&self) -> Token {
        let n = self.tokens.fetch_add(1, Ordering::Relaxed);
        let h = blake3::keyed_hash(&self.token_seed, &n.to_le_bytes());
        let mut t = [0u8; 16];
        t.copy_from_slice(&h.as_bytes()[..16]);
        Token(t)
    }

    /// The shared step of a local leader, before any upstream call.
    pub(crate) async fn lead(&self, req: LeadRequest) -> Lead {
        let token = self.token();
        let key = self.names.record(&req.key);
        let value = Value {
            fingerprint: req.fingerprint,
            token,
            body: Body::Claim(ClaimInfo {
                owner: self.owner,
                start_ms: unix_ms(),
                hold_ms: millis(req.hold_for),
            }),
        }
        .encode(&self.mac, key.as_bytes());
        let started = Instant::now();
        let script = &self.claim;
        let name = &key;
        let reply = self
            .link
            .run(|mut c| async move {
                script
                    .key(name)
                    .arg(value)
                    .arg(millis(req.hold_for))
                    .invoke_async::<Vec<redis::Value>>(&mut c)
                    .await
            })
            .await
            .and_then(|v| parse_claim(v, &self.mac, key.as_bytes()));
        let found = match reply {
            Ok(ClaimReply::Claimed) => {
                self.metrics.observe("claim", "claimed", started);
                return Lead::Call(Some(Claimed {
                    key: req.key,
                    token,
                    fingerprint: req.fingerprint,
                    tentative: false,
                    expires: tokio::time::Instant::now() + req.hold_for,
                }));
            }
            Ok(ClaimReply::Exists(value, _))
                if req.keyed && value.fingerprint != req.fingerprint =>
            {
                self.metrics.observe("claim", "mismatch", started);
                return Lead::Answer(refused(Refusal::FingerprintMismatch));
            }
            Ok(ClaimReply::Exists(value, left)) => (value, left),
            Ok(ClaimReply::Full(why)) => {
                self.metrics.observe("claim", "full", started);
                // Nothing was written: no claim to settle or release.
                return self.unavailable(&req.key, None, &StoreError::Full(why));
            }
            Err(e) => {
                self.metrics.observe("claim", "error", started);
                if let StoreError::Codec(c) = &e {
                    tracing::error!(key = %req.key.short(), error = %c, "redis store: a record in Redis fails its authentication; it is not used (a store error)");
                }
                // Unless the command was never sent, our claim may be in Redis.
                let maybe = (!matches!(e, StoreError::Down(_))).then_some(Claimed {
                    key: req.key,
                    token,
                    fingerprint: req.fingerprint,
                    tentative: true,
                    expires: tokio::time::Instant::now() + req.hold_for,
                });
                return self.unavailable(&req.key, maybe, &e);
            }
        };
        let (value, left) = found;
        match value.body {
            Body::Claim(_) => {
                self.metrics.observe("claim", "inflight", started);
                Lead::Answer(self.wait(req, value.token).await)
            }
            body => {
                self.metrics.observe("claim", "hit", started);
                match settled(body, left, ReadAt::Arrival) {
                    Some(a) => Lead::Answer(a),
                    // The script never returns a freed record.
                    None => self.unavailable(&req.key, None, &StoreError::Reply),
                }
            }
        }
    }

    /// Redis could not be used for `key`; `maybe` is a claim the failed script may have
    /// written.
    fn unavailable(&self, key: &DedupKey, maybe: Option<Claimed>, e: &StoreError) -> Lead {
        match self.on_store_error {
            OnStoreError::FailOpen => {
                self.metrics.unavailable("fail-open");
                tracing::warn!(key = %key.short(), error = %e, "redis store unavailable: fail-open, deduplicating on this replica only");
                // If the claim did land, the result write settles it and wakes its waiters.
                Lead::Call(maybe)
            }
            OnStoreError::FailClosed => {
                self.metrics.unavailable("fail-closed");
                tracing::warn!(key = %key.short(), error = %e, "redis store unavailable: fail-closed, answering 503");
                // If the claim did land, release it (fenced) rather than leave other
                // replicas waiting on a call that never runs.
                if let Some(claim) = maybe {
                    let writer = self.writer();
                    self.link.spawn(async move {
                        writer.write(&claim, &[], 0).await;
                    });
                }
                Lead::Answer(refused(Refusal::StoreUnavailable))
            }
        }
    }

    /// Writes the outcome of this replica's call over its claim, if the claim is still
    /// ours, and wakes the waiters on other replicas. Failures are logged and counted; the
    /// outcome is delivered locally either way. Returns the reference the local copy keeps
    /// of a record that stays in Redis (stored, not replayable), by which evicting that copy
    /// deletes the record there (fenced: only this write).
    pub(crate) async fn settle(
        &self,
        claim: &Claimed,
        outcome: &Outcome,
        retention: Retention,
    ) -> Option<SharedRef> {
        let kept = matches!(
            outcome,
            Outcome::Response { stored: true, .. } | Outcome::NotReplayable
        );
        let shared = kept.then_some(SharedRef(claim.token.0));
        let name = self.names.record(&claim.key);
        let value = |body| {
            Value {
                fingerprint: claim.fingerprint,
                token: claim.token,
                body,
            }
            .encode(&self.mac, name.as_bytes())
        };
        let (bytes, px): (Vec<u8>, u64) = match outcome {
            Outcome::Response {
                response,
                stored: true,
            } => (
                value(Body::Stored(StoredBytes::from_response(response))),
                millis(retention.ttl),
            ),
            Outcome::Response {
                response,
                stored: false,
            } => (
                value(Body::Freed(Some(StoredBytes::from_response(response)))),
                millis(FREED_TTL),
            ),
            Outcome::NotReplayable => (value(Body::NotReplayable), millis(retention.ttl)),
            // Held until the call's start plus the total deadline: the claim's own expiry.
            Outcome::Unknown(h) => (value(Body::Held(h.status)), 0),
            Outcome::Unreachable => (value(Body::Freed(None)), millis(FREED_TTL)),
            Outcome::Refused(_) => (Vec::new(), 0),
        };
        let writer = self.writer();
        if writer.write(claim, &bytes, px).await {
            return shared;
        }
        // The claim may still be there (a dropped connection, a slow Redis): keep trying in
        // the background until the write lands or is refused, or the claim has expired, so
        // waiters on other replicas get the outcome rather than wait out the claim.
        let claim = claim.clone();
        self.link.spawn(async move {
            let mut backoff = Duration::from_millis(100);
            while tokio::time::Instant::now() + backoff < claim.expires {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                // While the link is down, wait for it (nothing to count).
                if writer.link.is_up() && writer.write(&claim, &bytes, px).await {
                    return;
                }
            }
        });
        shared
    }
}

impl RedisStore {
    /// Deletes in Redis the records this replica wrote whose local copy was evicted for room
    /// (or never kept): so what a replica writes to Redis stays within its own store's
    /// bounds, divided between clients by the same rules (`store::memory`). Fenced by each
    /// write's token: a later write of the key, by any replica, stays. In the background,
    /// one after the other; a failure is counted and the record left to expire.
    pub(crate) fn forget(self: &Arc<Self>, gone: Vec<(DedupKey, SharedRef)>) {
        let store = self.clone();
        self.link.spawn(async move {
            for (key, shared) in gone {
                let started = Instant::now();
                let k = store.names.record(&key);
                let script = &store.forget;
                let r = store
                    .link
                    .run(|mut c| async move {
                        script
                            .key(&k)
                            .arg(&shared.0[..])
                            .invoke_async::<i64>(&mut c)
                            .await
                    })
                    .await;
                let result = match r {
                    Ok(1) => "deleted",
                    Ok(_) => "absent",
                    Err(_) => "error",
                };
                store.metrics.observe("forget", result, started);
            }
        });
    }
}

fn refused(r: Refusal) -> Answer {
    Answer {
        outcome: Outcome::Refused(r),
        retention: Retention {
            ttl: Duration::ZERO,
        },
        how: Disposition::Collapsed,
    }
}

/// When a settled record was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReadAt {
    /// When the leader claimed the key: a stored response is a replay.
    Arrival,
    /// While waiting for another replica's call: its response is collapsed.
    Waiting,
}

/// The answer a settled record gives.
fn settled(body: Body, left_ms: i64, read_at: ReadAt) -> Option<Answer> {
    let left = pttl(left_ms);
    let retention = Retention { ttl: left };
    let outcome = match body {
        Body::Stored(r) => {
            return Some(Answer {
                outcome: Outcome::Response {
                    response: Arc::new(r.into_response()),
                    stored: true,
                },
                retention,
                how: match read_at {
                    ReadAt::Arrival => Disposition::Replay {
                        ttl: left.as_secs(),
                    },
                    ReadAt::Waiting => Disposition::Collapsed,
                },
            })
        }
        Body::NotReplayable => Outcome::NotReplayable,
        Body::Held(status) => Outcome::Unknown(Held {
            status,
            until: tokio::time::Instant::now() + left,
        }),
        Body::Freed(Some(r)) => Outcome::Response {
            response: Arc::new(r.into_response()),
            stored: false,
        },
        Body::Freed(None) => Outcome::Unreachable,
        Body::Claim(_) => return None,
    };
    Some(Answer {
        outcome,
        retention,
        how: Disposition::Collapsed,
    })
}
