//! `netlb-agent run`'s settings and errors.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{
    config::DatapathSettings,
    datapath::{
        ifaces::{Ipv4Cidr, NamePattern},
        layout::MapSizes,
        loader, migrate,
    },
    k8s::kube::ApiConfig,
    model::NodeContext,
    serve::http,
};

/// Where Services and EndpointSlices come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests (dev, demos), re-read when it changes.
    Manifests(PathBuf),
    /// The API server.
    Api(ApiConfig),
}

/// Agent settings for `netlb-agent run`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub source: SourceConfig,
    pub pin_dir: PathBuf,
    pub pod_ifaces: Vec<NamePattern>,
    /// Node uplinks (`from_netdev` / `to_netdev`).
    pub netdevs: Vec<NamePattern>,
    /// `--nodeport-addresses`; empty = the uplinks' addresses.
    pub nodeport_cidrs: Vec<Ipv4Cidr>,
    /// `--nodeport-addresses primary`: the node's primary address (the
    /// SNAT address: --node-ip, else the first uplink's) accepts node
    /// ports, besides the CIDRs' addresses.
    pub nodeport_primary: bool,
    /// SNAT address for north-south flows; `None` = the first uplink address.
    pub node_ip: Option<Ipv4Addr>,
    /// The datapath's runtime settings (the SNAT address is filled in from
    /// the node's addresses).
    pub datapath: DatapathSettings,
    /// How often the conntrack garbage collector sweeps.
    pub gc_interval: Duration,
    /// cgroup v2 directory for the socket-level programs; `None` = no
    /// socket-level load balancing.
    pub cgroup_root: Option<PathBuf>,
    pub node: NodeContext,
    pub sizes: MapSizes,
    /// Minimum time between two syncs (kube-proxy's `minSyncPeriod`).
    pub min_sync_interval: Duration,
    /// A full resync at least this often (kube-proxy's `syncPeriod`).
    pub resync_interval: Duration,
    /// `/healthz` and `/livez` (kube-proxy: 0.0.0.0:10256).
    pub health_addr: Option<SocketAddr>,
    /// `/metrics` (kube-proxy: 127.0.0.1:10249).
    pub metrics_addr: Option<SocketAddr>,
    /// Remove links and pinned maps on exit (demos and tests); by default
    /// they stay so that traffic keeps flowing while the agent is down.
    pub cleanup_on_exit: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    #[error(transparent)]
    Dataplane(#[from] crate::datapath::dataplane::DataplaneError),
    #[error(transparent)]
    Sync(#[from] crate::datapath::sync::SyncError),
    #[error(transparent)]
    Api(#[from] crate::k8s::kube::ApiSourceError),
    #[error(transparent)]
    Listen(#[from] http::ListenError),
    #[error(transparent)]
    NatPorts(#[from] crate::config::NatPortsError),
    #[error("carrying the pinned state over into this agent's maps failed")]
    Migrate(#[source] Box<migrate::RunMigrationError<loader::LoaderError>>),
    #[error("failed to watch network interfaces")]
    Interfaces {
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start a thread")]
    Threads {
        #[source]
        source: std::io::Error,
    },
    #[error("failed to start the agent's runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
    #[error("failed to install signal handlers")]
    Signals {
        #[source]
        source: std::io::Error,
    },
}
