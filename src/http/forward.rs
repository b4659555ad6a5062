//! The request head idem forwards upstream: end-to-end headers only, `Host`, and the
//! forwarding headers that tell the app who the client is.

use crate::message::{connection_nominated, is_hop_by_hop};
use http::header;
use pingora::http::RequestHeader;
use pingora::{Error, ErrorType};
use std::net::SocketAddr;

/// Builds the request idem sends upstream for a buffered body: end-to-end headers, exact
/// `Content-Length`, forwarding headers, and `Accept-Encoding: identity` so that a stored
/// body can be replayed to any client (see README, "Content negotiation").
pub(crate) fn upstream_request(
    req: &RequestHeader,
    client: Option<&SocketAddr>,
    body_len: usize,
) -> pingora::Result<RequestHeader> {
    let mut out = forwarded_request(req, client)?;
    out.remove_header(&header::ACCEPT_ENCODING);
    out.insert_header(header::CONTENT_LENGTH, http::HeaderValue::from(body_len))?;
    out.insert_header(
        header::ACCEPT_ENCODING,
        http::HeaderValue::from_static("identity"),
    )?;
    Ok(out)
}

/// The request head as forwarded: end-to-end headers, `Host`, forwarding headers; framing
/// is left to the caller.
pub(crate) fn forwarded_request(
    req: &RequestHeader,
    client: Option<&SocketAddr>,
) -> pingora::Result<RequestHeader> {
    let path = req.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let mut out = RequestHeader::build(
        req.method.clone(),
        path.as_bytes(),
        Some(req.headers.len() + 3),
    )?;
    let nominated = connection_nominated(&req.headers);
    for (name, value) in req.headers.iter() {
        if is_hop_by_hop(name) || nominated.contains(name) {
            continue;
        }
        out.append_header(name.clone(), value.clone())?;
    }
    if out.headers.get(header::HOST).is_none() {
        if let Some(auth) = req.uri.authority() {
            out.insert_header(header::HOST, auth.as_str())?;
        }
    }
    add_forwarded(&mut out, client)?;
    Ok(out)
}

/// Appends the client to `X-Forwarded-For` and sets `X-Forwarded-Proto`.
pub(crate) fn add_forwarded(
    req: &mut RequestHeader,
    client: Option<&SocketAddr>,
) -> pingora::Result<()> {
    use std::io::Write;
    if let Some(addr) = client {
        // Formatted on the stack: one allocation, for the header value itself.
        let mut buf = [0u8; 64];
        let mut w = &mut buf[..];
        let prev = req
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let value = match prev {
            Some(prev) => http::HeaderValue::try_from(format!("{prev}, {}", addr.ip())),
            None => {
                // An IPv6 address is at most 45 characters.
                let _ = write!(w, "{}", addr.ip());
                let n = 64 - w.len();
                http::HeaderValue::from_bytes(&buf[..n])
            }
        };
        let value =
            value.map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "x-forwarded-for"))?;
        req.insert_header("x-forwarded-for", value)?;
    }
    req.insert_header("x-forwarded-proto", http::HeaderValue::from_static("http"))?;
    Ok(())
}

#[cfg(test)]
mod forwarded_tests {
    use super::*;

    fn forwarded(prev: Option<&str>, client: Option<&str>) -> (Option<String>, String) {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        if let Some(p) = prev {
            req.insert_header("x-forwarded-for", p).unwrap();
        }
        let client: Option<SocketAddr> = client.map(|c| c.parse().unwrap());
        add_forwarded(&mut req, client.as_ref()).unwrap();
        let get = |n: &str| req.headers.get(n).map(|v| v.to_str().unwrap().to_string());
        (get("x-forwarded-for"), get("x-forwarded-proto").unwrap())
    }

    #[test]
    fn client_address_is_appended_and_proto_set() {
        let v4 = "203.0.113.9:5000";
        let v6 = "[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:443";
        assert_eq!(forwarded(None, Some(v4)).0.unwrap(), "203.0.113.9");
        assert_eq!(
            forwarded(None, Some(v6)).0.unwrap(),
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(
            forwarded(Some("10.0.0.1"), Some(v4)).0.unwrap(),
            "10.0.0.1, 203.0.113.9"
        );
        assert_eq!(forwarded(Some("10.0.0.1"), None).0.unwrap(), "10.0.0.1");
        assert_eq!(forwarded(None, None), (None, "http".to_string()));
    }
}
