//! `tidepool run`: the one-shot runner's command line (see `tidepool_vmm::boot::run`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use tidepool_vmm::boot::cmdline::CpuWorkarounds;
use tidepool_vmm::boot::run::{run, RunConfig, RunEnd};
use tidepool_vmm::boot::{Entry, EntryPreference};

/// Arguments of `tidepool run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Kernel: an ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
    /// Initrd (initramfs).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// Kernel command-line options, added after Tidepool's defaults.
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Do not start from Tidepool's default command line.
    #[arg(long)]
    no_default_cmdline: bool,
    /// Add the guest options that avoid instructions this host's KVM cannot emulate: auto
    /// (when the host KVM is kvm_pvm), on, off.
    #[arg(long, default_value = "auto")]
    cpu_workarounds: CpuWorkarounds,
    /// Add tsc_early_khz=<KVM's TSC kHz> (for guests without kvm-clock).
    #[arg(long)]
    tsc_early_khz: bool,
    /// Boot RAM in MiB.
    #[arg(long, default_value_t = 512)]
    memory_mib: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Stop the guest after this many seconds (status 124).
    #[arg(long)]
    timeout_s: Option<u64>,
    /// Entry point: pvh (when the ELF has the PVH note) or linux64.
    #[arg(long, default_value = "pvh")]
    entry: EntryPreference,
    /// Console line to time (repeatable); the times are in the summary on stderr.
    #[arg(long = "mark")]
    marks: Vec<String>,
    /// Complete `int3` (as #BP) and `fwait` (as a no-op) when the host's KVM cannot emulate
    /// them at guest CPL0 (a work-around for this machine's kvm_pvm, see docs/boot.md).
    #[arg(long)]
    cpl0_fixups: bool,
}

/// Run it; the summary goes to stderr as `TIDEPOOL-RUN key=value ...` lines.
pub fn main(a: RunArgs) -> ExitCode {
    let config = RunConfig {
        kernel: a.kernel,
        initrd: a.initrd,
        cmdline: a.cmdline,
        default_cmdline: !a.no_default_cmdline,
        cpu_workarounds: a.cpu_workarounds,
        tsc_early_khz: a.tsc_early_khz,
        memory_mib: a.memory_mib,
        vcpus: a.vcpus,
        timeout: a.timeout_s.map(Duration::from_secs),
        entry: a.entry,
        markers: a.marks,
        cpl0_fixups: a.cpl0_fixups,
    };
    let report = match run(&config, Box::new(std::io::stdout())) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tidepool run: {e}");
            return ExitCode::FAILURE;
        }
    };
    let entry = match report.boot.entry {
        Entry::Pvh { rip, .. } => format!("pvh@{rip:#x}"),
        Entry::Linux64 { rip, .. } => format!("linux64@{rip:#x}"),
    };
    eprintln!();
    eprintln!(
        "TIDEPOOL-RUN end={:?} format={:?} entry={} setup_ms={:.1} load_ms={:.1} wall_s={:.3} first_byte_s={} exits={:?}",
        report.end,
        report.boot.format,
        entry,
        report.setup.as_secs_f64() * 1e3,
        report.boot.load_time.as_secs_f64() * 1e3,
        report.wall.as_secs_f64(),
        report
            .console
            .first_byte
            .map_or("-".into(), |d| format!("{:.3}", d.as_secs_f64())),
        report.exits,
    );
    for (m, t) in &report.console.hits {
        eprintln!(
            "TIDEPOOL-RUN-MARK {m} {}",
            t.map_or("never".into(), |d| format!("{:.3}", d.as_secs_f64()))
        );
    }
    eprintln!("TIDEPOOL-RUN-LAST-LINE {}", report.console.last_line);
    let (w, r, rearms, unclaimed) = report.serial_stats;
    eprintln!(
        "TIDEPOOL-RUN-SERIAL writes={w:?} reads={r:?} thre_rearms={rearms} unclaimed_pio={unclaimed}"
    );
    if let Some(b) = &report.insn_bytes {
        eprintln!("TIDEPOOL-RUN-INSN {b:02x?}");
    }
    if report.cpl0_fixups > 0 {
        eprintln!("TIDEPOOL-RUN-CPL0-FIXUPS {}", report.cpl0_fixups);
    }
    eprintln!("TIDEPOOL-RUN-CMDLINE {}", report.boot.cmdline);
    match report.end {
        e if e.is_clean() => ExitCode::SUCCESS,
        RunEnd::Timeout => ExitCode::from(124),
        _ => ExitCode::FAILURE,
    }
}
