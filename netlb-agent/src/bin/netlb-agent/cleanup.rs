//! `netlb-agent cleanup`: what kube-proxy's `--cleanup` is to it.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use netlb_agent::datapath::loader;

/// Detach the programs and remove the pinned maps of an instance.
#[derive(clap::Args)]
pub struct CleanupArgs {
    #[arg(long, default_value = "/sys/fs/bpf/netlb")]
    bpffs: PathBuf,
    /// Then wait for SIGTERM (the uninstall DaemonSet's container: its
    /// pods stay Running once their node is clean).
    #[arg(long)]
    wait: bool,
}

impl CleanupArgs {
    pub fn run(self) -> anyhow::Result<()> {
        loader::remove_pins(&self.bpffs)?;
        log::info!(
            "removed {} and everything pinned in it",
            self.bpffs.display()
        );
        if self.wait {
            let term = Arc::new(AtomicBool::new(false));
            for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
                signal_hook::flag::register(signal, Arc::clone(&term))?;
            }
            while !term.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }
}
