//! Lean forms of the API objects: only what the model needs, decoded one
//! object at a time, with addresses as integers and names interned. A
//! Service or EndpointSlice with managedFields, a last-applied annotation,
//! targetRefs and conditions takes kilobytes as a k8s-openapi object; its
//! lean form takes a few hundred bytes, so 100k Services and their slices
//! fit in tens of megabytes.
//!
//! Decoding never fails as a whole: what cannot be used becomes an issue
//! recorded on the object (and reported once per object state), and the
//! rest of the object is still used, as kube-proxy does field by field. An
//! object that is not a Service or EndpointSlice at all (its JSON does not
//! deserialize) is an error for that object alone.

use std::{
    collections::HashSet,
    net::Ipv4Addr,
    str::FromStr as _,
    sync::Arc,
    time::{Duration, SystemTime},
};

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

/// An interned string (namespaces, names, port names, node names, zones).
pub type Name = Arc<str>;

/// Interns strings so that the many copies of a namespace, node or port
/// name share one allocation.
#[derive(Debug, Default)]
pub struct Interner {
    names: HashSet<Arc<str>>,
}

impl Interner {
    pub fn intern(&mut self, s: &str) -> Name {
        if let Some(name) = self.names.get(s) {
            return Arc::clone(name);
        }
        let name: Arc<str> = Arc::from(s);
        self.names.insert(Arc::clone(&name));
        name
    }

    /// Drops names nothing else refers to any more.
    pub fn shrink(&mut self) {
        self.names.retain(|n| Arc::strong_count(n) > 1);
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }
}

/// Label of EndpointSlices naming their Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Services (and slices) with this label belong to another proxy.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";
/// Headless Services' slices carry this label; kube-proxy ignores them.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";
/// The EndpointSlice controller's trigger time annotation (programming
/// latency).
pub const TRIGGER_TIME_ANNOTATION: &str = "endpoints.kubernetes.io/last-change-trigger-time";

/// Which proxy an object's labels give it to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ProxyLabel {
    /// Not labelled: every default proxy's.
    None,
    /// `service.kubernetes.io/service-proxy-name`.
    Named(Name),
    /// `service.kubernetes.io/headless` (slices of headless Services).
    Headless,
}

/// `spec.type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
    ExternalName,
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServicePortObject {
    pub name: Name,
    /// "TCP" or "UDP" (other protocols are issues).
    pub protocol: Name,
    pub port: u16,
    pub node_port: Option<u16>,
}

/// A Service as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceObject {
    pub namespace: Name,
    pub name: Name,
    pub proxy: ProxyLabel,
    pub type_: ServiceType,
    /// `None` (headless) or the IPv4 cluster IPs (empty: none allocated, or
    /// only IPv6 ones: see `issues`).
    pub cluster_ips: Option<Vec<Ipv4Addr>>,
    pub external_ips: Vec<Ipv4Addr>,
    /// `status.loadBalancer.ingress` IPs (ipMode Proxy excluded), for
    /// LoadBalancer Services.
    pub load_balancer_ips: Vec<Ipv4Addr>,
    pub internal_policy_local: bool,
    /// `externalTrafficPolicy: Local` as written (the model decides whether
    /// it applies).
    pub external_policy_local: bool,
    pub health_check_node_port: Option<u16>,
    pub session_affinity_timeout: Option<u32>,
    /// `spec.loadBalancerSourceRanges` of this family (IPv4), as
    /// (network, prefix length); empty: every source.
    pub source_ranges: Vec<(Ipv4Addr, u8)>,
    pub ports: Vec<ServicePortObject>,
    /// Problems found while decoding, reported once per object state.
    pub issues: Vec<String>,
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SlicePort {
    /// `None`: a port without a name (an issue).
    pub name: Option<Name>,
    pub protocol: Name,
    /// `None`: missing or out of range (an issue).
    pub port: Option<u16>,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EndpointObject {
    pub address: Ipv4Addr,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    pub node_name: Option<Name>,
    pub zone_hints: Vec<Name>,
    pub node_hints: Vec<Name>,
}

/// An EndpointSlice as the model sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct SliceObject {
    pub namespace: Name,
    pub name: Name,
    pub proxy: ProxyLabel,
    /// `kubernetes.io/service-name`.
    pub service: Option<Name>,
    /// addressType IPv4 (FQDN and IPv6 slices are ignored).
    pub ipv4: bool,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<EndpointObject>,
    /// `endpoints.kubernetes.io/last-change-trigger-time`.
    pub trigger_time: Option<SystemTime>,
    pub issues: Vec<String>,
}

/// What the agent uses of its Node.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct NodeObject {
    /// `topology.kubernetes.io/zone`.
    pub zone: Option<Name>,
    /// Being deleted, or tainted `ToBeDeletedByClusterAutoscaler`.
    pub deleting: bool,
}

/// An object that is not what its kind says.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode {kind} {namespace}/{name}")]
pub struct DecodeError {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
    #[source]
    pub source: serde_json::Error,
}

/// The wire forms: exactly the fields the model reads, deserialized
/// straight from the API server's JSON (or a manifest's YAML). Everything
/// else (managedFields, the last-applied annotation, targetRefs, zones of
/// endpoints...) is skipped by the parser without being allocated, which is
/// what makes decoding 100k realistic Services cheap. A field the model
/// reads with the wrong JSON type fails the object (alone).
pub mod wire {
    use serde::Deserialize;

    /// The labels the agent looks at.
    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct Labels {
        #[serde(rename = "service.kubernetes.io/service-proxy-name")]
        pub proxy_name: Option<String>,
        #[serde(rename = "service.kubernetes.io/headless")]
        pub headless: Option<String>,
        #[serde(rename = "kubernetes.io/service-name")]
        pub service_name: Option<String>,
        #[serde(rename = "topology.kubernetes.io/zone")]
        pub zone: Option<String>,
    }

    /// The annotations the agent looks at.
    #[derive(Clone, Debug, Default, Deserialize)]
    pub struct Annotations {
        #[serde(rename = "endpoints.kubernetes.io/last-change-trigger-time")]
        pub trigger_time: Option<String>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Meta {
        pub name: Option<String>,
        pub namespace: Option<String>,
        pub resource_version: Option<String>,
        pub labels: Option<Labels>,
        pub annotations: Option<Annotations>,
        pub deletion_timestamp: Option<String>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Service {
        pub metadata: Meta,
        pub spec: Option<ServiceSpec>,
        pub status: Option<ServiceStatus>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct ServiceSpec {
        #[serde(rename = "type")]
        pub type_: Option<String>,
        #[serde(rename = "clusterIP")]
        pub cluster_ip: Option<String>,
        #[serde(rename = "clusterIPs")]
        pub cluster_ips: Option<Vec<String>>,
        #[serde(rename = "externalIPs")]
        pub external_ips: Option<Vec<String>>,
        pub ports: Option<Vec<ServicePort>>,
        pub internal_traffic_policy: Option<String>,
        pub external_traffic_policy: Option<String>,
        pub health_check_node_port: Option<i32>,
        pub session_affinity: Option<String>,
        pub session_affinity_config: Option<SessionAffinityConfig>,
        pub load_balancer_source_ranges: Option<Vec<String>>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct ServicePort {
        pub name: Option<String>,
        pub protocol: Option<String>,
        pub port: i32,
        pub node_port: Option<i32>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct SessionAffinityConfig {
        #[serde(rename = "clientIP")]
        pub client_ip: Option<ClientIpConfig>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct ClientIpConfig {
        pub timeout_seconds: Option<i32>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct ServiceStatus {
        pub load_balancer: Option<LoadBalancerStatus>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct LoadBalancerStatus {
        pub ingress: Option<Vec<LoadBalancerIngress>>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct LoadBalancerIngress {
        pub ip: Option<String>,
        pub ip_mode: Option<String>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct EndpointSlice {
        pub metadata: Meta,
        pub address_type: String,
        pub endpoints: Option<Vec<Endpoint>>,
        pub ports: Option<Vec<SlicePort>>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Endpoint {
        pub addresses: Vec<String>,
        pub conditions: Option<Conditions>,
        pub node_name: Option<String>,
        pub hints: Option<Hints>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct Conditions {
        pub ready: Option<bool>,
        pub serving: Option<bool>,
        pub terminating: Option<bool>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(rename_all = "camelCase", default)]
    pub struct Hints {
        pub for_zones: Option<Vec<Named>>,
        pub for_nodes: Option<Vec<Named>>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct Named {
        pub name: String,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct SlicePort {
        pub name: Option<String>,
        pub protocol: Option<String>,
        pub port: Option<i32>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct Node {
        pub metadata: Meta,
        pub spec: Option<NodeSpec>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct NodeSpec {
        pub taints: Option<Vec<Taint>>,
    }

    #[derive(Clone, Debug, Default, Deserialize)]
    #[serde(default)]
    pub struct Taint {
        pub key: String,
    }
}

fn proxy_label(labels: Option<&wire::Labels>, names: &mut Interner) -> ProxyLabel {
    let Some(labels) = labels else {
        return ProxyLabel::None;
    };
    if labels.headless.is_some() {
        return ProxyLabel::Headless;
    }
    match &labels.proxy_name {
        Some(name) => ProxyLabel::Named(names.intern(name)),
        None => ProxyLabel::None,
    }
}

/// Parses IPv4 addresses, skipping IPv6 ones (the other family) and
/// recording invalid ones as issues; duplicates are dropped.
fn ipv4s<'a>(
    values: impl Iterator<Item = &'a String>,
    what: &str,
    issues: &mut Vec<String>,
) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    for v in values {
        match parse_ip_sloppy(v) {
            Ok(std::net::IpAddr::V4(ip)) => {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
            Ok(std::net::IpAddr::V6(_)) => {}
            Err(_) => issues.push(format!("ignoring invalid {what} {v:?}")),
        }
    }
    out
}

/// kube-proxy's `netutils.ParseIPSloppy`: an IPv4 dotted quad may carry
/// leading zeros, read as decimal ("010" is 10, never octal 8: the
/// CVE-2021-29923 confusion); anything else parses as usual.
fn parse_ip_sloppy(text: &str) -> Result<std::net::IpAddr, std::net::AddrParseError> {
    match text.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(ip),
        Err(e) => {
            let octets: Vec<&str> = text.split('.').collect();
            let decimal = |o: &&str| -> Option<u8> {
                (!o.is_empty() && o.len() <= 3 && o.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| o.parse::<u8>().ok())
                    .flatten()
            };
            match octets.iter().map(decimal).collect::<Option<Vec<u8>>>() {
                Some(v) if v.len() == 4 => {
                    Ok(std::net::IpAddr::V4(Ipv4Addr::new(v[0], v[1], v[2], v[3])))
                }
                _ => Err(e),
            }
        }
    }
}

/// Parses CIDRs as kube-proxy takes loadBalancerSourceRanges: padding
/// trimmed (validation lets it through), IPv6 ranges left to the other
/// family, invalid ones reported; the network is masked to its prefix.
fn ipv4_cidrs<'a>(
    values: impl Iterator<Item = &'a String>,
    issues: &mut Vec<String>,
) -> Vec<(Ipv4Addr, u8)> {
    let mut out = Vec::new();
    for v in values {
        match v.trim().parse::<ipnet::IpNet>() {
            Ok(ipnet::IpNet::V4(net)) => {
                let range = (net.network(), net.prefix_len());
                if !out.contains(&range) {
                    out.push(range);
                }
            }
            Ok(ipnet::IpNet::V6(_)) => {}
            Err(_) => issues.push(format!("ignoring invalid loadBalancerSourceRange {v:?}")),
        }
    }
    out.sort();
    out
}

fn port_number(p: i32) -> Option<u16> {
    (1..=65535).contains(&p).then_some(p as u16)
}

fn meta_names(meta: &wire::Meta, names: &mut Interner) -> (Name, Name) {
    (
        names.intern(meta.namespace.as_deref().unwrap_or("default")),
        names.intern(meta.name.as_deref().unwrap_or("")),
    )
}

/// A typed object in its wire form (manifests and tests hold typed
/// objects): through JSON, as the API server would send it.
fn typed_to_wire<T: serde::Serialize, W: serde::de::DeserializeOwned + Default>(typed: &T) -> W {
    serde_json::to_value(typed)
        .and_then(serde_json::from_value)
        .unwrap_or_default()
}

fn decode<W: serde::de::DeserializeOwned>(
    kind: &'static str,
    json: &str,
) -> Result<W, DecodeError> {
    serde_json::from_str(json).map_err(|source| {
        let (namespace, name) = json_names(json);
        DecodeError {
            kind,
            namespace,
            name,
            source,
        }
    })
}

/// A Service's cluster IPs (`clusterIPs`, else `clusterIP`); `None` for a
/// headless one.
fn cluster_ips(
    spec: &wire::ServiceSpec,
    type_: ServiceType,
    issues: &mut Vec<String>,
) -> Option<Vec<Ipv4Addr>> {
    let strings: Vec<&String> = match &spec.cluster_ips {
        Some(ips) if !ips.is_empty() => ips.iter().collect(),
        _ => spec.cluster_ip.iter().collect(),
    };
    if strings.iter().any(|ip| ip.as_str() == "None") {
        return None;
    }
    if strings.iter().all(|ip| ip.is_empty()) && type_ != ServiceType::ExternalName {
        issues.push(
            "no clusterIP allocated (a manifest-directory Service must set spec.clusterIP)".into(),
        );
    }
    Some(ipv4s(
        strings.into_iter().filter(|ip| !ip.is_empty()),
        "clusterIP",
        issues,
    ))
}

/// The load-balancer IPs a Service's status carries. Whatever the type:
/// kube-proxy programs every VIP-mode ingress IP (`newBaseServiceInfo`);
/// with ipMode Proxy the load balancer delivers to the node, not to the
/// VIP, and kube-proxy does not program the IP.
fn load_balancer_ips(
    status: Option<&wire::ServiceStatus>,
    type_: ServiceType,
    issues: &mut Vec<String>,
) -> Vec<Ipv4Addr> {
    if type_ == ServiceType::ExternalName {
        return Vec::new();
    }
    let ingress = status
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    let ips: Vec<&String> = ingress
        .into_iter()
        .flatten()
        .filter(|i| i.ip_mode.as_deref() != Some("Proxy"))
        .filter_map(|i| i.ip.as_ref())
        .filter(|ip| !ip.is_empty())
        .collect();
    ipv4s(ips.into_iter(), "load balancer ingress IP", issues)
}

/// One Service port, or `None` (and an issue) when netlb cannot serve it.
fn service_port(
    port: &wire::ServicePort,
    type_: ServiceType,
    names: &mut Interner,
    issues: &mut Vec<String>,
) -> Option<ServicePortObject> {
    let protocol = port.protocol.as_deref().unwrap_or("TCP");
    let port_name = port.name.as_deref().unwrap_or("");
    if protocol == "SCTP" {
        issues.push(format!(
            "port {port_name:?} {}/SCTP: SCTP is not supported by netlb",
            port.port
        ));
        return None;
    }
    if protocol != "TCP" && protocol != "UDP" {
        issues.push(format!("port {port_name:?}: unknown protocol {protocol:?}"));
        return None;
    }
    let Some(number) = port_number(port.port) else {
        issues.push(format!("port {port_name:?}: invalid port {}", port.port));
        return None;
    };
    let node_port = match (type_, port.node_port) {
        (ServiceType::NodePort | ServiceType::LoadBalancer, Some(p)) => match port_number(p) {
            Some(p) => Some(p),
            None if p != 0 => {
                issues.push(format!("port {port_name:?}: invalid nodePort {p}"));
                None
            }
            None => None,
        },
        _ => None,
    };
    Some(ServicePortObject {
        name: names.intern(port_name),
        protocol: names.intern(protocol),
        port: number,
        node_port,
    })
}

impl ServiceObject {
    /// The lean form of a typed Service.
    pub fn from_service(svc: &Service, names: &mut Interner) -> Self {
        Self::from_wire(typed_to_wire(svc), names)
    }

    /// The lean form of a Service as the API sends it.
    pub fn from_wire(svc: wire::Service, names: &mut Interner) -> Self {
        let (namespace, name) = meta_names(&svc.metadata, names);
        let mut issues = Vec::new();
        if svc.metadata.name.is_none() {
            issues.push("no metadata.name".into());
        }
        let proxy = proxy_label(svc.metadata.labels.as_ref(), names);
        let spec = svc.spec.unwrap_or_default();
        let type_ = match spec.type_.as_deref() {
            Some("NodePort") => ServiceType::NodePort,
            Some("LoadBalancer") => ServiceType::LoadBalancer,
            Some("ExternalName") => ServiceType::ExternalName,
            _ => ServiceType::ClusterIp,
        };
        let cluster_ips = cluster_ips(&spec, type_, &mut issues);
        let external_ips = ipv4s(
            spec.external_ips.iter().flatten(),
            "externalIP",
            &mut issues,
        );
        let load_balancer_ips = load_balancer_ips(svc.status.as_ref(), type_, &mut issues);
        let source_ranges = ipv4_cidrs(
            spec.load_balancer_source_ranges.iter().flatten(),
            &mut issues,
        );
        let session_affinity_timeout =
            (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
                spec.session_affinity_config
                    .as_ref()
                    .and_then(|c| c.client_ip.as_ref())
                    .and_then(|c| c.timeout_seconds)
                    .map(|t| t.max(0) as u32)
                    .unwrap_or(10_800)
            });
        let ports = spec
            .ports
            .iter()
            .flatten()
            .filter_map(|port| service_port(port, type_, names, &mut issues))
            .collect();
        Self {
            namespace,
            name,
            proxy,
            type_,
            cluster_ips,
            external_ips,
            load_balancer_ips,
            internal_policy_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
            external_policy_local: spec.external_traffic_policy.as_deref() == Some("Local"),
            health_check_node_port: spec.health_check_node_port.and_then(port_number),
            session_affinity_timeout,
            source_ranges,
            ports,
            issues,
        }
    }

    /// Decodes one Service from its JSON text.
    pub fn from_json(json: &str, names: &mut Interner) -> Result<Self, DecodeError> {
        Ok(Self::from_wire(decode("Service", json)?, names))
    }
}

impl SliceObject {
    /// The lean form of a typed EndpointSlice.
    pub fn from_slice(slice: &EndpointSlice, names: &mut Interner) -> Self {
        Self::from_wire(typed_to_wire(slice), names)
    }

    /// The lean form of an EndpointSlice as the API sends it.
    pub fn from_wire(slice: wire::EndpointSlice, names: &mut Interner) -> Self {
        let (namespace, name) = meta_names(&slice.metadata, names);
        let labels = slice.metadata.labels.as_ref();
        let mut issues = Vec::new();
        let ports = slice
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePort {
                name: p.name.as_deref().map(|n| names.intern(n)),
                protocol: names.intern(p.protocol.as_deref().unwrap_or("TCP")),
                port: p.port.and_then(port_number),
            })
            .collect();
        let mut endpoints = Vec::new();
        for ep in slice.endpoints.iter().flatten() {
            let Some(first) = ep.addresses.first() else {
                continue;
            };
            let address = match first.parse::<Ipv4Addr>() {
                Ok(a) => a,
                Err(_) => {
                    if slice.address_type == "IPv4" {
                        issues.push(format!(
                            "ignoring endpoint with invalid IPv4 address {first:?}"
                        ));
                    }
                    continue;
                }
            };
            let conditions = ep.conditions.as_ref();
            let hints = ep.hints.as_ref();
            endpoints.push(EndpointObject {
                address,
                ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                node_name: ep.node_name.as_deref().map(|n| names.intern(n)),
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| names.intern(&z.name)).collect())
                    .unwrap_or_default(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| names.intern(&n.name)).collect())
                    .unwrap_or_default(),
            });
        }
        let trigger_time = slice
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.trigger_time.as_deref())
            .and_then(|t| k8s_openapi::jiff::Timestamp::from_str(t).ok())
            .and_then(|t| {
                let nanos = t.as_nanosecond();
                (nanos > 0).then(|| SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos as u64))
            });
        Self {
            namespace,
            name,
            proxy: proxy_label(labels, names),
            service: labels
                .and_then(|l| l.service_name.as_deref())
                .map(|s| names.intern(s)),
            ipv4: slice.address_type == "IPv4",
            ports,
            endpoints,
            trigger_time,
            issues,
        }
    }

    /// Decodes one EndpointSlice from its JSON text.
    pub fn from_json(json: &str, names: &mut Interner) -> Result<Self, DecodeError> {
        Ok(Self::from_wire(decode("EndpointSlice", json)?, names))
    }
}

impl NodeObject {
    pub fn from_node(node: &k8s_openapi::api::core::v1::Node, names: &mut Interner) -> Self {
        Self::from_wire(typed_to_wire(node), names)
    }

    pub fn from_wire(node: wire::Node, names: &mut Interner) -> Self {
        const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";
        let tainted = node
            .spec
            .as_ref()
            .and_then(|s| s.taints.as_ref())
            .is_some_and(|t| t.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
        Self {
            zone: node
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.zone.as_deref())
                .map(|z| names.intern(z)),
            deleting: node.metadata.deletion_timestamp.is_some() || tainted,
        }
    }

    pub fn from_json(json: &str, names: &mut Interner) -> Result<Self, DecodeError> {
        Ok(Self::from_wire(decode("Node", json)?, names))
    }
}

/// The metadata of an object's JSON, the rest unread (default when it
/// does not decode).
pub fn only_meta(json: &str) -> wire::Meta {
    #[derive(serde::Deserialize, Default)]
    #[serde(default)]
    struct OnlyMeta {
        metadata: wire::Meta,
    }
    serde_json::from_str::<OnlyMeta>(json)
        .unwrap_or_default()
        .metadata
}

/// Namespace and name of an object's JSON, for messages about it (only
/// the metadata is read).
pub fn json_names(json: &str) -> (String, String) {
    let meta = only_meta(json);
    (
        meta.namespace.unwrap_or_else(|| "default".into()),
        meta.name.unwrap_or_default(),
    )
}

/// Lean objects for tests and benchmarks: a ClusterIP Service with one TCP
/// port, and a slice of ready endpoints for it.
pub mod fixtures {
    use std::net::Ipv4Addr;

    use super::*;

    pub fn cluster_ip_service(
        names: &mut Interner,
        namespace: &str,
        name: &str,
        vip: Ipv4Addr,
        port_name: &str,
        port: u16,
    ) -> ServiceObject {
        ServiceObject {
            namespace: names.intern(namespace),
            name: names.intern(name),
            proxy: ProxyLabel::None,
            type_: ServiceType::ClusterIp,
            cluster_ips: Some(vec![vip]),
            external_ips: vec![],
            load_balancer_ips: vec![],
            internal_policy_local: false,
            external_policy_local: false,
            health_check_node_port: None,
            session_affinity_timeout: None,
            source_ranges: vec![],
            ports: vec![ServicePortObject {
                name: names.intern(port_name),
                protocol: names.intern("TCP"),
                port,
                node_port: None,
            }],
            issues: vec![],
        }
    }

    /// A slice of Service `service` with TCP port `port_name` `port` and a
    /// ready endpoint per address (no node).
    pub fn ready_slice(
        names: &mut Interner,
        namespace: &str,
        name: &str,
        service: &str,
        (port_name, port): (&str, u16),
        addresses: impl IntoIterator<Item = Ipv4Addr>,
    ) -> SliceObject {
        SliceObject {
            namespace: names.intern(namespace),
            name: names.intern(name),
            proxy: ProxyLabel::None,
            service: Some(names.intern(service)),
            ipv4: true,
            ports: vec![SlicePort {
                name: Some(names.intern(port_name)),
                protocol: names.intern("TCP"),
                port: Some(port),
            }],
            endpoints: addresses
                .into_iter()
                .map(|address| EndpointObject {
                    address,
                    ready: true,
                    serving: true,
                    terminating: false,
                    node_name: None,
                    zone_hints: vec![],
                    node_hints: vec![],
                })
                .collect(),
            trigger_time: None,
            issues: vec![],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_realistic_service_decodes_to_what_the_model_needs() {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {
                "name": "web", "namespace": "shop", "resourceVersion": "12",
                "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
                "managedFields": [{"manager": "kubectl", "operation": "Apply", "fieldsType": "FieldsV1", "fieldsV1": {"f:spec": {}}}],
            },
            "spec": {
                "type": "LoadBalancer", "clusterIP": "10.96.0.7", "clusterIPs": ["10.96.0.7", "fd00::7"],
                "externalIPs": ["198.51.100.1", "not-an-ip"],
                "externalTrafficPolicy": "Local", "healthCheckNodePort": 32000,
                "ports": [
                    {"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080},
                    {"name": "sctp", "protocol": "SCTP", "port": 9},
                ],
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.9"}, {"ip": "203.0.113.8", "ipMode": "Proxy"}]}},
        });
        let mut names = Interner::default();
        let svc = ServiceObject::from_json(&json.to_string(), &mut names).unwrap();
        assert_eq!(&*svc.namespace, "shop");
        assert_eq!(svc.cluster_ips, Some(vec![Ipv4Addr::new(10, 96, 0, 7)]));
        assert_eq!(svc.external_ips, vec![Ipv4Addr::new(198, 51, 100, 1)]);
        assert_eq!(svc.load_balancer_ips, vec![Ipv4Addr::new(203, 0, 113, 9)]);
        assert_eq!(svc.ports.len(), 1);
        assert_eq!(svc.ports[0].node_port, Some(30080));
        assert_eq!(svc.health_check_node_port, Some(32000));
        assert_eq!(svc.issues.len(), 2, "{:?}", svc.issues);
    }

    #[test]
    fn service_addresses_with_leading_zeros_are_decimal() {
        assert_eq!(
            parse_ip_sloppy("10.096.000.010").unwrap(),
            std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10))
        );
        assert!(parse_ip_sloppy("10.96.0.256").is_err());
        assert!(parse_ip_sloppy("10.96.0").is_err());
        assert!(parse_ip_sloppy("10.96.0.0x1").is_err());
        assert_eq!(
            parse_ip_sloppy("fd00::1").unwrap(),
            "fd00::1".parse::<std::net::IpAddr>().unwrap()
        );
    }

    #[test]
    fn source_ranges_are_taken_as_kube_proxy_takes_them() {
        let json = serde_json::json!({
            "metadata": {"name": "lb", "namespace": "x"},
            "spec": {
                "type": "ClusterIP", "clusterIP": "10.96.0.8",
                "ports": [{"port": 80}],
                // Padding trimmed, the network masked, IPv6 left to the
                // other family, nonsense reported, duplicates dropped.
                "loadBalancerSourceRanges": [" 203.0.113.77/24 ", "2001:db8::/32", "10.0.0.0/8", "10.0.0.0/8", "nonsense"],
            },
            // Ingress IPs count whatever the type (kube-proxy programs them).
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.4"}]}},
        });
        let svc = ServiceObject::from_json(&json.to_string(), &mut Interner::default()).unwrap();
        assert_eq!(
            svc.source_ranges,
            vec![
                (Ipv4Addr::new(10, 0, 0, 0), 8),
                (Ipv4Addr::new(203, 0, 113, 0), 24)
            ]
        );
        assert_eq!(
            svc.issues,
            vec!["ignoring invalid loadBalancerSourceRange \"nonsense\"".to_owned()]
        );
        assert_eq!(svc.load_balancer_ips, vec![Ipv4Addr::new(198, 51, 100, 4)]);
    }

    #[test]
    fn an_object_that_is_not_a_service_is_an_error_for_itself_only() {
        let json = serde_json::json!({
            "metadata": {"name": "bad", "namespace": "x"},
            "spec": {"ports": "not a list"},
        });
        let err =
            ServiceObject::from_json(&json.to_string(), &mut Interner::default()).unwrap_err();
        assert_eq!((err.namespace.as_str(), err.name.as_str()), ("x", "bad"));
    }

    #[test]
    fn names_are_shared() {
        let mut names = Interner::default();
        let a = names.intern("default");
        let b = names.intern("default");
        assert!(Arc::ptr_eq(&a, &b));
        drop((a, b));
        names.shrink();
        assert!(names.is_empty());
    }
}
