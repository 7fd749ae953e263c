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
    k8s::objects::Name,
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

/// The auxiliary entries of a frontend (sorted): its source ranges and,
/// with session affinity, a match for every backend in its slots.
fn aux_entries(
    key: &FrontendKey,
    rev_nat: RevNatIndex,
    flags: u16,
    ranges: &[(Ipv4Addr, u8)],
    slots: &[BackendId],
) -> Vec<Aux> {
    let mut out: Vec<Aux> = ranges
        .iter()
        .map(|(network, len)| {
            Aux::SourceRange((
                SourceRangeKey::FRONTEND_BITS + u32::from(*len),
                SourceRangeKey {
                    // Big-endian, as the datapath looks it up (the trie
                    // compares bytes).
                    rev_nat_index_be: rev_nat.to_be(),
                    proto: key.proto,
                    scope: key.scope,
                    pad: [0; 2],
                    address_be: be_addr(*network),
                },
            ))
        })
        .collect();
    if flags & svc_flags::AFFINITY != 0 {
        let frontend = AffinityFrontend {
            rev_nat_index: rev_nat,
            proto: key.proto,
            scope: key.scope,
            pad: [0; 2],
        };
        out.extend(slots.iter().filter(|id| **id != 0).map(|id| {
            Aux::AffinityMatch(AffinityMatchKey {
                backend_id: *id,
                frontend,
            })
        }));
    }
    out.sort();
    out.dedup();
    out
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

/// Lowest-first id allocator over `1..=max`. A released id is quarantined,
/// not freed: tracked connections may still name it (a backend id, a rev-NAT
/// index), so it is handed out again only after a conntrack sweep that
/// started after its release found no connection using it
/// ([`Syncer::reclaim`]).
#[derive(Clone, Debug)]
struct Ids {
    max: u32,
    next: u32,
    free: BTreeSet<u32>,
    /// Released ids and the sync generation that released them.
    quarantine: Vec<(u32, u64)>,
}

impl Ids {
    fn new(max: u32) -> Self {
        Self {
            max,
            next: 1,
            free: BTreeSet::new(),
            quarantine: Vec::new(),
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        if let Some(id) = self.free.pop_first() {
            return Some(id);
        }
        (self.next <= self.max).then(|| {
            self.next += 1;
            self.next - 1
        })
    }

    /// An id that never reached the maps (its write failed): free at once.
    fn unuse(&mut self, id: u32) {
        self.free.insert(id);
    }

    /// An id removed from the maps in sync generation `generation`.
    fn release(&mut self, id: u32, generation: u64) {
        self.quarantine.push((id, generation));
    }

    /// Frees quarantined ids released at or before `generation` that
    /// `in_use` does not contain.
    fn reclaim(&mut self, in_use: &BTreeSet<u32>, generation: u64) -> usize {
        let before = self.free.len();
        let free = &mut self.free;
        self.quarantine.retain(|(id, released)| {
            if *released <= generation && !in_use.contains(id) {
                free.insert(*id);
                false
            } else {
                true
            }
        });
        self.free.len() - before
    }

    /// Marks ids already in use (adoption). The gaps below them may still
    /// be named by connections of the earlier agent: quarantined.
    fn adopt(&mut self, used: &BTreeSet<u32>) {
        let top = used.iter().next_back().copied().unwrap_or(0);
        self.next = top + 1;
        self.free.clear();
        self.quarantine = (1..=top)
            .filter(|id| !used.contains(id))
            .map(|id| (id, 0))
            .collect();
    }
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

/// A backend's map value.
fn backend_value(addr: &BackendAddr, flags: u8) -> BackendValue {
    BackendValue {
        address_be: be_addr(addr.address),
        port_be: addr.port.to_be(),
        proto: addr.proto,
        flags,
    }
}

/// The kinds of auxiliary entries, as indices: their maps fill
/// independently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuxKind {
    SourceRange = 0,
    AffinityMatch = 1,
}

impl AuxKind {
    pub const ALL: [AuxKind; 2] = [AuxKind::SourceRange, AuxKind::AffinityMatch];

    fn of(aux: &Aux) -> Self {
        match aux {
            Aux::SourceRange(_) => Self::SourceRange,
            Aux::AffinityMatch(_) => Self::AffinityMatch,
        }
    }

    /// The map it lives in.
    pub fn map(self) -> &'static str {
        match self {
            Self::SourceRange => netlb_common::map_names::SOURCE_RANGES,
            Self::AffinityMatch => netlb_common::map_names::AFFINITY_MATCH,
        }
    }
}

/// Entries of each kind in `aux`.
fn aux_counts<'a>(aux: impl IntoIterator<Item = &'a Aux>) -> [usize; 2] {
    let mut counts = [0; 2];
    for a in aux {
        counts[AuxKind::of(a) as usize] += 1;
    }
    counts
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

    /// Rebuilds the mirror from the maps (a restarted agent adopting pinned
    /// maps): ids and indices stay what they are.
    pub fn adopt(dp: &dyn Dataplane) -> Result<Self, SyncError> {
        Self::adopt_with_limits(dp, limits::MAX_BACKENDS, limits::MAX_REV_NAT)
    }

    /// [`Syncer::adopt`] for maps of the given sizes. Every adopted
    /// frontend is reconciled by the first [`apply`](Self::apply): kept as
    /// it is when a Service still wants it so, removed when none does.
    pub fn adopt_with_limits(
        dp: &dyn Dataplane,
        max_backends: u32,
        max_rev_nat: u32,
    ) -> Result<Self, SyncError> {
        let maps = dp.dump()?;
        let mut syncer = Self::with_limits(max_backends, max_rev_nat);
        for (id, value) in &maps.backends {
            let addr = BackendAddr {
                address: from_be_addr(value.address_be),
                port: u16::from_be(value.port_be),
                proto: value.proto,
            };
            syncer.backends.insert(
                addr,
                Backend {
                    id: *id,
                    flags: value.flags,
                    refs: 0,
                },
            );
            syncer.backend_addrs.insert(*id, addr);
        }
        syncer
            .backend_ids
            .adopt(&maps.backends.iter().map(|(id, _)| *id).collect());
        for (index, value) in &maps.rev_nat {
            syncer.rev_nat.insert(
                (from_be_addr(value.address_be), u16::from_be(value.port_be)),
                RevNat {
                    index: *index,
                    refs: 0,
                },
            );
        }
        syncer
            .rev_nat_ids
            .adopt(&maps.rev_nat.iter().map(|(i, _)| *i).collect());
        let mut slots: BTreeMap<(FrontendKey, u16), BackendId> = BTreeMap::new();
        for (key, value) in &maps.services {
            let fe = FrontendKey {
                address: from_be_addr(key.address_be),
                port: u16::from_be(key.port_be),
                proto: key.proto,
                scope: key.scope,
            };
            if key.backend_slot == 0 {
                syncer.service_entries += 1 + value.count as usize;
                let mut f = Frontend::new(
                    value.rev_nat_index,
                    value.flags,
                    vec![0; value.count as usize],
                );
                f.timeout = value.backend_id;
                syncer.frontends.insert(fe, f);
            } else {
                slots.insert((fe, key.backend_slot), value.backend_id);
            }
        }
        for ((fe, slot), id) in slots {
            match syncer.frontends.get_mut(&fe) {
                Some(f) if (slot as usize) <= f.slots.len() => {
                    f.slots[slot as usize - 1] = id;
                    f.held.push(id);
                }
                _ => syncer.stray_slots.push(service_key(&fe, slot)),
            }
        }
        // Cluster IPs: adopted as they are; those no Service wants go in the
        // first apply.
        syncer.cluster_ips = maps.cluster_ips.iter().copied().collect();
        syncer.cluster_ips_dirty = maps.cluster_ips.iter().copied().collect();
        // Auxiliary entries belong to the frontend with their rev-NAT
        // index, protocol and scope.
        let mut owners: HashMap<(RevNatIndex, u8, u8), FrontendKey> = HashMap::default();
        for (key, f) in &syncer.frontends {
            owners.insert((f.rev_nat, key.proto, key.scope), *key);
        }
        let aux = maps
            .source_ranges
            .iter()
            .map(|r| {
                let (_, d) = r;
                (
                    (u32::from_be(d.rev_nat_index_be), d.proto, d.scope),
                    Aux::SourceRange(*r),
                )
            })
            .chain(maps.affinity_matches.iter().map(|m| {
                (
                    (m.frontend.rev_nat_index, m.frontend.proto, m.frontend.scope),
                    Aux::AffinityMatch(*m),
                )
            }));
        for (owner, entry) in aux {
            match owners.get(&owner).and_then(|k| syncer.frontends.get_mut(k)) {
                Some(f) => f.aux.push(entry),
                None => syncer.stray_aux.push(entry),
            }
        }
        for f in syncer.frontends.values_mut() {
            f.aux.sort();
        }
        syncer.aux_counts = aux_counts(syncer.frontends.values().flat_map(|f| f.aux.iter()));
        // Reference counts from what the frontends use.
        let frontends: Vec<(FrontendKey, Frontend)> = syncer
            .frontends
            .iter()
            .map(|(k, f)| (*k, f.clone()))
            .collect();
        for (key, f) in &frontends {
            syncer.add_refs(key, f, 1);
            syncer.dirty.insert(*key);
        }
        syncer.unreferenced_backends = syncer
            .backends
            .iter()
            .filter(|(_, b)| b.refs == 0)
            .map(|(a, _)| *a)
            .collect();
        syncer.unreferenced_rev_nat = syncer
            .rev_nat
            .iter()
            .filter(|(_, r)| r.refs == 0)
            .map(|(k, _)| *k)
            .collect();
        Ok(syncer)
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

    /// Compares programmed frontends from `after` on (at most `limit`) with
    /// what the kernel holds: slot 0, every backend slot, the backends the
    /// slots name and the frontend's rev-NAT entry. What differs is marked
    /// for the next [`apply`](Self::apply) to repair (a frontend is
    /// rewritten whole, a backend or rev-NAT entry rewritten). Returns the
    /// last frontend checked (`None`: the walk is over) and the repairs.
    pub fn verify_chunk(
        &mut self,
        dp: &dyn Dataplane,
        after: Option<FrontendKey>,
        limit: usize,
    ) -> Result<(Option<FrontendKey>, Repairs), SyncError> {
        let range = match after {
            Some(a) => self
                .frontends
                .range((std::ops::Bound::Excluded(a), std::ops::Bound::Unbounded)),
            None => self.frontends.range(..),
        };
        let chunk: Vec<(FrontendKey, Frontend)> =
            range.take(limit).map(|(k, f)| (*k, f.clone())).collect();
        let mut repairs = Repairs::new();
        let mut rewrite = Vec::new();
        let mut checked_backends: HashSet<BackendId> = HashSet::default();
        for (key, f) in &chunk {
            if f.flags == UNKNOWN_FLAGS {
                // Being rewritten already.
                continue;
            }
            let head = ServiceValue {
                backend_id: f.timeout,
                rev_nat_index: f.rev_nat,
                count: f.slots.len() as u16,
                flags: f.flags,
            };
            let mut whole = dp.read_service(&service_key(key, 0))? == Some(head);
            for (i, id) in f.slots.iter().enumerate() {
                if !whole {
                    break;
                }
                whole = dp
                    .read_service(&service_key(key, i as u16 + 1))?
                    .is_some_and(|v| v.backend_id == *id);
            }
            if !whole {
                *repairs
                    .entry(netlb_common::map_names::SERVICES)
                    .or_default() += 1;
                rewrite.push(*key);
            }
            for id in &f.slots {
                if !checked_backends.insert(*id) {
                    continue;
                }
                let Some(addr) = self.backend_addrs.get(id) else {
                    continue;
                };
                let Some(backend) = self.backends.get(addr) else {
                    continue;
                };
                if dp.read_backend(*id)? != Some(backend_value(addr, backend.flags)) {
                    *repairs
                        .entry(netlb_common::map_names::BACKENDS)
                        .or_default() += 1;
                    self.rewrite_backends.insert(*id);
                }
            }
            let want_rev = RevNatValue {
                address_be: be_addr(key.address),
                port_be: key.port.to_be(),
                pad: [0; 2],
            };
            if dp.read_rev_nat(f.rev_nat)? != Some(want_rev)
                && self.rewrite_rev_nat.insert(f.rev_nat)
            {
                *repairs.entry(netlb_common::map_names::REV_NAT).or_default() += 1;
            }
        }
        self.mark_unknown(rewrite);
        let last = chunk.last().map(|(k, _)| *k);
        Ok((last, repairs))
    }

    /// Compares every entry the kernel holds with the mirror (a whole
    /// `dump`): entries nothing programmed owns (a crashed agent's, or
    /// written behind the agent's back) are marked for deletion, auxiliary
    /// entries and cluster IPs that are missing for rewriting. Returns the
    /// repairs.
    pub fn verify_all(&mut self, maps: &ProgrammedMaps) -> Repairs {
        use netlb_common::map_names;
        let mut repairs = Repairs::new();
        let pending_slots: HashSet<ServiceKey> = self.stray_slots.iter().copied().collect();
        for (key, _) in &maps.services {
            let fk = frontend_of(key);
            let owned = self
                .frontends
                .get(&fk)
                .is_some_and(|f| usize::from(key.backend_slot) <= f.slots.len());
            if !owned && !pending_slots.contains(key) {
                *repairs.entry(map_names::SERVICES).or_default() += 1;
                self.stray_slots.push(*key);
            }
        }
        let pending: HashSet<BackendId> = self.stray_backends.iter().copied().collect();
        for (id, _) in &maps.backends {
            if !self.backend_addrs.contains_key(id) && !pending.contains(id) {
                *repairs.entry(map_names::BACKENDS).or_default() += 1;
                self.stray_backends.push(*id);
            }
        }
        let known_rev: HashSet<RevNatIndex> = self.rev_nat.values().map(|r| r.index).collect();
        let pending: HashSet<RevNatIndex> = self.stray_rev_nat.iter().copied().collect();
        for (index, _) in &maps.rev_nat {
            if !known_rev.contains(index) && !pending.contains(index) {
                *repairs.entry(map_names::REV_NAT).or_default() += 1;
                self.stray_rev_nat.push(*index);
            }
        }
        // Auxiliary entries: the kernel's against the frontends'.
        let held: HashSet<Aux> = maps
            .source_ranges
            .iter()
            .map(|r| Aux::SourceRange(*r))
            .chain(maps.affinity_matches.iter().map(|m| Aux::AffinityMatch(*m)))
            .collect();
        let aux_map = |a: &Aux| match a {
            Aux::SourceRange(_) => map_names::SOURCE_RANGES,
            Aux::AffinityMatch(_) => map_names::AFFINITY_MATCH,
        };
        let mut owned_aux: HashSet<Aux> = HashSet::default();
        let mut rewrite = Vec::new();
        for (key, f) in &self.frontends {
            owned_aux.extend(f.aux.iter().copied());
            if f.flags == UNKNOWN_FLAGS {
                continue;
            }
            if let Some(missing) = f.aux.iter().find(|a| !held.contains(a)) {
                *repairs.entry(aux_map(missing)).or_default() += 1;
                rewrite.push(*key);
            }
        }
        self.mark_unknown(rewrite);
        let pending: HashSet<Aux> = self.stray_aux.iter().copied().collect();
        for a in held {
            if !owned_aux.contains(&a) && !pending.contains(&a) {
                *repairs.entry(aux_map(&a)).or_default() += 1;
                self.stray_aux.push(a);
            }
        }
        // Cluster IPs: what the kernel holds is what the mirror says it
        // holds; `sync_cluster_ips` then makes it what is wanted.
        let held: HashSet<Ipv4Addr> = maps.cluster_ips.iter().copied().collect();
        let differ: Vec<Ipv4Addr> = held
            .symmetric_difference(&self.cluster_ips)
            .copied()
            .collect();
        for ip in differ {
            *repairs.entry(map_names::CLUSTER_IPS).or_default() += 1;
            if held.contains(&ip) {
                self.cluster_ips.insert(ip);
            } else {
                self.cluster_ips.remove(&ip);
            }
            self.cluster_ips_dirty.insert(ip);
        }
        repairs
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

    /// Reconciles the changed frontends with the fewest map operations, in
    /// batches and make-before-break order (see the module docs). Failed
    /// frontends are marked for a retry by the next call; the rest is done.
    pub fn apply(&mut self, dp: &mut dyn Dataplane) -> Result<SyncReport, SyncError> {
        let started = Instant::now();
        let mut report = SyncReport::default();
        self.generation += 1;
        let generation = self.generation;
        let dirty: Vec<FrontendKey> = std::mem::take(&mut self.dirty).into_iter().collect();
        let mut failed: BTreeSet<FrontendKey> = BTreeSet::new();

        // What each changed frontend becomes (None: removed).
        let mut changes: Vec<(FrontendKey, Option<DesiredFrontend>)> = Vec::new();
        for key in dirty {
            match self.target(&key) {
                Some(want) if self.unchanged(&key, want) => {}
                Some(want) => changes.push((key, Some(want.clone()))),
                None if self.frontends.contains_key(&key) => changes.push((key, None)),
                None => {}
            }
        }

        // 0. What the verification found: entries nothing owns go (before
        // any id is handed out), entries the kernel holds differently are
        // rewritten from the mirror.
        self.repair(dp, &mut report);

        // 1. Backends: new ones get ids, changed flags are rewritten.
        let mut backend_writes: Vec<Planned<(BackendId, BackendValue)>> = Vec::new();
        let mut planned_backends: HashMap<BackendAddr, (BackendId, u8)> = HashMap::default();
        let mut fresh_ids: Vec<(BackendAddr, BackendId)> = Vec::new();
        for (key, want) in &changes {
            let Some(want) = want else { continue };
            for b in want
                .backends
                .iter()
                .take(limits::MAX_BACKENDS_PER_SERVICE as usize)
            {
                if planned_backends.contains_key(&b.addr) {
                    continue;
                }
                let id = match self.backends.get(&b.addr) {
                    Some(st) if st.flags == b.flags => continue,
                    Some(st) => st.id,
                    None => match self.backend_ids.alloc() {
                        Some(id) => {
                            fresh_ids.push((b.addr, id));
                            id
                        }
                        None => {
                            failed.insert(*key);
                            report.exhausted += 1;
                            continue;
                        }
                    },
                };
                planned_backends.insert(b.addr, (id, b.flags));
                backend_writes.push(Planned {
                    frontend: *key,
                    item: (
                        id,
                        BackendValue {
                            address_be: be_addr(b.addr.address),
                            port_be: b.addr.port.to_be(),
                            proto: b.addr.proto,
                            flags: b.flags,
                        },
                    ),
                });
            }
        }
        // A reused id starts with zeroed counters; an id whose counters
        // cannot be reset is not used (its frontends retry next time).
        let mut reset_failed: HashSet<BackendId> = HashSet::default();
        for (addr, id) in &fresh_ids {
            if let Err(e) = dp.reset_backend_stats(*id) {
                log::warn!("resetting the counters of backend id {id} ({addr:?}): {e}");
                reset_failed.insert(*id);
            }
        }
        if !reset_failed.is_empty() {
            backend_writes.retain(|p| {
                if reset_failed.contains(&p.item.0) {
                    failed.insert(p.frontend);
                    false
                } else {
                    true
                }
            });
            planned_backends.retain(|_, (id, _)| !reset_failed.contains(id));
        }
        let mut backend_failed: BTreeSet<FrontendKey> = BTreeSet::new();
        report.writes += write_batch(
            &backend_writes,
            &mut |items| dp.upsert_backends(items),
            &mut backend_failed,
        );
        // Which backend writes succeeded: everything planned but for the
        // failed frontends' (a failed write names its frontend).
        let failed_backend_ids: HashSet<BackendId> = backend_writes
            .iter()
            .filter(|p| backend_failed.contains(&p.frontend))
            .map(|p| p.item.0)
            .collect();
        for (addr, (id, flags)) in &planned_backends {
            if failed_backend_ids.contains(id) {
                continue;
            }
            let refs = self.backends.get(addr).map(|b| b.refs).unwrap_or(0);
            if refs == 0 {
                // Written for a frontend that may still fail: deleted below
                // unless a frontend takes a reference.
                self.unreferenced_backends.insert(*addr);
            }
            self.backends.insert(
                *addr,
                Backend {
                    id: *id,
                    flags: *flags,
                    refs,
                },
            );
            self.backend_addrs.insert(*id, *addr);
        }
        for (addr, id) in &fresh_ids {
            if !self.backends.contains_key(addr) {
                self.backend_ids.unuse(*id);
            }
        }
        failed.extend(backend_failed);
        // A backend is planned once, for the first frontend that wants it;
        // when its write failed, every frontend that wants it waits too.
        for (key, want) in &changes {
            if let Some(want) = want
                && !failed.contains(key)
                && want
                    .backends
                    .iter()
                    .take(limits::MAX_BACKENDS_PER_SERVICE as usize)
                    .any(|b| {
                        self.backends
                            .get(&b.addr)
                            .is_none_or(|st| st.flags != b.flags)
                    })
            {
                failed.insert(*key);
            }
        }

        // 2. Rev-NAT entries for new frontend addresses.
        let mut rev_writes: Vec<Planned<(RevNatIndex, RevNatValue)>> = Vec::new();
        let mut planned_rev: HashMap<(Ipv4Addr, u16), RevNatIndex> = HashMap::default();
        for (key, want) in &changes {
            if want.is_none() || failed.contains(key) {
                continue;
            }
            let rev = (key.address, key.port);
            if self.rev_nat.contains_key(&rev) || planned_rev.contains_key(&rev) {
                continue;
            }
            let Some(index) = self.rev_nat_ids.alloc() else {
                failed.insert(*key);
                report.exhausted += 1;
                continue;
            };
            planned_rev.insert(rev, index);
            rev_writes.push(Planned {
                frontend: *key,
                item: (
                    index,
                    RevNatValue {
                        address_be: be_addr(key.address),
                        port_be: key.port.to_be(),
                        pad: [0; 2],
                    },
                ),
            });
        }
        let mut rev_failed = BTreeSet::new();
        report.writes += write_batch(
            &rev_writes,
            &mut |items| dp.upsert_rev_nats(items),
            &mut rev_failed,
        );
        for p in &rev_writes {
            let rev = (p.frontend.address, p.frontend.port);
            if rev_failed.contains(&p.frontend) {
                self.rev_nat_ids.unuse(p.item.0);
            } else {
                self.rev_nat.insert(
                    rev,
                    RevNat {
                        index: p.item.0,
                        refs: 0,
                    },
                );
                self.unreferenced_rev_nat.insert(rev);
            }
        }
        failed.extend(rev_failed);
        // Frontends of one address and port (protocols, scopes) share the
        // entry: when its write failed they all wait.
        for (key, want) in &changes {
            if want.is_some() && !self.rev_nat.contains_key(&(key.address, key.port)) {
                failed.insert(*key);
            }
        }

        // 3. Slots, then slot 0, then the tails, of changed frontends.
        struct Plan {
            key: FrontendKey,
            old: Option<Frontend>,
            new: Frontend,
            /// Auxiliary entries the old layout has and the new one not.
            aux_dels: Vec<Aux>,
        }
        let mut plans: Vec<Plan> = Vec::new();
        let mut slot_writes: Vec<Planned<(ServiceKey, ServiceValue)>> = Vec::new();
        let mut aux_writes: Vec<Planned<Aux>> = Vec::new();
        // Room left in each auxiliary map (strays still take theirs).
        let strays = aux_counts(&self.stray_aux);
        let mut aux_room = [0, 1].map(|k| {
            self.aux_capacity[k]
                .saturating_sub(self.aux_counts[k])
                .saturating_sub(strays[k])
        });
        for (key, want) in &changes {
            let Some(want) = want else { continue };
            if failed.contains(key) {
                continue;
            }
            let rev_nat = self.rev_nat[&(key.address, key.port)].index;
            let wanted_ids: Vec<BackendId> = want
                .backends
                .iter()
                .take(limits::MAX_BACKENDS_PER_SERVICE as usize)
                .map(|b| self.backends[&b.addr].id)
                .collect();
            let old = self.frontends.get(key).cloned();
            let old_slots = old.as_ref().map(|f| f.slots.as_slice()).unwrap_or_default();
            let slots = next_slots(old_slots, &wanted_ids);
            for (i, id) in slots.iter().enumerate() {
                if old_slots.get(i) != Some(id) {
                    slot_writes.push(Planned {
                        frontend: *key,
                        item: (
                            service_key(key, i as u16 + 1),
                            ServiceValue {
                                backend_id: *id,
                                ..Default::default()
                            },
                        ),
                    });
                }
            }
            // An unknown frontend may lack any entry: all are written again.
            let known = old.as_ref().filter(|f| f.flags != UNKNOWN_FLAGS);
            let (flags, timeout, new_aux) =
                self.fit_aux(key, rev_nat, want, &slots, known, &mut aux_room);
            let old_aux: &[Aux] = old.as_ref().map(|f| f.aux.as_slice()).unwrap_or_default();
            for entry in &new_aux {
                if known.is_none_or(|f| f.aux.binary_search(entry).is_err()) {
                    aux_writes.push(Planned {
                        frontend: *key,
                        item: *entry,
                    });
                }
            }
            let aux_dels = old_aux
                .iter()
                .filter(|r| new_aux.binary_search(r).is_err())
                .copied()
                .collect();
            let mut new = Frontend::new(rev_nat, flags, slots);
            new.aux = new_aux;
            new.timeout = timeout;
            plans.push(Plan {
                key: *key,
                old,
                new,
                aux_dels,
            });
        }
        // Auxiliary entries before the header that uses them (make before
        // break: a new range admits, a new backend matches, before the
        // header could refuse or forget).
        let mut aux_failed = BTreeSet::new();
        report.writes += write_batch(
            &aux_writes,
            &mut |items| dp.upsert_aux(items),
            &mut aux_failed,
        );
        slot_writes.retain(|p| !aux_failed.contains(&p.frontend));
        let mut slot_failed = BTreeSet::new();
        report.writes += write_batch(
            &slot_writes,
            &mut |items| dp.upsert_services(items),
            &mut slot_failed,
        );
        slot_failed.extend(aux_failed);
        if !slot_failed.is_empty() {
            // Slots written past a failed frontend's old count are
            // unreachable (its header still says the old count): take them
            // back at once, so that a frontend too big for the map does not
            // keep the others out of it.
            let rollback: Vec<Planned<ServiceKey>> = plans
                .iter()
                .filter(|plan| slot_failed.contains(&plan.key))
                .flat_map(|plan| {
                    let old_len = plan.old.as_ref().map(|f| f.slots.len()).unwrap_or(0);
                    (old_len..plan.new.slots.len()).map(move |slot| Planned {
                        frontend: plan.key,
                        item: service_key(&plan.key, slot as u16 + 1),
                    })
                })
                .collect();
            let mut rollback_failed = BTreeSet::new();
            write_batch(
                &rollback,
                &mut |items| dp.delete_services(items),
                &mut rollback_failed,
            );
            // What could not be taken back is deleted by a later sync.
            self.stray_slots.extend(
                rollback
                    .iter()
                    .filter(|p| rollback_failed.contains(&p.frontend))
                    .map(|p| p.item),
            );
        }
        let mut header_writes: Vec<Planned<(ServiceKey, ServiceValue)>> = Vec::new();
        for plan in &plans {
            if slot_failed.contains(&plan.key) {
                continue;
            }
            let changed = match &plan.old {
                Some(f) => {
                    f.rev_nat != plan.new.rev_nat
                        || f.flags != plan.new.flags
                        || f.timeout != plan.new.timeout
                        || f.slots.len() != plan.new.slots.len()
                }
                None => true,
            };
            if changed {
                header_writes.push(Planned {
                    frontend: plan.key,
                    item: (
                        service_key(&plan.key, 0),
                        ServiceValue {
                            // The affinity timeout (0 without).
                            backend_id: plan.new.timeout,
                            rev_nat_index: plan.new.rev_nat,
                            count: plan.new.slots.len() as u16,
                            flags: plan.new.flags,
                        },
                    ),
                });
            }
        }
        let mut header_failed = BTreeSet::new();
        report.writes += write_batch(
            &header_writes,
            &mut |items| dp.upsert_services(items),
            &mut header_failed,
        );
        let mut tail_deletes: Vec<Planned<ServiceKey>> = Vec::new();
        for plan in &plans {
            if slot_failed.contains(&plan.key) || header_failed.contains(&plan.key) {
                continue;
            }
            let old_len = plan.old.as_ref().map(|f| f.slots.len()).unwrap_or(0);
            for slot in plan.new.slots.len()..old_len {
                tail_deletes.push(Planned {
                    frontend: plan.key,
                    item: service_key(&plan.key, slot as u16 + 1),
                });
            }
        }
        let mut tail_failed = BTreeSet::new();
        report.deletes += write_batch(
            &tail_deletes,
            &mut |items| dp.delete_services(items),
            &mut tail_failed,
        );
        // Entries the new layout dropped, once its header no longer needs
        // them (a failure leaves them for a later sync).
        let aux_deletes: Vec<Planned<Aux>> = plans
            .iter()
            .filter(|plan| !slot_failed.contains(&plan.key) && !header_failed.contains(&plan.key))
            .flat_map(|plan| {
                plan.aux_dels.iter().map(|r| Planned {
                    frontend: plan.key,
                    item: *r,
                })
            })
            .collect();
        let mut aux_del_failed = BTreeSet::new();
        report.deletes += write_batch(
            &aux_deletes,
            &mut |items| dp.delete_aux(items),
            &mut aux_del_failed,
        );
        self.stray_aux.extend(
            aux_deletes
                .iter()
                .filter(|p| aux_del_failed.contains(&p.frontend))
                .map(|p| p.item),
        );
        // The mirror and the reference counts follow what was written.
        for plan in plans {
            let key = plan.key;
            if slot_failed.contains(&key) || header_failed.contains(&key) {
                failed.insert(key);
                // Unknown state: the next sync rewrites every slot and the
                // header, and deletes everything past the new count.
                let len = plan
                    .new
                    .slots
                    .len()
                    .max(plan.old.as_ref().map(|f| f.slots.len()).unwrap_or(0));
                // The kernel may hold old or new slots: keep both alive.
                let mut held: Vec<BackendId> = plan
                    .old
                    .as_ref()
                    .map(|f| f.held.clone())
                    .unwrap_or_default();
                held.extend(
                    plan.new
                        .slots
                        .iter()
                        .filter(|id| !held.contains(id))
                        .copied()
                        .collect::<Vec<_>>(),
                );
                if let Some(old) = &plan.old {
                    self.add_refs(&key, old, -1);
                }
                // And old or new auxiliary entries.
                let mut aux: Vec<Aux> =
                    plan.old.as_ref().map(|f| f.aux.clone()).unwrap_or_default();
                aux.extend(plan.new.aux.iter().copied());
                aux.sort();
                aux.dedup();
                let unknown = Frontend {
                    rev_nat: plan.new.rev_nat,
                    flags: UNKNOWN_FLAGS,
                    slots: vec![0; len],
                    held,
                    aux,
                    timeout: plan.new.timeout,
                };
                self.add_refs(&key, &unknown, 1);
                self.set_frontend(key, unknown);
                continue;
            }
            if tail_failed.contains(&key) {
                let old_len = plan.old.as_ref().map(|f| f.slots.len()).unwrap_or(0);
                self.stray_slots.extend(
                    (plan.new.slots.len()..old_len).map(|slot| service_key(&key, slot as u16 + 1)),
                );
            }
            self.move_refs(&key, plan.old.as_ref(), &plan.new);
            self.set_frontend(key, plan.new);
        }

        // 4. Removed frontends: slot 0 first, then their slots.
        let removed: Vec<FrontendKey> = changes
            .iter()
            .filter(|(_, want)| want.is_none())
            .map(|(k, _)| *k)
            .collect();
        let heads: Vec<Planned<ServiceKey>> = removed
            .iter()
            .map(|k| Planned {
                frontend: *k,
                item: service_key(k, 0),
            })
            .collect();
        let mut head_failed = BTreeSet::new();
        report.deletes += write_batch(
            &heads,
            &mut |items| dp.delete_services(items),
            &mut head_failed,
        );
        for key in &removed {
            if head_failed.contains(key) {
                failed.insert(*key);
                continue;
            }
            if let Some(f) = self.frontends.remove(key) {
                self.service_entries -= 1 + f.slots.len();
                for (count, n) in self.aux_counts.iter_mut().zip(aux_counts(&f.aux)) {
                    *count -= n;
                }
                self.degraded.remove(key);
                self.stray_aux.extend(f.aux.iter().copied());
                self.add_refs(key, &f, -1);
                // Its slots are unreachable now; delete them below (and on
                // the next sync if a deletion fails).
                self.stray_slots.extend(
                    (1..=f.slots.len())
                        .rev()
                        .map(|slot| service_key(key, slot as u16)),
                );
            }
        }
        // Strays are what no programmed frontend had when they were found
        // (left by a crashed agent, or deletions that failed); a frontend
        // written since may have taken the same keys: those are its own now.
        self.forget_owned_strays();
        if !self.stray_aux.is_empty() {
            // One call per entry: a failure keeps that entry alone.
            for entry in std::mem::take(&mut self.stray_aux) {
                match dp.delete_aux(std::slice::from_ref(&entry)) {
                    Ok(()) => report.deletes += 1,
                    Err(e) => {
                        log::warn!("deleting {entry:?}: {}", e.source);
                        report.failed_deletes += 1;
                        self.stray_aux.push(entry);
                    }
                }
            }
        }
        if !self.stray_slots.is_empty() {
            let strays = std::mem::take(&mut self.stray_slots);
            let planned: Vec<Planned<ServiceKey>> = strays
                .iter()
                .map(|k| Planned {
                    frontend: FrontendKey {
                        address: from_be_addr(k.address_be),
                        port: u16::from_be(k.port_be),
                        proto: k.proto,
                        scope: k.scope,
                    },
                    item: *k,
                })
                .collect();
            let mut stray_failed = BTreeSet::new();
            report.deletes += write_batch(
                &planned,
                &mut |items| dp.delete_services(items),
                &mut stray_failed,
            );
            self.stray_slots = planned
                .into_iter()
                .filter(|p| stray_failed.contains(&p.frontend))
                .map(|p| p.item)
                .collect();
            report.failed_deletes += stray_failed.len();
        }

        // 5. Rev-NAT entries and backends nothing references any more.
        let stale_rev: Vec<((Ipv4Addr, u16), RevNatIndex)> =
            std::mem::take(&mut self.unreferenced_rev_nat)
                .into_iter()
                .filter_map(|k| {
                    self.rev_nat
                        .get(&k)
                        .filter(|r| r.refs == 0)
                        .map(|r| (k, r.index))
                })
                .collect();
        for (rev, index) in stale_rev {
            // A failed deletion stays a candidate for the next sync.
            if let Err(e) = dp.delete_rev_nat(index) {
                log::warn!("deleting rev-NAT entry {index} ({}:{}): {e}", rev.0, rev.1);
                self.unreferenced_rev_nat.insert(rev);
                report.failed_deletes += 1;
                continue;
            }
            report.deletes += 1;
            self.rev_nat.remove(&rev);
            self.rev_nat_ids.release(index, generation);
        }
        let stale_backends: Vec<(BackendAddr, BackendId)> =
            std::mem::take(&mut self.unreferenced_backends)
                .into_iter()
                .filter_map(|addr| {
                    self.backends
                        .get(&addr)
                        .filter(|b| b.refs == 0)
                        .map(|b| (addr, b.id))
                })
                .collect();
        for (addr, id) in stale_backends {
            if let Err(e) = dp.delete_backend(id) {
                log::warn!("deleting backend {id} ({addr:?}): {e}");
                self.unreferenced_backends.insert(addr);
                report.failed_deletes += 1;
                continue;
            }
            report.deletes += 1;
            self.backends.remove(&addr);
            self.backend_addrs.remove(&id);
            self.backend_ids.release(id, generation);
        }

        report.failed = failed.len();
        self.dirty.extend(failed);
        // Frontends without a feature whose map is full: tried again by
        // every apply, until their entries fit.
        self.dirty.extend(self.degraded.keys().copied());
        // Cluster IPs, after the frontends (a new Service's address must not
        // reject its own port before its frontend exists; a removed one's
        // goes after its frontend).
        self.sync_cluster_ips(dp, &mut report);
        report.frontends = self.frontends.len();
        report.backends = self.backends.len();
        report.duration = started.elapsed();
        Ok(report)
    }

    /// The header flags, affinity timeout and auxiliary entries frontend
    /// `key` gets with `slots`: what `want` says, unless its new entries of
    /// a kind do not fit the room left (`room`, decreased by what is
    /// planned). Then the frontend keeps its endpoints right and goes
    /// without the feature: with no room for its affinity matches it is
    /// programmed without session affinity (new connections are balanced,
    /// none goes to a backend it no longer has); with no room for its
    /// source ranges it keeps the ranges it has (its previous consistent
    /// state: none, for a new frontend). Such a frontend is counted and
    /// retried by every apply until its entries fit.
    fn fit_aux(
        &mut self,
        key: &FrontendKey,
        rev_nat: RevNatIndex,
        want: &DesiredFrontend,
        slots: &[BackendId],
        known: Option<&Frontend>,
        room: &mut [usize; 2],
    ) -> (u16, u32, Vec<Aux>) {
        let mut flags = want.flags;
        let mut timeout = want.affinity_timeout;
        let mut aux = aux_entries(key, rev_nat, flags, &want.source_ranges, slots);
        let adds = |aux: &[Aux]| {
            aux_counts(
                aux.iter()
                    .filter(|a| known.is_none_or(|f| f.aux.binary_search(a).is_err())),
            )
        };
        let mut degraded = [false; 2];
        let wanted = adds(&aux);
        if wanted[AuxKind::SourceRange as usize] > room[AuxKind::SourceRange as usize] {
            degraded[AuxKind::SourceRange as usize] = true;
            let had = known.map_or(0, |f| f.flags & svc_flags::SOURCE_RANGES);
            flags = (flags & !svc_flags::SOURCE_RANGES) | had;
            aux.retain(|a| AuxKind::of(a) != AuxKind::SourceRange);
            aux.extend(
                known
                    .into_iter()
                    .flat_map(|f| f.aux.iter())
                    .filter(|a| AuxKind::of(a) == AuxKind::SourceRange)
                    .copied(),
            );
        }
        if wanted[AuxKind::AffinityMatch as usize] > room[AuxKind::AffinityMatch as usize] {
            degraded[AuxKind::AffinityMatch as usize] = true;
            flags &= !svc_flags::AFFINITY;
            timeout = 0;
            aux.retain(|a| AuxKind::of(a) != AuxKind::AffinityMatch);
        }
        aux.sort();
        aux.dedup();
        for (r, n) in room.iter_mut().zip(adds(&aux)) {
            *r = r.saturating_sub(n);
        }
        if degraded.iter().any(|d| *d) {
            let before = self.degraded.insert(*key, degraded).unwrap_or_default();
            for kind in AuxKind::ALL {
                let k = kind as usize;
                if degraded[k] && !before[k] {
                    self.degraded_total[k] += 1;
                    log::warn!(
                        "{} is full: frontend {}:{} is programmed without {}; raise --max-{} (retried until it fits)",
                        kind.map(),
                        key.address,
                        key.port,
                        match kind {
                            AuxKind::SourceRange => "its new loadBalancerSourceRanges",
                            AuxKind::AffinityMatch => "session affinity",
                        },
                        match kind {
                            AuxKind::SourceRange => "source-ranges",
                            AuxKind::AffinityMatch => "affinity-matches",
                        }
                    );
                }
            }
        } else {
            self.degraded.remove(key);
        }
        (flags, timeout, aux)
    }

    /// Applies the verification's findings (see [`verify_chunk`] and
    /// [`verify_all`]); what fails stays for the next apply.
    ///
    /// [`verify_chunk`]: Self::verify_chunk
    /// [`verify_all`]: Self::verify_all
    fn repair(&mut self, dp: &mut dyn Dataplane, report: &mut SyncReport) {
        for index in std::mem::take(&mut self.stray_rev_nat) {
            match dp.delete_rev_nat(index) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    log::warn!("deleting stray rev-NAT entry {index}: {e}");
                    self.stray_rev_nat.push(index);
                    report.failed_deletes += 1;
                }
            }
        }
        for id in std::mem::take(&mut self.stray_backends) {
            match dp.delete_backend(id) {
                Ok(()) => report.deletes += 1,
                Err(e) => {
                    log::warn!("deleting stray backend {id}: {e}");
                    self.stray_backends.push(id);
                    report.failed_deletes += 1;
                }
            }
        }
        for id in std::mem::take(&mut self.rewrite_backends) {
            let Some((addr, flags)) = self
                .backend_addrs
                .get(&id)
                .and_then(|a| self.backends.get(a).map(|b| (*a, b.flags)))
            else {
                continue;
            };
            match dp.upsert_backend(id, &backend_value(&addr, flags)) {
                Ok(()) => report.writes += 1,
                Err(e) => {
                    log::warn!("rewriting backend {id}: {e}");
                    self.rewrite_backends.insert(id);
                }
            }
        }
        let revs: Vec<((Ipv4Addr, u16), RevNatIndex)> = self
            .rev_nat
            .iter()
            .filter(|(_, r)| self.rewrite_rev_nat.contains(&r.index))
            .map(|(k, r)| (*k, r.index))
            .collect();
        self.rewrite_rev_nat.clear();
        for ((address, port), index) in revs {
            let value = RevNatValue {
                address_be: be_addr(address),
                port_be: port.to_be(),
                pad: [0; 2],
            };
            match dp.upsert_rev_nat(index, &value) {
                Ok(()) => report.writes += 1,
                Err(e) => {
                    log::warn!("rewriting rev-NAT entry {index}: {e}");
                    self.rewrite_rev_nat.insert(index);
                }
            }
        }
    }

    /// Drops from the strays the slots and auxiliary entries that a
    /// programmed frontend has (its slots `1..=count`, its aux entries): a
    /// crashed agent's leftovers whose keys a frontend written since uses.
    fn forget_owned_strays(&mut self) {
        let frontends = &self.frontends;
        self.stray_slots.retain(|k| {
            let fk = FrontendKey {
                address: from_be_addr(k.address_be),
                port: u16::from_be(k.port_be),
                proto: k.proto,
                scope: k.scope,
            };
            frontends
                .get(&fk)
                .is_none_or(|f| usize::from(k.backend_slot) > f.slots.len())
        });
        if self.stray_aux.is_empty() {
            return;
        }
        let owned: HashSet<Aux> = self
            .frontends
            .values()
            .flat_map(|f| f.aux.iter().copied())
            .collect();
        self.stray_aux.retain(|a| !owned.contains(a));
    }

    fn sync_cluster_ips(&mut self, dp: &mut dyn Dataplane, report: &mut SyncReport) {
        if self.cluster_ips_dirty.is_empty() {
            return;
        }
        let dirty = std::mem::take(&mut self.cluster_ips_dirty);
        let adds: Vec<Ipv4Addr> = dirty
            .iter()
            .filter(|ip| self.cluster_ip_refs.contains_key(ip) && !self.cluster_ips.contains(ip))
            .copied()
            .collect();
        let dels: Vec<Ipv4Addr> = dirty
            .iter()
            .filter(|ip| !self.cluster_ip_refs.contains_key(ip) && self.cluster_ips.contains(ip))
            .copied()
            .collect();
        let done = |r: Result<(), BatchError>, n: usize| match r {
            Ok(()) => n,
            Err(e) => {
                log::warn!("cluster IPs: {e}: {}", e.source);
                e.index
            }
        };
        let written = done(dp.upsert_cluster_ips(&adds), adds.len());
        report.writes += written;
        self.cluster_ips.extend(adds[..written].iter().copied());
        self.cluster_ips_dirty
            .extend(adds[written..].iter().copied());
        let deleted = done(dp.delete_cluster_ips(&dels), dels.len());
        report.deletes += deleted;
        for ip in &dels[..deleted] {
            self.cluster_ips.remove(ip);
        }
        self.cluster_ips_dirty
            .extend(dels[deleted..].iter().copied());
        if written < adds.len() || deleted < dels.len() {
            report.failed_deletes += dels.len() - deleted;
            report.failed += usize::from(written < adds.len());
        }
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

#[allow(dead_code, reason = "kept for the verification resync's use of names")]
fn _name(n: &Name) -> &str {
    n
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        datapath::dataplane::fake::{FakeDataplane, Op},
        model::ServicePortName,
        model::desired::{DesiredBackend, DesiredFrontend},
    };
    use netlb_common::{proto, scope, svc_flags};

    fn fe(last: u8) -> FrontendKey {
        FrontendKey {
            address: Ipv4Addr::new(10, 96, 0, last),
            port: 80,
            proto: proto::TCP,
            scope: scope::EXTERNAL,
        }
    }

    fn backend(last: u8) -> DesiredBackend {
        DesiredBackend {
            addr: BackendAddr {
                address: Ipv4Addr::new(10, 244, 0, last),
                port: 9376,
                proto: proto::TCP,
            },
            flags: 0,
        }
    }

    fn desired(services: &[(u8, &[u8])]) -> DesiredState {
        let mut state = DesiredState::default();
        for (vip, backends) in services {
            state.frontends.insert(
                fe(*vip),
                DesiredFrontend {
                    service: ServicePortName {
                        namespace: "default".into(),
                        name: format!("svc{vip}").into(),
                        port_name: "".into(),
                        protocol: "TCP".into(),
                    },
                    flags: svc_flags::CLUSTER_IP,
                    backends: backends.iter().map(|b| backend(*b)).collect(),
                    source_ranges: vec![],
                    affinity_timeout: 0,
                },
            );
        }
        state
    }

    /// Frontend 10 as a load-balancer IP admitting `ranges` (/24s of
    /// 192.0.2.x... given by their third octet).
    fn with_ranges(ranges: &[u8]) -> DesiredState {
        let mut state = desired(&[(10, &[1, 2])]);
        let fe = state.frontends.get_mut(&fe(10)).unwrap();
        if !ranges.is_empty() {
            fe.flags = svc_flags::LOAD_BALANCER | svc_flags::SOURCE_RANGES;
        }
        fe.source_ranges = ranges
            .iter()
            .map(|r| (Ipv4Addr::new(198, 51, *r, 0), 24))
            .collect();
        state
    }

    /// Frontend 10 with `backends`, with session affinity of `timeout`
    /// seconds when given.
    fn with_affinity(backends: &[u8], timeout: Option<u32>) -> DesiredState {
        let mut state = desired(&[(10, backends)]);
        let fe = state.frontends.get_mut(&fe(10)).unwrap();
        if let Some(t) = timeout {
            fe.flags |= svc_flags::AFFINITY;
            fe.affinity_timeout = t;
        }
        state
    }

    fn matches(dp: &FakeDataplane) -> Vec<u32> {
        dp.affinity_matches.iter().map(|m| m.backend_id).collect()
    }

    /// Entries damaged by hand (a slot pointing elsewhere, a header with
    /// another count, a backend rewritten, a rev-NAT entry deleted, an
    /// affinity match deleted, a cluster IP deleted, strays added) are all
    /// found by the verification, counted by map, and repaired by the next
    /// apply: the maps then equal a fresh sync's.
    #[test]
    fn the_verification_finds_and_repairs_every_damaged_entry() {
        let want = {
            let mut w = with_affinity(&[1, 2, 3], Some(60));
            w.frontends
                .extend(desired(&[(11, &[4, 5]), (12, &[6])]).frontends);
            w
        };
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        syncer.sync(&mut dp, &want).unwrap();
        let mut fresh = FakeDataplane::new();
        Syncer::new().sync(&mut fresh, &want).unwrap();
        assert_eq!(dp.services, fresh.services);
        // Nothing to repair in a healthy datapath.
        let (_, repairs) = syncer.verify_chunk(&dp, None, usize::MAX).unwrap();
        assert!(repairs.is_empty(), "{repairs:?}");
        assert!(syncer.verify_all(&dp.dump().unwrap()).is_empty());
        // Damage.
        let slot = service_key(&fe(11), 2);
        dp.services.get_mut(&slot).unwrap().backend_id = 99;
        dp.services.get_mut(&service_key(&fe(12), 0)).unwrap().count = 7;
        let id = dp.services[&service_key(&fe(10), 1)].backend_id;
        dp.backends.get_mut(&id).unwrap().port_be = 1234u16.to_be();
        let rev = dp.services[&service_key(&fe(11), 0)].rev_nat_index;
        dp.rev_nat.remove(&rev);
        let m = *dp.affinity_matches.iter().next().unwrap();
        dp.affinity_matches.remove(&m);
        dp.cluster_ips.remove(&fe(12).address);
        dp.services
            .insert(service_key(&fe(13), 0), ServiceValue::default());
        dp.services
            .insert(service_key(&fe(10), 9), ServiceValue::default());
        dp.backends.insert(77, BackendValue::default());
        dp.rev_nat.insert(55, RevNatValue::default());
        // Found, by map.
        let (last, mut repairs) = syncer.verify_chunk(&dp, None, 2).unwrap();
        assert_eq!(last, Some(fe(11)));
        let (last, more) = syncer.verify_chunk(&dp, last, 2).unwrap();
        assert_eq!(last, Some(fe(12)));
        for (map, n) in more
            .into_iter()
            .chain(syncer.verify_all(&dp.dump().unwrap()))
        {
            *repairs.entry(map).or_default() += n;
        }
        use netlb_common::map_names;
        assert_eq!(
            repairs,
            Repairs::from([
                (map_names::SERVICES, 2 + 2),
                (map_names::BACKENDS, 1 + 1),
                (map_names::REV_NAT, 1 + 1),
                (map_names::AFFINITY_MATCH, 1),
                (map_names::CLUSTER_IPS, 1),
            ])
        );
        // Repaired.
        let report = syncer.apply(&mut dp).unwrap();
        assert_eq!(report.failed, 0);
        dp.check_consistent().unwrap();
        dp.check_affinity_matches().unwrap();
        assert_eq!(dp.services, fresh.services);
        assert_eq!(dp.backends, fresh.backends);
        assert_eq!(dp.rev_nat, fresh.rev_nat);
        assert_eq!(dp.affinity_matches, fresh.affinity_matches);
        assert_eq!(dp.cluster_ips, fresh.cluster_ips);
        // And found nothing more.
        let (_, repairs) = syncer.verify_chunk(&dp, None, usize::MAX).unwrap();
        assert!(repairs.is_empty(), "{repairs:?}");
        assert!(syncer.verify_all(&dp.dump().unwrap()).is_empty());
    }

    /// A full affinity-match map: a Service that does not fit is programmed
    /// without affinity (its endpoints right), one that fits keeps it, a
    /// rolling update of either never leaves a removed backend in its
    /// slots, and the counts say what is in use; once room appears the
    /// degraded frontend gets its affinity back.
    #[test]
    fn a_full_affinity_map_leaves_every_service_consistent_and_is_counted() {
        let both = |a: &[u8], b: &[u8]| {
            let mut w = with_affinity(a, Some(60));
            let mut second = with_affinity(b, Some(60));
            let fe11 = second.frontends.remove(&fe(10)).unwrap();
            w.frontends.insert(
                fe(11),
                DesiredFrontend {
                    service: ServicePortName {
                        name: "svc11".into(),
                        ..fe11.service.clone()
                    },
                    ..fe11
                },
            );
            w
        };
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        syncer.set_aux_capacity(16, 3);
        syncer.sync(&mut dp, &both(&[1, 2], &[3, 4])).unwrap();
        dp.check_consistent().unwrap();
        dp.check_affinity_matches().unwrap();
        // svc10 got its two matches; svc11's two would not fit.
        let head = |dp: &FakeDataplane, vip| dp.services[&service_key(&fe(vip), 0)];
        assert_ne!(head(&dp, 10).flags & svc_flags::AFFINITY, 0);
        assert_eq!(head(&dp, 11).flags & svc_flags::AFFINITY, 0);
        assert_eq!(head(&dp, 11).count, 2);
        assert_eq!(syncer.aux_count(AuxKind::AffinityMatch), 2);
        assert_eq!(dp.affinity_matches.len(), 2);
        assert_eq!(syncer.degraded(AuxKind::AffinityMatch), (1, 1));
        // A rolling update of both: backends 1 and 3 go, 5 and 6 come.
        syncer.sync(&mut dp, &both(&[2, 5], &[4, 6])).unwrap();
        dp.check_consistent().unwrap();
        dp.check_affinity_matches().unwrap();
        let ids_of = |dp: &FakeDataplane, vip| -> BTreeSet<BackendId> {
            (1..=head(dp, vip).count)
                .map(|s| dp.services[&service_key(&fe(vip), s)].backend_id)
                .collect()
        };
        let addrs = |syncer: &Syncer, b: &[u8]| -> BTreeSet<BackendId> {
            b.iter()
                .map(|b| syncer.backend_id(&backend(*b).addr).unwrap())
                .collect()
        };
        assert_eq!(ids_of(&dp, 10), addrs(&syncer, &[2, 5]));
        assert_eq!(ids_of(&dp, 11), addrs(&syncer, &[4, 6]));
        assert!(dp.affinity_matches.len() <= 3);
        assert_eq!(syncer.degraded(AuxKind::AffinityMatch), (1, 1));
        // svc10 goes: its matches are deleted after the step's headers, so
        // svc11 gets its own at the next apply (the retry).
        let mut only11 = both(&[2, 5], &[4, 6]);
        only11.frontends.remove(&fe(10));
        syncer.sync(&mut dp, &only11).unwrap();
        assert!(syncer.has_pending());
        syncer.apply(&mut dp).unwrap();
        dp.check_consistent().unwrap();
        dp.check_affinity_matches().unwrap();
        assert_ne!(head(&dp, 11).flags & svc_flags::AFFINITY, 0);
        assert_eq!(syncer.degraded(AuxKind::AffinityMatch), (0, 1));
        assert_eq!(syncer.aux_count(AuxKind::AffinityMatch), 2);
    }

    #[test]
    fn cluster_ips_are_counted_by_their_frontends_and_follow_them() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        // Two ports of one cluster IP: one entry, written after the headers.
        let mut want = desired(&[(10, &[1])]);
        let mut second = want.frontends[&fe(10)].clone();
        second.service.port_name = "second".into();
        want.frontends
            .insert(FrontendKey { port: 81, ..fe(10) }, second);
        syncer.sync(&mut dp, &want).unwrap();
        let ops = dp.take_ops();
        let ip = fe(10).address;
        let written = position(&ops, &Op::UpsertClusterIp(ip));
        assert!(written > position(&ops, &slot0(10)), "{ops:?}");
        assert_eq!(dp.cluster_ips.iter().copied().collect::<Vec<_>>(), vec![ip]);
        // One port goes: the address stays.
        syncer.sync(&mut dp, &desired(&[(10, &[1])])).unwrap();
        assert!(dp.cluster_ips.contains(&ip));
        // A restarted agent keeps it and deletes what no Service has.
        dp.cluster_ips.insert(Ipv4Addr::new(10, 96, 0, 99));
        let mut adopted = Syncer::adopt(&dp).unwrap();
        adopted.sync(&mut dp, &desired(&[(10, &[1])])).unwrap();
        assert_eq!(dp.cluster_ips.iter().copied().collect::<Vec<_>>(), vec![ip]);
        // The Service goes: its frontend first, then the address.
        dp.take_ops();
        adopted.sync(&mut dp, &DesiredState::default()).unwrap();
        let ops = dp.take_ops();
        let head = ops
            .iter()
            .position(|o| *o == Op::DeleteService(service_key(&fe(10), 0)))
            .unwrap();
        assert!(position(&ops, &Op::DeleteClusterIp(ip)) > head, "{ops:?}");
        assert!(dp.cluster_ips.is_empty());
    }

    #[test]
    fn affinity_matches_follow_the_slots_make_before_break() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        syncer.sync(&mut dp, &with_affinity(&[1, 2], None)).unwrap();
        assert!(dp.affinity_matches.is_empty());
        // On: a match per backend, before the header that carries the flag
        // and the timeout.
        dp.take_ops();
        syncer
            .sync(&mut dp, &with_affinity(&[1, 2], Some(10_800)))
            .unwrap();
        let ops = dp.take_ops();
        let header = position(&ops, &slot0(10));
        assert!(
            ops.iter()
                .enumerate()
                .filter(|(_, o)| matches!(o, Op::UpsertAux(Aux::AffinityMatch(_))))
                .all(|(i, _)| i < header)
        );
        assert_eq!(matches(&dp).len(), 2);
        assert_eq!(dp.services[&service_key(&fe(10), 0)].backend_id, 10_800);
        dp.check_consistent().unwrap();
        // A backend replaced: its match goes after the slot moved away.
        syncer
            .sync(&mut dp, &with_affinity(&[1, 3], Some(10_800)))
            .unwrap();
        dp.check_consistent().unwrap();
        assert_eq!(matches(&dp).len(), 2);
        let ids: Vec<u32> = (1..=2)
            .map(|s| dp.services[&service_key(&fe(10), s)].backend_id)
            .collect();
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(matches(&dp), sorted);
        // Only the timeout changes: the header alone.
        dp.take_ops();
        syncer
            .sync(&mut dp, &with_affinity(&[1, 3], Some(60)))
            .unwrap();
        assert_eq!(dp.take_ops(), vec![slot0(10)]);
        // Off: the header first, then every match.
        syncer.sync(&mut dp, &with_affinity(&[1, 3], None)).unwrap();
        assert!(dp.affinity_matches.is_empty());
        assert_eq!(dp.services[&service_key(&fe(10), 0)].backend_id, 0);
        // Adopted by a restarted agent: nothing to write.
        syncer
            .sync(&mut dp, &with_affinity(&[1, 3], Some(5)))
            .unwrap();
        let mut adopted = Syncer::adopt(&dp).unwrap();
        let report = adopted
            .sync(&mut dp, &with_affinity(&[1, 3], Some(5)))
            .unwrap();
        assert_eq!((report.writes, report.deletes), (0, 0));
    }

    #[test]
    fn source_ranges_are_written_before_the_header_that_needs_them_and_deleted_after() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        syncer.sync(&mut dp, &with_ranges(&[])).unwrap();
        // Turned on: both ranges, then the header with the flag.
        dp.take_ops();
        syncer.sync(&mut dp, &with_ranges(&[1, 2])).unwrap();
        let ops = dp.take_ops();
        let header = position(&ops, &slot0(10));
        let ranges: Vec<usize> = ops
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Op::UpsertAux(Aux::SourceRange(_))))
            .map(|(i, _)| i)
            .collect();
        assert_eq!(ranges.len(), 2, "{ops:?}");
        assert!(ranges.iter().all(|i| *i < header), "{ops:?}");
        dp.check_consistent().unwrap();
        // One range replaced: the new one is written, the old one deleted,
        // the header untouched.
        syncer.sync(&mut dp, &with_ranges(&[2, 3])).unwrap();
        let ops = dp.take_ops();
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, Op::UpsertAux(Aux::SourceRange(_))))
                .count(),
            1,
            "{ops:?}"
        );
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, Op::DeleteAux(Aux::SourceRange(_))))
                .count(),
            1,
            "{ops:?}"
        );
        assert!(!ops.contains(&slot0(10)));
        // Turned off: the header loses the flag first, then the ranges go.
        syncer.sync(&mut dp, &with_ranges(&[])).unwrap();
        let ops = dp.take_ops();
        let header = position(&ops, &slot0(10));
        assert!(
            ops.iter()
                .enumerate()
                .filter(|(_, o)| matches!(o, Op::DeleteAux(Aux::SourceRange(_))))
                .all(|(i, _)| i > header),
            "{ops:?}"
        );
        assert!(dp.source_ranges.is_empty());
        // A restarted agent adopts them; an unchanged resync writes nothing.
        syncer.sync(&mut dp, &with_ranges(&[4])).unwrap();
        let mut adopted = Syncer::adopt(&dp).unwrap();
        dp.take_ops();
        let report = adopted.sync(&mut dp, &with_ranges(&[4])).unwrap();
        assert_eq!((report.writes, report.deletes), (0, 0), "{:?}", dp.ops);
        // Deleting the Service deletes its ranges.
        adopted.sync(&mut dp, &DesiredState::default()).unwrap();
        assert!(dp.source_ranges.is_empty());
        assert!(dp.services.is_empty());
    }

    fn slot0(vip: u8) -> Op {
        Op::UpsertService(service_key(&fe(vip), 0))
    }

    fn position(ops: &[Op], op: &Op) -> usize {
        ops.iter()
            .position(|o| o == op)
            .unwrap_or_else(|| panic!("{op:?} not in {ops:?}"))
    }

    #[test]
    fn first_sync_writes_backends_then_slots_then_frontend() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        let report = syncer.sync(&mut dp, &desired(&[(10, &[1, 2, 3])])).unwrap();
        let ops = dp.take_ops();
        // 3 backends, the rev-NAT entry, 3 slots, the header, the cluster IP.
        assert_eq!(report.writes, 3 + 1 + 3 + 1 + 1, "{ops:?}");
        assert_eq!(report.deletes, 0);
        let frontend = position(&ops, &slot0(10));
        for slot in 1..=3 {
            assert!(position(&ops, &Op::UpsertService(service_key(&fe(10), slot))) < frontend);
        }
        for id in 1..=3 {
            assert!(position(&ops, &Op::UpsertBackend(id)) < frontend);
        }
        assert!(position(&ops, &Op::UpsertRevNat(1)) < frontend);
        dp.check_consistent().unwrap();
    }

    #[test]
    fn unchanged_resync_is_free() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        let want = desired(&[(10, &[1, 2, 3]), (11, &[])]);
        syncer.sync(&mut dp, &want).unwrap();
        dp.take_ops();
        let report = syncer.sync(&mut dp, &want).unwrap();
        assert_eq!((report.writes, report.deletes), (0, 0));
        assert!(dp.ops.is_empty());
    }

    #[test]
    fn adding_one_endpoint_is_three_writes() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        syncer.sync(&mut dp, &desired(&[(10, &[1, 2, 3])])).unwrap();
        dp.take_ops();
        let report = syncer
            .sync(&mut dp, &desired(&[(10, &[1, 2, 3, 4])]))
            .unwrap();
        let ops = dp.take_ops();
        assert_eq!(
            ops,
            vec![
                Op::UpsertBackend(4),
                Op::UpsertService(service_key(&fe(10), 4)),
                slot0(10),
            ]
        );
        assert_eq!((report.writes, report.deletes), (3, 0));
        dp.check_consistent().unwrap();
    }

    #[test]
    fn removing_one_endpoint_moves_the_last_slot() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        syncer.sync(&mut dp, &desired(&[(10, &[1, 2, 3])])).unwrap();
        dp.take_ops();
        // Backend 1 (id 1, slot 1) goes; backend 3 moves into slot 1.
        syncer.sync(&mut dp, &desired(&[(10, &[2, 3])])).unwrap();
        let ops = dp.take_ops();
        assert_eq!(
            ops,
            vec![
                Op::UpsertService(service_key(&fe(10), 1)),
                slot0(10),
                Op::DeleteService(service_key(&fe(10), 3)),
                Op::DeleteBackend(1),
            ]
        );
        assert_eq!(dp.services[&service_key(&fe(10), 1)].backend_id, 3);
        assert_eq!(dp.services[&service_key(&fe(10), 0)].count, 2);
        dp.check_consistent().unwrap();
    }

    #[test]
    fn deleting_a_service_deletes_frontend_first_then_slots_rev_nat_backends() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        syncer
            .sync(&mut dp, &desired(&[(10, &[1, 2]), (11, &[2])]))
            .unwrap();
        dp.take_ops();
        syncer.sync(&mut dp, &desired(&[(11, &[2])])).unwrap();
        let ops = dp.take_ops();
        assert_eq!(ops[0], Op::DeleteService(service_key(&fe(10), 0)));
        let rev = position(&ops, &Op::DeleteRevNat(1));
        let backend = position(&ops, &Op::DeleteBackend(1));
        for slot in 1..=2 {
            assert!(position(&ops, &Op::DeleteService(service_key(&fe(10), slot))) < rev);
        }
        assert!(rev < backend);
        // Backend 2 is still used by svc11.
        assert!(!ops.contains(&Op::DeleteBackend(2)));
        // And the cluster IP, after the frontend.
        assert!(position(&ops, &Op::DeleteClusterIp(fe(10).address)) > 0);
        assert_eq!(ops.len(), 6, "{ops:?}");
        dp.check_consistent().unwrap();
    }

    #[test]
    fn adoption_keeps_ids_and_rewrites_nothing() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        let want = desired(&[(10, &[1, 2, 3]), (11, &[3, 4]), (12, &[])]);
        syncer.sync(&mut dp, &want).unwrap();
        dp.take_ops();
        let mut adopted = Syncer::adopt(&dp).unwrap();
        let report = adopted.sync(&mut dp, &want).unwrap();
        assert_eq!((report.writes, report.deletes), (0, 0), "{:?}", dp.ops);
        for b in [1, 2, 3, 4] {
            assert_eq!(
                adopted.backend_id(&backend(b).addr),
                syncer.backend_id(&backend(b).addr)
            );
        }
        // A new backend after adoption gets a fresh id, not a used one.
        adopted
            .sync(
                &mut dp,
                &desired(&[(10, &[1, 2, 3, 5]), (11, &[3, 4]), (12, &[])]),
            )
            .unwrap();
        assert_eq!(adopted.backend_id(&backend(5).addr), Some(5));
        dp.check_consistent().unwrap();
    }

    #[test]
    fn a_released_backend_id_is_reused_only_after_a_sweep_finds_it_unused() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        syncer.sync(&mut dp, &desired(&[(10, &[1, 2])])).unwrap();
        // Backend 1 (id 1) goes: a UDP DNS pod replaced, say.
        syncer.sync(&mut dp, &desired(&[(10, &[2])])).unwrap();
        let released_in = syncer.generation();
        // Another Service gets a new endpoint: it must not get id 1, which
        // tracked connections may still name.
        syncer
            .sync(&mut dp, &desired(&[(10, &[2]), (11, &[3])]))
            .unwrap();
        assert_eq!(syncer.backend_id(&backend(3).addr), Some(3));
        // A sweep that started before the release cannot vouch for id 1.
        assert_eq!(
            syncer.reclaim(&BTreeSet::new(), &BTreeSet::new(), released_in - 1),
            0
        );
        // A later sweep that still sees a connection on id 1 keeps it too.
        assert_eq!(
            syncer.reclaim(&BTreeSet::from([1]), &BTreeSet::new(), released_in),
            0
        );
        syncer
            .sync(&mut dp, &desired(&[(10, &[2]), (11, &[3, 4])]))
            .unwrap();
        assert_eq!(syncer.backend_id(&backend(4).addr), Some(4));
        // Once no connection names it, it is free again, counters zeroed.
        assert_eq!(
            syncer.reclaim(&BTreeSet::new(), &BTreeSet::new(), released_in),
            1
        );
        syncer
            .sync(&mut dp, &desired(&[(10, &[2]), (11, &[3, 4, 5])]))
            .unwrap();
        assert_eq!(syncer.backend_id(&backend(5).addr), Some(1));
        assert_eq!(dp.stats_reset.last(), Some(&1));
        assert_eq!(syncer.quarantined(), 0);
        dp.check_consistent().unwrap();
    }

    #[test]
    fn adopted_gaps_wait_for_the_first_sweep() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        syncer.sync(&mut dp, &desired(&[(10, &[1, 2, 3])])).unwrap();
        syncer.sync(&mut dp, &desired(&[(10, &[3])])).unwrap();
        let mut adopted = Syncer::adopt(&dp).unwrap();
        adopted.sync(&mut dp, &desired(&[(10, &[3, 4])])).unwrap();
        assert_eq!(adopted.backend_id(&backend(4).addr), Some(4));
        adopted.reclaim(&BTreeSet::from([2]), &BTreeSet::new(), 0);
        adopted
            .sync(&mut dp, &desired(&[(10, &[3, 4, 5])]))
            .unwrap();
        assert_eq!(adopted.backend_id(&backend(5).addr), Some(1));
    }

    #[test]
    fn adoption_removes_stale_entries() {
        let mut dp = FakeDataplane::new();
        let mut syncer = Syncer::new();
        syncer
            .sync(&mut dp, &desired(&[(10, &[1, 2]), (11, &[3])]))
            .unwrap();
        // A slot left behind by a crash.
        dp.services.insert(
            service_key(&fe(10), 7),
            ServiceValue {
                backend_id: 2,
                ..Default::default()
            },
        );
        let mut adopted = Syncer::adopt(&dp).unwrap();
        adopted.sync(&mut dp, &desired(&[(10, &[1, 2])])).unwrap();
        assert!(!dp.services.contains_key(&service_key(&fe(10), 7)));
        assert!(!dp.services.contains_key(&service_key(&fe(11), 0)));
        assert_eq!(dp.backends.len(), 2);
        assert_eq!(dp.rev_nat.len(), 1);
        dp.check_consistent().unwrap();
    }

    #[test]
    fn failures_mid_sync_converge_on_retry() {
        let from = desired(&[(10, &[1, 2, 3]), (11, &[4])]);
        let to = desired(&[(10, &[2, 3, 5, 6]), (12, &[4, 7])]);
        // Fail each operation of the transition in turn.
        for fail_at in 0..20 {
            let mut dp = FakeDataplane::new();
            let mut syncer = Syncer::new();
            syncer.sync(&mut dp, &from).unwrap();
            dp.fail_at = Some(dp.ops.len() + fail_at);
            // Keep the attempt counter aligned: it counts from the start.
            let first = syncer.sync(&mut dp, &to).unwrap();
            dp.check_consistent()
                .unwrap_or_else(|e| panic!("fail_at {fail_at}: {e}"));
            if dp.fail_at.is_some() {
                // The transition has fewer operations than that.
                assert_eq!((first.failed, first.failed_deletes), (0, 0));
                continue;
            }
            assert!(
                first.failed + first.failed_deletes > 0,
                "fail_at {fail_at}: {first:?}"
            );
            syncer.sync(&mut dp, &to).unwrap();
            dp.check_consistent().unwrap();
            let mut fresh = FakeDataplane::new();
            Syncer::new().sync(&mut fresh, &to).unwrap();
            let shape = |d: &FakeDataplane| {
                let mut fronts: Vec<(ServiceKey, u16, u16)> = d
                    .services
                    .iter()
                    .filter(|(k, _)| k.backend_slot == 0)
                    .map(|(k, v)| (*k, v.count, v.flags))
                    .collect();
                fronts.sort();
                (fronts, d.services.len(), d.backends.len(), d.rev_nat.len())
            };
            assert_eq!(shape(&dp), shape(&fresh), "fail_at {fail_at}");
            let report = syncer.sync(&mut dp, &to).unwrap();
            assert_eq!((report.writes, report.deletes), (0, 0), "fail_at {fail_at}");
        }
    }
}
