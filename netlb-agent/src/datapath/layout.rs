//! Where the pinned datapath lives, and which of its generations the
//! attached programs use.
//!
//! ```text
//! <bpffs>/links/<ifname>_ingress, <ifname>_egress, cgroup_<program>
//! <bpffs>/maps/v2-<sizes>/NETLB_*     one generation: the maps of one
//!                                     layout version and one set of sizes
//! ```
//!
//! netlb v0.1.0 (layout 1) pinned its maps directly in `<bpffs>/`. A
//! generation's name carries the layout version and a fingerprint of every
//! map's shape, so an agent started with other `--max-*` flags, or a build
//! with another layout, finds no generation of its own and migrates the
//! live one into a new one (see [`crate::datapath::migrate`]). The live generation is
//! the one whose maps the programs behind the pinned links use: the links
//! are the truth, whatever a crash left pinned.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapInfo, MapType},
    programs::links::{FdLink, PinnedLink},
};
use netlb_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, BackendStats, BackendValue, CtEntry4, CtGc,
    CtKey4, DatapathConfig, FragKey, FragPorts, LAYOUT_VERSION, RevNatValue, ServiceKey,
    ServiceValue, SockRevKey, SockRevValue, SourceRangeKey, limits, map_names, stat,
};

/// Map sizes (max entries): one per map that fills, each with its
/// `--max-*` flag. The fixed arrays (`STATS`, `CONFIG`, `CT_GC`) have none;
/// `BACKEND_STATS` follows `backends`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSizes {
    pub service_entries: u32,
    pub backends: u32,
    pub rev_nat: u32,
    pub conntrack: u32,
    pub pod_sources: u32,
    pub sock_rev: u32,
    pub source_ranges: u32,
    pub affinity: u32,
    pub affinity_matches: u32,
    pub cluster_ips: u32,
    pub service_cidrs: u32,
    pub fragments: u32,
}

impl Default for MapSizes {
    fn default() -> Self {
        Self {
            service_entries: limits::MAX_SERVICE_ENTRIES,
            backends: limits::MAX_BACKENDS,
            rev_nat: limits::MAX_REV_NAT,
            conntrack: limits::MAX_CONNTRACK,
            pod_sources: limits::MAX_POD_SOURCES,
            sock_rev: limits::MAX_SOCK_REV,
            source_ranges: limits::MAX_SOURCE_RANGES,
            affinity: limits::MAX_AFFINITY,
            affinity_matches: limits::MAX_AFFINITY_MATCH,
            cluster_ips: limits::MAX_CLUSTER_IPS,
            service_cidrs: limits::MAX_SERVICE_CIDRS,
            fragments: limits::MAX_FRAGMENTS,
        }
    }
}

impl MapSizes {
    /// Each map's size by name, as the agent programs them (the maps whose
    /// size has a flag).
    pub fn by_map(&self) -> [(&'static str, u32); 12] {
        [
            (map_names::SERVICES, self.service_entries),
            (map_names::BACKENDS, self.backends),
            (map_names::REV_NAT, self.rev_nat),
            (map_names::CONNTRACK, self.conntrack),
            (map_names::POD_SOURCES, self.pod_sources),
            (map_names::SOCK_REV, self.sock_rev),
            (map_names::SOURCE_RANGES, self.source_ranges),
            (map_names::AFFINITY, self.affinity),
            (map_names::AFFINITY_MATCH, self.affinity_matches),
            (map_names::CLUSTER_IPS, self.cluster_ips),
            (map_names::SERVICE_CIDRS, self.service_cidrs),
            (map_names::FRAGMENTS, self.fragments),
        ]
    }
}

/// What a map of the object looks like: its type, key and value sizes and
/// entries (a generation's name is made of these, see `layout`).
pub fn expected_shape(name: &str, sizes: &MapSizes) -> Option<(MapType, usize, usize, u32)> {
    use std::mem::size_of;
    Some(match name {
        map_names::SERVICES => (
            MapType::Hash,
            size_of::<ServiceKey>(),
            size_of::<ServiceValue>(),
            sizes.service_entries,
        ),
        map_names::BACKENDS => (
            MapType::Hash,
            size_of::<u32>(),
            size_of::<BackendValue>(),
            sizes.backends,
        ),
        map_names::REV_NAT => (
            MapType::Hash,
            size_of::<u32>(),
            size_of::<RevNatValue>(),
            sizes.rev_nat,
        ),
        map_names::CONNTRACK => (
            MapType::Hash,
            size_of::<CtKey4>(),
            size_of::<CtEntry4>(),
            sizes.conntrack,
        ),
        map_names::STATS => (MapType::PerCpuArray, 4, 8, stat::CAPACITY),
        map_names::CT_GC => (MapType::Array, 4, size_of::<CtGc>(), CtGc::SLOTS),
        map_names::BACKEND_STATS => (
            MapType::Array,
            4,
            size_of::<BackendStats>(),
            sizes.backends + 1,
        ),
        map_names::CONFIG => (MapType::Array, 4, size_of::<DatapathConfig>(), 1),
        map_names::POD_SOURCES => (MapType::Hash, 4, 4, sizes.pod_sources),
        map_names::SOCK_REV => (
            MapType::LruHash,
            size_of::<SockRevKey>(),
            size_of::<SockRevValue>(),
            sizes.sock_rev,
        ),
        map_names::SOURCE_RANGES => (
            MapType::LpmTrie,
            4 + size_of::<SourceRangeKey>(),
            1,
            sizes.source_ranges,
        ),
        map_names::AFFINITY => (
            MapType::LruHash,
            size_of::<AffinityKey>(),
            size_of::<AffinityValue>(),
            sizes.affinity,
        ),
        map_names::AFFINITY_MATCH => (
            MapType::Hash,
            size_of::<AffinityMatchKey>(),
            1,
            sizes.affinity_matches,
        ),
        map_names::CLUSTER_IPS => (MapType::Hash, 4, 1, sizes.cluster_ips),
        map_names::SERVICE_CIDRS => (MapType::LpmTrie, 8, 1, sizes.service_cidrs),
        map_names::FRAGMENTS => (
            MapType::LruHash,
            size_of::<FragKey>(),
            size_of::<FragPorts>(),
            sizes.fragments,
        ),
        _ => return None,
    })
}

/// Where the pinned links of one pin directory live.
pub fn links_dir(pin_dir: &Path) -> PathBuf {
    pin_dir.join("links")
}

/// One set of pinned maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    pub dir: PathBuf,
    /// Its layout version (1: v0.1.0's maps in the bpffs directory itself).
    pub version: u32,
}

/// The directory of the generations.
pub fn maps_root(pin_dir: &Path) -> PathBuf {
    pin_dir.join("maps")
}

/// A 64-bit FNV-1a: stable across builds and toolchains (a generation's
/// name must not change with the compiler).
fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The name of this build's generation for `sizes`: `v<layout>-<hash of
/// every map's type, key size, value size and entries>`.
pub fn generation_name(sizes: &MapSizes) -> String {
    let mut text = String::new();
    for name in map_names::ALL {
        if let Some((kind, key, value, entries)) = expected_shape(name, sizes) {
            text.push_str(&format!("{name}:{kind:?}:{key}:{value}:{entries};"));
        }
    }
    format!("v{LAYOUT_VERSION}-{:016x}", fnv1a(text.bytes()))
}

/// This build's generation directory for `sizes`.
pub fn generation_dir(pin_dir: &Path, sizes: &MapSizes) -> PathBuf {
    maps_root(pin_dir).join(generation_name(sizes))
}

/// The generations pinned under `pin_dir`, v0.1.0's included.
pub fn pinned_generations(pin_dir: &Path) -> Vec<Generation> {
    let mut out = Vec::new();
    if pin_dir.join(map_names::SERVICES).exists() {
        out.push(Generation {
            dir: pin_dir.to_owned(),
            version: 1,
        });
    }
    let mut dirs: Vec<(String, PathBuf)> = std::fs::read_dir(maps_root(pin_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
        .collect();
    dirs.sort();
    for (name, dir) in dirs {
        let version = name
            .strip_prefix('v')
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(v, _)| v.parse().ok());
        if let Some(version) = version {
            out.push(Generation { dir, version });
        }
    }
    out
}

/// The ids of the maps that the programs behind `pin_dir`'s links use.
fn maps_in_use(pin_dir: &Path) -> BTreeSet<u32> {
    let programs: BTreeSet<u32> = std::fs::read_dir(links_dir(pin_dir))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let link = PinnedLink::from_pin(entry.path()).ok()?;
            let link = FdLink::from(link);
            Some(link.info().ok()?.program_id())
        })
        .collect();
    if programs.is_empty() {
        return BTreeSet::new();
    }
    aya::programs::loaded_programs()
        .flatten()
        .filter(|p| programs.contains(&p.id()))
        .filter_map(|p| p.map_ids().ok().flatten())
        .flatten()
        .collect()
}

/// The generation the attached programs use, if any program is attached.
pub fn live_generation(pin_dir: &Path, generations: &[Generation]) -> Option<Generation> {
    let in_use = maps_in_use(pin_dir);
    if in_use.is_empty() {
        return None;
    }
    generations
        .iter()
        .find(|g| {
            MapInfo::from_pin(g.dir.join(map_names::CONNTRACK))
                .is_ok_and(|info| in_use.contains(&info.id()))
        })
        .cloned()
}

/// The maps a reader (`list`, `status`) should open: the live generation's,
/// else the newest pinned one, else `pin_dir` itself.
pub fn maps_dir(pin_dir: &Path) -> PathBuf {
    let generations = pinned_generations(pin_dir);
    live_generation(pin_dir, &generations)
        .or_else(|| generations.into_iter().max_by_key(|g| g.version))
        .map(|g| g.dir)
        .unwrap_or_else(|| pin_dir.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generation_is_named_after_the_layout_and_every_size() {
        let defaults = generation_name(&MapSizes::default());
        assert!(defaults.starts_with(&format!("v{LAYOUT_VERSION}-")));
        assert_eq!(defaults, generation_name(&MapSizes::default()));
        let halved = MapSizes {
            conntrack: MapSizes::default().conntrack / 2,
            ..MapSizes::default()
        };
        assert_ne!(defaults, generation_name(&halved));
        let affinity = MapSizes {
            affinity: 1000,
            ..MapSizes::default()
        };
        assert_ne!(defaults, generation_name(&affinity));
    }
}
