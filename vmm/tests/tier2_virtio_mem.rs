//! Tier-2 test of virtio-mem end to end on a real vCPU without Linux: the tiny guest's polled
//! driver probes the real `VirtioMem` device through the real virtio-mmio transport, plugs
//! what the host requests, writes and reads the new memory, and unplugs when the host lowers
//! the target. The backend places and removes blocks in the VM's window (memslots included)
//! and takes its frames from a guest-mm `Zone`. Skips when /dev/kvm cannot be opened.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_mm::{FrameId, MigrateType, NodeId, Zone};
use tidepool_hotplug::{BackendError, MemoryBackend, VirtioMem, VirtioMemConfig};
use tidepool_virtio::MmioTransport;
use tidepool_vmm::kvm::{
    kvm_available, Exit, ExitAction, ExitHandler, StopReason, VcpuHandle, Vm, VmConfig,
};
use tidepool_vmm::memory::{LayoutConfig, MIB};
use tidepool_vmm::tiny_guest::harness::{start_tiny_guest, DeviceExitHandler, NoIrq, ReportLog};
use tidepool_vmm::tiny_guest::virtio_mem_driver::*;
use tidepool_vmm::tiny_guest::virtq::{
    ProbeFailure, DEFAULT_MMIO_BASE, DEFAULT_SCRATCH, TAG_DRIVER_FAILED, TAG_DRIVER_READY,
};
use tidepool_vmm::tiny_guest::{pattern, GuestReport, Stride};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

const BLOCK: u64 = 2 * MIB;
const ORDER: u8 = 9;
const POOL: u64 = 512 * MIB;
const WAIT: Duration = Duration::from_secs(120);

/// Plug: take an order-9 MOVABLE block from the zone, place the block in the window
/// (registering its memslot). Unplug: remove the block (memslot, PROT_NONE, MADV_DONTNEED),
/// then free the frames.
struct WindowZoneBackend {
    vm: Arc<Vm>,
    zone: Zone,
    frames: BTreeMap<u64, FrameId>,
}

impl WindowZoneBackend {
    fn release(&mut self, gpa: u64) -> Result<(), BackendError> {
        let frame = self
            .frames
            .remove(&gpa)
            .ok_or_else(|| BackendError::Failed(format!("{gpa:#x} not plugged")))?;
        self.vm
            .remove_block(gpa, BLOCK)
            .map_err(|e| BackendError::Failed(e.to_string()))?;
        self.zone
            .free(frame, ORDER)
            .map_err(|e| BackendError::Failed(e.to_string()))
    }
}

impl MemoryBackend for WindowZoneBackend {
    fn plug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        let mut done = Vec::new();
        for g in (gpa..gpa + len).step_by(BLOCK as usize) {
            let placed = match self.zone.alloc(ORDER, MigrateType::Movable) {
                Ok(frame) => match self.vm.place_block(g, BLOCK) {
                    Ok(()) => {
                        self.frames.insert(g, frame);
                        Ok(())
                    }
                    Err(e) => {
                        let _ = self.zone.free(frame, ORDER);
                        Err(BackendError::Failed(e.to_string()))
                    }
                },
                Err(_) => Err(BackendError::OutOfMemory),
            };
            if let Err(e) = placed {
                for g in done {
                    self.release(g)?;
                }
                return Err(e);
            }
            done.push(g);
        }
        Ok(())
    }

    fn unplug(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        for g in (gpa..gpa + len).step_by(BLOCK as usize) {
            self.release(g)?;
        }
        Ok(())
    }
}

type Transport = Arc<Mutex<MmioTransport<VirtioMem<WindowZoneBackend>>>>;

type Handler = DeviceExitHandler<VirtioMem<WindowZoneBackend>>;

fn wait<H>(
    log: &ReportLog,
    handle: &VcpuHandle<H>,
    from: usize,
    what: &str,
    pred: impl Fn(&GuestReport) -> bool,
) -> (usize, GuestReport) {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(hit) = log.wait_for(from, Duration::from_millis(200), &pred) {
            return hit;
        }
        if let Some(code) = log.last(TAG_DRIVER_FAILED) {
            panic!("driver failed: {:?}", ProbeFailure::from_code(code));
        }
        assert!(
            !handle.is_finished() && Instant::now() < deadline,
            "guest ended or timed out waiting for {what}; reports: {:?}",
            log.snapshot()
                .iter()
                .map(|r| (r.tag, r.value))
                .collect::<Vec<_>>()
        );
    }
}

struct Rig<H = Handler> {
    vm: Arc<Vm>,
    transport: Transport,
    boot_view: tidepool_vmm::memory::WindowMemory,
    irq: Arc<NoIrq>,
    log: Arc<ReportLog>,
    handle: VcpuHandle<H>,
    hp: std::ops::Range<u64>,
    seed: u64,
    mailbox: u64,
}

const BOOT: u64 = 128 * MIB;

/// A VM with 128 MiB of boot RAM and a 512 MiB virtio-mem region whose backend draws from a
/// zone of `pool` bytes, running the polled driver.
fn rig(pool: u64) -> Rig {
    rig_with(pool, |h, _| h)
}

/// [`rig`] with the exit handler wrapped by `wrap` (which also gets the transport).
fn rig_with<H: ExitHandler + Send + 'static>(
    pool: u64,
    wrap: impl FnOnce(Handler, Transport) -> H,
) -> Rig<H> {
    let boot = BOOT;
    let vm = Arc::new(
        Vm::new(VmConfig {
            layout: LayoutConfig {
                boot_ram: boot,
                hotplug_size: 512 * MIB,
            },
            platform: false,
        })
        .expect("create VM"),
    );
    let layout = vm.window().layout().clone();
    let hp = layout.hotplug().expect("hot-plug region");
    let backend = WindowZoneBackend {
        vm: Arc::clone(&vm),
        zone: Zone::new(NodeId(0), FrameId(0), pool / 4096),
        frames: BTreeMap::new(),
    };
    let dev = VirtioMem::new(
        VirtioMemConfig::new(hp.start, hp.end - hp.start, boot),
        backend,
    )
    .expect("device");
    // The device sees boot RAM (its queue lives there); this view keeps the window mapped.
    let boot_view = vm.window().guest_memory().expect("view");
    let irq = Arc::new(NoIrq::default());
    let transport: Transport = Arc::new(Mutex::new(
        MmioTransport::new(
            Box::new(dev),
            GuestMemoryAtomic::new((*boot_view).clone()),
            irq.clone(),
        )
        .expect("transport"),
    ));
    let driver = VirtioMemDriver {
        blocks_per_request: 4,
        stride: Stride::Page,
        ..VirtioMemDriver::new(DEFAULT_MMIO_BASE, DEFAULT_SCRATCH)
    };
    let seed = driver.seed;
    let mailbox = driver.mailbox();
    let image = virtio_mem_program(&layout, driver).expect("build");
    let log = Arc::new(ReportLog::default());
    let handler = DeviceExitHandler::new(DEFAULT_MMIO_BASE, Arc::clone(&transport), log.clone());
    let handle =
        start_tiny_guest(&vm, &image, 0, wrap(handler, Arc::clone(&transport))).expect("start");
    Rig {
        vm,
        transport,
        boot_view,
        irq,
        log,
        handle,
        hp,
        seed,
        mailbox,
    }
}

impl<H> Rig<H> {
    fn resize_total(&self, total: u64) {
        self.transport
            .lock()
            .expect("lock")
            .device_mut()
            .set_requested_total(total)
            .expect("resize");
    }

    /// Stop the driver through the mailbox and join the vCPU.
    fn stop(self) -> Stopped {
        self.boot_view
            .write_obj(MAILBOX_STOP, GuestAddress(self.mailbox))
            .expect("mailbox");
        let (summary, kicked) = self.handle.join_timeout(WAIT).expect("join");
        assert!(!kicked, "driver did not stop");
        assert_eq!(summary.result.as_ref().ok(), Some(&StopReason::Handler));
        Stopped {
            exits: summary.exits,
            transport: self.transport,
            irq: self.irq,
            log: self.log,
        }
    }
}

/// What is left after [`Rig::stop`].
struct Stopped {
    exits: u64,
    transport: Transport,
    irq: Arc<NoIrq>,
    log: Arc<ReportLog>,
}

#[test]
fn polled_virtio_mem_driver_plugs_and_unplugs() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let pool_frames = POOL / 4096;
    let r = rig(POOL);
    let (vm, transport, log, handle, hp, seed, boot) = (
        &r.vm,
        &r.transport,
        &r.log,
        &r.handle,
        r.hp.clone(),
        r.seed,
        BOOT,
    );
    let (i, ready) = wait(log, handle, 0, "DRIVER_OK", |r| r.tag == TAG_DRIVER_READY);
    assert_eq!(
        ready.value & 0xf,
        0xf,
        "status ACK|DRIVER|FEATURES_OK|DRIVER_OK"
    );
    let (i, _) = wait(log, handle, i, "settled at 0", |r| {
        r.tag == TAG_VMEM_SETTLED && r.value == 0
    });

    // Grow by 256 MiB.
    let grow = 256 * MIB;
    let t0 = Instant::now();
    transport
        .lock()
        .expect("lock")
        .device_mut()
        .set_requested_total(boot + grow)
        .expect("resize up");
    let (i, settled) = wait(log, handle, i, "plugged 256 MiB", |r| {
        r.tag == TAG_VMEM_SETTLED && r.value == grow
    });
    println!(
        "guest plugged, wrote and checked {} MiB in {:?} ({} requests)",
        grow / MIB,
        settled.at - t0,
        log.values(TAG_VMEM_PLUGGED).len()
    );
    let mismatches = log.values(TAG_VMEM_MISMATCHES);
    let checked: u64 = log.values(TAG_VMEM_CHECKED).iter().sum();
    assert!(mismatches.iter().all(|m| *m == 0), "{mismatches:?}");
    assert_eq!(checked, grow / 4096, "every page of the new memory checked");
    {
        let t = transport.lock().expect("lock");
        let dev = t.device();
        assert_eq!(dev.plugged_size(), grow);
        let c = dev.counters();
        assert_eq!(c.plug_acked, grow / BLOCK / 4);
        assert_eq!(dev.backend().zone.free_frames(), pool_frames - grow / 4096);
        dev.backend().zone.validate().expect("zone consistent");
        assert!(log.values(TAG_VMEM_NACK).is_empty() && log.values(TAG_VMEM_BUSY).is_empty());
    }
    assert!(vm.window().is_range_placed(hp.start, grow));
    assert!(!vm.window().is_placed(hp.start + grow));
    assert_eq!(
        vm.memslot_count(),
        3,
        "boot slot plus two 128 MiB hot-plug slots"
    );
    let resident = vm.window().resident_bytes(hp.start, grow).expect("mincore");
    println!("resident behind the plugged range: {} MiB", resident / MIB);
    assert_eq!(resident, grow, "the guest touched every page");
    {
        let view = vm.window().guest_memory().expect("view");
        for gpa in [
            hp.start,
            hp.start + 4096,
            hp.start + grow / 2,
            hp.start + grow - 4096,
        ] {
            assert_eq!(
                view.read_obj::<u64>(GuestAddress(gpa)).ok(),
                Some(pattern(gpa, seed)),
                "pattern at {gpa:#x}"
            );
        }
    }

    // Shrink to 64 MiB: the driver unplugs the highest blocks.
    let keep = 64 * MIB;
    transport
        .lock()
        .expect("lock")
        .device_mut()
        .set_requested_total(boot + keep)
        .expect("resize down");
    let (_, settled2) = wait(log, handle, i, "shrunk to 64 MiB", |r| {
        r.tag == TAG_VMEM_SETTLED && r.value == keep
    });
    println!("guest unplugged {} MiB", (grow - keep) / MIB);
    let _ = settled2;
    let unplugged = log.values(TAG_VMEM_UNPLUGGED);
    assert_eq!(unplugged.last(), Some(&keep));
    assert!(unplugged.windows(2).all(|w| w[1] < w[0]));
    {
        let t = transport.lock().expect("lock");
        let dev = t.device();
        assert_eq!(dev.plugged_size(), keep);
        assert_eq!(dev.backend().zone.free_frames(), pool_frames - keep / 4096);
        assert_eq!(dev.backend().frames.len() as u64, keep / BLOCK);
        dev.backend().zone.validate().expect("zone consistent");
    }
    let region = hp.end - hp.start;
    let gone = vm
        .window()
        .resident_bytes(hp.start + keep, region - keep)
        .expect("mincore");
    println!(
        "resident behind the unplugged range after shrink: {gone} bytes; kept: {} MiB",
        vm.window().resident_bytes(hp.start, keep).expect("mincore") / MIB
    );
    assert_eq!(gone, 0, "unplugged memory is no longer held");
    assert!(!vm.window().is_placed(hp.start + keep));
    assert_eq!(vm.memslot_count(), 2, "the second hot-plug slot is gone");
    {
        let view = vm.window().guest_memory().expect("view");
        let gpa = hp.start + keep - 4096;
        assert_eq!(
            view.read_obj::<u64>(GuestAddress(gpa)).ok(),
            Some(pattern(gpa, seed)),
            "kept memory keeps its data"
        );
    }

    // Stop the driver through the mailbox.
    let Stopped {
        exits,
        transport,
        irq,
        log,
    } = r.stop();
    assert_eq!(log.last(TAG_VMEM_EXIT), Some(keep));
    let t = transport.lock().expect("lock");
    println!(
        "exits {}, transport counters {:?}, irqs a driver with interrupts would have seen {}",
        exits,
        t.counters(),
        irq.count()
    );
    assert_eq!(t.counters(), Default::default(), "no bad register access");
}

#[test]
fn pool_exhaustion_is_busy_and_the_driver_retries() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    // Only 128 MiB in the pool, 256 MiB requested: plugs succeed up to 128 MiB, then the
    // device answers BUSY and the driver keeps retrying until the host lowers the target.
    let pool = 128 * MIB;
    let r = rig(pool);
    wait(&r.log, &r.handle, 0, "settled at 0", |x| {
        x.tag == TAG_VMEM_SETTLED && x.value == 0
    });
    r.resize_total(BOOT + 256 * MIB);
    let (i, _) = wait(&r.log, &r.handle, 0, "plugged the whole pool", |x| {
        x.tag == TAG_VMEM_PLUGGED && x.value == pool
    });
    let (i, busy) = wait(&r.log, &r.handle, i, "BUSY", |x| x.tag == TAG_VMEM_BUSY);
    assert_eq!(busy.value, r.hp.start + pool, "the next plug is refused");
    // It keeps retrying.
    wait(&r.log, &r.handle, i + 1, "a second BUSY", |x| {
        x.tag == TAG_VMEM_BUSY
    });
    {
        let t = r.transport.lock().expect("lock");
        let dev = t.device();
        assert_eq!(dev.plugged_size(), pool);
        assert!(dev.counters().busy_backend >= 2);
        assert_eq!(dev.backend().zone.free_frames(), 0);
    }
    assert!(
        !r.vm.window().is_placed(r.hp.start + pool),
        "a refused plug leaves nothing"
    );
    r.resize_total(BOOT + pool);
    wait(&r.log, &r.handle, 0, "settled at the pool size", |x| {
        x.tag == TAG_VMEM_SETTLED && x.value == pool
    });
    let busy = r.log.values(TAG_VMEM_BUSY).len();
    println!("driver retried {busy} times on BUSY before the host lowered the target");
    let mismatches = r.log.values(TAG_VMEM_MISMATCHES);
    assert!(mismatches.iter().all(|m| *m == 0));
    let Stopped { transport, log, .. } = r.stop();
    assert_eq!(log.last(TAG_VMEM_EXIT), Some(pool));
    assert_eq!(
        transport.lock().expect("lock").counters(),
        Default::default()
    );
}

/// Lowers the target to `total` just before forwarding the guest's `nth` queue notification,
/// so the device sees a plug that no longer fits: the race a shrink can have with a plug.
struct ShrinkBeforeNotify {
    inner: Handler,
    transport: Transport,
    nth: u32,
    total: u64,
    seen: u32,
}

impl ExitHandler for ShrinkBeforeNotify {
    fn handle(&mut self, exit: Exit<'_>) -> Result<ExitAction, String> {
        if let Exit::MmioWrite { addr, .. } = &exit {
            if *addr == DEFAULT_MMIO_BASE + 0x50 {
                self.seen += 1;
                if self.seen == self.nth {
                    self.transport
                        .lock()
                        .map_err(|e| e.to_string())?
                        .device_mut()
                        .set_requested_total(self.total)
                        .map_err(|e| e.to_string())?;
                }
            }
        }
        self.inner.handle(exit)
    }
}

#[test]
fn a_shrink_racing_a_plug_is_nacked_and_the_driver_recovers() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    // Requests are 4 blocks (8 MiB). The third plug's notification arrives after the host
    // lowered the target to 8 MiB: NACK; the driver re-reads and unplugs back to 8 MiB.
    let r = rig_with(POOL, |inner, transport| ShrinkBeforeNotify {
        inner,
        transport,
        nth: 3,
        total: BOOT + 8 * MIB,
        seen: 0,
    });
    wait(&r.log, &r.handle, 0, "settled at 0", |x| {
        x.tag == TAG_VMEM_SETTLED && x.value == 0
    });
    r.resize_total(BOOT + 256 * MIB);
    wait(&r.log, &r.handle, 0, "settled at 8 MiB", |x| {
        x.tag == TAG_VMEM_SETTLED && x.value == 8 * MIB
    });
    let nacks = r.log.values(TAG_VMEM_NACK);
    assert_eq!(
        nacks,
        vec![r.hp.start + 16 * MIB],
        "the third plug was refused"
    );
    assert_eq!(r.log.values(TAG_VMEM_PLUGGED), vec![8 * MIB, 16 * MIB]);
    assert_eq!(r.log.values(TAG_VMEM_UNPLUGGED), vec![8 * MIB]);
    assert!(r.log.values(TAG_VMEM_ERROR).is_empty());
    {
        let t = r.transport.lock().expect("lock");
        assert_eq!(t.device().counters().nack_over_requested, 1);
        assert_eq!(t.device().plugged_size(), 8 * MIB);
    }
    assert!(!r.vm.window().is_placed(r.hp.start + 8 * MIB));
    let Stopped { log, .. } = r.stop();
    assert_eq!(log.last(TAG_VMEM_EXIT), Some(8 * MIB));
}
