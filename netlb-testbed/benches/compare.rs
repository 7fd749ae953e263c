//! `cargo xtask bench` (the comparison): netlb, the direct pod IP and
//! kube-proxy's iptables and nftables datapaths on one topology. Figures
//! only; see `netlb_testbed::compare`. Arguments after `--`:
//! `[--quick|--full] [--services 1,1000] [--endpoints N] [--rounds N]
//! [--iptables-backend nft|legacy] [--out DIR]`.

use std::path::PathBuf;

use clap::Parser;
use netlb_testbed::compare::{self, IptablesBackend, Profile};

#[derive(Parser)]
struct Args {
    /// CI's tiny sweep.
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// Adds 100k Services and more rounds.
    #[arg(long)]
    full: bool,
    /// Numbers of Services, comma-separated (overrides the profile's).
    #[arg(long, value_delimiter = ',')]
    services: Option<Vec<usize>>,
    #[arg(long)]
    endpoints: Option<usize>,
    #[arg(long)]
    rounds: Option<usize>,
    /// Modes, comma-separated (default: direct,netlb,iptables,nftables).
    #[arg(long, value_delimiter = ',', value_parser = ["direct", "netlb", "iptables", "nftables"])]
    modes: Option<Vec<String>>,
    #[arg(long, value_parser = ["nft", "legacy"])]
    iptables_backend: Option<String>,
    /// Where the files go (default `target/bench/compare-<profile>-<time>`).
    #[arg(long)]
    out: Option<PathBuf>,
    /// cargo bench passes `--bench`.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let mut profile = if args.quick {
        Profile::quick()
    } else if args.full {
        Profile::full()
    } else {
        Profile::default_profile()
    };
    if let Some(s) = args.services {
        profile.scales = s;
    }
    if let Some(e) = args.endpoints {
        profile.endpoints = e.max(1);
    }
    if let Some(r) = args.rounds {
        profile.rounds = r.max(1);
    }
    if let Some(modes) = args.modes {
        profile.modes = compare::Mode::ALL
            .into_iter()
            .filter(|m| modes.iter().any(|n| n == m.name()))
            .collect();
    }
    if args.iptables_backend.as_deref() == Some("legacy") {
        profile.iptables_backend = IptablesBackend::Legacy;
    }
    let out = args.out.unwrap_or_else(|| {
        let stamp = jiff::Timestamp::now()
            .strftime("%Y%m%dT%H%M%SZ")
            .to_string();
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/bench")
            .join(format!("compare-{}-{stamp}", profile.name))
    });
    netlb_testbed::topology::cleanup_stale(None);
    let mut log = |line: &str| eprintln!("{line}");
    match compare::run(&profile, &out, &mut log) {
        Ok(_) => {
            match std::fs::read_to_string(out.join("summary.md")) {
                Ok(md) => println!("{md}"),
                Err(e) => eprintln!("reading summary.md: {e}"),
            }
            println!("files: {}", out.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("comparison failed: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
