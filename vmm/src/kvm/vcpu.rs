//! A vCPU and its run loop on its own thread.
//!
//! Exits that carry device traffic (MMIO and port I/O) go to an [`ExitHandler`]; the others
//! become a [`StopReason`] (the guest asked to stop) or a typed [`VcpuError`] (the guest died or
//! KVM failed). Nothing a guest does panics the VMM: a panicking handler ends only its vCPU
//! thread and surfaces as [`VcpuError::ThreadPanicked`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::memory::GuestWindow;

/// Offset from SIGRTMIN of the signal used to kick a vCPU thread out of KVM_RUN.
pub const KICK_SIGNAL_OFFSET: i32 = 2;

/// Errors from running a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// Setting up registers failed.
    #[error("vCPU {id}: {what} failed: {source}")]
    Setup {
        /// vCPU id.
        id: u8,
        /// Which ioctl.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// KVM_RUN itself failed (not EINTR/EAGAIN).
    #[error("vCPU {id}: KVM_RUN failed: {source}")]
    Run {
        /// vCPU id.
        id: u8,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The guest touched guest-physical memory that has no accessible host memory behind it,
    /// such as a virtio-mem block unplugged under the eager memslot strategy (its slot stays
    /// registered over `PROT_NONE`): `KVM_RUN` failed with `EFAULT`, or exited with
    /// KVM_EXIT_MEMORY_FAULT. A guest failure, not a VMM one: the vCPU cannot go on.
    #[error("vCPU {id}: guest touched inaccessible memory{}", .gpa.map(|g| format!(" at gpa {g:#x}")).unwrap_or_default())]
    GuestMemoryFault {
        /// vCPU id.
        id: u8,
        /// The faulting guest-physical address, when KVM reported it
        /// (KVM_EXIT_MEMORY_FAULT); a plain `EFAULT` does not say.
        gpa: Option<u64>,
    },
    /// The guest triple-faulted or otherwise shut down (KVM_EXIT_SHUTDOWN).
    #[error("vCPU {id}: guest shut down (triple fault) at rip {rip:#x}")]
    Shutdown {
        /// vCPU id.
        id: u8,
        /// Guest RIP at the exit (0 if it could not be read).
        rip: u64,
    },
    /// KVM could not handle something in the guest (KVM_EXIT_INTERNAL_ERROR), typically an
    /// instruction the emulator does not know.
    #[error("vCPU {id}: KVM internal error, suberror {suberror}, data {data:x?}, rip {rip:#x}")]
    InternalError {
        /// vCPU id.
        id: u8,
        /// KVM_INTERNAL_ERROR_* sub-error (1 = emulation failure).
        suberror: u32,
        /// Extra data KVM gave.
        data: Vec<u64>,
        /// Guest RIP (0 if it could not be read).
        rip: u64,
    },
    /// VM entry failed (KVM_EXIT_FAIL_ENTRY).
    #[error("vCPU {id}: VM entry failed, reason {reason:#x}")]
    FailEntry {
        /// vCPU id.
        id: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// An exit the run loop does not handle.
    #[error("vCPU {id}: unexpected exit {what}")]
    UnexpectedExit {
        /// vCPU id.
        id: u8,
        /// Description of the exit.
        what: String,
    },
    /// The exit handler refused an access.
    #[error("vCPU {id}: exit handler: {reason}")]
    Handler {
        /// vCPU id.
        id: u8,
        /// Why.
        reason: String,
    },
    /// The vCPU thread could not be started.
    #[error("vCPU {id}: cannot start thread: {source}")]
    Spawn {
        /// vCPU id.
        id: u8,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The vCPU thread panicked (a bug in a handler); the process lives on.
    #[error("vCPU {id}: thread panicked: {message}")]
    ThreadPanicked {
        /// vCPU id.
        id: u8,
        /// Panic payload, if it was a string.
        message: String,
    },
}

/// A device exit given to the [`ExitHandler`].
#[derive(Debug)]
pub enum Exit<'a> {
    /// Guest read `data.len()` bytes at MMIO address `addr`; fill `data`.
    MmioRead {
        /// Guest-physical address.
        addr: u64,
        /// Bytes to fill.
        data: &'a mut [u8],
    },
    /// Guest wrote `data` at MMIO address `addr`.
    MmioWrite {
        /// Guest-physical address.
        addr: u64,
        /// Bytes written.
        data: &'a [u8],
    },
    /// Guest read from I/O port `port`; fill `data`.
    IoIn {
        /// Port.
        port: u16,
        /// Bytes to fill.
        data: &'a mut [u8],
    },
    /// Guest wrote `data` to I/O port `port`.
    IoOut {
        /// Port.
        port: u16,
        /// Bytes written.
        data: &'a [u8],
    },
}

/// What the run loop does after a handled exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest.
    Continue,
    /// Stop the vCPU: the run ends with [`StopReason::Handler`].
    Stop,
}

/// Handles device exits of one vCPU. Returning `Err(reason)` ends the run with
/// [`VcpuError::Handler`].
pub trait ExitHandler {
    /// Handle one exit.
    fn handle(&mut self, exit: Exit<'_>) -> Result<ExitAction, String>;
}

/// Why a run ended without error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The handler returned [`ExitAction::Stop`].
    Handler,
    /// The guest executed HLT with no in-kernel irqchip to wait in.
    Halted,
    /// [`VcpuHandle::kick`] asked the vCPU to stop.
    Kicked,
}

/// What a vCPU run left behind: the handler (with whatever it collected), counts, and how the
/// run ended.
#[derive(Debug)]
pub struct RunSummary<H> {
    /// The exit handler, returned to the caller.
    pub handler: H,
    /// Number of exits seen (KVM_RUN returns).
    pub exits: u64,
    /// When the first KVM_RUN was issued.
    pub first_run: Option<Instant>,
    /// How the run ended.
    pub result: Result<StopReason, VcpuError>,
}

/// A vCPU not yet running.
#[derive(Debug)]
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    /// Keeps the window (and so the memslots' backing) mapped while the vCPU exists.
    _window: Arc<GuestWindow>,
}

impl Vcpu {
    pub(crate) fn new(id: u8, fd: VcpuFd, window: Arc<GuestWindow>) -> Vcpu {
        Vcpu {
            id,
            fd,
            _window: window,
        }
    }

    /// vCPU id (also its APIC id).
    pub fn id(&self) -> u8 {
        self.id
    }

    /// The raw vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Read the special registers (to modify and write back).
    pub fn sregs(&self) -> Result<kvm_sregs, VcpuError> {
        self.fd.get_sregs().map_err(|source| VcpuError::Setup {
            id: self.id,
            what: "KVM_GET_SREGS",
            source,
        })
    }

    /// Set the special registers.
    pub fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), VcpuError> {
        self.fd.set_sregs(sregs).map_err(|source| VcpuError::Setup {
            id: self.id,
            what: "KVM_SET_SREGS",
            source,
        })
    }

    /// Set the general registers.
    pub fn set_regs(&self, regs: &kvm_regs) -> Result<(), VcpuError> {
        self.fd.set_regs(regs).map_err(|source| VcpuError::Setup {
            id: self.id,
            what: "KVM_SET_REGS",
            source,
        })
    }

    /// Mark the vCPU runnable (KVM_MP_STATE_RUNNABLE). With the in-kernel irqchip, every vCPU
    /// but the BSP (id 0) otherwise waits for INIT/SIPI and never leaves KVM_RUN; the tiny guest
    /// starts all its vCPUs directly.
    pub fn set_runnable(&self) -> Result<(), VcpuError> {
        self.fd
            .set_mp_state(kvm_bindings::kvm_mp_state {
                mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
            })
            .map_err(|source| VcpuError::Setup {
                id: self.id,
                what: "KVM_SET_MP_STATE",
                source,
            })
    }

    /// Start the run loop on a new thread named `vcpu<id>`.
    pub fn spawn<H: ExitHandler + Send + 'static>(
        self,
        handler: H,
    ) -> Result<VcpuHandle<H>, VcpuError> {
        install_kick_handler();
        let id = self.id;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = Arc::clone(&stop);
        let join = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || self.run_loop(handler, &stop2))
            .map_err(|source| VcpuError::Spawn { id, source })?;
        Ok(VcpuHandle {
            id,
            stop,
            join: Some(join),
        })
    }

    /// Run on the calling thread until the guest stops, fails or `stop` is set.
    pub fn run_loop<H: ExitHandler>(mut self, mut handler: H, stop: &AtomicBool) -> RunSummary<H> {
        let mut exits = 0u64;
        let mut first_run = None;
        let result = self.run_until(&mut handler, stop, &mut exits, &mut first_run);
        RunSummary {
            handler,
            exits,
            first_run,
            result,
        }
    }

    /// Like [`Vcpu::run_loop`], but keeps the vCPU: after a [`StopReason::Kicked`] the caller
    /// may clear `stop` and run it again (pause and resume). `exits` is incremented per exit
    /// and `first_run` set at the first KVM_RUN.
    pub fn run_until<H: ExitHandler>(
        &mut self,
        handler: &mut H,
        stop: &AtomicBool,
        exits: &mut u64,
        first_run: &mut Option<Instant>,
    ) -> Result<StopReason, VcpuError> {
        loop {
            if stop.load(Ordering::Acquire) {
                break Ok(StopReason::Kicked);
            }
            if first_run.is_none() {
                *first_run = Some(Instant::now());
            }
            let id = self.id;
            let step = match self.fd.run() {
                Ok(exit) => {
                    *exits += 1;
                    dispatch(id, exit, handler)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Step::Continue,
                Err(e) if e.errno() == libc::EFAULT => {
                    Step::Fail(VcpuError::GuestMemoryFault { id, gpa: None })
                }
                Err(source) => Step::Fail(VcpuError::Run { id, source }),
            };
            match step {
                Step::Continue => {}
                Step::Stop(r) => break Ok(r),
                Step::Fail(e) => break Err(e),
                Step::Shutdown => {
                    break Err(VcpuError::Shutdown {
                        id,
                        rip: self.rip(),
                    })
                }
                Step::Internal => break Err(self.internal_error()),
            }
        }
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    fn internal_error(&mut self) -> VcpuError {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so the kernel filled the
        // `internal` member of the exit union.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        VcpuError::InternalError {
            id: self.id,
            suberror: internal.suberror,
            data: internal.data[..n].to_vec(),
            rip: self.rip(),
        }
    }
}

enum Step {
    Continue,
    Stop(StopReason),
    Fail(VcpuError),
    Shutdown,
    Internal,
}

fn dispatch<H: ExitHandler>(id: u8, exit: VcpuExit<'_>, handler: &mut H) -> Step {
    let e = match exit {
        VcpuExit::MmioRead(addr, data) => Exit::MmioRead { addr, data },
        VcpuExit::MmioWrite(addr, data) => Exit::MmioWrite { addr, data },
        VcpuExit::IoIn(port, data) => Exit::IoIn { port, data },
        VcpuExit::IoOut(port, data) => Exit::IoOut { port, data },
        VcpuExit::Hlt => return Step::Stop(StopReason::Halted),
        VcpuExit::Shutdown => return Step::Shutdown,
        VcpuExit::InternalError => return Step::Internal,
        VcpuExit::Intr => return Step::Continue,
        VcpuExit::MemoryFault { gpa, .. } => {
            return Step::Fail(VcpuError::GuestMemoryFault { id, gpa: Some(gpa) })
        }
        VcpuExit::FailEntry(reason, _cpu) => {
            return Step::Fail(VcpuError::FailEntry { id, reason })
        }
        other => {
            return Step::Fail(VcpuError::UnexpectedExit {
                id,
                what: format!("{other:?}"),
            })
        }
    };
    match handler.handle(e) {
        Ok(ExitAction::Continue) => Step::Continue,
        Ok(ExitAction::Stop) => Step::Stop(StopReason::Handler),
        Err(reason) => Step::Fail(VcpuError::Handler { id, reason }),
    }
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Install the no-op handler of the kick signal (idempotent). Threads that run vCPUs through
/// [`Vcpu::run_until`] rather than [`Vcpu::spawn`] call it before they are kicked with
/// [`kick_thread`].
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Installed without SA_RESTART, so KVM_RUN returns EINTR when the signal arrives. If
        // installation fails, kick() still sets the stop flag, seen at the next exit.
        let _ = register_signal_handler(SIGRTMIN() + KICK_SIGNAL_OFFSET, kick_handler);
    });
}

/// Send the kick signal to `thread` (a vCPU thread), so that a KVM_RUN in progress returns
/// with EINTR. Set the stop flag first; the signal is lost if it arrives outside KVM_RUN, so
/// callers repeat it until the thread acknowledges.
///
/// # Safety
///
/// `thread` must be a live (not yet joined) thread of this process.
pub unsafe fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: the caller guarantees the thread is live; the signal has a handler installed by
    // `install_kick_handler`.
    unsafe { libc::pthread_kill(thread, SIGRTMIN() + KICK_SIGNAL_OFFSET) };
}

/// A running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle<H> {
    id: u8,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<RunSummary<H>>>,
}

impl<H> VcpuHandle<H> {
    /// Whether the vCPU thread has ended.
    pub fn is_finished(&self) -> bool {
        self.join.as_ref().is_none_or(|j| j.is_finished())
    }

    /// Ask the vCPU to stop and interrupt KVM_RUN; returns once the thread has ended.
    pub fn kick(&self) {
        self.stop.store(true, Ordering::Release);
        let Some(j) = &self.join else { return };
        while !j.is_finished() {
            use std::os::unix::thread::JoinHandleExt;
            // SAFETY: the thread has not been joined (we hold its JoinHandle), so its pthread_t
            // is valid; the signal has a no-op handler installed by `spawn`.
            unsafe { libc::pthread_kill(j.as_pthread_t(), SIGRTMIN() + KICK_SIGNAL_OFFSET) };
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Wait for the vCPU thread to end. A panic in the thread becomes
    /// [`VcpuError::ThreadPanicked`].
    pub fn join(mut self) -> Result<RunSummary<H>, VcpuError> {
        let id = self.id;
        let Some(j) = self.join.take() else {
            return Err(VcpuError::ThreadPanicked {
                id,
                message: "already joined".into(),
            });
        };
        j.join().map_err(|p| VcpuError::ThreadPanicked {
            id,
            message: p
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| p.downcast_ref::<String>().cloned())
                .unwrap_or_default(),
        })
    }

    /// Wait at most `timeout` for the thread to end on its own, then kick it; then join.
    /// Returns the summary and whether the vCPU had to be kicked.
    pub fn join_timeout(self, timeout: Duration) -> Result<(RunSummary<H>, bool), VcpuError> {
        let deadline = Instant::now() + timeout;
        while !self.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let kicked = !self.is_finished();
        if kicked {
            self.kick();
        }
        self.join().map(|s| (s, kicked))
    }
}

impl<H> Drop for VcpuHandle<H> {
    fn drop(&mut self) {
        if self.join.is_some() {
            self.kick();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what it saw; answers reads with 0xab; fails on port 0x99; stops on MMIO 0x1000.
    #[derive(Default)]
    struct Recorder {
        seen: Vec<String>,
    }

    impl ExitHandler for Recorder {
        fn handle(&mut self, exit: Exit<'_>) -> Result<ExitAction, String> {
            self.seen.push(format!("{exit:?}"));
            match exit {
                Exit::MmioRead { data, .. } | Exit::IoIn { data, .. } => {
                    data.fill(0xab);
                    Ok(ExitAction::Continue)
                }
                Exit::IoOut { port: 0x99, .. } => Err("bad port".into()),
                Exit::MmioWrite { addr: 0x1000, .. } => Ok(ExitAction::Stop),
                _ => Ok(ExitAction::Continue),
            }
        }
    }

    fn step_kind(s: &Step) -> String {
        match s {
            Step::Continue => "continue".into(),
            Step::Stop(r) => format!("stop {r:?}"),
            Step::Fail(e) => format!("fail {e}"),
            Step::Shutdown => "shutdown".into(),
            Step::Internal => "internal".into(),
        }
    }

    #[test]
    fn device_exits_go_to_the_handler() {
        let mut h = Recorder::default();
        let mut buf = [0u8; 4];
        let s = dispatch(0, VcpuExit::MmioRead(0x2000, &mut buf), &mut h);
        assert_eq!(step_kind(&s), "continue");
        assert_eq!(buf, [0xab; 4]);
        let s = dispatch(0, VcpuExit::MmioWrite(0x1000, &[1, 2]), &mut h);
        assert_eq!(step_kind(&s), "stop Handler");
        let s = dispatch(3, VcpuExit::IoOut(0x99, &[0]), &mut h);
        assert_eq!(step_kind(&s), "fail vCPU 3: exit handler: bad port");
        let mut b = [0u8; 1];
        let s = dispatch(0, VcpuExit::IoIn(0x60, &mut b), &mut h);
        assert_eq!(step_kind(&s), "continue");
        assert_eq!(b, [0xab]);
        assert_eq!(h.seen.len(), 4);
    }

    #[test]
    fn other_exits_become_typed_outcomes() {
        let mut h = Recorder::default();
        assert_eq!(
            step_kind(&dispatch(0, VcpuExit::Hlt, &mut h)),
            "stop Halted"
        );
        assert_eq!(
            step_kind(&dispatch(0, VcpuExit::Shutdown, &mut h)),
            "shutdown"
        );
        assert_eq!(
            step_kind(&dispatch(0, VcpuExit::InternalError, &mut h)),
            "internal"
        );
        assert_eq!(step_kind(&dispatch(0, VcpuExit::Intr, &mut h)), "continue");
        let s = dispatch(1, VcpuExit::FailEntry(0x21, 1), &mut h);
        assert!(matches!(
            s,
            Step::Fail(VcpuError::FailEntry {
                id: 1,
                reason: 0x21
            })
        ));
        let s = dispatch(2, VcpuExit::Unsupported(77), &mut h);
        assert!(matches!(
            s,
            Step::Fail(VcpuError::UnexpectedExit { id: 2, .. })
        ));
        let s = dispatch(
            4,
            VcpuExit::MemoryFault {
                flags: 0,
                gpa: 0x1_0020_0000,
                size: 4096,
            },
            &mut h,
        );
        assert!(matches!(
            s,
            Step::Fail(VcpuError::GuestMemoryFault {
                id: 4,
                gpa: Some(0x1_0020_0000)
            })
        ));
        let s = dispatch(0, VcpuExit::Debug(Default::default()), &mut h);
        assert!(matches!(s, Step::Fail(VcpuError::UnexpectedExit { .. })));
        // None of these reached the handler.
        assert!(h.seen.is_empty());
    }
}
