//! The agent's main loop, in kube-proxy's shape: sources only record changes
//! and wake the loop; one sync step reads a whole snapshot, computes the
//! desired state and applies the minimal diff, at most every
//! `min_sync_interval`, at least every `resync_interval`, retrying failures
//! with backoff; interfaces are attached as they appear.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    str::FromStr as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};

use crate::{
    config::DatapathSettings,
    conntrack::Collector,
    dataplane::kernel::{AyaDataplane, KernelConntrack, Observer, PodSources},
    desired,
    healthcheck::ServiceHealthServer,
    http, ifaces,
    ifaces::{Ipv4Cidr, NamePattern},
    loader::{self, Attacher, LoadOptions, MapSizes, Role},
    metrics::Metrics,
    model::{self, NodeContext},
    source::{
        kube::{ApiConfig, ApiSource},
        manifests,
    },
    sync::Syncer,
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
    Dataplane(#[from] crate::dataplane::DataplaneError),
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    #[error(transparent)]
    Api(#[from] crate::source::kube::ApiSourceError),
    #[error(transparent)]
    Listen(#[from] http::ListenError),
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
    #[error("failed to install signal handlers")]
    Signals {
        #[source]
        source: std::io::Error,
    },
}

/// Objects of one consistent read of a source.
struct Objects {
    services: Vec<Arc<Service>>,
    endpoint_slices: Vec<Arc<EndpointSlice>>,
    node: Option<Arc<Node>>,
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
    Sync(#[source] crate::sync::SyncError),
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
    /// Whether the source changed since the last call (manifests are polled;
    /// the API source wakes the loop through the channel instead).
    fn poll_changed(&mut self) -> bool {
        match self {
            Self::Manifests { dir, fingerprint } => match manifests::fingerprint(dir) {
                Ok(fp) if Some(fp) != *fingerprint => {
                    *fingerprint = Some(fp);
                    true
                }
                Ok(_) => false,
                Err(e) => {
                    log::warn!("cannot read {}: {e}", dir.display());
                    false
                }
            },
            Self::Api(_) => false,
        }
    }

    /// `Ok(None)`: not synced yet, do not program anything.
    fn objects(&self, metrics: &Metrics) -> Result<Option<Objects>, SyncStepError> {
        match self {
            Self::Manifests { dir, .. } => {
                let snapshot = manifests::load_dir(dir).map_err(SyncStepError::Manifests)?;
                for error in &snapshot.errors {
                    log::warn!("ignored manifest object: {error}");
                    metrics.invalid_object("manifest");
                }
                for allocation in &snapshot.allocations {
                    log::debug!("allocated {allocation}");
                }
                Ok(Some(Objects {
                    services: snapshot.services.into_iter().map(Arc::new).collect(),
                    endpoint_slices: snapshot.endpoint_slices.into_iter().map(Arc::new).collect(),
                    node: None,
                }))
            }
            Self::Api(api) => {
                metrics.set_watch_errors(api.stats.errors.load(Ordering::Relaxed));
                Ok(api.snapshot().map(|s| Objects {
                    services: s.services,
                    endpoint_slices: s.endpoint_slices,
                    node: s.node,
                }))
            }
        }
    }
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
    let mut nodeport: Vec<Ipv4Addr> = if opts.nodeport_cidrs.is_empty() {
        uplinks.iter().map(|a| a.address).collect()
    } else {
        all.iter()
            .map(|a| a.address)
            .filter(|ip| opts.nodeport_cidrs.iter().any(|c| c.contains(*ip)))
            .collect()
    };
    nodeport.sort();
    nodeport.dedup();
    Ok(NodeAddresses {
        nodeport,
        snat: opts.node_ip.or(uplinks.first().map(|a| a.address)),
    })
}

/// Exponential backoff for failed syncs, capped at 30 s.
fn backoff_delay(failures: u32) -> Duration {
    if failures == 0 {
        return Duration::ZERO;
    }
    Duration::from_millis(100u64 << failures.min(8)).min(Duration::from_secs(30))
}

const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";
const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// Network programming latency bookkeeping, as kube-proxy computes it: for
/// every EndpointSlice that changed since the last successful sync and whose
/// trigger-time annotation is newer than the agent's start, the time from
/// that trigger to the end of the sync that programmed it.
struct ProgrammingLatency {
    started: SystemTime,
    seen: BTreeMap<(String, String), String>,
}

impl ProgrammingLatency {
    fn pending(&self, slices: &[Arc<EndpointSlice>]) -> Vec<SystemTime> {
        let mut out = Vec::new();
        for slice in slices {
            let meta = &slice.metadata;
            let key = (
                meta.namespace.clone().unwrap_or_default(),
                meta.name.clone().unwrap_or_default(),
            );
            let version = meta.resource_version.clone().unwrap_or_default();
            if self.seen.get(&key) == Some(&version) {
                continue;
            }
            let trigger = meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(TRIGGER_TIME_ANNOTATION))
                .and_then(|t| k8s_openapi::jiff::Timestamp::from_str(t).ok())
                .and_then(|t| {
                    let nanos = t.as_nanosecond();
                    (nanos > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64))
                });
            if let Some(trigger) = trigger
                && trigger > self.started
            {
                out.push(trigger);
            }
        }
        out
    }

    fn record(&mut self, slices: &[Arc<EndpointSlice>]) {
        self.seen = slices
            .iter()
            .map(|s| {
                (
                    (
                        s.metadata.namespace.clone().unwrap_or_default(),
                        s.metadata.name.clone().unwrap_or_default(),
                    ),
                    s.metadata.resource_version.clone().unwrap_or_default(),
                )
            })
            .collect();
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
    if let Some(addr) = opts.health_addr {
        let bound = http::serve(addr, Arc::clone(&metrics))?;
        log::info!("serving /healthz and /livez on {bound}");
    }
    if let Some(addr) = opts.metrics_addr
        && Some(addr) != opts.health_addr
    {
        let bound = http::serve(addr, Arc::clone(&metrics))?;
        log::info!("serving /metrics on {bound}");
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
    warn_about_nat_ports(&settings);
    let mut ebpf = loader::load(&LoadOptions {
        pin_dir: Some(opts.pin_dir.clone()),
        settings: settings.clone(),
        sizes: opts.sizes,
    })?;
    let mut dataplane = AyaDataplane::from_ebpf(&mut ebpf)?;
    let observer = Observer::from_ebpf(&mut ebpf)?;
    let mut pod_sources = PodSources::from_ebpf(&mut ebpf)?;
    let collector = Collector::spawn(
        Box::new(KernelConntrack::from_ebpf(&mut ebpf)?),
        opts.gc_interval,
        Arc::clone(&metrics),
    )
    .map_err(|source| RunError::Threads { source })?;
    let mut syncer =
        Syncer::adopt_with_limits(&dataplane, opts.sizes.backends, opts.sizes.rev_nat)?;
    log::info!(
        "loaded datapath, maps pinned in {}; adopted what an earlier agent programmed",
        opts.pin_dir.display(),
    );
    let mut attacher = Attacher::new(&opts.pin_dir)?;
    if let Some(cgroup) = &opts.cgroup_root {
        loader::attach_cgroup(&mut ebpf, &opts.pin_dir, cgroup)?;
        log::info!(
            "socket-level load balancing for processes in {} (this network namespace only)",
            cgroup.display()
        );
    }
    let health_metrics = Arc::clone(&metrics);
    let mut health =
        ServiceHealthServer::new(Arc::new(move || health_metrics.health(false).healthy));

    let (tx, rx) = mpsc::channel::<()>();
    let socket = ifaces::link_socket().map_err(|source| RunError::Interfaces { source })?;
    // Set by the netlink watcher: interfaces or routes changed.
    let links_changed = Arc::new(AtomicBool::new(true));
    let _watcher = ifaces::spawn_watcher(socket, Arc::clone(&links_changed), tx.clone())
        .map_err(|source| RunError::Interfaces { source })?;
    let mut last_links = Instant::now();
    let mut source = match &opts.source {
        SourceConfig::Manifests(dir) => Source::Manifests {
            dir: dir.clone(),
            fingerprint: None,
        },
        SourceConfig::Api(cfg) => Source::Api(ApiSource::start(cfg.clone(), tx.clone())?),
    };
    drop(tx);

    let mut latency = ProgrammingLatency {
        started: SystemTime::now(),
        seen: BTreeMap::new(),
    };
    let mut dirty = true;
    let mut synced_once = false;
    let mut waiting_logged = false;
    let mut last_sync: Option<Instant> = None;
    let mut failures = 0u32;
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
        }
        if let Some((generation, report)) = collector.take_report() {
            let freed = syncer.reclaim(&report.backend_ids, &report.rev_nat_indices, generation);
            if freed > 0 {
                log::debug!("{freed} backend ids / rev-NAT indices free for reuse");
            }
        }
        if source.poll_changed() {
            dirty = true;
            metrics.queued_update();
        }
        let resync_due = last_sync.is_none_or(|t| t.elapsed() >= opts.resync_interval);
        let rate_ok = last_sync.is_none_or(|t| t.elapsed() >= opts.min_sync_interval)
            && last_attempt.is_none_or(|t| t.elapsed() >= backoff_delay(failures));
        if (dirty || resync_due) && rate_ok {
            last_attempt = Some(Instant::now());
            match node_addresses(&opts) {
                Ok(now) if now != addresses => {
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
                &source,
                &mut syncer,
                &mut dataplane,
                &metrics,
                &mut latency,
                &addresses,
                &mut health,
                &collector,
            ) {
                Ok(true) => {
                    dirty = false;
                    failures = 0;
                    last_sync = Some(Instant::now());
                    if !synced_once {
                        synced_once = true;
                        log::info!("initial sync complete");
                    }
                }
                Ok(false) => {
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

/// One sync: `Ok(false)` when the source has not synced yet.
#[expect(
    clippy::too_many_arguments,
    reason = "the loop's state, borrowed piecewise; a struct would only rename it"
)]
fn sync_step(
    opts: &RunOptions,
    source: &Source,
    syncer: &mut Syncer,
    dataplane: &mut AyaDataplane,
    metrics: &Metrics,
    latency: &mut ProgrammingLatency,
    addresses: &NodeAddresses,
    health: &mut ServiceHealthServer,
    collector: &Collector,
) -> Result<bool, SyncStepError> {
    let Some(objects) = source.objects(metrics)? else {
        return Ok(false);
    };
    let mut node = opts.node.clone();
    if let Some(n) = &objects.node {
        if node.zone.is_none() {
            node.zone = n
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ZONE_LABEL))
                .cloned();
        }
        let deleting = n.metadata.deletion_timestamp.is_some();
        let tainted = n
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        metrics.set_node_eligible(!deleting && !tainted);
    }
    let started = Instant::now();
    let triggers = latency.pending(&objects.endpoint_slices);
    let model = model::build(&objects.services, &objects.endpoint_slices, &node);
    for issue in &model.issues {
        log::warn!("{issue}");
        metrics.invalid_object("model");
    }
    let mut desired = desired::build(&model, &addresses.nodeport);
    let report = syncer
        .sync(dataplane, &desired)
        .map_err(SyncStepError::Sync)?;
    collector.publish(
        std::mem::take(&mut desired.udp_serving),
        syncer.generation(),
    );
    // Health-check node ports follow what was just programmed, as
    // kube-proxy updates its service health server after each sync.
    let (hc_services, hc_counts) = model.health_checks();
    for e in health.sync_services(&hc_services) {
        log::warn!("{e}: {}", error_chain(&e));
    }
    health.sync_endpoints(&hc_counts);
    let now = SystemTime::now();
    for trigger in triggers {
        metrics.programming_latency(now.duration_since(trigger).unwrap_or_default());
    }
    latency.record(&objects.endpoint_slices);
    metrics.synced(
        started.elapsed(),
        report.frontends as u64,
        report.backends as u64,
    );
    if report.writes + report.deletes > 0 {
        log::info!(
            "synced {} frontends, {} backends: {} writes, {} deletes in {:?}",
            report.frontends,
            report.backends,
            report.writes,
            report.deletes,
            report.duration
        );
    }
    Ok(true)
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

/// Warns when the NAT port range could hand out ports the node uses
/// otherwise.
fn warn_about_nat_ports(settings: &DatapathSettings) {
    let nat = settings.nat_ports;
    if nat.overlaps(&settings.node_ports) {
        log::warn!(
            "the NAT port range {nat} overlaps the NodePort range {}: replies to NATed flows and new node port connections may be confused",
            settings.node_ports
        );
    }
    if let Some(ephemeral) = crate::config::ephemeral_ports()
        && nat.overlaps(&ephemeral)
    {
        log::warn!(
            "the NAT port range {nat} overlaps the kernel's ephemeral ports {ephemeral} (net.ipv4.ip_local_port_range): a host connection to a backend may collide with a NATed flow"
        );
    }
}

/// Attaches to new matching interfaces (uplinks get the netdev programs,
/// pod interfaces the pod programs; a name matching both is an uplink) and
/// drops the pins of vanished ones.
fn reconcile_interfaces(
    ebpf: &mut aya::Ebpf,
    attacher: &mut Attacher,
    pods: &[NamePattern],
    netdevs: &[NamePattern],
) {
    let names = match ifaces::interface_names() {
        Ok(names) => names,
        Err(e) => {
            log::error!("cannot list interfaces: {e}");
            return;
        }
    };
    let present: BTreeMap<String, Role> = names
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
        .collect();
    for (ifname, role) in &present {
        if attacher.role(ifname) != Some(*role) {
            match attacher.attach(ebpf, ifname, *role) {
                Ok(()) => log::info!("attached to {ifname} ({role:?})"),
                // The interface may have gone between listing and attaching.
                Err(e) => log::warn!("{e}: {}", error_chain(&e)),
            }
        }
    }
    let stale: Vec<String> = attacher
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
