//! A deadline for the first bytes of a client connection.
//!
//! With h2c on (idem's listeners speak HTTP/1.1 and h2c), Pingora starts every new connection
//! by waiting for 24 bytes, to tell the HTTP/2 preface from an HTTP/1 request, and that wait
//! has no timeout: a client that connects and sends nothing (or a few bytes) would hold its
//! socket and task for as long as it likes. nginx bounds the same wait with
//! `client_header_timeout`; idem bounds it with `[server] keepalive_timeout` (the value in
//! force when the connection arrives): a connection that has not sent its first 24 bytes by
//! then is closed without an answer, like an idle keep-alive connection, and logged at debug.
//!
//! The wrapper peeks the same 24 bytes with the deadline and rewinds them, so Pingora's own
//! peek that follows returns at once. It runs once per connection, not per request.

use crate::reload::Live;
use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::Stream;
use pingora::server::ShutdownWatch;
use std::sync::Arc;

/// Length of the HTTP/2 connection preface Pingora looks for.
const PREFACE_LEN: usize = 24;

/// Wraps the proxy app with the first-bytes deadline.
pub struct FirstBytesDeadline<A> {
    inner: Arc<A>,
    live: Arc<Live>,
}

impl<A> FirstBytesDeadline<A> {
    /// `inner` handles connections whose first bytes arrived in time.
    pub fn new(inner: A, live: Arc<Live>) -> FirstBytesDeadline<A> {
        FirstBytesDeadline {
            inner: Arc::new(inner),
            live,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for FirstBytesDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let deadline = self.live.load().settings.keepalive_timeout;
        let mut buf = [0u8; PREFACE_LEN];
        match tokio::time::timeout(deadline, stream.try_peek(&mut buf)).await {
            Ok(Ok(_)) => {}
            // Closed or reset before sending a request: nothing to answer.
            Ok(Err(_)) => return None,
            Err(_) => {
                tracing::debug!(
                    ?deadline,
                    "closing a client connection that sent no request within keepalive_timeout"
                );
                return None;
            }
        }
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}
