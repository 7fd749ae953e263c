//! `netlb-agent run`: its flags (and kube-proxy's configuration file,
//! `--config`) into the agent's options, and the agent run until SIGINT or
//! SIGTERM.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use netlb_agent::{
    agent::{self, RunOptions, SourceConfig},
    config::{CtTimeouts, DatapathSettings, GoDuration, PortRange},
    datapath::{
        ifaces::{self, Ipv4Cidr, NamePattern},
        layout::MapSizes,
        loader,
    },
    k8s::kube::ApiConfig,
    model::NodeContext,
};

/// Load the datapath and program it from a source until SIGINT/SIGTERM.
#[derive(clap::Args)]
pub struct RunArgs {
    /// kube-proxy's configuration file (a KubeProxyConfiguration, as
    /// kubeadm writes it): its meaningful fields become defaults that
    /// flags given here or in the environment override; unknown and
    /// ignored fields are reported once.
    #[arg(long, env = "NETLB_CONFIG")]
    config: Option<PathBuf>,
    /// Remove everything an earlier agent left (pinned maps, attached
    /// programs) and exit (kube-proxy's --cleanup).
    #[arg(long)]
    cleanup: bool,
    /// Accepted for kube-proxy compatibility: netlb's API client makes
    /// one list and one watch per resource and needs no client-side
    /// rate limit; the value is logged.
    #[arg(long, env = "NETLB_KUBE_API_QPS")]
    kube_api_qps: Option<f64>,
    /// As --kube-api-qps.
    #[arg(long, env = "NETLB_KUBE_API_BURST")]
    kube_api_burst: Option<i64>,
    /// Program from a directory of Service and EndpointSlice manifests
    /// (YAML/JSON), re-read when it changes, instead of the API server.
    #[arg(long, conflicts_with = "kubeconfig")]
    manifests: Option<PathBuf>,
    /// kubeconfig of the API server to watch (default: KUBECONFIG, then
    /// in-cluster configuration, then ~/.kube/config).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The API server's address, overriding the kubeconfig's or the
    /// in-cluster one (kube-proxy's --master). It must reach the API
    /// server itself, not the `kubernetes` Service, which this agent
    /// programs.
    #[arg(long, conflicts_with = "manifests", env = "NETLB_MASTER")]
    master: Option<String>,
    /// cgroup v2 directory whose processes get socket-level load
    /// balancing (host processes and hostNetwork pods reaching Services);
    /// only sockets in the agent's network namespace are rewritten.
    /// Default: the node's cgroup2 mount. "" turns it off.
    #[arg(long, env = "NETLB_CGROUP_ROOT")]
    cgroup_root: Option<String>,
    /// Renew API watches about this often (each within 8/9 to 10/9 of
    /// it); a connection silent for this long plus 10 s is taken for
    /// dead and replaced (a half-open connection).
    #[arg(long, default_value_t = 45, env = "NETLB_WATCH_TIMEOUT_S")]
    watch_timeout_s: u64,
    /// /healthz and /livez address (kube-proxy's default); "" disables.
    #[arg(
        long,
        default_value = "0.0.0.0:10256",
        env = "NETLB_HEALTHZ_BIND_ADDRESS"
    )]
    healthz_bind_address: String,
    /// /metrics address (kube-proxy's default); "" disables.
    #[arg(
        long,
        default_value = "127.0.0.1:10249",
        env = "NETLB_METRICS_BIND_ADDRESS"
    )]
    metrics_bind_address: String,
    /// Enter this network namespace first (e.g. /run/netns/NAME), for
    /// dev topologies. Do not wrap the agent in `ip netns exec`: that
    /// remounts /sys and hides /sys/fs/bpf.
    #[arg(long, env = "NETLB_NETNS")]
    netns: Option<PathBuf>,
    /// bpffs directory for this instance's pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/netlb", env = "NETLB_BPFFS")]
    bpffs: PathBuf,
    /// Name patterns of pod host-side interfaces (repeatable).
    #[arg(long = "pod-iface", default_values = ["veth*", "cali*", "lxc*"], env = "NETLB_POD_IFACE", value_delimiter = ',')]
    pod_ifaces: Vec<String>,
    /// Name patterns of node uplinks (repeatable): traffic from outside
    /// the node to NodePorts, external IPs and load-balancer IPs arrives
    /// there, and north-south SNAT happens there.
    #[arg(long = "netdev", default_values = ["eth*", "ens*", "enp*", "eno*", "bond*"], env = "NETLB_NETDEV", value_delimiter = ',')]
    netdevs: Vec<String>,
    /// CIDRs whose local addresses accept node ports, or `primary` for
    /// the node's primary address (kube-proxy's --nodeport-addresses;
    /// repeatable or comma-separated; IPv6 CIDRs are skipped). Default:
    /// the addresses of the uplinks (--netdev).
    #[arg(
        long = "nodeport-addresses",
        value_delimiter = ',',
        env = "NETLB_NODEPORT_ADDRESSES"
    )]
    nodeport_addresses: Vec<String>,
    /// This node's address for source NAT of north-south flows to
    /// backends on other nodes. Default: the first address of the first
    /// uplink.
    #[arg(long, env = "NETLB_NODE_IP")]
    node_ip: Option<Ipv4Addr>,
    /// Source address for hairpin flows (a pod reaching itself through
    /// its Service).
    #[arg(long, default_value = "169.254.42.1", env = "NETLB_SERVICE_LOOPBACK")]
    service_loopback: Ipv4Addr,
    /// This node's name (for traffic policies and its Node object).
    /// Default: the OS hostname, lower-cased, as kube-proxy's.
    #[arg(long = "hostname-override", env = "NODE_NAME")]
    node_name: Option<String>,
    /// The cluster's pod network (kube-proxy's --cluster-cidr, its
    /// detect-local mode ClusterCIDR): traffic from it arriving at an
    /// uplink to a node port, external or load-balancer IP is in-cluster
    /// traffic and uses the cluster-wide endpoints, as pods on this node
    /// do. Comma-separated families; the IPv4 one is used.
    #[arg(long, env = "NETLB_CLUSTER_CIDR", value_delimiter = ',')]
    cluster_cidr: Vec<String>,
    /// The Service CIDRs (the API server's --service-cluster-ip-range;
    /// comma-separated, IPv4 ones used): a new connection from a pod or
    /// host process to an address in them that no Service has is
    /// dropped, as kube-proxy's nftables mode does. (A cluster IP's
    /// undefined ports are rejected with or without this.)
    #[arg(long, env = "NETLB_SERVICE_CLUSTER_IP_RANGE", value_delimiter = ',')]
    service_cluster_ip_range: Vec<String>,
    /// Accept Services labelled service.kubernetes.io/service-proxy-name
    /// with this value (unlabelled Services are always accepted).
    #[arg(long, env = "NETLB_PROXY_NAME")]
    proxy_name: Option<String>,
    /// kube-proxy's --min-sync-period (Go duration, e.g. 1s): overrides
    /// --min-sync-interval-ms.
    #[arg(long, env = "NETLB_MIN_SYNC_PERIOD")]
    min_sync_period: Option<GoDuration>,
    /// kube-proxy's --sync-period (Go duration, e.g. 30s): overrides
    /// --resync-interval-s.
    #[arg(long, env = "NETLB_SYNC_PERIOD")]
    sync_period: Option<GoDuration>,
    /// Minimum interval between syncs, in milliseconds.
    #[arg(long, default_value_t = 50, env = "NETLB_MIN_SYNC_INTERVAL_MS")]
    min_sync_interval_ms: u64,
    /// Full resync interval, in seconds.
    #[arg(long, default_value_t = 30, env = "NETLB_RESYNC_INTERVAL_S")]
    resync_interval_s: u64,
    #[arg(long, default_value_t = MapSizes::default().service_entries, env = "NETLB_MAX_SERVICE_ENTRIES")]
    max_service_entries: u32,
    #[arg(long, default_value_t = MapSizes::default().backends, env = "NETLB_MAX_BACKENDS")]
    max_backends: u32,
    #[arg(long, default_value_t = MapSizes::default().rev_nat, env = "NETLB_MAX_REV_NAT")]
    max_rev_nat: u32,
    #[arg(long, default_value_t = MapSizes::default().conntrack, env = "NETLB_MAX_CONNTRACK")]
    max_conntrack: u32,
    /// Pod addresses for source validation (`NETLB_POD_SOURCES`).
    #[arg(long, default_value_t = MapSizes::default().pod_sources, env = "NETLB_MAX_POD_SOURCES")]
    max_pod_sources: u32,
    /// Socket-level reverse translations (an LRU: a lost one shows the
    /// backend as a host socket's peer).
    #[arg(long, default_value_t = MapSizes::default().sock_rev, env = "NETLB_MAX_SOCK_REV")]
    max_sock_rev: u32,
    /// loadBalancerSourceRanges entries (one per frontend and CIDR).
    #[arg(long, default_value_t = MapSizes::default().source_ranges, env = "NETLB_MAX_SOURCE_RANGES")]
    max_source_ranges: u32,
    /// Session-affinity clients (an LRU: a lost one only loses its
    /// stickiness).
    #[arg(long, default_value_t = MapSizes::default().affinity, env = "NETLB_MAX_AFFINITY")]
    max_affinity: u32,
    /// (backend, affinity frontend) pairs.
    #[arg(long, default_value_t = MapSizes::default().affinity_matches, env = "NETLB_MAX_AFFINITY_MATCHES")]
    max_affinity_matches: u32,
    /// Cluster IPs.
    #[arg(long, default_value_t = MapSizes::default().cluster_ips, env = "NETLB_MAX_CLUSTER_IPS")]
    max_cluster_ips: u32,
    /// Service CIDRs (--service-cluster-ip-range).
    #[arg(long, default_value_t = MapSizes::default().service_cidrs, env = "NETLB_MAX_SERVICE_CIDRS")]
    max_service_cidrs: u32,
    /// Fragmented datagrams in flight (an LRU).
    #[arg(long, default_value_t = MapSizes::default().fragments, env = "NETLB_MAX_FRAGMENTS")]
    max_fragments: u32,
    /// Conntrack: TCP connections with a SYN but no reply yet expire
    /// after this idle time (Go duration syntax).
    #[arg(long, default_value = "60s", env = "NETLB_CONNTRACK_TCP_TIMEOUT_SYN")]
    conntrack_tcp_timeout_syn: GoDuration,
    /// Conntrack: established TCP connections expire after this idle
    /// time (kube-proxy's flag name; Cilium's default).
    #[arg(
        long,
        default_value = "6h",
        env = "NETLB_CONNTRACK_TCP_TIMEOUT_ESTABLISHED"
    )]
    conntrack_tcp_timeout_established: GoDuration,
    /// Conntrack: TCP connections closed by a RST or by FINs from both
    /// sides are forgotten (and their NAT ports freed) after this.
    #[arg(long, default_value = "10s", env = "NETLB_CONNTRACK_TCP_TIMEOUT_CLOSE")]
    conntrack_tcp_timeout_close: GoDuration,
    /// Conntrack: UDP (and other) flows expire after this idle time.
    #[arg(long, default_value = "60s", env = "NETLB_CONNTRACK_UDP_TIMEOUT")]
    conntrack_udp_timeout: GoDuration,
    /// How often the conntrack garbage collector sweeps (every second
    /// while the table is over half full).
    #[arg(long, default_value = "10s", env = "NETLB_CONNTRACK_GC_INTERVAL")]
    conntrack_gc_interval: GoDuration,
    /// Source ports of north-south SNAT (MIN-MAX). The default stays
    /// below the NodePort range and the kernel's ephemeral ports.
    #[arg(long, default_value = "1024-29999", env = "NETLB_NAT_PORT_RANGE")]
    nat_port_range: PortRange,
    /// The cluster's NodePort range (the API server's
    /// --service-node-port-range).
    #[arg(
        long,
        default_value = "30000-32767",
        env = "NETLB_SERVICE_NODE_PORT_RANGE"
    )]
    service_node_port_range: PortRange,
    /// Drop packets from pod interfaces that open or close a Service
    /// connection with another pod's source address.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, env = "NETLB_VALIDATE_POD_SOURCE")]
    validate_pod_source: bool,
    /// Detach and unpin everything on exit (demos, tests).
    #[arg(long, env = "NETLB_CLEANUP_ON_EXIT")]
    cleanup_on_exit: bool,
}

impl RunArgs {
    /// Applies `--config`'s settings to the fields its flags did not set.
    pub fn apply_config(&mut self, matches: &clap::ArgMatches) -> anyhow::Result<()> {
        let Some(path) = self.config.clone() else {
            return Ok(());
        };
        let loaded = netlb_agent::config::kubeproxy::load(&path)?;
        let applied = self.take_file_settings(&loaded.settings, matches);
        report_config(&path, &loaded, &applied);
        Ok(())
    }

    /// The file's settings for the fields no flag set; returns their ids.
    fn take_file_settings(
        &mut self,
        f: &netlb_agent::config::kubeproxy::FileSettings,
        matches: &clap::ArgMatches,
    ) -> Vec<&'static str> {
        let f = f.clone();
        let m = matches.subcommand_matches("run").unwrap_or(matches);
        let mut applied = Vec::new();
        macro_rules! take {
            ($id:literal, $field:expr, $value:expr) => {
                if let Some(v) = $value
                    && !explicit(m, $id)
                {
                    $field = v;
                    applied.push($id);
                }
            };
        }
        take!("kubeconfig", self.kubeconfig, f.kubeconfig.map(Some));
        take!("node_name", self.node_name, f.hostname_override.map(Some));
        take!(
            "healthz_bind_address",
            self.healthz_bind_address,
            f.healthz_bind_address
        );
        take!(
            "metrics_bind_address",
            self.metrics_bind_address,
            f.metrics_bind_address
        );
        take!("cluster_cidr", self.cluster_cidr, f.cluster_cidr);
        take!(
            "nodeport_addresses",
            self.nodeport_addresses,
            f.nodeport_addresses
        );
        take!(
            "resync_interval_s",
            self.resync_interval_s,
            f.resync_interval.map(|d| d.as_secs().max(1))
        );
        take!(
            "min_sync_interval_ms",
            self.min_sync_interval_ms,
            f.min_sync_interval.map(|d| d.as_millis() as u64)
        );
        take!(
            "conntrack_tcp_timeout_established",
            self.conntrack_tcp_timeout_established,
            f.tcp_established_timeout.map(GoDuration)
        );
        take!(
            "conntrack_udp_timeout",
            self.conntrack_udp_timeout,
            f.udp_timeout.map(GoDuration)
        );
        take!("kube_api_qps", self.kube_api_qps, f.kube_api_qps.map(Some));
        take!(
            "kube_api_burst",
            self.kube_api_burst,
            f.kube_api_burst.map(Some)
        );
        applied
    }

    pub fn run(self) -> anyhow::Result<()> {
        if let Some(netns) = &self.netns {
            // Before any thread exists: setns only moves the calling thread.
            ifaces::enter_netns(netns)
                .with_context(|| format!("entering network namespace {}", netns.display()))?;
        }
        if self.cleanup {
            loader::remove_pins(&self.bpffs)?;
            log::info!("cleaned up {}", self.bpffs.display());
            return Ok(());
        }
        if self.kube_api_qps.is_some() || self.kube_api_burst.is_some() {
            log::info!(
                "--kube-api-qps {:?} / --kube-api-burst {:?}: accepted; netlb makes one list and one watch per resource and applies no client-side rate limit",
                self.kube_api_qps,
                self.kube_api_burst
            );
        }
        agent::run(self.options()?)?;
        Ok(())
    }

    /// The agent's options.
    fn options(self) -> anyhow::Result<RunOptions> {
        let nodeport_primary = self
            .nodeport_addresses
            .iter()
            .any(|a| a.trim() == "primary");
        let nodeport_cidrs: Vec<Ipv4Cidr> = self
            .nodeport_addresses
            .iter()
            .map(|a| a.trim())
            .filter(|a| !a.is_empty() && *a != "primary" && !a.contains(':'))
            .map(|a| a.parse::<Ipv4Cidr>())
            .collect::<Result<_, _>>()
            .context("--nodeport-addresses")?;
        let node_name = self
            .node_name
            .as_ref()
            .map(|n| n.trim().to_lowercase())
            .filter(|n| !n.is_empty())
            .or_else(os_hostname);
        Ok(RunOptions {
            source: self.source(node_name.clone()),
            health_addr: parse_addr(&self.healthz_bind_address)?,
            metrics_addr: parse_addr(&self.metrics_bind_address)?,
            pod_ifaces: self
                .pod_ifaces
                .iter()
                .map(|p| NamePattern::new(p))
                .collect(),
            netdevs: self.netdevs.iter().map(|p| NamePattern::new(p)).collect(),
            nodeport_cidrs,
            nodeport_primary,
            node_ip: self.node_ip,
            datapath: self.datapath()?,
            cgroup_root: match self.cgroup_root.as_deref() {
                Some("") => None,
                Some(path) => Some(PathBuf::from(path)),
                None => loader::cgroup2_mount(),
            },
            gc_interval: self.conntrack_gc_interval.0,
            node: NodeContext {
                node_name,
                proxy_name: self.proxy_name.clone(),
                ..Default::default()
            },
            sizes: self.sizes(),
            min_sync_interval: self
                .min_sync_period
                .map(|d| d.0)
                .unwrap_or(Duration::from_millis(self.min_sync_interval_ms)),
            resync_interval: self
                .sync_period
                .map(|d| d.0)
                .filter(|d| !d.is_zero())
                .unwrap_or(Duration::from_secs(self.resync_interval_s.max(1))),
            cleanup_on_exit: self.cleanup_on_exit,
            pin_dir: self.bpffs,
        })
    }

    /// A manifest directory, or the API server.
    fn source(&self, node_name: Option<String>) -> SourceConfig {
        match &self.manifests {
            Some(dir) => SourceConfig::Manifests(dir.clone()),
            None => SourceConfig::Api(ApiConfig {
                kubeconfig: self.kubeconfig.clone(),
                master: self.master.clone(),
                proxy_name: self.proxy_name.clone(),
                node_name,
                watch_timeout: Duration::from_secs(self.watch_timeout_s),
            }),
        }
    }

    /// The datapath's runtime settings (the SNAT address is found later).
    fn datapath(&self) -> anyhow::Result<DatapathSettings> {
        Ok(DatapathSettings {
            service_loopback: Some(self.service_loopback),
            snat_addr: None,
            timeouts: CtTimeouts {
                tcp_syn: self.conntrack_tcp_timeout_syn.0,
                tcp_established: self.conntrack_tcp_timeout_established.0,
                tcp_close: self.conntrack_tcp_timeout_close.0,
                other: self.conntrack_udp_timeout.0,
            },
            nat_ports: self.nat_port_range,
            node_ports: self.service_node_port_range,
            validate_source: self.validate_pod_source,
            host_netns_cookie: None,
            cluster_cidr: self
                .cluster_cidr
                .iter()
                .map(|c| c.trim())
                .filter(|c| !c.contains(':'))
                .map(|c| c.parse::<Ipv4Cidr>())
                .next()
                .transpose()
                .context("--cluster-cidr")?
                .map(|c| (c.network, c.prefix)),
            service_cidrs: self
                .service_cluster_ip_range
                .iter()
                .map(|c| c.trim())
                .filter(|c| !c.is_empty() && !c.contains(':'))
                .map(|c| c.parse::<Ipv4Cidr>().map(|c| (c.network, c.prefix)))
                .collect::<Result<_, _>>()
                .context("--service-cluster-ip-range")?,
        })
    }

    fn sizes(&self) -> MapSizes {
        MapSizes {
            service_entries: self.max_service_entries,
            backends: self.max_backends,
            rev_nat: self.max_rev_nat,
            conntrack: self.max_conntrack,
            pod_sources: self.max_pod_sources,
            sock_rev: self.max_sock_rev,
            source_ranges: self.max_source_ranges,
            affinity: self.max_affinity,
            affinity_matches: self.max_affinity_matches,
            cluster_ips: self.max_cluster_ips,
            service_cidrs: self.max_service_cidrs,
            fragments: self.max_fragments,
        }
    }
}

/// Whether `id` was given on the command line or in the environment (and
/// so overrides the configuration file).
fn explicit(matches: &clap::ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
    )
}

/// Logs what the configuration file set, and what of it netlb ignores.
fn report_config(
    path: &std::path::Path,
    loaded: &netlb_agent::config::kubeproxy::Loaded,
    applied: &[&str],
) {
    log::info!(
        "configuration file {}: applied {} (flags override the file)",
        path.display(),
        if applied.is_empty() {
            "nothing".to_owned()
        } else {
            applied.join(", ")
        }
    );
    if !loaded.unknown.is_empty() {
        log::warn!(
            "configuration file {}: unknown fields ignored: {}",
            path.display(),
            loaded.unknown.join(", ")
        );
    }
    for note in &loaded.ignored {
        log::info!("configuration file {}: {note}", path.display());
    }
}

fn parse_addr(s: &str) -> anyhow::Result<Option<SocketAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        s.parse().with_context(|| format!("bad address {s:?}"))?,
    ))
}

/// kube-proxy's `nodeutil.GetHostname("")`: the kernel's hostname,
/// trimmed and lower-cased.
fn os_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim().to_lowercase();
    (!name.is_empty()).then_some(name)
}
