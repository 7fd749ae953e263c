//! Prometheus metrics, kube-proxy's names where kube-proxy has an
//! equivalent (`kubeproxy_*`), netlb's own otherwise (`netlb_*`), and the
//! kube-proxy-compatible health state behind `/healthz` and `/livez`. The
//! state is kept here; `prometheus-client` encodes it on every scrape (a
//! collector over a snapshot), in the OpenMetrics text format.

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant, SystemTime},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, NoLabelSet},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use netlb_common::stat;

/// A cumulative histogram with fixed upper bounds (seconds).
#[derive(Clone, Debug)]
pub struct Histogram {
    bounds: Vec<f64>,
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: Vec<f64>) -> Self {
        let counts = vec![0; bounds.len()];
        Self {
            bounds,
            counts,
            sum: 0.0,
            count: 0,
        }
    }

    pub fn observe(&mut self, value: f64) {
        for (bound, count) in self.bounds.iter().zip(self.counts.iter_mut()) {
            if value <= *bound {
                *count += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }

    /// Encodes the histogram (the encoder takes per-bucket counts, the
    /// last bucket unbounded).
    fn encode(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
    ) -> Result<(), std::fmt::Error> {
        let mut buckets = Vec::with_capacity(self.bounds.len() + 1);
        let mut below = 0;
        for (bound, cumulative) in self.bounds.iter().zip(&self.counts) {
            buckets.push((*bound, cumulative - below));
            below = *cumulative;
        }
        buckets.push((f64::MAX, self.count - below));
        let mut metric = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
        metric.encode_histogram::<NoLabelSet>(self.sum, self.count, &buckets, None)
    }
}

/// Sync durations: kube-proxy's `sync_proxy_rules_duration_seconds` buckets
/// (exponential from 1 ms), with finer ones below.
fn sync_buckets() -> Vec<f64> {
    let mut b = vec![0.0001, 0.00025, 0.0005];
    let mut v = 0.001;
    for _ in 0..15 {
        b.push(v);
        v *= 2.0;
    }
    b
}

/// Network programming latency: kube-proxy's buckets (0.25 s .. 420 s) with
/// millisecond ones in front, since netlb programs in milliseconds.
fn programming_buckets() -> Vec<f64> {
    let mut b = vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5];
    b.extend((1..=59).map(f64::from));
    b.extend((0..12).map(|i| 60.0 + 5.0 * f64::from(i)));
    b.extend((0..12).map(|i| 300.0 + 10.0 * f64::from(i)));
    b
}

#[derive(Debug, Clone)]
struct State {
    sync_duration: Histogram,
    /// Full syncs (the first, and the verification resyncs) and partial ones.
    full_sync_duration: Histogram,
    partial_sync_duration: Histogram,
    /// When the last change was queued for a sync.
    last_queued: Option<SystemTime>,
    /// Services and EndpointSlices both listed and programmed once.
    initial_sync_complete: bool,
    /// Service ports with a Local traffic policy and no local endpoints
    /// (internal, external), at the last sync.
    no_local_endpoints: (u64, u64),
    livez: BTreeMap<u16, u64>,
    programming_latency: Histogram,
    last_sync: Option<SystemTime>,
    syncs: u64,
    sync_errors: BTreeMap<String, u64>,
    invalid_objects: BTreeMap<String, u64>,
    /// Map entries the verification resync found different, by map.
    repairs: BTreeMap<&'static str, u64>,
    /// Frontends programmed without a feature because its map is full, by
    /// map: (now, ever).
    degraded: BTreeMap<&'static str, (u64, u64)>,
    programmed_frontends: u64,
    programmed_backends: u64,
    healthz: BTreeMap<u16, u64>,
    /// kube-proxy's health state: last successful sync, oldest pending change.
    last_updated: Option<SystemTime>,
    oldest_pending: Option<Instant>,
    node_eligible: bool,
    datapath: [u64; stat::COUNT as usize],
    watch_errors: u64,
    conntrack: ConntrackMetrics,
    /// Lists that fail for good (403, 404): health says so.
    source_failures: Vec<String>,
    /// Since when a source has been failing (the longest outage going on).
    source_outage: Option<Instant>,
    /// Entries in use and capacity of the maps the syncer fills.
    map_fill: BTreeMap<&'static str, (u64, u64)>,
    /// Highest fill level warned about, per map.
    fill_warned: BTreeMap<&'static str, u8>,
    /// Map entries written and deleted by syncs, and Services recomputed.
    map_writes: u64,
    map_deletes: u64,
    services_recomputed: u64,
}

/// What one sync did, for the counters.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncCounts {
    pub frontends: u64,
    pub backends: u64,
    pub writes: u64,
    pub deletes: u64,
    pub recomputed: u64,
}

/// What the conntrack garbage collector reports.
#[derive(Debug, Default, Clone)]
struct ConntrackMetrics {
    entries: u64,
    capacity: u64,
    connections: [u64; 3],
    nat_ports_in_use: u64,
    sweeps: u64,
    deleted: BTreeMap<&'static str, u64>,
    last_sweep_seconds: f64,
}

/// All metrics of one agent; shared between the sync loop and the HTTP
/// server.
#[derive(Debug)]
pub struct Metrics {
    state: Mutex<State>,
    health_timeout: Duration,
}

/// The `/healthz` answer.
pub struct Health {
    pub healthy: bool,
    pub node_eligible: bool,
    pub body: String,
}

/// Go's `time.Time.String()` layout in UTC, which kube-proxy's health body
/// uses (`2006-01-02 15:04:05.999999999 +0000 UTC`).
fn go_time(t: SystemTime) -> String {
    let Ok(ts) = k8s_openapi::jiff::Timestamp::try_from(t) else {
        return String::new();
    };
    // `%.f`: the fraction without trailing zeros (none when zero), as Go.
    ts.strftime("%Y-%m-%d %H:%M:%S%.f +0000 UTC").to_string()
}

impl Metrics {
    /// `health_timeout`: how long a recorded change may wait for a sync
    /// before `/healthz` fails (kube-proxy: twice the sync period).
    pub fn new(health_timeout: Duration) -> Self {
        Self {
            state: Mutex::new(State {
                sync_duration: Histogram::new(sync_buckets()),
                full_sync_duration: Histogram::new(sync_buckets()),
                partial_sync_duration: Histogram::new(sync_buckets()),
                last_queued: None,
                initial_sync_complete: false,
                no_local_endpoints: (0, 0),
                livez: BTreeMap::new(),
                programming_latency: Histogram::new(programming_buckets()),
                last_sync: None,
                syncs: 0,
                sync_errors: BTreeMap::new(),
                invalid_objects: BTreeMap::new(),
                repairs: BTreeMap::new(),
                degraded: BTreeMap::new(),
                programmed_frontends: 0,
                programmed_backends: 0,
                healthz: BTreeMap::new(),
                last_updated: None,
                oldest_pending: None,
                node_eligible: true,
                datapath: [0; stat::COUNT as usize],
                watch_errors: 0,
                conntrack: ConntrackMetrics::default(),
                source_failures: Vec::new(),
                source_outage: None,
                fill_warned: BTreeMap::new(),
                map_fill: BTreeMap::new(),
                map_writes: 0,
                map_deletes: 0,
                services_recomputed: 0,
            }),
            health_timeout,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        crate::support::lock(&self.state)
    }

    /// A change was recorded and awaits a sync (kube-proxy's QueuedUpdate).
    pub fn queued_update(&self) {
        let mut s = self.lock();
        s.last_queued = Some(SystemTime::now());
        if s.oldest_pending.is_none() {
            s.oldest_pending = Some(Instant::now());
        }
    }

    /// A wake-up found nothing to program: no change is waiting.
    pub fn nothing_pending(&self) {
        self.lock().oldest_pending = None;
    }

    /// The first sync after Services and EndpointSlices were listed is done.
    pub fn initial_sync_complete(&self) {
        self.lock().initial_sync_complete = true;
    }

    /// Service ports with a Local traffic policy and no local endpoints
    /// (internal, external).
    pub fn set_no_local_endpoints(&self, internal: u64, external: u64) {
        self.lock().no_local_endpoints = (internal, external);
    }

    /// A sync succeeded (kube-proxy's Updated); `full`: every Service was
    /// recomputed (the first sync, the verification resyncs).
    pub fn synced(&self, duration: Duration, full: bool, counts: SyncCounts) {
        let mut s = self.lock();
        s.map_writes += counts.writes;
        s.map_deletes += counts.deletes;
        s.services_recomputed += counts.recomputed;
        let SyncCounts {
            frontends,
            backends,
            ..
        } = counts;
        s.sync_duration.observe(duration.as_secs_f64());
        if full {
            s.full_sync_duration.observe(duration.as_secs_f64());
        } else {
            s.partial_sync_duration.observe(duration.as_secs_f64());
        }
        let now = SystemTime::now();
        s.last_sync = Some(now);
        s.last_updated = Some(now);
        s.oldest_pending = None;
        s.syncs += 1;
        s.programmed_frontends = frontends;
        s.programmed_backends = backends;
    }

    pub fn sync_failed(&self, reason: &str) {
        *self
            .lock()
            .sync_errors
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    /// The verification resync found `n` entries of `map` different from
    /// what was programmed (and repairs them).
    pub fn repaired(&self, map: &'static str, n: u64) {
        *self.lock().repairs.entry(map).or_default() += n;
    }

    pub fn invalid_object(&self, kind: &str) {
        *self
            .lock()
            .invalid_objects
            .entry(kind.to_owned())
            .or_default() += 1;
    }

    /// Time from an EndpointSlice change (its trigger time) to the sync that
    /// programmed it.
    pub fn programming_latency(&self, latency: Duration) {
        self.lock()
            .programming_latency
            .observe(latency.as_secs_f64());
    }

    pub fn set_node_eligible(&self, eligible: bool) {
        self.lock().node_eligible = eligible;
    }

    pub fn set_datapath_counters(&self, counters: [u64; stat::COUNT as usize]) {
        self.lock().datapath = counters;
    }

    /// A conntrack sweep finished.
    pub fn conntrack_swept(&self, report: &crate::datapath::conntrack::SweepReport) {
        let mut s = self.lock();
        let c = &mut s.conntrack;
        c.entries = report.entries as u64;
        c.capacity = u64::from(report.capacity);
        c.connections = report.connections;
        c.nat_ports_in_use = report.nat_ports_in_use;
        c.sweeps += 1;
        for (cause, n) in &report.deleted {
            *c.deleted.entry(cause).or_default() += n;
        }
        c.last_sweep_seconds = report.duration.as_secs_f64();
    }

    /// Since when a source has been failing, if one is.
    pub fn set_source_outage(&self, since: Option<Instant>) {
        self.lock().source_outage = since;
    }

    /// `/readyz`: whether the agent serves what the API says: its initial
    /// sync is done, its syncs keep up and its sources list (as
    /// `/healthz`), and no source has been failing for longer than the
    /// health timeout. Unlike kube-proxy's `/healthz` (healthy while
    /// starting up, until the health timeout), an agent that has programmed
    /// nothing yet is not ready.
    pub fn readiness(&self) -> Health {
        let s = self.lock();
        let outage = s.source_outage.map(|since| since.elapsed());
        let outage_ok = outage.is_none_or(|d| d < self.health_timeout);
        let ready = s.initial_sync_complete && self.is_healthy(&s) && outage_ok;
        let body = serde_json::json!({
            "ready": ready,
            "initialSync": s.initial_sync_complete,
            "syncsKeepUp": self.is_healthy(&s),
            "sourceOutageSeconds": outage.map(|d| d.as_secs_f64()),
            "healthTimeoutSeconds": self.health_timeout.as_secs_f64(),
            "errors": s.source_failures,
        })
        .to_string();
        Health {
            healthy: ready,
            node_eligible: s.node_eligible,
            body,
        }
    }

    /// Lists that fail for good (RBAC 403, a resource that does not
    /// exist): `/healthz` fails and says why, instead of reporting healthy
    /// with nothing programmed.
    pub fn set_source_failures(&self, failures: Vec<String>) {
        self.lock().source_failures = failures;
    }

    /// Whether `map`'s fill level `percent` (90 or more) is past the last
    /// one warned about.
    /// A map's entries in use and its capacity.
    pub fn set_map_fill(&self, map: &'static str, entries: u64, capacity: u64) {
        self.lock().map_fill.insert(map, (entries, capacity));
    }

    /// Frontends programmed without a feature because `map` is full: how
    /// many now, and how many ever became so.
    pub fn set_degraded(&self, map: &'static str, now: u64, ever: u64) {
        self.lock().degraded.insert(map, (now, ever));
    }

    /// Conntrack entries at the last sweep.
    pub fn conntrack_entries(&self) -> Option<u64> {
        let s = self.lock();
        (s.conntrack.sweeps > 0).then_some(s.conntrack.entries)
    }

    pub fn fill_crossed(&self, map: &'static str, percent: u8) -> bool {
        let mut s = self.lock();
        let last = s.fill_warned.get(map).copied().unwrap_or(89);
        if percent > last {
            s.fill_warned.insert(map, percent);
            true
        } else {
            false
        }
    }

    pub fn set_watch_errors(&self, errors: u64) {
        self.lock().watch_errors = errors;
    }

    fn is_healthy(&self, s: &State) -> bool {
        if !s.source_failures.is_empty() {
            return false;
        }
        match s.oldest_pending {
            Some(since) if s.last_updated.is_some() => since.elapsed() < self.health_timeout,
            // Healthy while starting up or when fully synced, as kube-proxy.
            _ => true,
        }
    }

    /// `/healthz` (`livez = false`) or `/livez` (ignores node eligibility).
    /// Whether the proxy itself is healthy (syncs keep up, sources list):
    /// what kube-proxy's service health checks consult. Unlike `/healthz`
    /// it ignores the node's eligibility: a node being deleted keeps
    /// serving its health-check node ports from its local endpoints while
    /// the load balancer drains it through `/healthz`.
    pub fn proxy_healthy(&self) -> bool {
        let s = self.lock();
        self.is_healthy(&s)
    }

    pub fn health(&self, livez: bool) -> Health {
        let mut s = self.lock();
        let healthy = self.is_healthy(&s) && (livez || s.node_eligible);
        let now = SystemTime::now();
        // Like kube-proxy: a healthy answer reports "now" as lastUpdated.
        let last_updated = if healthy {
            now
        } else {
            s.last_updated.unwrap_or(SystemTime::UNIX_EPOCH)
        };
        let code = if healthy { 200 } else { 503 };
        if livez {
            *s.livez.entry(code).or_default() += 1;
        } else {
            *s.healthz.entry(code).or_default() += 1;
        }
        let body = if livez {
            format!(
                "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\"}}",
                go_time(last_updated),
                go_time(now)
            )
        } else if !s.source_failures.is_empty() {
            // Not kube-proxy's body: kube-proxy has no such state. Says why.
            serde_json::json!({
                "lastUpdated": go_time(last_updated),
                "currentTime": go_time(now),
                "nodeEligible": s.node_eligible,
                "error": s.source_failures.join("; "),
            })
            .to_string()
        } else {
            format!(
                "{{\"lastUpdated\": \"{}\",\"currentTime\": \"{}\", \"nodeEligible\": {}}}",
                go_time(last_updated),
                go_time(now),
                s.node_eligible
            )
        };
        Health {
            healthy,
            node_eligible: s.node_eligible,
            body,
        }
    }

    /// The OpenMetrics text exposition (`/metrics`).
    pub fn render(&self) -> String {
        let snapshot = self.lock().clone();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(Snapshot(snapshot)));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
            out.clear();
        }
        out
    }
}

/// The content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The state as of one scrape.
#[derive(Debug)]
struct Snapshot(State);

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: u64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(value).encode(metric)
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: f64,
) -> Result<(), std::fmt::Error> {
    let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(value).encode(metric)
}

/// A family of `kind` with one label, one sample per `(label value,
/// value)`, each encoded by `encode` (none: not encoded, as the Go client
/// leaves out a vector without children).
fn labelled<'a, V>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, V)>,
    encode: impl Fn(V, prometheus_client::encoding::MetricEncoder) -> Result<(), std::fmt::Error>,
) -> Result<(), std::fmt::Error> {
    let samples: Vec<(&str, V)> = samples.into_iter().collect();
    if samples.is_empty() {
        return Ok(());
    }
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (value, n) in samples {
        let labels = [(label, value)];
        encode(n, metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A counter family with one label.
fn counter_family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, u64)>,
) -> Result<(), std::fmt::Error> {
    labelled(
        encoder,
        name,
        help,
        MetricType::Counter,
        label,
        samples,
        |n, m| ConstCounter::new(n).encode(m),
    )
}

/// A gauge family with one label.
fn gauge_family<'a>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    label: &str,
    samples: impl IntoIterator<Item = (&'a str, f64)>,
) -> Result<(), std::fmt::Error> {
    labelled(
        encoder,
        name,
        help,
        MetricType::Gauge,
        label,
        samples,
        |n, m| ConstGauge::new(n).encode(m),
    )
}

fn unix_seconds(t: Option<SystemTime>) -> f64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Collector for Snapshot {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let e = &mut e;
        encode_sync(e, s)?;
        encode_health(e, s)?;
        encode_counts(e, s)?;
        encode_sources(e, s)?;
        encode_maps(e, s)?;
        encode_conntrack(e, s)?;
        encode_datapath(e, s)?;
        Ok(())
    }
}

/// kube-proxy's sync durations, programming latency and timestamps.
fn encode_sync(e: &mut DescriptorEncoder, s: &State) -> Result<(), std::fmt::Error> {
    s.sync_duration.encode(
        e,
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "Sync duration: desired state computed and datapath maps updated.",
    )?;
    s.full_sync_duration.encode(
        e,
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "Duration of full syncs (the first, and the verification resyncs).",
    )?;
    s.partial_sync_duration.encode(
        e,
        "kubeproxy_sync_partial_proxy_rules_duration_seconds",
        "Duration of partial syncs (changed Services only).",
    )?;
    s.programming_latency.encode(
            e,
            "kubeproxy_network_programming_duration_seconds",
            "From an EndpointSlice change (endpoints.kubernetes.io/last-change-trigger-time) to the sync that programmed it.",
        )?;
    gauge(
        e,
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "The last time a sync succeeded.",
        unix_seconds(s.last_sync),
    )?;
    gauge(
        e,
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "The last time a change was queued for a sync.",
        unix_seconds(s.last_queued),
    )?;
    gauge_family(
        e,
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "Service ports with a Local traffic policy and no local endpoints, by policy.",
        "traffic_policy",
        [
            ("internal", s.no_local_endpoints.0 as f64),
            ("external", s.no_local_endpoints.1 as f64),
        ],
    )?;
    Ok(())
}

/// Answers of the health endpoints, by code.
fn encode_health(e: &mut DescriptorEncoder, s: &State) -> Result<(), std::fmt::Error> {
    let codes = |m: &BTreeMap<u16, u64>| -> Vec<(String, u64)> {
        m.iter().map(|(c, n)| (c.to_string(), *n)).collect()
    };
    let healthz = codes(&s.healthz);
    counter_family(
        e,
        "kubeproxy_proxy_healthz",
        "/healthz answers by code.",
        "code",
        healthz.iter().map(|(c, n)| (c.as_str(), *n)),
    )?;
    let livez = codes(&s.livez);
    counter_family(
        e,
        "kubeproxy_proxy_livez",
        "/livez answers by code.",
        "code",
        livez.iter().map(|(c, n)| (c.as_str(), *n)),
    )?;
    Ok(())
}

/// What syncs did, and what is programmed.
fn encode_counts(e: &mut DescriptorEncoder, s: &State) -> Result<(), std::fmt::Error> {
    counter(e, "netlb_syncs", "Successful syncs.", s.syncs)?;
    gauge(
        e,
        "netlb_initial_sync_complete",
        "1 once Services and EndpointSlices were listed and programmed.",
        if s.initial_sync_complete { 1.0 } else { 0.0 },
    )?;
    counter(
        e,
        "netlb_sync_map_writes",
        "Datapath map entries written by syncs.",
        s.map_writes,
    )?;
    counter(
        e,
        "netlb_sync_map_deletes",
        "Datapath map entries deleted by syncs.",
        s.map_deletes,
    )?;
    counter(
        e,
        "netlb_sync_services_recomputed",
        "Services whose model was recomputed by syncs (changed ones, and the verification resync's).",
        s.services_recomputed,
    )?;
    counter_family(
        e,
        "netlb_sync_errors",
        "Failed syncs by reason.",
        "reason",
        s.sync_errors.iter().map(|(k, v)| (k.as_str(), *v)),
    )?;
    counter_family(
        e,
        "netlb_sync_repairs",
        "Map entries the verification resync found different from what the agent programmed (lost writes, a crash's leftovers, changes behind its back) and repaired, by map.",
        "map",
        s.repairs.iter().map(|(k, v)| (*k, *v)),
    )?;
    counter_family(
        e,
        "netlb_invalid_objects",
        "Objects the model could not use, by kind.",
        "kind",
        s.invalid_objects.iter().map(|(k, v)| (k.as_str(), *v)),
    )?;
    gauge(
        e,
        "netlb_programmed_frontends",
        "Frontends programmed in the datapath.",
        s.programmed_frontends as f64,
    )?;
    gauge(
        e,
        "netlb_programmed_backends",
        "Backends programmed in the datapath.",
        s.programmed_backends as f64,
    )?;
    Ok(())
}

/// The API source.
fn encode_sources(e: &mut DescriptorEncoder, s: &State) -> Result<(), std::fmt::Error> {
    gauge_family(
        e,
        "netlb_source_list_failing",
        "Lists that fail for good (403, 404), by message.",
        "message",
        s.source_failures.iter().map(|m| (m.as_str(), 1.0)),
    )?;
    counter(
        e,
        "netlb_watch_errors",
        "API watch errors (retried with backoff).",
        s.watch_errors,
    )?;
    Ok(())
}

/// Fill of every map, and frontends without a feature for want of room.
fn encode_maps(e: &mut DescriptorEncoder, s: &State) -> Result<(), std::fmt::Error> {
    gauge_family(
        e,
        "netlb_map_entries",
        "Entries in use of the datapath maps, by map (the LRUs counted now and then, conntrack at the last sweep).",
        "map",
        s.map_fill.iter().map(|(m, (n, _))| (*m, *n as f64)),
    )?;
    gauge_family(
        e,
        "netlb_map_capacity",
        "Capacity of the datapath maps, by map (their --max-* flags).",
        "map",
        s.map_fill.iter().map(|(m, (_, c))| (*m, *c as f64)),
    )?;
    gauge_family(
        e,
        "netlb_frontends_degraded",
        "Frontends programmed without a feature because its map is full (session affinity, new loadBalancerSourceRanges), by map; retried until they fit.",
        "map",
        s.degraded.iter().map(|(m, (now, _))| (*m, *now as f64)),
    )?;
    counter_family(
        e,
        "netlb_map_full",
        "Times a frontend had to be programmed without a feature because its map was full, by map.",
        "map",
        s.degraded.iter().map(|(m, (_, ever))| (*m, *ever)),
    )?;
    Ok(())
}

/// Connection tracking and its collector.
fn encode_conntrack(e: &mut DescriptorEncoder, s: &State) -> Result<(), std::fmt::Error> {
    let c = &s.conntrack;
    gauge_family(
        e,
        "netlb_conntrack_connections",
        "Tracked connections by state (at the last sweep).",
        "state",
        [
            netlb_common::CtState::Opening,
            netlb_common::CtState::Established,
            netlb_common::CtState::Closing,
        ]
        .into_iter()
        .map(|state| (state.name(), c.connections[state as usize] as f64)),
    )?;
    gauge(
        e,
        "netlb_conntrack_entries",
        "Conntrack map entries (connections and their links) at the last sweep.",
        c.entries as f64,
    )?;
    gauge(
        e,
        "netlb_conntrack_capacity",
        "Conntrack map size.",
        c.capacity as f64,
    )?;
    gauge(
        e,
        "netlb_nat_ports_in_use",
        "North-south SNAT ports held by live connections.",
        c.nat_ports_in_use as f64,
    )?;
    counter(
        e,
        "netlb_conntrack_gc_sweeps",
        "Conntrack garbage collection sweeps.",
        c.sweeps,
    )?;
    gauge(
        e,
        "netlb_conntrack_gc_last_sweep_seconds",
        "Duration of the last sweep.",
        c.last_sweep_seconds,
    )?;
    counter_family(
        e,
        "netlb_conntrack_gc_deleted",
        "Conntrack entries deleted by the garbage collector, by cause.",
        "cause",
        crate::datapath::conntrack::Cause::ALL
            .into_iter()
            .map(|cause| {
                (
                    cause.name(),
                    c.deleted.get(cause.name()).copied().unwrap_or(0),
                )
            }),
    )?;
    Ok(())
}

/// The datapath's counters.
fn encode_datapath(e: &mut DescriptorEncoder, s: &State) -> Result<(), std::fmt::Error> {
    counter_family(
        e,
        "netlb_datapath_drops",
        "Packets dropped by the datapath, by reason.",
        "reason",
        s.datapath
            .iter()
            .enumerate()
            .filter(|(i, _)| stat::is_drop(*i as u32))
            .map(|(i, v)| (stat::NAMES[i], *v)),
    )?;
    counter_family(
        e,
        "netlb_datapath_packets",
        "Packets handled by the datapath, by outcome.",
        "counter",
        s.datapath
            .iter()
            .enumerate()
            .filter(|(i, _)| !stat::is_drop(*i as u32))
            .map(|(i, v)| (stat::NAMES[i], *v)),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_time_layout() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_795_000_000, 120_000_000);
        assert_eq!(go_time(t), "2026-11-18 11:06:40.12 +0000 UTC");
        assert_eq!(
            go_time(SystemTime::UNIX_EPOCH),
            "1970-01-01 00:00:00 +0000 UTC"
        );
    }

    #[test]
    fn health_follows_kube_proxy() {
        let m = Metrics::new(Duration::from_millis(50));
        // Starting up: healthy.
        assert!(m.health(false).healthy);
        m.queued_update();
        // Queued but never updated yet: still healthy (no lastUpdated).
        assert!(m.health(false).healthy);
        m.synced(
            Duration::from_millis(1),
            false,
            SyncCounts {
                frontends: 1,
                backends: 1,
                ..Default::default()
            },
        );
        m.queued_update();
        assert!(m.health(false).healthy, "pending but not late");
        std::thread::sleep(Duration::from_millis(80));
        let h = m.health(false);
        assert!(!h.healthy, "pending past the timeout");
        assert!(h.body.contains("\"nodeEligible\": true"), "{}", h.body);
        m.synced(
            Duration::from_millis(1),
            false,
            SyncCounts {
                frontends: 1,
                backends: 1,
                ..Default::default()
            },
        );
        assert!(m.health(false).healthy);
        m.set_node_eligible(false);
        assert!(!m.health(false).healthy);
        assert!(m.health(true).healthy, "livez ignores the node");
        // So do the Services' health checks (kube-proxy's IsHealthy).
        assert!(m.proxy_healthy());
        let text = m.render();
        assert!(
            text.contains("kubeproxy_proxy_healthz_total{code=\"503\"} 2"),
            "{text}"
        );
        assert!(text.contains("kubeproxy_sync_proxy_rules_duration_seconds_count 2"));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let m = Metrics::new(Duration::from_secs(1));
        for (micros, full) in [(50, true), (500, false), (5_000_000, false)] {
            m.synced(Duration::from_micros(micros), full, SyncCounts::default());
        }
        let text = m.render();
        let line = |prefix: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix))
                .unwrap_or_else(|| panic!("{prefix} missing:\n{text}"))
                .to_owned()
        };
        assert!(
            line("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.0001\"}")
                .ends_with(" 1")
        );
        assert!(
            line("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"0.001\"}")
                .ends_with(" 2")
        );
        assert!(
            line("kubeproxy_sync_proxy_rules_duration_seconds_bucket{le=\"+Inf\"}").ends_with(" 3")
        );
        assert!(line("kubeproxy_sync_full_proxy_rules_duration_seconds_count").ends_with(" 1"));
        assert!(line("kubeproxy_sync_partial_proxy_rules_duration_seconds_count").ends_with(" 2"));
    }

    /// The exposition parses with an OpenMetrics/Prometheus text-format
    /// parser, with kube-proxy's names and the types kube-proxy gives them.
    #[test]
    fn names_and_types_parse_with_an_openmetrics_parser() {
        use openmetrics_parser::OpenMetricsType as T;
        let m = Metrics::new(Duration::from_secs(1));
        m.queued_update();
        m.synced(Duration::from_millis(2), true, SyncCounts::default());
        m.programming_latency(Duration::from_millis(3));
        m.sync_failed("frontend");
        let _ = m.health(false);
        let _ = m.health(true);
        let text = m.render();
        let exposition = openmetrics_parser::openmetrics::parse_openmetrics(&text)
            .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
        for (family, want) in [
            ("kubeproxy_sync_proxy_rules_duration_seconds", T::Histogram),
            (
                "kubeproxy_sync_full_proxy_rules_duration_seconds",
                T::Histogram,
            ),
            (
                "kubeproxy_sync_partial_proxy_rules_duration_seconds",
                T::Histogram,
            ),
            (
                "kubeproxy_network_programming_duration_seconds",
                T::Histogram,
            ),
            (
                "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
                T::Gauge,
            ),
            (
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
                T::Gauge,
            ),
            (
                "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
                T::Gauge,
            ),
            ("kubeproxy_proxy_healthz", T::Counter),
            ("kubeproxy_proxy_livez", T::Counter),
            ("netlb_sync_errors", T::Counter),
            ("netlb_programmed_frontends", T::Gauge),
            ("netlb_datapath_drops", T::Counter),
            ("netlb_conntrack_connections", T::Gauge),
        ] {
            let found = exposition
                .families
                .get(family)
                .unwrap_or_else(|| panic!("{family} missing:\n{text}"));
            assert_eq!(found.family_type, want, "{family}");
        }
        // The samples carry the names scrapers and dashboards use.
        assert!(
            text.contains("kubeproxy_proxy_healthz_total{code=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("kubeproxy_proxy_livez_total{code=\"200\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("netlb_sync_errors_total{reason=\"frontend\"} 1"),
            "{text}"
        );
    }
}
