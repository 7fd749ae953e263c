//! Test infrastructure shared by netlb's tests, `cargo xtask run` and the
//! benchmarks: hermetic network-namespace topologies ([`topology`]), the real
//! agent as a child process ([`agent`]), an API-server test double
//! ([`apiserver`]) and the manifests they feed it ([`manifests`]). Everything created is named with a per-run prefix and
//! removed on drop, also when a test fails.

pub mod agent;
pub mod apiserver;
pub mod compare;
pub mod load;
pub mod manifests;
pub mod process;
pub mod realistic;
pub mod topology;

use std::path::PathBuf;

/// A binary built by this workspace, next to the running executable's
/// target directory (`target/<profile>/`, skipping `deps/`).
pub fn find_binary(name: &str) -> PathBuf {
    // Another build of the agent (an earlier release, to compare).
    if name == "netlb-agent"
        && let Some(path) = std::env::var_os("NETLB_TEST_AGENT")
    {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let candidate = dir.join(name);
    if candidate.exists() {
        return candidate;
    }
    // Fall back to the other profile.
    let target = dir.parent().map(PathBuf::from).unwrap_or_default();
    for profile in ["debug", "release"] {
        let p = target.join(profile).join(name);
        if p.exists() {
            return p;
        }
    }
    candidate
}
