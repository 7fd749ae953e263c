//! `netlb-agent list`: what the pinned datapath maps hold.

use std::path::PathBuf;

use anyhow::Context as _;
use netlb_agent::{cli::list, datapath::layout::maps_dir};

use crate::Output;

/// Show what the pinned datapath maps hold.
#[derive(clap::Args)]
pub struct ListArgs {
    what: ListWhat,
    #[arg(long, default_value = "/sys/fs/bpf/netlb")]
    bpffs: PathBuf,
    #[arg(short, long, value_enum, default_value = "table")]
    output: Output,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum ListWhat {
    Services,
    Backends,
    Conntrack,
    Stats,
}

/// Rows as JSON, and as a table (header and cells).
type Listing = (serde_json::Value, &'static [&'static str], Vec<Vec<String>>);

impl ListArgs {
    pub fn run(self) -> anyhow::Result<()> {
        let maps = maps_dir(&self.bpffs);
        let listing = match self.what {
            ListWhat::Services => services(&maps),
            ListWhat::Backends => backends(&maps),
            ListWhat::Conntrack => conntrack(&maps),
            ListWhat::Stats => stats(&maps),
        }
        .with_context(|| format!("reading the maps pinned in {}", maps.display()))?;
        let (json, header, rows) = listing;
        crate::print(self.output, &json, || list::table(header, &rows))
    }
}

fn services(maps: &std::path::Path) -> anyhow::Result<Listing> {
    let rows = list::services(maps)?;
    let table = rows
        .iter()
        .map(|r| {
            vec![
                r.frontend.clone(),
                r.protocol.clone(),
                r.scope.to_owned(),
                r.rev_nat_index.to_string(),
                if r.backends.is_empty() {
                    "(none: reject)".to_owned()
                } else {
                    r.backends.join(", ")
                },
            ]
        })
        .collect();
    Ok((
        serde_json::to_value(&rows)?,
        &["FRONTEND", "PROTO", "SCOPE", "REVNAT", "BACKENDS"],
        table,
    ))
}

fn backends(maps: &std::path::Path) -> anyhow::Result<Listing> {
    let rows = list::backends(maps)?;
    let table = rows
        .iter()
        .map(|r| {
            vec![
                r.id.to_string(),
                format!("{}:{}", r.address, r.port),
                r.protocol.clone(),
                r.flows.to_string(),
            ]
        })
        .collect();
    Ok((
        serde_json::to_value(&rows)?,
        &["ID", "BACKEND", "PROTO", "FLOWS"],
        table,
    ))
}

fn conntrack(maps: &std::path::Path) -> anyhow::Result<Listing> {
    let rows = list::conntrack(maps)?;
    let table = rows
        .iter()
        .map(|r| {
            vec![
                r.kind.to_owned(),
                r.protocol.clone(),
                r.source.clone(),
                r.destination.clone(),
                r.state.unwrap_or("-").to_owned(),
                r.target.clone().unwrap_or_else(|| "-".into()),
                r.nat.clone().unwrap_or_else(|| "-".into()),
                r.age_s.to_string(),
                r.expires_in_s.to_string(),
            ]
        })
        .collect();
    Ok((
        serde_json::to_value(&rows)?,
        &[
            "KIND",
            "PROTO",
            "SOURCE",
            "DESTINATION",
            "STATE",
            "TARGET",
            "NAT",
            "AGE(s)",
            "EXPIRES(s)",
        ],
        table,
    ))
}

fn stats(maps: &std::path::Path) -> anyhow::Result<Listing> {
    let rows = list::stats(maps)?;
    let table = rows
        .iter()
        .map(|r| vec![r.counter.to_owned(), r.value.to_string()])
        .collect();
    Ok((serde_json::to_value(&rows)?, &["COUNTER", "VALUE"], table))
}
