//! The interface between a virtio device model and its transport.
//!
//! A device model (virtio-mem in `hotplug`, virtio-balloon in `balloon`) implements
//! [`VirtioDevice`]. The transport (virtio-mmio v2, in [`crate::mmio`]) owns the register state,
//! negotiates features, builds the queues from the driver's addresses, activates the device when
//! the driver sets DRIVER_OK, and calls [`VirtioDevice::process_queue`] when the driver notifies a
//! queue (through an ioeventfd in the VMM, or directly in tests).

use std::sync::Arc;
use virtio_queue::Queue;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// The guest memory type device models work on. The VMM swaps in a new map when memory is
/// plugged or unplugged, so devices always see exactly the guest RAM that is accessible.
pub type GuestMem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// Why an interrupt is raised; the transport turns it into a bit of its interrupt status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// A queue's used ring was updated (virtio-mmio InterruptStatus bit 0).
    UsedBuffer,
    /// The device configuration changed (InterruptStatus bit 1).
    ConfigChange,
}

/// Error signalling an interrupt.
#[derive(Debug, thiserror::Error)]
#[error("failed to signal interrupt: {0}")]
pub struct InterruptError(pub String);

/// Raises an interrupt towards the guest. The transport provides one to the device at
/// activation; it records the status bit before signalling.
pub trait InterruptSink: Send + Sync {
    /// Raise `kind`.
    fn signal(&self, kind: InterruptKind) -> Result<(), InterruptError>;
}

/// Errors a device returns to its transport.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Activation was refused (bad queue count, missing feature the device requires, ...).
    #[error("activation failed: {0}")]
    Activate(String),
    /// The device is not activated.
    #[error("device is not activated")]
    NotActivated,
    /// A queue index that the device does not have.
    #[error("no such queue: {0}")]
    NoSuchQueue(usize),
    /// Processing a queue failed in a way that needs the driver to reset the device.
    #[error("queue processing failed: {0}")]
    Queue(String),
    /// Signalling the guest failed.
    #[error(transparent)]
    Interrupt(#[from] InterruptError),
}

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// The virtio device ID (5 = balloon, 24 = memory device).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the slice's length is the number of queues the device offers
    /// for the features it currently offers.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered (VIRTIO_F_VERSION_1 included; the transport checks it is there).
    fn avail_features(&self) -> u64;
    /// The driver's accepted features, a subset of `avail_features`, given at FEATURES_OK.
    fn set_acked_features(&mut self, features: u64);
    /// Device-specific check of the driver's accepted features, called by the transport when the
    /// driver sets FEATURES_OK (before [`VirtioDevice::set_acked_features`]). An error makes the
    /// transport leave FEATURES_OK clear, so the driver sees the negotiation fail. Defaults to
    /// accepting any subset of `avail_features`.
    fn check_features(&self, acked: u64) -> Result<(), DeviceError> {
        let _ = acked;
        Ok(())
    }
    /// Number of queues that exist once `acked` features are negotiated (for devices whose
    /// queues depend on features, like the balloon). Defaults to all of `queue_max_sizes`.
    fn num_queues_for(&self, acked: u64) -> usize {
        let _ = acked;
        self.queue_max_sizes().len()
    }
    /// Read device config space at `offset`. Out-of-range bytes read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device config space at `offset`. Read-only or out-of-range writes are ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Start the device with the negotiated queues.
    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        interrupt: Arc<dyn InterruptSink>,
    ) -> Result<(), DeviceError>;
    /// The driver notified queue `index`: process what it made available.
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError>;
    /// Whether `activate` succeeded and no reset happened since.
    fn is_activated(&self) -> bool;
    /// A device reset requested by the driver (status written to 0). Returns the queues so the
    /// transport can rebuild them; device state that the spec says survives a reset (virtio-mem's
    /// plugged blocks) must survive it.
    fn reset(&mut self) -> Option<Vec<Queue>>;
}
