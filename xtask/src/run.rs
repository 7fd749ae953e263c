//! `cargo xtask run`: the demo. Two nodes, pods and an outside client in
//! network namespaces; the Kubernetes docs' `my-service` (ClusterIP) and
//! their NodePort example, with an EndpointSlice each for three pods
//! labelled `app.kubernetes.io/name: MyApp` (two on node0, one on node1);
//! one agent per node, live per-backend counters; Ctrl-C removes everything.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use netlb_testbed::{
    agent::{AgentOptions, AgentProcess, AgentSource},
    manifests::endpoint_slice_yaml,
    process::ChildGuard,
    topology::{Pod, Testbed, TestbedSpec},
};

use crate::{build_release_bins, root};

#[derive(clap::Args)]
pub struct RunArgs {
    /// Send this many requests from the client pod, print where they went,
    /// and exit (a smoke test) instead of showing counters until Ctrl-C.
    #[arg(long)]
    requests: Option<usize>,
}

/// The Service exactly as in the Kubernetes docs ("Defining a Service"),
/// plus `clusterIP`: without an API server nobody allocates one.
const MY_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: my-service
spec:
  clusterIP: 10.96.0.10 # allocated by the API server in a cluster
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - protocol: TCP
      port: 80
      targetPort: 9376
";

/// The docs' NodePort example ("Type NodePort"), with the demo pods' port.
/// No clusterIP: the manifest source allocates one, as the API server would.
const MY_NODEPORT_SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata:
  name: my-nodeport-service
spec:
  type: NodePort
  selector:
    app.kubernetes.io/name: MyApp
  ports:
    - port: 80
      targetPort: 9376
      nodePort: 30007
";

/// Where a demo request comes from.
enum From<'a> {
    /// A namespace (a pod, the outside client).
    Netns(&'a str),
    /// A host process of node `n` (in the node's cgroup, where the agent's
    /// socket-level programs act).
    Host(usize),
}

/// `n` requests to `url`, each on a new connection, counted by "backend,
/// as seen from peer address".
fn request_summary(
    tb: &Testbed,
    from: From<'_>,
    url: &str,
    n: usize,
) -> anyhow::Result<std::collections::BTreeMap<String, usize>> {
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..n {
        let args = ["curl", "-sS", "-m", "3", url];
        let out = match from {
            From::Netns(netns) => tb.exec(netns, &args)?,
            From::Host(node) => tb.exec_host(node, &args)?,
        };
        let body = String::from_utf8_lossy(&out.stdout);
        let mut words = body.split_whitespace();
        let key = match (words.next(), words.next()) {
            (Some(name), Some(peer)) => {
                format!("{name} (sees {})", peer.split(':').next().unwrap_or(peer))
            }
            _ => "(failed)".to_owned(),
        };
        *counts.entry(key).or_insert(0usize) += 1;
    }
    Ok(counts)
}

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    build_release_bins()?;
    netlb_testbed::topology::cleanup_stale(None);
    let demo = Demo::start()?;
    demo.print_instructions();
    let result = match args.requests {
        Some(n) => demo.smoke(n),
        None => demo.watch_counters(),
    };
    drop(demo);
    println!("removed the demo topology");
    result
}

/// The demo's topology, pods, servers and agents (removed on drop, the
/// agents first).
struct Demo {
    agents: Vec<AgentProcess>,
    _servers: Vec<ChildGuard>,
    pods: Vec<Pod>,
    client: Pod,
    manifests: std::path::PathBuf,
    agent_bin: std::path::PathBuf,
    tb: Testbed,
}

impl Demo {
    fn start() -> anyhow::Result<Self> {
        let release = root().join("target/release");
        let mut tb =
            Testbed::new(TestbedSpec { nodes: 2 }).context("creating the demo topology")?;
        let manifests = tb.dir.join("manifests");
        std::fs::create_dir_all(&manifests)?;
        let mut pods = Vec::new();
        for (name, node) in [("myapp-1", 0), ("myapp-2", 0), ("myapp-3", 1)] {
            pods.push(tb.add_pod(node, name)?);
        }
        let client = tb.add_pod(0, "client")?;
        let echo = release.join("netlb-echo");
        let mut servers = Vec::new();
        for pod in &pods {
            servers.push(ChildGuard::spawn_in(
                &pod.netns,
                &[
                    echo.to_str().context("path")?,
                    "serve",
                    "--name",
                    &pod.name,
                    "--http",
                    "9376",
                ],
                None,
            )?);
        }
        write_manifests(&manifests, &pods)?;
        let agent_bin = release.join("netlb-agent");
        let agents = start_agents(&tb, &agent_bin, &manifests)?;
        Ok(Self {
            agents,
            _servers: servers,
            pods,
            client,
            manifests,
            agent_bin,
            tb,
        })
    }

    fn bpffs(&self) -> String {
        self.tb.nodes[0].bpffs.display().to_string()
    }

    fn node_ips(&self) -> Vec<String> {
        self.tb
            .nodes
            .iter()
            .map(|n| n.uplink_ip.to_string())
            .collect()
    }

    fn print_instructions(&self) {
        let tb = &self.tb;
        let node = &tb.nodes[0];
        let node_ips = self.node_ips();
        let bpffs = self.bpffs();
        let agent = self.agent_bin.display();
        println!("\nnetlb demo is up (run {}):", tb.run);
        println!(
            "  pods: {}",
            self.pods
                .iter()
                .map(|p| format!("{} {} on node{}", p.name, p.ip, p.node))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("  Service my-service: ClusterIP 10.96.0.10 port 80 -> the pods' 9376");
        println!(
            "  Service my-nodeport-service: NodePort 30007 on every node ({}) -> the pods' 9376",
            node_ips.join(", ")
        );
        println!("  outside client: namespace {} ({})", tb.ext, tb.ext_ip);
        println!(
            "  manifests (edit them, the agent follows): {}",
            self.manifests.display()
        );
        println!("  agent logs: {}/agent-node*.log", tb.dir.display());
        println!("\nTry, from another shell:");
        println!(
            "  ip netns exec {} curl -s http://10.96.0.10/",
            self.client.netns
        );
        println!(
            "  ip netns exec {} curl -s http://{}:30007/",
            tb.ext, node_ips[1]
        );
        // A host process of node0: it must be in the node's cgroup, where
        // the agent attached its socket-level programs.
        println!(
            "  sh -c 'echo $$ > {}/cgroup.procs && exec ip netns exec {} curl -s http://10.96.0.10/'",
            node.cgroup.display(),
            node.netns
        );
        println!("  {agent} list services --bpffs {bpffs}");
        println!("  {agent} list conntrack --bpffs {bpffs}");
        println!(
            "  ip netns exec {} curl -s 127.0.0.1:10249/metrics",
            node.netns
        );
    }

    /// `n` requests from the client pod, a host process and the outside
    /// client; an error when one failed.
    fn smoke(&self, n: usize) -> anyhow::Result<()> {
        let tb = &self.tb;
        let counts = request_summary(tb, From::Netns(&self.client.netns), "http://10.96.0.10/", n)?;
        println!(
            "\n{n} requests from pod {} to my-service: {counts:?}",
            self.client.name
        );
        let mut failed = counts.contains_key("(failed)");
        let counts = request_summary(tb, From::Host(0), "http://10.96.0.10/", n)?;
        println!("{n} requests from a host process of node0 to my-service: {counts:?}");
        failed |= counts.contains_key("(failed)");
        for ip in &self.node_ips() {
            let counts =
                request_summary(tb, From::Netns(&tb.ext), &format!("http://{ip}:30007/"), n)?;
            println!("{n} requests from outside to NodePort {ip}:30007: {counts:?}");
            failed |= counts.contains_key("(failed)");
        }
        print_counters(&self.agent_bin, &self.bpffs());
        if failed {
            anyhow::bail!("some demo requests failed");
        }
        Ok(())
    }

    /// Per-backend counters every second until Ctrl-C.
    fn watch_counters(&self) -> anyhow::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
        println!("\nPer-backend counters (Ctrl-C to stop and remove everything):");
        while !stop.load(Ordering::Relaxed) {
            print_counters(&self.agent_bin, &self.bpffs());
            for _ in 0..10 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        // The agents go first (they remove their programs and pins), then
        // the servers, then the topology.
        self.agents.clear();
    }
}

/// The Services and an EndpointSlice each for the demo pods.
fn write_manifests(manifests: &std::path::Path, pods: &[Pod]) -> anyhow::Result<()> {
    let pod_refs: Vec<&Pod> = pods.iter().collect();
    for service in ["my-service", "my-nodeport-service"] {
        std::fs::write(
            manifests.join(format!("{service}-endpointslice.yaml")),
            endpoint_slice_yaml(service, &[("", "TCP", 9376)], &pod_refs),
        )?;
    }
    std::fs::write(manifests.join("my-service.yaml"), MY_SERVICE)?;
    std::fs::write(
        manifests.join("my-nodeport-service.yaml"),
        MY_NODEPORT_SERVICE,
    )?;
    Ok(())
}

/// One agent per node, each synced before the next starts.
fn start_agents(
    tb: &Testbed,
    agent_bin: &std::path::Path,
    manifests: &std::path::Path,
) -> anyhow::Result<Vec<AgentProcess>> {
    let mut agents = Vec::new();
    for node in tb.nodes.clone() {
        let log = tb.dir.join(format!("agent-node{}.log", node.index));
        let agent = AgentProcess::start(
            &node,
            &AgentOptions {
                binary: agent_bin.to_owned(),
                source: AgentSource::Manifests(manifests.to_owned()),
                extra_args: vec![],
                cleanup_on_exit: true,
                capabilities: None,
                wrapper: Vec::new(),
            },
            &log,
        )?;
        if !agent.wait_for_log("initial sync complete", 1, Duration::from_secs(20)) {
            anyhow::bail!(
                "the agent of node{} did not sync:\n{}",
                node.index,
                agent.log()
            );
        }
        agents.push(agent);
    }
    Ok(agents)
}

fn print_counters(agent: &std::path::Path, bpffs: &str) {
    let out = std::process::Command::new(agent)
        .args(["list", "backends", "--bpffs", bpffs, "-o", "json"])
        .output();
    match out {
        Ok(out) if out.status.success() => {
            let rows: Vec<serde_json::Value> =
                serde_json::from_slice(&out.stdout).unwrap_or_default();
            let line: Vec<String> = rows
                .iter()
                .map(|r| {
                    format!(
                        "{}:{} flows={}",
                        r["address"].as_str().unwrap_or("?"),
                        r["port"],
                        r["flows"]
                    )
                })
                .collect();
            println!("  {}", line.join(" | "));
        }
        Ok(out) => println!(
            "  (list backends failed: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => println!("  (list backends failed: {e})"),
    }
}
