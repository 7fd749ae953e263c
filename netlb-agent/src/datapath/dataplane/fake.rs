//! An in-memory [`Dataplane`] for tests: the same maps as BTreeMaps, a log of
//! every operation in order, and failure injection.

use std::collections::{BTreeMap, BTreeSet};

use netlb_common::{BackendValue, CtEntry4, CtKey4, RevNatValue, ServiceKey, ServiceValue};

use super::{
    Aux, BackendId, BatchError, ConntrackTable, Dataplane, DataplaneError, ProgrammedMaps,
    RevNatIndex, SourceRange,
};

/// One operation, as applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    UpsertBackend(BackendId),
    DeleteBackend(BackendId),
    UpsertService(ServiceKey),
    DeleteService(ServiceKey),
    UpsertRevNat(RevNatIndex),
    DeleteRevNat(RevNatIndex),
    UpsertAux(Aux),
    DeleteAux(Aux),
    UpsertClusterIp(std::net::Ipv4Addr),
    DeleteClusterIp(std::net::Ipv4Addr),
}

impl Op {
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Self::UpsertBackend(_)
                | Self::UpsertService(_)
                | Self::UpsertRevNat(_)
                | Self::UpsertAux(_)
                | Self::UpsertClusterIp(_)
        )
    }
}

#[derive(Clone, Debug, Default)]
pub struct FakeDataplane {
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    pub backends: BTreeMap<BackendId, BackendValue>,
    pub rev_nat: BTreeMap<RevNatIndex, RevNatValue>,
    pub source_ranges: BTreeSet<SourceRange>,
    pub affinity_matches: BTreeSet<netlb_common::AffinityMatchKey>,
    pub cluster_ips: BTreeSet<std::net::Ipv4Addr>,
    pub ops: Vec<Op>,
    /// Backend ids whose counters were reset, in order.
    pub stats_reset: Vec<BackendId>,
    /// Fail the operation with this index (counting every attempted
    /// operation from 0), once.
    pub fail_at: Option<usize>,
    /// The agent is killed before the operation with this index: it and
    /// every later one never happen (they fail), until cleared.
    pub crash_at: Option<usize>,
    attempts: usize,
}

impl FakeDataplane {
    pub fn new() -> Self {
        Self::default()
    }

    /// Clears the op log.
    pub fn take_ops(&mut self) -> Vec<Op> {
        std::mem::take(&mut self.ops)
    }

    /// Operations attempted so far (`fail_at` and `crash_at` count these).
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    fn attempt(&mut self, op: Op) -> Result<(), DataplaneError> {
        let n = self.attempts;
        self.attempts += 1;
        let crashed = self.crash_at.is_some_and(|at| n >= at);
        if self.fail_at == Some(n) || crashed {
            if !crashed {
                self.fail_at = None;
            }
            let source = std::io::Error::other("injected failure");
            return Err(if op.is_write() {
                DataplaneError::Write {
                    map: "fake",
                    key: format!("{op:?}"),
                    source,
                }
            } else {
                DataplaneError::Delete {
                    map: "fake",
                    key: format!("{op:?}"),
                    source,
                }
            });
        }
        self.ops.push(op);
        Ok(())
    }

    /// Checks the invariants the datapath relies on: every frontend's slots
    /// 1..=count exist and point at existing backends, and its rev-NAT
    /// entry exists. Returns a description of the first violation.
    pub fn check_consistent(&self) -> Result<(), String> {
        for (key, value) in self.services.iter().filter(|(k, _)| k.backend_slot == 0) {
            if !self.rev_nat.contains_key(&value.rev_nat_index) {
                return Err(format!("{key:?}: rev-NAT {} missing", value.rev_nat_index));
            }
            if value.flags & netlb_common::svc_flags::SOURCE_RANGES != 0
                && !self.source_ranges.iter().any(|(_, r)| {
                    r.rev_nat_index_be == value.rev_nat_index.to_be()
                        && r.proto == key.proto
                        && r.scope == key.scope
                })
            {
                return Err(format!("{key:?}: source ranges flagged but none written"));
            }
            for slot in 1..=value.count {
                let slot_key = ServiceKey {
                    backend_slot: slot,
                    ..*key
                };
                let Some(slot_value) = self.services.get(&slot_key) else {
                    return Err(format!("{key:?}: slot {slot} missing"));
                };
                if !self.backends.contains_key(&slot_value.backend_id) {
                    return Err(format!(
                        "{key:?}: slot {slot} -> missing backend {}",
                        slot_value.backend_id
                    ));
                }
            }
        }
        Ok(())
    }
}

impl FakeDataplane {
    /// Every slot of an affinity frontend has its `AFFINITY_MATCH` entry.
    /// (Not a safety invariant: after a failed header write the old header
    /// may carry the flag over new slots, which only makes their clients
    /// choose again. It holds once a sync converged.)
    pub fn check_affinity_matches(&self) -> Result<(), String> {
        for (key, value) in self.services.iter().filter(|(k, _)| k.backend_slot == 0) {
            if value.flags & netlb_common::svc_flags::AFFINITY != 0 {
                for slot in 1..=value.count {
                    let id = self.services[&ServiceKey {
                        backend_slot: slot,
                        ..*key
                    }]
                        .backend_id;
                    let pair = netlb_common::AffinityMatchKey {
                        backend_id: id,
                        frontend: netlb_common::AffinityFrontend {
                            rev_nat_index: value.rev_nat_index,
                            proto: key.proto,
                            scope: key.scope,
                            pad: [0; 2],
                        },
                    };
                    if !self.affinity_matches.contains(&pair) {
                        return Err(format!("{key:?}: slot {slot} without its affinity match"));
                    }
                }
            }
        }
        Ok(())
    }
}

impl Dataplane for FakeDataplane {
    fn upsert_backend(
        &mut self,
        id: BackendId,
        value: &BackendValue,
    ) -> Result<(), DataplaneError> {
        self.attempt(Op::UpsertBackend(id))?;
        self.backends.insert(id, *value);
        Ok(())
    }

    fn delete_backend(&mut self, id: BackendId) -> Result<(), DataplaneError> {
        self.attempt(Op::DeleteBackend(id))?;
        self.backends.remove(&id);
        Ok(())
    }

    fn upsert_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        self.attempt(Op::UpsertService(*key))?;
        self.services.insert(*key, *value);
        Ok(())
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        self.attempt(Op::DeleteService(*key))?;
        self.services.remove(key);
        Ok(())
    }

    fn upsert_rev_nat(
        &mut self,
        index: RevNatIndex,
        value: &RevNatValue,
    ) -> Result<(), DataplaneError> {
        self.attempt(Op::UpsertRevNat(index))?;
        self.rev_nat.insert(index, *value);
        Ok(())
    }

    fn delete_rev_nat(&mut self, index: RevNatIndex) -> Result<(), DataplaneError> {
        self.attempt(Op::DeleteRevNat(index))?;
        self.rev_nat.remove(&index);
        Ok(())
    }

    fn upsert_aux(&mut self, items: &[Aux]) -> Result<(), BatchError> {
        for (index, item) in items.iter().enumerate() {
            self.attempt(Op::UpsertAux(*item))
                .map_err(|source| BatchError { index, source })?;
            match item {
                Aux::SourceRange(r) => {
                    self.source_ranges.insert(*r);
                }
                Aux::AffinityMatch(m) => {
                    self.affinity_matches.insert(*m);
                }
            }
        }
        Ok(())
    }

    fn delete_aux(&mut self, items: &[Aux]) -> Result<(), BatchError> {
        for (index, item) in items.iter().enumerate() {
            self.attempt(Op::DeleteAux(*item))
                .map_err(|source| BatchError { index, source })?;
            match item {
                Aux::SourceRange(r) => {
                    self.source_ranges.remove(r);
                }
                Aux::AffinityMatch(m) => {
                    self.affinity_matches.remove(m);
                }
            }
        }
        Ok(())
    }

    fn upsert_cluster_ips(&mut self, items: &[std::net::Ipv4Addr]) -> Result<(), BatchError> {
        for (index, ip) in items.iter().enumerate() {
            self.attempt(Op::UpsertClusterIp(*ip))
                .map_err(|source| BatchError { index, source })?;
            self.cluster_ips.insert(*ip);
        }
        Ok(())
    }

    fn delete_cluster_ips(&mut self, items: &[std::net::Ipv4Addr]) -> Result<(), BatchError> {
        for (index, ip) in items.iter().enumerate() {
            self.attempt(Op::DeleteClusterIp(*ip))
                .map_err(|source| BatchError { index, source })?;
            self.cluster_ips.remove(ip);
        }
        Ok(())
    }

    fn reset_backend_stats(&mut self, id: BackendId) -> Result<(), DataplaneError> {
        self.stats_reset.push(id);
        Ok(())
    }

    fn read_service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, DataplaneError> {
        Ok(self.services.get(key).copied())
    }

    fn read_backend(&self, id: BackendId) -> Result<Option<BackendValue>, DataplaneError> {
        Ok(self.backends.get(&id).copied())
    }

    fn read_rev_nat(&self, index: RevNatIndex) -> Result<Option<RevNatValue>, DataplaneError> {
        Ok(self.rev_nat.get(&index).copied())
    }

    fn dump(&self) -> Result<ProgrammedMaps, DataplaneError> {
        Ok(ProgrammedMaps {
            services: self.services.iter().map(|(k, v)| (*k, *v)).collect(),
            backends: self.backends.iter().map(|(k, v)| (*k, *v)).collect(),
            rev_nat: self.rev_nat.iter().map(|(k, v)| (*k, *v)).collect(),
            source_ranges: self.source_ranges.iter().copied().collect(),
            affinity_matches: self.affinity_matches.iter().copied().collect(),
            cluster_ips: self.cluster_ips.iter().copied().collect(),
        })
    }
}

/// An in-memory conntrack table.
#[derive(Debug, Default)]
pub struct FakeConntrack {
    pub entries: BTreeMap<CtKey4, CtEntry4>,
    pub capacity: u32,
    /// What the next snapshot returns instead of `entries` (a table read
    /// while the datapath kept writing: torn between buckets).
    pub torn_snapshot: Option<Vec<(CtKey4, CtEntry4)>>,
}

impl ConntrackTable for FakeConntrack {
    fn entries(&self) -> Result<Vec<(CtKey4, CtEntry4)>, DataplaneError> {
        if let Some(snapshot) = &self.torn_snapshot {
            return Ok(snapshot.clone());
        }
        Ok(self.entries.iter().map(|(k, v)| (*k, *v)).collect())
    }

    fn get(&self, key: &CtKey4) -> Result<Option<CtEntry4>, DataplaneError> {
        Ok(self.entries.get(key).copied())
    }

    fn delete(&mut self, key: &CtKey4) -> Result<(), DataplaneError> {
        self.entries.remove(key);
        Ok(())
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }
}
