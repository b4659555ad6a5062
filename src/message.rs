//! What an HTTP message carries across idem: a response as kept for replay
//! ([`StoredResponse`]), a body read in chunks ([`BodyBuf`]), and the end-to-end header rules
//! (RFC 9110 7.6.1): which headers describe one connection and never cross the proxy nor
//! enter the store, for requests forwarded and responses stored or streamed.

use crate::observe::request_id::Origin;
use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName};
use http::HeaderValue;
use pingora::http::ResponseHeader;
use tokio::time::Instant;

/// A complete upstream response as kept for replay: end-to-end headers only.
#[derive(Debug, Clone)]
pub(crate) struct StoredResponse {
    /// Status code.
    pub(crate) status: u16,
    /// End-to-end headers in upstream order, multi-valued headers as separate entries.
    pub(crate) headers: Vec<(HeaderName, HeaderValue)>,
    /// The whole body.
    pub(crate) body: Bytes,
    /// Trailer fields after the body (gRPC's `grpc-status`, ...), in upstream order; only
    /// HTTP/2 exchanges carry them, and they are replayed to HTTP/2 clients.
    pub(crate) trailers: Vec<(HeaderName, HeaderValue)>,
    /// When the upstream call completed; `Age` is counted from here.
    pub(crate) completed_at: Instant,
    /// The request that led the call, named in the access lines of its waiters and replays;
    /// `None` for a record another replica wrote (the Redis record does not carry it).
    pub(crate) origin: Option<Origin>,
}

impl StoredResponse {
    /// Bytes this response counts against `max_bytes`: status, headers and body as serialized.
    pub(crate) fn weight(&self) -> u64 {
        let headers: usize = self
            .headers
            .iter()
            .chain(self.trailers.iter())
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum();
        (16 + headers + self.body.len()) as u64
    }
}

/// Headers that describe one connection, never forwarded nor stored (RFC 9110 7.6.1), plus
/// the framing headers idem recomputes.
pub(crate) const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::EXPECT,
];

/// Whether `name` must not cross the proxy.
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Header names listed in `Connection`, which are hop-by-hop for this message only.
pub(crate) fn connection_nominated(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect()
}

/// Event streams, gRPC and responses with trailers are not replayable as a stored body.
pub(crate) fn is_storable(h: &ResponseHeader, h2: bool) -> bool {
    let ct = h
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    // Over HTTP/2 the trailers are read and kept (gRPC); HTTP/1 trailers are not.
    !(ct.starts_with("text/event-stream")
        || (!h2 && (ct.starts_with("application/grpc") || h.headers.contains_key(header::TRAILER))))
}

/// A body read in chunks. A body that arrives in one chunk is kept as that chunk (no copy);
/// only a second chunk makes it join them. Pingora hands out chunks it copied to exact size,
/// so keeping one pins nothing larger than the body.
pub(crate) struct BodyBuf {
    first: Option<Bytes>,
    joined: BytesMut,
    hint: usize,
}

impl BodyBuf {
    /// An empty body; `hint` is the expected total length (the buffer for a body that comes
    /// in several chunks is reserved with it).
    pub(crate) fn with_hint(hint: usize) -> BodyBuf {
        BodyBuf {
            first: None,
            joined: BytesMut::new(),
            hint,
        }
    }

    /// Bytes so far.
    pub(crate) fn len(&self) -> usize {
        self.first.as_ref().map_or(0, Bytes::len) + self.joined.len()
    }

    /// Appends a chunk.
    pub(crate) fn push(&mut self, chunk: Bytes) {
        if self.first.is_none() && self.joined.is_empty() {
            self.first = Some(chunk);
            return;
        }
        if let Some(first) = self.first.take() {
            self.joined
                .reserve(self.hint.max(first.len() + chunk.len()));
            self.joined.extend_from_slice(&first);
        }
        self.joined.extend_from_slice(&chunk);
    }

    /// The whole body.
    pub(crate) fn freeze(self) -> Bytes {
        match self.first {
            Some(first) => first,
            None => self.joined.freeze(),
        }
    }
}

pub(crate) fn stored_response(
    h: &ResponseHeader,
    body: Bytes,
    trailers: Option<&http::HeaderMap>,
) -> StoredResponse {
    let nominated = connection_nominated(&h.headers);
    let kept = || {
        h.headers
            .iter()
            .filter(|(n, _)| !is_hop_by_hop(n) && !nominated.contains(n))
    };
    // Header values parsed by Pingora are slices of its (at least 4 KiB) header read buffer:
    // kept as they are, every stored entry would pin that whole buffer. Copy them into one
    // buffer of their exact size instead.
    let mut values = BytesMut::with_capacity(kept().map(|(_, v)| v.len()).sum());
    for (_, v) in kept() {
        values.extend_from_slice(v.as_bytes());
    }
    let mut values = values.freeze();
    // Exactly sized: the list lives as long as the record.
    let mut headers = Vec::with_capacity(kept().count());
    headers.extend(kept().map(|(n, v)| {
        let own = values.split_to(v.len());
        let value = match http::HeaderValue::from_maybe_shared(own) {
            Ok(mut own) => {
                own.set_sensitive(v.is_sensitive());
                own
            }
            Err(_) => v.clone(),
        };
        (n.clone(), value)
    }));
    StoredResponse {
        status: h.status.as_u16(),
        headers,
        body,
        trailers: trailers
            .iter()
            .flat_map(|t| t.iter())
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect(),
        completed_at: Instant::now(),
        origin: None,
    }
}

/// The header for a streamed response: the upstream's, minus hop-by-hop fields, keeping its
/// `Content-Length` when it declared one so the client can detect a cut-off.
pub(crate) fn stream_header(h: &ResponseHeader) -> ResponseHeader {
    let mut out = h.clone();
    let length = h.headers.get(header::CONTENT_LENGTH).cloned();
    let nominated = connection_nominated(&h.headers);
    for name in HOP_BY_HOP.iter().chain(nominated.iter()) {
        out.remove_header(name);
    }
    match length {
        Some(len) => {
            let _ = out.insert_header(header::CONTENT_LENGTH, len);
        }
        None => {
            let _ = out.insert_header(header::TRANSFER_ENCODING, "chunked");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_in_one_chunk_is_kept_without_a_copy() {
        let chunk = Bytes::from(vec![7u8; 100]);
        let mut b = BodyBuf::with_hint(100);
        assert_eq!(b.len(), 0);
        b.push(chunk.clone());
        assert_eq!(b.len(), 100);
        let body = b.freeze();
        assert_eq!(body, chunk);
        assert_eq!(body.as_ptr(), chunk.as_ptr());
    }

    #[test]
    fn a_body_in_several_chunks_is_joined_in_order() {
        let mut b = BodyBuf::with_hint(0);
        for c in [&b"ab"[..], b"", b"cde", b"f"] {
            b.push(Bytes::copy_from_slice(c));
        }
        assert_eq!(b.len(), 6);
        assert_eq!(b.freeze(), Bytes::from_static(b"abcdef"));
        assert!(BodyBuf::with_hint(10).freeze().is_empty());
    }

    #[test]
    fn stored_headers_are_end_to_end_in_order_and_own_their_bytes() {
        let mut h = ResponseHeader::build(201, None).unwrap();
        h.append_header("content-type", "text/plain").unwrap();
        h.append_header("connection", "keep-alive, x-hop").unwrap();
        h.append_header("x-hop", "dropped").unwrap();
        h.append_header("set-cookie", "a=1").unwrap();
        h.append_header("set-cookie", "b=2").unwrap();
        h.append_header("content-length", "2").unwrap();
        let mut secret = http::HeaderValue::from_static("token");
        secret.set_sensitive(true);
        h.append_header("x-secret", secret).unwrap();
        let r = stored_response(&h, Bytes::from_static(b"ok"), None);
        let got: Vec<(&str, &[u8])> = r
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        assert_eq!(
            got,
            [
                ("content-type", &b"text/plain"[..]),
                ("set-cookie", b"a=1"),
                ("set-cookie", b"b=2"),
                ("x-secret", b"token"),
            ]
        );
        assert!(r.headers[3].1.is_sensitive() && !r.headers[0].1.is_sensitive());
        assert_eq!(r.headers.capacity(), r.headers.len());
        // Copied out of the header's buffers, not sharing them.
        let original = h.headers.get("content-type").unwrap().as_bytes().as_ptr();
        assert_ne!(r.headers[0].1.as_bytes().as_ptr(), original);
        assert_eq!((r.status, &r.body[..]), (201, &b"ok"[..]));
    }
}
