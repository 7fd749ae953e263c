//! What `deploy/` promises (issue 9): the agent works with exactly the
//! capabilities the least-privilege overlay grants; every rendered manifest
//! validates against the Kubernetes v1.36 schemas; the security linter's
//! findings are fixed or explained in the manifest. Needs root and the
//! tools `cargo xtask setup` installs; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod common;

use std::{path::PathBuf, process::Command, time::Duration};

use common::{Cluster, curl_many, stat};
use netlb_testbed::{
    agent::{AgentOptions, AgentProcess, AgentSource},
    find_binary,
};

/// The capabilities `deploy/overlays/capabilities` adds, read from the
/// overlay itself so the two cannot drift apart.
fn overlay_capabilities() -> Vec<String> {
    let path = workspace().join("deploy/overlays/capabilities/daemonset-capabilities.yaml");
    let text = std::fs::read_to_string(&path).expect("overlay");
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).expect("yaml");
    doc["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"]
        .as_sequence()
        .expect("capabilities.add")
        .iter()
        .map(|c| c.as_str().unwrap().to_ascii_lowercase())
        .collect()
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The agent started with exactly the overlay's capabilities (its bounding
/// set holds nothing else, as in a container granted only these) attaches,
/// programs and serves pods, the uplink and host processes.
#[test]
fn the_agent_runs_with_exactly_the_overlays_capabilities() {
    let caps = overlay_capabilities();
    let mut c = Cluster::new(&["caps-1"]);
    c.expose("caps", "10.96.0.42", "TCP", (80, 9376), &["caps-1"]);
    let agent = AgentProcess::start(
        &c.tb.nodes[0],
        &AgentOptions {
            binary: find_binary("netlb-agent"),
            source: AgentSource::Manifests(c.manifests.clone()),
            extra_args: vec![],
            cleanup_on_exit: true,
            capabilities: Some(caps.clone()),
            wrapper: Vec::new(),
        },
        &c.tb.dir.join("agent-caps.log"),
    )
    .expect("agent");
    assert!(
        agent.wait_for_log("initial sync complete", 1, Duration::from_secs(20)),
        "agent with {caps:?} did not sync:\n{}",
        agent.log()
    );
    c.agent = Some(agent);
    let status =
        std::fs::read_to_string(format!("/proc/{}/status", c.agent.as_ref().unwrap().pid()))
            .unwrap_or_default();
    println!(
        "agent capabilities: {}",
        status
            .lines()
            .filter(|l| l.starts_with("Cap"))
            .collect::<Vec<_>>()
            .join("; ")
    );
    let lines = curl_many(&c, &c.client(), "http://10.96.0.42/", 5);
    assert!(lines.iter().all(|(name, _)| name == "caps-1"));
    let out =
        c.tb.exec_host(0, &["curl", "-sS", "-m", "3", "http://10.96.0.42/"])
            .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stat(&c, 0, "sock_lb") >= 1);
}

/// The venv `cargo xtask setup` fills with the manifest tools.
fn tool(name: &str) -> PathBuf {
    let path = workspace().join("target/tools/venv/bin").join(name);
    assert!(
        path.exists(),
        "{} missing: run `cargo xtask setup`",
        path.display()
    );
    path
}

fn render(kustomization: &str) -> String {
    let out = Command::new("kubectl")
        .args(["kustomize", kustomization])
        .current_dir(workspace())
        .output()
        .expect("kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize {kustomization}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

const KUSTOMIZATIONS: [&str; 3] = [
    "deploy/base",
    "deploy/overlays/capabilities",
    "deploy/overlays/api-server",
];

#[test]
fn every_manifest_validates_against_the_kubernetes_1_36_schemas() {
    let dir = tempdir();
    for k in KUSTOMIZATIONS {
        let file = dir.join(format!("{}.yaml", k.replace('/', "_")));
        std::fs::write(&file, render(k)).unwrap();
        let out = Command::new(tool("kubernetes-validate"))
            .args(["-k", "1.36.0", "--strict"])
            .arg(&file)
            .output()
            .expect("kubernetes-validate");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{k}:\n{text}");
        assert!(
            text.contains("daemonset/netlb"),
            "{k}: the DaemonSet was not validated:\n{text}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_security_linter_finds_nothing_unexplained() {
    let dir = tempdir();
    for k in KUSTOMIZATIONS {
        let file = dir.join(format!("{}.yaml", k.replace('/', "_")));
        std::fs::write(&file, render(k)).unwrap();
        let out = Command::new(tool("checkov"))
            .args([
                "--framework",
                "kubernetes",
                "--skip-download",
                "-o",
                "json",
                "-f",
            ])
            .arg(&file)
            .env("BC_SKIP_MAPPING", "TRUE")
            .output()
            .expect("checkov");
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "{k}: checkov output: {e}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        let results = &report["results"];
        let failed = results["failed_checks"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let failed: Vec<String> = failed
            .iter()
            .map(|c| format!("{} {}", c["check_id"], c["check_name"]))
            .collect();
        assert!(failed.is_empty(), "{k}: unexplained findings: {failed:#?}");
        for skipped in results["skipped_checks"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let reason = skipped["check_result"]["suppress_comment"]
                .as_str()
                .unwrap_or("");
            assert!(
                reason.len() > 10,
                "{k}: {} skipped without a reason",
                skipped["check_id"]
            );
        }
        let passed = results["passed_checks"]
            .as_array()
            .map(Vec::len)
            .unwrap_or(0);
        assert!(passed > 50, "{k}: only {passed} checks ran");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir() -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("nlb-{}-deploy", netlb_testbed::topology::run_id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
