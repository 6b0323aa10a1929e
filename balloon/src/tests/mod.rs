//! Device tests that play the Linux driver over real guest memory: the driver side writes
//! descriptors and buffers into a `GuestMemoryMmap`, the device pops them from real queues.

mod fuzz;
mod hinting;
mod hostile;
mod malformed;
mod mmio;
mod queues;
mod real_memory;
mod reporting;
mod stats;
mod unplug;

use crate::backend::{ReclaimBackend, RecordingBackend};
use crate::config::BalloonConfig;
use crate::device::Balloon;
use crate::testing::{Buf, CountingInterrupts, DriverQueue};
use crate::{
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_F_VERSION_1,
};
use std::sync::Arc;
use tidepool_virtio::{GuestMem, VirtioDevice};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// Guest RAM of the test VMs.
pub(crate) const RAM: u64 = 64 << 20;
/// Where the driver's buffers (PFN arrays, stats) live.
pub(crate) const BUF_AREA: u64 = 0x10_0000;

pub(crate) const fn bit(b: u32) -> u64 {
    1 << b
}

/// Every feature the default configuration offers.
pub(crate) const ALL: u64 = bit(VIRTIO_F_VERSION_1)
    | bit(VIRTIO_BALLOON_F_STATS_VQ)
    | bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM)
    | bit(VIRTIO_BALLOON_F_REPORTING)
    | bit(VIRTIO_BALLOON_F_PAGE_POISON);

/// A VM: guest memory, the device, the driver's queues and an interrupt counter.
pub(crate) struct Vm {
    pub mem: GuestMemoryMmap<()>,
    pub atomic: GuestMem,
    pub irq: Arc<CountingInterrupts>,
    pub dev: Balloon,
    pub drv: Vec<DriverQueue>,
}

impl Vm {
    /// A VM over `mem` whose device uses `backend`, with the driver negotiated to `acked`
    /// but not activated yet.
    pub fn with_backend(
        mem: GuestMemoryMmap<()>,
        cfg: BalloonConfig,
        backend: Box<dyn ReclaimBackend>,
        acked: u64,
    ) -> Vm {
        let mut dev = Balloon::new(cfg, backend).unwrap();
        assert_eq!(dev.avail_features() & acked, acked, "acked ⊆ offered");
        dev.set_acked_features(acked);
        let n = dev.num_queues_for(acked);
        let drv = (0..n)
            .map(|i| DriverQueue::new(0x1_0000 * (i as u64 + 1), cfg.queue_size))
            .collect();
        Vm {
            atomic: GuestMemoryAtomic::new(mem.clone()),
            mem,
            irq: Arc::new(CountingInterrupts::default()),
            dev,
            drv,
        }
    }

    /// A 64 MiB VM with a recording backend, activated with `acked`.
    pub fn new(cfg: BalloonConfig, acked: u64) -> (Vm, RecordingBackend) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        let fake = RecordingBackend::new(&[(0, RAM)]).unwrap();
        let mut vm = Vm::with_backend(mem, cfg, Box::new(fake.clone()), acked);
        vm.activate();
        (vm, fake)
    }

    pub fn activate(&mut self) {
        let queues = self
            .drv
            .iter()
            .map(|d| d.device_queue(&self.mem).unwrap())
            .collect();
        self.dev
            .activate(self.atomic.clone(), queues, self.irq.clone())
            .unwrap();
    }

    /// Submit a chain on queue `q` and notify; returns how many chains the device returned.
    pub fn kick(&mut self, q: usize, bufs: &[Buf]) -> u16 {
        let before = self.drv[q].used_idx(&self.mem);
        self.drv[q].submit(&self.mem, bufs).unwrap();
        self.dev.process_queue(q).unwrap();
        self.drv[q].used_idx(&self.mem).wrapping_sub(before)
    }

    /// Write `bytes` into the buffer area at `slot` (1 KiB slots) and return its address.
    pub fn put(&self, slot: u64, bytes: &[u8]) -> u64 {
        let addr = BUF_AREA + slot * 0x1000;
        self.mem.write_slice(bytes, GuestAddress(addr)).unwrap();
        addr
    }

    /// Send a PFN array on queue 0 (inflate) or 1 (deflate), as Linux's `tell_host` does.
    pub fn send_pfns(&mut self, q: usize, pfns: &[u32]) {
        let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
        let addr = self.put(q as u64, &bytes);
        assert_eq!(self.kick(q, &[Buf::out(addr, bytes.len() as u32)]), 1);
    }

    /// The driver writes `actual` in config space, as `update_balloon_size` does.
    pub fn write_actual(&mut self, pages: u32) {
        self.dev.write_config(4, &pages.to_le_bytes());
    }
}
