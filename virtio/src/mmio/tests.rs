//! Transport tests: a small echo device driven through the register window the way Linux's
//! virtio_mmio driver does, over real guest memory with `MockSplitQueue` as the driver's ring.

use super::*;
use crate::device::DeviceError;
use std::io;
use std::sync::atomic::AtomicUsize;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};

/// Counts triggers; can be told to fail.
#[derive(Default)]
struct CountingTrigger {
    count: AtomicUsize,
    fail: std::sync::atomic::AtomicBool,
}

impl IrqTrigger for CountingTrigger {
    fn trigger(&self) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("irqfd gone"));
        }
        self.count.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

const ECHO_TYPE: u32 = 42;
const ECHO_F_EXTRA: u64 = 1 << 3;
const ECHO_F_VETOED: u64 = 1 << 4;

/// Reverses the bytes of each request into its writable buffers.
#[derive(Default)]
struct EchoDevice {
    acked: u64,
    config: [u8; 8],
    mem: Option<GuestMem>,
    queue: Option<Queue>,
    interrupt: Option<Arc<dyn InterruptSink>>,
    activations: usize,
    resets: usize,
    fail_activate: bool,
}

impl VirtioDevice for EchoDevice {
    fn device_type(&self) -> u32 {
        ECHO_TYPE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn avail_features(&self) -> u64 {
        FEATURE_VERSION_1 | ECHO_F_EXTRA | ECHO_F_VETOED
    }
    fn set_acked_features(&mut self, features: u64) {
        self.acked = features;
    }
    fn check_features(&self, acked: u64) -> Result<(), DeviceError> {
        if acked & ECHO_F_VETOED != 0 {
            return Err(DeviceError::Activate("vetoed feature".into()));
        }
        Ok(())
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get(o + i).copied())
                .unwrap_or(0);
        }
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            if let Some(slot) = usize::try_from(offset)
                .ok()
                .and_then(|o| self.config.get_mut(o + i))
            {
                *slot = *b;
            }
        }
    }
    fn activate(
        &mut self,
        mem: GuestMem,
        mut queues: Vec<Queue>,
        interrupt: Arc<dyn InterruptSink>,
    ) -> Result<(), DeviceError> {
        if self.fail_activate {
            return Err(DeviceError::Activate("refused by test".into()));
        }
        self.queue = queues.pop();
        self.mem = Some(mem);
        self.interrupt = Some(interrupt);
        self.activations += 1;
        Ok(())
    }
    fn process_queue(&mut self, index: usize) -> Result<(), DeviceError> {
        if index != 0 {
            return Err(DeviceError::NoSuchQueue(index));
        }
        let (Some(mem), Some(q), Some(irq)) = (&self.mem, &mut self.queue, &self.interrupt) else {
            return Err(DeviceError::NotActivated);
        };
        let m = mem.memory();
        while let Some(chain) = q.pop_descriptor_chain(&*m) {
            let head = chain.head_index();
            let mut input = Vec::new();
            let mut outs = Vec::new();
            for d in chain {
                if d.is_write_only() {
                    outs.push(d);
                } else {
                    let mut buf = vec![0u8; d.len() as usize];
                    m.read_slice(&mut buf, d.addr())
                        .map_err(|e| DeviceError::Queue(e.to_string()))?;
                    input.extend(buf);
                }
            }
            input.reverse();
            let mut written = 0usize;
            for d in outs {
                let n = (d.len() as usize).min(input.len() - written);
                m.write_slice(&input[written..written + n], d.addr())
                    .map_err(|e| DeviceError::Queue(e.to_string()))?;
                written += n;
            }
            q.add_used(&*m, head, written as u32)
                .map_err(|e| DeviceError::Queue(e.to_string()))?;
        }
        if q.needs_notification(&*m)
            .map_err(|e| DeviceError::Queue(e.to_string()))?
        {
            irq.signal(InterruptKind::UsedBuffer)?;
        }
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.queue.is_some()
    }
    fn reset(&mut self) -> Option<Vec<Queue>> {
        self.resets += 1;
        self.interrupt = None;
        self.mem = None;
        self.queue.take().map(|q| vec![q])
    }
}

struct Setup {
    mmap: GuestMemoryMmap<()>,
    trigger: Arc<CountingTrigger>,
    t: MmioTransport<EchoDevice>,
}

fn setup_with(dev: EchoDevice) -> Setup {
    let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let mem = GuestMemoryAtomic::new(mmap.clone());
    let trigger = Arc::new(CountingTrigger::default());
    let t = MmioTransport::new(Box::new(dev), mem, trigger.clone()).unwrap();
    Setup { mmap, trigger, t }
}

fn setup() -> Setup {
    setup_with(EchoDevice::default())
}

fn rd<D: VirtioDevice + ?Sized>(t: &MmioTransport<D>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn wr<D: VirtioDevice + ?Sized>(t: &mut MmioTransport<D>, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Linux's virtio_mmio probe plus virtio core negotiation, up to FEATURES_OK. Returns the
/// status read back after setting FEATURES_OK.
fn negotiate(t: &mut MmioTransport<EchoDevice>, features: u64) -> u32 {
    assert_eq!(rd(t, MAGIC), MAGIC_VALUE);
    assert_eq!(rd(t, VERSION), 2);
    assert_eq!(rd(t, DEVICE_ID), ECHO_TYPE);
    wr(t, STATUS, 0);
    wr(t, STATUS, status::ACKNOWLEDGE);
    wr(t, STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(t, DEVICE_FEATURES_SEL, 1);
    let high = u64::from(rd(t, DEVICE_FEATURES));
    wr(t, DEVICE_FEATURES_SEL, 0);
    let offered = (high << 32) | u64::from(rd(t, DEVICE_FEATURES));
    assert_eq!(offered, t.device().avail_features());
    wr(t, DRIVER_FEATURES_SEL, 1);
    wr(t, DRIVER_FEATURES, (features >> 32) as u32);
    wr(t, DRIVER_FEATURES_SEL, 0);
    wr(t, DRIVER_FEATURES, features as u32);
    let s = rd(t, STATUS);
    wr(t, STATUS, s | status::FEATURES_OK);
    rd(t, STATUS)
}

/// Linux's vm_setup_vq for queue 0 with the mock queue's addresses.
fn setup_queue(t: &mut MmioTransport<EchoDevice>, vq: &MockSplitQueue<GuestMemoryMmap<()>>) {
    wr(t, QUEUE_SEL, 0);
    assert_eq!(rd(t, QUEUE_READY), 0);
    assert_eq!(rd(t, QUEUE_NUM_MAX), 16);
    wr(t, QUEUE_NUM, 16);
    let (d, a, u) = (vq.desc_table_addr().0, vq.avail_addr().0, vq.used_addr().0);
    wr(t, QUEUE_DESC_LOW, d as u32);
    wr(t, QUEUE_DESC_HIGH, (d >> 32) as u32);
    wr(t, QUEUE_DRIVER_LOW, a as u32);
    wr(t, QUEUE_DRIVER_HIGH, (a >> 32) as u32);
    wr(t, QUEUE_DEVICE_LOW, u as u32);
    wr(t, QUEUE_DEVICE_HIGH, (u >> 32) as u32);
    wr(t, QUEUE_READY, 1);
    assert_eq!(rd(t, QUEUE_READY), 1);
}

fn driver_ok(t: &mut MmioTransport<EchoDevice>) {
    let s = rd(t, STATUS);
    wr(t, STATUS, s | status::DRIVER_OK);
}

/// Put a request (readable `req` at 0x8000, writable `resp_len` bytes at 0x9000) on the ring,
/// starting at descriptor `first`.
fn add_request(
    vq: &MockSplitQueue<GuestMemoryMmap<()>>,
    mmap: &GuestMemoryMmap<()>,
    first: u16,
    req: &[u8],
    resp_len: u32,
) {
    mmap.write_slice(req, GuestAddress(0x8000)).unwrap();
    let descs = [
        RawDescriptor::from(SplitDescriptor::new(
            0x8000,
            req.len() as u32,
            VRING_DESC_F_NEXT as u16,
            first + 1,
        )),
        RawDescriptor::from(SplitDescriptor::new(
            0x9000,
            resp_len,
            VRING_DESC_F_WRITE as u16,
            0,
        )),
    ];
    vq.add_desc_chains(&descs, first).unwrap();
}

#[test]
fn linux_style_init_and_request() {
    let Setup {
        mmap,
        trigger,
        mut t,
    } = setup();
    let vq = MockSplitQueue::create(&mmap, GuestAddress(0x1000), 16);
    let s = negotiate(&mut t, FEATURE_VERSION_1 | ECHO_F_EXTRA);
    assert_ne!(s & status::FEATURES_OK, 0, "features accepted");
    assert_eq!(t.device().acked, FEATURE_VERSION_1 | ECHO_F_EXTRA);
    setup_queue(&mut t, &vq);
    assert!(!t.is_activated());
    driver_ok(&mut t);
    assert!(t.is_activated(), "{:?}", t.last_error());
    assert_eq!(t.device().activations, 1);
    assert_eq!(rd(&t, STATUS) & status::DEVICE_NEEDS_RESET, 0);

    add_request(&vq, &mmap, 0, b"tidepool", 8);
    // Notification through the register (what an MMIO exit without ioeventfd gives).
    wr(&mut t, QUEUE_NOTIFY, 0);
    assert_eq!(vq.used().idx().load(), 1);
    let elem = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!((elem.id(), elem.len()), (0, 8));
    let mut out = [0u8; 8];
    mmap.read_slice(&mut out, GuestAddress(0x9000)).unwrap();
    assert_eq!(&out, b"loopedit");
    assert_eq!(rd(&t, INTERRUPT_STATUS), 1);
    assert_eq!(trigger.count.load(Ordering::SeqCst), 1);
    wr(&mut t, INTERRUPT_ACK, 1);
    assert_eq!(rd(&t, INTERRUPT_STATUS), 0);

    // Second request through the ioeventfd path.
    add_request(&vq, &mmap, 2, b"ab", 2);
    assert_eq!(t.ioeventfds(0xd000_0000), vec![(0xd000_0050, 0)]);
    t.notify(0).unwrap();
    assert_eq!(vq.used().idx().load(), 2);
    assert_eq!(trigger.count.load(Ordering::SeqCst), 2);
    assert_eq!(t.counters(), MmioCountersSnapshot::default());
}

#[test]
fn negotiation_without_version_1_fails() {
    let Setup { mut t, .. } = setup();
    let s = negotiate(&mut t, ECHO_F_EXTRA);
    assert_eq!(s & status::FEATURES_OK, 0);
    assert_eq!(t.counters().features_rejected, 1);
    assert!(t.last_error().unwrap().contains("VERSION_1"));
    // DRIVER_OK without FEATURES_OK is refused too.
    driver_ok(&mut t);
    assert_eq!(rd(&t, STATUS) & status::DRIVER_OK, 0);
    assert_eq!(t.counters().status_rejected, 1);
    assert!(!t.is_activated());
}

#[test]
fn negotiation_with_unoffered_or_vetoed_feature_fails() {
    let Setup { mut t, .. } = setup();
    let s = negotiate(&mut t, FEATURE_VERSION_1 | (1 << 7));
    assert_eq!(s & status::FEATURES_OK, 0);
    assert!(t.last_error().unwrap().contains("not offered"));
    let s = negotiate(&mut t, FEATURE_VERSION_1 | ECHO_F_VETOED);
    assert_eq!(s & status::FEATURES_OK, 0);
    assert!(t.last_error().unwrap().contains("vetoed"));
    assert_eq!(t.counters().features_rejected, 2);
    // A clean retry after the resets works.
    let s = negotiate(&mut t, FEATURE_VERSION_1);
    assert_ne!(s & status::FEATURES_OK, 0);
}

#[test]
fn features_locked_after_features_ok() {
    let Setup { mut t, .. } = setup();
    negotiate(&mut t, FEATURE_VERSION_1);
    wr(&mut t, DRIVER_FEATURES, 0);
    assert_eq!(t.driver_features(), FEATURE_VERSION_1);
    assert_eq!(t.counters().features_rejected, 1);
}

#[test]
fn reset_returns_to_initial_state_and_reinit_works() {
    let Setup {
        mmap,
        trigger,
        mut t,
    } = setup();
    let vq = MockSplitQueue::create(&mmap, GuestAddress(0x1000), 16);
    negotiate(&mut t, FEATURE_VERSION_1);
    setup_queue(&mut t, &vq);
    driver_ok(&mut t);
    add_request(&vq, &mmap, 0, b"x", 1);
    t.notify(0).unwrap();
    assert_eq!(rd(&t, INTERRUPT_STATUS), 1);

    wr(&mut t, STATUS, 0);
    assert_eq!(rd(&t, STATUS), 0);
    assert_eq!(t.device().resets, 1);
    assert!(!t.device().is_activated());
    assert_eq!(rd(&t, INTERRUPT_STATUS), 0, "reset clears interrupt status");
    assert_eq!(t.driver_features(), 0);
    wr(&mut t, QUEUE_SEL, 0);
    assert_eq!(rd(&t, QUEUE_READY), 0, "reset clears QueueReady");
    assert!(matches!(t.notify(0), Err(TransportError::NotActivated)));

    // Full re-initialisation on a fresh ring.
    let vq2 = MockSplitQueue::create(&mmap, GuestAddress(0x4000), 16);
    negotiate(&mut t, FEATURE_VERSION_1);
    setup_queue(&mut t, &vq2);
    driver_ok(&mut t);
    assert_eq!(t.device().activations, 2);
    add_request(&vq2, &mmap, 0, b"yz", 2);
    t.notify(0).unwrap();
    assert_eq!(vq2.used().idx().load(), 1);
    assert_eq!(trigger.count.load(Ordering::SeqCst), 2);
}

#[test]
fn interrupt_status_and_ack() {
    let Setup { trigger, t, .. } = setup();
    let irq = t.interrupt().clone();
    let gen0 = rd(&t, CONFIG_GENERATION);
    irq.signal(InterruptKind::ConfigChange).unwrap();
    assert_eq!(rd(&t, INTERRUPT_STATUS), 2);
    assert_ne!(
        rd(&t, CONFIG_GENERATION),
        gen0,
        "config change bumps the generation"
    );
    irq.signal(InterruptKind::UsedBuffer).unwrap();
    assert_eq!(rd(&t, INTERRUPT_STATUS), 3);
    assert_eq!(trigger.count.load(Ordering::SeqCst), 2);
    let mut t = t;
    wr(&mut t, INTERRUPT_ACK, 2);
    assert_eq!(rd(&t, INTERRUPT_STATUS), 1);
    wr(&mut t, INTERRUPT_ACK, 1);
    assert_eq!(rd(&t, INTERRUPT_STATUS), 0);

    trigger.fail.store(true, Ordering::SeqCst);
    assert!(irq.signal(InterruptKind::UsedBuffer).is_err());
    assert_eq!(
        rd(&t, INTERRUPT_STATUS),
        1,
        "the bit is set even if the trigger fails"
    );
    assert_eq!((irq.raised(), irq.failed()), (2, 1));
}

#[test]
fn invalid_accesses_are_ignored_and_counted() {
    let Setup { mmap, mut t, .. } = setup();
    let vq = MockSplitQueue::create(&mmap, GuestAddress(0x1000), 16);
    // Bad widths and alignment.
    let mut two = [0xffu8; 2];
    t.read(STATUS, &mut two);
    assert_eq!(two, [0, 0]);
    t.write(STATUS, &[1, 0]);
    t.write(STATUS + 1, &[1, 0, 0, 0]);
    t.write(0x2000, &[1, 0, 0, 0]);
    assert_eq!(rd(&t, STATUS), 0);
    assert_eq!(t.counters().bad_access, 4);
    // Read-only registers.
    for reg in [
        MAGIC,
        VERSION,
        DEVICE_ID,
        VENDOR,
        DEVICE_FEATURES,
        QUEUE_NUM_MAX,
        INTERRUPT_STATUS,
        CONFIG_GENERATION,
    ] {
        wr(&mut t, reg, 7);
    }
    assert_eq!(t.counters().read_only_write, 8);
    assert_eq!(rd(&t, MAGIC), MAGIC_VALUE);
    // Write-only registers read as zero; unknown offsets are counted.
    assert_eq!(rd(&t, QUEUE_NOTIFY), 0);
    assert_eq!(t.counters().write_only_read, 1);
    assert_eq!(rd(&t, 0x0d0), 0);
    wr(&mut t, 0x0d0, 1);
    assert_eq!(t.counters().unknown_register, 2);
    // Skipping a status step, and clearing bits without a reset.
    wr(&mut t, STATUS, status::DRIVER);
    wr(&mut t, STATUS, status::ACKNOWLEDGE | status::DRIVER);
    wr(&mut t, STATUS, status::ACKNOWLEDGE);
    wr(
        &mut t,
        STATUS,
        status::ACKNOWLEDGE | status::DRIVER | status::DEVICE_NEEDS_RESET,
    );
    assert_eq!(t.counters().status_rejected, 3);
    assert_eq!(rd(&t, STATUS), status::ACKNOWLEDGE | status::DRIVER);
    // Queue configuration before FEATURES_OK.
    wr(&mut t, QUEUE_NUM, 8);
    assert_eq!(t.counters().queue_config_rejected, 1);
    wr(&mut t, DRIVER_FEATURES, FEATURE_VERSION_1 as u32);
    wr(&mut t, DRIVER_FEATURES_SEL, 1);
    wr(&mut t, DRIVER_FEATURES, (FEATURE_VERSION_1 >> 32) as u32);
    let s = rd(&t, STATUS);
    wr(&mut t, STATUS, s | status::FEATURES_OK);
    // QueueSel out of range.
    wr(&mut t, QUEUE_SEL, 5);
    assert_eq!(rd(&t, QUEUE_NUM_MAX), 0);
    wr(&mut t, QUEUE_NUM, 8);
    wr(&mut t, QUEUE_READY, 1);
    assert_eq!(t.counters().queue_sel_out_of_range, 3);
    // Invalid queue sizes.
    wr(&mut t, QUEUE_SEL, 0);
    wr(&mut t, QUEUE_NUM, 32);
    wr(&mut t, QUEUE_NUM, 3);
    wr(&mut t, QUEUE_NUM, 0);
    assert_eq!(t.counters().queue_config_rejected, 4);
    // Notifications before DRIVER_OK.
    assert!(matches!(t.notify(0), Err(TransportError::NotActivated)));
    setup_queue(&mut t, &vq);
    // Queue changes while ready, then after DRIVER_OK.
    wr(&mut t, QUEUE_DESC_LOW, 0x5000);
    driver_ok(&mut t);
    assert!(t.is_activated());
    wr(&mut t, QUEUE_READY, 0);
    wr(&mut t, QUEUE_NUM, 8);
    assert_eq!(t.counters().queue_config_rejected, 7);
    assert_eq!(rd(&t, QUEUE_READY), 1);
    // Notifying a queue that does not exist.
    assert!(matches!(t.notify(3), Err(TransportError::NoSuchQueue(3))));
    wr(&mut t, QUEUE_NOTIFY, u32::MAX);
    assert_eq!(t.counters().notify_rejected, 3);
    // The device still works.
    add_request(&vq, &mmap, 0, b"ok", 2);
    t.notify(0).unwrap();
    assert_eq!(vq.used().idx().load(), 1);
}

#[test]
fn activation_failure_sets_needs_reset() {
    let Setup {
        mmap,
        trigger,
        mut t,
    } = setup();
    let vq = MockSplitQueue::create(&mmap, GuestAddress(0x1000), 16);
    negotiate(&mut t, FEATURE_VERSION_1);
    // Rings outside guest memory.
    wr(&mut t, QUEUE_SEL, 0);
    wr(&mut t, QUEUE_DESC_HIGH, 1);
    wr(&mut t, QUEUE_READY, 1);
    driver_ok(&mut t);
    let s = rd(&t, STATUS);
    assert_ne!(s & status::DEVICE_NEEDS_RESET, 0);
    assert!(!t.is_activated());
    assert_eq!(t.counters().activation_failed, 1);
    assert!(t.last_error().unwrap().contains("queue 0"));
    assert_eq!(
        rd(&t, INTERRUPT_STATUS),
        2,
        "config interrupt announces NEEDS_RESET"
    );
    assert_eq!(trigger.count.load(Ordering::SeqCst), 1);
    assert!(t.notify(0).is_err());

    // After a reset, the device refusing activation is reported the same way.
    wr(&mut t, STATUS, 0);
    t.device_mut().fail_activate = true;
    negotiate(&mut t, FEATURE_VERSION_1);
    setup_queue(&mut t, &vq);
    driver_ok(&mut t);
    assert_ne!(rd(&t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(t.last_error().unwrap().contains("refused by test"));
}

#[test]
fn unready_queue_fails_activation() {
    let Setup { mut t, .. } = setup();
    negotiate(&mut t, FEATURE_VERSION_1);
    driver_ok(&mut t);
    assert_ne!(rd(&t, STATUS) & status::DEVICE_NEEDS_RESET, 0);
    assert!(t.last_error().unwrap().contains("not ready"));
}

#[test]
fn config_space_is_delegated() {
    let Setup { mut t, .. } = setup();
    t.write(CONFIG_OFFSET + 2, &[0xaa, 0xbb]);
    let mut b = [0u8; 4];
    t.read(CONFIG_OFFSET, &mut b);
    assert_eq!(b, [0, 0, 0xaa, 0xbb]);
    let mut one = [0u8; 1];
    t.read(CONFIG_OFFSET + 3, &mut one);
    assert_eq!(one, [0xbb]);
    // Beyond the device's config: zeros, no panic.
    t.read(CONFIG_OFFSET + 0x200, &mut b);
    assert_eq!(b, [0; 4]);
    t.read(MMIO_WINDOW_SIZE - 2, &mut b);
    assert_eq!(b, [0; 4]);
}

#[test]
fn shm_registers_report_no_region() {
    let Setup { t, .. } = setup();
    assert_eq!(rd(&t, SHM_LEN_LOW), u32::MAX);
    assert_eq!(rd(&t, SHM_BASE_HIGH), u32::MAX);
}

#[test]
fn failed_status_blocks_progress_until_reset() {
    let Setup { mut t, .. } = setup();
    wr(&mut t, STATUS, status::ACKNOWLEDGE);
    wr(&mut t, STATUS, status::ACKNOWLEDGE | status::FAILED);
    assert_eq!(rd(&t, STATUS), status::ACKNOWLEDGE | status::FAILED);
    wr(
        &mut t,
        STATUS,
        status::ACKNOWLEDGE | status::FAILED | status::DRIVER,
    );
    assert_eq!(rd(&t, STATUS) & status::DRIVER, 0);
    wr(&mut t, STATUS, 0);
    assert_eq!(rd(&t, STATUS), 0);
}

#[test]
fn rejects_device_id_zero_and_bad_queue_sizes() {
    struct Bad(u32, [u16; 1], u64);
    impl VirtioDevice for Bad {
        fn device_type(&self) -> u32 {
            self.0
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.1
        }
        fn avail_features(&self) -> u64 {
            self.2
        }
        fn set_acked_features(&mut self, _: u64) {}
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMem,
            _: Vec<Queue>,
            _: Arc<dyn InterruptSink>,
        ) -> Result<(), DeviceError> {
            Ok(())
        }
        fn process_queue(&mut self, _: usize) -> Result<(), DeviceError> {
            Ok(())
        }
        fn is_activated(&self) -> bool {
            false
        }
        fn reset(&mut self) -> Option<Vec<Queue>> {
            None
        }
    }
    let mmap = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
    let mem = GuestMemoryAtomic::new(mmap);
    let trig: Arc<dyn IrqTrigger> = Arc::new(CountingTrigger::default());
    let zero: Box<dyn VirtioDevice> = Box::new(Bad(0, [16], FEATURE_VERSION_1));
    assert!(matches!(
        MmioTransport::new(zero, mem.clone(), trig.clone()),
        Err(TransportError::InvalidDeviceId)
    ));
    assert!(matches!(
        MmioTransport::new(Box::new(Bad(5, [16], 1)), mem.clone(), trig.clone()),
        Err(TransportError::MissingVersion1)
    ));
    assert!(matches!(
        MmioTransport::new(Box::new(Bad(5, [12], FEATURE_VERSION_1)), mem, trig),
        Err(TransportError::InvalidQueueMaxSize { index: 0, size: 12 })
    ));
}

#[test]
fn transport_can_move_between_threads() {
    fn assert_send<T: Send>() {}
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send::<MmioTransport>();
    assert_send::<MmioTransport<EchoDevice>>();
    assert_send_sync::<MmioInterrupt>();
}
