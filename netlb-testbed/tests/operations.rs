//! The agent's endpoints under a flood, as a node-critical agent must
//! take it: 1,000 LoadBalancer Services with externalTrafficPolicy Local
//! (1,000 health-check node ports), then 1,000 idle connections to the
//! health port :10256 and 1,000 to a health-check node port. The agent's
//! thread count does not grow, `/healthz` still answers within 100 ms,
//! `/metrics` is not served on :10256, `/proxyMode` answers on the metrics
//! address. Prints the agent's threads and RSS (`NETLB_TEST_AGENT=path`
//! runs another agent binary, for a before/after).
//! Needs root; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsRawFd as _,
    path::PathBuf,
    time::{Duration, Instant},
};

use netlb_testbed::{
    agent::{AgentOptions, AgentProcess, AgentSource},
    find_binary,
    process::ChildGuard,
    topology::{Testbed, TestbedSpec},
};

const SERVICES: usize = 1000;
const IDLE: usize = 1000;
/// Health-check node ports from here (node ports from 30000).
const FIRST_HC_PORT: u16 = 31000;

fn status(pid: u32, field: &str) -> u64 {
    netlb_testbed::process::proc_status(pid, field).unwrap_or(0)
}

/// One GET on a new connection; (status line, body, time taken).
fn get(addr: SocketAddr, path: &str) -> Option<(String, String, Duration)> {
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    Some((
        head.lines().next()?.to_owned(),
        body.to_owned(),
        started.elapsed(),
    ))
}

fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, owned rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

#[test]
fn a_flood_of_idle_connections_takes_no_thread_and_leaves_healthz_answering() {
    // The test holds 2,000 sockets; the agent inherits the raised limit too
    // (and raises its own).
    raise_fd_limit();
    let mut tb = Testbed::new(TestbedSpec { nodes: 1 }).expect("testbed");
    let pod = tb.add_pod(0, "web").expect("pod");
    let echo = find_binary("netlb-echo");
    let _server = ChildGuard::spawn_in(
        &pod.netns,
        &[
            echo.to_str().unwrap(),
            "serve",
            "--name",
            "web",
            "--http",
            "8080",
        ],
        None,
    )
    .expect("server");
    let manifests = tb.dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let mut yaml = String::new();
    for i in 0..SERVICES {
        yaml.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: lb-{i}, namespace: ops}}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  clusterIP: {}\n  healthCheckNodePort: {}\n  ports:\n    - {{name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: {}}}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: lb-{i}-abcde\n  namespace: ops\n  labels: {{kubernetes.io/service-name: lb-{i}}}\naddressType: IPv4\nendpoints:\n  - addresses: [\"{}\"]\n    conditions: {{ready: true, serving: true, terminating: false}}\n    nodeName: node0\nports:\n  - {{name: http, protocol: TCP, port: 8080}}\n",
            std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 96, 8, 1)) + i as u32),
            FIRST_HC_PORT + i as u16,
            30000 + i as u16,
            pod.ip,
        ));
    }
    // One more with its only endpoint on another node: kube-proxy's
    // no-local-endpoints gauge counts it.
    yaml.push_str(
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: remote, namespace: ops}\nspec:\n  type: LoadBalancer\n  externalTrafficPolicy: Local\n  clusterIP: 10.96.12.1\n  healthCheckNodePort: 32600\n  ports:\n    - {name: http, protocol: TCP, port: 80, targetPort: 8080, nodePort: 32500}\n---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: remote-abcde\n  namespace: ops\n  labels: {kubernetes.io/service-name: remote}\naddressType: IPv4\nendpoints:\n  - addresses: [\"10.244.9.10\"]\n    conditions: {ready: true, serving: true, terminating: false}\n    nodeName: node9\nports:\n  - {name: http, protocol: TCP, port: 8080}\n",
    );
    std::fs::write(manifests.join("services.yaml"), yaml).unwrap();
    let binary = std::env::var_os("NETLB_TEST_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| find_binary("netlb-agent"));
    let mut agent = AgentProcess::start(
        &tb.nodes[0],
        &AgentOptions {
            binary,
            source: AgentSource::Manifests(manifests),
            extra_args: vec![],
            cleanup_on_exit: true,
            capabilities: None,
            wrapper: Vec::new(),
        },
        &tb.dir.join("agent.log"),
    )
    .expect("agent");
    assert!(
        agent.wait_for_log("initial sync complete", 1, Duration::from_secs(60)),
        "{}",
        agent.log()
    );
    let pid = agent.pid();
    let health = SocketAddr::from(([127, 0, 0, 1], 10256));
    let metrics = SocketAddr::from(([127, 0, 0, 1], 10249));
    let hc = SocketAddr::from(([127, 0, 0, 1], FIRST_HC_PORT));
    let netns = std::fs::File::open(format!("/run/netns/{}", tb.nodes[0].netns)).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns in this thread only, on a namespace fd we own.
            assert_eq!(
                unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            // Every health-check node port serves (the last one opened too).
            let last = SocketAddr::from(([127, 0, 0, 1], FIRST_HC_PORT + SERVICES as u16 - 1));
            let deadline = Instant::now() + Duration::from_secs(20);
            while get(last, "/").is_none_or(|r| !r.0.contains("200")) {
                assert!(Instant::now() < deadline, "health-check node ports not served");
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(Duration::from_millis(500));
            let (threads, rss) = (status(pid, "Threads:"), status(pid, "VmRSS:"));
            let mut idle = Vec::with_capacity(2 * IDLE);
            for _ in 0..IDLE {
                idle.push(TcpStream::connect(health).expect("connect :10256"));
                idle.push(TcpStream::connect(hc).expect("connect to a health-check port"));
            }
            std::thread::sleep(Duration::from_millis(500));
            let (threads_idle, rss_idle) = (status(pid, "Threads:"), status(pid, "VmRSS:"));
            let healthz = get(health, "/healthz");
            println!(
                "agent with {SERVICES} LoadBalancer Services (ETP Local): {threads} threads, RSS {} MiB; with {} idle connections: {threads_idle} threads, RSS {} MiB; /healthz {:?}",
                rss / 1024,
                2 * IDLE,
                rss_idle / 1024,
                healthz.as_ref().map(|r| r.2)
            );
            let (status_line, _, took) = healthz.expect("/healthz answered");
            assert!(status_line.contains("200"), "{status_line}");
            assert!(took < Duration::from_millis(100), "/healthz took {took:?}");
            assert_eq!(threads_idle, threads, "threads grew with idle connections");
            let hc_answer = get(hc, "/").expect("health-check port answered");
            assert!(hc_answer.0.contains("200"), "{hc_answer:?}");
            drop(idle);
            // /metrics only on the metrics address; /proxyMode answers.
            let on_health = get(health, "/metrics").expect("answer");
            assert!(on_health.0.contains("404"), "{on_health:?}");
            let on_metrics = get(metrics, "/metrics").expect("answer");
            assert!(on_metrics.0.contains("200") && on_metrics.1.contains("netlb_"));
            assert!(
                on_metrics.1.contains(
                    "kubeproxy_sync_proxy_rules_no_local_endpoints_total{traffic_policy=\"external\"} 1"
                ),
                "{}",
                on_metrics.1
            );
            assert!(
                on_metrics.1.contains("netlb_map_entries{map=\"NETLB_SERVICES\"}")
                    && on_metrics.1.contains("netlb_map_capacity{map=\"NETLB_BACKENDS\"}"),
                "{}",
                on_metrics.1
            );
            let mode = get(metrics, "/proxyMode").expect("answer");
            assert!(mode.0.contains("200") && mode.1 == "netlb", "{mode:?}");
        })
        .join()
        .unwrap();
    });
    // `netlb-agent status` on that node, in its namespace (nsenter: `ip
    // netns exec` would hide /sys/fs/bpf).
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net=/run/netns/{}", tb.nodes[0].netns))
        .arg("--")
        .arg(find_binary("netlb-agent"))
        .args(["status", "-o", "json", "--bpffs"])
        .arg(&tb.nodes[0].bpffs)
        .output()
        .expect("netlb-agent status");
    let status: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(status["healthz"][0], 200, "{status}");
    assert_eq!(status["initial_sync_complete"], true, "{status}");
    assert!(
        status["programmed_frontends"].as_f64().unwrap_or(0.0) > 1000.0,
        "{status}"
    );
    assert!(
        status["last_sync_unix_seconds"].as_f64().unwrap_or(0.0) > 0.0,
        "{status}"
    );
    let services = status["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["map"] == "NETLB_SERVICES"))
        .expect("services map");
    assert!(services["entries"].as_u64().unwrap_or(0) > 1000, "{status}");
    assert!(services["capacity"].as_u64().unwrap_or(0) > 0, "{status}");
    let interfaces = status["interfaces"].to_string();
    assert!(
        interfaces.contains("uplink0") && interfaces.contains("veth"),
        "{status}"
    );
    assert_eq!(
        status["errors"].as_array().map(Vec::len),
        Some(0),
        "{status}"
    );
    agent.stop();
}

/// kube-proxy's configuration as kubeadm writes it (its kube-proxy
/// ConfigMap's `config.conf`, v1.36), with the health and metrics
/// addresses moved and one field kube-proxy does not have.
const KUBEADM_CONFIG: &str = r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
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
healthzBindAddress: 0.0.0.0:10266
hostnameOverride: ""
iptables:
  localhostNodePorts: null
  masqueradeAll: false
  masqueradeBit: null
  minSyncPeriod: 0s
  syncPeriod: 0s
kind: KubeProxyConfiguration
logging:
  flushFrequency: 0
  options:
    json:
      infoBufferSize: "0"
    text:
      infoBufferSize: "0"
  verbosity: 0
metricsBindAddress: 127.0.0.1:10259
mode: ""
nodePortAddresses: null
oomScoreAdj: null
portRange: ""
showHiddenMetricsForVersion: ""
fancyNewField: true
"#;

#[test]
fn a_kubeadm_kube_proxy_configuration_starts_the_agent_and_flags_override_it() {
    let tb = Testbed::new(TestbedSpec { nodes: 1 }).expect("testbed");
    let manifests = tb.dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let config = tb.dir.join("config.conf");
    std::fs::write(&config, KUBEADM_CONFIG).unwrap();
    let mut agent = AgentProcess::start(
        &tb.nodes[0],
        &AgentOptions {
            binary: find_binary("netlb-agent"),
            source: AgentSource::Manifests(manifests),
            // The file's metrics address is overridden by the flag.
            extra_args: vec![
                "--config".into(),
                config.display().to_string(),
                "--metrics-bind-address".into(),
                "127.0.0.1:10249".into(),
            ],
            cleanup_on_exit: true,
            capabilities: None,
            wrapper: Vec::new(),
        },
        &tb.dir.join("agent.log"),
    )
    .expect("agent");
    assert!(
        agent.wait_for_log("initial sync complete", 1, Duration::from_secs(30)),
        "{}",
        agent.log()
    );
    let log = agent.log();
    assert!(
        log.contains("unknown fields ignored: fancyNewField"),
        "{log}"
    );
    assert!(
        log.contains("applied") && log.contains("healthz_bind_address"),
        "{log}"
    );
    let netns = std::fs::File::open(format!("/run/netns/{}", tb.nodes[0].netns)).unwrap();
    std::thread::scope(|s| {
        s.spawn(|| {
            // SAFETY: setns in this thread only, on a namespace fd we own.
            assert_eq!(
                unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            // healthzBindAddress from the file.
            let health = get(SocketAddr::from(([127, 0, 0, 1], 10266)), "/healthz");
            assert!(health.is_some_and(|r| r.0.contains("200")));
            assert!(get(SocketAddr::from(([127, 0, 0, 1], 10256)), "/healthz").is_none());
            // metricsBindAddress overridden by the flag.
            let metrics = get(SocketAddr::from(([127, 0, 0, 1], 10249)), "/metrics");
            assert!(metrics.is_some_and(|r| r.0.contains("200")));
            assert!(get(SocketAddr::from(([127, 0, 0, 1], 10259)), "/metrics").is_none());
        })
        .join()
        .unwrap();
    });
    agent.stop();
}
