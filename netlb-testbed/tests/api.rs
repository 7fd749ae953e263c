//! The real agent against the API-server test double (list/watch over HTTP,
//! through an ordinary kubeconfig), with real traffic in namespaces.
//! Needs root; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod common;

use std::{
    collections::BTreeSet,
    time::{Duration, SystemTime},
};

use common::{Cluster, curl, wait_until};
use netlb_testbed::{
    agent::{AgentOptions, AgentProcess, AgentSource},
    apiserver::{FakeApiServer, Resource},
    find_binary,
    topology::{Pod, bind_in_netns},
};
use serde_json::{Value, json};

/// RFC 3339 UTC with nanoseconds, as the EndpointSlice controller writes
/// `endpoints.kubernetes.io/last-change-trigger-time`.
fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .expect("time after 1970")
        .to_string()
}

/// The Kubernetes docs' Service, with the clusterIP the API server would
/// have allocated.
fn my_service() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "my-service", "namespace": "default"},
        "spec": {
            "clusterIP": "10.96.0.10",
            "clusterIPs": ["10.96.0.10"],
            "type": "ClusterIP",
            "selector": {"app.kubernetes.io/name": "MyApp"},
            "ports": [{"protocol": "TCP", "port": 80, "targetPort": 9376}],
        },
    })
}

fn my_slice(pods: &[&Pod]) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "my-service-abc12",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "my-service"},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": rfc3339(SystemTime::now())},
        },
        "addressType": "IPv4",
        "ports": [{"name": "", "protocol": "TCP", "port": 9376}],
        "endpoints": pods.iter().map(|p| json!({
            "addresses": [p.ip.to_string()],
            "conditions": {"ready": true, "serving": true, "terminating": false},
            "nodeName": "node0",
            "targetRef": {"kind": "Pod", "namespace": "default", "name": p.name},
        })).collect::<Vec<_>>(),
    })
}

struct ApiCluster {
    api: FakeApiServer,
    pods: Vec<Pod>,
    c: Cluster,
}

impl ApiCluster {
    fn new(backends: &[&str]) -> Self {
        let c = Cluster::new(backends);
        let pods = backends
            .iter()
            .map(|n| c.tb.pod(n).unwrap().clone())
            .collect();
        // The double listens on the node namespace's loopback, where the
        // agent (which enters that namespace) connects.
        let listener = bind_in_netns(&c.tb.nodes[0].netns, "127.0.0.1:0").expect("listener");
        let api = FakeApiServer::start(listener).expect("fake API server");
        std::fs::write(c.tb.dir.join("kubeconfig"), api.kubeconfig()).unwrap();
        Self { api, pods, c }
    }

    /// The agent's options for this double (with `extra_args`).
    fn options(&self, extra_args: &[&str]) -> AgentOptions {
        AgentOptions {
            binary: find_binary("netlb-agent"),
            source: AgentSource::Kubeconfig(self.c.tb.dir.join("kubeconfig")),
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            cleanup_on_exit: true,
            capabilities: None,
            wrapper: Vec::new(),
        }
    }

    /// Starts an agent without waiting for anything.
    fn spawn_agent(&self, extra_args: &[&str], log: &str) -> AgentProcess {
        AgentProcess::start(
            &self.c.tb.nodes[0],
            &self.options(extra_args),
            &self.c.tb.dir.join(log),
        )
        .unwrap()
    }

    fn start_agent(&mut self, log: &str) {
        let kubeconfig = self.c.tb.dir.join("kubeconfig");
        self.c
            .start_agent_with(AgentSource::Kubeconfig(kubeconfig), log);
    }

    fn pods(&self, names: &[&str]) -> Vec<&Pod> {
        names
            .iter()
            .map(|n| self.pods.iter().find(|p| p.name == *n).unwrap())
            .collect()
    }

    /// Backend names that `n` new connections reached.
    fn reached(&self, n: usize) -> BTreeSet<String> {
        let client = self.c.client();
        (0..n)
            .filter_map(|_| curl(&self.c.tb, &client, "http://10.96.0.10/", 2))
            .filter_map(|body| body.split_whitespace().next().map(str::to_owned))
            .collect()
    }

    /// Waits until new connections reach exactly `names`.
    fn wait_for_backends(&self, names: &[&str]) {
        let want: BTreeSet<String> = names.iter().map(|s| s.to_string()).collect();
        wait_until(Duration::from_secs(10), || {
            (self.reached(3 * names.len().max(1) + 6) == want).then_some(())
        })
        .unwrap_or_else(|| panic!("backends never became {want:?}\n{}", self.c.agent_log()));
    }

    /// What the datapath holds: `frontend -> backends` from `list services`.
    fn programmed(&self) -> Vec<(String, Vec<String>)> {
        let out = std::process::Command::new(find_binary("netlb-agent"))
            .args(["list", "services", "-o", "json", "--bpffs"])
            .arg(&self.c.tb.nodes[0].bpffs)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let rows: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
        let mut out: Vec<(String, Vec<String>)> = rows
            .iter()
            .map(|r| {
                let mut backends: Vec<String> = r["backends"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|b| b.as_str().unwrap().split(' ').next().unwrap().to_owned())
                    .collect();
                backends.sort();
                (r["frontend"].as_str().unwrap().to_owned(), backends)
            })
            .collect();
        out.sort();
        out
    }
}

#[test]
fn docs_service_follows_scaling_and_recreation() {
    let mut a = ApiCluster::new(&["myapp-1", "myapp-2", "myapp-3"]);
    a.api.apply(my_service()).unwrap();
    a.api
        .apply(my_slice(&a.pods(&["myapp-1", "myapp-2", "myapp-3"])))
        .unwrap();
    a.start_agent("agent.log");
    a.wait_for_backends(&["myapp-1", "myapp-2", "myapp-3"]);

    // Scale down, then up again.
    a.api.apply(my_slice(&a.pods(&["myapp-2"]))).unwrap();
    a.wait_for_backends(&["myapp-2"]);
    a.api
        .apply(my_slice(&a.pods(&["myapp-1", "myapp-2", "myapp-3"])))
        .unwrap();
    a.wait_for_backends(&["myapp-1", "myapp-2", "myapp-3"]);

    // Delete the Service: the ClusterIP is no longer rewritten (and dies in
    // the topology); recreate it: served again.
    assert!(a.api.delete(Resource::Services, "default", "my-service"));
    wait_until(Duration::from_secs(10), || {
        a.reached(5).is_empty().then_some(())
    })
    .unwrap_or_else(|| panic!("deleted Service still served\n{}", a.c.agent_log()));
    assert!(a.programmed().is_empty(), "{:?}", a.programmed());
    a.api.apply(my_service()).unwrap();
    a.wait_for_backends(&["myapp-1", "myapp-2", "myapp-3"]);

    // The trigger-time annotations fed the programming-latency histogram.
    let node = a.c.tb.nodes[0].netns.clone();
    let metrics =
        a.c.tb
            .exec(
                &node,
                &["curl", "-sS", "-m", "2", "http://127.0.0.1:10249/metrics"],
            )
            .unwrap();
    let text = String::from_utf8_lossy(&metrics.stdout);
    let count: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("kubeproxy_network_programming_duration_seconds_count "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no programming latency metric:\n{text}"));
    assert!(count >= 2, "programming latency observations: {count}");
}

#[test]
fn broken_watches_and_410_gone_converge_without_stale_entries() {
    let mut a = ApiCluster::new(&["myapp-1", "myapp-2", "myapp-3"]);
    a.api.apply(my_service()).unwrap();
    a.api
        .apply(my_slice(&a.pods(&["myapp-1", "myapp-2"])))
        .unwrap();
    a.start_agent("agent.log");
    a.wait_for_backends(&["myapp-1", "myapp-2"]);

    // A server restart cuts every watch; changes made meanwhile arrive when
    // the watches resume from their resourceVersion.
    a.api.drop_watches();
    a.api
        .apply(my_slice(&a.pods(&["myapp-2", "myapp-3"])))
        .unwrap();
    a.wait_for_backends(&["myapp-2", "myapp-3"]);

    // Expired resourceVersions: resuming gets 410 Gone and re-lists; a
    // Service deleted while the agent could not watch must not linger.
    a.api.set_unavailable(true);
    std::thread::sleep(Duration::from_millis(300));
    a.api
        .apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "extra", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.11", "ports": [{"port": 81, "protocol": "TCP"}]},
        }))
        .unwrap();
    a.api.apply(my_slice(&a.pods(&["myapp-1"]))).unwrap();
    a.api.compact();
    a.api.set_unavailable(false);
    a.wait_for_backends(&["myapp-1"]);
    a.api.delete(Resource::Services, "default", "extra");
    a.api.compact();
    let want = vec![(
        "10.96.0.10:80".to_owned(),
        vec![format!("{}:9376", a.pods(&["myapp-1"])[0].ip)],
    )];
    wait_until(Duration::from_secs(15), || {
        (a.programmed() == want).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "programmed {:?}, want {want:?}\n{}",
            a.programmed(),
            a.c.agent_log()
        )
    });
    let (lists, watches, gone) = a.api.request_counts();
    assert!(
        gone >= 1,
        "no 410 Gone was served (lists {lists}, watches {watches})"
    );
    assert!(lists >= 4, "the agent did not re-list (lists {lists})");
}

/// Sequential requests on new connections for `duration`; the times (since
/// the start) of those that failed, and how many were sent.
fn request_loop(
    tb: &netlb_testbed::topology::Testbed,
    client: &str,
    duration: Duration,
) -> (Vec<Duration>, usize) {
    let mut failures = Vec::new();
    let mut requests = 0;
    let started = std::time::Instant::now();
    while started.elapsed() < duration {
        requests += 1;
        if curl(tb, client, "http://10.96.0.10/", 2).is_none() {
            failures.push(started.elapsed());
        }
    }
    (failures, requests)
}

#[test]
fn sigkill_and_restart_lose_no_requests() {
    let mut a = ApiCluster::new(&["myapp-1", "myapp-2"]);
    a.api.apply(my_service()).unwrap();
    a.api
        .apply(my_slice(&a.pods(&["myapp-1", "myapp-2"])))
        .unwrap();
    a.start_agent("agent-1.log");
    a.wait_for_backends(&["myapp-1", "myapp-2"]);

    let client = a.c.client();
    let node = a.c.tb.nodes[0].clone();
    let options = a.options(&[]);
    let log = a.c.tb.dir.join("agent-2.log");
    let tb = &a.c.tb;
    let first = &mut a.c.agent;
    let ((failures, requests), restarted, synced) = std::thread::scope(|s| {
        let requests = s.spawn(|| request_loop(tb, &client, Duration::from_secs(7)));
        std::thread::sleep(Duration::from_secs(1));
        first.as_mut().unwrap().kill_hard();
        // Down for a while: the pinned links and maps keep serving.
        std::thread::sleep(Duration::from_secs(2));
        let restarted = AgentProcess::start(&node, &options, &log).expect("restart");
        let synced = restarted.wait_for_log("initial sync complete", 1, Duration::from_secs(20));
        (requests.join().unwrap(), restarted, synced)
    });
    assert!(synced, "restarted agent did not sync:\n{}", restarted.log());
    assert!(requests >= 50, "only {requests} requests");
    assert!(
        failures.is_empty(),
        "{} of {requests} requests failed across SIGKILL and restart, at {failures:?}",
        failures.len()
    );
    // It adopted the pinned maps: nothing to write, nothing stale.
    assert!(
        !restarted.log().contains("synced "),
        "restart rewrote maps:\n{}",
        restarted.log()
    );
    a.c.agent = Some(restarted);
    a.wait_for_backends(&["myapp-1", "myapp-2"]);
}

#[test]
fn nothing_is_programmed_before_services_and_slices_have_both_synced() {
    let mut a = ApiCluster::new(&["myapp-1"]);
    a.api.apply(my_service()).unwrap();
    a.api.apply(my_slice(&a.pods(&["myapp-1"]))).unwrap();
    // Services list fine; EndpointSlices cannot be listed yet.
    a.api
        .set_resource_unavailable(Resource::EndpointSlices, true);
    let agent = a.spawn_agent(&[], "agent.log");
    assert!(
        agent.wait_for_log("Service: list complete", 1, Duration::from_secs(20)),
        "{}",
        agent.log()
    );
    assert!(agent.wait_for_log(
        "waiting for Services and EndpointSlices",
        1,
        Duration::from_secs(5)
    ));
    std::thread::sleep(Duration::from_secs(2));
    // Programming from Services alone would reject the ClusterIP (no
    // endpoints known); nothing at all may be written.
    assert!(
        a.programmed().is_empty(),
        "programmed from partial state: {:?}",
        a.programmed()
    );
    assert!(!agent.log().contains("synced "), "{}", agent.log());
    a.api
        .set_resource_unavailable(Resource::EndpointSlices, false);
    a.c.agent = Some(agent);
    a.wait_for_backends(&["myapp-1"]);
}

/// A watch connection that goes silent without closing (a half-open TCP
/// connection, a stuck proxy) is taken for dead and replaced within a
/// minute with the default settings: a change made meanwhile arrives.
#[test]
fn half_open_watch_is_detected_and_replaced_within_a_minute() {
    let mut a = ApiCluster::new(&["myapp-1", "myapp-2"]);
    a.api.apply(my_service()).unwrap();
    a.api.apply(my_slice(&a.pods(&["myapp-1"]))).unwrap();
    a.start_agent("agent.log");
    a.wait_for_backends(&["myapp-1"]);
    // The open watches go silent without closing; the change made now only
    // reaches the agent once it notices and watches again.
    a.api.stall_watches();
    let stalled = std::time::Instant::now();
    a.api.apply(my_slice(&a.pods(&["myapp-2"]))).unwrap();
    wait_until(Duration::from_secs(70), || {
        (a.reached(6) == BTreeSet::from(["myapp-2".to_owned()])).then_some(())
    })
    .unwrap_or_else(|| panic!("stalled watch never replaced\n{}", a.c.agent_log()));
    let took = stalled.elapsed();
    println!("recovered from a half-open watch in {took:?}");
    assert!(took < Duration::from_secs(60), "took {took:?}");
}

/// The agent must not depend on the Service it programs: given the API
/// server's own address with `--master` (kube-proxy's flag), it connects
/// there directly, although the API server also serves the `kubernetes`
/// Service (whose endpoint nothing here answers), and programs everything,
/// that Service included.
#[test]
fn master_reaches_the_api_server_directly_and_programs_the_kubernetes_service() {
    let mut a = ApiCluster::new(&["myapp-1"]);
    a.api
        .apply(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "kubernetes", "namespace": "default"},
            "spec": {
                "clusterIP": "10.96.0.1",
                "clusterIPs": ["10.96.0.1"],
                "type": "ClusterIP",
                "ports": [{"name": "https", "protocol": "TCP", "port": 443, "targetPort": 6443}],
            },
        }))
        .unwrap();
    a.api
        .apply(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kubernetes",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "kubernetes"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "https", "protocol": "TCP", "port": 6443}],
            "endpoints": [{"addresses": ["192.168.77.10"], "conditions": {"ready": true}}],
        }))
        .unwrap();
    a.api.apply(my_service()).unwrap();
    let pods = a.pods(&["myapp-1"]);
    a.api.apply(my_slice(&pods)).unwrap();
    let master = format!("http://{}", a.api.addr());
    a.c.start_agent_with(AgentSource::Master(master.clone()), "agent.log");
    assert!(
        a.c.agent_log().contains(&format!("API server {master}")),
        "{}",
        a.c.agent_log()
    );
    wait_until(Duration::from_secs(5), || {
        let programmed = a.programmed();
        (programmed
            .iter()
            .any(|(fe, b)| fe == "10.96.0.1:443" && b == &["192.168.77.10:6443"])
            && programmed.iter().any(|(fe, _)| fe == "10.96.0.10:80"))
        .then_some(())
    })
    .unwrap_or_else(|| panic!("{:?}\n{}", a.programmed(), a.c.agent_log()));
    a.wait_for_backends(&["myapp-1"]);
}

/// The node's loopback address the double listens on (for reopening it on
/// the same port).
fn api_addr(a: &ApiCluster) -> String {
    a.api.addr().to_string()
}

/// The API server goes away for 20 s (connections refused, watches cut)
/// and comes back with the same state: the agent keeps what it programmed
/// meanwhile, logs the outage in a handful of lines (not one per attempt),
/// retries less and less often (a recovering server is not hammered), and
/// serves a change made right after the server is back within the retry
/// delay the outage had reached.
#[test]
fn an_api_server_outage_is_quiet_backs_off_and_recovers() {
    let mut a = ApiCluster::new(&["myapp-1", "myapp-2"]);
    a.api.apply(my_service()).unwrap();
    a.api.apply(my_slice(&a.pods(&["myapp-1"]))).unwrap();
    a.start_agent("agent.log");
    a.wait_for_backends(&["myapp-1"]);

    let addr = api_addr(&a);
    let lines_before = a.c.agent_log().lines().count();
    a.api.stop_serving();
    std::thread::sleep(Duration::from_secs(20));
    // Still served from the maps while the API server is away.
    assert_eq!(a.reached(4), ["myapp-1".to_owned()].into());
    let outage_lines: Vec<String> =
        a.c.agent_log()
            .lines()
            .skip(lines_before)
            .map(str::to_owned)
            .collect();
    println!(
        "{} log lines in a 20 s outage:\n{}",
        outage_lines.len(),
        outage_lines.join("\n")
    );
    // One line per watch (Services, EndpointSlices, the Node).
    assert!(
        outage_lines.len() <= 6,
        "{} lines in a 20 s outage",
        outage_lines.len()
    );
    let listener = bind_in_netns(&a.c.tb.nodes[0].netns, &addr).expect("rebind");
    a.api.serve_again(listener).unwrap();
    let back = std::time::Instant::now();
    a.api.apply(my_slice(&a.pods(&["myapp-2"]))).unwrap();
    let served = wait_until(Duration::from_secs(30), || {
        (a.reached(4) == ["myapp-2".to_owned()].into()).then(|| back.elapsed())
    })
    .unwrap_or_else(|| panic!("change never served\n{}", a.c.agent_log()));
    println!("change after restart served {served:?} after the API server was back");
    // The delays double from 200 ms, each drawn between half and all of
    // its value: 20 s of failures are at most 8 attempts (the halves of
    // the first 7 delays add up to 12.7 s, of 8 to 25.5 s), so the next
    // attempt comes at most the 8th delay (25.6 s) after the last failed
    // one; then a list and a sync.
    assert!(
        served <= Duration::from_secs(28),
        "served after {served:?}\n{}",
        a.c.agent_log()
    );
    assert!(
        a.c.agent_log().contains("watch recovered after"),
        "{}",
        a.c.agent_log()
    );
}

/// The requests of one resource (lists and watches) the double answered
/// from `since` on: their times relative to `since`, and status codes.
fn schedule(
    api: &FakeApiServer,
    resource: Resource,
    since: std::time::Instant,
) -> Vec<(Duration, bool, u16)> {
    api.requests()
        .into_iter()
        .filter(|r| r.resource == Some(resource) && r.at >= since)
        .map(|r| (r.at - since, r.watch, r.status))
        .collect()
}

/// API Priority and Fairness rejects the agent with 429 and
/// `Retry-After: 3`: no request comes sooner than the server asked, and the
/// agent is back once the server lets it.
#[test]
fn a_429_retry_after_is_honoured() {
    let mut a = ApiCluster::new(&["myapp-1", "myapp-2"]);
    a.api.apply(my_service()).unwrap();
    a.api.apply(my_slice(&a.pods(&["myapp-1"]))).unwrap();
    a.start_agent("agent.log");
    a.wait_for_backends(&["myapp-1"]);
    let since = std::time::Instant::now();
    a.api.set_throttled(Some(3));
    std::thread::sleep(Duration::from_secs(12));
    let throttled = schedule(&a.api, Resource::EndpointSlices, since);
    a.api.set_throttled(None);
    a.api.apply(my_slice(&a.pods(&["myapp-2"]))).unwrap();
    a.wait_for_backends(&["myapp-2"]);
    println!("EndpointSlices requests while throttled: {throttled:?}");
    assert!(throttled.len() >= 2, "{throttled:?}");
    for pair in throttled.windows(2) {
        let gap = pair[1].0 - pair[0].0;
        assert!(
            gap >= Duration::from_secs(3),
            "a request {gap:?} after a 429 with Retry-After 3: {throttled:?}"
        );
    }
}

/// A server that serves lists but rejects every watch: the agent does not
/// relist or rewatch at a fixed fast rate; its attempts grow apart.
#[test]
fn a_server_that_rejects_every_watch_is_retried_less_and_less_often() {
    let mut a = ApiCluster::new(&["myapp-1"]);
    a.api.apply(my_service()).unwrap();
    a.api.apply(my_slice(&a.pods(&["myapp-1"]))).unwrap();
    a.start_agent("agent.log");
    a.wait_for_backends(&["myapp-1"]);
    let since = std::time::Instant::now();
    a.api.set_reject_watches(true);
    std::thread::sleep(Duration::from_secs(20));
    a.api.set_reject_watches(false);
    let attempts = schedule(&a.api, Resource::Services, since);
    println!("Services requests while watches were rejected: {attempts:?}");
    let lists = attempts.iter().filter(|(_, watch, _)| !watch).count();
    // Doubling from 0.1-0.2 s reaches 20 s in about 8 attempts; a fixed
    // 100 ms retry would make 200.
    assert!(
        attempts.len() <= 12,
        "{} attempts: {attempts:?}",
        attempts.len()
    );
    assert!(lists <= 2, "{lists} lists: {attempts:?}");
    let gaps: Vec<Duration> = attempts.windows(2).map(|p| p[1].0 - p[0].0).collect();
    assert!(
        gaps.last().is_some_and(|g| *g >= Duration::from_secs(2)),
        "{gaps:?}"
    );
}

/// A Service whose JSON does not decode into the model's types (a string
/// port) is reported with its kind, namespace and name, and counted; it
/// does not keep its list page or any other Service from being programmed.
#[test]
fn an_undecodable_service_is_reported_and_every_other_one_is_programmed() {
    let mut a = ApiCluster::new(&["myapp-1"]);
    let mut broken = my_service();
    broken["metadata"]["name"] = json!("broken");
    broken["spec"]["clusterIP"] = json!("10.96.0.11");
    broken["spec"]["clusterIPs"] = json!(["10.96.0.11"]);
    broken["spec"]["ports"] = json!([{"protocol": "TCP", "port": "eighty", "targetPort": 9376}]);
    a.api.apply(broken).unwrap();
    a.api.apply(my_service()).unwrap();
    a.api.apply(my_slice(&a.pods(&["myapp-1"]))).unwrap();
    a.start_agent("agent.log");
    a.wait_for_backends(&["myapp-1"]);
    let log = a.c.agent_log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("Service default/broken")),
        "{log}"
    );
    let (_, metrics) = common::curl_status(
        &a.c.tb,
        &a.c.tb.nodes[0].netns,
        "http://127.0.0.1:10249/metrics",
        2,
    );
    assert!(
        metrics.contains("netlb_invalid_objects_total{kind=\"undecodable\"} 1"),
        "{metrics}"
    );
    // Fixed, it is programmed too.
    let mut fixed = my_service();
    fixed["metadata"]["name"] = json!("broken");
    fixed["spec"]["clusterIP"] = json!("10.96.0.11");
    fixed["spec"]["clusterIPs"] = json!(["10.96.0.11"]);
    a.api.apply(fixed).unwrap();
    wait_until(Duration::from_secs(5), || {
        a.programmed()
            .iter()
            .any(|(fe, _)| fe.starts_with("10.96.0.11:80"))
            .then_some(())
    })
    .unwrap_or_else(|| panic!("{:?}\n{}", a.programmed(), a.c.agent_log()));
}

/// EndpointSlices are forbidden (RBAC): `/healthz` answers 503 and says
/// why, the metrics name the failing list, nothing is programmed; once the
/// permission is granted the agent lists, programs and turns healthy.
#[test]
fn forbidden_endpointslices_show_in_healthz_and_metrics() {
    let mut a = ApiCluster::new(&["myapp-1"]);
    a.api.apply(my_service()).unwrap();
    a.api.apply(my_slice(&a.pods(&["myapp-1"]))).unwrap();
    a.api.set_resource_forbidden(Resource::EndpointSlices, true);
    let agent = a.spawn_agent(&[], "agent.log");
    let netns = a.c.tb.nodes[0].netns.clone();
    let healthz = wait_until(Duration::from_secs(10), || {
        let (code, body) =
            common::curl_status(&a.c.tb, &netns, "http://127.0.0.1:10256/healthz", 2);
        (code == 503 && body.contains("forbidden")).then_some(body)
    })
    .unwrap_or_else(|| panic!("healthz never reported the 403\n{}", agent.log()));
    assert!(healthz.contains("EndpointSlice"), "{healthz}");
    let (_, metrics) = common::curl_status(&a.c.tb, &netns, "http://127.0.0.1:10249/metrics", 2);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("netlb_source_list_failing{") && l.contains("EndpointSlice")),
        "{metrics}"
    );
    assert!(agent.log().contains("forbidden"), "{}", agent.log());
    assert!(a.programmed().is_empty());
    a.api
        .set_resource_forbidden(Resource::EndpointSlices, false);
    a.c.agent = Some(agent);
    a.wait_for_backends(&["myapp-1"]);
    wait_until(Duration::from_secs(5), || {
        (common::curl_status(&a.c.tb, &netns, "http://127.0.0.1:10256/healthz", 2).0 == 200)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("never healthy again\n{}", a.c.agent_log()));
}

/// 10,000 Services shaped like a real server's (managedFields, annotations,
/// targetRefs, zones) and their slices are programmed, and one change among
/// them is followed at once. (The benchmark goes to 100k.)
#[test]
fn ten_thousand_realistic_services_program_and_one_change_is_followed() {
    const N: usize = 10_000;
    let mut a = ApiCluster::new(&["myapp-1", "myapp-2"]);
    for i in 0..N {
        let (svc, slice) = netlb_testbed::realistic::service_and_slice(
            i,
            &netlb_testbed::realistic::endpoint_ips(i, 4),
        );
        a.api.apply(svc).unwrap();
        a.api.apply(slice).unwrap();
    }
    a.api.apply(my_service()).unwrap();
    a.api.apply(my_slice(&a.pods(&["myapp-1"]))).unwrap();
    let started = std::time::Instant::now();
    a.start_agent("agent.log");
    let programmed = started.elapsed();
    a.wait_for_backends(&["myapp-1"]);
    let frontends = a.programmed().len();
    eprintln!("{N} Services programmed {programmed:?} after the agent started");
    assert_eq!(frontends, N + 1);
    let changed = std::time::Instant::now();
    a.api.apply(my_slice(&a.pods(&["myapp-2"]))).unwrap();
    let served = wait_until(Duration::from_secs(10), || {
        (a.reached(4) == ["myapp-2".to_owned()].into()).then(|| changed.elapsed())
    })
    .unwrap_or_else(|| panic!("change never served\n{}", a.c.agent_log()));
    eprintln!("one change among {N} Services served after {served:?}");
    assert!(served < Duration::from_secs(2), "{served:?}");
    // One Service recomputed for it, a handful of map writes.
    let log = a.c.agent_log();
    let last = log
        .lines()
        .rev()
        .find(|l| l.contains("synced "))
        .unwrap_or_default()
        .to_owned();
    assert!(last.contains(": 1 Services recomputed"), "{last}");
}

/// Issue 17, item 5: a Service deleted in the same sync step as a zone
/// change of this node (both events wait out the minimum sync period
/// together) is removed from the datapath, and a new Service that gets its
/// cluster IP is served.
#[test]
fn a_deletion_in_the_same_step_as_a_zone_change_is_programmed() {
    let mut a = ApiCluster::new(&["myapp-1"]);
    a.api
        .apply(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node0", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
        }))
        .unwrap();
    a.api.apply(my_service()).unwrap();
    a.api.apply(my_slice(&a.pods(&["myapp-1"]))).unwrap();
    let agent = a.spawn_agent(&["--min-sync-period", "2s"], "agent.log");
    assert!(
        agent.wait_for_log("initial sync complete", 1, Duration::from_secs(20)),
        "{}",
        agent.log()
    );
    a.c.agent = Some(agent);
    a.wait_for_backends(&["myapp-1"]);
    // A sync right now (another Service), so that the next two events
    // wait out the minimum sync period together and land in one step.
    std::thread::sleep(Duration::from_secs(3));
    let synced = a.c.agent_log().matches("synced ").count();
    a.api
        .apply(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "trigger", "namespace": "default"},
            "spec": {"clusterIP": "10.96.0.12", "ports": [{"port": 80, "protocol": "TCP"}]},
        }))
        .unwrap();
    let agent = a.c.agent.as_ref().unwrap();
    assert!(
        agent.wait_for_log("synced ", synced + 1, Duration::from_secs(5)),
        "{}",
        agent.log()
    );
    // The Service and its slice (the garbage collector deletes it with the
    // Service).
    a.api.delete(Resource::Services, "default", "my-service");
    a.api
        .delete(Resource::EndpointSlices, "default", "my-service-abc12");
    a.api
        .apply(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "node0", "labels": {"topology.kubernetes.io/zone": "zone-b"}},
        }))
        .unwrap();
    let agent = a.c.agent.as_ref().unwrap();
    assert!(
        agent.wait_for_log("this node's zone: zone-b", 1, Duration::from_secs(10)),
        "{}",
        agent.log()
    );
    let only_trigger = vec![("10.96.0.12:80".to_owned(), Vec::new())];
    wait_until(Duration::from_secs(10), || {
        (a.programmed() == only_trigger).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "still programmed: {:?}\n{}",
            a.programmed(),
            a.c.agent_log()
        )
    });
    // The cluster IP goes to a new Service.
    let mut other = my_service();
    other["metadata"]["name"] = json!("other-service");
    a.api.apply(other).unwrap();
    let mut slice = my_slice(&a.pods(&["myapp-1"]));
    slice["metadata"]["name"] = json!("other-service-xyz");
    slice["metadata"]["labels"]["kubernetes.io/service-name"] = json!("other-service");
    a.api.apply(slice).unwrap();
    a.wait_for_backends(&["myapp-1"]);
}

/// `(status of /readyz, status of /healthz)` of node 0's agent (0 when
/// nothing answers).
fn probes(a: &ApiCluster) -> (u16, u16) {
    let status = |path: &str| -> u16 {
        let out =
            a.c.tb
                .exec(
                    &a.c.tb.nodes[0].netns,
                    &[
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-m",
                        "1",
                        "-w",
                        "%{http_code}",
                        &format!("http://127.0.0.1:10256{path}"),
                    ],
                )
                .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0)
    };
    (status("/readyz"), status("/healthz"))
}

/// Issue 22: readiness means "serving". An agent that cannot reach any
/// API server is not ready (`/readyz` 503), whatever kube-proxy's
/// `/healthz` says while starting; it becomes ready after its first sync
/// once the server answers; and it is not ready again once no list or
/// watch has succeeded for longer than the health timeout (twice the sync
/// period, here 2 s).
#[test]
fn readiness_means_serving() {
    let mut a = ApiCluster::new(&["myapp-1"]);
    a.api.apply(my_service()).unwrap();
    a.api.apply(my_slice(&a.pods(&["myapp-1"]))).unwrap();
    let addr = api_addr(&a);
    a.api.stop_serving();
    let started = std::time::Instant::now();
    let agent = a.spawn_agent(&["--sync-period", "1s"], "agent.log");
    a.c.agent = Some(agent);
    let mut timeline: Vec<(Duration, (u16, u16))> = Vec::new();
    let mut record = |a: &ApiCluster| {
        let p = probes(a);
        if timeline.last().map(|(_, last)| *last) != Some(p) {
            timeline.push((started.elapsed(), p));
        }
        p
    };
    // Unreachable: never ready.
    while started.elapsed() < Duration::from_secs(6) {
        assert_ne!(record(&a).0, 200, "ready without an API server");
        std::thread::sleep(Duration::from_millis(200));
    }
    let listener = bind_in_netns(&a.c.tb.nodes[0].netns, &addr).expect("rebind");
    a.api.serve_again(listener).unwrap();
    let back = started.elapsed();
    let ready = wait_until(Duration::from_secs(20), || {
        (record(&a).0 == 200).then_some(())
    });
    assert!(ready.is_some(), "never ready:\n{}", a.c.agent_log());
    a.wait_for_backends(&["myapp-1"]);
    // An outage longer than the health timeout: not ready, then ready.
    a.api.stop_serving();
    let gone = started.elapsed();
    let not_ready = wait_until(Duration::from_secs(10), || {
        (record(&a).0 == 503).then_some(())
    });
    assert!(not_ready.is_some(), "still ready during an outage");
    let listener = bind_in_netns(&a.c.tb.nodes[0].netns, &addr).expect("rebind");
    a.api.serve_again(listener).unwrap();
    let back_again = started.elapsed();
    let ready = wait_until(Duration::from_secs(30), || {
        (record(&a).0 == 200).then_some(())
    });
    assert!(ready.is_some(), "never ready again:\n{}", a.c.agent_log());
    println!(
        "readiness timeline (seconds since the agent started; /readyz, /healthz): API server unreachable until {back:.1?}, down again at {gone:.1?}, back at {back_again:.1?}"
    );
    for (at, (readyz, healthz)) in &timeline {
        println!(
            "  {:>5.1} s: /readyz {readyz}, /healthz {healthz}",
            at.as_secs_f64()
        );
    }
}
