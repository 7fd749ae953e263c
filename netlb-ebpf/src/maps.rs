//! Map definitions. Sizes are defaults; the agent overrides them at load time
//! and pins the maps under its bpffs directory (so a restarted agent adopts
//! them). Key and value types live in netlb-common.

use aya_ebpf::{
    btf_maps,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use netlb_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, BackendStats, BackendValue, CtEntry4, CtGc,
    CtKey4, DatapathConfig, FragKey, FragPorts, RevNatValue, ServiceKey, ServiceValue, SockRevKey,
    SockRevValue, SourceRangeKey, limits, stat,
};

/// `BPF_F_NO_PREALLOC`: entries are allocated when the agent writes them.
/// For the three service maps, which the programs only read: their large
/// defaults (sized for 100k Services) cost kernel memory only as they fill.
/// The conntrack map stays preallocated: the programs insert into it, and a
/// preallocated table cannot fail an insert for want of memory.
const NO_PREALLOC: u32 = 1;

/// Frontends (slot 0) and backend slots (1..=count).
#[map(name = "NETLB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(limits::MAX_SERVICE_ENTRIES, NO_PREALLOC);

/// Backends by id.
#[map(name = "NETLB_BACKENDS")]
pub static BACKENDS: HashMap<u32, BackendValue> =
    HashMap::with_max_entries(limits::MAX_BACKENDS, NO_PREALLOC);

/// Reverse NAT: index -> frontend address.
#[map(name = "NETLB_REV_NAT")]
pub static REV_NAT: HashMap<u32, RevNatValue> =
    HashMap::with_max_entries(limits::MAX_REV_NAT, NO_PREALLOC);

/// Conntrack: a plain hash, so that the kernel never evicts part of a
/// connection (see `conntrack`); the agent garbage-collects it.
#[map(name = "NETLB_CT")]
pub static CONNTRACK: HashMap<CtKey4, CtEntry4> =
    HashMap::with_max_entries(limits::MAX_CONNTRACK, 0);

/// Per-CPU counters, indexed by `netlb_common::stat::*`.
#[map(name = "NETLB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::CAPACITY, 0);

/// Backend counters, indexed by backend id (shared by the CPUs; see
/// `BackendStats`).
#[map(name = "NETLB_BACKEND_STATS")]
pub static BACKEND_STATS: Array<BackendStats> =
    Array::with_max_entries(limits::MAX_BACKENDS + 1, 0);

/// Runtime configuration in slot 0.
#[map(name = "NETLB_CONFIG")]
pub static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

/// Pod addresses -> the ifindex of the host-side interface they live behind
/// (source validation), kept by the agent from the node's routes.
#[map(name = "NETLB_POD_SOURCES")]
pub static POD_SOURCES: HashMap<u32, u32> = HashMap::with_max_entries(limits::MAX_POD_SOURCES, 0);

/// Socket-level load balancing: (socket, backend) -> the frontend it stands
/// for. An LRU: an entry is only needed while its socket lives, and a lost
/// one only shows the backend instead of the frontend as the peer.
#[map(name = "NETLB_SOCK_REV")]
pub static SOCK_REV: LruHashMap<SockRevKey, SockRevValue> =
    LruHashMap::with_max_entries(limits::MAX_SOCK_REV, 0);

/// loadBalancerSourceRanges: (frontend, source prefix) -> 1. An LPM trie
/// (always allocated as it fills: the kernel requires `BPF_F_NO_PREALLOC`,
/// which aya-ebpf adds).
#[map(name = "NETLB_SOURCE_RANGES")]
pub static SOURCE_RANGES: LpmTrie<SourceRangeKey, u8> =
    LpmTrie::with_max_entries(limits::MAX_SOURCE_RANGES, 0);

/// Session affinity: a client's last backend per frontend. An LRU: losing
/// an entry only loses stickiness, never a connection.
#[map(name = "NETLB_AFFINITY")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::with_max_entries(limits::MAX_AFFINITY, 0);

/// Session affinity: (backend, frontend) pairs the agent keeps for every
/// affinity frontend's slots. Only read here.
#[map(name = "NETLB_AFFINITY_MATCH")]
pub static AFFINITY_MATCH: HashMap<AffinityMatchKey, u8> =
    HashMap::with_max_entries(limits::MAX_AFFINITY_MATCH, NO_PREALLOC);

/// IPv4 fragments: a datagram's ports, recorded from its first fragment
/// for the later ones (which carry no L4 header). An LRU: an entry is
/// needed for the few microseconds the datagram's fragments take.
#[map(name = "NETLB_FRAGMENTS")]
pub static FRAGMENTS: LruHashMap<FragKey, FragPorts> =
    LruHashMap::with_max_entries(limits::MAX_FRAGMENTS, 0);

/// Every cluster IP (network order) -> 1, kept by the agent: a new
/// connection to one on a port no Service defines is rejected.
#[map(name = "NETLB_CLUSTER_IPS")]
pub static CLUSTER_IPS: HashMap<u32, u8> =
    HashMap::with_max_entries(limits::MAX_CLUSTER_IPS, NO_PREALLOC);

/// The Service CIDRs (prefix of a network-order address) -> 1.
#[map(name = "NETLB_SERVICE_CIDRS")]
pub static SERVICE_CIDRS: LpmTrie<u32, u8> =
    LpmTrie::with_max_entries(limits::MAX_SERVICE_CIDRS, 0);

/// The in-kernel conntrack collector (see `gc`): its timer lives in a map
/// value, which the kernel only allows in a map with BTF, hence the one
/// BTF-defined map of the object.
#[btf_map(name = "NETLB_CT_GC")]
pub static CT_GC: btf_maps::Array<CtGc, { CtGc::SLOTS as usize }> = btf_maps::Array::new();

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(index: u32) {
    add(index, 1);
}

/// Adds `n` to a per-CPU counter.
#[inline(always)]
pub fn add(index: u32, n: u64) {
    if let Some(ptr) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *ptr += n };
    }
}

/// Counts a new flow to a backend.
#[inline(always)]
pub fn count_backend_flow(id: u32) {
    if let Some(ptr) = BACKEND_STATS.get_ptr_mut(id) {
        // Other CPUs add to the slot concurrently: an atomic add
        // (BPF_ATOMIC | BPF_ADD). core has no read-modify-write atomics for
        // the bpf target (it only declares atomic loads and stores), so the
        // instruction is written out; the verifier accepts it on map values.
        // SAFETY: `ptr` is a valid, 8-byte aligned slot of the array for the
        // program's lifetime.
        #[cfg(target_arch = "bpf")]
        unsafe {
            core::arch::asm!(
                "lock *(u64 *)({slot} + 0) += {one}",
                slot = in(reg) &raw mut (*ptr).flows,
                one = in(reg) 1u64,
            );
        }
        #[cfg(not(target_arch = "bpf"))]
        // SAFETY: as above (host builds never run the datapath).
        unsafe {
            (*ptr).flows += 1;
        }
    }
}

/// The runtime configuration (all zero, i.e. features off, when unset).
#[inline(always)]
pub fn config() -> DatapathConfig {
    match CONFIG.get(0) {
        Some(cfg) => *cfg,
        None => DatapathConfig::default(),
    }
}
