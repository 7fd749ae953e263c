//! netlb-agent command line.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use anyhow::Context as _;
use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};
use netlb_agent::{
    agent::{self, RunOptions, SourceConfig},
    cli::list,
    config::{CtTimeouts, DatapathSettings, GoDuration, PortRange},
    datapath::ifaces::{self, Ipv4Cidr, NamePattern},
    datapath::{layout::MapSizes, loader},
    k8s::kube::ApiConfig,
    model::NodeContext,
};

fn parse_addr(s: &str) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if s.is_empty() {
        return Ok(None);
    }
    Ok(Some(
        s.parse().with_context(|| format!("bad address {s:?}"))?,
    ))
}

#[derive(Parser)]
#[command(version, about = "netlb: eBPF Kubernetes Service load balancing")]
struct Cli {
    /// Log verbosity as kube-proxy's `--v`: 0-2 info, 3-4 debug, 5 and
    /// more trace. `RUST_LOG` (e.g. `netlb_agent::datapath::sync=debug`), when set,
    /// takes precedence.
    #[arg(short = 'v', long = "v", global = true, default_value_t = 0)]
    verbosity: u8,
    /// Log format: `text` or `json` (one object per line, with the
    /// structured fields).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

/// Installs the tracing subscriber: `RUST_LOG` if set, else the level of
/// `--v`; text or JSON on stderr. Records of the `log` crate (the agent's
/// own and its libraries') go through it too.
fn init_logging(verbosity: u8, json: bool) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let level = match verbosity {
        0..=2 => "info",
        3..=4 => "debug",
        _ => "trace",
    };
    let mut spec = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => value,
        _ => level.to_owned(),
    };
    // kube's client logs an ERROR for every failed request (and a WARN
    // when a watch stream is cut), its watcher a WARN for every 403; the
    // agent's watchers report the same failures once per outage, with a
    // summary a minute, and the metrics count each. A filter that names
    // kube's targets itself brings them back.
    if !spec.contains("kube_") {
        spec.push_str(",kube_client::client=error,kube_client::client::builder=off,kube_runtime::watcher=error");
    }
    let filter =
        tracing_subscriber::EnvFilter::try_new(&spec).context("RUST_LOG is not a valid filter")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    let result = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    result.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Clone, Copy, ValueEnum)]
enum ListWhat {
    Services,
    Backends,
    Conntrack,
    Stats,
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at startup; boxing clap's derive fields buys nothing"
)]
enum Command {
    /// Load the datapath and program it from a source until SIGINT/SIGTERM.
    Run {
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
    },
    /// Show what the pinned datapath maps hold.
    List {
        what: ListWhat,
        #[arg(long, default_value = "/sys/fs/bpf/netlb")]
        bpffs: PathBuf,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// One screen on a running agent: health, last sync, sources,
    /// programmed Services and backends, map fill levels, attached
    /// interfaces.
    Status {
        #[arg(long, default_value = "/sys/fs/bpf/netlb")]
        bpffs: PathBuf,
        /// The agent's metrics address (`/metrics`).
        #[arg(long, default_value = "127.0.0.1:10249")]
        metrics_address: SocketAddr,
        /// The agent's health address (`/healthz`).
        #[arg(long, default_value = "127.0.0.1:10256")]
        healthz_address: SocketAddr,
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Detach the programs and remove the pinned maps of an instance.
    Cleanup {
        #[arg(long, default_value = "/sys/fs/bpf/netlb")]
        bpffs: PathBuf,
        /// Then wait for SIGTERM (the uninstall DaemonSet's container: its
        /// pods stay Running once their node is clean).
        #[arg(long)]
        wait: bool,
    },
    /// Prepare the node for the agent (the DaemonSet's init container): in
    /// the host's mount namespace, a bpffs on `--bpffs` with shared
    /// propagation (so that the agent's mount of it propagates, even on
    /// hosts that mount it private or not at all) and a cgroup2 mount on
    /// `--cgroup2` (the cgroup2 hierarchy alone, for the agent to mount
    /// read-only, on hosts with the unified or the hybrid layout).
    PrepareNode {
        /// The host's mount namespace (the init container mounts the
        /// host's /proc read-only on /hostproc).
        #[arg(long, default_value = "/hostproc/1/ns/mnt")]
        host_mount_ns: PathBuf,
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
        #[arg(long, default_value = "/run/netlb/cgroupv2")]
        cgroup2: PathBuf,
    },
}

/// Whether `id` was given on the command line or in the environment (and
/// so overrides the configuration file).
fn explicit(matches: &clap::ArgMatches, id: &str) -> bool {
    matches!(
        matches.value_source(id),
        Some(clap::parser::ValueSource::CommandLine | clap::parser::ValueSource::EnvVariable)
    )
}

/// Applies `--config`'s settings to the fields its flags did not set.
fn apply_config(command: &mut Command, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let Command::Run {
        config: Some(path),
        kubeconfig,
        node_name,
        healthz_bind_address,
        metrics_bind_address,
        cluster_cidr,
        nodeport_addresses,
        resync_interval_s,
        min_sync_interval_ms,
        conntrack_tcp_timeout_established,
        conntrack_udp_timeout,
        kube_api_qps,
        kube_api_burst,
        ..
    } = command
    else {
        return Ok(());
    };
    let loaded = netlb_agent::config::kubeproxy::load(path)?;
    let f = loaded.settings;
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
    take!("kubeconfig", *kubeconfig, f.kubeconfig.map(Some));
    take!("node_name", *node_name, f.hostname_override.map(Some));
    take!(
        "healthz_bind_address",
        *healthz_bind_address,
        f.healthz_bind_address
    );
    take!(
        "metrics_bind_address",
        *metrics_bind_address,
        f.metrics_bind_address
    );
    take!("cluster_cidr", *cluster_cidr, f.cluster_cidr);
    take!(
        "nodeport_addresses",
        *nodeport_addresses,
        f.nodeport_addresses
    );
    take!(
        "resync_interval_s",
        *resync_interval_s,
        f.resync_interval.map(|d| d.as_secs().max(1))
    );
    take!(
        "min_sync_interval_ms",
        *min_sync_interval_ms,
        f.min_sync_interval.map(|d| d.as_millis() as u64)
    );
    take!(
        "conntrack_tcp_timeout_established",
        *conntrack_tcp_timeout_established,
        f.tcp_established_timeout.map(GoDuration)
    );
    take!(
        "conntrack_udp_timeout",
        *conntrack_udp_timeout,
        f.udp_timeout.map(GoDuration)
    );
    take!("kube_api_qps", *kube_api_qps, f.kube_api_qps.map(Some));
    take!(
        "kube_api_burst",
        *kube_api_burst,
        f.kube_api_burst.map(Some)
    );
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
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches)?;
    init_logging(cli.verbosity, cli.log_format == "json")?;
    apply_config(&mut cli.command, &matches)?;
    match cli.command {
        Command::Run {
            config: _,
            min_sync_period,
            sync_period,
            cleanup,
            kube_api_qps,
            kube_api_burst,
            manifests,
            kubeconfig,
            master,
            cgroup_root,
            watch_timeout_s,
            healthz_bind_address,
            metrics_bind_address,
            netns,
            bpffs,
            pod_ifaces,
            netdevs,
            nodeport_addresses,
            node_ip,
            cluster_cidr,
            service_cluster_ip_range,
            service_loopback,
            node_name,
            proxy_name,
            min_sync_interval_ms,
            resync_interval_s,
            max_service_entries,
            max_backends,
            max_rev_nat,
            max_conntrack,
            max_pod_sources,
            max_sock_rev,
            max_source_ranges,
            max_affinity,
            max_affinity_matches,
            max_cluster_ips,
            max_service_cidrs,
            max_fragments,
            conntrack_tcp_timeout_syn,
            conntrack_tcp_timeout_established,
            conntrack_tcp_timeout_close,
            conntrack_udp_timeout,
            conntrack_gc_interval,
            nat_port_range,
            service_node_port_range,
            validate_pod_source,
            cleanup_on_exit,
        } => {
            if let Some(netns) = &netns {
                // Before any thread exists: setns only moves the calling thread.
                ifaces::enter_netns(netns)
                    .with_context(|| format!("entering network namespace {}", netns.display()))?;
            }
            if cleanup {
                loader::remove_pins(&bpffs)?;
                log::info!("cleaned up {}", bpffs.display());
                return Ok(());
            }
            if kube_api_qps.is_some() || kube_api_burst.is_some() {
                log::info!(
                    "--kube-api-qps {kube_api_qps:?} / --kube-api-burst {kube_api_burst:?}: accepted; netlb makes one list and one watch per resource and applies no client-side rate limit"
                );
            }
            let nodeport_primary = nodeport_addresses.iter().any(|a| a.trim() == "primary");
            let nodeport_addresses: Vec<Ipv4Cidr> = nodeport_addresses
                .iter()
                .map(|a| a.trim())
                .filter(|a| !a.is_empty() && *a != "primary" && !a.contains(':'))
                .map(|a| a.parse::<Ipv4Cidr>())
                .collect::<Result<_, _>>()
                .context("--nodeport-addresses")?;
            let node_name = node_name
                .map(|n| n.trim().to_lowercase())
                .filter(|n| !n.is_empty())
                .or_else(os_hostname);
            let source = match manifests {
                Some(dir) => SourceConfig::Manifests(dir),
                None => SourceConfig::Api(ApiConfig {
                    kubeconfig,
                    master,
                    proxy_name: proxy_name.clone(),
                    node_name: node_name.clone(),
                    watch_timeout: Duration::from_secs(watch_timeout_s),
                }),
            };
            agent::run(RunOptions {
                source,
                health_addr: parse_addr(&healthz_bind_address)?,
                metrics_addr: parse_addr(&metrics_bind_address)?,
                pin_dir: bpffs,
                pod_ifaces: pod_ifaces.iter().map(|p| NamePattern::new(p)).collect(),
                netdevs: netdevs.iter().map(|p| NamePattern::new(p)).collect(),
                nodeport_cidrs: nodeport_addresses,
                nodeport_primary,
                node_ip,
                datapath: DatapathSettings {
                    service_loopback: Some(service_loopback),
                    snat_addr: None,
                    timeouts: CtTimeouts {
                        tcp_syn: conntrack_tcp_timeout_syn.0,
                        tcp_established: conntrack_tcp_timeout_established.0,
                        tcp_close: conntrack_tcp_timeout_close.0,
                        other: conntrack_udp_timeout.0,
                    },
                    nat_ports: nat_port_range,
                    node_ports: service_node_port_range,
                    validate_source: validate_pod_source,
                    host_netns_cookie: None,
                    cluster_cidr: cluster_cidr
                        .iter()
                        .map(|c| c.trim())
                        .filter(|c| !c.contains(':'))
                        .map(|c| c.parse::<Ipv4Cidr>())
                        .next()
                        .transpose()
                        .context("--cluster-cidr")?
                        .map(|c| (c.network, c.prefix)),
                    service_cidrs: service_cluster_ip_range
                        .iter()
                        .map(|c| c.trim())
                        .filter(|c| !c.is_empty() && !c.contains(':'))
                        .map(|c| c.parse::<Ipv4Cidr>().map(|c| (c.network, c.prefix)))
                        .collect::<Result<_, _>>()
                        .context("--service-cluster-ip-range")?,
                },
                cgroup_root: match cgroup_root.as_deref() {
                    Some("") => None,
                    Some(path) => Some(PathBuf::from(path)),
                    None => loader::cgroup2_mount(),
                },
                gc_interval: conntrack_gc_interval.0,
                node: NodeContext {
                    node_name,
                    proxy_name,
                    ..Default::default()
                },
                sizes: MapSizes {
                    service_entries: max_service_entries,
                    backends: max_backends,
                    rev_nat: max_rev_nat,
                    conntrack: max_conntrack,
                    pod_sources: max_pod_sources,
                    sock_rev: max_sock_rev,
                    source_ranges: max_source_ranges,
                    affinity: max_affinity,
                    affinity_matches: max_affinity_matches,
                    cluster_ips: max_cluster_ips,
                    service_cidrs: max_service_cidrs,
                    fragments: max_fragments,
                },
                min_sync_interval: min_sync_period
                    .map(|d| d.0)
                    .unwrap_or(Duration::from_millis(min_sync_interval_ms)),
                resync_interval: sync_period
                    .map(|d| d.0)
                    .filter(|d| !d.is_zero())
                    .unwrap_or(Duration::from_secs(resync_interval_s.max(1))),
                cleanup_on_exit,
            })?;
        }
        Command::List {
            what,
            bpffs,
            output,
        } => print_list(what, &bpffs, output)?,
        Command::Status {
            bpffs,
            metrics_address,
            healthz_address,
            output,
        } => print_status(&bpffs, metrics_address, healthz_address, output)?,
        Command::Cleanup { bpffs, wait } => {
            loader::remove_pins(&bpffs)?;
            log::info!("removed {} and everything pinned in it", bpffs.display());
            if wait {
                let term = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                    signal_hook::flag::register(signal, std::sync::Arc::clone(&term))?;
                }
                while !term.load(std::sync::atomic::Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
        Command::PrepareNode {
            host_mount_ns,
            bpffs,
            cgroup2,
        } => {
            for done in netlb_agent::cli::prepare_node::prepare(&host_mount_ns, &bpffs, &cgroup2)? {
                log::info!("{done}");
            }
        }
    }
    Ok(())
}

/// GET `path` from `addr`: (status, body). One HTTP/1.1 request with hyper
/// on `runtime`.
fn http_get(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt as _;
    runtime.block_on(async {
        let stream =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .context("timed out")??;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header("Host", addr.to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
            .await
            .context("timed out")??;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
}

#[derive(serde::Serialize)]
struct Status {
    healthz: Option<(u16, String)>,
    initial_sync_complete: Option<bool>,
    last_sync_unix_seconds: Option<f64>,
    syncs: Option<f64>,
    sync_mean_seconds: Option<f64>,
    programmed_frontends: Option<f64>,
    programmed_backends: Option<f64>,
    failing_lists: Vec<String>,
    maps: Vec<list::MapFill>,
    interfaces: Vec<String>,
    errors: Vec<String>,
}

fn print_status(
    bpffs: &std::path::Path,
    metrics_address: SocketAddr,
    healthz_address: SocketAddr,
    output: Output,
) -> anyhow::Result<()> {
    let mut status = Status {
        healthz: None,
        initial_sync_complete: None,
        last_sync_unix_seconds: None,
        syncs: None,
        sync_mean_seconds: None,
        programmed_frontends: None,
        programmed_backends: None,
        failing_lists: Vec::new(),
        maps: Vec::new(),
        interfaces: loader::pinned_interfaces_in(&netlb_agent::datapath::layout::links_dir(bpffs)),
        errors: Vec::new(),
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    match http_get(&runtime, healthz_address, "/healthz") {
        Ok(answer) => status.healthz = Some(answer),
        Err(e) => status
            .errors
            .push(format!("{healthz_address}/healthz: {e:#}")),
    }
    match http_get(&runtime, metrics_address, "/metrics") {
        Ok((200, text)) => match openmetrics_parser::openmetrics::parse_openmetrics(&text) {
            Ok(exposition) => {
                // The first sample of `family`; a histogram gives its mean.
                let value = |family: &str| -> Option<f64> {
                    let f = exposition.families.get(family)?;
                    f.iter_samples().next().map(|s| match &s.value {
                        openmetrics_parser::OpenMetricsValue::Gauge(v) => v.as_f64(),
                        openmetrics_parser::OpenMetricsValue::Counter(c) => c.value.as_f64(),
                        openmetrics_parser::OpenMetricsValue::Histogram(h) => {
                            match (h.sum.as_ref(), h.count) {
                                (Some(sum), Some(n)) if n > 0 => sum.as_f64() / n as f64,
                                _ => f64::NAN,
                            }
                        }
                        _ => f64::NAN,
                    })
                };
                status.initial_sync_complete =
                    value("netlb_initial_sync_complete").map(|v| v >= 1.0);
                status.last_sync_unix_seconds =
                    value("kubeproxy_sync_proxy_rules_last_timestamp_seconds").filter(|v| *v > 0.0);
                status.syncs = value("netlb_syncs");
                // A mean over no sync is no figure (NaN before the first).
                status.sync_mean_seconds =
                    value("kubeproxy_sync_proxy_rules_duration_seconds").filter(|v| v.is_finite());
                status.programmed_frontends = value("netlb_programmed_frontends");
                status.programmed_backends = value("netlb_programmed_backends");
                if let Some(f) = exposition.families.get("netlb_source_list_failing") {
                    status.failing_lists = f
                        .iter_samples()
                        .filter_map(|s| {
                            s.get_labelset()
                                .ok()?
                                .get_label_value("message")
                                .map(str::to_owned)
                        })
                        .collect();
                }
            }
            Err(e) => status
                .errors
                .push(format!("{metrics_address}/metrics: unparsable: {e:?}")),
        },
        Ok((code, _)) => status
            .errors
            .push(format!("{metrics_address}/metrics: HTTP {code}")),
        Err(e) => status
            .errors
            .push(format!("{metrics_address}/metrics: {e:#}")),
    }
    match list::fill(&netlb_agent::datapath::layout::maps_dir(bpffs)) {
        Ok(maps) => status.maps = maps,
        Err(e) => status
            .errors
            .push(format!("maps pinned in {}: {e}", bpffs.display())),
    }
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&status)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(&status)?),
        Output::Table => {
            let opt = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "?".into());
            let health = match &status.healthz {
                Some((code, body)) => format!(
                    "{} {}",
                    if *code == 200 { "healthy" } else { "UNHEALTHY" },
                    body.trim()
                ),
                None => "unreachable".into(),
            };
            println!("health        {health}");
            println!(
                "initial sync  {}",
                match status.initial_sync_complete {
                    Some(true) => "complete",
                    Some(false) => "waiting for Services and EndpointSlices to be listed",
                    None => "?",
                }
            );
            let last = status.last_sync_unix_seconds.map(|t| {
                let ago = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|now| now.as_secs_f64() - t)
                    .unwrap_or(0.0);
                format!("{:.1} s ago", ago.max(0.0))
            });
            println!(
                "last sync     {}; {} syncs, {} on average",
                last.unwrap_or_else(|| "never".into()),
                opt(status.syncs),
                status
                    .sync_mean_seconds
                    .map(|s| format!("{:.2} ms", s * 1000.0))
                    .unwrap_or_else(|| "-".into())
            );
            println!(
                "sources       {}",
                if status.failing_lists.is_empty() {
                    "no failing list".to_owned()
                } else {
                    format!("FAILING: {}", status.failing_lists.join("; "))
                }
            );
            println!(
                "programmed    {} frontends, {} backends",
                opt(status.programmed_frontends),
                opt(status.programmed_backends)
            );
            for m in &status.maps {
                println!(
                    "map           {:<16} {:>8} / {:<8} ({:.1} %)",
                    m.map,
                    m.entries,
                    m.capacity,
                    if m.capacity > 0 {
                        m.entries as f64 * 100.0 / f64::from(m.capacity)
                    } else {
                        0.0
                    }
                );
            }
            println!(
                "interfaces    {}",
                if status.interfaces.is_empty() {
                    "none".to_owned()
                } else {
                    status.interfaces.join(", ")
                }
            );
            for e in &status.errors {
                println!("error         {e}");
            }
        }
    }
    Ok(())
}

/// kube-proxy's `nodeutil.GetHostname("")`: the kernel's hostname,
/// trimmed and lower-cased.
fn os_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim().to_lowercase();
    (!name.is_empty()).then_some(name)
}

fn print_list(what: ListWhat, bpffs: &std::path::Path, output: Output) -> anyhow::Result<()> {
    let maps = netlb_agent::datapath::layout::maps_dir(bpffs);
    let ctx = || format!("reading the maps pinned in {}", maps.display());
    let (json, header, rows): (serde_json::Value, &[&str], Vec<Vec<String>>) = match what {
        ListWhat::Services => {
            let rows = list::services(&maps).with_context(ctx)?;
            let table = rows
                .iter()
                .map(|r| {
                    vec![
                        r.frontend.clone(),
                        r.protocol.clone(),
                        r.scope.to_owned(),
                        r.rev_nat_index.to_string(),
                        if r.backends.is_empty() {
                            "(none: reject)".to_owned()
                        } else {
                            r.backends.join(", ")
                        },
                    ]
                })
                .collect();
            (
                serde_json::to_value(&rows)?,
                &["FRONTEND", "PROTO", "SCOPE", "REVNAT", "BACKENDS"],
                table,
            )
        }
        ListWhat::Backends => {
            let rows = list::backends(&maps).with_context(ctx)?;
            let table = rows
                .iter()
                .map(|r| {
                    vec![
                        r.id.to_string(),
                        format!("{}:{}", r.address, r.port),
                        r.protocol.clone(),
                        r.flows.to_string(),
                    ]
                })
                .collect();
            (
                serde_json::to_value(&rows)?,
                &["ID", "BACKEND", "PROTO", "FLOWS"],
                table,
            )
        }
        ListWhat::Conntrack => {
            let rows = list::conntrack(&maps).with_context(ctx)?;
            let table = rows
                .iter()
                .map(|r| {
                    vec![
                        r.kind.to_owned(),
                        r.protocol.clone(),
                        r.source.clone(),
                        r.destination.clone(),
                        r.state.unwrap_or("-").to_owned(),
                        r.target.clone().unwrap_or_else(|| "-".into()),
                        r.nat.clone().unwrap_or_else(|| "-".into()),
                        r.age_s.to_string(),
                        r.expires_in_s.to_string(),
                    ]
                })
                .collect();
            (
                serde_json::to_value(&rows)?,
                &[
                    "KIND",
                    "PROTO",
                    "SOURCE",
                    "DESTINATION",
                    "STATE",
                    "TARGET",
                    "NAT",
                    "AGE(s)",
                    "EXPIRES(s)",
                ],
                table,
            )
        }
        ListWhat::Stats => {
            let rows = list::stats(&maps).with_context(ctx)?;
            let table = rows
                .iter()
                .map(|r| vec![r.counter.to_owned(), r.value.to_string()])
                .collect();
            (serde_json::to_value(&rows)?, &["COUNTER", "VALUE"], table)
        }
    };
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&json)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(&json)?),
        Output::Table => print!("{}", list::table(header, &rows)),
    }
    Ok(())
}
