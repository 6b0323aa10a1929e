//! Tidepool VMM: KVM, vCPUs, boot, virtio-mmio transport and VM lifecycle.

pub mod bench;
pub mod memory;
