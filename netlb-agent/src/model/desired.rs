//! Desired datapath contents computed from the [`Model`]: one frontend per
//! (address, port, protocol, scope) with its ordered backends.
//!
//! Frontends programmed today (from the pod hooks' point of view):
//! - every IPv4 cluster IP, with the internal targets (internalTrafficPolicy);
//! - every external IP and load-balancer ingress IP. From pods these use the
//!   cluster-wide endpoints (kube-proxy short-circuits in-cluster traffic to
//!   external addresses). When externalTrafficPolicy is Local the external
//!   view (scope EXTERNAL, local endpoints) and the pods' view (scope
//!   INTERNAL) differ, and the scope-EXTERNAL frontend carries `TWO_SCOPES`.
//!
//! - every node port, on each of this node's NodePort addresses (the
//!   addresses of its uplinks, or those in `--nodeport-addresses`), with the
//!   same two views as external IPs. A frontend per address keeps the
//!   datapath's lookup a single exact-match hash probe (Cilium programs
//!   NodePorts the same way); the cost is one frontend per address.
//!
//! Traffic from outside arrives at the uplinks (`from_netdev`) and uses the
//! scope-EXTERNAL view; pods (`from_pod`) use the INTERNAL one when present.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use netlb_common::{backend_flags, proto, scope, svc_flags};

use crate::model::{Model, ServicePortName, Targets};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FrontendKey {
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    pub scope: u8,
}

/// Serving endpoints (address, port) of each UDP frontend (address, port),
/// for the stale-UDP rule. Frontends without serving endpoints are absent.
pub type UdpServing = BTreeMap<(Ipv4Addr, u16), BTreeSet<(Ipv4Addr, u16)>>;

/// The identity of a backend id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BackendAddr {
    pub address: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredBackend {
    pub addr: BackendAddr,
    /// `netlb_common::backend_flags`.
    pub flags: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredFrontend {
    pub service: ServicePortName,
    /// `netlb_common::svc_flags`.
    pub flags: u16,
    /// Sorted and unique; empty = reject (or drop with `svc_flags::DROP`).
    pub backends: Vec<DesiredBackend>,
    /// Sources admitted (network, prefix length), sorted; with
    /// `svc_flags::SOURCE_RANGES` only, else empty.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    /// Session-affinity timeout in seconds, with `svc_flags::AFFINITY`
    /// only, else 0.
    pub affinity_timeout: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DesiredState {
    pub frontends: BTreeMap<FrontendKey, DesiredFrontend>,
    /// Frontends two Services claimed; the first (by namespace/name) won.
    pub conflicts: Vec<String>,
    /// Serving endpoints of every UDP frontend that has some (the
    /// conntrack garbage collector's stale-UDP rule).
    pub udp_serving: UdpServing,
}

impl DesiredState {
    pub fn backend_count(&self) -> usize {
        let mut all: Vec<BackendAddr> = self
            .frontends
            .values()
            .flat_map(|f| f.backends.iter().map(|b| b.addr))
            .collect();
        all.sort();
        all.dedup();
        all.len()
    }
}

fn proto_number(protocol: &str) -> Option<u8> {
    match protocol {
        "TCP" => Some(proto::TCP),
        "UDP" => Some(proto::UDP),
        _ => None,
    }
}

fn backends(targets: &Targets, proto: u8) -> (Vec<DesiredBackend>, u16) {
    let mut out: Vec<DesiredBackend> = targets
        .endpoints()
        .iter()
        .map(|e| DesiredBackend {
            addr: BackendAddr {
                address: e.address,
                port: e.port,
                proto,
            },
            flags: (if e.terminating {
                backend_flags::TERMINATING
            } else {
                0
            }) | (if e.is_local { backend_flags::LOCAL } else { 0 }),
        })
        .collect();
    out.sort_by_key(|b| b.addr);
    out.dedup_by_key(|b| b.addr);
    let flags = if matches!(targets, Targets::Drop) {
        svc_flags::DROP
    } else {
        0
    };
    (out, flags)
}

impl DesiredState {
    fn insert(&mut self, key: FrontendKey, frontend: DesiredFrontend) {
        match self.frontends.get(&key) {
            Some(existing) if existing.service != frontend.service => {
                self.conflicts.push(format!(
                    "{}:{} claimed by {} and {}; keeping {}",
                    key.address, key.port, existing.service, frontend.service, existing.service
                ));
            }
            Some(_) => {}
            None => {
                self.frontends.insert(key, frontend);
            }
        }
    }
}

/// Computes the desired frontends; `nodeport_addresses` are this node's
/// addresses that accept node ports. Ports are visited in
/// (namespace, name, port) order, so the first claimant of an address wins.
pub fn build(model: &Model, nodeport_addresses: &[Ipv4Addr]) -> DesiredState {
    let mut state = DesiredState::default();
    for (name, port) in &model.ports {
        let Some(proto) = proto_number(&port.protocol) else {
            continue;
        };
        if proto == netlb_common::proto::UDP {
            record_udp_serving(&mut state.udp_serving, port, nodeport_addresses);
        }
        // sessionAffinity ClientIP: every frontend of the port, both views.
        let (affinity, affinity_timeout) = match port.session_affinity_timeout {
            Some(t) => (svc_flags::AFFINITY, t),
            None => (0, 0),
        };
        let port_frontends = PortFrontends {
            name,
            port,
            proto,
            affinity,
            affinity_timeout,
        };
        port_frontends.cluster_ips(&mut state);
        port_frontends.external(&mut state, nodeport_addresses);
    }
    state
}

/// What every frontend of one Service port shares.
struct PortFrontends<'a> {
    name: &'a ServicePortName,
    port: &'a crate::model::ServicePort,
    proto: u8,
    affinity: u16,
    affinity_timeout: u32,
}

impl PortFrontends<'_> {
    /// The cluster IPs' frontends: the internal traffic policy's endpoints.
    fn cluster_ips(&self, state: &mut DesiredState) {
        let (internal, internal_flags) = backends(&self.port.internal, self.proto);
        for ip in &self.port.cluster_ips {
            state.insert(
                FrontendKey {
                    address: *ip,
                    port: self.port.port,
                    proto: self.proto,
                    scope: scope::EXTERNAL,
                },
                DesiredFrontend {
                    service: self.name.clone(),
                    flags: svc_flags::CLUSTER_IP | internal_flags | self.affinity,
                    backends: internal.clone(),
                    source_ranges: Vec::new(),
                    affinity_timeout: self.affinity_timeout,
                },
            );
        }
    }

    /// External IPs, load-balancer IPs and node ports: the external
    /// traffic policy's endpoints and, when pods get others (Local policy:
    /// kube-proxy's short-circuit to cluster-wide endpoints), a second
    /// frontend of the internal scope.
    fn external(&self, state: &mut DesiredState, nodeport_addresses: &[Ipv4Addr]) {
        let port = self.port;
        let (external, external_flags) = backends(&port.external, self.proto);
        let (from_pods, from_pods_flags) = backends(&port.external_from_pods, self.proto);
        let split = port.external != port.external_from_pods;
        let local = if port.external_policy_local {
            svc_flags::LOCAL_ONLY
        } else {
            0
        };
        let addresses = port
            .external_ips
            .iter()
            .map(|ip| (*ip, port.port, svc_flags::EXTERNAL_IP))
            .chain(
                port.load_balancer_ips
                    .iter()
                    .map(|ip| (*ip, port.port, svc_flags::LOAD_BALANCER)),
            )
            .chain(port.node_port.into_iter().flat_map(|node_port| {
                nodeport_addresses
                    .iter()
                    .map(move |ip| (*ip, node_port, svc_flags::NODE_PORT))
            }));
        let ranges = load_balancer_ranges(port, nodeport_addresses);
        for (ip, frontend_port, kind) in addresses {
            let key = FrontendKey {
                address: ip,
                port: frontend_port,
                proto: self.proto,
                scope: scope::EXTERNAL,
            };
            // Source ranges guard the load-balancer IPs only (kube-proxy's
            // firewall chain), from outside and from pods alike.
            let (ranges, ranges_flag) = if kind == svc_flags::LOAD_BALANCER && !ranges.is_empty() {
                (ranges.clone(), svc_flags::SOURCE_RANGES)
            } else {
                (Vec::new(), 0)
            };
            let two_scopes = if split { svc_flags::TWO_SCOPES } else { 0 };
            state.insert(
                key,
                DesiredFrontend {
                    service: self.name.clone(),
                    flags: kind | local | external_flags | ranges_flag | self.affinity | two_scopes,
                    backends: external.clone(),
                    source_ranges: ranges.clone(),
                    affinity_timeout: self.affinity_timeout,
                },
            );
            if split {
                state.insert(
                    FrontendKey {
                        scope: scope::INTERNAL,
                        ..key
                    },
                    DesiredFrontend {
                        service: self.name.clone(),
                        flags: kind | from_pods_flags | ranges_flag | self.affinity,
                        backends: from_pods.clone(),
                        source_ranges: ranges,
                        affinity_timeout: self.affinity_timeout,
                    },
                );
            }
        }
    }
}

/// The sources a port's load-balancer IPs admit: its
/// loadBalancerSourceRanges and, when one of them holds an address of this
/// node, the load-balancer IPs themselves (kube-proxy: a VIP often is a
/// local address, and the node's requests to it loop back with the VIP as
/// their source). Empty: every source.
fn load_balancer_ranges(
    port: &crate::model::ServicePort,
    node_addresses: &[Ipv4Addr],
) -> Vec<(Ipv4Addr, u8)> {
    if port.source_ranges.is_empty() {
        return Vec::new();
    }
    let contains = |(network, len): &(Ipv4Addr, u8), ip: &Ipv4Addr| {
        let mask = if *len == 0 { 0 } else { u32::MAX << (32 - len) };
        u32::from(*ip) & mask == u32::from(*network)
    };
    let mut out = port.source_ranges.clone();
    if port
        .source_ranges
        .iter()
        .any(|r| node_addresses.iter().any(|ip| contains(r, ip)))
    {
        out.extend(port.load_balancer_ips.iter().map(|ip| (*ip, 32)));
    }
    out.sort();
    out.dedup();
    out
}

/// kube-proxy's `CleanStaleEntries` set for one UDP port: every frontend
/// address (cluster IPs, external IPs, load-balancer IPs, node ports on
/// this node's addresses) with the serving endpoints, whatever the traffic
/// policies and topology: changes to the Service must not affect
/// existing flows, only an endpoint that stops serving does.
fn record_udp_serving(
    out: &mut UdpServing,
    port: &crate::model::ServicePort,
    nodeport_addresses: &[Ipv4Addr],
) {
    let serving: BTreeSet<(Ipv4Addr, u16)> = port
        .endpoints
        .iter()
        .filter(|e| e.serving)
        .map(|e| (e.address, e.port))
        .collect();
    if serving.is_empty() {
        return;
    }
    let frontends = port
        .cluster_ips
        .iter()
        .chain(&port.external_ips)
        .chain(&port.load_balancer_ips)
        .map(|ip| (*ip, port.port))
        .chain(
            port.node_port
                .into_iter()
                .flat_map(|np| nodeport_addresses.iter().map(move |ip| (*ip, np))),
        );
    for frontend in frontends {
        out.entry(frontend)
            .or_default()
            .extend(serving.iter().copied());
    }
}

/// The model and desired state of one changed Service (the change tracker's
/// unit of work): an empty model when the Service is gone.
pub fn for_change(
    change: &crate::k8s::tracker::ServiceChange,
    node: &crate::model::NodeContext,
    nodeport_addresses: &[Ipv4Addr],
) -> (Model, DesiredState) {
    let model = match &change.service {
        Some(svc) => crate::model::build_service(svc, change.slices.iter().map(|s| &**s), node),
        None => Model::default(),
    };
    let desired = build(&model, nodeport_addresses);
    (model, desired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::objects::{Interner, ServiceType, fixtures};

    /// kube-proxy's firewall chain: the ranges guard the load-balancer IPs
    /// (both views when the policy splits them), never the cluster IP or
    /// node ports; a range holding a node address admits the LB IPs
    /// themselves as sources.
    #[test]
    fn source_ranges_guard_load_balancer_ips_only() {
        let mut names = Interner::default();
        let node = Ipv4Addr::new(192, 168, 77, 10);
        let lb = Ipv4Addr::new(198, 51, 100, 4);
        let build_with = |ranges: Vec<(Ipv4Addr, u8)>, names: &mut Interner| {
            let mut svc =
                fixtures::cluster_ip_service(names, "x", "lb", Ipv4Addr::new(10, 96, 0, 8), "", 80);
            svc.type_ = ServiceType::LoadBalancer;
            svc.ports[0].node_port = Some(30080);
            svc.load_balancer_ips = vec![lb];
            svc.external_policy_local = true;
            svc.source_ranges = ranges;
            let slice = fixtures::ready_slice(
                names,
                "x",
                "lb-1",
                "lb",
                ("", 8080),
                [Ipv4Addr::new(10, 244, 1, 5)],
            );
            let model =
                crate::model::build(&[svc], &[slice], &crate::model::NodeContext::default());
            build(&model, &[node])
        };
        let outside = (Ipv4Addr::new(203, 0, 113, 0), 24);
        let state = build_with(vec![outside], &mut names);
        let with_ranges: Vec<(FrontendKey, &DesiredFrontend)> = state
            .frontends
            .iter()
            .filter(|(_, f)| f.flags & svc_flags::SOURCE_RANGES != 0)
            .map(|(k, f)| (*k, f))
            .collect();
        // Local policy without local endpoints splits the LB IP's views.
        assert_eq!(with_ranges.len(), 2, "{:#?}", state.frontends);
        for (key, fe) in &with_ranges {
            assert_eq!(key.address, lb);
            assert_eq!(fe.source_ranges, vec![outside]);
        }
        // A range holding the node's address: the LB IP is admitted too.
        let state = build_with(vec![(Ipv4Addr::new(192, 168, 0, 0), 16)], &mut names);
        let fe = &state.frontends[&FrontendKey {
            address: lb,
            port: 80,
            proto: netlb_common::proto::TCP,
            scope: scope::EXTERNAL,
        }];
        assert_eq!(
            fe.source_ranges,
            vec![(Ipv4Addr::new(192, 168, 0, 0), 16), (lb, 32)]
        );
        // None: no flag anywhere.
        let state = build_with(vec![], &mut names);
        assert!(
            state
                .frontends
                .values()
                .all(|f| f.flags & svc_flags::SOURCE_RANGES == 0 && f.source_ranges.is_empty())
        );
    }
}
