//! Key derivation: who is asking (scope), what is asked (fingerprint), and the dedup key.
//!
//! Every digest is blake3 in keyed mode with the deployment secret, so a reader of the store
//! cannot derive the key of a guessable request. Every field is length- or count-prefixed so
//! that no two different requests collide by moving bytes between fields. The body comes last
//! and its length is appended after it, which lets the body be hashed as it streams in while
//! the encoding stays injective (everything before it is self-delimiting).
//!
//! Keyed and fingerprint keys are derived under different domain tags, so an
//! `Idempotency-Key` can never name the same entry as a keyless request.

use std::fmt;

/// The 32-byte identity of one logical request: the map key for flights and stored entries.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct DedupKey(pub(crate) [u8; 32]);

impl DedupKey {
    /// A short, non-reversible prefix for logs and the admin view: never the raw key.
    pub(crate) fn short(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(12);
        for b in &self.0[..6] {
            s.push(HEX[usize::from(b >> 4)] as char);
            s.push(HEX[usize::from(b & 0xf)] as char);
        }
        s
    }

    /// Whether the key's lowercase hex form starts with `prefix` (hex digits, any case;
    /// the admin purge names keys this way).
    pub(crate) fn has_hex_prefix(&self, prefix: &str) -> bool {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        prefix.len() <= 64
            && prefix.bytes().enumerate().all(|(i, c)| {
                let byte = self.0[i / 2];
                let nibble = if i % 2 == 0 { byte >> 4 } else { byte & 0xf };
                c.to_ascii_lowercase() == HEX[nibble as usize]
            })
    }
}

impl fmt::Debug for DedupKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DedupKey({})", self.short())
    }
}

/// Digest of method, path, query, fingerprint headers and body.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Fingerprint(pub(crate) [u8; 32]);

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({:02x}{:02x}..)", self.0[0], self.0[1])
    }
}

impl Fingerprint {
    /// The half of the fingerprint the embedded store keeps to detect key misuse: two
    /// different requests share one only by a 128-bit collision, and it saves 16 bytes per
    /// stored entry.
    pub(crate) fn tag(&self) -> FingerprintTag {
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&self.0[..16]);
        FingerprintTag(tag)
    }
}

/// See [`Fingerprint::tag`].
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct FingerprintTag(pub(crate) [u8; 16]);

/// Digest of who is asking: the authority plus the scope values (what of a request
/// identifies its caller: `crate::http::key_inputs`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub(crate) struct Scope {
    digest: [u8; 32],
}

/// A short identity of a scope, for per-scope accounting in the store
/// (`store.max_keys_per_scope`). Half of the keyed scope digest: not reversible, and two
/// scopes share one only by a 128-bit collision.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub(crate) struct ScopeId(pub(crate) [u8; 16]);

impl Scope {
    /// This scope's identity for per-scope accounting.
    pub(crate) fn id(&self) -> ScopeId {
        let mut id = [0u8; 16];
        id.copy_from_slice(&self.digest[..16]);
        ScopeId(id)
    }
}

/// Domain tags keep the different digests apart even for identical inputs.
mod domain {
    pub(crate) const SCOPE: u8 = 1;
    pub(crate) const FINGERPRINT: u8 = 2;
    pub(crate) const KEYED: u8 = 3;
    pub(crate) const BY_FINGERPRINT: u8 = 4;
}

/// Derives scopes, fingerprints and keys with the deployment secret.
#[derive(Clone)]
pub(crate) struct KeyDeriver {
    secret: [u8; 32],
}

impl fmt::Debug for KeyDeriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDeriver(..)")
    }
}

impl KeyDeriver {
    /// From the configured secret; `None` draws a random per-process secret (fine for the
    /// memory store, whose keys die with the process anyway).
    pub(crate) fn new(secret: Option<&str>) -> KeyDeriver {
        let secret = match secret {
            Some(s) => blake3::derive_key("idem 2026-11 dedup key secret", s.as_bytes()),
            None => random_bytes(),
        };
        KeyDeriver { secret }
    }

    /// The scope of a request. `headers` yields, for each scope value in order (configured
    /// scope headers, then named cookies), its values as sent (an empty list when absent).
    pub(crate) fn scope<'a>(
        &self,
        authority: &[u8],
        headers: impl Iterator<Item = Vec<&'a [u8]>>,
    ) -> Scope {
        let mut buf = Encoder::new(domain::SCOPE, 128);
        buf.len_prefix(authority.len());
        buf.0.extend(authority.iter().map(u8::to_ascii_lowercase));
        for values in headers {
            buf.list(&values);
        }
        Scope {
            digest: self.digest(&buf.0),
        }
    }

    /// Starts a fingerprint; feed the body with [`FingerprintHasher::update`].
    pub(crate) fn fingerprint<'a>(
        &self,
        method: &[u8],
        path: &[u8],
        query: &[u8],
        headers: impl Iterator<Item = (&'a str, Vec<&'a [u8]>)>,
    ) -> FingerprintHasher {
        let headers: Vec<_> = headers.collect();
        let mut buf = Encoder::new(
            domain::FINGERPRINT,
            64 + method.len() + path.len() + query.len(),
        );
        buf.field(method);
        buf.field(path);
        buf.field(query);
        buf.len_prefix(headers.len());
        for (name, values) in headers {
            buf.field(name.as_bytes());
            buf.list(&values);
        }
        FingerprintHasher {
            secret: self.secret,
            input: buf.0,
            hasher: None,
            body_len: 0,
        }
    }

    /// The key of a request that carries an `Idempotency-Key` (already decoded).
    pub(crate) fn keyed(&self, scope: &Scope, key: &[u8]) -> DedupKey {
        let mut buf = Encoder::new(domain::KEYED, 48 + key.len());
        buf.0.extend_from_slice(&scope.digest);
        buf.field(key);
        DedupKey(self.digest(&buf.0))
    }

    /// The key of a keyless request on a fingerprint route.
    pub(crate) fn by_fingerprint(&self, scope: &Scope, fp: &Fingerprint) -> DedupKey {
        let mut input = [0u8; 65];
        input[0] = domain::BY_FINGERPRINT;
        input[1..33].copy_from_slice(&scope.digest);
        input[33..].copy_from_slice(&fp.0);
        DedupKey(self.digest(&input))
    }

    /// One keyed hash of a whole encoded input (domain byte first). The fields are laid out
    /// in a buffer and hashed with blake3's one-shot `keyed_hash`: an incremental `Hasher`
    /// is a 1.9 KB state whose set-up, per-`update` and finalize costs were about a tenth of
    /// a replay's instructions. The bytes hashed are the same either way, so keys do not
    /// change (`digests_are_stable_across_versions`).
    fn digest(&self, input: &[u8]) -> [u8; 32] {
        *blake3::keyed_hash(&self.secret, input).as_bytes()
    }
}

/// Bodies up to this size are fingerprinted in one pass with the head (copied into its
/// buffer); larger ones stream through an incremental hasher.
const ONE_PASS_UP_TO: usize = 16 * 1024;

/// A fingerprint being computed while the body streams in.
pub(crate) struct FingerprintHasher {
    secret: [u8; 32],
    /// The encoded head, then the body while it stays small.
    input: Vec<u8>,
    /// Set once the body outgrows `ONE_PASS_UP_TO` (boxed: it is 1.9 KB, and this hasher
    /// lives in request futures that are moved around).
    hasher: Option<Box<blake3::Hasher>>,
    body_len: u64,
}

impl FingerprintHasher {
    /// Adds a chunk of the request body.
    pub(crate) fn update(&mut self, chunk: &[u8]) {
        self.body_len += chunk.len() as u64;
        if let Some(h) = &mut self.hasher {
            h.update(chunk);
        } else if self.input.len() + chunk.len() <= ONE_PASS_UP_TO {
            self.input.extend_from_slice(chunk);
        } else {
            let mut h = Box::new(blake3::Hasher::new_keyed(&self.secret));
            h.update(&self.input);
            h.update(chunk);
            self.input = Vec::new();
            self.hasher = Some(h);
        }
    }

    /// Finishes; the body length goes last so the encoding stays injective.
    pub(crate) fn finish(mut self) -> Fingerprint {
        let len = self.body_len.to_le_bytes();
        let digest = match &mut self.hasher {
            Some(h) => h.update(&len).finalize(),
            None => {
                self.input.extend_from_slice(&len);
                blake3::keyed_hash(&self.secret, &self.input)
            }
        };
        Fingerprint(*digest.as_bytes())
    }
}

/// The injective encoding hashed for scopes, fingerprints and keys: every field is its
/// length (u64 LE) then its bytes; a list is its count then its fields.
struct Encoder(Vec<u8>);

impl Encoder {
    /// Starts with the domain tag.
    fn new(domain: u8, capacity: usize) -> Encoder {
        let mut v = Vec::with_capacity(capacity);
        v.push(domain);
        Encoder(v)
    }

    fn len_prefix(&mut self, n: usize) {
        self.0.extend_from_slice(&(n as u64).to_le_bytes());
    }

    fn field(&mut self, bytes: &[u8]) {
        self.len_prefix(bytes.len());
        self.0.extend_from_slice(bytes);
    }

    /// Absent (count 0) and present-but-empty (count 1, length 0) stay distinct.
    fn list(&mut self, values: &[&[u8]]) {
        self.len_prefix(values.len());
        for v in values {
            self.field(v);
        }
    }
}

/// `N` random bytes from the OS, drawn at start-up (the per-process key secret, the Redis
/// owner id and token seed).
///
/// # Panics
/// When the OS has no random source: idem cannot derive unguessable keys without one.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).expect("the OS random source is unavailable");
    buf
}

/// Largest decoded `Idempotency-Key` value.
pub(crate) const MAX_KEY_LEN: usize = 255;

/// Why an `Idempotency-Key` header was refused (all answered with 400 key-malformed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyHeaderError {
    /// The header appeared more than once.
    #[error("the Idempotency-Key header appears more than once")]
    Repeated,
    /// The value is empty.
    #[error("the Idempotency-Key value is empty")]
    Empty,
    /// The value is neither an RFC 8941 string nor a bare token.
    #[error("the Idempotency-Key value is neither a quoted string nor a token of visible ASCII without quotes, commas or spaces")]
    Malformed,
    /// The decoded value is longer than 255 bytes.
    #[error("the Idempotency-Key value is longer than 255 bytes")]
    TooLong,
}

/// Parses the `Idempotency-Key` header values of a request: `Ok(None)` when absent.
/// Accepts an RFC 8941 string (`"abc"`, with `\"` and `\\` escapes) or a bare token; both
/// decode to the same value, so `"abc"` and `abc` are the same key.
///
/// ```
/// use idem::key::{parse_idempotency_key, KeyHeaderError};
///
/// let one = |v: &'static str| parse_idempotency_key(std::iter::once(v.as_bytes()));
/// assert_eq!(one("abc"), Ok(Some(b"abc".to_vec())));
/// assert_eq!(one("\"abc\""), one("abc"));
/// assert_eq!(one("a b"), Err(KeyHeaderError::Malformed));
/// assert_eq!(parse_idempotency_key(std::iter::empty()), Ok(None));
/// ```
pub fn parse_idempotency_key<'a>(
    mut values: impl Iterator<Item = &'a [u8]>,
) -> Result<Option<Vec<u8>>, KeyHeaderError> {
    let Some(raw) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(KeyHeaderError::Repeated);
    }
    let raw = raw.trim_ascii();
    if raw.is_empty() {
        return Err(KeyHeaderError::Empty);
    }
    let decoded = if raw[0] == b'"' {
        decode_sf_string(raw)?
    } else {
        if !raw
            .iter()
            .all(|&b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b',')
        {
            return Err(KeyHeaderError::Malformed);
        }
        raw.to_vec()
    };
    if decoded.is_empty() {
        return Err(KeyHeaderError::Empty);
    }
    if decoded.len() > MAX_KEY_LEN {
        return Err(KeyHeaderError::TooLong);
    }
    Ok(Some(decoded))
}

fn decode_sf_string(raw: &[u8]) -> Result<Vec<u8>, KeyHeaderError> {
    let mut out = Vec::with_capacity(raw.len());
    let mut it = raw[1..].iter();
    while let Some(&b) = it.next() {
        match b {
            b'\\' => match it.next() {
                Some(&e @ (b'"' | b'\\')) => out.push(e),
                _ => return Err(KeyHeaderError::Malformed),
            },
            // The closing quote must end the value: parameters or lists are not keys.
            b'"' => {
                return if it.next().is_none() {
                    Ok(out)
                } else {
                    Err(KeyHeaderError::Malformed)
                }
            }
            0x20..=0x7e => out.push(b),
            _ => return Err(KeyHeaderError::Malformed),
        }
    }
    Err(KeyHeaderError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k() -> KeyDeriver {
        KeyDeriver::new(Some("test secret, long enough"))
    }

    #[test]
    fn fingerprint_does_not_depend_on_how_the_body_is_chunked() {
        let head = || {
            k().fingerprint(
                b"POST",
                b"/a",
                b"",
                std::iter::empty::<(&str, Vec<&[u8]>)>(),
            )
        };
        for size in [0, 10_000, ONE_PASS_UP_TO - 30, ONE_PASS_UP_TO, 40_000] {
            let body: Vec<u8> = (0..size).map(|i| (i * 7) as u8).collect();
            let mut digests = Vec::new();
            for chunk in [1, 100, 7000, size.max(1)] {
                let mut h = head();
                for c in body.chunks(chunk) {
                    h.update(c);
                }
                digests.push(h.finish());
            }
            // The definition: domain, head fields, body, body length, in one keyed hash.
            let mut input = vec![domain::FINGERPRINT];
            for f in [&b"POST"[..], b"/a", b""] {
                input.extend_from_slice(&(f.len() as u64).to_le_bytes());
                input.extend_from_slice(f);
            }
            input.extend_from_slice(&0u64.to_le_bytes());
            input.extend_from_slice(&body);
            input.extend_from_slice(&(size as u64).to_le_bytes());
            let reference = Fingerprint(*blake3::keyed_hash(&k().secret, &input).as_bytes());
            assert!(
                digests.iter().all(|d| *d == reference),
                "body of {size} bytes"
            );
        }
    }

    /// Keys are shared between replicas (Redis mode) and across a rolling upgrade: the
    /// bytes hashed must never change. These digests were computed by the field-by-field
    /// hashing this encoding replaced.
    #[test]
    fn digests_are_stable_across_versions() {
        let k = k();
        let scope = k.scope(
            b"API.example.com",
            vec![vec![&b"Bearer t"[..]], vec![]].into_iter(),
        );
        let mut h = k.fingerprint(
            b"POST",
            b"/orders",
            b"a=1",
            vec![("content-type", vec![&b"application/json"[..]])].into_iter(),
        );
        h.update(b"{\"order\":");
        h.update(b"42}");
        let fp = h.finish();
        let hex = |b: &[u8]| crate::store::redis::codec::hex(b);
        assert_eq!(hex(&scope.id().0), "ad4774410bcaafd7a3c160f68ccd569d");
        assert_eq!(
            hex(&fp.0),
            "b25124a81e013f0e8e5a490f73ca9e2163c73431238f44760cefadc9e112aea3"
        );
        assert_eq!(
            hex(&k.keyed(&scope, b"abc").0),
            "7264b4737aad95881e9a89725aeb8710dfcad7cff95108e0e54f27cbadc2a51a"
        );
        assert_eq!(
            hex(&k.by_fingerprint(&scope, &fp).0),
            "cc97b44c08944f8fba3b00f35d405eed6e932f8a25ac4d8e5afe91fbf50c9657"
        );
    }

    fn fp(method: &str, path: &str, query: &str, ct: Option<&str>, body: &[&[u8]]) -> Fingerprint {
        let vals: Vec<&[u8]> = ct.map(|c| vec![c.as_bytes()]).unwrap_or_default();
        let mut h = k().fingerprint(
            method.as_bytes(),
            path.as_bytes(),
            query.as_bytes(),
            std::iter::once(("content-type", vals)),
        );
        for c in body {
            h.update(c);
        }
        h.finish()
    }

    #[test]
    fn hex_prefix_matches_the_short_form_and_odd_lengths() {
        let mut bytes = [0u8; 32];
        bytes[0] = 0xab;
        bytes[1] = 0x1f;
        let key = DedupKey(bytes);
        assert!(key.has_hex_prefix(""));
        assert!(key.has_hex_prefix("a"));
        assert!(key.has_hex_prefix("AB1"));
        assert!(key.has_hex_prefix(&key.short()));
        assert!(!key.has_hex_prefix("ab2"));
        assert!(!key.has_hex_prefix("xyz"));
        assert!(key.has_hex_prefix(&"0".repeat(60).replacen("0000", "ab1f", 1)));
        assert!(!key.has_hex_prefix(&"0".repeat(65)));
    }

    #[test]
    fn fingerprint_fields_do_not_shift_into_each_other() {
        let a = fp("POST", "/ab", "", None, &[b""]);
        let b = fp("POST", "/a", "b", None, &[b""]);
        let c = fp("POST", "/a", "", None, &[b"b"]);
        assert_ne!(a, b);
        assert_ne!(b, c);
        assert_ne!(a, c);
    }

    #[test]
    fn body_chunking_does_not_matter_but_absent_header_differs_from_empty() {
        assert_eq!(
            fp("POST", "/a", "q", None, &[b"hello ", b"world"]),
            fp("POST", "/a", "q", None, &[b"hello world"])
        );
        assert_eq!(
            fp("POST", "/a", "", None, &[]),
            fp("POST", "/a", "", None, &[b""])
        );
        assert_ne!(
            fp("POST", "/a", "", None, &[]),
            fp("POST", "/a", "", Some(""), &[])
        );
    }

    #[test]
    fn scopes_separate_users_and_hosts() {
        let d = k();
        let anon = d.scope(b"example.com", [vec![], vec![]].into_iter());
        let alice = d.scope(b"example.com", [vec![&b"Bearer a"[..]], vec![]].into_iter());
        let bob = d.scope(b"example.com", [vec![&b"Bearer b"[..]], vec![]].into_iter());
        let other_host = d.scope(b"other.com", [vec![], vec![]].into_iter());
        assert_ne!(d.keyed(&alice, b"k"), d.keyed(&bob, b"k"));
        assert_ne!(d.keyed(&anon, b"k"), d.keyed(&other_host, b"k"));
        // Authorization "x" vs Cookie "x" are different scopes.
        let as_auth = d.scope(b"h", [vec![&b"x"[..]], vec![]].into_iter());
        let as_cookie = d.scope(b"h", [vec![], vec![&b"x"[..]]].into_iter());
        assert_ne!(as_auth, as_cookie);
        // Host is case-insensitive.
        assert_eq!(d.scope(b"Example.COM", [vec![], vec![]].into_iter()), anon);
    }

    #[test]
    fn keyed_and_fingerprint_domains_differ_and_secret_matters() {
        let d = k();
        let s = d.scope(b"h", std::iter::empty());
        let f = Fingerprint([7; 32]);
        assert_ne!(d.keyed(&s, &f.0), d.by_fingerprint(&s, &f));
        let other = KeyDeriver::new(Some("another secret, long enough"));
        let s2 = other.scope(b"h", std::iter::empty());
        assert_ne!(d.keyed(&s, b"k"), other.keyed(&s2, b"k"));
    }

    fn parse(values: &[&str]) -> Result<Option<Vec<u8>>, KeyHeaderError> {
        parse_idempotency_key(values.iter().map(|v| v.as_bytes()))
    }

    #[test]
    fn key_header_forms() {
        assert_eq!(parse(&[]), Ok(None));
        assert_eq!(parse(&["abc-123"]), Ok(Some(b"abc-123".to_vec())));
        assert_eq!(parse(&["\"abc-123\""]), Ok(Some(b"abc-123".to_vec())));
        assert_eq!(parse(&["\"a b\\\"c\""]), Ok(Some(b"a b\"c".to_vec())));
        assert_eq!(parse(&["a", "b"]), Err(KeyHeaderError::Repeated));
        assert_eq!(parse(&[""]), Err(KeyHeaderError::Empty));
        assert_eq!(parse(&["\"\""]), Err(KeyHeaderError::Empty));
        assert_eq!(parse(&["a,b"]), Err(KeyHeaderError::Malformed));
        assert_eq!(parse(&["a b"]), Err(KeyHeaderError::Malformed));
        assert_eq!(parse(&["\"abc"]), Err(KeyHeaderError::Malformed));
        assert_eq!(parse(&["\"abc\";x=1"]), Err(KeyHeaderError::Malformed));
        assert_eq!(parse(&["\"a\\nb\""]), Err(KeyHeaderError::Malformed));
        assert_eq!(parse(&["ab\u{7f}"]), Err(KeyHeaderError::Malformed));
        assert_eq!(parse(&[&"x".repeat(255)]).unwrap().unwrap().len(), 255);
        assert_eq!(parse(&[&"x".repeat(256)]), Err(KeyHeaderError::TooLong));
    }
}
