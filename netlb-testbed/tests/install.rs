//! A node as the DaemonSet leaves it (issue 22): pods created while no
//! agent runs, readiness that means "serving", start-up errors before
//! anything is pinned, the node preparation of the init container, an
//! uninstall that leaves nothing behind. Real agents, real kernel, real
//! clients in network namespaces. Needs root; run through `cargo xtask
//! test`.
#![cfg(feature = "privileged-tests")]

mod common;

use std::{collections::BTreeSet, time::Duration};

use common::{Cluster, stat, wait_until};
use netlb_testbed::agent::{AgentSource, bpftool_json};

/// One request from `netns` as a process of node 0's cgroup (where a real
/// node's pods run: below the cgroup root the agent attaches to).
fn curl_in_cgroup(c: &Cluster, netns: &str, url: &str) -> Option<String> {
    let out =
        c.tb.exec_in_cgroup(
            &c.tb.nodes[0].cgroup,
            netns,
            &["curl", "-sS", "-m", "2", url],
        )
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn backend_of(body: &str) -> String {
    body.split_whitespace().next().unwrap_or("").to_owned()
}

/// Issue 22: the agent stops (a rollout, an eviction: its datapath
/// stays) and a pod is created meanwhile, with no TC program on its
/// interface: its processes reach a ClusterIP at once, through the
/// socket-level programs, which serve pod sockets while the agent is away.
/// Killed hard, the agent is away three seconds after its last heartbeat.
/// Once the agent is back, pods use the TC path again.
#[test]
fn a_pod_created_while_the_agent_is_down_reaches_a_cluster_ip_at_once() {
    let mut c = Cluster::new(&["np-1", "np-2"]);
    c.expose("np", "10.96.0.80", "TCP", (80, 9376), &["np-1", "np-2"]);
    let agent = netlb_testbed::find_binary("netlb-agent");
    let source = AgentSource::Manifests(c.manifests.clone());
    c.start_agent_opts(source.clone(), "agent-1.log", &[], agent.clone(), false);
    let backends: BTreeSet<String> = ["np-1".into(), "np-2".into()].into();
    // Stopped (SIGTERM, pins kept).
    c.agent.take().expect("agent").stop();
    let late = c.tb.add_pod(0, "late-1").expect("pod");
    let started = std::time::Instant::now();
    let body = curl_in_cgroup(&c, &late.netns, "http://10.96.0.80/");
    let took = started.elapsed();
    assert!(
        body.as_deref()
            .is_some_and(|b| backends.contains(&backend_of(b))),
        "a pod created after the agent stopped: {body:?}"
    );
    println!("a pod created while the agent is stopped: first request answered in {took:?}");
    assert!(stat(&c, 0, "sock_lb_pod") >= 1);
    // Killed hard: away once its heartbeat is three seconds old.
    c.start_agent_opts(source.clone(), "agent-2.log", &[], agent.clone(), false);
    c.agent.as_mut().expect("agent").kill_hard();
    let late2 = c.tb.add_pod(0, "late-2").expect("pod");
    let served = wait_until(Duration::from_secs(6), || {
        curl_in_cgroup(&c, &late2.netns, "http://10.96.0.80/")
    });
    assert!(served.is_some(), "not served after the agent was killed");
    // Back: the agent attaches the new interfaces, and pods are served by
    // TC again (the socket-level programs leave their sockets alone).
    c.start_agent_opts(source, "agent-3.log", &[], agent, true);
    let before = stat(&c, 0, "sock_lb_pod");
    for _ in 0..5 {
        let body = curl_in_cgroup(&c, &late.netns, "http://10.96.0.80/").expect("served");
        assert!(backends.contains(&backend_of(&body)));
    }
    assert_eq!(stat(&c, 0, "sock_lb_pod"), before);
}

/// Issue 22: a `--cgroup-root` that is not a cgroup2 mount (a v1
/// hierarchy, a plain directory) is named as such before anything is
/// loaded or pinned, and the agent exits.
#[test]
fn a_cgroup_root_that_is_not_cgroup2_is_a_clear_error_and_nothing_is_pinned() {
    let c = Cluster::new(&["cg-1"]);
    let not_cgroup = c.tb.dir.join("not-a-cgroup");
    std::fs::create_dir_all(&not_cgroup).unwrap();
    let mut agent = netlb_testbed::agent::AgentProcess::start(
        &c.tb.nodes[0],
        &netlb_testbed::agent::AgentOptions {
            binary: netlb_testbed::find_binary("netlb-agent"),
            source: AgentSource::Manifests(c.manifests.clone()),
            extra_args: vec!["--cgroup-root".into(), not_cgroup.display().to_string()],
            cleanup_on_exit: false,
            capabilities: None,
            wrapper: Vec::new(),
        },
        &c.tb.dir.join("agent.log"),
    )
    .expect("agent");
    let status = agent.wait_exit(Duration::from_secs(20));
    let log = agent.log();
    println!("{}", log.lines().last().unwrap_or(""));
    assert!(status.is_some_and(|s| !s.success()), "{status:?}\n{log}");
    assert!(log.contains("is a filesystem of type"), "{log}");
    assert!(log.contains("not cgroup2"), "{log}");
    assert!(log.contains("nothing was loaded or pinned"), "{log}");
    let pinned: Vec<_> = walk(&c.tb.nodes[0].bpffs);
    assert!(pinned.is_empty(), "pinned: {pinned:?}");
}

/// Every file below `dir` (pins), recursively.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// `findmnt`'s (FSTYPE, PROPAGATION) of `path` in the mount namespace of
/// `pid`.
fn mount_of(pid: u32, path: &std::path::Path) -> (String, String) {
    let out = std::process::Command::new("nsenter")
        .arg(format!("--mount=/proc/{pid}/ns/mnt"))
        .args(["findmnt", "-n", "-o", "FSTYPE,PROPAGATION", "--mountpoint"])
        .arg(path)
        .output()
        .expect("findmnt");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut fields = text.split_whitespace();
    (
        fields.next().unwrap_or("").to_owned(),
        fields.next().unwrap_or("").to_owned(),
    )
}

/// Issue 22: the init container's node preparation, in a mount namespace
/// the test makes (private, as on hosts without systemd): a bpffs with
/// shared propagation and the cgroup2 hierarchy alone appear, a private
/// bpffs that was there becomes shared, and a second run changes nothing.
#[test]
fn the_node_preparation_mounts_a_shared_bpffs_and_the_cgroup2_hierarchy() {
    let c = Cluster::new(&["pn-1"]);
    let mut host = netlb_testbed::process::ChildGuard::spawn(
        "mount namespace",
        std::process::Command::new("unshare").args([
            "--mount",
            "--propagation",
            "private",
            "sleep",
            "60",
        ]),
    )
    .expect("unshare");
    let pid = host.pid();
    let ns = std::path::PathBuf::from(format!("/proc/{pid}/ns/mnt"));
    wait_until(Duration::from_secs(5), || {
        let own = std::fs::read_link("/proc/self/ns/mnt").ok()?;
        (std::fs::read_link(&ns).ok()? != own).then_some(())
    })
    .expect("a mount namespace of its own");
    let bpffs = c.tb.dir.join("host/sys/fs/bpf");
    let cgroup2 = c.tb.dir.join("host/run/netlb/cgroupv2");
    // With exactly the capabilities the least-privilege component gives the
    // init container.
    let caps = common::deploy_capabilities(
        "components/capabilities/daemonset-capabilities.yaml",
        "prepare-node",
    );
    let setpriv = netlb_testbed::process::setpriv_args(&caps);
    let prepare = || {
        let out = std::process::Command::new(&setpriv[0])
            .args(&setpriv[1..])
            .arg(netlb_testbed::find_binary("netlb-agent"))
            .arg("prepare-node")
            .arg("--host-mount-ns")
            .arg(&ns)
            .arg("--bpffs")
            .arg(&bpffs)
            .arg("--cgroup2")
            .arg(&cgroup2)
            .output()
            .expect("prepare-node");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    // A private bpffs first, as such a host would have it.
    std::fs::create_dir_all(&bpffs).unwrap();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--mount={}", ns.display()))
        .args(["mount", "--make-private", "-t", "bpf", "bpf"])
        .arg(&bpffs)
        .output()
        .expect("mount");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mount_of(pid, &bpffs), ("bpf".into(), "private".into()));
    let first = prepare();
    println!("{first}");
    assert_eq!(mount_of(pid, &bpffs), ("bpf".into(), "shared".into()));
    assert_eq!(mount_of(pid, &cgroup2).0, "cgroup2");
    let second = prepare();
    assert!(
        second.contains("is a bpffs") && second.contains("is a cgroup2 mount"),
        "{second}"
    );
    // Nothing of it reached this test's own namespace.
    assert_eq!(mount_of(std::process::id(), &bpffs).0, "");
    host.kill_hard();
}

/// The ids of the programs that use any of `maps` (netlb's: the TC, the
/// socket-level and the collector's programs).
fn programs_using(maps: &BTreeSet<u64>) -> BTreeSet<u64> {
    bpftool_json(&["prog", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| {
            p["map_ids"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m.as_u64())
                .any(|m| maps.contains(&m))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Whether the kernel still has map `id`.
fn map_exists(id: u64) -> bool {
    bpftool_json(&["map", "show", "id", &id.to_string()])["id"].as_u64() == Some(id)
}

/// The links of `programs`.
fn links_of(programs: &BTreeSet<u64>) -> Vec<serde_json::Value> {
    bpftool_json(&["link", "show"])
        .as_array()
        .into_iter()
        .flatten()
        .filter(|l| l["prog_id"].as_u64().is_some_and(|p| programs.contains(&p)))
        .cloned()
        .collect()
}

/// Issue 22: the documented uninstall (`netlb-agent cleanup` on every node,
/// what `deploy/uninstall` runs) after an agent that left its datapath
/// (killed: links and maps pinned, its programs attached to the pods, the
/// uplink and the node's cgroup) leaves no pin, no link and no program or
/// map of netlb's.
#[test]
fn uninstall_leaves_no_pin_link_or_program() {
    let mut c = Cluster::new(&["un-1"]);
    c.expose("un", "10.96.0.81", "TCP", (80, 9376), &["un-1"]);
    let source = AgentSource::Manifests(c.manifests.clone());
    c.start_agent_opts(
        source,
        "agent.log",
        &[],
        netlb_testbed::find_binary("netlb-agent"),
        false,
    );
    common::curl_many(&c, &c.client(), "http://10.96.0.81/", 3);
    c.agent.as_mut().expect("agent").kill_hard();
    let bpffs = c.tb.nodes[0].bpffs.clone();
    let maps: BTreeSet<u64> = walk(&bpffs)
        .iter()
        .filter(|p| p.to_string_lossy().contains("/maps/"))
        .filter_map(|p| {
            bpftool_json(&["map", "show", "pinned", &p.display().to_string()])["id"].as_u64()
        })
        .collect();
    let programs = programs_using(&maps);
    let links = links_of(&programs);
    println!(
        "before: {} maps, {} programs, {} links, {} pins",
        maps.len(),
        programs.len(),
        links.len(),
        walk(&bpffs).len()
    );
    // 4 TC programs, 4 socket-level ones, the collector's; links on the
    // pods, the uplink and the cgroup.
    assert!(maps.len() >= 16 && programs.len() >= 9 && links.len() >= 10);
    // The uninstall, as deploy/uninstall runs it: its arguments (the
    // node's directory in place of the manifest's) and its capabilities
    // (none).
    let container = common::deploy_container("uninstall/daemonset.yaml", "cleanup");
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().unwrap().to_owned())
        .collect();
    let at = args.iter().position(|a| a == "--bpffs").expect("--bpffs") + 1;
    args[at] = bpffs.display().to_string();
    let caps = common::deploy_capabilities("uninstall/daemonset.yaml", "cleanup");
    assert!(caps.is_empty(), "the uninstall adds {caps:?}");
    let setpriv = netlb_testbed::process::setpriv_args(&caps);
    let mut cleanup = netlb_testbed::process::ChildGuard::spawn(
        "cleanup",
        std::process::Command::new(&setpriv[0])
            .args(&setpriv[1..])
            .arg(netlb_testbed::find_binary("netlb-agent"))
            .args(&args)
            .stderr(std::process::Stdio::null()),
    )
    .expect("cleanup");
    let cleaned = wait_until(Duration::from_secs(10), || {
        walk(&bpffs).is_empty().then_some(())
    });
    assert!(cleaned.is_some(), "pins left: {:?}", walk(&bpffs));
    // It stays up (a Running pod: the node is clean) until terminated.
    assert!(
        cleanup.wait(Duration::from_millis(500)).is_none(),
        "cleanup --wait exited"
    );
    let status = cleanup.stop(Duration::from_secs(5));
    assert!(
        status.is_some_and(|s| s.success()),
        "cleanup did not exit cleanly on SIGTERM: {status:?}"
    );
    // The kernel frees links, programs and maps once nothing holds them.
    let gone = wait_until(Duration::from_secs(10), || {
        let maps_left = maps.iter().filter(|id| map_exists(**id)).count();
        let left = (
            programs_using(&maps).len(),
            links_of(&programs).len(),
            maps_left,
        );
        (left == (0, 0, 0)).then_some(())
    });
    assert!(
        gone.is_some(),
        "left after the uninstall: programs {:?}, links {:?}, maps {:?}",
        programs_using(&maps),
        links_of(&programs),
        maps.iter()
            .filter(|id| map_exists(**id))
            .collect::<Vec<_>>()
    );
    // Traffic to the Service is no longer translated (it dies inside the
    // topology).
    assert!(common::curl(&c.tb, &c.client(), "http://10.96.0.81/", 1).is_none());
}
