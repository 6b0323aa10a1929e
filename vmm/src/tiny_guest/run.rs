//! Running a tiny guest: load the image into a VM's window, start vCPU 0, collect reports.

use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::program::{MAX_TAG, REPORT_BASE, TAG_DONE};
use super::{GuestImage, TinyGuestBuilder, TinyGuestError};
use crate::kvm::{Exit, ExitAction, ExitHandler, KvmError, RunSummary, VcpuError, Vm};
use crate::memory::MemoryError;

/// Errors from running a tiny guest.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Creating the VM or vCPU failed.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// The vCPU failed to start or its thread panicked.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Loading the image failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Building the image failed.
    #[error(transparent)]
    Build(#[from] TinyGuestError),
    /// Writing the image into guest memory failed.
    #[error("loading the image at {addr:#x}: {reason}")]
    Load {
        /// Load address.
        addr: u64,
        /// vm-memory's message.
        reason: String,
    },
}

/// One value the guest reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestReport {
    /// Tag (see `program::TAG_*`).
    pub tag: u64,
    /// Value written.
    pub value: u64,
    /// When the VMM saw it.
    pub at: Instant,
}

/// Exit handler for the tiny guest: records 8-byte writes to the report window and stops on
/// [`TAG_DONE`]. Any other exit is refused (becomes [`VcpuError::Handler`]).
#[derive(Debug, Default)]
pub struct ReportCollector {
    /// Reports in arrival order.
    pub reports: Vec<GuestReport>,
}

impl ReportCollector {
    /// The last value reported under `tag`.
    pub fn value(&self, tag: u64) -> Option<u64> {
        self.reports
            .iter()
            .rev()
            .find(|r| r.tag == tag)
            .map(|r| r.value)
    }
}

impl ExitHandler for ReportCollector {
    fn handle(&mut self, exit: Exit<'_>) -> Result<ExitAction, String> {
        match exit {
            Exit::MmioWrite { addr, data }
                if (REPORT_BASE..=REPORT_BASE + MAX_TAG * 8).contains(&addr) && data.len() == 8 =>
            {
                let tag = (addr - REPORT_BASE) / 8;
                let mut v = [0u8; 8];
                v.copy_from_slice(data);
                self.reports.push(GuestReport {
                    tag,
                    value: u64::from_le_bytes(v),
                    at: Instant::now(),
                });
                Ok(if tag == TAG_DONE {
                    ExitAction::Stop
                } else {
                    ExitAction::Continue
                })
            }
            other => Err(format!("tiny guest: unexpected {other:?}")),
        }
    }
}

/// The result of [`run_tiny_guest`].
#[derive(Debug)]
pub struct TinyRun {
    /// The vCPU's summary; its handler holds the reports.
    pub summary: RunSummary<ReportCollector>,
    /// Whether the vCPU had to be kicked because it did not finish in time.
    pub kicked: bool,
    /// From the start of `Vm::new` to the first KVM_RUN.
    pub create_to_first_run: Option<Duration>,
    /// Where the time before the first KVM_RUN went, after `Vm::new`.
    pub phases: RunPhases,
}

/// Phases of starting a tiny guest on an existing VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunPhases {
    /// From the end of `Vm::new` to the start of [`run_tiny_guest_on`] (image building etc.).
    pub before_run: Duration,
    /// Copying the image into guest memory (building the vm-memory view included).
    pub load_image: Duration,
    /// KVM_CREATE_VCPU and KVM_SET_CPUID2.
    pub create_vcpu: Duration,
    /// KVM_GET_SREGS, KVM_SET_SREGS, KVM_SET_REGS.
    pub set_registers: Duration,
    /// Starting the vCPU thread until it issues its first KVM_RUN.
    pub thread_to_first_run: Duration,
}

/// [`measure_boot_phases`]'s result: total and per-phase times to the first KVM_RUN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootPhases {
    /// From the start of `Vm::new` to the first KVM_RUN.
    pub total: Duration,
    /// Phases of `Vm::new`.
    pub vm: crate::kvm::VmTimings,
    /// Phases after `Vm::new`.
    pub run: RunPhases,
}

/// Copy `image` into `vm`'s memory, create vCPU 0 in the image's boot state, run it on its own
/// thread until the guest reports done (or `timeout` passes, then it is kicked).
pub fn run_tiny_guest(vm: &Vm, image: &GuestImage, timeout: Duration) -> Result<TinyRun, RunError> {
    run_tiny_guest_on(vm, image, 0, timeout)
}

/// [`run_tiny_guest`] on a new vCPU `vcpu_id` (a VM can run several images one after the other,
/// each on a fresh vCPU).
pub fn run_tiny_guest_on(
    vm: &Vm,
    image: &GuestImage,
    vcpu_id: u64,
    timeout: Duration,
) -> Result<TinyRun, RunError> {
    let t0 = Instant::now();
    let vm_done = vm.created_at() + vm.timings().total();
    load_image(vm, image)?;
    let t1 = Instant::now();
    let vcpu = vm.create_vcpu(vcpu_id)?;
    let t2 = Instant::now();
    let mut sregs = vcpu.sregs()?;
    image.boot.apply_sregs(&mut sregs);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&image.boot.regs())?;
    vcpu.set_runnable()?;
    let t3 = Instant::now();
    let handle = vcpu.spawn(ReportCollector::default())?;
    let (summary, kicked) = handle.join_timeout(timeout)?;
    let create_to_first_run = summary
        .first_run
        .map(|t| t.saturating_duration_since(vm.created_at()));
    let phases = RunPhases {
        before_run: t0.saturating_duration_since(vm_done),
        load_image: t1 - t0,
        create_vcpu: t2 - t1,
        set_registers: t3 - t2,
        thread_to_first_run: summary
            .first_run
            .map(|t| t.saturating_duration_since(t3))
            .unwrap_or_default(),
    };
    Ok(TinyRun {
        summary,
        kicked,
        create_to_first_run,
        phases,
    })
}

/// Load `image` and run every program it has at once, program `i` on vCPU `i`, each on its own
/// thread; wait for all (kicking those still running after `timeout`). Results in vCPU order.
pub fn run_tiny_guest_smp(
    vm: &Vm,
    image: &GuestImage,
    timeout: Duration,
) -> Result<Vec<(RunSummary<ReportCollector>, bool)>, RunError> {
    load_image(vm, image)?;
    let mut handles = Vec::new();
    for (i, state) in image.boot_states().enumerate() {
        let vcpu = vm.create_vcpu(i as u64)?;
        let mut sregs = vcpu.sregs()?;
        state.apply_sregs(&mut sregs);
        vcpu.set_sregs(&sregs)?;
        vcpu.set_regs(&state.regs())?;
        vcpu.set_runnable()?;
        handles.push(vcpu.spawn(ReportCollector::default())?);
    }
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    for h in handles {
        let left = deadline.saturating_duration_since(Instant::now());
        out.push(h.join_timeout(left)?);
    }
    Ok(out)
}

pub(crate) fn load_image(vm: &Vm, image: &GuestImage) -> Result<(), RunError> {
    let mem = vm.window().guest_memory()?;
    mem.write_slice(&image.bytes, GuestAddress(image.load_addr))
        .map_err(|e| RunError::Load {
            addr: image.load_addr,
            reason: e.to_string(),
        })
}

/// Time from the start of VM creation (open /dev/kvm, create the VM with irqchip and PIT,
/// reserve the window, register memslots for 64 MiB, build and load a minimal tiny guest,
/// create the vCPU, set CPUID and registers, start its thread) to the first KVM_RUN. The guest
/// runs to completion (it reports done at once) before this returns, so a failure to run is an
/// error, not a figure.
pub fn measure_create_to_first_run() -> Result<Duration, RunError> {
    measure_boot_phases().map(|p| p.total)
}

/// [`measure_create_to_first_run`] with the time split into phases.
pub fn measure_boot_phases() -> Result<BootPhases, RunError> {
    use crate::kvm::VmConfig;
    use crate::memory::{LayoutConfig, MIB};
    let vm = Vm::new(VmConfig {
        layout: LayoutConfig {
            boot_ram: 64 * MIB,
            hotplug_size: 0,
        },
        platform: true,
        hotplug_memslots: crate::kvm::HotplugMemslots::default(),
    })?;
    let image = TinyGuestBuilder::new(vm.window().layout())
        .step(super::Step::Done)
        .build()?;
    let run = run_tiny_guest(&vm, &image, Duration::from_secs(10))?;
    run.summary.result?;
    let total = run
        .create_to_first_run
        .ok_or(RunError::Vcpu(VcpuError::UnexpectedExit {
            id: 0,
            what: "vCPU never entered KVM_RUN".into(),
        }))?;
    Ok(BootPhases {
        total,
        vm: vm.timings(),
        run: run.phases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collector_records_reports_and_stops_on_done() {
        let mut c = ReportCollector::default();
        let w = |c: &mut ReportCollector, addr: u64, data: &[u8]| {
            c.handle(Exit::MmioWrite { addr, data })
        };
        assert_eq!(
            w(&mut c, REPORT_BASE + 8, &7u64.to_le_bytes()),
            Ok(ExitAction::Continue)
        );
        assert_eq!(
            w(&mut c, REPORT_BASE + 16, &9u64.to_le_bytes()),
            Ok(ExitAction::Continue)
        );
        assert_eq!(c.value(1), Some(7));
        assert_eq!(c.value(2), Some(9));
        assert_eq!(c.value(3), None);
        // Wrong size, outside the window, reads and port I/O are refused.
        assert!(w(&mut c, REPORT_BASE + 8, &[1, 2, 3, 4]).is_err());
        assert!(w(&mut c, REPORT_BASE + 0x1000, &0u64.to_le_bytes()).is_err());
        let mut d = [0u8; 8];
        assert!(c
            .handle(Exit::MmioRead {
                addr: REPORT_BASE,
                data: &mut d
            })
            .is_err());
        assert!(c
            .handle(Exit::IoOut {
                port: 0x80,
                data: &[0]
            })
            .is_err());
        assert_eq!(
            w(&mut c, REPORT_BASE, &0u64.to_le_bytes()),
            Ok(ExitAction::Stop)
        );
        assert_eq!(c.reports.len(), 3);
    }
}
