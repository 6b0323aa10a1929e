//! vCPU threads of the one-shot runner, with optional CPL0 fix-ups for this host's KVM.
//!
//! Under `kvm_pvm`, guest CPL0 code is emulated, and KVM's emulator cannot run some
//! instructions (KVM_EXIT_INTERNAL_ERROR, emulation failure). With fix-ups on, the runner
//! completes two of them itself and re-enters the guest:
//! - `int3` (0xcc): the stock kernel runs one on purpose in `int3_selftest()` at the start of
//!   `alternative_instructions()`. The runner moves RIP past it and injects #BP (vector 3, a
//!   trap) with KVM_SET_VCPU_EVENTS, which is what the CPU would have done; KVM delivers it
//!   through the guest's IDT.
//! - `fwait` (0x9b): `fpu__drop()` runs one when a task that used the FPU exits. With every x87
//!   exception masked (FCW 0x37f, the kernel's default) it has nothing to wait for, so the
//!   runner moves RIP past it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress};

use crate::kvm::vcpu::{install_kick_handler, kick_thread};
use crate::kvm::{ExitHandler, StopReason, Vcpu, VcpuError};
use crate::memory::GuestWindow;

/// What a runner vCPU thread returns.
#[derive(Debug)]
pub struct VcpuOutcome {
    /// How the run ended.
    pub result: Result<StopReason, VcpuError>,
    /// KVM exits.
    pub exits: u64,
    /// Emulation failures completed by [`cpl0_fixup`].
    pub fixups: u64,
}

/// A running vCPU thread of the runner.
#[derive(Debug)]
pub struct VcpuThread {
    stop: Arc<AtomicBool>,
    join: JoinHandle<VcpuOutcome>,
}

/// The guest-physical address of a kernel text address (`__START_KERNEL_map`) or an
/// identity-mapped low address.
pub(crate) fn kernel_va_to_pa(rip: u64) -> Option<u64> {
    const START_KERNEL_MAP: u64 = 0xffff_ffff_8000_0000;
    if rip >= START_KERNEL_MAP {
        Some(rip - START_KERNEL_MAP)
    } else if rip < 1 << 32 {
        Some(rip)
    } else {
        None
    }
}

/// If the instruction at `rip` is `int3` or `fwait`, complete it as the CPU would (see the
/// module comment).
fn cpl0_fixup(vcpu: &Vcpu, window: &Arc<GuestWindow>, rip: u64) -> bool {
    let Some(pa) = kernel_va_to_pa(rip) else {
        return false;
    };
    let Ok(mem) = window.guest_memory() else {
        return false;
    };
    let Ok(byte) = mem.read_obj::<u8>(GuestAddress(pa)) else {
        return false;
    };
    if byte != 0xcc && byte != 0x9b {
        return false;
    }
    let fd = vcpu.fd();
    let Ok(mut regs) = fd.get_regs() else {
        return false;
    };
    if regs.rip != rip {
        return false;
    }
    let Ok(mut events) = fd.get_vcpu_events() else {
        return false;
    };
    regs.rip += 1;
    if byte == 0x9b {
        return fd.set_regs(&regs).is_ok();
    }
    events.exception.injected = 1;
    events.exception.nr = 3;
    events.exception.has_error_code = 0;
    events.exception.error_code = 0;
    fd.set_regs(&regs).is_ok() && fd.set_vcpu_events(&events).is_ok()
}

impl VcpuThread {
    /// Run `vcpu` with `handler` on a new thread.
    pub fn spawn<H: ExitHandler + Send + 'static>(
        mut vcpu: Vcpu,
        mut handler: H,
        window: Arc<GuestWindow>,
        reflect: bool,
    ) -> Result<VcpuThread, VcpuError> {
        install_kick_handler();
        let id = vcpu.id();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let join = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let mut exits = 0;
                let mut first = None;
                let mut fixups = 0;
                loop {
                    let r = vcpu.run_until(&mut handler, &stop2, &mut exits, &mut first);
                    if let Err(VcpuError::InternalError { rip, .. }) = &r {
                        if reflect && cpl0_fixup(&vcpu, &window, *rip) {
                            fixups += 1;
                            continue;
                        }
                    }
                    return VcpuOutcome {
                        result: r,
                        exits,
                        fixups,
                    };
                }
            })
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuThread { stop, join })
    }

    /// Whether the thread has ended.
    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }

    /// Stop the vCPU (if running) and wait for its outcome.
    pub fn stop_and_join(self) -> Result<VcpuOutcome, VcpuError> {
        use std::os::unix::thread::JoinHandleExt;
        self.stop.store(true, Ordering::Release);
        while !self.join.is_finished() {
            // SAFETY: the thread has not been joined (we own its JoinHandle), so its pthread_t
            // is live; the kick signal's handler was installed by `spawn`.
            unsafe { kick_thread(self.join.as_pthread_t()) };
            std::thread::sleep(Duration::from_millis(1));
        }
        self.join.join().map_err(|_| VcpuError::ThreadPanicked {
            id: 0,
            message: "runner vCPU thread panicked".into(),
        })
    }
}
