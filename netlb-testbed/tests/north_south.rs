//! North-south end to end: two nodes, one agent per node, backends on both,
//! real clients (curl, dig) in the external namespace and in pods.
//! NodePorts, external IPs, load-balancer IPs (the test writes
//! `status.loadBalancer.ingress` as a cloud controller would), both external
//! traffic policies, SNAT, health-check node ports and hairpin.
//! Needs root; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod common;

use std::{collections::BTreeMap, net::Ipv4Addr, time::Duration};

use common::{Cluster, curl, curl_many, curl_status, wait_until};
use netlb_testbed::{
    agent::AgentSource,
    apiserver::{FakeApiServer, Resource},
    find_binary,
    manifests::endpoint_slice_yaml,
    topology::Pod,
};
use serde_json::{Value, json};

const EXT_IP: &str = "203.0.113.10";

fn node_ip(c: &Cluster, node: usize) -> Ipv4Addr {
    c.tb.nodes[node].uplink_ip
}

/// Which node each backend pod runs on.
fn pod_nodes(c: &Cluster) -> BTreeMap<String, usize> {
    c.tb.pods()
        .iter()
        .map(|p| (p.name.clone(), p.node))
        .collect()
}

fn pods(c: &Cluster, names: &[&str]) -> Vec<Pod> {
    names.iter().map(|n| c.tb.pod(n).unwrap().clone()).collect()
}

fn refs(pods: &[Pod]) -> Vec<&Pod> {
    pods.iter().collect()
}

/// `dig` answers (each backend answers with its own IP) from `netns`.
fn dig_answers(c: &Cluster, netns: &str, server: &str, port: u16, tries: usize) -> Vec<String> {
    let mut answers = Vec::new();
    for _ in 0..tries {
        let out =
            c.tb.exec(
                netns,
                &[
                    "dig",
                    "+short",
                    "+tries=1",
                    "+time=2",
                    &format!("@{server}"),
                    "-p",
                    &port.to_string(),
                    "netlb.test",
                ],
            )
            .unwrap();
        answers.push(String::from_utf8_lossy(&out.stdout).trim().to_owned());
    }
    answers
}

#[test]
fn node_ports_on_every_node_reach_backends_on_every_node() {
    let mut c = Cluster::multi(2, &[("web-0", 0), ("web-1", 1)]);
    c.write(
        "web.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.80\n  selector: {app: web}\n  ports:\n    - {name: http, protocol: TCP, port: 80, targetPort: 9376, nodePort: 30080}\n    - {name: dns, protocol: UDP, port: 53, targetPort: 53, nodePort: 30053}\n",
    );
    let backends = pods(&c, &["web-0", "web-1"]);
    c.write(
        "web-slice.yaml",
        &endpoint_slice_yaml(
            "web",
            &[("http", "TCP", 9376), ("dns", "UDP", 53)],
            &refs(&backends),
        ),
    );
    c.start_agents();
    let on_node = pod_nodes(&c);
    let ext = c.tb.ext.clone();

    for node in 0..2 {
        let entry = node_ip(&c, node);
        let lines = curl_many(&c, &ext, &format!("http://{entry}:30080/"), 40);
        let mut hits: BTreeMap<String, usize> = BTreeMap::new();
        for (backend, peer) in &lines {
            *hits.entry(backend.clone()).or_default() += 1;
            // Cluster policy: a backend on the entry node sees the client;
            // one on the other node sees the entry node (SNAT), so that its
            // reply returns through it.
            let want = if on_node[backend] == node {
                EXT_IP.to_owned()
            } else {
                entry.to_string()
            };
            assert_eq!(
                peer, &want,
                "{backend} via node{node}: peer {peer}, want {want}"
            );
        }
        for backend in ["web-0", "web-1"] {
            assert!(
                hits.get(backend).copied().unwrap_or(0) >= 5,
                "via node{node}: {hits:?}"
            );
        }

        // UDP node port: both backends answer through each node.
        let answers = dig_answers(&c, &ext, &entry.to_string(), 30053, 24);
        for pod in &backends {
            assert!(
                answers.contains(&pod.ip.to_string()),
                "via node{node}: dig answers {answers:?} lack {}\n{}",
                pod.ip,
                c.agent_logs()
            );
        }
    }
    // Nothing answers on the service port of a node address.
    assert!(curl(&c.tb, &ext, &format!("http://{}:80/", node_ip(&c, 0)), 1).is_none());
}

fn lb_service(status_ip: &str, hc_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: lb\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.81\n  externalTrafficPolicy: Local\n  healthCheckNodePort: {hc_port}\n  selector: {{app: lb}}\n  ports:\n    - {{protocol: TCP, port: 80, targetPort: 9376, nodePort: 30081}}\nstatus:\n  loadBalancer:\n    ingress:\n      - ip: {status_ip}\n"
    )
}

const LB_HEALTH_PORT: u16 = 32001;

/// The `lb` Service's EndpointSlice over the named pods.
fn set_lb_endpoints(c: &Cluster, names: &[&str]) {
    let endpoints = pods(c, names);
    c.write(
        "lb-slice.yaml",
        &endpoint_slice_yaml("lb", &[("", "TCP", 9376)], &refs(&endpoints)),
    );
}

/// Waits until `node`'s health-check node port of `lb` answers `code`.
fn wait_for_health(c: &Cluster, node: Ipv4Addr, code: u16) {
    let url = format!("http://{node}:{LB_HEALTH_PORT}/");
    wait_until(Duration::from_secs(5), || {
        (curl_status(&c.tb, &c.tb.ext, &url, 2).0 == code).then_some(())
    })
    .unwrap_or_else(|| panic!("{url} never answered {code}\n{}", c.agent_logs()));
}

#[test]
fn local_policy_keeps_the_client_address_and_health_checks_follow_local_endpoints() {
    let mut c = Cluster::multi(2, &[("lb-0", 0), ("lb-1", 1)]);
    let lb_ip = "198.51.100.7";
    // The network in front of the cluster sends the LB IP to node1.
    c.tb.route_to_node(&format!("{lb_ip}/32"), 1).unwrap();
    c.write("lb.yaml", &lb_service(lb_ip, LB_HEALTH_PORT));
    set_lb_endpoints(&c, &["lb-1"]);
    c.start_agents();
    let ext = c.tb.ext.clone();
    let (n0, n1) = (node_ip(&c, 0), node_ip(&c, 1));

    // Through the LB IP and node1's node port: the backend sees the client.
    for url in [format!("http://{lb_ip}/"), format!("http://{n1}:30081/")] {
        for (backend, peer) in curl_many(&c, &ext, &url, 10) {
            assert_eq!((backend.as_str(), peer.as_str()), ("lb-1", EXT_IP), "{url}");
        }
    }
    // node0 has no local endpoint: its node port drops (kube-proxy's DROP),
    // its health check says so.
    assert!(curl(&c.tb, &ext, &format!("http://{n0}:30081/"), 1).is_none());
    let (code, body) = curl_status(&c.tb, &ext, &format!("http://{n0}:{LB_HEALTH_PORT}/"), 2);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains(r#""localEndpoints":0"#), "{body}");
    assert!(
        body.contains(r#""service":{"namespace":"default","name":"lb"}"#),
        "{body}"
    );
    let (code, body) = curl_status(&c.tb, &ext, &format!("http://{n1}:{LB_HEALTH_PORT}/"), 2);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(r#""localEndpoints":1"#), "{body}");

    // An endpoint starts on node0: its health check turns 200 and its node
    // port serves, still without SNAT.
    set_lb_endpoints(&c, &["lb-0", "lb-1"]);
    wait_for_health(&c, n0, 200);
    for (backend, peer) in curl_many(&c, &ext, &format!("http://{n0}:30081/"), 10) {
        assert_eq!((backend.as_str(), peer.as_str()), ("lb-0", EXT_IP));
    }

    // The node1 endpoint goes: node1 turns 503 and drops the LB IP's
    // traffic; pods still reach the LB IP through the cluster-wide
    // endpoints (kube-proxy short-circuits in-cluster traffic).
    set_lb_endpoints(&c, &["lb-0"]);
    wait_for_health(&c, n1, 503);
    assert!(curl(&c.tb, &ext, &format!("http://{lb_ip}/"), 1).is_none());
    let client = c.client();
    for (backend, _) in curl_many(&c, &client, &format!("http://{lb_ip}/"), 5) {
        assert_eq!(backend, "lb-0");
    }
}

/// A LoadBalancer Service (externalTrafficPolicy Cluster) on 198.51.100.9
/// whose loadBalancerSourceRanges are `ranges`.
fn ranged_lb_service(ranges: &[&str]) -> String {
    let ranges = if ranges.is_empty() {
        String::new()
    } else {
        format!(
            "  loadBalancerSourceRanges:\n{}",
            ranges
                .iter()
                .map(|r| format!("    - \"{r}\"\n"))
                .collect::<String>()
        )
    };
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: ranged\nspec:\n  type: LoadBalancer\n  clusterIP: 10.96.0.82\n  selector: {{app: ranged}}\n{ranges}  ports:\n    - {{protocol: TCP, port: 80, targetPort: 9376, nodePort: 30082}}\nstatus:\n  loadBalancer:\n    ingress:\n      - ip: 198.51.100.9\n"
    )
}

/// Upstream: `[sig-network] Services should only allow access from service
/// loadbalancer source ranges`. An accepted and a dropped client pod (on
/// different nodes), then the ranges swapped, then removed; plus the
/// outside client through the load balancer's route, from an address in
/// the range and one outside it. A refused source times out (a drop, as
/// kube-proxy's firewall chain), it is not rejected.
#[test]
fn should_only_allow_access_from_service_loadbalancer_source_ranges() {
    let mut c = Cluster::multi(2, &[("ranged-0", 0), ("ranged-1", 1)]);
    let accept = c.add_backend_on(0, "accept");
    let drop = c.add_backend_on(1, "drop");
    c.tb.route_to_node("198.51.100.9/32", 1).unwrap();
    // A second outside address, outside the range given to the first.
    c.tb.exec(
        &c.tb.ext,
        &["ip", "addr", "add", "203.0.113.20/24", "dev", "eth0"],
    )
    .unwrap();
    let ext = c.tb.ext.clone();
    let slice = endpoint_slice_yaml(
        "ranged",
        &[("", "TCP", 9376)],
        &refs(&pods(&c, &["ranged-0", "ranged-1"])),
    );
    c.write("ranged-slice.yaml", &slice);
    let accepted = format!("{}/32", accept.ip);
    c.write(
        "ranged.yaml",
        &ranged_lb_service(&[&accepted, "203.0.113.10/32"]),
    );
    c.start_agents();
    let url = "http://198.51.100.9/";
    let reaches = |netns: &str, source: Option<&str>| -> bool {
        let mut args = vec![
            "curl",
            "-sS",
            "-m",
            "2",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ];
        if let Some(source) = source {
            args.extend(["--interface", source]);
        }
        args.push(url);
        c.tb.exec(netns, &args)
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "200")
            .unwrap_or(false)
    };
    let check = |want: [bool; 4]| {
        let got = [
            reaches(&accept.netns, None),
            reaches(&drop.netns, None),
            reaches(&ext, Some("203.0.113.10")),
            reaches(&ext, Some("203.0.113.20")),
        ];
        (got == want).then_some(())
    };
    // accept pod, drop pod, outside .10, outside .20
    wait_until(Duration::from_secs(10), || {
        check([true, false, true, false])
    })
    .unwrap_or_else(|| panic!("first ranges\n{}", c.agent_logs()));
    let dropped_before = stat_sum(&c, "drop_source_range");
    assert!(dropped_before >= 2, "drops counted: {dropped_before}");

    // Swapped: the other pod and the other outside address.
    let dropped = format!("{}/32", drop.ip);
    c.write(
        "ranged.yaml",
        &ranged_lb_service(&[&dropped, "203.0.113.20/32"]),
    );
    wait_until(Duration::from_secs(10), || {
        check([false, true, false, true])
    })
    .unwrap_or_else(|| panic!("swapped ranges\n{}", c.agent_logs()));

    // Removed: everyone.
    c.write("ranged.yaml", &ranged_lb_service(&[]));
    wait_until(Duration::from_secs(10), || check([true, true, true, true]))
        .unwrap_or_else(|| panic!("no ranges\n{}", c.agent_logs()));
}

/// A datapath counter summed over the nodes.
fn stat_sum(c: &Cluster, name: &str) -> u64 {
    (0..c.tb.nodes.len())
        .map(|n| common::stat(c, n, name))
        .sum()
}

#[test]
fn external_ips_pods_reaching_node_ports_and_hairpin() {
    let mut c = Cluster::multi(2, &[("ex-0", 0), ("ex-1", 1)]);
    let external_ip = "198.51.100.20";
    c.tb.route_to_node(&format!("{external_ip}/32"), 0).unwrap();
    c.write(
        "ex.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: ex\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.82\n  externalIPs: [{external_ip}]\n  selector: {{app: ex}}\n  ports:\n    - {{protocol: TCP, port: 8080, targetPort: 9376, nodePort: 30082}}\n"
        ),
    );
    let backends = pods(&c, &["ex-0", "ex-1"]);
    c.write(
        "ex-slice.yaml",
        &endpoint_slice_yaml("ex", &[("", "TCP", 9376)], &refs(&backends)),
    );
    c.start_agents();
    let ext = c.tb.ext.clone();
    let n0 = node_ip(&c, 0).to_string();

    // From outside, through the external IP (routed to node0).
    let mut seen = BTreeMap::new();
    for (backend, peer) in curl_many(&c, &ext, &format!("http://{external_ip}:8080/"), 30) {
        let want = if backend == "ex-0" {
            EXT_IP
        } else {
            n0.as_str()
        };
        assert_eq!(peer, want, "{backend}");
        *seen.entry(backend).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    // From a pod: its own node's node port, the other node's, the external
    // IP. Pods keep their own address (no SNAT needed: pod IPs route).
    let client = c.client();
    let client_ip = c.tb.pod("client").unwrap().ip.to_string();
    for url in [
        format!("http://{n0}:30082/"),
        format!("http://{}:30082/", node_ip(&c, 1)),
        format!("http://{external_ip}:8080/"),
    ] {
        let lines = curl_many(&c, &client, &url, 20);
        let names: std::collections::BTreeSet<&str> =
            lines.iter().map(|(b, _)| b.as_str()).collect();
        assert_eq!(names.len(), 2, "{url}: {lines:?}");
        if !url.contains(&node_ip(&c, 1).to_string()) {
            for (backend, peer) in &lines {
                assert_eq!(peer, &client_ip, "{url} {backend}");
            }
        }
    }

    // Hairpin: a backend reaching its own Service through the node port
    // and the external IP; every request works, some land on itself.
    let ex0 = c.tb.pod("ex-0").unwrap().netns.clone();
    for url in [
        format!("http://{n0}:30082/"),
        format!("http://{external_ip}:8080/"),
    ] {
        let lines = curl_many(&c, &ex0, &url, 20);
        assert!(
            lines.iter().any(|(b, _)| b == "ex-0"),
            "{url}: no hairpin flow among {lines:?}"
        );
    }
}

const NGINX_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: nginx-service
spec:
  type: NodePort
  selector:
    app.kubernetes.io/name: nginx
  ports:
    # By default and for convenience, the `targetPort` is set to
    # the same value as the `port` field.
    - port: 80
      targetPort: 80
      # Optional field
      # By default and for convenience, the Kubernetes control plane
      # will allocate a port from a range (default: 30000-32767)
      nodePort: 30007
";

const NGINX_EXTERNAL_SERVICE: &str = "apiVersion: v1
kind: Service
metadata:
  name: nginx-external-service
spec:
  selector:
    app.kubernetes.io/name: nginx
  ports:
    - protocol: TCP
      port: 80
      targetPort: 80
  type: LoadBalancer
";

const NGINX_LB_IP: &str = "198.51.100.30";

fn nginx_slice(service: &str, pods: &[&Pod]) -> String {
    endpoint_slice_yaml(service, &[("", "TCP", 80)], pods).replace(
        &format!("name: {service}-abc12"),
        &format!("name: {service}-x7k2p"),
    )
}

/// The node port programmed for a Service whose backends are `pods`, read
/// from node0's maps (`netlb-agent list services -o json`).
fn programmed_node_port(c: &Cluster, pods: &[Pod], except: u16) -> Option<u16> {
    let out = std::process::Command::new(find_binary("netlb-agent"))
        .args(["list", "services", "-o", "json", "--bpffs"])
        .arg(&c.tb.nodes[0].bpffs)
        .output()
        .ok()?;
    let rows: Vec<Value> = serde_json::from_slice(&out.stdout).ok()?;
    let prefix = format!("{}:", node_ip(c, 0));
    rows.iter().find_map(|row| {
        let frontend = row["frontend"].as_str()?;
        let port: u16 = frontend.strip_prefix(&prefix)?.parse().ok()?;
        let backends = row["backends"].as_array()?;
        let ours = pods.iter().all(|p| {
            backends.iter().any(|b| {
                b.as_str()
                    .is_some_and(|b| b.starts_with(&format!("{}:", p.ip)))
            })
        });
        (port != except && ours).then_some(port)
    })
}

/// Both docs manifests serve their pods from outside through every node.
fn check_docs_services(c: &Cluster, nginx: &[Pod]) {
    let ext = c.tb.ext.clone();
    let allocated = wait_until(Duration::from_secs(5), || {
        programmed_node_port(c, nginx, 30007)
    })
    .unwrap_or_else(|| {
        panic!(
            "no node port for nginx-external-service\n{}",
            c.agent_logs()
        )
    });
    for node in 0..2 {
        let ip = node_ip(c, node);
        for port in [30007, allocated] {
            let lines = curl_many(c, &ext, &format!("http://{ip}:{port}/"), 6);
            assert!(
                lines.iter().all(|(b, _)| b.starts_with("nginx-")),
                "{lines:?}"
            );
        }
    }
    let lines = wait_until(Duration::from_secs(5), || {
        curl(&c.tb, &ext, &format!("http://{NGINX_LB_IP}/"), 2)
    })
    .unwrap_or_else(|| panic!("LB IP does not serve\n{}", c.agent_logs()));
    assert!(lines.starts_with("nginx-"), "{lines}");
}

#[test]
fn docs_nginx_services_from_the_manifest_directory() {
    let mut c = Cluster::multi(2, &[("nginx-0", 0), ("nginx-1", 1)]);
    c.tb.route_to_node(&format!("{NGINX_LB_IP}/32"), 1).unwrap();
    let nginx = pods(&c, &["nginx-0", "nginx-1"]);
    c.write("nginx-service.yaml", NGINX_SERVICE);
    c.write(
        "nginx-service-slice.yaml",
        &nginx_slice("nginx-service", &refs(&nginx)),
    );
    c.write(
        "nginx-external-service-slice.yaml",
        &nginx_slice("nginx-external-service", &refs(&nginx)),
    );
    // The cloud controller's part: the Service as written plus its status.
    c.write(
        "nginx-external-service.yaml",
        &format!(
            "{NGINX_EXTERNAL_SERVICE}status:\n  loadBalancer:\n    ingress:\n      - ip: {NGINX_LB_IP}\n"
        ),
    );
    c.start_agents();
    check_docs_services(&c, &nginx);
}

fn yaml_to_json(text: &str) -> Value {
    serde_saphyr::from_str(text).expect("manifest")
}

#[test]
fn docs_nginx_services_through_the_api_server() {
    let mut c = Cluster::multi(2, &[("nginx-0", 0), ("nginx-1", 1)]);
    c.tb.route_to_node(&format!("{NGINX_LB_IP}/32"), 1).unwrap();
    let listener = netlb_testbed::topology::bind_in_netns(&c.tb.nodes[0].netns, "0.0.0.0:0")
        .expect("listener");
    let api = FakeApiServer::start(listener).expect("api server");
    // Both agents reach it at node0's address (node1's through the fabric).
    let reachable = format!("{}:{}", node_ip(&c, 0), api.addr().port());
    let kubeconfig = c.tb.dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        api.kubeconfig()
            .replace(&api.addr().to_string(), &reachable),
    )
    .unwrap();
    let nginx = pods(&c, &["nginx-0", "nginx-1"]);
    api.apply(yaml_to_json(NGINX_SERVICE)).unwrap();
    api.apply(yaml_to_json(NGINX_EXTERNAL_SERVICE)).unwrap();
    for service in ["nginx-service", "nginx-external-service"] {
        api.apply(yaml_to_json(&nginx_slice(service, &refs(&nginx))))
            .unwrap();
    }
    c.start_agents_with(AgentSource::Kubeconfig(kubeconfig));
    // The API server allocated a node port for the LoadBalancer Service;
    // now the cloud controller publishes its address in the status.
    let mut svc = api
        .objects(Resource::Services)
        .into_iter()
        .find(|s| s["metadata"]["name"] == "nginx-external-service")
        .unwrap();
    let allocated = svc["spec"]["ports"][0]["nodePort"].as_u64().unwrap() as u16;
    svc["status"] = json!({"loadBalancer": {"ingress": [{"ip": NGINX_LB_IP}]}});
    api.apply(svc).unwrap();
    check_docs_services(&c, &nginx);
    assert_eq!(programmed_node_port(&c, &nginx, 30007), Some(allocated));
}
