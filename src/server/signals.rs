//! Signals: SIGTERM and SIGQUIT drain (idem does not hand its sockets to a successor),
//! SIGINT exits at once, SIGHUP reloads the configuration file.
//!
//! Drain: from the signal on the process is draining (`/readyz` answers 503, answers close
//! their connections), and the proxy listeners keep accepting for `[server] shutdown_delay`
//! (the time a load balancer or Kubernetes' endpoints take to stop sending here; a second
//! SIGTERM cuts it short, SIGINT still exits at once). Then Pingora stops the listeners and
//! waits up to `grace_period`; idem exits as soon as no request is being processed and no
//! flight is running, instead of sleeping the whole period, and says every few seconds
//! what it still waits for. Reload: one log line says the file was reloaded, or why it was
//! refused (file:line) and that the running configuration stays; another names the changed
//! settings that need a restart.

use crate::config::live::{Live, Snapshot};
use crate::dedup::coordinator::Coordinator;
use crate::observe::metrics::Metrics;
use crate::observe::trace::Traces;
use async_trait::async_trait;
use pingora::server::{ExecutionPhase, Server, ShutdownSignal, ShutdownSignalWatch};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// How often a draining process checks whether anything is left.
const DRAIN_CHECK_EVERY: Duration = Duration::from_millis(50);
/// How often a draining process says what it still waits for.
const DRAIN_REPORT_EVERY: Duration = Duration::from_secs(5);

/// idem's signal policy (see the module doc).
pub(crate) struct Signals {
    /// Notified once the handlers are installed (the listening line waits for it).
    pub(crate) installed: Arc<Notify>,
    /// The configuration in force.
    pub(crate) live: Arc<Live>,
    /// Route labels for a reloaded configuration, and the bounds it publishes.
    pub(crate) metrics: Arc<Metrics>,
    /// Takes the reloaded `max_waiters`.
    pub(crate) coordinator: Arc<Coordinator>,
    /// Set on SIGTERM/SIGQUIT.
    pub(crate) draining: Arc<AtomicBool>,
}

impl Signals {
    fn reload(&self) {
        let file = self.live.path().display();
        match self.live.read() {
            Ok(reloaded) => {
                let s = reloaded.settings;
                // Said again on each reload: a certificate about to expire, say.
                let s_warnings = s.warnings.clone();
                let names: Vec<String> = s.all_routes().map(|r| r.name.clone()).collect();
                let ids = self.metrics.register_routes(&names);
                self.coordinator.set_max_waiters(s.max_waiters);
                self.metrics
                    .set_bounds(s.store.max_entries, s.store.max_bytes, s.max_waiters);
                self.live.store(Snapshot::new(s, ids));
                let restart_needed = reloaded.restart_needed;
                tracing::info!("SIGHUP: configuration reloaded from {file}");
                for w in s_warnings {
                    tracing::warn!("configuration: {w}");
                }
                if !restart_needed.is_empty() {
                    tracing::warn!(
                        "SIGHUP: {} changed in {file}; these settings take effect only at start-up, so the running values are kept until a restart",
                        restart_needed.join(", ")
                    );
                }
            }
            Err(e) => tracing::error!(
                "SIGHUP: configuration reload refused, the running configuration is kept: {e}"
            ),
        }
    }
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
        let mut quit = signal(SignalKind::quit()).expect("install SIGQUIT handler");
        let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
        let mut hup = signal(SignalKind::hangup()).expect("install SIGHUP handler");
        self.installed.notify_one();
        loop {
            let signal = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = quit.recv() => "SIGQUIT",
                _ = int.recv() => {
                    // Exit here rather than through Pingora's fast shutdown: with single-thread
                    // runtimes (`work_stealing = false`), a listener whose runtime is being torn
                    // down can spin on `accept()` failing at once ("Tokio context is being
                    // shutdown"; nothing else wakes its loop on a fast shutdown), and the process
                    // never exits. Seen in 2 of 40 starts signalled as soon as they listened.
                    tracing::info!("SIGINT: exiting at once");
                    std::process::exit(0);
                }
                _ = hup.recv() => {
                    self.reload();
                    continue;
                }
            };
            self.draining.store(true, Ordering::Relaxed);
            let delay = self.live.load().settings.shutdown_delay;
            if delay.is_zero() {
                tracing::info!("{signal}: draining; the listeners close now");
            } else {
                tracing::info!(
                    "{signal}: draining; /readyz answers 503 and the listeners close in {}",
                    humantime::format_duration(delay)
                );
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = term.recv() => tracing::info!("SIGTERM again: the listeners close now"),
                    _ = int.recv() => {
                        tracing::info!("SIGINT: exiting at once");
                        std::process::exit(0);
                    }
                }
            }
            return ShutdownSignal::GracefulTerminate;
        }
    }
}

/// Exits the process once a graceful shutdown has nothing left to drain (after sending the
/// spans still queued).
pub(crate) fn spawn_drain_watcher(
    server: &Server,
    active: Arc<AtomicUsize>,
    coordinator: Arc<Coordinator>,
    traces: Option<Arc<Traces>>,
) {
    let mut phases = server.watch_execution_phase();
    std::thread::spawn(move || loop {
        match phases.blocking_recv() {
            Ok(ExecutionPhase::ShutdownGracePeriod) => {
                let mut report = std::time::Instant::now() + DRAIN_REPORT_EVERY;
                loop {
                    let requests = active.load(Ordering::Acquire);
                    let flights = coordinator.counts().inflight;
                    if requests == 0 && flights == 0 {
                        tracing::info!("graceful shutdown: nothing left in flight, exiting");
                        if let Some(t) = &traces {
                            t.flush();
                        }
                        std::process::exit(0);
                    }
                    if std::time::Instant::now() >= report {
                        tracing::info!(
                            requests,
                            flights,
                            "graceful shutdown: waiting for requests and flights in progress"
                        );
                        report += DRAIN_REPORT_EVERY;
                    }
                    std::thread::sleep(DRAIN_CHECK_EVERY);
                }
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    });
}
