//! Manifest-directory source: Service and EndpointSlice objects from YAML or
//! JSON files, parsed with the k8s-openapi types.

use std::{
    fmt,
    hash::{Hash as _, Hasher as _},
    io,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Service, ServiceSpec},
    discovery::v1::EndpointSlice,
};

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("cannot read manifest directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read manifest file {path}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// An object that could not be used, with where it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectError {
    pub file: PathBuf,
    /// Document index within the file (0-based).
    pub index: usize,
    pub kind: String,
    pub namespace: String,
    pub name: String,
    pub message: String,
}

impl fmt::Display for ObjectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} document {}: {} {}/{}: {}",
            self.file.display(),
            self.index,
            if self.kind.is_empty() {
                "object"
            } else {
                &self.kind
            },
            self.namespace,
            self.name,
            self.message
        )
    }
}

/// Everything read from a directory.
#[derive(Clone, Debug, Default)]
pub struct ManifestSnapshot {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub errors: Vec<ObjectError>,
    /// Documents of other kinds (Deployments, ...), ignored.
    pub skipped: usize,
    /// What [`allocate`] filled in, one line each.
    pub allocations: Vec<String>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn manifest_files(dir: &Path) -> Result<Vec<PathBuf>, ManifestError> {
    let entries = std::fs::read_dir(dir).map_err(|source| ManifestError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut files: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    files.sort();
    Ok(files)
}

/// A cheap change detector: names, sizes and modification times.
pub fn fingerprint(dir: &Path) -> Result<u64, ManifestError> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for file in manifest_files(dir)? {
        file.hash(&mut hasher);
        if let Ok(meta) = std::fs::metadata(&file) {
            meta.len().hash(&mut hasher);
            if let Ok(modified) = meta.modified() {
                modified.hash(&mut hasher);
            }
        }
    }
    Ok(hasher.finish())
}

fn field(value: &serde_json::Value, pointer: &str) -> String {
    value
        .pointer(pointer)
        .and_then(|v| v.as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Reads every manifest file of `dir`. A document that does not parse is
/// recorded in `errors`; the others still load.
pub fn load_dir(dir: &Path) -> Result<ManifestSnapshot, ManifestError> {
    let mut snapshot = ManifestSnapshot::default();
    for file in manifest_files(dir)? {
        let text = std::fs::read_to_string(&file).map_err(|source| ManifestError::ReadFile {
            path: file.clone(),
            source,
        })?;
        load_text(&file, &text, &mut snapshot);
    }
    snapshot.allocations = allocate(&mut snapshot.services);
    Ok(snapshot)
}

/// FNV-1a: a hash that is the same in every build, so every agent reading
/// one directory allocates the same addresses and ports.
fn stable_hash(parts: &[&str]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for part in parts {
        for b in part.bytes().chain([0]) {
            h ^= u32::from(b);
            h = h.wrapping_mul(0x0100_0193);
        }
    }
    h
}

/// First free value from `start`, probing upwards and wrapping in `range`.
fn probe(
    range: std::ops::RangeInclusive<u32>,
    start: u32,
    used: &mut std::collections::BTreeSet<u32>,
) -> Option<u32> {
    let (lo, hi) = (*range.start(), *range.end());
    let size = hi - lo + 1;
    (0..size)
        .map(|i| lo + (start % size + i) % size)
        .find(|v| used.insert(*v))
}

/// Cluster IPs the manifest source allocates: the upper half of
/// 10.96.0.0/16, like the API server's dynamic band (explicit addresses
/// are usually chosen low).
const MANIFEST_CLUSTER_IPS: std::ops::RangeInclusive<u32> = 0x0a60_8001..=0x0a60_fffe;
/// The default NodePort range.
const NODE_PORTS: std::ops::RangeInclusive<u32> = 30_000..=32_767;

/// Does what the API server does on create for Services that leave it
/// open: a cluster IP, node ports for NodePort and LoadBalancer ports, a
/// health-check node port for LoadBalancer Services with a Local external
/// policy. Values are derived from the Service's name, so every agent
/// reading the same directory agrees without talking to the others; values
/// set in the manifests are kept and never handed out twice. Returns one
/// line per allocation, for logs.
pub fn allocate(services: &mut [Service]) -> Vec<String> {
    let mut alloc = Allocator::default();
    for spec in services.iter().filter_map(|s| s.spec.as_ref()) {
        alloc.reserve(spec);
    }
    let mut order: Vec<usize> = (0..services.len()).collect();
    let key = |svc: &Service| {
        (
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        )
    };
    order.sort_by_key(|i| key(&services[*i]));
    for i in order {
        let (ns, name) = key(&services[i]);
        if let Some(spec) = services[i].spec.as_mut() {
            alloc.fill(&ns, &name, spec);
        }
    }
    alloc.log
}

/// What the manifests already use, and what was handed out.
#[derive(Default)]
struct Allocator {
    used_ips: std::collections::BTreeSet<u32>,
    used_ports: std::collections::BTreeSet<u32>,
    log: Vec<String>,
}

impl Allocator {
    /// Values set in a manifest are never handed out.
    fn reserve(&mut self, spec: &ServiceSpec) {
        for ip in spec
            .cluster_ip
            .iter()
            .chain(spec.cluster_ips.iter().flatten())
        {
            if let Ok(ip) = ip.parse::<std::net::Ipv4Addr>() {
                self.used_ips.insert(u32::from(ip));
            }
        }
        for port in spec.ports.iter().flatten() {
            if let Some(p) = port.node_port.filter(|p| *p > 0) {
                self.used_ports.insert(p as u32);
            }
        }
        if let Some(p) = spec.health_check_node_port.filter(|p| *p > 0) {
            self.used_ports.insert(p as u32);
        }
    }

    /// What one Service leaves open, from values derived from its name.
    fn fill(&mut self, ns: &str, name: &str, spec: &mut ServiceSpec) {
        let type_ = spec.type_.clone().unwrap_or_else(|| "ClusterIP".into());
        if type_ == "ExternalName" {
            return;
        }
        let unset = spec.cluster_ip.as_deref().is_none_or(str::is_empty)
            && spec.cluster_ips.as_ref().is_none_or(|ips| ips.is_empty());
        if unset {
            let start = stable_hash(&[ns, name]);
            if let Some(ip) = probe(MANIFEST_CLUSTER_IPS, start, &mut self.used_ips) {
                let ip = std::net::Ipv4Addr::from(ip).to_string();
                self.log.push(format!("{ns}/{name}: clusterIP {ip}"));
                spec.cluster_ip = Some(ip);
            }
        }
        if type_ == "NodePort" || type_ == "LoadBalancer" {
            for port in spec.ports.iter_mut().flatten() {
                if port.node_port.is_some_and(|p| p > 0) {
                    continue;
                }
                let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
                let start = stable_hash(&[ns, name, &port.port.to_string(), &protocol]);
                if let Some(p) = probe(NODE_PORTS, start, &mut self.used_ports) {
                    self.log.push(format!(
                        "{ns}/{name}: port {}/{protocol} nodePort {p}",
                        port.port
                    ));
                    port.node_port = Some(p as i32);
                }
            }
        }
        if type_ == "LoadBalancer"
            && spec.external_traffic_policy.as_deref() == Some("Local")
            && spec.health_check_node_port.is_none_or(|p| p <= 0)
        {
            let start = stable_hash(&[ns, name, "healthCheckNodePort"]);
            if let Some(p) = probe(NODE_PORTS, start, &mut self.used_ports) {
                self.log
                    .push(format!("{ns}/{name}: healthCheckNodePort {p}"));
                spec.health_check_node_port = Some(p as i32);
            }
        }
    }
}

/// Parses one file's text (YAML, possibly multi-document; JSON is YAML).
pub fn load_text(file: &Path, text: &str, snapshot: &mut ManifestSnapshot) {
    let mut reader = text.as_bytes();
    for (index, document) in serde_saphyr::read::<_, serde_json::Value>(&mut reader).enumerate() {
        let value = match document {
            Ok(serde_json::Value::Null) => continue, // empty document
            Ok(value) => value,
            Err(e) => {
                snapshot.errors.push(ObjectError {
                    file: file.to_owned(),
                    index,
                    kind: String::new(),
                    namespace: String::new(),
                    name: String::new(),
                    message: format!("not valid YAML: {e}"),
                });
                // A syntax error ends the stream: later documents are lost.
                break;
            }
        };
        add_object(file, index, value, snapshot);
    }
}

fn add_object(
    file: &Path,
    index: usize,
    value: serde_json::Value,
    snapshot: &mut ManifestSnapshot,
) {
    let api_version = field(&value, "/apiVersion");
    let kind = field(&value, "/kind");
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = value.get("items").and_then(|i| i.as_array()) {
            for item in items {
                add_object(file, index, item.clone(), snapshot);
            }
        }
        return;
    }
    let error = |message: String| ObjectError {
        file: file.to_owned(),
        index,
        kind: kind.clone(),
        namespace: field(&value, "/metadata/namespace"),
        name: field(&value, "/metadata/name"),
        message,
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "Service") => match serde_json::from_value::<Service>(value.clone()) {
            Ok(mut svc) => {
                svc.metadata
                    .namespace
                    .get_or_insert_with(|| "default".into());
                snapshot.services.push(svc);
            }
            Err(e) => snapshot.errors.push(error(e.to_string())),
        },
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            match serde_json::from_value::<EndpointSlice>(value.clone()) {
                Ok(mut slice) => {
                    slice
                        .metadata
                        .namespace
                        .get_or_insert_with(|| "default".into());
                    snapshot.endpoint_slices.push(slice);
                }
                Err(e) => snapshot.errors.push(error(e.to_string())),
            }
        }
        _ => snapshot.skipped += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_fills_what_an_api_server_would_and_is_deterministic() {
        let text = r#"
apiVersion: v1
kind: Service
metadata:
  name: nginx-external-service
spec:
  type: LoadBalancer
  externalTrafficPolicy: Local
  selector:
    app.kubernetes.io/name: nginx
  ports:
    - protocol: TCP
      port: 80
      targetPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: fixed
spec:
  type: NodePort
  clusterIP: 10.96.0.10
  ports:
    - port: 53
      protocol: UDP
      nodePort: 30053
---
apiVersion: v1
kind: Service
metadata:
  name: plain
spec:
  ports:
    - port: 80
"#;
        let snapshot = |reverse: bool| {
            let mut s = ManifestSnapshot::default();
            load_text(Path::new("t.yaml"), text, &mut s);
            if reverse {
                s.services.reverse();
            }
            let log = allocate(&mut s.services);
            s.services.sort_by_key(|svc| svc.metadata.name.clone());
            (s.services, log)
        };
        let (services, log) = snapshot(false);
        let (again, _) = snapshot(true);
        assert_eq!(services, again, "allocation depends on input order");
        let spec = |name: &str| {
            services
                .iter()
                .find(|s| s.metadata.name.as_deref() == Some(name))
                .and_then(|s| s.spec.clone())
                .unwrap()
        };
        let lb = spec("nginx-external-service");
        let ip: std::net::Ipv4Addr = lb.cluster_ip.as_deref().unwrap().parse().unwrap();
        assert!(MANIFEST_CLUSTER_IPS.contains(&u32::from(ip)), "{ip}");
        let node_port = lb.ports.as_ref().unwrap()[0].node_port.unwrap();
        let hc = lb.health_check_node_port.unwrap();
        assert!((30000..=32767).contains(&node_port));
        assert!((30000..=32767).contains(&hc));
        assert_ne!(node_port, hc);
        assert_ne!(node_port, 30053);
        // Explicit values stay; ClusterIP Services get no node port.
        let fixed = spec("fixed");
        assert_eq!(fixed.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(fixed.ports.unwrap()[0].node_port, Some(30053));
        let plain = spec("plain");
        assert!(plain.cluster_ip.is_some());
        assert_eq!(plain.ports.unwrap()[0].node_port, None);
        assert_eq!(log.len(), 4, "{log:?}");
    }

    #[test]
    fn node_port_allocation_never_repeats_when_the_range_is_crowded() {
        let mut used = std::collections::BTreeSet::new();
        for p in 30000..32767u32 {
            used.insert(p);
        }
        // One port left: every start finds it, then none is left.
        assert_eq!(probe(NODE_PORTS, 12345, &mut used), Some(32767));
        assert_eq!(probe(NODE_PORTS, 1, &mut used), None);
    }

    fn load(text: &str) -> ManifestSnapshot {
        let mut s = ManifestSnapshot::default();
        load_text(Path::new("test.yaml"), text, &mut s);
        s
    }

    #[test]
    fn kubernetes_docs_service_and_slice() {
        let s = load(
            r#"
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - protocol: TCP
      port: 80
      targetPort: 9376
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: my-service-abc12
  labels:
    kubernetes.io/service-name: my-service
addressType: IPv4
ports:
  - name: ""
    protocol: TCP
    port: 9376
endpoints:
  - addresses: ["10.244.0.11"]
    conditions: {ready: true}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: app}
"#,
        );
        assert_eq!(s.services.len(), 1);
        assert_eq!(s.services[0].metadata.namespace.as_deref(), Some("default"));
        assert_eq!(s.endpoint_slices.len(), 1);
        assert_eq!(s.skipped, 1);
        assert!(s.errors.is_empty(), "{:?}", s.errors);
    }

    #[test]
    fn lists_and_bad_documents() {
        let s = load(
            r#"
apiVersion: v1
kind: List
items:
  - apiVersion: v1
    kind: Service
    metadata: {name: a, namespace: ns1}
    spec: {ports: [{port: 80}]}
  - apiVersion: v1
    kind: Service
    metadata: {name: b}
    spec: {ports: "not a list"}
---
apiVersion: v1
kind: Service
metadata: {name: c}
spec: {clusterIP: 10.96.0.3, ports: [{port: 53, protocol: UDP}]}
"#,
        );
        let names: Vec<_> = s
            .services
            .iter()
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        assert_eq!(names, ["a", "c"]);
        assert_eq!(s.errors.len(), 1);
        assert_eq!(s.errors[0].name, "b");
        assert!(
            s.errors[0].to_string().contains("Service /b"),
            "{}",
            s.errors[0]
        );
    }

    #[test]
    fn directory_errors_and_fingerprint() {
        let dir = std::env::temp_dir().join(format!("netlb-manifests-{}", std::process::id()));
        assert!(matches!(load_dir(&dir), Err(ManifestError::ReadDir { .. })));
        std::fs::create_dir_all(&dir).unwrap();
        let before = fingerprint(&dir).unwrap();
        std::fs::write(
            dir.join("svc.yaml"),
            "apiVersion: v1\nkind: Service\nmetadata: {name: x}\n",
        )
        .unwrap();
        std::fs::write(dir.join("notes.txt"), "ignored").unwrap();
        let after = fingerprint(&dir).unwrap();
        assert_ne!(before, after);
        assert_eq!(load_dir(&dir).unwrap().services.len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
