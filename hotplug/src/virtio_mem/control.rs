//! The host's handle on a virtio-mem device: set the requested size and read the device's
//! figures without taking the device's own lock.
//!
//! The device model sits behind its transport's mutex, which the VMM's device thread holds
//! while it serves the guest's requests, and a plug or unplug is slow host work (pool
//! allocation, `mprotect`, `madvise`, KVM memslot calls). A resize is only a new target for
//! the guest, so it must not wait for that: [`MemControl`] keeps the host-facing state (the
//! requested size, the plugged size the device published, whether the driver is up) under a
//! small lock that nobody holds across a system call, and raises the config-change interrupt
//! (an eventfd write) after releasing it. The device reads the target from here whenever the
//! guest looks at its config or asks for something, and publishes its plugged size after
//! every change.

use super::REGION_ALIGN;
use super::{ResizeError, VirtioMemConfig, USABLE_EXTENT};
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use tidepool_virtio::{InterruptKind, InterruptSink};

/// The host-facing state of one device.
#[derive(Default)]
struct State {
    /// Bytes the host asked the guest to plug.
    requested_size: u64,
    /// Plugged size when the last resize was requested (for progress).
    resize_from: u64,
    /// Plugged size, as the device last published it.
    plugged_size: u64,
    /// The largest usable region a request asked for since the device last took it in.
    usable_floor: u64,
    /// The driver's interrupt while the device is activated (None: no driver).
    interrupt: Option<Arc<dyn InterruptSink>>,
    /// Config-change interrupts raised by resizes.
    config_interrupts: u64,
}

/// A snapshot of the host-facing figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ControlSnapshot {
    /// Bytes the host asked for.
    pub requested_size: u64,
    /// Plugged size when the last resize was requested.
    pub resize_from: u64,
    /// Bytes plugged (as published by the device after its last change).
    pub plugged_size: u64,
    /// Whether the guest driver has activated the device.
    pub driver_ready: bool,
    /// Config-change interrupts raised by resizes.
    pub config_interrupts: u64,
}

/// Shared between a [`super::VirtioMem`] and the host code that resizes it. Cloning the `Arc`
/// returned by [`super::VirtioMem::control`] is the way to hold one.
pub struct MemControl {
    config: VirtioMemConfig,
    state: Mutex<State>,
}

impl fmt::Debug for MemControl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemControl")
            .field("config", &self.config)
            .field("snapshot", &self.snapshot())
            .finish()
    }
}

/// The usable region for `requested`: the requested size plus some room to choose blocks,
/// in whole 128 MiB steps, capped at the region.
pub(super) fn usable_for(config: &VirtioMemConfig, requested: u64) -> u64 {
    let want = requested.saturating_add(USABLE_EXTENT);
    want.div_ceil(REGION_ALIGN)
        .saturating_mul(REGION_ALIGN)
        .min(config.region_size)
}

impl MemControl {
    /// The control of a device built from `config` (already validated).
    pub(super) fn new(config: VirtioMemConfig) -> MemControl {
        MemControl {
            config,
            state: Mutex::new(State {
                requested_size: config.initial_requested,
                ..State::default()
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The device's static configuration.
    pub fn config(&self) -> &VirtioMemConfig {
        &self.config
    }

    /// The current figures.
    pub fn snapshot(&self) -> ControlSnapshot {
        let s = self.lock();
        ControlSnapshot {
            requested_size: s.requested_size,
            resize_from: s.resize_from,
            plugged_size: s.plugged_size,
            driver_ready: s.interrupt.is_some(),
            config_interrupts: s.config_interrupts,
        }
    }

    /// Bytes the host asked for.
    pub fn requested_size(&self) -> u64 {
        self.lock().requested_size
    }

    /// Ask for a guest RAM total of `total_bytes` (boot RAM plus hot-plugged memory).
    pub fn set_requested_total(&self, total_bytes: u64) -> Result<(), ResizeError> {
        let boot_ram = self.config.boot_ram;
        let hotplug = total_bytes
            .checked_sub(boot_ram)
            .ok_or(ResizeError::BelowBootRam {
                total: total_bytes,
                boot_ram,
            })?;
        self.request_size(hotplug).map_err(|e| match e {
            ResizeError::AboveMaximum { max, .. } => ResizeError::AboveMaximum {
                requested: total_bytes,
                max: boot_ram + max,
            },
            other => other,
        })
    }

    /// Ask the guest to plug `bytes` in the device's region (0 = unplug everything). The
    /// target is kept until changed, whether or not the guest reaches it, and announced with
    /// a config-change interrupt, raised after the state lock is released. Never waits for
    /// the device.
    pub fn request_size(&self, bytes: u64) -> Result<(), ResizeError> {
        let bs = self.config.block_size;
        if bytes > self.config.region_size {
            return Err(ResizeError::AboveMaximum {
                requested: bytes,
                max: self.config.region_size,
            });
        }
        if bytes % bs != 0 {
            return Err(ResizeError::Unaligned {
                bytes,
                block_size: bs,
            });
        }
        let interrupt = {
            let mut s = self.lock();
            let Some(interrupt) = s.interrupt.clone() else {
                return Err(ResizeError::DriverNotReady);
            };
            s.requested_size = bytes;
            s.resize_from = s.plugged_size;
            s.usable_floor = s.usable_floor.max(usable_for(&self.config, bytes));
            s.config_interrupts += 1;
            interrupt
        };
        interrupt
            .signal(InterruptKind::ConfigChange)
            .map_err(|e| ResizeError::Notify(e.to_string()))
    }

    /// The device was activated with `interrupt` (a driver is up).
    pub(super) fn attach(&self, interrupt: Arc<dyn InterruptSink>) {
        self.lock().interrupt = Some(interrupt);
    }

    /// The driver is gone (device reset).
    pub(super) fn detach(&self) {
        self.lock().interrupt = None;
    }

    /// The device's plugged size changed to `plugged`.
    pub(super) fn publish_plugged(&self, plugged: u64) {
        self.lock().plugged_size = plugged;
    }

    /// Forget the progress base (system reset).
    pub(super) fn reset_progress(&self) {
        self.lock().resize_from = 0;
    }

    /// The requested size and the usable region requests asked for since the last call
    /// (0 if none); the device takes these in before it answers the guest.
    pub(super) fn take_request(&self) -> (u64, u64) {
        let mut s = self.lock();
        let floor = std::mem::take(&mut s.usable_floor);
        (s.requested_size, floor)
    }

    /// The requested size and the usable region requests asked for since the device last
    /// took them in, without taking them (for read-only config reads).
    pub(super) fn peek_request(&self) -> (u64, u64) {
        let s = self.lock();
        (s.requested_size, s.usable_floor)
    }
}
