//! The `tidepool` binary: `up` starts the daemon with the default config and one default VM
//! (nested under QEMU when this host's KVM cannot run a stock kernel); `serve` runs the daemon (REST API over a Unix socket, VMs managed
//! by [`tidepool_vmm::manager::VmManager`]); `vm`, `balloon` and `host` talk to a running
//! daemon; `bench` runs a benchmark suite.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tidepool_api::cli::{ApiCommand, BalloonCommand, ConnectArgs, ServeArgs, VmCommand};
use tidepool_vmm::bench;

mod runner;

/// Tidepool: a memory-first microVM monitor.
#[derive(Debug, Parser)]
#[command(name = "tidepool", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start the daemon with the embedded default config, build the default guest image if
    /// missing, launch one microVM and print how to resize it; runs until Ctrl-C. Runs the
    /// daemon nested in an L1 VM (QEMU TCG) when this host's KVM cannot run a stock kernel.
    Up(tidepool_vmm::up::UpArgs),
    /// Run a benchmark suite (alloc, boot, hotplug, backing, reclaim, api, density).
    Bench {
        /// The suite to run.
        suite: String,
        /// Smaller sizes: finishes in under 60 s on 2 cores.
        #[arg(long)]
        quick: bool,
        /// Print one JSON object of figures instead of a table.
        #[arg(long)]
        json: bool,
        /// `boot` suite: also boot the stock Debian guest to its `/init` with `tidepool run`
        /// (directly, or inside the nested L1 when this host's KVM cannot run it).
        #[arg(long, conflicts_with = "quick")]
        linux: bool,
        /// `backing` suite: as root, set `shmem_enabled` to `advise` and raise
        /// `vm.nr_hugepages` for the run (host-wide settings; both are put back after).
        #[arg(long)]
        allow_host_tuning: bool,
        /// Directory for the files a suite writes besides its figures (`density`: JSON and
        /// PNG; default target/bench/density).
        #[arg(long)]
        out: Option<std::path::PathBuf>,
        /// `api` suite: start the daemon with this `--guest-nice` (0..=19) instead of its
        /// default, to compare.
        #[arg(long, value_parser = clap::value_parser!(i32).range(0..=19))]
        guest_nice: Option<i32>,
    },
    /// Boot a Linux kernel once, serial console on stdout; exits when the guest powers off or
    /// resets (status 0), fails (1) or times out (124).
    Run(runner::RunArgs),
    /// Run the daemon: the REST API on a Unix socket, until SIGINT or SIGTERM.
    Serve(ServeCmd),
    /// Create, list, inspect, control and resize VMs of a running daemon.
    Vm {
        #[command(flatten)]
        connect: ConnectArgs,
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Balloon target and statistics.
    Balloon {
        #[command(flatten)]
        connect: ConnectArgs,
        #[command(subcommand)]
        command: BalloonCommand,
    },
    /// Host memory per NUMA node.
    Host {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// The daemon's metrics (`GET /metrics`, OpenMetrics text).
    Metrics {
        #[command(flatten)]
        connect: ConnectArgs,
    },
    /// Write a tiny-guest image for `vm create --image` and print the options that start it
    /// (load address, entry point, privilege): the idle guest (reports once, then halts in
    /// KVM; CPL0), or with --virtio-mem-region-mib a guest whose polled virtio-mem driver
    /// follows every resize (CPL3, idling in guest wait requests).
    TinyImage {
        /// Boot RAM of the VM it is for, in MiB (sets how much the page tables map).
        #[arg(long, default_value_t = 64)]
        memory_mib: u64,
        /// Hot-plug region of the VM it is for, in MiB: build the virtio-mem driver guest.
        #[arg(long)]
        virtio_mem_region_mib: Option<u64>,
        /// Where to write the image.
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Load generator for `bench api`: drives the API of a running daemon from this process
    /// and prints one JSON report.
    #[command(hide = true)]
    Loadgen(bench::loadgen::LoadgenArgs),
    /// Boot one Linux VM under a NUMA policy in this process and check that its boot RAM's
    /// pages sit on the host nodes their pool blocks came from (the nested tier-3 test).
    #[command(hide = true)]
    NumaCheck(bench::numa_check::NumaCheckArgs),
}

#[derive(Debug, Args)]
struct ServeCmd {
    #[command(flatten)]
    api: ServeArgs,
    /// Pool memory per host NUMA node, in MiB (default: each node's memory).
    #[arg(long)]
    pool_mib: Option<u64>,
    /// Seconds the daemon waits for a VM's thread before answering 504.
    #[arg(long, default_value_t = 20)]
    vm_timeout: u64,
    /// Resident memory budget of the reclaim engine, in MiB (default: the pool's size).
    #[arg(long)]
    reclaim_budget_mib: Option<u64>,
    /// Reclaim phases the engine may run, comma-separated, from reported (count reported
    /// pages, start free page hinting passes), balloon, drop_clean, swap_out and split_huge
    /// (default: all). They always run in that order.
    #[arg(long, value_delimiter = ',')]
    reclaim_phases: Option<Vec<tidepool_vmm::reclaim::Phase>>,
    /// The swap file (default: `swap` in the socket's directory, or
    /// /var/tmp/tidepool-$UID/swap-HASH, HASH naming that directory, when it is tmpfs). Created on the
    /// first VM.
    #[arg(long)]
    swap_path: Option<std::path::PathBuf>,
    /// Largest size of the swap file, in MiB (default: the pool's size; capped by free disk).
    #[arg(long)]
    swap_max_mib: Option<u64>,
    /// Run without swap (reclaim phases 3-4 answer unsupported).
    #[arg(long)]
    no_swap: bool,
    /// Contiguous free block size the pool monitor keeps available by compacting, in MiB: a
    /// power of two from 2 (one pool block: compaction never fires; the default) to 1024.
    #[arg(long)]
    compact_order_mib: Option<u64>,
    /// Compact when the fragmentation index at that size exceeds this, in (0, 1]
    /// (default 0.5).
    #[arg(long)]
    compact_threshold: Option<f64>,
    /// Nice value of the guests' threads (vCPUs, devices), 0..=19: below the daemon's own
    /// threads so the API answers promptly while guests keep the cores busy.
    #[arg(long, default_value_t = tidepool_vmm::latency::DEFAULT_GUEST_NICE,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    guest_nice: i32,
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tidepool_vmm::latency::runtime().map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn serve(cmd: &ServeCmd) -> Result<(), String> {
    let cfg = cmd.api.to_config().map_err(|e| e.to_string())?;
    let mut reclaim = tidepool_vmm::manager::DaemonReclaimConfig::default();
    reclaim.engine.budget_bytes = cmd.reclaim_budget_mib.map(|m| m << 20);
    if let Some(list) = &cmd.reclaim_phases {
        reclaim.engine.phases = tidepool_vmm::reclaim::Phase::ALL
            .into_iter()
            .filter(|p| list.contains(p))
            .collect();
    }
    reclaim.swap.enabled = !cmd.no_swap;
    reclaim.swap.path = cmd.swap_path.clone();
    reclaim.swap.runtime_dir = cfg.socket_path.parent().map(|d| d.to_path_buf());
    reclaim.swap.max_bytes = cmd.swap_max_mib.map(|m| m << 20);
    reclaim
        .monitor
        .set_compaction(cmd.compact_order_mib, cmd.compact_threshold)
        .map_err(|e| e.to_string())?;
    let manager = tidepool_vmm::up::daemon::build_manager_with(
        cmd.pool_mib.map(|m| m << 20),
        Duration::from_secs(cmd.vm_timeout),
        reclaim,
    )?;
    manager
        .set_guest_nice(cmd.guest_nice)
        .map_err(|e| e.to_string())?;
    let rt = runtime()?;
    let backend: Arc<dyn tidepool_api::ApiBackend> = manager.clone();
    let result = rt.block_on(tidepool_api::serve(backend, cfg));
    // Stop every VM and give its memory back before exiting.
    manager.shutdown();
    result.map_err(|e| e.to_string())
}

fn client(cmd: ApiCommand, connect: &ConnectArgs) -> Result<(), String> {
    let rt = runtime()?;
    // Without --socket, and with no daemon at the serve default, talk to `tidepool up`'s.
    let mut connect = connect.clone();
    connect.socket = tidepool_vmm::up::paths::client_socket(&connect.socket);
    rt.block_on(tidepool_api::cli::run(&cmd, &connect))
        .map_err(|e| e.to_string())
}

fn tiny_image(
    memory_mib: u64,
    region_mib: Option<u64>,
    out: &std::path::Path,
) -> Result<(), String> {
    use tidepool_vmm::manager::images::{idle_guest, virtio_mem_guest};
    let img = match region_mib {
        Some(r) => virtio_mem_guest(memory_mib, r),
        None => idle_guest(memory_mib),
    }
    .map_err(|e| e.to_string())?;
    let bytes = img.inline.unwrap_or_default();
    std::fs::write(out, &bytes).map_err(|e| format!("writing {}: {e}", out.display()))?;
    let privilege = match img.privilege {
        tidepool_api::types::ImagePrivilege::Kernel => "kernel",
        tidepool_api::types::ImagePrivilege::User => "user",
    };
    println!(
        "--load-addr {:#x} --entry {:#x} --privilege {privilege}",
        img.load_addr, img.entry
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        // The runner has its own exit statuses (0 clean end, 1 failure, 124 timeout).
        Command::Run(args) => return runner::main(args),
        Command::Bench {
            suite,
            quick,
            json,
            linux,
            allow_host_tuning,
            out,
            guest_nice,
        } => {
            let opts = bench::BenchOptions {
                quick,
                json,
                linux,
                allow_host_tuning,
                out,
                guest_nice,
            };
            match bench::run(&suite, &opts) {
                Ok(report) => {
                    if json {
                        println!("{}", report.to_json());
                    } else {
                        print!("{}", report.to_table());
                    }
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        }
        Command::Up(args) => tidepool_vmm::up::run(&args).map_err(|e| e.to_string()),
        Command::Serve(cmd) => {
            // The log is written by its own thread: a handler logging a request never waits
            // for stderr (a file whose journal is committing, a slow journald), which cost
            // requests 10-50 ms now and then. Lines beyond the buffer are dropped, not
            // waited for; the guard flushes the rest when serve returns.
            let (writer, _flush) = tracing_appender::non_blocking::NonBlockingBuilder::default()
                .lossy(true)
                .thread_name("log-writer")
                .finish(std::io::stderr());
            let _ = tracing_subscriber::fmt()
                .with_env_filter(
                    tracing_subscriber::EnvFilter::try_from_default_env()
                        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
                )
                .with_writer(writer)
                .try_init();
            serve(&cmd)
        }
        Command::Vm { connect, command } => client(ApiCommand::Vm(command), &connect),
        Command::Balloon { connect, command } => client(ApiCommand::Balloon(command), &connect),
        Command::Host { connect } => client(ApiCommand::Host, &connect),
        Command::Metrics { connect } => client(ApiCommand::Metrics, &connect),
        Command::TinyImage {
            memory_mib,
            virtio_mem_region_mib,
            out,
        } => tiny_image(memory_mib, virtio_mem_region_mib, &out),
        Command::Loadgen(args) => bench::loadgen::run_loadgen(&args)
            .map_err(|e| e.to_string())
            .and_then(|r| {
                serde_json::to_string(&r)
                    .map(|s| println!("{s}"))
                    .map_err(|e| e.to_string())
            }),
        Command::NumaCheck(args) => match bench::numa_check::run(&args) {
            Ok(true) => Ok(()),
            Ok(false) => Err("numa-check: placement check failed (see NUMA-CHECK result)".into()),
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidepool: {e}");
            ExitCode::FAILURE
        }
    }
}
