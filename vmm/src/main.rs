//! The `tidepool` binary.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use tidepool_vmm::bench;

/// Tidepool: a memory-first microVM monitor.
#[derive(Debug, Parser)]
#[command(name = "tidepool", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a benchmark suite (alloc, boot, hotplug, reclaim, api, density).
    Bench {
        /// The suite to run.
        suite: String,
        /// Smaller sizes: finishes in under 60 s on 2 cores.
        #[arg(long)]
        quick: bool,
        /// Print one JSON object of figures instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Bench { suite, quick, json } => {
            let opts = bench::BenchOptions { quick, json };
            match bench::run(&suite, &opts) {
                Ok(report) => {
                    if json {
                        println!("{}", report.to_json());
                    } else {
                        print!("{}", report.to_table());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tidepool: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
