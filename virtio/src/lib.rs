//! # tidepool-virtio
//!
//! The virtio device interface ([`VirtioDevice`]) shared by Tidepool's device models, and the
//! virtio-mmio (version 2) transport logic. Nothing here needs KVM: the VMM wires the transport
//! to MMIO exits, ioeventfds and irqfds; tests drive it directly over real guest memory.

pub mod device;
pub mod mmio;

pub use device::{
    DeviceError, GuestMem, InterruptError, InterruptKind, InterruptSink, VirtioDevice,
};
pub use mmio::{IrqTrigger, MmioInterrupt, MmioTransport, TransportError};
