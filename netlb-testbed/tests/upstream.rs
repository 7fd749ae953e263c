//! Scenarios of the upstream `[sig-network] Services` e2e suite
//! (kubernetes `test/e2e/network/service.go`), ported to the namespace
//! testbed: real clients, the real agent, and what the upstream test checks
//! over the network (which backends answer). Each test is named after its
//! upstream scenario; docs/upstream.md maps them.
//! Needs root; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::{Cluster, curl_many, wait_until};
use netlb_testbed::{manifests::endpoint_slice_yaml, topology::Pod};

/// Upstream's AffinityConfirmCount: requests that must all reach one
/// backend.
const AFFINITY_CONFIRM: usize = 15;

const VIP: &str = "10.96.0.60";
const NODE_PORT: u16 = 30060;

/// Service `affinity` on VIP:80 (and NODE_PORT when `node_port`), TCP and
/// UDP (53), with sessionAffinity ClientIP when `timeout` is given.
fn affinity_service(node_port: bool, timeout: Option<u32>) -> String {
    let affinity = match timeout {
        Some(t) => format!(
            "  sessionAffinity: ClientIP\n  sessionAffinityConfig:\n    clientIP:\n      timeoutSeconds: {t}\n"
        ),
        None => "  sessionAffinity: None\n".to_owned(),
    };
    let (type_, np_tcp, np_udp) = if node_port {
        (
            "NodePort",
            format!(", nodePort: {NODE_PORT}"),
            format!(", nodePort: {}", NODE_PORT + 1),
        )
    } else {
        ("ClusterIP", String::new(), String::new())
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: affinity\nspec:\n  type: {type_}\n  clusterIP: {VIP}\n{affinity}  selector: {{app: affinity}}\n  ports:\n    - {{name: http, protocol: TCP, port: 80, targetPort: 9376{np_tcp}}}\n    - {{name: dns, protocol: UDP, port: 53, targetPort: 53{np_udp}}}\n"
    )
}

/// Three backends on node 0 behind `affinity`, the agent started.
fn cluster(node_port: bool, timeout: Option<u32>) -> Cluster {
    let mut c = Cluster::new(&["aff-0", "aff-1", "aff-2"]);
    let pods: Vec<Pod> = ["aff-0", "aff-1", "aff-2"]
        .iter()
        .map(|n| c.tb.pod(n).unwrap().clone())
        .collect();
    let refs: Vec<&Pod> = pods.iter().collect();
    c.write("affinity.yaml", &affinity_service(node_port, timeout));
    c.write(
        "affinity-slice.yaml",
        &endpoint_slice_yaml(
            "affinity",
            &[("http", "TCP", 9376), ("dns", "UDP", 53)],
            &refs,
        ),
    );
    c.start_agent();
    c
}

/// Where the clients connect from and to: a pod to the cluster IP, or the
/// outside client to node 0's node port.
fn target(c: &Cluster, node_port: bool) -> (String, String) {
    if node_port {
        (
            c.tb.ext.clone(),
            format!("http://{}:{NODE_PORT}/", c.tb.nodes[0].uplink_ip),
        )
    } else {
        (c.client(), format!("http://{VIP}/"))
    }
}

/// The backends `n` new connections reached.
fn hosts(c: &Cluster, node_port: bool, n: usize) -> Vec<String> {
    let (netns, url) = target(c, node_port);
    curl_many(c, &netns, &url, n)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// Upstream's `checkAffinity`: all of AFFINITY_CONFIRM requests on one
/// backend (`want`), or not (spread).
fn check_affinity(c: &Cluster, node_port: bool, want: bool) -> bool {
    let distinct: BTreeSet<String> = hosts(c, node_port, AFFINITY_CONFIRM).into_iter().collect();
    (distinct.len() == 1) == want
}

fn affinity_work(node_port: bool) {
    let c = cluster(node_port, Some(10_800));
    wait_until(Duration::from_secs(5), || {
        check_affinity(&c, node_port, true).then_some(())
    })
    .unwrap_or_else(|| panic!("no affinity\n{}", c.agent_log()));
    // And it stays on that backend.
    let first = hosts(&c, node_port, 1);
    assert_eq!(
        hosts(&c, node_port, AFFINITY_CONFIRM),
        vec![first[0].clone(); AFFINITY_CONFIRM]
    );
}

fn affinity_timeout(node_port: bool) {
    // A 1 s timeout: the datapath counts whole seconds, so a pause of 2.2 s
    // is past it.
    let c = cluster(node_port, Some(1));
    wait_until(Duration::from_secs(5), || {
        check_affinity(&c, node_port, true).then_some(())
    })
    .unwrap_or_else(|| panic!("no affinity\n{}", c.agent_log()));
    let first = hosts(&c, node_port, 1).remove(0);
    // After the timeout the next connection is load-balanced afresh: within
    // a few pauses one lands elsewhere (each has a 2 in 3 chance).
    let moved = (0..10).any(|_| {
        std::thread::sleep(Duration::from_millis(2_200));
        hosts(&c, node_port, 1)[0] != first
    });
    assert!(moved, "affinity never expired\n{}", c.agent_log());
}

fn affinity_switch(node_port: bool) {
    let c = cluster(node_port, None);
    assert!(
        check_affinity(&c, node_port, false),
        "spread without affinity"
    );
    c.write("affinity.yaml", &affinity_service(node_port, Some(10_800)));
    wait_until(Duration::from_secs(5), || {
        check_affinity(&c, node_port, true).then_some(())
    })
    .unwrap_or_else(|| panic!("affinity not switched on\n{}", c.agent_log()));
    c.write("affinity.yaml", &affinity_service(node_port, None));
    wait_until(Duration::from_secs(5), || {
        check_affinity(&c, node_port, false).then_some(())
    })
    .unwrap_or_else(|| panic!("affinity not switched off\n{}", c.agent_log()));
}

/// Upstream: `should have session affinity work for service with type clusterIP`.
#[test]
fn should_have_session_affinity_work_for_service_with_type_clusterip() {
    affinity_work(false);
}

/// Upstream: `should have session affinity timeout work for service with type clusterIP`.
#[test]
fn should_have_session_affinity_timeout_work_for_service_with_type_clusterip() {
    affinity_timeout(false);
}

/// Upstream: `should be able to switch session affinity for service with type clusterIP`.
#[test]
fn should_be_able_to_switch_session_affinity_for_service_with_type_clusterip() {
    affinity_switch(false);
}

/// Upstream: `should have session affinity work for NodePort service`.
#[test]
fn should_have_session_affinity_work_for_nodeport_service() {
    affinity_work(true);
}

/// Upstream: `should have session affinity timeout work for NodePort service`.
#[test]
fn should_have_session_affinity_timeout_work_for_nodeport_service() {
    affinity_timeout(true);
}

/// Upstream: `should be able to switch session affinity for NodePort service`.
#[test]
fn should_be_able_to_switch_session_affinity_for_nodeport_service() {
    affinity_switch(true);
}

/// Upstream: `should function for client IP based session affinity: udp`.
/// Each backend answers DNS with its own address: every query (a new UDP
/// flow from a new source port) gets the same one.
#[test]
fn should_function_for_client_ip_based_session_affinity_udp() {
    let c = cluster(false, Some(10_800));
    let client = c.client();
    let answers: BTreeSet<String> = (0..AFFINITY_CONFIRM)
        .map(|_| {
            let out =
                c.tb.exec(
                    &client,
                    &[
                        "dig",
                        "+short",
                        "+tries=1",
                        "+time=2",
                        "-p",
                        "53",
                        &format!("@{VIP}"),
                        "affinity.test",
                    ],
                )
                .unwrap();
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        })
        .collect();
    assert_eq!(answers.len(), 1, "{answers:?}\n{}", c.agent_log());
    assert!(
        !answers.iter().next().unwrap().is_empty(),
        "no answer\n{}",
        c.agent_log()
    );
}

/// Upstream: `should be able to handle large requests: udp`. A 2000-byte
/// datagram to the cluster IP (fragmented by the client's stack on the
/// 1500-byte pod link) reaches a backend whole, and its 2000-odd-byte echo
/// (fragmented by the backend) comes back whole, from the cluster IP.
#[test]
fn should_be_able_to_handle_large_requests_udp() {
    let c = Cluster::new(&["big-0", "big-1"]);
    c.expose(
        "big",
        "10.96.0.61",
        "UDP",
        (7001, 7001),
        &["big-0", "big-1"],
    );
    let mut c = c;
    c.start_agent();
    let client = c.client();
    for size in [2_000, 8_000] {
        let (code, out) = common::echo(
            &c.tb,
            &client,
            &[
                "udp-echo",
                "--connect",
                "10.96.0.61:7001",
                "--size",
                &size.to_string(),
            ],
        );
        assert_eq!(code, Some(0), "{size} bytes: {out}\n{}", c.agent_log());
        assert!(out.trim().ends_with(&format!(" {size}")), "{out}");
    }
}

/// Upstream: `should be able to handle large requests: http`. A 100 KB POST
/// body and a 1 MB answer through the cluster IP.
#[test]
fn should_be_able_to_handle_large_requests_http() {
    let c = Cluster::new(&["big-0", "big-1"]);
    c.expose("big", "10.96.0.62", "TCP", (80, 9376), &["big-0", "big-1"]);
    let mut c = c;
    c.start_agent();
    let client = c.client();
    let body_file = c.tb.dir.join("body");
    std::fs::write(&body_file, vec![b'x'; 100_000]).unwrap();
    let out =
        c.tb.exec(
            &client,
            &[
                "curl",
                "-sS",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_upload}",
                "--data-binary",
                &format!("@{}", body_file.display()),
                "http://10.96.0.62/",
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.trim(), "200 100000", "{text}\n{}", c.agent_log());
    let out =
        c.tb.exec(
            &client,
            &[
                "curl",
                "-sS",
                "-m",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{size_download}",
                "http://10.96.0.62/bytes/1000000",
            ],
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "200 1000000");
}

/// Three nodes in the zones given, one backend `td-<i>` on each node in
/// `with_backends`, a client pod on every node, the API-server double
/// (serving the Nodes with their zone labels) and an agent per node.
struct ZonedCluster {
    c: Cluster,
    api: netlb_testbed::apiserver::FakeApiServer,
    clients: Vec<Pod>,
}

fn zoned_cluster(zones: [&str; 3], with_backends: &[usize]) -> ZonedCluster {
    use netlb_testbed::{agent::AgentSource, apiserver::FakeApiServer, topology::bind_in_netns};
    let backends: Vec<(String, usize)> = with_backends
        .iter()
        .map(|n| (format!("td-{n}"), *n))
        .collect();
    let refs: Vec<(&str, usize)> = backends.iter().map(|(n, i)| (n.as_str(), *i)).collect();
    let mut c = Cluster::multi(3, &refs);
    let clients: Vec<Pod> = (0..3)
        .map(|n| c.tb.add_pod(n, &format!("cl-{n}")).unwrap())
        .collect();
    let listener = bind_in_netns(&c.tb.nodes[0].netns, "0.0.0.0:0").expect("listener");
    let api = FakeApiServer::start(listener).expect("api server");
    let reachable = format!("{}:{}", c.tb.nodes[0].uplink_ip, api.addr().port());
    let kubeconfig = c.tb.dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        api.kubeconfig()
            .replace(&api.addr().to_string(), &reachable),
    )
    .unwrap();
    for (i, zone) in zones.iter().enumerate() {
        api.apply(serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node{i}"), "labels": {"topology.kubernetes.io/zone": zone}},
        }))
        .unwrap();
    }
    c.start_agents_with(AgentSource::Kubeconfig(kubeconfig));
    ZonedCluster { c, api, clients }
}

/// The Service `td` with `traffic_distribution`, and the slice the
/// EndpointSlice controller writes for it: each endpoint hinted for its own
/// zone, and for PreferSameNode also for its own node.
fn apply_traffic_distribution(z: &ZonedCluster, zones: [&str; 3], mode: &str) {
    use serde_json::json;
    z.api
        .apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "td", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.63", "trafficDistribution": mode,
                "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 9376}],
            },
        }))
        .unwrap();
    let endpoints: Vec<serde_json::Value> =
        z.c.tb
            .pods()
            .iter()
            .filter(|p| p.name.starts_with("td-"))
            .map(|p| {
                let mut hints = json!({"forZones": [{"name": zones[p.node]}]});
                if mode == "PreferSameNode" {
                    hints["forNodes"] = json!([{"name": format!("node{}", p.node)}]);
                }
                json!({
                    "addresses": [p.ip.to_string()],
                    "conditions": {"ready": true, "serving": true, "terminating": false},
                    "nodeName": format!("node{}", p.node),
                    "zone": zones[p.node],
                    "hints": hints,
                })
            })
            .collect();
    z.api
        .apply(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "td-abc12", "namespace": "default",
                "labels": {"kubernetes.io/service-name": "td"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "protocol": "TCP", "port": 9376}],
            "endpoints": endpoints,
        }))
        .unwrap();
}

/// The backends each client pod reaches with 12 new connections.
fn reached_per_client(z: &ZonedCluster) -> Vec<BTreeSet<String>> {
    z.clients
        .iter()
        .map(|client| {
            (0..12)
                .filter_map(|_| common::curl(&z.c.tb, &client.netns, "http://10.96.0.63/", 2))
                .filter_map(|body| body.split_whitespace().next().map(str::to_owned))
                .collect()
        })
        .collect()
}

fn same_zone(mode: &str) {
    let zones = ["zone-a", "zone-b", "zone-c"];
    let z = zoned_cluster(zones, &[0, 1, 2]);
    apply_traffic_distribution(&z, zones, mode);
    let want: Vec<BTreeSet<String>> = (0..3).map(|n| [format!("td-{n}")].into()).collect();
    wait_until(Duration::from_secs(10), || {
        (reached_per_client(&z) == want).then_some(())
    })
    .unwrap_or_else(|| panic!("{:?}\n{}", reached_per_client(&z), z.c.agent_logs()));
}

/// Upstream (traffic_distribution.go): `should route traffic to an endpoint
/// in the same zone when using PreferClose`. Every client reaches the
/// backend of its own zone only.
#[test]
fn should_route_traffic_to_an_endpoint_in_the_same_zone_when_using_preferclose() {
    same_zone("PreferClose");
}

/// Upstream: `should route traffic to an endpoint in the same zone when
/// using PreferSameZone`.
#[test]
fn should_route_traffic_to_an_endpoint_in_the_same_zone_when_using_prefersamezone() {
    same_zone("PreferSameZone");
}

/// Upstream: `should route traffic correctly between pods on multiple nodes
/// when using PreferSameNode`. Nodes 0 and 2 share zone-a, node 1 is in
/// zone-b; backends run on nodes 0 and 1. Clients on nodes 0 and 1 reach
/// their own node's backend; the client on node 2, whose node has none,
/// falls back to its zone's (node 0's).
#[test]
fn should_route_traffic_correctly_between_pods_on_multiple_nodes_when_using_prefersamenode() {
    let zones = ["zone-a", "zone-b", "zone-a"];
    let z = zoned_cluster(zones, &[0, 1]);
    apply_traffic_distribution(&z, zones, "PreferSameNode");
    let want: Vec<BTreeSet<String>> = vec![
        ["td-0".to_owned()].into(),
        ["td-1".to_owned()].into(),
        ["td-0".to_owned()].into(),
    ];
    wait_until(Duration::from_secs(10), || {
        (reached_per_client(&z) == want).then_some(())
    })
    .unwrap_or_else(|| panic!("{:?}\n{}", reached_per_client(&z), z.c.agent_logs()));
}
