//! The names idem writes in Redis, every one under `[store] key_prefix` (default `idem:`),
//! so that deployments sharing a Redis with different prefixes never share a key:
//!
//! | name | what |
//! | --- | --- |
//! | `<prefix>{<64 hex>}` | one dedup key's claim or record ([`super::codec`]) |
//! | `<prefix>{<64 hex>}:settled` | its channel: a message when the record is written |
//! | `<prefix>alive:<32 hex>` | a replica's liveness key |
//! | `<prefix>purge` | the channel admin purges are announced on |
//!
//! The braces are Redis Cluster's hash tag: a key and its channel hash on the hex alone, so
//! each script touches one slot, whatever the prefix (which may not contain braces, or the
//! tag would be the prefix's and every key would land on one slot).

use super::codec::{hex, OwnerId};
use crate::key::DedupKey;

/// Builds the names under one prefix.
#[derive(Debug, Clone)]
pub(crate) struct Names {
    prefix: String,
}

impl Names {
    /// Names under `prefix` (already checked by the configuration).
    pub(crate) fn new(prefix: &str) -> Names {
        Names {
            prefix: prefix.to_string(),
        }
    }

    /// The record (or claim) of `key`.
    pub(crate) fn record(&self, key: &DedupKey) -> String {
        format!("{}{{{}}}", self.prefix, hex(&key.0))
    }

    /// The channel a settle of `key` is announced on.
    pub(crate) fn settled(&self, key: &DedupKey) -> String {
        format!("{}{{{}}}:settled", self.prefix, hex(&key.0))
    }

    /// The liveness key of the replica `owner`.
    pub(crate) fn alive(&self, owner: &OwnerId) -> String {
        format!("{}alive:{}", self.prefix, owner.hex())
    }

    /// The channel purges are announced on.
    pub(crate) fn purges(&self) -> String {
        format!("{}purge", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a key Redis Cluster hashes: the content of the first `{...}` when it is
    /// not empty, else the whole key (the Cluster specification's rule).
    fn hash_tag(key: &str) -> &str {
        if let Some(open) = key.find('{') {
            if let Some(len) = key[open + 1..].find('}') {
                if len > 0 {
                    return &key[open + 1..open + 1 + len];
                }
            }
        }
        key
    }

    #[test]
    fn every_name_is_under_the_prefix_and_a_key_shares_its_channels_slot() {
        let key = DedupKey([0xab; 32]);
        let hex64 = "ab".repeat(32);
        let owner = OwnerId([0x01; 16]);
        let d = Names::new("idem:");
        assert_eq!(d.record(&key), format!("idem:{{{hex64}}}"));
        assert_eq!(d.settled(&key), format!("idem:{{{hex64}}}:settled"));
        assert_eq!(d.alive(&owner), format!("idem:alive:{}", "01".repeat(16)));
        assert_eq!(d.purges(), "idem:purge");
        for prefix in ["idem:", "shop-a:", "x", "tenant/7|"] {
            let n = Names::new(prefix);
            for name in [n.record(&key), n.settled(&key), n.alive(&owner), n.purges()] {
                assert!(name.starts_with(prefix), "{name}");
            }
            assert_eq!(hash_tag(&n.record(&key)), hex64);
            assert_eq!(hash_tag(&n.settled(&key)), hex64);
        }
        // Two prefixes never name the same key.
        let (a, b) = (Names::new("a:"), Names::new("b:"));
        assert_ne!(a.record(&key), b.record(&key));
        assert_ne!(a.settled(&key), b.settled(&key));
        assert_ne!(a.purges(), b.purges());
    }
}
