//! Listeners that serve until the process exits: the metrics listener (and the admin one).
//!
//! Pingora stops every listening service at the start of a graceful shutdown. Those two must
//! not stop: during a drain `/readyz` has to answer 503 (a load balancer that gets "connection
//! refused" may retry or alarm instead of taking the replica out), `/metrics` shows what is
//! left (`idem_inflight_keys`, `idem_active_requests`, `idem_draining`) and `GET /flights`
//! which keys. So idem binds them itself, once at start (no window where another process could
//! take the port), and accepts on a background service that ignores the shutdown signal; the
//! drain watcher's exit ends it.

use pingora::apps::ServerApp;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// One listener and the app it serves.
pub(crate) struct UntilExit<A> {
    name: &'static str,
    listener: parking_lot::Mutex<Option<TcpListener>>,
    app: Arc<A>,
    /// Never changes: the app's connections are never told to shut down.
    never: watch::Sender<bool>,
}

impl<A> UntilExit<A> {
    /// `app` on `listener`, which idem already bound.
    pub(crate) fn new(name: &'static str, listener: TcpListener, app: A) -> UntilExit<A> {
        UntilExit {
            name,
            listener: parking_lot::Mutex::new(Some(listener)),
            app: Arc::new(app),
            never: watch::Sender::new(false),
        }
    }
}

#[async_trait::async_trait]
impl<A: ServerApp + Send + Sync + 'static> BackgroundService for UntilExit<A> {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let Some(std) = self.listener.lock().take() else {
            return;
        };
        let listener = match std
            .set_nonblocking(true)
            .and_then(|()| tokio::net::TcpListener::from_std(std))
        {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listener = self.name, "cannot serve: {e}");
                return;
            }
        };
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let app = self.app.clone();
                    let never = self.never.subscribe();
                    tokio::spawn(async move {
                        let mut next: Option<pingora::protocols::Stream> = Some(Box::new(
                            pingora::protocols::l4::stream::Stream::from(stream),
                        ));
                        while let Some(s) = next {
                            next = app.process_new(s, &never).await;
                        }
                    });
                }
                Err(e) => {
                    // Out of descriptors, say: it passes, and a busy loop would not help.
                    tracing::warn!(listener = self.name, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
