//! The MMIO bus: virtio-mmio transports at fixed windows in the 32-bit hole, each with its
//! own GSI, reached from vCPU MMIO exits.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tidepool_virtio::{MmioTransport, TransportError, VirtioDevice};

use super::{
    lock_live, DeviceSetupError, DEVICE_MMIO_BASE, DEVICE_MMIO_SIZE, FIRST_DEVICE_GSI,
    LAST_DEVICE_GSI,
};

/// What the bus needs from a device window: register access and queue notification. Every
/// [`MmioTransport`] is one, whatever its device model, so the VM can keep a typed handle to
/// its transports (for host requests) while the bus holds them as trait objects.
pub trait BusDevice: Send + std::fmt::Debug {
    /// A driver read at `offset` into the window.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// A driver write at `offset` into the window.
    fn write(&mut self, offset: u64, data: &[u8]);
    /// Queue `queue` was notified through its ioeventfd.
    fn notify(&mut self, queue: u32) -> Result<(), TransportError>;
    /// The `(address, datamatch)` pairs to register as ioeventfds for a window at `base`.
    fn ioeventfds(&self, base: u64) -> Vec<(u64, u32)>;
}

impl<D: VirtioDevice + ?Sized> BusDevice for MmioTransport<D> {
    fn read(&self, offset: u64, data: &mut [u8]) {
        MmioTransport::read(self, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        MmioTransport::write(self, offset, data)
    }
    fn notify(&mut self, queue: u32) -> Result<(), TransportError> {
        MmioTransport::notify(self, queue)
    }
    fn ioeventfds(&self, base: u64) -> Vec<(u64, u32)> {
        MmioTransport::ioeventfds(self, base)
    }
}

/// A device shared by the vCPU threads (MMIO exits), the device thread (ioeventfds) and the
/// VM thread (host requests).
pub type SharedTransport = Arc<Mutex<dyn BusDevice>>;

/// One device on the bus.
#[derive(Debug, Clone)]
pub struct DeviceSlot {
    /// Short device name (`virtio-mem`, `virtio-balloon`).
    pub name: &'static str,
    /// Guest-physical base of its 4 KiB register window.
    pub base: u64,
    /// Its interrupt line.
    pub gsi: u32,
    /// The transport.
    pub transport: SharedTransport,
}

/// The devices of one VM, by address.
#[derive(Debug, Default)]
pub struct MmioBus {
    slots: Vec<DeviceSlot>,
    /// Set when the VM failed for good (a swap-in failed): device locks are then taken with
    /// [`lock_live`] and given up when held, since the holder may be parked forever.
    failed: Arc<AtomicBool>,
}

impl MmioBus {
    /// An empty bus.
    pub fn new() -> MmioBus {
        MmioBus::default()
    }

    /// Window base and GSI the next device gets, or `BusFull`.
    pub fn next_slot(&self) -> Result<(u64, u32), DeviceSetupError> {
        let n = u32::try_from(self.slots.len()).map_err(|_| DeviceSetupError::BusFull)?;
        let gsi = FIRST_DEVICE_GSI + n;
        if gsi > LAST_DEVICE_GSI {
            return Err(DeviceSetupError::BusFull);
        }
        Ok((DEVICE_MMIO_BASE + u64::from(n) * DEVICE_MMIO_SIZE, gsi))
    }

    /// Put `transport` at the next slot (which [`MmioBus::next_slot`] announced).
    pub fn add(
        &mut self,
        name: &'static str,
        transport: SharedTransport,
    ) -> Result<DeviceSlot, DeviceSetupError> {
        let (base, gsi) = self.next_slot()?;
        let slot = DeviceSlot {
            name,
            base,
            gsi,
            transport,
        };
        self.slots.push(slot.clone());
        Ok(slot)
    }

    /// Mark the VM failed: from now on nobody waits for a device lock that is held.
    pub fn mark_failed(&self) {
        self.failed.store(true, Ordering::Release);
    }

    /// Whether the VM was marked failed.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// The failed flag, shared with the device thread and the VM's other users.
    pub fn failed_flag(&self) -> &Arc<AtomicBool> {
        &self.failed
    }

    /// Lock `transport` (one of this bus's) unless the VM failed and the lock is held.
    pub fn lock_live<'a, T: ?Sized>(
        &self,
        transport: &'a Mutex<T>,
    ) -> Option<std::sync::MutexGuard<'a, T>> {
        lock_live(transport, &self.failed)
    }

    /// The devices, in address order.
    pub fn slots(&self) -> &[DeviceSlot] {
        &self.slots
    }

    /// The device named `name`, if present.
    pub fn by_name(&self, name: &str) -> Option<&DeviceSlot> {
        self.slots.iter().find(|s| s.name == name)
    }

    fn find(&self, addr: u64, len: usize) -> Option<(&DeviceSlot, u64)> {
        let s = self
            .slots
            .iter()
            .find(|s| addr >= s.base && addr - s.base < DEVICE_MMIO_SIZE)?;
        let off = addr - s.base;
        // An access must not straddle the window's end.
        (off + len as u64 <= DEVICE_MMIO_SIZE).then_some((s, off))
    }

    /// Whether `addr` lies in a device window.
    pub fn contains(&self, addr: u64) -> bool {
        self.find(addr, 1).is_some()
    }

    /// A guest read at `addr`; false when no device is there (`data` untouched).
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((s, off)) => {
                // A failed VM's device whose lock is held for good reads as all ones.
                match lock_live(&s.transport, &self.failed) {
                    Some(t) => t.read(off, data),
                    None => data.fill(0xff),
                }
                true
            }
            None => false,
        }
    }

    /// A guest write at `addr` (QueueNotify writes that no ioeventfd caught land here and
    /// notify the device directly); false when no device is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((s, off)) => {
                if let Some(mut t) = lock_live(&s.transport, &self.failed) {
                    t.write(off, data);
                }
                true
            }
            None => false,
        }
    }
}
