//! The bytes idem keeps in Redis under `idem:{<key hex>}`: one value per dedup key, a claim
//! or a settled record, so that one script sees and changes the whole state of a key.
//!
//! ```text
//! offset  size  field
//! 0       1     version: 1, or 2 for a response with trailers (gRPC over HTTP/2)
//! 1       1     kind: 'C' claim, 'S' stored response, 'N' not replayable, 'H' held,
//!               'F' freed (the outcome of a call whose key was freed, for remote waiters)
//! 2       32    fingerprint of the request that claimed the key (misuse detection)
//! 34      16    token of the claim this value belongs to (the fence)
//! 50      ..    payload, by kind:
//!   C  owner id (16) | start, unix ms (u64 LE) | hold, ms (u64 LE)
//!   S  response
//!   N  (nothing)
//!   H  status (u16 LE)
//!   F  'R' response | 'U' (no backend was reached)
//! response = completed, unix ms (u64 LE) | status (u16 LE) | header count (u32 LE)
//!            | per header: name length (u16 LE), name, value length (u32 LE), value
//!            | body length (u64 LE) | body
//!            | version 2 only: trailer count (u32 LE) | per trailer: as a header
//! ```
//!
//! Values without trailers are written as version 1, byte for byte what earlier releases
//! wrote and read; a replica of an earlier release reads a version 2 value as a store error
//! (so during a rolling upgrade, a gRPC response stored by a new replica is a store error
//! on an old one, under `on_store_error`, until it is upgraded too).
//!
//! The scripts (see `scripts.rs`) read only the fixed prefix: kind at byte 1, fingerprint at
//! 2..34, token at 34..50. Headers keep their order and repeats (`Set-Cookie`), the body is
//! kept byte for byte. Decoding never panics: anything short, unknown or invalid is a
//! [`CodecError`], which the caller treats as a store error.

use crate::key::Fingerprint;
use crate::message::StoredResponse;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Format version written in byte 0.
pub(crate) const VERSION: u8 = 1;
/// Format version of a value whose response has trailers.
pub(crate) const VERSION_TRAILERS: u8 = 2;
/// Length of the fixed prefix every value starts with.
pub(crate) const PREFIX: usize = 50;

/// A claim's fence: random, unique per claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Token(pub(crate) [u8; 16]);

/// The identity of one idem process (a replica), random at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct OwnerId(pub(crate) [u8; 16]);

impl OwnerId {
    /// Lowercase hex, for the liveness key and logs.
    pub(crate) fn hex(&self) -> String {
        hex(&self.0)
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// A claim as read back from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClaimInfo {
    /// The replica running the call.
    pub(crate) owner: OwnerId,
    /// When the call started (the owner's clock), unix ms.
    pub(crate) start_ms: u64,
    /// How long the claim lives from its start: the owner's upstream total deadline.
    pub(crate) hold_ms: u64,
}

/// The state of a key in Redis.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Body {
    /// A call is in flight somewhere.
    Claim(ClaimInfo),
    /// A stored response.
    Stored(StoredBytes),
    /// The response was streamed to its leader only.
    NotReplayable,
    /// Outcome unknown, with the status to answer (502 or 504).
    Held(u16),
    /// The call ended and freed the key; remote waiters get this outcome.
    Freed(Option<StoredBytes>),
}

/// A response as kept in Redis: like [`StoredResponse`], with the completion time on the
/// wall clock (replicas do not share a monotonic clock).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct StoredBytes {
    /// Completion, unix ms.
    pub(crate) completed_ms: u64,
    /// Status code.
    pub(crate) status: u16,
    /// Headers in upstream order, repeats kept.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// The body.
    pub(crate) body: Bytes,
    /// Trailer fields, in order.
    pub(crate) trailers: Vec<(HeaderName, HeaderValue)>,
}

impl StoredBytes {
    /// From a response idem holds.
    pub(crate) fn from_response(r: &StoredResponse) -> StoredBytes {
        let age = tokio::time::Instant::now().saturating_duration_since(r.completed_at);
        StoredBytes {
            completed_ms: unix_ms().saturating_sub(age.as_millis() as u64),
            status: r.status,
            headers: r.headers.clone(),
            body: r.body.clone(),
            trailers: r.trailers.clone(),
        }
    }

    /// As a response idem can replay: `Age` counts from the recorded completion.
    pub(crate) fn into_response(self) -> StoredResponse {
        let age = Duration::from_millis(unix_ms().saturating_sub(self.completed_ms));
        let now = tokio::time::Instant::now();
        StoredResponse {
            status: self.status,
            headers: self.headers,
            body: self.body,
            trailers: self.trailers,
            completed_at: now.checked_sub(age).unwrap_or(now),
        }
    }
}

/// A whole value: prefix and body.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Value {
    /// Fingerprint of the claiming request.
    pub(crate) fingerprint: Fingerprint,
    /// Token of the claim.
    pub(crate) token: Token,
    /// What the key holds.
    pub(crate) body: Body,
}

/// A value that is not one idem wrote (or a version it does not know).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("undecodable store value: {0}")]
pub(crate) struct CodecError(pub(crate) &'static str);

/// Milliseconds since the Unix epoch on this host's clock.
pub(crate) fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Value {
    /// The kind byte the scripts look at.
    pub(crate) fn kind(&self) -> u8 {
        match self.body {
            Body::Claim(_) => b'C',
            Body::Stored(_) => b'S',
            Body::NotReplayable => b'N',
            Body::Held(_) => b'H',
            Body::Freed(_) => b'F',
        }
    }

    /// Serializes.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(PREFIX + 64);
        let trailers = match &self.body {
            Body::Stored(r) | Body::Freed(Some(r)) => !r.trailers.is_empty(),
            _ => false,
        };
        out.push(if trailers { VERSION_TRAILERS } else { VERSION });
        out.push(self.kind());
        out.extend_from_slice(&self.fingerprint.0);
        out.extend_from_slice(&self.token.0);
        match &self.body {
            Body::Claim(c) => {
                out.extend_from_slice(&c.owner.0);
                out.extend_from_slice(&c.start_ms.to_le_bytes());
                out.extend_from_slice(&c.hold_ms.to_le_bytes());
            }
            Body::Stored(r) => encode_response(&mut out, r),
            Body::NotReplayable => {}
            Body::Held(status) => out.extend_from_slice(&status.to_le_bytes()),
            Body::Freed(None) => out.push(b'U'),
            Body::Freed(Some(r)) => {
                out.push(b'R');
                encode_response(&mut out, r);
            }
        }
        out
    }

    /// Parses; never panics.
    pub(crate) fn decode(bytes: &[u8]) -> Result<Value, CodecError> {
        let mut r = Reader(bytes);
        let version = r.u8()?;
        if version != VERSION && version != VERSION_TRAILERS {
            return Err(CodecError("unknown version"));
        }
        let trailers = version == VERSION_TRAILERS;
        let kind = r.u8()?;
        let fingerprint = Fingerprint(r.array::<32>()?);
        let token = Token(r.array::<16>()?);
        let body = match kind {
            b'C' => Body::Claim(ClaimInfo {
                owner: OwnerId(r.array::<16>()?),
                start_ms: r.u64()?,
                hold_ms: r.u64()?,
            }),
            b'S' => Body::Stored(decode_response(&mut r, trailers)?),
            b'N' => Body::NotReplayable,
            b'H' => Body::Held(r.u16()?),
            b'F' => match r.u8()? {
                b'U' => Body::Freed(None),
                b'R' => Body::Freed(Some(decode_response(&mut r, trailers)?)),
                _ => return Err(CodecError("unknown freed outcome")),
            },
            _ => return Err(CodecError("unknown kind")),
        };
        if !r.0.is_empty() {
            return Err(CodecError("trailing bytes"));
        }
        Ok(Value {
            fingerprint,
            token,
            body,
        })
    }
}

fn encode_response(out: &mut Vec<u8>, r: &StoredBytes) {
    out.extend_from_slice(&r.completed_ms.to_le_bytes());
    out.extend_from_slice(&r.status.to_le_bytes());
    encode_fields(out, &r.headers);
    out.extend_from_slice(&(r.body.len() as u64).to_le_bytes());
    out.extend_from_slice(&r.body);
    if !r.trailers.is_empty() {
        encode_fields(out, &r.trailers);
    }
}

fn encode_fields(out: &mut Vec<u8>, fields: &[(HeaderName, HeaderValue)]) {
    out.extend_from_slice(&(fields.len() as u32).to_le_bytes());
    for (name, value) in fields {
        let name = name.as_str().as_bytes();
        out.extend_from_slice(&(name.len() as u16).to_le_bytes());
        out.extend_from_slice(name);
        out.extend_from_slice(&(value.len() as u32).to_le_bytes());
        out.extend_from_slice(value.as_bytes());
    }
}

fn decode_fields(r: &mut Reader<'_>) -> Result<Vec<(HeaderName, HeaderValue)>, CodecError> {
    let count = r.u32()? as usize;
    // Every field takes at least 6 bytes: a count larger than that is a lie.
    if count > r.0.len() / 6 {
        return Err(CodecError("header count exceeds the value"));
    }
    let mut fields = Vec::with_capacity(count);
    for _ in 0..count {
        let n = r.u16()? as usize;
        let name = HeaderName::from_bytes(r.take(n)?).map_err(|_| CodecError("bad header name"))?;
        let n = r.u32()? as usize;
        let value =
            HeaderValue::from_bytes(r.take(n)?).map_err(|_| CodecError("bad header value"))?;
        fields.push((name, value));
    }
    Ok(fields)
}

fn decode_response(r: &mut Reader<'_>, trailers: bool) -> Result<StoredBytes, CodecError> {
    let completed_ms = r.u64()?;
    let status = r.u16()?;
    if !(100..=999).contains(&status) {
        return Err(CodecError("bad status"));
    }
    let headers = decode_fields(r)?;
    let n = usize::try_from(r.u64()?).map_err(|_| CodecError("body too long"))?;
    let body = Bytes::copy_from_slice(r.take(n)?);
    let trailers = if trailers {
        decode_fields(r)?
    } else {
        Vec::new()
    };
    Ok(StoredBytes {
        completed_ms,
        status,
        headers,
        body,
        trailers,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        if self.0.len() < n {
            return Err(CodecError("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, CodecError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample_response() -> StoredBytes {
        StoredBytes {
            completed_ms: 1_700_000_000_123,
            status: 201,
            headers: vec![
                (
                    HeaderName::from_static("set-cookie"),
                    HeaderValue::from_static("a=1"),
                ),
                (
                    HeaderName::from_static("content-type"),
                    HeaderValue::from_static("application/octet-stream"),
                ),
                (
                    HeaderName::from_static("set-cookie"),
                    HeaderValue::from_static("b=2; Path=/"),
                ),
                (
                    HeaderName::from_static("x-raw"),
                    HeaderValue::from_bytes(b"\xff\xfe opaque").unwrap(),
                ),
            ],
            body: Bytes::from_static(b"\x00\x01\xff binary \r\n\x00"),
            trailers: Vec::new(),
        }
    }

    fn all_kinds() -> Vec<Value> {
        let v = |body| Value {
            fingerprint: Fingerprint([7; 32]),
            token: Token([9; 16]),
            body,
        };
        vec![
            v(Body::Claim(ClaimInfo {
                owner: OwnerId([3; 16]),
                start_ms: 42,
                hold_ms: 310_000,
            })),
            v(Body::Stored(sample_response())),
            v(Body::NotReplayable),
            v(Body::Held(504)),
            v(Body::Freed(None)),
            v(Body::Freed(Some(sample_response()))),
        ]
    }

    #[test]
    fn every_kind_round_trips_with_order_repeats_and_bytes_kept() {
        for value in all_kinds() {
            let bytes = value.encode();
            assert_eq!(bytes[0], VERSION);
            assert_eq!(bytes[1], value.kind());
            assert_eq!(&bytes[2..34], &[7; 32]);
            assert_eq!(&bytes[34..50], &[9; 16]);
            assert_eq!(Value::decode(&bytes).unwrap(), value);
        }
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        for value in all_kinds() {
            let bytes = value.encode();
            for n in 0..bytes.len() {
                assert!(
                    Value::decode(&bytes[..n]).is_err(),
                    "prefix {n} of {value:?}"
                );
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(Value::decode(&longer).is_err());
        }
        let mut other = all_kinds()[2].encode();
        other[0] = 3;
        assert_eq!(Value::decode(&other), Err(CodecError("unknown version")));
    }

    #[test]
    fn a_response_with_trailers_is_version_2_and_round_trips() {
        let mut r = sample_response();
        r.trailers = vec![
            (
                HeaderName::from_static("grpc-status"),
                HeaderValue::from_static("3"),
            ),
            (
                HeaderName::from_static("x-trailer-bin"),
                HeaderValue::from_static("AQD/"),
            ),
        ];
        for body in [Body::Stored(r.clone()), Body::Freed(Some(r.clone()))] {
            let value = Value {
                fingerprint: Fingerprint([7; 32]),
                token: Token([9; 16]),
                body,
            };
            let bytes = value.encode();
            assert_eq!(bytes[0], VERSION_TRAILERS);
            assert_eq!(Value::decode(&bytes).unwrap(), value);
            for n in 0..bytes.len() {
                assert!(Value::decode(&bytes[..n]).is_err(), "prefix {n}");
            }
            // Read as version 1 (an earlier release), it is refused, never misread.
            let mut old = bytes.clone();
            old[0] = VERSION;
            assert!(Value::decode(&old).is_err());
        }
    }

    #[test]
    fn completion_time_survives_the_wall_clock_round_trip() {
        let now = tokio::time::Instant::now();
        let r = StoredResponse {
            status: 200,
            headers: vec![],
            body: Bytes::new(),
            trailers: Vec::new(),
            completed_at: now,
        };
        let back = StoredBytes::from_response(&r).into_response();
        assert!(back.completed_at <= tokio::time::Instant::now());
        assert!(now.saturating_duration_since(back.completed_at) < Duration::from_secs(1));
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = Value::decode(&bytes);
        }

        #[test]
        fn mutated_values_never_panic(i in 0usize..400, b in any::<u8>(), which in 0usize..6) {
            let mut bytes = all_kinds()[which].encode();
            let i = i % bytes.len();
            bytes[i] = b;
            let _ = Value::decode(&bytes);
        }
    }
}
