//! Device wiring: the MMIO bus of virtio-mmio transports ([`bus`]), their interrupts
//! (irqfd, or polled without an irqchip: [`irq`]), their queue notifications (one ioeventfd
//! per queue served by a device thread: [`notifier`]), and the host backends of the memory
//! devices: virtio-mem over the pool and the VM window ([`mem_backend`]), and balloon reclaim
//! over the window ([`reclaim`]).

pub mod bus;
pub mod irq;
pub mod mem_backend;
pub mod notifier;
pub mod reclaim;
#[cfg(test)]
mod tests;

pub use bus::{BusDevice, DeviceSlot, MmioBus, SharedTransport};

pub use irq::{IrqMode, IrqfdTrigger, PolledIrq};
pub use mem_backend::{BlockRecord, PoolMemoryBackend, RamChange, RamListener, VmMemoryHandle};
pub use notifier::{DeviceWork, NotifierStats, NotifyThread};
pub use reclaim::WindowReclaim;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use crate::memory::MMIO_HOLE_START;

/// Guest-physical address of the first virtio-mmio window: the start of the 32-bit MMIO
/// hole (the tiny guest's report window sits at 0xd000_0000, well above).
pub const DEVICE_MMIO_BASE: u64 = MMIO_HOLE_START;
/// Size of one virtio-mmio window.
pub const DEVICE_MMIO_SIZE: u64 = tidepool_virtio::mmio::MMIO_WINDOW_SIZE;
/// GSI of the first device; the next ones follow.
pub const FIRST_DEVICE_GSI: u32 = 5;
/// Highest GSI a device may use (the IOAPIC has 24 pins).
pub const LAST_DEVICE_GSI: u32 = 23;

/// Errors while setting up devices.
#[derive(Debug, thiserror::Error)]
pub enum DeviceSetupError {
    /// The bus has no free window or GSI left.
    #[error("no free virtio-mmio slot (GSIs {FIRST_DEVICE_GSI}..={LAST_DEVICE_GSI} are taken)")]
    BusFull,
    /// Building the transport failed.
    #[error("virtio-mmio transport: {0}")]
    Transport(#[from] tidepool_virtio::TransportError),
    /// An eventfd, epoll or thread operation failed.
    #[error("{what}: {source}")]
    Os {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A KVM ioctl (ioeventfd, irqfd) failed.
    #[error("{what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The memory window refused something.
    #[error(transparent)]
    Memory(#[from] crate::memory::MemoryError),
    /// A device model refused its configuration.
    #[error("{device}: {reason}")]
    Config {
        /// Which device.
        device: &'static str,
        /// Why.
        reason: String,
    },
}

/// Lock a device mutex unless the VM failed for good: `None` once `failed` is set while the
/// lock is held by someone else. A thread of a VM whose swap-in failed may be parked for good
/// holding a transport's lock (see `swap::guard`); nobody may wait for it. Poisoning is
/// ignored as in `lock`.
pub fn lock_live<'a, T: ?Sized>(m: &'a Mutex<T>, failed: &AtomicBool) -> Option<MutexGuard<'a, T>> {
    let mut spins = 0u32;
    loop {
        match m.try_lock() {
            Ok(g) => return Some(g),
            Err(TryLockError::Poisoned(p)) => return Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => {
                if failed.load(Ordering::Acquire) {
                    return None;
                }
                // Short holds (a queue being processed) are the rule: spin a little, then
                // sleep briefly between tries.
                spins = spins.saturating_add(1);
                if spins < 64 {
                    std::thread::yield_now();
                } else {
                    std::thread::sleep(std::time::Duration::from_micros(200));
                }
            }
        }
    }
}

/// Lock a mutex, taking the data even if a panicking thread poisoned it: device state stays
/// reachable for the API after a bug in one handler.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
