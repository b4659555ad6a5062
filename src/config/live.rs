//! The configuration in force, and its reload on SIGHUP.
//!
//! [`Live`] holds the current [`Snapshot`] in an `ArcSwap`. Each request loads it once, when
//! it starts, and keeps that snapshot to its end: a reload never changes a request half-way.
//! Flights, stored and held keys and the shadow table live outside the snapshot, so a reload
//! neither drops nor re-executes anything.
//!
//! A reload changes, for requests that start after it: the routes (added, removed or
//! changed), every route policy (`[dedup]` and `[[route]]`: modes, TTLs, limits, headers),
//! and `[server]` `keepalive_timeout`, `body_read_timeout` and `max_waiters`. Settings fixed
//! at start-up ([`Settings::restart_only_changes`]) keep their running values; a file that
//! changes them is applied for the rest and the caller logs what needs a restart. An invalid
//! file is refused as a whole and nothing changes.

use crate::config::settings::{ConfigError, RoutePolicy, Settings};
use crate::dedup::coordinator::Coordinator;
use crate::observe::metrics::{Metrics, RouteId};
use arc_swap::ArcSwap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// One configuration, with the metric label id of each route.
pub struct Snapshot {
    /// The settings.
    pub settings: Settings,
    /// `route_ids[0]` is the default route's id, `route_ids[i + 1]` that of `settings.routes[i]`.
    route_ids: Vec<RouteId>,
}

/// The route a request path matched.
#[derive(Clone, Copy)]
pub struct RouteMatch<'a> {
    /// Metric label id.
    pub id: RouteId,
    /// The route's policy.
    pub policy: &'a RoutePolicy,
}

impl Snapshot {
    /// Wraps `settings`, registering its route names with `metrics`.
    pub fn new(settings: Settings, metrics: &Metrics) -> Snapshot {
        let names: Vec<String> = settings.all_routes().map(|r| r.name.clone()).collect();
        let route_ids = metrics.register_routes(&names);
        Snapshot {
            settings,
            route_ids,
        }
    }

    /// The route for a request path: the longest matching `path_prefix`, or the default.
    pub fn route(&self, path: &str) -> RouteMatch<'_> {
        let s = &self.settings;
        match s
            .routes
            .iter()
            .enumerate()
            .filter(|(_, r)| path.starts_with(r.path_prefix.as_str()))
            .max_by_key(|(_, r)| r.path_prefix.len())
        {
            Some((i, r)) => RouteMatch {
                id: self.route_ids[i + 1],
                policy: r,
            },
            None => RouteMatch {
                id: self.route_ids[0],
                policy: &s.default_route,
            },
        }
    }
}

/// The configuration in force and where it was read from.
pub struct Live {
    current: ArcSwap<Snapshot>,
    path: PathBuf,
    metrics: Arc<Metrics>,
    coordinator: Arc<Coordinator>,
}

impl Live {
    /// Starts with `settings`, read from `path`.
    pub fn new(
        settings: Settings,
        path: PathBuf,
        metrics: Arc<Metrics>,
        coordinator: Arc<Coordinator>,
    ) -> Live {
        Live {
            current: ArcSwap::from_pointee(Snapshot::new(settings, &metrics)),
            path,
            metrics,
            coordinator,
        }
    }

    /// The snapshot in force now.
    pub fn load(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// The file a reload reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file and puts it in force for new requests. Returns the restart-only
    /// settings that the file changes (their running values were kept); on error nothing
    /// changed.
    pub fn reload(&self) -> Result<Vec<&'static str>, ConfigError> {
        let running = self.current.load();
        let reloaded = Settings::reload(&self.path, &running.settings)?;
        let next = Snapshot::new(reloaded.settings, &self.metrics);
        let s = &next.settings;
        self.coordinator.set_max_waiters(s.max_waiters);
        self.metrics
            .set_bounds(s.store.max_entries, s.store.max_bytes, s.max_waiters);
        self.current.store(Arc::new(next));
        Ok(reloaded.restart_needed)
    }
}
