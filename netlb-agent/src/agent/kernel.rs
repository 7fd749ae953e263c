//! The agent's hold on the kernel: the loaded programs and pinned maps,
//! the attached interfaces, and the handles the loop uses (the dataplane
//! the syncer writes, counters, pod sources, the heartbeat).

use std::path::PathBuf;

use super::{
    RunError, RunOptions,
    interfaces::{NodeAddresses, node_addresses, reconcile_interfaces, reconcile_pod_sources},
    layout_plan::{migrate_from, plan_layout},
    lock,
};
use crate::{
    config::{self, DatapathSettings},
    datapath::{
        conntrack::Collector,
        dataplane::kernel::{
            AyaDataplane, Heartbeat, KernelConntrack, LruCounter, Observer, PodSources,
        },
        loader::{self, Attacher, LoadOptions},
        migrate,
        sync::Syncer,
    },
    k8s::tracker::ObjectStore,
    serve::metrics::Metrics,
    support::error_chain,
};

pub(super) struct Kernel {
    pub ebpf: aya::Ebpf,
    pub attacher: Attacher,
    pub dataplane: AyaDataplane,
    observer: Observer,
    pod_sources: PodSources,
    heartbeat: Heartbeat,
    lru_maps: LruCounter,
    settings: DatapathSettings,
    pub addresses: NodeAddresses,
    /// This build's generation of maps.
    maps: PathBuf,
    /// The programs were switched over from another generation (its
    /// socket-level programs included).
    migrated: bool,
}

impl Kernel {
    /// Loads the datapath on this node's addresses: this build's maps
    /// (adopted, or carried over from another generation) and programs,
    /// and the in-kernel conntrack collector's timer. Returns the
    /// conntrack table for the agent's own collector.
    pub(super) fn load(opts: &RunOptions) -> Result<(Self, KernelConntrack), RunError> {
        let addresses = node_addresses(opts).map_err(|source| RunError::Interfaces { source })?;
        log::info!(
            "node ports on {:?}, north-south SNAT to {:?}",
            addresses.nodeport,
            addresses.snat
        );
        let host_netns_cookie = match &opts.cgroup_root {
            Some(_) => {
                Some(loader::netns_cookie().map_err(|source| RunError::Interfaces { source })?)
            }
            None => None,
        };
        let settings = DatapathSettings {
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
                migrate_from(from, &plan.target, &mut ebpf, &mut attacher, opts)?;
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
        // (Until the trie is filled the flag finds nothing in it: every
        // address passes, as before the flag.)
        dataplane.set_service_cidrs(&settings.service_cidrs)?;
        let observer = Observer::from_ebpf(&mut ebpf)?;
        let pod_sources = PodSources::from_ebpf(&mut ebpf)?;
        // The datapath's own collector: idle while ours sweeps, reclaiming
        // expired connections whenever this agent is away. The heartbeat
        // (every second) also keeps the socket-level programs off pod
        // sockets: pods are served by their interfaces' TC programs, which
        // this agent attaches as interfaces appear.
        let mut heartbeat = Heartbeat::from_ebpf(&mut ebpf)?;
        heartbeat.configure(opts.gc_interval)?;
        loader::arm_ct_gc(&mut ebpf)?;
        let conntrack = KernelConntrack::from_ebpf(&mut ebpf)?;
        let kernel = Self {
            ebpf,
            attacher,
            dataplane,
            observer,
            pod_sources,
            heartbeat,
            lru_maps: LruCounter::open(&plan.target),
            settings,
            addresses,
            maps: plan.target,
            migrated,
        };
        Ok((kernel, conntrack))
    }

    /// The syncer's mirror of what an earlier agent programmed (nothing on
    /// a fresh node).
    pub(super) fn adopt(&self, opts: &RunOptions) -> Result<Syncer, RunError> {
        let mut syncer =
            Syncer::adopt_with_limits(&self.dataplane, opts.sizes.backends, opts.sizes.rev_nat)?;
        syncer.set_aux_capacity(opts.sizes.source_ranges, opts.sizes.affinity_matches);
        if syncer.frontend_count() > 0 {
            log::info!(
                "loaded datapath, maps pinned in {}; adopted {} frontends and {} backends an earlier agent programmed",
                self.maps.display(),
                syncer.frontend_count(),
                syncer.backend_count(),
            );
        } else {
            log::info!("loaded datapath, maps pinned in {}", self.maps.display());
        }
        Ok(syncer)
    }

    /// Attaches the socket-level programs to `--cgroup-root` (a migration
    /// switched them already).
    pub(super) fn attach_sockets(&mut self, opts: &RunOptions) -> Result<(), RunError> {
        if let Some(cgroup) = opts.cgroup_root.as_ref().filter(|_| !self.migrated) {
            loader::attach_cgroup(&mut self.ebpf, &opts.pin_dir, cgroup)?;
            log::info!(
                "socket-level load balancing for processes in {} (this network namespace only)",
                cgroup.display()
            );
        }
        Ok(())
    }

    /// Attaches to the interfaces that match and keeps the pod source
    /// addresses in line with the node's routes; returns how many pod
    /// addresses are registered.
    pub(super) fn reconcile_links(&mut self, opts: &RunOptions) -> usize {
        reconcile_interfaces(
            &mut self.ebpf,
            &mut self.attacher,
            &opts.pod_ifaces,
            &opts.netdevs,
        );
        reconcile_pod_sources(&mut self.pod_sources, &opts.pod_ifaces);
        self.pod_sources.len()
    }

    /// Entries of the LRU maps (their fill is a figure for the metrics).
    pub(super) fn lru_fill(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.lru_maps.count()
    }

    /// Follows the node's addresses: node ports on other addresses mean
    /// every Service again, another SNAT address a new configuration.
    pub(super) fn follow_addresses(
        &mut self,
        opts: &RunOptions,
        store: &std::sync::Mutex<ObjectStore>,
    ) {
        match node_addresses(opts) {
            Ok(now) if now != self.addresses => {
                lock(store).mark_all();
                log::info!(
                    "node addresses changed: node ports on {:?}, north-south SNAT to {:?}",
                    now.nodeport,
                    now.snat
                );
                let next = DatapathSettings {
                    snat_addr: now.snat,
                    ..self.settings.clone()
                };
                match loader::write_config(&mut self.ebpf, next.to_config()) {
                    Ok(()) => {
                        self.addresses = now;
                        self.settings = next;
                    }
                    Err(e) => log::error!("{e}: {}", error_chain(&e)),
                }
            }
            Ok(_) => {}
            Err(e) => log::error!("cannot read the node's addresses: {e}"),
        }
    }

    /// Every second: the heartbeat (with the agent's collector's last
    /// sweep) and the datapath's counters.
    pub(super) fn beat(&mut self, collector: &Collector, metrics: &Metrics) {
        let now = crate::datapath::dataplane::monotonic_now_s();
        if let Err(e) = self.heartbeat.beat(now, collector.last_sweep_s()) {
            log::warn!("heartbeat: {e}");
        }
        match self.observer.stats() {
            Ok(counters) => metrics.set_datapath_counters(counters),
            Err(e) => log::warn!("{e}"),
        }
    }

    /// The agent leaves: pods created from now on are served by the
    /// socket-level programs (the kernel's collector takes over conntrack
    /// after two periods). With `cleanup_on_exit` everything is detached
    /// and unpinned; by default it all stays for the next agent.
    pub(super) fn leave(mut self, opts: &RunOptions) -> Result<(), RunError> {
        if let Err(e) = self.heartbeat.leave() {
            log::warn!("heartbeat: {e}");
        }
        if !opts.cleanup_on_exit {
            log::info!(
                "programs stay attached and maps pinned in {}; the next agent adopts them",
                opts.pin_dir.display()
            );
            return Ok(());
        }
        let attached: Vec<String> = self.attacher.attached().map(str::to_owned).collect();
        for ifname in attached {
            if let Err(e) = self.attacher.detach(&ifname) {
                log::warn!("{e}");
            }
        }
        if let Err(e) = loader::detach_cgroup(&opts.pin_dir) {
            log::warn!("{e}");
        }
        drop(self.dataplane);
        drop(self.observer);
        drop(self.ebpf);
        loader::remove_pins(&opts.pin_dir)?;
        log::info!("removed {}", opts.pin_dir.display());
        Ok(())
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
    match config::reserve_nat_ports(nat)? {
        config::NatPortReservation::NotNeeded => {}
        config::NatPortReservation::AlreadyReserved(range) => {
            log::info!("NAT ports {range} are reserved (net.ipv4.ip_local_reserved_ports)")
        }
        config::NatPortReservation::Reserved(range) => log::info!(
            "reserved NAT ports {range} in net.ipv4.ip_local_reserved_ports: they overlap the kernel's ephemeral ports, which host connections must not get"
        ),
    }
    Ok(())
}
