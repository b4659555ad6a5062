//! The Lua scripts that read and change a key's whole state in one round trip, and what
//! their replies mean. Each reads only the value's fixed prefix ([`super::codec`]).

use super::codec::{RecordMac, Value};
use super::conn::{Link, StoreError};
use super::metrics::StoreMetrics;
use super::names::Names;
use super::Claimed;
use redis::Script;
use std::sync::Arc;
use std::time::Instant;

/// Claims the key, or returns what holds it (for idem to authenticate and judge: a key
/// reused with another fingerprint is decided after the MAC is checked, so a forged value
/// cannot answer a 422 either). `KEYS[1]`: the key. ARGV: the claim value, its PX. A freed
/// record does not block a new claim. `{'O'}`: Redis refused the write (full: maxmemory
/// with noeviction).
pub(super) const CLAIM: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 2, 2) ~= 'F' then
  return {'E', v, redis.call('PTTL', KEYS[1])}
end
local ok = redis.pcall('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if type(ok) == 'table' and ok.err then
  return {'O', ok.err}
end
return {'C'}
";

/// Fenced result write. `KEYS[1]`: the key. ARGV: token, new value ('' deletes), PX ('0'
/// keeps the claim's expiry), channel, message, and what to do with the claim if Redis
/// refuses the write (full: `maxmemory` with `noeviction`): 'K' keep it for PX if that is
/// longer than it has left (a stored or not-replayable outcome: no replica may run the key
/// again while its record would have lived; `PEXPIRE` is allowed when Redis is full, and a
/// claim living past its own hold tells other replicas that its call is over), 'D' delete
/// it (a freed key).
/// Returns 1 when written, 0 when the claim is no longer ours, 2 when Redis refused the
/// write (the claim kept or deleted as asked).
pub(super) const SETTLE: &str = r"
local v = redis.call('GET', KEYS[1])
if (not v) or string.sub(v, 2, 2) ~= 'C' or string.sub(v, 35, 50) ~= ARGV[1] then
  return 0
end
local ok = 1
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  local set
  if ARGV[3] == '0' then
    set = redis.pcall('SET', KEYS[1], ARGV[2], 'KEEPTTL')
  else
    set = redis.pcall('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  end
  if type(set) == 'table' and set.err then
    ok = 2
    if ARGV[6] == 'D' then
      redis.call('DEL', KEYS[1])
    elseif ARGV[3] ~= '0' and tonumber(ARGV[3]) > redis.call('PTTL', KEYS[1]) then
      redis.call('PEXPIRE', KEYS[1], ARGV[3])
    end
  end
end
redis.call('PUBLISH', ARGV[4], ARGV[5])
return ok
";

/// Deletes a record this replica wrote, if that write is still there (fenced by its token):
/// the replica's own copy was evicted for room, so Redis does not keep it either.
/// `KEYS[1]`: the key. ARGV: the token. Returns 1 when deleted, 0 otherwise. `DEL` is allowed when
/// Redis is full.
pub(super) const FORGET: &str = r"
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 35, 50) == ARGV[1] then
  local kind = string.sub(v, 2, 2)
  if kind == 'S' or kind == 'N' then
    redis.call('DEL', KEYS[1])
    return 1
  end
end
return 0
";

/// The value and its remaining life, or nothing.
pub(super) const PEEK: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return {} end
return {v, redis.call('PTTL', KEYS[1])}
";

/// Admin purge, fenced like every write: deletes a settled record (stored, not replayable,
/// freed), never a claim or a held key, whose call may still run. `KEYS[1]`: the key. ARGV:
/// the purge channel, the message. Returns the deleted record's kind ('S', 'N', 'F'), 'A'
/// absent, or 'B' busy (claim or held). The message is published whatever the record's
/// state, except busy: replicas may keep a copy of a record Redis lost.
pub(super) const PURGE: &str = r"
local v = redis.call('GET', KEYS[1])
local kind = 'A'
if v then
  kind = string.sub(v, 2, 2)
  if kind == 'C' or kind == 'H' then
    return 'B'
  end
  redis.call('DEL', KEYS[1])
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return kind
";

pub(super) enum ClaimReply {
    Claimed,
    Exists(Value, i64),
    /// Redis refused the claim: it is full.
    Full(String),
}

/// The claim script's reply; a value found is authenticated for the key `name` first.
pub(super) fn parse_claim(
    v: Vec<redis::Value>,
    mac: &RecordMac,
    name: &[u8],
) -> Result<ClaimReply, StoreError> {
    match v.as_slice() {
        [redis::Value::BulkString(c)] if c == b"C" => Ok(ClaimReply::Claimed),
        [redis::Value::BulkString(c), why] if c == b"O" => Ok(ClaimReply::Full(match why {
            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            other => format!("{other:?}"),
        })),
        [redis::Value::BulkString(c), redis::Value::BulkString(v), redis::Value::Int(ms)]
            if c == b"E" =>
        {
            Ok(ClaimReply::Exists(Value::decode(v, mac, name)?, *ms))
        }
        _ => Err(StoreError::Reply),
    }
}

/// Writes results over claims; owned, so that a background retry can keep one.
#[derive(Clone)]
pub(super) struct Writer {
    pub(super) link: Arc<Link>,
    pub(super) script: Script,
    pub(super) metrics: Arc<StoreMetrics>,
    pub(super) names: Names,
}

impl Writer {
    /// The fenced write: `bytes` replace the claim (empty: delete it) only if it still
    /// carries the claim's token, with `px` ms to live (0: the claim's own expiry), then a
    /// message on the key's channel. Returns false when it failed and may be retried.
    pub(super) async fn write(&self, claim: &Claimed, bytes: &[u8], px: u64) -> bool {
        // Kept, not replaced, when Redis is full: a record that would have lived `px`.
        let if_full = if bytes.get(1) == Some(&b'F') {
            "D"
        } else {
            "K"
        };
        let (link, script, metrics) = (&self.link, &self.script, &self.metrics);
        let kind = bytes.get(1).copied().unwrap_or(b'D');
        let started = Instant::now();
        let k = self.names.record(&claim.key);
        let ch = self.names.settled(&claim.key);
        let token = claim.token.0;
        let r = link
            .run(|mut c| async move {
                script
                    .key(&k)
                    .arg(&token[..])
                    .arg(bytes)
                    .arg(px)
                    .arg(&ch)
                    .arg(&[kind][..])
                    .arg(if_full)
                    .invoke_async::<i64>(&mut c)
                    .await
            })
            .await;
        match r {
            Ok(1) => {
                metrics.observe("settle", "ok", started);
                true
            }
            Ok(2) => {
                metrics.observe("settle", "full", started);
                if if_full == "K" {
                    tracing::warn!(key = %claim.key.short(), "redis store: Redis refused the result write (full: maxmemory with noeviction); the claim is kept for the record's retention, so no replica runs this key again (the others answer outcome unknown; this replica replays its own copy)");
                } else {
                    tracing::warn!(key = %claim.key.short(), "redis store: Redis refused the result write (full: maxmemory with noeviction); the claim was deleted, the key is free");
                }
                true
            }
            Ok(_) => {
                metrics.observe("settle", "fenced", started);
                if claim.tentative {
                    tracing::debug!(key = %claim.key.short(), "redis store: the claim never landed; result not written there");
                } else {
                    tracing::warn!(key = %claim.key.short(), "redis store: the claim is no longer ours (expired, lost by a Redis restart or a failover); result not written there");
                }
                true
            }
            Err(e) => {
                metrics.observe("settle", "error", started);
                tracing::warn!(key = %claim.key.short(), error = %e, "redis store: result write failed (retried in the background until the claim expires); the response is delivered regardless");
                false
            }
        }
    }
}
