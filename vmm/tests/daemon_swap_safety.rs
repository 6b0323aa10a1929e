//! Data safety of the daemon's swap and reclaim, end to end on real vCPUs (in-process
//! `VmManager` with the daemon's reclaim, as `daemon_swap.rs`). Skips without /dev/kvm.
//!
//! - A swap-in that fails under a **device model**: the balloon's reporting queue page of a
//!   tiny guest running the polled free-page-reporting driver is swapped out, the swap file
//!   is made to fail the next read, and the guest's notification reaches the device thread,
//!   which faults on the ring. The process survives (the device thread is parked by the
//!   fault guard), the VM is stopped with a reason the API shows, another VM keeps running
//!   and reads its swapped data back intact, and deleting the failed VM gives back its pool
//!   blocks and swap slots.
//! - Phase 5 (zero-page split) in the daemon: the engine, allowed only that phase, runs it
//!   under the quiesce hook (vCPUs paused, device locks held) on a running guest; the guest's
//!   data survives and its vCPU runs on afterwards.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::{reported, wait, BOOT_MIB, FILLED, FLAG, MIB};
use tidepool_api::types::{CreateVmRequest, RawImage, VmState};
use tidepool_api::ApiBackend;
use tidepool_vmm::devices::DEVICE_MMIO_BASE;
use tidepool_vmm::hostpool::FramePool;
use tidepool_vmm::manager::{info_from_request, DaemonReclaimConfig, VmManager};
use tidepool_vmm::memory::{BackingSpec, Layout, LayoutConfig};
use tidepool_vmm::microvm::{
    BalloonSpec, BootImage, LifecycleOp, MicrovmConfig, StopCause, VmLifecycle,
};
use tidepool_vmm::reclaim::Phase;
use tidepool_vmm::tiny_guest::fpr_driver::{fpr_program, FprDriver, FprProgram, TAG_FPR_TOUCHED};
use tidepool_vmm::tiny_guest::program::{Stride, TAG_CHECKED, TAG_MISMATCHES, TAG_USER};
use tidepool_vmm::tiny_guest::virtq::DEFAULT_SCRATCH;

const PAGE: u64 = 4096;
const SEED: u64 = 0x5eed_5afe;

/// Fill `data` (one word per `stride`), report FILLED, spin on FLAG, verify `data`, halt.
fn fill_spin_verify(data: std::ops::Range<u64>, stride: Stride) -> RawImage {
    common::fill_spin_verify(data, stride, SEED)
}

fn manager(
    name: &str,
    cfg: impl FnOnce(&mut DaemonReclaimConfig),
) -> Option<(Arc<VmManager>, Arc<dyn FramePool>, PathBuf)> {
    common::manager(name, "tp-dsafe", Duration::from_secs(60), cfg)
}

fn poke(m: &VmManager, id: &str, gpa: u64, v: u64) {
    m.call(id, move |vm| {
        let host = vm.vm().expect("vm").window().host_addr(gpa).expect("gpa");
        // SAFETY: an 8-byte aligned address of placed boot RAM inside the window, which the
        // VM keeps mapped; the guest only reads it.
        unsafe { std::ptr::write_volatile(host as *mut u64, v) };
    })
    .expect("call");
}

fn bystander(m: &VmManager, data: std::ops::Range<u64>, stride: Stride) -> String {
    let mut req = CreateVmRequest::with_memory(BOOT_MIB);
    req.image = Some(fill_spin_verify(data, stride));
    let id = m.create_vm(req).expect("create").id;
    wait("the guest's fill", 180, || {
        reported(m, &id, TAG_USER) == Some(FILLED)
    });
    id
}

fn release_and_verify(m: &VmManager, id: &str, pages: u64) {
    poke(m, id, FLAG, 1);
    wait("the guest's verify", 300, || {
        reported(m, id, TAG_CHECKED).is_some()
    });
    assert_eq!(reported(m, id, TAG_MISMATCHES), Some(0), "data lost");
    assert_eq!(
        reported(m, id, TAG_CHECKED),
        Some(pages),
        "every word checked"
    );
}

#[test]
fn a_failed_swap_in_under_a_device_model_fails_only_that_vm() {
    let Some((m, pool, dir)) = manager("devfail", |c| {
        // No pressure: the test decides what is swapped.
        c.engine.budget_bytes = Some(1 << 30);
    }) else {
        return;
    };
    let data = 16 * MIB..48 * MIB;
    let other = bystander(&m, data.clone(), Stride::Page);
    let free_before = pool.figures().expect("figures").free_bytes();

    // The victim: the polled free-page-reporting driver on the VM's own balloon.
    let id = m.next_id();
    let driver = FprDriver::new(
        DEVICE_MMIO_BASE,
        DEFAULT_SCRATCH,
        FprProgram::TouchReportVerify {
            range: 16 * MIB..24 * MIB,
            wait_for_host: true,
        },
    );
    let mailbox = driver.mailbox();
    // Queue 2 (reporting) has the scratch base's fourth page; its avail index is at +0x802.
    let ring = DEFAULT_SCRATCH + 0x3000;
    let avail_idx = ring + 0x802;
    let layout = Layout::new(LayoutConfig {
        boot_ram: BOOT_MIB * MIB,
        hotplug_size: 0,
    })
    .expect("layout");
    let config = MicrovmConfig {
        id: id.clone(),
        vcpus: 1,
        boot_ram: BOOT_MIB * MIB,
        hotplug: None,
        balloon: Some(BalloonSpec {
            free_page_reporting: true,
            deflate_on_oom: false,
            stats_interval_s: 0,
            free_page_hinting: false,
        }),
        policy: guest_mm::policy::NumaPolicy::Local,
        irq: m.irq_mode(),
        image: BootImage::Tiny(fpr_program(&layout, driver).expect("image")),
        backing: BackingSpec::default(),
        pool_files: None,
    };
    let info = info_from_request(&id, &CreateVmRequest::with_memory(BOOT_MIB));
    m.create(config, info, true).expect("create");
    wait("the driver's touch", 180, || {
        reported(&m, &id, TAG_FPR_TOUCHED).is_some()
    });
    let vm_swap = m.vm_swap(&id).expect("swap");
    let file = Arc::clone(vm_swap.file());
    let (balloon, window) = m
        .call(&id, |vm| {
            (
                Arc::clone(vm.balloon_device().expect("balloon")),
                Arc::clone(vm.vm().expect("vm").window()),
            )
        })
        .expect("call");
    let host = |gpa: u64| window.host_addr(gpa).expect("gpa");

    // Hold the device, let the guest post its report and notify: the device thread waits
    // for the lock. Then stop the vCPU (which polls the same page), swap the ring page out
    // and make the next read of the swap file fail.
    let held = balloon.lock().expect("balloon lock");
    // SAFETY: 8-byte aligned placed boot RAM of the victim; the guest only reads it.
    unsafe { std::ptr::write_volatile(host(mailbox) as *mut u64, 1) };
    wait("the guest's report on the ring", 120, || {
        // SAFETY: placed boot RAM, 2-byte aligned; the guest writes it, we only read.
        unsafe { std::ptr::read_volatile(host(avail_idx) as *const u16) != 0 }
    });
    m.call(&id, |vm| vm.apply(LifecycleOp::Pause).map(|_| ()))
        .expect("call")
        .expect("pause");
    let out = vm_swap
        .swap_out(ring..ring + PAGE, u64::MAX)
        .expect("swap out");
    assert_eq!(out.swapped_pages, 1, "{out:?}");
    let slots_with_victim = file.counters().slots_used;
    assert!(slots_with_victim >= 1);
    file.inject_read_errors(1);
    let parked_before = tidepool_vmm::swap::guard::parked_threads();
    drop(held);

    // The device thread faults on the ring: the swap-in fails, the VM is failed, the
    // thread is parked, and this process goes on.
    wait("the VM reported failed", 60, || {
        m.info(&id).expect("info").state == VmState::Stopped
    });
    wait("the device thread parked", 60, || {
        vm_swap.parked_threads() == 1
    });
    assert!(tidepool_vmm::swap::guard::parked_threads() > parked_before);
    let info = m.get_vm(&id).expect("get");
    assert_eq!(info.state, VmState::Stopped);
    let reason = info.stop_reason.clone().unwrap_or_default();
    assert!(
        reason.contains("swap-in") && reason.contains(&format!("{ring:#x}")),
        "reason: {reason}"
    );
    let failure = vm_swap.failure().expect("failure recorded");
    assert_eq!(failure.gpa, ring);
    assert_eq!(vm_swap.counters().swap_in_errors, 1);
    // The VM thread stopped the VM itself too (state and reason) and still answers.
    wait("the VM thread stopped the VM", 60, || {
        matches!(
            m.call(&id, |vm| vm.state().clone()).expect("call"),
            VmLifecycle::Stopped(StopCause::GuestFailed(_))
        )
    });
    // The memory figures of a failed VM do not wait on the parked thread's lock.
    assert!(m.get_memory(&id).is_err());
    assert!(
        m.reclaim_engine()
            .expect("engine")
            .target_ids()
            .iter()
            .all(|t| t != &id),
        "the failed VM left the reclaim engine"
    );

    // The other VM is untouched: swap part of its data out now and let it verify all.
    let other_swap = m.vm_swap(&other).expect("swap");
    let s = other_swap
        .swap_out(data.clone(), 8 * MIB)
        .expect("swap out");
    assert!(s.swapped_pages >= 1024, "{s:?}");
    release_and_verify(&m, &other, (data.end - data.start) / PAGE);
    let c = other_swap.counters();
    assert!(c.swapped_in_pages > 0 && c.swap_in_errors == 0, "{c:?}");

    // Deleting the failed VM gives back its pool blocks and its swap slots.
    drop(window);
    drop(balloon);
    drop(vm_swap);
    let other_slots = file.counters().slots_used;
    m.delete(&id).expect("delete the failed VM");
    assert_eq!(
        pool.figures().expect("figures").free_bytes(),
        free_before,
        "the failed VM's pool blocks are back"
    );
    assert!(
        file.counters().slots_used < other_slots,
        "the failed VM's slot is free"
    );
    drop(other_swap);
    m.delete(&other).expect("delete");
    assert_eq!(file.counters().slots_used, 0);
    assert!(pool.figures().expect("figures").is_whole());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn phase_5_in_the_daemon_keeps_guest_data_and_resumes_the_vcpus() {
    let Some((m, _pool, dir)) = manager("split", |c| {
        // Phase 5 only, under a budget the guest's huge pages exceed.
        c.engine.budget_bytes = Some(24 * MIB);
        c.engine.phases = vec![Phase::SplitHuge];
        c.engine.idle_min_fraction = 0.0;
        c.quiesce = true;
    }) else {
        return;
    };
    // One word per 2 MiB block: with THP each touched block is a whole resident huge page
    // of which 511 4 KiB pages are zero.
    let data = 16 * MIB..48 * MIB;
    let id = bystander(&m, data.clone(), Stride::Block);
    let engine = m.reclaim_engine().expect("engine");
    wait("phase 5 reclaimed zero pages", 180, || {
        engine.snapshot().phase(Phase::SplitHuge).reclaimed_bytes >= 4 * MIB
    });
    let split = engine.snapshot().phase(Phase::SplitHuge);
    assert_eq!(split.errors, 0, "{split:?}");
    // The quiesce hook resumed the vCPU: still running, and it goes on to verify.
    assert_eq!(m.info(&id).expect("info").state, VmState::Running);
    release_and_verify(&m, &id, (data.end - data.start) / (2 * MIB));
    m.delete(&id).expect("delete");
    let _ = std::fs::remove_dir_all(dir);
}
