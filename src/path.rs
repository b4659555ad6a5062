//! The path idem routes on, fingerprints and forwards: one normal form, so that a route's
//! policy applies to exactly the resource the backend serves.
//!
//! Backends normalise paths before they dispatch (`/public/../account/export` is served as
//! `/account/export`). Had idem routed on the path as sent, a request could pick a lax
//! route's policy (say, a public `fingerprint` route whose responses are shared) for a
//! private resource. So, in this order (RFC 3986 6.2.2):
//! 1. percent-encoded unreserved characters are decoded (`%2e` is `.`, `%41` is `A`), and
//!    the hex digits of the other percent-encodings are uppercased (`%2f` is `%2F`);
//! 2. runs of slashes are merged (`//` is `/`, as nginx's `merge_slashes` does);
//! 3. dot segments are removed (`.`, `..`; never above the root).
//!
//! **Decision: idem forwards the normal form** (a request for `/public/../account/export`
//! reaches the backend as `/account/export`; the query is forwarded as sent), so the backend
//! serves exactly what idem routed; and **fingerprints the normal form too**: it is what
//! the backend is asked, so two spellings of one request are one request (DESIGN said "raw
//! path" when raw was what idem forwarded).
//!
//! **Encoded slashes** (`%2F`, and `%5C` and `\`, which some servers take for `/`) stay as
//! they are: they are data inside a segment (`/projects/group%2Fname` on GitLab-style APIs).
//! But a backend that decodes them before normalising would see other segments
//! (`/public/..%2Faccount` is `/account` to it). A path with one is therefore also
//! normalised with them read as `/`; when the two forms pick different routes, the request
//! is refused (400 `bad-path`): idem cannot tell which route's policy the backend's resource
//! is under. When both pick the same route it is served as usual.

use std::borrow::Cow;

/// A request path in normal form, and, when it holds encoded slashes, the form a backend
/// that decodes them would see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NormalPath<'a> {
    /// The normal form: routed on, fingerprinted, forwarded.
    pub(crate) path: Cow<'a, str>,
    /// With `%2F`, `%5C` and `\` read as `/` and normalised again; `None` without any.
    pub(crate) decoded_slashes: Option<String>,
}

/// The normal form of `path` (see the module doc). A path that does not start with `/`
/// (`*` of `OPTIONS *`) is left as it is.
pub(crate) fn normalize(path: &str) -> NormalPath<'_> {
    if !path.starts_with('/') {
        return NormalPath {
            path: Cow::Borrowed(path),
            decoded_slashes: None,
        };
    }
    let path = if is_normal(path) {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(remove_dot_segments(&decode_unreserved(path)))
    };
    let decoded_slashes = has_encoded_slash(&path).then(|| {
        let slashes = path
            .replace("%2F", "/")
            .replace("%5C", "/")
            .replace('\\', "/");
        remove_dot_segments(&slashes)
    });
    NormalPath {
        path,
        decoded_slashes,
    }
}

/// The common case, checked without allocating: no percent sign, no empty or dot segment.
fn is_normal(path: &str) -> bool {
    !path.contains('%') && !path.contains("//") && !path.split('/').any(|s| s == "." || s == "..")
}

fn has_encoded_slash(path: &str) -> bool {
    path.contains("%2F") || path.contains("%5C") || path.contains('\\')
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Step 1: unreserved characters decoded, other percent-encodings' hex uppercased; a `%`
/// not followed by two hex digits is kept as it is.
fn decode_unreserved(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                let c = h << 4 | l;
                if is_unreserved(c) {
                    out.push(c as char);
                } else {
                    out.push('%');
                    out.push(b[i + 1].to_ascii_uppercase() as char);
                    out.push(b[i + 2].to_ascii_uppercase() as char);
                }
                i += 3;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

/// Steps 2 and 3 on a path that starts with `/`: empty segments dropped, `.` dropped, `..`
/// drops the segment before it. A path ending in a dot segment or a slash keeps its
/// trailing slash (`/a/b/..` is `/a/`).
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let mut trailing = false;
    for seg in path[1..].split('/') {
        trailing = false;
        match seg {
            "" | "." => trailing = true,
            ".." => {
                out.pop();
                trailing = true;
            }
            s => out.push(s),
        }
    }
    let mut normal = String::with_capacity(path.len());
    for s in &out {
        normal.push('/');
        normal.push_str(s);
    }
    if trailing || out.is_empty() {
        normal.push('/');
    }
    normal
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(p: &str) -> String {
        normalize(p).path.into_owned()
    }

    #[test]
    fn dot_segments_encodings_and_repeated_slashes_are_removed() {
        for (raw, normal) in [
            ("/", "/"),
            ("/a/b", "/a/b"),
            ("/a/b/", "/a/b/"),
            ("/public/../account/export", "/account/export"),
            ("/public/%2e%2e/account/export", "/account/export"),
            ("/public/%2E%2E/account/export", "/account/export"),
            ("/public/.%2e/account/export", "/account/export"),
            ("/public//../account/export", "/account/export"),
            ("/public/./x", "/public/x"),
            ("/a/b/..", "/a/"),
            ("/a/b/.", "/a/b/"),
            ("/..", "/"),
            ("/../../etc", "/etc"),
            ("//a///b", "/a/b"),
            ("/%41%7e%2d", "/A~-"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%zz", "/a%zz"),
            ("/a%", "/a%"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("*", "*"),
        ] {
            assert_eq!(n(raw), normal, "{raw}");
        }
        assert!(matches!(normalize("/a/b").path, Cow::Borrowed(_)));
    }

    #[test]
    fn encoded_slashes_are_kept_and_also_read_as_slashes() {
        let p = normalize("/public/..%2faccount/export");
        assert_eq!(p.path, "/public/..%2Faccount/export");
        assert_eq!(p.decoded_slashes.as_deref(), Some("/account/export"));
        let p = normalize("/public/..%5Caccount");
        assert_eq!(p.decoded_slashes.as_deref(), Some("/account"));
        let p = normalize("/projects/group%2Fname/issues");
        assert_eq!(
            p.decoded_slashes.as_deref(),
            Some("/projects/group/name/issues")
        );
        assert_eq!(normalize("/a/b").decoded_slashes, None);
    }

    proptest! {
        /// The normal form is a fixed point, starts with `/`, and holds no dot segment, no
        /// empty segment but a trailing one, and no encoded unreserved character: a path
        /// cannot be spelled so as to route differently from what it names.
        #[test]
        fn normal_form_is_canonical(
            segs in proptest::collection::vec(
                prop_oneof![
                    Just("".to_string()), Just(".".to_string()), Just("..".to_string()),
                    Just("%2e".to_string()), Just("%2E%2e".to_string()), Just(".%2E".to_string()),
                    Just("%2f".to_string()), Just("%41".to_string()), Just("%".to_string()),
                    "[a-zA-Z0-9_~-]{1,4}",
                ],
                0..12,
            )
        ) {
            let raw = format!("/{}", segs.join("/"));
            let once = normalize(&raw).path.into_owned();
            prop_assert!(once.starts_with('/'));
            prop_assert_eq!(n(&once), once.clone(), "not a fixed point: {}", raw);
            let inner = once[1..].strip_suffix('/').unwrap_or(&once[1..]);
            for seg in inner.split('/').filter(|_| !inner.is_empty()) {
                prop_assert!(seg != "." && seg != ".." && !seg.is_empty(), "{} -> {}", raw, once);
            }
            for enc in ["%2e", "%2E", "%41", "%2f"] {
                prop_assert!(!once.contains(enc), "{} -> {}", raw, once);
            }
            // Without percent signs, removing dot segments is the same as RFC 3986's
            // algorithm applied to the merged path.
            if !raw.contains('%') {
                prop_assert_eq!(once.clone(), rfc3986(&merge(&raw)));
            }
        }
    }

    fn merge(p: &str) -> String {
        let mut out = String::new();
        for c in p.chars() {
            if !(c == '/' && out.ends_with('/')) {
                out.push(c);
            }
        }
        out
    }

    /// RFC 3986 5.2.4, literally, as the reference.
    fn rfc3986(input: &str) -> String {
        let mut input = input.to_string();
        let mut output = String::new();
        while !input.is_empty() {
            if let Some(rest) = input
                .strip_prefix("../")
                .or_else(|| input.strip_prefix("./"))
            {
                input = rest.to_string();
            } else if input.starts_with("/./") {
                input = input[2..].to_string();
            } else if input == "/." {
                input = "/".to_string();
            } else if input.starts_with("/../") || input == "/.." {
                input = if input == "/.." {
                    "/".to_string()
                } else {
                    input[3..].to_string()
                };
                match output.rfind('/') {
                    Some(i) => output.truncate(i),
                    None => output.clear(),
                }
            } else if input == "." || input == ".." {
                input.clear();
            } else {
                let start = usize::from(input.starts_with('/'));
                let end = input[start..].find('/').map_or(input.len(), |i| i + start);
                output.push_str(&input[..end]);
                input = input[end..].to_string();
            }
        }
        if output.is_empty() {
            "/".to_string()
        } else {
            output
        }
    }
}
