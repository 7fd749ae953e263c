//! The agent's own lifecycle (issue 17): the datapath without its agent,
//! restarts that change map sizes, an upgrade from the previous release,
//! the NAT port range beside the node's ephemeral ports. Real agents, real
//! kernel, real clients in network namespaces. Needs root; run through
//! `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod common;

use std::time::Duration;

use common::{Cluster, connect_rate_result, echo, stat, wait_until};

/// The agent is frozen (SIGSTOP) while a client opens three times as many
/// short connections as the conntrack table holds: the datapath's own
/// collector reclaims the closed connections, so at most 0.1 % fail.
/// (Without it the table fills with dead entries after about a thousand
/// connections and refuses every new one.)
#[test]
fn with_the_agent_stopped_the_table_never_fills_with_dead_connections() {
    const TABLE: u32 = 2048;
    let mut c = Cluster::new(&["gc-1", "gc-2"]);
    c.expose("gc", "10.96.0.71", "TCP", (80, 9376), &["gc-1", "gc-2"]);
    c.start_agent_args(&[
        "--max-conntrack",
        &TABLE.to_string(),
        "--conntrack-tcp-timeout-close",
        "1s",
        "--conntrack-gc-interval",
        "1s",
    ]);
    let agent = c.agent.as_ref().expect("agent");
    agent.pause();
    // The kernel notices: its collector sweeps once the agent's heartbeat is
    // two periods old.
    assert!(
        wait_until(Duration::from_secs(10), || {
            (stat(&c, 0, "ct_gc_kernel_sweeps") > 0).then_some(())
        })
        .is_some(),
        "the in-kernel collector never swept:\n{}",
        c.agent_log()
    );
    // 3 x 2048 connections, 250 a second: a closed connection's two
    // entries live for the close timeout plus up to a period, about 1,250
    // entries at a time.
    let count = 3 * TABLE;
    let (code, out) = echo(
        &c.tb,
        &c.client(),
        &[
            "connect-rate",
            "--connect",
            "10.96.0.71:80",
            "--threads",
            "4",
            "--rate",
            "250",
            "--count",
            &count.to_string(),
            "--duration-s",
            "60",
        ],
    );
    let (ok, failed) = connect_rate_result(&out);
    let full = stat(&c, 0, "drop_ct_full");
    let reclaimed = stat(&c, 0, "ct_gc_kernel_deleted");
    println!(
        "agent stopped: {ok} connections, {failed} failed, drop_ct_full={full}, \
         {reclaimed} entries reclaimed by the kernel"
    );
    agent.resume();
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(ok + failed, u64::from(count), "{out}");
    assert!(
        failed * 1000 <= u64::from(count),
        "{failed} of {count} connections failed with the agent stopped:\n{out}\n{}",
        c.agent_log()
    );
    assert!(reclaimed >= 2 * u64::from(TABLE), "{reclaimed}");
}

/// The local ports the kernel hands `n` unbound UDP sockets of `netns`
/// (a `connect` to the node's own loopback picks one; nothing is sent).
fn ephemeral_ports_in(netns: &str, n: usize) -> Vec<u16> {
    let path = std::path::PathBuf::from("/run/netns").join(netns);
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        let file = std::fs::File::open(&path).expect("netns");
        // SAFETY: setns on a namespace fd we own, in a thread of our own
        // that ends here.
        assert_eq!(
            unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let sockets: Vec<std::net::UdpSocket> = (0..n)
            .map(|_| {
                let s = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
                s.connect("127.0.0.1:9").expect("connect");
                s
            })
            .collect();
        sockets
            .iter()
            .map(|s| s.local_addr().expect("addr").port())
            .collect()
    })
    .join()
    .expect("socket thread")
}

fn sysctl(c: &Cluster, name: &str) -> String {
    let out =
        c.tb.exec(&c.tb.nodes[0].netns, &["sysctl", "-n", name])
            .expect("sysctl");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Issue 17, item 8: the node's ephemeral ports cover the NAT port range
/// (`1024 65535`, a common tuning): the agent reserves the overlap, so no
/// host socket is handed a NAT port; where the reservation cannot be
/// written, it refuses to start, says how to fix it, and pins nothing.
#[test]
fn nat_ports_that_overlap_the_ephemeral_ports_are_reserved_or_the_agent_refuses() {
    let mut c = Cluster::new(&["nat-1"]);
    c.expose("nat", "10.96.0.72", "TCP", (80, 9376), &["nat-1"]);
    let node = c.tb.nodes[0].netns.clone();
    c.tb.exec(
        &node,
        &["sysctl", "-w", "net.ipv4.ip_local_port_range=1024 65535"],
    )
    .expect("sysctl");
    // Refused: /proc/sys read-only in the agent's mount namespace.
    let mut refused = netlb_testbed::agent::AgentProcess::start(
        &c.tb.nodes[0],
        &netlb_testbed::agent::AgentOptions {
            binary: netlb_testbed::find_binary("netlb-agent"),
            source: netlb_testbed::agent::AgentSource::Manifests(c.manifests.clone()),
            extra_args: vec![],
            cleanup_on_exit: true,
            capabilities: None,
            wrapper: vec![
                "unshare".into(),
                "--mount".into(),
                "--propagation".into(),
                "private".into(),
                "sh".into(),
                "-c".into(),
                "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec \"$@\"".into(),
                "sh".into(),
            ],
        },
        &c.tb.dir.join("refused.log"),
    )
    .expect("agent");
    let status = refused.wait_exit(Duration::from_secs(20));
    let log = refused.log();
    println!("{log}");
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{log}");
    assert!(log.contains("--nat-port-range"), "{log}");
    assert!(
        std::fs::read_dir(&c.tb.nodes[0].bpffs).map_or(true, |mut d| d.next().is_none()),
        "something was pinned"
    );
    // Reserved.
    c.start_agent();
    let reserved = sysctl(&c, "net.ipv4.ip_local_reserved_ports");
    assert!(reserved.contains("1024-29999"), "{reserved:?}");
    assert!(c.agent_log().contains("reserved NAT ports 1024-29999"));
    let ports = ephemeral_ports_in(&node, 3000);
    let taken: Vec<u16> = ports.iter().copied().filter(|p| *p <= 29_999).collect();
    assert!(taken.is_empty(), "host sockets got NAT ports: {taken:?}");
    println!(
        "3,000 host sockets, ports {}-{}",
        ports.iter().min().unwrap(),
        ports.iter().max().unwrap()
    );
}

/// Every `--max-*` flag, with `scale` applied to its default.
fn sizes(divide: u32) -> Vec<String> {
    let defaults: [(&str, u32); 12] = [
        ("--max-service-entries", 1_048_576),
        ("--max-backends", 524_288),
        ("--max-rev-nat", 262_144),
        ("--max-conntrack", 524_288),
        ("--max-pod-sources", 65_536),
        ("--max-sock-rev", 131_072),
        ("--max-source-ranges", 65_536),
        ("--max-affinity", 131_072),
        ("--max-affinity-matches", 262_144),
        ("--max-cluster-ips", 262_144),
        ("--max-service-cidrs", 16),
        ("--max-fragments", 8_192),
    ];
    defaults
        .iter()
        .flat_map(|(flag, value)| [flag.to_string(), (value / divide).to_string()])
        .collect()
}

/// Load through two Services while the test restarts the agent: keep-alive
/// echo connections (each fails on the first line that does not come back,
/// so a connection moved to another backend fails) and new HTTP
/// connections every 50 ms. Returns the clients to wait for.
struct Load {
    keepalive: Vec<(netlb_testbed::process::ChildGuard, std::path::PathBuf)>,
    new_connections: (netlb_testbed::process::ChildGuard, std::path::PathBuf),
}

fn start_load(c: &Cluster, echo_vip: &str, web_vip: &str, seconds: u32) -> Load {
    let keepalive = (0..4)
        .map(|i| {
            let log = c.tb.dir.join(format!("keepalive-{i}.log"));
            let child = common::spawn_echo(
                &c.client(),
                &[
                    "tcp-client",
                    "--connect",
                    &format!("{echo_vip}:7000"),
                    "--interval-ms",
                    "50",
                    "--duration-s",
                    &seconds.to_string(),
                ],
                &log,
            );
            (child, log)
        })
        .collect();
    let log = c.tb.dir.join("new-connections.log");
    let child = common::spawn_echo(
        &c.client(),
        &[
            "connect-rate",
            "--connect",
            &format!("{web_vip}:80"),
            "--threads",
            "1",
            "--rate",
            "20",
            "--duration-s",
            &seconds.to_string(),
        ],
        &log,
    );
    Load {
        keepalive,
        new_connections: (child, log),
    }
}

impl Load {
    /// Waits for the clients; panics with their output and `logs` unless
    /// every request succeeded and no keep-alive connection moved.
    fn check(self, logs: &str) -> (u64, usize) {
        let mut lines = 0;
        for (mut child, log) in self.keepalive {
            let status = child.wait(Duration::from_secs(60)).expect("client ended");
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            assert!(
                status.success(),
                "a keep-alive connection broke:\n{text}\n{logs}"
            );
            lines += text
                .lines()
                .find_map(|l| {
                    l.strip_prefix("ok: ")?
                        .split_whitespace()
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .unwrap_or(0);
        }
        let (mut child, log) = self.new_connections;
        child.wait(Duration::from_secs(60)).expect("loop ended");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let (ok, failed) = connect_rate_result(&text);
        assert_eq!(failed, 0, "new connections failed: {text}\n{logs}");
        (ok, lines)
    }
}

/// The backend each keep-alive client is connected to.
fn keepalive_backends(c: &Cluster, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let log = c.tb.dir.join(format!("keepalive-{i}.log"));
            wait_until(Duration::from_secs(5), || {
                std::fs::read_to_string(&log)
                    .ok()?
                    .lines()
                    .find_map(|l| l.strip_prefix("connected to ").map(str::to_owned))
            })
            .expect("keep-alive client connected")
        })
        .collect()
}

/// Restarts node 0's agent (SIGTERM, pins kept) with `args`, and waits for
/// its first sync.
fn restart_agent(c: &mut Cluster, log: &str, args: &[String], binary: std::path::PathBuf) {
    if let Some(mut agent) = c.agent.take() {
        agent.stop();
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let source = netlb_testbed::agent::AgentSource::Manifests(c.manifests.clone());
    c.start_agent_opts(source, log, &args, binary, false);
}

fn generations(c: &Cluster) -> Vec<String> {
    std::fs::read_dir(c.tb.nodes[0].bpffs.join("maps"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

/// Issue 17, item 1: restarts under load that halve every `--max-*` flag
/// and then restore them (what an upgrade that changes a map's layout
/// does too) lose no request, move no keep-alive connection, and leave one
/// generation of maps pinned.
#[test]
fn restarts_that_resize_every_map_lose_no_connection() {
    let mut c = Cluster::new(&["rs-1", "rs-2"]);
    c.expose(
        "rs-echo",
        "10.96.0.73",
        "TCP",
        (7000, 7000),
        &["rs-1", "rs-2"],
    );
    c.expose("rs-web", "10.96.0.74", "TCP", (80, 9376), &["rs-1", "rs-2"]);
    let agent = netlb_testbed::find_binary("netlb-agent");
    restart_agent(&mut c, "agent-1.log", &sizes(1), agent.clone());
    let load = start_load(&c, "10.96.0.73", "10.96.0.74", 12);
    let before = keepalive_backends(&c, 4);
    std::thread::sleep(Duration::from_secs(3));
    restart_agent(&mut c, "agent-2.log", &sizes(2), agent.clone());
    let log2 = std::fs::read_to_string(c.tb.dir.join("agent-2.log")).unwrap_or_default();
    assert!(log2.contains("migrated in"), "{log2}");
    std::thread::sleep(Duration::from_secs(3));
    restart_agent(&mut c, "agent-3.log", &sizes(1), agent);
    let log3 = std::fs::read_to_string(c.tb.dir.join("agent-3.log")).unwrap_or_default();
    assert!(log3.contains("migrated in"), "{log3}");
    let logs = format!("{log2}\n{log3}");
    let (ok, lines) = load.check(&logs);
    println!(
        "two resizing restarts under load: {ok} new connections and {lines} keep-alive requests, 0 failed"
    );
    for line in log2
        .lines()
        .chain(log3.lines())
        .filter(|l| l.contains("migrated in"))
    {
        println!("{line}");
    }
    assert_eq!(keepalive_backends(&c, 4), before);
    assert_eq!(generations(&c).len(), 1, "{:?}", generations(&c));
}

/// Issue 17, item 1: v0.1.0's agent runs the node (its maps pinned in the
/// bpffs directory, layout 1) and is replaced by this build under load, as
/// a DaemonSet upgrade does: no request fails, no keep-alive connection
/// moves, and only this build's generation stays pinned. `cargo xtask
/// test` builds v0.1.0 from its tag and names it in `NETLB_PREVIOUS_AGENT`.
#[test]
fn an_upgrade_from_v0_1_0_loses_no_connection() {
    let previous = std::env::var_os("NETLB_PREVIOUS_AGENT")
        .map(std::path::PathBuf::from)
        .expect("NETLB_PREVIOUS_AGENT names v0.1.0's agent (cargo xtask test builds it)");
    let mut c = Cluster::new(&["up-1", "up-2"]);
    c.expose(
        "up-echo",
        "10.96.0.75",
        "TCP",
        (7000, 7000),
        &["up-1", "up-2"],
    );
    c.expose("up-web", "10.96.0.76", "TCP", (80, 9376), &["up-1", "up-2"]);
    restart_agent(&mut c, "agent-v0.1.0.log", &[], previous);
    assert!(
        c.tb.nodes[0].bpffs.join("NETLB_CT").exists(),
        "v0.1.0's layout"
    );
    let load = start_load(&c, "10.96.0.75", "10.96.0.76", 10);
    let before = keepalive_backends(&c, 4);
    std::thread::sleep(Duration::from_secs(4));
    let current = netlb_testbed::find_binary("netlb-agent");
    restart_agent(&mut c, "agent-upgraded.log", &[], current);
    let log = std::fs::read_to_string(c.tb.dir.join("agent-upgraded.log")).unwrap_or_default();
    assert!(log.contains("are of layout 1"), "{log}");
    assert!(log.contains("migrated in"), "{log}");
    let (ok, requests) = load.check(&log);
    println!(
        "upgrade from v0.1.0 under load: {ok} new connections and {requests} keep-alive requests, 0 failed"
    );
    for line in log.lines().filter(|l| l.contains("migrated in")) {
        println!("{line}");
    }
    assert_eq!(keepalive_backends(&c, 4), before);
    assert_eq!(generations(&c).len(), 1, "{:?}", generations(&c));
    assert!(
        !c.tb.nodes[0].bpffs.join("NETLB_CT").exists(),
        "v0.1.0's maps left pinned"
    );
    // The carried-over datapath keeps serving.
    let names = common::curl_many(&c, &c.client(), "http://10.96.0.76/", 10);
    assert_eq!(names.len(), 10);
}

/// A counter of the agent's `/metrics` (node 0), summed over its labels
/// that contain `label`.
fn metric(c: &Cluster, name: &str, label: &str) -> u64 {
    let out =
        c.tb.exec(
            &c.tb.nodes[0].netns,
            &["curl", "-sS", "-m", "2", "http://127.0.0.1:10249/metrics"],
        )
        .expect("curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Issue 17, item 4: a map entry damaged behind the agent's back (a slot
/// pointed at a backend that does not exist: a third of new connections
/// would be dropped) is found by the verification resync, counted, and
/// repaired: every new connection is served again.
#[test]
fn a_damaged_map_entry_is_repaired_by_the_verification_and_counted() {
    let mut c = Cluster::new(&["vr-1", "vr-2"]);
    c.expose("vr", "10.96.0.77", "TCP", (80, 9376), &["vr-1", "vr-2"]);
    c.start_agent_args(&["--sync-period", "2s"]);
    common::curl_many(&c, &c.client(), "http://10.96.0.77/", 10);
    let generation = generations(&c).pop().expect("a generation");
    let services = c.tb.nodes[0]
        .bpffs
        .join("maps")
        .join(generation)
        .join("NETLB_SERVICES");
    // Slot 1 of 10.96.0.77:80/TCP -> backend id 999.
    let hex = |bytes: &[u8]| -> Vec<String> { bytes.iter().map(|b| format!("{b:02x}")).collect() };
    let key = [10, 96, 0, 77, 0, 80, 1, 0, 6, 0, 0, 0];
    let value = [0xe7, 0x03, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    let mut args: Vec<String> = vec!["map".into(), "update".into(), "pinned".into()];
    args.push(services.display().to_string());
    args.push("key".into());
    args.push("hex".into());
    args.extend(hex(&key));
    args.push("value".into());
    args.push("hex".into());
    args.extend(hex(&value));
    let out = std::process::Command::new("bpftool")
        .args(&args)
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let repaired = wait_until(Duration::from_secs(15), || {
        (metric(&c, "netlb_sync_repairs_total", "NETLB_SERVICES") >= 1).then_some(())
    });
    assert!(repaired.is_some(), "never repaired:\n{}", c.agent_log());
    let names: std::collections::BTreeSet<String> =
        common::curl_many(&c, &c.client(), "http://10.96.0.77/", 20)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
    assert_eq!(names, ["vr-1".to_owned(), "vr-2".to_owned()].into());
    assert!(
        c.agent_log().contains("repairing them"),
        "{}",
        c.agent_log()
    );
}

/// A ClusterIP Service with session affinity.
fn affinity_service(name: &str, vip: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\nspec:\n  clusterIP: {vip}\n  sessionAffinity: ClientIP\n  selector: {{app: {name}}}\n  ports:\n    - {{protocol: TCP, port: 80, targetPort: 9376}}\n"
    )
}

/// Issue 17, item 6: the affinity-match map is full (`--max-affinity-
/// matches 3`, two Services of two backends): the Service that fits keeps
/// its affinity, the other is served without it (every request answered,
/// never by a backend it no longer has, through a rolling update), and the
/// fill and degraded metrics say so.
#[test]
fn a_full_affinity_map_keeps_every_service_consistent_and_shows_in_the_metrics() {
    let mut c = Cluster::new(&["af-1", "af-2", "af-3", "af-4", "af-5"]);
    let all: Vec<netlb_testbed::topology::Pod> = c.tb.pods().to_vec();
    let slice = |service: &str, names: &[&str]| {
        let refs: Vec<&netlb_testbed::topology::Pod> = all
            .iter()
            .filter(|p| names.contains(&p.name.as_str()))
            .collect();
        common::slice_yaml(service, "TCP", 9376, &refs)
    };
    c.write("aff-a.yaml", &affinity_service("aff-a", "10.96.0.78"));
    c.write("aff-a-slice.yaml", &slice("aff-a", &["af-1", "af-2"]));
    c.write("aff-b.yaml", &affinity_service("aff-b", "10.96.0.79"));
    c.write("aff-b-slice.yaml", &slice("aff-b", &["af-3", "af-4"]));
    c.start_agent_args(&["--max-affinity-matches", "3"]);
    let entries = |map: &str| metric(&c, "netlb_map_entries{", map);
    assert!(
        wait_until(Duration::from_secs(5), || (entries("NETLB_AFFINITY_MATCH")
            == 2)
            .then_some(()))
        .is_some(),
        "{}",
        c.agent_log()
    );
    assert_eq!(metric(&c, "netlb_map_capacity{", "NETLB_AFFINITY_MATCH"), 3);
    assert_eq!(
        metric(&c, "netlb_frontends_degraded{", "NETLB_AFFINITY_MATCH"),
        1
    );
    assert!(metric(&c, "netlb_map_full_total{", "NETLB_AFFINITY_MATCH") >= 1);
    let reached = |url: &str| -> std::collections::BTreeSet<String> {
        common::curl_many(&c, &c.client(), url, 20)
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    };
    // One of them is sticky, the other balanced over both its backends.
    let a = reached("http://10.96.0.78/");
    let b = reached("http://10.96.0.79/");
    println!("aff-a reached {a:?}, aff-b reached {b:?}");
    assert!(
        (a.len() == 1 && b.len() == 2) || (a.len() == 2 && b.len() == 1),
        "{a:?} {b:?}"
    );
    // A rolling update of both: af-1 and af-3 leave, af-5 joins each.
    c.write("aff-a-slice.yaml", &slice("aff-a", &["af-2", "af-5"]));
    c.write("aff-b-slice.yaml", &slice("aff-b", &["af-4", "af-5"]));
    let expected_a: std::collections::BTreeSet<String> = ["af-2".into(), "af-5".into()].into();
    let expected_b: std::collections::BTreeSet<String> = ["af-4".into(), "af-5".into()].into();
    let settled = wait_until(Duration::from_secs(10), || {
        let (a, b) = (reached("http://10.96.0.78/"), reached("http://10.96.0.79/"));
        (a.is_subset(&expected_a) && b.is_subset(&expected_b)).then_some(())
    });
    assert!(settled.is_some(), "{}", c.agent_log());
    assert!(entries("NETLB_AFFINITY_MATCH") <= 3);
}
