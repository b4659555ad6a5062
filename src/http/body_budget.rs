//! Request bodies idem holds in memory, bounded in total (`[server] max_body_buffer`) and
//! per client address (`[server] max_body_buffer_per_client`).
//!
//! A deduplicated request's body is read whole before its key is known, and a leader's body
//! is kept until it has been written upstream (the leader's call outlives its client). Both
//! cost memory that no client is holding a connection for once it leaves, so they are
//! counted: a [`Lease`] takes bytes as the body arrives and gives them back when the last
//! copy of the body is dropped ([`Lease::attach`] ties it to the `Bytes` themselves). Past
//! the client's share the request is refused with 429 `client-quota`, past the total with
//! 503 `body-buffer-full`; either way before the bytes are read, and the connection is
//! closed (the rest of the body is not worth reading).
//!
//! Limits come with each request (from the configuration it runs with), so a reload applies
//! to the next body read.

use crate::owner::ClientId;
use bytes::Bytes;
use parking_lot::Mutex;
use prometheus::IntGauge;
use std::collections::HashMap;
use std::sync::Arc;

/// Bytes held now, in total and by client.
#[derive(Default)]
pub(crate) struct BodyBudget {
    held: Mutex<Held>,
    /// `idem_body_buffer_bytes`, when metrics are exported.
    gauge: Option<IntGauge>,
}

#[derive(Default)]
struct Held {
    total: u64,
    /// A client holding nothing has no entry.
    by_client: HashMap<ClientId, u64>,
}

/// What a request may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BodyLimits {
    /// `[server] max_body_buffer`.
    pub(crate) total: u64,
    /// `[server] max_body_buffer_per_client`.
    pub(crate) per_client: u64,
}

/// Why bytes were refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Over {
    /// The client holds its share (429).
    Client,
    /// Everything is taken (503).
    Total,
}

/// Bytes one body holds; given back on drop.
pub(crate) struct Lease {
    budget: Arc<BodyBudget>,
    client: ClientId,
    bytes: u64,
}

impl BodyBudget {
    /// A budget that keeps `gauge` at the bytes held.
    pub(crate) fn with_gauge(gauge: IntGauge) -> BodyBudget {
        BodyBudget {
            held: Mutex::default(),
            gauge: Some(gauge),
        }
    }

    fn publish(&self, total: u64) {
        if let Some(g) = &self.gauge {
            g.set(i64::try_from(total).unwrap_or(i64::MAX));
        }
    }

    /// Bytes held now in total (tests and the admin view).
    #[cfg(test)]
    pub(crate) fn total(&self) -> u64 {
        self.held.lock().total
    }

    /// An empty lease for a body of `client`.
    pub(crate) fn lease(self: &Arc<Self>, client: ClientId) -> Lease {
        Lease {
            budget: self.clone(),
            client,
            bytes: 0,
        }
    }
}

impl Lease {
    /// Takes `bytes` more, within `limits`.
    pub(crate) fn take(&mut self, bytes: u64, limits: BodyLimits) -> Result<(), Over> {
        if bytes == 0 {
            return Ok(());
        }
        let mut held = self.budget.held.lock();
        let mine = held.by_client.get(&self.client).copied().unwrap_or(0);
        if mine + bytes > limits.per_client {
            return Err(Over::Client);
        }
        if held.total + bytes > limits.total {
            return Err(Over::Total);
        }
        held.total += bytes;
        held.by_client.insert(self.client, mine + bytes);
        self.budget.publish(held.total);
        self.bytes += bytes;
        Ok(())
    }

    /// Bytes this lease holds.
    pub(crate) fn bytes(&self) -> u64 {
        self.bytes
    }

    /// `body`, holding this lease until its last copy is dropped.
    pub(crate) fn attach(self, body: Bytes) -> Bytes {
        if self.bytes == 0 {
            return body;
        }
        Bytes::from_owner(Leased { body, _lease: self })
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.bytes == 0 {
            return;
        }
        let mut held = self.budget.held.lock();
        held.total -= self.bytes;
        self.budget.publish(held.total);
        if let Some(mine) = held.by_client.get_mut(&self.client) {
            *mine -= self.bytes;
            if *mine == 0 {
                held.by_client.remove(&self.client);
            }
        }
    }
}

/// A body and the lease that pays for it.
struct Leased {
    body: Bytes,
    _lease: Lease,
}

impl AsRef<[u8]> for Leased {
    fn as_ref(&self) -> &[u8] {
        &self.body
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: BodyLimits = BodyLimits {
        total: 100,
        per_client: 60,
    };

    fn client(n: u8) -> ClientId {
        ClientId([n; 16])
    }

    #[test]
    fn a_client_takes_its_share_and_the_rest_is_left_to_others() {
        let budget = Arc::new(BodyBudget::default());
        let mut a = budget.lease(client(1));
        a.take(50, LIMITS).unwrap();
        assert_eq!(a.take(11, LIMITS), Err(Over::Client));
        let mut a2 = budget.lease(client(1));
        assert_eq!(a2.take(11, LIMITS), Err(Over::Client), "across requests");
        let mut b = budget.lease(client(2));
        b.take(50, LIMITS).unwrap();
        let mut c = budget.lease(client(3));
        assert_eq!(c.take(1, LIMITS), Err(Over::Total));
        drop(a);
        c.take(1, LIMITS).unwrap();
        assert_eq!(budget.total(), 51);
        drop((b, c, a2));
        assert_eq!(budget.total(), 0);
        assert!(budget.held.lock().by_client.is_empty());
    }

    #[test]
    fn an_attached_lease_lasts_as_long_as_the_last_copy_of_the_body() {
        let budget = Arc::new(BodyBudget::default());
        let mut lease = budget.lease(client(1));
        lease.take(5, LIMITS).unwrap();
        let body = lease.attach(Bytes::from_static(b"hello"));
        let copy = body.clone();
        drop(body);
        assert_eq!(budget.total(), 5);
        assert_eq!(&copy[..], b"hello");
        drop(copy);
        assert_eq!(budget.total(), 0);
    }
}
