//! `netlb-agent status`: one screen on a running agent, from its
//! `/healthz`, its `/metrics` and the pinned maps.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use anyhow::Context as _;
use netlb_agent::{
    cli::list,
    datapath::{
        layout::{links_dir, maps_dir},
        loader,
    },
};
use openmetrics_parser::{OpenMetricsValue, openmetrics::parse_openmetrics};

use crate::Output;

/// One screen on a running agent: health, last sync, sources, programmed
/// Services and backends, map fill levels, attached interfaces.
#[derive(clap::Args)]
pub struct StatusArgs {
    #[arg(long, default_value = "/sys/fs/bpf/netlb")]
    bpffs: PathBuf,
    /// The agent's metrics address (`/metrics`).
    #[arg(long, default_value = "127.0.0.1:10249")]
    metrics_address: SocketAddr,
    /// The agent's health address (`/healthz`).
    #[arg(long, default_value = "127.0.0.1:10256")]
    healthz_address: SocketAddr,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Default, serde::Serialize)]
struct Status {
    healthz: Option<(u16, String)>,
    initial_sync_complete: Option<bool>,
    last_sync_unix_seconds: Option<f64>,
    syncs: Option<f64>,
    sync_mean_seconds: Option<f64>,
    programmed_frontends: Option<f64>,
    programmed_backends: Option<f64>,
    failing_lists: Vec<String>,
    maps: Vec<list::MapFill>,
    interfaces: Vec<String>,
    errors: Vec<String>,
}

impl StatusArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let mut status = Status {
            interfaces: loader::pinned_interfaces_in(&links_dir(&self.bpffs)),
            ..Default::default()
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        match http_get(&runtime, self.healthz_address, "/healthz") {
            Ok(answer) => status.healthz = Some(answer),
            Err(e) => status
                .errors
                .push(format!("{}/healthz: {e:#}", self.healthz_address)),
        }
        match http_get(&runtime, self.metrics_address, "/metrics") {
            Ok((200, text)) => status.read_metrics(&text, self.metrics_address),
            Ok((code, _)) => status
                .errors
                .push(format!("{}/metrics: HTTP {code}", self.metrics_address)),
            Err(e) => status
                .errors
                .push(format!("{}/metrics: {e:#}", self.metrics_address)),
        }
        match list::fill(&maps_dir(&self.bpffs)) {
            Ok(maps) => status.maps = maps,
            Err(e) => status
                .errors
                .push(format!("maps pinned in {}: {e}", self.bpffs.display())),
        }
        crate::print(self.output, &status, || status.table())
    }
}

impl Status {
    /// What the agent's metrics say.
    fn read_metrics(&mut self, text: &str, from: SocketAddr) {
        let exposition = match parse_openmetrics(text) {
            Ok(exposition) => exposition,
            Err(e) => {
                self.errors
                    .push(format!("{from}/metrics: unparsable: {e:?}"));
                return;
            }
        };
        // The first sample of `family`; a histogram gives its mean.
        let value = |family: &str| -> Option<f64> {
            let f = exposition.families.get(family)?;
            f.iter_samples().next().map(|s| sample_value(&s.value))
        };
        self.initial_sync_complete = value("netlb_initial_sync_complete").map(|v| v >= 1.0);
        self.last_sync_unix_seconds =
            value("kubeproxy_sync_proxy_rules_last_timestamp_seconds").filter(|v| *v > 0.0);
        self.syncs = value("netlb_syncs");
        // A mean over no sync is no figure (NaN before the first).
        self.sync_mean_seconds =
            value("kubeproxy_sync_proxy_rules_duration_seconds").filter(|v| v.is_finite());
        self.programmed_frontends = value("netlb_programmed_frontends");
        self.programmed_backends = value("netlb_programmed_backends");
        if let Some(f) = exposition.families.get("netlb_source_list_failing") {
            self.failing_lists = f
                .iter_samples()
                .filter_map(|s| {
                    s.get_labelset()
                        .ok()?
                        .get_label_value("message")
                        .map(str::to_owned)
                })
                .collect();
        }
    }

    /// The one screen.
    fn table(&self) -> String {
        let opt = |v: Option<f64>| v.map(|v| format!("{v:.0}")).unwrap_or_else(|| "?".into());
        let health = match &self.healthz {
            Some((code, body)) => format!(
                "{} {}",
                if *code == 200 { "healthy" } else { "UNHEALTHY" },
                body.trim()
            ),
            None => "unreachable".into(),
        };
        let initial = match self.initial_sync_complete {
            Some(true) => "complete",
            Some(false) => "waiting for Services and EndpointSlices to be listed",
            None => "?",
        };
        let last = self.last_sync_unix_seconds.map(|t| {
            let ago = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|now| now.as_secs_f64() - t)
                .unwrap_or(0.0);
            format!("{:.1} s ago", ago.max(0.0))
        });
        let mean = self
            .sync_mean_seconds
            .map(|s| format!("{:.2} ms", s * 1000.0))
            .unwrap_or_else(|| "-".into());
        let sources = if self.failing_lists.is_empty() {
            "no failing list".to_owned()
        } else {
            format!("FAILING: {}", self.failing_lists.join("; "))
        };
        let mut out = format!(
            "health        {health}\n\
             initial sync  {initial}\n\
             last sync     {}; {} syncs, {mean} on average\n\
             sources       {sources}\n\
             programmed    {} frontends, {} backends\n",
            last.unwrap_or_else(|| "never".into()),
            opt(self.syncs),
            opt(self.programmed_frontends),
            opt(self.programmed_backends)
        );
        for m in &self.maps {
            let percent = if m.capacity > 0 {
                m.entries as f64 * 100.0 / f64::from(m.capacity)
            } else {
                0.0
            };
            out += &format!(
                "map           {:<16} {:>8} / {:<8} ({percent:.1} %)\n",
                m.map, m.entries, m.capacity
            );
        }
        let interfaces = if self.interfaces.is_empty() {
            "none".to_owned()
        } else {
            self.interfaces.join(", ")
        };
        out += &format!("interfaces    {interfaces}\n");
        for e in &self.errors {
            out += &format!("error         {e}\n");
        }
        out
    }
}

/// A sample's value; a histogram's mean (NaN without observations).
fn sample_value(value: &OpenMetricsValue) -> f64 {
    match value {
        OpenMetricsValue::Gauge(v) => v.as_f64(),
        OpenMetricsValue::Counter(c) => c.value.as_f64(),
        OpenMetricsValue::Histogram(h) => match (h.sum.as_ref(), h.count) {
            (Some(sum), Some(n)) if n > 0 => sum.as_f64() / n as f64,
            _ => f64::NAN,
        },
        _ => f64::NAN,
    }
}

/// GET `path` from `addr`: (status, body). One HTTP/1.1 request with hyper
/// on `runtime`.
fn http_get(
    runtime: &tokio::runtime::Runtime,
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    use http_body_util::BodyExt as _;
    runtime.block_on(async {
        let stream =
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .context("timed out")??;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = http::Request::get(path)
            .header("Host", addr.to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())?;
        let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
            .await
            .context("timed out")??;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    })
}
