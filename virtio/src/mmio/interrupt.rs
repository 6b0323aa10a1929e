//! The interrupt side of the transport: InterruptStatus bits, the config generation, and the
//! VMM's trigger (an irqfd in production, a counter in tests).

use crate::device::{InterruptError, InterruptKind, InterruptSink};
use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};

/// Asserts the device's interrupt line. The VMM implements it with an irqfd.
pub trait IrqTrigger: Send + Sync {
    /// Signal the interrupt once.
    fn trigger(&self) -> io::Result<()>;
}

/// Interrupt state of one virtio-mmio device, shared by the transport (which reads and
/// acknowledges it) and the device (which raises it through [`InterruptSink`]).
pub struct MmioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    trigger: Arc<dyn IrqTrigger>,
    raised: AtomicU64,
    failed: AtomicU64,
}

impl fmt::Debug for MmioInterrupt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmioInterrupt")
            .field("status", &self.status())
            .field("config_generation", &self.config_generation())
            .field("raised", &self.raised())
            .field("failed", &self.failed())
            .finish()
    }
}

impl MmioInterrupt {
    /// Interrupt state that signals through `trigger`.
    pub fn new(trigger: Arc<dyn IrqTrigger>) -> Self {
        MmioInterrupt {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            trigger,
            raised: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        }
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Interrupts signalled successfully.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }

    /// Trigger failures.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// InterruptACK: clear the acknowledged bits.
    pub(super) fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Device reset: no pending events.
    pub(super) fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Config space may have changed: drivers reading it concurrently must read it again.
    pub(super) fn bump_config_generation(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl InterruptSink for MmioInterrupt {
    fn signal(&self, kind: InterruptKind) -> Result<(), InterruptError> {
        let bit = match kind {
            InterruptKind::UsedBuffer => VIRTIO_MMIO_INT_VRING,
            InterruptKind::ConfigChange => {
                self.bump_config_generation();
                VIRTIO_MMIO_INT_CONFIG
            }
        };
        // The status bit must be visible before the guest takes the interrupt.
        self.status.fetch_or(bit, Ordering::SeqCst);
        match self.trigger.trigger() {
            Ok(()) => {
                self.raised.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Err(InterruptError(e.to_string()))
            }
        }
    }
}
