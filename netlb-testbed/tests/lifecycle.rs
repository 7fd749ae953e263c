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
        "the in-kernel collector never swept: {}\n{}",
        String::from_utf8_lossy(
            &std::process::Command::new("bpftool")
                .args(["map", "dump", "pinned"])
                .arg(c.tb.nodes[0].bpffs.join("NETLB_CT_GC"))
                .output()
                .unwrap()
                .stdout
        ),
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
