//! netlb-agent: programs the netlb eBPF datapath from Kubernetes Service and
//! EndpointSlice objects.
//!
//! Pipeline (kube-proxy's shape):
//! `source` (manifest directory; API server later) records objects ->
//! `model` (pure, kube-proxy semantics) -> `desired` (map contents) ->
//! `sync` (minimal diff, make-before-break) -> [`dataplane::Dataplane`]
//! (the only seam to the kernel: `dataplane::aya` or `dataplane::fake`).

pub mod config;
pub mod conntrack;
pub mod dataplane;
pub mod desired;
pub mod healthcheck;
pub mod http;
pub mod ifaces;
pub mod kubeproxy_config;
pub mod layout;
pub mod list;
pub mod loader;
pub mod metrics;
pub mod migrate;
pub mod model;
pub mod node;
pub mod objects;
pub mod run;
pub mod server;
pub mod source;
pub mod sync;
pub mod tracker;
