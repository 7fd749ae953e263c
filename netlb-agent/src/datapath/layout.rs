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
//! live one into a new one (see [`crate::migrate`]). The live generation is
//! the one whose maps the programs behind the pinned links use: the links
//! are the truth, whatever a crash left pinned.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use aya::{
    maps::MapInfo,
    programs::links::{FdLink, PinnedLink},
};
use netlb_common::{LAYOUT_VERSION, map_names};

use crate::loader::{MapSizes, expected_shape, links_dir};

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
