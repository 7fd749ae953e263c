//! [`Dataplane`] and [`ConntrackTable`] over the real (kernel) BPF maps,
//! through aya. The batch commands, which aya 0.14 does not wrap, are the
//! agent's only raw `bpf(2)` calls: `BPF_MAP_LOOKUP_BATCH` for the conntrack
//! snapshot ([`lookup_batch`]), `BPF_MAP_UPDATE_BATCH` and
//! `BPF_MAP_DELETE_BATCH` for the sync's writes ([`update_batch`],
//! [`delete_batch`]).

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray,
        lpm_trie::{Key, LpmTrie},
    },
};
use netlb_common::{
    AffinityMatchKey, BackendStats, BackendValue, CtEntry4, CtGc, CtKey4, RevNatValue, ServiceKey,
    ServiceValue, SourceRangeKey, map_names, stat,
};

use super::{
    Aux, BackendId, BatchError, ConntrackTable, Dataplane, DataplaneError, ProgrammedMaps,
    RevNatIndex,
    raw::{BPF_MAP_DELETE_BATCH, BPF_MAP_LOOKUP_BATCH, BPF_MAP_UPDATE_BATCH, BatchAttr},
};

/// The service maps of a loaded datapath (or of a pinned one).
pub struct AyaDataplane {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    rev_nat: HashMap<MapData, u32, RevNatValue>,
    backend_stats: Array<MapData, BackendStats>,
    source_ranges: LpmTrie<MapData, SourceRangeKey, u8>,
    affinity_matches: HashMap<MapData, AffinityMatchKey, u8>,
    cluster_ips: HashMap<MapData, u32, u8>,
    service_cidrs: LpmTrie<MapData, u32, u8>,
}

fn io_error(e: MapError) -> io::Error {
    match e {
        MapError::SyscallError(s) => s.io_error,
        other => io::Error::other(other),
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DataplaneError> {
    ebpf.take_map(name).ok_or_else(|| DataplaneError::Read {
        map: name,
        source: io::Error::new(io::ErrorKind::NotFound, "map not in the eBPF object"),
    })
}

/// Opens a map pinned at `dir/name`.
pub fn open_pinned(dir: &Path, name: &'static str) -> Result<Map, DataplaneError> {
    let data = MapData::from_pin(dir.join(name)).map_err(|e| DataplaneError::Read {
        map: name,
        source: io_error(e),
    })?;
    Map::from_map_data(data).map_err(|e| DataplaneError::Read {
        map: name,
        source: io_error(e),
    })
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    map: Map,
    name: &'static str,
) -> Result<T, DataplaneError> {
    T::try_from(map).map_err(|e| DataplaneError::Read {
        map: name,
        source: io_error(e),
    })
}

impl AyaDataplane {
    /// Takes the service maps out of a loaded object.
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            services: typed(take(ebpf, map_names::SERVICES)?, map_names::SERVICES)?,
            backends: typed(take(ebpf, map_names::BACKENDS)?, map_names::BACKENDS)?,
            rev_nat: typed(take(ebpf, map_names::REV_NAT)?, map_names::REV_NAT)?,
            backend_stats: typed(
                take(ebpf, map_names::BACKEND_STATS)?,
                map_names::BACKEND_STATS,
            )?,
            source_ranges: typed(
                take(ebpf, map_names::SOURCE_RANGES)?,
                map_names::SOURCE_RANGES,
            )?,
            affinity_matches: typed(
                take(ebpf, map_names::AFFINITY_MATCH)?,
                map_names::AFFINITY_MATCH,
            )?,
            cluster_ips: typed(take(ebpf, map_names::CLUSTER_IPS)?, map_names::CLUSTER_IPS)?,
            service_cidrs: typed(
                take(ebpf, map_names::SERVICE_CIDRS)?,
                map_names::SERVICE_CIDRS,
            )?,
        })
    }

    /// Opens the service maps pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            services: typed(open_pinned(dir, map_names::SERVICES)?, map_names::SERVICES)?,
            backends: typed(open_pinned(dir, map_names::BACKENDS)?, map_names::BACKENDS)?,
            rev_nat: typed(open_pinned(dir, map_names::REV_NAT)?, map_names::REV_NAT)?,
            backend_stats: typed(
                open_pinned(dir, map_names::BACKEND_STATS)?,
                map_names::BACKEND_STATS,
            )?,
            source_ranges: typed(
                open_pinned(dir, map_names::SOURCE_RANGES)?,
                map_names::SOURCE_RANGES,
            )?,
            affinity_matches: typed(
                open_pinned(dir, map_names::AFFINITY_MATCH)?,
                map_names::AFFINITY_MATCH,
            )?,
            cluster_ips: typed(
                open_pinned(dir, map_names::CLUSTER_IPS)?,
                map_names::CLUSTER_IPS,
            )?,
            service_cidrs: typed(
                open_pinned(dir, map_names::SERVICE_CIDRS)?,
                map_names::SERVICE_CIDRS,
            )?,
        })
    }

    /// One entry of the service map as the kernel holds it.
    pub fn service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, DataplaneError> {
        found(self.services.get(key, 0), map_names::SERVICES)
    }

    /// Makes the Service CIDRs exactly `cidrs` ((network, prefix length)).
    pub fn set_service_cidrs(
        &mut self,
        cidrs: &[(std::net::Ipv4Addr, u8)],
    ) -> Result<(), DataplaneError> {
        let want: Vec<(u32, u32)> = cidrs
            .iter()
            .map(|(n, len)| {
                let mask = if *len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from((*len).min(32)))
                };
                (
                    u32::from(*len),
                    netlb_common::be_addr(std::net::Ipv4Addr::from(u32::from(*n) & mask)),
                )
            })
            .collect();
        let have: Vec<(u32, u32)> = self
            .service_cidrs
            .keys()
            .map(|k| k.map(|k| (k.prefix_len(), k.data())))
            .collect::<Result<_, _>>()
            .map_err(|e| DataplaneError::Read {
                map: map_names::SERVICE_CIDRS,
                source: io_error(e),
            })?;
        for (len, data) in &want {
            self.service_cidrs
                .insert(&Key::new(*len, *data), 1, 0)
                .map_err(write_err(
                    map_names::SERVICE_CIDRS,
                    format!("{data:#x}/{len}"),
                ))?;
        }
        for (len, data) in have.iter().filter(|k| !want.contains(k)) {
            delete_result(
                self.service_cidrs.remove(&Key::new(*len, *data)),
                map_names::SERVICE_CIDRS,
                format!("{data:#x}/{len}"),
            )?;
        }
        Ok(())
    }

    /// Counters of one backend.
    pub fn backend_stats(&self, id: BackendId) -> Result<BackendStats, DataplaneError> {
        self.backend_stats
            .get(&id, 0)
            .map_err(|e| DataplaneError::Read {
                map: map_names::BACKEND_STATS,
                source: io_error(e),
            })
    }
}

/// A lookup's result: `None` for a missing key.
fn found<V>(r: Result<V, MapError>, map: &'static str) -> Result<Option<V>, DataplaneError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(MapError::KeyNotFound) => Ok(None),
        Err(MapError::SyscallError(s)) if s.io_error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(DataplaneError::Read {
            map,
            source: io_error(e),
        }),
    }
}

fn write_err(map: &'static str, key: String) -> impl FnOnce(MapError) -> DataplaneError {
    move |e| DataplaneError::Write {
        map,
        key,
        source: io_error(e),
    }
}

/// Deleting an entry that is already gone is not an error: the desired
/// state holds either way.
fn delete_result(
    r: Result<(), MapError>,
    map: &'static str,
    key: String,
) -> Result<(), DataplaneError> {
    match r {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(s)) if s.io_error.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataplaneError::Delete {
            map,
            key,
            source: io_error(e),
        }),
    }
}

fn collect<K: aya::Pod, V: aya::Pod>(
    map: &HashMap<MapData, K, V>,
    name: &'static str,
) -> Result<Vec<(K, V)>, DataplaneError> {
    map.iter()
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| DataplaneError::Read {
            map: name,
            source: io_error(e),
        })
}

impl Dataplane for AyaDataplane {
    fn upsert_backend(
        &mut self,
        id: BackendId,
        value: &BackendValue,
    ) -> Result<(), DataplaneError> {
        self.backends
            .insert(id, value, 0)
            .map_err(write_err(map_names::BACKENDS, id.to_string()))
    }

    fn delete_backend(&mut self, id: BackendId) -> Result<(), DataplaneError> {
        delete_result(
            self.backends.remove(&id),
            map_names::BACKENDS,
            id.to_string(),
        )
    }

    fn upsert_service(
        &mut self,
        key: &ServiceKey,
        value: &ServiceValue,
    ) -> Result<(), DataplaneError> {
        self.services
            .insert(key, value, 0)
            .map_err(write_err(map_names::SERVICES, format!("{key:?}")))
    }

    fn delete_service(&mut self, key: &ServiceKey) -> Result<(), DataplaneError> {
        delete_result(
            self.services.remove(key),
            map_names::SERVICES,
            format!("{key:?}"),
        )
    }

    fn upsert_rev_nat(
        &mut self,
        index: RevNatIndex,
        value: &RevNatValue,
    ) -> Result<(), DataplaneError> {
        self.rev_nat
            .insert(index, value, 0)
            .map_err(write_err(map_names::REV_NAT, index.to_string()))
    }

    fn delete_rev_nat(&mut self, index: RevNatIndex) -> Result<(), DataplaneError> {
        delete_result(
            self.rev_nat.remove(&index),
            map_names::REV_NAT,
            index.to_string(),
        )
    }

    fn reset_backend_stats(&mut self, id: BackendId) -> Result<(), DataplaneError> {
        self.backend_stats
            .set(id, BackendStats::default(), 0)
            .map_err(write_err(map_names::BACKEND_STATS, id.to_string()))
    }

    fn upsert_services(&mut self, items: &[(ServiceKey, ServiceValue)]) -> Result<(), BatchError> {
        update_batch(map_fd(&self.services), map_names::SERVICES, items, |k| {
            format!("{k:?}")
        })
    }

    fn delete_services(&mut self, keys: &[ServiceKey]) -> Result<(), BatchError> {
        delete_batch(map_fd(&self.services), map_names::SERVICES, keys)
    }

    fn upsert_backends(&mut self, items: &[(BackendId, BackendValue)]) -> Result<(), BatchError> {
        update_batch(map_fd(&self.backends), map_names::BACKENDS, items, |k| {
            k.to_string()
        })
    }

    fn upsert_rev_nats(&mut self, items: &[(RevNatIndex, RevNatValue)]) -> Result<(), BatchError> {
        update_batch(map_fd(&self.rev_nat), map_names::REV_NAT, items, |k| {
            k.to_string()
        })
    }

    fn upsert_aux(&mut self, items: &[Aux]) -> Result<(), BatchError> {
        // One call per entry: the LPM trie has no batch commands, and a
        // frontend has a handful of ranges and as many matches as slots
        // (written once, when a backend joins).
        for (index, item) in items.iter().enumerate() {
            match item {
                Aux::SourceRange((len, data)) => self
                    .source_ranges
                    .insert(&Key::new(*len, *data), 1, 0)
                    .map_err(write_err(
                        map_names::SOURCE_RANGES,
                        format!("{data:?}/{len}"),
                    )),
                Aux::AffinityMatch(m) => self
                    .affinity_matches
                    .insert(m, 1, 0)
                    .map_err(write_err(map_names::AFFINITY_MATCH, format!("{m:?}"))),
            }
            .map_err(|source| BatchError { index, source })?;
        }
        Ok(())
    }

    fn delete_aux(&mut self, items: &[Aux]) -> Result<(), BatchError> {
        for (index, item) in items.iter().enumerate() {
            match item {
                Aux::SourceRange((len, data)) => delete_result(
                    self.source_ranges.remove(&Key::new(*len, *data)),
                    map_names::SOURCE_RANGES,
                    format!("{data:?}/{len}"),
                ),
                Aux::AffinityMatch(m) => delete_result(
                    self.affinity_matches.remove(m),
                    map_names::AFFINITY_MATCH,
                    format!("{m:?}"),
                ),
            }
            .map_err(|source| BatchError { index, source })?;
        }
        Ok(())
    }

    fn upsert_cluster_ips(&mut self, items: &[std::net::Ipv4Addr]) -> Result<(), BatchError> {
        let entries: Vec<(u32, u8)> = items
            .iter()
            .map(|ip| (netlb_common::be_addr(*ip), 1))
            .collect();
        update_batch(
            map_fd(&self.cluster_ips),
            map_names::CLUSTER_IPS,
            &entries,
            |k| std::net::Ipv4Addr::from(u32::from_be(*k)).to_string(),
        )
    }

    fn delete_cluster_ips(&mut self, items: &[std::net::Ipv4Addr]) -> Result<(), BatchError> {
        let keys: Vec<u32> = items.iter().map(|ip| netlb_common::be_addr(*ip)).collect();
        delete_batch(map_fd(&self.cluster_ips), map_names::CLUSTER_IPS, &keys)
    }

    fn read_service(&self, key: &ServiceKey) -> Result<Option<ServiceValue>, DataplaneError> {
        self.service(key)
    }

    fn read_backend(&self, id: BackendId) -> Result<Option<BackendValue>, DataplaneError> {
        found(self.backends.get(&id, 0), map_names::BACKENDS)
    }

    fn read_rev_nat(&self, index: RevNatIndex) -> Result<Option<RevNatValue>, DataplaneError> {
        found(self.rev_nat.get(&index, 0), map_names::REV_NAT)
    }

    fn dump(&self) -> Result<ProgrammedMaps, DataplaneError> {
        let source_ranges = self
            .source_ranges
            .keys()
            .map(|k| k.map(|k| (k.prefix_len(), k.data())))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DataplaneError::Read {
                map: map_names::SOURCE_RANGES,
                source: io_error(e),
            })?;
        Ok(ProgrammedMaps {
            services: collect(&self.services, map_names::SERVICES)?,
            backends: collect(&self.backends, map_names::BACKENDS)?,
            rev_nat: collect(&self.rev_nat, map_names::REV_NAT)?,
            source_ranges,
            affinity_matches: collect(&self.affinity_matches, map_names::AFFINITY_MATCH)?
                .into_iter()
                .map(|(k, _)| k)
                .collect(),
            cluster_ips: collect(&self.cluster_ips, map_names::CLUSTER_IPS)?
                .into_iter()
                .map(|(k, _)| std::net::Ipv4Addr::from(u32::from_be(k)))
                .collect(),
        })
    }
}

/// The per-CPU drop and packet counters, read-only (`list stats`, metrics).
pub struct Observer {
    stats: PerCpuArray<MapData, u64>,
}

impl Observer {
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            stats: typed(open_pinned(dir, map_names::STATS)?, map_names::STATS)?,
        })
    }

    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            stats: typed(take(ebpf, map_names::STATS)?, map_names::STATS)?,
        })
    }

    /// `STATS` summed over CPUs, by counter index.
    pub fn stats(&self) -> Result<[u64; stat::COUNT as usize], DataplaneError> {
        let mut out = [0u64; stat::COUNT as usize];
        for (index, slot) in out.iter_mut().enumerate() {
            let values = self
                .stats
                .get(&(index as u32), 0)
                .map_err(|e| DataplaneError::Read {
                    map: map_names::STATS,
                    source: io_error(e),
                })?;
            *slot = values.iter().sum();
        }
        Ok(out)
    }
}

/// Pod addresses by interface (`NETLB_POD_SOURCES`), for the datapath's
/// source validation.
pub struct PodSources {
    map: HashMap<MapData, u32, u32>,
    /// What is programmed: address (`be`) -> ifindex.
    programmed: std::collections::BTreeMap<u32, u32>,
}

impl PodSources {
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        let map: HashMap<MapData, u32, u32> =
            typed(take(ebpf, map_names::POD_SOURCES)?, map_names::POD_SOURCES)?;
        // Adopt what an earlier agent wrote.
        let programmed =
            map.iter()
                .collect::<Result<_, _>>()
                .map_err(|e| DataplaneError::Read {
                    map: map_names::POD_SOURCES,
                    source: io_error(e),
                })?;
        Ok(Self { map, programmed })
    }

    /// Addresses registered.
    pub fn len(&self) -> usize {
        self.programmed.len()
    }

    pub fn is_empty(&self) -> bool {
        self.programmed.is_empty()
    }

    /// Makes the map hold exactly `want` (address `be` -> ifindex); returns
    /// the number of writes and deletes.
    pub fn sync(
        &mut self,
        want: &std::collections::BTreeMap<u32, u32>,
    ) -> Result<usize, DataplaneError> {
        let mut ops = 0;
        for (addr, ifindex) in want {
            if self.programmed.get(addr) != Some(ifindex) {
                self.map
                    .insert(addr, ifindex, 0)
                    .map_err(write_err(map_names::POD_SOURCES, addr.to_string()))?;
                self.programmed.insert(*addr, *ifindex);
                ops += 1;
            }
        }
        let stale: Vec<u32> = self
            .programmed
            .keys()
            .filter(|a| !want.contains_key(a))
            .copied()
            .collect();
        for addr in stale {
            delete_result(
                self.map.remove(&addr),
                map_names::POD_SOURCES,
                addr.to_string(),
            )?;
            self.programmed.remove(&addr);
            ops += 1;
        }
        Ok(ops)
    }
}

/// The LRU maps the datapath fills (affinity, socket translations,
/// fragments), for their fill levels.
pub struct LruCounter {
    maps: Vec<(&'static str, super::raw::RawMap)>,
}

impl LruCounter {
    /// The LRUs pinned in `dir` (a generation); those that cannot be opened
    /// are left out.
    pub fn open(dir: &Path) -> Self {
        let maps = [
            map_names::AFFINITY,
            map_names::SOCK_REV,
            map_names::FRAGMENTS,
        ]
        .into_iter()
        .filter_map(|name| Some((name, super::raw::RawMap::open(&dir.join(name)).ok()?)))
        .collect();
        Self { maps }
    }

    /// Entries of each map now (a batched read of each).
    pub fn count(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.maps
            .iter()
            .filter_map(|(name, map)| Some((*name, map.entries().ok()?.len() as u64)))
            .collect()
    }
}

/// The agent's slot of the in-kernel collector (`CT_GC`): its sweep
/// period, when its own collector last swept, and that it runs. Written by
/// the sync loop alone (every second), so nothing races on the slot.
pub struct Heartbeat {
    gc: Array<MapData, CtGc>,
    slot: CtGc,
}

impl Heartbeat {
    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            gc: typed(take(ebpf, map_names::CT_GC)?, map_names::CT_GC)?,
            slot: CtGc::default(),
        })
    }

    fn write(&mut self) -> Result<(), DataplaneError> {
        // The agent's slot only: writing the kernel's would cancel its timer.
        self.gc
            .set(CtGc::AGENT, self.slot, 0)
            .map_err(write_err(map_names::CT_GC, "agent".into()))
    }

    /// The sweep period; the agent's collector counts as having swept now
    /// (it is about to), and the agent as running. Before
    /// [`loader::arm_ct_gc`](crate::datapath::loader::arm_ct_gc), which reads the
    /// period.
    pub fn configure(&mut self, interval: std::time::Duration) -> Result<(), DataplaneError> {
        let now = crate::datapath::dataplane::monotonic_now_s();
        self.slot = CtGc {
            interval_ms: interval.as_millis().clamp(1000, u128::from(u32::MAX)) as u32,
            agent_sweep_s: now,
            alive_s: now,
            ..Default::default()
        };
        self.write()
    }

    /// The agent runs at `now`; its collector last swept at `swept`.
    pub fn beat(&mut self, now: u32, swept: u32) -> Result<(), DataplaneError> {
        self.slot.alive_s = now;
        self.slot.agent_sweep_s = swept;
        self.write()
    }

    /// The agent stops (without removing the datapath): from now on the
    /// socket-level programs serve pod sockets too, and the kernel's
    /// collector takes over after two periods.
    pub fn leave(&mut self) -> Result<(), DataplaneError> {
        self.slot.alive_s = 0;
        self.write()
    }

    /// The collector's slots as they are now: (the kernel's, the agent's).
    pub fn slots(&self) -> Result<(CtGc, CtGc), DataplaneError> {
        let read = |slot| {
            self.gc.get(&slot, 0).map_err(|e| DataplaneError::Read {
                map: map_names::CT_GC,
                source: io_error(e),
            })
        };
        Ok((read(CtGc::KERNEL)?, read(CtGc::AGENT)?))
    }
}

/// The conntrack map.
pub struct KernelConntrack {
    map: HashMap<MapData, CtKey4, CtEntry4>,
    capacity: u32,
}

impl KernelConntrack {
    fn new(map: Map) -> Result<Self, DataplaneError> {
        let map: HashMap<MapData, CtKey4, CtEntry4> = typed(map, map_names::CONNTRACK)?;
        let capacity = aya::maps::IterableMap::map(&map)
            .info()
            .map_err(|e| DataplaneError::Read {
                map: map_names::CONNTRACK,
                source: io_error(e),
            })?
            .max_entries();
        Ok(Self { map, capacity })
    }

    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Self::new(open_pinned(dir, map_names::CONNTRACK)?)
    }

    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Self::new(take(ebpf, map_names::CONNTRACK)?)
    }

    /// A second handle on the same maps (another thread's collector, a
    /// test racing the datapath).
    pub fn reopen(&self) -> Result<Self, DataplaneError> {
        let id = |info: Result<aya::maps::MapInfo, MapError>, map| {
            info.map(|i| i.id()).map_err(|e| DataplaneError::Read {
                map,
                source: io_error(e),
            })
        };
        let ct = id(
            aya::maps::IterableMap::map(&self.map).info(),
            map_names::CONNTRACK,
        )?;
        let data = MapData::from_id(ct).map_err(|e| DataplaneError::Read {
            map: map_names::CONNTRACK,
            source: io_error(e),
        })?;
        Self::new(Map::HashMap(data))
    }

    /// Inserts or replaces an entry (tests seed the table with it).
    pub fn insert(&mut self, key: &CtKey4, value: &CtEntry4) -> Result<(), DataplaneError> {
        self.map
            .insert(key, value, 0)
            .map_err(write_err(map_names::CONNTRACK, format!("{key:?}")))
    }
}

impl ConntrackTable for KernelConntrack {
    fn entries(&self) -> Result<Vec<(CtKey4, CtEntry4)>, DataplaneError> {
        let fd = aya::maps::IterableMap::map(&self.map)
            .fd()
            .as_fd()
            .as_raw_fd();
        lookup_batch(fd).map_err(|source| DataplaneError::Read {
            map: map_names::CONNTRACK,
            source,
        })
    }

    fn get(&self, key: &CtKey4) -> Result<Option<CtEntry4>, DataplaneError> {
        match self.map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(MapError::SyscallError(s)) if s.io_error.kind() == io::ErrorKind::NotFound => {
                Ok(None)
            }
            Err(e) => Err(DataplaneError::Read {
                map: map_names::CONNTRACK,
                source: io_error(e),
            }),
        }
    }

    fn delete(&mut self, key: &CtKey4) -> Result<(), DataplaneError> {
        delete_result(
            self.map.remove(key),
            map_names::CONNTRACK,
            format!("{key:?}"),
        )
    }

    fn capacity(&self) -> u32 {
        self.capacity
    }
}

/// Entries per update or delete call: large enough that a first sync of
/// 100k Services takes a few hundred calls, small enough that one call
/// never holds the CPU for long (the kernel processes them one by one).
const WRITE_BATCH: usize = 8192;

fn map_fd<K: aya::Pod, V: aya::Pod>(map: &HashMap<MapData, K, V>) -> i32 {
    aya::maps::IterableMap::map(map).fd().as_fd().as_raw_fd()
}

/// One batch command; returns how many entries the kernel processed and
/// the error that stopped it, if any.
fn batch_call(cmd: libc::c_long, attr: &mut BatchAttr) -> (usize, Option<io::Error>) {
    let asked = attr.count as usize;
    // SAFETY: `attr` points to `count` keys (and values) of the map's key
    // and value sizes (the map was typed with them when opened), alive for
    // the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>(),
        )
    };
    let err = (rc < 0).then(io::Error::last_os_error);
    ((attr.count as usize).min(asked), err)
}

/// Writes `items` in order with `BPF_MAP_UPDATE_BATCH` (flags `BPF_ANY`).
/// The kernel stops at the first entry it cannot write and reports how
/// many it wrote: that entry's index is the error's.
fn update_batch<K: aya::Pod, V: aya::Pod>(
    fd: i32,
    map: &'static str,
    items: &[(K, V)],
    describe: impl Fn(&K) -> String,
) -> Result<(), BatchError> {
    let mut done = 0;
    while done < items.len() {
        let chunk = &items[done..(done + WRITE_BATCH).min(items.len())];
        // The syscall wants keys and values in two arrays.
        let keys: Vec<K> = chunk.iter().map(|(k, _)| *k).collect();
        let values: Vec<V> = chunk.iter().map(|(_, v)| *v).collect();
        let mut attr = BatchAttr {
            keys: keys.as_ptr() as u64,
            values: values.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        let (n, err) = batch_call(BPF_MAP_UPDATE_BATCH, &mut attr);
        if let Some(source) = err {
            let index = done + n;
            return Err(BatchError {
                index,
                source: DataplaneError::Write {
                    map,
                    key: items
                        .get(index)
                        .map(|(k, _)| describe(k))
                        .unwrap_or_default(),
                    source,
                },
            });
        }
        done += chunk.len();
    }
    Ok(())
}

/// Deletes `keys` in order with `BPF_MAP_DELETE_BATCH`. A key already gone
/// is skipped (the kernel stops there with ENOENT; the rest is retried),
/// as [`delete_result`] does for single deletions.
fn delete_batch<K: aya::Pod + std::fmt::Debug>(
    fd: i32,
    map: &'static str,
    keys: &[K],
) -> Result<(), BatchError> {
    let mut done = 0;
    while done < keys.len() {
        let chunk = &keys[done..(done + WRITE_BATCH).min(keys.len())];
        let mut attr = BatchAttr {
            keys: chunk.as_ptr() as u64,
            count: chunk.len() as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        let (n, err) = batch_call(BPF_MAP_DELETE_BATCH, &mut attr);
        match err {
            None => done += chunk.len(),
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => done += n + 1,
            Some(source) => {
                let index = done + n;
                return Err(BatchError {
                    index,
                    source: DataplaneError::Delete {
                        map,
                        key: format!("{:?}", keys[index.min(keys.len() - 1)]),
                        source,
                    },
                });
            }
        }
    }
    Ok(())
}
/// Entries asked for per call.
const BATCH: usize = 4096;

/// Reads a whole conntrack map with `BPF_MAP_LOOKUP_BATCH`, thousands of
/// entries per system call instead of two calls per entry: a sweep of a
/// full default-sized table takes tens of milliseconds, not seconds. The
/// hash map's batch token is its bucket index (a `u32`).
fn lookup_batch(fd: i32) -> io::Result<Vec<(CtKey4, CtEntry4)>> {
    let mut out = Vec::new();
    let mut keys = vec![CtKey4::default(); BATCH];
    let mut values = vec![CtEntry4::default(); BATCH];
    let mut token_in = 0u64;
    let mut token_out = 0u64;
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first {
                0
            } else {
                (&raw const token_in) as u64
            },
            out_batch: (&raw mut token_out) as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: BATCH as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: `attr` points to buffers of `count` keys and values of the
        // map's key and value sizes (checked when the map was typed) and to
        // 8-byte tokens, all alive for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (rc < 0).then(io::Error::last_os_error);
        let n = (attr.count as usize).min(BATCH);
        out.extend(keys[..n].iter().copied().zip(values[..n].iter().copied()));
        match err {
            None => {}
            Some(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
            Some(e) => return Err(e),
        }
        token_in = token_out;
        first = false;
    }
}
