//! Any pinned map as bytes: the migration copies maps whose key and value
//! types belong to another layout than this build's (an earlier release's
//! conntrack entries, say), so it reads and writes them without types.
//! Raw `bpf(2)` commands, as aya 0.14 wraps only typed access:
//! `BPF_MAP_LOOKUP_BATCH`/`BPF_MAP_UPDATE_BATCH` for hash maps and arrays
//! (thousands of entries per call), `BPF_MAP_GET_NEXT_KEY` and the element
//! commands for LPM tries, which have no batch commands.

use std::{
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    path::Path,
};

use aya::maps::{MapData, MapInfo, MapType};

/// A map pinned somewhere, with its shape.
pub struct RawMap {
    data: MapData,
    pub map_type: MapType,
    pub key_size: usize,
    pub value_size: usize,
    pub max_entries: u32,
}

/// Errors of raw map access.
#[derive(Debug, thiserror::Error)]
pub enum RawMapError {
    #[error("cannot open pinned map {path}")]
    Open {
        path: std::path::PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("map {path} has an unknown type")]
    Type {
        path: std::path::PathBuf,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot read map {path}")]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `union bpf_attr`'s member for the element commands.
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    pad: u32,
    key: u64,
    value_or_next_key: u64,
    flags: u64,
}

/// `union bpf_attr`'s `batch` member (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
pub(super) struct BatchAttr {
    pub in_batch: u64,
    pub out_batch: u64,
    pub keys: u64,
    pub values: u64,
    pub count: u32,
    pub map_fd: u32,
    pub elem_flags: u64,
    pub flags: u64,
}

const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;
/// `BPF_MAP_LOOKUP_BATCH`, `BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`
/// (all since v5.6; hash maps support all three).
pub(super) const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
pub(super) const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
pub(super) const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
/// `BPF_NOEXIST`: insert only if the key is free.
pub const BPF_NOEXIST: u64 = 1;
/// Entries per batch call.
const BATCH: usize = 4096;

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<()> {
    // SAFETY: `attr` is the command's `bpf_attr` member, pointing to
    // buffers of the sizes the map was opened with, alive for the call.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl RawMap {
    pub fn open(path: &Path) -> Result<Self, RawMapError> {
        let data = MapData::from_pin(path).map_err(|source| RawMapError::Open {
            path: path.to_owned(),
            source,
        })?;
        let info: MapInfo = data.info().map_err(|source| RawMapError::Open {
            path: path.to_owned(),
            source,
        })?;
        let map_type = info.map_type().map_err(|source| RawMapError::Type {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            data,
            map_type,
            key_size: info.key_size() as usize,
            value_size: info.value_size() as usize,
            max_entries: info.max_entries(),
        })
    }

    /// The map's kernel id (which programs use it).
    pub fn id(&self) -> u32 {
        self.data.info().map(|i| i.id()).unwrap_or(0)
    }

    fn fd(&self) -> u32 {
        self.data.fd().as_fd().as_raw_fd() as u32
    }

    /// Whether values are per CPU (one value per possible CPU, each rounded
    /// up to 8 bytes).
    fn per_cpu(&self) -> bool {
        matches!(
            self.map_type,
            MapType::PerCpuArray | MapType::PerCpuHash | MapType::LruPerCpuHash
        )
    }

    /// The bytes of one value as the element commands move it.
    pub fn value_len(&self) -> usize {
        if self.per_cpu() {
            let cpus = aya::util::nr_cpus().map(|n| n.max(1)).unwrap_or(1);
            self.value_size.div_ceil(8) * 8 * cpus
        } else {
            self.value_size
        }
    }

    fn is_array(&self) -> bool {
        matches!(self.map_type, MapType::Array | MapType::PerCpuArray)
    }

    /// Every entry, as (key, value) bytes.
    pub fn entries(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if matches!(self.map_type, MapType::LpmTrie) {
            self.entries_by_key()
        } else {
            self.entries_batched()
        }
    }

    fn entries_batched(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let (klen, vlen) = (self.key_size, self.value_len());
        let mut out = Vec::new();
        let mut keys = vec![0u8; klen * BATCH];
        let mut values = vec![0u8; vlen * BATCH];
        // The batch token: a bucket index (hash maps) or an index (arrays),
        // both 4 bytes; 8 leave room.
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
                map_fd: self.fd(),
                ..Default::default()
            };
            let result = bpf(BPF_MAP_LOOKUP_BATCH, &mut attr);
            let n = (attr.count as usize).min(BATCH);
            for i in 0..n {
                out.push((
                    keys[i * klen..(i + 1) * klen].to_vec(),
                    values[i * vlen..(i + 1) * vlen].to_vec(),
                ));
            }
            match result {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => return Err(e),
            }
            token_in = token_out;
            first = false;
        }
    }

    fn entries_by_key(&self) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mut out = Vec::new();
        let mut key: Option<Vec<u8>> = None;
        loop {
            let mut next = vec![0u8; self.key_size];
            let mut attr = ElemAttr {
                map_fd: self.fd(),
                key: key.as_ref().map_or(0, |k| k.as_ptr() as u64),
                value_or_next_key: next.as_mut_ptr() as u64,
                ..Default::default()
            };
            match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(out),
                Err(e) => return Err(e),
            }
            if let Some(value) = self.get(&next)? {
                out.push((next.clone(), value));
            }
            key = Some(next);
        }
    }

    /// One value, if the key is there.
    pub fn get(&self, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        let mut value = vec![0u8; self.value_len()];
        let mut attr = ElemAttr {
            map_fd: self.fd(),
            key: key.as_ptr() as u64,
            value_or_next_key: value.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(()) => Ok(Some(value)),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Writes one entry with `flags` (`BPF_ANY`, [`BPF_NOEXIST`]).
    pub fn update(&self, key: &[u8], value: &[u8], flags: u64) -> io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: self.fd(),
            key: key.as_ptr() as u64,
            value_or_next_key: value.as_ptr() as u64,
            flags,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
    }

    /// Writes entries (replacing what is there), batched where the map
    /// type allows it. On failure, how many were written and the error.
    pub fn update_all(&self, entries: &[(Vec<u8>, Vec<u8>)]) -> Result<(), (usize, io::Error)> {
        if matches!(self.map_type, MapType::LpmTrie) || self.is_array() {
            // LPM tries have no batch commands; arrays are small.
            for (i, (k, v)) in entries.iter().enumerate() {
                self.update(k, v, 0).map_err(|e| (i, e))?;
            }
            return Ok(());
        }
        let (klen, vlen) = (self.key_size, self.value_len());
        let mut done = 0;
        for chunk in entries.chunks(BATCH) {
            let keys: Vec<u8> = chunk.iter().flat_map(|(k, _)| k.iter().copied()).collect();
            let values: Vec<u8> = chunk.iter().flat_map(|(_, v)| v.iter().copied()).collect();
            debug_assert_eq!(keys.len(), klen * chunk.len());
            debug_assert_eq!(values.len(), vlen * chunk.len());
            let mut attr = BatchAttr {
                keys: keys.as_ptr() as u64,
                values: values.as_ptr() as u64,
                count: chunk.len() as u32,
                map_fd: self.fd(),
                ..Default::default()
            };
            if let Err(e) = bpf(BPF_MAP_UPDATE_BATCH, &mut attr) {
                return Err((done + attr.count as usize, e));
            }
            done += chunk.len();
        }
        Ok(())
    }
}
