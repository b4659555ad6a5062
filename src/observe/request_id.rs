//! Request ids: the `X-Request-Id` (`[server] request_id_header`) every request carries
//! upstream, back to its client and into the access log, and the [`Origin`] by which a
//! waiter or a replay names the request that led its call.
//!
//! **Kept or replaced** (decision): a client's id is kept when it is one field of 1 to
//! [`MAX_LEN`] bytes of visible ASCII (no spaces, no controls): ids made by nginx
//! (`$request_id`), Heroku's router, Envoy or a client library all fit. Anything else (two
//! fields, empty, too long, a space or a control character: something that could split a
//! log line or forge a field) is replaced by a generated id, as a missing one is. The
//! client's value is never echoed when it is replaced.
//!
//! **Generated ids** are UUIDv7 (RFC 9562): milliseconds since the epoch then 74 random
//! bits, so they sort by time in a log. Made from the clock and a thread-local RNG: no lock
//! and one small allocation (the header value) per request that brought none.

use http::{HeaderMap, HeaderName, HeaderValue};
use rand::Rng;
use std::time::{SystemTime, UNIX_EPOCH};

/// The longest client-sent id kept (Heroku's router accepts up to 200 characters too).
pub(crate) const MAX_LEN: usize = 200;

/// One request's id, as a header value (visible ASCII by construction).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct RequestId(HeaderValue);

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RequestId({})", self.as_str())
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where a request's id came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Source {
    /// The client sent a usable one: kept, nothing to add upstream.
    Client,
    /// idem made it (the client sent none, or one that was not usable).
    Generated,
}

impl RequestId {
    /// The id of a request with `headers`: the client's under `name` when usable, else a
    /// new one (see the module doc).
    pub(crate) fn of(headers: &HeaderMap, name: &HeaderName) -> (RequestId, Source) {
        let mut values = headers.get_all(name).iter();
        if let (Some(v), None) = (values.next(), values.next()) {
            if usable(v.as_bytes()) {
                return (RequestId(v.clone()), Source::Client);
            }
        }
        (RequestId::generate(), Source::Generated)
    }

    /// A new UUIDv7.
    pub(crate) fn generate() -> RequestId {
        let millis = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut random = [0u8; 10];
        rand::rng().fill(&mut random);
        let uuid = uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid();
        let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
        uuid.hyphenated().encode_lower(&mut text);
        RequestId(HeaderValue::from_bytes(&text).expect("a UUID is visible ASCII"))
    }

    /// An id read back from the store; `None` if it is not one idem would have kept.
    pub(crate) fn from_stored(bytes: &[u8]) -> Option<RequestId> {
        usable(bytes)
            .then(|| HeaderValue::from_bytes(bytes).ok())
            .flatten()
            .map(RequestId)
    }

    /// The id as text.
    pub(crate) fn as_str(&self) -> &str {
        // Visible ASCII by construction.
        self.0.to_str().unwrap_or("-")
    }

    /// The id as bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }

    /// The header value (cloning it shares the bytes).
    pub(crate) fn header_value(&self) -> &HeaderValue {
        &self.0
    }
}

/// Whether a client's id is kept.
fn usable(v: &[u8]) -> bool {
    !v.is_empty() && v.len() <= MAX_LEN && v.iter().all(|b| (0x21..=0x7e).contains(b))
}

/// A span of a distributed trace, by its W3C ids (`crate::observe::trace`): plain bytes,
/// so that the store can keep one without knowing OpenTelemetry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SpanRef {
    /// The trace id.
    pub(crate) trace_id: [u8; 16],
    /// The span id.
    pub(crate) span_id: [u8; 8],
}

/// The request that led a call, as its waiters and the replays of its stored response
/// name it: its id, and its span when traces are on. Kept with the flight and in the
/// stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    /// The leader's request id.
    pub(crate) request_id: RequestId,
    /// The leader's server span.
    pub(crate) span: Option<SpanRef>,
}

impl Origin {
    /// Bytes [`Origin::encode`] writes.
    pub(crate) fn encoded_len(&self) -> usize {
        let id = match uuid_bytes(&self.request_id) {
            Some(_) => 16,
            None => 1 + self.request_id.as_bytes().len(),
        };
        1 + id + if self.span.is_some() { 24 } else { 0 }
    }

    /// `form u8` (bit 2 always set, so that a 0 can say "none"; bit 0: a UUID in 16 bytes,
    /// else a length byte and the id's bytes; bit 1: a span follows) `| id | [trace id 16 |
    /// span id 8]`. A stored record keeps one per entry: a generated id (a UUID) takes 17
    /// bytes rather than 37.
    pub(crate) fn encode(&self, out: &mut Vec<u8>) {
        let uuid = uuid_bytes(&self.request_id);
        let form = ORIGIN | u8::from(uuid.is_some()) | if self.span.is_some() { SPAN } else { 0 };
        out.push(form);
        match uuid {
            Some(b) => out.extend_from_slice(&b),
            None => {
                let id = self.request_id.as_bytes();
                // At most MAX_LEN (200) bytes: a kept id is bounded.
                out.push(id.len() as u8);
                out.extend_from_slice(id);
            }
        }
        if let Some(s) = &self.span {
            out.extend_from_slice(&s.trace_id);
            out.extend_from_slice(&s.span_id);
        }
    }

    /// Reads what [`Origin::encode`] wrote at the start of `b`: the origin and the bytes it
    /// took; `None` if `b` does not start with one.
    pub(crate) fn decode(b: &[u8]) -> Option<(Origin, usize)> {
        let form = *b.first()?;
        if form & ORIGIN == 0 || form & !(ORIGIN | UUID | SPAN) != 0 {
            return None;
        }
        let (request_id, mut at) = if form & UUID != 0 {
            let raw: [u8; 16] = b.get(1..17)?.try_into().ok()?;
            let mut text = [0u8; uuid::fmt::Hyphenated::LENGTH];
            uuid::Uuid::from_bytes(raw)
                .hyphenated()
                .encode_lower(&mut text);
            (RequestId::from_stored(&text)?, 17)
        } else {
            let len = *b.get(1)? as usize;
            (RequestId::from_stored(b.get(2..2 + len)?)?, 2 + len)
        };
        let span = if form & SPAN != 0 {
            let ids = b.get(at..at + 24)?;
            at += 24;
            Some(SpanRef {
                trace_id: ids[..16].try_into().ok()?,
                span_id: ids[16..].try_into().ok()?,
            })
        } else {
            None
        };
        Some((Origin { request_id, span }, at))
    }
}

const UUID: u8 = 1;
const SPAN: u8 = 2;
const ORIGIN: u8 = 4;

/// The 16 bytes of an id that is a UUID written as idem writes one (lowercase, hyphenated),
/// so that it reads back identical.
fn uuid_bytes(id: &RequestId) -> Option<[u8; 16]> {
    let text = id.as_str();
    let uuid = uuid::Uuid::try_parse(text).ok()?;
    let mut again = [0u8; uuid::fmt::Hyphenated::LENGTH];
    (uuid.hyphenated().encode_lower(&mut again).as_bytes() == text.as_bytes())
        .then(|| *uuid.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEFAULT_HEADER: &str = "x-request-id";

    fn headers(values: &[&[u8]]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(DEFAULT_HEADER, HeaderValue::from_bytes(v).unwrap());
        }
        h
    }

    fn id_of(values: &[&[u8]]) -> (RequestId, Source) {
        RequestId::of(&headers(values), &HeaderName::from_static(DEFAULT_HEADER))
    }

    #[test]
    fn a_usable_client_id_is_kept_byte_for_byte() {
        for v in [
            &b"abc"[..],
            b"0f3c9a1e-5b2d-4c8a-9e7f-1a2b3c4d5e6f",
            b"req_01HZX~!#$%&'*+.^`|",
            &[b'x'; MAX_LEN],
        ] {
            let (id, source) = id_of(&[v]);
            assert_eq!(source, Source::Client, "{v:?}");
            assert_eq!(id.as_bytes(), v);
        }
    }

    #[test]
    fn unusable_or_missing_ids_are_replaced_by_a_uuid_v7() {
        for values in [
            vec![],
            vec![&b""[..]],
            vec![&b"two words"[..]],
            vec![&b"tab\there"[..]],
            vec![&b"caf\xc3\xa9"[..]],
            vec![&[b'x'; MAX_LEN + 1][..]],
            vec![&b"a"[..], &b"b"[..]],
        ] {
            let (id, source) = id_of(&values);
            assert_eq!(source, Source::Generated, "{values:?}");
            let uuid = uuid::Uuid::parse_str(id.as_str()).expect("a UUID");
            assert_eq!(uuid.get_version_num(), 7, "{id}");
            assert_eq!(id.as_str().len(), 36);
            assert_eq!(id.as_str(), id.as_str().to_ascii_lowercase());
        }
    }

    #[test]
    fn generated_ids_differ_and_start_with_the_time() {
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let a = RequestId::generate();
        let b = RequestId::generate();
        assert_ne!(a, b);
        let (secs, _) = uuid::Uuid::parse_str(a.as_str())
            .unwrap()
            .get_timestamp()
            .unwrap()
            .to_unix();
        assert!(secs * 1000 + 1000 >= before && secs * 1000 <= before + 1000);
    }

    #[test]
    fn origins_round_trip_with_and_without_a_span() {
        let text = |s: &str| RequestId::from_stored(s.as_bytes()).unwrap();
        for (request_id, id_bytes) in [
            (RequestId::generate(), 16),
            // A client's UUID in idem's own form is kept in 16 bytes too.
            (text("0192c1d4-6f4e-7a31-9c1b-52e8d3f0a9b7"), 16),
            // Any other form, byte for byte.
            (text("0192C1D4-6F4E-7A31-9C1B-52E8D3F0A9B7"), 37),
            (text("{0192c1d4-6f4e-7a31-9c1b-52e8d3f0a9b7}"), 39),
            (text("req-7"), 6),
            (text(&"x".repeat(MAX_LEN)), 1 + MAX_LEN),
        ] {
            for span in [
                None,
                Some(SpanRef {
                    trace_id: [7; 16],
                    span_id: [9; 8],
                }),
            ] {
                let o = Origin {
                    request_id: request_id.clone(),
                    span,
                };
                let mut buf = Vec::new();
                o.encode(&mut buf);
                let span_bytes = if span.is_some() { 24 } else { 0 };
                assert_eq!(buf.len(), 1 + id_bytes + span_bytes, "{request_id}");
                assert_eq!(buf.len(), o.encoded_len());
                buf.extend_from_slice(b"rest");
                let (back, used) = Origin::decode(&buf).unwrap();
                assert_eq!(back, o);
                assert_eq!(&buf[used..], b"rest");
            }
        }
        // Truncated or foreign bytes are refused, never a panic.
        for bytes in [
            &[][..],
            &[0, 1, b'a'],
            &[4, 5, b'a'],
            &[4, 1, b' '],
            &[4, 0],
            &[5, 0, 1],
            &[6, 1, b'a', 0],
            &[12, 1, b'a'],
        ] {
            assert!(Origin::decode(bytes).is_none(), "{bytes:?}");
        }
    }
}
