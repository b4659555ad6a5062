//! Waiting for a call another replica runs: pub/sub on the key's channel, polling as the
//! fallback, and the owner's liveness (see the module doc of [`super`]).

use super::codec::{unix_ms, Body, OwnerId, Token, Value};
use super::conn::StoreError;
use super::{pttl, refused, settled, Answer, LeadRequest, ReadAt, RedisStore};
use crate::key::DedupKey;
use crate::outcome::{Disposition, Held, Outcome, Refusal, Retention};
use std::time::Duration;
use std::time::Instant;

impl RedisStore {
    /// Waits for a call running on another replica (see the module doc).
    pub(super) async fn wait(&self, req: LeadRequest, mut token: Token) -> Answer {
        let deadline = tokio::time::Instant::now() + req.wait_timeout;
        let sub = self.link.subscribe(self.names.settled(&req.key)).await;
        let mut wake = sub.wake.clone();
        loop {
            // Remaining lives are counted from the moment the read was sent: a local hold
            // then ends no later than the claim in Redis.
            let read_at = tokio::time::Instant::now();
            match self.read(&req.key).await {
                Ok(None) => {
                    tracing::warn!(key = %req.key.short(), "claim vanished without a record (expired, or lost by a Redis restart or failover): outcome unknown");
                    return vanished();
                }
                Ok(Some((value, left))) => match value.body {
                    Body::Claim(info) => {
                        // A new claim after a freed outcome: wait for that call instead.
                        token = value.token;
                        // A claim past its call's deadline (by the owner's clock, with a
                        // second of leeway) holds a result Redis refused to store (full):
                        // the call ran and is over, so nobody may run the key until the claim
                        // ends, and waiting would not bring the answer.
                        if info
                            .start_ms
                            .saturating_add(info.hold_ms)
                            .saturating_add(1000)
                            < unix_ms()
                        {
                            tracing::warn!(key = %req.key.short(), "the call for this key is over but its result is not in Redis (the write was refused): outcome unknown until the claim expires");
                            return held_for(read_at, left);
                        }
                        // A claim of this replica's that no local flight holds (this
                        // leader has the key's only one) is stale: its call ended and the
                        // result write failed. Its owner is as good as gone.
                        if info.owner == self.owner || !self.is_alive(&info.owner).await {
                            tracing::warn!(key = %req.key.short(), owner = %info.owner.hex(), "the replica running this key is gone: outcome unknown, key held until the claim expires");
                            return held_for(read_at, left);
                        }
                    }
                    _ if req.keyed && value.fingerprint != req.fingerprint => {
                        return refused(Refusal::FingerprintMismatch);
                    }
                    Body::Freed(_) if value.token != token => return vanished(),
                    body => {
                        if let Some(a) = settled(body, left, ReadAt::Waiting) {
                            return a;
                        }
                    }
                },
                // Retried at the poll interval: never start a call another replica may run.
                Err(_) => {}
            }
            let sleep = tokio::time::sleep(self.poll_interval);
            tokio::pin!(sleep);
            tokio::select! {
                changed = wake.changed() => {
                    if changed.is_err() {
                        (&mut sleep).await;
                    }
                }
                _ = &mut sleep => {}
                _ = tokio::time::sleep_until(deadline) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return refused(Refusal::InProgress);
            }
        }
    }

    async fn read(&self, key: &DedupKey) -> Result<Option<(Value, i64)>, StoreError> {
        let started = Instant::now();
        let k = self.names.record(key);
        let k_name = k.clone();
        let script = &self.peek;
        let r = self
            .link
            .run(|mut c| async move {
                script
                    .key(&k)
                    .invoke_async::<Vec<redis::Value>>(&mut c)
                    .await
            })
            .await
            .and_then(|v| match v.as_slice() {
                [] => Ok(None),
                [redis::Value::BulkString(b), redis::Value::Int(ms)] => {
                    Ok(Some((Value::decode(b, &self.mac, k_name.as_bytes())?, *ms)))
                }
                _ => Err(StoreError::Reply),
            });
        self.metrics
            .observe("peek", if r.is_ok() { "ok" } else { "error" }, started);
        if let Err(StoreError::Codec(c)) = &r {
            tracing::error!(key = %key.short(), error = %c, "redis store: a record in Redis fails its authentication; it is not used (a store error)");
        }
        r
    }

    async fn is_alive(&self, owner: &OwnerId) -> bool {
        let started = Instant::now();
        let k = self.names.alive(owner);
        let r = self
            .link
            .run(|mut c| async move {
                redis::cmd("EXISTS")
                    .arg(&k)
                    .query_async::<i64>(&mut c)
                    .await
            })
            .await;
        match r {
            Ok(n) => {
                self.metrics
                    .observe("liveness", if n > 0 { "alive" } else { "dead" }, started);
                n > 0
            }
            Err(_) => {
                self.metrics.observe("liveness", "error", started);
                // Unknown: keep waiting rather than declare a live call dead.
                true
            }
        }
    }
}

/// Outcome unknown, held for the claim's remaining life (`left_ms` as read at `read_at`).
fn held_for(read_at: tokio::time::Instant, left_ms: i64) -> Answer {
    Answer {
        outcome: Outcome::Unknown(Held {
            status: 502,
            until: read_at + pttl(left_ms),
        }),
        retention: Retention { ttl: pttl(left_ms) },
        how: Disposition::Collapsed,
    }
}

/// The claim is gone and nothing replaced it: the call may have run (its owner died after
/// the hold, or Redis lost the key). Answer outcome unknown now; the key is free for the
/// next request.
fn vanished() -> Answer {
    Answer {
        outcome: Outcome::Unknown(Held {
            status: 502,
            until: tokio::time::Instant::now(),
        }),
        retention: Retention {
            ttl: Duration::ZERO,
        },
        how: Disposition::Collapsed,
    }
}
