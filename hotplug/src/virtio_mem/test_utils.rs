//! Test helpers: a tracking backend and a guest that drives the device through the real
//! virtio-mmio transport the way Linux's virtio_mmio + virtio_mem drivers do, over real guest
//! memory. Built for the crate's tests and, with the `testing` feature, for benchmarks that
//! drive the device from the host (they panic on a malformed ring, as a test would).

use super::request::{Request, Response, RESPONSE_SIZE};
use super::{BackendError, MemoryBackend, VirtioMem, VirtioMemConfig, MIB};
use std::collections::BTreeSet;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tidepool_virtio::mmio::{status, IrqTrigger, MmioTransport};
use virtio_bindings::virtio_mmio as r;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

/// 1 GiB.
pub const GIB: u64 = 1 << 30;
/// Region start used by the tests.
pub const BASE: u64 = 4 * GIB;
/// Region size used by the tests.
pub const REGION: u64 = GIB;
/// Boot RAM used by the tests.
pub const BOOT: u64 = 2 * GIB;
/// Where the driver keeps its request and response.
pub const REQ_ADDR: u64 = 0x8000;
/// See [`REQ_ADDR`].
pub const RESP_ADDR: u64 = 0x9000;
const QUEUE_ADDR: u64 = 0x1000;
const QUEUE_LEN: u16 = 128;
/// Guest RAM the tests map (rings and buffers only).
pub const GUEST_RAM: u64 = 0x10_0000;

/// One call into the backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// plug(gpa, len)
    Plug(u64, u64),
    /// unplug(gpa, len)
    Unplug(u64, u64),
}

/// A backend that tracks which 2 MiB pages are mapped, with a capacity (the pool) and
/// injectable failures. It fails (rather than panics) on any call that would double-map,
/// unmap what is not mapped, or reach outside the region, so tests see misuse as errors.
#[derive(Debug)]
pub struct FakeBackend {
    /// Region the device manages.
    pub region: (u64, u64),
    /// Mapped 2 MiB pages.
    pub mapped: BTreeSet<u64>,
    /// Every call, in order.
    pub calls: Vec<Call>,
    /// Bytes the pool can give.
    pub capacity: u64,
    /// Fail the next call with this.
    pub fail_next: Option<BackendError>,
    /// Calls refused as misuse (must stay 0).
    pub misuse: usize,
}

impl FakeBackend {
    /// A backend for the test region with a pool as large as the region.
    pub fn new() -> Self {
        FakeBackend {
            region: (BASE, REGION),
            mapped: BTreeSet::new(),
            calls: Vec::new(),
            capacity: REGION,
            fail_next: None,
            misuse: 0,
        }
    }

    fn pages(gpa: u64, len: u64) -> impl Iterator<Item = u64> {
        (gpa..gpa + len).step_by((2 * MIB) as usize)
    }

    fn check(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        let (base, size) = self.region;
        if gpa < base || len == 0 || gpa + len > base + size || gpa % (2 * MIB) != 0 {
            self.misuse += 1;
            return Err(BackendError::Failed(format!(
                "outside region: {gpa:#x}+{len:#x}"
            )));
        }
        Ok(())
    }

    /// Bytes mapped now.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped.len() as u64 * 2 * MIB
    }
}

impl MemoryBackend for FakeBackend {
    fn plug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        self.calls.push(Call::Plug(gpa, len));
        self.check(gpa, len)?;
        if let Some(e) = self.fail_next.take() {
            return Err(e);
        }
        if self.mapped_bytes() + len > self.capacity {
            return Err(BackendError::OutOfMemory);
        }
        if Self::pages(gpa, len).any(|p| self.mapped.contains(&p)) {
            self.misuse += 1;
            return Err(BackendError::Failed("double map".into()));
        }
        self.mapped.extend(Self::pages(gpa, len));
        Ok(())
    }

    fn unplug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        self.calls.push(Call::Unplug(gpa, len));
        self.check(gpa, len)?;
        if let Some(e) = self.fail_next.take() {
            return Err(e);
        }
        if !Self::pages(gpa, len).all(|p| self.mapped.contains(&p)) {
            self.misuse += 1;
            return Err(BackendError::Failed("unmapping what is not mapped".into()));
        }
        for p in Self::pages(gpa, len) {
            self.mapped.remove(&p);
        }
        Ok(())
    }
}

impl Default for FakeBackend {
    fn default() -> Self {
        Self::new()
    }
}

/// Counts interrupts.
#[derive(Debug, Default)]
pub struct Trigger(pub AtomicUsize);

impl IrqTrigger for Trigger {
    fn trigger(&self) -> io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// The test config: 1 GiB region at 4 GiB, 2 MiB blocks, 2 GiB boot RAM.
pub fn config() -> VirtioMemConfig {
    VirtioMemConfig::new(BASE, REGION, BOOT)
}

/// A guest with a virtio-mem device behind a virtio-mmio transport.
pub struct Guest<B: MemoryBackend + Send = FakeBackend> {
    /// Guest RAM (leaked so the mock queue can borrow it for the whole test).
    pub mmap: &'static GuestMemoryMmap<()>,
    /// The driver's ring.
    pub vq: MockSplitQueue<'static, GuestMemoryMmap<()>>,
    /// Interrupt counter.
    pub trigger: Arc<Trigger>,
    /// The transport with the device.
    pub t: MmioTransport<VirtioMem<B>>,
    sent: u16,
}

impl<B: MemoryBackend + Send> std::fmt::Debug for Guest<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guest")
            .field("sent", &self.sent)
            .field("irqs", &self.irqs())
            .finish_non_exhaustive()
    }
}

impl Guest<FakeBackend> {
    /// A powered-on guest whose driver has not probed yet.
    pub fn new(cfg: VirtioMemConfig) -> Self {
        Self::with_backend(cfg, FakeBackend::new())
    }

    /// A guest whose driver probed with the features Linux 6.1 accepts.
    pub fn booted(cfg: VirtioMemConfig) -> Self {
        Self::booted_with(cfg, FakeBackend::new())
    }
}

impl<B: MemoryBackend + Send> Guest<B> {
    /// A powered-on guest over `backend` whose driver has not probed yet.
    pub fn with_backend(cfg: VirtioMemConfig, backend: B) -> Self {
        let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_RAM as usize)])
            .expect("test guest memory");
        let mmap: &'static GuestMemoryMmap<()> = Box::leak(Box::new(mmap));
        let vq = MockSplitQueue::create(mmap, GuestAddress(QUEUE_ADDR), QUEUE_LEN);
        let trigger = Arc::new(Trigger::default());
        let dev = VirtioMem::new(cfg, backend).expect("valid config");
        let t = MmioTransport::new(
            Box::new(dev),
            GuestMemoryAtomic::new(mmap.clone()),
            trigger.clone(),
        )
        .expect("transport");
        Guest {
            mmap,
            vq,
            trigger,
            t,
            sent: 0,
        }
    }

    /// A guest over `backend` whose driver probed with the features Linux 6.1 accepts.
    pub fn booted_with(cfg: VirtioMemConfig, backend: B) -> Self {
        let mut g = Self::with_backend(cfg, backend);
        let offered = g.offered();
        assert!(
            g.init(offered),
            "driver init failed: {:?}",
            g.t.last_error()
        );
        g
    }

    /// Read a register.
    pub fn rd(&self, off: u32) -> u32 {
        let mut b = [0u8; 4];
        self.t.read(u64::from(off), &mut b);
        u32::from_le_bytes(b)
    }

    /// Write a register.
    pub fn wr(&mut self, off: u32, v: u32) {
        self.t.write(u64::from(off), &v.to_le_bytes());
    }

    /// Features the device offers.
    pub fn offered(&mut self) -> u64 {
        self.wr(r::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        let high = u64::from(self.rd(r::VIRTIO_MMIO_DEVICE_FEATURES));
        self.wr(r::VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        (high << 32) | u64::from(self.rd(r::VIRTIO_MMIO_DEVICE_FEATURES))
    }

    /// Probe as Linux does (reset, negotiate `features`, one queue, DRIVER_OK). Returns
    /// whether the device ended up activated. The ring restarts at index 0.
    pub fn init(&mut self, features: u64) -> bool {
        assert_eq!(self.rd(r::VIRTIO_MMIO_DEVICE_ID), 24);
        self.wr(r::VIRTIO_MMIO_STATUS, 0);
        self.wr(r::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
        self.wr(r::VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        self.wr(r::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        self.wr(r::VIRTIO_MMIO_DRIVER_FEATURES, (features >> 32) as u32);
        self.wr(r::VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        self.wr(r::VIRTIO_MMIO_DRIVER_FEATURES, features as u32);
        let s = self.rd(r::VIRTIO_MMIO_STATUS) | status::FEATURES_OK;
        self.wr(r::VIRTIO_MMIO_STATUS, s);
        if self.rd(r::VIRTIO_MMIO_STATUS) & status::FEATURES_OK == 0 {
            self.wr(
                r::VIRTIO_MMIO_STATUS,
                s & !status::FEATURES_OK | status::FAILED,
            );
            return false;
        }
        self.vq = MockSplitQueue::create(self.mmap, GuestAddress(QUEUE_ADDR), QUEUE_LEN);
        self.sent = 0;
        self.wr(r::VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(self.rd(r::VIRTIO_MMIO_QUEUE_NUM_MAX), u32::from(QUEUE_LEN));
        self.wr(r::VIRTIO_MMIO_QUEUE_NUM, u32::from(QUEUE_LEN));
        let addrs = [
            (r::VIRTIO_MMIO_QUEUE_DESC_LOW, self.vq.desc_table_addr().0),
            (r::VIRTIO_MMIO_QUEUE_AVAIL_LOW, self.vq.avail_addr().0),
            (r::VIRTIO_MMIO_QUEUE_USED_LOW, self.vq.used_addr().0),
        ];
        for (reg, a) in addrs {
            self.wr(reg, a as u32);
            self.wr(reg + 4, (a >> 32) as u32);
        }
        self.wr(r::VIRTIO_MMIO_QUEUE_READY, 1);
        let s = self.rd(r::VIRTIO_MMIO_STATUS);
        self.wr(r::VIRTIO_MMIO_STATUS, s | status::DRIVER_OK);
        self.t.is_activated()
    }

    /// Put a chain of `(addr, len, device_writable)` buffers on the ring, notify, and return
    /// the used length the device reported.
    pub fn send(&mut self, bufs: &[(u64, u32, bool)]) -> u32 {
        let first = (self.sent % (QUEUE_LEN / 4)) * 4;
        for (i, &(addr, len, write)) in bufs.iter().enumerate() {
            let i = i as u16;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            if usize::from(i) + 1 < bufs.len() {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let d = SplitDescriptor::new(addr, len, flags, first + i + 1);
            self.vq
                .desc_table()
                .store(first + i, RawDescriptor::from(d))
                .expect("descriptor slot");
        }
        let avail = self.vq.avail_addr().0;
        let idx: u16 = self
            .mmap
            .read_obj(GuestAddress(avail + 2))
            .expect("avail idx");
        let slot = avail + 4 + u64::from(idx % QUEUE_LEN) * 2;
        self.mmap
            .write_obj(first, GuestAddress(slot))
            .expect("avail ring");
        self.mmap
            .write_obj(idx.wrapping_add(1), GuestAddress(avail + 2))
            .expect("avail idx");
        self.sent = self.sent.wrapping_add(1);
        self.t.notify(0).expect("notify");
        assert_eq!(
            self.vq.used().idx().load(),
            self.sent,
            "request was consumed"
        );
        let elem = self
            .vq
            .used()
            .ring()
            .ref_at(usize::from((self.sent - 1) % QUEUE_LEN))
            .expect("used slot")
            .load();
        assert_eq!(elem.id(), u32::from(first));
        elem.len()
    }

    /// Send `req` the way Linux does (one readable 24-byte buffer, one writable 10-byte
    /// buffer) and read the answer.
    pub fn request(&mut self, req: Request) -> Response {
        self.raw_request(&req.to_bytes())
    }

    /// Send raw request bytes in Linux's two-buffer layout.
    pub fn raw_request(&mut self, bytes: &[u8]) -> Response {
        self.mmap
            .write_slice(bytes, GuestAddress(REQ_ADDR))
            .expect("request buffer");
        self.mmap
            .write_slice(&[0xff; RESPONSE_SIZE], GuestAddress(RESP_ADDR))
            .expect("response buffer");
        let used = self.send(&[
            (REQ_ADDR, bytes.len() as u32, false),
            (RESP_ADDR, RESPONSE_SIZE as u32, true),
        ]);
        assert_eq!(used, RESPONSE_SIZE as u32);
        let is_state = bytes.first() == Some(&3) && bytes.get(1) == Some(&0);
        self.parse_response(is_state)
    }

    /// The response buffer's content, for a request other than STATE.
    pub fn response(&self) -> Response {
        self.parse_response(false)
    }

    fn parse_response(&self, state_request: bool) -> Response {
        let mut b = [0u8; RESPONSE_SIZE];
        self.mmap
            .read_slice(&mut b, GuestAddress(RESP_ADDR))
            .expect("response buffer");
        Response::parse(&b, state_request).expect("well-formed response")
    }

    /// A config field (u64 at `offset`), read as Linux does: two 32-bit halves.
    pub fn cfg(&self, offset: u64) -> u64 {
        let mut lo = [0u8; 4];
        let mut hi = [0u8; 4];
        self.t.read(0x100 + offset, &mut lo);
        self.t.read(0x100 + offset + 4, &mut hi);
        u64::from(u32::from_le_bytes(lo)) | (u64::from(u32::from_le_bytes(hi)) << 32)
    }

    /// The device.
    pub fn dev(&self) -> &VirtioMem<B> {
        self.t.device()
    }

    /// The device, mutably (host-side calls).
    pub fn dev_mut(&mut self) -> &mut VirtioMem<B> {
        self.t.device_mut()
    }

    /// Interrupts signalled so far.
    pub fn irqs(&self) -> usize {
        self.trigger.0.load(Ordering::SeqCst)
    }
}

/// A PLUG request.
pub fn plug(addr: u64, nb_blocks: u16) -> Request {
    Request::Plug { addr, nb_blocks }
}

/// An UNPLUG request.
pub fn unplug(addr: u64, nb_blocks: u16) -> Request {
    Request::Unplug { addr, nb_blocks }
}

/// A STATE request.
pub fn state(addr: u64, nb_blocks: u16) -> Request {
    Request::State { addr, nb_blocks }
}
