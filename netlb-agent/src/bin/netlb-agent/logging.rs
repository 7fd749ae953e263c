//! Logs through `tracing`: `RUST_LOG`, or kube-proxy's `--v`.

use anyhow::Context as _;

/// Installs the tracing subscriber: `RUST_LOG` if set, else the level of
/// `--v`; text or JSON on stderr. Records of the `log` crate (the agent's
/// own and its libraries') go through it too.
pub fn init_logging(verbosity: u8, json: bool) -> anyhow::Result<()> {
    use std::io::IsTerminal as _;
    let level = match verbosity {
        0..=2 => "info",
        3..=4 => "debug",
        _ => "trace",
    };
    let mut spec = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => value,
        _ => level.to_owned(),
    };
    // kube's client logs an ERROR for every failed request (and a WARN
    // when a watch stream is cut), its watcher a WARN for every 403; the
    // agent's watchers report the same failures once per outage, with a
    // summary a minute, and the metrics count each. A filter that names
    // kube's targets itself brings them back.
    if !spec.contains("kube_") {
        spec.push_str(",kube_client::client=error,kube_client::client::builder=off,kube_runtime::watcher=error");
    }
    let filter =
        tracing_subscriber::EnvFilter::try_new(&spec).context("RUST_LOG is not a valid filter")?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    let result = if json {
        builder.json().with_current_span(true).try_init()
    } else {
        builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
    };
    result.map_err(|e| anyhow::anyhow!("installing the log subscriber: {e}"))
}
