//! A TEST DOUBLE of kube-apiserver: NOT an API server. It speaks the parts of
//! the real list/watch protocol that netlb-agent's watchers use, over plain
//! HTTP, so the real agent process can be driven through an ordinary
//! kubeconfig in tests. No registry this project installs from ships
//! kube-apiserver, hence this double.
//!
//! What it implements, following the real API's semantics:
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/api/v1/nodes` (cluster-wide) and their `/namespaces/{ns}/` forms.
//! - Lists with `resourceVersion` in the list metadata, pagination with
//!   `limit` and `continue` (a consistent snapshot across pages),
//!   `fieldSelector=metadata.name=...` and `labelSelector` (`key`, `!key`,
//!   `key=value`, `key!=value`, `key in (...)`, `key notin (...)`). A watch
//!   with a label selector sees an object that stops matching as `DELETED`
//!   and one that starts matching as `ADDED`, as the real watch cache does.
//! - Watches (`watch=1`) from a `resourceVersion`, streamed as chunked JSON
//!   lines of `ADDED`/`MODIFIED`/`DELETED`/`BOOKMARK` events
//!   (`allowWatchBookmarks`), ended after `timeoutSeconds`; a watch or list
//!   from a compacted resourceVersion is answered `410 Gone` (an `ERROR`
//!   event with a `Status` for watches, as the real server does).
//! - Objects get `metadata.resourceVersion`, `uid`, `creationTimestamp`, and
//!   `generation` like the real server; deletion emits the last state.
//!
//! Fault injection for tests: [`FakeApiServer::drop_watches`] cuts every open
//! watch connection (as a server restart would), [`FakeApiServer::compact`]
//! expires all older resourceVersions (the next resume gets 410 Gone),
//! [`FakeApiServer::set_delay`] slows every response down, and
//! [`FakeApiServer::set_unavailable`] answers 503 like a server that is down,
//! [`FakeApiServer::set_resource_forbidden`] answers 403 as RBAC would, and
//! [`FakeApiServer::stop_serving`] / [`FakeApiServer::serve_again`] close the
//! listening socket (connections refused) and reopen it with the same state,
//! as a restarted API server. [`FakeApiServer::set_throttled`] answers 429
//! with `Retry-After` as API Priority and Fairness does,
//! [`FakeApiServer::set_reject_watches`] serves lists but answers every
//! watch with an error, and [`FakeApiServer::stall_watches`] makes open
//! watches go silent; [`FakeApiServer::requests`] logs when each request
//! came and how it was answered.
//!
//! Objects are stored as their JSON text (served as is) with the few fields
//! selectors need, so that the double holds 100k realistic Services and
//! their slices in about their wire size.

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::{Value, json};

/// The resources the double serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Services,
    EndpointSlices,
    Nodes,
}

impl Resource {
    fn from_path(group_version: &str, plural: &str) -> Option<Self> {
        match (group_version, plural) {
            ("v1", "services") => Some(Self::Services),
            ("discovery.k8s.io/v1", "endpointslices") => Some(Self::EndpointSlices),
            ("v1", "nodes") => Some(Self::Nodes),
            _ => None,
        }
    }

    fn list_kind(self) -> &'static str {
        match self {
            Self::Services => "ServiceList",
            Self::EndpointSlices => "EndpointSliceList",
            Self::Nodes => "NodeList",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlices => "discovery.k8s.io/v1",
            Self::Services | Self::Nodes => "v1",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::Nodes => "Node",
        }
    }

    /// The resource of an object by its `kind`.
    pub fn of(object: &Value) -> Option<Self> {
        match object.get("kind")?.as_str()? {
            "Service" => Some(Self::Services),
            "EndpointSlice" => Some(Self::EndpointSlices),
            "Node" => Some(Self::Nodes),
            _ => None,
        }
    }
}

type Key = (Resource, String, String);

/// An object as stored: its JSON text and what selectors look at.
#[derive(Debug)]
struct Stored {
    text: Box<str>,
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    /// Node ports a Service holds (allocation).
    node_ports: Vec<u64>,
}

impl Stored {
    fn new(value: &Value) -> Arc<Self> {
        let text = |p: &str| {
            value
                .pointer(p)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let labels = value
            .pointer("/metadata/labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                    .collect()
            })
            .unwrap_or_default();
        let mut node_ports: Vec<u64> = value["spec"]["ports"]
            .as_array()
            .map(|ports| {
                ports
                    .iter()
                    .filter_map(|p| p["nodePort"].as_u64())
                    .collect()
            })
            .unwrap_or_default();
        node_ports.extend(value["spec"]["healthCheckNodePort"].as_u64());
        Arc::new(Self {
            text: value.to_string().into_boxed_str(),
            namespace: text("/metadata/namespace"),
            name: text("/metadata/name"),
            labels,
            node_ports,
        })
    }

    fn value(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }
}

/// The items of a paginated list, as of its resourceVersion.
type Snapshot = Arc<Vec<Arc<Stored>>>;

#[derive(Clone)]
struct Event {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    object: Arc<Stored>,
    /// The version it replaced (label-selector transitions).
    previous: Option<Arc<Stored>>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Oldest resourceVersion a watch may resume from.
    compacted: u64,
    objects: BTreeMap<Key, Arc<Stored>>,
    /// In resourceVersion order.
    events: Vec<Event>,
    /// Paginated list snapshots by continue token.
    snapshots: BTreeMap<String, (u64, Snapshot)>,
    next_uid: u64,
    /// Service allocations so far (cluster IPs from 10.96.1.0, node ports
    /// from 30000).
    next_cluster_ip: u32,
    next_node_port: u16,
}

impl State {
    fn node_port_in_use(&self, port: u64) -> bool {
        self.objects.iter().any(|((resource, _, _), obj)| {
            *resource == Resource::Services && obj.node_ports.contains(&port)
        })
    }

    fn allocate_node_port(&mut self) -> u64 {
        loop {
            let port = 30000 + u64::from(self.next_node_port % 2768);
            self.next_node_port = self.next_node_port.wrapping_add(1);
            if !self.node_port_in_use(port) {
                return port;
            }
        }
    }

    /// What the real API server does to a Service on write: defaults
    /// (type, policies, protocol, targetPort) and allocations (cluster IP,
    /// node ports, health-check node port), keeping the earlier object's
    /// allocations; status is a subresource, so a write without one keeps
    /// the current status (the test writes it as a cloud controller would).
    fn default_and_allocate_service(&mut self, object: &mut Value, previous: Option<&Value>) {
        let prev_spec = previous.map(|p| p["spec"].clone()).unwrap_or(Value::Null);
        if object.get("spec").is_none() {
            object["spec"] = json!({});
        }
        let spec = &mut object["spec"];
        if spec["type"].as_str().is_none() {
            spec["type"] = json!("ClusterIP");
        }
        let type_ = spec["type"].as_str().unwrap_or("ClusterIP").to_owned();
        if type_ == "ExternalName" {
            return;
        }
        if spec["clusterIP"].as_str().is_none_or(str::is_empty) {
            let ip = match prev_spec["clusterIP"].as_str() {
                Some(ip) if !ip.is_empty() => ip.to_owned(),
                _ => {
                    self.next_cluster_ip += 1;
                    let n = 256 + self.next_cluster_ip;
                    format!("10.96.{}.{}", n / 256, n % 256)
                }
            };
            spec["clusterIP"] = json!(ip);
        }
        if spec["clusterIPs"].as_array().is_none() {
            spec["clusterIPs"] = json!([spec["clusterIP"].clone()]);
        }
        if spec["internalTrafficPolicy"].as_str().is_none() {
            spec["internalTrafficPolicy"] = json!("Cluster");
        }
        let external = type_ == "NodePort" || type_ == "LoadBalancer";
        if external && spec["externalTrafficPolicy"].as_str().is_none() {
            spec["externalTrafficPolicy"] = json!("Cluster");
        }
        let mut ports: Vec<Value> = spec["ports"].as_array().cloned().unwrap_or_default();
        for port in &mut ports {
            if port["protocol"].as_str().is_none() {
                port["protocol"] = json!("TCP");
            }
            if port.get("targetPort").is_none() {
                port["targetPort"] = port["port"].clone();
            }
            if external && port["nodePort"].as_u64().is_none() {
                let kept = prev_spec["ports"].as_array().and_then(|prev| {
                    prev.iter()
                        .find(|p| p["port"] == port["port"] && p["protocol"] == port["protocol"])
                        .and_then(|p| p["nodePort"].as_u64())
                });
                let node_port = match kept {
                    Some(p) => p,
                    None => self.allocate_node_port(),
                };
                port["nodePort"] = json!(node_port);
            }
        }
        let spec = &mut object["spec"];
        spec["ports"] = json!(ports);
        if type_ == "LoadBalancer"
            && spec["externalTrafficPolicy"] == "Local"
            && spec["healthCheckNodePort"].as_u64().is_none()
        {
            let port = match prev_spec["healthCheckNodePort"].as_u64() {
                Some(p) => p,
                None => self.allocate_node_port(),
            };
            object["spec"]["healthCheckNodePort"] = json!(port);
        }
        if object.get("status").is_none()
            && let Some(status) = previous.and_then(|p| p.get("status"))
        {
            object["status"] = status.clone();
        }
    }
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// Incremented to cut every open watch.
    watch_epoch: AtomicU64,
    delay_ms: AtomicU64,
    unavailable: AtomicBool,
    /// Resources answered with 503 (while the others work).
    unavailable_resources: Mutex<Vec<Resource>>,
    /// Resources answered with 403 Forbidden.
    forbidden_resources: Mutex<Vec<Resource>>,
    /// The listening socket; `None` while stopped.
    listener: Mutex<Option<TcpListener>>,
    /// Watches opened before the latest [`FakeApiServer::stall_watches`]
    /// (epoch below this) stay connected but send nothing.
    stall_epoch: AtomicU64,
    stopped: AtomicBool,
    /// `Retry-After` seconds of the 429 every request gets while set.
    throttled: Mutex<Option<u64>>,
    /// Watch requests answered 500 while set (lists are served).
    reject_watches: AtomicBool,
    /// Every request: when, what, the status code.
    log: Mutex<Vec<RequestRecord>>,
    /// Requests served, by kind ("list"/"watch"), for assertions.
    lists: AtomicU64,
    watches: AtomicU64,
    gone: AtomicU64,
}

/// One request the double answered.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub at: Instant,
    pub resource: Option<Resource>,
    pub watch: bool,
    /// The HTTP status it got (200 for a watch that was served).
    pub status: u16,
}

/// A running test double. Dropping it stops accepting connections.
pub struct FakeApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
}

#[derive(Debug, thiserror::Error)]
pub enum FakeApiError {
    #[error("object has no kind the double serves: {object}")]
    UnknownKind { object: String },
    #[error("object has no metadata.name")]
    NoName,
    #[error("listener")]
    Listener {
        #[source]
        source: std::io::Error,
    },
}

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    guard(&shared.state)
}

impl FakeApiServer {
    /// Serves on `listener` (bind it where the agent can reach it, e.g. on
    /// 127.0.0.1 inside the agent's network namespace).
    pub fn start(listener: TcpListener) -> Result<Self, FakeApiError> {
        let addr = listener
            .local_addr()
            .map_err(|source| FakeApiError::Listener { source })?;
        // Non-blocking before the accept loop sees it: it accepts while
        // holding the slot's lock.
        listener
            .set_nonblocking(true)
            .map_err(|source| FakeApiError::Listener { source })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1000,
                compacted: 1000,
                ..Default::default()
            }),
            changed: Condvar::new(),
            watch_epoch: AtomicU64::new(0),
            delay_ms: AtomicU64::new(0),
            unavailable: AtomicBool::new(false),
            unavailable_resources: Mutex::new(Vec::new()),
            forbidden_resources: Mutex::new(Vec::new()),
            listener: Mutex::new(Some(listener)),
            stall_epoch: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
            throttled: Mutex::new(None),
            reject_watches: AtomicBool::new(false),
            log: Mutex::new(Vec::new()),
            lists: AtomicU64::new(0),
            watches: AtomicU64::new(0),
            gone: AtomicU64::new(0),
        });
        let accept_shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("fake-apiserver".into())
            .spawn(move || {
                while !accept_shared.stopped.load(Ordering::SeqCst) {
                    let accepted = guard(&accept_shared.listener)
                        .as_ref()
                        .map(TcpListener::accept);
                    match accepted {
                        Some(Ok((stream, _))) => {
                            let _ = stream.set_nonblocking(false);
                            let conn_shared = Arc::clone(&accept_shared);
                            let _ = std::thread::Builder::new()
                                .name("fake-apiserver-conn".into())
                                .spawn(move || serve_connection(stream, &conn_shared));
                        }
                        _ => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
            .map_err(|source| FakeApiError::Listener { source })?;
        Ok(Self { shared, addr })
    }

    /// Stops like a server going down: the listening socket is closed (new
    /// connections are refused) and open watches are cut. The objects and
    /// resourceVersions stay, as in etcd.
    pub fn stop_serving(&self) {
        guard(&self.shared.listener).take();
        self.drop_watches();
    }

    /// Serves again on `listener` (bound to the same address, in the same
    /// network namespace) after [`stop_serving`](Self::stop_serving).
    pub fn serve_again(&self, listener: TcpListener) -> Result<(), FakeApiError> {
        // Non-blocking before the accept loop sees it: it accepts while
        // holding the slot's lock.
        listener
            .set_nonblocking(true)
            .map_err(|source| FakeApiError::Listener { source })?;
        *guard(&self.shared.listener) = Some(listener);
        Ok(())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A kubeconfig pointing at this double.
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        )
    }

    /// Creates or replaces an object (`kind` decides the resource), like an
    /// apply: ADDED for a new object, MODIFIED otherwise. Returns its new
    /// resourceVersion.
    pub fn apply(&self, mut object: Value) -> Result<u64, FakeApiError> {
        let resource = Resource::of(&object).ok_or_else(|| FakeApiError::UnknownKind {
            object: object.to_string(),
        })?;
        let name = object
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .ok_or(FakeApiError::NoName)?
            .to_owned();
        let namespace = if resource == Resource::Nodes {
            String::new()
        } else {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                .unwrap_or("default")
                .to_owned()
        };
        let mut state = lock(&self.shared);
        state.rv += 1;
        let rv = state.rv;
        let key = (resource, namespace.clone(), name);
        let previous_stored = state.objects.get(&key).cloned();
        let previous = previous_stored.as_ref().map(|p| p.value());
        if resource == Resource::Services {
            state.default_and_allocate_service(&mut object, previous.as_ref());
        }
        let meta = object
            .as_object_mut()
            .expect("object")
            .entry("metadata")
            .or_insert_with(|| json!({}));
        if !namespace.is_empty() {
            meta["namespace"] = json!(namespace);
        }
        meta["resourceVersion"] = json!(rv.to_string());
        match &previous {
            Some(prev) => {
                meta["uid"] = prev["metadata"]["uid"].clone();
                meta["creationTimestamp"] = prev["metadata"]["creationTimestamp"].clone();
                let generation = prev["metadata"]["generation"].as_u64().unwrap_or(1) + 1;
                meta["generation"] = json!(generation);
            }
            None => {
                state.next_uid += 1;
                meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012}", state.next_uid));
                meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
                meta["generation"] = json!(1);
            }
        }
        object["apiVersion"] = json!(resource.api_version());
        let kind = if previous.is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        let stored = Stored::new(&object);
        state.objects.insert(key, Arc::clone(&stored));
        state.events.push(Event {
            rv,
            resource,
            kind,
            object: stored,
            previous: previous_stored,
        });
        drop(state);
        self.shared.changed.notify_all();
        Ok(rv)
    }

    /// Deletes an object; returns whether it existed.
    pub fn delete(&self, resource: Resource, namespace: &str, name: &str) -> bool {
        let namespace = if resource == Resource::Nodes {
            ""
        } else {
            namespace
        };
        let mut state = lock(&self.shared);
        let key = (resource, namespace.to_owned(), name.to_owned());
        let Some(stored) = state.objects.remove(&key) else {
            return false;
        };
        state.rv += 1;
        let rv = state.rv;
        let mut object = stored.value();
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        state.events.push(Event {
            rv,
            resource,
            kind: "DELETED",
            object: Stored::new(&object),
            previous: None,
        });
        drop(state);
        self.shared.changed.notify_all();
        true
    }

    /// Cuts every open watch connection without a final chunk, as a server
    /// restart or a network failure would.
    pub fn drop_watches(&self) {
        self.shared.watch_epoch.fetch_add(1, Ordering::SeqCst);
        self.shared.changed.notify_all();
    }

    /// Expires every resourceVersion older than the current one: watches
    /// resuming from them get 410 Gone and must re-list.
    pub fn compact(&self) {
        let mut state = lock(&self.shared);
        state.compacted = state.rv;
        let compacted = state.compacted;
        state.events.retain(|e| e.rv > compacted);
        drop(state);
        self.drop_watches();
    }

    /// Delays every response by `delay`.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    /// Answers every request with 503 while set, and cuts open watches.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.shared.unavailable.store(unavailable, Ordering::SeqCst);
        if unavailable {
            self.drop_watches();
        }
    }

    /// Answers requests for one resource with 503 while set (e.g. Services
    /// list fine, EndpointSlices do not).
    pub fn set_resource_unavailable(&self, resource: Resource, unavailable: bool) {
        let mut list = guard(&self.shared.unavailable_resources);
        list.retain(|r| *r != resource);
        if unavailable {
            list.push(resource);
        }
    }

    /// Answers requests for one resource with 403 Forbidden while set, as
    /// the real server does when RBAC does not grant list and watch.
    pub fn set_resource_forbidden(&self, resource: Resource, forbidden: bool) {
        let mut list = guard(&self.shared.forbidden_resources);
        list.retain(|r| *r != resource);
        if forbidden {
            list.push(resource);
        }
        drop(list);
        if forbidden {
            self.drop_watches();
        }
    }

    /// Every open watch stops sending anything, events and bookmarks alike,
    /// and ignores its timeout, but stays connected: a half-open connection
    /// from the client's side. Watches opened later are served normally.
    pub fn stall_watches(&self) {
        self.shared.stall_epoch.fetch_add(1, Ordering::SeqCst);
    }

    /// Answers every request with `429 Too Many Requests` and a
    /// `Retry-After` of `retry_after_s` while set (API Priority and
    /// Fairness rejecting a flow), and cuts open watches; `None`: served
    /// normally again.
    pub fn set_throttled(&self, retry_after_s: Option<u64>) {
        *guard(&self.shared.throttled) = retry_after_s;
        if retry_after_s.is_some() {
            self.drop_watches();
        }
    }

    /// Serves lists but answers every watch with `500 Internal Server
    /// Error` while set, and cuts open watches.
    pub fn set_reject_watches(&self, reject: bool) {
        self.shared.reject_watches.store(reject, Ordering::SeqCst);
        if reject {
            self.drop_watches();
        }
    }

    /// Every request answered so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        guard(&self.shared.log).clone()
    }

    /// (lists, watches, 410 answers) served so far.
    pub fn request_counts(&self) -> (u64, u64, u64) {
        (
            self.shared.lists.load(Ordering::SeqCst),
            self.shared.watches.load(Ordering::SeqCst),
            self.shared.gone.load(Ordering::SeqCst),
        )
    }

    /// Current objects of a resource.
    pub fn objects(&self, resource: Resource) -> Vec<Value> {
        lock(&self.shared)
            .objects
            .iter()
            .filter(|((r, _, _), _)| *r == resource)
            .map(|(_, v)| v.value())
            .collect()
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.drop_watches();
    }
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 3 <= bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn read_request(stream: &TcpStream) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let target = parts.next()?.to_owned();
    let mut content_length = 0usize;
    for _ in 0..200 {
        let mut header = String::new();
        if reader.read_line(&mut header).ok()? == 0 || header == "\r\n" || header == "\n" {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap_or(0);
        }
    }
    if content_length > 0 {
        let mut body = vec![0u8; content_length.min(1 << 20)];
        std::io::Read::read_exact(&mut reader, &mut body).ok()?;
    }
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let query = query
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect();
    Some(Request {
        method,
        path: path.to_owned(),
        query,
    })
}

fn respond(stream: &TcpStream, status: &str, body: &Value) {
    respond_text(stream, status, &body.to_string());
}

fn respond_text(stream: &TcpStream, status: &str, body: &str) {
    respond_with_headers(stream, status, &[], body);
}

fn respond_with_headers(
    mut stream: &TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &str,
) {
    let extra: String = headers
        .iter()
        .map(|(name, value)| format!("{name}: {value}\r\n"))
        .collect();
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

fn status_object(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

/// `(resource, namespace filter)` of an API path.
fn route(path: &str) -> Option<(Resource, Option<String>)> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group_version, rest) = match segments.as_slice() {
        ["api", "v1", rest @ ..] => ("v1".to_owned(), rest),
        ["apis", group, version, rest @ ..] => (format!("{group}/{version}"), rest),
        _ => return None,
    };
    match rest {
        [plural] => Resource::from_path(&group_version, plural).map(|r| (r, None)),
        ["namespaces", ns, plural] => {
            Resource::from_path(&group_version, plural).map(|r| (r, Some((*ns).to_owned())))
        }
        _ => None,
    }
}

fn matches(object: &Stored, namespace: &Option<String>, query: &BTreeMap<String, String>) -> bool {
    if let Some(ns) = namespace
        && object.namespace != *ns
    {
        return false;
    }
    if let Some(selector) = query.get("labelSelector")
        && !label_selector_matches(selector, &object.labels)
    {
        return false;
    }
    if let Some(selector) = query.get("fieldSelector") {
        for term in selector.split(',').filter(|t| !t.is_empty()) {
            let Some((field, value)) = term.split_once('=') else {
                continue;
            };
            let field = field.trim_end_matches('=');
            let value = value.trim_start_matches('=');
            let actual = match field {
                "metadata.name" => Some(&object.name),
                "metadata.namespace" => Some(&object.namespace),
                _ => None,
            };
            if actual.map(String::as_str) != Some(value) {
                return false;
            }
        }
    }
    true
}

/// Splits a selector at the commas that are not inside `(...)`.
fn selector_terms(selector: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(selector[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(selector[start..].trim());
    terms.into_iter().filter(|t| !t.is_empty()).collect()
}

/// The label selector grammar of `labels.Parse`: `key`, `!key`,
/// `key=value`, `key==value`, `key!=value`, `key in (a,b)`,
/// `key notin (a,b)`; terms are ANDed.
fn label_selector_matches(selector: &str, labels: &BTreeMap<String, String>) -> bool {
    let set = |list: &str| -> Vec<String> {
        list.trim()
            .trim_start_matches('(')
            .trim_end_matches(')')
            .split(',')
            .map(|v| v.trim().to_owned())
            .collect()
    };
    selector_terms(selector).into_iter().all(|term| {
        if let Some(key) = term.strip_prefix('!') {
            return !labels.contains_key(key.trim());
        }
        if let Some((key, value)) = term.split_once("!=") {
            return labels.get(key.trim()).map(String::as_str) != Some(value.trim());
        }
        if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
            return labels.get(key.trim()).map(String::as_str) == Some(value.trim());
        }
        if let Some((key, list)) = term.split_once(" notin ") {
            return labels
                .get(key.trim())
                .is_none_or(|v| !set(list).contains(v));
        }
        if let Some((key, list)) = term.split_once(" in ") {
            return labels
                .get(key.trim())
                .is_some_and(|v| set(list).contains(v));
        }
        labels.contains_key(term)
    })
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = stream.set_nodelay(true);
    let Some(request) = read_request(&stream) else {
        return;
    };
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        std::thread::sleep(Duration::from_millis(delay));
    }
    let watch = matches!(
        request.query.get("watch").map(String::as_str),
        Some("1" | "true")
    );
    let record = |status: u16| {
        guard(&shared.log).push(RequestRecord {
            at: Instant::now(),
            resource: route(&request.path).map(|(r, _)| r),
            watch,
            status,
        });
    };
    match refusal(&request, watch, shared) {
        Err(refusal) => {
            record(refusal.code);
            respond_with_headers(
                &stream,
                refusal.status_line,
                &refusal.headers,
                &refusal.body.to_string(),
            );
        }
        Ok((resource, namespace)) => {
            record(200);
            if watch {
                serve_watch(stream, shared, resource, namespace, &request.query);
            } else {
                serve_list(&stream, shared, resource, namespace, &request.query);
            }
        }
    }
}

/// An error answer: its code, status line, extra headers and Status body.
struct Refusal {
    code: u16,
    status_line: &'static str,
    headers: Vec<(&'static str, String)>,
    body: Value,
}

impl Refusal {
    fn new(code: u16, status_line: &'static str, reason: &str, message: &str) -> Self {
        Self {
            code,
            status_line,
            headers: Vec::new(),
            body: status_object(code, reason, message),
        }
    }
}

/// What the double answers a request with, as a real API server would: the
/// resource and namespace to serve, or why not (in the order the server's
/// filters apply: availability, priority and fairness, method, path,
/// authorization).
fn refusal(
    request: &Request,
    watch: bool,
    shared: &Shared,
) -> Result<(Resource, Option<String>), Refusal> {
    if shared.unavailable.load(Ordering::SeqCst) {
        return Err(Refusal::new(
            503,
            "503 Service Unavailable",
            "ServiceUnavailable",
            "test double set unavailable",
        ));
    }
    if let Some(retry_after) = *guard(&shared.throttled) {
        // As API Priority and Fairness answers: the header, and a Status
        // with the same delay in its details.
        let mut refusal = Refusal::new(
            429,
            "429 Too Many Requests",
            "TooManyRequests",
            "Too many requests, please try again later.",
        );
        refusal.body["details"] = json!({ "retryAfterSeconds": retry_after });
        refusal
            .headers
            .push(("Retry-After", retry_after.to_string()));
        return Err(refusal);
    }
    if watch && shared.reject_watches.load(Ordering::SeqCst) {
        return Err(Refusal::new(
            500,
            "500 Internal Server Error",
            "InternalError",
            "test double: watches rejected",
        ));
    }
    if request.method != "GET" {
        return Err(Refusal::new(
            405,
            "405 Method Not Allowed",
            "MethodNotAllowed",
            "the test double is read-only over HTTP",
        ));
    }
    let Some((resource, namespace)) = route(&request.path) else {
        return Err(Refusal::new(
            404,
            "404 Not Found",
            "NotFound",
            "the server could not find the requested resource",
        ));
    };
    if guard(&shared.forbidden_resources).contains(&resource) {
        return Err(forbidden(&request.path, resource));
    }
    if guard(&shared.unavailable_resources).contains(&resource) {
        return Err(Refusal::new(
            503,
            "503 Service Unavailable",
            "ServiceUnavailable",
            "test double: resource set unavailable",
        ));
    }
    Ok((resource, namespace))
}

/// RBAC's answer to a list of `resource` the agent may not make.
fn forbidden(path: &str, resource: Resource) -> Refusal {
    let plural = path.rsplit('/').next().unwrap_or("");
    let group = match resource.api_version().split_once('/') {
        Some((group, _)) => group,
        None => "",
    };
    let dotted = if group.is_empty() {
        String::new()
    } else {
        format!(".{group}")
    };
    let mut refusal = Refusal::new(
        403,
        "403 Forbidden",
        "Forbidden",
        &format!(
            "{plural}{dotted} is forbidden: User \"system:serviceaccount:kube-system:netlb\" cannot list resource \"{plural}\" in API group \"{group}\" at the cluster scope"
        ),
    );
    refusal.body["details"] = json!({"group": group, "kind": plural});
    refusal
}

/// Locks `m`, also after a panic elsewhere poisoned it.
fn guard<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve_list(
    stream: &TcpStream,
    shared: &Shared,
    resource: Resource,
    namespace: Option<String>,
    query: &BTreeMap<String, String>,
) {
    shared.lists.fetch_add(1, Ordering::SeqCst);
    let limit: usize = query
        .get("limit")
        .and_then(|l| l.parse().ok())
        .filter(|l| *l > 0)
        .unwrap_or(usize::MAX);
    let mut state = lock(shared);
    let (rv, items, offset) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let Some((id, offset)) = token.rsplit_once(':') else {
                drop(state);
                respond(
                    stream,
                    "400 Bad Request",
                    &status_object(400, "BadRequest", "invalid continue token"),
                );
                return;
            };
            let offset: usize = offset.parse().unwrap_or(0);
            match state.snapshots.get(id) {
                Some((rv, items)) if *rv >= state.compacted => (*rv, Arc::clone(items), offset),
                _ => {
                    drop(state);
                    shared.gone.fetch_add(1, Ordering::SeqCst);
                    respond(
                        stream,
                        "410 Gone",
                        &status_object(
                            410,
                            "Expired",
                            "The provided continue parameter is too old",
                        ),
                    );
                    return;
                }
            }
        }
        None => {
            let items: Vec<Arc<Stored>> = state
                .objects
                .range((resource, String::new(), String::new())..)
                .take_while(|((r, _, _), _)| *r == resource)
                .filter(|(_, o)| matches(o, &namespace, query))
                .map(|(_, o)| Arc::clone(o))
                .collect();
            (state.rv, Arc::new(items), 0)
        }
    };
    let end = offset.saturating_add(limit).min(items.len());
    let page: Vec<Arc<Stored>> = items[offset.min(items.len())..end].to_vec();
    let continue_token = if end < items.len() {
        let id = format!("{resource:?}-{rv}-{}", state.snapshots.len());
        state.snapshots.insert(id.clone(), (rv, items));
        format!("{id}:{end}")
    } else {
        String::new()
    };
    drop(state);
    let mut metadata = json!({ "resourceVersion": rv.to_string() });
    if !continue_token.is_empty() {
        metadata["continue"] = json!(continue_token);
    }
    // The stored texts go out as they are, between the list's own fields.
    let mut body = json!({
        "kind": resource.list_kind(),
        "apiVersion": resource.api_version(),
        "metadata": metadata,
    })
    .to_string();
    body.pop(); // the closing brace
    body.push_str(",\"items\":[");
    for (i, item) in page.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&item.text);
    }
    body.push_str("]}");
    respond_text(stream, "200 OK", &body);
}

fn write_chunk(stream: &TcpStream, value: &Value) -> bool {
    write_chunk_text(stream, &value.to_string())
}

fn write_chunk_text(mut stream: &TcpStream, text: &str) -> bool {
    let line = format!("{text}\n");
    // One write per chunk: with several small writes, Nagle's algorithm and
    // the client's delayed ACK would hold events back for tens of ms.
    let chunk = format!("{:x}\r\n{line}\r\n", line.len());
    stream.write_all(chunk.as_bytes()).is_ok() && stream.flush().is_ok()
}

fn serve_watch(
    stream: TcpStream,
    shared: &Shared,
    resource: Resource,
    namespace: Option<String>,
    query: &BTreeMap<String, String>,
) {
    shared.watches.fetch_add(1, Ordering::SeqCst);
    let epoch = shared.watch_epoch.load(Ordering::SeqCst);
    let timeout = Duration::from_secs(
        query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(300u64)
            .min(600),
    );
    let bookmarks = matches!(
        query.get("allowWatchBookmarks").map(String::as_str),
        Some("true" | "1")
    );
    let requested: u64 = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    let mut out = &stream;
    let _ = out.write_all(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
    );
    let Some(mut from) = watch_start(&stream, shared, requested) else {
        return;
    };
    let started = Instant::now();
    let mut last_bookmark = Instant::now();
    let stall_epoch = shared.stall_epoch.load(Ordering::SeqCst);
    loop {
        let cut = shared.watch_epoch.load(Ordering::SeqCst) != epoch
            || shared.stopped.load(Ordering::SeqCst);
        if shared.stall_epoch.load(Ordering::SeqCst) != stall_epoch && !cut {
            // Stalled: never speaks again, until cut.
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        if cut {
            // Cut without the final chunk, like a dying server.
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        if started.elapsed() >= timeout {
            let _ = write!(out, "0\r\n\r\n");
            return;
        }
        let mut state = lock(shared);
        // Events are in resourceVersion order: find the first new one.
        let first = state.events.partition_point(|e| e.rv <= from);
        let pending: Vec<Event> = state.events[first..]
            .iter()
            .filter(|e| e.resource == resource)
            .cloned()
            .collect();
        if pending.is_empty() {
            let current = state.rv;
            let (guard, _) = shared
                .changed
                .wait_timeout(state, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner());
            state = guard;
            drop(state);
            if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
                last_bookmark = Instant::now();
                if !write_chunk(&stream, &bookmark(resource, current)) {
                    return;
                }
                from = from.max(current);
            }
            continue;
        }
        drop(state);
        for event in pending {
            from = event.rv;
            let Some(line) = watch_line(&event, &namespace, query) else {
                continue;
            };
            if !write_chunk_text(&stream, &line) {
                return;
            }
        }
    }
}

/// Where a watch from `requested` starts (0: now); `None` after answering
/// 410 Gone for a version already compacted.
fn watch_start(stream: &TcpStream, shared: &Shared, requested: u64) -> Option<u64> {
    let state = lock(shared);
    if requested == 0 {
        // "Any" version: start from now (the agent always lists first).
        return Some(state.rv);
    }
    if requested >= state.compacted {
        return Some(requested);
    }
    drop(state);
    shared.gone.fetch_add(1, Ordering::SeqCst);
    let gone = status_object(
        410,
        "Expired",
        &format!("too old resource version: {requested}"),
    );
    let _ = write_chunk(stream, &json!({"type": "ERROR", "object": gone}));
    let mut out = stream;
    let _ = write!(out, "0\r\n\r\n");
    None
}

fn bookmark(resource: Resource, rv: u64) -> Value {
    json!({
        "type": "BOOKMARK",
        "object": {
            "kind": resource.kind(),
            "apiVersion": resource.api_version(),
            "metadata": { "resourceVersion": rv.to_string() },
        },
    })
}

/// The watch cache's view of an event through a selector: an object that
/// stops matching is deleted, one that starts matching is added; `None`
/// when the watch does not see it.
fn watch_line(
    event: &Event,
    namespace: &Option<String>,
    query: &BTreeMap<String, String>,
) -> Option<String> {
    let now = matches(&event.object, namespace, query);
    let before = event
        .previous
        .as_ref()
        .is_some_and(|p| matches(p, namespace, query));
    Some(match (event.kind, before, now) {
        (_, _, true) if event.kind == "DELETED" => {
            format!("{{\"type\":\"DELETED\",\"object\":{}}}", event.object.text)
        }
        ("MODIFIED", true, true) => {
            format!("{{\"type\":\"MODIFIED\",\"object\":{}}}", event.object.text)
        }
        ("ADDED" | "MODIFIED", _, true) => {
            format!("{{\"type\":\"ADDED\",\"object\":{}}}", event.object.text)
        }
        ("MODIFIED", true, false) => {
            let mut last = event
                .previous
                .as_ref()
                .map(|p| p.value())
                .unwrap_or_default();
            last["metadata"]["resourceVersion"] = json!(event.rv.to_string());
            json!({"type": "DELETED", "object": last}).to_string()
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("/api/v1/services"), Some((Resource::Services, None)));
        assert_eq!(
            route("/apis/discovery.k8s.io/v1/namespaces/ns1/endpointslices"),
            Some((Resource::EndpointSlices, Some("ns1".into())))
        );
        assert_eq!(route("/api/v1/pods"), None);
        assert_eq!(
            percent_decode("metadata.name%3Dnode-1"),
            "metadata.name=node-1"
        );
    }

    #[test]
    fn label_selectors() {
        let labels: BTreeMap<String, String> =
            [("kubernetes.io/service-name", "web"), ("tier", "front")]
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect();
        let cases = [
            ("", true),
            ("tier", true),
            ("!tier", false),
            (
                "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless",
                true,
            ),
            ("tier=front", true),
            ("tier==front", true),
            ("tier!=front", false),
            ("tier!=back", true),
            ("missing!=x", true),
            ("tier in (back, front)", true),
            ("tier notin (back,front)", false),
            ("missing notin (a)", true),
            ("tier=front,kubernetes.io/service-name=api", false),
        ];
        for (selector, want) in cases {
            assert_eq!(
                label_selector_matches(selector, &labels),
                want,
                "{selector:?}"
            );
        }
    }
}
