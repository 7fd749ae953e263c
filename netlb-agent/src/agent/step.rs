//! One sync step, in kube-proxy's shape: the changes the sources recorded
//! are taken from the store, the changed Services alone are recomputed
//! (model, desired frontends), the syncer writes the minimal diff, and
//! what was programmed is reported (health-check node ports, metrics,
//! logs). A verification resync rides along in bounded chunks.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    hash::{Hash as _, Hasher as _},
    sync::{Arc, Mutex},
    time::{Instant, SystemTime},
};

use super::{RunOptions, interfaces::NodeAddresses, lock};
use crate::{
    datapath::{
        conntrack::Collector,
        dataplane::{Dataplane, kernel::AyaDataplane},
        sync::{AuxKind, SyncError, SyncReport, Syncer},
    },
    k8s::{
        manifests,
        tracker::{Changes, ObjectKey, ObjectStore, ServiceChange, Undecodable},
    },
    model::{self, Model, NodeContext, desired},
    serve::{
        healthcheck::ServiceHealthServer,
        metrics::{Metrics, SyncCounts},
    },
    support::error_chain,
};

/// Services recomputed (and frontends compared with the kernel) per loop
/// turn by the verification resync: a few milliseconds of work, the longest
/// a change can wait behind it.
const VERIFY_CHUNK: usize = 250;

#[derive(Debug, thiserror::Error)]
pub(super) enum SyncStepError {
    #[error("reading manifests failed")]
    Manifests(#[source] manifests::ManifestError),
    #[error("programming the datapath failed")]
    Sync(#[source] SyncError),
}

impl SyncStepError {
    /// Metric label.
    pub(super) fn reason(&self) -> &'static str {
        match self {
            Self::Manifests(_) => "source",
            Self::Sync(_) => "datapath",
        }
    }
}

/// What a sync step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Step {
    /// The sources have not both listed yet: nothing may be programmed.
    NotSynced,
    /// Nothing changed (an event about nothing the model uses): no sync.
    Idle,
    Synced,
}

/// What the sync step needs from the rest of the agent.
pub(super) struct StepContext<'a> {
    pub opts: &'a RunOptions,
    pub dataplane: &'a mut AyaDataplane,
    pub metrics: &'a Metrics,
    pub addresses: &'a NodeAddresses,
    pub health: &'a mut ServiceHealthServer,
    pub collector: &'a Collector,
}

/// The state the sync step carries from one step to the next.
pub(super) struct Pipeline {
    pub store: Arc<Mutex<ObjectStore>>,
    pub syncer: Syncer,
    node: NodeContext,
    /// Model issues last reported per Service (a hash of them): each is
    /// logged and counted once per state of its objects.
    reported_issues: HashMap<ObjectKey, u64>,
    /// Per Service, its ports with a Local policy and no local endpoints
    /// (internal, external), for kube-proxy's no-local-endpoints gauge.
    no_local: HashMap<ObjectKey, (u64, u64)>,
    /// Decoding failures already reported.
    reported_undecodable: HashSet<Undecodable>,
    /// Health-check node ports and local endpoint counts per Service.
    hc_ports: BTreeMap<model::ServiceName, u16>,
    hc_counts: BTreeMap<model::ServiceName, usize>,
    hc_dirty: bool,
    /// When the agent started: older trigger times are not its latency.
    started: SystemTime,
    /// The verification resync's position: Services left to recompute and
    /// the last frontend checked against the kernel.
    verify_services: Vec<ObjectKey>,
    verify_after: Option<desired::FrontendKey>,
    /// The verification walked every programmed frontend (and compared the
    /// whole maps) in this cycle.
    verify_walked: bool,
    pub verifying: bool,
    /// Set once the initial sync is done.
    pub synced_once: bool,
    /// Pod addresses registered for source validation.
    pub pod_source_count: usize,
    /// Entries of the LRU maps, counted now and then.
    pub lru_fill: BTreeMap<&'static str, u64>,
}

impl Pipeline {
    pub(super) fn new(store: Arc<Mutex<ObjectStore>>, syncer: Syncer, node: NodeContext) -> Self {
        Self {
            store,
            syncer,
            node,
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
            verifying: false,
            synced_once: false,
            pod_source_count: 0,
            lru_fill: BTreeMap::new(),
        }
    }

    /// Starts a verification resync: every Service recomputed, every
    /// programmed frontend compared with the kernel, a chunk per turn.
    pub(super) fn start_verification(&mut self) {
        self.verifying = true;
        self.verify_services = lock(&self.store).service_keys();
        self.verify_services.reverse();
        self.verify_after = None;
        self.verify_walked = false;
    }

    /// One sync step.
    #[tracing::instrument(name = "sync", level = "debug", skip_all)]
    pub(super) fn step(&mut self, cx: StepContext<'_>) -> Result<Step, SyncStepError> {
        let started = Instant::now();
        let Some((changes, verify_turn)) = self.take_changes(cx.opts, cx.metrics) else {
            return Ok(Step::NotSynced);
        };
        if self.synced_once
            && changes.services.is_empty()
            && changes.node.is_none()
            && !verify_turn
            && !self.syncer.has_pending()
        {
            return Ok(Step::Idle);
        }
        let recomputed = changes.services.len();
        for change in changes.services {
            self.recompute(&change, cx.addresses, cx.collector, cx.metrics);
        }
        if verify_turn {
            self.verify_turn(cx.dataplane, cx.metrics);
        }
        // kube-proxy's full sync: the first, and the verification resync's
        // turns (every Service recomputed over the resync interval); partial
        // otherwise.
        let full_sync = verify_turn || !self.synced_once;
        let report = self
            .syncer
            .apply(cx.dataplane)
            .map_err(SyncStepError::Sync)?;
        if recomputed >= 1_000 && !verify_turn {
            release_free_memory();
        }
        cx.collector.publish(self.syncer.generation());
        self.report(cx.metrics, cx.health, &report, &changes.triggers);
        let counts = SyncCounts {
            frontends: report.frontends as u64,
            backends: report.backends as u64,
            writes: report.writes as u64,
            deletes: report.deletes as u64,
            recomputed: recomputed as u64,
        };
        cx.metrics.synced(started.elapsed(), full_sync, counts);
        report_fill(cx.opts, self, cx.metrics);
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

    /// The changes the sources recorded (widened to every Service when the
    /// node's zone changed), or a chunk of the verification resync in a
    /// turn without changes of its own; `None` until the sources have
    /// both listed.
    fn take_changes(&mut self, opts: &RunOptions, metrics: &Metrics) -> Option<(Changes, bool)> {
        let mut verify_turn = false;
        let (changes, undecodable) = {
            let mut store = lock(&self.store);
            if !store.synced() {
                return None;
            }
            let mut changes = store.take_changes();
            // A chunk of Services recomputed (and so compared with what is
            // programmed), so that a change waits for one small chunk at
            // most.
            if self.verifying && changes.services.is_empty() && changes.node.is_none() {
                verify_turn = true;
                let n = VERIFY_CHUNK.min(self.verify_services.len());
                let chunk = self
                    .verify_services
                    .split_off(self.verify_services.len() - n);
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
                if zone != self.node.zone {
                    // Topology hints depend on the zone: every Service again.
                    log::info!("this node's zone: {}", zone.as_deref().unwrap_or("(none)"));
                    self.node.zone = zone;
                    changes = store.widen_to_all(changes);
                }
            }
            (changes, store.undecodable_objects())
        };
        self.report_undecodable(undecodable, metrics);
        Some((changes, verify_turn))
    }

    /// Logs and counts each undecodable object state once.
    fn report_undecodable(&mut self, undecodable: Vec<Undecodable>, metrics: &Metrics) {
        let now: HashSet<Undecodable> = undecodable.into_iter().collect();
        for u in now.difference(&self.reported_undecodable) {
            log::warn!(
                "{} {}/{}: {}",
                u.kind.name(),
                u.namespace,
                u.name,
                u.message
            );
            metrics.invalid_object("undecodable");
        }
        self.reported_undecodable = now;
    }

    /// Recomputes one changed Service: its model and desired frontends go
    /// to the syncer and the collector, its health check to the health
    /// server, its issues to the log.
    fn recompute(
        &mut self,
        change: &ServiceChange,
        addresses: &NodeAddresses,
        collector: &Collector,
        metrics: &Metrics,
    ) {
        let (mut model, desired) = desired::for_change(change, &self.node, &addresses.nodeport);
        self.update_health_check(&change.key, &model);
        collector.update_service(&change.key, desired.udp_serving);
        self.syncer.update_service(&change.key, desired.frontends);
        // Addresses another Service holds too: reported with this one's
        // issues (kube-proxy's first-come rule decides which is served).
        model.issues.extend(
            self.syncer
                .conflicts_of(&change.key)
                .into_iter()
                .map(|message| model::ModelIssue {
                    kind: "Service",
                    namespace: change.key.0.to_string(),
                    name: change.key.1.to_string(),
                    message,
                }),
        );
        self.report_issues(&change.key, &model, metrics);
        match no_local_endpoints(&model) {
            (0, 0) => self.no_local.remove(&change.key),
            counts => self.no_local.insert(change.key.clone(), counts),
        };
    }

    /// A Service's health-check node port and local endpoint count, for
    /// the health server after the sync.
    fn update_health_check(&mut self, key: &ObjectKey, model: &Model) {
        let (hc_ports, hc_counts) = model.health_checks();
        let name = (key.0.to_string(), key.1.to_string());
        if self.hc_ports.get(&name) != hc_ports.get(&name) {
            match hc_ports.get(&name) {
                Some(port) => self.hc_ports.insert(name.clone(), *port),
                None => self.hc_ports.remove(&name),
            };
            self.hc_dirty = true;
        }
        if self.hc_counts.get(&name) != hc_counts.get(&name) {
            match hc_counts.get(&name) {
                Some(count) => self.hc_counts.insert(name.clone(), *count),
                None => self.hc_counts.remove(&name),
            };
            self.hc_dirty = true;
        }
    }

    /// The verification's comparison with the kernel for this turn; once
    /// every Service was recomputed and every frontend compared, the
    /// resync is over.
    fn verify_turn(&mut self, dataplane: &AyaDataplane, metrics: &Metrics) {
        if !self.verify_walked {
            self.verify_kernel(dataplane, metrics);
        }
        if self.verify_services.is_empty() && self.verify_walked {
            self.verifying = false;
            // Once per resync interval: forget names nothing uses any more
            // (deleted Services and slices).
            lock(&self.store).shrink();
        }
    }

    /// Reports what a sync programmed: frontends left for a retry, the
    /// health-check node ports, programming latency and the no-local
    /// endpoints gauge.
    fn report(
        &mut self,
        metrics: &Metrics,
        health: &mut ServiceHealthServer,
        report: &SyncReport,
        triggers: &[SystemTime],
    ) {
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
        if std::mem::take(&mut self.hc_dirty) {
            for e in health.sync_services(&self.hc_ports) {
                log::warn!("{e}: {}", error_chain(&e));
            }
            health.sync_endpoints(&self.hc_counts);
        }
        let now = SystemTime::now();
        for trigger in triggers {
            if *trigger > self.started {
                metrics.programming_latency(now.duration_since(*trigger).unwrap_or_default());
            }
        }
        let (internal, external) = self
            .no_local
            .values()
            .fold((0, 0), |acc, c| (acc.0 + c.0, acc.1 + c.1));
        metrics.set_no_local_endpoints(internal, external);
    }

    /// Logs and counts a Service's model issues when they differ from those
    /// last reported for it: once per state of its objects, not once per
    /// sync.
    fn report_issues(&mut self, key: &ObjectKey, model: &Model, metrics: &Metrics) {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        for issue in &model.issues {
            issue.to_string().hash(&mut hasher);
        }
        let fingerprint = hasher.finish();
        if model.issues.is_empty() {
            self.reported_issues.remove(key);
            return;
        }
        if self.reported_issues.insert(key.clone(), fingerprint) == Some(fingerprint) {
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

    /// The verification resync's comparison of what is programmed with
    /// what the kernel holds: a chunk of frontends per turn (every slot,
    /// the backends they name, their rev-NAT entries), and once the walk is
    /// over the whole maps (entries nothing owns, missing auxiliary entries
    /// and cluster IPs). What differs is repaired by the sync that follows,
    /// and counted by map (`netlb_sync_repairs_total`).
    fn verify_kernel(&mut self, dataplane: &AyaDataplane, metrics: &Metrics) {
        let mut repairs = match self
            .syncer
            .verify_chunk(dataplane, self.verify_after, VERIFY_CHUNK)
        {
            Ok((last, repairs)) => {
                self.verify_after = last;
                repairs
            }
            Err(e) => {
                log::warn!("verification: {e}: {}", error_chain(&e));
                return;
            }
        };
        if self.verify_after.is_none() {
            self.verify_walked = true;
            match Dataplane::dump(dataplane) {
                Ok(maps) => {
                    for (map, n) in self.syncer.verify_all(&maps) {
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

/// Reports every map's fill level (`netlb_map_entries`,
/// `netlb_map_capacity`) and warns once a map is 90 % full (and again each
/// time it grows past a further 1 %): the maps the syncer fills from its
/// mirror, the pod sources, conntrack (at the last sweep) and the LRUs
/// (counted now and then).
fn report_fill(opts: &RunOptions, p: &Pipeline, metrics: &Metrics) {
    use netlb_common::map_names;
    let syncer = &p.syncer;
    let mut used: BTreeMap<&'static str, u64> = [
        (map_names::BACKENDS, syncer.backend_count()),
        (map_names::SERVICES, syncer.service_entry_count()),
        (map_names::REV_NAT, syncer.rev_nat_count()),
        (
            map_names::SOURCE_RANGES,
            syncer.aux_count(AuxKind::SourceRange),
        ),
        (
            map_names::AFFINITY_MATCH,
            syncer.aux_count(AuxKind::AffinityMatch),
        ),
        (map_names::CLUSTER_IPS, syncer.cluster_ip_count()),
        (map_names::SERVICE_CIDRS, opts.datapath.service_cidrs.len()),
        (map_names::POD_SOURCES, p.pod_source_count),
    ]
    .into_iter()
    .map(|(m, n)| (m, n as u64))
    .collect();
    if let Some(n) = metrics.conntrack_entries() {
        used.insert(map_names::CONNTRACK, n);
    }
    used.extend(p.lru_fill.iter().map(|(m, n)| (*m, *n)));
    for (map, size) in opts.sizes.by_map() {
        let Some(n) = used.get(map).copied() else {
            continue;
        };
        metrics.set_map_fill(map, n, u64::from(size));
        let percent = (n * 100 / u64::from(size.max(1))) as u8;
        // LRUs are full by design once used: only a note in the metrics.
        let lru_map = p.lru_fill.contains_key(map);
        if !lru_map && metrics.fill_crossed(map, percent) {
            log::warn!(
                "{map}: {n} of {size} entries in use ({percent} %); raise its --max-* flag before it fills"
            );
        }
    }
    for kind in AuxKind::ALL {
        let (now, ever) = syncer.degraded(kind);
        metrics.set_degraded(kind.map(), now as u64, ever);
    }
}
