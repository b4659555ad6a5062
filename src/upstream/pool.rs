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
//!
//! Thread locality: idem's runtimes are one single-threaded runtime per thread, and a
//! connection's socket and watcher live on the thread that opened or released it. Each
//! thread keeps its idle connections in its own shard and takes from it first; a connection
//! from another thread's shard costs cross-thread wake-ups, still less than a connect.

use super::reuse::{Learned, Reuse, PROBATION};
use parking_lot::Mutex;
use pingora::protocols::Stream;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

/// Idle connections kept per backend and thread at most; past it a released connection is
/// closed. Bounds the descriptors a burst of new connections can leave behind.
pub(crate) const MAX_IDLE: usize = 128;

/// Shards per pool: threads beyond this many share shards.
pub(crate) const SHARDS: usize = 16;

/// This thread's shard (also the thread's part of its pass-through peers' pool key:
/// `Upstream::pass_through_peer`).
pub(crate) fn shard() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SHARD: usize = NEXT.fetch_add(1, Ordering::Relaxed) % SHARDS;
    }
    SHARD.with(|s| *s)
}

/// One idle connection: its watcher hands it over on request.
struct Idle {
    released: Instant,
    claim: oneshot::Sender<oneshot::Sender<Stream>>,
}

/// The idle connections of one backend.
pub(crate) struct Pool {
    /// One per thread (see the module doc), each oldest first.
    shards: [Mutex<VecDeque<Idle>>; SHARDS],
}

impl Pool {
    pub(crate) fn new() -> Pool {
        Pool {
            shards: std::array::from_fn(|_| Mutex::new(VecDeque::new())),
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
            let mut idle = self.shards[shard()].lock();
            // Entries whose watcher has ended (closed or expired) go first.
            idle.retain(|i| !i.claim.is_closed());
            if idle.len() >= MAX_IDLE {
                return;
            }
            idle.push_back(Idle { released, claim });
        }
        tokio::spawn(watch(stream, claimed, released, keep_for, reuse, report));
    }

    /// An idle connection that has been idle at most `window`, with its idle time: this
    /// thread's newest, else another thread's.
    pub(crate) async fn take(&self, window: Duration) -> Option<(Stream, Duration)> {
        if window.is_zero() {
            return None;
        }
        let own = shard();
        if let Some(found) = self.take_from(own, window).await {
            return Some(found);
        }
        for other in (0..SHARDS).filter(|s| *s != own) {
            if let Some(found) = self.take_from(other, window).await {
                return Some(found);
            }
        }
        None
    }

    async fn take_from(&self, shard: usize, window: Duration) -> Option<(Stream, Duration)> {
        loop {
            let idle = {
                let mut idle = self.shards[shard].lock();
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A thread keeps its shard; threads started one after another get their own, so two
    /// runtime threads never share pass-through pool keys or leader shards.
    #[test]
    fn each_thread_has_its_own_stable_shard() {
        let here = shard();
        assert_eq!(shard(), here);
        let others: Vec<usize> = (0..3)
            .map(|_| std::thread::spawn(|| (shard(), shard())).join().unwrap())
            .map(|(a, b)| {
                assert_eq!(a, b, "stable within a thread");
                a
            })
            .collect();
        let mut all = others.clone();
        all.push(here);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 4, "shards {here} and {others:?}");
    }
}
