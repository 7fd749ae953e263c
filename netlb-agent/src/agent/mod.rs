//! `netlb-agent run`: the agent's lifecycle, in named phases.
//!
//! 1. **Start**: signals, the one async runtime, the health and metrics
//!    endpoints.
//! 2. **Load and adopt** ([`kernel::Kernel::load`]): this build's maps
//!    (adopted, or carried over from another layout or other sizes) and
//!    programs, the conntrack collectors, the syncer's mirror of what an
//!    earlier agent programmed.
//! 3. **Attach**: the socket-level programs, then the interfaces as they
//!    appear (every turn of the loop).
//! 4. **Sources**: the API server's watches (or a manifest directory)
//!    record into the object store and wake the loop.
//! 5. **Loop**, in kube-proxy's shape: one sync step recomputes the
//!    Services that changed and applies the minimal diff
//!    ([`step::Pipeline::step`]), at most every `min_sync_interval`,
//!    retrying failures with backoff; nothing is programmed before
//!    Services and EndpointSlices have both been listed. A verification
//!    resync walks every Service and programmed frontend in bounded chunks
//!    (each `resync_interval`), so it never stalls a change behind it.
//! 6. **Shutdown**: sources and collector stop, the heartbeat is cleared
//!    (the socket-level programs serve pods meanwhile), and everything
//!    stays pinned for the next agent (unless `cleanup_on_exit`).
//!
//! Owns: wiring the layers together. Must not: hold Service semantics or
//! map layouts of its own.

mod interfaces;
mod kernel;
mod layout_plan;
mod options;
mod source;
mod step;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

pub use interfaces::NodeAddresses;
pub use options::{RunError, RunOptions, SourceConfig};

use self::{
    kernel::Kernel,
    source::Source,
    step::{Pipeline, Step, StepContext},
};
use crate::{
    datapath::{conntrack::Collector, ifaces},
    k8s::{retry::RetryPolicy, tracker::ObjectStore},
    serve::{healthcheck::ServiceHealthServer, http, metrics::Metrics, server::Server},
    support::{error_chain, lock},
};

/// Runs the agent until SIGINT or SIGTERM.
pub fn run(opts: RunOptions) -> Result<(), RunError> {
    let mut agent = Agent::start(opts)?;
    while !agent.term.load(Ordering::Relaxed) {
        agent.turn();
    }
    agent.shutdown()
}

struct Agent {
    opts: RunOptions,
    term: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    kernel: Kernel,
    collector: Collector,
    pipeline: Pipeline,
    health: ServiceHealthServer,
    source: Source,
    /// Wakes the loop: watch events, link changes.
    events: mpsc::Receiver<()>,
    /// Set by the netlink watcher: interfaces or routes changed.
    links_changed: Arc<AtomicBool>,
    schedule: Schedule,
    timers: Timers,
    _watcher: std::thread::JoinHandle<()>,
    servers: Vec<Server>,
    /// The agent's one async runtime: the API client's watches, the health
    /// and metrics endpoints and every health-check node port, as tasks on
    /// two worker threads (the loop stays on the main thread).
    runtime: tokio::runtime::Runtime,
}

impl Agent {
    /// Phases 1 to 4.
    fn start(opts: RunOptions) -> Result<Self, RunError> {
        let term = Arc::new(AtomicBool::new(false));
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, Arc::clone(&term))
                .map_err(|source| RunError::Signals { source })?;
        }
        // kube-proxy's health timeout is twice its sync period.
        let metrics = Arc::new(Metrics::new(opts.resync_interval * 2));
        raise_fd_limit();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("netlb-rt")
            .enable_all()
            .build()
            .map_err(|source| RunError::Runtime { source })?;
        let servers = serve(&opts, runtime.handle(), &metrics)?;
        let (mut kernel, conntrack) = Kernel::load(&opts)?;
        let sweep_metrics = Arc::clone(&metrics);
        let collector = Collector::spawn(
            Box::new(conntrack),
            opts.gc_interval,
            Box::new(move |report| sweep_metrics.conntrack_swept(report)),
        )
        .map_err(|source| RunError::Threads { source })?;
        let syncer = kernel.adopt(&opts)?;
        kernel.attach_sockets(&opts)?;
        let health_metrics = Arc::clone(&metrics);
        let health = ServiceHealthServer::new(
            runtime.handle().clone(),
            Arc::new(move || health_metrics.proxy_healthy()),
        );
        let (tx, events) = mpsc::channel::<()>();
        let socket = ifaces::link_socket().map_err(|source| RunError::Interfaces { source })?;
        let links_changed = Arc::new(AtomicBool::new(true));
        let watcher = ifaces::spawn_watcher(socket, Arc::clone(&links_changed), tx.clone())
            .map_err(|source| RunError::Interfaces { source })?;
        let store = Arc::new(Mutex::new(ObjectStore::default()));
        let source = Source::start(&opts.source, runtime.handle(), &store, tx)?;
        let pipeline = Pipeline::new(store, syncer, opts.node.clone());
        metrics.queued_update();
        Ok(Self {
            opts,
            term,
            metrics,
            kernel,
            collector,
            pipeline,
            health,
            source,
            events,
            links_changed,
            schedule: Schedule::default(),
            timers: Timers::new(),
            _watcher: watcher,
            servers,
            runtime,
        })
    }

    /// One turn of the loop (phase 5).
    fn turn(&mut self) {
        self.maintain();
        // The verification resync starts every resync interval and then
        // runs a chunk per turn.
        if self.pipeline.synced_once
            && !self.pipeline.verifying
            && self
                .schedule
                .last_sync
                .is_none_or(|t| t.elapsed() >= self.opts.resync_interval)
        {
            self.pipeline.start_verification();
        }
        if self.pipeline.verifying || self.schedule.retry_at.is_some_and(|t| Instant::now() >= t) {
            self.schedule.dirty = true;
        }
        if self.schedule.dirty && self.schedule.may_sync(self.opts.min_sync_interval) {
            self.sync();
        }
        if self.timers.last_counters.elapsed() >= Duration::from_secs(1) {
            self.timers.last_counters = Instant::now();
            self.kernel.beat(&self.collector, &self.metrics);
        }
        self.wait();
    }

    /// What the loop keeps up besides syncing: interfaces and pod routes
    /// (on netlink events, and every second in case a notification was
    /// lost), the LRUs' fill (every ten seconds), ids a conntrack sweep
    /// freed, the manifest directory, the API source's health.
    fn maintain(&mut self) {
        if self.links_changed.swap(false, Ordering::Relaxed)
            || self.timers.last_links.elapsed() >= Duration::from_secs(1)
        {
            self.timers.last_links = Instant::now();
            self.pipeline.pod_source_count = self.kernel.reconcile_links(&self.opts);
        }
        if self
            .timers
            .last_lru_count
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(10))
        {
            self.timers.last_lru_count = Some(Instant::now());
            self.pipeline.lru_fill = self.kernel.lru_fill();
        }
        if let Some((generation, report)) = self.collector.take_report() {
            let freed = self.pipeline.syncer.reclaim(
                &report.backend_ids,
                &report.rev_nat_indices,
                generation,
            );
            if freed > 0 {
                log::debug!("{freed} backend ids / rev-NAT indices free for reuse");
            }
        }
        match self.source.poll(&self.pipeline.store, &self.metrics) {
            Ok(true) => {
                self.schedule.dirty = true;
                self.metrics.queued_update();
            }
            Ok(false) => {}
            Err(e) => log::warn!("{e}: {}", error_chain(&e)),
        }
        self.source.report(&self.metrics);
    }

    /// A sync step, and what its outcome means for the next one.
    fn sync(&mut self) {
        self.schedule.last_attempt = Some(Instant::now());
        self.kernel
            .follow_addresses(&self.opts, &self.pipeline.store);
        let result = self.pipeline.step(StepContext {
            opts: &self.opts,
            dataplane: &mut self.kernel.dataplane,
            metrics: &self.metrics,
            addresses: &self.kernel.addresses,
            health: &mut self.health,
            collector: &self.collector,
        });
        match result {
            Ok(Step::Idle) => {
                // Nothing to program: neither a sync for the metrics nor a
                // reason to hold the next change back.
                self.schedule.dirty = self.pipeline.verifying;
                self.schedule.failures = 0;
                self.metrics.nothing_pending();
            }
            Ok(Step::Synced) => self.synced(),
            Ok(Step::NotSynced) => {
                // The watch event that completes the initial lists sets
                // `dirty` again; no need to poll until then.
                self.schedule.dirty = false;
                if !self.schedule.waiting_logged {
                    self.schedule.waiting_logged = true;
                    log::info!("waiting for Services and EndpointSlices to sync");
                }
            }
            Err(e) => {
                self.schedule.failures += 1;
                self.metrics.sync_failed(e.reason());
                log::error!(
                    "sync failed (retry in {:?}): {e}: {}",
                    backoff_delay(self.schedule.failures),
                    error_chain(&e)
                );
            }
        }
    }

    fn synced(&mut self) {
        let s = &mut self.schedule;
        s.dirty = self.pipeline.verifying;
        s.failures = 0;
        // Frontends whose writes failed are retried on their own schedule
        // (backing off), so that they never hold other changes back.
        if self.pipeline.syncer.has_pending() {
            s.retries += 1;
            s.retry_at = Some(Instant::now() + backoff_delay(s.retries));
        } else {
            s.retries = 0;
            s.retry_at = None;
        }
        if !self.pipeline.verifying {
            s.last_sync = Some(Instant::now());
        }
        if !self.pipeline.synced_once {
            self.pipeline.synced_once = true;
            self.metrics.initial_sync_complete();
            s.last_sync = Some(Instant::now());
            log::info!("initial sync complete");
        }
    }

    /// Waits for link or watch events, a tick to poll manifests, or as
    /// soon as a pending (rate-limited) sync is allowed, like kube-proxy's
    /// BoundedFrequencyRunner.
    fn wait(&mut self) {
        let wait = self.schedule.wait(self.opts.min_sync_interval);
        match self.events.recv_timeout(wait) {
            Ok(()) => {
                while self.events.try_recv().is_ok() {}
                self.schedule.dirty = true;
                self.metrics.queued_update();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Phase 6.
    fn shutdown(self) -> Result<(), RunError> {
        log::info!("shutting down");
        drop(self.source);
        drop(self.collector);
        let result = self.kernel.leave(&self.opts);
        drop(self.health);
        drop(self.servers);
        drop(self.runtime);
        result
    }
}

/// When the loop last did its periodic chores.
struct Timers {
    last_links: Instant,
    last_lru_count: Option<Instant>,
    last_counters: Instant,
}

impl Timers {
    fn new() -> Self {
        Self {
            last_links: Instant::now(),
            last_lru_count: None,
            last_counters: Instant::now(),
        }
    }
}

/// When the next sync may run: at most every `min_sync_interval`, and
/// after failures only once the backoff has passed.
struct Schedule {
    /// Something changed since the last sync.
    dirty: bool,
    waiting_logged: bool,
    last_sync: Option<Instant>,
    last_attempt: Option<Instant>,
    /// Failed sync steps in a row.
    failures: u32,
    /// Syncs in a row that left frontends to retry, and when to.
    retries: u32,
    retry_at: Option<Instant>,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            dirty: true,
            waiting_logged: false,
            last_sync: None,
            last_attempt: None,
            failures: 0,
            retries: 0,
            retry_at: None,
        }
    }
}

impl Schedule {
    fn may_sync(&self, min_sync_interval: Duration) -> bool {
        self.last_sync
            .is_none_or(|t| t.elapsed() >= min_sync_interval)
            && self
                .last_attempt
                .is_none_or(|t| t.elapsed() >= backoff_delay(self.failures))
    }

    /// How long the loop may sleep: a tick, or less while a sync waits.
    fn wait(&self, min_sync_interval: Duration) -> Duration {
        let wait = Duration::from_millis(100);
        if !self.dirty {
            return wait;
        }
        let since_sync = self.last_sync.map(|t| t.elapsed()).unwrap_or(Duration::MAX);
        let since_attempt = self
            .last_attempt
            .map(|t| t.elapsed())
            .unwrap_or(Duration::MAX);
        wait.min(min_sync_interval.saturating_sub(since_sync))
            .min(backoff_delay(self.failures).saturating_sub(since_attempt))
            .max(Duration::from_millis(1))
    }
}

/// Exponential backoff for failed syncs: 200 ms after the first failure,
/// doubling, capped at 30 s (no jitter: one agent, one kernel).
fn backoff_delay(failures: u32) -> Duration {
    const SYNC_RETRY: RetryPolicy = RetryPolicy {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(30),
        reset_after: Duration::ZERO,
    };
    if failures == 0 {
        return Duration::ZERO;
    }
    SYNC_RETRY.delay(failures)
}

/// The health (`/healthz`, `/livez`, `/readyz`) and metrics endpoints.
fn serve(
    opts: &RunOptions,
    runtime: &tokio::runtime::Handle,
    metrics: &Arc<Metrics>,
) -> Result<Vec<Server>, RunError> {
    let mut servers = Vec::new();
    if let Some(addr) = opts.health_addr {
        let server = http::serve_health(runtime, addr, Arc::clone(metrics))?;
        log::info!(
            "serving /healthz, /livez and /readyz on {}",
            server.local_addr()
        );
        servers.push(server);
    }
    if let Some(addr) = opts.metrics_addr {
        let server = http::serve_metrics(runtime, addr, Arc::clone(metrics))?;
        log::info!("serving /metrics and /proxyMode on {}", server.local_addr());
        servers.push(server);
    }
    Ok(servers)
}

/// Raises the soft limit on open files to the hard limit (Go programs such
/// as kube-proxy get this from their runtime): every health-check node port
/// and every client connection to it or to the health port is a descriptor,
/// and the usual soft limit of 1,024 would leave a node with many
/// externalTrafficPolicy Local Services unable to accept probes.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, owned rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                log::warn!(
                    "could not raise the open-files limit: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}
