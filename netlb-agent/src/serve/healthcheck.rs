//! Per-Service health-check node ports, as kube-proxy serves them
//! (pkg/proxy/healthcheck/service_health.go).
//!
//! A LoadBalancer Service with `externalTrafficPolicy: Local` gets a
//! `spec.healthCheckNodePort`. Every node answers HTTP on that port: 200 when
//! it has at least one local endpoint for the Service and the proxy itself is
//! healthy, 503 otherwise, so the cloud load balancer only sends traffic to
//! nodes that will not have to drop or forward it.
//!
//! One listener per Service, served as tasks on the agent's runtime
//! ([`crate::serve::server`]): no thread per listener or connection, a bound on
//! connections per port, timeouts on slow clients.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io,
    net::{Ipv4Addr, SocketAddr, TcpListener},
    sync::{Arc, Mutex, PoisonError},
};

use crate::{
    serve::server::{self, Limits, Server},
    support::error_chain,
};

/// A Service's `(namespace, name)`.
type ServiceKey = (String, String);

/// Why a Service's health-check node port is not being served.
#[derive(Debug, thiserror::Error)]
pub enum HealthCheckError {
    /// The Service asked for port 0, which would bind a random port that no
    /// load balancer knows about.
    #[error("service {namespace}/{name} has health-check node port 0")]
    ZeroPort { namespace: String, name: String },
    /// Binding or configuring the listening socket failed (typically the
    /// port is already in use). Retried on the next `sync_services`.
    #[error("failed to listen on health-check node port {port} for service {namespace}/{name}")]
    Bind {
        port: u16,
        namespace: String,
        name: String,
        #[source]
        source: io::Error,
    },
    /// The listener could not be handed to the runtime. Retried on the
    /// next `sync_services`.
    #[error("failed to serve health-check node port {port} of service {namespace}/{name}")]
    Spawn {
        port: u16,
        namespace: String,
        name: String,
        #[source]
        source: io::Error,
    },
}

/// State every listener and connection thread reads at request time, so
/// `sync_endpoints` and the proxy's health take effect on the next request.
struct Shared {
    /// Local endpoint counts; a Service missing here has 0.
    counts: Mutex<BTreeMap<ServiceKey, usize>>,
    proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
}

impl Shared {
    fn local_endpoints(&self, key: &ServiceKey) -> usize {
        // A panic elsewhere while holding the lock leaves a map that is still
        // a valid map; serving it beats taking every health check down.
        let counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        counts.get(key).copied().unwrap_or(0)
    }
}

/// One open health-check port. Dropping it closes the port at once.
struct Listener {
    port: u16,
    _server: Server,
}

/// Serves the health-check node ports of all `externalTrafficPolicy: Local`
/// LoadBalancer Services, one listener on `0.0.0.0:<port>` per Service.
pub struct ServiceHealthServer {
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
    listeners: BTreeMap<ServiceKey, Listener>,
}

impl ServiceHealthServer {
    /// Creates a server with no listeners. `proxy_healthy` is asked on each
    /// request; when it returns false every port answers 503 (kube-proxy
    /// does the same so load balancers drain a node whose proxy is stuck).
    pub fn new(
        runtime: tokio::runtime::Handle,
        proxy_healthy: Arc<dyn Fn() -> bool + Send + Sync>,
    ) -> Self {
        Self {
            runtime,
            shared: Arc::new(Shared {
                counts: Mutex::new(BTreeMap::new()),
                proxy_healthy,
            }),
            listeners: BTreeMap::new(),
        }
    }

    /// Makes the set of listeners match `services`, the desired
    /// `(namespace, name) -> health-check port`. Listeners of Services no
    /// longer present, or whose port changed, are closed first so that a
    /// port handed from one Service to another in the same call can be bound
    /// again; then listeners are opened for every Service that lacks one.
    ///
    /// A port that cannot be served is logged and reported in the returned
    /// errors; it does not stop the others, and since it still has no
    /// listener it is retried on the next call.
    pub fn sync_services(
        &mut self,
        services: &BTreeMap<(String, String), u16>,
    ) -> Vec<HealthCheckError> {
        let stale: Vec<ServiceKey> = self
            .listeners
            .iter()
            .filter(|(key, listener)| services.get(*key) != Some(&listener.port))
            .map(|(key, _)| key.clone())
            .collect();
        let closing: Vec<Listener> = stale
            .iter()
            .filter_map(|key| {
                let listener = self.listeners.remove(key)?;
                tracing::info!(
                    namespace = %key.0,
                    service = %key.1,
                    port = listener.port,
                    "closing health-check node port {} of service {}/{}",
                    listener.port,
                    key.0,
                    key.1
                );
                Some(listener)
            })
            .collect();
        // Closed before the new ones open: a port handed to another
        // Service in this call can be bound again.
        drop(closing);

        let mut errors = Vec::new();
        for (key, &port) in services {
            if self.listeners.contains_key(key) {
                continue;
            }
            match self.open(key, port) {
                Ok(listener) => {
                    tracing::info!(
                        namespace = %key.0,
                        service = %key.1,
                        port,
                        "serving health-check node port {port} for service {}/{}",
                        key.0,
                        key.1
                    );
                    self.listeners.insert(key.clone(), listener);
                }
                Err(err) => {
                    tracing::warn!(
                        namespace = %key.0,
                        service = %key.1,
                        port,
                        "{err}: {}",
                        error_chain(&err)
                    );
                    errors.push(err);
                }
            }
        }
        errors
    }

    /// Replaces the local endpoint counts by `(namespace, name)`; Services
    /// missing from `counts` have 0. Takes effect on the next request.
    pub fn sync_endpoints(&self, counts: &BTreeMap<(String, String), usize>) {
        let mut current = self
            .shared
            .counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        current.clone_from(counts);
    }

    /// Ports currently listening, sorted.
    pub fn ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self.listeners.values().map(|l| l.port).collect();
        ports.sort_unstable();
        ports
    }

    fn open(&self, key: &ServiceKey, port: u16) -> Result<Listener, HealthCheckError> {
        let (namespace, name) = key.clone();
        if port == 0 {
            return Err(HealthCheckError::ZeroPort { namespace, name });
        }
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
        let socket = match TcpListener::bind(addr) {
            Ok(socket) => socket,
            Err(source) => {
                return Err(HealthCheckError::Bind {
                    port,
                    namespace,
                    name,
                    source,
                });
            }
        };
        let service = Arc::new(key.clone());
        let shared = Arc::clone(&self.shared);
        // The request's method, path and headers are ignored, as in
        // kube-proxy.
        let handler: server::Handler = Arc::new(move |_parts| {
            let count = shared.local_endpoints(&service);
            let healthy = (shared.proxy_healthy)();
            render_response(&service.0, &service.1, count, healthy)
        });
        match server::spawn(&self.runtime, socket, Limits::default(), handler) {
            Ok(server) => Ok(Listener {
                port,
                _server: server,
            }),
            Err(source) => Err(HealthCheckError::Spawn {
                port,
                namespace,
                name,
                source,
            }),
        }
    }
}

/// The response for a Service with `count` local endpoints (kube-proxy's
/// body and `X-Load-Balancing-Endpoint-Weight`); the connection closes after
/// it, as load balancers' probes expect.
fn render_response(
    namespace: &str,
    name: &str,
    count: usize,
    proxy_healthy: bool,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let status = if count > 0 && proxy_healthy { 200 } else { 503 };
    let body = format!(
        r#"{{"service":{{"namespace":"{}","name":"{}"}},"localEndpoints":{count},"serviceProxyHealthy":{proxy_healthy}}}"#,
        json_escape(namespace),
        json_escape(name),
    );
    let mut response = server::response(status, "application/json", body);
    let headers = response.headers_mut();
    headers.insert("X-Load-Balancing-Endpoint-Weight", count.into());
    headers.insert("Connection", http::HeaderValue::from_static("close"));
    response
}

/// `s` as the inside of a JSON string. Kubernetes names cannot hold quotes,
/// backslashes or control characters, but the body must stay valid JSON
/// whatever the source hands us.
fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::{
        collections::BTreeMap,
        io::{Read as _, Write as _},
        net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::{Duration, Instant},
    };

    use super::*;

    /// A port that was free a moment ago.
    fn free_port() -> u16 {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        listener.local_addr().unwrap().port()
    }

    fn key(namespace: &str, name: &str) -> (String, String) {
        (namespace.to_owned(), name.to_owned())
    }

    /// A runtime for the tests' servers, alive for the whole test binary.
    fn test_runtime() -> tokio::runtime::Handle {
        static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        RUNTIME
            .get_or_init(|| {
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("test runtime")
            })
            .handle()
            .clone()
    }

    fn always_healthy() -> Arc<dyn Fn() -> bool + Send + Sync> {
        Arc::new(|| true)
    }

    struct Response {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Response {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Sends one GET to 127.0.0.1:`port` and reads until the server closes.
    fn get(port: u16, path: &str) -> Response {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: lb\r\nUser-Agent: test\r\n\r\n"
        )
        .unwrap();
        let mut raw = String::new();
        stream.read_to_string(&mut raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").expect("no end of headers");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap();
        let mut parts = status_line.splitn(3, ' ');
        assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
        let status = parts.next().unwrap().parse().unwrap();
        let headers = lines
            .map(|l| {
                let (n, v) = l.split_once(':').expect("bad header");
                (n.trim().to_owned(), v.trim().to_owned())
            })
            .collect();
        let response = Response {
            status,
            headers,
            body: body.to_owned(),
        };
        assert_eq!(
            response.header("Content-Length"),
            Some(response.body.len().to_string().as_str())
        );
        response
    }

    /// True once nothing accepts connections on 127.0.0.1:`port`, trying
    /// for up to a second.
    fn closed_within_a_second(port: u16) -> bool {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn unavailable_without_endpoints_then_ok() {
        let port = free_port();
        let mut server = ServiceHealthServer::new(test_runtime(), always_healthy());
        let errors = server.sync_services(&BTreeMap::from([(key("default", "web"), port)]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(server.ports(), vec![port]);

        let r = get(port, "/");
        assert_eq!(r.status, 503);
        assert_eq!(
            r.body,
            r#"{"service":{"namespace":"default","name":"web"},"localEndpoints":0,"serviceProxyHealthy":true}"#
        );
        assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("0"));
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert_eq!(r.header("X-Content-Type-Options"), Some("nosniff"));
        assert_eq!(r.header("Connection"), Some("close"));

        server.sync_endpoints(&BTreeMap::from([
            (key("default", "web"), 2),
            (key("default", "other"), 7),
        ]));
        // Any path is answered the same way.
        let r = get(port, "/anything?x=1");
        assert_eq!(r.status, 200);
        assert!(r.body.contains(r#""localEndpoints":2"#), "{}", r.body);
        assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("2"));

        // Missing from the new counts means 0 again.
        server.sync_endpoints(&BTreeMap::from([(key("default", "other"), 7)]));
        let r = get(port, "/healthz");
        assert_eq!(r.status, 503);
        assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("0"));
    }

    #[test]
    fn unavailable_when_proxy_unhealthy() {
        let healthy = Arc::new(AtomicBool::new(false));
        let probe = Arc::clone(&healthy);
        let port = free_port();
        let mut server = ServiceHealthServer::new(
            test_runtime(),
            Arc::new(move || probe.load(Ordering::SeqCst)),
        );
        server.sync_endpoints(&BTreeMap::from([(key("ns", "svc"), 3)]));
        assert!(
            server
                .sync_services(&BTreeMap::from([(key("ns", "svc"), port)]))
                .is_empty()
        );

        let r = get(port, "/");
        assert_eq!(r.status, 503);
        assert!(
            r.body
                .ends_with(r#""localEndpoints":3,"serviceProxyHealthy":false}"#),
            "{}",
            r.body
        );
        assert_eq!(r.header("X-Load-Balancing-Endpoint-Weight"), Some("3"));

        // Asked per request, not cached.
        healthy.store(true, Ordering::SeqCst);
        assert_eq!(get(port, "/").status, 200);
    }

    #[test]
    fn removing_or_moving_a_service_closes_its_port() {
        let (a, b) = (free_port(), free_port());
        let mut server = ServiceHealthServer::new(test_runtime(), always_healthy());
        assert!(
            server
                .sync_services(&BTreeMap::from([
                    (key("ns", "one"), a),
                    (key("ns", "two"), b)
                ]))
                .is_empty()
        );
        assert_eq!(get(a, "/").status, 503);

        // Port change: the old port is closed and the new one served.
        let c = free_port();
        assert!(
            server
                .sync_services(&BTreeMap::from([
                    (key("ns", "one"), c),
                    (key("ns", "two"), b)
                ]))
                .is_empty()
        );
        assert!(closed_within_a_second(a), "port {a} still open");
        assert_eq!(get(c, "/").status, 503);

        // Removal.
        assert!(
            server
                .sync_services(&BTreeMap::from([(key("ns", "two"), b)]))
                .is_empty()
        );
        assert!(closed_within_a_second(c), "port {c} still open");
        assert_eq!(server.ports(), vec![b]);
        assert_eq!(get(b, "/").status, 503);

        // Dropping the server closes the rest.
        drop(server);
        assert!(closed_within_a_second(b), "port {b} still open after drop");
    }

    #[test]
    fn port_handed_to_another_service_in_one_sync() {
        let port = free_port();
        let mut server = ServiceHealthServer::new(test_runtime(), always_healthy());
        server.sync_endpoints(&BTreeMap::from([(key("ns", "new"), 1)]));
        assert!(
            server
                .sync_services(&BTreeMap::from([(key("ns", "old"), port)]))
                .is_empty()
        );
        // The old listener must be closed before the new one binds.
        let errors = server.sync_services(&BTreeMap::from([(key("ns", "new"), port)]));
        assert!(errors.is_empty(), "{errors:?}");
        let r = get(port, "/");
        assert_eq!(r.status, 200);
        assert!(r.body.contains(r#""name":"new""#), "{}", r.body);
    }

    #[test]
    fn port_in_use_is_reported_and_retried() {
        // Held by "someone else" on the same wildcard address the server uses.
        let blocker = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let busy = blocker.local_addr().unwrap().port();
        let free = free_port();
        let mut server = ServiceHealthServer::new(test_runtime(), always_healthy());
        server.sync_endpoints(&BTreeMap::from([
            (key("ns", "ok"), 1),
            (key("ns", "busy"), 1),
        ]));
        let services = BTreeMap::from([(key("ns", "busy"), busy), (key("ns", "ok"), free)]);

        let errors = server.sync_services(&services);
        assert_eq!(errors.len(), 1, "{errors:?}");
        match &errors[0] {
            HealthCheckError::Bind {
                port,
                namespace,
                name,
                source,
            } => {
                assert_eq!(
                    (*port, namespace.as_str(), name.as_str()),
                    (busy, "ns", "busy")
                );
                assert_eq!(source.kind(), io::ErrorKind::AddrInUse);
            }
            other => panic!("unexpected error {other:?}"),
        }
        assert_eq!(server.ports(), vec![free]);
        assert_eq!(get(free, "/").status, 200);

        // Once the port is released, the next sync picks it up.
        drop(blocker);
        let errors = server.sync_services(&services);
        assert!(errors.is_empty(), "{errors:?}");
        let mut expected = vec![busy, free];
        expected.sort_unstable();
        assert_eq!(server.ports(), expected);
        assert_eq!(get(busy, "/").status, 200);
    }

    #[test]
    fn zero_port_is_an_error_not_a_random_port() {
        let mut server = ServiceHealthServer::new(test_runtime(), always_healthy());
        let errors = server.sync_services(&BTreeMap::from([(key("ns", "svc"), 0)]));
        assert!(
            matches!(&errors[..], [HealthCheckError::ZeroPort { namespace, name }] if namespace == "ns" && name == "svc"),
            "{errors:?}"
        );
        assert!(server.ports().is_empty());
    }

    #[test]
    fn names_are_json_escaped() {
        let port = free_port();
        let mut server = ServiceHealthServer::new(test_runtime(), always_healthy());
        let service = key(r"n\s", r#"we"b"#);
        server.sync_endpoints(&BTreeMap::from([(service.clone(), 1)]));
        assert!(
            server
                .sync_services(&BTreeMap::from([(service, port)]))
                .is_empty()
        );
        let r = get(port, "/");
        assert_eq!(r.status, 200);
        assert_eq!(
            r.body,
            r#"{"service":{"namespace":"n\\s","name":"we\"b"},"localEndpoints":1,"serviceProxyHealthy":true}"#
        );
        assert_eq!(json_escape("a\nb\u{1}"), r"a\nb\u0001");
    }

    #[test]
    fn silent_or_garbage_clients_do_not_break_the_listener() {
        let port = free_port();
        let mut server = ServiceHealthServer::new(test_runtime(), always_healthy());
        assert!(
            server
                .sync_services(&BTreeMap::from([(key("ns", "svc"), port)]))
                .is_empty()
        );
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        // Connects and says nothing: must not block other clients.
        let _silent = TcpStream::connect(addr).unwrap();
        // Connects and closes at once.
        drop(TcpStream::connect(addr).unwrap());
        // Sends an oversized, non-UTF-8 request: still answered.
        let mut big = TcpStream::connect(addr).unwrap();
        big.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut junk = vec![0xff_u8; 64 * 1024];
        junk.extend_from_slice(b"\r\n\r\n");
        // The server stops reading after its bound and may reset us
        // mid-write; only the answer to a well-formed client matters below.
        let _ = big.write_all(&junk);
        assert_eq!(get(port, "/").status, 503);
    }
}
