//! What the DaemonSet's init container does to the node before the agent
//! starts (`netlb-agent prepare-node`), in the host's mount namespace, as
//! Cilium's mount init containers do:
//! - a bpffs on `/sys/fs/bpf`, with shared propagation: the agent mounts it
//!   with propagation (its pins must reach the host, to outlive the pod),
//!   which the kubelet refuses for a private mount, and hosts without
//!   systemd mount it private or not at all;
//! - the cgroup2 hierarchy alone on `/run/netlb/cgroupv2`, whatever the
//!   host's layout (unified: `/sys/fs/cgroup`; hybrid: `/sys/fs/cgroup/
//!   unified` beside the v1 hierarchies): the agent mounts that one
//!   read-only, with nothing writable below it.
//!
//! Both are idempotent: what is there already stays (a bpffs that is
//! private becomes shared).

use std::{
    io,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(
        "cannot open the host's mount namespace {path} (the init container mounts the host's /proc on /hostproc and needs CAP_SYS_ADMIN, CAP_SYS_CHROOT and CAP_SYS_PTRACE)"
    )]
    OpenNamespace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot enter the host's mount namespace {path}")]
    EnterNamespace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot mount {what} on {path}")]
    Mount {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const CGROUP2_MAGIC: i64 = 0x6367_7270;

fn fs_type(path: &Path) -> Option<i64> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statfs into a zeroed struct we own.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        (libc::statfs(c.as_ptr(), &mut buf) == 0).then_some(buf.f_type as i64)
    }
}

/// Whether `path` is itself a mount point of this namespace (not a
/// directory of the filesystem above it).
fn is_mount_point(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let wanted = path.to_string_lossy();
    mounts
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .any(|m| m == wanted)
}

fn mount(
    source: &std::ffi::CStr,
    target: &Path,
    fstype: Option<&std::ffi::CStr>,
    flags: libc::c_ulong,
    what: &'static str,
) -> Result<(), NodeError> {
    let err = |source| NodeError::Mount {
        what,
        path: target.to_owned(),
        source,
    };
    let c = std::ffi::CString::new(target.as_os_str().as_encoded_bytes())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    // SAFETY: mount(2) with valid C strings that live for the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            c.as_ptr(),
            fstype.map_or(std::ptr::null(), |f| f.as_ptr()),
            flags,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(())
}

/// Enters the mount namespace at `host_mount_ns` and makes sure of a
/// shared bpffs on `bpffs` and a cgroup2 mount on `cgroup2`; returns what
/// was done. Must run before any thread is started (`setns` of a mount
/// namespace refuses multi-threaded callers).
pub fn prepare(
    host_mount_ns: &Path,
    bpffs: &Path,
    cgroup2: &Path,
) -> Result<Vec<String>, NodeError> {
    let ns = std::fs::File::open(host_mount_ns).map_err(|source| NodeError::OpenNamespace {
        path: host_mount_ns.to_owned(),
        source,
    })?;
    // SAFETY: setns on a namespace file we own.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNS) } != 0 {
        return Err(NodeError::EnterNamespace {
            path: host_mount_ns.to_owned(),
            source: io::Error::last_os_error(),
        });
    }
    let mut done = Vec::new();
    for dir in [bpffs, cgroup2] {
        std::fs::create_dir_all(dir).map_err(|source| NodeError::Create {
            path: dir.to_owned(),
            source,
        })?;
    }
    if fs_type(bpffs) == Some(BPF_FS_MAGIC) && is_mount_point(bpffs) {
        done.push(format!("{} is a bpffs", bpffs.display()));
    } else {
        mount(c"bpf", bpffs, Some(c"bpf"), 0, "a bpffs")?;
        done.push(format!("mounted a bpffs on {}", bpffs.display()));
    }
    // Shared: the agent's mount of it (with propagation) is accepted, and
    // its pins reach the host.
    mount(c"none", bpffs, None, libc::MS_SHARED, "shared propagation")?;
    done.push(format!("{} has shared propagation", bpffs.display()));
    if fs_type(cgroup2) == Some(CGROUP2_MAGIC) && is_mount_point(cgroup2) {
        done.push(format!("{} is a cgroup2 mount", cgroup2.display()));
    } else {
        mount(
            c"none",
            cgroup2,
            Some(c"cgroup2"),
            0,
            "the cgroup2 hierarchy",
        )?;
        done.push(format!(
            "mounted the cgroup2 hierarchy on {}",
            cgroup2.display()
        ));
    }
    Ok(done)
}
