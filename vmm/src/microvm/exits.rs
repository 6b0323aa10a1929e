//! The exit handler of a microVM's vCPUs: MMIO to the device bus, the tiny guest's report
//! window, and everything else counted and ignored (reads return all ones), so that nothing a
//! guest touches can stop the VMM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::devices::MmioBus;
use crate::kvm::{Exit, ExitAction, ExitHandler};
use crate::tiny_guest::program::{MAX_TAG, REPORT_BASE, TAG_DONE};
use crate::tiny_guest::GuestReport;

/// Exit counters of one VM, over all its vCPUs.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// MMIO accesses served by a virtio-mmio device.
    pub mmio_device: AtomicU64,
    /// Writes to the tiny guest's report window.
    pub report: AtomicU64,
    /// MMIO accesses nothing claims (ignored).
    pub mmio_unclaimed: AtomicU64,
    /// Port I/O (ignored).
    pub pio: AtomicU64,
}

impl ExitCounters {
    /// `(name, value)` pairs for metrics.
    pub fn named(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("mmio_device", self.mmio_device.load(Ordering::Relaxed)),
            ("report", self.report.load(Ordering::Relaxed)),
            (
                "mmio_unclaimed",
                self.mmio_unclaimed.load(Ordering::Relaxed),
            ),
            ("pio", self.pio.load(Ordering::Relaxed)),
        ]
    }
}

/// Reports the guest wrote, shared by all vCPUs of the VM.
pub type ReportLog = Arc<Mutex<Vec<GuestReport>>>;

/// One vCPU's exit handler.
#[derive(Debug, Clone)]
pub struct VmExitHandler {
    bus: Arc<MmioBus>,
    reports: ReportLog,
    counters: Arc<ExitCounters>,
}

impl VmExitHandler {
    /// A handler over `bus`, logging reports to `reports`.
    pub fn new(bus: Arc<MmioBus>, reports: ReportLog, counters: Arc<ExitCounters>) -> Self {
        VmExitHandler {
            bus,
            reports,
            counters,
        }
    }

    fn report(&self, addr: u64, data: &[u8]) -> Option<ExitAction> {
        if !(REPORT_BASE..=REPORT_BASE + MAX_TAG * 8).contains(&addr) || data.len() != 8 {
            return None;
        }
        let tag = (addr - REPORT_BASE) / 8;
        let mut v = [0u8; 8];
        v.copy_from_slice(data);
        self.counters.report.fetch_add(1, Ordering::Relaxed);
        crate::devices::lock(&self.reports).push(GuestReport {
            tag,
            value: u64::from_le_bytes(v),
            at: Instant::now(),
        });
        Some(if tag == TAG_DONE {
            ExitAction::Stop
        } else {
            ExitAction::Continue
        })
    }
}

impl ExitHandler for VmExitHandler {
    fn handle(&mut self, exit: Exit<'_>) -> Result<ExitAction, String> {
        match exit {
            Exit::MmioRead { addr, data } => {
                if self.bus.read(addr, data) {
                    self.counters.mmio_device.fetch_add(1, Ordering::Relaxed);
                } else {
                    self.counters.mmio_unclaimed.fetch_add(1, Ordering::Relaxed);
                    data.fill(0xff);
                }
            }
            Exit::MmioWrite { addr, data } => {
                if self.bus.write(addr, data) {
                    self.counters.mmio_device.fetch_add(1, Ordering::Relaxed);
                } else if let Some(action) = self.report(addr, data) {
                    return Ok(action);
                } else {
                    self.counters.mmio_unclaimed.fetch_add(1, Ordering::Relaxed);
                }
            }
            Exit::IoIn { data, .. } => {
                self.counters.pio.fetch_add(1, Ordering::Relaxed);
                data.fill(0xff);
            }
            Exit::IoOut { .. } => {
                self.counters.pio.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(ExitAction::Continue)
    }
}
