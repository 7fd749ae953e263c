//! The diff-based sync, incremental: the sync step hands the syncer the
//! desired frontends of each Service that changed
//! ([`Syncer::update_service`]); the syncer remembers what every Service
//! wants and which frontends changed, and [`Syncer::apply`] writes the
//! minimal set of map entries for those frontends only, so the cost of a
//! change depends on the changed Service, not on the cluster. Writes go in
//! batches (`BPF_MAP_UPDATE_BATCH`) and in make-before-break order across
//! all changed frontends, so the datapath never sees a frontend whose slots,
//! backends or rev-NAT entry are missing:
//!
//! 1. new or changed backends;
//! 2. new rev-NAT entries;
//! 3. backend slots of changed frontends, then their slot 0 (count, flags),
//!    then the slots past the new counts;
//! 4. removed frontends: slot 0 first, then their slots;
//! 5. rev-NAT entries and backends no programmed frontend uses any more
//!    (reference counts).
//!
//! A frontend two Services claim belongs to the first by namespace/name;
//! when it lets go, the next one gets it. Backend ids (per backend address)
//! and rev-NAT indices (per frontend address and port) are stable: a
//! backend keeps its slot while it stays, a removed one's slot is filled by
//! moving the last slot into it (one write), and [`Syncer::adopt`] rebuilds
//! everything from the maps, so a restarted agent keeps the same ids and
//! rewrites nothing that is already right. A frontend whose writes fail is
//! left for a retry of its own; the rest of the sync completes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

// Fast hashing for the per-sync sets and maps (ids and addresses, no
// untrusted keys): a Service with 10,000 endpoints is diffed in well under
// a millisecond.
use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};

use netlb_common::{
    AffinityFrontend, AffinityMatchKey, BackendValue, RevNatValue, ServiceKey, ServiceValue,
    SourceRangeKey, be_addr, from_be_addr, limits, svc_flags,
};

use crate::{
    datapath::dataplane::{
        Aux, BackendId, BatchError, Dataplane, DataplaneError, ProgrammedMaps, RevNatIndex,
    },
    k8s::tracker::ObjectKey,
    model::desired::{BackendAddr, DesiredFrontend, DesiredState, FrontendKey},
};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub writes: usize,
    pub deletes: usize,
    pub frontends: usize,
    pub backends: usize,
    /// Frontends whose writes failed (left for a retry).
    pub failed: usize,
    /// Frontends that could not be programmed for want of ids or indices.
    pub exhausted: usize,
    /// Deletions of unreferenced backends or rev-NAT entries that failed
    /// (retried by the next sync).
    pub failed_deletes: usize,
    pub duration: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Frontend {
    rev_nat: RevNatIndex,
    flags: u16,
    /// Backend id of slot `i + 1`; 0 = unknown (rewrite it).
    slots: Vec<BackendId>,
    /// The backends this frontend holds references to: its slots' ids, or,
    /// after a failed write left the kernel somewhere between two layouts,
    /// both layouts' ids (none may be deleted until it is rewritten).
    held: Vec<BackendId>,
    /// Its auxiliary entries as written, sorted (after a failure: every
    /// entry the kernel may hold).
    aux: Vec<Aux>,
    /// Session-affinity timeout in slot 0's `backend_id` (0 without).
    timeout: u32,
}

impl Frontend {
    fn new(rev_nat: RevNatIndex, flags: u16, slots: Vec<BackendId>) -> Self {
        let held = slots.clone();
        Self {
            rev_nat,
            flags,
            slots,
            held,
            aux: Vec::new(),
            timeout: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Backend {
    id: BackendId,
    flags: u8,
    /// Programmed frontends whose slots name it.
    refs: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct RevNat {
    index: RevNatIndex,
    /// Programmed frontends with this address and port.
    refs: u32,
}

fn service_key(key: &FrontendKey, slot: u16) -> ServiceKey {
    ServiceKey {
        address_be: be_addr(key.address),
        port_be: key.port.to_be(),
        backend_slot: slot,
        proto: key.proto,
        scope: key.scope,
        pad: [0; 2],
    }
}

/// The frontend a service map key belongs to.
fn frontend_of(key: &ServiceKey) -> FrontendKey {
    FrontendKey {
        address: from_be_addr(key.address_be),
        port: u16::from_be(key.port_be),
        proto: key.proto,
        scope: key.scope,
    }
}

/// A rev-NAT entry's map value.
fn rev_nat_value(address: Ipv4Addr, port: u16) -> RevNatValue {
    RevNatValue {
        address_be: be_addr(address),
        port_be: port.to_be(),
        pad: [0; 2],
    }
}

/// A backend's map value.
fn backend_value(addr: &BackendAddr, flags: u8) -> BackendValue {
    BackendValue {
        address_be: be_addr(addr.address),
        port_be: addr.port.to_be(),
        proto: addr.proto,
        flags,
    }
}

/// What a verification found different from the mirror and marked for
/// repair, by map name.
pub type Repairs = BTreeMap<&'static str, u64>;

/// Flags value marking a frontend whose programmed header is unknown.
const UNKNOWN_FLAGS: u16 = u16::MAX;

/// The new slot layout: backends that stay keep their slots; a removed
/// backend's slot goes to a new backend if there is one (one write), else
/// to the last slot's backend (one write, and the last slot is deleted),
/// never shifting the rest; remaining new backends are appended. Linear in
/// the number of slots.
fn next_slots(old: &[BackendId], wanted: &[BackendId]) -> Vec<BackendId> {
    let wanted_set: HashSet<BackendId> = wanted.iter().copied().collect();
    let mut kept: HashSet<BackendId> =
        HashSet::with_capacity_and_hasher(old.len(), Default::default());
    // Positions whose backend goes (or repeats).
    let mut holes: Vec<usize> = Vec::new();
    let mut slots = old.to_vec();
    for (i, id) in old.iter().enumerate() {
        if !(wanted_set.contains(id) && kept.insert(*id)) {
            holes.push(i);
        }
    }
    let mut fresh = wanted.iter().filter(|id| !kept.contains(id));
    let mut unfilled = Vec::new();
    for hole in holes {
        match fresh.next() {
            Some(id) => slots[hole] = *id,
            None => unfilled.push(hole),
        }
    }
    slots.extend(fresh.copied());
    // No new backend left: fill the remaining holes from the end, highest
    // hole first so that moved backends never land in a hole about to be
    // cut off.
    for hole in unfilled.into_iter().rev() {
        let last = slots.len() - 1;
        slots.swap(hole, last);
        slots.pop();
    }
    slots
}

/// The Service a desired frontend belongs to.
/// A frontend's desire in a Service's sorted list.
fn find<'a>(
    wanted: &'a [(FrontendKey, DesiredFrontend)],
    key: &FrontendKey,
) -> Option<&'a DesiredFrontend> {
    wanted
        .binary_search_by(|(k, _)| k.cmp(key))
        .ok()
        .map(|i| &wanted[i].1)
}

fn owner_of(fe: &DesiredFrontend) -> ObjectKey {
    (fe.service.namespace.clone(), fe.service.name.clone())
}

/// One planned write, with the frontend it is for (failures are charged
/// to it).
struct Planned<T> {
    frontend: FrontendKey,
    item: T,
}

/// Writes a planned batch; the items that fail are reported by their
/// frontend, the rest is written.
fn write_batch<T: Clone>(
    items: &[Planned<T>],
    write: &mut dyn FnMut(&[T]) -> Result<(), BatchError>,
    failed: &mut BTreeSet<FrontendKey>,
) -> usize {
    let values: Vec<T> = items.iter().map(|p| p.item.clone()).collect();
    let mut start = 0;
    let mut written = 0;
    while start < values.len() {
        match write(&values[start..]) {
            Ok(()) => {
                written += values.len() - start;
                break;
            }
            Err(e) => {
                let bad = start + e.index;
                log::warn!("{} for frontend {:?}: {}", e, items[bad].frontend, e.source);
                written += e.index;
                let frontend = items[bad].frontend;
                failed.insert(frontend);
                // The rest of that frontend's items are moot: it is redone
                // as a whole next time.
                start = bad + 1;
                while start < values.len() && items[start].frontend == frontend {
                    start += 1;
                }
            }
        }
    }
    written
}

/// The mirror of what is programmed, what every Service wants, and the id
/// allocators.
#[derive(Clone, Debug)]
pub struct Syncer {
    /// What each Service wants, as last given.
    /// (Sorted slices and vectors rather than B-trees: a Service has one or
    /// a few frontends, and a B-tree node takes room for eleven.)
    wanted: HashMap<ObjectKey, Box<[(FrontendKey, DesiredFrontend)]>>,
    /// The Services that want each frontend; the first owns it.
    claims: HashMap<FrontendKey, Vec<ObjectKey>>,
    /// What is programmed (ordered: the verification resync walks it in
    /// chunks by key).
    frontends: BTreeMap<FrontendKey, Frontend>,
    backends: HashMap<BackendAddr, Backend>,
    backend_addrs: HashMap<BackendId, BackendAddr>,
    rev_nat: HashMap<(Ipv4Addr, u16), RevNat>,
    backend_ids: Ids,
    rev_nat_ids: Ids,
    /// Entries found at adoption that belong to no frontend slot, and slots
    /// whose deletion failed.
    stray_slots: Vec<ServiceKey>,
    /// Auxiliary entries of no programmed frontend (adopted, or whose
    /// deletion failed), deleted by the next apply.
    stray_aux: Vec<Aux>,
    /// Auxiliary entries the programmed frontends hold, by kind
    /// ([`AuxKind`]), and the maps' sizes.
    aux_counts: [usize; 2],
    aux_capacity: [usize; 2],
    /// Frontends programmed without a feature whose map is full (by kind),
    /// retried until it fits.
    degraded: BTreeMap<FrontendKey, [bool; 2]>,
    /// Frontends that became degraded, by map, since the syncer started.
    degraded_total: [u64; 2],
    /// Backends and rev-NAT entries the mirror does not know (found by the
    /// verification), deleted by the next apply.
    stray_backends: Vec<BackendId>,
    stray_rev_nat: Vec<RevNatIndex>,
    /// Backends and rev-NAT entries the kernel holds differently from the
    /// mirror (found by the verification), rewritten by the next apply.
    rewrite_backends: BTreeSet<BackendId>,
    rewrite_rev_nat: BTreeSet<RevNatIndex>,
    /// Frontends to reconcile on the next [`apply`](Self::apply).
    dirty: BTreeSet<FrontendKey>,
    /// Backends and rev-NAT entries whose references dropped to zero (or
    /// that were adopted): the only candidates for deletion, so that a
    /// change never walks every backend.
    unreferenced_backends: BTreeSet<BackendAddr>,
    unreferenced_rev_nat: BTreeSet<(Ipv4Addr, u16)>,
    /// Sync steps run so far (ids released by one carry its number).
    generation: u64,
    /// Entries the programmed frontends take in the service map (slot 0
    /// and backend slots), kept as they change.
    service_entries: usize,
    /// How many wanted frontends carry each cluster IP; what `CLUSTER_IPS`
    /// holds; addresses whose entry may have to change.
    cluster_ip_refs: HashMap<Ipv4Addr, u32>,
    cluster_ips: HashSet<Ipv4Addr>,
    cluster_ips_dirty: BTreeSet<Ipv4Addr>,
}

impl Default for Syncer {
    fn default() -> Self {
        Self::new()
    }
}

impl Syncer {
    /// A syncer for empty maps of the default sizes.
    pub fn new() -> Self {
        Self::with_limits(limits::MAX_BACKENDS, limits::MAX_REV_NAT)
    }

    /// A syncer for empty maps with room for `max_backends` backends and
    /// `max_rev_nat` rev-NAT entries.
    pub fn with_limits(max_backends: u32, max_rev_nat: u32) -> Self {
        Self {
            wanted: HashMap::default(),
            claims: HashMap::default(),
            frontends: BTreeMap::new(),
            backends: HashMap::default(),
            backend_addrs: HashMap::default(),
            rev_nat: HashMap::default(),
            backend_ids: Ids::new(max_backends),
            rev_nat_ids: Ids::new(max_rev_nat),
            stray_slots: Vec::new(),
            aux_counts: [0; 2],
            aux_capacity: [
                limits::MAX_SOURCE_RANGES as usize,
                limits::MAX_AFFINITY_MATCH as usize,
            ],
            degraded: BTreeMap::new(),
            degraded_total: [0; 2],
            stray_backends: Vec::new(),
            stray_rev_nat: Vec::new(),
            rewrite_backends: BTreeSet::new(),
            rewrite_rev_nat: BTreeSet::new(),
            stray_aux: Vec::new(),
            dirty: BTreeSet::new(),
            unreferenced_backends: BTreeSet::new(),
            unreferenced_rev_nat: BTreeSet::new(),
            generation: 0,
            service_entries: 0,
            cluster_ip_refs: HashMap::default(),
            cluster_ips: HashSet::default(),
            cluster_ips_dirty: BTreeSet::new(),
        }
    }

    /// The number of the last sync step (0 before the first).
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Frees quarantined backend ids and rev-NAT indices that a conntrack
    /// sweep found unused, if the sweep started after sync step
    /// `generation` (so no connection created later can name them: they
    /// were out of the maps by then). Returns how many were freed.
    pub fn reclaim(
        &mut self,
        backend_ids: &BTreeSet<u32>,
        rev_nat_indices: &BTreeSet<u32>,
        generation: u64,
    ) -> usize {
        self.backend_ids.reclaim(backend_ids, generation)
            + self.rev_nat_ids.reclaim(rev_nat_indices, generation)
    }

    /// Ids and indices waiting for a sweep before they can be reused.
    pub fn quarantined(&self) -> usize {
        self.backend_ids.quarantine.len() + self.rev_nat_ids.quarantine.len()
    }

    /// Adds `delta` to the references of a frontend's backends and of its
    /// rev-NAT entry.
    fn add_refs(&mut self, key: &FrontendKey, f: &Frontend, delta: i64) {
        let mut seen = HashSet::with_capacity_and_hasher(f.held.len(), Default::default());
        for id in &f.held {
            if !seen.insert(*id) {
                continue;
            }
            if let Some(addr) = self.backend_addrs.get(id)
                && let Some(b) = self.backends.get_mut(addr)
            {
                b.refs = (b.refs as i64 + delta).max(0) as u32;
                if b.refs == 0 {
                    self.unreferenced_backends.insert(*addr);
                }
            }
        }
        let rev = (key.address, key.port);
        if let Some(r) = self.rev_nat.get_mut(&rev) {
            r.refs = (r.refs as i64 + delta).max(0) as u32;
            if r.refs == 0 {
                self.unreferenced_rev_nat.insert(rev);
            }
        }
    }

    /// Moves a frontend's references from its `old` layout to `new`. Slots
    /// keep their positions across a change (see [`next_slots`]), so the
    /// backends that come and go are those of the positions that differ:
    /// one endpoint changed in a Service of 10,000 costs a comparison of
    /// the two lists, not 20,000 reference updates.
    fn move_refs(&mut self, key: &FrontendKey, old: Option<&Frontend>, new: &Frontend) {
        let Some(old) = old else {
            self.add_refs(key, new, 1);
            return;
        };
        if old.held != old.slots || new.held != new.slots {
            // After a failure a frontend holds two layouts: count plainly.
            self.add_refs(key, old, -1);
            self.add_refs(key, new, 1);
            return;
        }
        let mut gone: Vec<BackendId> = Vec::new();
        let mut came: Vec<BackendId> = Vec::new();
        for i in 0..old.slots.len().max(new.slots.len()) {
            let (a, b) = (old.slots.get(i), new.slots.get(i));
            if a != b {
                gone.extend(a);
                came.extend(b);
            }
        }
        // Slots are unique within a frontend: a backend at a position
        // that did not change is in both layouts, so only the differing
        // positions matter; one that only moved is in both lists.
        let gone_set: HashSet<BackendId> = gone.iter().copied().collect();
        let came_set: HashSet<BackendId> = came.iter().copied().collect();
        for id in came.iter().filter(|id| !gone_set.contains(id)) {
            self.add_backend_ref(*id, 1);
        }
        for id in gone.iter().filter(|id| !came_set.contains(id)) {
            self.add_backend_ref(*id, -1);
        }
        // The rev-NAT entry is the frontend's own (address, port): held by
        // both layouts.
    }

    fn add_backend_ref(&mut self, id: BackendId, delta: i64) {
        if let Some(addr) = self.backend_addrs.get(&id)
            && let Some(b) = self.backends.get_mut(addr)
        {
            b.refs = (b.refs as i64 + delta).max(0) as u32;
            if b.refs == 0 {
                self.unreferenced_backends.insert(*addr);
            }
        }
    }

    /// Records what a Service wants now (empty: nothing, it is gone). Only
    /// the frontends whose desire or claimants changed are reconciled by
    /// the next [`apply`](Self::apply).
    pub fn update_service(
        &mut self,
        key: &ObjectKey,
        want: BTreeMap<FrontendKey, DesiredFrontend>,
    ) {
        let old = self.wanted.remove(key).unwrap_or_default();
        // Cluster IPs: counted by the wanted frontends that carry them.
        for (fk, fe) in old.iter() {
            if fe.flags & svc_flags::CLUSTER_IP != 0 {
                if let Some(n) = self.cluster_ip_refs.get_mut(&fk.address) {
                    *n -= 1;
                    if *n == 0 {
                        self.cluster_ip_refs.remove(&fk.address);
                    }
                }
                self.cluster_ips_dirty.insert(fk.address);
            }
        }
        for (fk, fe) in &want {
            if fe.flags & svc_flags::CLUSTER_IP != 0 {
                *self.cluster_ip_refs.entry(fk.address).or_default() += 1;
                self.cluster_ips_dirty.insert(fk.address);
            }
        }
        for (fk, _) in old.iter() {
            if !want.contains_key(fk) {
                if let Some(c) = self.claims.get_mut(fk) {
                    if let Ok(i) = c.binary_search(key) {
                        c.remove(i);
                    }
                    if c.is_empty() {
                        self.claims.remove(fk);
                    }
                }
                self.dirty.insert(*fk);
            }
        }
        for (fk, fe) in &want {
            if find(&old, fk) != Some(fe) {
                self.dirty.insert(*fk);
            }
            let c = self.claims.entry(*fk).or_default();
            if let Err(i) = c.binary_search(key) {
                c.insert(i, key.clone());
            }
        }
        if !want.is_empty() {
            // BTreeMap iteration is sorted: `find` can binary-search.
            self.wanted.insert(key.clone(), want.into_iter().collect());
        }
    }

    /// Marks frontends for reconciliation (verification of what the kernel
    /// holds found them different).
    pub fn mark_unknown(&mut self, keys: impl IntoIterator<Item = FrontendKey>) {
        for key in keys {
            if let Some(f) = self.frontends.get_mut(&key) {
                f.flags = UNKNOWN_FLAGS;
                f.slots.iter_mut().for_each(|s| *s = 0);
            }
            self.dirty.insert(key);
        }
    }

    /// Frontends two Services claim, with the one that got it.
    pub fn conflicts(&self) -> Vec<String> {
        self.describe_conflicts(self.claims.iter())
    }

    /// [`conflicts`](Self::conflicts) among the frontends one Service wants
    /// (reported when that Service changes).
    pub fn conflicts_of(&self, service: &ObjectKey) -> Vec<String> {
        let Some(wanted) = self.wanted.get(service) else {
            return Vec::new();
        };
        self.describe_conflicts(
            wanted
                .iter()
                .filter_map(|(k, _)| self.claims.get_key_value(k)),
        )
    }

    fn describe_conflicts<'a>(
        &self,
        claims: impl Iterator<Item = (&'a FrontendKey, &'a Vec<ObjectKey>)>,
    ) -> Vec<String> {
        let mut out: Vec<String> = claims
            .filter(|(_, c)| c.len() > 1)
            .map(|(k, c)| {
                let names: Vec<String> = c.iter().map(|(ns, n)| format!("{ns}/{n}")).collect();
                format!(
                    "{}:{}/{} claimed by {}; keeping {}",
                    k.address,
                    k.port,
                    if k.proto == netlb_common::proto::UDP {
                        "UDP"
                    } else {
                        "TCP"
                    },
                    names.join(" and "),
                    names[0]
                )
            })
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The frontend `key` should have: its first claimant's desire.
    fn target(&self, key: &FrontendKey) -> Option<&DesiredFrontend> {
        let owner = self.claims.get(key)?.first()?;
        find(self.wanted.get(owner)?, key)
    }

    /// Whether `key` is programmed exactly as `want` says.
    fn unchanged(&self, key: &FrontendKey, want: &DesiredFrontend) -> bool {
        let Some(f) = self.frontends.get(key) else {
            return false;
        };
        let Some(rev) = self.rev_nat.get(&(key.address, key.port)) else {
            return false;
        };
        if f.flags != want.flags || f.rev_nat != rev.index || f.slots.len() != want.backends.len() {
            return false;
        }
        if f.timeout != want.affinity_timeout
            || f.aux != aux_entries(key, f.rev_nat, want.flags, &want.source_ranges, &f.slots)
        {
            return false;
        }
        let programmed: HashSet<BackendId> = f.slots.iter().copied().collect();
        want.backends.iter().all(|b| {
            self.backends
                .get(&b.addr)
                .is_some_and(|st| st.flags == b.flags && programmed.contains(&st.id))
        })
    }

    fn set_frontend(&mut self, key: FrontendKey, f: Frontend) {
        self.service_entries += 1 + f.slots.len();
        for (count, n) in self.aux_counts.iter_mut().zip(aux_counts(&f.aux)) {
            *count += n;
        }
        if let Some(old) = self.frontends.insert(key, f) {
            self.service_entries -= 1 + old.slots.len();
            for (count, n) in self.aux_counts.iter_mut().zip(aux_counts(&old.aux)) {
                *count -= n;
            }
        }
    }

    /// Sets the sizes of the auxiliary maps (`--max-source-ranges`,
    /// `--max-affinity-matches`): a frontend whose new entries do not fit
    /// is programmed without them (see [`apply`](Self::apply)).
    pub fn set_aux_capacity(&mut self, source_ranges: u32, affinity_matches: u32) {
        self.aux_capacity = [source_ranges as usize, affinity_matches as usize];
    }

    /// Entries the programmed frontends hold in an auxiliary map.
    pub fn aux_count(&self, kind: AuxKind) -> usize {
        self.aux_counts[kind as usize]
    }

    /// Frontends programmed without a feature because its map is full, by
    /// kind: (now, ever).
    pub fn degraded(&self, kind: AuxKind) -> (usize, u64) {
        (
            self.degraded.values().filter(|d| d[kind as usize]).count(),
            self.degraded_total[kind as usize],
        )
    }

    /// Entries of the service map in use: every frontend's slot 0 and
    /// backend slots, and slots still to be deleted.
    pub fn service_entry_count(&self) -> usize {
        self.service_entries + self.stray_slots.len()
    }

    /// Whether frontends or strays wait for the next [`apply`](Self::apply)
    /// (changes, or retries of failed writes).
    pub fn has_pending(&self) -> bool {
        !self.dirty.is_empty()
            || !self.stray_slots.is_empty()
            || !self.stray_aux.is_empty()
            || !self.stray_backends.is_empty()
            || !self.stray_rev_nat.is_empty()
            || !self.rewrite_backends.is_empty()
            || !self.rewrite_rev_nat.is_empty()
            || !self.cluster_ips_dirty.is_empty()
            || !self.unreferenced_backends.is_empty()
            || !self.unreferenced_rev_nat.is_empty()
    }

    /// Number of cluster IPs programmed.
    pub fn cluster_ip_count(&self) -> usize {
        self.cluster_ips.len()
    }

    /// Number of rev-NAT entries programmed.
    pub fn rev_nat_count(&self) -> usize {
        self.rev_nat.len()
    }

    /// Number of frontends programmed.
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// Number of backends programmed.
    pub fn backend_count(&self) -> usize {
        self.backends.len()
    }

    /// The backend id of an address, if programmed.
    pub fn backend_id(&self, addr: &BackendAddr) -> Option<BackendId> {
        self.backends.get(addr).map(|b| b.id)
    }

    /// Makes the Services of `desired` the whole truth: each one's
    /// frontends are recorded, Services it does not name are removed, and
    /// the difference is applied. (A from-scratch sync; the agent hands
    /// changes to [`update_service`](Self::update_service) instead.)
    pub fn sync(
        &mut self,
        dp: &mut dyn Dataplane,
        desired: &DesiredState,
    ) -> Result<SyncReport, SyncError> {
        let mut by_service: HashMap<ObjectKey, BTreeMap<FrontendKey, DesiredFrontend>> =
            HashMap::default();
        for (key, fe) in &desired.frontends {
            by_service
                .entry(owner_of(fe))
                .or_default()
                .insert(*key, fe.clone());
        }
        let gone: Vec<ObjectKey> = self
            .wanted
            .keys()
            .filter(|k| !by_service.contains_key(*k))
            .cloned()
            .collect();
        for key in gone {
            self.update_service(&key, BTreeMap::new());
        }
        for (key, want) in by_service {
            self.update_service(&key, want);
        }
        self.apply(dp)
    }

    /// Checks the mirror's own invariants (tests): every auxiliary entry of
    /// a known frontend is under that frontend's rev-NAT index, protocol
    /// and scope.
    pub fn check_invariants(&self) -> Result<(), String> {
        for (key, f) in &self.frontends {
            if f.flags == UNKNOWN_FLAGS {
                continue;
            }
            for entry in &f.aux {
                let (rev, proto, scope) = match entry {
                    Aux::SourceRange((_, r)) => {
                        (u32::from_be(r.rev_nat_index_be), r.proto, r.scope)
                    }
                    Aux::AffinityMatch(m) => {
                        (m.frontend.rev_nat_index, m.frontend.proto, m.frontend.scope)
                    }
                };
                if (rev, proto, scope) != (f.rev_nat, key.proto, key.scope) {
                    return Err(format!("{key:?} (rev-NAT {}) holds {entry:?}", f.rev_nat));
                }
            }
        }
        Ok(())
    }

    /// Names of the Services this syncer knows (tests and verification).
    pub fn services(&self) -> impl Iterator<Item = &ObjectKey> {
        self.wanted.keys()
    }
}

mod adopt;
mod apply;
mod aux;
mod ids;
mod verify;

pub use aux::AuxKind;
use aux::{aux_counts, aux_entries};
use ids::Ids;

#[cfg(test)]
mod tests;
