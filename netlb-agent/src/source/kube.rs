//! API-server source: kube-rs watchers + reflectors for v1 Services,
//! discovery.k8s.io/v1 EndpointSlices and this node's v1 Node.
//!
//! Like kube-proxy's informers, the watchers only record: each reflector keeps
//! its store, every event wakes the sync loop, and the sync step reads whole
//! store snapshots. Deletions are taken from the snapshots (a re-list after a
//! `410 Gone` or a broken watch replaces a store atomically), never from Delete
//! events. [`ApiSource::snapshot`] returns nothing until both Services and
//! EndpointSlices have completed their first list, so the datapath is never
//! programmed from partial state after a restart.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc::Sender,
    },
    time::Duration,
};

use futures::TryStreamExt as _;
use k8s_openapi::api::{core::v1::Node, core::v1::Service, discovery::v1::EndpointSlice};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};

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
    /// Watches are renewed this often (the server ends them); a watch that
    /// stays silent for this long plus 5 s is taken for a dead (half-open)
    /// connection and re-established. kube-rs' defaults: 290 s and 295 s.
    pub watch_timeout: Duration,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            kubeconfig: None,
            master: None,
            node_name: None,
            watch_timeout: Duration::from_secs(290),
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
    #[error("failed to start the watcher runtime")]
    Runtime {
        #[source]
        source: std::io::Error,
    },
}

/// Objects of one consistent read of the stores.
#[derive(Clone, Debug, Default)]
pub struct ApiSnapshot {
    /// Shared with the reflector stores: reading a snapshot copies no object.
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub node: Option<Arc<Node>>,
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
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Option<Store<Node>>,
    services_synced: Arc<AtomicBool>,
    slices_synced: Arc<AtomicBool>,
    pub stats: Arc<WatchStats>,
    _runtime: tokio::runtime::Runtime,
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

/// Spawns a watcher + reflector for `api`, waking `notify` on every event and
/// setting `synced` at the end of the first complete list.
fn spawn_reflector<K>(
    runtime: &tokio::runtime::Runtime,
    api: Api<K>,
    config: watcher::Config,
    notify: Sender<()>,
    synced: Arc<AtomicBool>,
    stats: Arc<WatchStats>,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&()).into_owned();
    let stream = reflector::reflector(writer, watcher(api, config).default_backoff());
    runtime.spawn(async move {
        let mut stream = std::pin::pin!(stream);
        loop {
            match stream.try_next().await {
                Ok(Some(event)) => {
                    stats.events.fetch_add(1, Ordering::Relaxed);
                    log::debug!("{kind}: watch event");
                    if matches!(event, watcher::Event::InitDone)
                        && !synced.swap(true, Ordering::SeqCst)
                    {
                        log::info!("{kind}: initial list complete");
                    }
                    if notify.send(()).is_err() {
                        return;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    // default_backoff() retries; a 410 Gone re-lists.
                    stats.errors.fetch_add(1, Ordering::Relaxed);
                    log::warn!("{kind} watch: {e}");
                }
            }
        }
    });
    store
}

impl ApiSource {
    /// Connects and starts the watchers on their own runtime threads.
    /// `notify` is sent `()` on every watch event.
    pub fn start(cfg: ApiConfig, notify: Sender<()>) -> Result<Self, ApiSourceError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kube-watch")
            .enable_all()
            .build()
            .map_err(|source| ApiSourceError::Runtime { source })?;
        let mut config = runtime.block_on(client_config(&cfg))?;
        // Each read on a watch must see bytes within this time.
        config.read_timeout = Some(cfg.watch_timeout + Duration::from_secs(5));
        let watch_config =
            watcher::Config::default().timeout(cfg.watch_timeout.as_secs().max(1) as u32);
        log::info!("API server {}", config.cluster_url);
        let client = runtime.block_on(async {
            Client::try_from(config).map_err(|source| ApiSourceError::Client { source })
        })?;
        let stats = Arc::new(WatchStats::default());
        let services_synced = Arc::new(AtomicBool::new(false));
        let slices_synced = Arc::new(AtomicBool::new(false));
        let _guard = runtime.enter();
        let services = spawn_reflector(
            &runtime,
            Api::<Service>::all(client.clone()),
            watch_config.clone(),
            notify.clone(),
            Arc::clone(&services_synced),
            Arc::clone(&stats),
        );
        let slices = spawn_reflector(
            &runtime,
            Api::<EndpointSlice>::all(client.clone()),
            watch_config.clone(),
            notify.clone(),
            Arc::clone(&slices_synced),
            Arc::clone(&stats),
        );
        let nodes = cfg.node_name.as_ref().map(|name| {
            spawn_reflector(
                &runtime,
                Api::<Node>::all(client.clone()),
                watch_config
                    .clone()
                    .fields(&format!("metadata.name={name}")),
                notify.clone(),
                Arc::new(AtomicBool::new(false)),
                Arc::clone(&stats),
            )
        });
        drop(_guard);
        Ok(Self {
            services,
            slices,
            nodes,
            services_synced,
            slices_synced,
            stats,
            _runtime: runtime,
        })
    }

    /// Whether Services and EndpointSlices have both completed a first list.
    pub fn synced(&self) -> bool {
        self.services_synced.load(Ordering::SeqCst) && self.slices_synced.load(Ordering::SeqCst)
    }

    /// The stores' contents, or `None` before both have synced.
    pub fn snapshot(&self) -> Option<ApiSnapshot> {
        if !self.synced() {
            return None;
        }
        Some(ApiSnapshot {
            services: self.services.state(),
            endpoint_slices: self.slices.state(),
            node: self
                .nodes
                .as_ref()
                .and_then(|store| store.state().first().cloned()),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use serde::Deserialize as _;

    use super::*;

    /// The ClusterRole in `deploy/base/rbac.yaml` grants exactly
    /// [`PERMISSIONS`]: every (group, resource, verb) the code uses, and
    /// nothing more.
    #[test]
    fn the_cluster_role_grants_exactly_what_the_agent_uses() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/rbac.yaml");
        let text = std::fs::read_to_string(path).expect("deploy/base/rbac.yaml");
        let mut granted = BTreeSet::new();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).expect("yaml");
            if value["kind"] != "ClusterRole" {
                continue;
            }
            for rule in value["rules"].as_sequence().expect("rules") {
                let list = |key: &str| -> Vec<String> {
                    rule[key]
                        .as_sequence()
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
