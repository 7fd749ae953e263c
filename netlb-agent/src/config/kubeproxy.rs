//! kube-proxy's configuration file (`--config`, a
//! `kubeproxy.config.k8s.io/v1alpha1` `KubeProxyConfiguration`, as kubeadm
//! writes it into the kube-proxy ConfigMap): the fields that mean
//! something to netlb become its settings; the rest are reported once at
//! start-up, unknown fields separately from known ones netlb has no use
//! for. Flags given on the command line (or in the environment) override
//! the file, as in kube-proxy.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;
use serde_json::Value;

use crate::config::GoDuration;

#[derive(Debug, thiserror::Error)]
pub enum KubeProxyConfigError {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a KubeProxyConfiguration")]
    Yaml {
        path: PathBuf,
        // Boxed: the parser's error carries its snippet and location.
        #[source]
        source: Box<serde_saphyr::Error>,
    },
    #[error(
        "{path}: apiVersion {api_version:?}, kind {kind:?}: want kubeproxy.config.k8s.io/v1alpha1 KubeProxyConfiguration"
    )]
    Kind {
        path: PathBuf,
        api_version: String,
        kind: String,
    },
    #[error("{path}: {field}")]
    Duration {
        path: PathBuf,
        field: String,
        #[source]
        source: crate::config::DurationError,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientConnection {
    #[serde(default)]
    kubeconfig: String,
    qps: Option<f64>,
    burst: Option<i64>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct SyncSection {
    sync_period: Option<String>,
    min_sync_period: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Conntrack {
    tcp_established_timeout: Option<String>,
    udp_timeout: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct File {
    #[serde(default)]
    api_version: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    client_connection: Option<ClientConnection>,
    #[serde(default)]
    hostname_override: String,
    #[serde(default)]
    bind_address: String,
    #[serde(default)]
    healthz_bind_address: String,
    #[serde(default)]
    metrics_bind_address: String,
    #[serde(default, rename = "clusterCIDR")]
    cluster_cidr: String,
    #[serde(default)]
    detect_local_mode: String,
    #[serde(default)]
    node_port_addresses: Option<Vec<String>>,
    #[serde(default)]
    mode: String,
    #[serde(default)]
    iptables: Option<SyncSection>,
    #[serde(default)]
    nftables: Option<SyncSection>,
    #[serde(default)]
    ipvs: Option<SyncSection>,
    #[serde(default)]
    conntrack: Option<Conntrack>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// Known fields of a KubeProxyConfiguration that netlb has no use for
/// (top level): reported as ignored, not as unknown.
const KNOWN_IGNORED: &[&str] = &[
    "bindAddressHardFail",
    "configSyncPeriod",
    "enableProfiling",
    "featureGates",
    "logging",
    "oomScoreAdj",
    "portRange",
    "showHiddenMetricsForVersion",
    "udpIdleTimeout",
    "winkernel",
    "detectLocal",
    "windowsRunAsService",
    "kubeProxyMode",
];

/// What the file sets, as netlb's settings (`None`: the file leaves it to
/// the default or to the flag).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct FileSettings {
    pub kubeconfig: Option<PathBuf>,
    pub hostname_override: Option<String>,
    pub healthz_bind_address: Option<String>,
    pub metrics_bind_address: Option<String>,
    pub cluster_cidr: Option<Vec<String>>,
    pub nodeport_addresses: Option<Vec<String>>,
    pub resync_interval: Option<Duration>,
    pub min_sync_interval: Option<Duration>,
    pub tcp_established_timeout: Option<Duration>,
    pub udp_timeout: Option<Duration>,
    pub kube_api_qps: Option<f64>,
    pub kube_api_burst: Option<i64>,
}

/// A parsed file: its settings and what to report about the rest.
#[derive(Debug, Default)]
pub struct Loaded {
    pub settings: FileSettings,
    /// Fields that are not part of KubeProxyConfiguration.
    pub unknown: Vec<String>,
    /// Fields netlb ignores, with why.
    pub ignored: Vec<String>,
}

fn duration(
    path: &std::path::Path,
    field: &str,
    value: &Option<String>,
) -> Result<Option<Duration>, KubeProxyConfigError> {
    let Some(text) = value.as_deref().map(str::trim).filter(|t| !t.is_empty()) else {
        return Ok(None);
    };
    let d: GoDuration = text
        .parse()
        .map_err(|source| KubeProxyConfigError::Duration {
            path: path.to_owned(),
            field: field.to_owned(),
            source,
        })?;
    // kubeadm writes 0s for "the default".
    Ok((!d.0.is_zero()).then_some(d.0))
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_owned())
}

/// Parses `text`, the contents of `path`.
pub fn parse(path: &std::path::Path, text: &str) -> Result<Loaded, KubeProxyConfigError> {
    let file: File = serde_saphyr::from_str(text).map_err(|source| KubeProxyConfigError::Yaml {
        path: path.to_owned(),
        source: Box::new(source),
    })?;
    if file.api_version != "kubeproxy.config.k8s.io/v1alpha1"
        || file.kind != "KubeProxyConfiguration"
    {
        return Err(KubeProxyConfigError::Kind {
            path: path.to_owned(),
            api_version: file.api_version,
            kind: file.kind,
        });
    }
    let mut loaded = Loaded::default();
    for key in file.other.keys() {
        if KNOWN_IGNORED.contains(&key.as_str()) {
            loaded.ignored.push(format!("{key}: no meaning for netlb"));
        } else {
            loaded.unknown.push(key.clone());
        }
    }
    read_client_connection(&file, &mut loaded);
    read_addresses(&file, &mut loaded);
    read_mode(path, &file, &mut loaded)?;
    read_conntrack(path, &file, &mut loaded)?;
    Ok(loaded)
}

/// `clientConnection`: the kubeconfig, and the rate limits netlb only logs.
fn read_client_connection(file: &File, loaded: &mut Loaded) {
    let Some(cc) = &file.client_connection else {
        return;
    };
    let s = &mut loaded.settings;
    s.kubeconfig = non_empty(&cc.kubeconfig).map(PathBuf::from);
    // 0 is kubeadm's "the default".
    s.kube_api_qps = cc.qps.filter(|q| *q > 0.0);
    s.kube_api_burst = cc.burst.filter(|b| *b > 0);
    for key in cc.other.keys() {
        match key.as_str() {
            "acceptContentTypes" | "contentType" => loaded.ignored.push(format!(
                "clientConnection.{key}: netlb negotiates JSON itself"
            )),
            _ => loaded.unknown.push(format!("clientConnection.{key}")),
        }
    }
}

/// The node's name, the bind addresses, the cluster CIDR and the node
/// port addresses.
fn read_addresses(file: &File, loaded: &mut Loaded) {
    let s = &mut loaded.settings;
    s.hostname_override = non_empty(&file.hostname_override);
    s.healthz_bind_address = non_empty(&file.healthz_bind_address);
    s.metrics_bind_address = non_empty(&file.metrics_bind_address);
    s.cluster_cidr =
        non_empty(&file.cluster_cidr).map(|c| c.split(',').map(|p| p.trim().to_owned()).collect());
    s.nodeport_addresses = file.node_port_addresses.clone().filter(|a| !a.is_empty());
    if let Some(bind) = non_empty(&file.bind_address)
        && bind != "0.0.0.0"
        && bind != "::"
    {
        loaded.ignored.push(format!(
            "bindAddress {bind}: netlb listens on healthzBindAddress and metricsBindAddress"
        ));
    }
    match file.detect_local_mode.as_str() {
        "" | "ClusterCIDR" => {}
        other => loaded.ignored.push(format!(
            "detectLocalMode {other}: netlb detects local traffic by clusterCIDR only"
        )),
    }
}

/// The mode's sync periods (iptables when unset), and the other fields of
/// the mode sections, which netlb has no use for.
fn read_mode(
    path: &std::path::Path,
    file: &File,
    loaded: &mut Loaded,
) -> Result<(), KubeProxyConfigError> {
    match file.mode.as_str() {
        "" | "iptables" | "nftables" | "ipvs" => {}
        other => loaded.unknown.push(format!("mode {other}")),
    }
    let section = match file.mode.as_str() {
        "nftables" => &file.nftables,
        "ipvs" => &file.ipvs,
        _ => &file.iptables,
    };
    if let Some(sec) = section {
        loaded.settings.resync_interval = duration(path, "syncPeriod", &sec.sync_period)?;
        loaded.settings.min_sync_interval = duration(path, "minSyncPeriod", &sec.min_sync_period)?;
    }
    for (name, sec) in [
        ("iptables", &file.iptables),
        ("nftables", &file.nftables),
        ("ipvs", &file.ipvs),
    ] {
        let Some(sec) = sec else { continue };
        for (key, value) in &sec.other {
            let set = !matches!(value, Value::Null)
                && value != &Value::Bool(false)
                && value.as_str().is_none_or(|v| !v.is_empty())
                && value.as_array().is_none_or(|v| !v.is_empty());
            if set {
                loaded
                    .ignored
                    .push(format!("{name}.{key}: no meaning for netlb"));
            }
        }
    }
    Ok(())
}

/// `conntrack`: the timeouts netlb's own table takes.
fn read_conntrack(
    path: &std::path::Path,
    file: &File,
    loaded: &mut Loaded,
) -> Result<(), KubeProxyConfigError> {
    let Some(ct) = &file.conntrack else {
        return Ok(());
    };
    loaded.settings.tcp_established_timeout = duration(
        path,
        "conntrack.tcpEstablishedTimeout",
        &ct.tcp_established_timeout,
    )?;
    loaded.settings.udp_timeout = duration(path, "conntrack.udpTimeout", &ct.udp_timeout)?;
    for (key, value) in &ct.other {
        if !matches!(value, Value::Null) {
            loaded.ignored.push(format!(
                "conntrack.{key}: netlb's own connection table does not use it"
            ));
        }
    }
    Ok(())
}

/// Reads and parses `path`.
pub fn load(path: &std::path::Path) -> Result<Loaded, KubeProxyConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| KubeProxyConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What kubeadm v1.36 writes into the kube-proxy ConfigMap
    /// (`config.conf`), with a pod subnet.
    pub const KUBEADM: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
bindAddress: 0.0.0.0
bindAddressHardFail: false
clientConnection:
  acceptContentTypes: ""
  burst: 0
  contentType: ""
  kubeconfig: /var/lib/kube-proxy/kubeconfig.conf
  qps: 0
clusterCIDR: 10.244.0.0/16
configSyncPeriod: 0s
conntrack:
  maxPerCore: null
  min: null
  tcpBeLiberal: false
  tcpCloseWaitTimeout: null
  tcpEstablishedTimeout: null
  udpStreamTimeout: 0s
  udpTimeout: 0s
detectLocal:
  bridgeInterface: ""
  interfaceNamePrefix: ""
detectLocalMode: ""
enableProfiling: false
healthzBindAddress: ""
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
ipvs:
  excludeCIDRs: null
  minSyncPeriod: 0s
  scheduler: ""
  strictARP: false
  syncPeriod: 0s
  tcpFinTimeout: 0s
  tcpTimeout: 0s
  udpTimeout: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: ""
mode: ""
nftables:
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
winkernel:
  enableDSR: false
  forwardHealthCheckVip: false
  networkName: ""
  rootHnsEndpointName: ""
  sourceVip: ""
"#;

    #[test]
    fn kubeadms_file_gives_its_kubeconfig_and_cluster_cidr_and_nothing_unknown() {
        let loaded = parse(std::path::Path::new("config.conf"), KUBEADM).unwrap();
        assert_eq!(
            loaded.settings,
            FileSettings {
                kubeconfig: Some(PathBuf::from("/var/lib/kube-proxy/kubeconfig.conf")),
                cluster_cidr: Some(vec!["10.244.0.0/16".into()]),
                ..Default::default()
            }
        );
        assert!(loaded.unknown.is_empty(), "{:?}", loaded.unknown);
    }

    #[test]
    fn set_fields_map_and_unknown_ones_are_reported() {
        let text = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
hostnameOverride: worker-1
healthzBindAddress: 0.0.0.0:10266
metricsBindAddress: 127.0.0.1:10259
clusterCIDR: 10.244.0.0/16,fd00:10:244::/56
nodePortAddresses: [primary]
mode: nftables
nftables: {syncPeriod: 45s, minSyncPeriod: 2s, masqueradeAll: true}
iptables: {syncPeriod: 99s}
conntrack: {tcpEstablishedTimeout: 24h0m0s, udpTimeout: 30s, maxPerCore: 32768}
detectLocalMode: NodeCIDR
fancyNewField: 1
"#;
        let loaded = parse(std::path::Path::new("f"), text).unwrap();
        let s = &loaded.settings;
        assert_eq!(s.hostname_override.as_deref(), Some("worker-1"));
        assert_eq!(s.healthz_bind_address.as_deref(), Some("0.0.0.0:10266"));
        assert_eq!(s.metrics_bind_address.as_deref(), Some("127.0.0.1:10259"));
        assert_eq!(s.cluster_cidr.as_ref().unwrap().len(), 2);
        assert_eq!(s.nodeport_addresses, Some(vec!["primary".to_owned()]));
        assert_eq!(s.resync_interval, Some(Duration::from_secs(45)));
        assert_eq!(s.min_sync_interval, Some(Duration::from_secs(2)));
        assert_eq!(s.tcp_established_timeout, Some(Duration::from_secs(86400)));
        assert_eq!(s.udp_timeout, Some(Duration::from_secs(30)));
        assert_eq!(loaded.unknown, vec!["fancyNewField".to_owned()]);
        let ignored = loaded.ignored.join("; ");
        assert!(ignored.contains("nftables.masqueradeAll"), "{ignored}");
        assert!(ignored.contains("conntrack.maxPerCore"), "{ignored}");
        assert!(ignored.contains("detectLocalMode NodeCIDR"), "{ignored}");
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let p = std::path::Path::new("f");
        assert!(matches!(
            parse(p, "apiVersion: v1\nkind: ConfigMap\n"),
            Err(KubeProxyConfigError::Kind { .. })
        ));
        assert!(matches!(
            parse(p, "- [a"),
            Err(KubeProxyConfigError::Yaml { .. })
        ));
        assert!(matches!(
            parse(
                p,
                "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\niptables: {syncPeriod: soon}\n"
            ),
            Err(KubeProxyConfigError::Duration { .. })
        ));
    }
}
