//! Project tasks: `cargo xtask setup | run | test | bench`.

mod image;
mod run;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "netlb project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what building and testing need (idempotent): nightly
    /// rust-src, bpf-linker against the nightly's LLVM, Debian packages.
    Setup,
    /// Demo on this machine, no cluster needed: a node and pods in network
    /// namespaces, the Kubernetes docs' `my-service`, the agent, live counters.
    Run(run::RunArgs),
    /// The whole test suite: unit tests, BPF_PROG_TEST_RUN datapath tests,
    /// network-namespace end-to-end tests.
    Test,
    /// Benchmarks (figures, no assertions): all, or the one named.
    Bench {
        #[arg(value_enum)]
        which: Option<BenchKind>,
    },
    /// The agent's container image (FROM scratch, buildah, an OCI archive).
    Image(image::ImageArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchKind {
    /// Per-packet cost of the programs (BPF_PROG_TEST_RUN), before/after.
    Datapath,
    /// Connection rates and throughput through a node, against kube-proxy.
    NorthSouth,
    /// Time to programmed, programming latency, RSS and CPU at 1k-100k
    /// Services against the API-server double.
    ControlPlane,
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Runs a command in the workspace root, failing on a non-zero exit.
/// Builds the agent and the test binaries (`netlb-echo`) in release mode,
/// where the demo and the topology benches look for them.
pub fn build_release_bins() -> anyhow::Result<()> {
    cmd(
        "cargo",
        &[
            "build",
            "--release",
            "-p",
            "netlb-agent",
            "-p",
            "netlb-testbed",
            "--bins",
        ],
    )
}

pub fn cmd(program: &str, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("+ {program} {}", args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed: {status}", args.join(" "));
    }
    Ok(())
}

fn require_root(task: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("`cargo xtask {task}` needs root (BPF, TC and network namespaces)");
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    let started = Instant::now();
    setup::setup()?;
    require_root("test")?;
    netlb_testbed::topology::cleanup_stale(None);
    cmd("cargo", &["build", "--workspace", "--bins"])?;
    // Unprivileged: unit tests of every crate.
    cmd("cargo", &["test", "--workspace"])?;
    // Privileged: datapath (BPF_PROG_TEST_RUN) and namespace tests, one at a
    // time (they load programs and create namespaces).
    cmd(
        "cargo",
        &[
            "test",
            "-p",
            "netlb-agent",
            "-p",
            "netlb-testbed",
            "--features",
            "netlb-agent/privileged-tests,netlb-testbed/privileged-tests",
            "--tests",
            "--",
            "--test-threads=1",
        ],
    )?;
    // The image builds and the binary inside it starts (the debug binary:
    // the same libraries as a release one, without a second build).
    let version = image::build(
        &root().join("target/debug/netlb-agent"),
        &root().join("target/image/test.oci.tar"),
    )?;
    if !version.starts_with("netlb-agent ") {
        bail!("the binary in the image printed {version:?}");
    }
    eprintln!("image check: the binary in the image printed {version:?}");
    eprintln!("xtask test: all suites passed in {:.0?}", started.elapsed());
    Ok(())
}

fn bench(which: Option<BenchKind>) -> anyhow::Result<()> {
    setup::setup()?;
    require_root("bench")?;
    let wanted = |kind: BenchKind| which.is_none_or(|w| w == kind);
    if wanted(BenchKind::Datapath) {
        cmd(
            "cargo",
            &[
                "bench",
                "-p",
                "netlb-agent",
                "--features",
                "privileged-tests",
                "--bench",
                "datapath",
            ],
        )?;
    }
    if wanted(BenchKind::ControlPlane) {
        // The syncer alone against the in-memory dataplane: phases and the
        // one-Service-of-10,000-endpoints case.
        cmd("cargo", &["bench", "-p", "netlb-agent", "--bench", "sync"])?;
    }
    // The topology benches find the agent and echo binaries next to them.
    for (kind, name) in [
        (BenchKind::NorthSouth, "north_south"),
        (BenchKind::ControlPlane, "control_plane"),
    ] {
        if !wanted(kind) {
            continue;
        }
        build_release_bins()?;
        cmd(
            "cargo",
            &[
                "bench",
                "-p",
                "netlb-testbed",
                "--features",
                "privileged-tests",
                "--bench",
                name,
            ],
        )?;
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Run(args) => {
            setup::setup()?;
            require_root("run")?;
            run::run(args)
        }
        Task::Test => test(),
        Task::Bench { which } => bench(which),
        Task::Image(args) => {
            setup::setup()?;
            require_root("image")?;
            image::image(args)
        }
    }
}
