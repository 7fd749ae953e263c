//! A hermetic multi-node topology in network namespaces.
//!
//! ```text
//!   pod ns (eth0 10.244.<n>.x/32) --veth-- node<n> ns --uplink0-- fabric ns (br0) -- ext ns
//! ```
//! - Pods: Calico-style wiring: `/32` address, default route via the
//!   link-local gateway 169.254.1.1 (an address on the node's loopback,
//!   answered by ARP), node-side `veth<run><k>` with a /32 route to the pod.
//! - Nodes: IP forwarding, rp_filter off, uplink 192.168.77.<10+n>/24 on
//!   the fabric bridge, routes to the other nodes' pod CIDRs and to the
//!   external network. **No default route**: an address nothing routes
//!   (an untranslated ClusterIP) dies in the node with "network unreachable".
//! - Fabric: bridge 192.168.77.1/24, routes to every pod CIDR, and the
//!   external network 203.0.113.0/24 where the `ext` namespace
//!   (203.0.113.10) plays an outside client.
//!
//! Nothing here touches the root namespace: veth pairs are created inside
//! the namespaces. Everything is named with a per-run prefix and removed on
//! drop; [`cleanup_stale`] removes what a crashed run left.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    sync::atomic::{AtomicU32, Ordering},
};

use crate::process::{self, ProcessError};

#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    #[error(transparent)]
    Command(#[from] ProcessError),
    #[error("unknown pod {name}")]
    UnknownPod { name: String },
    #[error("node {index} does not exist")]
    UnknownNode { index: usize },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// Prefix of every namespace this crate creates.
pub const NETNS_PREFIX: &str = "nlb-";

/// A short random run id (6 hex chars).
pub fn run_id() -> String {
    let mut bytes = [0u8; 4];
    // SAFETY: getrandom(2) into a local buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    let seed = if n == 4 {
        u32::from_ne_bytes(bytes)
    } else {
        std::process::id()
            ^ (std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0))
    };
    format!("{:06x}", seed & 0xff_ffff)
}

fn ip(args: &[&str]) -> Result<(), ProcessError> {
    process::run("ip", args).map(|_| ())
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), ProcessError> {
    let mut full = vec!["netns", "exec", ns];
    full.extend_from_slice(args);
    process::run("ip", &full).map(|_| ())
}

fn sysctl(ns: &str, settings: &[&str]) -> Result<(), ProcessError> {
    let mut args = vec!["sysctl", "-qw"];
    args.extend_from_slice(settings);
    in_ns(ns, &args)
}

/// The first cgroup v2 mount (`/sys/fs/cgroup`, or `/sys/fs/cgroup/unified`
/// on hybrid hosts), where the testbed creates its per-node cgroups.
pub fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_, path, kind) = (fields.next()?, fields.next()?, fields.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(path))
    })
}

/// Whether `name` is one of this crate's per-run names (`nlb-<6 hex>-...`)
/// of another run than `keep_run`.
fn stale_name(name: &str, keep_run: Option<&str>) -> bool {
    let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
        return false;
    };
    let run = rest.split('-').next().unwrap_or("");
    run.len() == 6 && run.chars().all(|c| c.is_ascii_hexdigit()) && Some(run) != keep_run
}

/// Removes namespaces and (empty) cgroups left by crashed runs
/// (`nlb-<6 hex>-...`), except those of `keep_run`.
pub fn cleanup_stale(keep_run: Option<&str>) {
    if let Some(root) = cgroup2_mount()
        && let Ok(entries) = std::fs::read_dir(&root)
    {
        for entry in entries.flatten() {
            if stale_name(&entry.file_name().to_string_lossy(), keep_run) {
                let _ = std::fs::remove_dir(entry.path());
            }
        }
    }
    let Ok(out) = process::run("ip", &["netns", "list"]) else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if stale_name(name, keep_run) {
            let _ = ip(&["netns", "del", name]);
        }
    }
}

#[derive(Clone, Debug)]
pub struct Node {
    pub index: usize,
    pub netns: String,
    pub uplink_ip: Ipv4Addr,
    /// The node's pod network, 10.244.<index>.0/24.
    pub pod_cidr_base: Ipv4Addr,
    /// bpffs directory for this node's agent.
    pub bpffs: PathBuf,
    /// A cgroup v2 directory made for this node: the agent's socket-level
    /// programs attach here (never to the machine's root cgroup), and the
    /// node's "host processes" of a test run in it.
    pub cgroup: PathBuf,
}

impl Node {
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.netns)
    }
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub netns: String,
    pub ip: Ipv4Addr,
    pub node: usize,
    pub host_veth: String,
}

pub struct TestbedSpec {
    pub nodes: usize,
}

/// A running topology; dropping it removes everything.
pub struct Testbed {
    pub run: String,
    pub nodes: Vec<Node>,
    pub fabric: String,
    pub ext: String,
    pub ext_ip: Ipv4Addr,
    pods: Vec<Pod>,
    next_veth: AtomicU32,
    next_host: Vec<u8>,
    namespaces: Vec<String>,
    /// Scratch directory for logs and manifests, removed on drop.
    pub dir: PathBuf,
}

/// A router's sysctls: forwarding on, no reverse-path filter (the
/// topology routes asymmetrically on purpose).
const ROUTER_SYSCTLS: [&str; 3] = [
    "net.ipv4.ip_forward=1",
    "net.ipv4.conf.all.rp_filter=0",
    "net.ipv4.conf.default.rp_filter=0",
];

impl Testbed {
    pub fn new(spec: TestbedSpec) -> Result<Self, TestbedError> {
        let run = run_id();
        let dir = std::env::temp_dir().join(format!("nlb-{run}"));
        std::fs::create_dir_all(&dir).map_err(|source| TestbedError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let mut tb = Self {
            fabric: format!("{NETNS_PREFIX}{run}-fabric"),
            ext: format!("{NETNS_PREFIX}{run}-ext"),
            ext_ip: Ipv4Addr::new(203, 0, 113, 10),
            run,
            nodes: Vec::new(),
            pods: Vec::new(),
            next_veth: AtomicU32::new(0),
            next_host: Vec::new(),
            namespaces: Vec::new(),
            dir,
        };
        // On error, `tb` is dropped and removes what was made so far.
        tb.build(spec.nodes.max(1))?;
        Ok(tb)
    }

    fn add_netns(&mut self, name: &str) -> Result<(), TestbedError> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build(&mut self, nodes: usize) -> Result<(), TestbedError> {
        let cgroup_root = cgroup2_mount().ok_or_else(|| TestbedError::Io {
            what: "finding the cgroup v2 mount".into(),
            source: std::io::Error::from(std::io::ErrorKind::NotFound),
        })?;
        self.build_fabric()?;
        self.build_outside()?;
        for index in 0..nodes {
            self.build_node(index, &cgroup_root)?;
        }
        // Every node routes the other nodes' pod networks to them.
        for a in 0..nodes {
            for b in (0..nodes).filter(|b| *b != a) {
                ip(&[
                    "-n",
                    &self.nodes[a].netns,
                    "route",
                    "add",
                    &format!("10.244.{b}.0/24"),
                    "via",
                    &self.nodes[b].uplink_ip.to_string(),
                ])?;
            }
        }
        Ok(())
    }

    /// The fabric: a bridge the nodes' uplinks join (192.168.77.0/24), a
    /// router between them and the outside client.
    fn build_fabric(&mut self) -> Result<(), TestbedError> {
        let fabric = self.fabric.clone();
        self.add_netns(&fabric)?;
        ip(&["-n", &fabric, "link", "add", "br0", "type", "bridge"])?;
        ip(&[
            "-n",
            &fabric,
            "addr",
            "add",
            "192.168.77.1/24",
            "dev",
            "br0",
        ])?;
        ip(&["-n", &fabric, "link", "set", "br0", "up"])?;
        sysctl(&fabric, &ROUTER_SYSCTLS)?;
        Ok(())
    }

    /// The outside client (203.0.113.10), beyond the fabric's router.
    fn build_outside(&mut self) -> Result<(), TestbedError> {
        let fabric = self.fabric.clone();
        let ext = self.ext.clone();
        self.add_netns(&ext)?;
        ip(&[
            "-n", &fabric, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns",
            &ext,
        ])?;
        ip(&[
            "-n",
            &fabric,
            "addr",
            "add",
            "203.0.113.1/24",
            "dev",
            "ext0",
        ])?;
        ip(&["-n", &fabric, "link", "set", "ext0", "up"])?;
        ip(&["-n", &ext, "addr", "add", "203.0.113.10/24", "dev", "eth0"])?;
        ip(&["-n", &ext, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ext, "route", "add", "default", "via", "203.0.113.1"])?;
        Ok(())
    }

    /// Node `index`: its namespace with an uplink on the fabric
    /// (192.168.77.10 + index), its pod network 10.244.index.0/24 routed
    /// to it, and a cgroup of its own for its host processes.
    fn build_node(
        &mut self,
        index: usize,
        cgroup_root: &std::path::Path,
    ) -> Result<(), TestbedError> {
        let fabric = self.fabric.clone();
        let netns = format!("{NETNS_PREFIX}{}-node{index}", self.run);
        self.add_netns(&netns)?;
        let uplink_ip = Ipv4Addr::new(192, 168, 77, 10 + index as u8);
        let port = format!("n{index}");
        ip(&[
            "-n", &fabric, "link", "add", &port, "type", "veth", "peer", "name", "uplink0",
            "netns", &netns,
        ])?;
        ip(&["-n", &fabric, "link", "set", &port, "master", "br0"])?;
        ip(&["-n", &fabric, "link", "set", &port, "up"])?;
        let uplink_cidr = format!("{uplink_ip}/24");
        ip(&["-n", &netns, "addr", "add", &uplink_cidr, "dev", "uplink0"])?;
        ip(&["-n", &netns, "link", "set", "uplink0", "up"])?;
        // The pods' gateway address; ARP for it is answered by the node.
        ip(&["-n", &netns, "addr", "add", "169.254.1.1/32", "dev", "lo"])?;
        sysctl(&netns, &ROUTER_SYSCTLS)?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            "192.168.77.1",
        ])?;
        let pod_cidr = format!("10.244.{index}.0/24");
        let via = uplink_ip.to_string();
        ip(&["-n", &fabric, "route", "add", &pod_cidr, "via", &via])?;
        let cgroup = cgroup_root.join(format!("{NETNS_PREFIX}{}-node{index}", self.run));
        std::fs::create_dir(&cgroup).map_err(|source| TestbedError::Io {
            what: format!("creating cgroup {}", cgroup.display()),
            source,
        })?;
        self.nodes.push(Node {
            index,
            netns,
            uplink_ip,
            pod_cidr_base: Ipv4Addr::new(10, 244, index as u8, 0),
            bpffs: PathBuf::from(format!(
                "/sys/fs/bpf/{NETNS_PREFIX}{}-node{index}",
                self.run
            )),
            cgroup,
        });
        self.next_host.push(10);
        Ok(())
    }

    /// Adds a pod on `node`. Its IP is the next free one from .10 up.
    pub fn add_pod(&mut self, node: usize, name: &str) -> Result<Pod, TestbedError> {
        let n = self
            .nodes
            .get(node)
            .ok_or(TestbedError::UnknownNode { index: node })?
            .clone();
        let host = self.next_host[node];
        self.next_host[node] += 1;
        let pod_ip = Ipv4Addr::new(10, 244, node as u8, host);
        let netns = format!("{NETNS_PREFIX}{}-{name}", self.run);
        self.add_netns(&netns)?;
        let k = self.next_veth.fetch_add(1, Ordering::SeqCst);
        let host_veth = format!("veth{}{k}", self.run);
        ip(&[
            "-n", &n.netns, "link", "add", &host_veth, "type", "veth", "peer", "name", "eth0",
            "netns", &netns,
        ])?;
        sysctl(
            &n.netns,
            &[
                &format!("net.ipv4.conf.{host_veth}.proxy_arp=1"),
                &format!("net.ipv4.conf.{host_veth}.rp_filter=0"),
            ],
        )?;
        ip(&["-n", &n.netns, "link", "set", &host_veth, "up"])?;
        ip(&[
            "-n",
            &netns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "169.254.1.1",
            "dev",
            "eth0",
            "scope",
            "link",
        ])?;
        ip(&[
            "-n",
            &netns,
            "route",
            "add",
            "default",
            "via",
            "169.254.1.1",
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &n.netns,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            &host_veth,
        ])?;
        let pod = Pod {
            name: name.to_owned(),
            netns,
            ip: pod_ip,
            node,
            host_veth,
        };
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Removes a pod (its namespace and so its veth pair).
    pub fn remove_pod(&mut self, name: &str) -> Result<(), TestbedError> {
        let index = self
            .pods
            .iter()
            .position(|p| p.name == name)
            .ok_or_else(|| TestbedError::UnknownPod {
                name: name.to_owned(),
            })?;
        let pod = self.pods.remove(index);
        ip(&["netns", "del", &pod.netns])?;
        self.namespaces.retain(|n| n != &pod.netns);
        let _ = ip(&[
            "-n",
            &self.nodes[pod.node].netns,
            "route",
            "del",
            &format!("{}/32", pod.ip),
        ]);
        Ok(())
    }

    pub fn pod(&self, name: &str) -> Result<&Pod, TestbedError> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| TestbedError::UnknownPod {
                name: name.to_owned(),
            })
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// Routes `prefix` (external IPs, load-balancer IPs) from the fabric to
    /// a node, as the network in front of a cluster does. Only the fabric
    /// namespace of this topology is changed.
    pub fn route_to_node(&self, prefix: &str, node: usize) -> Result<(), TestbedError> {
        let n = self
            .nodes
            .get(node)
            .ok_or(TestbedError::UnknownNode { index: node })?;
        ip(&[
            "-n",
            &self.fabric,
            "route",
            "replace",
            prefix,
            "via",
            &n.uplink_ip.to_string(),
        ])?;
        Ok(())
    }

    /// Runs a command in a namespace and returns its output (success or not).
    pub fn exec(&self, netns: &str, args: &[&str]) -> std::io::Result<std::process::Output> {
        std::process::Command::new("ip")
            .args(["netns", "exec", netns])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
    }

    /// Runs a command in `netns` as a process of `cgroup` (it moves itself
    /// there before starting the command): a host process of a node when
    /// `netns` is the node's namespace and `cgroup` its cgroup.
    pub fn exec_in_cgroup(
        &self,
        cgroup: &std::path::Path,
        netns: &str,
        args: &[&str],
    ) -> std::io::Result<std::process::Output> {
        let procs = cgroup.join("cgroup.procs");
        std::process::Command::new("sh")
            .arg("-c")
            .arg("echo $$ > \"$0\" && exec ip netns exec \"$@\"")
            .arg(&procs)
            .arg(netns)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
    }

    /// Runs a command as a host process of node `node` (its namespace and
    /// cgroup).
    pub fn exec_host(&self, node: usize, args: &[&str]) -> std::io::Result<std::process::Output> {
        let n = &self.nodes[node];
        self.exec_in_cgroup(&n.cgroup, &n.netns, args)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for ns in self.namespaces.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
        for node in &self.nodes {
            let _ = std::fs::remove_dir_all(&node.bpffs);
            // Empty by now: the processes a test ran in it have ended.
            let _ = std::fs::remove_dir(&node.cgroup);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Binds a TCP listener inside a network namespace (from a short-lived
/// thread that enters it: setns only moves the calling thread). The socket
/// stays in that namespace; it can be served from any thread.
pub fn bind_in_netns(netns: &str, addr: &str) -> Result<std::net::TcpListener, TestbedError> {
    let path = PathBuf::from("/run/netns").join(netns);
    let addr = addr.to_owned();
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::File::open(&path).map_err(|source| TestbedError::Io {
            what: format!("opening {}", path.display()),
            source,
        })?;
        // SAFETY: setns on a namespace fd we own, in a thread that ends
        // right after binding.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(TestbedError::Io {
                what: format!("entering {}", path.display()),
                source: std::io::Error::last_os_error(),
            });
        }
        std::net::TcpListener::bind(&addr).map_err(|source| TestbedError::Io {
            what: format!("binding {addr}"),
            source,
        })
    })
    .join()
    .unwrap_or_else(|_| {
        Err(TestbedError::Io {
            what: "binding thread panicked".into(),
            source: std::io::Error::other("panic"),
        })
    })
}
