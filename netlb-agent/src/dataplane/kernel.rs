//! [`Dataplane`] over the real (kernel) BPF maps, through aya.

use std::{io, path::Path};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray},
};
use netlb_common::{
    BackendStats, BackendValue, ConntrackKey, ConntrackValue, RevNatValue, ServiceKey,
    ServiceValue, map_names, stat,
};

use super::{BackendId, Dataplane, DataplaneError, ProgrammedMaps, RevNatIndex};

/// The service maps of a loaded datapath (or of a pinned one).
pub struct AyaDataplane {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    backends: HashMap<MapData, u32, BackendValue>,
    rev_nat: HashMap<MapData, u32, RevNatValue>,
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
        })
    }

    /// Opens the service maps pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            services: typed(open_pinned(dir, map_names::SERVICES)?, map_names::SERVICES)?,
            backends: typed(open_pinned(dir, map_names::BACKENDS)?, map_names::BACKENDS)?,
            rev_nat: typed(open_pinned(dir, map_names::REV_NAT)?, map_names::REV_NAT)?,
        })
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

    fn dump(&self) -> Result<ProgrammedMaps, DataplaneError> {
        Ok(ProgrammedMaps {
            services: collect(&self.services, map_names::SERVICES)?,
            backends: collect(&self.backends, map_names::BACKENDS)?,
            rev_nat: collect(&self.rev_nat, map_names::REV_NAT)?,
        })
    }
}

/// Read-only views of the other maps, for `netlb-agent list` and metrics.
pub struct Observer {
    conntrack: HashMap<MapData, ConntrackKey, ConntrackValue>,
    stats: PerCpuArray<MapData, u64>,
    backend_stats: Array<MapData, BackendStats>,
}

impl Observer {
    pub fn open(dir: &Path) -> Result<Self, DataplaneError> {
        Ok(Self {
            conntrack: typed(
                open_pinned(dir, map_names::CONNTRACK)?,
                map_names::CONNTRACK,
            )?,
            stats: typed(open_pinned(dir, map_names::STATS)?, map_names::STATS)?,
            backend_stats: typed(
                open_pinned(dir, map_names::BACKEND_STATS)?,
                map_names::BACKEND_STATS,
            )?,
        })
    }

    pub fn from_ebpf(ebpf: &mut Ebpf) -> Result<Self, DataplaneError> {
        Ok(Self {
            conntrack: typed(take(ebpf, map_names::CONNTRACK)?, map_names::CONNTRACK)?,
            stats: typed(take(ebpf, map_names::STATS)?, map_names::STATS)?,
            backend_stats: typed(
                take(ebpf, map_names::BACKEND_STATS)?,
                map_names::BACKEND_STATS,
            )?,
        })
    }

    /// Every conntrack entry.
    pub fn conntrack(&self) -> Result<Vec<(ConntrackKey, ConntrackValue)>, DataplaneError> {
        self.conntrack
            .iter()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| DataplaneError::Read {
                map: map_names::CONNTRACK,
                source: io_error(e),
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
