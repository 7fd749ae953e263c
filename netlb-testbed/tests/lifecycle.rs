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
