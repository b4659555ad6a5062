//! The form a response takes inside the embedded store: status, headers and body in one
//! allocation of exactly their size. A [`StoredResponse`] is a status, a `Vec` of header
//! pairs (each value its own `Bytes`) and a body `Bytes`: four or more allocations and
//! about 150 bytes of bookkeeping for a small response, more than the response itself.
//! Packed, a stored entry costs its bytes plus 17 (BENCHMARKS.md, "stored entry").
//!
//! ```text
//! flags u8 (bit 0: a shared reference follows) | [shared reference, 16 bytes]
//! | status u16 LE | origin (the leading request's id and span, `Origin::encode`; 1 byte: none)
//! | field count u32 LE
//! | per field: flags u8 (1: sensitive, 2: a trailer) | name length u16 LE | name
//!   | value length u32 LE | value
//! | body (the rest)
//! ```
//!
//! In memory only, never persisted or sent: the Redis record format is `store/redis/codec.rs`.
//! The shared reference is kept only for records this process also wrote to Redis (see
//! [`super::SharedRef`]); a not-replayable record written there is its reference alone.
//! Unpacking copies header values (small) and shares the body without a copy when it is
//! large enough for that to matter.

use super::SharedRef;
use crate::message::StoredResponse;
use crate::observe::request_id::Origin;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use std::sync::Arc;
use tokio::time::Instant;

/// Bodies up to this size are copied out on unpack; larger ones are shared with the packed
/// allocation (one small owner allocation instead of a copy).
const COPY_BODY_UP_TO: usize = 1024;

/// Bit 0 of the flags byte.
const SHARED: u8 = 1;

/// A response packed into one exactly sized allocation; cloning shares it.
#[derive(Clone)]
pub(crate) struct Packed(Arc<[u8]>);

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed({} bytes)", self.0.len())
    }
}

impl Packed {
    /// Packs status, origin, headers and body (the completion time is kept by the
    /// caller), and the shared reference if any.
    pub(crate) fn pack(r: &StoredResponse, shared: Option<SharedRef>) -> Packed {
        let reference = if shared.is_some() { 16 } else { 0 };
        let size = 1
            + reference
            + 6
            + r.origin.as_ref().map_or(1, Origin::encoded_len)
            + r.headers
                .iter()
                .chain(r.trailers.iter())
                .map(|(n, v)| 7 + n.as_str().len() + v.len())
                .sum::<usize>()
            + r.body.len();
        let mut buf = Vec::with_capacity(size);
        match shared {
            Some(SharedRef(token)) => {
                buf.push(SHARED);
                buf.extend_from_slice(&token);
            }
            None => buf.push(0),
        }
        buf.extend_from_slice(&r.status.to_le_bytes());
        match &r.origin {
            Some(o) => o.encode(&mut buf),
            // No origin: a form byte without its "origin" bit.
            None => buf.push(0),
        }
        buf.extend_from_slice(&((r.headers.len() + r.trailers.len()) as u32).to_le_bytes());
        let fields = r.headers.iter().map(|f| (f, 0u8));
        for ((name, value), trailer) in fields.chain(r.trailers.iter().map(|f| (f, 2u8))) {
            buf.push(u8::from(value.is_sensitive()) | trailer);
            // Header names are far below 64 KiB: Pingora refuses heads larger than that.
            buf.extend_from_slice(&(name.as_str().len() as u16).to_le_bytes());
            buf.extend_from_slice(name.as_str().as_bytes());
            buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
            buf.extend_from_slice(value.as_bytes());
        }
        buf.extend_from_slice(&r.body);
        debug_assert_eq!(buf.len(), size);
        Packed(Arc::from(buf))
    }

    /// A shared reference alone: what a not-replayable record written to Redis keeps.
    pub(crate) fn reference(shared: SharedRef) -> Packed {
        let mut buf = Vec::with_capacity(17);
        buf.push(SHARED);
        buf.extend_from_slice(&shared.0);
        Packed(Arc::from(buf))
    }

    /// The shared reference, for a record this process also wrote to Redis.
    pub(crate) fn shared_ref(&self) -> Option<SharedRef> {
        if self.0.first()? & SHARED == 0 {
            return None;
        }
        let token: [u8; 16] = self.0.get(1..17)?.try_into().ok()?;
        Some(SharedRef(token))
    }

    /// Bytes held (the packed allocation's payload).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// The response again, completed at `completed_at`.
    pub(crate) fn unpack(&self, completed_at: Instant) -> StoredResponse {
        let b = &self.0[..];
        let start = if b[0] & SHARED == 0 { 1 } else { 17 };
        let status = u16::from_le_bytes([b[start], b[start + 1]]);
        // Packed by `pack` above: an origin, or the one byte of none.
        let (origin, used) = match Origin::decode(&b[start + 2..]) {
            Some((o, used)) => (Some(o), used),
            None => (None, 1),
        };
        let mut at = start + 2 + used;
        let mut take = |n: usize| {
            let s = &b[at..at + n];
            at += n;
            s
        };
        let count = u32::from_le_bytes(take(4).try_into().unwrap_or_default()) as usize;
        let mut headers = Vec::with_capacity(count);
        let mut trailers = Vec::new();
        for _ in 0..count {
            let flags = take(1)[0];
            let sensitive = flags & 1 == 1;
            let name_len = u16::from_le_bytes(take(2).try_into().unwrap_or_default()) as usize;
            let name = take(name_len);
            let value_len = u32::from_le_bytes(take(4).try_into().unwrap_or_default()) as usize;
            let value = take(value_len);
            // Both were a valid HeaderName and HeaderValue when packed.
            if let (Ok(name), Ok(mut value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                value.set_sensitive(sensitive);
                if flags & 2 == 2 {
                    trailers.push((name, value));
                } else {
                    headers.push((name, value));
                }
            }
        }
        let body_len = b.len() - at;
        let body = if body_len <= COPY_BODY_UP_TO {
            Bytes::copy_from_slice(&b[at..])
        } else {
            Bytes::from_owner(Tail(self.0.clone(), at))
        };
        StoredResponse {
            status,
            headers,
            body,
            trailers,
            completed_at,
            origin,
        }
    }
}

/// The body part of a packed allocation, shared with a `Bytes`.
struct Tail(Arc<[u8]>, usize);

impl AsRef<[u8]> for Tail {
    fn as_ref(&self) -> &[u8] {
        &self.0[self.1..]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header;

    #[test]
    fn the_leaders_origin_is_kept_with_the_response() {
        use crate::observe::request_id::{RequestId, SpanRef};
        let mut r = response(Bytes::from_static(b"ok"));
        for span in [
            None,
            Some(SpanRef {
                trace_id: [1; 16],
                span_id: [2; 8],
            }),
        ] {
            let origin = Origin {
                request_id: RequestId::generate(),
                span,
            };
            r.origin = Some(origin.clone());
            // With and without the shared reference in front of the status.
            for shared in [None, Some(SharedRef([9; 16]))] {
                let p = Packed::pack(&r, shared);
                assert_eq!(p.shared_ref(), shared);
                let back = p.unpack(r.completed_at);
                assert_eq!(back.status, r.status);
                assert_eq!(back.origin, Some(origin.clone()));
                assert_eq!(back.headers, r.headers);
                assert_eq!(back.body, r.body);
            }
        }
    }

    fn response(body: Bytes) -> StoredResponse {
        let mut cookie = HeaderValue::from_static("a=1");
        cookie.set_sensitive(true);
        StoredResponse {
            status: 201,
            headers: vec![
                (header::CONTENT_TYPE, HeaderValue::from_static("text/plain")),
                (header::SET_COOKIE, cookie),
                (header::SET_COOKIE, HeaderValue::from_static("b=2")),
                (
                    HeaderName::from_static("x-custom"),
                    HeaderValue::from_bytes(b"\xff opaque").unwrap(),
                ),
            ],
            body,
            trailers: vec![(
                HeaderName::from_static("grpc-status"),
                HeaderValue::from_static("0"),
            )],
            completed_at: Instant::now(),
            origin: None,
        }
    }

    #[test]
    fn round_trip_keeps_order_repeats_sensitivity_and_bytes() {
        for body in [
            Bytes::new(),
            Bytes::from_static(b"ok\n"),
            Bytes::from((0..5000u32).map(|i| i as u8).collect::<Vec<_>>()),
        ] {
            let r = response(body);
            let p = Packed::pack(&r, None);
            assert_eq!(
                p.len(),
                1 + 6
                    + 1
                    + (7 + 12 + 10)
                    + 2 * (7 + 10 + 3)
                    + (7 + 8 + 8)
                    + (7 + 11 + 1)
                    + r.body.len()
            );
            assert_eq!(p.shared_ref(), None);
            let shared = Packed::pack(&r, Some(SharedRef([7; 16])));
            assert_eq!(shared.len(), p.len() + 16);
            assert_eq!(shared.shared_ref(), Some(SharedRef([7; 16])));
            assert_eq!(shared.unpack(r.completed_at).headers, r.headers);
            assert_eq!(shared.unpack(r.completed_at).body, r.body);
            let back = p.unpack(r.completed_at);
            assert_eq!(back.origin, None);
            assert_eq!(back.status, 201);
            assert_eq!(back.headers, r.headers);
            let sensitive: Vec<bool> = back.headers.iter().map(|(_, v)| v.is_sensitive()).collect();
            assert_eq!(sensitive, [false, true, false, false]);
            assert_eq!(back.body, r.body);
            assert_eq!(
                back.trailers, r.trailers,
                "trailers stay apart from headers"
            );
            assert_eq!(back.completed_at, r.completed_at);
        }
    }
}
