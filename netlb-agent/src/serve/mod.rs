//! What the agent serves: the HTTP server (hyper on the agent's runtime),
//! `/healthz`, `/livez`, `/readyz`, `/metrics` and `/proxyMode`, and the
//! health-check node ports of LoadBalancer Services.
//!
//! Owns: [`metrics::Metrics`] (the agent's state as the endpoints report
//! it) and the listeners. Must not: program anything; it is told what
//! happened (by the agent loop) and reports it.

pub mod healthcheck;
pub mod http;
pub mod metrics;
pub mod server;
