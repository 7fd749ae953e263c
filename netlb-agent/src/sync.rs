//! The diff-based sync: applies the difference between what is programmed
//! and the [`DesiredState`] with the fewest map operations, in
//! make-before-break order, so the datapath never sees a frontend whose
//! slots, backends or rev-NAT entry are missing:
//!
//! 1. new or changed backends;
//! 2. new rev-NAT entries;
//! 3. per changed frontend: backend slots, then slot 0 (count, flags), then
//!    the slots beyond the new count;
//! 4. removed frontends: slot 0 first, then their slots;
//! 5. rev-NAT entries and backends nothing references any more.
//!
//! Backend ids (per backend address) and rev-NAT indices (per frontend
//! address and port) are stable: a backend keeps its slot while it stays, a
//! removed one's slot is filled by moving the last slot into it (one write),
//! and [`Syncer::adopt`] rebuilds everything from the maps, so a restarted
//! agent keeps the same ids and rewrites nothing that is already right.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use netlb_common::{
    BackendValue, RevNatValue, ServiceKey, ServiceValue, be_addr, from_be_addr, limits,
};

use crate::{
    dataplane::{BackendId, Dataplane, DataplaneError, RevNatIndex},
    desired::{BackendAddr, DesiredFrontend, DesiredState, FrontendKey},
};

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    #[error("no free backend id (all {max} in use)")]
    BackendIdsExhausted { max: u32 },
    #[error("no free rev-NAT index (all {max} in use)")]
    RevNatExhausted { max: u32 },
}

/// What one sync did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    pub writes: usize,
    pub deletes: usize,
    pub frontends: usize,
    pub backends: usize,
    pub duration: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Frontend {
    rev_nat: RevNatIndex,
    flags: u16,
    /// Backend id of slot `i + 1`; 0 = unknown (rewrite it).
    slots: Vec<BackendId>,
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

/// Flags value marking a frontend whose programmed header is unknown.
const UNKNOWN_FLAGS: u16 = u16::MAX;

/// The new slot layout: backends that stay keep their slots, a removed
/// backend's slot gets the last slot's backend (one write instead of
/// shifting), new backends are appended.
fn next_slots(old: &[BackendId], wanted: &[BackendId]) -> Vec<BackendId> {
    let wanted_set: BTreeSet<BackendId> = wanted.iter().copied().collect();
    let mut slots = old.to_vec();
    let mut i = 0;
    while i < slots.len() {
        if wanted_set.contains(&slots[i]) && !slots[..i].contains(&slots[i]) {
            i += 1;
        } else {
            slots.swap_remove(i);
        }
    }
    for id in wanted {
        if !slots.contains(id) {
            slots.push(*id);
        }
    }
    slots
}

/// Writes one frontend make-before-break: changed slots, then slot 0, then
/// deletes the slots past the new count.
fn apply_frontend(
    dp: &mut dyn Dataplane,
    key: &FrontendKey,
    old: Option<&Frontend>,
    slots: &[BackendId],
    rev_nat: RevNatIndex,
    flags: u16,
    report: &mut SyncReport,
) -> Result<(), DataplaneError> {
    let old_slots = old.map(|f| f.slots.as_slice()).unwrap_or_default();
    for (i, id) in slots.iter().enumerate() {
        if old_slots.get(i) == Some(id) {
            continue;
        }
        dp.upsert_service(
            &service_key(key, i as u16 + 1),
            &ServiceValue {
                backend_id: *id,
                ..Default::default()
            },
        )?;
        report.writes += 1;
    }
    let header_changed = match old {
        Some(f) => f.rev_nat != rev_nat || f.flags != flags || f.slots.len() != slots.len(),
        None => true,
    };
    if header_changed {
        dp.upsert_service(
            &service_key(key, 0),
            &ServiceValue {
                backend_id: 0,
                rev_nat_index: rev_nat,
                count: slots.len() as u16,
                flags,
            },
        )?;
        report.writes += 1;
    }
    for slot in slots.len()..old_slots.len() {
        dp.delete_service(&service_key(key, slot as u16 + 1))?;
        report.deletes += 1;
    }
    Ok(())
}

/// The mirror of what is programmed, and the id allocators.
#[derive(Clone, Debug)]
pub struct Syncer {
    frontends: BTreeMap<FrontendKey, Frontend>,
    backends: BTreeMap<BackendAddr, (BackendId, u8)>,
    backend_addrs: BTreeMap<BackendId, BackendAddr>,
    rev_nat: BTreeMap<(Ipv4Addr, u16), RevNatIndex>,
    backend_ids: Ids,
    rev_nat_ids: Ids,
    /// Entries found at adoption that belong to no frontend slot.
    stray_slots: Vec<ServiceKey>,
    /// Sync steps run so far (ids released by one carry its number).
    generation: u64,
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
            frontends: BTreeMap::new(),
            backends: BTreeMap::new(),
            backend_addrs: BTreeMap::new(),
            rev_nat: BTreeMap::new(),
            backend_ids: Ids::new(max_backends),
            rev_nat_ids: Ids::new(max_rev_nat),
            stray_slots: Vec::new(),
            generation: 0,
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

    /// [`Syncer::adopt`] for maps of the given sizes.
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
            syncer.backends.insert(addr, (*id, value.flags));
            syncer.backend_addrs.insert(*id, addr);
        }
        syncer
            .backend_ids
            .adopt(&maps.backends.iter().map(|(id, _)| *id).collect());
        for (index, value) in &maps.rev_nat {
            syncer.rev_nat.insert(
                (from_be_addr(value.address_be), u16::from_be(value.port_be)),
                *index,
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
                syncer.frontends.insert(
                    fe,
                    Frontend {
                        rev_nat: value.rev_nat_index,
                        flags: value.flags,
                        slots: vec![0; value.count as usize],
                    },
                );
            } else {
                slots.insert((fe, key.backend_slot), value.backend_id);
            }
        }
        for ((fe, slot), id) in slots {
            match syncer.frontends.get_mut(&fe) {
                Some(f) if (slot as usize) <= f.slots.len() => f.slots[slot as usize - 1] = id,
                _ => syncer.stray_slots.push(service_key(&fe, slot)),
            }
        }
        Ok(syncer)
    }

    /// Fast path for the common case of a resync where most frontends did
    /// not change: same header and the same (small) backend set, checked
    /// without allocating.
    fn unchanged(&self, key: &FrontendKey, want: &DesiredFrontend, rev_nat: RevNatIndex) -> bool {
        const SMALL: usize = 16;
        let Some(f) = self.frontends.get(key) else {
            return false;
        };
        f.flags == want.flags
            && f.rev_nat == rev_nat
            && f.slots.len() == want.backends.len()
            && want.backends.len() <= SMALL
            && want.backends.iter().all(|b| {
                self.backends
                    .get(&b.addr)
                    .is_some_and(|(id, _)| f.slots.contains(id))
            })
    }

    /// Number of frontends programmed.
    pub fn frontend_count(&self) -> usize {
        self.frontends.len()
    }

    /// The backend id of an address, if programmed.
    pub fn backend_id(&self, addr: &BackendAddr) -> Option<BackendId> {
        self.backends.get(addr).map(|(id, _)| *id)
    }

    /// Applies the minimal diff towards `desired`. On error the mirror still
    /// matches the maps (it is updated after each successful operation), and
    /// the next call carries on.
    pub fn sync(
        &mut self,
        dp: &mut dyn Dataplane,
        desired: &DesiredState,
    ) -> Result<SyncReport, SyncError> {
        let started = Instant::now();
        let mut report = SyncReport::default();
        self.generation += 1;
        let generation = self.generation;

        // 1. Backends.
        let mut wanted_backends: BTreeMap<BackendAddr, u8> = BTreeMap::new();
        for fe in desired.frontends.values() {
            for b in &fe.backends {
                wanted_backends.insert(b.addr, b.flags);
            }
        }
        for (addr, flags) in &wanted_backends {
            let id = match self.backends.get(addr) {
                Some((_, programmed)) if programmed == flags => continue,
                Some((id, _)) => *id,
                None => self
                    .backend_ids
                    .alloc()
                    .ok_or(SyncError::BackendIdsExhausted {
                        max: self.backend_ids.max,
                    })?,
            };
            let value = BackendValue {
                address_be: be_addr(addr.address),
                port_be: addr.port.to_be(),
                proto: addr.proto,
                flags: *flags,
            };
            let fresh = !self.backends.contains_key(addr);
            let written = if fresh {
                // A reused id starts with zeroed counters.
                dp.reset_backend_stats(id)
                    .and_then(|()| dp.upsert_backend(id, &value))
            } else {
                dp.upsert_backend(id, &value)
            };
            if let Err(e) = written {
                if fresh {
                    self.backend_ids.unuse(id);
                }
                return Err(e.into());
            }
            report.writes += 1;
            self.backends.insert(*addr, (id, *flags));
            self.backend_addrs.insert(id, *addr);
        }

        // 2. Rev-NAT entries.
        for key in desired.frontends.keys() {
            let rev = (key.address, key.port);
            if self.rev_nat.contains_key(&rev) {
                continue;
            }
            let index = self.rev_nat_ids.alloc().ok_or(SyncError::RevNatExhausted {
                max: self.rev_nat_ids.max,
            })?;
            let value = RevNatValue {
                address_be: be_addr(key.address),
                port_be: key.port.to_be(),
                pad: [0; 2],
            };
            if let Err(e) = dp.upsert_rev_nat(index, &value) {
                self.rev_nat_ids.unuse(index);
                return Err(e.into());
            }
            report.writes += 1;
            self.rev_nat.insert(rev, index);
        }

        // 3. Changed and new frontends.
        for (key, want) in &desired.frontends {
            let rev_nat = self.rev_nat[&(key.address, key.port)];
            if self.unchanged(key, want, rev_nat) {
                continue;
            }
            let wanted_ids: Vec<BackendId> = want
                .backends
                .iter()
                .take(limits::MAX_BACKENDS_PER_SERVICE as usize)
                .map(|b| self.backends[&b.addr].0)
                .collect();
            let old = self.frontends.get(key).cloned();
            let old_slots = old.as_ref().map(|f| f.slots.clone()).unwrap_or_default();
            let slots = next_slots(&old_slots, &wanted_ids);
            if let Err(e) = apply_frontend(
                dp,
                key,
                old.as_ref(),
                &slots,
                rev_nat,
                want.flags,
                &mut report,
            ) {
                // Unknown state: the next sync rewrites every slot and the
                // header, and deletes everything past the new count.
                self.frontends.insert(
                    *key,
                    Frontend {
                        rev_nat,
                        flags: UNKNOWN_FLAGS,
                        slots: vec![0; slots.len().max(old_slots.len())],
                    },
                );
                return Err(e.into());
            }
            self.frontends.insert(
                *key,
                Frontend {
                    rev_nat,
                    flags: want.flags,
                    slots,
                },
            );
        }

        // 4. Removed frontends, and stray slots found at adoption.
        let removed: Vec<FrontendKey> = self
            .frontends
            .keys()
            .filter(|k| !desired.frontends.contains_key(k))
            .copied()
            .collect();
        for key in removed {
            let count = self.frontends[&key].slots.len();
            dp.delete_service(&service_key(&key, 0))?;
            report.deletes += 1;
            self.frontends.remove(&key);
            // Its slots are unreachable now; delete them below (and on the
            // next sync if a deletion fails).
            self.stray_slots
                .extend((1..=count).rev().map(|slot| service_key(&key, slot as u16)));
        }
        while let Some(key) = self.stray_slots.last() {
            dp.delete_service(key)?;
            report.deletes += 1;
            self.stray_slots.pop();
        }

        // 5. Unreferenced rev-NAT entries and backends.
        let used_rev: BTreeSet<(Ipv4Addr, u16)> = desired
            .frontends
            .keys()
            .map(|k| (k.address, k.port))
            .collect();
        let stale_rev: Vec<((Ipv4Addr, u16), RevNatIndex)> = self
            .rev_nat
            .iter()
            .filter(|(k, _)| !used_rev.contains(k))
            .map(|(k, v)| (*k, *v))
            .collect();
        for (rev, index) in stale_rev {
            dp.delete_rev_nat(index)?;
            report.deletes += 1;
            self.rev_nat.remove(&rev);
            self.rev_nat_ids.release(index, generation);
        }
        let stale_backends: Vec<(BackendAddr, BackendId)> = self
            .backends
            .iter()
            .filter(|(addr, _)| !wanted_backends.contains_key(addr))
            .map(|(addr, (id, _))| (*addr, *id))
            .collect();
        for (addr, id) in stale_backends {
            dp.delete_backend(id)?;
            report.deletes += 1;
            self.backends.remove(&addr);
            self.backend_addrs.remove(&id);
            self.backend_ids.release(id, generation);
        }

        report.frontends = self.frontends.len();
        report.backends = self.backends.len();
        report.duration = started.elapsed();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        dataplane::fake::{FakeDataplane, Op},
        desired::{DesiredBackend, DesiredFrontend},
        model::ServicePortName,
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
                        name: format!("svc{vip}"),
                        port_name: String::new(),
                        protocol: "TCP".into(),
                    },
                    flags: svc_flags::CLUSTER_IP,
                    backends: backends.iter().map(|b| backend(*b)).collect(),
                },
            );
        }
        state
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
        assert_eq!(report.writes, 3 + 1 + 3 + 1, "{ops:?}");
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
        assert_eq!(ops.len(), 5, "{ops:?}");
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
            let first = syncer.sync(&mut dp, &to);
            dp.check_consistent()
                .unwrap_or_else(|e| panic!("fail_at {fail_at}: {e}"));
            if first.is_ok() {
                continue;
            }
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
