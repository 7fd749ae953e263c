//! The socket-level program's cost per connect (reports, asserts nothing;
//! run with `cargo xtask bench socket-lb`), read from the kernel's own
//! accounting (`kernel.bpf_stats_enabled`: run count and run time of the
//! program attached to the node's test cgroup as connect4):
//! - a pod's connect to a ClusterIP while the agent runs: the program sees
//!   a socket of another network namespace, checks the agent's heartbeat
//!   and leaves it to TC (the check issue 22 added to every pod connect);
//! - a host process's connect to the ClusterIP (socket-level LB);
//! - a pod's connect while the agent is stopped (SIGSTOP, its heartbeat
//!   older than 3 s): the program load-balances the pod's socket itself;
//! - with `NETLB_PREVIOUS_AGENT` (v0.1.0's agent, as `cargo xtask test`
//!   builds it) the first two again with that agent, before the check.
//!
//! Also the new-connection rate of each (one HTTP request per connection,
//! `netlb-echo connect-rate`), where the program's cost is a small part of
//! a connection's.

use std::{path::Path, time::Duration};

use netlb_testbed::{
    agent::{AgentOptions, AgentProcess, AgentSource, bpftool_json, datapath_counter},
    find_binary,
    manifests::endpoint_slice_yaml,
    process::ChildGuard,
    topology::{Testbed, TestbedSpec},
};

const ROUNDS: usize = 3;
const SECONDS: u32 = 3;
const VIP: &str = "10.96.0.80:80";

/// `kernel.bpf_stats_enabled` on for the bench, restored after.
struct BpfStats(String);

impl BpfStats {
    fn enable() -> Self {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let before = std::fs::read_to_string(path).unwrap_or_else(|_| "0".into());
        std::fs::write(path, "1").expect("kernel.bpf_stats_enabled");
        Self(before.trim().to_owned())
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", &self.0);
    }
}

/// The id of the connect4 program attached to `cgroup`.
fn connect4(cgroup: &Path) -> u64 {
    bpftool_json(&["cgroup", "show", &cgroup.display().to_string()])
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["attach_type"] == "cgroup_inet4_connect")
        .and_then(|p| p["id"].as_u64())
        .expect("a connect4 program on the node's cgroup")
}

/// Run count and run time (ns) of a program so far.
fn run_stats(id: u64) -> (u64, u64) {
    let p = bpftool_json(&["prog", "show", "id", &id.to_string()]);
    (
        p["run_cnt"].as_u64().unwrap_or(0),
        p["run_time_ns"].as_u64().unwrap_or(0),
    )
}

/// One measurement: connections per second, failed attempts, and the
/// program's runs and average ns per run meanwhile.
fn measure(tb: &Testbed, netns: &str, echo: &str, prog: u64) -> (f64, u64, u64, f64) {
    let seconds = SECONDS.to_string();
    let before = run_stats(prog);
    let out = tb
        .exec_in_cgroup(
            &tb.nodes[0].cgroup,
            netns,
            &[
                echo,
                "connect-rate",
                "--connect",
                VIP,
                "--threads",
                "2",
                "--duration-s",
                &seconds,
            ],
        )
        .expect("connect-rate");
    let after = run_stats(prog);
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let runs = after.0 - before.0;
    let ns = (after.1 - before.1) as f64 / runs.max(1) as f64;
    (field("rate="), field("failures=") as u64, runs, ns)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures each case `ROUNDS` times (alternating) and prints medians.
fn report(tb: &Testbed, echo: &str, prog: u64, title: &str, cases: &[(&str, &str)]) {
    let mut rates = vec![Vec::new(); cases.len()];
    let mut costs = vec![Vec::new(); cases.len()];
    let mut failed = vec![0u64; cases.len()];
    let mut runs = vec![0u64; cases.len()];
    for _ in 0..ROUNDS {
        for (i, (_, netns)) in cases.iter().enumerate() {
            let (rate, f, r, ns) = measure(tb, netns, echo, prog);
            rates[i].push(rate);
            costs[i].push(ns);
            failed[i] += f;
            runs[i] += r;
        }
    }
    println!("\n{title}:");
    for (i, (name, _)) in cases.iter().enumerate() {
        println!(
            "  {name:<58} connect4 {:>6.1} ns/run (samples {:?}, {} runs)  {:>7.0} conn/s, failed {}",
            median(costs[i].clone()),
            costs[i]
                .iter()
                .map(|c| c.round() as u64)
                .collect::<Vec<_>>(),
            runs[i],
            median(rates[i].clone()),
            failed[i]
        );
    }
}

fn start_agent(tb: &Testbed, binary: &Path, manifests: &Path, log: &str) -> AgentProcess {
    let agent = AgentProcess::start(
        &tb.nodes[0],
        &AgentOptions {
            binary: binary.to_owned(),
            source: AgentSource::Manifests(manifests.to_owned()),
            extra_args: vec![],
            cleanup_on_exit: true,
            capabilities: None,
            wrapper: Vec::new(),
        },
        &tb.dir.join(log),
    )
    .expect("agent");
    assert!(
        agent.wait_for_log("initial sync complete", 1, Duration::from_secs(30)),
        "{}",
        agent.log()
    );
    agent
}

fn sock_lb_pod(tb: &Testbed) -> u64 {
    datapath_counter(&tb.nodes[0].bpffs, "sock_lb_pod").unwrap_or(0)
}

fn main() {
    let _stats = BpfStats::enable();
    let mut tb = Testbed::new(TestbedSpec { nodes: 1 }).expect("testbed");
    let backend = tb.add_pod(0, "backend").expect("pod");
    let client = tb.add_pod(0, "client").expect("pod");
    let echo_bin = find_binary("netlb-echo");
    let echo = echo_bin.to_str().unwrap().to_owned();
    let _server = ChildGuard::spawn_in(
        &backend.netns,
        &[&echo, "serve", "--name", "backend", "--http", "9376"],
        None,
    )
    .expect("server");
    let manifests = tb.dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("svc.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.80\n  ports:\n    - {protocol: TCP, port: 80, targetPort: 9376}\n",
    )
    .unwrap();
    std::fs::write(
        manifests.join("slice.yaml"),
        endpoint_slice_yaml("web", &[("", "TCP", 9376)], &[&backend]),
    )
    .unwrap();
    let host = tb.nodes[0].netns.clone();
    let cases = [
        (
            "pod -> ClusterIP, agent running (left to TC)",
            client.netns.as_str(),
        ),
        ("host process -> ClusterIP (socket-level LB)", host.as_str()),
    ];

    if let Ok(previous) = std::env::var("NETLB_PREVIOUS_AGENT") {
        let agent = start_agent(&tb, Path::new(&previous), &manifests, "agent-previous.log");
        let prog = connect4(&tb.nodes[0].cgroup);
        report(&tb, &echo, prog, "v0.1.0's agent", &cases);
        drop(agent);
    }

    let agent = start_agent(&tb, &find_binary("netlb-agent"), &manifests, "agent.log");
    let prog = connect4(&tb.nodes[0].cgroup);
    report(&tb, &echo, prog, "this agent", &cases);
    // The agent away: its heartbeat goes stale after 3 s; wait until a
    // pod's connect is load-balanced by the socket program.
    agent.pause();
    let before = sock_lb_pod(&tb);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while sock_lb_pod(&tb) == before && std::time::Instant::now() < deadline {
        let _ = tb.exec_in_cgroup(
            &tb.nodes[0].cgroup,
            &client.netns,
            &[
                "curl",
                "-sS",
                "-m",
                "2",
                "-o",
                "/dev/null",
                &format!("http://{VIP}/"),
            ],
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        sock_lb_pod(&tb) > before,
        "pod sockets never load-balanced by the socket program"
    );
    report(
        &tb,
        &echo,
        prog,
        "this agent stopped (SIGSTOP)",
        &[(
            "pod -> ClusterIP, agent away (socket-level LB for the pod)",
            client.netns.as_str(),
        )],
    );
    agent.resume();
    drop(agent);
}
