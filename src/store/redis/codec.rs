//! The bytes idem keeps in Redis under `idem:{<key hex>}`: one value per dedup key, a claim
//! or a settled record, so that one script sees and changes the whole state of a key.
//!
//! ```text
//! offset  size  field
//! 0       1     version: 2, or 3 for a response with trailers (gRPC over HTTP/2)
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
//!            | version 3 only: trailer count (u32 LE) | per trailer: as a header
//! last 32 bytes: MAC
//! ```
//!
//! **Authenticated**: the last 32 bytes are a keyed blake3 MAC ([`RecordMac`], keyed with a
//! key derived from the deployment secret) over the Redis key's name and everything before
//! it. A value is checked before any of it is used: one that fails (written or changed by
//! anyone without the secret, copied from another key, or written by another deployment) is
//! a [`CodecError`], a store error, never replayed. Redis ACLs and TLS still matter: whoever
//! can write Redis can delete a record (a retry then runs again) or block a key, but cannot
//! make idem serve what they wrote.
//!
//! Values without trailers are written as version 2, what the first MACed release wrote and
//! reads; a replica of that release reads a version 3 value as a store error (so during a
//! rolling upgrade, a gRPC response stored by a new replica is a store error on an old one,
//! under `on_store_error`, until it is upgraded too). Version 1 (no MAC) is refused.
//!
//! The scripts (see `scripts.rs`) read only the fixed prefix: kind at byte 1, fingerprint at
//! 2..34, token at 34..50 (they decide nothing that serves data: a claim, a fence, a
//! purge). Headers keep their order and repeats (`Set-Cookie`), the body is kept byte for
//! byte. Decoding never panics: anything short, unknown or invalid is a [`CodecError`],
//! which the caller treats as a store error.

use crate::key::Fingerprint;
use crate::message::StoredResponse;
use bytes::Bytes;
use http::{HeaderName, HeaderValue};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Format version written in byte 0 (1: before the MAC).
pub(crate) const VERSION: u8 = 2;
/// Format version of a value whose response has trailers.
pub(crate) const VERSION_TRAILERS: u8 = 3;
/// Length of the fixed prefix every value starts with.
pub(crate) const PREFIX: usize = 50;
/// Length of the MAC every value ends with.
pub(crate) const MAC_LEN: usize = 32;

/// The key values are authenticated with (see the module doc).
#[derive(Clone)]
pub(crate) struct RecordMac([u8; 32]);

impl std::fmt::Debug for RecordMac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RecordMac(..)")
    }
}

impl RecordMac {
    /// The MAC key of a deployment (its `[dedup] secret`), apart from the key-derivation
    /// key: a digest idem computes for a request is never a valid MAC.
    pub(crate) fn new(secret: &str) -> RecordMac {
        RecordMac(blake3::derive_key(
            "idem 2026-11 redis record mac",
            secret.as_bytes(),
        ))
    }

    fn tag(&self, name: &[u8], value: &[u8]) -> blake3::Hash {
        let mut h = blake3::Hasher::new_keyed(&self.0);
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name);
        h.update(value);
        h.finalize()
    }
}

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
            origin: None,
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

    /// Serializes, authenticated for the Redis key `name`.
    pub(crate) fn encode(&self, mac: &RecordMac, name: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(PREFIX + 64 + MAC_LEN);
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
        let tag = mac.tag(name, &out);
        out.extend_from_slice(tag.as_bytes());
        out
    }

    /// Checks the MAC for the Redis key `name`, then parses; never panics.
    pub(crate) fn decode(bytes: &[u8], mac: &RecordMac, name: &[u8]) -> Result<Value, CodecError> {
        if bytes.first() == Some(&1) {
            return Err(CodecError("written by an idem before version 2 (no MAC)"));
        }
        if bytes.len() < PREFIX + MAC_LEN {
            return Err(CodecError("truncated"));
        }
        let (value, tag) = bytes.split_at(bytes.len() - MAC_LEN);
        let tag: [u8; MAC_LEN] = tag.try_into().map_err(|_| CodecError("truncated"))?;
        // `Hash` equality is constant-time.
        if mac.tag(name, value) != blake3::Hash::from(tag) {
            return Err(CodecError(
                "fails its MAC: not written by this deployment (another secret), copied from another key, or changed",
            ));
        }
        Value::parse(value)
    }

    fn parse(bytes: &[u8]) -> Result<Value, CodecError> {
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

    const NAME: &[u8] = b"idem:{0101}";

    fn mac() -> RecordMac {
        RecordMac::new("the deployment secret, 16+ bytes")
    }

    fn encode(v: &Value) -> Vec<u8> {
        v.encode(&mac(), NAME)
    }

    fn decode(bytes: &[u8]) -> Result<Value, CodecError> {
        Value::decode(bytes, &mac(), NAME)
    }

    #[test]
    fn every_kind_round_trips_with_order_repeats_and_bytes_kept() {
        for value in all_kinds() {
            let bytes = encode(&value);
            assert_eq!(bytes[0], VERSION);
            assert_eq!(bytes[1], value.kind());
            assert_eq!(&bytes[2..34], &[7; 32]);
            assert_eq!(&bytes[34..50], &[9; 16]);
            assert_eq!(decode(&bytes).unwrap(), value);
        }
    }

    #[test]
    fn every_truncation_and_extension_is_an_error() {
        for value in all_kinds() {
            let bytes = encode(&value);
            for n in 0..bytes.len() {
                assert!(decode(&bytes[..n]).is_err(), "prefix {n} of {value:?}");
            }
            let mut longer = bytes.clone();
            longer.push(0);
            assert!(decode(&longer).is_err());
        }
        let mut old = encode(&all_kinds()[2]);
        old[0] = 1;
        assert_eq!(
            decode(&old),
            Err(CodecError("written by an idem before version 2 (no MAC)"))
        );
        let mut other = remac(&encode(&all_kinds()[2]));
        other[0] = 4;
        let other = remac(&other);
        assert_eq!(decode(&other), Err(CodecError("unknown version")));
    }

    /// The same value with its MAC computed again (after a test changed a byte).
    fn remac(bytes: &[u8]) -> Vec<u8> {
        let mut v = bytes[..bytes.len() - MAC_LEN].to_vec();
        let tag = mac().tag(NAME, &v);
        v.extend_from_slice(tag.as_bytes());
        v
    }

    /// Finding 4 of issue 14: whoever could write Redis could make a replica replay a
    /// response of their making. A value is only used if it carries the deployment's MAC
    /// for that very key.
    #[test]
    fn a_record_is_used_only_with_the_mac_of_this_deployment_and_key() {
        let forged = Value {
            fingerprint: Fingerprint([7; 32]),
            token: Token([9; 16]),
            body: Body::Stored(sample_response()),
        };
        let bytes = encode(&forged);
        let other_secret = RecordMac::new("another deployment's secret!!");
        assert!(Value::decode(&bytes, &other_secret, NAME).is_err());
        assert!(Value::decode(&bytes, &mac(), b"idem:{0202}").is_err());
        assert!(Value::decode(&bytes, &mac(), b"other:{0101}").is_err());
        // Written without the secret: the MAC of another key, or none at all.
        let unsigned = forged.encode(&other_secret, NAME);
        assert!(decode(&unsigned).is_err());
        assert!(decode(&bytes[..bytes.len() - MAC_LEN]).is_err());
    }

    #[test]
    fn a_response_with_trailers_is_version_3_and_round_trips() {
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
            let bytes = encode(&value);
            assert_eq!(bytes[0], VERSION_TRAILERS);
            assert_eq!(decode(&bytes).unwrap(), value);
            for n in 0..bytes.len() {
                assert!(decode(&bytes[..n]).is_err(), "prefix {n}");
            }
            // Read as version 2 (the release before), with a valid MAC, it is refused
            // (trailing bytes), never misread.
            let mut old = bytes.clone();
            old[0] = VERSION;
            assert_eq!(decode(&remac(&old)), Err(CodecError("trailing bytes")));
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
            origin: None,
        };
        let back = StoredBytes::from_response(&r).into_response();
        assert!(back.completed_at <= tokio::time::Instant::now());
        assert!(now.saturating_duration_since(back.completed_at) < Duration::from_secs(1));
    }

    fn arbitrary_value() -> impl Strategy<Value = Value> {
        let header = (
            "[a-z][a-z0-9-]{0,12}",
            proptest::collection::vec(32u8..127, 0..20),
        )
            .prop_map(|(n, v)| {
                (
                    HeaderName::from_bytes(n.as_bytes()).unwrap(),
                    HeaderValue::from_bytes(&v).unwrap(),
                )
            });
        let response = (
            any::<u64>(),
            100u16..1000,
            proptest::collection::vec(header.clone(), 0..6),
            proptest::collection::vec(any::<u8>(), 0..200),
            proptest::collection::vec(header, 0..3),
        )
            .prop_map(
                |(completed_ms, status, headers, body, trailers)| StoredBytes {
                    completed_ms,
                    status,
                    headers,
                    body: Bytes::from(body),
                    trailers,
                },
            );
        let body = prop_oneof![
            (any::<[u8; 16]>(), any::<u64>(), any::<u64>()).prop_map(|(o, start_ms, hold_ms)| {
                Body::Claim(ClaimInfo {
                    owner: OwnerId(o),
                    start_ms,
                    hold_ms,
                })
            }),
            response.clone().prop_map(Body::Stored),
            Just(Body::NotReplayable),
            any::<u16>().prop_map(Body::Held),
            proptest::option::of(response).prop_map(Body::Freed),
        ];
        (any::<[u8; 32]>(), any::<[u8; 16]>(), body).prop_map(|(f, t, body)| Value {
            fingerprint: Fingerprint(f),
            token: Token(t),
            body,
        })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn mutated_values_never_panic(i in 0usize..400, b in any::<u8>(), which in 0usize..6) {
            let mut bytes = encode(&all_kinds()[which]);
            let i = i % bytes.len();
            bytes[i] = b;
            let _ = decode(&bytes);
        }

        /// Any record round-trips under its key, and any change of one byte of it, of
        /// its key's name or of the secret makes it a store error.
        #[test]
        fn the_mac_covers_every_byte_of_every_record(
            value in arbitrary_value(),
            i in any::<usize>(),
            flip in 1u8..=255,
            name in proptest::collection::vec(any::<u8>(), 1..40),
        ) {
            let bytes = value.encode(&mac(), &name);
            prop_assert_eq!(Value::decode(&bytes, &mac(), &name), Ok(value));
            let mut changed = bytes.clone();
            let i = i % changed.len();
            changed[i] ^= flip;
            prop_assert!(Value::decode(&changed, &mac(), &name).is_err());
            let mut other = name.clone();
            other[i % name.len()] ^= flip;
            prop_assert!(Value::decode(&bytes, &mac(), &other).is_err());
            prop_assert!(Value::decode(&bytes, &RecordMac::new("x-another secret-x"), &name).is_err());
        }
    }
}
