//! Connection state end to end (issue 8): real agents, real kernel, real
//! clients in network namespaces. Rolling updates under load, a readiness
//! flap, a NodePort churn of 100,000 connections, a classic tc filter beside
//! netlb, UDP flows leaving a removed backend, a small conntrack table under
//! churn, Path MTU discovery and UDP "connection refused" through a VIP.
//! Needs root; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use common::{
    Cluster, connect_rate_result, curl_many, echo, list_json, spawn_echo, stat, wait_until,
};
use netlb_testbed::{
    manifests::{EndpointState, endpoint_slice_yaml_with_states},
    topology::Pod,
};

fn service(c: &Cluster, name: &str, cluster_ip: &str, protocol: &str, port: u16, target: u16) {
    c.write(
        &format!("{name}.yaml"),
        &common::service_yaml(name, cluster_ip, protocol, port, target),
    );
}

/// Writes `service`'s EndpointSlice (one port) with each pod's state.
fn slice(
    c: &Cluster,
    service: &str,
    protocol: &str,
    port: u16,
    endpoints: &[(&str, EndpointState)],
) {
    let pods: Vec<(Pod, EndpointState)> = endpoints
        .iter()
        .map(|(name, state)| (c.tb.pod(name).expect("pod").clone(), *state))
        .collect();
    let refs: Vec<(&Pod, EndpointState)> = pods.iter().map(|(p, s)| (p, *s)).collect();
    c.write(
        &format!("{service}-slice.yaml"),
        &endpoint_slice_yaml_with_states(service, &[("", protocol, port)], &refs),
    );
}

/// Waits until the agent of node 0 logged `count` syncs that wrote
/// something.
fn wait_synced(c: &Cluster, count: usize) {
    let agent = c.agent.as_ref().expect("agent");
    assert!(
        agent.wait_for_log("synced ", count, Duration::from_secs(5)),
        "agent did not apply change {count}:\n{}",
        c.agent_log()
    );
}

fn synced_count(c: &Cluster) -> usize {
    c.agent_log().matches("synced ").count()
}

/// Every backend of a Service is replaced through terminating while
/// keep-alive clients talk to it and a loop opens new connections: no
/// request fails, and every established connection stays on its backend
/// until it closes (a moved connection would be reset by its new backend,
/// and the echo client fails on the first line that does not come back).
#[test]
fn a_rolling_update_under_load_fails_no_request_and_moves_no_connection() {
    let mut c = Cluster::new(&["old-1", "old-2"]);
    service(&c, "roll-echo", "10.96.0.61", "TCP", 7000, 7000);
    service(&c, "roll-web", "10.96.0.62", "TCP", 80, 9376);
    let write = |c: &Cluster, endpoints: &[(&str, EndpointState)]| {
        slice(c, "roll-echo", "TCP", 7000, endpoints);
        slice(c, "roll-web", "TCP", 9376, endpoints);
    };
    use EndpointState::{Ready, Terminating};
    write(&c, &[("old-1", Ready), ("old-2", Ready)]);
    c.start_agent();

    let mut clients = Vec::new();
    for i in 0..8 {
        let log = c.tb.dir.join(format!("keepalive-{i}.log"));
        let child = spawn_echo(
            &c.client(),
            &[
                "tcp-client",
                "--connect",
                "10.96.0.61:7000",
                "--interval-ms",
                "50",
                "--duration-s",
                "9",
            ],
            &log,
        );
        clients.push((child, log));
    }
    let loop_log = c.tb.dir.join("new-connections.log");
    let mut new_connections = spawn_echo(
        &c.client(),
        &[
            "connect-rate",
            "--connect",
            "10.96.0.62:80",
            "--threads",
            "2",
            "--rate",
            "200",
            "--duration-s",
            "8",
        ],
        &loop_log,
    );
    let connected: Vec<String> = clients
        .iter()
        .map(|(_, log)| {
            wait_until(Duration::from_secs(5), || {
                std::fs::read_to_string(log)
                    .ok()?
                    .lines()
                    .find_map(|l| l.strip_prefix("connected to ").map(str::to_owned))
            })
            .expect("keep-alive client connected")
        })
        .collect();
    assert!(
        connected.iter().all(|n| n.starts_with("old-")),
        "{connected:?}"
    );
    println!("keep-alive connections on {connected:?}");

    // The rolling update: a new pod, the old one terminating, then gone;
    // twice. The old pods' processes keep serving their connections, as a
    // terminating pod does during its grace period.
    // (Some steps change nothing in the maps: a terminating endpoint is not
    // used while ready ones exist, so removing it writes nothing. The agent
    // reads the directory every 100 ms; each step gets 800 ms.)
    let apply = |c: &Cluster, endpoints: &[(&str, EndpointState)]| {
        write(c, endpoints);
        std::thread::sleep(Duration::from_millis(800));
    };
    c.add_backend("new-1");
    apply(
        &c,
        &[("old-1", Terminating), ("old-2", Ready), ("new-1", Ready)],
    );
    apply(&c, &[("old-2", Ready), ("new-1", Ready)]);
    c.add_backend("new-2");
    apply(
        &c,
        &[("old-2", Terminating), ("new-1", Ready), ("new-2", Ready)],
    );
    apply(&c, &[("new-1", Ready), ("new-2", Ready)]);

    for (mut child, log) in clients {
        let status = child.wait(Duration::from_secs(15)).expect("client ended");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(
            status.success(),
            "a keep-alive connection broke during the update:\n{text}\n{}",
            c.agent_log()
        );
    }
    new_connections
        .wait(Duration::from_secs(15))
        .expect("loop ended");
    let text = std::fs::read_to_string(&loop_log).unwrap();
    let (ok, failed) = connect_rate_result(&text);
    println!(
        "rolling update: {ok} new connections, {failed} failed; 8 keep-alive connections kept"
    );
    assert!(ok > 1000, "{text}");
    assert_eq!(
        failed, 0,
        "new connections failed during the update: {text}"
    );
    // New connections reach the new pods only.
    let names: BTreeSet<String> = curl_many(&c, &c.client(), "http://10.96.0.62/", 20)
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(names, BTreeSet::from(["new-1".into(), "new-2".into()]));
}

/// The only endpoint of a Service becomes unready for two seconds: the
/// established connection survives, a new one is refused meanwhile, and new
/// ones are served again afterwards.
#[test]
fn a_readiness_flap_keeps_the_established_connection_and_refuses_new_ones() {
    let mut c = Cluster::new(&["flap-1"]);
    service(&c, "flap", "10.96.0.63", "TCP", 7000, 7000);
    slice(&c, "flap", "TCP", 7000, &[("flap-1", EndpointState::Ready)]);
    c.start_agent();
    let log = c.tb.dir.join("flap-client.log");
    let mut client = spawn_echo(
        &c.client(),
        &[
            "tcp-client",
            "--connect",
            "10.96.0.63:7000",
            "--interval-ms",
            "50",
            "--duration-s",
            "5",
        ],
        &log,
    );
    wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(&log)
            .ok()?
            .contains("connected to")
            .then_some(())
    })
    .expect("connected");
    let synced = synced_count(&c);
    slice(
        &c,
        "flap",
        "TCP",
        7000,
        &[("flap-1", EndpointState::Unready)],
    );
    wait_synced(&c, synced + 1);
    let (code, out) = echo(
        &c.tb,
        &c.client(),
        &[
            "tcp-client",
            "--connect",
            "10.96.0.63:7000",
            "--duration-s",
            "0",
        ],
    );
    assert_ne!(code, Some(0));
    assert!(out.contains("refused"), "new connection not refused: {out}");
    std::thread::sleep(Duration::from_secs(2));
    slice(&c, "flap", "TCP", 7000, &[("flap-1", EndpointState::Ready)]);
    wait_synced(&c, synced + 2);
    let status = client.wait(Duration::from_secs(10)).expect("client ended");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "established connection broke:\n{text}\n{}",
        c.agent_log()
    );
    let (code, out) = echo(
        &c.tb,
        &c.client(),
        &[
            "tcp-client",
            "--connect",
            "10.96.0.63:7000",
            "--duration-s",
            "0",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
}

/// 100,000 connections from five outside addresses through a node port to
/// a backend on the other node, half closed by FIN and half by RST: at most
/// 0.1 % fail, and once the close timeout has passed, the NAT ports in use
/// are back to none.
#[test]
fn a_node_port_churn_of_100k_connections_releases_every_nat_port() {
    let mut c = Cluster::multi(2, &[("churn-1", 1)]);
    c.write(
        "churn.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: churn\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.70\n  selector: {app: churn}\n  ports:\n    - {protocol: TCP, port: 80, targetPort: 9376, nodePort: 30070}\n",
    );
    slice(
        &c,
        "churn",
        "TCP",
        9376,
        &[("churn-1", EndpointState::Ready)],
    );
    c.start_agents_args(&[
        "--conntrack-tcp-timeout-close",
        "3s",
        "--conntrack-gc-interval",
        "2s",
    ]);
    let ext = c.tb.ext.clone();
    let mut args = vec![
        "connect-rate",
        "--connect",
        "192.168.77.10:30070",
        "--count",
        "100000",
        "--threads",
        "8",
        "--rate",
        "6000",
        "--duration-s",
        "120",
        "--close",
        "mixed",
    ];
    let sources = [
        "203.0.113.10",
        "203.0.113.20",
        "203.0.113.21",
        "203.0.113.22",
        "203.0.113.23",
    ];
    for source in &sources[1..] {
        let out =
            c.tb.exec(
                &ext,
                &["ip", "addr", "add", &format!("{source}/24"), "dev", "eth0"],
            )
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for source in &sources {
        args.extend(["--source", source]);
    }
    let started = Instant::now();
    let (_, text) = echo(&c.tb, &ext, &args);
    let elapsed = started.elapsed();
    let (ok, failed) = connect_rate_result(&text);
    let nat_drops = stat(&c, 0, "drop_nat_ports");
    println!(
        "node port churn: {ok} connections, {failed} failed in {elapsed:.1?} ({text}); drop_nat_ports {nat_drops}"
    );
    assert_eq!(ok + failed, 100_000, "{text}");
    assert!(
        failed <= 100,
        "more than 0.1 % failed: {text}\n{}",
        c.agent_logs()
    );
    // Close timeout (3 s) plus a sweep (2 s): the NAT ports and every
    // entry are gone.
    let entries = wait_until(Duration::from_secs(12), || {
        let rows = list_json(&c, 0, "conntrack");
        let rows = rows.as_array().unwrap().clone();
        rows.is_empty().then_some(rows)
    });
    let rows = list_json(&c, 0, "conntrack");
    assert!(
        entries.is_some(),
        "entries left after the close timeout: {} ({} nat-in)",
        rows.as_array().unwrap().len(),
        rows.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["kind"] == "nat-in")
            .count()
    );
}

/// A classic clsact filter that drops a port on a pod's veth keeps dropping
/// with netlb attached (netlb hands packets on with TCX_NEXT), and Service
/// traffic through the same veth still works. The filter is built from what
/// the CNI bandwidth plugin uses (u32 and mirred, both classic): packets to
/// the port are redirected to a device that is down, which drops them.
#[test]
fn a_classic_tc_filter_on_a_pod_veth_keeps_running_beside_netlb() {
    let mut c = Cluster::new(&["tc-1"]);
    c.expose("tcweb", "10.96.0.67", "TCP", (80, 9376), &["tc-1"]);
    c.start_agent();
    let backend = c.tb.pod("tc-1").unwrap().ip.to_string();
    let veth = c.tb.pod("client").unwrap().host_veth.clone();
    let node = c.tb.nodes[0].netns.clone();
    let direct = |c: &Cluster| {
        echo(
            &c.tb,
            &c.client(),
            &[
                "tcp-client",
                "--connect",
                &format!("{backend}:7000"),
                "--duration-s",
                "0",
            ],
        )
        .0
    };
    assert_eq!(direct(&c), Some(0), "port 7000 reachable before the filter");
    for args in [
        vec![
            "ip", "link", "add", "nlbsink0", "type", "veth", "peer", "name", "nlbsink1",
        ],
        vec!["tc", "qdisc", "add", "dev", &veth, "clsact"],
        vec![
            "tc", "filter", "add", "dev", &veth, "ingress", "protocol", "ip", "prio", "1", "u32",
            "match", "ip", "protocol", "6", "0xff", "match", "ip", "dport", "7000", "0xffff",
            "action", "mirred", "egress", "redirect", "dev", "nlbsink0",
        ],
    ] {
        let out = c.tb.exec(&node, &args).unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert_ne!(direct(&c), Some(0), "the classic filter did not run");
    let lines = curl_many(&c, &c.client(), "http://10.96.0.67/", 10);
    assert!(lines.iter().all(|(name, _)| name == "tc-1"));
    // The filter saw the traffic it dropped.
    let out =
        c.tb.exec(
            &node,
            &["tc", "-s", "filter", "show", "dev", &veth, "ingress"],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.lines()
            .any(|l| l.contains("Sent") && !l.contains("Sent 0 bytes")),
        "{text}"
    );
}

/// A long-lived UDP client (one tuple) whose backend is removed reaches a
/// live backend within a second: the garbage collector deletes the stale
/// flow at once, as kube-proxy clears stale UDP conntrack entries.
#[test]
fn a_udp_client_moves_to_a_live_backend_within_a_second_of_its_removal() {
    let mut c = Cluster::new(&["udp-1", "udp-2"]);
    service(&c, "udpsvc", "10.96.0.64", "UDP", 53, 53);
    use EndpointState::Ready;
    slice(
        &c,
        "udpsvc",
        "UDP",
        53,
        &[("udp-1", Ready), ("udp-2", Ready)],
    );
    c.start_agent();
    let log = c.tb.dir.join("udp-client.log");
    let spawned = Instant::now();
    let mut client = spawn_echo(
        &c.client(),
        &[
            "udp-client",
            "--connect",
            "10.96.0.64:53",
            "--interval-ms",
            "50",
            "--duration-s",
            "5",
        ],
        &log,
    );
    let first = wait_until(Duration::from_secs(3), || {
        let text = std::fs::read_to_string(&log).ok()?;
        let line = text.lines().find(|l| !l.contains("error"))?;
        line.split_whitespace().nth(1).map(str::to_owned)
    })
    .expect("an answer");
    let (gone, stays) = if first == c.tb.pod("udp-1").unwrap().ip.to_string() {
        ("udp-1", "udp-2")
    } else {
        ("udp-2", "udp-1")
    };
    std::thread::sleep(Duration::from_millis(1000));
    // The removed pod keeps answering, so an answer from it would show the
    // flow did not move.
    let removed_at = spawned.elapsed().as_millis() as u64;
    slice(&c, "udpsvc", "UDP", 53, &[(stays, Ready)]);
    client.wait(Duration::from_secs(10)).expect("client ended");
    let text = std::fs::read_to_string(&log).unwrap();
    let stays_ip = c.tb.pod(stays).unwrap().ip.to_string();
    let moved_at = text
        .lines()
        .filter_map(|l| {
            let mut parts = l.split_whitespace();
            let ms: u64 = parts.next()?.parse().ok()?;
            (parts.next()? == stays_ip && ms >= removed_at).then_some(ms)
        })
        .next()
        .unwrap_or_else(|| panic!("never moved to {stays}:\n{text}\n{}", c.agent_log()));
    let after: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|ms| ms.parse::<u64>().ok())
                .is_some_and(|ms| ms > moved_at)
        })
        .collect();
    println!(
        "UDP flow moved from {gone} to {stays} {} ms after the slice was written",
        moved_at - removed_at
    );
    assert!(
        moved_at - removed_at <= 1000,
        "took {} ms:\n{text}",
        moved_at - removed_at
    );
    assert!(
        after.iter().all(|l| l.ends_with(&stays_ip)),
        "answers from the removed backend after the move:\n{text}"
    );
}

/// A conntrack table of 512 entries under a churn of short connections
/// (thousands a second, each closed by RST) does not break a live
/// long-lived connection: the full table refuses new connections and the
/// collector evicts closing ones, never established ones.
#[test]
fn a_small_conntrack_table_under_churn_keeps_a_long_flow() {
    let mut c = Cluster::new(&["small-1"]);
    c.expose("smallweb", "10.96.0.68", "TCP", (80, 9376), &["small-1"]);
    c.expose("smallecho", "10.96.0.69", "TCP", (7000, 7000), &["small-1"]);
    c.start_agents_args(&["--max-conntrack", "512", "--conntrack-gc-interval", "1s"]);
    let log = c.tb.dir.join("long.log");
    let mut long = spawn_echo(
        &c.client(),
        &[
            "tcp-client",
            "--connect",
            "10.96.0.69:7000",
            "--interval-ms",
            "200",
            "--duration-s",
            "8",
        ],
        &log,
    );
    let (_, text) = echo(
        &c.tb,
        &c.client(),
        &[
            "connect-rate",
            "--connect",
            "10.96.0.68:80",
            "--threads",
            "4",
            "--duration-s",
            "6",
        ],
    );
    let (ok, failed) = connect_rate_result(&text);
    let full = stat(&c, 0, "drop_ct_full");
    println!("churn: {ok} short connections, {failed} failed, drop_ct_full {full}");
    assert!(full > 0, "the table never filled: {text}");
    let status = long
        .wait(Duration::from_secs(15))
        .expect("long client ended");
    let out = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "the long flow broke:\n{out}\n{}",
        c.agent_log()
    );
}

/// Path MTU discovery through translated flows, and UDP errors:
/// - a large upload from a pod to a ClusterIP whose backend is on another
///   node, when the node's uplink has a smaller MTU than the pod's link:
///   the node's fragmentation-needed quotes the DNATed packet and must reach
///   the client's socket as being about the VIP;
/// - a large download from outside through a node port to a backend on the
///   other node, when the outside client's link is smaller: the error about
///   the translated reply must reach the backend about its own packet;
/// - a UDP client connected to a VIP whose backend has no listener gets
///   connection refused.
#[test]
fn path_mtu_discovery_and_udp_refusals_work_through_translated_flows() {
    let mut c = Cluster::multi(2, &[("big-1", 1)]);
    c.expose("big", "10.96.0.65", "TCP", (80, 9376), &["big-1"]);
    c.write(
        "bignp.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: bignp\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.71\n  selector: {app: bignp}\n  ports:\n    - {protocol: TCP, port: 80, targetPort: 9376, nodePort: 30090}\n",
    );
    slice(&c, "bignp", "TCP", 9376, &[("big-1", EndpointState::Ready)]);
    // A UDP Service whose target port has no listener.
    c.expose("nolisten", "10.96.0.66", "UDP", (53, 5353), &["big-1"]);
    c.start_agents();
    let node0 = c.tb.nodes[0].netns.clone();
    let mtu = |netns: &str, dev: &str, mtu: &str| {
        let out =
            c.tb.exec(netns, &["ip", "link", "set", "dev", dev, "mtu", mtu])
                .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // Upload: 1 MiB from the client pod (MTU 1500) through node0's uplink
    // (MTU 1400).
    mtu(&node0, "uplink0", "1400");
    let file = c.tb.dir.join("upload.bin");
    std::fs::write(&file, vec![b'u'; 1 << 20]).unwrap();
    let out =
        c.tb.exec(
            &c.client(),
            &[
                "curl",
                "-sS",
                "-m",
                "15",
                "--data-binary",
                &format!("@{}", file.display()),
                "http://10.96.0.65/",
            ],
        )
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && body.contains("received=1048576"),
        "upload through the ClusterIP failed: {body} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.agent_logs()
    );
    mtu(&node0, "uplink0", "1500");

    // Download: 2 MB to the outside client, whose link is 1400.
    let fabric = c.tb.fabric.clone();
    mtu(&fabric, "ext0", "1400");
    let out =
        c.tb.exec(
            &c.tb.ext,
            &[
                "curl",
                "-sS",
                "-m",
                "15",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
                "http://192.168.77.10:30090/bytes/2000000",
            ],
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "2000000",
        "download through the node port failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        c.agent_logs()
    );
    assert!(stat(&c, 0, "icmp_error_nat") >= 2);

    // UDP to a VIP whose backend does not listen.
    let (code, out) = echo(
        &c.tb,
        &c.client(),
        &["udp-query", "--connect", "10.96.0.66:53"],
    );
    assert_eq!(code, Some(3), "not refused: {out}");
}
