//! Project tasks: `cargo xtask setup | run | test | bench | image | structure`.

mod image;
mod run;
mod setup;
mod structure;

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
    /// Benchmarks (figures, no assertions). Without a name: netlb beside
    /// the direct pod IP and kube-proxy's iptables and nftables modes
    /// (profiles: `--quick`, default, `--full`; further arguments after
    /// `--`, e.g. `-- --services 1,1000 --rounds 2`); `all` runs every bench.
    Bench {
        #[arg(value_enum)]
        which: Option<BenchKind>,
        /// The comparison's CI profile: a tiny sweep.
        #[arg(long, conflicts_with = "full")]
        quick: bool,
        /// The comparison with 100k Services and more rounds.
        #[arg(long)]
        full: bool,
        /// Arguments for the comparison (`--services`, `--endpoints`,
        /// `--rounds`, `--iptables-backend`, `--out`).
        #[arg(last = true)]
        rest: Vec<String>,
    },
    /// The agent's container image (FROM scratch, buildah, an OCI archive).
    Image(image::ImageArgs),
    /// The code's shape: the longest non-test functions, and the
    /// dependencies and cycles between the agent's top-level modules.
    Structure {
        /// How many functions to list.
        #[arg(long, default_value_t = 15)]
        most: usize,
        /// Another checkout to measure (e.g. an earlier commit's).
        #[arg(long)]
        root: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum BenchKind {
    /// netlb, direct, kube-proxy iptables and nftables side by side (the
    /// default).
    Compare,
    /// Every bench below, and the comparison.
    All,
    /// Per-packet cost of the programs (BPF_PROG_TEST_RUN), before/after.
    Datapath,
    /// Connection rates and throughput through a node, against kube-proxy.
    NorthSouth,
    /// Time to programmed, programming latency, RSS and CPU at 1k-100k
    /// Services against the API-server double.
    ControlPlane,
    /// The socket-level program's cost per connect (kernel BPF stats):
    /// pods with the agent running and away, host processes; against
    /// v0.1.0 when it can be built.
    SocketLb,
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

/// The previous release, whose running agent and pins the upgrade test
/// replaces: its tag, and the commit the tag names (for a clone without
/// tags).
const PREVIOUS_RELEASE: (&str, &str) = ("v0.1.0", "bd2564338a187cac386e96b1a78977b3d459e58f");

/// Builds the previous release's agent from git into
/// `target/<release>/` (once; its own target directory, so that this
/// workspace's build stays as it is) and returns the binary.
fn build_previous_release() -> anyhow::Result<PathBuf> {
    let (tag, commit) = PREVIOUS_RELEASE;
    let dir = root().join("target").join(tag);
    let binary = dir.join("target/debug/netlb-agent");
    let src = dir.join("src");
    if !src.join("Cargo.toml").exists() {
        let tagged = Command::new("git")
            .args(["rev-parse", "--verify", "--quiet"])
            .arg(format!("{tag}^{{commit}}"))
            .current_dir(root())
            .output()
            .context("running git")?;
        let rev = if tagged.status.success() { tag } else { commit };
        std::fs::create_dir_all(&src)?;
        eprintln!("+ git archive {rev} | tar -x -C {}", src.display());
        let archive = Command::new("git")
            .args(["archive", "--format=tar", rev])
            .current_dir(root())
            .output()
            .context("running git archive")?;
        if !archive.status.success() {
            bail!(
                "cannot read {tag} ({commit}) from git: {}",
                String::from_utf8_lossy(&archive.stderr)
            );
        }
        let mut tar = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(&src)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .context("running tar")?;
        std::io::Write::write_all(tar.stdin.as_mut().context("tar's stdin")?, &archive.stdout)?;
        if !tar.wait()?.success() {
            bail!("unpacking {tag} failed");
        }
    }
    eprintln!("+ cargo build -p netlb-agent --bins (in {})", src.display());
    let status = Command::new("cargo")
        .args(["build", "-p", "netlb-agent", "--bins"])
        .env("CARGO_TARGET_DIR", dir.join("target"))
        .current_dir(&src)
        .status()
        .context("building the previous release")?;
    if !status.success() || !binary.exists() {
        bail!("building {tag}'s agent failed: {status}");
    }
    Ok(binary)
}

fn test() -> anyhow::Result<()> {
    let started = Instant::now();
    setup::setup(setup::Needs::All)?;
    require_root("test")?;
    netlb_testbed::topology::cleanup_stale(None);
    cmd("cargo", &["build", "--workspace", "--bins"])?;
    let previous = build_previous_release()?;
    // SAFETY: single-threaded here; the variable is read by the test
    // processes started below.
    unsafe { std::env::set_var("NETLB_PREVIOUS_AGENT", &previous) };
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

fn bench(which: Option<BenchKind>, quick: bool, full: bool, rest: &[String]) -> anyhow::Result<()> {
    setup::setup(setup::Needs::Bench)?;
    require_root("bench")?;
    let which = which.unwrap_or(BenchKind::Compare);
    if matches!(which, BenchKind::Compare | BenchKind::All) {
        compare(quick, full, rest)?;
        if which == BenchKind::Compare {
            return Ok(());
        }
    }
    let wanted = |kind: BenchKind| which == BenchKind::All || which == kind;
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
        (BenchKind::SocketLb, "socket_lb"),
    ] {
        if !wanted(kind) {
            continue;
        }
        build_release_bins()?;
        if kind == BenchKind::SocketLb {
            // v0.1.0's agent beside this one, when it can be built.
            match build_previous_release() {
                // SAFETY: single-threaded here; read by the bench process.
                Ok(previous) => unsafe { std::env::set_var("NETLB_PREVIOUS_AGENT", &previous) },
                Err(e) => eprintln!("without v0.1.0: {e:#}"),
            }
        }
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

/// The comparison: the topology bench writes its files, then netlb's
/// per-packet cost (the datapath bench) is added to its summary.
fn compare(quick: bool, full: bool, rest: &[String]) -> anyhow::Result<()> {
    build_release_bins()?;
    let profile = if quick {
        "quick"
    } else if full {
        "full"
    } else {
        "default"
    };
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut rest = rest.to_vec();
    let out = match rest.iter().position(|a| a == "--out") {
        Some(i) if i + 1 < rest.len() => PathBuf::from(&rest[i + 1]),
        _ => {
            let out = root().join(format!("target/bench/compare-{profile}-{stamp}"));
            rest.extend(["--out".to_owned(), out.display().to_string()]);
            out
        }
    };
    let mut args = vec![
        "bench",
        "-p",
        "netlb-testbed",
        "--features",
        "privileged-tests",
        "--bench",
        "compare",
        "--",
    ];
    if quick {
        args.push("--quick");
    }
    if full {
        args.push("--full");
    }
    args.extend(rest.iter().map(String::as_str));
    cmd("cargo", &args)?;
    eprintln!("+ cargo bench -p netlb-agent --features privileged-tests --bench datapath");
    let datapath = Command::new("cargo")
        .args([
            "bench",
            "-p",
            "netlb-agent",
            "--features",
            "privileged-tests",
            "--bench",
            "datapath",
        ])
        .current_dir(root())
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running the datapath bench")?;
    if !datapath.status.success() {
        bail!("the datapath bench failed: {}", datapath.status);
    }
    let text = String::from_utf8_lossy(&datapath.stdout);
    std::fs::write(out.join("datapath.txt"), text.as_bytes())?;
    let figures: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("first packet"))
        .collect();
    let summary = out.join("summary.md");
    let mut md = std::fs::read_to_string(&summary).context("reading summary.md")?;
    md.push_str("\nnetlb per packet (`BPF_PROG_TEST_RUN` medians, from pod program; `cargo bench -p netlb-agent --features privileged-tests --bench datapath`, same run):\n\n```\n");
    for l in figures {
        md.push_str(l.trim());
        md.push('\n');
    }
    md.push_str("```\n");
    std::fs::write(&summary, &md)?;
    println!("{md}\nfiles: {}", out.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Task::Setup => setup::setup(setup::Needs::All),
        Task::Run(args) => {
            setup::setup(setup::Needs::Demo)?;
            require_root("run")?;
            run::run(args)
        }
        Task::Test => test(),
        Task::Bench {
            which,
            quick,
            full,
            rest,
        } => bench(which, quick, full, &rest),
        Task::Structure { most, root } => structure::structure(most, root),
        Task::Image(args) => {
            setup::setup(setup::Needs::Image)?;
            require_root("image")?;
            image::image(args)
        }
    }
}
