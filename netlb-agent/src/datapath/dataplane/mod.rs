//! The only seam between the agent and the kernel.
//!
//! The sync step talks to a [`Dataplane`]; the real one writes the pinned BPF
//! maps ([`kernel::AyaDataplane`]), tests use the
//! in-memory [`fake::FakeDataplane`].

pub mod fake;
pub mod kernel;
pub mod raw;

use netlb_common::{
    AffinityMatchKey, BackendValue, CtEntry4, CtKey4, RevNatValue, ServiceKey, ServiceValue,
    SourceRangeKey,
};

/// Backend id: key of the `BACKENDS` map, `1..=MAX_BACKENDS`.
pub type BackendId = u32;
/// Reverse NAT index: key of the `REV_NAT` map, `1..=MAX_REV_NAT`.
pub type RevNatIndex = u32;

/// An entry of the `SOURCE_RANGES` trie: (prefix length in bits,
/// including the frontend's [`SourceRangeKey::FRONTEND_BITS`], key data).
pub type SourceRange = (u32, SourceRangeKey);

/// A frontend's auxiliary entries: written before the slot-0 header that
/// uses them, deleted after the header that stops using them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Aux {
    /// loadBalancerSourceRanges (`SOURCE_RANGES`).
    SourceRange(SourceRange),
    /// A backend of a session-affinity frontend (`AFFINITY_MATCH`).
    AffinityMatch(AffinityMatchKey),
}

/// Everything currently programmed in the service maps, as read back from the
/// kernel (used to adopt pinned maps after a restart).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgrammedMaps {
    pub services: Vec<(ServiceKey, ServiceValue)>,
    pub backends: Vec<(BackendId, BackendValue)>,
    pub rev_nat: Vec<(RevNatIndex, RevNatValue)>,
    pub source_ranges: Vec<SourceRange>,
    pub affinity_matches: Vec<AffinityMatchKey>,
    pub cluster_ips: Vec<std::net::Ipv4Addr>,
}

/// Errors of a dataplane operation.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error("failed to write `{map}` entry {key}")]
    Write {
        map: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to delete `{map}` entry {key}")]
    Delete {
        map: &'static str,
        key: String,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to read map `{map}`")]
    Read {
        map: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// A batch operation that stopped at entry `index`.
#[derive(Debug, thiserror::Error)]
#[error("entry {index} of a batch")]
pub struct BatchError {
    pub index: usize,
    #[source]
    pub source: DataplaneError,
}

/// Writes to the datapath's service maps. Implementations apply each call
/// immediately and in order: the caller is responsible for make-before-break
/// ordering.
pub trait Dataplane {
    fn upsert_backend(&mut self, id: BackendId, value: &BackendValue)
    -> Result<(), DataplaneError>;
    fn delete_backend(&mut self, id: BackendId) -> Result<(), DataplaneError>;
    fn upsert_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError>;
    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError>;
    fn upsert_rev_nat(
        &mut self,
        index: RevNatIndex,
        value: &RevNatValue,
    ) -> Result<(), DataplaneError>;
    fn delete_rev_nat(&mut self, index: RevNatIndex) -> Result<(), DataplaneError>;
    /// Writes many entries of one map, in order; the kernel does it in
    /// batches (`BPF_MAP_UPDATE_BATCH`), one system call per thousands of
    /// entries. On failure, the index of the first entry not written.
    fn upsert_services(&mut self, items: &[(ServiceKey, ServiceValue)]) -> Result<(), BatchError> {
        for (i, (k, v)) in items.iter().enumerate() {
            self.upsert_service(k, v)
                .map_err(|source| BatchError { index: i, source })?;
        }
        Ok(())
    }
    fn delete_services(&mut self, keys: &[ServiceKey]) -> Result<(), BatchError> {
        for (i, k) in keys.iter().enumerate() {
            self.delete_service(k)
                .map_err(|source| BatchError { index: i, source })?;
        }
        Ok(())
    }
    fn upsert_backends(&mut self, items: &[(BackendId, BackendValue)]) -> Result<(), BatchError> {
        for (i, (k, v)) in items.iter().enumerate() {
            self.upsert_backend(*k, v)
                .map_err(|source| BatchError { index: i, source })?;
        }
        Ok(())
    }
    fn upsert_rev_nats(&mut self, items: &[(RevNatIndex, RevNatValue)]) -> Result<(), BatchError> {
        for (i, (k, v)) in items.iter().enumerate() {
            self.upsert_rev_nat(*k, v)
                .map_err(|source| BatchError { index: i, source })?;
        }
        Ok(())
    }
    /// Writes auxiliary entries, in order.
    fn upsert_aux(&mut self, items: &[Aux]) -> Result<(), BatchError>;
    /// Deletes auxiliary entries (a missing one is not an error).
    fn delete_aux(&mut self, items: &[Aux]) -> Result<(), BatchError>;
    /// Writes cluster IPs (`CLUSTER_IPS`).
    fn upsert_cluster_ips(&mut self, items: &[std::net::Ipv4Addr]) -> Result<(), BatchError>;
    /// Deletes cluster IPs (a missing one is not an error).
    fn delete_cluster_ips(&mut self, items: &[std::net::Ipv4Addr]) -> Result<(), BatchError>;
    /// Zeroes a backend id's counters (before the id is handed out again).
    fn reset_backend_stats(&mut self, id: BackendId) -> Result<(), DataplaneError>;
    /// Reads back everything programmed (adoption after a restart, and the
    /// verification resync's search for entries nothing owns).
    fn dump(&self) -> Result<ProgrammedMaps, DataplaneError>;
    /// One service map entry as the kernel holds it (verification).
    fn read_service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, DataplaneError>;
    /// One backend (verification).
    fn read_backend(&self, id: BackendId) -> Result<Option<BackendValue>, DataplaneError>;
    /// One rev-NAT entry (verification).
    fn read_rev_nat(&self, index: RevNatIndex) -> Result<Option<RevNatValue>, DataplaneError>;
}

/// The conntrack table as the garbage collector sees it.
pub trait ConntrackTable {
    /// Every entry (a snapshot; the datapath keeps writing meanwhile).
    fn entries(&self) -> Result<Vec<(CtKey4, CtEntry4)>, DataplaneError>;
    /// One entry as it is now.
    fn get(&self, key: &CtKey4) -> Result<Option<CtEntry4>, DataplaneError>;
    /// Deletes an entry; deleting a missing one is not an error.
    fn delete(&mut self, key: &CtKey4) -> Result<(), DataplaneError>;
    /// The table's size (max entries).
    fn capacity(&self) -> u32;
}

/// Seconds of `CLOCK_MONOTONIC`, the clock of the datapath's lifetimes
/// (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_now_s() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime into a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u32
}
