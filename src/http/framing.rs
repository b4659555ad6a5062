//! How a response is framed for a client older than HTTP/1.1.
//!
//! An HTTP/1.0 client cannot read `Transfer-Encoding: chunked` (RFC 9112 6.1: a server
//! must not send it to such a client). A response whose length is not known when its
//! header goes out is therefore sent as is and ended by closing the connection (RFC 9112
//! 6.3, close-delimited), whatever the origin sent: chunked, close-delimited (which Pingora
//! turns into chunked for HTTP/1.1 downstreams), or streamed by idem. Keep-alive, when an
//! HTTP/1.0 client asks for it (`Connection: keep-alive`), is kept whenever the length is
//! known: stored responses, problems and origin responses with a `Content-Length`.
//!
//! Applied on every path that writes a response of possibly unknown length: pass-through
//! (`response_filter`), idem's streamed leader responses (`crate::http::reply`) and a
//! consumed body forwarded by idem (`crate::http::body`).

use http::{header, Method, StatusCode, Version};
use pingora::http::ResponseHeader;
use pingora::proxy::Session;

/// What the connection must do after the response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Framing {
    /// Framed by length or chunks as the header says; keep-alive as negotiated.
    AsIs,
    /// Close-delimited: the connection must close after the body.
    Close,
}

/// Adjusts `resp` for a client that sent a `version` request with `method`; `Close` when
/// the response must end with the connection.
pub(crate) fn for_client(version: Version, method: &Method, resp: &mut ResponseHeader) -> Framing {
    if !matches!(version, Version::HTTP_09 | Version::HTTP_10) {
        return Framing::AsIs;
    }
    let chunked = resp.headers.contains_key(header::TRANSFER_ENCODING);
    if chunked {
        // A length beside a transfer coding means nothing (RFC 9112 6.3): neither goes out.
        resp.remove_header(&header::TRANSFER_ENCODING);
        resp.remove_header(&header::CONTENT_LENGTH);
    }
    let bodiless = *method == Method::HEAD
        || resp.status.is_informational()
        || matches!(
            resp.status,
            StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED
        );
    if bodiless || resp.headers.contains_key(header::CONTENT_LENGTH) {
        Framing::AsIs
    } else {
        Framing::Close
    }
}

/// [`for_client`] for `session`'s request, turning keep-alive off when the response is
/// close-delimited (Pingora then writes `Connection: close` and closes after the body).
pub(crate) fn apply(session: &mut Session, resp: &mut ResponseHeader) {
    let req = session.req_header();
    if for_client(req.version, &req.method, resp) == Framing::Close {
        session.set_keepalive(None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(
        version: Version,
        method: Method,
        status: u16,
        headers: &[(&str, &str)],
    ) -> (Framing, Vec<String>) {
        let mut resp = ResponseHeader::build(status, None).unwrap();
        for (n, v) in headers {
            resp.append_header(n.to_string(), *v).unwrap();
        }
        let f = for_client(version, &method, &mut resp);
        let mut names: Vec<String> = resp.headers.keys().map(|k| k.to_string()).collect();
        names.sort();
        (f, names)
    }

    #[test]
    fn http10_gets_close_delimited_instead_of_chunked() {
        let chunked = [
            ("transfer-encoding", "chunked"),
            ("content-type", "text/plain"),
        ];
        assert_eq!(
            framed(Version::HTTP_10, Method::GET, 200, &chunked),
            (Framing::Close, vec!["content-type".to_string()])
        );
        // Neither length nor coding: close-delimited already, the connection must close.
        assert_eq!(
            framed(Version::HTTP_10, Method::POST, 200, &[]),
            (Framing::Close, vec![])
        );
        // Both: the coding wins, so the length is meaningless.
        let both = [("transfer-encoding", "chunked"), ("content-length", "3")];
        assert_eq!(
            framed(Version::HTTP_10, Method::GET, 200, &both).0,
            Framing::Close
        );
    }

    #[test]
    fn known_lengths_and_bodiless_responses_keep_the_connection() {
        let sized = [("content-length", "3")];
        assert_eq!(
            framed(Version::HTTP_10, Method::GET, 200, &sized),
            (Framing::AsIs, vec!["content-length".to_string()])
        );
        assert_eq!(
            framed(
                Version::HTTP_10,
                Method::HEAD,
                200,
                &[("transfer-encoding", "chunked")]
            )
            .0,
            Framing::AsIs
        );
        assert_eq!(
            framed(Version::HTTP_10, Method::GET, 204, &[]).0,
            Framing::AsIs
        );
        assert_eq!(
            framed(Version::HTTP_10, Method::GET, 304, &[]).0,
            Framing::AsIs
        );
    }

    #[test]
    fn http11_and_h2_are_untouched() {
        let chunked = [("transfer-encoding", "chunked")];
        for v in [Version::HTTP_11, Version::HTTP_2] {
            assert_eq!(
                framed(v, Method::GET, 200, &chunked),
                (Framing::AsIs, vec!["transfer-encoding".to_string()])
            );
        }
    }
}
