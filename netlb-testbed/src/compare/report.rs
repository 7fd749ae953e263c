//! The comparison's outputs: `results.json` (every sample), `samples.csv`,
//! `summary.csv`, `summary.md` and SVG plots against the number of
//! Services, one line per mode.

use std::{collections::BTreeMap, path::Path};

use plotters::prelude::*;
use serde::{Deserialize, Serialize};

use super::{CompareError, Mode, Results, Sample};
use crate::load::percentile;

/// Where the figures came from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub cpu: String,
    pub cpus: usize,
    pub kernel: String,
    pub memory_gib: f64,
}

impl Machine {
    pub fn read() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        Self {
            cpu: cpuinfo
                .lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_owned())
                .unwrap_or_else(|| "unknown".into()),
            cpus: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            memory_gib: meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .map(|kib| (kib / 1024.0 / 1024.0 * 10.0).round() / 10.0)
                .unwrap_or(0.0),
        }
    }
}

pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// One mode at one scale, over the rounds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Summary {
    pub services: usize,
    pub mode: Mode,
    pub rounds: usize,
    pub pod_crr_rate: f64,
    /// Median over rounds of this mode's rate / `direct`'s in the same round.
    pub pod_crr_vs_direct: Option<f64>,
    pub pod_crr_p50_ms: f64,
    pub pod_crr_p99_ms: f64,
    pub nodeport_crr_rate: f64,
    pub nodeport_crr_vs_direct: Option<f64>,
    pub nodeport_crr_p99_ms: f64,
    pub pod_rr_rate: f64,
    pub iperf_gbps: f64,
    pub program_seconds: Option<f64>,
    pub program_cpu_seconds: Option<f64>,
    pub proxy_rss_mib: Option<f64>,
    pub programming_latency_p50_ms: Option<f64>,
    pub programming_latency_p99_ms: Option<f64>,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// Nearest-rank quantile of float samples.
fn quantile(v: &[f64], q: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    // Microsecond integers keep one quantile definition for the harness.
    let mut us: Vec<u64> = v.iter().map(|ms| (ms * 1000.0).round() as u64).collect();
    us.sort_unstable();
    Some(percentile(&us, q) as f64 / 1000.0)
}

pub fn summarize(samples: &[Sample]) -> Vec<Summary> {
    let mut groups: BTreeMap<(usize, Mode), Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        groups.entry((s.services, s.mode)).or_default().push(s);
    }
    let direct = |services: usize, round: usize| {
        samples
            .iter()
            .find(|s| s.services == services && s.round == round && s.mode == Mode::Direct)
    };
    groups
        .iter()
        .map(|(&(services, mode), group)| {
            let m = |f: &dyn Fn(&Sample) -> f64| {
                median(group.iter().map(|s| f(s)).collect()).unwrap_or(0.0)
            };
            let ratio = |f: &dyn Fn(&Sample) -> f64| {
                median(
                    group
                        .iter()
                        .filter_map(|s| {
                            let d = f(direct(services, s.round)?);
                            (d > 0.0).then(|| f(s) / d)
                        })
                        .collect(),
                )
            };
            let latencies: Vec<f64> = group
                .iter()
                .flat_map(|s| s.programming_latency_ms.iter().copied())
                .collect();
            Summary {
                services,
                mode,
                rounds: group.len(),
                pod_crr_rate: m(&|s| s.pod_crr.rate),
                pod_crr_vs_direct: ratio(&|s| s.pod_crr.rate),
                pod_crr_p50_ms: m(&|s| s.pod_crr.p50_us as f64 / 1000.0),
                pod_crr_p99_ms: m(&|s| s.pod_crr.p99_us as f64 / 1000.0),
                nodeport_crr_rate: m(&|s| s.nodeport_crr.rate),
                nodeport_crr_vs_direct: ratio(&|s| s.nodeport_crr.rate),
                nodeport_crr_p99_ms: m(&|s| s.nodeport_crr.p99_us as f64 / 1000.0),
                pod_rr_rate: m(&|s| s.pod_rr.rate),
                iperf_gbps: m(&|s| s.iperf_gbps),
                program_seconds: median(group.iter().filter_map(|s| s.program_seconds).collect()),
                program_cpu_seconds: median(
                    group.iter().filter_map(|s| s.program_cpu_seconds).collect(),
                ),
                proxy_rss_mib: median(
                    group
                        .iter()
                        .filter_map(|s| s.proxy_rss_kib.map(|k| k as f64 / 1024.0))
                        .collect(),
                ),
                programming_latency_p50_ms: quantile(&latencies, 0.50),
                programming_latency_p99_ms: quantile(&latencies, 0.99),
            }
        })
        .collect()
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|v| format!("{v:.digits$}"))
        .unwrap_or_else(|| "-".into())
}

/// netlb's rate over another mode's at the largest scale, median of the
/// per-round ratios.
pub fn netlb_over(samples: &[Sample], other: Mode, field: fn(&Sample) -> f64) -> Option<f64> {
    let largest = samples.iter().map(|s| s.services).max()?;
    median(
        samples
            .iter()
            .filter(|s| s.services == largest && s.mode == Mode::Netlb)
            .filter_map(|n| {
                let o = samples
                    .iter()
                    .find(|s| s.services == largest && s.round == n.round && s.mode == other)?;
                (field(o) > 0.0).then(|| field(n) / field(o))
            })
            .collect(),
    )
}

pub fn markdown(results: &Results, summary: &[Summary]) -> String {
    let p = &results.profile;
    let m = &results.machine;
    let mut out = format!(
        "Profile `{}`: {} round(s), modes interleaved; {} endpoints per Service; {} load workers; TCP_CRR {} s, kept-alive {} s, iperf3 {} s; {} endpoint changes per mode and round. Machine: {} ({} CPUs, {} GiB), kernel {}; iptables mode through `iptables-{}-restore`. Started {}, took {:.0} s.\n\n",
        p.name,
        p.rounds,
        p.endpoints,
        p.concurrency,
        p.crr_seconds,
        p.rr_seconds,
        p.iperf_seconds,
        p.changes,
        m.cpu,
        m.cpus,
        m.memory_gib,
        m.kernel,
        match p.iptables_backend {
            super::IptablesBackend::Nft => "nft",
            super::IptablesBackend::Legacy => "legacy",
        },
        results.started,
        results.seconds,
    );
    out.push_str("| Services | mode | pod → ClusterIP new conn/s (× direct) | p50 / p99 ms | outside → NodePort new conn/s (× direct) | p99 ms | kept-alive req/s | iperf3 Gbit/s | program all (s) | CPU s | RSS MiB | programming latency p50 / p99 ms |\n");
    out.push_str(
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    for s in summary {
        out.push_str(&format!(
            "| {} | {} | {:.0} ({}) | {:.2} / {:.2} | {:.0} ({}) | {:.2} | {:.0} | {:.2} | {} | {} | {} | {} / {} |\n",
            s.services,
            s.mode.name(),
            s.pod_crr_rate,
            opt(s.pod_crr_vs_direct, 2),
            s.pod_crr_p50_ms,
            s.pod_crr_p99_ms,
            s.nodeport_crr_rate,
            opt(s.nodeport_crr_vs_direct, 2),
            s.nodeport_crr_p99_ms,
            s.pod_rr_rate,
            s.iperf_gbps,
            opt(s.program_seconds, 2),
            opt(s.program_cpu_seconds, 2),
            opt(s.proxy_rss_mib, 1),
            opt(s.programming_latency_p50_ms, 1),
            opt(s.programming_latency_p99_ms, 1),
        ));
    }
    let largest = summary.iter().map(|s| s.services).max().unwrap_or(0);
    out.push_str(&format!("\nAt {largest} Services, netlb's new-connection rate over kube-proxy's (median of per-round ratios): "));
    let parts: Vec<String> = [Mode::Iptables, Mode::Nftables]
        .iter()
        .map(|&o| {
            format!(
                "netlb/{}: pod {} , NodePort {}",
                o.name(),
                opt(netlb_over(&results.samples, o, |s| s.pod_crr.rate), 2),
                opt(netlb_over(&results.samples, o, |s| s.nodeport_crr.rate), 2),
            )
        })
        .collect();
    out.push_str(&parts.join("; "));
    out.push_str(".\n");
    out
}

fn csv_error(what: &str) -> impl Fn(csv::Error) -> CompareError + '_ {
    move |e| CompareError::Output {
        what: what.to_owned(),
        detail: e.to_string(),
    }
}

fn write_csv(results: &Results, summary: &[Summary], out: &Path) -> Result<(), CompareError> {
    let path = out.join("samples.csv");
    let mut w = csv::Writer::from_path(&path).map_err(csv_error("samples.csv"))?;
    w.write_record([
        "services",
        "mode",
        "round",
        "pod_crr_rate",
        "pod_crr_p50_us",
        "pod_crr_p99_us",
        "pod_crr_failures",
        "nodeport_crr_rate",
        "nodeport_crr_p50_us",
        "nodeport_crr_p99_us",
        "nodeport_crr_failures",
        "pod_rr_rate",
        "pod_rr_p99_us",
        "iperf_gbps",
        "program_seconds",
        "program_cpu_seconds",
        "proxy_rss_kib",
        "programming_latency_ms",
    ])
    .map_err(csv_error("samples.csv"))?;
    for s in &results.samples {
        let o = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
        w.write_record([
            s.services.to_string(),
            s.mode.name().to_owned(),
            s.round.to_string(),
            format!("{:.1}", s.pod_crr.rate),
            s.pod_crr.p50_us.to_string(),
            s.pod_crr.p99_us.to_string(),
            s.pod_crr.failures.to_string(),
            format!("{:.1}", s.nodeport_crr.rate),
            s.nodeport_crr.p50_us.to_string(),
            s.nodeport_crr.p99_us.to_string(),
            s.nodeport_crr.failures.to_string(),
            format!("{:.1}", s.pod_rr.rate),
            s.pod_rr.p99_us.to_string(),
            format!("{:.3}", s.iperf_gbps),
            o(s.program_seconds),
            o(s.program_cpu_seconds),
            s.proxy_rss_kib.map(|v| v.to_string()).unwrap_or_default(),
            s.programming_latency_ms
                .iter()
                .map(|v| format!("{v:.2}"))
                .collect::<Vec<_>>()
                .join(" "),
        ])
        .map_err(csv_error("samples.csv"))?;
    }
    w.flush().map_err(|e| CompareError::Io {
        what: "samples.csv".into(),
        source: e,
    })?;
    let mut w =
        csv::Writer::from_path(out.join("summary.csv")).map_err(csv_error("summary.csv"))?;
    for s in summary {
        w.serialize(s).map_err(csv_error("summary.csv"))?;
    }
    w.flush().map_err(|e| CompareError::Io {
        what: "summary.csv".into(),
        source: e,
    })?;
    Ok(())
}

const COLOURS: [RGBColor; 4] = [
    RGBColor(90, 90, 90),
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(255, 127, 14),
];

fn colour(mode: Mode) -> RGBColor {
    COLOURS[Mode::ALL.iter().position(|&m| m == mode).unwrap_or(0)]
}

/// A line per mode of `y` against the number of Services (log scale).
fn plot(
    path: &Path,
    title: &str,
    y_label: &str,
    summary: &[Summary],
    y: fn(&Summary) -> Option<f64>,
) -> Result<(), CompareError> {
    let err = |e: String| CompareError::Output {
        what: path.display().to_string(),
        detail: e,
    };
    let points: Vec<(Mode, f64, f64)> = summary
        .iter()
        .filter_map(|s| y(s).map(|v| (s.mode, s.services.max(1) as f64, v)))
        .collect();
    let x_max = points.iter().map(|p| p.1).fold(10.0, f64::max) * 1.5;
    let y_max = points.iter().map(|p| p.2).fold(0.0, f64::max) * 1.15 + f64::EPSILON;
    let root = SVGBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d((0.8f64..x_max).log_scale(), 0f64..y_max)
        .map_err(|e| err(e.to_string()))?;
    chart
        .configure_mesh()
        .x_desc("Services")
        .y_desc(y_label)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .draw()
        .map_err(|e| err(e.to_string()))?;
    for mode in Mode::ALL {
        let line: Vec<(f64, f64)> = points
            .iter()
            .filter(|p| p.0 == mode)
            .map(|p| (p.1, p.2))
            .collect();
        if line.is_empty() {
            continue;
        }
        let c = colour(mode);
        chart
            .draw_series(LineSeries::new(line.clone(), c.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label(mode.name())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
        chart
            .draw_series(
                line.iter()
                    .map(|&(x, y)| Circle::new((x, y), 3, c.filled())),
            )
            .map_err(|e| err(e.to_string()))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(e.to_string()))?;
    root.present().map_err(|e| err(e.to_string()))?;
    Ok(())
}

/// The files a run writes.
pub const FILES: [&str; 9] = [
    "results.json",
    "samples.csv",
    "summary.csv",
    "summary.md",
    "pod-crr-rate.svg",
    "pod-crr-p99.svg",
    "nodeport-crr-rate.svg",
    "program-seconds.svg",
    "programming-latency-p99.svg",
];

pub fn write_all(results: &Results, out: &Path) -> Result<(), CompareError> {
    let summary = summarize(&results.samples);
    let json =
        serde_json::to_string_pretty(&serde_json::json!({"results": results, "summary": summary}))
            .map_err(|e| CompareError::Output {
                what: "results.json".into(),
                detail: e.to_string(),
            })?;
    std::fs::write(out.join("results.json"), json).map_err(|source| CompareError::Io {
        what: "results.json".into(),
        source,
    })?;
    write_csv(results, &summary, out)?;
    std::fs::write(out.join("summary.md"), markdown(results, &summary)).map_err(|source| {
        CompareError::Io {
            what: "summary.md".into(),
            source,
        }
    })?;
    plot(
        &out.join("pod-crr-rate.svg"),
        "New connections/s, pod to ClusterIP (random Service)",
        "connections/s",
        &summary,
        |s| Some(s.pod_crr_rate),
    )?;
    plot(
        &out.join("pod-crr-p99.svg"),
        "Connect+request latency p99, pod to ClusterIP",
        "ms",
        &summary,
        |s| Some(s.pod_crr_p99_ms),
    )?;
    plot(
        &out.join("nodeport-crr-rate.svg"),
        "New connections/s, outside client to NodePort",
        "connections/s",
        &summary,
        |s| Some(s.nodeport_crr_rate),
    )?;
    plot(
        &out.join("program-seconds.svg"),
        "Time to program every Service from empty",
        "s",
        &summary,
        |s| s.program_seconds,
    )?;
    plot(
        &out.join("programming-latency-p99.svg"),
        "Programming latency p99 (endpoint change to first new connection served)",
        "ms",
        &summary,
        |s| s.programming_latency_p99_ms,
    )?;
    Ok(())
}
