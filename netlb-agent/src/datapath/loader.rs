//! Loads the embedded eBPF object, pins its maps and attaches the TC programs
//! to pod interfaces with pinned TCX links, so that the datapath keeps running
//! while the agent is down and a restarted agent replaces the programs
//! atomically (`bpf_link_update`) instead of detaching them.

use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, MapInfo},
    programs::{
        CgroupAttachMode, CgroupSockAddr, LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, LinkError, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
    },
};
use netlb_common::{DatapathConfig, map_names, program_names};

use crate::{
    config::DatapathSettings,
    datapath::layout::{MapSizes, expected_shape, links_dir},
};

/// The datapath object, compiled by build.rs.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/netlb"));

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("failed to create pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not on a bpffs (mount one, or use a directory below /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
    #[error("failed to mount bpffs on /sys/fs/bpf")]
    MountBpffs {
        #[source]
        source: io::Error,
    },
    #[error("failed to load the eBPF object (pin directory {pin_dir:?})")]
    Load {
        pin_dir: Option<PathBuf>,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program `{name}` missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map `{name}` missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("program `{name}` failed to load")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map `{name}` has an unexpected type")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("failed to attach `{program}` to {interface} ({direction})")]
    Attach {
        program: &'static str,
        interface: String,
        direction: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("the link on {interface} is not a TCX link")]
    Link {
        interface: String,
        #[source]
        source: Box<LinkError>,
    },
    #[error("cannot open cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to attach `{program}` to cgroup {cgroup}")]
    AttachCgroup {
        program: &'static str,
        cgroup: PathBuf,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("failed to pin link {path}")]
    PinLink {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("cannot list the network interfaces")]
    Interfaces {
        #[source]
        source: io::Error,
    },
    #[error("arming the in-kernel conntrack collector failed at step {step}")]
    ArmCollector { step: u32 },
    #[error(
        "pinned map {path} has the shape {found}, not {want}: remove it (netlb-agent cleanup) and start again"
    )]
    Shape {
        path: PathBuf,
        found: String,
        want: String,
    },
    #[error(
        "--cgroup-root {path} is {what}: the socket-level programs attach to a cgroup2 mount \
         (on hosts with cgroup v1 and v2 side by side it is /sys/fs/cgroup/unified; this mount \
         namespace has: [{mounts}]); nothing was loaded or pinned"
    )]
    NotCgroup2 {
        path: PathBuf,
        what: String,
        mounts: String,
    },
    #[error("failed to remove {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs into a zeroed struct we own.
    unsafe {
        let mut buf: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut buf) == 0 && buf.f_type as i64 == BPF_FS_MAGIC
    }
}

/// Makes sure `pin_dir` lies on a bpffs: when its nearest existing ancestor
/// is not one, a bpffs is mounted on `/sys/fs/bpf` (as Cilium's agent does)
/// provided `pin_dir` is below it. Pins on any other filesystem would fail.
pub fn ensure_bpffs(pin_dir: &Path) -> Result<(), LoaderError> {
    let mut existing = pin_dir;
    while !existing.exists() {
        match existing.parent() {
            Some(parent) => existing = parent,
            None => break,
        }
    }
    if is_bpffs(existing) {
        return Ok(());
    }
    let root = Path::new("/sys/fs/bpf");
    if !pin_dir.starts_with(root) {
        return Err(LoaderError::NotBpffs {
            path: pin_dir.to_owned(),
        });
    }
    std::fs::create_dir_all(root).map_err(|source| LoaderError::PinDir {
        path: root.to_owned(),
        source,
    })?;
    // SAFETY: plain mount(2) with static C strings.
    let rc = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            c"/sys/fs/bpf".as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(LoaderError::MountBpffs {
            source: io::Error::last_os_error(),
        });
    }
    log::info!("mounted bpffs on /sys/fs/bpf");
    Ok(())
}

/// Options for [`load`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// The instance's bpffs directory: maps are pinned in this build's
    /// generation below it (see `layout`), links in `links/`; `None` =
    /// nothing pinned (datapath tests).
    pub pin_dir: Option<PathBuf>,
    /// The runtime configuration; [`write_config`] changes it later.
    pub settings: DatapathSettings,
    pub sizes: MapSizes,
}

/// Checks that a map pinned in this build's generation has the shape it
/// expects (a generation's name is made of its maps' shapes, so only a
/// damaged bpffs differs).
fn check_pinned_shape(
    name: &'static str,
    path: &Path,
    sizes: &MapSizes,
) -> Result<(), LoaderError> {
    let Ok(info) = MapInfo::from_pin(path) else {
        return Ok(());
    };
    let Some((kind, key, value, entries)) = expected_shape(name, sizes) else {
        return Ok(());
    };
    let found = (
        info.map_type().ok(),
        info.key_size() as usize,
        info.value_size() as usize,
        info.max_entries(),
    );
    if found != (Some(kind), key, value, entries) {
        return Err(LoaderError::Shape {
            path: path.to_owned(),
            found: format!("{found:?}"),
            want: format!("{:?}", (kind, key, value, entries)),
        });
    }
    Ok(())
}

/// Writes the datapath configuration (slot 0 of the CONFIG array); the
/// programs read it on every packet, so a change applies at once.
pub fn write_config(ebpf: &mut Ebpf, config: DatapathConfig) -> Result<(), LoaderError> {
    let map = ebpf
        .map_mut(map_names::CONFIG)
        .ok_or(LoaderError::MissingMap {
            name: map_names::CONFIG,
        })?;
    let mut array: Array<&mut MapData, DatapathConfig> =
        Array::try_from(map).map_err(|source| LoaderError::Map {
            name: map_names::CONFIG,
            source: Box::new(source),
        })?;
    array.set(0, config, 0).map_err(|source| LoaderError::Map {
        name: map_names::CONFIG,
        source: Box::new(source),
    })
}

/// Loads the object and its programs and writes the datapath configuration.
/// With a pin directory, maps already pinned there are reused (their contents
/// survive), missing ones are created and pinned.
pub fn load(opts: &LoadOptions) -> Result<Ebpf, LoaderError> {
    let mut loader = EbpfLoader::new();
    loader
        .map_max_entries(map_names::SERVICES, opts.sizes.service_entries)
        .map_max_entries(map_names::BACKENDS, opts.sizes.backends)
        .map_max_entries(map_names::BACKEND_STATS, opts.sizes.backends + 1)
        .map_max_entries(map_names::REV_NAT, opts.sizes.rev_nat)
        .map_max_entries(map_names::CONNTRACK, opts.sizes.conntrack)
        .map_max_entries(map_names::POD_SOURCES, opts.sizes.pod_sources)
        .map_max_entries(map_names::SOCK_REV, opts.sizes.sock_rev)
        .map_max_entries(map_names::SOURCE_RANGES, opts.sizes.source_ranges)
        .map_max_entries(map_names::AFFINITY, opts.sizes.affinity)
        .map_max_entries(map_names::AFFINITY_MATCH, opts.sizes.affinity_matches)
        .map_max_entries(map_names::CLUSTER_IPS, opts.sizes.cluster_ips)
        .map_max_entries(map_names::SERVICE_CIDRS, opts.sizes.service_cidrs)
        .map_max_entries(map_names::FRAGMENTS, opts.sizes.fragments);
    let map_paths: Vec<(&'static str, PathBuf)> = match &opts.pin_dir {
        Some(pin_dir) => {
            ensure_bpffs(pin_dir)?;
            let dir = crate::datapath::layout::generation_dir(pin_dir, &opts.sizes);
            std::fs::create_dir_all(&dir).map_err(|source| LoaderError::PinDir {
                path: dir.clone(),
                source,
            })?;
            map_names::ALL
                .iter()
                .map(|name| (*name, dir.join(name)))
                .collect()
        }
        None => Vec::new(),
    };
    for (name, path) in &map_paths {
        check_pinned_shape(name, path, &opts.sizes)?;
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(EBPF_OBJECT)
        .map_err(|source| LoaderError::Load {
            pin_dir: opts.pin_dir.clone(),
            source: Box::new(source),
        })?;
    for name in program_names::ALL {
        program_mut(&mut ebpf, name)?
            .load()
            .map_err(|source| LoaderError::Program {
                name,
                source: Box::new(source),
            })?;
    }
    for name in program_names::SOCK {
        sock_program_mut(&mut ebpf, name)?
            .load()
            .map_err(|source| LoaderError::Program {
                name,
                source: Box::new(source),
            })?;
    }
    program_mut(&mut ebpf, program_names::CT_GC_ARM)?
        .load()
        .map_err(|source| LoaderError::Program {
            name: program_names::CT_GC_ARM,
            source: Box::new(source),
        })?;
    write_config(&mut ebpf, opts.settings.to_config())?;
    Ok(ebpf)
}

/// Arms the in-kernel conntrack collector (see the datapath's `gc`): the
/// timer is initialised if the map is new, its callback becomes this
/// object's, and it starts with the period in the agent's slot
/// ([`KernelConntrack::configure`](crate::datapath::dataplane::kernel::KernelConntrack::configure)
/// writes it first). Idempotent; a restarted agent re-arms the pinned
/// timer.
pub fn arm_ct_gc(ebpf: &mut Ebpf) -> Result<(), LoaderError> {
    use aya::programs::TestRun as _;
    let prog = program_mut(ebpf, program_names::CT_GC_ARM)?;
    // A TC program's test run needs a packet of at least an Ethernet header.
    let packet = [0u8; 64];
    let result = prog
        .test_run(aya::programs::TestRunOptions {
            data_in: Some(&packet),
            ..Default::default()
        })
        .map_err(|source| LoaderError::Program {
            name: program_names::CT_GC_ARM,
            source: Box::new(source),
        })?;
    if result.return_value != 0 {
        return Err(LoaderError::ArmCollector {
            step: result.return_value,
        });
    }
    Ok(())
}

/// A loaded program of type `P` by name.
fn typed_program_mut<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut P, LoaderError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(LoaderError::MissingProgram { name })?
        .try_into()
        .map_err(|source| LoaderError::Program {
            name,
            source: Box::new(source),
        })
}

/// A loaded TC program by name.
pub fn program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut SchedClassifier, LoaderError> {
    typed_program_mut(ebpf, name)
}

/// A loaded socket-level (cgroup) program by name.
pub fn sock_program_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, LoaderError> {
    typed_program_mut(ebpf, name)
}

/// Attaches the socket-level programs to the cgroup v2 directory `cgroup`
/// (every process below it), with pinned links `<links>/cgroup_<program>`.
/// Other programs may be attached to the same hooks. A
/// restarted agent attaches the new programs first and only then removes
/// the earlier agent's links: for that moment both run, which is harmless
/// (the second sees a backend, not a frontend, and leaves it), so no
/// connection goes untranslated.
pub fn attach_cgroup(ebpf: &mut Ebpf, pin_dir: &Path, cgroup: &Path) -> Result<(), LoaderError> {
    let links = links_dir(pin_dir);
    std::fs::create_dir_all(&links).map_err(|source| LoaderError::PinDir {
        path: links.clone(),
        source,
    })?;
    let dir = std::fs::File::open(cgroup).map_err(|source| LoaderError::Cgroup {
        path: cgroup.to_owned(),
        source,
    })?;
    for name in program_names::SOCK {
        let prog = sock_program_mut(ebpf, name)?;
        let attach_err = |source| LoaderError::AttachCgroup {
            program: name,
            cgroup: cgroup.to_owned(),
            source: Box::new(source),
        };
        // A BPF link on a cgroup always coexists with other links and
        // multi-attached programs; `bpf_link_create` takes no attach flags
        // for cgroups (any is EINVAL), hence the default mode.
        let id = prog
            .attach(&dir, CgroupAttachMode::default())
            .map_err(attach_err)?;
        let link = prog.take_link(id).map_err(attach_err)?;
        let fd_link = FdLink::try_from(link).map_err(|source| LoaderError::Link {
            interface: cgroup.display().to_string(),
            source: Box::new(source),
        })?;
        let pin = links.join(format!("cgroup_{name}"));
        let fresh = links.join(format!("cgroup_{name}_new"));
        remove_file(&fresh)?;
        fd_link.pin(&fresh).map_err(|source| LoaderError::PinLink {
            path: fresh.clone(),
            source: Box::new(source),
        })?;
        // Replaces (and so detaches) an earlier agent's link.
        std::fs::rename(&fresh, &pin).map_err(|source| LoaderError::Remove {
            path: pin.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Detaches the socket-level programs (removes their pinned links).
pub fn detach_cgroup(pin_dir: &Path) -> Result<(), LoaderError> {
    for name in program_names::SOCK {
        remove_file(&links_dir(pin_dir).join(format!("cgroup_{name}")))?;
    }
    Ok(())
}

/// `CGROUP2_SUPER_MAGIC` and `CGROUP_SUPER_MAGIC` (cgroup v1), from
/// linux/magic.h.
const CGROUP2_MAGIC: i64 = 0x6367_7270;
const CGROUP1_MAGIC: i64 = 0x0027_e0eb;

/// Checks that `path` is a cgroup2 mount (its root or a cgroup below it)
/// before anything is pinned: attaching the socket-level programs to
/// anything else fails late and obscurely (`Bad file descriptor`).
pub fn check_cgroup2(path: &Path) -> Result<(), LoaderError> {
    let found = match std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        Ok(c) => {
            // SAFETY: statfs into a zeroed struct we own.
            unsafe {
                let mut buf: libc::statfs = std::mem::zeroed();
                if libc::statfs(c.as_ptr(), &mut buf) == 0 {
                    Some(buf.f_type as i64)
                } else {
                    None
                }
            }
        }
        Err(_) => None,
    };
    let what = match found {
        Some(CGROUP2_MAGIC) => return Ok(()),
        Some(CGROUP1_MAGIC) => "a cgroup v1 hierarchy".to_owned(),
        Some(magic) => format!("a filesystem of type {magic:#x}, not cgroup2"),
        None => "missing".to_owned(),
    };
    Err(LoaderError::NotCgroup2 {
        path: path.to_owned(),
        what,
        mounts: cgroup2_mounts()
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// Every cgroup2 mount of this mount namespace.
fn cgroup2_mounts() -> Vec<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
            (kind == "cgroup2").then(|| PathBuf::from(path))
        })
        .collect()
}

/// The first cgroup v2 mount of this mount namespace (the node's
/// `--cgroup-root` default).
pub fn cgroup2_mount() -> Option<PathBuf> {
    cgroup2_mounts().into_iter().next()
}

/// The cookie of the calling thread's network namespace
/// (`SO_NETNS_COOKIE`, v5.14), which the socket-level programs compare with
/// each socket's.
pub fn netns_cookie() -> io::Result<u64> {
    const SO_NETNS_COOKIE: libc::c_int = 71;
    // SAFETY: a socket we own, closed below; getsockopt into a u64 of the
    // length we pass.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut cookie = 0u64;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        let rc = libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        );
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc != 0 {
            return Err(err);
        }
        Ok(cookie)
    }
}

/// What an interface is to the datapath, which decides its programs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// A pod's host-side veth: `from_pod` / `to_pod`.
    Pod,
    /// A node uplink: `from_netdev` / `to_netdev`.
    Netdev,
}

impl Role {
    /// The (program, hook, pin suffix) pairs of this role.
    fn hooks(self) -> [(&'static str, TcAttachType, &'static str); 2] {
        match self {
            Self::Pod => [
                (program_names::FROM_POD, TcAttachType::Ingress, "ingress"),
                (program_names::TO_POD, TcAttachType::Egress, "egress"),
            ],
            Self::Netdev => [
                (program_names::FROM_NETDEV, TcAttachType::Ingress, "ingress"),
                (program_names::TO_NETDEV, TcAttachType::Egress, "egress"),
            ],
        }
    }
}

/// Pin suffixes, the same for every role (a pinned link is replaced in
/// place by whatever program the interface's current role needs).
const PIN_SUFFIXES: [&str; 2] = ["ingress", "egress"];

/// Attaches the programs to interfaces and keeps their links pinned.
pub struct Attacher {
    links_dir: PathBuf,
    /// Interfaces with both hooks attached, and their role.
    attached: BTreeMap<String, Role>,
}

impl Attacher {
    pub fn new(pin_dir: &Path) -> Result<Self, LoaderError> {
        let links_dir = links_dir(pin_dir);
        std::fs::create_dir_all(&links_dir).map_err(|source| LoaderError::PinDir {
            path: links_dir.clone(),
            source,
        })?;
        Ok(Self {
            links_dir,
            attached: BTreeMap::new(),
        })
    }

    /// The role `ifname` is attached with, if any.
    pub fn role(&self, ifname: &str) -> Option<Role> {
        self.attached.get(ifname).copied()
    }

    pub fn attached(&self) -> impl Iterator<Item = &str> {
        self.attached.keys().map(String::as_str)
    }

    /// bpffs refuses names with a dot, hence `<ifname>_<direction>`.
    fn pin_path(&self, ifname: &str, direction: &str) -> PathBuf {
        self.links_dir.join(format!("{ifname}_{direction}"))
    }

    /// Attaches both hooks of `role` to `ifname`. A link pinned by an
    /// earlier agent is updated in place (the old program keeps running until
    /// the new one replaces it, so no packet goes unprocessed); otherwise a
    /// new TCX link is created and pinned.
    #[tracing::instrument(level = "debug", skip(self, ebpf), fields(interface = ifname, role = ?role))]
    pub fn attach(&mut self, ebpf: &mut Ebpf, ifname: &str, role: Role) -> Result<(), LoaderError> {
        for hook in role.hooks() {
            self.attach_hook(ebpf, ifname, hook)?;
        }
        self.attached.insert(ifname.to_owned(), role);
        Ok(())
    }

    /// Switches every pinned link of `present` interfaces to this object's
    /// programs in place (`bpf_link_update`): every egress hook first, then
    /// every ingress hook, so that a connection a new ingress program opens
    /// (in the new maps) is known to every egress program it meets. An
    /// upgrade's switch from one generation of maps to the next.
    pub fn switch_all(
        &mut self,
        ebpf: &mut Ebpf,
        present: &BTreeMap<String, Role>,
    ) -> Result<usize, LoaderError> {
        let pinned: Vec<String> = self.pinned_interfaces();
        let mut switched = 0;
        for direction in ["egress", "ingress"] {
            for ifname in &pinned {
                let Some(role) = present.get(ifname) else {
                    continue;
                };
                for hook in role.hooks().into_iter().filter(|h| h.2 == direction) {
                    self.attach_hook(ebpf, ifname, hook)?;
                    switched += 1;
                }
            }
        }
        for ifname in pinned {
            if let Some(role) = present.get(&ifname) {
                self.attached.insert(ifname, *role);
            }
        }
        Ok(switched)
    }

    fn attach_hook(
        &mut self,
        ebpf: &mut Ebpf,
        ifname: &str,
        (program, attach_type, direction): (&'static str, TcAttachType, &'static str),
    ) -> Result<(), LoaderError> {
        let pin = self.pin_path(ifname, direction);
        let prog = program_mut(ebpf, program)?;
        let attach_err = |source| LoaderError::Attach {
            program,
            interface: ifname.to_owned(),
            direction,
            source: Box::new(source),
        };
        let replaced = match PinnedLink::from_pin(&pin) {
            Ok(old) => {
                let link = SchedClassifierLink::try_from(FdLink::from(old));
                match link.map(|link| prog.attach_to_link(link)) {
                    Ok(Ok(id)) => Some(id),
                    // The pinned link is stale (its interface was
                    // recreated, or it is not a TCX link): drop the pin
                    // and attach afresh.
                    Ok(Err(_)) | Err(_) => {
                        remove_file(&pin)?;
                        None
                    }
                }
            }
            Err(LinkError::SyscallError(e)) if e.io_error.kind() == io::ErrorKind::NotFound => None,
            Err(_) => {
                remove_file(&pin)?;
                None
            }
        };
        match replaced {
            Some(id) => {
                // The pin already refers to this link; dropping our handle
                // leaves it attached.
                drop(prog.take_link(id).map_err(attach_err)?);
            }
            None => {
                // First in the TCX chain: every program after netlb's (a
                // CNI's policy, the bandwidth plugin's classic clsact
                // filters, which run after all TCX programs) sees packets
                // as kube-proxy's NAT leaves them (DNATed on ingress,
                // SNATed on egress), and netlb hands every packet on with
                // TCX_NEXT.
                let id = prog
                    .attach_with_options(
                        ifname,
                        attach_type,
                        TcAttachOptions::TcxOrder(LinkOrder::first()),
                    )
                    .map_err(attach_err)?;
                let link = prog.take_link(id).map_err(attach_err)?;
                let fd_link = FdLink::try_from(link).map_err(|source| LoaderError::Link {
                    interface: ifname.to_owned(),
                    source: Box::new(source),
                })?;
                fd_link.pin(&pin).map_err(|source| LoaderError::PinLink {
                    path: pin.clone(),
                    source: Box::new(source),
                })?;
            }
        }
        Ok(())
    }

    /// Detaches from `ifname` by removing its pins (the kernel detaches a link
    /// when its last reference goes).
    pub fn detach(&mut self, ifname: &str) -> Result<(), LoaderError> {
        self.attached.remove(ifname);
        for direction in PIN_SUFFIXES {
            remove_file(&self.pin_path(ifname, direction))?;
        }
        Ok(())
    }

    /// Interface names that have pinned links (from this or an earlier agent).
    pub fn pinned_interfaces(&self) -> Vec<String> {
        pinned_interfaces_in(&self.links_dir)
    }
}

/// Interface names with links pinned in `links_dir` (see [`links_dir`]).
pub fn pinned_interfaces_in(links_dir: &Path) -> Vec<String> {
    {
        let mut names: Vec<String> = std::fs::read_dir(links_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let name = entry.file_name().into_string().ok()?;
                PIN_SUFFIXES
                    .iter()
                    .find_map(|direction| name.strip_suffix(&format!("_{direction}")))
                    .map(str::to_owned)
            })
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

fn remove_file(path: &Path) -> Result<(), LoaderError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LoaderError::Remove {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes a pin directory with everything pinned in it: maps are freed and
/// links detached once no process holds them.
pub fn remove_pins(pin_dir: &Path) -> Result<(), LoaderError> {
    match std::fs::remove_dir_all(pin_dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(LoaderError::Remove {
            path: pin_dir.to_owned(),
            source,
        }),
    }
}
