//! Control-plane figures with the real agent against the API-server test
//! double (reports, asserts nothing; run with `cargo xtask bench`):
//! - sync duration (model + desired state + diff + map writes) and agent RSS
//!   with 1,000 and 10,000 Services of 4 endpoints each, and the duration of
//!   one incremental endpoint change at that scale;
//! - programming latency: API write of an EndpointSlice -> first request
//!   served by the new backend, over 100 changes 50 ms apart (p50, p99).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    time::{Duration, Instant},
};

use netlb_testbed::{
    agent::{AgentOptions, AgentProcess, AgentSource},
    apiserver::FakeApiServer,
    find_binary,
    process::ChildGuard,
    topology::{Testbed, TestbedSpec, bind_in_netns},
};
use serde_json::{Value, json};

fn service(i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": "bench"},
        "spec": {
            "clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1),
            "ports": [{"protocol": "TCP", "port": 80, "targetPort": 8080}],
        },
    })
}

fn slice(name: &str, service: &str, ips: &[String], port: u16) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "name": name, "namespace": "bench",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": "", "protocol": "TCP", "port": port}],
        "endpoints": ips.iter().map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    })
}

fn endpoints(i: usize) -> Vec<String> {
    (0..4)
        .map(|k| {
            let n = i * 4 + k;
            format!("10.{}.{}.{}", 100 + n / 65536, n / 256 % 256, n % 256)
        })
        .collect()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn metric(tb: &Testbed, name: &str) -> Option<f64> {
    let out = tb
        .exec(
            &tb.nodes[0].netns,
            &["curl", "-sS", "-m", "2", "http://127.0.0.1:10249/metrics"],
        )
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        l.strip_prefix(&format!("{name} "))
            .and_then(|v| v.parse().ok())
    })
}

fn agent(tb: &Testbed, api: &FakeApiServer, log: &str) -> AgentProcess {
    let kubeconfig = tb.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    AgentProcess::start(
        &tb.nodes[0],
        &AgentOptions {
            binary: find_binary("netlb-agent"),
            source: AgentSource::Kubeconfig(kubeconfig),
            extra_args: vec![],
            cleanup_on_exit: true,
            capabilities: None,
        },
        &tb.dir.join(log),
    )
    .expect("agent")
}

fn scale(services: usize) {
    let tb = Testbed::new(TestbedSpec { nodes: 1 }).expect("testbed");
    let api =
        FakeApiServer::start(bind_in_netns(&tb.nodes[0].netns, "127.0.0.1:0").unwrap()).unwrap();
    for i in 0..services {
        api.apply(service(i)).unwrap();
        api.apply(slice(
            &format!("svc-{i}-1"),
            &format!("svc-{i}"),
            &endpoints(i),
            8080,
        ))
        .unwrap();
    }
    let started = Instant::now();
    let mut agent = agent(&tb, &api, "agent.log");
    assert!(
        agent.wait_for_log("initial sync complete", 1, Duration::from_secs(120)),
        "{}",
        agent.log()
    );
    let ready = started.elapsed();
    let first_sync =
        metric(&tb, "kubeproxy_sync_proxy_rules_duration_seconds_sum").unwrap_or(f64::NAN);
    let rss = rss_kib(agent.pid());
    // One endpoint change at this scale.
    let mut ips = endpoints(0);
    ips[3] = "10.99.99.99".into();
    let count_before =
        metric(&tb, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0);
    let sum_before = metric(&tb, "kubeproxy_sync_proxy_rules_duration_seconds_sum").unwrap_or(0.0);
    api.apply(slice("svc-0-1", "svc-0", &ips, 8080)).unwrap();
    let _ = agent.wait_for_log("synced", 2, Duration::from_secs(30));
    std::thread::sleep(Duration::from_millis(200));
    let count_after =
        metric(&tb, "kubeproxy_sync_proxy_rules_duration_seconds_count").unwrap_or(0.0);
    let sum_after = metric(&tb, "kubeproxy_sync_proxy_rules_duration_seconds_sum").unwrap_or(0.0);
    let incremental = (sum_after - sum_before) / (count_after - count_before).max(1.0);
    let synced_line = agent
        .log()
        .lines()
        .find(|l| l.contains("synced "))
        .map(|l| l.split("] ").nth(1).unwrap_or(l).to_owned())
        .unwrap_or_default();
    println!(
        "services={services:>6} x 4 endpoints: first sync {:.1} ms ({synced_line}); agent ready {:.2} s after start; one endpoint change: {:.2} ms per sync; agent RSS {} MiB",
        first_sync * 1000.0,
        ready.as_secs_f64(),
        incremental * 1000.0,
        rss / 1024
    );
    agent.stop();
}

/// A client thread inside the client pod's namespace: new TCP connection,
/// one HTTP request, the answering backend's name.
fn ask(addr: SocketAddr) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    body.split("\r\n\r\n")
        .nth(1)?
        .split_whitespace()
        .next()
        .map(str::to_owned)
}

fn latency(changes: usize) {
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
    api.apply(service(0)).unwrap();
    api.apply(slice("svc-0-1", "svc-0", &[pods[0].ip.to_string()], 8080))
        .unwrap();
    let agent = agent(&tb, &api, "agent.log");
    assert!(
        agent.wait_for_log("initial sync complete", 1, Duration::from_secs(30)),
        "{}",
        agent.log()
    );

    let vip: SocketAddr = "10.96.0.1:80".parse().unwrap();
    let netns = std::fs::File::open(format!("/run/netns/{}", client.netns)).unwrap();
    let samples = std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns in this thread only, on a namespace fd we own.
            assert_eq!(
                unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            let mut samples = Vec::with_capacity(changes);
            let mut current = 0;
            let deadline = Instant::now() + Duration::from_secs(5);
            while ask(vip).as_deref() != Some("a") {
                assert!(Instant::now() < deadline, "service never served");
            }
            for _ in 0..changes {
                let next = 1 - current;
                let written = Instant::now();
                if std::env::var_os("NETLB_BENCH_DEBUG").is_some() {
                    eprintln!("apply at {:?}", std::time::SystemTime::now());
                }
                api.apply(slice(
                    "svc-0-1",
                    "svc-0",
                    &[pods[next].ip.to_string()],
                    8080,
                ))
                .unwrap();
                loop {
                    if ask(vip).as_deref() == Some(pods[next].name.as_str()) {
                        samples.push(written.elapsed());
                        break;
                    }
                    assert!(
                        written.elapsed() < Duration::from_secs(10),
                        "change never served"
                    );
                }
                current = next;
                // Let the agent's minimum sync interval (10 ms here) pass, so
                // the figure is the pipeline's latency, not the rate limit.
                std::thread::sleep(Duration::from_millis(50));
            }
            samples
        })
        .join()
        .unwrap()
    });
    let mut sorted = samples.clone();
    sorted.sort();
    let pct = |p: f64| {
        sorted[((sorted.len() as f64 * p).ceil() as usize)
            .saturating_sub(1)
            .min(sorted.len() - 1)]
    };
    println!(
        "programming latency over {changes} changes (API write -> first request served by the new backend): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        pct(0.50).as_secs_f64() * 1000.0,
        pct(0.99).as_secs_f64() * 1000.0,
        sorted[sorted.len() - 1].as_secs_f64() * 1000.0
    );
    if std::env::var_os("NETLB_BENCH_DEBUG").is_some() {
        let log = agent.log();
        let lines: Vec<&str> = log.lines().collect();
        for l in &lines[lines.len().saturating_sub(8)..] {
            eprintln!("{l}");
        }
    }
    drop(agent);
}

fn main() {
    netlb_testbed::topology::cleanup_stale(None);
    latency(if std::env::var_os("NETLB_BENCH_DEBUG").is_some() {
        4
    } else {
        100
    });
    if std::env::var_os("NETLB_BENCH_DEBUG").is_some() {
        return;
    }
    for services in [1_000, 10_000] {
        scale(services);
    }
}
