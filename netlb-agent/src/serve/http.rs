//! kube-proxy's two HTTP endpoints, served on the agent's runtime
//! ([`crate::serve::server`]): the health server (`/healthz`, `/livez`; kube-proxy
//! 0.0.0.0:10256, reachable by load balancers and kubelet; and `/readyz`,
//! the readiness probe: serving what the API says) and the metrics
//! server (`/metrics`, `/proxyMode`, `/healthz`; kube-proxy 127.0.0.1:10249).
//! `/metrics` is never served on the health address.

use std::{net::SocketAddr, sync::Arc};

use tokio::runtime::Handle;

use crate::{
    serve::metrics::Metrics,
    serve::server::{self, Limits, Server},
};

/// What `/proxyMode` answers (kube-proxy: `iptables`, `nftables`, `ipvs`).
pub const PROXY_MODE: &str = "netlb";

#[derive(Debug, thiserror::Error)]
#[error("failed to listen on {addr}")]
pub struct ListenError {
    addr: SocketAddr,
    #[source]
    source: std::io::Error,
}

fn listen(
    runtime: &Handle,
    addr: SocketAddr,
    handler: server::Handler,
) -> Result<Server, ListenError> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| ListenError { addr, source })?;
    server::spawn(runtime, listener, Limits::default(), handler)
        .map_err(|source| ListenError { addr, source })
}

fn not_found() -> http::Response<http_body_util::Full<bytes::Bytes>> {
    server::response(
        404,
        "text/plain; charset=utf-8",
        "404 page not found\n".into(),
    )
}

/// 200 or 503 with the JSON body.
fn health_response(
    health: crate::serve::metrics::Health,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let status = if health.healthy { 200 } else { 503 };
    server::response(status, "application/json", health.body)
}

/// Serves `/healthz`, `/livez` and `/readyz` on `addr` (port 0 picks a
/// free one).
pub fn serve_health(
    runtime: &Handle,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<Server, ListenError> {
    listen(
        runtime,
        addr,
        Arc::new(move |parts| match parts.uri.path() {
            path @ ("/healthz" | "/livez") => health_response(metrics.health(path == "/livez")),
            "/readyz" => health_response(metrics.readiness()),
            _ => not_found(),
        }),
    )
}

/// Serves `/metrics`, `/proxyMode` and a plain `/healthz` on `addr`.
pub fn serve_metrics(
    runtime: &Handle,
    addr: SocketAddr,
    metrics: Arc<Metrics>,
) -> Result<Server, ListenError> {
    listen(
        runtime,
        addr,
        Arc::new(move |parts| match parts.uri.path() {
            "/metrics" => {
                server::response(200, crate::serve::metrics::CONTENT_TYPE, metrics.render())
            }
            "/proxyMode" => server::response(200, "text/plain; charset=utf-8", PROXY_MODE.into()),
            "/healthz" => server::response(200, "text/plain; charset=utf-8", "ok".into()),
            _ => not_found(),
        }),
    )
}
