//! This replica's liveness key, `idem:alive:<owner>`: waiters on other replicas check it to
//! tell a slow call from a dead replica.

use super::{alive_key, millis, RedisStore};
use std::time::{Duration, Instant};

/// Keeps `idem:alive:<owner>` fresh: every `liveness_ttl / 3`, and at once after each
/// (re)connection.
pub(super) async fn heartbeat(weak: std::sync::Weak<RedisStore>) {
    loop {
        let Some(shared) = weak.upgrade() else { return };
        let interval = shared.liveness_ttl / 3;
        let up = shared.link.is_up();
        if up {
            let started = Instant::now();
            let k = alive_key(&shared.owner);
            let ttl = millis(shared.liveness_ttl);
            let r = shared
                .link
                .run(|mut c| async move {
                    redis::cmd("SET")
                        .arg(&k)
                        .arg(1)
                        .arg("PX")
                        .arg(ttl)
                        .query_async::<()>(&mut c)
                        .await
                })
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
