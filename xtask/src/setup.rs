//! Toolchain bootstrap, idempotent: each step checks first and does nothing
//! when its result is already there.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, bail};

use crate::cmd;

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn nightly_sysroot() -> anyhow::Result<PathBuf> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])
        .context("the nightly toolchain is required (rustc +nightly)")?;
    Ok(PathBuf::from(sysroot))
}

fn cargo_home() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cargo")
        })
}

fn components(sysroot: &std::path::Path) -> anyhow::Result<()> {
    if !sysroot.join("lib/rustlib/src/rust/library/core").exists() {
        cmd(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--installed", "--toolchain", "nightly"],
    )
    .unwrap_or_default();
    if !installed.lines().any(|l| l.starts_with("clippy")) {
        cmd(
            "rustup",
            &["component", "add", "clippy", "--toolchain", "nightly"],
        )?;
    }
    let stable = output("rustup", &["component", "list", "--installed"]).unwrap_or_default();
    for component in ["rustfmt", "clippy"] {
        if !stable.lines().any(|l| l.starts_with(component)) {
            cmd("rustup", &["component", "add", component])?;
        }
    }
    Ok(())
}

/// bpf-linker 0.13 built against the nightly's own LLVM 22: a directory
/// `D/lib` with `libLLVM.so` (and the library's own name) linking to the
/// nightly's shared LLVM, then `LLVM_PREFIX=D cargo install`. `D` stays: the
/// binary's rpath points into it.
fn bpf_linker(sysroot: &std::path::Path) -> anyhow::Result<()> {
    let prefix = cargo_home().join("netlb-llvm-22");
    let lib = prefix.join("lib");
    let llvm = std::fs::read_dir(sysroot.join("lib"))
        .context("reading the nightly sysroot")?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so."))
        })
        .context("no libLLVM.so.* in the nightly sysroot")?;
    std::fs::create_dir_all(&lib)?;
    let own_name = llvm.file_name().context("libLLVM name")?;
    for link in [lib.join("libLLVM.so"), lib.join(own_name)] {
        if std::fs::read_link(&link).ok().as_deref() != Some(llvm.as_path()) {
            let _ = std::fs::remove_file(&link);
            std::os::unix::fs::symlink(&llvm, &link)
                .with_context(|| format!("linking {}", link.display()))?;
        }
    }
    if let Some(version) = output("bpf-linker", &["--version"])
        && version.contains("0.13")
    {
        return Ok(());
    }
    eprintln!(
        "+ LLVM_PREFIX={} cargo install bpf-linker",
        prefix.display()
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "~0.13",
            "--no-default-features",
            "--features",
            "llvm-22",
            "--force",
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()
        .context("cargo install bpf-linker")?;
    if !status.success() {
        bail!("installing bpf-linker failed: {status}");
    }
    Ok(())
}

/// What a task needs installed: the demo the least, the test suite
/// everything (`cargo xtask setup` installs everything too).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Needs {
    /// `cargo xtask run`: the toolchain, the topology's and curl's tools.
    Demo,
    /// `cargo xtask image`: and buildah.
    Image,
    /// `cargo xtask bench`: and the load generators and kube-proxy's modes.
    Bench,
    /// `cargo xtask test` and `setup`: and the manifest tools.
    All,
}

/// Commands and the Debian packages that have them, by the least task that
/// needs them.
const PACKAGES: [(Needs, &str, &str); 14] = [
    (Needs::Demo, "ip", "iproute2"),
    (Needs::Demo, "tc", "iproute2"),
    (Needs::Demo, "curl", "curl"),
    (Needs::Demo, "nsenter", "util-linux"),
    (Needs::Image, "buildah", "buildah"),
    (Needs::Bench, "iperf3", "iperf3"),
    (Needs::Bench, "wrk", "wrk"),
    // The benchmark's kube-proxy modes (`cargo xtask bench`, and its quick
    // profile in the test suite): rules loaded in the node namespace, its
    // conntrack table flushed between modes.
    (Needs::Bench, "iptables-restore", "iptables"),
    (Needs::Bench, "iptables-legacy-restore", "iptables"),
    (Needs::Bench, "nft", "nftables"),
    (Needs::Bench, "conntrack", "conntrack"),
    (Needs::Bench, "bpftool", "bpftool"),
    (Needs::All, "dig", "dnsutils"),
    // kubectl renders deploy/ (its built-in kustomize).
    (Needs::All, "kubectl", "kubernetes-client"),
];

/// Debian packages `needs` runs (only as root with apt).
fn packages(needs: Needs) -> anyhow::Result<()> {
    let wanted: Vec<(&str, &str)> = PACKAGES
        .iter()
        .filter(|(least, _, _)| *least <= needs)
        .map(|(_, bin, pkg)| (*bin, *pkg))
        .collect();
    let mut missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| output("sh", &["-c", &format!("command -v {bin}")]).is_none())
        .map(|(_, pkg)| *pkg)
        .collect();
    missing.dedup();
    if missing.is_empty() {
        return Ok(());
    }
    if output("sh", &["-c", "command -v apt-get"]).is_none() {
        bail!("missing commands; install the packages {missing:?}");
    }
    cmd("apt-get", &["update", "-q"])?;
    let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
    args.extend(&missing);
    let status = Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()?;
    if !status.success() {
        bail!("apt-get install {missing:?} failed");
    }
    Ok(())
}

/// Versions of the manifest tools (PyPI) the deploy tests run.
const PY_TOOLS: [&str; 2] = ["kubernetes-validate==1.37.0", "checkov==3.3.30"];

/// A Python venv under `target/tools/venv` with the manifest validator and
/// the security linter.
fn python_tools() -> anyhow::Result<()> {
    let venv = crate::root().join("target/tools/venv");
    let bin = venv.join("bin");
    if bin.join("kubernetes-validate").exists() && bin.join("checkov").exists() {
        return Ok(());
    }
    if output("python3", &["-m", "venv", "--help"]).is_none() {
        // Debian's python3 has venv in a package of its own.
        cmd("apt-get", &["install", "-y", "-q", "python3-venv"])?;
    }
    cmd(
        "python3",
        &["-m", "venv", venv.to_str().context("venv path")?],
    )?;
    let pip = bin.join("pip");
    let mut args = vec!["install", "-q", "--disable-pip-version-check"];
    args.extend(PY_TOOLS);
    cmd(pip.to_str().context("pip path")?, &args)
}

pub fn setup(needs: Needs) -> anyhow::Result<()> {
    let started = Instant::now();
    packages(needs)?;
    if needs == Needs::All {
        python_tools()?;
    }
    let sysroot = nightly_sysroot()?;
    components(&sysroot)?;
    bpf_linker(&sysroot)?;
    eprintln!("xtask setup: toolchain ready in {:.1?}", started.elapsed());
    Ok(())
}
