//! Tier-2 tests of virtio-mem end to end on a real vCPU without Linux: the tiny guest's polled
//! driver probes the real `VirtioMem` device through the real virtio-mmio transport, plugs
//! what the host requests, writes and reads the new memory, and unplugs when the host lowers
//! the target. The backend places and removes blocks in the VM's window (memslots included)
//! and takes its frames from a guest-mm `Zone` (`tiny_guest::vmem_run`). Skips when /dev/kvm
//! cannot be opened.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tidepool_vmm::kvm::{
    kvm_available, Exit, ExitAction, ExitHandler, HotplugMemslots, StopReason, Vm, VmConfig,
};
use tidepool_vmm::memory::{LayoutConfig, MIB};
use tidepool_vmm::tiny_guest::virtio_mem_driver::*;
use tidepool_vmm::tiny_guest::virtq::{
    DriverFailure, DEFAULT_MMIO_BASE, DEFAULT_SCRATCH, TAG_DRIVER_FAILED, TAG_DRIVER_READY,
};
use tidepool_vmm::tiny_guest::vmem_run::{
    start_virtio_mem, start_virtio_mem_with, VirtioMemHandler, VirtioMemRig, VirtioMemTransport,
};
use tidepool_vmm::tiny_guest::{pattern, Stride};
use vm_memory::{Bytes, GuestAddress};

const BOOT: u64 = 128 * MIB;
const BLOCK: u64 = 2 * MIB;
const POOL: u64 = 512 * MIB;
const WAIT: Duration = Duration::from_secs(120);

fn vm() -> Arc<Vm> {
    Arc::new(
        Vm::new(VmConfig {
            layout: LayoutConfig {
                boot_ram: BOOT,
                hotplug_size: 512 * MIB,
            },
            platform: false,
            hotplug_memslots: HotplugMemslots::Lazy,
        })
        .expect("create VM"),
    )
}

/// Four blocks (8 MiB) per request, every page of new memory written and checked.
fn driver() -> VirtioMemDriver {
    VirtioMemDriver {
        blocks_per_request: 4,
        stride: Stride::Page,
        ..VirtioMemDriver::new(DEFAULT_MMIO_BASE, DEFAULT_SCRATCH)
    }
}

fn settled<H>(r: &VirtioMemRig<H>, from: usize, plugged: u64) -> usize {
    r.wait_settled(from, plugged, WAIT)
        .unwrap_or_else(|e| {
            panic!(
                "waiting for {plugged:#x} plugged: {e}; reports {:?}",
                r.log
                    .snapshot()
                    .iter()
                    .map(|x| (x.tag, x.value))
                    .collect::<Vec<_>>()
            )
        })
        .0
}

#[test]
fn polled_virtio_mem_driver_plugs_and_unplugs() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let pool_frames = POOL / 4096;
    let r = start_virtio_mem(vm(), POOL, driver()).expect("start");
    let (vm, hp, seed) = (Arc::clone(&r.vm), r.region.clone(), r.driver.seed);
    let (i, ready) = r
        .wait(0, WAIT, |x| x.tag == TAG_DRIVER_READY)
        .expect("DRIVER_OK");
    assert_eq!(
        ready.value & 0xf,
        0xf,
        "status ACK|DRIVER|FEATURES_OK|DRIVER_OK"
    );
    let i = settled(&r, i, 0);

    // Grow by 256 MiB.
    let grow = 256 * MIB;
    let t0 = Instant::now();
    r.resize_total(BOOT + grow).expect("resize up");
    let i = settled(&r, i, grow);
    println!(
        "guest plugged, wrote and checked {} MiB in {:?} ({} requests)",
        grow / MIB,
        r.log.snapshot()[i].at - t0,
        r.log.values(TAG_VMEM_PLUGGED).len()
    );
    let mismatches = r.log.values(TAG_VMEM_MISMATCHES);
    let checked: u64 = r.log.values(TAG_VMEM_CHECKED).iter().sum();
    assert!(mismatches.iter().all(|m| *m == 0), "{mismatches:?}");
    assert_eq!(checked, grow / 4096, "every page of the new memory checked");
    assert!(r.log.values(TAG_VMEM_NACK).is_empty() && r.log.values(TAG_VMEM_BUSY).is_empty());
    {
        let t = r.transport();
        let dev = t.device();
        assert_eq!(dev.plugged_size(), grow);
        assert_eq!(dev.counters().plug_acked, grow / BLOCK / 4);
        let zone = dev.backend().zone();
        assert_eq!(zone.free_frames(), pool_frames - grow / 4096);
        zone.validate().expect("zone consistent");
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
    r.resize_total(BOOT + keep).expect("resize down");
    settled(&r, i, keep);
    println!("guest unplugged {} MiB", (grow - keep) / MIB);
    let unplugged = r.log.values(TAG_VMEM_UNPLUGGED);
    assert_eq!(unplugged.last(), Some(&keep));
    assert!(unplugged.windows(2).all(|w| w[1] < w[0]));
    {
        let t = r.transport();
        let dev = t.device();
        assert_eq!(dev.plugged_size(), keep);
        let zone = dev.backend().zone();
        assert_eq!(zone.free_frames(), pool_frames - keep / 4096);
        assert_eq!(dev.backend().plugged_blocks() as u64, keep / BLOCK);
        zone.validate().expect("zone consistent");
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
    let s = r.stop(WAIT).expect("stop");
    assert_eq!(s.log.last(TAG_VMEM_EXIT), Some(keep));
    let t = s.transport.lock().expect("lock");
    println!(
        "exits {}, transport counters {:?}, irqs a driver with interrupts would have seen {}",
        s.summary.exits,
        t.counters(),
        s.irq.count()
    );
    assert_eq!(t.counters(), Default::default(), "no bad register access");
}

#[test]
fn a_driver_that_plugs_like_linux_leaves_plugged_memory_unfaulted() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    // The driver `tidepool bench api` uses for its headline resize figure: it plugs and
    // unplugs, but writes nothing in what it plugs (as Linux onlines memory).
    let d = VirtioMemDriver {
        touch_plugged: false,
        ..driver()
    };
    let r = start_virtio_mem(vm(), POOL, d).expect("start");
    let (vm, hp) = (Arc::clone(&r.vm), r.region.clone());
    let i = settled(&r, 0, 0);
    let grow = 64 * MIB;
    let mut i = i;
    // Up and down a few times: every round trip plugs and unplugs the same blocks.
    for _ in 0..3 {
        r.resize_total(BOOT + grow).expect("resize up");
        i = settled(&r, i, grow);
        assert!(vm.window().is_range_placed(hp.start, grow));
        let resident = vm.window().resident_bytes(hp.start, grow).expect("mincore");
        assert_eq!(resident, 0, "nothing wrote the plugged memory");
        r.resize_total(BOOT).expect("resize down");
        i = settled(&r, i, 0);
        assert!(!vm.window().is_placed(hp.start));
    }
    assert!(
        r.log.values(TAG_VMEM_CHECKED).is_empty(),
        "no page was checked"
    );
    assert!(r.log.values(TAG_VMEM_MISMATCHES).is_empty());
    assert_eq!(
        r.log.values(TAG_VMEM_PLUGGED).len(),
        3 * 8,
        "8 MiB per request"
    );
    assert_eq!(r.log.values(TAG_VMEM_UNPLUGGED).len(), 3 * 8);
    {
        let t = r.transport();
        let dev = t.device();
        assert_eq!(dev.counters().plug_acked, 3 * 8);
        assert_eq!(dev.counters().unplug_acked, 3 * 8);
        let zone = dev.backend().zone();
        assert_eq!(
            zone.free_frames(),
            POOL / 4096,
            "every block back in the pool"
        );
        zone.validate().expect("zone consistent");
    }
    let s = r.stop(WAIT).expect("stop");
    assert_eq!(s.log.last(TAG_VMEM_EXIT), Some(0));
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
    let r = start_virtio_mem(vm(), pool, driver()).expect("start");
    settled(&r, 0, 0);
    r.resize_total(BOOT + 256 * MIB).expect("resize");
    let (i, _) = r
        .wait(0, WAIT, |x| x.tag == TAG_VMEM_PLUGGED && x.value == pool)
        .expect("plugged the whole pool");
    let (i, busy) = r.wait(i, WAIT, |x| x.tag == TAG_VMEM_BUSY).expect("BUSY");
    assert_eq!(
        busy.value,
        r.region.start + pool,
        "the next plug is refused"
    );
    r.wait(i + 1, WAIT, |x| x.tag == TAG_VMEM_BUSY)
        .expect("it keeps retrying");
    {
        let t = r.transport();
        let dev = t.device();
        assert_eq!(dev.plugged_size(), pool);
        assert!(dev.counters().busy_backend >= 2);
        assert_eq!(dev.backend().zone().free_frames(), 0);
    }
    assert!(
        !r.vm.window().is_placed(r.region.start + pool),
        "a refused plug leaves nothing"
    );
    r.resize_total(BOOT + pool).expect("resize");
    settled(&r, 0, pool);
    let busy = r.log.values(TAG_VMEM_BUSY).len();
    println!("driver retried {busy} times on BUSY before the host lowered the target");
    assert!(r.log.values(TAG_VMEM_MISMATCHES).iter().all(|m| *m == 0));
    let s = r.stop(WAIT).expect("stop");
    assert_eq!(s.log.last(TAG_VMEM_EXIT), Some(pool));
    assert_eq!(
        s.transport.lock().expect("lock").counters(),
        Default::default()
    );
}

/// Lowers the target to `total` just before forwarding the guest's `nth` queue notification,
/// so the device sees a plug that no longer fits: the race a shrink can have with a plug.
struct ShrinkBeforeNotify {
    inner: VirtioMemHandler,
    transport: VirtioMemTransport,
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
    let r = start_virtio_mem_with(vm(), POOL, driver(), |inner, transport| {
        ShrinkBeforeNotify {
            inner,
            transport,
            nth: 3,
            total: BOOT + 8 * MIB,
            seen: 0,
        }
    })
    .expect("start");
    settled(&r, 0, 0);
    r.resize_total(BOOT + 256 * MIB).expect("resize");
    settled(&r, 0, 8 * MIB);
    let nacks = r.log.values(TAG_VMEM_NACK);
    assert_eq!(
        nacks,
        vec![r.region.start + 16 * MIB],
        "the third plug was refused"
    );
    assert_eq!(r.log.values(TAG_VMEM_PLUGGED), vec![8 * MIB, 16 * MIB]);
    assert_eq!(r.log.values(TAG_VMEM_UNPLUGGED), vec![8 * MIB]);
    assert!(r.log.values(TAG_VMEM_ERROR).is_empty());
    {
        let t = r.transport();
        assert_eq!(t.device().counters().nack_over_requested, 1);
        assert_eq!(t.device().plugged_size(), 8 * MIB);
    }
    assert!(!r.vm.window().is_placed(r.region.start + 8 * MIB));
    let s = r.stop(WAIT).expect("stop");
    assert_eq!(s.log.last(TAG_VMEM_EXIT), Some(8 * MIB));
}

/// Swallows every queue notification: the device never sees a request.
struct DropNotifies {
    inner: VirtioMemHandler,
}

impl ExitHandler for DropNotifies {
    fn handle(&mut self, exit: Exit<'_>) -> Result<ExitAction, String> {
        match &exit {
            Exit::MmioWrite { addr, .. } if *addr == DEFAULT_MMIO_BASE + 0x50 => {
                Ok(ExitAction::Continue)
            }
            _ => self.inner.handle(exit),
        }
    }
}

#[test]
fn a_stalled_queue_ends_the_driver_with_a_failure_report() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let d = VirtioMemDriver {
        poll_limit: 1 << 16,
        ..driver()
    };
    let r = start_virtio_mem_with(vm(), POOL, d, |inner, _| DropNotifies { inner }).expect("start");
    settled(&r, 0, 0);
    let t0 = Instant::now();
    r.resize_total(BOOT + 8 * MIB).expect("resize");
    let (summary, kicked) = r.handle.join_timeout(WAIT).expect("join");
    println!("2^16 polls of a stalled queue took {:?}", t0.elapsed());
    assert!(!kicked, "the driver gave up on its own");
    assert_eq!(summary.result.as_ref().ok(), Some(&StopReason::Handler));
    assert_eq!(
        r.log
            .last(TAG_DRIVER_FAILED)
            .and_then(DriverFailure::from_code),
        Some(DriverFailure::QueueStalled)
    );
    assert!(r.log.values(TAG_VMEM_PLUGGED).is_empty());
    let t = r.transport.lock().expect("lock");
    assert_eq!(t.device().plugged_size(), 0);
}
