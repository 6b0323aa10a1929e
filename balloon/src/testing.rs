//! Test and benchmark helpers: a guest-side split-ring driver that plays the Linux balloon
//! driver in real guest memory, and an interrupt sink that counts signals. Built for tests and
//! with the `bench` feature.
//!
//! The driver lays the rings out itself instead of keeping a
//! `virtio_queue::mock::MockSplitQueue`: that mock zeroes the ring indices whenever it is
//! created, and in 0.18 it places the used ring `size` bytes (not `2 * size`) after the avail
//! ring, so the two overlap once more than half the ring is in use.

use std::sync::atomic::{AtomicU64, Ordering};
use tidepool_virtio::{InterruptError, InterruptKind, InterruptSink};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// `VRING_DESC_F_NEXT`.
const F_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
const F_WRITE: u16 = 2;

/// One buffer of a chain the driver submits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (an "in" buffer).
    pub writable: bool,
}

impl Buf {
    /// A device-readable buffer.
    pub fn out(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: false,
        }
    }

    /// A device-writable buffer.
    pub fn inb(addr: u64, len: u32) -> Self {
        Buf {
            addr,
            len,
            writable: true,
        }
    }
}

/// The driver side of one split virtqueue whose rings live at `base` in guest memory.
#[derive(Debug)]
pub struct DriverQueue {
    base: GuestAddress,
    size: u16,
    next_desc: u16,
}

impl DriverQueue {
    /// A queue of `size` entries with its rings at `base`.
    pub fn new(base: u64, size: u16) -> Self {
        DriverQueue {
            base: GuestAddress(base),
            size,
            next_desc: 0,
        }
    }

    /// Guest address of the descriptor table.
    pub fn desc_addr(&self) -> u64 {
        self.base.0
    }

    /// Guest address of the avail (driver) ring.
    pub fn avail_addr(&self) -> u64 {
        self.base.0 + 16 * u64::from(self.size)
    }

    /// Guest address of the used (device) ring.
    pub fn used_addr(&self) -> u64 {
        // flags, idx, ring[size], used_event; the used ring is 4-byte aligned.
        (self.avail_addr() + 6 + 2 * u64::from(self.size)).next_multiple_of(4)
    }

    /// Bytes of guest memory the rings use from `base`.
    pub fn footprint(&self) -> u64 {
        self.used_addr() + 6 + 8 * u64::from(self.size) - self.base.0
    }

    /// The device-side `Queue` as a transport would build it from the driver's addresses.
    pub fn device_queue(&self, _mem: &GuestMemoryMmap<()>) -> Result<Queue, virtio_queue::Error> {
        let mut q = Queue::new(self.size)?;
        q.set_size(self.size);
        q.try_set_desc_table_address(GuestAddress(self.desc_addr()))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail_addr()))?;
        q.try_set_used_ring_address(GuestAddress(self.used_addr()))?;
        q.set_ready(true);
        Ok(q)
    }

    /// Make a chain available (descriptors are reused round-robin: the caller must not have
    /// more than `size` descriptors outstanding). Returns the head index.
    pub fn submit(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        bufs: &[Buf],
    ) -> Result<u16, vm_memory::GuestMemoryError> {
        let n = u16::try_from(bufs.len())
            .ok()
            .filter(|n| *n > 0 && *n <= self.size)
            .ok_or(vm_memory::GuestMemoryError::InvalidBackendAddress)?;
        if self.next_desc + n > self.size {
            self.next_desc = 0;
        }
        let start = self.next_desc;
        let descs: Vec<RawDescriptor> = bufs
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let i = i as u16;
                let last = i + 1 == n;
                let mut flags = if b.writable { F_WRITE } else { 0 };
                if !last {
                    flags |= F_NEXT;
                }
                let next = if last { 0 } else { start + i + 1 };
                RawDescriptor::from(SplitDescriptor::new(b.addr, b.len, flags, next))
            })
            .collect();
        for (i, d) in descs.into_iter().enumerate() {
            let at = self.desc_addr() + 16 * u64::from(start + i as u16);
            mem.write_obj(d, GuestAddress(at))?;
        }
        // Publish the head in the avail ring (index taken modulo the ring size, wrapping).
        let avail = self.avail_addr();
        let idx = mem
            .read_obj::<u16>(GuestAddress(avail + 2))
            .map(u16::from_le)?;
        let slot = avail + 4 + 2 * u64::from(idx % self.size);
        mem.write_obj(start.to_le(), GuestAddress(slot))?;
        std::sync::atomic::fence(Ordering::Release);
        mem.write_obj(idx.wrapping_add(1).to_le(), GuestAddress(avail + 2))?;
        self.next_desc = (start + n) % self.size;
        Ok(start)
    }

    /// The used ring's index (how many chains the device returned, wrapping).
    pub fn used_idx(&self, mem: &GuestMemoryMmap<()>) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used_addr() + 2))
            .map(u16::from_le)
            .unwrap_or(0)
    }

    /// Used ring element `i` as `(head id, len)`.
    pub fn used_elem(&self, mem: &GuestMemoryMmap<()>, i: u16) -> (u32, u32) {
        let addr = self.used_addr() + 4 + 8 * u64::from(i % self.size);
        let id = mem.read_obj::<u32>(GuestAddress(addr)).unwrap_or(u32::MAX);
        let len = mem
            .read_obj::<u32>(GuestAddress(addr + 4))
            .unwrap_or(u32::MAX);
        (u32::from_le(id), u32::from_le(len))
    }
}

/// An interrupt sink that counts signals per kind.
#[derive(Debug, Default)]
pub struct CountingInterrupts {
    used: AtomicU64,
    config: AtomicU64,
}

impl CountingInterrupts {
    /// Used-buffer interrupts so far.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Config-change interrupts so far.
    pub fn config(&self) -> u64 {
        self.config.load(Ordering::Relaxed)
    }
}

impl InterruptSink for CountingInterrupts {
    fn signal(&self, kind: InterruptKind) -> Result<(), InterruptError> {
        match kind {
            InterruptKind::UsedBuffer => self.used.fetch_add(1, Ordering::Relaxed),
            InterruptKind::ConfigChange => self.config.fetch_add(1, Ordering::Relaxed),
        };
        Ok(())
    }
}
