//! netlb-load: the benchmark's load generator (netperf TCP_CRR / TCP_RR
//! shapes over HTTP/1.1, against `netlb-echo serve --http`).
//!
//! `netlb-load crr|rr --targets FILE [--concurrency N] [--duration-s S]
//! [--seed X]`: `crr` opens a new connection per request to a target picked
//! at random per connection among the file's `IP:PORT` lines; `rr` keeps one
//! connection per worker, to a target picked when the worker starts. Prints
//! one JSON object: requests, failures, seconds, rate, p50_us, p99_us.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, ValueEnum};
use netlb_testbed::load::{LoadMode, LoadSpec, run};

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    /// A new connection per request (TCP_CRR).
    Crr,
    /// Requests on kept-alive connections (TCP_RR).
    Rr,
}

#[derive(Parser)]
#[command(about = "HTTP load generator for netlb's benchmarks")]
struct Args {
    #[arg(value_enum)]
    mode: Mode,
    /// A file of `IP:PORT` lines; each connection picks one at random.
    #[arg(long)]
    targets: PathBuf,
    /// Concurrent workers (connections in flight at most).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, default_value_t = 5.0)]
    duration_s: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let text = match std::fs::read_to_string(&args.targets) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("netlb-load: reading {}: {e}", args.targets.display());
            return ExitCode::from(2);
        }
    };
    let mut targets = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        match line.parse::<SocketAddr>() {
            Ok(a) => targets.push(a),
            Err(e) => {
                eprintln!(
                    "netlb-load: {} line {}: {line:?}: {e}",
                    args.targets.display(),
                    n + 1
                );
                return ExitCode::from(2);
            }
        }
    }
    if targets.is_empty() {
        eprintln!("netlb-load: {} has no targets", args.targets.display());
        return ExitCode::from(2);
    }
    let report = run(&LoadSpec {
        mode: match args.mode {
            Mode::Crr => LoadMode::ConnectRequestClose,
            Mode::Rr => LoadMode::KeepAlive,
        },
        targets,
        concurrency: args.concurrency.max(1),
        duration: Duration::from_secs_f64(args.duration_s.max(0.1)),
        seed: args.seed,
    });
    match serde_json::to_string(&report) {
        Ok(json) => println!("{json}"),
        Err(e) => {
            eprintln!("netlb-load: {e}");
            return ExitCode::FAILURE;
        }
    }
    if report.requests == 0 {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
