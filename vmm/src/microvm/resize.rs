//! Resizing a VM without its thread: [`ResizeHandle`] sets the virtio-mem target and reads the
//! resize figures from any thread. It never takes the device's lock, which the device thread
//! holds while it plugs and unplugs (pool allocation, `mprotect`, `madvise`, KVM calls), and
//! never waits for the guest: the target is recorded, the config-change interrupt raised (an
//! eventfd write) and the guest's wait requests woken, and the caller can answer at once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tidepool_hotplug::{MemControl, MemStatus};

use super::exits::GuestWake;
use super::{MemoryFigures, MicrovmError};

/// The host's handle on one VM's virtio-mem resizing. Cheap to clone.
#[derive(Debug, Clone)]
pub struct ResizeHandle {
    control: Arc<MemControl>,
    /// What the pool backend holds plugged (host-side plugs bypass the device's bitmap).
    backend_plugged: Arc<AtomicU64>,
    wake: Arc<GuestWake>,
}

impl ResizeHandle {
    /// A handle over a device's `control`, the backend's plugged counter, and the VM's guest
    /// wake-up.
    pub fn new(
        control: Arc<MemControl>,
        backend_plugged: Arc<AtomicU64>,
        wake: Arc<GuestWake>,
    ) -> ResizeHandle {
        ResizeHandle {
            control,
            backend_plugged,
            wake,
        }
    }

    /// Set the requested total guest RAM (boot RAM plus hot-plugged memory) and tell the
    /// guest; returns without waiting for the device or the guest.
    pub fn resize_total(&self, total: u64) -> Result<(), MicrovmError> {
        self.control.set_requested_total(total)?;
        self.wake.wake();
        Ok(())
    }

    /// virtio-mem's host-side status, from what the device last published.
    pub fn status(&self) -> MemStatus {
        MemStatus::from_control(self.control.config(), &self.control.snapshot())
    }

    /// `m` with its resize fields (region, plugged, requested, driver, progress base)
    /// replaced by the current ones; the other fields are kept as sampled.
    pub fn overlay(&self, m: MemoryFigures) -> MemoryFigures {
        let c = self.control.snapshot();
        let boot = self.control.config().boot_ram;
        let plugged_hot = c
            .plugged_size
            .max(self.backend_plugged.load(Ordering::Acquire));
        MemoryFigures {
            boot,
            region: self.control.config().region_size,
            plugged: boot + plugged_hot,
            requested: boot + c.requested_size,
            driver_ready: c.driver_ready,
            // Before the first resize there is no progress base: the current size is it.
            resize_from: if c.config_interrupts == 0 {
                boot + plugged_hot
            } else {
                boot + c.resize_from
            },
            ..m
        }
    }
}
