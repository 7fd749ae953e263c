//! Control-plane figures with the real agent against the API-server test
//! double, at 1k, 10k, 30k and 100k Services of 4 endpoints each, shaped
//! like a real API server's objects (`netlb_testbed::realistic`). Reports,
//! asserts nothing; run with `cargo xtask bench control-plane`.
//!
//! Per size:
//! - time from starting the agent to every Service programmed ("initial
//!   sync complete");
//! - programming latency: an EndpointSlice write to the double -> the first
//!   new connection served by the new backend, over 100 changes 100 ms
//!   apart (twice the default minimum sync interval, which the agent keeps
//!   at its default), p50 / p99 / max;
//! - agent RSS once programmed and its peak (VmHWM), CPU seconds to get
//!   programmed and for the 100 changes;
//! - map writes (and deletes) per change, from the agent's counters.
//!
//! `NETLB_BENCH_SIZES=1000,10000` picks sizes; `NETLB_BENCH_AGENT=path`
//! measures another agent binary (an older build, for a before/after).

use std::{
    net::SocketAddr,
    os::fd::AsRawFd as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use netlb_testbed::{
    agent::{AgentOptions, AgentProcess, AgentSource},
    apiserver::FakeApiServer,
    find_binary,
    process::{self, ChildGuard},
    realistic,
    topology::{Testbed, TestbedSpec, bind_in_netns},
};

const CHANGES: usize = 100;

fn proc_status(pid: u32, field: &str) -> u64 {
    process::proc_status(pid, field).unwrap_or(0)
}

fn cpu_seconds(pid: u32) -> f64 {
    process::cpu_seconds(pid).unwrap_or(0.0)
}

fn metric(tb: &Testbed, name: &str) -> Option<f64> {
    let out = tb
        .exec(
            &tb.nodes[0].netns,
            &["curl", "-sS", "-m", "5", "http://127.0.0.1:10249/metrics"],
        )
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        l.strip_prefix(&format!("{name} "))
            .and_then(|v| v.parse().ok())
    })
}

/// A new TCP connection, one HTTP request: the answering backend's name.
fn ask(addr: SocketAddr) -> Option<String> {
    netlb_testbed::load::backend_name(addr, Duration::from_millis(200))
}

struct Row {
    services: usize,
    programmed: Option<Duration>,
    latency: Option<(Duration, Duration, Duration)>,
    rss_mib: u64,
    hwm_mib: u64,
    cpu_programmed: f64,
    cpu_changes: f64,
    writes_per_change: Option<f64>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize)
        .saturating_sub(1)
        .min(sorted.len() - 1)]
}

fn measure(services: usize, agent_binary: &std::path::Path) -> Row {
    let mut tb = Testbed::new(TestbedSpec { nodes: 1 }).expect("testbed");
    let pods = [tb.add_pod(0, "a").unwrap(), tb.add_pod(0, "b").unwrap()];
    let client = tb.add_pod(0, "client").unwrap();
    let echo = find_binary("netlb-echo");
    let _servers: Vec<ChildGuard> = pods
        .iter()
        .map(|p| {
            ChildGuard::spawn_in(
                &p.netns,
                &[
                    echo.to_str().unwrap(),
                    "serve",
                    "--name",
                    &p.name,
                    "--http",
                    "8080",
                ],
                None,
            )
            .unwrap()
        })
        .collect();
    let api =
        FakeApiServer::start(bind_in_netns(&tb.nodes[0].netns, "127.0.0.1:0").unwrap()).unwrap();
    let loaded = Instant::now();
    // Service 0 is the one that changes: its endpoint is pod a or pod b.
    let (svc0, slice0) = realistic::service_and_slice(0, &[pods[0].ip]);
    api.apply(svc0).unwrap();
    api.apply(slice0).unwrap();
    for i in 1..services {
        let (svc, slice) = realistic::service_and_slice(i, &realistic::endpoint_ips(i, 4));
        api.apply(svc).unwrap();
        api.apply(slice).unwrap();
    }
    eprintln!(
        "  {services} Services and slices written to the double in {:.1?}",
        loaded.elapsed()
    );
    let kubeconfig = tb.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let started = Instant::now();
    let mut agent = AgentProcess::start(
        &tb.nodes[0],
        &AgentOptions {
            binary: agent_binary.to_path_buf(),
            source: AgentSource::Kubeconfig(kubeconfig),
            extra_args: vec![],
            cleanup_on_exit: true,
            capabilities: None,
            wrapper: Vec::new(),
        },
        &tb.dir.join("agent.log"),
    )
    .expect("agent");
    let pid = agent.pid();
    let mut row = Row {
        services,
        programmed: None,
        latency: None,
        rss_mib: 0,
        hwm_mib: 0,
        cpu_programmed: 0.0,
        cpu_changes: 0.0,
        writes_per_change: None,
    };
    if !agent.wait_for_log("initial sync complete", 1, Duration::from_secs(300)) {
        row.hwm_mib = proc_status(pid, "VmHWM:") / 1024;
        let log = agent.log();
        let tail: Vec<&str> = log.lines().rev().take(5).collect();
        eprintln!(
            "  not programmed within 300 s; agent log ends:\n    {}",
            tail.join("\n    ")
        );
        agent.stop();
        return row;
    }
    row.programmed = Some(started.elapsed());
    row.cpu_programmed = cpu_seconds(pid);
    let vip = SocketAddr::new(realistic::cluster_ip(0).into(), 80);
    let writes = |tb: &Testbed| {
        Some(
            metric(tb, "netlb_sync_map_writes_total")?
                + metric(tb, "netlb_sync_map_deletes_total")?,
        )
    };
    let writes_before = writes(&tb);
    let cpu_before = cpu_seconds(pid);
    let netns = std::fs::File::open(format!("/run/netns/{}", client.netns)).unwrap();
    let samples = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns in this thread only, on a namespace fd we own.
            assert_eq!(
                unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let deadline = Instant::now() + Duration::from_secs(10);
            while ask(vip).as_deref() != Some("a") {
                if Instant::now() > deadline {
                    eprintln!("  service 0 never served");
                    return Vec::new();
                }
            }
            let mut samples = Vec::with_capacity(CHANGES);
            let mut current = 0;
            for _ in 0..CHANGES {
                let next = 1 - current;
                let (_, slice) = realistic::service_and_slice(0, &[pods[next].ip]);
                let written = Instant::now();
                api.apply(slice).unwrap();
                loop {
                    if ask(vip).as_deref() == Some(pods[next].name.as_str()) {
                        samples.push(written.elapsed());
                        break;
                    }
                    if written.elapsed() > Duration::from_secs(10) {
                        eprintln!("  a change was not served within 10 s");
                        return samples;
                    }
                }
                current = next;
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
        .join()
        .unwrap()
    });
    row.cpu_changes = cpu_seconds(pid) - cpu_before;
    if let (Some(before), Some(after)) = (writes_before, writes(&tb)) {
        row.writes_per_change = Some((after - before) / samples.len().max(1) as f64);
    }
    if !samples.is_empty() {
        let mut sorted = samples;
        sorted.sort();
        row.latency = Some((
            percentile(&sorted, 0.50),
            percentile(&sorted, 0.99),
            sorted[sorted.len() - 1],
        ));
    }
    row.rss_mib = proc_status(pid, "VmRSS:") / 1024;
    row.hwm_mib = proc_status(pid, "VmHWM:") / 1024;
    agent.stop();
    drop(api);
    row
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

fn main() {
    netlb_testbed::topology::cleanup_stale(None);
    let sizes: Vec<usize> = std::env::var("NETLB_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|v| v.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 30_000, 100_000]);
    let agent = std::env::var_os("NETLB_BENCH_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| find_binary("netlb-agent"));
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    println!(
        "control plane: agent {}, {cpus} CPUs, {CHANGES} changes per size, 4 endpoints per Service, realistic objects",
        agent.display()
    );
    let mut rows = Vec::new();
    for services in sizes {
        eprintln!("{services} Services:");
        let row = measure(services, &agent);
        rows.push(row);
    }
    println!(
        "| Services | start to programmed | latency p50 / p99 / max (ms) | RSS programmed / peak (MiB) | CPU s to programmed | CPU s for {CHANGES} changes | map writes per change |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for r in rows {
        println!(
            "| {} | {} | {} | {} / {} | {:.2} | {:.2} | {} |",
            r.services,
            r.programmed
                .map(|d| format!("{:.2} s", d.as_secs_f64()))
                .unwrap_or_else(|| "not within 300 s".into()),
            r.latency
                .map(|(a, b, c)| format!("{} / {} / {}", ms(a), ms(b), ms(c)))
                .unwrap_or_else(|| "-".into()),
            r.rss_mib,
            r.hwm_mib,
            r.cpu_programmed,
            r.cpu_changes,
            r.writes_per_change
                .map(|w| format!("{w:.1}"))
                .unwrap_or_else(|| "n/a".into()),
        );
    }
}
