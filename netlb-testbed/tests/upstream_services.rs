//! More scenarios of the upstream `[sig-network] Services` e2e suite
//! (kubernetes `test/e2e/network/service.go`), ported to the namespace
//! testbed: ports and protocols, source addresses, every backend from every
//! node (pods and host processes, upstream's hostNetwork clients),
//! endpoint conditions and terminating fallbacks, traffic policies, UDP
//! continuity while servers cycle, multiple slices. The manifest directory
//! plays the API server, the test plays the EndpointSlice controller.
//! Each test is named after its upstream scenario; docs/upstream.md maps them.
//! Needs root; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod common;

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use common::{Cluster, curl, curl_status, echo, spawn_echo, wait_until};
use netlb_testbed::{
    manifests::{EndpointState, endpoint_slice_yaml_with_states},
    topology::Pod,
};

/// A Service `name` on `ip` of `type_` with ports
/// `(name, protocol, port, targetPort, nodePort)` and extra spec lines.
fn service(
    name: &str,
    ip: &str,
    type_: &str,
    ports: &[(&str, &str, u16, u16, Option<u16>)],
    extra: &str,
) -> String {
    let ports: String = ports
        .iter()
        .map(|(n, proto, port, target, node_port)| {
            let np = node_port.map(|p| format!(", nodePort: {p}")).unwrap_or_default();
            format!("    - {{name: \"{n}\", protocol: {proto}, port: {port}, targetPort: {target}{np}}}\n")
        })
        .collect();
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  type: {type_}\n  clusterIP: {ip}\n{extra}  selector: {{app: {name}}}\n  ports:\n{ports}"
    )
}

/// An EndpointSlice `<service>-<suffix>` with the ports and endpoints given.
fn slice(
    service: &str,
    suffix: &str,
    ports: &[(&str, &str, u16)],
    endpoints: &[(&Pod, EndpointState)],
) -> String {
    endpoint_slice_yaml_with_states(service, ports, endpoints).replacen(
        &format!("name: {service}-abc12"),
        &format!("name: {service}-{suffix}"),
        1,
    )
}

fn ready<'a>(pods: &[&'a Pod]) -> Vec<(&'a Pod, EndpointState)> {
    pods.iter().map(|p| (*p, EndpointState::Ready)).collect()
}

fn pod(c: &Cluster, name: &str) -> Pod {
    c.tb.pod(name).unwrap().clone()
}

/// The backend names `n` HTTP requests on new connections reached
/// (failures are left out).
fn http_backends(c: &Cluster, netns: &str, url: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .filter_map(|_| curl(&c.tb, netns, url, 2))
        .filter_map(|b| b.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The same from a process of node `node`'s host (its cgroup, where the
/// socket-level programs act): upstream's hostNetwork client.
fn host_http_backends(c: &Cluster, node: usize, url: &str, n: usize) -> BTreeSet<String> {
    (0..n)
        .filter_map(|_| {
            let out =
                c.tb.exec_host(node, &["curl", "-sS", "-m", "2", url])
                    .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .filter_map(|b| b.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// The DNS answers (each backend answers with its own address) of `n`
/// queries, each from a new source port.
fn dns_answers(c: &Cluster, netns: &str, server: &str, port: u16, n: usize) -> BTreeSet<String> {
    (0..n)
        .filter_map(|_| {
            let out =
                c.tb.exec(
                    netns,
                    &[
                        "dig",
                        "+short",
                        "+tries=1",
                        "+time=1",
                        "-p",
                        &port.to_string(),
                        &format!("@{server}"),
                        "x.test",
                    ],
                )
                .ok()?;
            let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
            (!text.is_empty()).then_some(text)
        })
        .collect()
}

fn names(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.name.clone()).collect()
}

fn ips(pods: &[&Pod]) -> BTreeSet<String> {
    pods.iter().map(|p| p.ip.to_string()).collect()
}

/// Waits until `f` returns `want` (10 s), panicking with the agents' logs.
fn eventually<T: PartialEq + std::fmt::Debug>(
    c: &Cluster,
    what: &str,
    want: T,
    mut f: impl FnMut() -> T,
) {
    let mut last = None;
    let got = wait_until(Duration::from_secs(10), || {
        let v = f();
        let ok = v == want;
        last = Some(v);
        ok.then_some(())
    });
    if got.is_none() {
        panic!("{what}: wanted {want:?}, got {last:?}\n{}", c.agent_logs());
    }
}

/// Upstream: `should serve multiport endpoints from pods`. Two ports of
/// one Service, each to its own target port.
#[test]
fn should_serve_multiport_endpoints_from_pods() {
    let mut c = Cluster::new(&["mp-0", "mp-1"]);
    let (p0, p1) = (pod(&c, "mp-0"), pod(&c, "mp-1"));
    c.write(
        "mp.yaml",
        &service(
            "mp",
            "10.96.0.70",
            "ClusterIP",
            &[
                ("portname1", "TCP", 80, 9376, None),
                ("portname2", "TCP", 81, 80, None),
            ],
            "",
        ),
    );
    c.write(
        "mp-slice.yaml",
        &slice(
            "mp",
            "a",
            &[("portname1", "TCP", 9376), ("portname2", "TCP", 80)],
            &ready(&[&p0, &p1]),
        ),
    );
    c.start_agent();
    let client = c.client();
    let all = names(&[&p0, &p1]);
    assert_eq!(http_backends(&c, &client, "http://10.96.0.70:80/", 20), all);
    assert_eq!(http_backends(&c, &client, "http://10.96.0.70:81/", 20), all);
}

/// Upstream: `should be updated after adding or deleting ports`. A port
/// added serves; a port deleted is refused (a cluster IP's undefined port).
#[test]
fn should_be_updated_after_adding_or_deleting_ports() {
    let mut c = Cluster::new(&["up-0"]);
    let p0 = pod(&c, "up-0");
    let one = service(
        "up",
        "10.96.0.71",
        "ClusterIP",
        &[("a", "TCP", 80, 9376, None)],
        "",
    );
    c.write("up.yaml", &one);
    c.write(
        "up-slice.yaml",
        &slice(
            "up",
            "a",
            &[("a", "TCP", 9376), ("b", "TCP", 80)],
            &ready(&[&p0]),
        ),
    );
    c.start_agent();
    let client = c.client();
    let reach = |port: u16| curl_status(&c.tb, &client, &format!("http://10.96.0.71:{port}/"), 2).0;
    assert_eq!(reach(80), 200);
    c.write(
        "up.yaml",
        &service(
            "up",
            "10.96.0.71",
            "ClusterIP",
            &[("a", "TCP", 80, 9376, None), ("b", "TCP", 81, 80, None)],
            "",
        ),
    );
    eventually(&c, "port 81 added", 200, || reach(81));
    c.write(
        "up.yaml",
        &service(
            "up",
            "10.96.0.71",
            "ClusterIP",
            &[("b", "TCP", 81, 80, None)],
            "",
        ),
    );
    eventually(&c, "port 80 deleted", 0, || reach(80));
    assert_eq!(reach(81), 200);
}

/// Upstream: `should serve endpoints on same port and different protocols`.
#[test]
fn should_serve_endpoints_on_same_port_and_different_protocols() {
    let mut c = Cluster::new(&["sp-0"]);
    let p0 = pod(&c, "sp-0");
    c.write(
        "sp.yaml",
        &service(
            "sp",
            "10.96.0.72",
            "ClusterIP",
            &[("tcp", "TCP", 53, 9376, None), ("udp", "UDP", 53, 53, None)],
            "",
        ),
    );
    c.write(
        "sp-slice.yaml",
        &slice(
            "sp",
            "a",
            &[("tcp", "TCP", 9376), ("udp", "UDP", 53)],
            &ready(&[&p0]),
        ),
    );
    c.start_agent();
    let client = c.client();
    assert_eq!(
        http_backends(&c, &client, "http://10.96.0.72:53/", 5),
        names(&[&p0])
    );
    assert_eq!(dns_answers(&c, &client, "10.96.0.72", 53, 5), ips(&[&p0]));
}

/// Upstream: `should be able to update service type to NodePort listening on
/// same port number but different protocols`.
#[test]
fn should_be_able_to_update_service_type_to_nodeport_listening_on_same_port_number_but_different_protocols()
 {
    let mut c = Cluster::new(&["np-0"]);
    let p0 = pod(&c, "np-0");
    c.write(
        "np.yaml",
        &service(
            "np",
            "10.96.0.73",
            "ClusterIP",
            &[("tcp", "TCP", 53, 9376, None), ("udp", "UDP", 53, 53, None)],
            "",
        ),
    );
    c.write(
        "np-slice.yaml",
        &slice(
            "np",
            "a",
            &[("tcp", "TCP", 9376), ("udp", "UDP", 53)],
            &ready(&[&p0]),
        ),
    );
    c.start_agent();
    c.write(
        "np.yaml",
        &service(
            "np",
            "10.96.0.73",
            "NodePort",
            &[
                ("tcp", "TCP", 53, 9376, Some(30073)),
                ("udp", "UDP", 53, 53, Some(30073)),
            ],
            "",
        ),
    );
    let node = c.tb.nodes[0].uplink_ip.to_string();
    let ext = c.tb.ext.clone();
    eventually(&c, "TCP node port", names(&[&p0]), || {
        http_backends(&c, &ext, &format!("http://{node}:30073/"), 3)
    });
    eventually(&c, "UDP node port", ips(&[&p0]), || {
        dns_answers(&c, &ext, &node, 30073, 3)
    });
}

/// Upstream: `should preserve source pod IP for traffic thru service cluster
/// IP`, client and backend on different nodes.
#[test]
fn should_preserve_source_pod_ip_for_traffic_thru_service_cluster_ip() {
    let mut c = Cluster::multi(2, &[("src-0", 0)]);
    let client = c.tb.add_pod(1, "remote-client").unwrap();
    c.expose("src", "10.96.0.74", "TCP", (80, 9376), &["src-0"]);
    c.start_agents();
    let body = curl(&c.tb, &client.netns, "http://10.96.0.74/", 2).expect("served");
    let peer = body.split_whitespace().nth(1).unwrap_or("");
    assert_eq!(
        peer.split(':').next(),
        Some(client.ip.to_string().as_str()),
        "{body}"
    );
}

/// Two nodes, backends `fn-0` (node 0) and `fn-1` (node 1), a client pod on
/// each node; the Service on TCP 80 and UDP 53 with node ports.
fn function_cluster() -> (Cluster, Vec<Pod>, Vec<Pod>) {
    let mut c = Cluster::multi(2, &[("fn-0", 0), ("fn-1", 1)]);
    let backends = vec![pod(&c, "fn-0"), pod(&c, "fn-1")];
    let clients = vec![pod(&c, "client"), c.tb.add_pod(1, "client-1").unwrap()];
    c.write(
        "fn.yaml",
        &service(
            "fn",
            "10.96.0.75",
            "NodePort",
            &[
                ("http", "TCP", 80, 9376, Some(30075)),
                ("dns", "UDP", 53, 53, Some(30076)),
            ],
            "",
        ),
    );
    let refs: Vec<&Pod> = backends.iter().collect();
    c.write(
        "fn-slice.yaml",
        &slice(
            "fn",
            "a",
            &[("http", "TCP", 9376), ("dns", "UDP", 53)],
            &ready(&refs),
        ),
    );
    c.start_agents();
    (c, backends, clients)
}

/// Upstream: `should function for pod-Service: http` (every backend, on
/// every node, through the cluster IP and every node's node port, from a
/// pod on each node and from each node's host).
#[test]
fn should_function_for_pod_service_http() {
    let (c, backends, clients) = function_cluster();
    let all = names(&backends.iter().collect::<Vec<_>>());
    let mut urls = vec!["http://10.96.0.75/".to_owned()];
    urls.extend(
        c.tb.nodes
            .iter()
            .map(|n| format!("http://{}:30075/", n.uplink_ip)),
    );
    for url in &urls {
        for client in &clients {
            assert_eq!(
                http_backends(&c, &client.netns, url, 20),
                all,
                "{url} from {}",
                client.name
            );
        }
        for node in 0..2 {
            assert_eq!(
                host_http_backends(&c, node, url, 20),
                all,
                "{url} from node{node}'s host"
            );
        }
    }
}

/// Upstream: `should function for pod-Service: udp`.
#[test]
fn should_function_for_pod_service_udp() {
    let (c, backends, clients) = function_cluster();
    let all = ips(&backends.iter().collect::<Vec<_>>());
    let mut targets = vec![("10.96.0.75".to_owned(), 53)];
    targets.extend(c.tb.nodes.iter().map(|n| (n.uplink_ip.to_string(), 30076)));
    for (server, port) in &targets {
        for client in &clients {
            assert_eq!(
                dns_answers(&c, &client.netns, server, *port, 20),
                all,
                "{server}:{port} from {}",
                client.name
            );
        }
    }
}

/// Upstream: `should function for endpoint-Service: http`: from a backend
/// pod to its own Service, itself (hairpin) included.
#[test]
fn should_function_for_endpoint_service_http() {
    let (c, backends, _) = function_cluster();
    let all = names(&backends.iter().collect::<Vec<_>>());
    for backend in &backends {
        assert_eq!(
            http_backends(&c, &backend.netns, "http://10.96.0.75/", 24),
            all,
            "from {}",
            backend.name
        );
    }
}

/// Upstream: `should function for endpoint-Service: udp`.
#[test]
fn should_function_for_endpoint_service_udp() {
    let (c, backends, _) = function_cluster();
    let all = ips(&backends.iter().collect::<Vec<_>>());
    for backend in &backends {
        assert_eq!(
            dns_answers(&c, &backend.netns, "10.96.0.75", 53, 24),
            all,
            "from {}",
            backend.name
        );
    }
}

/// Upstream: `should function for multiple endpoint-Services with same
/// selector`: two Services over the same pods; deleting one leaves the
/// other serving.
#[test]
fn should_function_for_multiple_endpoint_services_with_same_selector() {
    let mut c = Cluster::new(&["ms-0", "ms-1"]);
    let pods = [pod(&c, "ms-0"), pod(&c, "ms-1")];
    let refs: Vec<&Pod> = pods.iter().collect();
    for (name, ip) in [("ms-a", "10.96.0.76"), ("ms-b", "10.96.0.77")] {
        c.write(
            &format!("{name}.yaml"),
            &service(name, ip, "ClusterIP", &[("", "TCP", 80, 9376, None)], ""),
        );
        c.write(
            &format!("{name}-slice.yaml"),
            &slice(name, "a", &[("", "TCP", 9376)], &ready(&refs)),
        );
    }
    c.start_agent();
    let client = c.client();
    let all = names(&refs);
    assert_eq!(http_backends(&c, &client, "http://10.96.0.76/", 20), all);
    assert_eq!(http_backends(&c, &client, "http://10.96.0.77/", 20), all);
    std::fs::remove_file(c.manifests.join("ms-a.yaml")).unwrap();
    std::fs::remove_file(c.manifests.join("ms-a-slice.yaml")).unwrap();
    eventually(&c, "ms-a gone", 0, || {
        curl_status(&c.tb, &client, "http://10.96.0.76/", 1).0
    });
    assert_eq!(http_backends(&c, &client, "http://10.96.0.77/", 20), all);
}

/// Upstream: `should update endpoints: udp`.
#[test]
fn should_update_endpoints_udp() {
    let mut c = Cluster::new(&["ue-0", "ue-1"]);
    let (p0, p1) = (pod(&c, "ue-0"), pod(&c, "ue-1"));
    c.write(
        "ue.yaml",
        &service(
            "ue",
            "10.96.0.78",
            "ClusterIP",
            &[("", "UDP", 53, 53, None)],
            "",
        ),
    );
    c.write(
        "ue-slice.yaml",
        &slice("ue", "a", &[("", "UDP", 53)], &ready(&[&p0])),
    );
    c.start_agent();
    let client = c.client();
    assert_eq!(dns_answers(&c, &client, "10.96.0.78", 53, 6), ips(&[&p0]));
    c.write(
        "ue-slice.yaml",
        &slice("ue", "a", &[("", "UDP", 53)], &ready(&[&p0, &p1])),
    );
    eventually(&c, "both", ips(&[&p0, &p1]), || {
        dns_answers(&c, &client, "10.96.0.78", 53, 16)
    });
    c.write(
        "ue-slice.yaml",
        &slice("ue", "a", &[("", "UDP", 53)], &ready(&[&p1])),
    );
    eventually(&c, "the second only", ips(&[&p1]), || {
        dns_answers(&c, &client, "10.96.0.78", 53, 8)
    });
}

/// Upstream: `should create endpoints for unready pods`
/// (publishNotReadyAddresses): the EndpointSlice controller publishes the
/// unready pod as ready, and it is served.
#[test]
fn should_create_endpoints_for_unready_pods() {
    let mut c = Cluster::new(&["nr-0"]);
    let p0 = pod(&c, "nr-0");
    c.write(
        "nr.yaml",
        &service(
            "nr",
            "10.96.0.79",
            "ClusterIP",
            &[("", "TCP", 80, 9376, None)],
            "  publishNotReadyAddresses: true\n",
        ),
    );
    // What the controller writes for a pod whose readiness probe fails
    // under publishNotReadyAddresses: ready.
    c.write(
        "nr-slice.yaml",
        &slice(
            "nr",
            "a",
            &[("", "TCP", 9376)],
            &[(&p0, EndpointState::Ready)],
        ),
    );
    c.start_agent();
    assert_eq!(
        http_backends(&c, &c.client(), "http://10.96.0.79/", 5),
        names(&[&p0])
    );
}

/// Upstream: `should be able to connect to terminating and unready endpoints
/// if PublishNotReadyAddresses is true`: the controller publishes them
/// ready, and they are served.
#[test]
fn should_be_able_to_connect_to_terminating_and_unready_endpoints_if_publishnotreadyaddresses_is_true()
 {
    let mut c = Cluster::new(&["pt-0"]);
    let p0 = pod(&c, "pt-0");
    c.write(
        "pt.yaml",
        &service(
            "pt",
            "10.96.0.80",
            "ClusterIP",
            &[("", "TCP", 80, 9376, None)],
            "  publishNotReadyAddresses: true\n",
        ),
    );
    c.write(
        "pt-slice.yaml",
        &slice(
            "pt",
            "a",
            &[("", "TCP", 9376)],
            &[(&p0, EndpointState::Ready)],
        ),
    );
    c.start_agent();
    assert_eq!(
        http_backends(&c, &c.client(), "http://10.96.0.80/", 5),
        names(&[&p0])
    );
}

/// Upstream: `should not be able to connect to terminating and unready
/// endpoints if PublishNotReadyAddresses is false`: a terminating endpoint
/// that no longer serves and an unready one are not used: refused.
#[test]
fn should_not_be_able_to_connect_to_terminating_and_unready_endpoints_if_publishnotreadyaddresses_is_false()
 {
    let mut c = Cluster::new(&["pf-0", "pf-1"]);
    let (p0, p1) = (pod(&c, "pf-0"), pod(&c, "pf-1"));
    c.write(
        "pf.yaml",
        &service(
            "pf",
            "10.96.0.81",
            "ClusterIP",
            &[("", "TCP", 80, 9376, None)],
            "",
        ),
    );
    c.write(
        "pf-slice.yaml",
        &slice(
            "pf",
            "a",
            &[("", "TCP", 9376)],
            &[
                (&p0, EndpointState::TerminatingNotServing),
                (&p1, EndpointState::Unready),
            ],
        ),
    );
    c.start_agent();
    let out =
        c.tb.exec(
            &c.client(),
            &["curl", "-sS", "-m", "2", "http://10.96.0.81/"],
        )
        .unwrap();
    assert_eq!(out.status.code(), Some(7), "refused, not served");
}

/// The four upstream `should fallback to (local) terminating endpoints when
/// there are no ready endpoints with <policy>` scenarios: two nodes, one
/// serving-terminating endpoint on node 1; `policy` is the extra spec line.
fn fallback_to_terminating(extra: &str, type_: &str) -> (Cluster, Pod) {
    let mut c = Cluster::multi(2, &[("ft-1", 1)]);
    let p1 = pod(&c, "ft-1");
    c.write(
        "ft.yaml",
        &service(
            "ft",
            "10.96.0.82",
            type_,
            &[("", "TCP", 80, 9376, (type_ == "NodePort").then_some(30082))],
            extra,
        ),
    );
    c.write(
        "ft-slice.yaml",
        &slice(
            "ft",
            "a",
            &[("", "TCP", 9376)],
            &[(&p1, EndpointState::Terminating)],
        ),
    );
    c.start_agents();
    (c, p1)
}

/// Upstream: `should fallback to terminating endpoints when there are no
/// ready endpoints with internalTrafficPolicy=Cluster`.
#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_internaltrafficpolicy_cluster()
 {
    let (c, p1) = fallback_to_terminating("", "ClusterIP");
    assert_eq!(
        http_backends(&c, &c.client(), "http://10.96.0.82/", 5),
        names(&[&p1])
    );
}

/// Upstream: `should fallback to local terminating endpoints when there are
/// no ready endpoints with internalTrafficPolicy=Local`: a client on the
/// endpoint's node is served, one on the other node is not.
#[test]
fn should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_internaltrafficpolicy_local()
 {
    let (mut c, p1) = fallback_to_terminating("  internalTrafficPolicy: Local\n", "ClusterIP");
    let local = c.tb.add_pod(1, "client-1").unwrap();
    assert_eq!(
        http_backends(&c, &local.netns, "http://10.96.0.82/", 5),
        names(&[&p1])
    );
    assert!(http_backends(&c, &c.client(), "http://10.96.0.82/", 2).is_empty());
}

/// Upstream: `should fallback to terminating endpoints when there are no
/// ready endpoints with externallTrafficPolicy=Cluster` (sic): from outside
/// through either node's node port.
#[test]
fn should_fallback_to_terminating_endpoints_when_there_are_no_ready_endpoints_with_externaltrafficpolicy_cluster()
 {
    let (c, p1) = fallback_to_terminating("", "NodePort");
    for node in &c.tb.nodes {
        let url = format!("http://{}:30082/", node.uplink_ip);
        assert_eq!(
            http_backends(&c, &c.tb.ext, &url, 5),
            names(&[&p1]),
            "{url}"
        );
    }
}

/// Upstream: `should fallback to local terminating endpoints when there are
/// no ready endpoints with externalTrafficPolicy=Local`: the endpoint's
/// node serves its node port, the other node drops.
#[test]
fn should_fallback_to_local_terminating_endpoints_when_there_are_no_ready_endpoints_with_externaltrafficpolicy_local()
 {
    let (c, p1) = fallback_to_terminating("  externalTrafficPolicy: Local\n", "NodePort");
    let n1 = format!("http://{}:30082/", c.tb.nodes[1].uplink_ip);
    let n0 = format!("http://{}:30082/", c.tb.nodes[0].uplink_ip);
    assert_eq!(http_backends(&c, &c.tb.ext, &n1, 5), names(&[&p1]));
    assert!(http_backends(&c, &c.tb.ext, &n0, 2).is_empty());
}

/// Upstream: `should respect internalTrafficPolicy=Local Pod to Pod`: the
/// client on the endpoint's node is served, one on another node is not.
#[test]
fn should_respect_internaltrafficpolicy_local_pod_to_pod() {
    let mut c = Cluster::multi(2, &[("itp-1", 1)]);
    let p1 = pod(&c, "itp-1");
    c.write(
        "itp.yaml",
        &service(
            "itp",
            "10.96.0.83",
            "ClusterIP",
            &[("", "TCP", 80, 9376, None)],
            "  internalTrafficPolicy: Local\n",
        ),
    );
    c.write(
        "itp-slice.yaml",
        &slice("itp", "a", &[("", "TCP", 9376)], &ready(&[&p1])),
    );
    c.start_agents();
    let local = c.tb.add_pod(1, "client-1").unwrap();
    assert_eq!(
        http_backends(&c, &local.netns, "http://10.96.0.83/", 10),
        names(&[&p1])
    );
    assert!(http_backends(&c, &c.client(), "http://10.96.0.83/", 2).is_empty());
}

/// Upstream: `should implement NodePort and HealthCheckNodePort correctly
/// when ExternalTrafficPolicy changes`. Local: the endpoint's node serves
/// its node port and answers 200 on the health-check node port, the other
/// drops and answers 503. Cluster: both serve, the health-check port
/// closes. Local again: as first.
#[test]
fn should_implement_nodeport_and_healthchecknodeport_correctly_when_externaltrafficpolicy_changes()
{
    let mut c = Cluster::multi(2, &[("hc-1", 1)]);
    let p1 = pod(&c, "hc-1");
    let lb = |local: bool| {
        let extra = if local {
            "  externalTrafficPolicy: Local\n  healthCheckNodePort: 32084\n"
        } else {
            "  externalTrafficPolicy: Cluster\n"
        };
        service(
            "hc",
            "10.96.0.84",
            "LoadBalancer",
            &[("", "TCP", 80, 9376, Some(30084))],
            extra,
        )
    };
    c.write("hc.yaml", &lb(true));
    c.write(
        "hc-slice.yaml",
        &slice("hc", "a", &[("", "TCP", 9376)], &ready(&[&p1])),
    );
    c.start_agents();
    let ext = c.tb.ext.clone();
    let (n0, n1) = (c.tb.nodes[0].uplink_ip, c.tb.nodes[1].uplink_ip);
    let health = |n: Ipv4Addr| curl_status(&c.tb, &ext, &format!("http://{n}:32084/"), 1).0;
    let served = |n: Ipv4Addr| curl(&c.tb, &ext, &format!("http://{n}:30084/"), 1).is_some();
    let local_state = || (health(n0), health(n1), served(n0), served(n1));
    eventually(&c, "Local", (503, 200, false, true), local_state);
    c.write("hc.yaml", &lb(false));
    eventually(&c, "Cluster", (0, 0, true, true), local_state);
    c.write("hc.yaml", &lb(true));
    eventually(&c, "Local again", (503, 200, false, true), local_state);
}

/// A UDP client in the client pod sending a query every 100 ms to
/// `server:port` for `seconds`; its output is one line per query: the
/// answering backend's address, or an error.
fn udp_client(
    c: &Cluster,
    netns: &str,
    target: &str,
    seconds: u32,
    log: &str,
) -> netlb_testbed::process::ChildGuard {
    spawn_echo(
        netns,
        &[
            "udp-client",
            "--connect",
            target,
            "--interval-ms",
            "100",
            "--duration-s",
            &seconds.to_string(),
        ],
        &c.tb.dir.join(log),
    )
}

fn answers_after(c: &Cluster, log: &str, after_ms: u128) -> Vec<String> {
    std::fs::read_to_string(c.tb.dir.join(log))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (ms, rest) = l.split_once(' ')?;
            (ms.parse::<u128>().ok()? >= after_ms).then(|| rest.to_owned())
        })
        .collect()
}

/// The upstream `should be able to preserve UDP traffic when server pod
/// cycles for a ...` scenarios: one UDP client sends continuously while its
/// only server is replaced by another; once the slice names the new one,
/// its answers come from the new server (the flow to the old one is not
/// kept: kube-proxy's stale-UDP cleanup).
fn udp_server_cycles(type_: &str, extra: &str, from_outside: bool, initially: EndpointState) {
    let mut c = Cluster::new(&["cy-0", "cy-1"]);
    let (p0, p1) = (pod(&c, "cy-0"), pod(&c, "cy-1"));
    let node_port = (type_ == "NodePort").then_some(30085);
    c.write(
        "cy.yaml",
        &service(
            "cy",
            "10.96.0.85",
            type_,
            &[("", "UDP", 53, 53, node_port)],
            extra,
        ),
    );
    c.write(
        "cy-slice.yaml",
        &slice("cy", "a", &[("", "UDP", 53)], &[(&p0, initially)]),
    );
    c.start_agent();
    let (netns, target) = if from_outside {
        (
            c.tb.ext.clone(),
            format!("{}:30085", c.tb.nodes[0].uplink_ip),
        )
    } else {
        (c.client(), "10.96.0.85:53".to_owned())
    };
    let _client = udp_client(&c, &netns, &target, 7, "udp-client.log");
    let started = std::time::Instant::now();
    if initially != EndpointState::Ready {
        // Initially unready: nothing answers; then it gets ready.
        std::thread::sleep(Duration::from_millis(800));
        c.write(
            "cy-slice.yaml",
            &slice("cy", "a", &[("", "UDP", 53)], &ready(&[&p0])),
        );
    }
    std::thread::sleep(Duration::from_millis(2_000));
    // The server pod cycles: the slice now names the new one.
    c.write(
        "cy-slice.yaml",
        &slice("cy", "a", &[("", "UDP", 53)], &ready(&[&p1])),
    );
    let switched = started.elapsed().as_millis();
    std::thread::sleep(Duration::from_millis(3_500));
    let before = answers_after(&c, "udp-client.log", 0);
    assert!(
        before.iter().any(|a| *a == p0.ip.to_string()),
        "the first server answered: {before:?}"
    );
    let last: Vec<String> = answers_after(&c, "udp-client.log", switched + 1_000);
    assert!(
        !last.is_empty(),
        "answers after the switch\n{}",
        c.agent_log()
    );
    assert!(
        last.iter().all(|a| *a == p1.ip.to_string()),
        "only the new server answers after the switch: {last:?}"
    );
}

/// Upstream: `should be able to preserve UDP traffic when server pod cycles
/// for a NodePort service`.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_nodeport_service() {
    udp_server_cycles("NodePort", "", true, EndpointState::Ready);
}

/// Upstream: `... for a ClusterIP service`.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_for_a_clusterip_service() {
    udp_server_cycles("ClusterIP", "", false, EndpointState::Ready);
}

/// Upstream: `should be able to preserve UDP traffic when server pod cycles
/// for a ClusterIP service with InternalTrafficPolicy set to Local` (both
/// servers on the client's node).
#[test]
fn should_be_able_to_preserve_udp_traffic_when_server_pod_cycles_with_internaltrafficpolicy_set_to_local()
 {
    udp_server_cycles(
        "ClusterIP",
        "  internalTrafficPolicy: Local\n",
        false,
        EndpointState::Ready,
    );
}

/// Upstream: `should be able to preserve UDP traffic when initial unready
/// endpoints get ready`.
#[test]
fn should_be_able_to_preserve_udp_traffic_when_initial_unready_endpoints_get_ready() {
    udp_server_cycles("ClusterIP", "", false, EndpointState::Unready);
}

/// Upstream: `should support a Service with multiple ports specified in
/// multiple EndpointSlices`.
#[test]
fn should_support_a_service_with_multiple_ports_specified_in_multiple_endpointslices() {
    let mut c = Cluster::new(&["mps-0"]);
    let p0 = pod(&c, "mps-0");
    c.write(
        "mps.yaml",
        &service(
            "mps",
            "10.96.0.86",
            "ClusterIP",
            &[("a", "TCP", 80, 9376, None), ("b", "TCP", 81, 80, None)],
            "",
        ),
    );
    c.write(
        "mps-a.yaml",
        &slice("mps", "a", &[("a", "TCP", 9376)], &ready(&[&p0])),
    );
    c.write(
        "mps-b.yaml",
        &slice("mps", "b", &[("b", "TCP", 80)], &ready(&[&p0])),
    );
    c.start_agent();
    let client = c.client();
    assert_eq!(
        http_backends(&c, &client, "http://10.96.0.86:80/", 3),
        names(&[&p0])
    );
    assert_eq!(
        http_backends(&c, &client, "http://10.96.0.86:81/", 3),
        names(&[&p0])
    );
}

/// Upstream: `should support a Service with multiple endpoint IPs specified
/// in multiple EndpointSlices`.
#[test]
fn should_support_a_service_with_multiple_endpoint_ips_specified_in_multiple_endpointslices() {
    let mut c = Cluster::new(&["mis-0", "mis-1"]);
    let (p0, p1) = (pod(&c, "mis-0"), pod(&c, "mis-1"));
    c.write(
        "mis.yaml",
        &service(
            "mis",
            "10.96.0.87",
            "ClusterIP",
            &[("", "TCP", 80, 9376, None)],
            "",
        ),
    );
    c.write(
        "mis-a.yaml",
        &slice("mis", "a", &[("", "TCP", 9376)], &ready(&[&p0])),
    );
    c.write(
        "mis-b.yaml",
        &slice("mis", "b", &[("", "TCP", 9376)], &ready(&[&p1])),
    );
    c.start_agent();
    assert_eq!(
        http_backends(&c, &c.client(), "http://10.96.0.87/", 20),
        names(&[&p0, &p1])
    );
}

/// Upstream: `IPv4 Service Type ClusterIP with leading zeros should work
/// interpreted as decimal` (CVE-2021-29923): 10.96.0.010 is 10.96.0.10,
/// never the octal 10.96.0.8.
#[test]
fn ipv4_service_type_clusterip_with_leading_zeros_should_work_interpreted_as_decimal() {
    let mut c = Cluster::new(&["lz-0"]);
    let p0 = pod(&c, "lz-0");
    c.write(
        "lz.yaml",
        &service(
            "lz",
            "10.96.0.010",
            "ClusterIP",
            &[("", "TCP", 7180, 9376, None)],
            "",
        ),
    );
    c.write(
        "lz-slice.yaml",
        &slice("lz", "a", &[("", "TCP", 9376)], &ready(&[&p0])),
    );
    c.start_agent();
    assert_eq!(
        http_backends(&c, &c.client(), "http://10.96.0.10:7180/", 3),
        names(&[&p0])
    );
    assert!(http_backends(&c, &c.client(), "http://10.96.0.8:7180/", 1).is_empty());
    let (code, _) = echo(
        &c.tb,
        &c.client(),
        &[
            "udp-query",
            "--connect",
            "10.96.0.8:7180",
            "--timeout-ms",
            "300",
        ],
    );
    assert_ne!(code, Some(0));
}
