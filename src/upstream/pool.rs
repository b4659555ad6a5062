//! The idle connections of one backend, kept for idem's own calls (leaders, and bodies idem
//! forwards itself), each watched while it waits.
//!
//! Why not Pingora's pool: it tells its user nothing of how or when a backend closed an
//! idle connection, which is what decides whether a request that must not be lost may go
//! out on one ([`super::reuse`]). Here a task per idle connection waits on it: the backend
//! closing it is recorded with how long it had been idle; a connection that reaches
//! [`super::reuse::PROBATION`] or its end of life still open is recorded as having survived.
//! Pingora's own pool also spawns a task per idle connection, so this costs no more.
//!
//! Connections are handed out newest first (the ones least likely to be near a backend's
//! idle timeout), and only when younger than the caller's window; older ones stay and keep
//! being watched, since how long they survive is what the window is learned from.

use super::reuse::{Learned, Reuse, PROBATION};
use parking_lot::Mutex;
use pingora::protocols::Stream;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// Idle connections kept per backend at most; past it a released connection is closed.
/// Bounds the descriptors a burst of new connections can leave behind.
pub(crate) const MAX_IDLE: usize = 256;

/// One idle connection: its watcher hands it over on request.
struct Idle {
    released: Instant,
    claim: oneshot::Sender<oneshot::Sender<Stream>>,
}

/// The idle connections of one backend.
pub(crate) struct Pool {
    /// Oldest first.
    idle: Mutex<VecDeque<Idle>>,
}

impl Pool {
    pub(crate) fn new() -> Pool {
        Pool {
            idle: Mutex::new(VecDeque::new()),
        }
    }

    /// Keeps `stream` idle for at most `keep_for`, watched; events go to `reuse`, and
    /// `report` is called with what a watch learned that is worth a log line.
    pub(crate) fn put(
        &self,
        stream: Stream,
        keep_for: Duration,
        reuse: Arc<Reuse>,
        report: impl Fn(Learned) + Send + 'static,
    ) {
        let (claim, claimed) = oneshot::channel();
        let released = Instant::now();
        {
            let mut idle = self.idle.lock();
            // Entries whose watcher has ended (closed or expired) go first.
            idle.retain(|i| !i.claim.is_closed());
            if idle.len() >= MAX_IDLE {
                return;
            }
            idle.push_back(Idle { released, claim });
        }
        tokio::spawn(watch(stream, claimed, released, keep_for, reuse, report));
    }

    /// The newest idle connection if it has been idle at most `window`, with its idle time.
    pub(crate) async fn take(&self, window: Duration) -> Option<(Stream, Duration)> {
        loop {
            let idle = {
                let mut idle = self.idle.lock();
                match idle.back() {
                    Some(newest) if newest.released.elapsed() <= window => idle.pop_back()?,
                    _ => return None,
                }
            };
            let (back, stream) = oneshot::channel();
            if idle.claim.send(back).is_err() {
                // Its watcher ended (the backend closed it): try the next.
                continue;
            }
            if let Ok(stream) = stream.await {
                return Some((stream, idle.released.elapsed()));
            }
        }
    }
}

/// Waits on an idle connection until it is claimed, closed by the backend, or at the end
/// of its life, recording what that says about the backend.
async fn watch(
    mut stream: Stream,
    mut claimed: oneshot::Receiver<oneshot::Sender<Stream>>,
    released: Instant,
    keep_for: Duration,
    reuse: Arc<Reuse>,
    report: impl Fn(Learned),
) {
    let probation = tokio::time::sleep(PROBATION.min(keep_for));
    let end = tokio::time::sleep(keep_for);
    tokio::pin!(probation, end);
    let mut on_probation = true;
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            biased;
            claim = &mut claimed => {
                if let Ok(back) = claim {
                    report(reuse.survived(released.elapsed()));
                    let _ = back.send(stream);
                }
                return;
            }
            // An idle connection says nothing until it is closed: EOF, a reset, or bytes
            // nobody asked for (a late error page before a close) all mean it is done.
            _ = stream.read(&mut byte) => {
                report(reuse.closed(released.elapsed(), Instant::now()));
                return;
            }
            _ = &mut probation, if on_probation => {
                on_probation = false;
                report(reuse.survived(released.elapsed()));
            }
            _ = &mut end => {
                report(reuse.survived(released.elapsed()));
                return;
            }
        }
    }
}
