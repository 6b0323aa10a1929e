//! Tier-2 tests of free page hinting end to end on a real vCPU: the tiny guest's polled
//! hinting driver (`tiny_guest::hint_driver`) fills a range, negotiates FREE_PAGE_HINT with the
//! real balloon through the real virtio-mmio transport, answers the host's pass with every
//! other 4 MiB block of the range, rewrites some hinted pages during the pass and right after
//! its STOP (racing the host's discard), and finally checks every page.
//!
//! - `hint_pass_through_the_engine_hook_*`: the reclaim engine's own calls
//!   (`DeviceBalloon::start_hinting` / `take_reported` over the VM's `VmSwap`) against a vCPU
//!   whose exits the test harness serves on the vCPU thread (deterministic order).
//! - `daemon_*`: a `VmManager` with the daemon's reclaim engine (phase 1 only) starting the
//!   pass by itself, queue notifications through the ioeventfd and the device thread (the
//!   guest's rewrites after STOP really race the discard); with a swap (mode `discard`) and
//!   without (`report_only`, nothing discarded).
//!
//! Skips when /dev/kvm cannot be opened.

#[allow(dead_code)]
mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{manager, reported, stop_driver, wait};
use tidepool_api::types::{BalloonConfig as ApiBalloon, CreateVmRequest, ImagePrivilege, RawImage};
use tidepool_api::ApiBackend;
use tidepool_balloon::{
    Balloon, BalloonConfig, HintMode, HintState, MmapBackend, ReportOnlyReason,
};
use tidepool_virtio::MmioTransport;
use tidepool_vmm::devices::DEVICE_MMIO_BASE;
use tidepool_vmm::kvm::{kvm_available, StopReason, Vm, VmConfig};
use tidepool_vmm::manager::VmManager;
use tidepool_vmm::memory::{LayoutConfig, MIB};
use tidepool_vmm::reclaim::{BalloonHook, DeviceBalloon, Phase};
use tidepool_vmm::swap::{SwapFile, SwapFileConfig, VmSwap};
use tidepool_vmm::tiny_guest::harness::{
    start_tiny_guest, wait_report, DeviceExitHandler, NoIrq, ReportLog,
};
use tidepool_vmm::tiny_guest::hint_driver::*;
use tidepool_vmm::tiny_guest::virtq::{DEFAULT_MMIO_BASE, DEFAULT_SCRATCH, TAG_DRIVER_FAILED};
use tidepool_vmm::tiny_guest::Privilege;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

const WAIT: Duration = Duration::from_secs(60);
const PAGE: u64 = 4096;
/// Boot RAM of the test VMs.
const RAM_MIB: u64 = 64;
/// The driver's data: 32 MiB, 8 blocks of 4 MiB, 4 of them hinted.
const DATA: std::ops::Range<u64> = 16 * MIB..48 * MIB;

/// Resident bytes of `ranges` in the window.
fn resident(w: &tidepool_vmm::memory::GuestWindow, ranges: &[std::ops::Range<u64>]) -> u64 {
    ranges
        .iter()
        .map(|r| w.resident_bytes(r.start, r.end - r.start).expect("mincore"))
        .sum()
}

/// The data blocks the driver does not hint.
fn kept_blocks(d: &HintDriver) -> Vec<std::ops::Range<u64>> {
    let hinted = d.hinted_blocks();
    (DATA.start..DATA.end)
        .step_by(d.block as usize)
        .map(|b| b..b + d.block)
        .filter(|r| !hinted.contains(r))
        .collect()
}

/// The guest's final counts: (zero, old, other, rewrite lost, kept lost, checked).
fn verdict(get: impl Fn(u64) -> Option<u64>) -> [u64; 6] {
    [
        TAG_HINT_ZERO,
        TAG_HINT_OLD,
        TAG_HINT_OTHER,
        TAG_HINT_REWRITE_LOST,
        TAG_HINT_KEPT_LOST,
        TAG_HINT_CHECKED,
    ]
    .map(|t| get(t).unwrap_or_else(|| panic!("no report {t}")))
}

fn swap_file(name: &str) -> Arc<SwapFile> {
    let path =
        std::env::temp_dir().join(format!("tidepool-tier2-hint-{name}-{}", std::process::id()));
    Arc::new(SwapFile::create(SwapFileConfig::new(path, 64 * MIB)).expect("swap file"))
}

#[test]
fn hint_pass_through_the_engine_hook_discards_what_the_guest_did_not_rewrite() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let ram = RAM_MIB * MIB;
    let vm = Vm::new(VmConfig::tiny(ram, 0)).expect("create VM");
    let mem = (*vm.window().guest_memory().expect("view")).clone();
    let backend = MmapBackend::with_ram(&mem, &[(0, ram)]).expect("backend");
    // The default config also offers STATS_VQ, DEFLATE_ON_OOM, REPORTING and PAGE_POISON:
    // the driver accepts only FREE_PAGE_HINT, so the hint queue is index 2.
    let cfg = BalloonConfig {
        free_page_hinting: true,
        ..BalloonConfig::default()
    };
    let balloon = Balloon::new(cfg, Box::new(backend)).expect("balloon");
    let transport = Arc::new(Mutex::new(
        MmioTransport::new(
            Box::new(balloon),
            GuestMemoryAtomic::new(mem.clone()),
            Arc::new(NoIrq::default()),
        )
        .expect("transport"),
    ));
    // The engine's view of the VM: its balloon hook with the VM's swap attached.
    let swap = Arc::new(VmSwap::new(Arc::clone(vm.window()), swap_file("hook")).expect("swap"));
    let hook = DeviceBalloon::new(Arc::clone(&transport));
    hook.set_hint_swap(Arc::clone(&swap));

    let driver = HintDriver::new(DEFAULT_MMIO_BASE, DEFAULT_SCRATCH, DATA);
    let plan = driver.plan();
    let hinted = driver.hinted_blocks();
    let kept = kept_blocks(&driver);
    let image = hint_program(vm.window().layout(), driver.clone()).expect("build");
    let log = Arc::new(ReportLog::default());
    let handler = DeviceExitHandler::new(DEFAULT_MMIO_BASE, Arc::clone(&transport), log.clone());
    let handle = start_tiny_guest(&vm, &image, 0, handler).expect("start");
    let wait_tag = |tag: u64| {
        wait_report(&log, &handle, 0, WAIT, |r| r.tag == tag)
            .unwrap_or_else(|e| panic!("waiting for tag {tag}: {e}; {:?}", log.snapshot()))
            .1
            .value
    };

    wait_tag(tidepool_vmm::tiny_guest::virtq::TAG_DRIVER_READY);
    assert_eq!(
        transport.lock().expect("lock").device().acked_features(),
        (1 << 32) | (1 << 3),
        "VERSION_1 and FREE_PAGE_HINT only"
    );
    let w = vm.window();
    let hinted_bytes = plan.hinted * PAGE;
    assert!(resident(w, &hinted) >= hinted_bytes * 9 / 10, "filled");
    assert_eq!(hook.take_reported(), Ok(0), "nothing to credit yet");
    assert_eq!(hook.start_hinting(), Ok(0), "a pass promises nothing");
    let id = wait_tag(TAG_HINT_CMD_ID);
    assert_eq!(wait_tag(TAG_HINT_HINTED), hinted_bytes);
    let ended = wait_tag(TAG_HINT_ENDED);
    assert_eq!(ended, u64::from(CMD_ID_DONE));

    // The discard ran when the guest's STOP was processed, before it could see DONE. Here the
    // device runs on the vCPU thread, so the order is fixed: the in-pass rewrites came before
    // the discard (kept), the after-STOP ones after it (written onto fresh zero pages).
    let st = transport.lock().expect("lock").device().hinting();
    assert_eq!(st.mode, HintMode::Discard);
    assert_eq!(st.state, HintState::Done);
    assert_eq!((st.passes_started, st.passes_completed), (1, 1));
    let last = st.last_pass.expect("a finished pass");
    assert_eq!(u64::from(last.cmd_id), id);
    assert_eq!(last.hinted_bytes, hinted_bytes);
    assert_eq!(last.hint_buffers, hinted.len() as u64);
    let discarded = (plan.hinted - plan.rewritten_in_pass) * PAGE;
    assert_eq!(st.discarded_bytes, discarded);
    let c = swap.counters();
    assert_eq!(c.hint_discarded_pages * PAGE, discarded);
    assert!(c.wp_faults >= plan.rewritten_in_pass, "{c:?}");
    let rewritten = (plan.rewritten_in_pass + plan.rewritten_after_stop) * PAGE;
    assert_eq!(wait_tag(TAG_HINT_REWRITTEN) * PAGE, rewritten);
    let after = resident(w, &hinted);
    println!(
        "hinted {} MiB: resident {} KiB after the pass ({} KiB rewritten), {} MiB discarded",
        hinted_bytes / MIB,
        after / 1024,
        rewritten / 1024,
        discarded / MIB
    );
    assert!(
        after <= rewritten + MIB,
        "only rewritten pages stay: {after}"
    );
    assert!(resident(w, &kept) >= (DATA.end - DATA.start - hinted_bytes) * 9 / 10);
    // The engine's next phase-1 call credits the discard once.
    assert_eq!(hook.take_reported(), Ok(discarded));
    assert_eq!(hook.take_reported(), Ok(0));

    mem.write_obj(1u64, GuestAddress(driver.mailbox()))
        .expect("mailbox");
    let (summary, kicked) = handle.join_timeout(WAIT).expect("join");
    assert!(!kicked);
    assert_eq!(summary.result.as_ref().ok(), Some(&StopReason::Handler));
    assert_eq!(log.last(TAG_DRIVER_FAILED), None);
    assert_eq!(
        verdict(|t| log.last(t)),
        [plan.untouched, 0, 0, 0, 0, plan.pages],
        "zero, old, other, rewrite lost, kept lost, checked"
    );
    assert_eq!(swap.counters().swap_in_errors, 0);
}

/// The hinting guest as a raw image for the daemon: the balloon is the VM's first device.
fn daemon_image(d: &HintDriver) -> RawImage {
    let layout = tidepool_vmm::memory::Layout::new(LayoutConfig {
        boot_ram: RAM_MIB * MIB,
        hotplug_size: 0,
    })
    .expect("layout");
    let img = hint_program(&layout, d.clone()).expect("image");
    assert_eq!(img.boot.privilege, Privilege::User);
    RawImage {
        path: None,
        inline: Some(img.bytes.clone()),
        load_addr: img.load_addr,
        entry: img.entry(),
        privilege: ImagePrivilege::User,
    }
}

fn daemon_driver() -> HintDriver {
    let mut d = HintDriver::new(DEVICE_MMIO_BASE, DEFAULT_SCRATCH, DATA);
    // Idle in guest waits (the config interrupt of a new pass or of DONE wakes the vCPU):
    // 50 ms at most, so 2400 polls are two minutes.
    d.wait_us = 50_000;
    d.host_poll_limit = 2400;
    d
}

/// A counter of the rendered /metrics text, as an integer.
fn sample(text: &str, prefix: &str) -> Option<u64> {
    tidepool_api::metrics::sample_value(text, prefix).map(|v| v as u64)
}

/// Create the hinting VM, wait until its pass ended; returns its id.
fn hinting_vm(m: &VmManager, d: &HintDriver) -> String {
    let mut req = CreateVmRequest::with_memory(RAM_MIB);
    req.image = Some(daemon_image(d));
    req.balloon = Some(ApiBalloon {
        free_page_hinting: true,
        ..ApiBalloon::default()
    });
    let id = m.create_vm(req).expect("create").id;
    wait("the guest's hinting pass", 120, || {
        assert_eq!(reported(m, &id, TAG_DRIVER_FAILED), None, "driver failed");
        reported(m, &id, TAG_HINT_ENDED).is_some()
    });
    id
}

fn hint_status(m: &VmManager, id: &str) -> tidepool_balloon::HintStatus {
    m.call(id, |vm| {
        let dev = vm.balloon_device().expect("balloon");
        let t = dev.lock().unwrap_or_else(|e| e.into_inner());
        t.device().hinting()
    })
    .expect("call")
}

/// Residency of (hinted, kept) blocks.
fn residency(m: &VmManager, id: &str, d: &HintDriver) -> (u64, u64) {
    let (hinted, kept) = (d.hinted_blocks(), kept_blocks(d));
    m.call(id, move |vm| {
        let w = vm.vm().expect("vm").window();
        (resident(w, &hinted), resident(w, &kept))
    })
    .expect("call")
}

/// Tell the guest to check its data and wait for its counts.
fn verify(m: &VmManager, id: &str, d: &HintDriver) -> [u64; 6] {
    let mailbox = d.mailbox();
    stop_driver(m, id, mailbox);
    wait("the guest's check", 120, || {
        reported(m, id, TAG_HINT_CHECKED).is_some()
    });
    verdict(|t| reported(m, id, t))
}

#[test]
fn daemon_phase_one_hints_and_discards_through_the_device_thread() {
    let Some((m, _pool, dir)) = manager("hint", "tp-hint", Duration::from_secs(20), |c| {
        // Resident budget 12 MiB under what the guest keeps even after the discard: the
        // engine keeps reclaiming, with phase 1 only (take what was reported or discarded,
        // start a hinting pass), so a later run credits the discard.
        c.engine.budget_bytes = Some(12 * MIB);
        c.engine.phases = vec![Phase::Reported];
    }) else {
        return;
    };
    let d = daemon_driver();
    let plan = d.plan();
    let id = hinting_vm(&m, &d);
    let st = hint_status(&m, &id);
    assert_eq!(st.mode, HintMode::Discard, "{st:?}");
    let last = st.last_pass.expect("a finished pass");
    assert_eq!(
        Some(u64::from(last.cmd_id)),
        reported(&m, &id, TAG_HINT_CMD_ID)
    );
    assert_eq!(last.hinted_bytes, plan.hinted * PAGE);
    assert!(!last.cut_short);
    // Discarded when the STOP was processed (before the guest saw DONE): every hinted page but
    // the in-pass rewrites, less the after-STOP rewrites that won the race.
    let (lo, hi) = (
        plan.untouched * PAGE,
        (plan.untouched + plan.rewritten_after_stop) * PAGE,
    );
    assert!(
        (lo..=hi).contains(&st.discarded_bytes),
        "discarded {} not in {lo}..={hi}",
        st.discarded_bytes
    );
    let swap = m.vm_swap(&id).expect("swap");
    assert_eq!(
        swap.counters().hint_discarded_pages * PAGE,
        st.discarded_bytes
    );
    let rewritten = (plan.rewritten_in_pass + plan.rewritten_after_stop) * PAGE;
    let (hinted_res, kept_res) = residency(&m, &id, &d);
    println!(
        "daemon: hinted {} MiB, resident {} KiB after the pass; kept {} MiB resident; \
         discarded {} KiB",
        plan.hinted * PAGE / MIB,
        hinted_res / 1024,
        kept_res / MIB,
        st.discarded_bytes / 1024
    );
    assert!(hinted_res <= rewritten + MIB, "{hinted_res}");
    assert!(kept_res >= (plan.pages - plan.hinted) * PAGE * 9 / 10);

    // /metrics shows the same figures, and the engine credits the discard to phase 1.
    let text = || tidepool_api::metrics::render(&m.metrics().expect("metrics")).expect("render");
    let dev = |device: &str, event: &str| {
        format!(
            "tidepool_device_events_total{{vm=\"{id}\",device=\"{device}\",event=\"{event}\"}} "
        )
    };
    let t = text();
    assert_eq!(
        sample(&t, &dev("virtio-balloon", "hint_discarded_bytes")),
        Some(st.discarded_bytes),
        "{t}"
    );
    assert_eq!(
        sample(&t, &dev("swap", "hint_discarded_pages")),
        Some(st.discarded_bytes / PAGE)
    );
    assert!(sample(&t, &dev("virtio-balloon", "hint_passes_completed")) >= Some(1));
    assert!(sample(&t, &dev("virtio-balloon", "hinted_bytes")) >= Some(plan.hinted * PAGE));
    wait("phase 1 credits the discard", 60, || {
        sample(
            &text(),
            "tidepool_reclaim_phase_bytes_total{phase=\"reported\",kind=\"reclaimed\"} ",
        ) >= Some(st.discarded_bytes)
    });

    let [zero, old, other, rewrite_lost, kept_lost, checked] = verify(&m, &id, &d);
    assert_eq!((other, rewrite_lost, kept_lost), (0, 0, 0), "data lost");
    assert_eq!(checked, plan.pages);
    assert_eq!(
        (zero, old),
        (plan.untouched, 0),
        "every untouched hinted page went"
    );
    assert_eq!(
        reported(&m, &id, TAG_HINT_REWRITTEN),
        Some(plan.rewritten_in_pass + plan.rewritten_after_stop)
    );
    assert_eq!(swap.counters().swap_in_errors, 0);
    drop(swap);
    m.delete(&id).expect("delete");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn daemon_without_swap_hints_report_only_and_discards_nothing() {
    let Some((m, _pool, dir)) = manager("hint-noswap", "tp-hint", Duration::from_secs(20), |c| {
        c.engine.budget_bytes = Some(12 * MIB);
        c.engine.phases = vec![Phase::Reported];
        c.swap.enabled = false;
    }) else {
        return;
    };
    let d = daemon_driver();
    let plan = d.plan();
    let id = hinting_vm(&m, &d);
    assert!(m.vm_swap(&id).is_none(), "--no-swap: no VM swap");
    let st = hint_status(&m, &id);
    assert_eq!(
        st.mode,
        HintMode::ReportOnly(ReportOnlyReason::NoWriteTracking)
    );
    let last = st.last_pass.expect("a finished pass");
    assert_eq!(last.hinted_bytes, plan.hinted * PAGE);
    assert_eq!(st.discarded_bytes, 0);
    let (hinted_res, _) = residency(&m, &id, &d);
    assert!(
        hinted_res >= plan.hinted * PAGE * 9 / 10,
        "nothing discarded: {hinted_res}"
    );
    let t = tidepool_api::metrics::render(&m.metrics().expect("metrics")).expect("render");
    let ev = |event: &str| {
        format!(
            "tidepool_device_events_total{{vm=\"{id}\",device=\"virtio-balloon\",event=\"{event}\"}} "
        )
    };
    assert_eq!(sample(&t, &ev("hint_discarded_bytes")), Some(0), "{t}");
    assert!(sample(&t, &ev("hinted_bytes")) >= Some(plan.hinted * PAGE));

    let [zero, old, other, rewrite_lost, kept_lost, checked] = verify(&m, &id, &d);
    assert_eq!((other, rewrite_lost, kept_lost), (0, 0, 0), "data lost");
    assert_eq!(checked, plan.pages);
    assert_eq!(
        (zero, old),
        (0, plan.untouched),
        "hinted pages keep their data"
    );
    m.delete(&id).expect("delete");
    let _ = std::fs::remove_dir_all(dir);
}
