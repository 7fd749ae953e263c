//! The netlb-agent command line: one module per subcommand (its flags, and
//! what it prints); the work is the library's.

mod cleanup;
mod list;
mod logging;
mod prepare_node;
mod run;
mod status;

use clap::{CommandFactory as _, FromArgMatches as _, Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(version, about = "netlb: eBPF Kubernetes Service load balancing")]
struct Cli {
    /// Log verbosity as kube-proxy's `--v`: 0-2 info, 3-4 debug, 5 and
    /// more trace. `RUST_LOG` (e.g. `netlb_agent::datapath::sync=debug`),
    /// when set, takes precedence.
    #[arg(short = 'v', long = "v", global = true, default_value_t = 0)]
    verbosity: u8,
    /// Log format: `text` or `json` (one object per line, with the
    /// structured fields).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at startup; boxing clap's derive fields buys nothing"
)]
enum Command {
    Run(run::RunArgs),
    List(list::ListArgs),
    Status(status::StatusArgs),
    Cleanup(cleanup::CleanupArgs),
    PrepareNode(prepare_node::PrepareNodeArgs),
}

/// How `list` and `status` print.
#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

/// Prints `value` as JSON or YAML, or the table `table` makes.
fn print<T: serde::Serialize>(
    output: Output,
    value: &T,
    table: impl FnOnce() -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_saphyr::to_string(value)?),
        Output::Table => print!("{}", table()),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches)?;
    logging::init_logging(cli.verbosity, cli.log_format == "json")?;
    match cli.command {
        Command::Run(mut args) => {
            args.apply_config(&matches)?;
            args.run()
        }
        Command::List(args) => args.run(),
        Command::Status(args) => args.run(),
        Command::Cleanup(args) => args.run(),
        Command::PrepareNode(args) => args.run(),
    }
}
