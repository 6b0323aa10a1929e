//! Register offsets of the virtio-mmio v2 window (virtio 1.2, 4.2.2), as `u64` for matching.

use virtio_bindings::virtio_mmio as m;

pub(super) const MAGIC: u64 = m::VIRTIO_MMIO_MAGIC_VALUE as u64;
pub(super) const VERSION: u64 = m::VIRTIO_MMIO_VERSION as u64;
pub(super) const DEVICE_ID: u64 = m::VIRTIO_MMIO_DEVICE_ID as u64;
pub(super) const VENDOR: u64 = m::VIRTIO_MMIO_VENDOR_ID as u64;
pub(super) const DEVICE_FEATURES: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES as u64;
pub(super) const DEVICE_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
pub(super) const DRIVER_FEATURES: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES as u64;
pub(super) const DRIVER_FEATURES_SEL: u64 = m::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
pub(super) const QUEUE_SEL: u64 = m::VIRTIO_MMIO_QUEUE_SEL as u64;
pub(super) const QUEUE_NUM_MAX: u64 = m::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
pub(super) const QUEUE_NUM: u64 = m::VIRTIO_MMIO_QUEUE_NUM as u64;
pub(super) const QUEUE_READY: u64 = m::VIRTIO_MMIO_QUEUE_READY as u64;
pub(super) const QUEUE_NOTIFY: u64 = m::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
pub(super) const INTERRUPT_STATUS: u64 = m::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
pub(super) const INTERRUPT_ACK: u64 = m::VIRTIO_MMIO_INTERRUPT_ACK as u64;
pub(super) const STATUS: u64 = m::VIRTIO_MMIO_STATUS as u64;
pub(super) const QUEUE_DESC_LOW: u64 = m::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
pub(super) const QUEUE_DESC_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
pub(super) const QUEUE_DRIVER_LOW: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
pub(super) const QUEUE_DRIVER_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
pub(super) const QUEUE_DEVICE_LOW: u64 = m::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
pub(super) const QUEUE_DEVICE_HIGH: u64 = m::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
pub(super) const SHM_SEL: u64 = m::VIRTIO_MMIO_SHM_SEL as u64;
pub(super) const SHM_LEN_LOW: u64 = m::VIRTIO_MMIO_SHM_LEN_LOW as u64;
pub(super) const SHM_LEN_HIGH: u64 = m::VIRTIO_MMIO_SHM_LEN_HIGH as u64;
pub(super) const SHM_BASE_LOW: u64 = m::VIRTIO_MMIO_SHM_BASE_LOW as u64;
pub(super) const SHM_BASE_HIGH: u64 = m::VIRTIO_MMIO_SHM_BASE_HIGH as u64;
/// QueueReset (only meaningful with VIRTIO_F_RING_RESET, never offered here).
pub(super) const QUEUE_RESET: u64 = 0xc0;
pub(super) const CONFIG_GENERATION: u64 = m::VIRTIO_MMIO_CONFIG_GENERATION as u64;

/// Registers the driver may only write.
pub(super) fn is_write_only(offset: u64) -> bool {
    matches!(
        offset,
        DEVICE_FEATURES_SEL
            | DRIVER_FEATURES
            | DRIVER_FEATURES_SEL
            | QUEUE_SEL
            | QUEUE_NUM
            | QUEUE_NOTIFY
            | INTERRUPT_ACK
            | QUEUE_DESC_LOW
            | QUEUE_DESC_HIGH
            | QUEUE_DRIVER_LOW
            | QUEUE_DRIVER_HIGH
            | QUEUE_DEVICE_LOW
            | QUEUE_DEVICE_HIGH
            | SHM_SEL
    )
}

/// Registers the driver may only read.
pub(super) fn is_read_only(offset: u64) -> bool {
    matches!(
        offset,
        MAGIC
            | VERSION
            | DEVICE_ID
            | VENDOR
            | DEVICE_FEATURES
            | QUEUE_NUM_MAX
            | INTERRUPT_STATUS
            | CONFIG_GENERATION
            | SHM_LEN_LOW
            | SHM_LEN_HIGH
            | SHM_BASE_LOW
            | SHM_BASE_HIGH
    )
}
