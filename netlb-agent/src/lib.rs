//! netlb-agent: programs the netlb eBPF datapath from Kubernetes Service and
//! EndpointSlice objects.
//!
//! The pipeline, in kube-proxy's shape (each folder depends only on those
//! before it):
//!
//! ```text
//!  k8s/       watchers (API server, manifests) -> lean objects -> object store
//!   |         (records what changed; nothing is programmed from here)
//!   v
//!  model/     kube-proxy's Service semantics (pure) -> desired frontends
//!   |
//!   v
//!  datapath/  syncer (minimal diff, make-before-break) -> Dataplane trait
//!             -> kernel maps; loader, pinned layout, migration, interfaces,
//!             conntrack collector
//!
//!  serve/     health, readiness, metrics, health-check node ports
//!  config/    flags and kube-proxy's KubeProxyConfiguration
//!  agent/     the `run` lifecycle wiring them together
//!  cli/       the other subcommands
//! ```

pub mod agent;
pub mod cli;
pub mod config;
pub mod datapath;
pub mod k8s;
pub mod model;
pub mod serve;
pub mod support;
