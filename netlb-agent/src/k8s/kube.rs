//! API-server source: kube-rs watchers for v1 Services,
//! discovery.k8s.io/v1 EndpointSlices and this node's v1 Node, feeding the
//! agent's [`ObjectStore`].
//!
//! Like kube-proxy's informers, the watchers only record: every object is
//! decoded on its own into its lean form and recorded in the store, which
//! marks the Services that really changed; every event wakes the sync loop.
//! The watchers' object type is [`Watched`]: each item of a list page or
//! watch event is taken as raw JSON text and decoded into the wire form
//! right there, so one object that is not what its kind says fails alone
//! (never its list page), and no generic JSON tree is ever built (the wire
//! form skips managedFields and the rest without allocating them). No reflector keeps a second
//! copy: a relist (after `410 Gone` or a broken watch) is applied object by
//! object into the store, which deletes what the relist did not contain.
//! Nothing is programmed until Services and EndpointSlices have both
//! completed a first list (the store's `synced`).
//!
//! The watches use kube-proxy's label selector (no foreign
//! `service-proxy-name`, no headless slices). Failed requests are retried
//! on [`retry`]'s schedule (a fast first retry, then growing with jitter to
//! 30 s, `Retry-After` honoured, starting over once a watch is
//! established), and an outage is logged as one line, a summary a minute,
//! and one line when it ends. Watches end every 40-50 s (the server's
//! `timeoutSeconds`) and a connection that stays silent for 55 s is taken
//! for dead: a half-open connection is replaced within a minute.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
        mpsc::Sender,
    },
    time::{Duration, Instant},
};
use tracing::Instrument as _;

use futures::TryStreamExt as _;
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::watcher,
};

use super::retry::{Backoff, RetryPolicy, SourceHealth};
use crate::{
    k8s::objects::{
        DecodeError, HEADLESS_LABEL, NodeObject, SERVICE_PROXY_NAME_LABEL, ServiceObject,
        SliceObject, json_names, only_meta, wire,
    },
    k8s::tracker::{Kind, ObjectStore},
    support::lock,
};

/// The wire form of a kind the agent watches, and its API type.
pub trait WireKind:
    serde::de::DeserializeOwned + Clone + std::fmt::Debug + Send + Sync + 'static
{
    type Api: k8s_openapi::Resource;
    const KIND: Kind;
}

impl WireKind for wire::Service {
    type Api = Service;
    const KIND: Kind = Kind::Service;
}

impl WireKind for wire::EndpointSlice {
    type Api = EndpointSlice;
    const KIND: Kind = Kind::EndpointSlice;
}

impl WireKind for wire::Node {
    type Api = Node;
    const KIND: Kind = Kind::Node;
}

/// One watched object: the metadata the watcher needs (name, namespace,
/// resourceVersion) and the object in its wire form, or why it could not
/// be decoded.
#[derive(Clone, Debug)]
pub struct Watched<W> {
    metadata: ObjectMeta,
    pub decoded: Result<W, Arc<DecodeError>>,
}

impl<'de, W: WireKind> serde::Deserialize<'de> for Watched<W> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The raw text of this item only: a failure below is this item's.
        let raw = Box::<serde_json::value::RawValue>::deserialize(d)?;
        let decoded = serde_json::from_str::<W>(raw.get()).map_err(|source| {
            let (namespace, name) = json_names(raw.get());
            Arc::new(DecodeError {
                kind: W::KIND.name(),
                namespace,
                name,
                source,
            })
        });
        // What the watcher itself reads (it resumes from resourceVersions).
        let meta = only_meta(raw.get());
        Ok(Self {
            metadata: ObjectMeta {
                name: meta.name,
                namespace: meta.namespace,
                resource_version: meta.resource_version,
                ..Default::default()
            },
            decoded,
        })
    }
}

impl<W: WireKind> kube::Resource for Watched<W> {
    type DynamicType = ();
    type Scope = <W::Api as k8s_openapi::Resource>::Scope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        <W::Api as k8s_openapi::Resource>::KIND.into()
    }

    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        <W::Api as k8s_openapi::Resource>::GROUP.into()
    }

    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        <W::Api as k8s_openapi::Resource>::VERSION.into()
    }

    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        <W::Api as k8s_openapi::Resource>::URL_PATH_SEGMENT.into()
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// One kind of request the agent makes of the API server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permission {
    /// API group ("" for the core group).
    pub group: &'static str,
    /// Resource, as in RBAC rules.
    pub resource: &'static str,
    pub verbs: &'static [&'static str],
}

/// Everything the agent asks of the API server, in one place: its watchers
/// list and watch Services, EndpointSlices and its own Node (a field
/// selector on the name), nothing else. `deploy/base/rbac.yaml` grants
/// exactly this; a test compares the two.
pub const PERMISSIONS: [Permission; 3] = [
    Permission {
        group: <Service as k8s_openapi::Resource>::GROUP,
        resource: <Service as k8s_openapi::Resource>::URL_PATH_SEGMENT,
        verbs: &["list", "watch"],
    },
    Permission {
        group: <EndpointSlice as k8s_openapi::Resource>::GROUP,
        resource: <EndpointSlice as k8s_openapi::Resource>::URL_PATH_SEGMENT,
        verbs: &["list", "watch"],
    },
    Permission {
        group: <Node as k8s_openapi::Resource>::GROUP,
        resource: <Node as k8s_openapi::Resource>::URL_PATH_SEGMENT,
        verbs: &["list", "watch"],
    },
];

/// Where the API server is.
#[derive(Clone, Debug)]
pub struct ApiConfig {
    /// A kubeconfig file; `None`: `KUBECONFIG`, then in-cluster config, then
    /// `~/.kube/config` (kube-rs' `Config::infer`).
    pub kubeconfig: Option<PathBuf>,
    /// The API server's address, overriding the one of the configuration
    /// above (kube-proxy's `--master`). Without any configuration, the
    /// agent talks to it without credentials. Either this or
    /// `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT` (read by the
    /// in-cluster configuration) must name the API server itself, not the
    /// `kubernetes` Service: the agent cannot depend on a ClusterIP it
    /// programs.
    pub master: Option<String>,
    /// This node, for its Node object (zone label, addresses).
    pub node_name: Option<String>,
    /// `--proxy-name`: Services labelled with it are ours too.
    pub proxy_name: Option<String>,
    /// Watches are renewed about this often (the server ends them; each
    /// watch takes a random value between 8/9 and 10/9 of it, so that nodes
    /// do not renew in step); a connection that stays silent for this long
    /// plus 10 s is taken for a dead (half-open) one and replaced. kube-rs'
    /// defaults are 290 s and 295 s; 45 s keeps a dead connection's
    /// detection under a minute.
    pub watch_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            master: None,
            node_name: None,
            proxy_name: None,
            watch_timeout: Duration::from_secs(45),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ApiSourceError {
    #[error("invalid --master URL {url:?}")]
    Master {
        url: String,
        #[source]
        source: http::uri::InvalidUri,
    },
    #[error("failed to read kubeconfig {path}")]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("failed to build a client configuration from kubeconfig {path}")]
    KubeconfigConfig {
        path: PathBuf,
        #[source]
        source: kube::config::KubeconfigError,
    },
    #[error("no API server configuration found (in-cluster, KUBECONFIG, ~/.kube/config)")]
    Infer {
        #[source]
        source: kube::config::InferConfigError,
    },
    #[error("failed to create the API client")]
    Client {
        #[source]
        source: kube::Error,
    },
}

/// Counters of the watchers, for metrics.
#[derive(Debug, Default)]
pub struct WatchStats {
    /// Watch errors (any resource); the watchers retry with backoff.
    pub errors: AtomicU64,
    /// Events received (any resource).
    pub events: AtomicU64,
}

/// Running watchers. Dropping it stops them.
pub struct ApiSource {
    pub stats: Arc<WatchStats>,
    /// Lists that fail for good (403 Forbidden, 404 Not Found), by kind:
    /// health reports them instead of claiming all is well.
    pub failing: Arc<Mutex<BTreeMap<Kind, String>>>,
    /// What the server answered, by kind (outages, for readiness).
    pub health: SourceHealth,
    /// The watch tasks on the agent's runtime, aborted on drop.
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// The API client: the configured server, a read timeout that catches a
/// dead watch connection, no retry of its own, and a layer that reports
/// every answer of the server to `health`.
fn build_client(
    runtime: &tokio::runtime::Handle,
    cfg: &ApiConfig,
    health: &SourceHealth,
) -> Result<kube::Client, ApiSourceError> {
    let mut config = runtime.block_on(client_config(cfg))?;
    // Each read must see bytes within this time: a watch ends (the
    // server's timeoutSeconds, at most 10/9 of the watch timeout) before
    // it, so only a dead connection stays silent this long.
    config.read_timeout = Some(cfg.watch_timeout + Duration::from_secs(10));
    // The watchers retry on their own schedule (see `retry`); the client's
    // built-in retry of 429/503/504 would add a second, invisible one.
    config.default_retry = false;
    log::info!("API server {}", config.cluster_url);
    // Kube's errors carry the status, not the headers, and a watch that
    // was established but brings no events shows nothing: a layer sees
    // every answer of the server.
    let capture = Observe {
        health: health.clone(),
    };
    runtime.block_on(async {
        kube::client::ClientBuilder::try_from(config)
            .map(|builder| builder.with_layer(&capture).build())
            .map_err(|source| ApiSourceError::Client { source })
    })
}

impl Drop for ApiSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

async fn client_config(cfg: &ApiConfig) -> Result<Config, ApiSourceError> {
    let master = match &cfg.master {
        Some(url) => Some(
            url.parse::<http::Uri>()
                .map_err(|source| ApiSourceError::Master {
                    url: url.clone(),
                    source,
                })?,
        ),
        None => None,
    };
    let mut config = match (base_config(cfg).await, master.clone()) {
        (Ok(config), _) => config,
        // `--master` alone: an API server without credentials.
        (Err(_), Some(url)) if cfg.kubeconfig.is_none() => Config::new(url.clone()),
        (Err(e), _) => return Err(e),
    };
    if let Some(url) = master {
        config.cluster_url = url;
    }
    Ok(config)
}

async fn base_config(cfg: &ApiConfig) -> Result<Config, ApiSourceError> {
    let path = cfg
        .kubeconfig
        .clone()
        .or_else(|| std::env::var_os("KUBECONFIG").map(PathBuf::from));
    match path {
        Some(path) => {
            let kubeconfig =
                Kubeconfig::read_from(&path).map_err(|source| ApiSourceError::Kubeconfig {
                    path: path.clone(),
                    source,
                })?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(|source| ApiSourceError::KubeconfigConfig { path, source })
        }
        None => Config::infer()
            .await
            .map_err(|source| ApiSourceError::Infer { source }),
    }
}

/// The lean form of a wire object, recorded in the store.
pub trait Record: WireKind {
    fn record(self, store: &mut ObjectStore);
}

impl Record for wire::Service {
    fn record(self, store: &mut ObjectStore) {
        let obj = ServiceObject::from_wire(self, store.names());
        store.apply_service(obj);
    }
}

impl Record for wire::EndpointSlice {
    fn record(self, store: &mut ObjectStore) {
        let obj = SliceObject::from_wire(self, store.names());
        store.apply_slice(obj);
    }
}

impl Record for wire::Node {
    fn record(self, store: &mut ObjectStore) {
        let obj = NodeObject::from_wire(self, store.names());
        store.apply_node(obj);
    }
}

/// Records one watched object in the store (or that it cannot be decoded:
/// its previous version, if any, stays).
fn record<W: Record>(store: &mut ObjectStore, obj: Watched<W>) {
    match obj.decoded {
        Ok(wire) => wire.record(store),
        Err(e) => {
            let message = format!("{}: {}", e, e.source);
            store.undecodable(W::KIND, &e.namespace, &e.name, message);
        }
    }
}

fn forget<W: WireKind>(store: &mut ObjectStore, obj: &Watched<W>) {
    let namespace = obj.metadata.namespace.as_deref().unwrap_or("default");
    let name = obj.metadata.name.as_deref().unwrap_or("");
    match W::KIND {
        Kind::Service => store.delete_service(namespace, name),
        Kind::EndpointSlice => store.delete_slice(namespace, name),
        Kind::Node => store.apply_node(NodeObject::default()),
    }
}

/// Spawns a watcher for `kind` that records into `store` and wakes
/// `notify` on every event; failures are retried on [`retry`]'s schedule
/// and logged as an [`Outage`].
fn spawn_watcher<W: Record>(
    runtime: &tokio::runtime::Handle,
    client: Client,
    config: watcher::Config,
    sink: Sink,
) -> tokio::task::JoinHandle<()> {
    let kind = W::KIND;
    let api: Api<Watched<W>> = Api::all(client);
    // No `.backoff()`: the loop below waits between failures itself, so
    // that it can honour `Retry-After` and reset only once a watch is
    // established.
    let stream = watcher(api, config);
    runtime.spawn(
        async move {
            let mut stream = std::pin::pin!(stream);
            let mut backoff = Backoff::new(RetryPolicy::default());
            let mut last_failure: Option<Instant> = None;
            loop {
                let event = stream.try_next().await;
                match event {
                    Ok(Some(event)) => {
                        sink.stats.events.fetch_add(1, Ordering::Relaxed);
                        // Objects of a (re)list wake the sync loop once, when
                        // the list is complete (it cannot use a partial list).
                        let wake = !matches!(event, watcher::Event::InitApply(_));
                        match event {
                            watcher::Event::Init => lock(&sink.store).begin_list(kind),
                            watcher::Event::InitApply(obj) | watcher::Event::Apply(obj) => {
                                record(&mut lock(&sink.store), obj)
                            }
                            watcher::Event::Delete(obj) => forget(&mut lock(&sink.store), &obj),
                            watcher::Event::InitDone => {
                                let first = !lock(&sink.store).synced();
                                lock(&sink.store).end_list(kind);
                                if lock(&sink.failing).remove(&kind).is_some() || first {
                                    log::info!("{}: list complete", kind.name());
                                }
                            }
                        }
                        if wake && sink.notify.send(()).is_err() {
                            return;
                        }
                    }
                    Ok(None) => return,
                    Err(e) => {
                        sink.stats.errors.fetch_add(1, Ordering::Relaxed);
                        let now = Instant::now();
                        // A watch established since the last failure (the
                        // server answered it: the client's layer saw it)
                        // starts the schedule over; a list alone does not.
                        if last_failure.is_none_or(|t| sink.health.established_since(kind, t)) {
                            backoff.established();
                        }
                        last_failure = Some(now);
                        let delay = backoff.failed(now, sink.health.retry_floor(now));
                        let status = match &e {
                            watcher::Error::InitialListFailed(kube::Error::Api(status))
                            | watcher::Error::WatchStartFailed(kube::Error::Api(status)) => {
                                Some(status.code)
                            }
                            _ => None,
                        };
                        if matches!(status, Some(403 | 404)) {
                            let message = format!("listing {}s fails: {e}", kind.name());
                            lock(&sink.failing).insert(kind, message);
                        }
                        sink.health.failed(kind, &e, delay, now);
                        let _ = sink.notify.send(());
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
        .instrument(tracing::info_span!("watch", kind = ?kind)),
    )
}

/// A layer of the API client that reports every answer of the server to
/// [`SourceHealth`]: the kind from the request's path, whether it was a
/// watch, the status and headers.
#[derive(Clone)]
struct Observe {
    health: SourceHealth,
}

impl<S> tower::Layer<S> for Observe {
    type Service = Observed<S>;

    fn layer(&self, inner: S) -> Observed<S> {
        Observed {
            inner,
            health: self.health.clone(),
        }
    }
}

#[derive(Clone)]
struct Observed<S> {
    inner: S,
    health: SourceHealth,
}

/// The kind a request path asks for.
fn kind_of(path: &str) -> Option<Kind> {
    let plural = path.rsplit('/').next()?;
    [Kind::Service, Kind::EndpointSlice, Kind::Node]
        .into_iter()
        .find(|k| {
            let resource = match k {
                Kind::Service => <Service as k8s_openapi::Resource>::URL_PATH_SEGMENT,
                Kind::EndpointSlice => <EndpointSlice as k8s_openapi::Resource>::URL_PATH_SEGMENT,
                Kind::Node => <Node as k8s_openapi::Resource>::URL_PATH_SEGMENT,
            };
            resource == plural
        })
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Observed<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: 'static,
    ResBody: 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let kind = kind_of(request.uri().path());
        let watch = request
            .uri()
            .query()
            .is_some_and(|q| q.split('&').any(|p| p == "watch=true" || p == "watch=1"));
        let health = self.health.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let result = answer.await;
            if let (Ok(response), Some(kind)) = (&result, kind) {
                health.answered(
                    kind,
                    watch,
                    response.status(),
                    response.headers(),
                    Instant::now(),
                );
            }
            result
        })
    }
}

/// Where a watcher's events go.
#[derive(Clone)]
struct Sink {
    store: Arc<Mutex<ObjectStore>>,
    notify: Sender<()>,
    stats: Arc<WatchStats>,
    failing: Arc<Mutex<BTreeMap<Kind, String>>>,
    health: SourceHealth,
}

/// A watch's `timeoutSeconds`: 8/9 to 10/9 of `timeout`, at random, so
/// that the nodes of a cluster do not renew their watches in step.
fn watch_timeout_s(timeout: Duration) -> u32 {
    use std::hash::{BuildHasher as _, Hasher as _};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(timeout.as_nanos() as u64);
    let unit = (h.finish() >> 11) as f64 / (1u64 << 53) as f64;
    let s = timeout.as_secs_f64() * (8.0 + 2.0 * unit) / 9.0;
    (s.round() as u32).max(1)
}

impl ApiSource {
    /// Connects and starts the watchers on the agent's runtime, recording
    /// into `store`; `notify` is sent `()` on every watch event. Called
    /// from outside the runtime (it blocks on the connection).
    pub fn start(
        runtime: &tokio::runtime::Handle,
        cfg: ApiConfig,
        store: Arc<Mutex<ObjectStore>>,
        notify: Sender<()>,
    ) -> Result<Self, ApiSourceError> {
        let health = SourceHealth::default();
        let client = build_client(runtime, &cfg, &health)?;
        let stats = Arc::new(WatchStats::default());
        let failing = Arc::new(Mutex::new(BTreeMap::new()));
        let sink = Sink {
            store,
            notify,
            stats: Arc::clone(&stats),
            failing: Arc::clone(&failing),
            health: health.clone(),
        };
        // kube-proxy's informer selector: no foreign service-proxy-name (a
        // proxy name of our own is filtered by the model), no headless
        // slices (nor Services labelled so).
        let labels = match &cfg.proxy_name {
            None => format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}"),
            Some(_) => format!("!{HEADLESS_LABEL}"),
        };
        let watch_config = || {
            watcher::Config::default()
                .timeout(watch_timeout_s(cfg.watch_timeout))
                .labels(&labels)
        };
        let _guard = runtime.enter();
        let mut tasks = vec![
            spawn_watcher::<wire::Service>(runtime, client.clone(), watch_config(), sink.clone()),
            spawn_watcher::<wire::EndpointSlice>(
                runtime,
                client.clone(),
                watch_config(),
                sink.clone(),
            ),
        ];
        if let Some(name) = &cfg.node_name {
            tasks.push(spawn_watcher::<wire::Node>(
                runtime,
                client.clone(),
                watcher::Config::default()
                    .timeout(watch_timeout_s(cfg.watch_timeout))
                    .fields(&format!("metadata.name={name}")),
                sink,
            ));
        }
        Ok(Self {
            stats,
            failing,
            health,
            tasks,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    /// The ClusterRole in `deploy/base/rbac.yaml` grants exactly
    /// [`PERMISSIONS`]: every (group, resource, verb) the code uses, and
    /// nothing more.
    #[test]
    fn the_cluster_role_grants_exactly_what_the_agent_uses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/rbac.yaml");
        let text = std::fs::read_to_string(path).expect("deploy/base/rbac.yaml");
        let mut granted = BTreeSet::new();
        for value in serde_saphyr::from_multiple::<serde_json::Value>(&text).expect("yaml") {
            if value["kind"] != "ClusterRole" {
                continue;
            }
            for rule in value["rules"].as_array().expect("rules") {
                let list = |key: &str| -> Vec<String> {
                    rule[key]
                        .as_array()
                        .unwrap_or_else(|| panic!("{key} in {rule:?}"))
                        .iter()
                        .map(|v| v.as_str().expect("string").to_owned())
                        .collect()
                };
                for group in list("apiGroups") {
                    for resource in list("resources") {
                        for verb in list("verbs") {
                            granted.insert((group.clone(), resource.clone(), verb));
                        }
                    }
                }
            }
        }
        let used: BTreeSet<(String, String, String)> = PERMISSIONS
            .iter()
            .flat_map(|p| {
                p.verbs
                    .iter()
                    .map(|v| (p.group.to_owned(), p.resource.to_owned(), (*v).to_owned()))
            })
            .collect();
        assert_eq!(granted, used);
    }
}
