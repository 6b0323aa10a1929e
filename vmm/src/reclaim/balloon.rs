//! [`DeviceBalloon`]: the [`BalloonHook`] over a VM's virtio-balloon device (phases 1 and 2).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, MutexGuard};

use super::target::TargetError;
use super::window::BalloonHook;
use crate::devices::{lock, lock_live};
use crate::memory::MIB;
use crate::microvm::BalloonTransport;
use tidepool_balloon::BalloonError;

/// A VM's balloon device as the engine uses it.
#[derive(Debug)]
pub struct DeviceBalloon {
    dev: BalloonTransport,
    /// `reported_bytes_total` at the last [`BalloonHook::take_reported`].
    seen_reported: Mutex<u64>,
    /// MiB the engine added to the balloon target and has not given back.
    engine_mib: Mutex<u64>,
    /// The VM's failed flag (see `MmioBus::mark_failed`): once set, a held device lock is
    /// not waited for and the hook answers [`TargetError::Gone`].
    failed: Arc<AtomicBool>,
}

impl DeviceBalloon {
    /// The hook over `dev`. Reports that arrived before this call are not counted.
    pub fn new(dev: BalloonTransport) -> Self {
        let seen = lock(&dev)
            .device()
            .accounting()
            .counters
            .reported_bytes_total;
        DeviceBalloon {
            dev,
            seen_reported: Mutex::new(seen),
            engine_mib: Mutex::new(0),
            failed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Give up on the device (answer [`TargetError::Gone`]) instead of waiting for its lock
    /// once `failed` is set: the VM's `MmioBus::failed_flag`.
    pub fn with_failed(mut self, failed: Arc<AtomicBool>) -> Self {
        self.failed = failed;
        self
    }

    fn dev(
        &self,
    ) -> Result<
        MutexGuard<'_, tidepool_virtio::MmioTransport<tidepool_balloon::Balloon>>,
        TargetError,
    > {
        lock_live(&self.dev, &self.failed).ok_or(TargetError::Gone)
    }

    /// MiB of the balloon target the engine added and has not given back.
    pub fn engine_inflated_mib(&self) -> u64 {
        *lock(&self.engine_mib)
    }
}

impl BalloonHook for DeviceBalloon {
    fn inflate(&self, bytes: u64) -> Result<u64, TargetError> {
        let mut t = self.dev()?;
        let b = t.device_mut();
        if !tidepool_virtio::VirtioDevice::is_activated(&*b) {
            return Err(TargetError::Unsupported(
                "the guest's balloon driver is not up".into(),
            ));
        }
        // The guest has not met the last target yet (a slow driver, or one that never
        // inflates): ask for nothing more, so the engine does not count on memory that may
        // never come and goes on to the phases that free memory themselves.
        if b.actual_mib() < b.target_mib() {
            return Ok(0);
        }
        let ram_mib = b.accounting().assigned_bytes / MIB;
        let cur = b.target_mib();
        let add = bytes.div_ceil(MIB);
        let next = cur.saturating_add(add).min(ram_mib);
        if next <= cur {
            return Ok(0);
        }
        b.set_target_mib(next)
            .map_err(|e| TargetError::Failed(e.to_string()))?;
        *lock(&self.engine_mib) += next - cur;
        Ok((next - cur) * MIB)
    }

    fn deflate(&self, bytes: u64) -> Result<u64, TargetError> {
        let mut t = self.dev()?;
        let b = t.device_mut();
        let mut mine = lock(&self.engine_mib);
        // Whole MiB only, and never more than the engine added.
        let back = (bytes / MIB).min(*mine).min(b.target_mib());
        if back == 0 {
            return Ok(0);
        }
        b.set_target_mib(b.target_mib() - back)
            .map_err(|e| TargetError::Failed(e.to_string()))?;
        *mine -= back;
        Ok(back * MIB)
    }

    fn take_reported(&self) -> Result<u64, TargetError> {
        let total = self
            .dev()?
            .device()
            .accounting()
            .counters
            .reported_bytes_total;
        let mut seen = lock(&self.seen_reported);
        let delta = total.saturating_sub(*seen);
        *seen = total;
        Ok(delta)
    }

    /// Start a pass when the guest negotiated FREE_PAGE_HINT. Hinting is report only (the
    /// device never discards hinted pages, see docs/balloon.md), so nothing is expected back:
    /// the pass's figures are in the balloon's `HintStatus`.
    fn start_hinting(&self) -> Result<u64, TargetError> {
        let mut t = self.dev()?;
        match t.device_mut().start_hinting() {
            Ok(id) => {
                tracing::debug!(cmd_id = id, "free page hinting pass started");
                Ok(0)
            }
            // A pass is still running: nothing new to start.
            Err(BalloonError::HintingBusy { .. }) => Ok(0),
            Err(BalloonError::HintingDisabled) => Err(TargetError::Unsupported(
                "the guest did not negotiate free page hinting".into(),
            )),
            Err(BalloonError::NotActivated) => Err(TargetError::Unsupported(
                "the guest's balloon driver is not up".into(),
            )),
            Err(e) => Err(TargetError::Failed(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{GuestWindow, Layout, LayoutConfig};
    use crate::tiny_guest::harness::NoIrq;
    use std::sync::Arc;
    use tidepool_balloon::{Balloon, BalloonConfig, MmapBackend};
    use tidepool_virtio::MmioTransport;
    use vm_memory::GuestMemoryAtomic;

    #[test]
    fn balloon_hook_before_the_driver_is_up() {
        let layout = Layout::new(LayoutConfig {
            boot_ram: 32 * MIB,
            hotplug_size: 0,
        })
        .expect("layout");
        let window = Arc::new(GuestWindow::new(layout).expect("window"));
        let mem = (*window.guest_memory().expect("view")).clone();
        let backend = MmapBackend::with_ram(&mem, &[(0, 32 * MIB)]).expect("backend");
        let balloon = Balloon::new(BalloonConfig::default(), Box::new(backend)).expect("balloon");
        let t = MmioTransport::new(
            Box::new(balloon),
            GuestMemoryAtomic::new(mem),
            Arc::new(NoIrq::default()),
        )
        .expect("transport");
        let hook = DeviceBalloon::new(Arc::new(std::sync::Mutex::new(t)));
        assert!(matches!(
            hook.inflate(4 * MIB),
            Err(TargetError::Unsupported(_))
        ));
        assert_eq!(hook.take_reported(), Ok(0));
        assert!(matches!(
            hook.start_hinting(),
            Err(TargetError::Unsupported(_))
        ));
        assert_eq!(hook.deflate(4 * MIB), Ok(0), "nothing the engine added");
        assert_eq!(hook.engine_inflated_mib(), 0);
    }
}
