//! The request head as idem treats it, made so once, at the top of `request_filter`,
//! before admission, scope, fingerprint and forwarding read it.
//!
//! * **Split cookies joined.** An HTTP/2 client may send `Cookie` as several fields (RFC 9113
//!   8.2.3); they are joined with `"; "` into one, in order, so that an h2 request and its
//!   HTTP/1.1 retry with one `Cookie` line have the same scope, and the backend sees one
//!   `cookie` header whatever the client spoke.
//! * **`Upgrade: h2c` dropped.** `curl --http2` on an `http://` URL offers an upgrade to
//!   HTTP/2 on its first HTTP/1.1 request (RFC 7540 3.2, removed from RFC 9113). idem does
//!   not perform that upgrade (clients reach its h2c with prior knowledge), and passing the
//!   offer on would ask the backend to: the `h2c` token, `HTTP2-Settings` and the
//!   `Connection` tokens naming them are removed, and the request is an ordinary HTTP/1.1
//!   request, deduplicated and refused like any other. Other upgrades (WebSocket) are left
//!   untouched and pass through.
//!
//! * **The path in normal form** ([`path`], rules in [`crate::path`]): what idem routes on,
//!   fingerprints and forwards.
//!
//! None allocates for a request without repeated cookies, an `Upgrade`, or a path outside
//! normal form.

use http::header::{self, HeaderName};
use http::HeaderValue;
use pingora::http::RequestHeader;

const HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Puts the request's path in normal form (the query stays as sent). Returns the normal
/// form with encoded slashes read as `/` when the path holds any (the caller refuses the
/// request if that picks another route). A target that is not UTF-8 cannot be rewritten:
/// outside normal form it is refused (400), since its route would be a guess.
pub(crate) fn path(req: &mut RequestHeader) -> pingora::Result<Option<String>> {
    let normal = crate::path::normalize(req.uri.path());
    let decoded_slashes = normal.decoded_slashes;
    let rewritten = match normal.path {
        std::borrow::Cow::Owned(p) => p,
        std::borrow::Cow::Borrowed(_) => return Ok(decoded_slashes),
    };
    if !req.raw_path_is_utf8() {
        return pingora::Error::e_explain(
            pingora::ErrorType::HTTPStatus(400),
            "a request target that is not UTF-8 and not in normal form",
        );
    }
    let target = match req.uri.query() {
        Some(q) => format!("{rewritten}?{q}"),
        None => rewritten,
    };
    req.set_raw_path(target.as_bytes())?;
    Ok(decoded_slashes)
}

/// Applies both rules to `req`.
pub(crate) fn request_head(req: &mut RequestHeader) -> pingora::Result<()> {
    join_cookies(req)?;
    drop_h2c_upgrade(req)
}

fn join_cookies(req: &mut RequestHeader) -> pingora::Result<()> {
    let cookies = req.headers.get_all(header::COOKIE);
    let mut lines = cookies.iter();
    if lines.next().is_none() || lines.next().is_none() {
        return Ok(());
    }
    let joined = join(cookies.iter().map(HeaderValue::as_bytes), b"; ");
    req.insert_header(header::COOKIE, value(joined)?)
}

fn drop_h2c_upgrade(req: &mut RequestHeader) -> pingora::Result<()> {
    let Some(upgrade) = req.headers.get(header::UPGRADE) else {
        return Ok(());
    };
    let offered = tokens(upgrade.as_bytes());
    if !offered.clone().any(is_h2c) {
        return Ok(());
    }
    let others: Vec<&[u8]> = offered.filter(|t| !is_h2c(t)).collect();
    if others.is_empty() {
        req.remove_header(&header::UPGRADE);
    } else {
        let rest = value(join(others.into_iter(), b", "))?;
        req.insert_header(header::UPGRADE, rest)?;
    }
    req.remove_header(&HTTP2_SETTINGS);
    let upgrading = req.headers.contains_key(header::UPGRADE);
    if let Some(connection) = req.headers.get(header::CONNECTION) {
        let kept: Vec<&[u8]> = tokens(connection.as_bytes())
            .filter(|t| {
                !t.eq_ignore_ascii_case(HTTP2_SETTINGS.as_str().as_bytes())
                    && (upgrading || !t.eq_ignore_ascii_case(b"upgrade"))
            })
            .collect();
        if kept.is_empty() {
            req.remove_header(&header::CONNECTION);
        } else {
            let kept = value(join(kept.into_iter(), b", "))?;
            req.insert_header(header::CONNECTION, kept)?;
        }
    }
    Ok(())
}

/// A protocol named `h2c` (RFC 9110 7.8: case-insensitive, optionally `/version`).
fn is_h2c(token: &[u8]) -> bool {
    let name = token.split(|b| *b == b'/').next().unwrap_or_default();
    name.eq_ignore_ascii_case(b"h2c")
}

/// The comma-separated, trimmed, non-empty tokens of a list header.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> + Clone {
    v.split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn join<'a>(parts: impl Iterator<Item = &'a [u8]>, sep: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for part in parts {
        if !out.is_empty() {
            out.extend_from_slice(sep);
        }
        out.extend_from_slice(part);
    }
    out
}

fn value(bytes: Vec<u8>) -> pingora::Result<HeaderValue> {
    HeaderValue::from_maybe_shared(bytes::Bytes::from(bytes)).map_err(|_| {
        pingora::Error::explain(pingora::ErrorType::InvalidHTTPHeader, "joined header value")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized(headers: &[(&str, &str)]) -> Vec<String> {
        let mut req = RequestHeader::build("POST", b"/", None).unwrap();
        for (n, v) in headers {
            req.append_header(n.to_string(), *v).unwrap();
        }
        request_head(&mut req).unwrap();
        let mut got: Vec<String> = req
            .headers
            .iter()
            .map(|(n, v)| format!("{n}: {}", v.to_str().unwrap()))
            .collect();
        got.sort();
        got
    }

    #[test]
    fn split_cookies_become_one_line_in_order() {
        assert_eq!(
            normalized(&[("cookie", "a=1"), ("x", "y"), ("cookie", "b=2; c=3")]),
            ["cookie: a=1; b=2; c=3", "x: y"]
        );
        assert_eq!(normalized(&[("cookie", "a=1")]), ["cookie: a=1"]);
        assert_eq!(normalized(&[]), Vec::<String>::new());
    }

    #[test]
    fn an_h2c_upgrade_offer_is_dropped_with_what_names_it() {
        assert_eq!(
            normalized(&[
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
                ("connection", "Upgrade, HTTP2-Settings"),
            ]),
            Vec::<String>::new()
        );
        assert_eq!(
            normalized(&[
                ("upgrade", "H2C"),
                ("http2-settings", "AA"),
                ("connection", "keep-alive, upgrade, http2-settings"),
            ]),
            ["connection: keep-alive"]
        );
    }

    #[test]
    fn other_upgrades_are_untouched() {
        let ws = [
            ("upgrade", "websocket"),
            ("connection", "Upgrade"),
            ("sec-websocket-key", "k"),
        ];
        assert_eq!(
            normalized(&ws),
            [
                "connection: Upgrade",
                "sec-websocket-key: k",
                "upgrade: websocket"
            ]
        );
        // Offered together, only h2c goes; the upgrade stays an upgrade.
        assert_eq!(
            normalized(&[
                ("upgrade", "h2c, websocket"),
                ("http2-settings", "AA"),
                ("connection", "Upgrade, HTTP2-Settings"),
            ]),
            ["connection: Upgrade", "upgrade: websocket"]
        );
    }
}
