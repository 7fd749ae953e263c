//! `netlb-agent prepare-node`: the DaemonSet's init container.

use std::path::PathBuf;

/// Prepare the node for the agent (the DaemonSet's init container): in
/// the host's mount namespace, a bpffs on `--bpffs` with shared
/// propagation (so that the agent's mount of it propagates, even on hosts
/// that mount it private or not at all) and a cgroup2 mount on `--cgroup2`
/// (the cgroup2 hierarchy alone, for the agent to mount read-only, on hosts
/// with the unified or the hybrid layout).
#[derive(clap::Args)]
pub struct PrepareNodeArgs {
    /// The host's mount namespace (the init container mounts the host's
    /// /proc read-only on /hostproc).
    #[arg(long, default_value = "/hostproc/1/ns/mnt")]
    host_mount_ns: PathBuf,
    #[arg(long, default_value = "/sys/fs/bpf")]
    bpffs: PathBuf,
    #[arg(long, default_value = "/run/netlb/cgroupv2")]
    cgroup2: PathBuf,
}

impl PrepareNodeArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let done = netlb_agent::cli::prepare_node::prepare(
            &self.host_mount_ns,
            &self.bpffs,
            &self.cgroup2,
        )?;
        for line in done {
            log::info!("{line}");
        }
        Ok(())
    }
}
