//! Hostile-driver tests of the transport: every offset at every width in every state, bogus
//! queue setups, status and feature misuse, and a property test that plays random register
//! traffic (with the driver scribbling over its own rings) against the transport. The
//! transport must never panic, must keep its invariants (status only ever holds known bits and
//! climbs the steps in order, negotiated features are offered ones, queue registers are frozen
//! once DRIVER_OK is set), and must only ever activate the device with rings inside guest RAM.

use super::*;
use proptest::prelude::*;
use std::io;
use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};

const RAM: u64 = 0x4_0000;
const RING: u64 = 0x1000;
const QSIZE: u16 = 8;
const SINK_TYPE: u32 = 7;
const SINK_F_EXTRA: u64 = 1 << 5;

struct NoIrq;

impl IrqTrigger for NoIrq {
    fn trigger(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Pops every chain, walks it, and returns it with the sum of its lengths (saturated). It
/// records what it saw so the tests can check the transport handed it sane queues.
#[derive(Default)]
struct Sink {
    mem: Option<GuestMem>,
    queues: Vec<Queue>,
    irq: Option<Arc<dyn InterruptSink>>,
    activations: usize,
    chains: u64,
}

impl VirtioDevice for Sink {
    fn device_type(&self) -> u32 {
        SINK_TYPE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QSIZE, QSIZE]
    }
    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1 | SINK_F_EXTRA
    }
    fn set_acked_features(&mut self, _features: u64) {}
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // Four bytes of config, the rest reads as zero.
        let c = [0xa1u8, 0xa2, 0xa3, 0xa4];
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| usize::try_from(o).ok())
                .and_then(|o| c.get(o).copied())
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(
        &mut self,
        mem: GuestMem,
        queues: Vec<Queue>,
        interrupt: Arc<dyn InterruptSink>,
    ) -> Result<(), DeviceError> {
        let m = mem.memory();
        for q in &queues {
            // The transport must only hand over queues whose rings lie in guest RAM.
            assert!(q.is_valid(&*m), "activated with an invalid queue");
        }
        drop(m);
        self.mem = Some(mem);
        self.queues = queues;
        self.irq = Some(interrupt);
        self.activations += 1;
        Ok(())
    }
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        let (Some(mem), Some(irq)) = (&self.mem, &self.irq) else {
            return Err(DeviceError::NotActivated);
        };
        let q = self
            .queues
            .get_mut(index)
            .ok_or(DeviceError::NoSuchQueue(index))?;
        let m = mem.memory();
        while let Some(chain) = q.pop_descriptor_chain(&*m) {
            let head = chain.head_index();
            let len = chain.fold(0u32, |a, d| a.saturating_add(d.len()));
            q.add_used(&*m, head, len)
                .map_err(|e| DeviceError::Queue(e.to_string()))?;
            self.chains += 1;
        }
        if q.needs_notification(&*m)
            .map_err(|e| DeviceError::Queue(e.to_string()))?
        {
            irq.signal(InterruptKind::UsedBuffer)?;
        }
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.mem.is_some()
    }
    fn reset(&mut self) -> Option<Vec<Queue>> {
        self.mem = None;
        self.irq = None;
        Some(std::mem::take(&mut self.queues))
    }
}

fn transport() -> (GuestMemoryMmap<()>, MmioTransport<Sink>) {
    let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
    let t = MmioTransport::new(
        Box::new(Sink::default()),
        GuestMemoryAtomic::new(mmap.clone()),
        Arc::new(NoIrq),
    )
    .unwrap();
    (mmap, t)
}

fn wr(t: &mut MmioTransport<Sink>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn rd(t: &MmioTransport<Sink>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Reset, ACKNOWLEDGE, DRIVER, VERSION_1, FEATURES_OK.
fn to_features_ok(t: &mut MmioTransport<Sink>) {
    wr(t, STATUS, 0);
    wr(t, STATUS, status::ACKNOWLEDGE);
    wr(t, STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, DRIVER_FEATURES_SEL, 1);
    wr(t, DRIVER_FEATURES, 1);
    wr(t, DRIVER_FEATURES_SEL, 0);
    wr(t, DRIVER_FEATURES, 0);
    wr(
        t,
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_ne!(rd(t, STATUS) & status::FEATURES_OK, 0);
}

/// Configure queue `sel` with rings at `desc`, `driver`, `device`, size `size`, and ready it.
fn queue(t: &mut MmioTransport<Sink>, sel: u32, size: u32, addrs: [u64; 3]) {
    wr(t, QUEUE_SEL, sel);
    wr(t, QUEUE_NUM, size);
    for (reg, a) in [QUEUE_DESC_LOW, QUEUE_DRIVER_LOW, QUEUE_DEVICE_LOW]
        .into_iter()
        .zip(addrs)
    {
        wr(t, reg, a as u32);
        wr(t, reg + 4, (a >> 32) as u32);
    }
    wr(t, QUEUE_READY, 1);
}

fn good_rings(i: u64) -> [u64; 3] {
    let base = RING + i * 0x1000;
    [base, base + 0x200, base + 0x400]
}

fn snapshot(t: &MmioTransport<Sink>) -> (u32, u64, u32, Vec<QueueRegs>) {
    (t.status, t.driver_features, t.queue_sel, t.queues.clone())
}

#[test]
fn every_offset_at_every_width_in_every_state() {
    // States: fresh, FEATURES_OK, activated, NEEDS_RESET after a failed activation.
    for state in 0..4 {
        let (_mmap, mut t) = transport();
        if state >= 1 {
            to_features_ok(&mut t);
        }
        if state == 2 {
            queue(&mut t, 0, u32::from(QSIZE), good_rings(0));
            queue(&mut t, 1, u32::from(QSIZE), good_rings(1));
        }
        if state >= 2 {
            let s = rd(&t, STATUS);
            wr(&mut t, STATUS, s | status::DRIVER_OK);
        }
        assert_eq!(t.is_activated(), state == 2, "state {state}");
        for off in (0..MMIO_WINDOW_SIZE + 16).chain([u64::MAX - 3, u64::MAX]) {
            for width in [1usize, 2, 3, 4, 8] {
                let mut buf = [0x5au8; 8];
                t.read(off, &mut buf[..width]);
                if off >= MMIO_WINDOW_SIZE {
                    assert_eq!(buf[..width], [0u8; 8][..width], "read past the window");
                }
                // Writes that are not a 32-bit aligned register access change nothing.
                if off < CONFIG_OFFSET && !(width == 4 && off % 4 == 0) {
                    let before = snapshot(&t);
                    let bad = t.counters().bad_access;
                    t.write(off, &[0xff; 8][..width]);
                    assert_eq!(snapshot(&t), before, "write {off:#x}/{width}");
                    assert_eq!(t.counters().bad_access, bad + 1);
                } else if off >= CONFIG_OFFSET {
                    let before = snapshot(&t);
                    t.write(off, &[0xff; 8][..width]);
                    assert_eq!(snapshot(&t), before, "config write {off:#x}/{width}");
                }
            }
        }
        // Config space: its bytes, then zeros past its end, including an access straddling
        // the end of the window.
        let mut b = [0u8; 8];
        t.read(CONFIG_OFFSET + 2, &mut b);
        assert_eq!(b, [0xa3, 0xa4, 0, 0, 0, 0, 0, 0]);
        t.read(MMIO_WINDOW_SIZE - 4, &mut b);
        assert_eq!(b, [0; 8]);
    }
}

#[test]
fn bogus_queue_sizes_are_refused() {
    let (_mmap, mut t) = transport();
    to_features_ok(&mut t);
    wr(&mut t, QUEUE_SEL, 0);
    for bad in [0, 3, 6, u32::from(QSIZE) * 2, 0x1_0000, u32::MAX] {
        let rejected = t.counters().queue_config_rejected;
        wr(&mut t, QUEUE_NUM, bad);
        assert_eq!(t.counters().queue_config_rejected, rejected + 1, "{bad}");
        assert_eq!(t.queues[0].size, QSIZE, "{bad}");
    }
    for good in [1, 2, 4, 8] {
        wr(&mut t, QUEUE_NUM, good);
        assert_eq!(u32::from(t.queues[0].size), good);
    }
}

#[test]
fn bogus_ring_addresses_fail_activation_without_reaching_the_device() {
    let unaligned_desc = [RING + 1, RING + 0x200, RING + 0x400];
    let unaligned_avail = [RING, RING + 0x201, RING + 0x400];
    let unaligned_used = [RING, RING + 0x200, RING + 0x402];
    let past_ram = [RAM, RING + 0x200, RING + 0x400];
    let straddling = [RAM - 0x40, RING + 0x200, RING + 0x400];
    let used_straddling = [RING, RING + 0x200, RAM - 8];
    let top = [!0xf_u64, RING + 0x200, RING + 0x400];
    let high_half = [RING | 1 << 32, RING + 0x200, RING + 0x400];
    for addrs in [
        unaligned_desc,
        unaligned_avail,
        unaligned_used,
        past_ram,
        straddling,
        used_straddling,
        top,
        high_half,
    ] {
        let (_mmap, mut t) = transport();
        to_features_ok(&mut t);
        queue(&mut t, 0, u32::from(QSIZE), addrs);
        queue(&mut t, 1, u32::from(QSIZE), good_rings(1));
        let s = rd(&t, STATUS);
        wr(&mut t, STATUS, s | status::DRIVER_OK);
        assert!(!t.is_activated(), "{addrs:x?}");
        assert_eq!(t.device().activations, 0, "{addrs:x?}");
        assert_ne!(rd(&t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
        assert_eq!(t.counters().activation_failed, 1);
        assert!(matches!(t.notify(0), Err(TransportError::NotActivated)));
        // A reset gives the driver a clean slate, and a good setup then works.
        wr(&mut t, STATUS, 0);
        assert_eq!(rd(&t, STATUS), 0);
        to_features_ok(&mut t);
        queue(&mut t, 0, u32::from(QSIZE), good_rings(0));
        queue(&mut t, 1, u32::from(QSIZE), good_rings(1));
        let s = rd(&t, STATUS);
        wr(&mut t, STATUS, s | status::DRIVER_OK);
        assert!(t.is_activated());
    }
}

#[test]
fn status_and_feature_misuse_change_nothing() {
    let (_mmap, mut t) = transport();
    // Out of order: each step without the ones before it.
    for v in [
        status::DRIVER,
        status::FEATURES_OK,
        status::DRIVER_OK,
        status::ACKNOWLEDGE | status::FEATURES_OK,
        status::ACKNOWLEDGE | status::DRIVER_OK,
        status::DEVICE_NEEDS_RESET,
        0x100,
        0x8000_0000,
    ] {
        wr(&mut t, STATUS, v);
        // A valid leading step (ACKNOWLEDGE) may be taken; nothing past a missing one is.
        assert_eq!(rd(&t, STATUS) & !status::ACKNOWLEDGE, 0, "{v:#x}");
        wr(&mut t, STATUS, 0);
    }
    wr(&mut t, STATUS, status::ACKNOWLEDGE);
    // Features before DRIVER: ignored.
    wr(&mut t, DRIVER_FEATURES, u32::MAX);
    assert_eq!(t.driver_features(), 0);
    wr(&mut t, STATUS, status::ACKNOWLEDGE | status::DRIVER);
    // Feature words past 1, and a selector of u32::MAX.
    for sel in [2, 3, u32::MAX] {
        wr(&mut t, DRIVER_FEATURES_SEL, sel);
        wr(&mut t, DRIVER_FEATURES, u32::MAX);
        wr(&mut t, DEVICE_FEATURES_SEL, sel);
        assert_eq!(rd(&t, DEVICE_FEATURES), 0);
    }
    assert_eq!(t.driver_features(), 0);
    // Unoffered bits: FEATURES_OK stays clear, and the device is not told.
    wr(&mut t, DRIVER_FEATURES_SEL, 1);
    wr(&mut t, DRIVER_FEATURES, 1 | 1 << 31);
    wr(&mut t, DRIVER_FEATURES_SEL, 0);
    wr(&mut t, DRIVER_FEATURES, SINK_F_EXTRA as u32);
    wr(
        &mut t,
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    assert_eq!(rd(&t, STATUS), status::ACKNOWLEDGE | status::DRIVER);
    // Fixed, then features are locked.
    wr(&mut t, DRIVER_FEATURES_SEL, 1);
    wr(&mut t, DRIVER_FEATURES, 1);
    wr(
        &mut t,
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
    );
    let acked = t.driver_features();
    assert_eq!(acked, FEATURE_VERSION_1 | SINK_F_EXTRA);
    wr(&mut t, DRIVER_FEATURES, 0);
    wr(&mut t, DRIVER_FEATURES_SEL, 0);
    wr(&mut t, DRIVER_FEATURES, u32::MAX);
    assert_eq!(t.driver_features(), acked);
    // Clearing a bit without a reset is refused.
    wr(&mut t, STATUS, status::ACKNOWLEDGE | status::FEATURES_OK);
    assert_eq!(
        rd(&t, STATUS),
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK
    );
    // FAILED stops everything until a reset.
    wr(
        &mut t,
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::FAILED,
    );
    queue(&mut t, 0, 4, good_rings(0));
    assert!(!t.queues[0].ready);
    let s = rd(&t, STATUS);
    wr(&mut t, STATUS, s | status::DRIVER_OK | status::FAILED);
    assert_eq!(rd(&t, STATUS) & status::DRIVER_OK, 0);
    assert_eq!(t.device().activations, 0);
}

/// A descriptor table full of garbage: cycles, indices past the table, huge lengths.
#[test]
fn garbage_rings_never_panic_and_used_entries_stay_in_range() {
    let (mmap, mut t) = transport();
    to_features_ok(&mut t);
    let vq = MockSplitQueue::create(&mmap, GuestAddress(RING), QSIZE);
    let (d, a, u) = (vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
    queue(&mut t, 0, u32::from(QSIZE), [d, a, u]);
    queue(&mut t, 1, u32::from(QSIZE), good_rings(2));
    let s = rd(&t, STATUS);
    wr(&mut t, STATUS, s | status::DRIVER_OK);
    assert!(t.is_activated());
    // A cycle 0 -> 1 -> 0, a chain running past the table, a self-loop.
    let descs = [
        SplitDescriptor::new(0x8000, u32::MAX, VRING_DESC_F_NEXT as u16, 1),
        SplitDescriptor::new(0x8000, 16, VRING_DESC_F_NEXT as u16, 0),
        SplitDescriptor::new(u64::MAX, 16, VRING_DESC_F_NEXT as u16, 200),
        SplitDescriptor::new(0, 0, VRING_DESC_F_NEXT as u16, 3),
    ];
    for (i, desc) in descs.iter().enumerate() {
        vq.desc_table()
            .store(i as u16, RawDescriptor::from(*desc))
            .unwrap();
    }
    for (slot, head) in [0u16, 2, 3].iter().enumerate() {
        mmap.write_obj(*head, GuestAddress(a + 4 + 2 * slot as u64))
            .unwrap();
    }
    mmap.write_obj(3u16, GuestAddress(a + 2)).unwrap();
    t.notify(0).unwrap();
    assert_eq!(vq.used().idx().load(), 3);
    for i in 0..3 {
        let e = vq.used().ring().ref_at(i).unwrap().load();
        assert!(e.id() < u32::from(QSIZE));
    }
    // An avail index far ahead of the ring: refused by the queue, nothing consumed.
    mmap.write_obj(0x8000u16, GuestAddress(a + 2)).unwrap();
    let _ = t.notify(0);
    assert_eq!(vq.used().idx().load(), 3);
    // A head index past the table: the used ring would get an out-of-range id, so the device
    // fails the queue and the transport asks for a reset instead.
    mmap.write_obj(4u16, GuestAddress(a + 2)).unwrap();
    mmap.write_obj(100u16, GuestAddress(a + 4 + 2 * 3)).unwrap();
    assert!(t.notify(0).is_err());
    assert_ne!(rd(&t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(!t.is_activated());
}

/// One driver action.
#[derive(Clone, Debug)]
enum Op {
    Read(u64, usize),
    Write(u64, usize, u64),
    /// A plausible register write (known offset, plausible value).
    Reg(u64, u32),
    /// The whole Linux-style setup with good rings.
    Setup,
    /// Scribble over the ring area.
    Poke(u64, u64),
    Notify(u32),
}

fn reg_offset() -> impl Strategy<Value = u64> {
    prop::sample::select(vec![
        DEVICE_FEATURES_SEL,
        DRIVER_FEATURES,
        DRIVER_FEATURES_SEL,
        QUEUE_SEL,
        QUEUE_NUM,
        QUEUE_READY,
        QUEUE_NOTIFY,
        INTERRUPT_ACK,
        STATUS,
        QUEUE_DESC_LOW,
        QUEUE_DESC_HIGH,
        QUEUE_DRIVER_LOW,
        QUEUE_DRIVER_HIGH,
        QUEUE_DEVICE_LOW,
        QUEUE_DEVICE_HIGH,
        QUEUE_RESET,
        SHM_SEL,
    ])
}

fn reg_value() -> impl Strategy<Value = u32> {
    prop_oneof![
        0u32..16,
        Just(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK),
        Just(status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK),
        (0u64..4).prop_map(|i| (RING + i * 0x200) as u32),
        any::<u32>(),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => (0..MMIO_WINDOW_SIZE + 8, prop::sample::select(vec![1usize, 2, 4, 8]))
            .prop_map(|(o, w)| Op::Read(o, w)),
        1 => (
            0..MMIO_WINDOW_SIZE + 8,
            prop::sample::select(vec![1usize, 2, 4, 8]),
            any::<u64>()
        )
            .prop_map(|(o, w, v)| Op::Write(o, w, v)),
        4 => (reg_offset(), reg_value()).prop_map(|(o, v)| Op::Reg(o, v)),
        1 => Just(Op::Setup),
        2 => (RING..RING + 0x3000, any::<u64>()).prop_map(|(a, v)| Op::Poke(a & !7, v)),
        2 => (0u32..4).prop_map(Op::Notify),
    ]
}

const KNOWN: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::FEATURES_OK
    | status::DRIVER_OK
    | status::FAILED
    | status::DEVICE_NEEDS_RESET;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn random_driver_traffic_keeps_the_transport_consistent(
        ops in prop::collection::vec(op(), 1..120)
    ) {
        let (mmap, mut t) = transport();
        let mut frozen: Option<Vec<QueueRegs>> = None;
        for op in ops {
            match op {
                Op::Read(o, w) => {
                    let mut b = [0u8; 8];
                    t.read(o, &mut b[..w]);
                }
                Op::Write(o, w, v) => t.write(o, &v.to_le_bytes()[..w]),
                Op::Reg(o, v) => wr(&mut t, o, v),
                Op::Setup => {
                    to_features_ok(&mut t);
                    queue(&mut t, 0, u32::from(QSIZE), good_rings(0));
                    queue(&mut t, 1, u32::from(QSIZE), good_rings(1));
                    let s = rd(&t, STATUS);
                    wr(&mut t, STATUS, s | status::DRIVER_OK);
                    prop_assert!(t.is_activated());
                }
                Op::Poke(a, v) => mmap.write_obj(v, GuestAddress(a)).unwrap(),
                Op::Notify(q) => {
                    let _ = t.notify(q);
                }
            }
            let s = t.status();
            prop_assert_eq!(s & !KNOWN, 0, "unknown status bits {:#x}", s);
            if s & status::FEATURES_OK != 0 {
                prop_assert_eq!(s & (status::ACKNOWLEDGE | status::DRIVER), status::ACKNOWLEDGE | status::DRIVER);
                prop_assert_eq!(t.driver_features() & !t.device().avail_features(), 0);
                prop_assert_ne!(t.driver_features() & FEATURE_VERSION_1, 0);
            }
            if s & status::DRIVER_OK != 0 {
                prop_assert_ne!(s & status::FEATURES_OK, 0);
                match &frozen {
                    Some(f) => prop_assert_eq!(f, &t.queues, "queue registers changed after DRIVER_OK"),
                    None => frozen = Some(t.queues.clone()),
                }
            } else {
                frozen = None;
            }
            prop_assert_eq!(t.is_activated(), t.device().is_activated() && s & status::DEVICE_NEEDS_RESET == 0);
            for q in &t.queues {
                prop_assert!(q.size.is_power_of_two() && q.size <= q.max_size, "{:?}", q);
            }
        }
    }
}
