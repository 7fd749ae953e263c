//! A node as the DaemonSet leaves it (issue 22): pods created while no
//! agent runs, readiness that means "serving", start-up errors before
//! anything is pinned, the node preparation of the init container, an
//! uninstall that leaves nothing behind. Real agents, real kernel, real
//! clients in network namespaces. Needs root; run through `cargo xtask
//! test`.
#![cfg(feature = "privileged-tests")]

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::{Cluster, stat, wait_until};
use netlb_testbed::agent::AgentSource;

/// One request from `netns` as a process of node 0's cgroup (where a real
/// node's pods run: below the cgroup root the agent attaches to).
fn curl_in_cgroup(c: &Cluster, netns: &str, url: &str) -> Option<String> {
    let out =
        c.tb.exec_in_cgroup(
            &c.tb.nodes[0].cgroup,
            netns,
            &["curl", "-sS", "-m", "2", url],
        )
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn backend_of(body: &str) -> String {
    body.split_whitespace().next().unwrap_or("").to_owned()
}

/// Issue 22: the agent stops (a rollout, an eviction: its datapath
/// stays) and a pod is created meanwhile, with no TC program on its
/// interface: its processes reach a ClusterIP at once, through the
/// socket-level programs, which serve pod sockets while the agent is away.
/// Killed hard, the agent is away three seconds after its last heartbeat.
/// Once the agent is back, pods use the TC path again.
#[test]
fn a_pod_created_while_the_agent_is_down_reaches_a_cluster_ip_at_once() {
    let mut c = Cluster::new(&["np-1", "np-2"]);
    c.expose("np", "10.96.0.80", "TCP", (80, 9376), &["np-1", "np-2"]);
    let agent = netlb_testbed::find_binary("netlb-agent");
    let source = AgentSource::Manifests(c.manifests.clone());
    c.start_agent_opts(source.clone(), "agent-1.log", &[], agent.clone(), false);
    let backends: BTreeSet<String> = ["np-1".into(), "np-2".into()].into();
    // Stopped (SIGTERM, pins kept).
    c.agent.take().expect("agent").stop();
    let late = c.tb.add_pod(0, "late-1").expect("pod");
    let started = std::time::Instant::now();
    let body = curl_in_cgroup(&c, &late.netns, "http://10.96.0.80/");
    let took = started.elapsed();
    assert!(
        body.as_deref()
            .is_some_and(|b| backends.contains(&backend_of(b))),
        "a pod created after the agent stopped: {body:?}"
    );
    println!("a pod created while the agent is stopped: first request answered in {took:?}");
    assert!(stat(&c, 0, "sock_lb_pod") >= 1);
    // Killed hard: away once its heartbeat is three seconds old.
    c.start_agent_opts(source.clone(), "agent-2.log", &[], agent.clone(), false);
    c.agent.as_mut().expect("agent").kill_hard();
    let late2 = c.tb.add_pod(0, "late-2").expect("pod");
    let served = wait_until(Duration::from_secs(6), || {
        curl_in_cgroup(&c, &late2.netns, "http://10.96.0.80/")
    });
    assert!(served.is_some(), "not served after the agent was killed");
    // Back: the agent attaches the new interfaces, and pods are served by
    // TC again (the socket-level programs leave their sockets alone).
    c.start_agent_opts(source, "agent-3.log", &[], agent, true);
    let before = stat(&c, 0, "sock_lb_pod");
    for _ in 0..5 {
        let body = curl_in_cgroup(&c, &late.netns, "http://10.96.0.80/").expect("served");
        assert!(backends.contains(&backend_of(&body)));
    }
    assert_eq!(stat(&c, 0, "sock_lb_pod"), before);
}
