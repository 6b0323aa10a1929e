//! The exit handler of a microVM's vCPUs: MMIO to the device bus, the tiny guest's report
//! window (including its wait requests, [`TAG_WAIT`]), and everything else counted and
//! ignored (reads return all ones), so that nothing a guest touches can stop the VMM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::devices::{lock, MmioBus};
use crate::kvm::{Exit, ExitAction, ExitHandler};
use crate::tiny_guest::program::{MAX_TAG, REPORT_BASE, TAG_DONE, TAG_WAIT};
use crate::tiny_guest::GuestReport;
use tidepool_virtio::IrqTrigger;

/// Longest a guest's wait request ([`TAG_WAIT`]) blocks its vCPU, whatever it asks for: a
/// paused or stopped VM wakes its waiters, so this only bounds a missed wake-up.
pub const MAX_GUEST_WAIT: Duration = Duration::from_millis(100);

/// Where vCPUs blocked in a guest wait request sleep, and what wakes them: a generation
/// counter that [`GuestWake::wake`] bumps whenever the host has news for the guest.
#[derive(Debug, Default)]
pub struct GuestWake {
    generation: Mutex<u64>,
    cv: Condvar,
}

impl GuestWake {
    /// Wake every vCPU waiting now, and make the next wait of every other vCPU return at once
    /// (it may have looked at its devices before the news).
    pub fn wake(&self) {
        *lock(&self.generation) += 1;
        self.cv.notify_all();
    }

    /// The current generation.
    fn generation(&self) -> u64 {
        *lock(&self.generation)
    }

    /// Block until the generation differs from `seen` or `timeout` passes; returns the
    /// generation then.
    fn wait(&self, seen: u64, timeout: Duration) -> u64 {
        let g = lock(&self.generation);
        let (g, _) = self
            .cv
            .wait_timeout_while(g, timeout, |g| *g == seen)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }
}

/// A device interrupt that also wakes the VM's guest waits: a polled driver waiting for
/// its used ring (at CPL3, with interrupts off) hears of the device's answer at once.
pub struct WakingTrigger {
    inner: Arc<dyn IrqTrigger>,
    wake: Arc<GuestWake>,
}

impl WakingTrigger {
    /// `inner`, which also wakes `wake`.
    pub fn new(inner: Arc<dyn IrqTrigger>, wake: Arc<GuestWake>) -> WakingTrigger {
        WakingTrigger { inner, wake }
    }
}

impl std::fmt::Debug for WakingTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WakingTrigger").finish_non_exhaustive()
    }
}

impl IrqTrigger for WakingTrigger {
    fn trigger(&self) -> std::io::Result<()> {
        let r = self.inner.trigger();
        self.wake.wake();
        r
    }
}

/// Exit counters of one VM, over all its vCPUs.
#[derive(Debug, Default)]
pub struct ExitCounters {
    /// MMIO accesses served by a virtio-mmio device.
    pub mmio_device: AtomicU64,
    /// Writes to the tiny guest's report window.
    pub report: AtomicU64,
    /// Guest wait requests ([`TAG_WAIT`]).
    pub guest_wait: AtomicU64,
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
            ("guest_wait", self.guest_wait.load(Ordering::Relaxed)),
            (
                "mmio_unclaimed",
                self.mmio_unclaimed.load(Ordering::Relaxed),
            ),
            ("pio", self.pio.load(Ordering::Relaxed)),
        ]
    }
}

/// Reports the guest wrote, shared by all vCPUs of the VM: the most recent ones, with a
/// count of the dropped ([`super::reports::ReportRing`]).
pub type ReportLog = Arc<Mutex<super::reports::ReportRing>>;

/// One vCPU's exit handler.
#[derive(Debug, Clone)]
pub struct VmExitHandler {
    bus: Arc<MmioBus>,
    reports: ReportLog,
    counters: Arc<ExitCounters>,
    wake: Arc<GuestWake>,
    /// The wake generation this vCPU last returned to its guest with.
    seen: u64,
}

impl VmExitHandler {
    /// A handler over `bus`, logging reports to `reports`; guest wait requests sleep on
    /// `wake`.
    pub fn new(
        bus: Arc<MmioBus>,
        reports: ReportLog,
        counters: Arc<ExitCounters>,
        wake: Arc<GuestWake>,
    ) -> Self {
        let seen = wake.generation();
        VmExitHandler {
            bus,
            reports,
            counters,
            wake,
            seen,
        }
    }

    /// A wait request: sleep until news newer than what this vCPU's guest last saw, or
    /// `us` microseconds (at most [`MAX_GUEST_WAIT`]).
    fn guest_wait(&mut self, us: u64) {
        self.counters.guest_wait.fetch_add(1, Ordering::Relaxed);
        let timeout = Duration::from_micros(us).min(MAX_GUEST_WAIT);
        self.seen = self.wake.wait(self.seen, timeout);
    }

    fn report(&mut self, addr: u64, data: &[u8]) -> Option<ExitAction> {
        if !(REPORT_BASE..=REPORT_BASE + MAX_TAG * 8).contains(&addr) || data.len() != 8 {
            return None;
        }
        let tag = (addr - REPORT_BASE) / 8;
        let mut v = [0u8; 8];
        v.copy_from_slice(data);
        let value = u64::from_le_bytes(v);
        if tag == TAG_WAIT {
            self.guest_wait(value);
            return Some(ExitAction::Continue);
        }
        self.counters.report.fetch_add(1, Ordering::Relaxed);
        lock(&self.reports).push(GuestReport {
            tag,
            value,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn handler(wake: &Arc<GuestWake>) -> (VmExitHandler, ReportLog, Arc<ExitCounters>) {
        let reports: ReportLog = Arc::default();
        let counters = Arc::new(ExitCounters::default());
        let h = VmExitHandler::new(
            Arc::new(MmioBus::new()),
            Arc::clone(&reports),
            Arc::clone(&counters),
            Arc::clone(wake),
        );
        (h, reports, counters)
    }

    fn write(h: &mut VmExitHandler, tag: u64, value: u64) -> ExitAction {
        let data = value.to_le_bytes();
        h.handle(Exit::MmioWrite {
            addr: REPORT_BASE + tag * 8,
            data: &data,
        })
        .expect("handled")
    }

    #[test]
    fn a_wait_request_is_counted_not_logged() {
        let wake = Arc::new(GuestWake::default());
        let (mut h, reports, counters) = handler(&wake);
        assert_eq!(write(&mut h, TAG_WAIT, 1), ExitAction::Continue);
        assert_eq!(counters.guest_wait.load(Ordering::Relaxed), 1);
        assert_eq!(counters.report.load(Ordering::Relaxed), 0);
        assert!(lock(&reports).is_empty());
        // Other tags are still reports.
        assert_eq!(write(&mut h, 16, 7), ExitAction::Continue);
        assert_eq!(lock(&reports).len(), 1);
        assert_eq!(write(&mut h, TAG_DONE, 0), ExitAction::Stop);
    }

    #[test]
    fn news_before_a_wait_is_not_missed() {
        let wake = Arc::new(GuestWake::default());
        let (mut h, _, _) = handler(&wake);
        // The host has news after the guest last returned: the next wait returns with it
        // (a missed wake-up would sleep the whole wait; here that is an hour).
        wake.wake();
        write(&mut h, TAG_WAIT, 3_600_000_000);
        assert_eq!(h.seen, wake.generation());
        // Without news, a wait sleeps until its time is up and sees the same generation.
        write(&mut h, TAG_WAIT, 1);
        assert_eq!(h.seen, wake.generation());
    }

    #[test]
    fn a_wake_ends_a_wait_in_progress() {
        let wake = Arc::new(GuestWake::default());
        let (mut h, _, _) = handler(&wake);
        let before = h.seen;
        let w2 = Arc::clone(&wake);
        let waker = std::thread::spawn(move || {
            // Keep waking until the waiter is gone; the wait itself is capped at
            // MAX_GUEST_WAIT, so this test ends either way and checks the generation.
            for _ in 0..1000 {
                w2.wake();
                std::thread::sleep(Duration::from_millis(1));
                if Arc::strong_count(&w2) == 1 {
                    break;
                }
            }
        });
        // Each wait is capped at MAX_GUEST_WAIT; a few rounds allow for a slow waker thread.
        for _ in 0..50 {
            write(&mut h, TAG_WAIT, u64::MAX);
            if h.seen > before {
                break;
            }
        }
        assert!(h.seen > before);
        drop(h);
        drop(wake);
        waker.join().expect("waker");
    }
}
