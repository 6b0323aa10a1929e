//! Device interrupts: an irqfd on the device's GSI when the VM has the in-kernel irqchip, or
//! nothing at all (a polled driver reads InterruptStatus) when it has not.

use std::io;

use kvm_ioctls::VmFd;
use tidepool_virtio::IrqTrigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::DeviceSetupError;

/// How a VM's devices signal the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqMode {
    /// One irqfd per device on its GSI (needs the in-kernel irqchip).
    Irqfd,
    /// No interrupts: the InterruptStatus bits are still set, and a polling driver sees them.
    Polled,
}

/// Signals a GSI through an eventfd registered as a KVM irqfd.
#[derive(Debug)]
pub struct IrqfdTrigger {
    evt: EventFd,
    gsi: u32,
}

impl IrqfdTrigger {
    /// Create the eventfd and register it on `gsi`. Fails with EINVAL when the VM has no
    /// irqchip.
    pub fn register(vm: &VmFd, gsi: u32) -> Result<IrqfdTrigger, DeviceSetupError> {
        let evt = EventFd::new(EFD_NONBLOCK).map_err(|source| DeviceSetupError::Os {
            what: "eventfd for irqfd",
            source,
        })?;
        vm.register_irqfd(&evt, gsi)
            .map_err(|source| DeviceSetupError::Kvm {
                what: "KVM_IRQFD",
                source,
            })?;
        Ok(IrqfdTrigger { evt, gsi })
    }

    /// The GSI.
    pub fn gsi(&self) -> u32 {
        self.gsi
    }
}

impl IrqTrigger for IrqfdTrigger {
    fn trigger(&self) -> io::Result<()> {
        self.evt.write(1)
    }
}

/// The trigger of a VM without an irqchip: signalling succeeds and does nothing else.
#[derive(Debug, Default, Clone, Copy)]
pub struct PolledIrq;

impl IrqTrigger for PolledIrq {
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}
