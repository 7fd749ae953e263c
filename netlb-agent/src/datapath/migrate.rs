//! Upgrades and resizes without losing a connection.
//!
//! When the live generation of pinned maps (see [`crate::datapath::layout`]) is not
//! this build's for its `--max-*` sizes (an upgrade that changed a layout,
//! or changed flags), the new maps are built beside the old ones and the
//! state is carried over before any program uses them:
//!
//! 1. Every map is copied, translated where the layout changed: the
//!    Service maps (so backend ids and rev-NAT indices, which tracked
//!    connections name, stay what they are), conntrack with its NAT ports,
//!    session affinity, socket translations, pod sources, counters. A map
//!    whose entries do not fit the new size stops the migration: the old
//!    datapath keeps running, and the error says which flag to raise.
//! 2. The socket-level programs switch to the new maps (they only read the
//!    Service maps, now complete).
//! 3. The old datapath is frozen: its frontends refuse new connections the
//!    quiet way (`DROP` with a count of 0, marked [`svc_flags::FROZEN`]),
//!    so that none is opened in maps that are no longer copied; a client's
//!    SYN is retransmitted a second later into the new datapath. Live
//!    connections keep flowing.
//! 4. Conntrack, affinity and socket translations are copied again (what
//!    changed since step 1).
//! 5. The TC programs switch in place on their pinned links
//!    (`bpf_link_update`), egress hooks first: a connection opened by a new
//!    ingress program is always known to every egress program.
//! 6. What the old datapath still wrote between 4 and 5 is added, and the
//!    old maps are unpinned (the kernel frees them with their programs).
//!
//! A crash anywhere converges: before step 5 the old generation is still
//! the live one, so the next agent unfreezes it ([`unfreeze`]) and starts
//! over with fresh new maps; after it, the new one is live and the old one
//! is only removed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use aya::maps::{HashMap, MapData};
use netlb_common::{ServiceKey, ServiceValue, TcpWin, map_names, svc_flags};

use crate::{
    datapath::dataplane::raw::{BPF_NOEXIST, RawMap, RawMapError},
    datapath::layout::Generation,
};

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Raw(#[from] RawMapError),
    #[error("cannot read {map} of {dir}")]
    Read {
        map: &'static str,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{map} holds {entries} entries, more than the new size {capacity}: \
         raise its --max-* flag (the old datapath keeps running meanwhile)"
    )]
    DoesNotFit {
        map: &'static str,
        entries: usize,
        capacity: u32,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {map} of {dir}")]
    Write {
        map: &'static str,
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{map} of layout {version} cannot be carried over ({reason})")]
    Layout {
        map: &'static str,
        version: u32,
        reason: String,
    },
    #[error("cannot open the Service map of {dir}")]
    Services {
        dir: PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
}

/// The maps whose state is carried over, in the order they are copied.
/// `CONFIG` (written by the agent at load) and `CT_GC` (armed by it) are
/// not: they are this build's own.
const CARRIED: [&str; 14] = [
    map_names::BACKENDS,
    map_names::REV_NAT,
    map_names::SOURCE_RANGES,
    map_names::AFFINITY_MATCH,
    map_names::CLUSTER_IPS,
    map_names::SERVICE_CIDRS,
    map_names::SERVICES,
    map_names::CONNTRACK,
    map_names::AFFINITY,
    map_names::SOCK_REV,
    map_names::POD_SOURCES,
    map_names::FRAGMENTS,
    map_names::STATS,
    map_names::BACKEND_STATS,
];

/// The maps a running datapath writes, copied again once the old one is
/// frozen.
const LIVE_STATE: [&str; 3] = [
    map_names::CONNTRACK,
    map_names::AFFINITY,
    map_names::SOCK_REV,
];

/// A map entry as bytes: (key, value).
type RawEntry = (Vec<u8>, Vec<u8>);

/// One entry of `map` in layout `from`, as this build's layout has it.
fn translate(
    map: &'static str,
    from: u32,
    key: Vec<u8>,
    value: Vec<u8>,
    to: &RawMap,
) -> Result<Option<RawEntry>, MigrateError> {
    if key.len() != to.key_size {
        return Err(MigrateError::Layout {
            map,
            version: from,
            reason: format!("keys of {} bytes, want {}", key.len(), to.key_size),
        });
    }
    let is_array = matches!(
        to.map_type,
        aya::maps::MapType::Array | aya::maps::MapType::PerCpuArray
    );
    if is_array {
        // Arrays keep the indices the new one has (a larger one starts the
        // rest at zero); a zero value is there already.
        let index = u32::from_ne_bytes(key[..4].try_into().unwrap_or_default());
        if index >= to.max_entries || value.iter().all(|b| *b == 0) {
            return Ok(None);
        }
    }
    let value = match (map, from) {
        // Layout 1's conntrack values had no TCP window side: both sides
        // start unknown (every RST and FIN is admitted until a side has
        // been seen sending).
        (map_names::CONNTRACK, 1) if value.len() + 12 == to.value_len() => {
            let unknown = TcpWin {
                scale: TcpWin::SCALE_UNKNOWN,
                ..Default::default()
            };
            let mut v = value;
            v.extend_from_slice(&unknown.ack.to_ne_bytes());
            v.extend_from_slice(&unknown.win.to_ne_bytes());
            v.extend_from_slice(&[unknown.scale, unknown.flags, 0, 0]);
            v
        }
        _ if value.len() == to.value_len() => value,
        _ => {
            return Err(MigrateError::Layout {
                map,
                version: from,
                reason: format!("values of {} bytes, want {}", value.len(), to.value_len()),
            });
        }
    };
    Ok(Some((key, value)))
}

/// A map's entries as raw keys and values.
type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// The entries of `map` in generation `from` and the map of the same name
/// in `to_dir`; `None` when `from` has no such map.
fn open_pair(
    map: &'static str,
    from: &Generation,
    to_dir: &Path,
) -> Result<Option<(Entries, RawMap)>, MigrateError> {
    let source_path = from.dir.join(map);
    if !source_path.exists() {
        return Ok(None);
    }
    let source = RawMap::open(&source_path)?;
    let target = RawMap::open(&to_dir.join(map))?;
    let entries = source.entries().map_err(|source| MigrateError::Read {
        map,
        dir: from.dir.clone(),
        source,
    })?;
    Ok(Some((entries, target)))
}

/// Copies `map` from `from` into the map of the same name in `to_dir`
/// (replacing what is there); returns the number of entries.
fn copy_map(map: &'static str, from: &Generation, to_dir: &Path) -> Result<usize, MigrateError> {
    let Some((entries, target)) = open_pair(map, from, to_dir)? else {
        return Ok(0);
    };
    let mut translated = Vec::with_capacity(entries.len());
    for (key, value) in entries {
        if let Some(entry) = translate(map, from.version, key, value, &target)? {
            translated.push(entry);
        }
    }
    let n = translated.len();
    target.update_all(&translated).map_err(|(_, source)| {
        if source.raw_os_error() == Some(libc::E2BIG) {
            MigrateError::DoesNotFit {
                map,
                entries: n,
                capacity: target.max_entries,
                source,
            }
        } else {
            MigrateError::Write {
                map,
                dir: to_dir.to_owned(),
                source,
            }
        }
    })?;
    Ok(n)
}

/// Adds the entries of `map` that the new maps lack (what the old datapath
/// wrote after the last copy); returns how many.
fn add_missing(map: &'static str, from: &Generation, to_dir: &Path) -> Result<usize, MigrateError> {
    let Some((entries, target)) = open_pair(map, from, to_dir)? else {
        return Ok(0);
    };
    let mut added = 0;
    for (key, value) in entries {
        if let Some((key, value)) = translate(map, from.version, key, value, &target)?
            && target.update(&key, &value, BPF_NOEXIST).is_ok()
        {
            added += 1;
        }
    }
    Ok(added)
}

/// Step 1: every carried map. Returns the entries copied by map.
pub fn copy_all(
    from: &Generation,
    to_dir: &Path,
) -> Result<BTreeMap<&'static str, usize>, MigrateError> {
    let mut copied = BTreeMap::new();
    for map in CARRIED {
        copied.insert(map, copy_map(map, from, to_dir)?);
    }
    Ok(copied)
}

/// Step 4: what a running datapath writes, again.
pub fn copy_live_state(from: &Generation, to_dir: &Path) -> Result<usize, MigrateError> {
    let mut n = 0;
    for map in LIVE_STATE {
        n += copy_map(map, from, to_dir)?;
    }
    Ok(n)
}

/// Step 6: what the old datapath wrote since step 4.
pub fn add_late_state(from: &Generation, to_dir: &Path) -> Result<usize, MigrateError> {
    let mut n = 0;
    for map in LIVE_STATE {
        n += add_missing(map, from, to_dir)?;
    }
    Ok(n)
}

/// The Service map of a generation (the same layout in 1 and 2).
fn services(g: &Generation) -> Result<HashMap<MapData, ServiceKey, ServiceValue>, MigrateError> {
    let err = |source| MigrateError::Services {
        dir: g.dir.clone(),
        source,
    };
    let data = MapData::from_pin(g.dir.join(map_names::SERVICES)).map_err(err)?;
    HashMap::try_from(aya::maps::Map::HashMap(data)).map_err(err)
}

/// Step 3: the old frontends refuse new connections quietly. Returns how
/// many were frozen.
pub fn freeze(g: &Generation) -> Result<usize, MigrateError> {
    let mut map = services(g)?;
    let heads: Vec<(ServiceKey, ServiceValue)> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| k.backend_slot == 0 && v.count > 0 && v.flags & svc_flags::FROZEN == 0)
        .collect();
    for (key, value) in &heads {
        let frozen = ServiceValue {
            count: 0,
            flags: value.flags | svc_flags::DROP | svc_flags::FROZEN,
            ..*value
        };
        map.insert(key, frozen, 0)
            .map_err(|source| MigrateError::Services {
                dir: g.dir.clone(),
                source,
            })?;
    }
    Ok(heads.len())
}

/// Undoes [`freeze`] (a migration abandoned by a crash): each frozen
/// frontend gets back the count of the slots it still has. Returns how many
/// were unfrozen.
pub fn unfreeze(g: &Generation) -> Result<usize, MigrateError> {
    let mut map = services(g)?;
    let heads: Vec<(ServiceKey, ServiceValue)> = map
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, v)| k.backend_slot == 0 && v.flags & svc_flags::FROZEN != 0)
        .collect();
    for (key, value) in &heads {
        let mut count = 0u16;
        while count < netlb_common::limits::MAX_BACKENDS_PER_SERVICE
            && map
                .get(
                    &ServiceKey {
                        backend_slot: count + 1,
                        ..*key
                    },
                    0,
                )
                .is_ok()
        {
            count += 1;
        }
        let restored = ServiceValue {
            count,
            flags: value.flags & !(svc_flags::DROP | svc_flags::FROZEN),
            ..*value
        };
        map.insert(key, restored, 0)
            .map_err(|source| MigrateError::Services {
                dir: g.dir.clone(),
                source,
            })?;
    }
    Ok(heads.len())
}

/// What a migration did, for the log.
#[derive(Debug, Default)]
pub struct Report {
    pub copied: BTreeMap<&'static str, usize>,
    pub frozen: usize,
    pub recopied: usize,
    pub late: usize,
    /// From the freeze to the switch of the TC programs: how long new
    /// connections waited.
    pub frozen_for: Duration,
    pub took: Duration,
}

/// How a migration switches the programs to the new maps.
pub trait Switch {
    type Error: std::error::Error + Send + Sync + 'static;
    /// The socket-level (cgroup) programs.
    fn sockets(&mut self) -> Result<(), Self::Error>;
    /// The TC programs, on their pinned links.
    fn tc(&mut self) -> Result<(), Self::Error>;
}

/// Runs a migration from `from` into the maps pinned in `to_dir` (see the
/// module docs); `switch` moves the programs. On an error before the TC
/// switch, the old datapath is unfrozen and keeps running.
pub fn run<S: Switch>(
    from: &Generation,
    to_dir: &Path,
    switch: &mut S,
) -> Result<Report, RunMigrationError<S::Error>> {
    let started = Instant::now();
    let mut report = Report::default();
    // A frozen old datapath is an abandoned migration: back to normal
    // first, so that what is copied is what it served.
    let thawed = unfreeze(from)?;
    if thawed > 0 {
        log::warn!(
            "unfroze {thawed} frontends of {} (a migration was interrupted)",
            from.dir.display()
        );
    }
    report.copied = copy_all(from, to_dir)?;
    switch.sockets().map_err(RunMigrationError::Switch)?;
    report.frozen = freeze(from)?;
    let frozen_at = Instant::now();
    let switched = copy_live_state(from, to_dir)
        .map_err(RunMigrationError::from)
        .and_then(|n| {
            report.recopied = n;
            switch.tc().map_err(RunMigrationError::Switch)
        });
    if let Err(e) = switched {
        if let Err(u) = unfreeze(from) {
            log::error!("unfreezing {} failed: {u}", from.dir.display());
        }
        return Err(e);
    }
    report.frozen_for = frozen_at.elapsed();
    report.late = add_late_state(from, to_dir)?;
    report.took = started.elapsed();
    Ok(report)
}

#[derive(Debug, thiserror::Error)]
pub enum RunMigrationError<E: std::error::Error + Send + Sync + 'static> {
    #[error(transparent)]
    Migrate(#[from] MigrateError),
    #[error("switching the programs to the new maps failed")]
    Switch(#[source] E),
}

impl<E: std::error::Error + Send + Sync + 'static> From<RawMapError> for RunMigrationError<E> {
    fn from(e: RawMapError) -> Self {
        Self::Migrate(e.into())
    }
}

/// Removes a generation's pins (layout 1's maps sit in the bpffs directory
/// itself, beside `links/` and `maps/`, which stay).
pub fn remove_generation(g: &Generation) -> std::io::Result<()> {
    if g.version == 1 {
        for name in map_names::ALL {
            match std::fs::remove_file(g.dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        return Ok(());
    }
    match std::fs::remove_dir_all(&g.dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
