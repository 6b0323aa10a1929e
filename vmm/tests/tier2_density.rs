//! Tier-2 tests of the density benchmark on real vCPUs: the tiny guest's density loop against
//! the real balloon, and a small density run end to end (both ramps). No timing assertions:
//! the stall limit is set out of reach, and only counts, data and memory are checked. Skip
//! when /dev/kvm cannot be opened.

use std::time::Duration;

use tidepool_vmm::bench::density::guest::{DensityVm, GuestSpec, Reporting};
use tidepool_vmm::bench::density::ramp::RampEnd;
use tidepool_vmm::bench::density::{
    check_consistency, figures, ramp_data_errors, run_density, DensityConfig,
};
use tidepool_vmm::kvm::kvm_available;
use tidepool_vmm::memory::MIB;

/// The tests share the process's resident memory, which the density run measures: one at a
/// time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn kvm() -> bool {
    match kvm_available() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIP: {why}");
            false
        }
    }
}

#[test]
fn density_guest_runs_phases_verifies_and_stops_on_the_mailbox() {
    let _serial = serial();
    if !kvm() {
        return;
    }
    let spec = GuestSpec {
        ram: 256 * MIB,
        window: 48 * MIB,
        pace: Duration::ZERO,
        max_phases: 0,
        reporting: Reporting::Discard,
    };
    let vm = DensityVm::start(3, &spec).expect("start");
    let shared = std::sync::Arc::clone(vm.shared());
    // 254 MiB ring, 48 MiB windows: phase 5 wraps round the ring's end.
    while shared.phases() < 12 {
        vm.check_alive().expect("alive");
        std::thread::sleep(Duration::from_millis(5));
    }
    let t = vm.stop(Duration::from_secs(60)).expect("stop");
    assert!(t.phases >= 12);
    assert_eq!(t.mismatches, 0);
    let records = shared.records_from(0);
    assert_eq!(records.len() as u64, t.phases);
    assert!(records.iter().enumerate().all(|(i, r)| r.phase == i as u64));
    assert!(records[0].verify.is_none());
    assert!(records[1..].iter().all(|r| r.verify.is_some()));
    // Every phase reported its previous window free, and the last window went back on stop.
    assert_eq!(t.reported_bytes, t.phases * 48 * MIB);
}

#[test]
fn density_guest_without_reclaim_keeps_its_memory() {
    let _serial = serial();
    if !kvm() {
        return;
    }
    let spec = GuestSpec {
        ram: 128 * MIB,
        window: 32 * MIB,
        pace: Duration::ZERO,
        max_phases: 0,
        reporting: Reporting::Ignore,
    };
    let vm = DensityVm::start(0, &spec).expect("start");
    let shared = std::sync::Arc::clone(vm.shared());
    while shared.phases() < 5 {
        vm.check_alive().expect("alive");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The ring [2 MiB, 128 MiB) was touched all round and nothing was discarded.
    let resident = vm
        .vm()
        .window()
        .resident_bytes(2 * MIB, 126 * MIB)
        .expect("mincore");
    assert_eq!(resident, 126 * MIB);
    let t = vm.stop(Duration::from_secs(60)).expect("stop");
    assert_eq!(t.mismatches, 0);
}

#[test]
fn small_density_run_completes_without_data_errors() {
    let _serial = serial();
    if !kvm() {
        return;
    }
    let cfg = DensityConfig {
        budget: 640 * MIB,
        vm_ram: 256 * MIB,
        window: 32 * MIB,
        calibration_phases: 3,
        max_vms: 2,
        ramp_time: Duration::from_secs(600),
        total_time: Duration::from_secs(1800),
        step_timeout: Duration::from_secs(600),
        // Out of reach: this test checks counts and data, never timing.
        stall_limit: Duration::from_secs(3600),
        pace: Duration::from_millis(10),
        engine: true,
        swap_dir: std::env::temp_dir(),
    };
    let run = match run_density(&cfg) {
        Ok(r) => r,
        Err(e) if e.contains("too little for a budget") => {
            eprintln!("SKIP: {e}");
            return;
        }
        Err(e) => panic!("density run: {e}"),
    };
    for r in [&run.reclaim, &run.no_reclaim] {
        check_consistency(r).expect("records agree with the guests");
        assert_eq!(ramp_data_errors(r).expect("totals agree"), 0);
        assert_eq!(r.totals.len(), r.started);
        assert!(r.held <= r.started);
    }
    // With reclaim each VM keeps about two windows: both VMs fit in 640 MiB.
    assert_eq!(run.reclaim.held, 2);
    assert_eq!(run.reclaim.end, RampEnd::MaxVms);
    assert!(run.reclaim.totals.iter().all(|t| t.reported_bytes > 0));
    // Without reclaim each VM grows to its whole 256 MiB: the budget holds at most two, and
    // only if the process's own memory fits in the remaining 128 MiB.
    assert!(run.no_reclaim.held <= 2);
    assert!(run.no_reclaim.max_resident_held <= cfg.budget);
    let report = figures(&run).expect("figures");
    let get = |k: &str| report.get(k).unwrap_or_else(|| panic!("figure {k}"));
    assert_eq!(get("data_errors"), 0.0);
    assert_eq!(get("vms_held"), 2.0);
    assert_eq!(get("vms_held_no_reclaim"), run.no_reclaim.held as f64);
    assert_eq!(get("overcommit_ratio"), 2.0 * 256.0 / 640.0);
    if run.no_reclaim.held > 0 {
        assert_eq!(get("density_gain"), 2.0 / run.no_reclaim.held as f64);
    }
    assert!(get("reclaim_gib_s") > 0.0);
    assert!(get("p99_guest_stall_ms") >= 0.0);
}
