//! The node as the datapath sees it: its addresses (node ports, the SNAT
//! address), the interfaces that get programs, and the pod addresses
//! behind them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use super::RunOptions;
use crate::{
    datapath::{
        dataplane::kernel::PodSources,
        ifaces::{self, NamePattern},
        loader::{Attacher, Role},
    },
    support::error_chain,
};

/// This node's addresses as the datapath needs them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeAddresses {
    /// Addresses that accept node ports.
    pub nodeport: Vec<Ipv4Addr>,
    /// Source address of north-south SNAT.
    pub snat: Option<Ipv4Addr>,
}

/// Reads the node's addresses: NodePorts on the uplinks' addresses, or on
/// every local address inside `--nodeport-addresses` (loopback excluded:
/// the datapath never sees loopback traffic).
pub(super) fn node_addresses(opts: &RunOptions) -> std::io::Result<NodeAddresses> {
    let all: Vec<ifaces::InterfaceAddr> = ifaces::ipv4_addresses()?
        .into_iter()
        .filter(|a| !a.address.is_loopback())
        .collect();
    let mut uplinks: Vec<&ifaces::InterfaceAddr> = all
        .iter()
        .filter(|a| opts.netdevs.iter().any(|p| p.matches(&a.ifname)))
        .collect();
    // Stable choice of "the first uplink": by name, then kernel order.
    uplinks.sort_by(|a, b| a.ifname.cmp(&b.ifname));
    let snat = opts.node_ip.or(uplinks.first().map(|a| a.address));
    let mut nodeport: Vec<Ipv4Addr> = if opts.nodeport_cidrs.is_empty() && !opts.nodeport_primary {
        uplinks.iter().map(|a| a.address).collect()
    } else {
        all.iter()
            .map(|a| a.address)
            .filter(|ip| opts.nodeport_cidrs.iter().any(|c| c.contains(*ip)))
            .chain(snat.filter(|_| opts.nodeport_primary))
            .collect()
    };
    nodeport.sort();
    nodeport.dedup();
    Ok(NodeAddresses { nodeport, snat })
}

/// Keeps the datapath's pod source addresses in line with the node's host
/// routes through pod interfaces.
pub(super) fn reconcile_pod_sources(pod_sources: &mut PodSources, pods: &[NamePattern]) {
    match ifaces::pod_routes(pods) {
        Ok(want) => {
            if let Err(e) = pod_sources.sync(&want) {
                log::warn!("{e}: {}", error_chain(&e));
            }
        }
        Err(e) => log::warn!("cannot read the node's routes: {e}"),
    }
}

/// The interfaces that get programs, by role (a name matching both kinds
/// of pattern is an uplink).
pub(super) fn present_interfaces(
    pods: &[NamePattern],
    netdevs: &[NamePattern],
) -> std::io::Result<BTreeMap<String, Role>> {
    Ok(ifaces::interface_names()?
        .into_iter()
        .filter_map(|name| {
            let role = if netdevs.iter().any(|p| p.matches(&name)) {
                Role::Netdev
            } else if pods.iter().any(|p| p.matches(&name)) {
                Role::Pod
            } else {
                return None;
            };
            Some((name, role))
        })
        .collect())
}

/// Attaches to new matching interfaces (uplinks get the netdev programs,
/// pod interfaces the pod programs; a name matching both is an uplink) and
/// drops the pins of vanished ones.
#[tracing::instrument(name = "attach", level = "debug", skip_all)]
pub(super) fn reconcile_interfaces(
    ebpf: &mut aya::Ebpf,
    attacher: &mut Attacher,
    pods: &[NamePattern],
    netdevs: &[NamePattern],
) {
    let present = match present_interfaces(pods, netdevs) {
        Ok(present) => present,
        Err(e) => {
            log::error!("cannot list interfaces: {e}");
            return;
        }
    };
    for (ifname, role) in &present {
        if attacher.role(ifname) != Some(*role) {
            match attacher.attach(ebpf, ifname, *role) {
                Ok(()) => log::info!("attached to {ifname} ({role:?})"),
                // The interface may have gone between listing and attaching.
                Err(e) => log::warn!("{e}: {}", error_chain(&e)),
            }
        }
    }
    let stale: BTreeSet<String> = attacher
        .pinned_interfaces()
        .into_iter()
        .chain(attacher.attached().map(str::to_owned))
        .filter(|name| !present.contains_key(name))
        .collect();
    for ifname in stale {
        match attacher.detach(&ifname) {
            Ok(()) => log::info!("detached from {ifname} (gone or no longer matching)"),
            Err(e) => log::warn!("{e}"),
        }
    }
}
