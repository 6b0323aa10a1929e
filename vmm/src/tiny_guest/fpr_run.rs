//! A ready-made run of the free-page-reporting phases program against the real balloon
//! (madvise backend over the VM's window), for `tidepool bench reclaim/density`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool_balloon::{Balloon, BalloonConfig, MmapBackend};
use tidepool_virtio::MmioTransport;
use vm_memory::GuestMemoryAtomic;

use super::fpr_driver::{
    fpr_phases_program, FprProgram, TAG_FPR_PHASE, TAG_FPR_PHASES_DONE, TAG_FPR_PHASE_REPORT_TSC,
    TAG_FPR_PHASE_TOUCH_TSC,
};
use super::harness::{start_tiny_guest, DeviceExitHandler, HarnessError, NoIrq, ReportLog};
use super::run::RunError;
use super::virtq::{DriverFailure, DEFAULT_MMIO_BASE, TAG_DRIVER_FAILED};
use crate::kvm::{StopReason, Vm};

/// One phase of [`run_fpr_phases`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PhaseSample {
    /// Phase index.
    pub phase: u64,
    /// `rdtsc` cycles spent touching the phase's window.
    pub touch_tsc: u64,
    /// `rdtsc` cycles spent reporting the previous window (0 in phase 0).
    pub report_tsc: u64,
    /// When the host saw the phase end.
    pub at: Instant,
}

/// What [`run_fpr_phases`] measured.
#[derive(Clone, Debug)]
pub struct FprPhasesRun {
    /// Per-phase figures, in order.
    pub phases: Vec<PhaseSample>,
    /// From starting the vCPU to the guest's last report.
    pub wall: Duration,
    /// Bytes the balloon discarded (all reports).
    pub reported_bytes: u64,
    /// Bytes of the window ring still resident on the host after the run (`mincore`).
    pub resident_after: u64,
    /// Size of the ring of windows.
    pub ring_bytes: u64,
    /// vCPU exits during the run.
    pub exits: u64,
}

/// Run the density program on `vm` (fresh, boot RAM only, nothing else running on it):
/// a balloon with the madvise backend over all boot RAM at [`DEFAULT_MMIO_BASE`], the polled
/// reporting driver, `phases` phases over `windows` windows of `window_mib` MiB.
pub fn run_fpr_phases(
    vm: &Vm,
    window_mib: u64,
    windows: u32,
    phases: u32,
    timeout: Duration,
) -> Result<FprPhasesRun, HarnessError> {
    let layout = vm.window().layout().clone();
    let (image, driver) =
        fpr_phases_program(&layout, DEFAULT_MMIO_BASE, window_mib, windows, phases)
            .map_err(RunError::from)?;
    let view = vm.window().guest_memory()?;
    let mem = (*view).clone();
    let ram: Vec<(u64, u64)> = layout
        .boot_ram_ranges()
        .iter()
        .map(|r| (r.start, r.end - r.start))
        .collect();
    let dev_err = |e: &dyn std::fmt::Display| HarnessError::Device(e.to_string());
    let mut backend = MmapBackend::with_ram(&mem, &ram).map_err(|e| dev_err(&e))?;
    backend.advise_huge().map_err(|e| dev_err(&e))?;
    let balloon =
        Balloon::new(BalloonConfig::default(), Box::new(backend)).map_err(|e| dev_err(&e))?;
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(
            Box::new(balloon),
            GuestMemoryAtomic::new(mem),
            Arc::new(NoIrq::default()),
        )
        .map_err(|e| dev_err(&e))?,
    ));
    let log = Arc::new(ReportLog::default());
    let handler = DeviceExitHandler::new(DEFAULT_MMIO_BASE, Arc::clone(&transport), log.clone());
    let t0 = Instant::now();
    let handle = start_tiny_guest(vm, &image, 0, handler)?;
    let (summary, kicked) = handle.join_timeout(timeout).map_err(RunError::from)?;
    if let Some(code) = log.last(TAG_DRIVER_FAILED) {
        return Err(HarnessError::Driver(DriverFailure::from_code(code)));
    }
    match (&summary.result, kicked) {
        (Ok(StopReason::Handler), false) => {}
        (r, k) => return Err(HarnessError::Guest(format!("{r:?}, kicked {k}"))),
    }
    if log.last(TAG_FPR_PHASES_DONE) != Some(u64::from(phases)) {
        return Err(HarnessError::Guest("phases did not complete".into()));
    }
    let reports = log.snapshot();
    let wall = reports
        .last()
        .map(|r| r.at.saturating_duration_since(t0))
        .unwrap_or_default();
    let touch = log.values(TAG_FPR_PHASE_TOUCH_TSC);
    let report = log.values(TAG_FPR_PHASE_REPORT_TSC);
    let samples = reports
        .iter()
        .filter(|r| r.tag == TAG_FPR_PHASE)
        .enumerate()
        .map(|(i, r)| PhaseSample {
            phase: r.value,
            touch_tsc: touch.get(i).copied().unwrap_or(0),
            report_tsc: report.get(i).copied().unwrap_or(0),
            at: r.at,
        })
        .collect();
    let ring = driver.program.range();
    let resident_after = vm
        .window()
        .resident_bytes(ring.start, ring.end - ring.start)?;
    let reported_bytes = transport
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .device()
        .accounting()
        .counters
        .reported_bytes_total;
    let ring_bytes = match driver.program {
        FprProgram::Phases {
            window, windows, ..
        } => window * u64::from(windows),
        FprProgram::TouchReportVerify { .. } | FprProgram::Density { .. } => 0,
    };
    Ok(FprPhasesRun {
        phases: samples,
        wall,
        reported_bytes,
        resident_after,
        ring_bytes,
        exits: summary.exits,
    })
}
