//! The device over a memory map that really changes: a backend that adds a region to the
//! shared map on plug and takes it out on unplug, as the VMM does. A request that unplugs the
//! block holding its own response buffer, or the used ring, must not be answered through the
//! map from before the unplug: in the VMM that block is `PROT_NONE` by then, and a write
//! through the old map would kill the whole VMM process with SIGSEGV.

use super::request::{Request, Response, ResponseType as T, RESPONSE_SIZE};
use super::test_utils::{config, plug, state, unplug, BASE, GUEST_RAM};
use super::*;
use std::sync::Arc;
use tidepool_virtio::{
    DeviceError, GuestMem, InterruptError, InterruptKind, InterruptSink, VirtioDevice,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};

const BS: u64 = DEFAULT_BLOCK_SIZE;
const SIZE: u16 = 16;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x1100;
const USED_LOW: u64 = 0x1200;
const REQ: u64 = 0x8000;
const RESP: u64 = 0x9000;
/// What an unplugged block holds after the backend dropped it (stands for "inaccessible").
const GONE: u8 = 0xaa;

/// Adds a region to the shared map on plug, removes it on unplug (keeping the removed
/// mapping so the test can see whether anything was written to it afterwards).
struct MapBackend {
    mem: GuestMem,
    removed: Vec<Arc<GuestRegionMmap<()>>>,
}

impl MemoryBackend for MapBackend {
    fn plug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        let fail = |e: String| BackendError::Failed(e);
        let region = GuestRegionMmap::<()>::from_range(GuestAddress(gpa), len as usize, None)
            .map_err(|e| fail(e.to_string()))?;
        let new = self
            .mem
            .memory()
            .insert_region(Arc::new(region))
            .map_err(|e| fail(e.to_string()))?;
        self.mem
            .lock()
            .map_err(|e| fail(e.to_string()))?
            .replace(new);
        Ok(())
    }

    fn unplug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        let fail = |e: String| BackendError::Failed(e);
        let (new, old) = self
            .mem
            .memory()
            .remove_region(GuestAddress(gpa), len)
            .map_err(|e| fail(e.to_string()))?;
        self.mem
            .lock()
            .map_err(|e| fail(e.to_string()))?
            .replace(new);
        let gone = GuestMemoryMmap::from_arc_regions(vec![Arc::clone(&old)])
            .map_err(|e| fail(e.to_string()))?;
        gone.write_slice(&vec![GONE; len as usize], GuestAddress(gpa))
            .map_err(|e| fail(e.to_string()))?;
        self.removed.push(old);
        Ok(())
    }
}

struct NoIrq;

impl InterruptSink for NoIrq {
    fn signal(&self, _kind: InterruptKind) -> Result<(), InterruptError> {
        Ok(())
    }
}

struct Vm {
    mem: GuestMem,
    dev: VirtioMem<MapBackend>,
    used: u64,
    next: u16,
}

impl Vm {
    /// A device activated with its used ring at `used` (low RAM, or inside a block the
    /// driver plugged during an earlier activation).
    fn new() -> Vm {
        let low = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), GUEST_RAM as usize)])
            .expect("guest memory");
        let mem = GuestMemoryAtomic::new(low);
        let backend = MapBackend {
            mem: mem.clone(),
            removed: Vec::new(),
        };
        let dev = VirtioMem::new(config(), backend).expect("device");
        let mut vm = Vm {
            mem,
            dev,
            used: USED_LOW,
            next: 0,
        };
        vm.activate(USED_LOW);
        vm.dev.request_size(16 * BS).expect("resize");
        vm
    }

    fn activate(&mut self, used: u64) {
        let m = self.mem.memory();
        m.write_slice(&[0u8; 0x400], GuestAddress(DESC)).unwrap();
        m.write_slice(&[0u8; 0x100], GuestAddress(used)).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.try_set_desc_table_address(GuestAddress(DESC)).unwrap();
        q.try_set_avail_ring_address(GuestAddress(AVAIL)).unwrap();
        q.try_set_used_ring_address(GuestAddress(used)).unwrap();
        q.set_ready(true);
        assert!(q.is_valid(&*m));
        self.dev.set_acked_features(self.dev.avail_features());
        self.dev
            .activate(self.mem.clone(), vec![q], Arc::new(NoIrq))
            .expect("activate");
        self.used = used;
        self.next = 0;
    }

    /// Send `req` with its response buffer at `resp`; returns the device's verdict and, if it
    /// answered, the response.
    fn send(&mut self, req: Request, resp: u64) -> Result<Option<Response>, DeviceError> {
        let m = self.mem.memory();
        m.write_slice(&req.to_bytes(), GuestAddress(REQ)).unwrap();
        let head = (self.next * 2) % SIZE;
        let descs = [
            SplitDescriptor::new(REQ, 24, 1, head + 1),
            SplitDescriptor::new(resp, RESPONSE_SIZE as u32, 2, 0),
        ];
        for (i, d) in descs.into_iter().enumerate() {
            m.write_obj(
                RawDescriptor::from(d),
                GuestAddress(DESC + 16 * u64::from(head + i as u16)),
            )
            .unwrap();
        }
        m.write_obj(
            head,
            GuestAddress(AVAIL + 4 + 2 * u64::from(self.next % SIZE)),
        )
        .unwrap();
        self.next = self.next.wrapping_add(1);
        m.write_obj(self.next, GuestAddress(AVAIL + 2)).unwrap();
        drop(m);
        self.dev.process_queue(0)?;
        let m = self.mem.memory();
        let slot = self.used + 4 + 8 * u64::from((self.next - 1) % SIZE);
        let len: u32 = m.read_obj(GuestAddress(slot + 4)).unwrap();
        if len == 0 {
            return Ok(None);
        }
        let mut b = [0u8; RESPONSE_SIZE];
        m.read_slice(&mut b, GuestAddress(resp)).unwrap();
        Ok(Response::parse(&b, false))
    }

    /// Bytes at `gpa` in the last removed block's old mapping.
    fn in_removed(&self, gpa: u64, len: usize) -> Vec<u8> {
        let old = self.dev.backend().removed.last().expect("a removed block");
        let gone = GuestMemoryMmap::from_arc_regions(vec![Arc::clone(old)]).unwrap();
        let mut b = vec![0u8; len];
        gone.read_slice(&mut b, GuestAddress(gpa)).unwrap();
        b
    }
}

#[test]
fn an_unplug_answered_inside_the_unplugged_block_is_not_written_through_the_old_map() {
    let mut vm = Vm::new();
    let ack = Some(Some(Response::of(T::Ack)));
    assert_eq!(vm.send(plug(BASE, 1), RESP).ok(), ack);
    // The response buffer lies in the block being unplugged.
    let r = vm.send(unplug(BASE, 1), BASE + 0x100).ok();
    // Done but unanswerable: the used entry carries no response.
    assert_eq!(r, Some(None));
    assert_eq!(vm.dev.plugged_size(), 0);
    assert_eq!(vm.dev.counters().bad_descriptor, 1);
    assert_eq!(
        vm.in_removed(BASE + 0x100, RESPONSE_SIZE),
        vec![GONE; RESPONSE_SIZE],
        "the response was written through the map from before the unplug"
    );
    // The device goes on serving.
    assert_eq!(vm.send(plug(BASE, 2), RESP).ok(), ack);
}

#[test]
fn an_unplug_of_the_block_holding_the_used_ring_fails_the_queue() {
    let mut vm = Vm::new();
    assert_eq!(
        vm.send(plug(BASE, 1), RESP).ok(),
        Some(Some(Response::of(T::Ack)))
    );
    // The driver resets and puts its used ring in the plugged block.
    assert!(vm.dev.reset().is_some());
    vm.activate(BASE + 0x1000);
    let r = vm.send(state(BASE, 1), RESP).ok();
    assert_eq!(r.flatten().map(|r| r.resp_type), Some(T::Ack));
    let r = vm.send(unplug(BASE, 1), RESP);
    assert!(matches!(r, Err(DeviceError::Queue(_))), "{r:?}");
    assert_eq!(vm.dev.plugged_size(), 0);
    assert_eq!(
        vm.in_removed(BASE + 0x1000, 0x100),
        vec![GONE; 0x100],
        "the used ring was written through the map from before the unplug"
    );
}
