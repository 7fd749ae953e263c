//! The real netlb-agent as a child process of a test.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use crate::{
    find_binary,
    process::{ChildGuard, ProcessError},
    topology::Node,
};

/// How the agent gets its objects.
#[derive(Clone, Debug)]
pub enum AgentSource {
    Manifests(PathBuf),
    Kubeconfig(PathBuf),
    /// An API server given by `--master` alone (no kubeconfig).
    Master(String),
}

#[derive(Clone, Debug)]
pub struct AgentOptions {
    pub binary: PathBuf,
    pub source: AgentSource,
    pub extra_args: Vec<String>,
    /// Remove pins on a clean exit (tests); a SIGKILLed agent leaves them.
    pub cleanup_on_exit: bool,
    /// Capabilities to keep (e.g. `["bpf", "net_admin"]`): the agent then
    /// starts in the node's namespace through `nsenter` and `setpriv` with
    /// only these in its bounding set (as a container granted exactly
    /// them), instead of entering the namespace itself (`--netns`, which
    /// needs SYS_ADMIN). `None`: all of root's.
    pub capabilities: Option<Vec<String>>,
    /// A command the agent runs under (e.g. `unshare` with a read-only
    /// mount); empty: none.
    pub wrapper: Vec<String>,
}

pub struct AgentProcess {
    child: ChildGuard,
    log: PathBuf,
    pub node: Node,
}

impl AgentProcess {
    /// Starts the agent for `node` (it enters the node's namespace itself:
    /// `ip netns exec` would remount /sys and hide /sys/fs/bpf).
    pub fn start(node: &Node, opts: &AgentOptions, log: &Path) -> Result<Self, ProcessError> {
        let mut cmd = match &opts.capabilities {
            None if !opts.wrapper.is_empty() => {
                let mut cmd = Command::new(&opts.wrapper[0]);
                cmd.args(&opts.wrapper[1..])
                    .arg(&opts.binary)
                    .arg("run")
                    .arg("--netns")
                    .arg(node.netns_path());
                cmd
            }
            None => {
                let mut cmd = Command::new(&opts.binary);
                cmd.arg("run").arg("--netns").arg(node.netns_path());
                cmd
            }
            Some(caps) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", node.netns_path().display()))
                    .arg("--")
                    .args(crate::process::setpriv_args(caps))
                    .arg(&opts.binary)
                    .arg("run");
                cmd
            }
        };
        cmd.arg("--bpffs")
            .arg(&node.bpffs)
            .args(["--pod-iface", "veth*"])
            .args(["--netdev", "uplink0"])
            .args(["--hostname-override", &format!("node{}", node.index)])
            .args(["--min-sync-interval-ms", "10"]);
        // Socket-level load balancing on the node's own test cgroup, never
        // the machine's root cgroup (unless the test gives another root
        // to see it refused).
        if !opts.extra_args.iter().any(|a| a == "--cgroup-root") {
            cmd.arg("--cgroup-root").arg(&node.cgroup);
        }
        match &opts.source {
            AgentSource::Manifests(dir) => cmd.arg("--manifests").arg(dir),
            AgentSource::Kubeconfig(file) => cmd.arg("--kubeconfig").arg(file),
            AgentSource::Master(url) => cmd.arg("--master").arg(url),
        };
        if opts.cleanup_on_exit {
            cmd.arg("--cleanup-on-exit");
        }
        cmd.args(&opts.extra_args);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|source| ProcessError::Spawn {
                command: log.display().to_string(),
                source,
            })?;
        let err = file.try_clone().map_err(|source| ProcessError::Spawn {
            command: log.display().to_string(),
            source,
        })?;
        cmd.stdout(file)
            .stderr(err)
            .env(
                "RUST_LOG",
                std::env::var("NETLB_AGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env_remove("RUST_BACKTRACE")
            // The agent must not find a kubeconfig of this machine's.
            .env_remove("KUBECONFIG");
        let child = ChildGuard::spawn(&format!("netlb-agent node{}", node.index), &mut cmd)?;
        Ok(Self {
            child,
            log: log.to_owned(),
            node: node.clone(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle` `count` times.
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().matches(needle).count() >= count {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    /// Waits for the agent to exit by itself (a refusal to start).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.child.wait(timeout)
    }

    /// SIGSTOP: the agent is frozen (an OOM-thrashing or stuck agent, a
    /// paused container) until [`resume`](Self::resume).
    pub fn pause(&self) {
        self.child.pause();
    }

    pub fn resume(&self) {
        self.child.resume();
    }

    /// SIGKILL: no cleanup, pins and links stay.
    pub fn kill_hard(&mut self) {
        self.child.kill_hard();
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) -> Option<std::process::ExitStatus> {
        self.child.stop(Duration::from_secs(10))
    }
}

/// `bpftool -j ARGS` as JSON (`Null` when it printed none).
pub fn bpftool_json(args: &[&str]) -> serde_json::Value {
    let out = Command::new("bpftool")
        .arg("-j")
        .args(args)
        .output()
        .expect("bpftool");
    serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null)
}

/// `netlb-agent list WHAT -o json` for the maps pinned in `bpffs`; the
/// command's error output when it fails.
pub fn list_json(bpffs: &Path, what: &str) -> Result<serde_json::Value, String> {
    let out = Command::new(find_binary("netlb-agent"))
        .args(["list", what, "-o", "json", "--bpffs"])
        .arg(bpffs)
        .output()
        .map_err(|e| format!("netlb-agent list: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("list json: {e}"))
}

/// A datapath counter by name (`list stats`) of the maps pinned in `bpffs`.
pub fn datapath_counter(bpffs: &Path, name: &str) -> Option<u64> {
    list_json(bpffs, "stats")
        .ok()?
        .as_array()?
        .iter()
        .find(|r| r["counter"] == name)
        .and_then(|r| r["value"].as_u64())
}
