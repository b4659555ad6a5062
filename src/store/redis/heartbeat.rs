//! This replica's liveness key, `<prefix>alive:<owner>`: waiters on other replicas check it
//! to tell a slow call from a dead replica. Its write is also the probe a new connection must
//! pass before it is used ([`super::conn`]).

use super::codec::OwnerId;
use super::names::Names;
use super::{millis, RedisStore};
use std::time::{Duration, Instant};

/// The liveness write: `SET <prefix>alive:<owner> 1 PX <liveness_ttl>`.
pub(super) fn command(names: &Names, owner: &OwnerId, liveness_ttl: Duration) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(names.alive(owner))
        .arg(1)
        .arg("PX")
        .arg(millis(liveness_ttl));
    cmd
}

/// Keeps the liveness key fresh: every `liveness_ttl / 3`, and at once after each
/// (re)connection.
pub(super) async fn heartbeat(weak: std::sync::Weak<RedisStore>) {
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let interval = shared.liveness_ttl / 3;
        let up = shared.link.is_up();
        if up {
            let started = Instant::now();
            let cmd = command(&shared.names, &shared.owner, shared.liveness_ttl);
            let r = shared
                .link
                .run(|mut c| async move { cmd.query_async::<()>(&mut c).await })
                .await;
            shared
                .metrics
                .observe("heartbeat", if r.is_ok() { "ok" } else { "error" }, started);
        }
        let connected = up;
        drop(shared);
        // Poll the link often while down so the first heartbeat follows a reconnect closely.
        let nap = if connected {
            interval
        } else {
            interval.min(Duration::from_millis(20))
        };
        tokio::time::sleep(nap).await;
    }
}
