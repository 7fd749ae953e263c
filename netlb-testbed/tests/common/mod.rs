//! Shared harness of the end-to-end tests: a one-node topology, backend
//! pods running `netlb-echo`, the real agent, real clients.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use netlb_testbed::{
    agent::{AgentOptions, AgentProcess, AgentSource},
    find_binary,
    manifests::endpoint_slice_yaml,
    process::ChildGuard,
    topology::{Pod, Testbed, TestbedSpec},
};

pub const VIP: &str = "10.96.0.10";

/// HTTP status code and body of one curl (status 0 when nothing answered).
pub fn curl_status(tb: &Testbed, netns: &str, url: &str, timeout_s: u32) -> (u16, String) {
    let Ok(out) = tb.exec(
        netns,
        &[
            "curl",
            "-sS",
            "-m",
            &timeout_s.to_string(),
            "-w",
            "\n%{http_code}",
            url,
        ],
    ) else {
        return (0, String::new());
    };
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// `n` requests on new connections; one "NAME PEER_IP:PORT" line each.
/// Panics with the agents' logs when any request fails.
pub fn curl_many(c: &Cluster, netns: &str, url: &str, n: usize) -> Vec<(String, String)> {
    let mut args = vec!["curl", "-sS", "-m", "5", "-H", "Connection: close"];
    for _ in 0..n {
        args.push(url);
    }
    let out = c.tb.exec(netns, &args).unwrap();
    assert!(
        out.status.success(),
        "curl {url} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.agent_logs()
    );
    let lines: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next().unwrap_or("").to_owned();
            let peer = parts
                .next()
                .unwrap_or("")
                .split(':')
                .next()
                .unwrap_or("")
                .to_owned();
            (name, peer)
        })
        .collect();
    assert_eq!(lines.len(), n, "{lines:?}");
    lines
}

/// Fields drop in order: processes before the topology.
pub struct Cluster {
    /// The agent of node 0.
    pub agent: Option<AgentProcess>,
    /// The agents of nodes 1.. (multi-node clusters).
    pub peers: Vec<AgentProcess>,
    pub servers: Vec<ChildGuard>,
    pub manifests: PathBuf,
    pub tb: Testbed,
}

pub fn service_yaml(
    name: &str,
    cluster_ip: &str,
    protocol: &str,
    port: u16,
    target: u16,
) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: {cluster_ip}\n  selector:\n    app.kubernetes.io/name: {name}\n  ports:\n    - protocol: {protocol}\n      port: {port}\n      targetPort: {target}\n"
    )
}

/// A one-port EndpointSlice over `pods`.
pub fn slice_yaml(service: &str, protocol: &str, port: u16, pods: &[&Pod]) -> String {
    endpoint_slice_yaml(service, &[("", protocol, port)], pods)
}

impl Cluster {
    /// One node, `pods` backend pods serving HTTP on 9376, DNS on 53 and TCP
    /// echo on 7000, and a `client` pod.
    pub fn new(pods: &[&str]) -> Self {
        let pods: Vec<(&str, usize)> = pods.iter().map(|p| (*p, 0)).collect();
        Self::multi(1, &pods)
    }

    /// `nodes` nodes, backend pods `(name, node)`, and a `client` pod on
    /// node 0.
    pub fn multi(nodes: usize, pods: &[(&str, usize)]) -> Self {
        let tb = Testbed::new(TestbedSpec { nodes }).expect("testbed");
        let manifests = tb.dir.join("manifests");
        std::fs::create_dir_all(&manifests).unwrap();
        let mut cluster = Cluster {
            agent: None,
            peers: Vec::new(),
            servers: Vec::new(),
            manifests,
            tb,
        };
        for (name, node) in pods {
            cluster.add_backend_on(*node, name);
        }
        cluster.tb.add_pod(0, "client").expect("client pod");
        cluster
    }

    pub fn add_backend(&mut self, name: &str) -> Pod {
        self.add_backend_on(0, name)
    }

    pub fn add_backend_on(&mut self, node: usize, name: &str) -> Pod {
        let pod = self.tb.add_pod(node, name).expect("pod");
        let echo = find_binary("netlb-echo");
        let log = self.tb.dir.join(format!("{name}.log"));
        let server = ChildGuard::spawn_in(
            &pod.netns,
            &[
                echo.to_str().unwrap(),
                "serve",
                "--name",
                name,
                "--http",
                "9376",
                "--http",
                "80",
                "--udp-dns",
                "53",
                "--dns-answer",
                &pod.ip.to_string(),
                "--tcp-echo",
                "7000",
                "--udp-echo",
                "7001",
            ],
            Some(&log),
        )
        .expect("echo server");
        self.servers.push(server);
        // Wait until it listens (a direct request, not through netlb).
        let client_ns = self.tb.pod("client").map(|p| p.netns.clone()).ok();
        let probe_ns = client_ns.unwrap_or_else(|| pod.netns.clone());
        wait_until(Duration::from_secs(5), || {
            curl(&self.tb, &probe_ns, &format!("http://{}:9376/", pod.ip), 1)
        })
        .unwrap_or_else(|| panic!("{name} does not serve"));
        pod
    }

    pub fn write(&self, file: &str, text: &str) {
        // Write then rename, so the agent never reads half a file.
        let tmp = self.manifests.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.manifests.join(file)).unwrap();
    }

    /// Writes a Service `name` (`cluster_ip:port` -> `target`) and its
    /// EndpointSlice over the named backend pods; returns those pods.
    pub fn expose(
        &self,
        name: &str,
        cluster_ip: &str,
        protocol: &str,
        (port, target): (u16, u16),
        backends: &[&str],
    ) -> Vec<Pod> {
        let pods: Vec<Pod> = backends
            .iter()
            .map(|n| self.tb.pod(n).expect("backend pod").clone())
            .collect();
        self.write(
            &format!("{name}.yaml"),
            &service_yaml(name, cluster_ip, protocol, port, target),
        );
        self.write(
            &format!("{name}-slice.yaml"),
            &slice_yaml(name, protocol, target, &pods.iter().collect::<Vec<_>>()),
        );
        pods
    }

    pub fn start_agent(&mut self) {
        self.start_agent_with(AgentSource::Manifests(self.manifests.clone()), "agent.log");
    }

    /// Starts the agent (logging to `log` in the run directory) and waits
    /// for its first sync.
    pub fn start_agent_with(&mut self, source: AgentSource, log: &str) {
        self.start_agent_opts(source, log, &[], find_binary("netlb-agent"), true);
    }

    /// Starts node 0's agent from the manifest directory with extra flags
    /// and waits for its first sync.
    pub fn start_agent_args(&mut self, args: &[&str]) {
        let source = AgentSource::Manifests(self.manifests.clone());
        self.start_agent_opts(source, "agent.log", args, find_binary("netlb-agent"), true);
    }

    /// Starts node 0's agent: `binary` (another build, e.g. an earlier
    /// release), flags, whether it removes its pins on exit.
    pub fn start_agent_opts(
        &mut self,
        source: AgentSource,
        log: &str,
        args: &[&str],
        binary: PathBuf,
        cleanup_on_exit: bool,
    ) {
        let agent = AgentProcess::start(
            &self.tb.nodes[0],
            &AgentOptions {
                binary,
                source,
                extra_args: args.iter().map(|a| a.to_string()).collect(),
                cleanup_on_exit,
                capabilities: None,
                wrapper: Vec::new(),
            },
            &self.tb.dir.join(log),
        )
        .expect("agent");
        assert!(
            agent.wait_for_log("initial sync complete", 1, Duration::from_secs(20)),
            "agent did not sync:\n{}",
            agent.log()
        );
        self.agent = Some(agent);
    }

    /// Starts one agent per node from the manifest directory and waits for
    /// each one's first sync.
    pub fn start_agents(&mut self) {
        let source = AgentSource::Manifests(self.manifests.clone());
        self.start_agents_with(source);
    }

    pub fn start_agents_with(&mut self, source: AgentSource) {
        self.start_agents_with_args(source, &[]);
    }

    /// One agent per node from the manifest directory, with extra flags.
    pub fn start_agents_args(&mut self, args: &[&str]) {
        let source = AgentSource::Manifests(self.manifests.clone());
        self.start_agents_with_args(source, args);
    }

    pub fn start_agents_with_args(&mut self, source: AgentSource, args: &[&str]) {
        for node in self.tb.nodes.clone() {
            let agent = AgentProcess::start(
                &node,
                &AgentOptions {
                    binary: find_binary("netlb-agent"),
                    source: source.clone(),
                    extra_args: args.iter().map(|a| a.to_string()).collect(),
                    cleanup_on_exit: true,
                    capabilities: None,
                    wrapper: Vec::new(),
                },
                &self.tb.dir.join(format!("agent-node{}.log", node.index)),
            )
            .expect("agent");
            assert!(
                agent.wait_for_log("initial sync complete", 1, Duration::from_secs(20)),
                "agent of node{} did not sync:\n{}",
                node.index,
                agent.log()
            );
            if node.index == 0 {
                self.agent = Some(agent);
            } else {
                self.peers.push(agent);
            }
        }
    }

    /// Every agent's log, for failure messages.
    pub fn agent_logs(&self) -> String {
        self.agent
            .iter()
            .chain(&self.peers)
            .map(|a| format!("--- node{} ---\n{}", a.node.index, a.log()))
            .collect()
    }

    pub fn client(&self) -> String {
        self.tb.pod("client").unwrap().netns.clone()
    }

    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(|a| a.log()).unwrap_or_default()
    }
}

pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One curl; the body on success.
pub fn curl(tb: &Testbed, netns: &str, url: &str, timeout_s: u32) -> Option<String> {
    let out = tb
        .exec(netns, &["curl", "-sS", "-m", &timeout_s.to_string(), url])
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `netlb-echo` with `args` in `netns` to completion: (exit code,
/// stdout).
pub fn echo(tb: &Testbed, netns: &str, args: &[&str]) -> (Option<i32>, String) {
    let bin = find_binary("netlb-echo");
    let mut full = vec![bin.to_str().unwrap()];
    full.extend_from_slice(args);
    let out = tb.exec(netns, &full).expect("netlb-echo");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Starts `netlb-echo` with `args` in `netns` in the background, its output
/// in `log`.
pub fn spawn_echo(netns: &str, args: &[&str], log: &std::path::Path) -> ChildGuard {
    let bin = find_binary("netlb-echo");
    let mut full = vec![bin.to_str().unwrap()];
    full.extend_from_slice(args);
    ChildGuard::spawn_in(netns, &full, Some(log)).expect("netlb-echo")
}

/// Parses `connect-rate` output: (connections, failures).
pub fn connect_rate_result(text: &str) -> (u64, u64) {
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {text:?}"))
    };
    (field("connections="), field("failures="))
}

/// `netlb-agent list WHAT -o json` for a node's pinned maps.
pub fn list_json(c: &Cluster, node: usize, what: &str) -> serde_json::Value {
    netlb_testbed::agent::list_json(&c.tb.nodes[node].bpffs, what)
        .unwrap_or_else(|e| panic!("list {what}: {e}"))
}

/// A datapath counter of a node, by name (`list stats`).
pub fn stat(c: &Cluster, node: usize, name: &str) -> u64 {
    netlb_testbed::agent::datapath_counter(&c.tb.nodes[node].bpffs, name)
        .unwrap_or_else(|| panic!("no counter {name}"))
}

/// The repository's root.
pub fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The container `name` (in `containers` or `initContainers`) of the pod
/// template in the manifest `deploy/<file>`, as written there: tests run
/// what the manifests run, so the two cannot drift apart.
pub fn deploy_container(file: &str, name: &str) -> serde_json::Value {
    let path = workspace().join("deploy").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let doc: serde_json::Value = serde_saphyr::from_str(&text).expect("yaml");
    let spec = &doc["spec"]["template"]["spec"];
    ["initContainers", "containers"]
        .iter()
        .filter_map(|k| spec[*k].as_array())
        .flatten()
        .find(|c| c["name"].as_str() == Some(name))
        .cloned()
        .unwrap_or_else(|| panic!("{file}: no container {name}"))
}

/// The capabilities a container of `deploy/<file>` adds (lower case, as
/// setpriv names them); empty when it adds none.
pub fn deploy_capabilities(file: &str, container: &str) -> Vec<String> {
    deploy_container(file, container)["securityContext"]["capabilities"]["add"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| c.as_str().unwrap().to_ascii_lowercase())
        .collect()
}
