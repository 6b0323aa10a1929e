//! Tier-2: the tiny guest's polled virtio-mem driver against a Microvm's own virtio-mem
//! device on the MMIO bus: queue notifications through the ioeventfd and the device thread,
//! plugs and unplugs through the pool backend, pool counters and residency checked.

use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};

use super::test_rig::{base_config, kvm_or_skip, pool, slab, wait_stopped};
use super::*;
use crate::devices::DEVICE_MMIO_BASE;
use crate::memory::MIB;
use crate::tiny_guest::virtio_mem_driver::{
    virtio_mem_program, VirtioMemDriver, MAILBOX_STOP, TAG_VMEM_ERROR, TAG_VMEM_MISMATCHES,
    TAG_VMEM_SETTLED,
};
use crate::tiny_guest::virtq::DEFAULT_SCRATCH;

fn wait_report(vm: &Microvm, tag: u64, value: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let reports = vm.reports();
        if reports.iter().any(|r| r.tag == tag && r.value == value) {
            return;
        }
        if let Some(e) = reports.iter().find(|r| r.tag == TAG_VMEM_ERROR) {
            panic!("driver saw ERROR for {:#x}", e.value);
        }
        assert!(
            Instant::now() < deadline,
            "no report {tag} = {value:#x}; got {reports:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn guest_driver_plugs_and_unplugs_through_the_pool() {
    if !kvm_or_skip("guest_driver_plugs_and_unplugs_through_the_pool") {
        return;
    }
    let pool = pool(256);
    let mut config = base_config("vmem", 64 * MIB);
    let layout = config.layout().expect("layout");
    let mut driver = VirtioMemDriver::new(DEVICE_MMIO_BASE, DEFAULT_SCRATCH);
    driver.blocks_per_request = 2;
    let mailbox = driver.mailbox();
    config.image = BootImage::Tiny(virtio_mem_program(&layout, driver).expect("image"));
    let mut vm = Microvm::new(config, pool.clone(), slab("vmem-driver-test"), 1).expect("microvm");
    vm.apply(LifecycleOp::Start).expect("start");

    // The driver comes up and settles at 0.
    wait_report(&vm, TAG_VMEM_SETTLED, 0, Duration::from_secs(30));
    assert!(vm.mem_status().expect("status").driver_ready);
    let boot_free = pool.figures().expect("figures").free_bytes();

    vm.resize_total(64 * MIB + 16 * MIB).expect("grow");
    wait_report(&vm, TAG_VMEM_SETTLED, 16 * MIB, Duration::from_secs(60));
    assert_eq!(
        pool.figures().expect("figures").free_bytes(),
        boot_free - 16 * MIB
    );
    let m = vm.memory().expect("memory");
    assert_eq!(m.plugged, 80 * MIB);
    assert_eq!(m.requested, 80 * MIB);
    // The driver wrote and checked every page it plugged.
    let hot = vm.with_memory_backend(|b| b.records()).expect("records");
    assert_eq!(hot.len(), 8);
    let window = Arc::clone(vm.vm().expect("vm").window());
    let region = window.layout().hotplug().expect("region");
    assert!(
        window
            .resident_bytes(region.start, 16 * MIB)
            .expect("mincore")
            >= 15 * MIB
    );
    let notifies = vm
        .notifier_stats()
        .expect("device thread")
        .notifies
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        notifies >= 1,
        "the driver's notifies went through the ioeventfd"
    );

    vm.resize_total(64 * MIB).expect("shrink");
    wait_report(&vm, TAG_VMEM_SETTLED, 0, Duration::from_secs(60));
    // Settled at 0 was reported at start too; wait until the backend holds nothing.
    let deadline = Instant::now() + Duration::from_secs(30);
    while vm
        .with_memory_backend(|b| b.plugged_bytes())
        .expect("backend")
        > 0
    {
        assert!(Instant::now() < deadline, "unplug did not finish");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(pool.figures().expect("figures").free_bytes(), boot_free);
    assert_eq!(window.resident_bytes(region.start, 16 * MIB).ok(), Some(0));
    let mismatches = vm
        .reports()
        .iter()
        .filter(|r| r.tag == TAG_VMEM_MISMATCHES)
        .map(|r| r.value)
        .sum::<u64>();
    assert_eq!(mismatches, 0);

    // End the driver through its mailbox: the guest reports done and the VM stops.
    window
        .guest_memory()
        .expect("view")
        .write_obj(MAILBOX_STOP, GuestAddress(mailbox))
        .expect("mailbox");
    assert_eq!(
        wait_stopped(&mut vm, Duration::from_secs(30)),
        VmLifecycle::Stopped(StopCause::GuestFinished),
        "the driver stops"
    );
    drop(vm);
    drop(window);
    assert!(pool.figures().expect("figures").is_whole());
}
