//! ClusterIP end to end: a one-node topology in network namespaces, real
//! servers (`netlb-echo`) in pod namespaces, real clients (curl, dig), and
//! the real agent programming the datapath from a manifest directory.
//! Needs root; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod common;

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use common::{Cluster, VIP, curl, curl_many, slice_yaml, wait_until};
use netlb_testbed::{find_binary, process::ChildGuard, topology::Pod};

#[test]
fn three_backends_share_300_requests() {
    let mut c = Cluster::new(&["myapp-1", "myapp-2", "myapp-3"]);
    let pods: Vec<Pod> = ["myapp-1", "myapp-2", "myapp-3"]
        .iter()
        .map(|n| c.tb.pod(n).unwrap().clone())
        .collect();
    // The Kubernetes docs' Service as written, plus the clusterIP an API
    // server would allocate.
    c.write(
        "my-service.yaml",
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: my-service\nspec:\n  clusterIP: 10.96.0.10\n  selector:\n    app.kubernetes.io/name: MyApp\n  ports:\n    - protocol: TCP\n      port: 80\n      targetPort: 9376\n",
    );
    c.write(
        "my-service-slice.yaml",
        &slice_yaml("my-service", "TCP", 9376, &pods.iter().collect::<Vec<_>>()),
    );
    c.start_agent();

    // 300 requests, each on a new connection (new source port, new flow).
    let mut counts = std::collections::BTreeMap::new();
    for (name, peer) in curl_many(&c, &c.client(), &format!("http://{VIP}/"), 300) {
        // The backend sees the client's own address (no SNAT).
        assert_eq!(peer, "10.244.0.13", "unexpected peer for {name}");
        *counts.entry(name).or_insert(0) += 1;
    }
    assert_eq!(counts.values().sum::<usize>(), 300, "{counts:?}");
    for pod in &pods {
        let n = counts.get(&pod.name).copied().unwrap_or(0);
        assert!(n >= 60, "{} got {n} of 300 (< 20%): {counts:?}", pod.name);
    }
}

#[test]
fn udp_service_answers_dig() {
    let mut c = Cluster::new(&["dns-1", "dns-2"]);
    let pods = c.expose("dns", "10.96.0.53", "UDP", (53, 53), &["dns-1", "dns-2"]);
    c.start_agent();
    let mut answers = std::collections::BTreeSet::new();
    for i in 0..20 {
        let out =
            c.tb.exec(
                &c.client(),
                &[
                    "dig",
                    "+short",
                    "+tries=1",
                    "+time=2",
                    "@10.96.0.53",
                    "-p",
                    "53",
                    &format!("q{i}.netlb.test"),
                ],
            )
            .unwrap();
        let answer = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let ip: Ipv4Addr = answer.parse().unwrap_or_else(|_| {
            panic!(
                "dig answered {answer:?}: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                c.agent_log()
            )
        });
        assert!(pods.iter().any(|p| p.ip == ip), "{ip} is not a backend");
        answers.insert(ip);
    }
    assert_eq!(answers.len(), 2, "both DNS backends answered: {answers:?}");
}

#[test]
fn long_lived_connection_survives_backend_churn() {
    let mut c = Cluster::new(&["echo-1", "echo-2"]);
    let pods = c.expose(
        "echo",
        "10.96.0.70",
        "TCP",
        (7000, 7000),
        &["echo-1", "echo-2"],
    );
    c.start_agent();

    let echo = find_binary("netlb-echo");
    let log = c.tb.dir.join("tcp-client.log");
    let mut client = ChildGuard::spawn_in(
        &c.client(),
        &[
            echo.to_str().unwrap(),
            "tcp-client",
            "--connect",
            "10.96.0.70:7000",
            "--interval-ms",
            "50",
            "--duration-s",
            "6",
        ],
        Some(&log),
    )
    .unwrap();
    let connected = wait_until(Duration::from_secs(5), || {
        let text = std::fs::read_to_string(&log).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("connected to ").map(str::to_owned))
    })
    .expect("client connected");
    // Add a backend, and remove the backend the connection is NOT on.
    let added = c.add_backend("echo-3");
    let keep = pods
        .iter()
        .find(|p| p.name == connected)
        .expect("connected to a backend")
        .clone();
    c.write(
        "echo-slice.yaml",
        &slice_yaml("echo", "TCP", 7000, &[&keep, &added]),
    );
    assert!(
        c.agent
            .as_ref()
            .unwrap()
            .wait_for_log("synced", 2, Duration::from_secs(5)),
        "agent did not apply the change:\n{}",
        c.agent_log()
    );
    let status = client
        .wait(Duration::from_secs(15))
        .expect("client finished");
    let output = std::fs::read_to_string(&log).unwrap();
    assert!(
        status.success(),
        "long-lived connection broke:\n{output}\n{}",
        c.agent_log()
    );
    assert!(output.contains("ok:"), "{output}");
    // New connections reach the added backend and never the removed one.
    let removed = pods.iter().find(|p| p.name != connected).unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let out =
            c.tb.exec(
                &c.client(),
                &[
                    echo.to_str().unwrap(),
                    "tcp-client",
                    "--connect",
                    "10.96.0.70:7000",
                    "--interval-ms",
                    "1",
                    "--duration-s",
                    "0",
                ],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if let Some(name) = text.lines().find_map(|l| l.strip_prefix("connected to ")) {
            seen.insert(name.to_owned());
        }
    }
    assert!(
        !seen.contains(&removed.name),
        "removed backend still chosen: {seen:?}"
    );
    assert!(
        seen.contains("echo-3"),
        "added backend never chosen: {seen:?}"
    );
}

#[test]
fn pod_reaches_itself_through_its_service() {
    let mut c = Cluster::new(&["self-1"]);
    let pod = c
        .expose("self", "10.96.0.80", "TCP", (80, 9376), &["self-1"])
        .remove(0);
    c.start_agent();
    for _ in 0..5 {
        let body = curl(&c.tb, &pod.netns, "http://10.96.0.80/", 3)
            .unwrap_or_else(|| panic!("hairpin request failed\n{}", c.agent_log()));
        // The pod answered itself; the request came from the service
        // loopback address, so the reply went back through the datapath.
        assert!(body.starts_with("self-1 169.254.42.1:"), "{body:?}");
    }
}

#[test]
fn service_without_endpoints_is_refused_fast() {
    let mut c = Cluster::new(&[]);
    c.expose("empty", "10.96.0.90", "TCP", (80, 9376), &[]);
    c.start_agent();
    let started = Instant::now();
    let out =
        c.tb.exec(
            &c.client(),
            &["curl", "-sS", "-m", "5", "http://10.96.0.90/"],
        )
        .unwrap();
    let elapsed = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // curl exit 7: connection refused (ICMP port unreachable), not 28 (timeout).
    assert_eq!(out.status.code(), Some(7), "{stderr}\n{}", c.agent_log());
    assert!(elapsed < Duration::from_secs(1), "took {elapsed:?}");

    // A ClusterIP netlb does not know is not rewritten and dies inside the
    // topology (the node has no default route): it fails fast too, and no
    // packet leaves the machine.
    let out =
        c.tb.exec(
            &c.client(),
            &["curl", "-sS", "-m", "5", "http://10.96.99.99/"],
        )
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert_ne!(
        out.status.code(),
        Some(28),
        "timed out instead of failing inside the topology"
    );
}

/// kube-proxy nftables' cluster-IP checks, end to end: a port the Service
/// does not define is refused at once (TCP and UDP), an address of the
/// Service CIDR (`--service-cluster-ip-range`) without a Service is dropped
/// (the client times out), from a pod and from a host process.
#[test]
fn undefined_ports_are_refused_and_unallocated_service_addresses_dropped() {
    let mut c = Cluster::new(&["web-0"]);
    c.expose("web", VIP, "TCP", (80, 9376), &["web-0"]);
    c.start_agents_args(&["--service-cluster-ip-range", "10.96.0.0/16"]);
    let client = c.client();
    let curl_exit = |netns: &str, url: &str| -> Option<i32> {
        c.tb.exec(netns, &["curl", "-sS", "-m", "2", "-o", "/dev/null", url])
            .ok()
            .and_then(|o| o.status.code())
    };
    assert_eq!(curl_exit(&client, &format!("http://{VIP}/")), Some(0));
    // curl: 7 = couldn't connect (refused), 28 = timed out.
    let started = std::time::Instant::now();
    assert_eq!(curl_exit(&client, &format!("http://{VIP}:81/")), Some(7));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "refused at once"
    );
    assert_eq!(curl_exit(&client, "http://10.96.0.250/"), Some(28));
    let (code, out) = common::echo(
        &c.tb,
        &client,
        &[
            "udp-query",
            "--connect",
            &format!("{VIP}:5353"),
            "--timeout-ms",
            "1000",
        ],
    );
    assert_eq!(code, Some(3), "UDP to an undefined port: {out}");
    // A host process of the node (socket-level programs): the same.
    let host = |url: &str| -> Option<i32> {
        c.tb.exec_host(0, &["curl", "-sS", "-m", "2", "-o", "/dev/null", url])
            .ok()
            .and_then(|o| o.status.code())
    };
    assert_eq!(host(&format!("http://{VIP}/")), Some(0));
    assert_eq!(host(&format!("http://{VIP}:81/")), Some(7));
    assert_eq!(host("http://10.96.0.250/"), Some(28));
    assert!(common::stat(&c, 0, "drop_unallocated_service_ip") >= 1);
}
