//! The agent's main loop, in kube-proxy's shape: sources only record
//! changes (into the [`ObjectStore`], which marks the Services that really
//! changed) and wake the loop; one sync step recomputes the changed
//! Services alone and applies the minimal diff, at most every
//! `min_sync_interval`, retrying failures with backoff. A verification
//! resync walks every Service and programmed frontend in bounded chunks
//! (each `resync_interval`), so it never stalls a change behind it.
//! Interfaces are attached as they appear.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    hash::{Hash as _, Hasher as _},
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use crate::{
    config::DatapathSettings,
    datapath::conntrack::Collector,
    datapath::dataplane::kernel::{AyaDataplane, Heartbeat, KernelConntrack, Observer, PodSources},
    datapath::ifaces,
    datapath::ifaces::{Ipv4Cidr, NamePattern},
    datapath::layout,
    datapath::layout::MapSizes,
    datapath::loader::{self, Attacher, LoadOptions, Role},
    datapath::migrate,
    datapath::sync::Syncer,
    k8s::objects::{ServiceObject, SliceObject},
    k8s::tracker::{Kind, ObjectKey, ObjectStore},
    k8s::{
        kube::{ApiConfig, ApiSource},
        manifests,
    },
    model::desired,
    model::{self, Model, NodeContext},
    serve::healthcheck::ServiceHealthServer,
    serve::http,
    serve::metrics::Metrics,
};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests (dev, demos), re-read when it changes.
    Manifests(PathBuf),
    /// The API server.
    Api(ApiConfig),
}

/// Agent settings for `netlb-agent run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: SourceConfig,
    pub pin_dir: PathBuf,
    pub pod_ifaces: Vec<NamePattern>,
    /// Node uplinks (`from_netdev` / `to_netdev`).
    pub netdevs: Vec<NamePattern>,
    /// `--nodeport-addresses`; empty = the uplinks' addresses.
    pub nodeport_cidrs: Vec<Ipv4Cidr>,
    /// `--nodeport-addresses primary`: the node's primary address (the
    /// SNAT address: --node-ip, else the first uplink's) accepts node
    /// ports, besides the CIDRs' addresses.
    pub nodeport_primary: bool,
    /// SNAT address for north-south flows; `None` = the first uplink address.
    pub node_ip: Option<Ipv4Addr>,
    /// The datapath's runtime settings (the SNAT address is filled in from
    /// the node's addresses).
    pub datapath: DatapathSettings,
    /// How often the conntrack garbage collector sweeps.
    pub gc_interval: Duration,
    /// cgroup v2 directory for the socket-level programs; `None` = no
    /// socket-level load balancing.
    pub cgroup_root: Option<PathBuf>,
    pub node: NodeContext,
    pub sizes: MapSizes,
    /// Minimum time between two syncs (kube-proxy's `minSyncPeriod`).
    pub min_sync_interval: Duration,
    /// A full resync at least this often (kube-proxy's `syncPeriod`).
    pub resync_interval: Duration,
    /// `/healthz` and `/livez` (kube-proxy: 0.0.0.0:10256).
    pub health_addr: Option<SocketAddr>,
    /// `/metrics` (kube-proxy: 127.0.0.1:10249).
    pub metrics_addr: Option<SocketAddr>,
    /// Remove links and pinned maps on exit (demos and tests); by default
    /// they stay so that traffic keeps flowing while the agent is down.
    pub cleanup_on_exit: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    #[error(transparent)]
    Dataplane(#[from] crate::datapath::dataplane::DataplaneError),
    #[error(transparent)]
    Sync(#[from] crate::datapath::sync::SyncError),
    #[error(transparent)]
    Api(#[from] crate::k8s::kube::ApiSourceError),
    #[error(transparent)]
    Listen(#[from] http::ListenError),
    #[error(transparent)]
    NatPorts(#[from] crate::config::NatPortsError),
    #[error("carrying the pinned state over into this agent's maps failed")]
    Migrate(#[source] Box<migrate::RunMigrationError<loader::LoaderError>>),
    #[error("failed to watch network interfaces")]
    Interfaces {
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start a thread")]
    Threads {
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start the agent's runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    #[error("failed to install signal handlers")]
    Signals {
        #[source]
        source: std::io::Error,
    },
}

enum Source {
    Manifests {
        dir: PathBuf,
        fingerprint: Option<u64>,
    },
    Api(ApiSource),
}

#[derive(Debug, thiserror::Error)]
enum SyncStepError {
    #[error("reading manifests failed")]
    Manifests(#[source] manifests::ManifestError),
    #[error("programming the datapath failed")]
    Sync(#[source] crate::datapath::sync::SyncError),
}

impl SyncStepError {
    /// Metric label.
    fn reason(&self) -> &'static str {
        match self {
            Self::Manifests(_) => "source",
            Self::Sync(_) => "datapath",
        }
    }
}

impl Source {
    /// Reads the manifest directory into the store when it changed (the
    /// API source records on its own); `true` when it did.
    fn poll(
        &mut self,
        store: &Mutex<ObjectStore>,
        metrics: &Metrics,
    ) -> Result<bool, SyncStepError> {
        let Self::Manifests { dir, fingerprint } = self else {
            return Ok(false);
        };
        match manifests::fingerprint(dir) {
            Ok(fp) if Some(fp) != *fingerprint => {
                *fingerprint = Some(fp);
            }
            Ok(_) => return Ok(false),
            Err(e) => {
                log::warn!("cannot read {}: {e}", dir.display());
                return Ok(false);
            }
        }
        let snapshot = manifests::load_dir(dir).map_err(SyncStepError::Manifests)?;
        for error in &snapshot.errors {
            log::warn!("ignored manifest object: {error}");
            metrics.invalid_object("manifest");
        }
        for allocation in &snapshot.allocations {
            log::debug!("allocated {allocation}");
        }
        // The directory is the whole truth each time: a list.
        let mut store = lock(store);
        store.begin_list(Kind::Service);
        for svc in &snapshot.services {
            let obj = ServiceObject::from_service(svc, store.names());
            store.apply_service(obj);
        }
        store.end_list(Kind::Service);
        store.begin_list(Kind::EndpointSlice);
        for slice in &snapshot.endpoint_slices {
            let obj = SliceObject::from_slice(slice, store.names());
            store.apply_slice(obj);
        }
        store.end_list(Kind::EndpointSlice);
        Ok(true)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The store is only ever updated whole object by whole object; a panic
    // elsewhere cannot leave it torn.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// This node's addresses as the datapath needs them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    /// Addresses that accept node ports.
    pub nodeport: Vec<Ipv4Addr>,
    /// Source address of north-south SNAT.
    pub snat: Option<Ipv4Addr>,
}

/// Reads the node's addresses: NodePorts on the uplinks' addresses, or on
/// every local address inside `--nodeport-addresses` (loopback excluded:
/// the datapath never sees loopback traffic).
fn node_addresses(opts: &RunOptions) -> std::io::Result<NodeAddresses> {
    let all: Vec<ifaces::InterfaceAddr> = ifaces::ipv4_addresses()?
        .into_iter()
        .filter(|a| !a.address.is_loopback())
        .collect();
    let mut uplinks: Vec<&ifaces::InterfaceAddr> = all
        .iter()
        .filter(|a| opts.netdevs.iter().any(|p| p.matches(&a.ifname)))
        .collect();
    // Stable choice of "the first uplink": by name, then kernel order.
    uplinks.sort_by(|a, b| a.ifname.cmp(&b.ifname));
    let snat = opts.node_ip.or(uplinks.first().map(|a| a.address));
    let mut nodeport: Vec<Ipv4Addr> = if opts.nodeport_cidrs.is_empty() && !opts.nodeport_primary {
        uplinks.iter().map(|a| a.address).collect()
    } else {
        all.iter()
            .map(|a| a.address)
            .filter(|ip| opts.nodeport_cidrs.iter().any(|c| c.contains(*ip)))
            .chain(snat.filter(|_| opts.nodeport_primary))
            .collect()
    };
    nodeport.sort();
    nodeport.dedup();
    Ok(NodeAddresses { nodeport, snat })
}

/// Exponential backoff for failed syncs, capped at 30 s.
fn backoff_delay(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(100u64 << failures.min(8)).min(Duration::from_secs(30))
}

/// Services recomputed (and frontends compared with the kernel) per loop
/// turn by the verification resync: a few milliseconds of work, the longest
/// a change can wait behind it.
const VERIFY_CHUNK: usize = 250;

/// The state the sync step carries from one step to the next.
struct Pipeline {
    store: Arc<Mutex<ObjectStore>>,
    syncer: Syncer,
    node: NodeContext,
    /// Model issues last reported per Service (a hash of them): each is
    /// logged and counted once per state of its objects.
    reported_issues: HashMap<ObjectKey, u64>,
    /// Per Service, its ports with a Local policy and no local endpoints
    /// (internal, external), for kube-proxy's no-local-endpoints gauge.
    no_local: HashMap<ObjectKey, (u64, u64)>,
    /// Decoding failures already reported.
    reported_undecodable: HashSet<crate::k8s::tracker::Undecodable>,
    /// Health-check node ports and local endpoint counts per Service.
    hc_ports: BTreeMap<model::ServiceName, u16>,
    hc_counts: BTreeMap<model::ServiceName, usize>,
    hc_dirty: bool,
    /// When the agent started: older trigger times are not its latency.
    started: SystemTime,
    /// The verification resync's position: Services left to recompute and
    /// the last frontend checked against the kernel.
    verify_services: Vec<ObjectKey>,
    verify_after: Option<crate::model::desired::FrontendKey>,
    /// The verification walked every programmed frontend (and compared the
    /// whole maps) in this cycle.
    verify_walked: bool,
    verifying: bool,
    /// Set once the initial sync is done.
    synced_once: bool,
    /// Pod addresses registered for source validation.
    pod_source_count: usize,
    /// Entries of the LRU maps, counted now and then.
    lru_fill: BTreeMap<&'static str, u64>,
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

pub fn run(opts: RunOptions) -> Result<(), RunError> {
    let term = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(signal, Arc::clone(&term))
            .map_err(|source| RunError::Signals { source })?;
    }
    // kube-proxy's health timeout is twice its sync period.
    let metrics = Arc::new(Metrics::new(opts.resync_interval * 2));
    raise_fd_limit();
    // The agent's one async runtime: the API client's watches, the health
    // and metrics endpoints and every health-check node port, as tasks on
    // two worker threads (the sync loop stays on this thread).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("netlb-rt")
        .enable_all()
        .build()
        .map_err(|source| RunError::Runtime { source })?;
    let mut _servers = Vec::new();
    if let Some(addr) = opts.health_addr {
        let server = http::serve_health(runtime.handle(), addr, Arc::clone(&metrics))?;
        log::info!(
            "serving /healthz, /livez and /readyz on {}",
            server.local_addr()
        );
        _servers.push(server);
    }
    if let Some(addr) = opts.metrics_addr {
        let server = http::serve_metrics(runtime.handle(), addr, Arc::clone(&metrics))?;
        log::info!("serving /metrics and /proxyMode on {}", server.local_addr());
        _servers.push(server);
    }

    let mut addresses = node_addresses(&opts).map_err(|source| RunError::Interfaces { source })?;
    log::info!(
        "node ports on {:?}, north-south SNAT to {:?}",
        addresses.nodeport,
        addresses.snat
    );
    let host_netns_cookie = match &opts.cgroup_root {
        Some(_) => Some(loader::netns_cookie().map_err(|source| RunError::Interfaces { source })?),
        None => None,
    };
    let mut settings = DatapathSettings {
        snat_addr: addresses.snat,
        host_netns_cookie,
        ..opts.datapath.clone()
    };
    check_nat_ports(&settings)?;
    if let Some(cgroup) = &opts.cgroup_root {
        loader::check_cgroup2(cgroup)?;
    }
    let plan = plan_layout(&opts.pin_dir, &opts.sizes)?;
    let mut ebpf = loader::load(&LoadOptions {
        pin_dir: Some(opts.pin_dir.clone()),
        settings: settings.clone(),
        sizes: opts.sizes,
    })?;
    let mut attacher = Attacher::new(&opts.pin_dir)?;
    let migrated = match &plan.from {
        Some(from) => {
            migrate_from(from, &plan.target, &mut ebpf, &mut attacher, &opts)?;
            true
        }
        None => false,
    };
    for stale in &plan.stale {
        match migrate::remove_generation(stale) {
            Ok(()) => log::info!("removed the unused maps of {}", stale.dir.display()),
            Err(e) => log::warn!("cannot remove {}: {e}", stale.dir.display()),
        }
    }
    let mut dataplane = AyaDataplane::from_ebpf(&mut ebpf)?;
    // (Until the trie is filled the flag finds nothing in it: every address
    // passes, as before the flag.)
    dataplane.set_service_cidrs(&settings.service_cidrs)?;
    let observer = Observer::from_ebpf(&mut ebpf)?;
    let mut pod_sources = PodSources::from_ebpf(&mut ebpf)?;
    // The datapath's own collector: idle while ours sweeps, reclaiming
    // expired connections whenever this agent is away.
    // The heartbeat (every second) also keeps the socket-level programs
    // off pod sockets: pods are served by their interfaces' TC programs,
    // which this agent attaches as interfaces appear.
    let mut heartbeat = Heartbeat::from_ebpf(&mut ebpf)?;
    heartbeat.configure(opts.gc_interval)?;
    loader::arm_ct_gc(&mut ebpf)?;
    let conntrack = KernelConntrack::from_ebpf(&mut ebpf)?;
    let sweep_metrics = Arc::clone(&metrics);
    let collector = Collector::spawn(
        Box::new(conntrack),
        opts.gc_interval,
        Box::new(move |report| sweep_metrics.conntrack_swept(report)),
    )
    .map_err(|source| RunError::Threads { source })?;
    let mut syncer =
        Syncer::adopt_with_limits(&dataplane, opts.sizes.backends, opts.sizes.rev_nat)?;
    syncer.set_aux_capacity(opts.sizes.source_ranges, opts.sizes.affinity_matches);
    let lru_maps = crate::datapath::dataplane::kernel::LruCounter::open(&plan.target);
    let mut last_lru_count: Option<Instant> = None;
    if syncer.frontend_count() > 0 {
        log::info!(
            "loaded datapath, maps pinned in {}; adopted {} frontends and {} backends an earlier agent programmed",
            plan.target.display(),
            syncer.frontend_count(),
            syncer.backend_count(),
        );
    } else {
        log::info!("loaded datapath, maps pinned in {}", plan.target.display());
    }
    if let Some(cgroup) = opts.cgroup_root.as_ref().filter(|_| !migrated) {
        loader::attach_cgroup(&mut ebpf, &opts.pin_dir, cgroup)?;
        log::info!(
            "socket-level load balancing for processes in {} (this network namespace only)",
            cgroup.display()
        );
    }
    let health_metrics = Arc::clone(&metrics);
    let mut health = ServiceHealthServer::new(
        runtime.handle().clone(),
        Arc::new(move || health_metrics.proxy_healthy()),
    );

    let (tx, rx) = mpsc::channel::<()>();
    let socket = ifaces::link_socket().map_err(|source| RunError::Interfaces { source })?;
    // Set by the netlink watcher: interfaces or routes changed.
    let links_changed = Arc::new(AtomicBool::new(true));
    let _watcher = ifaces::spawn_watcher(socket, Arc::clone(&links_changed), tx.clone())
        .map_err(|source| RunError::Interfaces { source })?;
    let mut last_links = Instant::now();
    let store = Arc::new(Mutex::new(ObjectStore::default()));
    let mut source = match &opts.source {
        SourceConfig::Manifests(dir) => Source::Manifests {
            dir: dir.clone(),
            fingerprint: None,
        },
        SourceConfig::Api(cfg) => Source::Api(ApiSource::start(
            runtime.handle(),
            cfg.clone(),
            Arc::clone(&store),
            tx.clone(),
        )?),
    };
    drop(tx);

    let mut pipeline = Pipeline {
        store: Arc::clone(&store),
        syncer,
        node: opts.node.clone(),
        reported_issues: HashMap::new(),
        no_local: HashMap::new(),
        reported_undecodable: HashSet::new(),
        hc_ports: BTreeMap::new(),
        hc_counts: BTreeMap::new(),
        hc_dirty: false,
        started: SystemTime::now(),
        verify_services: Vec::new(),
        verify_after: None,
        verify_walked: false,
        pod_source_count: 0,
        lru_fill: BTreeMap::new(),
        verifying: false,
        synced_once: false,
    };
    let mut dirty = true;
    let mut waiting_logged = false;
    let mut last_sync: Option<Instant> = None;
    let mut failures = 0u32;
    // Frontends whose writes failed are retried on their own schedule
    // (backing off), so that they never hold other changes back.
    let mut retries = 0u32;
    let mut retry_at: Option<Instant> = None;
    let mut last_attempt: Option<Instant> = None;
    let mut last_counters = Instant::now();
    metrics.queued_update();

    while !term.load(Ordering::Relaxed) {
        // Interfaces and pod routes: on netlink events, and every second in
        // case a notification was lost.
        if links_changed.swap(false, Ordering::Relaxed)
            || last_links.elapsed() >= Duration::from_secs(1)
        {
            last_links = Instant::now();
            reconcile_interfaces(&mut ebpf, &mut attacher, &opts.pod_ifaces, &opts.netdevs);
            reconcile_pod_sources(&mut pod_sources, &opts.pod_ifaces);
            pipeline.pod_source_count = pod_sources.len();
        }
        // The LRUs fill by design; their fill level is a figure for the
        // metrics, counted every ten seconds.
        if last_lru_count.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            last_lru_count = Some(Instant::now());
            pipeline.lru_fill = lru_maps.count();
        }
        if let Some((generation, report)) = collector.take_report() {
            let freed =
                pipeline
                    .syncer
                    .reclaim(&report.backend_ids, &report.rev_nat_indices, generation);
            if freed > 0 {
                log::debug!("{freed} backend ids / rev-NAT indices free for reuse");
            }
        }
        match source.poll(&store, &metrics) {
            Ok(true) => {
                dirty = true;
                metrics.queued_update();
            }
            Ok(false) => {}
            Err(e) => log::warn!("{e}: {}", error_chain(&e)),
        }
        if let Source::Api(api) = &source {
            metrics.set_watch_errors(api.stats.errors.load(Ordering::Relaxed));
            metrics.set_source_outage(api.health.outage_since());
            let failing = lock(&api.failing);
            metrics.set_source_failures(failing.values().cloned().collect());
        }
        // The verification resync starts every resync interval and then
        // runs a chunk per turn.
        let resync_due = pipeline.synced_once
            && !pipeline.verifying
            && last_sync.is_none_or(|t| t.elapsed() >= opts.resync_interval);
        if resync_due {
            pipeline.verifying = true;
            pipeline.verify_services = lock(&store).service_keys();
            pipeline.verify_services.reverse();
            pipeline.verify_after = None;
            pipeline.verify_walked = false;
        }
        if pipeline.verifying || retry_at.is_some_and(|t| Instant::now() >= t) {
            dirty = true;
        }
        let rate_ok = last_sync.is_none_or(|t| t.elapsed() >= opts.min_sync_interval)
            && last_attempt.is_none_or(|t| t.elapsed() >= backoff_delay(failures));
        if dirty && rate_ok {
            last_attempt = Some(Instant::now());
            match node_addresses(&opts) {
                Ok(now) if now != addresses => {
                    // Node ports on other addresses: every Service again.
                    lock(&store).mark_all();
                    log::info!(
                        "node addresses changed: node ports on {:?}, north-south SNAT to {:?}",
                        now.nodeport,
                        now.snat
                    );
                    let next = DatapathSettings {
                        snat_addr: now.snat,
                        ..settings.clone()
                    };
                    match loader::write_config(&mut ebpf, next.to_config()) {
                        Ok(()) => {
                            addresses = now;
                            settings = next;
                        }
                        Err(e) => log::error!("{e}: {}", error_chain(&e)),
                    }
                }
                Ok(_) => {}
                Err(e) => log::error!("cannot read the node's addresses: {e}"),
            }
            match sync_step(
                &opts,
                &mut pipeline,
                &mut dataplane,
                &metrics,
                &addresses,
                &mut health,
                &collector,
            ) {
                Ok(Step::Idle) => {
                    // Nothing to program: neither a sync for the metrics
                    // nor a reason to hold the next change back.
                    dirty = pipeline.verifying;
                    failures = 0;
                    metrics.nothing_pending();
                }
                Ok(Step::Synced) => {
                    dirty = pipeline.verifying;
                    failures = 0;
                    if pipeline.syncer.has_pending() {
                        retries += 1;
                        retry_at = Some(Instant::now() + backoff_delay(retries));
                    } else {
                        retries = 0;
                        retry_at = None;
                    }
                    if !pipeline.verifying {
                        last_sync = Some(Instant::now());
                    }
                    if !pipeline.synced_once {
                        pipeline.synced_once = true;
                        metrics.initial_sync_complete();
                        last_sync = Some(Instant::now());
                        log::info!("initial sync complete");
                    }
                }
                Ok(Step::NotSynced) => {
                    // The watch event that completes the initial lists sets
                    // `dirty` again; no need to poll until then.
                    dirty = false;
                    if !waiting_logged {
                        waiting_logged = true;
                        log::info!("waiting for Services and EndpointSlices to sync");
                    }
                }
                Err(e) => {
                    failures += 1;
                    metrics.sync_failed(e.reason());
                    log::error!(
                        "sync failed (retry in {:?}): {e}: {}",
                        backoff_delay(failures),
                        error_chain(&e)
                    );
                }
            }
        }
        if last_counters.elapsed() >= Duration::from_secs(1) {
            last_counters = Instant::now();
            let now = crate::datapath::dataplane::monotonic_now_s();
            if let Err(e) = heartbeat.beat(now, collector.last_sweep_s()) {
                log::warn!("heartbeat: {e}");
            }
            match observer.stats() {
                Ok(counters) => metrics.set_datapath_counters(counters),
                Err(e) => log::warn!("{e}"),
            }
        }

        // Wake on link or watch events, after a tick to poll manifests, or
        // as soon as a pending (rate-limited) sync is allowed, like
        // kube-proxy's BoundedFrequencyRunner.
        let mut wait = Duration::from_millis(100);
        if dirty {
            let since_sync = last_sync.map(|t| t.elapsed()).unwrap_or(Duration::MAX);
            let since_attempt = last_attempt.map(|t| t.elapsed()).unwrap_or(Duration::MAX);
            wait = wait
                .min(opts.min_sync_interval.saturating_sub(since_sync))
                .min(backoff_delay(failures).saturating_sub(since_attempt))
                .max(Duration::from_millis(1));
        }
        match rx.recv_timeout(wait) {
            Ok(()) => {
                while rx.try_recv().is_ok() {}
                dirty = true;
                metrics.queued_update();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    log::info!("shutting down");
    drop(source);
    drop(collector);
    // Pods created while no agent runs get no TC programs: from now on the
    // socket-level programs serve them (the kernel's collector takes over
    // conntrack after two periods).
    if let Err(e) = heartbeat.leave() {
        log::warn!("heartbeat: {e}");
    }
    if opts.cleanup_on_exit {
        let attached: Vec<String> = attacher.attached().map(str::to_owned).collect();
        for ifname in attached {
            if let Err(e) = attacher.detach(&ifname) {
                log::warn!("{e}");
            }
        }
        if let Err(e) = loader::detach_cgroup(&opts.pin_dir) {
            log::warn!("{e}");
        }
        drop(dataplane);
        drop(observer);
        drop(ebpf);
        loader::remove_pins(&opts.pin_dir)?;
        log::info!("removed {}", opts.pin_dir.display());
    } else {
        log::info!(
            "programs stay attached and maps pinned in {}; the next agent adopts them",
            opts.pin_dir.display()
        );
    }
    Ok(())
}

/// Which pinned generation of maps this agent uses, and what becomes of
/// the others (see `layout` and `migrate`).
#[derive(Debug)]
struct LayoutPlan {
    /// This build's generation for its sizes.
    target: PathBuf,
    /// The live generation to carry over, when it is another one.
    from: Option<layout::Generation>,
    /// Generations nothing uses (left by a crash or an earlier migration).
    stale: Vec<layout::Generation>,
}

fn plan_layout(pin_dir: &std::path::Path, sizes: &MapSizes) -> Result<LayoutPlan, RunError> {
    let generations = layout::pinned_generations(pin_dir);
    let target = layout::generation_dir(pin_dir, sizes);
    let live = layout::live_generation(pin_dir, &generations);
    let from = match live {
        Some(g) if g.dir != target => Some(g),
        Some(_) => None,
        // Nothing attached: the newest other generation's state, if this
        // build has none yet.
        None if !target.exists() => generations
            .iter()
            .filter(|g| g.dir != target)
            .max_by_key(|g| (g.version, g.dir.clone()))
            .cloned(),
        None => None,
    };
    if from.is_some() && target.exists() {
        // Half built by an agent that crashed before switching to it: the
        // live generation is still the other one. Start over.
        log::warn!(
            "removing {} (a migration into it was interrupted)",
            target.display()
        );
        std::fs::remove_dir_all(&target).map_err(|source| {
            RunError::Loader(loader::LoaderError::Remove {
                path: target.clone(),
                source,
            })
        })?;
    }
    let stale = generations
        .into_iter()
        .filter(|g| g.dir != target && Some(&g.dir) != from.as_ref().map(|f| &f.dir))
        .collect();
    Ok(LayoutPlan {
        target,
        from,
        stale,
    })
}

/// Switches the programs of a migration (see `migrate::Switch`).
struct Switcher<'a> {
    ebpf: &'a mut aya::Ebpf,
    attacher: &'a mut Attacher,
    opts: &'a RunOptions,
}

impl migrate::Switch for Switcher<'_> {
    type Error = loader::LoaderError;

    fn sockets(&mut self) -> Result<(), Self::Error> {
        match &self.opts.cgroup_root {
            Some(cgroup) => loader::attach_cgroup(self.ebpf, &self.opts.pin_dir, cgroup),
            // The old socket programs would keep the old (frozen) maps.
            None => loader::detach_cgroup(&self.opts.pin_dir),
        }
    }

    fn tc(&mut self) -> Result<(), Self::Error> {
        let present = present_interfaces(&self.opts.pod_ifaces, &self.opts.netdevs)
            .map_err(|source| loader::LoaderError::Interfaces { source })?;
        let n = self.attacher.switch_all(self.ebpf, &present)?;
        log::info!("switched {n} TC hooks to the new maps");
        Ok(())
    }
}

/// Carries the live generation `from` over into this agent's maps and
/// switches the programs to them; on failure the old datapath keeps
/// running and this agent's half-built maps go.
fn migrate_from(
    from: &layout::Generation,
    target: &std::path::Path,
    ebpf: &mut aya::Ebpf,
    attacher: &mut Attacher,
    opts: &RunOptions,
) -> Result<(), RunError> {
    log::info!(
        "the pinned maps in {} are of layout {} or other sizes: carrying their state over into {}",
        from.dir.display(),
        from.version,
        target.display()
    );
    let mut switcher = Switcher {
        ebpf,
        attacher,
        opts,
    };
    match migrate::run(from, target, &mut switcher) {
        Ok(report) => {
            log::info!(
                "migrated in {:.0?}: copied {:?}; {} frontends frozen for {:.0?}, {} live entries copied again, {} added after the switch",
                report.took,
                report.copied,
                report.frozen,
                report.frozen_for,
                report.recopied,
                report.late
            );
            if let Err(e) = migrate::remove_generation(from) {
                log::warn!("cannot remove {}: {e}", from.dir.display());
            }
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(target);
            Err(RunError::Migrate(Box::new(e)))
        }
    }
}

/// What a sync step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The sources have not both listed yet: nothing may be programmed.
    NotSynced,
    /// Nothing changed (an event about nothing the model uses): no sync.
    Idle,
    Synced,
}

/// One sync step.
#[tracing::instrument(name = "sync", level = "debug", skip_all)]
fn sync_step(
    opts: &RunOptions,
    p: &mut Pipeline,
    dataplane: &mut AyaDataplane,
    metrics: &Metrics,
    addresses: &NodeAddresses,
    health: &mut ServiceHealthServer,
    collector: &Collector,
) -> Result<Step, SyncStepError> {
    let started = Instant::now();
    let mut verify_turn = false;
    let (changes, undecodable) = {
        let mut store = lock(&p.store);
        if !store.synced() {
            return Ok(Step::NotSynced);
        }
        let mut changes = store.take_changes();
        // The verification resync: a chunk of Services recomputed (and so
        // compared with what is programmed), in a turn without changes of
        // its own, so that a change waits for one small chunk at most.
        if p.verifying && changes.services.is_empty() && changes.node.is_none() {
            verify_turn = true;
            let n = VERIFY_CHUNK.min(p.verify_services.len());
            let chunk: Vec<ObjectKey> = p.verify_services.split_off(p.verify_services.len() - n);
            store.mark_services(chunk);
            let verified = store.take_changes();
            changes.services = verified.services;
            changes.triggers.extend(verified.triggers);
        }
        if let Some(node) = &changes.node {
            metrics.set_node_eligible(!node.deleting);
            let zone = opts
                .node
                .zone
                .clone()
                .or_else(|| node.zone.as_ref().map(|z| z.to_string()));
            if zone != p.node.zone {
                // Topology hints depend on the zone: every Service again.
                log::info!("this node's zone: {}", zone.as_deref().unwrap_or("(none)"));
                p.node.zone = zone;
                changes = store.widen_to_all(changes);
            }
        }
        let undecodable = store.undecodable_objects();
        (changes, undecodable)
    };
    // Each undecodable object state once.
    let now_undecodable: HashSet<crate::k8s::tracker::Undecodable> =
        undecodable.into_iter().collect();
    for u in now_undecodable.difference(&p.reported_undecodable) {
        log::warn!(
            "{} {}/{}: {}",
            u.kind.name(),
            u.namespace,
            u.name,
            u.message
        );
        metrics.invalid_object("undecodable");
    }
    p.reported_undecodable = now_undecodable;
    if p.synced_once
        && changes.services.is_empty()
        && changes.node.is_none()
        && !verify_turn
        && !p.syncer.has_pending()
    {
        return Ok(Step::Idle);
    }
    let recomputed = changes.services.len();
    for change in changes.services {
        let (mut model, desired) = desired::for_change(&change, &p.node, &addresses.nodeport);
        let (hc_ports, hc_counts) = model.health_checks();
        let name = (change.key.0.to_string(), change.key.1.to_string());
        if p.hc_ports.get(&name) != hc_ports.get(&name) {
            match hc_ports.get(&name) {
                Some(port) => p.hc_ports.insert(name.clone(), *port),
                None => p.hc_ports.remove(&name),
            };
            p.hc_dirty = true;
        }
        if p.hc_counts.get(&name) != hc_counts.get(&name) {
            match hc_counts.get(&name) {
                Some(count) => p.hc_counts.insert(name.clone(), *count),
                None => p.hc_counts.remove(&name),
            };
            p.hc_dirty = true;
        }
        collector.update_service(&change.key, desired.udp_serving);
        p.syncer.update_service(&change.key, desired.frontends);
        // Addresses another Service holds too: reported with this one's
        // issues (kube-proxy's first-come rule decides which is served).
        model.issues.extend(
            p.syncer
                .conflicts_of(&change.key)
                .into_iter()
                .map(|message| model::ModelIssue {
                    kind: "Service",
                    namespace: change.key.0.to_string(),
                    name: change.key.1.to_string(),
                    message,
                }),
        );
        report_issues(p, &change.key, &model, metrics);
        match no_local_endpoints(&model) {
            (0, 0) => p.no_local.remove(&change.key),
            counts => p.no_local.insert(change.key.clone(), counts),
        };
    }
    if verify_turn {
        if !p.verify_walked {
            verify_kernel(p, dataplane, metrics);
        }
        if p.verify_services.is_empty() && p.verify_walked {
            p.verifying = false;
            // Once per resync interval: forget names nothing uses any more
            // (deleted Services and slices).
            lock(&p.store).shrink();
        }
    }
    // kube-proxy's full sync: the first, and the verification resync's
    // turns (every Service recomputed over the resync interval); partial
    // otherwise.
    let full_sync = verify_turn || !p.synced_once;
    let report = p.syncer.apply(dataplane).map_err(SyncStepError::Sync)?;
    if recomputed >= 1_000 && !verify_turn {
        release_free_memory();
    }
    collector.publish(p.syncer.generation());
    if report.failed > 0 {
        metrics.sync_failed("frontend");
        log::warn!(
            "{} frontends could not be written ({} for want of ids); they are retried",
            report.failed,
            report.exhausted
        );
    }
    // Health-check node ports follow what was just programmed, as
    // kube-proxy updates its service health server after each sync.
    if std::mem::take(&mut p.hc_dirty) {
        for e in health.sync_services(&p.hc_ports) {
            log::warn!("{e}: {}", error_chain(&e));
        }
        health.sync_endpoints(&p.hc_counts);
    }
    let now = SystemTime::now();
    for trigger in changes.triggers {
        if trigger > p.started {
            metrics.programming_latency(now.duration_since(trigger).unwrap_or_default());
        }
    }
    let (internal, external) = p
        .no_local
        .values()
        .fold((0, 0), |acc, c| (acc.0 + c.0, acc.1 + c.1));
    metrics.set_no_local_endpoints(internal, external);
    metrics.synced(
        started.elapsed(),
        full_sync,
        crate::serve::metrics::SyncCounts {
            frontends: report.frontends as u64,
            backends: report.backends as u64,
            writes: report.writes as u64,
            deletes: report.deletes as u64,
            recomputed: recomputed as u64,
        },
    );
    report_fill(
        opts,
        &p.syncer,
        p.pod_source_count,
        metrics.conntrack_entries(),
        &p.lru_fill,
        metrics,
    );
    if report.writes + report.deletes > 0 {
        log::info!(
            "synced {} frontends, {} backends: {recomputed} Services recomputed, {} writes, {} deletes in {:?}",
            report.frontends,
            report.backends,
            report.writes,
            report.deletes,
            started.elapsed()
        );
    }
    Ok(Step::Synced)
}

/// Hands the heap's free pages back to the kernel after a large step (the
/// initial sync, a relist): decoding a list leaves tens of megabytes free
/// but resident in glibc's arenas, which would otherwise count as the
/// agent's RSS for good.
fn release_free_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointers; it only returns free memory.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A Service's ports with a Local traffic policy and no local endpoint to
/// use (ready, or serving while terminating), internal and external, as
/// kube-proxy counts them for `sync_proxy_rules_no_local_endpoints_total`.
fn no_local_endpoints(model: &Model) -> (u64, u64) {
    let mut counts = (0, 0);
    for port in model.ports.values() {
        let local = port
            .endpoints
            .iter()
            .any(|e| e.is_local && (e.ready || (e.serving && e.terminating)));
        if local {
            continue;
        }
        if port.internal_policy_local {
            counts.0 += 1;
        }
        if port.external_policy_local && port.externally_accessible() {
            counts.1 += 1;
        }
    }
    counts
}

/// Logs and counts a Service's model issues when they differ from those
/// last reported for it: once per state of its objects, not once per sync.
fn report_issues(p: &mut Pipeline, key: &ObjectKey, model: &Model, metrics: &Metrics) {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for issue in &model.issues {
        issue.to_string().hash(&mut hasher);
    }
    let fingerprint = hasher.finish();
    if model.issues.is_empty() {
        p.reported_issues.remove(key);
        return;
    }
    if p.reported_issues.insert(key.clone(), fingerprint) == Some(fingerprint) {
        return;
    }
    for issue in &model.issues {
        tracing::warn!(
            kind = issue.kind,
            namespace = %issue.namespace,
            service = %issue.name,
            "{issue}"
        );
        metrics.invalid_object("model");
    }
}

/// The verification resync's comparison of what is programmed with what
/// the kernel holds: a chunk of frontends per turn (every slot, the
/// backends they name, their rev-NAT entries), and once the walk is over
/// the whole maps (entries nothing owns, missing auxiliary entries and
/// cluster IPs). What differs is repaired by the sync that follows, and
/// counted by map (`netlb_sync_repairs_total`).
fn verify_kernel(p: &mut Pipeline, dataplane: &AyaDataplane, metrics: &Metrics) {
    let mut repairs = match p
        .syncer
        .verify_chunk(dataplane, p.verify_after, VERIFY_CHUNK)
    {
        Ok((last, repairs)) => {
            p.verify_after = last;
            repairs
        }
        Err(e) => {
            log::warn!("verification: {e}: {}", error_chain(&e));
            return;
        }
    };
    if p.verify_after.is_none() {
        p.verify_walked = true;
        match crate::datapath::dataplane::Dataplane::dump(dataplane) {
            Ok(maps) => {
                for (map, n) in p.syncer.verify_all(&maps) {
                    *repairs.entry(map).or_default() += n;
                }
            }
            Err(e) => log::warn!("verification: {e}: {}", error_chain(&e)),
        }
    }
    if !repairs.is_empty() {
        log::warn!(
            "verification: the kernel holds entries that differ from what this agent programmed, repairing them: {repairs:?}"
        );
        for (map, n) in repairs {
            metrics.repaired(map, n);
        }
    }
}

/// Reports every map's fill level (`netlb_map_entries`,
/// `netlb_map_capacity`) and warns once a map is 90 % full (and again each
/// time it grows past a further 1 %): the maps the syncer fills from its
/// mirror, the pod sources, conntrack (at the last sweep) and the LRUs
/// (counted now and then, `lru`).
fn report_fill(
    opts: &RunOptions,
    syncer: &Syncer,
    pod_sources: usize,
    conntrack: Option<u64>,
    lru: &BTreeMap<&'static str, u64>,
    metrics: &Metrics,
) {
    use netlb_common::map_names;
    let mut used: BTreeMap<&'static str, u64> = [
        (map_names::BACKENDS, syncer.backend_count()),
        (map_names::SERVICES, syncer.service_entry_count()),
        (map_names::REV_NAT, syncer.rev_nat_count()),
        (
            map_names::SOURCE_RANGES,
            syncer.aux_count(crate::datapath::sync::AuxKind::SourceRange),
        ),
        (
            map_names::AFFINITY_MATCH,
            syncer.aux_count(crate::datapath::sync::AuxKind::AffinityMatch),
        ),
        (map_names::CLUSTER_IPS, syncer.cluster_ip_count()),
        (map_names::SERVICE_CIDRS, opts.datapath.service_cidrs.len()),
        (map_names::POD_SOURCES, pod_sources),
    ]
    .into_iter()
    .map(|(m, n)| (m, n as u64))
    .collect();
    if let Some(n) = conntrack {
        used.insert(map_names::CONNTRACK, n);
    }
    used.extend(lru.iter().map(|(m, n)| (*m, *n)));
    for (map, size) in opts.sizes.by_map() {
        let Some(n) = used.get(map).copied() else {
            continue;
        };
        metrics.set_map_fill(map, n, u64::from(size));
        let percent = (n * 100 / u64::from(size.max(1))) as u8;
        // LRUs are full by design once used: only a note in the metrics.
        let lru_map = lru.contains_key(map);
        if !lru_map && metrics.fill_crossed(map, percent) {
            log::warn!(
                "{map}: {n} of {size} entries in use ({percent} %); raise its --max-* flag before it fills"
            );
        }
    }
    for kind in crate::datapath::sync::AuxKind::ALL {
        let (now, ever) = syncer.degraded(kind);
        metrics.set_degraded(kind.map(), now as u64, ever);
    }
}

/// Keeps the datapath's pod source addresses in line with the node's host
/// routes through pod interfaces.
fn reconcile_pod_sources(pod_sources: &mut PodSources, pods: &[NamePattern]) {
    match ifaces::pod_routes(pods) {
        Ok(want) => {
            if let Err(e) = pod_sources.sync(&want) {
                log::warn!("{e}: {}", error_chain(&e));
            }
        }
        Err(e) => log::warn!("cannot read the node's routes: {e}"),
    }
}

/// Keeps the NAT port range from colliding with the node's own ports: it
/// is reserved where it overlaps the kernel's ephemeral ports (or the agent
/// refuses to start, before anything is loaded), and an overlap with the
/// NodePort range is warned about.
fn check_nat_ports(settings: &DatapathSettings) -> Result<(), RunError> {
    let nat = settings.nat_ports;
    if nat.overlaps(&settings.node_ports) {
        log::warn!(
            "the NAT port range {nat} overlaps the NodePort range {}: replies to NATed flows and new node port connections may be confused",
            settings.node_ports
        );
    }
    match crate::config::reserve_nat_ports(nat)? {
        crate::config::NatPortReservation::NotNeeded => {}
        crate::config::NatPortReservation::AlreadyReserved(range) => {
            log::info!("NAT ports {range} are reserved (net.ipv4.ip_local_reserved_ports)")
        }
        crate::config::NatPortReservation::Reserved(range) => log::info!(
            "reserved NAT ports {range} in net.ipv4.ip_local_reserved_ports: they overlap the kernel's ephemeral ports, which host connections must not get"
        ),
    }
    Ok(())
}

/// The interfaces that get programs, by role (a name matching both kinds
/// of pattern is an uplink).
fn present_interfaces(
    pods: &[NamePattern],
    netdevs: &[NamePattern],
) -> std::io::Result<BTreeMap<String, Role>> {
    Ok(ifaces::interface_names()?
        .into_iter()
        .filter_map(|name| {
            let role = if netdevs.iter().any(|p| p.matches(&name)) {
                Role::Netdev
            } else if pods.iter().any(|p| p.matches(&name)) {
                Role::Pod
            } else {
                return None;
            };
            Some((name, role))
        })
        .collect())
}

/// Attaches to new matching interfaces (uplinks get the netdev programs,
/// pod interfaces the pod programs; a name matching both is an uplink) and
/// drops the pins of vanished ones.
#[tracing::instrument(name = "attach", level = "debug", skip_all)]
fn reconcile_interfaces(
    ebpf: &mut aya::Ebpf,
    attacher: &mut Attacher,
    pods: &[NamePattern],
    netdevs: &[NamePattern],
) {
    let present = match present_interfaces(pods, netdevs) {
        Ok(present) => present,
        Err(e) => {
            log::error!("cannot list interfaces: {e}");
            return;
        }
    };
    for (ifname, role) in &present {
        if attacher.role(ifname) != Some(*role) {
            match attacher.attach(ebpf, ifname, *role) {
                Ok(()) => log::info!("attached to {ifname} ({role:?})"),
                // The interface may have gone between listing and attaching.
                Err(e) => log::warn!("{e}: {}", error_chain(&e)),
            }
        }
    }
    let stale: BTreeSet<String> = attacher
        .pinned_interfaces()
        .into_iter()
        .chain(attacher.attached().map(str::to_owned))
        .filter(|name| !present.contains_key(name))
        .collect();
    for ifname in stale {
        match attacher.detach(&ifname) {
            Ok(()) => log::info!("detached from {ifname} (gone or no longer matching)"),
            Err(e) => log::warn!("{e}"),
        }
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    parts.join(": ")
}
