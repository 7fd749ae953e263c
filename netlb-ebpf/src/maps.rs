//! Map definitions. Sizes are defaults; the agent overrides them at load time
//! and pins the maps under its bpffs directory (so a restarted agent adopts
//! them). Key and value types live in netlb-common.

use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use netlb_common::{
    BackendStats, BackendValue, ConntrackKey, ConntrackValue, DatapathConfig, RevNatValue,
    ServiceKey, ServiceValue, limits, stat,
};

/// Frontends (slot 0) and backend slots (1..=count).
#[map(name = "NETLB_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(limits::MAX_SERVICE_ENTRIES, 0);

/// Backends by id.
#[map(name = "NETLB_BACKENDS")]
pub static BACKENDS: HashMap<u32, BackendValue> =
    HashMap::with_max_entries(limits::MAX_BACKENDS, 0);

/// Reverse NAT: index -> frontend address.
#[map(name = "NETLB_REV_NAT")]
pub static REV_NAT: HashMap<u32, RevNatValue> = HashMap::with_max_entries(limits::MAX_REV_NAT, 0);

/// Conntrack. LRU so it can never fill up: the least recently used flows are
/// evicted, like Cilium's CT maps.
#[map(name = "NETLB_CT")]
pub static CONNTRACK: LruHashMap<ConntrackKey, ConntrackValue> =
    LruHashMap::with_max_entries(limits::MAX_CONNTRACK, 0);

/// Per-CPU counters, indexed by `netlb_common::stat::*`.
#[map(name = "NETLB_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Per-backend counters, indexed by backend id, updated with atomic adds.
#[map(name = "NETLB_BACKEND_STATS")]
pub static BACKEND_STATS: Array<BackendStats> =
    Array::with_max_entries(limits::MAX_BACKENDS + 1, 0);

/// Runtime configuration in slot 0.
#[map(name = "NETLB_CONFIG")]
pub static CONFIG: Array<DatapathConfig> = Array::with_max_entries(1, 0);

/// Adds one to a per-CPU counter.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(ptr) = STATS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *ptr += 1 };
    }
}

/// Adds to a backend's counters.
#[inline(always)]
pub fn count_backend(id: u32, new_flow: bool) {
    if let Some(ptr) = BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: the pointer is to a live map value. The array is shared by
        // all CPUs, so the adds must be atomic; `core::sync::atomic` has no
        // `fetch_add` on the BPF target (no compare-and-swap in the target
        // spec), so the intrinsic is used directly: it lowers to
        // BPF_ATOMIC_ADD (`lock xadd`, available since v3.18).
        unsafe {
            atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*ptr).packets, 1);
            if new_flow {
                atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(&raw mut (*ptr).flows, 1);
            }
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
