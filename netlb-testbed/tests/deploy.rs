//! What `deploy/` promises (issue 9): the agent works with exactly the
//! capabilities the least-privilege overlay grants; every rendered manifest
//! validates against the Kubernetes v1.36 schemas; the security linter's
//! findings are fixed or explained in the manifest. Needs root and the
//! tools `cargo xtask setup` installs; run through `cargo xtask test`.
#![cfg(feature = "privileged-tests")]

mod common;

use std::{path::PathBuf, process::Command, time::Duration};

use common::{Cluster, curl_many, stat, workspace};
use netlb_testbed::{
    agent::{AgentOptions, AgentProcess, AgentSource},
    find_binary,
};

/// The capabilities `deploy/components/capabilities` gives the agent,
/// read from the component itself so the two cannot drift apart.
fn overlay_capabilities() -> Vec<String> {
    common::deploy_capabilities(
        "components/capabilities/daemonset-capabilities.yaml",
        "agent",
    )
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

const KUSTOMIZATIONS: [&str; 5] = [
    "deploy/base",
    "deploy/overlays/capabilities",
    "deploy/overlays/api-server",
    "deploy/examples/production",
    "deploy/uninstall",
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

/// The objects of a rendered kustomization.
fn objects(rendered: &str) -> Vec<serde_json::Value> {
    serde_saphyr::from_multiple(rendered).expect("yaml")
}

fn object<'a>(objects: &'a [serde_json::Value], kind: &str, name: &str) -> &'a serde_json::Value {
    objects
        .iter()
        .find(|o| o["kind"].as_str() == Some(kind) && o["metadata"]["name"].as_str() == Some(name))
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// The name of the agent's ConfigMap the DaemonSet refers to, and that
/// ConfigMap's data.
fn agent_config(objects: &[serde_json::Value]) -> (String, serde_json::Value) {
    let ds = object(objects, "DaemonSet", "netlb");
    let name = ds["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        .as_array()
        .expect("envFrom")
        .iter()
        .filter_map(|e| e["configMapRef"]["name"].as_str())
        .find(|n| n.starts_with("netlb-config"))
        .expect("the DaemonSet refers to netlb-config")
        .to_owned();
    let data = object(objects, "ConfigMap", &name)["data"].clone();
    (name, data)
}

/// Issue 22: a value of the agent's configuration changed the documented
/// way (a `behavior: merge` generator over the installation) reaches the
/// ConfigMap the DaemonSet refers to, under a new name: a changed pod
/// template, which rolls the agents (a ConfigMap of a fixed name would
/// leave every running agent on its old flags).
#[test]
fn a_changed_value_of_the_configuration_changes_the_pod_template() {
    // Within the repository: kustomize takes bases by relative path only.
    let dir = workspace().join("target").join(format!(
        "nlb-{}-kustomization",
        netlb_testbed::topology::run_id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let before = objects(&render("deploy/examples/production"));
    let (name_before, data_before) = agent_config(&before);
    assert_eq!(
        data_before["NETLB_CLUSTER_CIDR"].as_str(),
        Some("10.244.0.0/16")
    );
    std::fs::write(
        dir.join("kustomization.yaml"),
        "apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../deploy/examples/production
configMapGenerator:
  - name: netlb-config
    namespace: netlb-system
    behavior: merge
    literals:
      - NETLB_CLUSTER_CIDR=10.245.0.0/16
      - NETLB_MAX_CONNTRACK=1048576
",
    )
    .unwrap();
    let after = objects(&render(&dir.display().to_string()));
    let (name_after, data_after) = agent_config(&after);
    println!("netlb-config: {name_before} -> {name_after}");
    assert_ne!(name_before, name_after, "the pod template did not change");
    assert_eq!(
        data_after["NETLB_CLUSTER_CIDR"].as_str(),
        Some("10.245.0.0/16")
    );
    assert_eq!(data_after["NETLB_MAX_CONNTRACK"].as_str(), Some("1048576"));
    // Every value is one the agent reads (a misspelt one would be ignored).
    let help = std::process::Command::new(netlb_testbed::find_binary("netlb-agent"))
        .args(["run", "--help"])
        .output()
        .expect("netlb-agent run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for key in data_after.as_object().expect("data").keys() {
        let key = key.as_str();
        assert!(
            key == "RUST_LOG" || help.contains(&format!("[env: {key}=")),
            "the agent has no flag read from {key}"
        );
    }
    // The rest of the configuration is kept.
    assert_eq!(data_after["NETLB_BPFFS"], data_before["NETLB_BPFFS"]);
    // The API server's address and the least-privilege agent too.
    let ds = object(&after, "DaemonSet", "netlb");
    let agent = &ds["spec"]["template"]["spec"]["containers"][0];
    assert!(
        agent["envFrom"][1]["configMapRef"]["name"]
            .as_str()
            .is_some_and(|n| n.starts_with("netlb-api-server-"))
    );
    assert_eq!(
        agent["securityContext"]["privileged"].as_bool(),
        Some(false)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Issue 22: in every rendered DaemonSet the only host path any container
/// can write to is the bpffs (the agent's pins); the cgroup2 hierarchy and
/// the host's /proc are read-only.
#[test]
fn no_container_writes_to_a_host_path_but_the_bpffs() {
    for k in KUSTOMIZATIONS {
        let objects = objects(&render(k));
        for ds in objects
            .iter()
            .filter(|o| o["kind"].as_str() == Some("DaemonSet"))
        {
            let spec = &ds["spec"]["template"]["spec"];
            let host_paths: Vec<(String, String)> = spec["volumes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|v| {
                    Some((
                        v["name"].as_str()?.to_owned(),
                        v["hostPath"]["path"].as_str()?.to_owned(),
                    ))
                })
                .collect();
            assert!(!host_paths.is_empty(), "{k}: no host path at all?");
            for c in ["initContainers", "containers"]
                .iter()
                .filter_map(|s| spec[*s].as_array())
                .flatten()
            {
                for m in c["volumeMounts"].as_array().into_iter().flatten() {
                    let Some((_, path)) = host_paths
                        .iter()
                        .find(|(n, _)| Some(n.as_str()) == m["name"].as_str())
                    else {
                        continue;
                    };
                    let read_only = m["readOnly"].as_bool() == Some(true);
                    assert!(
                        read_only || path == "/sys/fs/bpf",
                        "{k}: {} mounts the host's {path} writable",
                        c["name"].as_str().unwrap_or("?")
                    );
                }
            }
        }
    }
}

/// Issue 22: the uninstall cleans the directory the installation pins in
/// (the base's NETLB_BPFFS), within the host path it mounts.
#[test]
fn the_uninstall_cleans_where_the_agents_pin() {
    let installed = objects(&render("deploy/base"));
    let (_, data) = agent_config(&installed);
    let bpffs = data["NETLB_BPFFS"]
        .as_str()
        .expect("NETLB_BPFFS")
        .to_owned();
    let uninstall = objects(&render("deploy/uninstall"));
    let ds = object(&uninstall, "DaemonSet", "netlb-cleanup");
    let container = &ds["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .filter_map(|a| a.as_str())
        .collect();
    assert_eq!(args[0], "cleanup");
    let at = args.iter().position(|a| *a == "--bpffs").expect("--bpffs");
    assert_eq!(
        args[at + 1],
        bpffs,
        "the uninstall cleans another directory"
    );
    let mount = container["volumeMounts"][0]["mountPath"].as_str().unwrap();
    assert!(
        bpffs.starts_with(&format!("{mount}/")),
        "{bpffs} is not under {mount}"
    );
    // And runs on every node, as the agent.
    let agent = object(&installed, "DaemonSet", "netlb");
    assert_eq!(
        ds["spec"]["template"]["spec"]["tolerations"],
        agent["spec"]["template"]["spec"]["tolerations"]
    );
}
