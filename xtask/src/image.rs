//! `cargo xtask image`: the agent's container image, built here without any
//! registry: `FROM scratch` with the binary and exactly the shared
//! libraries `ldd` says it loads (the eBPF object is embedded in the
//! binary), built with buildah (vfs storage, chroot isolation, a storage
//! directory of its own that is removed afterwards) and exported as an OCI
//! archive, which `ctr -n k8s.io images import` or `podman load` takes on a
//! node.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::{cmd, root};

#[derive(clap::Args)]
pub struct ImageArgs {
    /// The agent binary to package (default: a fresh release build).
    #[arg(long)]
    pub binary: Option<PathBuf>,
    /// Where to write the OCI archive.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// The agent's version, as the binary itself reports it
/// (`netlb-agent 0.2.0`).
fn agent_version(binary: &Path) -> anyhow::Result<String> {
    let out = Command::new(binary)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", binary.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .nth(1)
        .map(str::to_owned)
        .with_context(|| format!("unexpected --version output {text:?}"))
}

/// The shared libraries a binary loads, from `ldd` (absolute paths; the
/// vDSO has none).
fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        // "not a dynamic executable": nothing to copy.
        return Ok(Vec::new());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, target)) => target.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect())
}

/// buildah with this build's own storage.
struct Buildah {
    storage: PathBuf,
}

impl Buildah {
    fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new("buildah")
            .arg("--root")
            .arg(self.storage.join("root"))
            .arg("--runroot")
            .arg(self.storage.join("runroot"))
            .args(["--storage-driver", "vfs"])
            .args(args)
            .output()
            .with_context(|| format!("running buildah {}", args.join(" ")))?;
        if !out.status.success() {
            bail!(
                "buildah {} failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Buildah {
    fn drop(&mut self) {
        let _ = self.run(&["rm", "--all"]);
        let _ = self.run(&["rmi", "--all", "--force"]);
        // vfs layers are plain directories.
        let _ = std::fs::remove_dir_all(&self.storage);
    }
}

/// Builds the image from `binary`, writes it to `output`, then starts the
/// binary inside it (`buildah run`) and returns what `--version` printed.
pub fn build(binary: &Path, output: &Path) -> anyhow::Result<String> {
    let staging = root().join("target/image/rootfs");
    let _ = std::fs::remove_dir_all(&staging);
    let bin_dir = staging.join("usr/local/bin");
    std::fs::create_dir_all(&bin_dir)?;
    std::fs::copy(binary, bin_dir.join("netlb-agent"))
        .with_context(|| format!("copying {}", binary.display()))?;
    let libraries = shared_libraries(binary)?;
    for lib in &libraries {
        // The real file under the name the loader looks for.
        let target = staging.join(lib.strip_prefix("/").unwrap_or(lib));
        std::fs::create_dir_all(target.parent().context("library directory")?)?;
        std::fs::copy(lib, &target).with_context(|| format!("copying {}", lib.display()))?;
    }
    let buildah = Buildah {
        storage: root().join("target/image/storage"),
    };
    let container = buildah.run(&["from", "scratch"])?;
    buildah.run(&["copy", &container, staging.to_str().context("path")?, "/"])?;
    buildah.run(&[
        "config",
        "--entrypoint",
        r#"["/usr/local/bin/netlb-agent"]"#,
        "--cmd",
        "run",
        "--label",
        "org.opencontainers.image.title=netlb-agent",
        &container,
    ])?;
    // The name `deploy/base/daemonset.yaml` refers to.
    let name = format!("localhost/netlb-agent:{}", agent_version(binary)?);
    buildah.run(&["commit", "--rm", &container, &name])?;
    if let Some(dir) = output.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(output);
    buildah.run(&[
        "push",
        &name,
        &format!("oci-archive:{}:{name}", output.display()),
    ])?;
    // The binary inside the image starts, with only what the image holds.
    let check = buildah.run(&["from", &name])?;
    let version = buildah.run(&[
        "run",
        "--isolation",
        "chroot",
        &check,
        "--",
        "/usr/local/bin/netlb-agent",
        "--version",
    ])?;
    let _ = std::fs::remove_dir_all(&staging);
    eprintln!(
        "image {name}: {} ({} shared libraries) -> {} ({:.1} MiB)",
        binary.display(),
        libraries.len(),
        output.display(),
        std::fs::metadata(output)?.len() as f64 / (1 << 20) as f64
    );
    Ok(version)
}

pub fn image(args: ImageArgs) -> anyhow::Result<()> {
    let binary = match args.binary {
        Some(binary) => binary,
        None => {
            cmd("cargo", &["build", "--release", "-p", "netlb-agent"])?;
            root().join("target/release/netlb-agent")
        }
    };
    let output = match args.output {
        Some(output) => output,
        None => root().join(format!(
            "target/image/netlb-agent-{}.oci.tar",
            agent_version(&binary)?
        )),
    };
    let version = build(&binary, &output)?;
    println!("{version}");
    println!(
        "load it on a node with `ctr -n k8s.io images import {}` (containerd) or `podman load -i {}`",
        output.display(),
        output.display()
    );
    Ok(())
}
