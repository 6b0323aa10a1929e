//! Bus unit tests, and a tier-2 test of the notification paths: a guest write to a queue's
//! QueueNotify register with an ioeventfd behind it reaches the device thread without an
//! exit; a write no ioeventfd matches exits and is served by the bus (direct MMIO notify).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use tidepool_virtio::mmio::{MAGIC_VALUE, NOTIFY_OFFSET};

use super::*;
use crate::hostpool::FramePool;
use crate::memory::MIB;
use crate::microvm::test_rig::{base_config, kvm_or_skip, pool, slab, start_and_wait, with_steps};
use crate::microvm::{BalloonSpec, Microvm, MicrovmConfig, StopCause, VmLifecycle};
use crate::tiny_guest::Step;

#[derive(Debug, Default)]
struct FakeDevice {
    writes: Vec<(u64, Vec<u8>)>,
    notified: Vec<u32>,
}

impl BusDevice for FakeDevice {
    fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(offset as u8);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.writes.push((offset, data.to_vec()));
    }
    fn notify(&mut self, queue: u32) -> Result<(), tidepool_virtio::TransportError> {
        self.notified.push(queue);
        Ok(())
    }
    fn ioeventfds(&self, base: u64) -> Vec<(u64, u32)> {
        vec![(base + NOTIFY_OFFSET, 0)]
    }
}

#[test]
fn bus_slots_and_dispatch() {
    let mut bus = MmioBus::new();
    assert_eq!(
        bus.next_slot().ok(),
        Some((DEVICE_MMIO_BASE, FIRST_DEVICE_GSI))
    );
    let a = Arc::new(Mutex::new(FakeDevice::default()));
    let b = Arc::new(Mutex::new(FakeDevice::default()));
    let sa = bus.add("a", a.clone()).expect("a");
    let sb = bus.add("b", b.clone()).expect("b");
    assert_eq!(sb.base, sa.base + DEVICE_MMIO_SIZE);
    assert_eq!(sb.gsi, sa.gsi + 1);
    let mut buf = [0u8; 4];
    assert!(bus.read(sb.base + 0x10, &mut buf));
    assert_eq!(buf, [0x10; 4]);
    assert!(bus.write(sa.base + 0x70, &[1, 0, 0, 0]));
    assert_eq!(lock(&a).writes, vec![(0x70, vec![1, 0, 0, 0])]);
    assert!(lock(&b).writes.is_empty());
    // Straddling the window's end, or outside every window: not claimed.
    assert!(!bus.read(sa.base + DEVICE_MMIO_SIZE - 2, &mut buf));
    assert!(!bus.write(sb.base + DEVICE_MMIO_SIZE, &[0; 4]));
    assert!(bus.contains(sa.base));
    assert!(bus.by_name("b").is_some());
    for _ in 2..=(LAST_DEVICE_GSI - FIRST_DEVICE_GSI) {
        bus.add("x", Arc::new(Mutex::new(FakeDevice::default())))
            .expect("room");
    }
    assert!(matches!(
        bus.add("y", Arc::new(Mutex::new(FakeDevice::default()))),
        Err(DeviceSetupError::BusFull)
    ));
}

/// Guest code: read the first device's magic value and report it (tag 16), then write
/// `queue` to its QueueNotify register for each entry of `notifies`.
fn guest_code(notifies: &[u32]) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("assembler");
    a.mov(rax, DEVICE_MMIO_BASE).expect("asm");
    a.mov(ecx, dword_ptr(rax)).expect("asm");
    a.mov(qword_ptr(r14 + 16 * 8), rcx).expect("asm");
    for q in notifies {
        a.mov(dword_ptr(rax + NOTIFY_OFFSET as i32), *q)
            .expect("asm");
    }
    a.assemble(0).expect("assemble")
}

#[test]
fn ioeventfd_notify_skips_the_exit_and_unmatched_notify_exits() {
    if !kvm_or_skip("ioeventfd_notify_skips_the_exit_and_unmatched_notify_exits") {
        return;
    }
    let pool = pool(256);
    let config = MicrovmConfig {
        balloon: Some(BalloonSpec::default()),
        irq: IrqMode::Irqfd,
        ..base_config("notify", 64 * MIB)
    };
    // virtio-mem has one queue: queue 0 has an ioeventfd, queue 7 has none.
    let steps = vec![Step::Raw(guest_code(&[0, 0, 7])), Step::Done];
    let config = with_steps(config, steps);
    let mut vm = Microvm::new(config, pool.clone(), slab("notify-test"), 1).expect("microvm");
    assert_eq!(vm.bus().slots().len(), 2);
    assert_eq!(
        start_and_wait(&mut vm, Duration::from_secs(30)),
        VmLifecycle::Stopped(StopCause::GuestFinished)
    );
    let magic = vm.reports().iter().find(|r| r.tag == 16).map(|r| r.value);
    assert_eq!(magic, Some(u64::from(MAGIC_VALUE)));
    // The magic read and the queue-7 notify exited; the two queue-0 notifies did not.
    assert_eq!(vm.exit_counters().mmio_device.load(Ordering::Relaxed), 2);
    let mem = vm.mem_device().expect("virtio-mem");
    let rejected = lock(mem).counters().notify_rejected;
    // Wait for the device thread to drain the eventfd (the two writes may coalesce).
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut total = rejected;
    while Instant::now() < deadline {
        total = lock(mem).counters().notify_rejected;
        if total >= 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    // The device is not activated, so every notify is refused, whichever path it took.
    assert!(total >= 2, "notify_rejected = {total}");
    let stats = vm.notifier_stats().expect("device thread");
    assert!(
        stats.notifies.load(Ordering::Relaxed) >= 1,
        "no notify through the ioeventfd"
    );
    drop(vm);
    assert!(pool.figures().expect("figures").is_whole());
}

#[test]
fn device_work_runs_on_the_device_thread() {
    if !kvm_or_skip("device_work_runs_on_the_device_thread") {
        return;
    }
    let pool = pool(256);
    let config = MicrovmConfig {
        balloon: Some(BalloonSpec::default()),
        irq: IrqMode::Irqfd,
        ..base_config("work", 64 * MIB)
    };
    let vm = Microvm::new(config, pool.clone(), slab("work-test"), 1).expect("microvm");
    let (tx, rx) = std::sync::mpsc::channel();
    vm.post_device_work(Box::new(move || {
        let name = std::thread::current().name().map(str::to_string);
        let _ = tx.send((crate::swap::guard::gettid(), name));
    }))
    .map_err(|_| "no device thread")
    .expect("posted");
    let (tid, name) = rx.recv_timeout(Duration::from_secs(30)).expect("work ran");
    assert_ne!(
        tid,
        crate::swap::guard::gettid(),
        "not on the caller's thread"
    );
    assert_eq!(
        name.as_deref(),
        Some("work-dev"),
        "on the VM's device thread"
    );
    drop(vm);
    // A VM without devices has no device thread: the work comes back.
    let bare = MicrovmConfig {
        hotplug: None,
        ..base_config("bare", 64 * MIB)
    };
    let bare = Microvm::new(bare, pool.clone(), slab("bare-test"), 1).expect("microvm");
    assert!(bare.post_device_work(Box::new(|| {})).is_err());
    drop(bare);
    assert!(pool.figures().expect("figures").is_whole());
}
