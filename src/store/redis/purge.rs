//! Purges across replicas: `DELETE /keys/HEX` on one replica's admin listener removes the
//! record from Redis and announces it on `<prefix>purge`; every replica drops its own copy
//! when the message arrives.
//!
//! Fenced like every write: the script deletes a settled record (stored, not replayable,
//! freed) and refuses a claim or a held key, whose call may still run. The message carries
//! the key's 64 hex digits and is published even when Redis no longer has the record
//! (expired, or lost by a restart or a failover): replicas may still keep a copy.
//!
//! Latency: Redis delivers the message to every subscribed replica within a round trip of
//! the purge (milliseconds). A replica whose connection is down at that moment misses it
//! (pub/sub is not queued): its copy lives until its local retention ends, at most the
//! record's remaining life in Redis when that replica got it. A purge on that replica's
//! own admin listener removes it (its copy is found by the short key, and the purge is
//! announced again). So does a replica whose read of the record (a claim that found it) was
//! already answered by Redis before the purge but reached the replica after the
//! announcement: a window of a round trip. A request that reaches a replica without a copy
//! claims the key in Redis, finds nothing and executes once.

use super::codec::hex;
use super::conn::StoreError;
use super::RedisStore;
use crate::key::DedupKey;
use std::time::Instant;

/// What a purge found in Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Purged {
    /// A settled record was deleted: a stored response, a not-replayable marker, or the
    /// outcome of a freed key.
    Deleted(&'static str),
    /// Redis had no record (the purge was announced anyway).
    Absent,
    /// A claim or a held key: its call may still run, nothing was deleted or announced.
    Busy,
}

impl RedisStore {
    /// Deletes `key`'s settled record in Redis and announces the purge to every replica.
    pub(crate) async fn purge(&self, key: &DedupKey) -> Result<Purged, StoreError> {
        let started = Instant::now();
        let k = self.names.record(key);
        let channel = self.names.purges();
        let message = hex(&key.0);
        let script = &self.purge;
        let r = self
            .link
            .run(|mut c| async move {
                script
                    .key(&k)
                    .arg(&channel)
                    .arg(&message)
                    .invoke_async::<String>(&mut c)
                    .await
            })
            .await
            .and_then(|r| match r.as_str() {
                "S" => Ok(Purged::Deleted("response")),
                "N" => Ok(Purged::Deleted("not-replayable")),
                "F" => Ok(Purged::Deleted("freed")),
                "A" => Ok(Purged::Absent),
                "B" => Ok(Purged::Busy),
                _ => Err(StoreError::Reply),
            });
        let result = match &r {
            Ok(Purged::Deleted(_)) => "deleted",
            Ok(Purged::Absent) => "absent",
            Ok(Purged::Busy) => "busy",
            Err(_) => "error",
        };
        self.metrics.observe("purge", result, started);
        r
    }
}

/// The key a purge message names, if it names one.
pub(super) fn parse_message(payload: &[u8]) -> Option<DedupKey> {
    if payload.len() != 64 {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut key = [0u8; 32];
    for (i, pair) in payload.chunks_exact(2).enumerate() {
        key[i] = nibble(pair[0])? << 4 | nibble(pair[1])?;
    }
    Some(DedupKey(key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_purge_message_is_the_keys_hex_and_nothing_else() {
        let key = DedupKey(std::array::from_fn(|i| i as u8 * 7));
        assert_eq!(parse_message(hex(&key.0).as_bytes()), Some(key));
        assert_eq!(parse_message(b""), None);
        assert_eq!(parse_message(&[b'a'; 63]), None);
        assert_eq!(parse_message(&[b'A'; 64]), None, "idem writes lowercase");
        assert_eq!(parse_message(&[b'g'; 64]), None);
    }
}
