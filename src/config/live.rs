//! The configuration in force, and its reload on SIGHUP.
//!
//! [`Live`] holds the current [`Snapshot`] in an `ArcSwap`. Each request loads it once, when
//! it starts, and keeps that snapshot to its end: a reload never changes a request half-way.
//! Flights, stored and held keys and the shadow table live outside the snapshot, so a reload
//! neither drops nor re-executes anything.
//!
//! A reload changes, for requests that start after it: the routes (added, removed or
//! changed), every route policy (`[dedup]` and `[[route]]`: modes, TTLs, limits, headers),
//! and `[server]` `keepalive_timeout`, `body_read_timeout`, `max_waiters` and
//! `trusted_proxies`. Settings fixed
//! at start-up ([`Settings::restart_only_changes`]) keep their running values; a file that
//! changes them is applied for the rest and the caller logs what needs a restart. An invalid
//! file is refused as a whole and nothing changes.

use crate::config::route::{longest_prefix, RouteId, RouteMatch};
use crate::config::settings::{ConfigError, Reloaded, Settings};
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One configuration, with the metric label id of each route.
pub(crate) struct Snapshot {
    /// The settings.
    pub(crate) settings: Settings,
    /// `route_ids[0]` is the default route's id, `route_ids[i + 1]` that of `settings.routes[i]`.
    route_ids: Vec<RouteId>,
}

impl Snapshot {
    /// Wraps `settings` with the label ids of its routes, in [`Settings::all_routes`] order
    /// (the metrics issue them: `Metrics::register_routes`).
    pub(crate) fn new(settings: Settings, route_ids: Vec<RouteId>) -> Snapshot {
        assert_eq!(
            route_ids.len(),
            settings.routes.len() + 1,
            "one label id per route, the default first"
        );
        Snapshot {
            settings,
            route_ids,
        }
    }

    /// The route for a request path: the longest matching `path_prefix`, or the default.
    pub(crate) fn route(&self, path: &str) -> RouteMatch<'_> {
        let s = &self.settings;
        match longest_prefix(&s.routes, path) {
            Some(i) => RouteMatch {
                id: self.route_ids[i + 1],
                policy: &s.routes[i],
            },
            None => RouteMatch {
                id: self.route_ids[0],
                policy: &s.default_route,
            },
        }
    }
}

/// The configuration in force and where it was read from.
pub(crate) struct Live {
    current: ArcSwap<Snapshot>,
    path: PathBuf,
}

impl Live {
    /// Starts with `snapshot`, read from `path`.
    pub(crate) fn new(snapshot: Snapshot, path: PathBuf) -> Live {
        Live {
            current: ArcSwap::from_pointee(snapshot),
            path,
        }
    }

    /// The snapshot in force now.
    pub(crate) fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The file a reload reads.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file against the settings in force (see [`Settings::reload`]); nothing
    /// changes until the caller puts the result in force with [`Live::store`].
    pub(crate) fn read(&self) -> Result<Reloaded, ConfigError> {
        Settings::reload(&self.path, &self.current.load().settings)
    }

    /// Puts `next` in force for requests that start from now on.
    pub(crate) fn store(&self, next: Snapshot) {
        self.current.store(Arc::new(next));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::file::Mode;
    use std::time::Duration;

    fn snapshot(text: &str) -> Snapshot {
        let settings = Settings::from_toml_str(text, Path::new("proxy.toml")).unwrap();
        let ids = (0..=settings.routes.len())
            .map(|i| RouteId(10 + i))
            .collect();
        Snapshot::new(settings, ids)
    }

    #[test]
    fn routes_inherit_and_longest_prefix_wins() {
        let s = snapshot(
            "[dedup]\nttl = \"1h\"\n[[route]]\npath_prefix = \"/api/\"\nmode = \"fingerprint\"\n[[route]]\nname = \"orders\"\npath_prefix = \"/api/orders\"\nmode = \"require-key\"\n",
        );
        let orders = s.route("/api/orders/1");
        assert_eq!(
            (orders.policy.name.as_str(), orders.id),
            ("orders", RouteId(12))
        );
        assert_eq!(orders.policy.mode, Mode::RequireKey);
        let api = s.route("/api/x");
        assert_eq!((api.policy.name.as_str(), api.id), ("/api/", RouteId(11)));
        assert_eq!(api.policy.ttl, Duration::from_secs(3600));
        let other = s.route("/other");
        assert_eq!(
            (other.policy.name.as_str(), other.id),
            ("default", RouteId(10))
        );
    }
}
