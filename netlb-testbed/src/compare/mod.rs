//! netlb side by side with the direct pod IP and kube-proxy's iptables and
//! nftables datapaths, on one topology, in one run (`cargo xtask bench`;
//! its quick profile is a test).
//!
//! One node namespace with backend pods and a client pod behind veths, and
//! the outside client beyond the fabric. Every mode serves the same
//! Services ([`model`]): `direct` connects to the pod IPs; `netlb` runs the
//! real agent against the API-server double holding the objects;
//! `iptables` and `nftables` load the rules kube-proxy writes for the same
//! objects ([`kube_proxy`]) into the node namespace. Each mode has its own
//! copy of the topology (a lane: same addresses), so its state stays put
//! between rounds. At each scale every mode is programmed from nothing
//! once, then the modes take turns, round after round (the order
//! rotating), and ratios to `direct` are taken within a round, so machine
//! drift cancels out.

pub mod kube_proxy;
pub mod model;
pub mod report;

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use crate::{
    agent::{AgentOptions, AgentProcess, AgentSource},
    apiserver::{FakeApiError, FakeApiServer},
    find_binary,
    load::LoadReport,
    process::{ChildGuard, ProcessError, cpu_seconds, proc_status},
    topology::{Testbed, TestbedError, TestbedSpec, bind_in_netns},
};
use kube_proxy::ProxierParams;
use model::ServicePort;

/// The pod network of the topology (kube-proxy's `--cluster-cidr`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";
/// The Service CIDR (kube-apiserver's `--service-cluster-ip-range`).
pub const SERVICE_CIDR: &str = "10.96.0.0/12";
/// The Service whose endpoint the programming-latency probe moves.
const PROBE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The Service in front of the iperf3 server.
const IPERF_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
const HTTP_PORT: u16 = 8080;
const IPERF_PORT: u16 = 5201;

/// A datapath under comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Clients connect to the pod IPs: the limit of the topology.
    Direct,
    Netlb,
    /// kube-proxy's iptables rules for the same objects.
    Iptables,
    /// kube-proxy's nftables rules for the same objects.
    Nftables,
}

impl Mode {
    pub const ALL: [Mode; 4] = [Mode::Direct, Mode::Netlb, Mode::Iptables, Mode::Nftables];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Direct => "direct",
            Mode::Netlb => "netlb",
            Mode::Iptables => "iptables",
            Mode::Nftables => "nftables",
        }
    }
}

/// Which `iptables-restore` loads the iptables mode's rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IptablesBackend {
    /// `iptables-nft-restore`: what current distributions and kube-proxy's
    /// image (iptables-wrapper, on a node without legacy rules) use.
    Nft,
    /// `iptables-legacy-restore` (x_tables).
    Legacy,
}

impl IptablesBackend {
    /// The restore tool of this backend.
    pub fn restore_tool(self) -> &'static str {
        match self {
            IptablesBackend::Nft => "iptables-nft-restore",
            IptablesBackend::Legacy => "iptables-legacy-restore",
        }
    }
}

/// How much to measure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    pub name: String,
    /// Numbers of bench Services (besides the probe and iperf Services).
    pub scales: Vec<usize>,
    pub endpoints: usize,
    pub rounds: usize,
    pub modes: Vec<Mode>,
    /// Seconds of each TCP_CRR run (from the pod, from outside).
    pub crr_seconds: f64,
    /// Seconds of the kept-alive run.
    pub rr_seconds: f64,
    /// Seconds of the iperf3 stream.
    pub iperf_seconds: u32,
    /// Load-generator workers.
    pub concurrency: usize,
    /// Endpoint changes per mode and round for the programming latency
    /// (the probe Service's endpoint moves between two backends).
    pub changes: usize,
    /// NodePort Services among the bench Services (at most 2,768).
    pub node_ports: usize,
    pub iptables_backend: IptablesBackend,
}

impl Profile {
    /// CI: every mode, a tiny sweep, about a minute.
    pub fn quick() -> Self {
        Self {
            name: "quick".into(),
            scales: vec![1, 100],
            endpoints: 4,
            rounds: 1,
            modes: Mode::ALL.to_vec(),
            crr_seconds: 1.0,
            rr_seconds: 0.5,
            iperf_seconds: 1,
            concurrency: 4,
            changes: 3,
            node_ports: 100,
            iptables_backend: IptablesBackend::Nft,
        }
    }

    /// Under 20 minutes on 2 cores.
    pub fn default_profile() -> Self {
        Self {
            name: "default".into(),
            scales: vec![1, 1_000, 10_000, 30_000],
            rounds: 3,
            crr_seconds: 2.0,
            rr_seconds: 1.0,
            iperf_seconds: 1,
            changes: 4,
            node_ports: 2_000,
            ..Self::quick()
        }
    }

    /// Adds 100k Services and rounds.
    pub fn full() -> Self {
        Self {
            name: "full".into(),
            scales: vec![1, 1_000, 10_000, 30_000, 100_000],
            rounds: 5,
            crr_seconds: 4.0,
            rr_seconds: 2.0,
            iperf_seconds: 2,
            changes: 6,
            ..Self::default_profile()
        }
    }
}

/// The figures of one mode in one round at one scale.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub services: usize,
    pub mode: Mode,
    pub round: usize,
    /// New connections from the client pod to random Services' cluster IPs.
    pub pod_crr: LoadReport,
    /// New connections from the outside client to random node ports.
    pub nodeport_crr: LoadReport,
    /// Requests on kept-alive connections from the client pod.
    pub pod_rr: LoadReport,
    /// One iperf3 stream from the client pod, Gbit/s.
    pub iperf_gbps: f64,
    /// From nothing programmed to every Service programmed, seconds.
    pub program_seconds: Option<f64>,
    /// The proxy's CPU seconds and peak RSS to get there (netlb: the agent;
    /// reproduced kube-proxy modes: the restore tool).
    pub program_cpu_seconds: Option<f64>,
    pub proxy_rss_kib: Option<u64>,
    /// Endpoint change to the first connection served by the new backend.
    pub programming_latency_ms: Vec<f64>,
}

/// Everything a run produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Results {
    pub profile: Profile,
    pub machine: report::Machine,
    pub samples: Vec<Sample>,
    pub started: String,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    #[error("topology: {source}")]
    Testbed {
        #[source]
        source: TestbedError,
    },
    #[error("process: {source}")]
    Process {
        #[source]
        source: ProcessError,
    },
    #[error("API-server double: {source}")]
    Api {
        #[source]
        source: FakeApiError,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{mode:?} at {services} Services: {what}")]
    Mode {
        mode: Mode,
        services: usize,
        what: String,
    },
    #[error("writing {what}: {detail}")]
    Output { what: String, detail: String },
}

impl From<TestbedError> for CompareError {
    fn from(source: TestbedError) -> Self {
        Self::Testbed { source }
    }
}
impl From<ProcessError> for CompareError {
    fn from(source: ProcessError) -> Self {
        Self::Process { source }
    }
}
impl From<FakeApiError> for CompareError {
    fn from(source: FakeApiError) -> Self {
        Self::Api { source }
    }
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CompareError {
    let what = what.into();
    move |source| CompareError::Io { what, source }
}

/// Exit, CPU seconds and peak RSS (KiB) of a finished child.
struct Measured {
    success: bool,
    stderr: String,
    cpu_seconds: f64,
    maxrss_kib: u64,
}

/// Runs `args` in `netns` with `input` on stdin and reaps it with wait4(2)
/// for its own CPU time and peak RSS (`ip netns exec` execs the command,
/// so the PID is the tool's).
fn run_measured(netns: &str, args: &[&str], input: &[u8]) -> Result<Measured, CompareError> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io(format!("starting {}", args.join(" "))))?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let (written, stderr) = std::thread::scope(|s| {
        let reader = s.spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        let written = stdin.write_all(input);
        drop(stdin);
        (written, reader.join().unwrap_or_default())
    });
    let mut status = 0i32;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child's PID, which std has not reaped (we
    // never call `wait` on `child`), with valid out-pointers.
    let pid = unsafe { libc::wait4(child.id() as i32, &mut status, 0, &mut usage) };
    if pid < 0 {
        return Err(CompareError::Io {
            what: format!("waiting for {}", args.join(" ")),
            source: std::io::Error::last_os_error(),
        });
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Measured {
        success: written.is_ok() && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        stderr,
        cpu_seconds: tv(usage.ru_utime) + tv(usage.ru_stime),
        maxrss_kib: usage.ru_maxrss as u64,
    })
}

/// Connect timeout of the programming-latency probe's requests.
const PROBE_CONNECT_TIMEOUT: Duration = Duration::from_millis(300);

fn ask(addr: SocketAddr) -> Option<String> {
    crate::load::backend_name(addr, PROBE_CONNECT_TIMEOUT)
}

/// What moving the probe needs (shareable with the probing thread).
struct Probe<'a> {
    lane: &'a Lane,
    api: &'a FakeApiServer,
    services: &'a [ServicePort],
    params: &'a ProxierParams,
    backend: IptablesBackend,
}

impl Probe<'_> {
    /// Moves the probe Service's endpoint between backends 0 and 1: one
    /// step, applied the way `mode` gets it (the double for netlb, a
    /// partial sync of kube-proxy's rules otherwise).
    fn move_probe(&self, mode: Mode, from: usize, to: usize) -> Result<(), String> {
        let lane = self.lane;
        let mut current = self.services[0].clone();
        current.endpoints = vec![lane.backends[from].ip];
        let mut moved = current.clone();
        moved.endpoints = vec![lane.backends[to].ip];
        match mode {
            Mode::Netlb => self
                .api
                .apply(moved.slice_json("node0"))
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Mode::Iptables | Mode::Nftables => {
                // What kube-proxy writes for one changed Service (a partial
                // sync), applied at once: no watch and no minSyncPeriod, a
                // lower bound for it.
                let (text, tool): (String, Vec<&str>) = if mode == Mode::Iptables {
                    (
                        kube_proxy::iptables::partial_restore(
                            self.services,
                            &self.services[0],
                            &moved,
                            self.params,
                        ),
                        vec![self.backend.restore_tool(), "-w", "--noflush"],
                    )
                } else {
                    (
                        kube_proxy::nftables::endpoints_changed(self.services, &current, &moved),
                        vec!["nft", "-f", "-"],
                    )
                };
                let run = run_measured(&lane.tb.nodes[0].netns, &tool, text.as_bytes())
                    .map_err(|e| e.to_string())?;
                if run.success {
                    Ok(())
                } else {
                    Err(format!("{} failed: {}", tool[0], run.stderr))
                }
            }
            Mode::Direct => Err("no probe in direct mode".into()),
        }
    }
}

/// The running lanes and the objects of the current scale.
/// One mode's own copy of the topology (identical in every lane: same
/// addresses), so a mode's state (rules, conntrack, an agent) stays put
/// between rounds without touching the others'.
struct Lane {
    mode: Mode,
    tb: Testbed,
    backends: Vec<crate::topology::Pod>,
    client: crate::topology::Pod,
    programmed: Programmed,
    /// Which of backends 0 and 1 the probe Service's endpoint is on.
    probe_at: usize,
    _servers: Vec<ChildGuard>,
}

impl Lane {
    fn new(mode: Mode, profile: &Profile) -> Result<Self, CompareError> {
        let mut tb = Testbed::new(TestbedSpec { nodes: 1 })?;
        let mut backends = Vec::new();
        for i in 0..profile.endpoints.max(2) {
            backends.push(tb.add_pod(0, &format!("b{i}"))?);
        }
        let client = tb.add_pod(0, "client")?;
        let echo = find_binary("netlb-echo");
        let mut servers = Vec::new();
        for b in &backends {
            servers.push(ChildGuard::spawn_in(
                &b.netns,
                &[
                    echo.to_str().unwrap_or("netlb-echo"),
                    "serve",
                    "--name",
                    &b.name,
                    "--http",
                    &HTTP_PORT.to_string(),
                ],
                None,
            )?);
        }
        servers.push(ChildGuard::spawn_in(
            &backends[0].netns,
            &["iperf3", "-s", "-p", &IPERF_PORT.to_string()],
            None,
        )?);
        Ok(Self {
            mode,
            tb,
            backends,
            client,
            programmed: Programmed::None,
            probe_at: 0,
            _servers: servers,
        })
    }
}

/// What programming a mode from nothing took.
#[derive(Debug, Clone, Copy, Default)]
struct ProgramFigures {
    seconds: Option<f64>,
    cpu_seconds: Option<f64>,
    rss_kib: Option<u64>,
}

struct Bench<'a> {
    profile: &'a Profile,
    lanes: Vec<Lane>,
    api: FakeApiServer,
    kubeconfig: PathBuf,
    params: ProxierParams,
    /// The probe Service (endpoint moves between backends 0 and 1), the
    /// iperf Service, then the bench Services.
    services: Vec<ServicePort>,
    log: &'a mut dyn FnMut(&str),
}

/// What a mode leaves running while it is measured.
enum Programmed {
    None,
    Agent(AgentProcess),
    Rules,
}

impl Bench<'_> {
    fn lane(&self, mode: Mode) -> &Lane {
        self.lanes
            .iter()
            .find(|l| l.mode == mode)
            .expect("a lane per mode")
    }

    fn lane_mut(&mut self, mode: Mode) -> &mut Lane {
        self.lanes
            .iter_mut()
            .find(|l| l.mode == mode)
            .expect("a lane per mode")
    }

    fn node_netns(&self, mode: Mode) -> String {
        self.lane(mode).tb.nodes[0].netns.clone()
    }

    fn mode_error(&self, mode: Mode, what: impl Into<String>) -> CompareError {
        CompareError::Mode {
            mode,
            services: self.services.len().saturating_sub(2),
            what: what.into(),
        }
    }

    /// Replaces the objects in the double with `count` bench Services.
    fn load_scale(&mut self, count: usize) -> Result<(), CompareError> {
        for old in &self.services {
            self.api.delete(
                crate::apiserver::Resource::Services,
                &old.namespace,
                &old.name,
            );
            self.api.delete(
                crate::apiserver::Resource::EndpointSlices,
                &old.namespace,
                &format!("{}-abcde", old.name),
            );
        }
        // Every lane's pods have the same addresses.
        let b: Vec<Ipv4Addr> = self.lanes[0].backends.iter().map(|p| p.ip).collect();
        let mut services = vec![
            ServicePort {
                namespace: "bench".into(),
                name: "probe".into(),
                port_name: "http".into(),
                protocol: "TCP".into(),
                cluster_ip: PROBE_IP,
                port: 80,
                target_port: HTTP_PORT,
                node_port: None,
                endpoints: vec![b[0]],
            },
            ServicePort {
                namespace: "bench".into(),
                name: "iperf".into(),
                port_name: "iperf".into(),
                protocol: "TCP".into(),
                cluster_ip: IPERF_IP,
                port: IPERF_PORT,
                target_port: IPERF_PORT,
                node_port: None,
                endpoints: vec![b[0]],
            },
        ];
        services.extend(model::bench_services(
            count,
            &b[..self.profile.endpoints.min(b.len())],
            self.profile.node_ports,
        ));
        for s in &services {
            self.api.apply(s.service_json())?;
            self.api.apply(s.slice_json("node0"))?;
        }
        self.services = services;
        Ok(())
    }

    fn targets_file(
        &self,
        mode: Mode,
        name: &str,
        lines: &[String],
    ) -> Result<PathBuf, CompareError> {
        let path = self.lane(mode).tb.dir.join(name);
        std::fs::write(&path, lines.join("\n"))
            .map_err(io(format!("writing {}", path.display())))?;
        Ok(path)
    }

    fn flush_conntrack(&self, mode: Mode) {
        let lane = self.lane(mode);
        let _ = lane.tb.exec(&lane.tb.nodes[0].netns, &["conntrack", "-F"]);
    }

    /// Programs `mode` from nothing in its lane; the time, CPU and RSS it
    /// took.
    fn program(&mut self, mode: Mode) -> Result<ProgramFigures, CompareError> {
        self.flush_conntrack(mode);
        let mut figures = ProgramFigures::default();
        let services = self.services.len().saturating_sub(2);
        let programmed = match mode {
            Mode::Direct => Programmed::None,
            Mode::Netlb => {
                let started = Instant::now();
                // A log per start: the wait below looks for its first
                // "initial sync complete".
                let log = self.lane(mode).tb.dir.join(format!("agent-{services}.log"));
                let agent = AgentProcess::start(
                    &self.lane(mode).tb.nodes[0],
                    &AgentOptions {
                        binary: find_binary("netlb-agent"),
                        source: AgentSource::Kubeconfig(self.kubeconfig.clone()),
                        extra_args: vec!["--cluster-cidr".into(), CLUSTER_CIDR.into()],
                        cleanup_on_exit: true,
                        capabilities: None,
                        wrapper: Vec::new(),
                    },
                    &log,
                )?;
                if !agent.wait_for_log("initial sync complete", 1, Duration::from_secs(600)) {
                    let tail: String = agent
                        .log()
                        .lines()
                        .rev()
                        .take(5)
                        .collect::<Vec<_>>()
                        .join(" | ");
                    return Err(self.mode_error(mode, format!("not programmed in 600 s: {tail}")));
                }
                figures.seconds = Some(started.elapsed().as_secs_f64());
                figures.cpu_seconds = cpu_seconds(agent.pid());
                figures.rss_kib = proc_status(agent.pid(), "VmRSS:");
                Programmed::Agent(agent)
            }
            Mode::Iptables | Mode::Nftables => {
                let started = Instant::now();
                let (text, tool): (String, Vec<&str>) = if mode == Mode::Iptables {
                    (
                        kube_proxy::iptables::full_restore(&self.services, &self.params),
                        vec![self.profile.iptables_backend.restore_tool(), "-w"],
                    )
                } else {
                    (
                        kube_proxy::nftables::full_ruleset(&self.services, &self.params),
                        vec!["nft", "-f", "-"],
                    )
                };
                let run = run_measured(&self.node_netns(mode), &tool, text.as_bytes())?;
                if !run.success {
                    let path = self
                        .lane(mode)
                        .tb
                        .dir
                        .join(format!("{}.rules", mode.name()));
                    let _ = std::fs::write(&path, &text);
                    return Err(self.mode_error(
                        mode,
                        format!(
                            "{} failed: {}",
                            tool[0],
                            run.stderr.lines().take(5).collect::<Vec<_>>().join(" | ")
                        ),
                    ));
                }
                figures.seconds = Some(started.elapsed().as_secs_f64());
                figures.cpu_seconds = Some(run.cpu_seconds);
                figures.rss_kib = Some(run.maxrss_kib);
                Programmed::Rules
            }
        };
        let lane = self.lane_mut(mode);
        lane.programmed = programmed;
        lane.probe_at = 0;
        Ok(figures)
    }

    /// Removes what `program` made.
    fn unprogram(&mut self, mode: Mode) {
        let programmed = std::mem::replace(&mut self.lane_mut(mode).programmed, Programmed::None);
        match programmed {
            Programmed::None => {}
            Programmed::Agent(mut agent) => {
                agent.stop();
            }
            Programmed::Rules => {
                let ns = self.node_netns(mode);
                if mode == Mode::Iptables {
                    let tool = self.profile.iptables_backend.restore_tool();
                    // Empty tables: every chain and rule kube-proxy made goes.
                    let _ = run_measured(&ns, &[tool, "-w"], b"*filter\nCOMMIT\n*nat\nCOMMIT\n");
                } else {
                    let _ = self
                        .lane(mode)
                        .tb
                        .exec(&ns, &["nft", "delete", "table", "ip", "kube-proxy"]);
                }
            }
        }
        self.flush_conntrack(mode);
    }

    /// The load files of a mode: cluster IPs (pods), node ports (outside),
    /// or the pod IPs for `direct`.
    fn load_targets(&self, mode: Mode) -> Result<(PathBuf, PathBuf), CompareError> {
        let bench = &self.services[2..];
        let (pod, outside): (Vec<String>, Vec<String>) = if mode == Mode::Direct {
            let pods: Vec<String> = bench[0]
                .endpoints
                .iter()
                .map(|ip| format!("{ip}:{HTTP_PORT}"))
                .collect();
            (pods.clone(), pods)
        } else {
            let node = self.lane(mode).tb.nodes[0].uplink_ip;
            (
                bench
                    .iter()
                    .map(|s| format!("{}:{}", s.cluster_ip, s.port))
                    .collect(),
                bench
                    .iter()
                    .filter_map(|s| s.node_port.map(|p| format!("{node}:{p}")))
                    .collect(),
            )
        };
        Ok((
            self.targets_file(mode, &format!("targets-pod-{}.txt", mode.name()), &pod)?,
            self.targets_file(
                mode,
                &format!("targets-outside-{}.txt", mode.name()),
                &outside,
            )?,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn load(
        &self,
        mode: Mode,
        netns: &str,
        kind: &str,
        targets: &Path,
        seconds: f64,
        seed: u64,
    ) -> Result<LoadReport, CompareError> {
        let load = find_binary("netlb-load");
        let out = self
            .lane(mode)
            .tb
            .exec(
                netns,
                &[
                    load.to_str().unwrap_or("netlb-load"),
                    kind,
                    "--targets",
                    targets.to_str().unwrap_or(""),
                    "--concurrency",
                    &self.profile.concurrency.to_string(),
                    "--duration-s",
                    &seconds.to_string(),
                    "--seed",
                    &seed.to_string(),
                ],
            )
            .map_err(io("running netlb-load"))?;
        let report: LoadReport = serde_json::from_slice(&out.stdout).map_err(|e| {
            self.mode_error(
                mode,
                format!(
                    "netlb-load {kind} printed no report ({e}): {}",
                    String::from_utf8_lossy(&out.stderr)
                ),
            )
        })?;
        // A mode that does not serve fails the run: no request at all, or
        // more than 1 % of the attempts failing.
        let attempts = report.requests + report.failures;
        if report.requests == 0 || report.failures * 100 > attempts {
            return Err(self.mode_error(
                mode,
                format!(
                    "{kind} from {netns}: {} of {attempts} attempts failed{}",
                    report.failures,
                    self.diagnose(mode)
                ),
            ));
        }
        Ok(report)
    }

    /// What a failing mode's datapath shows: netlb's non-zero counters.
    fn diagnose(&self, mode: Mode) -> String {
        if mode != Mode::Netlb {
            return String::new();
        }
        let agent = find_binary("netlb-agent");
        let bpffs = self.lane(mode).tb.nodes[0].bpffs.display().to_string();
        match Command::new(agent)
            .args(["list", "stats", "--bpffs", &bpffs])
            .output()
        {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                let counters: Vec<&str> = text
                    .lines()
                    .skip(1)
                    .filter(|l| !l.trim_end().ends_with(" 0"))
                    .collect();
                format!("; netlb counters: {}", counters.join(", "))
            }
            Err(e) => format!("; netlb counters unreadable: {e}"),
        }
    }

    fn iperf(&self, mode: Mode) -> Result<f64, CompareError> {
        let lane = self.lane(mode);
        let target = if mode == Mode::Direct {
            lane.backends[0].ip
        } else {
            IPERF_IP
        };
        let out = lane
            .tb
            .exec(
                &lane.client.netns,
                &[
                    "iperf3",
                    "-c",
                    &target.to_string(),
                    "-p",
                    &IPERF_PORT.to_string(),
                    "-t",
                    &self.profile.iperf_seconds.to_string(),
                    "-J",
                ],
            )
            .map_err(io("running iperf3"))?;
        let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        json["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .ok_or_else(|| {
                self.mode_error(
                    mode,
                    format!(
                        "iperf3 to {target}: {}",
                        json["error"].as_str().unwrap_or("no result")
                    ),
                )
            })
    }

    /// Moves the probe Service's endpoint `changes` times; the time from
    /// each change to the first new connection served by the new backend.
    /// The probe is left on backend 0.
    fn programming_latency(&mut self, mode: Mode) -> Result<Vec<f64>, CompareError> {
        if mode == Mode::Direct || self.profile.changes == 0 {
            return Ok(Vec::new());
        }
        let lane = self.lane(mode);
        let netns = std::fs::File::open(format!("/run/netns/{}", lane.client.netns))
            .map_err(io("opening the client's namespace"))?;
        let vip = SocketAddr::from((PROBE_IP, 80));
        let names = [lane.backends[0].name.clone(), lane.backends[1].name.clone()];
        let start = lane.probe_at;
        let changes = self.profile.changes;
        let this = Probe {
            lane,
            api: &self.api,
            services: &self.services,
            params: &self.params,
            backend: self.profile.iptables_backend,
        };
        let this = &this;
        let result: Result<(Vec<f64>, usize), String> = std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns in this thread only, on a namespace fd we own.
                if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err("entering the client's namespace".to_owned());
                }
                let deadline = Instant::now() + Duration::from_secs(10);
                while ask(vip).as_deref() != Some(names[start].as_str()) {
                    if Instant::now() > deadline {
                        return Err("the probe Service never served".to_owned());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let mut at = start;
                let mut samples = Vec::with_capacity(changes);
                for k in 0..changes {
                    let next = 1 - at;
                    let written = Instant::now();
                    this.move_probe(mode, at, next)?;
                    loop {
                        if ask(vip).as_deref() == Some(names[next].as_str()) {
                            samples.push(written.elapsed().as_secs_f64() * 1000.0);
                            break;
                        }
                        if written.elapsed() > Duration::from_secs(30) {
                            return Err(format!("change {k} not served within 30 s"));
                        }
                    }
                    at = next;
                    std::thread::sleep(Duration::from_millis(50));
                }
                // Leave the probe on backend 0 (not measured).
                if at != 0 {
                    this.move_probe(mode, at, 0)?;
                    at = 0;
                }
                Ok((samples, at))
            })
            .join()
            .unwrap_or_else(|_| Err("probe thread panicked".to_owned()))
        });
        match result {
            Ok((samples, at)) => {
                self.lane_mut(mode).probe_at = at;
                Ok(samples)
            }
            Err(what) => Err(self.mode_error(mode, what)),
        }
    }

    /// One round of `mode` on its programmed lane.
    fn measure(&mut self, mode: Mode, round: usize) -> Result<Sample, CompareError> {
        let services = self.services.len() - 2;
        let mut sample = Sample {
            services,
            mode,
            round,
            pod_crr: LoadReport::default(),
            nodeport_crr: LoadReport::default(),
            pod_rr: LoadReport::default(),
            iperf_gbps: 0.0,
            program_seconds: None,
            program_cpu_seconds: None,
            proxy_rss_kib: None,
            programming_latency_ms: Vec::new(),
        };
        (self.log)(&format!(
            "{services} Services, round {}: {}",
            round + 1,
            mode.name()
        ));
        if let Some(secs) = std::env::var("NETLB_COMPARE_HOLD")
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
        {
            // Debugging: time to look at a programmed mode by hand.
            let dir = self.lane(mode).tb.dir.display().to_string();
            (self.log)(&format!("holding {secs} s; topology in {dir}"));
            std::thread::sleep(Duration::from_secs(secs));
        }
        let (pod_targets, outside_targets) = self.load_targets(mode)?;
        let seed = (services * 31 + round) as u64;
        let client = self.lane(mode).client.netns.clone();
        let ext = self.lane(mode).tb.ext.clone();
        let crr = self.profile.crr_seconds;
        sample.pod_crr = self.load(mode, &client, "crr", &pod_targets, crr, seed)?;
        sample.nodeport_crr = self.load(mode, &ext, "crr", &outside_targets, crr, seed)?;
        let rr = self.profile.rr_seconds;
        sample.pod_rr = self.load(mode, &client, "rr", &pod_targets, rr, seed)?;
        sample.iperf_gbps = self.iperf(mode)?;
        sample.programming_latency_ms = self.programming_latency(mode)?;
        Ok(sample)
    }
}

/// Runs the comparison of `profile`, writing every output file into `out`;
/// `log` receives progress lines. A mode that fails to program or to serve
/// fails the run.
pub fn run(
    profile: &Profile,
    out: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<Results, CompareError> {
    let started = Instant::now();
    let started_at = report::now_rfc3339();
    std::fs::create_dir_all(out).map_err(io(format!("creating {}", out.display())))?;
    let mut lanes = Vec::new();
    for &mode in &profile.modes {
        lanes.push(Lane::new(mode, profile)?);
    }
    if lanes.is_empty() {
        return Err(CompareError::Output {
            what: "the comparison".into(),
            detail: "no mode to run".into(),
        });
    }
    // The double lives in netlb's lane (any lane without netlb).
    let api_lane = lanes
        .iter()
        .position(|l| l.mode == Mode::Netlb)
        .unwrap_or(0);
    let api = FakeApiServer::start(bind_in_netns(
        &lanes[api_lane].tb.nodes[0].netns,
        "127.0.0.1:0",
    )?)?;
    let kubeconfig = lanes[api_lane].tb.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).map_err(io("writing the kubeconfig"))?;
    let params = ProxierParams {
        cluster_cidr: CLUSTER_CIDR.into(),
        node_ips: vec![lanes[0].tb.nodes[0].uplink_ip],
        service_cidrs: vec![SERVICE_CIDR.into()],
        node_name: "node0".into(),
    };
    let mut bench = Bench {
        profile,
        lanes,
        api,
        kubeconfig,
        params,
        services: Vec::new(),
        log,
    };
    // The servers listen before the first mode measures.
    std::thread::sleep(Duration::from_millis(300));
    let mut samples = Vec::new();
    for &scale in &profile.scales {
        for &mode in &profile.modes {
            bench.unprogram(mode);
        }
        let loaded = Instant::now();
        bench.load_scale(scale)?;
        (bench.log)(&format!(
            "{scale} Services written to the double in {:.1?}",
            loaded.elapsed()
        ));
        // Each mode programmed from nothing once per scale, then measured
        // in rounds, the order rotating: no mode always goes first.
        let mut figures = Vec::new();
        for &mode in &profile.modes {
            (bench.log)(&format!("{scale} Services: programming {}", mode.name()));
            figures.push(bench.program(mode)?);
        }
        for round in 0..profile.rounds {
            let n = profile.modes.len();
            for k in 0..n {
                let i = (k + round) % n;
                let mut sample = bench.measure(profile.modes[i], round)?;
                if round == 0 {
                    sample.program_seconds = figures[i].seconds;
                    sample.program_cpu_seconds = figures[i].cpu_seconds;
                    sample.proxy_rss_kib = figures[i].rss_kib;
                }
                samples.push(sample);
            }
        }
    }
    for &mode in &profile.modes {
        bench.unprogram(mode);
    }
    let results = Results {
        profile: profile.clone(),
        machine: report::Machine::read(),
        samples,
        started: started_at,
        seconds: started.elapsed().as_secs_f64(),
    };
    report::write_all(&results, out)?;
    Ok(results)
}
