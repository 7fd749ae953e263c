//! Host-network clients (issue 9): processes in a node's own network
//! namespace reach Services through the socket-level programs, which the
//! agent attaches to a cgroup the test made for that node (never the
//! machine's root cgroup). Real agents, real clients (curl, dig, netlb-echo).
//! Needs root; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod common;

use common::{Cluster, curl_many, stat};
use netlb_testbed::manifests::endpoint_slice_yaml;

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata:\n  name: hostsvc\nspec:\n  type: NodePort\n  clusterIP: 10.96.0.40\n  externalIPs: [198.51.100.40]\n  selector: {app: hostsvc}\n  ports:\n    - {name: http, protocol: TCP, port: 80, targetPort: 9376, nodePort: 30040}\n    - {name: echo, protocol: TCP, port: 7000, targetPort: 7000, nodePort: 30041}\n    - {name: dns, protocol: UDP, port: 53, targetPort: 53, nodePort: 30053}\n";

/// Output of a command run as a host process of node 0; panics with the
/// agents' logs when it fails.
fn host(c: &Cluster, args: &[&str]) -> String {
    let out = c.tb.exec_host(0, args).expect("host command");
    assert!(
        out.status.success(),
        "{args:?} from node0's host failed: {}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        c.agent_logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn host_processes_reach_cluster_ips_node_ports_and_external_ips_through_their_sockets() {
    let mut c = Cluster::multi(2, &[("hostsvc-0", 0), ("hostsvc-1", 1)]);
    c.write("hostsvc.yaml", SERVICE);
    let pods: Vec<_> = ["hostsvc-0", "hostsvc-1"]
        .iter()
        .map(|n| c.tb.pod(n).unwrap().clone())
        .collect();
    c.write(
        "hostsvc-slice.yaml",
        &endpoint_slice_yaml(
            "hostsvc",
            &[
                ("http", "TCP", 9376),
                ("echo", "TCP", 7000),
                ("dns", "UDP", 53),
            ],
            &pods.iter().collect::<Vec<_>>(),
        ),
    );
    c.start_agents();
    let echo = netlb_testbed::find_binary("netlb-echo");
    let echo = echo.to_str().unwrap();
    let backend_ips: Vec<String> = pods.iter().map(|p| p.ip.to_string()).collect();

    // TCP to the ClusterIP, the node's own node port and the external IP:
    // both backends answer, and the application's peer is the frontend.
    for (frontend, echo_frontend) in [
        ("10.96.0.40:80", "10.96.0.40:7000"),
        ("192.168.77.10:30040", "192.168.77.10:30041"),
        ("198.51.100.40:80", "198.51.100.40:7000"),
    ] {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..16 {
            let body = host(
                &c,
                &["curl", "-sS", "-m", "3", &format!("http://{frontend}/")],
            );
            seen.insert(body.split_whitespace().next().unwrap_or("").to_owned());
        }
        assert_eq!(seen.len(), 2, "{frontend}: {seen:?}");
        let out = host(
            &c,
            &[
                echo,
                "tcp-client",
                "--connect",
                echo_frontend,
                "--duration-s",
                "0",
            ],
        );
        assert!(
            out.contains(&format!("peer {echo_frontend}")),
            "{echo_frontend}: {out}"
        );
    }

    // UDP: a connected socket, an unconnected one (its answer must come
    // from the ClusterIP), and dig.
    let out = host(&c, &[echo, "udp-query", "--connect", "10.96.0.40:53"]);
    assert!(backend_ips.contains(&out.trim().to_owned()), "{out}");
    let out = host(
        &c,
        &[
            echo,
            "udp-query",
            "--connect",
            "10.96.0.40:53",
            "--unconnected",
        ],
    );
    assert!(out.trim().ends_with("from 10.96.0.40:53"), "{out}");
    let out = host(
        &c,
        &[
            "dig",
            "+short",
            "+tries=1",
            "+time=2",
            "@10.96.0.40",
            "netlb.test",
        ],
    );
    assert!(backend_ips.contains(&out.trim().to_owned()), "dig: {out}");
    let sock_lb = stat(&c, 0, "sock_lb");
    assert!(sock_lb >= 3 * 17 + 3, "sock_lb {sock_lb}");

    // A process in the same cgroup but in another network namespace (the
    // client pod's) is not rewritten at its socket: it takes the TC path.
    let forward_before = stat(&c, 0, "forward_nat");
    let out =
        c.tb.exec_in_cgroup(
            &c.tb.nodes[0].cgroup,
            &c.client(),
            &[
                echo,
                "tcp-client",
                "--connect",
                "10.96.0.40:7000",
                "--duration-s",
                "0",
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("peer 10.96.0.40:7000"), "{text}");
    assert_eq!(
        stat(&c, 0, "sock_lb"),
        sock_lb,
        "a pod's socket was rewritten"
    );
    assert!(
        stat(&c, 0, "forward_nat") > forward_before,
        "the pod's flow skipped TC"
    );

    // The pod path keeps working alongside.
    let lines = curl_many(&c, &c.client(), "http://10.96.0.40/", 10);
    assert_eq!(lines.len(), 10);
}

/// A host process connecting to a Service without endpoints is refused at
/// once, as kube-proxy's REJECT does for it.
#[test]
fn a_host_process_is_refused_by_a_service_without_endpoints() {
    let mut c = Cluster::new(&[]);
    c.expose("hostempty", "10.96.0.41", "TCP", (80, 9376), &[]);
    c.start_agent();
    let out =
        c.tb.exec_host(0, &["curl", "-sS", "-m", "5", "http://10.96.0.41/"])
            .unwrap();
    assert_eq!(
        out.status.code(),
        Some(7),
        "curl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The errno itself: ECONNREFUSED.
    let echo = netlb_testbed::find_binary("netlb-echo");
    let out =
        c.tb.exec_host(
            0,
            &[
                echo.to_str().unwrap(),
                "tcp-client",
                "--connect",
                "10.96.0.41:80",
                "--duration-s",
                "0",
            ],
        )
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Connection refused"), "{text}");
    assert_eq!(stat(&c, 0, "sock_reject"), 2);
}
