//! Properties of the parsers and encodings that see client input, shared by the cargo-fuzz
//! targets in `fuzz/` (built with `--cfg fuzzing`) and by bounded proptest runs in the unit
//! tests, so that CI exercises the same checks without libFuzzer. Each function panics when
//! its property does not hold.
//!
//! There is no stored-record decoder to fuzz: the memory store keeps records as Rust values
//! and nothing is ever deserialized from it.

use crate::key::{parse_idempotency_key, KeyDeriver, KeyHeaderError, MAX_KEY_LEN};

/// The `Idempotency-Key` parser: never panics; an accepted key is 1 to 255 bytes of
/// printable ASCII; the decoded value round-trips through the quoted form (and the bare
/// form when it is a token); a repeated header is always refused.
pub fn key_header(values: &[&[u8]]) {
    let parsed = parse_idempotency_key(values.iter().copied());
    match (values.len(), &parsed) {
        (0, r) => assert_eq!(r, &Ok(None)),
        (1, _) => {}
        (_, r) => assert_eq!(r, &Err(KeyHeaderError::Repeated)),
    }
    let Ok(Some(key)) = parsed else { return };
    assert!(!key.is_empty() && key.len() <= MAX_KEY_LEN, "{key:?}");
    assert!(key.iter().all(|b| (0x20..=0x7e).contains(b)), "{key:?}");
    let mut quoted = vec![b'"'];
    for &b in &key {
        if b == b'"' || b == b'\\' {
            quoted.push(b'\\');
        }
        quoted.push(b);
    }
    quoted.push(b'"');
    assert_eq!(
        parse_idempotency_key(std::iter::once(quoted.as_slice())),
        Ok(Some(key.clone())),
        "quoted form of {key:?}"
    );
    let token = key
        .iter()
        .all(|&b| (0x21..=0x7e).contains(&b) && b != b'"' && b != b',');
    if token && key[0] != b'"' {
        assert_eq!(
            parse_idempotency_key(std::iter::once(key.as_slice())),
            Ok(Some(key.clone())),
            "bare form of {key:?}"
        );
    }
}

/// A request as the fingerprint sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub(crate) method: Vec<u8>,
    /// Raw path.
    pub(crate) path: Vec<u8>,
    /// Raw query.
    pub(crate) query: Vec<u8>,
    /// Fingerprint headers in configured order: name and values as sent (empty: absent).
    pub(crate) headers: Vec<(String, Vec<Vec<u8>>)>,
    /// The body as it arrived, in chunks.
    pub(crate) body: Vec<Vec<u8>>,
}

impl Request {
    /// The same request for the fingerprint: chunking is not part of it.
    fn same_as(&self, other: &Request) -> bool {
        self.method == other.method
            && self.path == other.path
            && self.query == other.query
            && self.headers == other.headers
            && self.body.concat() == other.body.concat()
    }
}

fn fingerprint(d: &KeyDeriver, r: &Request) -> crate::key::Fingerprint {
    let mut h = d.fingerprint(
        &r.method,
        &r.path,
        &r.query,
        r.headers
            .iter()
            .map(|(n, vs)| (n.as_str(), vs.iter().map(Vec::as_slice).collect())),
    );
    for chunk in &r.body {
        h.update(chunk);
    }
    h.finish()
}

/// How [`shifted`] derives a second request from a first: the moves that would collide if a
/// field lacked its length or count prefix.
#[derive(Debug, Clone, Copy)]
pub enum Shift {
    /// Move `n` bytes from the end of flattened field `field` to the start of the next one.
    Bytes {
        /// Index in method, path, query, each header name and value..., body.
        field: usize,
        /// How many bytes.
        n: usize,
    },
    /// Move the last value of header `header` to the front of the next header's values.
    Value {
        /// Header index.
        header: usize,
    },
    /// Cut the body into chunks differently (same bytes).
    Rechunk {
        /// Chunk size.
        size: usize,
    },
}

/// `r` with `shifts` applied.
pub fn shifted(r: &Request, shifts: &[Shift]) -> Request {
    let mut out = r.clone();
    for s in shifts {
        match *s {
            Shift::Bytes { field, n } => {
                let mut fields: Vec<Vec<u8>> =
                    vec![out.method.clone(), out.path.clone(), out.query.clone()];
                for (name, values) in &out.headers {
                    fields.push(name.as_bytes().to_vec());
                    fields.extend(values.iter().cloned());
                }
                fields.push(out.body.concat());
                if fields.len() < 2 {
                    continue;
                }
                let i = field % (fields.len() - 1);
                let n = n.min(fields[i].len());
                let keep = fields[i].len() - n;
                let moved: Vec<u8> = fields[i].split_off(keep);
                fields[i + 1].splice(0..0, moved);
                let mut it = fields.into_iter();
                out.method = it.next().unwrap_or_default();
                out.path = it.next().unwrap_or_default();
                out.query = it.next().unwrap_or_default();
                for (name, values) in out.headers.iter_mut() {
                    *name = String::from_utf8_lossy(&it.next().unwrap_or_default()).into_owned();
                    for v in values.iter_mut() {
                        *v = it.next().unwrap_or_default();
                    }
                }
                out.body = vec![it.next().unwrap_or_default()];
            }
            Shift::Value { header } => {
                if out.headers.len() < 2 {
                    continue;
                }
                let i = header % (out.headers.len() - 1);
                if let Some(v) = out.headers[i].1.pop() {
                    out.headers[i + 1].1.insert(0, v);
                }
            }
            Shift::Rechunk { size } => {
                let body = out.body.concat();
                out.body = body.chunks(size.max(1)).map(<[u8]>::to_vec).collect();
            }
        }
    }
    out
}

/// Fingerprint encoding: two requests get the same fingerprint exactly when they are the
/// same request (chunking aside); and keyed and fingerprint keys never meet.
pub fn fingerprint_pair(a: &Request, b: &Request) {
    let d = KeyDeriver::new(Some("fuzzing secret, long enough"));
    let (fa, fb) = (fingerprint(&d, a), fingerprint(&d, b));
    if a.same_as(b) {
        assert_eq!(fa, fb, "same request, different fingerprints: {a:?}");
    } else {
        assert_ne!(fa, fb, "different requests collide:\n{a:?}\n{b:?}");
    }
    let scope = d.scope(b"h", std::iter::empty());
    assert_ne!(d.keyed(&scope, &fa.0), d.by_fingerprint(&scope, &fa));
}

/// Scope encoding: same scope exactly when the authority (case-insensitively) and every scope
/// header's values are the same.
pub fn scope_pair(a: (&[u8], &[Vec<Vec<u8>>]), b: (&[u8], &[Vec<Vec<u8>>])) {
    let d = KeyDeriver::new(Some("fuzzing secret, long enough"));
    let scope = |(auth, hs): (&[u8], &[Vec<Vec<u8>>])| {
        d.scope(
            auth,
            hs.iter().map(|vs| vs.iter().map(Vec::as_slice).collect()),
        )
    };
    let (sa, sb) = (scope(a), scope(b));
    let same = a.0.eq_ignore_ascii_case(b.0) && a.1 == b.1;
    assert_eq!(sa == sb, same, "{a:?} vs {b:?}");
    assert_eq!(sa.id() == sb.id(), same);
}

/// The configuration loader never panics on any text, and its errors point inside the file.
/// Texts with a `:` are skipped: an address in them would be resolved through DNS.
pub fn config_text(text: &str) {
    if text.contains(':') {
        return;
    }
    let path = std::path::Path::new("fuzz.toml");
    if let Err(e) = crate::config::settings::Settings::from_toml_str(text, path) {
        let lines = text.lines().count().max(1) + 1;
        assert!(
            e.line.is_none_or(|l| l >= 1 && l <= lines),
            "{e} ({lines} lines)"
        );
        assert!(!e.message.is_empty());
    }
}

/// The `Accept-Encoding` reader used before replaying an encoded body never panics, and an
/// identity body is readable by anyone.
pub fn accept_encoding(value: &[u8], coding: &[u8]) {
    let Ok(accept) = http::HeaderValue::from_bytes(value) else {
        return;
    };
    let mut resp = crate::message::StoredResponse {
        status: 200,
        headers: vec![],
        body: bytes::Bytes::new(),
        trailers: Vec::new(),
        completed_at: tokio::time::Instant::now(),
        origin: None,
    };
    assert!(crate::http::reply::readable_by(&resp, Some(&accept)));
    if let Ok(c) = http::HeaderValue::from_bytes(coding) {
        resp.headers.push((http::header::CONTENT_ENCODING, c));
        let _ = crate::http::reply::readable_by(&resp, Some(&accept));
    }
}

#[cfg(test)]
mod tests {
    //! The fuzz targets' properties, run for a bounded number of cases in every `cargo test`.
    use super::*;
    use proptest::prelude::*;

    fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
        // Mostly the bytes the parsers care about, plus anything.
        let interesting = prop_oneof![
            Just(b'"'),
            Just(b'\\'),
            Just(b','),
            Just(b' '),
            Just(b'\t'),
            Just(b';'),
            Just(b'a'),
            0x20u8..0x7f,
            any::<u8>(),
        ];
        proptest::collection::vec(interesting, 0..max)
    }

    fn request() -> impl Strategy<Value = Request> {
        (
            bytes(6),
            bytes(8),
            bytes(8),
            proptest::collection::vec(
                ("[a-c]{0,3}", proptest::collection::vec(bytes(4), 0..3)),
                0..3,
            ),
            proptest::collection::vec(bytes(6), 0..3),
        )
            .prop_map(|(method, path, query, headers, body)| Request {
                method,
                path,
                query,
                headers,
                body,
            })
    }

    fn shift() -> impl Strategy<Value = Shift> {
        prop_oneof![
            (0usize..12, 0usize..4).prop_map(|(field, n)| Shift::Bytes { field, n }),
            (0usize..3).prop_map(|header| Shift::Value { header }),
            (1usize..5).prop_map(|size| Shift::Rechunk { size }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: std::env::var("IDEM_PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(256),
            ..ProptestConfig::default()
        })]

        #[test]
        fn key_header_properties(values in proptest::collection::vec(bytes(300), 0..3)) {
            let refs: Vec<&[u8]> = values.iter().map(Vec::as_slice).collect();
            key_header(&refs);
        }

        #[test]
        fn quoted_keys_round_trip(key in "[ -~]{1,255}") {
            let mut quoted = String::from("\"");
            for c in key.chars() {
                if c == '"' || c == '\\' { quoted.push('\\'); }
                quoted.push(c);
            }
            quoted.push('"');
            key_header(&[quoted.as_bytes()]);
            prop_assert_eq!(
                parse_idempotency_key(std::iter::once(quoted.as_bytes())),
                Ok(Some(key.into_bytes()))
            );
        }

        #[test]
        fn fingerprint_is_injective(a in request(), shifts in proptest::collection::vec(shift(), 1..4), b in request()) {
            fingerprint_pair(&a, &shifted(&a, &shifts));
            fingerprint_pair(&a, &b);
        }

        #[test]
        fn scope_is_injective(
            auth in bytes(5),
            hs in proptest::collection::vec(proptest::collection::vec(bytes(3), 0..2), 0..3),
            n in 0usize..4,
            upper in any::<bool>(),
        ) {
            let mut hs2 = hs.clone();
            // Move one value to the next header: what a missing count prefix would merge.
            if hs2.len() >= 2 {
                let i = n % (hs2.len() - 1);
                if let Some(v) = hs2[i].pop() { hs2[i + 1].insert(0, v); }
            }
            let auth2 = if upper { auth.to_ascii_uppercase() } else { auth.clone() };
            scope_pair((&auth, &hs), (&auth2, &hs2));
            scope_pair((&auth, &hs), (&auth, &hs));
        }

        #[test]
        fn config_loader_never_panics(text in "(\\[[a-z]{0,8}\\]\n|[a-z_]{1,12} = (\"[0-9a-zA-Z./ ]{0,12}\"|[0-9]{1,4}|true|\\[\\])\n|\\[\\[route\\]\\]\n){0,8}") {
            config_text(&text);
        }

        #[test]
        fn config_loader_errors_always_say_why(text in "[#a-z=\"\\[\\] \n\u{0}-\u{1f}\u{7f}]{0,12}") {
            config_text(&text);
        }

        #[test]
        fn accept_encoding_never_panics(v in bytes(40), c in bytes(8)) {
            accept_encoding(&v, &c);
        }
    }

    /// Found by the `config` fuzz target: a control character in a comment made the loader
    /// report an empty reason (`idem check` printed `file:1: ` and nothing else).
    #[test]
    fn control_character_in_a_comment_is_explained() {
        config_text("#\u{1d}#");
        let e = crate::config::settings::Settings::from_toml_str(
            "#\u{1d}#",
            std::path::Path::new("f.toml"),
        )
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "f.toml:1:2: invalid TOML: unexpected character '\\u{1d}'"
        );
    }
}
