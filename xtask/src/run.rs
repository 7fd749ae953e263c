//! `cargo xtask run`: the demo. A node and pods in network namespaces, the
//! Kubernetes docs' `my-service` with an EndpointSlice for three pods
//! labelled `app.kubernetes.io/name: MyApp`, the agent, live per-backend
//! counters; Ctrl-C removes everything.

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
    process::ChildGuard,
    topology::{Testbed, TestbedSpec},
};

use crate::{cmd, root};

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

pub fn run(args: RunArgs) -> anyhow::Result<()> {
    cmd(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "netlb-agent",
            "-p",
            "netlb-testbed",
            "--bins",
        ],
    )?;
    let release = root().join("target/release");
    netlb_testbed::topology::cleanup_stale(None);

    let mut tb = Testbed::new(TestbedSpec { nodes: 1 }).context("creating the demo topology")?;
    let manifests = tb.dir.join("manifests");
    std::fs::create_dir_all(&manifests)?;
    let mut pods = Vec::new();
    for name in ["myapp-1", "myapp-2", "myapp-3"] {
        pods.push(tb.add_pod(0, name)?);
    }
    let client = tb.add_pod(0, "client")?;
    let mut servers = Vec::new();
    let echo = release.join("netlb-echo");
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
    let mut slice = String::from(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: my-service-abc12\n  labels:\n    kubernetes.io/service-name: my-service\naddressType: IPv4\nports:\n  - name: \"\"\n    protocol: TCP\n    port: 9376\nendpoints:\n",
    );
    for pod in &pods {
        slice.push_str(&format!(
            "  - addresses: [\"{}\"]\n    conditions: {{ready: true}}\n    nodeName: node0\n    targetRef: {{kind: Pod, name: {}}}\n",
            pod.ip, pod.name
        ));
    }
    std::fs::write(manifests.join("my-service.yaml"), MY_SERVICE)?;
    std::fs::write(manifests.join("my-service-endpointslice.yaml"), slice)?;

    let agent_bin = release.join("netlb-agent");
    let node = tb.nodes[0].clone();
    let agent = AgentProcess::start(
        &node,
        &AgentOptions {
            binary: agent_bin.clone(),
            source: AgentSource::Manifests(manifests.clone()),
            extra_args: vec![],
            cleanup_on_exit: true,
        },
        &tb.dir.join("agent.log"),
    )?;
    if !agent.wait_for_log("initial sync complete", 1, Duration::from_secs(20)) {
        anyhow::bail!("the agent did not sync:\n{}", agent.log());
    }
    let bpffs = node.bpffs.display().to_string();
    println!("\nnetlb demo is up (run {}):", tb.run);
    println!(
        "  Service my-service: ClusterIP 10.96.0.10 port 80 -> pods {} on 9376",
        pods.iter()
            .map(|p| format!("{} {}", p.name, p.ip))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  manifests (edit them, the agent follows): {}",
        manifests.display()
    );
    println!("  agent log: {}", tb.dir.join("agent.log").display());
    println!("\nTry, from another shell:");
    println!(
        "  ip netns exec {} curl -s http://10.96.0.10/",
        client.netns
    );
    println!("  {} list services --bpffs {bpffs}", agent_bin.display());
    println!("  {} list conntrack --bpffs {bpffs}", agent_bin.display());
    println!(
        "  ip netns exec {} curl -s 127.0.0.1:10249/metrics",
        node.netns
    );

    if let Some(n) = args.requests {
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..n {
            let out = tb.exec(
                &client.netns,
                &["curl", "-sS", "-m", "3", "http://10.96.0.10/"],
            )?;
            let body = String::from_utf8_lossy(&out.stdout);
            let name = body
                .split_whitespace()
                .next()
                .unwrap_or("(failed)")
                .to_owned();
            *counts.entry(name).or_insert(0usize) += 1;
        }
        println!("\n{n} requests from {}: {counts:?}", client.name);
        print_counters(&agent_bin, &bpffs);
    } else {
        let stop = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGINT, Arc::clone(&stop))?;
        signal_hook::flag::register(signal_hook::consts::SIGTERM, Arc::clone(&stop))?;
        println!("\nPer-backend counters (Ctrl-C to stop and remove everything):");
        while !stop.load(Ordering::Relaxed) {
            print_counters(&agent_bin, &bpffs);
            for _ in 0..10 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    drop(agent);
    drop(servers);
    drop(tb);
    println!("removed the demo topology");
    Ok(())
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
                        "{}:{} flows={} packets={}",
                        r["address"].as_str().unwrap_or("?"),
                        r["port"],
                        r["flows"],
                        r["packets"]
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
