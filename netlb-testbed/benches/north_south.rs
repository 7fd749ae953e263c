//! North-south figures (reports, asserts nothing; run with `cargo xtask
//! bench`): the new-connection rate from the external client, one HTTP
//! request per TCP connection (`netlb-echo connect-rate`; wrk hung now and
//! then in this topology), to
//! - the backend pod's IP directly (routed through its node, no NAT),
//! - a NodePort on the backend's own node (DNAT only),
//! - a NodePort on the other node (DNAT + SNAT, two hops),
//!
//! on the same two-node topology with one agent per node; and from a host
//! process of the backend's node (in the node's test cgroup) to the pod IP
//! directly and to the ClusterIP (socket-level load balancing). Rounds
//! alternate the targets; the medians are reported with the ratio to the
//! direct path.

use std::time::Duration;

use netlb_testbed::{
    agent::{AgentOptions, AgentProcess, AgentSource},
    find_binary,
    manifests::endpoint_slice_yaml,
    process::ChildGuard,
    topology::{Testbed, TestbedSpec},
};

const ROUNDS: usize = 5;
const SECONDS: u32 = 4;
const THREADS: u32 = 4;

/// Where a client runs.
#[derive(Clone, Copy)]
enum Client {
    /// The outside client's namespace.
    Outside,
    /// A host process of node `n`.
    Host(usize),
}

/// New connections per second, and failed attempts.
fn connect_rate(tb: &Testbed, client: Client, echo: &str, target: &str) -> Option<(f64, u64)> {
    let threads = THREADS.to_string();
    let seconds = SECONDS.to_string();
    let args = [
        echo,
        "connect-rate",
        "--connect",
        target,
        "--threads",
        &threads,
        "--duration-s",
        &seconds,
    ];
    let out = match client {
        Client::Outside => tb.exec(&tb.ext, &args),
        Client::Host(node) => tb.exec_host(node, &args),
    }
    .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
    };
    Some((field("rate=")?, field("failures=")? as u64))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let mut tb = Testbed::new(TestbedSpec { nodes: 2 }).expect("testbed");
    let pod = tb.add_pod(1, "backend").expect("pod");
    let echo = find_binary("netlb-echo");
    let _server = ChildGuard::spawn_in(
        &pod.netns,
        &[
            echo.to_str().unwrap(),
            "serve",
            "--name",
            "backend",
            "--http",
            "9376",
        ],
        None,
    )
    .expect("server");
    let manifests = tb.dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.80\n  ports:\n    - {protocol: TCP, port: 80, targetPort: 9376, nodePort: 30080}\n",
    )
    .unwrap();
    std::fs::write(
        manifests.join("slice.yaml"),
        endpoint_slice_yaml("web", &[("", "TCP", 9376)], &[&pod]),
    )
    .unwrap();
    let mut agents = Vec::new();
    for node in tb.nodes.clone() {
        let agent = AgentProcess::start(
            &node,
            &AgentOptions {
                binary: find_binary("netlb-agent"),
                source: AgentSource::Manifests(manifests.clone()),
                extra_args: vec![],
                cleanup_on_exit: true,
                capabilities: None,
                wrapper: Vec::new(),
            },
            &tb.dir.join(format!("agent-node{}.log", node.index)),
        )
        .expect("agent");
        assert!(
            agent.wait_for_log("initial sync complete", 1, Duration::from_secs(20)),
            "{}",
            agent.log()
        );
        agents.push(agent);
    }

    report(
        &tb,
        &echo,
        "new connections/s from the external client",
        Client::Outside,
        &[
            ("pod IP directly", format!("{}:9376", pod.ip)),
            (
                "NodePort, backend on that node (DNAT)",
                format!("{}:30080", tb.nodes[1].uplink_ip),
            ),
            (
                "NodePort, backend on the other node (DNAT+SNAT)",
                format!("{}:30080", tb.nodes[0].uplink_ip),
            ),
        ],
    );
    report(
        &tb,
        &echo,
        "new connections/s from a host process of the backend's node",
        Client::Host(1),
        &[
            ("pod IP directly", format!("{}:9376", pod.ip)),
            ("ClusterIP (socket-level LB)", "10.96.0.80:80".to_owned()),
        ],
    );
    drop(agents);
    drop(tb);
}

/// Measures every target in alternating rounds and prints the medians
/// with the ratio to the first target.
fn report(
    tb: &Testbed,
    echo: &std::path::Path,
    title: &str,
    client: Client,
    targets: &[(&str, String)],
) {
    // Warm-up: every path once, and a check that each one serves.
    for (name, target) in targets {
        let args = ["curl", "-sS", "-m", "3", &format!("http://{target}/")];
        let out = match client {
            Client::Outside => tb.exec(&tb.ext, &args),
            Client::Host(node) => tb.exec_host(node, &args),
        }
        .expect("curl");
        assert!(out.status.success(), "{name} ({target}) does not serve");
    }
    let echo = echo.to_str().unwrap().to_owned();
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    let mut failures = vec![0u64; targets.len()];
    for round in 0..ROUNDS {
        for (i, (_, target)) in targets.iter().enumerate() {
            if let Some((rate, failed)) = connect_rate(tb, client, &echo, target) {
                rates[i].push(rate);
                failures[i] += failed;
            }
        }
        eprintln!("round {} of {ROUNDS} done", round + 1);
    }
    println!(
        "\n{title} ({ROUNDS} rounds of {SECONDS} s, {THREADS} client threads, one HTTP request per connection):"
    );
    let direct = median(rates[0].clone());
    for (i, ((name, _), samples)) in targets.iter().zip(&rates).enumerate() {
        if samples.is_empty() {
            println!("  {name:<50} no result");
            continue;
        }
        let m = median(samples.clone());
        println!(
            "  {name:<50} median {m:>8.0}/s  ({:.2} of direct)  samples {:?}, failed attempts {}",
            m / direct,
            samples.iter().map(|r| r.round() as u64).collect::<Vec<_>>(),
            failures[i]
        );
    }
}
