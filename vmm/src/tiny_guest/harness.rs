//! Running the tiny guest's polled virtio drivers against a real device model, without the
//! VMM's device manager: [`DeviceExitHandler`] routes MMIO exits inside one virtio-mmio window
//! straight to an [`MmioTransport`] and report writes to a shared [`ReportLog`] that the host
//! can watch while the guest runs. No interrupts are wired ([`NoIrq`]): the drivers poll.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tidepool_virtio::{IrqTrigger, MmioTransport, VirtioDevice};

use super::program::{MAX_TAG, REPORT_BASE, TAG_DONE};
use super::run::{load_image, RunError};
use super::virtq::{DriverFailure, MMIO_WINDOW, TAG_DRIVER_FAILED};
use super::{GuestImage, GuestReport};
use crate::kvm::{Exit, ExitAction, ExitHandler, VcpuHandle, Vm};
use crate::memory::MemoryError;

/// Errors of a harness run.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// Building, loading or starting the guest failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// Building the device or its backend failed.
    #[error("device set-up: {0}")]
    Device(String),
    /// The guest's driver gave up.
    #[error("guest driver failed: {0:?}")]
    Driver(Option<DriverFailure>),
    /// The guest did not finish, or its vCPU ended with an error.
    #[error("guest run: {0}")]
    Guest(String),
    /// Measuring residency failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// An [`IrqTrigger`] for polled drivers: counts the interrupts the device would have raised.
#[derive(Debug, Default)]
pub struct NoIrq {
    count: AtomicU64,
}

impl NoIrq {
    /// Interrupts the device raised so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

impl IrqTrigger for NoIrq {
    fn trigger(&self) -> std::io::Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Reports from a running guest, shared between its vCPU thread and the host.
#[derive(Debug, Default)]
pub struct ReportLog {
    reports: Mutex<Vec<GuestReport>>,
    arrived: Condvar,
}

impl ReportLog {
    fn lock(&self) -> MutexGuard<'_, Vec<GuestReport>> {
        self.reports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record a report and wake waiters.
    pub fn push(&self, r: GuestReport) {
        self.lock().push(r);
        self.arrived.notify_all();
    }

    /// Number of reports so far.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no report arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A copy of every report so far.
    pub fn snapshot(&self) -> Vec<GuestReport> {
        self.lock().clone()
    }

    /// Every value reported under `tag`, in order.
    pub fn values(&self, tag: u64) -> Vec<u64> {
        self.lock()
            .iter()
            .filter(|r| r.tag == tag)
            .map(|r| r.value)
            .collect()
    }

    /// The last value reported under `tag`.
    pub fn last(&self, tag: u64) -> Option<u64> {
        self.lock()
            .iter()
            .rev()
            .find(|r| r.tag == tag)
            .map(|r| r.value)
    }

    /// Wait up to `timeout` for a report at index `from` or later that satisfies `pred`;
    /// returns its index and the report.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&GuestReport) -> bool,
    ) -> Option<(usize, GuestReport)> {
        let deadline = Instant::now() + timeout;
        let mut g = self.lock();
        loop {
            if let Some((i, r)) = g.iter().enumerate().skip(from).find(|(_, r)| pred(r)) {
                return Some((i, *r));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = self
                .arrived
                .wait_timeout(g, left.min(Duration::from_millis(50)))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// [`Self::wait_for`] a report of `tag` with `value`.
    pub fn wait_value(
        &self,
        from: usize,
        timeout: Duration,
        tag: u64,
        value: u64,
    ) -> Option<(usize, GuestReport)> {
        self.wait_for(from, timeout, |r| r.tag == tag && r.value == value)
    }
}

/// Routes one device's virtio-mmio window to its transport and the report window to a
/// [`ReportLog`]; stops the vCPU on [`TAG_DONE`]. Any other exit is refused.
pub struct DeviceExitHandler<D: VirtioDevice + ?Sized> {
    base: u64,
    transport: Arc<Mutex<MmioTransport<D>>>,
    log: Arc<ReportLog>,
}

impl<D: VirtioDevice + ?Sized> std::fmt::Debug for DeviceExitHandler<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceExitHandler")
            .field("base", &self.base)
            .field("reports", &self.log.len())
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice + ?Sized> DeviceExitHandler<D> {
    /// A handler for the device window at `base`.
    pub fn new(
        base: u64,
        transport: Arc<Mutex<MmioTransport<D>>>,
        log: Arc<ReportLog>,
    ) -> DeviceExitHandler<D> {
        DeviceExitHandler {
            base,
            transport,
            log,
        }
    }

    fn window_offset(&self, addr: u64) -> Option<u64> {
        addr.checked_sub(self.base).filter(|o| *o < MMIO_WINDOW)
    }

    fn transport(&self) -> MutexGuard<'_, MmioTransport<D>> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<D: VirtioDevice + ?Sized> ExitHandler for DeviceExitHandler<D> {
    fn handle(&mut self, exit: Exit<'_>) -> Result<ExitAction, String> {
        match exit {
            Exit::MmioRead { addr, data } => match self.window_offset(addr) {
                Some(off) => {
                    self.transport().read(off, data);
                    Ok(ExitAction::Continue)
                }
                None => Err(format!("read of unmapped MMIO {addr:#x}")),
            },
            Exit::MmioWrite { addr, data } => {
                if let Some(off) = self.window_offset(addr) {
                    self.transport().write(off, data);
                    return Ok(ExitAction::Continue);
                }
                let in_reports = (REPORT_BASE..=REPORT_BASE + MAX_TAG * 8).contains(&addr);
                let Ok(bytes) = <[u8; 8]>::try_from(data) else {
                    return Err(format!("{}-byte write at {addr:#x}", data.len()));
                };
                if !in_reports || addr % 8 != 0 {
                    return Err(format!("write to unmapped MMIO {addr:#x}"));
                }
                let tag = (addr - REPORT_BASE) / 8;
                self.log.push(GuestReport {
                    tag,
                    value: u64::from_le_bytes(bytes),
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

/// Load `image` into `vm`, create vCPU `vcpu_id` in the image's boot state and start it with
/// `handler` on its own thread. The caller joins (or kicks) the handle.
pub fn start_tiny_guest<H: ExitHandler + Send + 'static>(
    vm: &Vm,
    image: &GuestImage,
    vcpu_id: u64,
    handler: H,
) -> Result<VcpuHandle<H>, RunError> {
    load_image(vm, image)?;
    let vcpu = vm.create_vcpu(vcpu_id)?;
    let mut sregs = vcpu.sregs()?;
    image.boot.apply_sregs(&mut sregs);
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&image.boot.regs())?;
    vcpu.set_runnable()?;
    Ok(vcpu.spawn(handler)?)
}

/// Wait up to `timeout` for a report at index `from` or later that satisfies `pred`, while
/// the guest runs: a driver failure report or the end of the vCPU thread ends the wait early
/// with an error.
pub fn wait_report<H>(
    log: &ReportLog,
    handle: &VcpuHandle<H>,
    from: usize,
    timeout: Duration,
    pred: impl Fn(&GuestReport) -> bool,
) -> Result<(usize, GuestReport), HarnessError> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(hit) = log.wait_for(from, Duration::from_millis(100), &pred) {
            return Ok(hit);
        }
        if let Some(code) = log.last(TAG_DRIVER_FAILED) {
            return Err(HarnessError::Driver(DriverFailure::from_code(code)));
        }
        if handle.is_finished() {
            return Err(HarnessError::Guest(
                "the vCPU ended before the awaited report".into(),
            ));
        }
        if Instant::now() >= deadline {
            return Err(HarnessError::Guest(format!(
                "no awaited report within {timeout:?}"
            )));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_log_waits_and_filters() {
        let log = Arc::new(ReportLog::default());
        let l2 = Arc::clone(&log);
        let t = std::thread::spawn(move || {
            for v in 0..3 {
                l2.push(GuestReport {
                    tag: 40,
                    value: v,
                    at: Instant::now(),
                });
            }
        });
        let hit = log.wait_value(0, Duration::from_secs(5), 40, 2);
        t.join().expect("thread");
        assert_eq!(hit.map(|(i, _)| i), Some(2));
        assert_eq!(log.values(40), vec![0, 1, 2]);
        assert_eq!(log.last(40), Some(2));
        assert!(log
            .wait_value(3, Duration::from_millis(10), 40, 2)
            .is_none());
    }
}
