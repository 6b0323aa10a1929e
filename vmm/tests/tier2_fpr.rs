//! Tier-2 test of free page reporting end to end on a real vCPU without Linux: the tiny
//! guest's polled driver probes the real balloon through the real virtio-mmio transport,
//! touches 256 MiB at CPL3, reports it free in 2 MiB blocks, and the balloon's real madvise
//! backend discards it from the VM's window; the guest then reads zeros. Skips when /dev/kvm
//! cannot be opened.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidepool_balloon::{Balloon, BalloonConfig, MmapBackend};
use tidepool_virtio::MmioTransport;
use tidepool_vmm::kvm::{kvm_available, StopReason, VcpuHandle, Vm, VmConfig};
use tidepool_vmm::memory::MIB;
use tidepool_vmm::tiny_guest::fpr_driver::*;
use tidepool_vmm::tiny_guest::fpr_run::run_fpr_phases;
use tidepool_vmm::tiny_guest::harness::{
    start_tiny_guest, wait_report, DeviceExitHandler, NoIrq, ReportLog,
};
use tidepool_vmm::tiny_guest::virtio_mem_driver::VirtioMemDriver;
use tidepool_vmm::tiny_guest::virtq::{
    DriverFailure, DEFAULT_MMIO_BASE, DEFAULT_SCRATCH, TAG_DRIVER_FAILED, TAG_DRIVER_READY,
};
use tidepool_vmm::tiny_guest::{GuestReport, Step, TinyGuestBuilder};
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

const WAIT: Duration = Duration::from_secs(120);

type Handle = VcpuHandle<DeviceExitHandler<Balloon>>;

fn wait(
    log: &ReportLog,
    handle: &Handle,
    what: &str,
    pred: impl Fn(&GuestReport) -> bool,
) -> GuestReport {
    wait_report(log, handle, 0, WAIT, pred)
        .unwrap_or_else(|e| {
            panic!(
                "waiting for {what}: {e}; reports {:?}",
                log.snapshot()
                    .iter()
                    .map(|r| (r.tag, r.value))
                    .collect::<Vec<_>>()
            )
        })
        .1
}

fn vm_and_balloon(
    ram: u64,
    cfg: BalloonConfig,
) -> (
    Vm,
    vm_memory::GuestMemoryMmap,
    Arc<Mutex<MmioTransport<Balloon>>>,
) {
    let vm = Vm::new(VmConfig::tiny(ram, 0)).expect("create VM");
    let view = vm.window().guest_memory().expect("view");
    let mem = (*view).clone();
    let mut backend = MmapBackend::with_ram(&mem, &[(0, ram)]).expect("backend");
    backend.advise_huge().expect("THP advice");
    // The default config also offers STATS_VQ, DEFLATE_ON_OOM and PAGE_POISON: the driver
    // accepts only REPORTING, so the reporting queue is index 2.
    let balloon = Balloon::new(cfg, Box::new(backend)).expect("balloon");
    let transport = MmioTransport::new(
        Box::new(balloon),
        GuestMemoryAtomic::new(mem.clone()),
        Arc::new(NoIrq::default()),
    )
    .expect("transport");
    (vm, mem, Arc::new(Mutex::new(transport)))
}

#[test]
fn polled_fpr_driver_reports_touched_memory_and_reads_zeros() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let ram = 512 * MIB;
    let (vm, mem, transport) = vm_and_balloon(ram, BalloonConfig::default());
    let range = 128 * MIB..384 * MIB;
    let len = range.end - range.start;
    let driver = FprDriver::new(
        DEFAULT_MMIO_BASE,
        DEFAULT_SCRATCH,
        FprProgram::TouchReportVerify {
            range: range.clone(),
            wait_for_host: true,
        },
    );
    let mailbox = driver.mailbox();
    let image = fpr_program(vm.window().layout(), driver).expect("build");
    let log = Arc::new(ReportLog::default());
    let handler = DeviceExitHandler::new(DEFAULT_MMIO_BASE, Arc::clone(&transport), log.clone());
    let handle = start_tiny_guest(&vm, &image, 0, handler).expect("start");

    let ready = wait(&log, &handle, "DRIVER_OK", |r| r.tag == TAG_DRIVER_READY);
    assert_eq!(ready.value & 0xf, 0xf);
    {
        let t = transport.lock().expect("lock");
        let acked = t.device().acked_features();
        assert_eq!(acked, (1 << 32) | (1 << 5), "VERSION_1 and REPORTING only");
    }
    let touched = wait(&log, &handle, "touch", |r| r.tag == TAG_FPR_TOUCHED);
    assert_eq!(touched.value, len);
    let before = vm
        .window()
        .resident_bytes(range.start, len)
        .expect("mincore");

    mem.write_obj(1u64, GuestAddress(mailbox)).expect("go");
    let reported = wait(&log, &handle, "report", |r| r.tag == TAG_FPR_REPORTED);
    assert_eq!(reported.value, len);
    let after = vm
        .window()
        .resident_bytes(range.start, len)
        .expect("mincore");
    println!(
        "window residency of the {} MiB range: {} MiB before the report, {} MiB after \
         ({:?} from the touch report to the end of reporting, {} chains)",
        len / MIB,
        before / MIB,
        after / MIB,
        reported.at - touched.at,
        log.last(TAG_FPR_CHAINS).unwrap_or(0)
    );
    assert!(
        before >= len * 9 / 10,
        "the guest's touch made the range resident"
    );
    assert!(
        after <= before / 10,
        "residency must drop by at least 90%: {before} -> {after}"
    );
    assert_eq!(log.last(TAG_FPR_CHAINS), Some(len / REPORT_BLOCK / 32));
    {
        let t = transport.lock().expect("lock");
        let acc = t.device().accounting();
        assert_eq!(acc.reported_bytes, len);
        assert_eq!(acc.counters.reports, len / REPORT_BLOCK / 32);
        assert_eq!(acc.counters.whole_huge_blocks, len / REPORT_BLOCK);
        assert_eq!(acc.input_errors, Default::default());
    }

    mem.write_obj(2u64, GuestAddress(mailbox)).expect("go");
    let (summary, kicked) = handle.join_timeout(WAIT).expect("join");
    assert!(!kicked);
    assert_eq!(summary.result.as_ref().ok(), Some(&StopReason::Handler));
    assert_eq!(
        log.last(TAG_FPR_NONZERO),
        Some(0),
        "reported pages read as zeros"
    );
    assert_eq!(log.last(TAG_FPR_CHECKED), Some(len / 4096));
    assert_eq!(
        transport.lock().expect("lock").counters(),
        Default::default(),
        "no bad register access"
    );
}

#[test]
fn fpr_phases_report_every_window() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let vm = Vm::new(VmConfig::tiny(256 * MIB, 0)).expect("create VM");
    let (window_mib, phases) = (64, 6);
    let run = run_fpr_phases(&vm, window_mib, 2, phases, WAIT).expect("phases run");
    let idx: Vec<u64> = run.phases.iter().map(|p| p.phase).collect();
    assert_eq!(idx, (0..u64::from(phases)).collect::<Vec<_>>());
    println!(
        "{phases} phases of {window_mib} MiB in {:?}, {} exits; rdtsc touch/report per phase: {:?}",
        run.wall,
        run.exits,
        run.phases
            .iter()
            .map(|p| (p.touch_tsc, p.report_tsc))
            .collect::<Vec<_>>()
    );
    assert!(run.phases[1..]
        .iter()
        .all(|p| p.touch_tsc > 0 && p.report_tsc > 0));
    // Every window touched was reported, the last one at the end: nothing stays resident.
    assert_eq!(run.reported_bytes, u64::from(phases) * window_mib * MIB);
    println!(
        "ring residency after the run: {} KiB of {} MiB",
        run.resident_after / 1024,
        run.ring_bytes / MIB
    );
    assert!(run.resident_after <= run.ring_bytes / 10);
}

#[test]
fn probe_failures_are_reported() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let run = |cfg: BalloonConfig, step: Step| {
        let (vm, _mem, transport) = vm_and_balloon(64 * MIB, cfg);
        let image = TinyGuestBuilder::new(vm.window().layout())
            .step(step)
            .step(Step::Done)
            .build()
            .expect("build");
        let log = Arc::new(ReportLog::default());
        let handler = DeviceExitHandler::new(DEFAULT_MMIO_BASE, transport, log.clone());
        let handle = start_tiny_guest(&vm, &image, 0, handler).expect("start");
        let (summary, kicked) = handle.join_timeout(WAIT).expect("join");
        assert!(!kicked);
        assert_eq!(summary.result.as_ref().ok(), Some(&StopReason::Handler));
        log.last(TAG_DRIVER_FAILED)
            .and_then(DriverFailure::from_code)
    };
    // A balloon that does not offer REPORTING.
    let no_reporting = BalloonConfig {
        free_page_reporting: false,
        page_poison: false,
        ..BalloonConfig::default()
    };
    let fpr = Step::FreePageReporting(FprDriver::new(
        DEFAULT_MMIO_BASE,
        DEFAULT_SCRATCH,
        FprProgram::TouchReportVerify {
            range: 32 * MIB..64 * MIB,
            wait_for_host: false,
        },
    ));
    assert_eq!(run(no_reporting, fpr), Some(DriverFailure::FeaturesMissing));
    // The virtio-mem driver pointed at a balloon.
    let vmem = Step::VirtioMem(VirtioMemDriver::new(DEFAULT_MMIO_BASE, DEFAULT_SCRATCH));
    assert_eq!(
        run(BalloonConfig::default(), vmem),
        Some(DriverFailure::WrongDevice)
    );
}
