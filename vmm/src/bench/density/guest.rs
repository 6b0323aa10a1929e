//! One density VM: a 2 GiB (nominal) KVM VM running the tiny guest's density loop
//! ([`crate::tiny_guest::fpr_density`]) at CPL3 against the real balloon through the real
//! virtio-mmio transport, and the exit handler that times each phase on the vCPU thread.
//!
//! Timing: at the guest's `START`, `TOUCHED` and `VERIFIED` reports the handler, which runs
//! on the vCPU thread, notes the wall clock and the thread's `/proc/thread-self/schedstat`
//! (time on CPU, time waiting on a runqueue). The wall time of the touch minus its runqueue
//! wait is the time the touch took while the thread was not merely waiting for a core: the
//! guest running, and the faults, swap-ins and reclaim it waited on.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tidepool_balloon::{BackendError, Balloon, BalloonConfig, MmapBackend, ReclaimBackend};
use tidepool_virtio::MmioTransport;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

use crate::kvm::{Exit, ExitAction, ExitHandler, StopReason, VcpuHandle, Vm, VmConfig};
use crate::tiny_guest::fpr_density::{
    TAG_DENSITY_DONE, TAG_DENSITY_MISMATCHES, TAG_DENSITY_PHASE, TAG_DENSITY_START,
    TAG_DENSITY_TOUCHED, TAG_DENSITY_VERIFIED,
};
use crate::tiny_guest::fpr_driver::fpr_density_program;
use crate::tiny_guest::harness::{start_tiny_guest, DeviceExitHandler, NoIrq, ReportLog};
use crate::tiny_guest::virtq::{DriverFailure, DEFAULT_MMIO_BASE, TAG_DRIVER_FAILED};
use crate::tiny_guest::REPORT_BASE;

/// What the host does with the guest's free page reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reporting {
    /// Discard reported ranges (`MADV_DONTNEED` through the balloon's mmap backend).
    Discard,
    /// Complete reports without discarding anything (reclaim off).
    Ignore,
}

/// A backend that owns the RAM but never frees it: the host ignores reports.
#[derive(Debug)]
struct KeepBackend {
    ram: Vec<(u64, u64)>,
}

impl ReclaimBackend for KeepBackend {
    fn discard(&mut self, _gpa: u64, _len: u64) -> Result<(), BackendError> {
        Ok(())
    }

    fn guest_ram(&self) -> &[(u64, u64)] {
        &self.ram
    }
}

/// Wall time and runqueue wait of one interval on the vCPU thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Span {
    /// Wall-clock time.
    pub wall: Duration,
    /// Time the thread was runnable but waiting for a core.
    pub runq: Duration,
    /// Time the thread ran (guest and host kernel work, as the scheduler counts it).
    pub run: Duration,
}

impl Span {
    /// Wall time less runqueue wait: what the interval cost the guest itself.
    pub fn own(&self) -> Duration {
        self.wall.saturating_sub(self.runq)
    }
}

/// One finished phase of one VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseRecord {
    /// VM index in its ramp.
    pub vm: usize,
    /// Phase index.
    pub phase: u64,
    /// When the phase ended (host clock).
    pub end: Instant,
    /// Touching the new window.
    pub touch: Span,
    /// Reading the previous window back (None in phase 0).
    pub verify: Option<Span>,
    /// Reporting the previous window free, to its completion (zero in phase 0).
    pub report: Duration,
    /// Pages of the previous window that did not hold their pattern.
    pub mismatches: u64,
}

/// Wall clock and runqueue-wait counter at one point on the vCPU thread.
#[derive(Clone, Copy, Debug)]
struct Mark {
    at: Instant,
    run_ns: u64,
    wait_ns: u64,
}

/// State shared between a VM's vCPU thread and the ramp.
#[derive(Debug, Default)]
pub struct VmShared {
    records: Mutex<Vec<PhaseRecord>>,
    phases: AtomicU64,
    failed: Mutex<Option<String>>,
    stopping: AtomicBool,
    tail_mismatches: AtomicU64,
}

impl VmShared {
    fn lock(&self) -> MutexGuard<'_, Vec<PhaseRecord>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Phases finished so far.
    pub fn phases(&self) -> u64 {
        self.phases.load(Ordering::Acquire)
    }

    /// Records of the phases finished from index `from` of the record list on.
    pub fn records_from(&self, from: usize) -> Vec<PhaseRecord> {
        self.lock()
            .get(from..)
            .map(<[_]>::to_vec)
            .unwrap_or_default()
    }

    /// Mismatching pages of the last window, checked when the guest stopped.
    pub fn tail_mismatches(&self) -> u64 {
        self.tail_mismatches.load(Ordering::Acquire)
    }

    /// Why the handler gave up, if it did.
    pub fn failure(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Read `(run ns, runqueue-wait ns)` from an open `/proc/thread-self/schedstat`.
fn read_schedstat(f: &File) -> Result<(u64, u64), String> {
    let mut buf = [0u8; 128];
    let n = f
        .read_at(&mut buf, 0)
        .map_err(|e| format!("reading schedstat: {e}"))?;
    let text = std::str::from_utf8(&buf[..n]).map_err(|e| format!("schedstat: {e}"))?;
    let mut it = text.split_whitespace().map(str::parse::<u64>);
    match (it.next(), it.next()) {
        (Some(Ok(run)), Some(Ok(wait))) => Ok((run, wait)),
        _ => Err(format!("schedstat {text:?} is not `run wait slices`")),
    }
}

/// Whether this kernel exposes per-thread schedstat (the stall measure needs it).
pub fn schedstat_available() -> Result<(), String> {
    let f = File::open("/proc/thread-self/schedstat")
        .map_err(|e| format!("/proc/thread-self/schedstat: {e}"))?;
    read_schedstat(&f).map(|_| ())
}

/// The density VM's exit handler: phase tags are timed here, everything else goes to the
/// device handler (balloon window, other reports, `TAG_DONE`).
pub struct DensityExitHandler {
    inner: DeviceExitHandler<Balloon>,
    shared: Arc<VmShared>,
    index: usize,
    pace: Duration,
    stat: Option<File>,
    phase: u64,
    start: Option<Mark>,
    touched: Option<Mark>,
    verified: Option<(Mark, u64)>,
}

impl std::fmt::Debug for DensityExitHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DensityExitHandler")
            .field("index", &self.index)
            .field("phase", &self.phase)
            .finish_non_exhaustive()
    }
}

impl DensityExitHandler {
    fn mark(&mut self) -> Result<Mark, String> {
        if self.stat.is_none() {
            // Opened on the vCPU thread itself, so `thread-self` is this thread.
            self.stat = Some(
                File::open("/proc/thread-self/schedstat")
                    .map_err(|e| format!("/proc/thread-self/schedstat: {e}"))?,
            );
        }
        let f = self.stat.as_ref().ok_or("schedstat not open")?;
        let (run_ns, wait_ns) = read_schedstat(f)?;
        Ok(Mark {
            at: Instant::now(),
            run_ns,
            wait_ns,
        })
    }

    fn span(a: Mark, b: Mark) -> Span {
        Span {
            wall: b.at.saturating_duration_since(a.at),
            runq: Duration::from_nanos(b.wait_ns.saturating_sub(a.wait_ns)),
            run: Duration::from_nanos(b.run_ns.saturating_sub(a.run_ns)),
        }
    }

    fn on_tag(&mut self, tag: u64, value: u64) -> Result<(), String> {
        let m = self.mark()?;
        match tag {
            TAG_DENSITY_START => {
                self.phase = value;
                self.start = Some(m);
                self.touched = None;
                self.verified = None;
            }
            TAG_DENSITY_TOUCHED => self.touched = Some(m),
            TAG_DENSITY_VERIFIED => {
                // Also sent once after the last phase, for the last window.
                if self.stopping_tail() {
                    self.shared.tail_mismatches.store(value, Ordering::Release);
                } else {
                    self.verified = Some((m, value));
                }
            }
            TAG_DENSITY_PHASE => {
                let (Some(s), Some(t)) = (self.start, self.touched) else {
                    return Err(format!("phase {value} ended without start/touch reports"));
                };
                let touch = Self::span(s, t);
                let (verify, report, mismatches) = match self.verified {
                    Some((v, n)) => (Some(Self::span(t, v)), m.at - v.at, n),
                    None => (None, Duration::ZERO, 0),
                };
                self.shared.lock().push(PhaseRecord {
                    vm: self.index,
                    phase: value,
                    end: m.at,
                    touch,
                    verify,
                    report,
                    mismatches,
                });
                self.shared.phases.fetch_add(1, Ordering::Release);
                self.start = None;
                // Pace: a phase lasts at least `pace` (the guest idles in this exit).
                let elapsed = m.at.saturating_duration_since(s.at);
                if !self.shared.stopping.load(Ordering::Acquire) && elapsed < self.pace {
                    std::thread::sleep(self.pace - elapsed);
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// A VERIFIED report outside a phase (after START was consumed by a PHASE) is the
    /// final check of the last window.
    fn stopping_tail(&self) -> bool {
        self.start.is_none()
    }
}

impl ExitHandler for DensityExitHandler {
    fn handle(&mut self, exit: Exit<'_>) -> Result<ExitAction, String> {
        if let Exit::MmioWrite { addr, data } = &exit {
            let tag = addr.wrapping_sub(REPORT_BASE) / 8;
            let mine = addr % 8 == 0
                && *addr >= REPORT_BASE
                && (TAG_DENSITY_START..=TAG_DENSITY_PHASE).contains(&tag);
            if mine {
                let bytes = <[u8; 8]>::try_from(*data)
                    .map_err(|_| format!("{}-byte report at {addr:#x}", data.len()))?;
                if let Err(e) = self.on_tag(tag, u64::from_le_bytes(bytes)) {
                    *self.shared.failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e.clone());
                    return Err(e);
                }
                return Ok(ExitAction::Continue);
            }
        }
        self.inner.handle(exit)
    }
}

/// What a VM reported when it stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmTotals {
    /// Phases run.
    pub phases: u64,
    /// Mismatching pages over the whole run, as the guest counted them.
    pub mismatches: u64,
    /// Bytes the host discarded through free page reporting.
    pub reported_bytes: u64,
}

/// A running density VM.
pub struct DensityVm {
    /// Its index in the ramp.
    pub index: usize,
    vm: Vm,
    mailbox: u64,
    handle: Option<VcpuHandle<DensityExitHandler>>,
    transport: Arc<Mutex<MmioTransport<Balloon>>>,
    log: Arc<ReportLog>,
    shared: Arc<VmShared>,
}

impl std::fmt::Debug for DensityVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DensityVm")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

/// How to build one density VM.
#[derive(Clone, Copy, Debug)]
pub struct GuestSpec {
    /// Boot RAM (nominal size).
    pub ram: u64,
    /// Bytes touched per phase.
    pub window: u64,
    /// Minimum phase length (the guest idles for the rest).
    pub pace: Duration,
    /// Stop after this many phases on its own (0: only when told).
    pub max_phases: u32,
    /// What the host does with reports.
    pub reporting: Reporting,
}

impl DensityVm {
    /// Create the VM and start its vCPU.
    pub fn start(index: usize, spec: &GuestSpec) -> Result<DensityVm, String> {
        let vm = Vm::new(VmConfig::tiny(spec.ram, 0))
            .map_err(|e| format!("creating VM {index}: {e}"))?;
        let layout = vm.window().layout().clone();
        let seed = 0xd0_0000_0000_0000 | ((index as u64) << 32);
        let (image, driver) = fpr_density_program(
            &layout,
            DEFAULT_MMIO_BASE,
            spec.window >> 20,
            spec.max_phases,
            seed,
        )
        .map_err(|e| format!("density guest: {e}"))?;
        let mem = (*vm.window().guest_memory().map_err(|e| e.to_string())?).clone();
        let ram: Vec<(u64, u64)> = layout
            .boot_ram_ranges()
            .iter()
            .map(|r| (r.start, r.end - r.start))
            .collect();
        // Both modes back guest RAM with host THP, as `bench reclaim` does.
        let mut mmap = MmapBackend::with_ram(&mem, &ram).map_err(|e| e.to_string())?;
        mmap.advise_huge().map_err(|e| e.to_string())?;
        let backend: Box<dyn ReclaimBackend> = match spec.reporting {
            Reporting::Discard => Box::new(mmap),
            Reporting::Ignore => Box::new(KeepBackend { ram }),
        };
        let balloon = Balloon::new(BalloonConfig::default(), backend).map_err(|e| e.to_string())?;
        let transport = Arc::new(Mutex::new(
            MmioTransport::new(
                Box::new(balloon),
                GuestMemoryAtomic::new(mem),
                Arc::new(NoIrq::default()),
            )
            .map_err(|e| e.to_string())?,
        ));
        let log = Arc::new(ReportLog::default());
        let shared = Arc::new(VmShared::default());
        let handler = DensityExitHandler {
            inner: DeviceExitHandler::new(DEFAULT_MMIO_BASE, Arc::clone(&transport), log.clone()),
            shared: Arc::clone(&shared),
            index,
            pace: spec.pace,
            stat: None,
            phase: 0,
            start: None,
            touched: None,
            verified: None,
        };
        let handle = start_tiny_guest(&vm, &image, 0, handler)
            .map_err(|e| format!("starting VM {index}: {e}"))?;
        Ok(DensityVm {
            index,
            vm,
            mailbox: driver.mailbox(),
            handle: Some(handle),
            transport,
            log,
            shared,
        })
    }

    /// The VM (its window, for residency and for a reclaim engine).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Its balloon's transport.
    pub fn transport(&self) -> &Arc<Mutex<MmioTransport<Balloon>>> {
        &self.transport
    }

    /// Its shared phase records.
    pub fn shared(&self) -> &Arc<VmShared> {
        &self.shared
    }

    /// Bytes discarded through reporting so far.
    pub fn reported_bytes(&self) -> u64 {
        self.transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .accounting()
            .counters
            .reported_bytes_total
    }

    /// An error if the guest's driver failed or its vCPU ended early.
    pub fn check_alive(&self) -> Result<(), String> {
        if let Some(code) = self.log.last(TAG_DRIVER_FAILED) {
            return Err(format!(
                "VM {}: driver failed: {:?}",
                self.index,
                DriverFailure::from_code(code)
            ));
        }
        if let Some(e) = self.shared.failure() {
            return Err(format!("VM {}: {e}", self.index));
        }
        if self.handle.as_ref().is_none_or(|h| h.is_finished()) {
            return Err(format!("VM {}: vCPU ended early", self.index));
        }
        Ok(())
    }

    /// Tell the guest to stop (through its mailbox) without waiting.
    pub fn request_stop(&self) -> Result<(), String> {
        self.shared.stopping.store(true, Ordering::Release);
        let mem = self.vm.window().guest_memory().map_err(|e| e.to_string())?;
        mem.write_obj(1u64, GuestAddress(self.mailbox))
            .map_err(|e| format!("VM {}: writing the mailbox: {e}", self.index))
    }

    /// Stop the guest, wait for its final reports and join the vCPU.
    pub fn stop(mut self, timeout: Duration) -> Result<VmTotals, String> {
        self.request_stop()?;
        let handle = self.handle.take().ok_or("already stopped")?;
        let (summary, kicked) = handle
            .join_timeout(timeout)
            .map_err(|e| format!("VM {}: {e}", self.index))?;
        if let Some(code) = self.log.last(TAG_DRIVER_FAILED) {
            return Err(format!(
                "VM {}: driver failed: {:?}",
                self.index,
                DriverFailure::from_code(code)
            ));
        }
        match (&summary.result, kicked) {
            (Ok(StopReason::Handler), false) => {}
            (r, k) => return Err(format!("VM {}: run ended {r:?}, kicked {k}", self.index)),
        }
        let phases = self
            .log
            .last(TAG_DENSITY_DONE)
            .ok_or_else(|| format!("VM {}: no final report", self.index))?;
        let mismatches = self
            .log
            .last(TAG_DENSITY_MISMATCHES)
            .ok_or_else(|| format!("VM {}: no mismatch total", self.index))?;
        Ok(VmTotals {
            phases,
            mismatches,
            reported_bytes: self.reported_bytes(),
        })
    }
}
