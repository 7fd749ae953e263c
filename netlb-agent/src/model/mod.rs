//! A pure model of Services and their endpoints with kube-proxy's semantics
//! (pkg/proxy: `servicechangetracker`, `endpointslicecache`,
//! `topology.CategorizeEndpoints`, `iptables` proxier's REJECT/DROP choice).
//! No I/O and no kernel: objects in, service ports with categorised
//! endpoints out. Objects the model cannot use become [`ModelIssue`]s and
//! never affect other Services.
//!
//! Owns: kube-proxy's semantics, and [`desired`]: the frontends a Service
//! becomes. Must not: do I/O, know map layouts beyond the desired
//! frontends' keys, or keep state between calls.

pub mod desired;

use std::{borrow::Borrow, collections::BTreeMap, fmt, net::Ipv4Addr};

pub use crate::k8s::objects::{HEADLESS_LABEL, SERVICE_NAME_LABEL, SERVICE_PROXY_NAME_LABEL};
use crate::k8s::objects::{Name, ProxyLabel, ServiceObject, ServiceType, SliceObject};

/// What the model needs to know about this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeContext {
    /// This node's name; endpoints with this `nodeName` are local.
    pub node_name: Option<String>,
    /// Accept Services labelled `service.kubernetes.io/service-proxy-name`
    /// with this value (unlabelled Services are always accepted).
    pub proxy_name: Option<String>,
    /// This node's `topology.kubernetes.io/zone`, for topology hints.
    pub zone: Option<String>,
}

/// kube-proxy's `ServicePortName`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    pub namespace: Name,
    pub name: Name,
    pub port_name: Name,
    /// "TCP" or "UDP".
    pub protocol: Name,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if !self.port_name.is_empty() {
            write!(f, ":{}", self.port_name)?;
        }
        write!(f, "/{}", self.protocol)
    }
}

/// One endpoint of a service port (kube-proxy's `BaseEndpointInfo`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub address: Ipv4Addr,
    pub port: u16,
    pub is_local: bool,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub zone_hints: Vec<Name>,
    pub node_hints: Vec<Name>,
}

/// Where traffic of one kind goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// Load-balance over these endpoints.
    Endpoints(Vec<Endpoint>),
    /// No endpoints anywhere: ICMP port unreachable (kube-proxy's REJECT).
    Reject,
    /// Endpoints exist, but none this traffic policy may use (Local policy
    /// without local endpoints): drop (kube-proxy's DROP).
    Drop,
}

impl Targets {
    pub fn endpoints(&self) -> &[Endpoint] {
        match self {
            Self::Endpoints(e) => e,
            Self::Reject | Self::Drop => &[],
        }
    }
}

/// A service port with its endpoints categorised.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    pub cluster_ips: Vec<Ipv4Addr>,
    pub port: u16,
    pub protocol: Name,
    pub node_port: Option<u16>,
    pub external_ips: Vec<Ipv4Addr>,
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub internal_policy_local: bool,
    pub external_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    /// sessionAffinity ClientIP timeout, if set.
    pub session_affinity_timeout: Option<u32>,
    /// loadBalancerSourceRanges (IPv4), for the load-balancer IPs.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    /// All endpoints after deduplication.
    pub endpoints: Vec<Endpoint>,
    /// Traffic to cluster IPs (internalTrafficPolicy applied).
    pub internal: Targets,
    /// Traffic to node ports, external IPs and load-balancer IPs from
    /// outside the cluster (externalTrafficPolicy applied).
    pub external: Targets,
    /// The same addresses reached from inside the cluster (pods): kube-proxy
    /// short-circuits them to the cluster-wide endpoints.
    pub external_from_pods: Targets,
}

impl ServicePort {
    /// NodePort, externalIPs or load-balancer IPs.
    pub fn externally_accessible(&self) -> bool {
        self.node_port.is_some()
            || !self.external_ips.is_empty()
            || !self.load_balancer_ips.is_empty()
    }
}

/// Something the model could not use, with the object it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelIssue {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    pub message: String,
}

impl fmt::Display for ModelIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} {}/{}: {}",
            self.kind, self.namespace, self.name, self.message
        )
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    pub ports: BTreeMap<ServicePortName, ServicePort>,
    pub issues: Vec<ModelIssue>,
}

/// A Service by (namespace, name), as health checks key them.
pub type ServiceName = (String, String);

impl Model {
    /// What the health-check node port server serves, as kube-proxy derives
    /// it: the health-check port of every Service that has one, and per
    /// Service the number of local ready endpoints summed over its ports
    /// (`EndpointsMap.LocalReadyEndpoints`).
    pub fn health_checks(&self) -> (BTreeMap<ServiceName, u16>, BTreeMap<ServiceName, usize>) {
        let mut ports = BTreeMap::new();
        // kube-proxy's getLocalReadyEndpointIPs: distinct addresses of the
        // Service's ready local endpoints, whatever its number of ports.
        let mut local: BTreeMap<ServiceName, std::collections::BTreeSet<Ipv4Addr>> =
            BTreeMap::new();
        for (name, port) in &self.ports {
            let key = (name.namespace.to_string(), name.name.to_string());
            if let Some(hc) = port.health_check_node_port {
                ports.insert(key.clone(), hc);
            }
            for e in port.endpoints.iter().filter(|e| e.is_local && e.ready) {
                local.entry(key.clone()).or_default().insert(e.address);
            }
        }
        let counts = local.into_iter().map(|(k, ips)| (k, ips.len())).collect();
        (ports, counts)
    }
}

/// kube-proxy's informer label selector: no foreign service-proxy-name
/// (ours is accepted when configured) and not headless.
fn selected(proxy: &ProxyLabel, node: &NodeContext) -> bool {
    match proxy {
        ProxyLabel::None => true,
        ProxyLabel::Headless => false,
        ProxyLabel::Named(name) => node.proxy_name.as_deref() == Some(&**name),
    }
}

/// Endpoints of one slice port, collected per service port name.
type EndpointsByPort = BTreeMap<ServicePortName, Vec<Endpoint>>;

fn slice_issue(slice: &SliceObject, message: String) -> ModelIssue {
    ModelIssue {
        kind: "EndpointSlice",
        namespace: slice.namespace.to_string(),
        name: slice.name.to_string(),
        message,
    }
}

/// The endpoints of `slices` by service port (kube-proxy's
/// `endpointSliceCache`), with the slices' issues.
fn collect_endpoints<'a>(
    slices: impl IntoIterator<Item = &'a SliceObject>,
    node: &NodeContext,
    issues: &mut Vec<ModelIssue>,
) -> EndpointsByPort {
    // kube-proxy walks a service's slices in name order.
    let mut sorted: Vec<&SliceObject> = slices.into_iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    // Each port's endpoints, with where each (address, port) sits in the
    // list: deduplication in constant time per endpoint (a Service may have
    // tens of thousands).
    let mut out: BTreeMap<ServicePortName, (Vec<Endpoint>, PositionOf)> = BTreeMap::new();
    for slice in sorted {
        if !selected(&slice.proxy, node) {
            continue;
        }
        let Some(service) = &slice.service else {
            // Not owned by a Service; nothing to proxy.
            continue;
        };
        // FQDN and IPv6 slices are ignored (this node serves IPv4).
        if !slice.ipv4 {
            continue;
        }
        issues.extend(slice.issues.iter().map(|m| slice_issue(slice, m.clone())));
        for port in &slice.ports {
            let Some(port_name) = &port.name else {
                issues.push(slice_issue(slice, "ignoring a port with no name".into()));
                continue;
            };
            let Some(number) = port.port else {
                issues.push(slice_issue(
                    slice,
                    format!("ignoring port {port_name:?} with an invalid number"),
                ));
                continue;
            };
            let spn = ServicePortName {
                namespace: slice.namespace.clone(),
                name: service.clone(),
                port_name: port_name.clone(),
                protocol: port.protocol.clone(),
            };
            let (list, index) = out.entry(spn).or_default();
            for ep in &slice.endpoints {
                let is_local = match (&ep.node_name, &node.node_name) {
                    (Some(a), Some(b)) => **a == **b,
                    _ => false,
                };
                let endpoint = Endpoint {
                    address: ep.address,
                    port: number,
                    is_local,
                    ready: ep.ready,
                    serving: ep.serving,
                    terminating: ep.terminating,
                    zone_hints: ep.zone_hints.clone(),
                    node_hints: ep.node_hints.clone(),
                };
                // Deduplicate by IP:port: the first one seen wins, unless a
                // later one is local (kube-proxy's addEndpoints).
                match index.entry((ep.address, number)) {
                    std::collections::hash_map::Entry::Occupied(at) => {
                        if is_local {
                            list[*at.get()] = endpoint;
                        }
                    }
                    std::collections::hash_map::Entry::Vacant(slot) => {
                        slot.insert(list.len());
                        list.push(endpoint);
                    }
                }
            }
        }
    }
    out.into_iter().map(|(k, (list, _))| (k, list)).collect()
}

/// kube-proxy's `topologyModeFromHints`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    None,
    PreferSameNode,
    PreferSameZone,
}

fn topology_mode(endpoints: &[Endpoint], node: &NodeContext) -> TopologyMode {
    let mut has_for_node = false;
    let mut all_node_hints = true;
    let mut has_for_zone = false;
    let mut all_zone_hints = true;
    for ep in endpoints.iter().filter(|e| e.ready) {
        if ep.node_hints.is_empty() {
            all_node_hints = false;
        } else if node
            .node_name
            .as_ref()
            .is_some_and(|n| hinted(&ep.node_hints, n))
        {
            has_for_node = true;
        }
        if ep.zone_hints.is_empty() {
            all_zone_hints = false;
        } else if node
            .zone
            .as_ref()
            .is_some_and(|z| hinted(&ep.zone_hints, z))
        {
            has_for_zone = true;
        }
    }
    if all_node_hints && has_for_node {
        return TopologyMode::PreferSameNode;
    }
    if all_zone_hints && has_for_zone {
        return TopologyMode::PreferSameZone;
    }
    TopologyMode::None
}

fn hinted(hints: &[Name], want: &str) -> bool {
    hints.iter().any(|h| **h == *want)
}

fn available_for_topology(ep: &Endpoint, mode: TopologyMode, node: &NodeContext) -> bool {
    match mode {
        TopologyMode::None => true,
        TopologyMode::PreferSameNode => node
            .node_name
            .as_ref()
            .is_some_and(|n| hinted(&ep.node_hints, n)),
        TopologyMode::PreferSameZone => node
            .zone
            .as_ref()
            .is_some_and(|z| hinted(&ep.zone_hints, z)),
    }
}

/// kube-proxy's `CategorizeEndpoints`: (cluster, local, has any endpoints).
/// `cluster` is `None` when the port does not use cluster endpoints, `local`
/// is `None` when it does not use local ones.
pub fn categorize_endpoints(
    endpoints: &[Endpoint],
    uses_cluster: bool,
    uses_local: bool,
    node: &NodeContext,
) -> (Option<Vec<Endpoint>>, Option<Vec<Endpoint>>, bool) {
    let mut has_any = false;
    let mut cluster = None;
    if uses_cluster {
        let mode = topology_mode(endpoints, node);
        let mut eps: Vec<Endpoint> = endpoints
            .iter()
            .filter(|e| e.ready && available_for_topology(e, mode, node))
            .cloned()
            .collect();
        if eps.is_empty() {
            eps = endpoints
                .iter()
                .filter(|e| e.serving && e.terminating && available_for_topology(e, mode, node))
                .cloned()
                .collect();
        }
        has_any = !eps.is_empty();
        cluster = Some(eps);
    }
    if !uses_local {
        return (cluster, None, has_any);
    }
    let mut local_ready = false;
    let mut local_serving_terminating = false;
    for ep in endpoints {
        if ep.ready {
            has_any = true;
            local_ready |= ep.is_local;
        } else if ep.serving && ep.terminating {
            has_any = true;
            local_serving_terminating |= ep.is_local;
        }
    }
    let local = if local_ready {
        endpoints
            .iter()
            .filter(|e| e.is_local && e.ready)
            .cloned()
            .collect()
    } else if local_serving_terminating {
        endpoints
            .iter()
            .filter(|e| e.is_local && e.serving && e.terminating)
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    (cluster, Some(local), has_any)
}

fn targets(chosen: Vec<Endpoint>, has_any: bool) -> Targets {
    if !chosen.is_empty() {
        Targets::Endpoints(chosen)
    } else if has_any {
        Targets::Drop
    } else {
        Targets::Reject
    }
}

/// Builds the model from a consistent snapshot of objects.
pub fn build<S: Borrow<ServiceObject>, E: Borrow<SliceObject>>(
    services: &[S],
    slices: &[E],
    node: &NodeContext,
) -> Model {
    let mut issues = Vec::new();
    let endpoints = collect_endpoints(slices.iter().map(Borrow::borrow), node, &mut issues);
    let mut ports = BTreeMap::new();
    let mut sorted: Vec<&ServiceObject> = services.iter().map(Borrow::borrow).collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    for svc in sorted {
        add_service(svc, node, &endpoints, &mut ports, &mut issues);
    }
    Model { ports, issues }
}

/// Where each (address, port) sits in a port's endpoint list.
type PositionOf = rustc_hash::FxHashMap<(Ipv4Addr, u16), usize>;

/// The model of one Service from its own slices (the change tracker's unit
/// of work): the same as its part of [`build`] over every object.
pub fn build_service<'a>(
    svc: &ServiceObject,
    slices: impl IntoIterator<Item = &'a SliceObject>,
    node: &NodeContext,
) -> Model {
    let mut issues = Vec::new();
    let endpoints = collect_endpoints(slices, node, &mut issues);
    let mut ports = BTreeMap::new();
    add_service(svc, node, &endpoints, &mut ports, &mut issues);
    Model { ports, issues }
}

fn add_service(
    svc: &ServiceObject,
    node: &NodeContext,
    endpoints: &EndpointsByPort,
    ports: &mut BTreeMap<ServicePortName, ServicePort>,
    issues: &mut Vec<ModelIssue>,
) {
    let issue = |message: String| ModelIssue {
        kind: "Service",
        namespace: svc.namespace.to_string(),
        name: svc.name.to_string(),
        message,
    };
    if !selected(&svc.proxy, node) || svc.type_ == ServiceType::ExternalName {
        return;
    }
    issues.extend(svc.issues.iter().map(|m| issue(m.clone())));
    let Some(cluster_ips) = &svc.cluster_ips else {
        return; // headless
    };
    if cluster_ips.is_empty() {
        // None allocated (an issue already), or only IPv6 ones: not this
        // node's family.
        return;
    }
    let type_ = svc.type_;
    let external_ips = &svc.external_ips;
    let load_balancer_ips = &svc.load_balancer_ips;
    // kube-proxy's ExternalPolicyLocal: only for externally accessible types.
    let external_policy_local = svc.external_policy_local
        && (matches!(type_, ServiceType::NodePort | ServiceType::LoadBalancer)
            || !external_ips.is_empty());
    // kube-proxy's `NeedsHealthCheck`: only LoadBalancer Services with a
    // Local external policy get a health-check node port.
    let health_check_node_port = svc
        .health_check_node_port
        .filter(|_| type_ == ServiceType::LoadBalancer && external_policy_local);
    let policies = Policies {
        internal_local: svc.internal_policy_local,
        external_local: external_policy_local,
    };
    for port in &svc.ports {
        let spn = ServicePortName {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            port_name: port.name.clone(),
            protocol: port.protocol.clone(),
        };
        let eps = endpoints.get(&spn).cloned().unwrap_or_default();
        let externally_accessible =
            port.node_port.is_some() || !external_ips.is_empty() || !load_balancer_ips.is_empty();
        let ext_local = externally_accessible && external_policy_local;
        let (internal, external, external_from_pods) =
            policies.targets(&eps, externally_accessible, node);
        ports.insert(
            spn,
            ServicePort {
                cluster_ips: cluster_ips.clone(),
                port: port.port,
                protocol: port.protocol.clone(),
                node_port: port.node_port,
                external_ips: external_ips.clone(),
                load_balancer_ips: load_balancer_ips.clone(),
                internal_policy_local: svc.internal_policy_local,
                external_policy_local: ext_local,
                health_check_node_port,
                session_affinity_timeout: svc.session_affinity_timeout,
                source_ranges: svc.source_ranges.clone(),
                endpoints: eps,
                internal,
                external,
                external_from_pods,
            },
        );
    }
}

/// A Service's traffic policies.
struct Policies {
    internal_local: bool,
    /// kube-proxy's ExternalPolicyLocal (externally accessible types only).
    external_local: bool,
}

impl Policies {
    /// What a port's traffic goes to: internal (cluster IPs), external (from
    /// outside), and external from pods, which are short-circuited to the
    /// cluster-wide endpoints (kube-proxy's KUBE-EXT chain).
    fn targets(
        &self,
        eps: &[Endpoint],
        externally_accessible: bool,
        node: &NodeContext,
    ) -> (Targets, Targets, Targets) {
        let ext_local = externally_accessible && self.external_local;
        // kube-proxy's UsesClusterEndpoints / UsesLocalEndpoints.
        let uses_cluster = !self.internal_local || (externally_accessible && !ext_local);
        let uses_local = self.internal_local || ext_local;
        let (cluster, local, has_any) = categorize_endpoints(eps, uses_cluster, uses_local, node);
        let cluster = cluster.unwrap_or_default();
        let local = local.unwrap_or_default();
        let pick = |local_policy: bool| {
            targets(
                if local_policy {
                    local.clone()
                } else {
                    cluster.clone()
                },
                has_any,
            )
        };
        let internal = pick(self.internal_local);
        let external = pick(ext_local);
        let external_from_pods = if ext_local {
            let (cluster_all, _, any) = categorize_endpoints(eps, true, false, node);
            targets(cluster_all.unwrap_or_default(), any || has_any)
        } else {
            external.clone()
        };
        (internal, external, external_from_pods)
    }
}

#[cfg(test)]
mod tests {
    //! Scenario tables in the shape of kube-proxy's packet-flow tests:
    //! `{source, protocol, destination, port} -> backends | REJECT | DROP`,
    //! evaluated on the desired datapath state the way the datapath looks
    //! frontends up.

    use std::collections::BTreeMap;

    use k8s_openapi::api::{
        core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, ServicePort as K8sPort, ServiceSpec,
            ServiceStatus,
        },
        discovery::v1::{
            Endpoint as K8sEndpoint, EndpointConditions, EndpointHints, EndpointPort, ForZone,
        },
    };
    use k8s_openapi::apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString};
    use netlb_common::{proto, scope, svc_flags};

    use super::*;
    use crate::model::desired::{self, DesiredState, FrontendKey};
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

    /// The model of typed objects, through their lean forms; checks that
    /// recomputing each Service alone from its own slices (the change
    /// tracker's way) gives the same result as building everything.
    fn build_typed(services: &[Service], slices: &[EndpointSlice], node: &NodeContext) -> Model {
        let mut names = crate::k8s::objects::Interner::default();
        let services: Vec<ServiceObject> = services
            .iter()
            .map(|s| ServiceObject::from_service(s, &mut names))
            .collect();
        let slices: Vec<SliceObject> = slices
            .iter()
            .map(|s| SliceObject::from_slice(s, &mut names))
            .collect();
        let full = build(&services, &slices, node);
        let mut ports = BTreeMap::new();
        for svc in &services {
            let own = slices.iter().filter(|s| {
                s.namespace == svc.namespace && s.service.as_deref() == Some(&*svc.name)
            });
            ports.extend(build_service(svc, own, node).ports);
        }
        assert_eq!(
            ports, full.ports,
            "per-Service models differ from the whole one"
        );
        full
    }

    const NODE: &str = "node-a";
    /// This node's NodePort address.
    const NODE_IP: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 10);

    fn node() -> NodeContext {
        NodeContext {
            node_name: Some(NODE.into()),
            proxy_name: None,
            zone: Some("zone-a".into()),
        }
    }

    fn make_service(ns: &str, name: &str, f: impl FnOnce(&mut Service)) -> Service {
        let mut svc = Service {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("ClusterIP".into()),
                ..Default::default()
            }),
            status: None,
        };
        f(&mut svc);
        svc
    }

    fn spec(svc: &mut Service) -> &mut ServiceSpec {
        svc.spec.as_mut().unwrap()
    }

    fn port(name: &str, protocol: &str, port: i32, target: i32) -> K8sPort {
        K8sPort {
            name: (!name.is_empty()).then(|| name.into()),
            protocol: Some(protocol.into()),
            port,
            target_port: Some(IntOrString::Int(target)),
            ..Default::default()
        }
    }

    struct Ep {
        ip: &'static str,
        node: &'static str,
        ready: Option<bool>,
        serving: Option<bool>,
        terminating: Option<bool>,
        zones: &'static [&'static str],
    }

    fn ep(ip: &'static str, node: &'static str) -> Ep {
        Ep {
            ip,
            node,
            ready: Some(true),
            serving: Some(true),
            terminating: Some(false),
            zones: &[],
        }
    }

    fn terminating(mut e: Ep, serving: bool) -> Ep {
        e.ready = Some(false);
        e.serving = Some(serving);
        e.terminating = Some(true);
        e
    }

    fn make_slice(
        ns: &str,
        name: &str,
        service: &str,
        ports: &[(&str, &str, i32)],
        eps: Vec<Ep>,
    ) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some(ns.into()),
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.to_string(),
                    service.to_string(),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            ports: Some(
                ports
                    .iter()
                    .map(|(name, protocol, port)| EndpointPort {
                        name: Some((*name).into()),
                        protocol: Some((*protocol).into()),
                        port: Some(*port),
                        ..Default::default()
                    })
                    .collect(),
            ),
            endpoints: eps
                .into_iter()
                .map(|e| K8sEndpoint {
                    addresses: vec![e.ip.into()],
                    node_name: (!e.node.is_empty()).then(|| e.node.into()),
                    conditions: Some(EndpointConditions {
                        ready: e.ready,
                        serving: e.serving,
                        terminating: e.terminating,
                    }),
                    hints: (!e.zones.is_empty()).then(|| EndpointHints {
                        for_zones: Some(
                            e.zones
                                .iter()
                                .map(|z| ForZone { name: (*z).into() })
                                .collect(),
                        ),
                        ..Default::default()
                    }),
                    ..Default::default()
                })
                .collect::<Vec<_>>()
                .into(),
        }
    }

    #[derive(Clone, Copy, Debug)]
    enum Source {
        /// A pod on this node (the from_pod hook).
        Pod,
        /// Outside the cluster (the uplink hooks): the
        /// scope-EXTERNAL frontend.
        External,
    }

    /// What the datapath would do: sorted "ip:port" backends, "REJECT",
    /// "DROP", or "PASS" (no frontend).
    fn flow(state: &DesiredState, source: Source, protocol: u8, dest: &str, port: u16) -> String {
        let key = FrontendKey {
            address: dest.parse().unwrap(),
            port,
            proto: protocol,
            scope: scope::EXTERNAL,
        };
        let Some(mut fe) = state.frontends.get(&key) else {
            return "PASS".into();
        };
        if matches!(source, Source::Pod) && fe.flags & svc_flags::TWO_SCOPES != 0 {
            fe = &state.frontends[&FrontendKey {
                scope: scope::INTERNAL,
                ..key
            }];
        }
        if fe.backends.is_empty() {
            return if fe.flags & svc_flags::DROP != 0 {
                "DROP"
            } else {
                "REJECT"
            }
            .into();
        }
        let mut out: Vec<String> = fe
            .backends
            .iter()
            .map(|b| format!("{}:{}", b.addr.address, b.addr.port))
            .collect();
        out.sort();
        out.join(", ")
    }

    fn check(
        services: &[Service],
        slices: &[EndpointSlice],
        cases: &[(Source, u8, &str, u16, &str)],
    ) -> Model {
        let model = build_typed(services, slices, &node());
        let state = desired::build(&model, &[NODE_IP]);
        for (source, protocol, dest, port, want) in cases {
            assert_eq!(
                flow(&state, *source, *protocol, dest, *port),
                *want,
                "{source:?} {protocol} {dest}:{port}"
            );
        }
        model
    }

    const TCP: u8 = proto::TCP;
    const UDP: u8 = proto::UDP;
    use Source::{External, Pod};

    #[test]
    fn cluster_ip_multi_port_named_target_ports_and_multiple_slices() {
        let svc = make_service("ns1", "svc1", |s| {
            spec(s).cluster_ip = Some("172.30.0.41".into());
            spec(s).ports = Some(vec![
                port("http", "TCP", 80, 8080),
                port("dns", "UDP", 53, 5353),
            ]);
        });
        let slices = [
            make_slice(
                "ns1",
                "svc1-a",
                "svc1",
                &[("http", "TCP", 8080), ("dns", "UDP", 5353)],
                vec![ep("10.180.0.1", NODE)],
            ),
            // The same endpoint again in another slice, and one more.
            make_slice(
                "ns1",
                "svc1-b",
                "svc1",
                &[("http", "TCP", 8080)],
                vec![ep("10.180.0.1", NODE), ep("10.180.1.1", "node-b")],
            ),
        ];
        check(
            &[svc],
            &slices,
            &[
                (
                    Pod,
                    TCP,
                    "172.30.0.41",
                    80,
                    "10.180.0.1:8080, 10.180.1.1:8080",
                ),
                (Pod, UDP, "172.30.0.41", 53, "10.180.0.1:5353"),
                (Pod, TCP, "172.30.0.41", 53, "PASS"),
                (Pod, TCP, "172.30.0.42", 80, "PASS"),
            ],
        );
    }

    #[test]
    fn target_port_by_name_takes_the_slice_port_number() {
        let svc = make_service("ns1", "svc1", |s| {
            spec(s).cluster_ip = Some("172.30.0.41".into());
            let mut p = port("web", "TCP", 80, 0);
            p.target_port = Some(IntOrString::String("http-alt".into()));
            spec(s).ports = Some(vec![p]);
        });
        let slices = [make_slice(
            "ns1",
            "svc1-a",
            "svc1",
            &[("web", "TCP", 8081)],
            vec![ep("10.180.0.1", NODE)],
        )];
        check(
            &[svc],
            &slices,
            &[(Pod, TCP, "172.30.0.41", 80, "10.180.0.1:8081")],
        );
    }

    #[test]
    fn no_endpoints_rejects_and_terminating_fallback() {
        let services = [
            make_service("ns1", "empty", |s| {
                spec(s).cluster_ip = Some("172.30.0.1".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "terminating", |s| {
                spec(s).cluster_ip = Some("172.30.0.2".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "mixed", |s| {
                spec(s).cluster_ip = Some("172.30.0.3".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "not-serving", |s| {
                spec(s).cluster_ip = Some("172.30.0.4".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
        ];
        let slices = [
            make_slice(
                "ns1",
                "terminating-a",
                "terminating",
                &[("", "TCP", 80)],
                vec![
                    terminating(ep("10.180.0.1", NODE), true),
                    terminating(ep("10.180.0.2", NODE), false),
                ],
            ),
            make_slice(
                "ns1",
                "mixed-a",
                "mixed",
                &[("", "TCP", 80)],
                vec![
                    ep("10.180.0.3", NODE),
                    terminating(ep("10.180.0.4", NODE), true),
                ],
            ),
            make_slice(
                "ns1",
                "not-serving-a",
                "not-serving",
                &[("", "TCP", 80)],
                vec![
                    terminating(ep("10.180.0.5", NODE), false),
                    Ep {
                        ready: Some(false),
                        serving: Some(false),
                        terminating: Some(false),
                        ..ep("10.180.0.6", NODE)
                    },
                ],
            ),
        ];
        check(
            &services,
            &slices,
            &[
                (Pod, TCP, "172.30.0.1", 80, "REJECT"),
                // No ready endpoint: serving+terminating ones are used.
                (Pod, TCP, "172.30.0.2", 80, "10.180.0.1:80"),
                // Ready ones exist: terminating ones are not used.
                (Pod, TCP, "172.30.0.3", 80, "10.180.0.3:80"),
                (Pod, TCP, "172.30.0.4", 80, "REJECT"),
            ],
        );
    }

    #[test]
    fn internal_traffic_policy_local() {
        let services = [
            make_service("ns1", "local", |s| {
                spec(s).cluster_ip = Some("172.30.0.1".into());
                spec(s).internal_traffic_policy = Some("Local".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "remote-only", |s| {
                spec(s).cluster_ip = Some("172.30.0.2".into());
                spec(s).internal_traffic_policy = Some("Local".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "local-terminating", |s| {
                spec(s).cluster_ip = Some("172.30.0.3".into());
                spec(s).internal_traffic_policy = Some("Local".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
        ];
        let slices = [
            make_slice(
                "ns1",
                "local-a",
                "local",
                &[("", "TCP", 80)],
                vec![ep("10.180.0.1", NODE), ep("10.180.1.1", "node-b")],
            ),
            make_slice(
                "ns1",
                "remote-only-a",
                "remote-only",
                &[("", "TCP", 80)],
                vec![ep("10.180.1.2", "node-b")],
            ),
            make_slice(
                "ns1",
                "local-terminating-a",
                "local-terminating",
                &[("", "TCP", 80)],
                vec![
                    terminating(ep("10.180.0.3", NODE), true),
                    ep("10.180.1.3", "node-b"),
                ],
            ),
        ];
        check(
            &services,
            &slices,
            &[
                (Pod, TCP, "172.30.0.1", 80, "10.180.0.1:80"),
                // Endpoints exist, but none local: DROP, not REJECT.
                (Pod, TCP, "172.30.0.2", 80, "DROP"),
                // The local set falls back to serving+terminating on its own.
                (Pod, TCP, "172.30.0.3", 80, "10.180.0.3:80"),
            ],
        );
    }

    #[test]
    fn external_traffic_policy_local_splits_pod_and_external_views() {
        let svc = make_service("ns1", "lb", |s| {
            spec(s).type_ = Some("LoadBalancer".into());
            spec(s).cluster_ip = Some("172.30.0.1".into());
            spec(s).external_ips = Some(vec!["192.168.99.11".into()]);
            spec(s).external_traffic_policy = Some("Local".into());
            let mut p = port("", "TCP", 80, 80);
            p.node_port = Some(30080);
            spec(s).ports = Some(vec![p]);
            s.status = Some(ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![LoadBalancerIngress {
                        ip: Some("1.2.3.4".into()),
                        ..Default::default()
                    }]),
                }),
                ..Default::default()
            });
        });
        let slices = [make_slice(
            "ns1",
            "lb-a",
            "lb",
            &[("", "TCP", 80)],
            vec![ep("10.180.0.1", NODE), ep("10.180.1.1", "node-b")],
        )];
        let model = check(
            std::slice::from_ref(&svc),
            &slices,
            &[
                (Pod, TCP, "172.30.0.1", 80, "10.180.0.1:80, 10.180.1.1:80"),
                (
                    Pod,
                    TCP,
                    "192.168.99.11",
                    80,
                    "10.180.0.1:80, 10.180.1.1:80",
                ),
                (External, TCP, "192.168.99.11", 80, "10.180.0.1:80"),
                (Pod, TCP, "1.2.3.4", 80, "10.180.0.1:80, 10.180.1.1:80"),
                (External, TCP, "1.2.3.4", 80, "10.180.0.1:80"),
                (External, TCP, "192.168.77.10", 30080, "10.180.0.1:80"),
                (
                    Pod,
                    TCP,
                    "192.168.77.10",
                    30080,
                    "10.180.0.1:80, 10.180.1.1:80",
                ),
                // Node ports only on the node's addresses, and not on the
                // service port.
                (External, TCP, "192.168.77.11", 30080, "PASS"),
                (External, TCP, "192.168.77.10", 80, "PASS"),
            ],
        );
        let sp = model.ports.values().next().unwrap();
        assert_eq!(sp.node_port, Some(30080));
        assert!(sp.external_policy_local);

        // No local endpoint: external traffic is dropped, pods still reach
        // the cluster-wide endpoints.
        let remote = [make_slice(
            "ns1",
            "lb-a",
            "lb",
            &[("", "TCP", 80)],
            vec![ep("10.180.1.1", "node-b")],
        )];
        check(
            &[svc],
            &remote,
            &[
                (External, TCP, "1.2.3.4", 80, "DROP"),
                (External, TCP, "192.168.77.10", 30080, "DROP"),
                (Pod, TCP, "192.168.77.10", 30080, "10.180.1.1:80"),
                (Pod, TCP, "1.2.3.4", 80, "10.180.1.1:80"),
                (Pod, TCP, "172.30.0.1", 80, "10.180.1.1:80"),
            ],
        );
    }

    /// kube-proxy's getLocalReadyEndpointIPs: a health check counts the
    /// distinct local ready addresses, not endpoints per port.
    #[test]
    fn health_checks_count_distinct_local_addresses() {
        let svc = make_service("ns1", "lb", |s| {
            spec(s).type_ = Some("LoadBalancer".into());
            spec(s).cluster_ip = Some("10.96.0.40".into());
            spec(s).external_traffic_policy = Some("Local".into());
            spec(s).health_check_node_port = Some(32100);
            spec(s).ports = Some(vec![
                port("http", "TCP", 80, 8080),
                port("https", "TCP", 443, 8443),
            ]);
        });
        let slice = make_slice(
            "ns1",
            "lb-1",
            "lb",
            &[("http", "TCP", 8080), ("https", "TCP", 8443)],
            vec![
                ep("10.244.0.5", NODE),
                ep("10.244.0.6", NODE),
                ep("10.244.1.5", "other"),
            ],
        );
        let model = build_typed(&[svc], &[slice], &node());
        let (ports, counts) = model.health_checks();
        let key = ("ns1".to_string(), "lb".to_string());
        assert_eq!(ports.get(&key), Some(&32100));
        assert_eq!(counts.get(&key), Some(&2));
    }

    #[test]
    fn topology_hints() {
        let svc = make_service("ns1", "hints", |s| {
            spec(s).cluster_ip = Some("172.30.0.1".into());
            spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
        });
        let zoned = |ip, node, zones| Ep {
            zones,
            ..ep(ip, node)
        };
        let all_hinted = [make_slice(
            "ns1",
            "hints-a",
            "hints",
            &[("", "TCP", 80)],
            vec![
                zoned("10.180.0.1", NODE, &["zone-a"]),
                zoned("10.180.1.1", "node-b", &["zone-b"]),
            ],
        )];
        check(
            std::slice::from_ref(&svc),
            &all_hinted,
            &[(Pod, TCP, "172.30.0.1", 80, "10.180.0.1:80")],
        );
        // One endpoint without hints: hints are ignored.
        let partly = [make_slice(
            "ns1",
            "hints-a",
            "hints",
            &[("", "TCP", 80)],
            vec![
                zoned("10.180.0.1", NODE, &["zone-a"]),
                ep("10.180.1.1", "node-b"),
            ],
        )];
        check(
            std::slice::from_ref(&svc),
            &partly,
            &[(Pod, TCP, "172.30.0.1", 80, "10.180.0.1:80, 10.180.1.1:80")],
        );
        // No endpoint for our zone: hints are ignored.
        let other = [make_slice(
            "ns1",
            "hints-a",
            "hints",
            &[("", "TCP", 80)],
            vec![
                zoned("10.180.1.1", "node-b", &["zone-b"]),
                zoned("10.180.2.1", "node-c", &["zone-c"]),
            ],
        )];
        check(
            &[svc],
            &other,
            &[(Pod, TCP, "172.30.0.1", 80, "10.180.1.1:80, 10.180.2.1:80")],
        );
    }

    #[test]
    fn ignored_services_and_slices() {
        let services = [
            make_service("ns1", "headless", |s| {
                spec(s).cluster_ip = Some("None".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "external-name", |s| {
                spec(s).type_ = Some("ExternalName".into());
                spec(s).cluster_ip = Some("172.30.0.2".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "other-proxy", |s| {
                s.metadata.labels = Some(BTreeMap::from([(
                    SERVICE_PROXY_NAME_LABEL.to_string(),
                    "other".to_string(),
                )]));
                spec(s).cluster_ip = Some("172.30.0.3".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "ipv6", |s| {
                spec(s).cluster_ip = Some("fd00::1".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "sctp", |s| {
                spec(s).cluster_ip = Some("172.30.0.5".into());
                spec(s).ports = Some(vec![port("", "SCTP", 80, 80), port("tcp", "TCP", 81, 81)]);
            }),
            make_service("ns1", "fqdn", |s| {
                spec(s).cluster_ip = Some("172.30.0.6".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
        ];
        let mut fqdn = make_slice(
            "ns1",
            "fqdn-a",
            "fqdn",
            &[("", "TCP", 80)],
            vec![ep("10.180.0.6", NODE)],
        );
        fqdn.address_type = "FQDN".into();
        let model = check(
            &services,
            &[fqdn],
            &[
                (Pod, TCP, "172.30.0.2", 80, "PASS"),
                (Pod, TCP, "172.30.0.3", 80, "PASS"),
                (Pod, TCP, "172.30.0.5", 81, "REJECT"),
                (Pod, TCP, "172.30.0.6", 80, "REJECT"),
            ],
        );
        assert!(
            model
                .issues
                .iter()
                .any(|i| i.name == "sctp" && i.message.contains("SCTP")),
            "{:?}",
            model.issues
        );
        assert_eq!(
            model.ports.len(),
            2,
            "{:?}",
            model.ports.keys().collect::<Vec<_>>()
        );

        // The same proxy name, when configured, is ours.
        let mut ctx = node();
        ctx.proxy_name = Some("other".into());
        assert_eq!(
            build_typed(&services, &[] as &[EndpointSlice], &ctx)
                .ports
                .len(),
            3
        );
    }

    #[test]
    fn selectorless_service_with_handwritten_slice() {
        let svc = make_service("ns1", "manual", |s| {
            spec(s).cluster_ip = Some("172.30.0.9".into());
            spec(s).ports = Some(vec![port("", "TCP", 443, 6443)]);
        });
        let slices = [make_slice(
            "ns1",
            "manual-1",
            "manual",
            &[("", "TCP", 6443)],
            vec![ep("192.168.77.10", "")],
        )];
        check(
            &[svc],
            &slices,
            &[(Pod, TCP, "172.30.0.9", 443, "192.168.77.10:6443")],
        );
    }

    #[test]
    fn bad_objects_are_isolated() {
        let services = [
            make_service("ns1", "good", |s| {
                spec(s).cluster_ip = Some("172.30.0.1".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "bad-ip", |s| {
                spec(s).cluster_ip = Some("300.1.1.1".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "bad-port", |s| {
                spec(s).cluster_ip = Some("172.30.0.3".into());
                spec(s).ports = Some(vec![port("", "TCP", 70000, 80), port("ok", "TCP", 81, 81)]);
            }),
            make_service("ns1", "no-cluster-ip", |s| {
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "no-spec", |s| s.spec = None),
        ];
        let mut bad_slice = make_slice(
            "ns1",
            "good-a",
            "good",
            &[("", "TCP", 80)],
            vec![ep("10.180.0.1", NODE), ep("not-an-ip", NODE)],
        );
        bad_slice.ports.as_mut().unwrap().push(EndpointPort {
            name: None,
            port: Some(1),
            ..Default::default()
        });
        let model = check(
            &services,
            &[bad_slice],
            &[
                (Pod, TCP, "172.30.0.1", 80, "10.180.0.1:80"),
                (Pod, TCP, "172.30.0.3", 81, "REJECT"),
            ],
        );
        for name in ["bad-ip", "bad-port", "no-cluster-ip", "no-spec", "good-a"] {
            assert!(
                model.issues.iter().any(|i| i.name == name),
                "no issue for {name}: {:?}",
                model.issues
            );
        }
    }

    #[test]
    fn two_services_on_one_address_keep_the_first() {
        let services = [
            make_service("ns1", "a", |s| {
                spec(s).cluster_ip = Some("172.30.0.1".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
            make_service("ns1", "b", |s| {
                spec(s).cluster_ip = Some("172.30.0.1".into());
                spec(s).ports = Some(vec![port("", "TCP", 80, 80)]);
            }),
        ];
        let slices = [
            make_slice(
                "ns1",
                "a-1",
                "a",
                &[("", "TCP", 80)],
                vec![ep("10.180.0.1", NODE)],
            ),
            make_slice(
                "ns1",
                "b-1",
                "b",
                &[("", "TCP", 80)],
                vec![ep("10.180.0.2", NODE)],
            ),
        ];
        let state = desired::build(&build_typed(&services, &slices, &node()), &[NODE_IP]);
        assert_eq!(flow(&state, Pod, TCP, "172.30.0.1", 80), "10.180.0.1:80");
        assert_eq!(state.conflicts.len(), 1);
    }
}
