//! CLI command definitions (clap) and run functions that use the [`Client`].
//!
//! The `tidepool` binary embeds [`ApiCommand`] (or [`VmCommand`], [`BalloonCommand`]) and
//! [`ConnectArgs`] in its own parser and calls [`run`]; `serve` uses [`ServeArgs`] and
//! [`crate::serve`]. Output goes to a writer: human tables by default, JSON with `--json`.

pub mod args;
pub mod output;
#[cfg(test)]
mod tests;

pub use args::{
    parse_size_mib, ApiCli, ApiCommand, BalloonCommand, ConnectArgs, CreateArgs, ServeArgs,
    VmCommand,
};

use crate::client::{Client, ClientError};
use crate::types::{MemoryInfo, ResizePhase, StateAction};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::io::Write;
use std::time::{Duration, Instant};

/// Errors of CLI commands.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// The request failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// Writing the output failed.
    #[error("writing output: {0}")]
    Io(#[from] std::io::Error),
    /// The resize did not complete in time.
    #[error("resize of {id} timed out after {waited:?}: plugged {plugged_mib} MiB of requested {requested_mib} MiB ({reason})")]
    ResizeTimeout {
        /// VM id.
        id: String,
        /// How long the CLI waited.
        waited: Duration,
        /// Plugged RAM at the end.
        plugged_mib: u64,
        /// Requested RAM.
        requested_mib: u64,
        /// Why, as far as the daemon knows.
        reason: String,
    },
    /// The daemon reports the resize as failed, or another resize replaced it.
    #[error("resize of {id} failed: {reason}")]
    ResizeFailed {
        /// VM id.
        id: String,
        /// The reason.
        reason: String,
    },
}

/// How output is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OutputOpts {
    /// JSON instead of tables.
    pub json: bool,
    /// Show a progress bar during `vm resize` (on stderr, only when it is a terminal).
    pub progress: bool,
}

/// How `vm resize` polls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResizeWait {
    /// Give up after this long.
    pub timeout: Duration,
    /// Time between polls.
    pub poll: Duration,
}

fn emit<T: Serialize>(
    out: &mut dyn Write,
    opts: OutputOpts,
    value: &T,
    human: impl FnOnce(&T) -> String,
) -> Result<(), CliError> {
    if opts.json {
        let text = serde_json::to_string_pretty(value)
            .map_err(|e| CliError::Usage(format!("cannot encode output: {e}")))?;
        writeln!(out, "{text}")?;
    } else {
        write!(out, "{}", human(value))?;
    }
    Ok(())
}

/// Runs an API command against the daemon described by `connect`, printing to stdout.
pub async fn run(cmd: &ApiCommand, connect: &ConnectArgs) -> Result<(), CliError> {
    let client = connect.client()?;
    let opts = OutputOpts {
        json: connect.json,
        progress: !connect.json,
    };
    let mut stdout = std::io::stdout();
    run_with(cmd, &client, opts, &mut stdout).await
}

/// Runs an API command with an explicit client and writer (used by tests).
pub async fn run_with(
    cmd: &ApiCommand,
    client: &Client,
    opts: OutputOpts,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        ApiCommand::Vm(c) => run_vm(c, client, opts, out).await,
        ApiCommand::Balloon(c) => run_balloon(c, client, opts, out).await,
        ApiCommand::Host => {
            let h = client.host().await?;
            emit(out, opts, &h, output::host)
        }
        ApiCommand::Metrics => {
            let text = client.metrics().await?;
            write!(out, "{text}")?;
            Ok(())
        }
    }
}

/// Runs a `vm ...` command.
pub async fn run_vm(
    cmd: &VmCommand,
    client: &Client,
    opts: OutputOpts,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    let state = |id: &str, action| {
        let id = id.to_string();
        async move { client.set_state(&id, action).await }
    };
    match cmd {
        VmCommand::Create(args) => {
            let req = args.to_request()?;
            crate::validate::create_vm(&req).map_err(|e| CliError::Usage(e.to_string()))?;
            let vm = client.create_vm(&req).await?;
            emit(out, opts, &vm, output::vm_show)
        }
        VmCommand::List => {
            let vms = client.list_vms().await?;
            emit(out, opts, &vms, |v| output::vm_list(v))
        }
        VmCommand::Show { id } => emit(out, opts, &client.get_vm(id).await?, output::vm_show),
        VmCommand::Delete { id } => {
            client.delete_vm(id).await?;
            emit(out, opts, &serde_json::json!({ "deleted": id }), |_| {
                format!("deleted {id}\n")
            })
        }
        VmCommand::Start { id } => emit(
            out,
            opts,
            &state(id, StateAction::Start).await?,
            output::vm_show,
        ),
        VmCommand::Pause { id } => emit(
            out,
            opts,
            &state(id, StateAction::Pause).await?,
            output::vm_show,
        ),
        VmCommand::Resume { id } => emit(
            out,
            opts,
            &state(id, StateAction::Resume).await?,
            output::vm_show,
        ),
        VmCommand::Stop { id } => emit(
            out,
            opts,
            &state(id, StateAction::Stop).await?,
            output::vm_show,
        ),
        VmCommand::Memory { id } => emit(out, opts, &client.get_memory(id).await?, output::memory),
        VmCommand::Resize {
            id,
            size,
            timeout,
            no_wait,
        } => {
            let mib = parse_size_mib(size)?;
            if *no_wait {
                let acc = client.resize_memory(id, mib).await?;
                return emit(out, opts, &acc.memory, output::memory);
            }
            let wait = ResizeWait {
                timeout: Duration::from_secs(*timeout),
                poll: Duration::from_millis(250),
            };
            let m = resize_and_wait(client, id, mib, wait, opts.progress).await?;
            emit(out, opts, &m, output::memory)
        }
    }
}

/// Runs a `balloon ...` command.
pub async fn run_balloon(
    cmd: &BalloonCommand,
    client: &Client,
    opts: OutputOpts,
    out: &mut dyn Write,
) -> Result<(), CliError> {
    match cmd {
        BalloonCommand::Set { id, size } => {
            let b = client.set_balloon(id, parse_size_mib(size)?).await?;
            emit(out, opts, &b, output::balloon)
        }
        BalloonCommand::Stats { id } => emit(
            out,
            opts,
            &client.balloon_stats(id).await?,
            output::balloon_stats,
        ),
    }
}

/// Sends a resize and polls `GET /v1/vms/{id}/memory` until plugged equals requested,
/// showing a progress bar. Fails with the daemon's reason when the resize fails, when another
/// resize replaces the target, or on timeout.
pub async fn resize_and_wait(
    client: &Client,
    id: &str,
    requested_mib: u64,
    wait: ResizeWait,
    progress: bool,
) -> Result<MemoryInfo, CliError> {
    let start = Instant::now();
    let acc = client.resize_memory(id, requested_mib).await?;
    let from = acc.memory.plugged_mib;
    let total = from.abs_diff(requested_mib);
    let bar = if progress {
        let bar = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template("{msg} [{elapsed_precise}] [{bar:40}] {pos}/{len} MiB")
        {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(format!("resizing {id} {from} -> {requested_mib} MiB"));
        bar
    } else {
        ProgressBar::hidden()
    };
    let mut m = acc.memory;
    loop {
        bar.set_position(from.abs_diff(m.plugged_mib).min(total));
        if m.requested_mib != requested_mib {
            bar.abandon();
            return Err(CliError::ResizeFailed {
                id: id.to_string(),
                reason: format!(
                    "another resize changed the target to {} MiB",
                    m.requested_mib
                ),
            });
        }
        if m.plugged_mib == m.requested_mib {
            bar.finish();
            return Ok(m);
        }
        if m.resize.phase == ResizePhase::Failed {
            bar.abandon();
            return Err(CliError::ResizeFailed {
                id: id.to_string(),
                reason: m.resize.error.clone().unwrap_or_else(|| "unknown".into()),
            });
        }
        if start.elapsed() >= wait.timeout {
            bar.abandon();
            return Err(CliError::ResizeTimeout {
                id: id.to_string(),
                waited: start.elapsed(),
                plugged_mib: m.plugged_mib,
                requested_mib: m.requested_mib,
                reason: m
                    .resize
                    .error
                    .clone()
                    .unwrap_or_else(|| "the guest made no further progress".into()),
            });
        }
        tokio::time::sleep(wait.poll).await;
        m = client.get_memory(id).await?;
    }
}
