//! The one-shot runner behind `tidepool run`: create a VM, boot a Linux kernel with the serial
//! console on a writer, and return when the guest powers off, resets, fails or the timeout
//! passes.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::cmdline::{self, CpuWorkarounds};
use super::vcpu_thread::{kernel_va_to_pa, VcpuThread};
use super::{load_linux, setup_vcpu, BootError, BootInfo, CpuSetupError, EntryPreference};
use crate::kvm::{KvmError, StopReason, VcpuError, Vm, VmConfig};
use crate::legacy::{
    GuestStop, IrqLine, LegacyDevices, LegacyExitHandler, MarkerLog, MarkerWriter, NoMmio,
    SerialConsole, COM1_GSI,
};
use crate::memory::{LayoutConfig, MIB};

/// What to run.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Kernel image (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Command-line options added after the defaults.
    pub cmdline: String,
    /// Start from [`cmdline::DEFAULT_CMDLINE`].
    pub default_cmdline: bool,
    /// CPU work-around options.
    pub cpu_workarounds: CpuWorkarounds,
    /// Add `tsc_early_khz=<KVM_GET_TSC_KHZ>` (for guests without kvm-clock).
    pub tsc_early_khz: bool,
    /// Boot RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Give up after this long.
    pub timeout: Option<Duration>,
    /// Entry preference.
    pub entry: EntryPreference,
    /// Console lines to time (first appearance).
    pub markers: Vec<String>,
    /// Complete `int3` (as #BP) and `fwait` (as a no-op) when this host's KVM fails to emulate
    /// them at guest CPL0 (see `boot::vcpu_thread`).
    pub cpl0_fixups: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: String::new(),
            default_cmdline: true,
            cpu_workarounds: CpuWorkarounds::Auto,
            tsc_early_khz: false,
            memory_mib: 512,
            vcpus: 1,
            timeout: None,
            entry: EntryPreference::Pvh,
            markers: Vec::new(),
            cpl0_fixups: false,
        }
    }
}

/// How the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RunEnd {
    /// ACPI S5.
    PowerOff,
    /// i8042 reset.
    Reset,
    /// Triple fault (`reboot=t`, or a crash that early).
    TripleFault {
        /// RIP at the shutdown.
        rip: u64,
    },
    /// The timeout passed first.
    Timeout,
    /// A vCPU failed (emulation failure, KVM error...).
    Failed(String),
}

impl RunEnd {
    /// Whether the guest ended on its own (power-off, reset or reboot).
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            RunEnd::PowerOff | RunEnd::Reset | RunEnd::TripleFault { .. }
        )
    }
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// How it ended.
    pub end: RunEnd,
    /// What was loaded.
    pub boot: BootInfo,
    /// VM creation, loading and vCPU set-up, until the first vCPU started.
    pub setup: Duration,
    /// From the start of the run to its end.
    pub wall: Duration,
    /// Console markers, last line, first byte (timed from the start of the run).
    pub console: MarkerLog,
    /// KVM exits per vCPU.
    pub exits: Vec<u64>,
    /// Instruction bytes at the failing RIP (emulation failures), if readable.
    pub insn_bytes: Option<Vec<u8>>,
    /// Serial register traffic: (writes by offset, reads by offset, THRE re-arms), and port
    /// accesses no device claimed.
    pub serial_stats: ([u64; 8], [u64; 8], u64, u64),
    /// Emulation failures completed by the CPL0 fix-ups.
    pub cpl0_fixups: u64,
}

/// Errors before the guest ran.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// KVM.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Loading.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU set-up.
    #[error(transparent)]
    Cpu(#[from] CpuSetupError),
    /// A vCPU could not be started.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The command line.
    #[error(transparent)]
    Cmdline(#[from] cmdline::CmdlineError),
    /// The serial interrupt.
    #[error("serial interrupt (irqfd on GSI {COM1_GSI}): {0}")]
    SerialIrq(String),
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
}

/// Boot `config.kernel` and run it to its end, the console going to `out`.
pub fn run(config: &RunConfig, out: Box<dyn Write + Send>) -> Result<RunReport, RunError> {
    let start = Instant::now();
    if config.vcpus == 0 {
        return Err(RunError::Config("--vcpus must be at least 1".into()));
    }
    let vm = Vm::new(VmConfig {
        layout: LayoutConfig {
            boot_ram: config.memory_mib.saturating_mul(MIB),
            hotplug_size: 0,
        },
        platform: true,
        hotplug_memslots: crate::kvm::HotplugMemslots::default(),
    })?;
    let mut vcpus = Vec::new();
    for id in 0..config.vcpus {
        vcpus.push(vm.create_vcpu(u64::from(id))?);
    }
    let mut extra = config.cmdline.clone();
    if config.tsc_early_khz {
        if let Ok(khz) = vcpus[0].fd().get_tsc_khz() {
            extra = format!("tsc_early_khz={khz} {extra}");
        }
    }
    let line = cmdline::build(
        config.default_cmdline,
        config.cpu_workarounds,
        cmdline::host_is_pvm(),
        &extra,
    )?;
    let boot = load_linux(
        &vm,
        &super::LinuxBootConfig {
            kernel: config.kernel.clone(),
            initrd: config.initrd.clone(),
            cmdline: line,
            vcpus: config.vcpus,
            virtio_mmio: Vec::new(),
            numa: Vec::new(),
            entry: config.entry,
        },
    )?;
    for (i, v) in vcpus.iter().enumerate() {
        setup_vcpu(v, &boot.entry, i == 0)?;
    }

    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| RunError::SerialIrq(e.to_string()))?;
    vm.fd()
        .register_irqfd(&irq, COM1_GSI)
        .map_err(|e| RunError::SerialIrq(e.to_string()))?;
    let irq = IrqLine::Irqfd(irq);
    let (writer, log) = MarkerWriter::new(out, &config.markers, start);
    let serial = SerialConsole::new(irq, Box::new(writer));
    let devices = Arc::new(Mutex::new(LegacyDevices::new(serial)));

    let setup = start.elapsed();
    let mut handles = Vec::new();
    for v in vcpus {
        handles.push(VcpuThread::spawn(
            v,
            LegacyExitHandler::new(Arc::clone(&devices), NoMmio),
            Arc::clone(vm.window()),
            config.cpl0_fixups,
        )?);
    }
    let deadline = config.timeout.map(|t| start + t);
    let mut timed_out = false;
    loop {
        if handles.iter().any(|h| h.is_finished()) {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            timed_out = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut first_end: Option<RunEnd> = None;
    let mut exits = Vec::new();
    let mut cpl0_fixups = 0;
    let mut fail_rip = None;
    for h in handles {
        let outcome = h.stop_and_join()?;
        exits.push(outcome.exits);
        cpl0_fixups += outcome.fixups;
        let end = match outcome.result {
            Ok(StopReason::Kicked) => continue,
            Ok(StopReason::Handler) => {
                match devices
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .stop_requested()
                {
                    Some(GuestStop::PowerOff) => RunEnd::PowerOff,
                    Some(GuestStop::Reset) => RunEnd::Reset,
                    None => RunEnd::Failed("handler stopped without a request".into()),
                }
            }
            Ok(StopReason::Halted) => RunEnd::Failed("vCPU halted outside the irqchip".into()),
            Err(VcpuError::Shutdown { rip, .. }) => RunEnd::TripleFault { rip },
            Err(e) => {
                if let VcpuError::InternalError { rip, .. } = &e {
                    fail_rip = Some(*rip);
                }
                RunEnd::Failed(e.to_string())
            }
        };
        first_end.get_or_insert(end);
    }
    let end = match first_end {
        Some(e) => e,
        None if timed_out => RunEnd::Timeout,
        None => RunEnd::Failed("every vCPU was kicked".into()),
    };
    let insn_bytes = fail_rip.and_then(kernel_va_to_pa).and_then(|pa| {
        let mem = vm.window().guest_memory().ok()?;
        let mut b = vec![0u8; 16];
        mem.read_slice(&mut b, GuestAddress(pa)).ok()?;
        Some(b)
    });
    let console = log.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let serial_stats = {
        let d = devices.lock().unwrap_or_else(|e| e.into_inner());
        let s = d.serial();
        (s.reg_writes, s.reg_reads, s.rearms, d.unclaimed)
    };
    Ok(RunReport {
        end,
        boot,
        setup,
        wall: start.elapsed(),
        console,
        exits,
        insn_bytes,
        serial_stats,
        cpl0_fixups,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_addresses_translate() {
        assert_eq!(kernel_va_to_pa(0xffff_ffff_8100_0000), Some(0x100_0000));
        assert_eq!(kernel_va_to_pa(0x100_0850), Some(0x100_0850));
        assert_eq!(kernel_va_to_pa(0xffff_8880_0000_0000), None);
        assert!(RunEnd::PowerOff.is_clean());
        assert!(!RunEnd::Timeout.is_clean());
    }
}
