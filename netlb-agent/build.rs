//! Compiles netlb-ebpf for the BPF target (with the nightly toolchain, via
//! aya-build) so that `loader` can embed the object with
//! `include_bytes_aligned!`. No hand-run pre-build step.
//!
//! aya-build hands every line of the nested build to cargo as a warning
//! (about fifty `Compiling ...` lines on a first build), which would hide
//! the real ones: its output is captured, and the nested build's progress
//! lines are shown only when it fails. Its compiler diagnostics and every
//! other instruction to cargo pass through.

use std::{
    fs::File,
    io::Write as _,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "netlb-ebpf")
        .ok_or_else(|| anyhow!("netlb-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("netlb-ebpf manifest has no parent"))?;
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").context("OUT_DIR")?);
    let log = out_dir.join("aya-build.out");
    let result = with_stdout_to(&log, || {
        aya_build::build_ebpf(
            [Package {
                name: ebpf.name.as_str(),
                root_dir: root_dir.as_str(),
                ..Default::default()
            }],
            Toolchain::default(),
        )
    })?;
    let captured = std::fs::read_to_string(&log).unwrap_or_default();
    for line in captured.lines() {
        let progress = line.strip_prefix("cargo:warning=").is_some_and(is_progress);
        if !progress || result.is_err() {
            println!("{line}");
        }
    }
    result
}

/// A status line of the nested cargo (not a diagnostic).
fn is_progress(line: &str) -> bool {
    const STATUS: [&str; 11] = [
        "Compiling",
        "Finished",
        "Fresh",
        "Blocking",
        "Updating",
        "Locking",
        "Downloading",
        "Downloaded",
        "Adding",
        "Checking",
        "Running",
    ];
    let word = line.split_whitespace().next().unwrap_or("");
    STATUS.contains(&word)
}

/// Runs `f` with this process's standard output going to `path`.
fn with_stdout_to<T>(path: &Path, f: impl FnOnce() -> T) -> anyhow::Result<T> {
    let file = File::create(path).with_context(|| path.display().to_string())?;
    std::io::stdout().flush()?;
    // SAFETY: dup/dup2 on descriptors this process owns; standard output
    // is restored below before anything else is printed.
    let saved = unsafe { libc::dup(1) };
    if saved < 0 || unsafe { libc::dup2(file.as_raw_fd(), 1) } < 0 {
        return Err(std::io::Error::last_os_error()).context("redirecting stdout");
    }
    let out = f();
    std::io::stdout().flush()?;
    // SAFETY: as above.
    unsafe {
        libc::dup2(saved, 1);
        libc::close(saved);
    }
    Ok(out)
}
