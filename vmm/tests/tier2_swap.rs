//! Tier-2 tests of the VMM swap: a real vCPU at CPL3 (the tiny guest) whose memory is swapped
//! out while it runs, and swapped back in through KVM's faults on userfaultfd. Each test prints
//! why and returns early when /dev/kvm cannot be opened.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tidepool_vmm::kvm::{kvm_available, Exit, ExitAction, ExitHandler, VcpuError, Vm, VmConfig};
use tidepool_vmm::memory::{GIB, MIB};
use tidepool_vmm::swap::{SwapFile, SwapFileConfig, VmSwap};
use tidepool_vmm::tiny_guest::harness::start_tiny_guest;
use tidepool_vmm::tiny_guest::program::{MAX_TAG, TAG_USER};
use tidepool_vmm::tiny_guest::{pattern, Step, Stride, TinyGuestBuilder, REPORT_BASE};
use tidepool_vmm::tiny_guest::{TAG_CHECKED, TAG_DONE, TAG_MISMATCHES};

fn skip() -> bool {
    match kvm_available() {
        Ok(()) => false,
        Err(why) => {
            eprintln!("SKIP: {why}");
            true
        }
    }
}

/// Collects report writes (tag, value, when); stops on TAG_DONE.
#[derive(Debug, Default, Clone)]
struct Reports(Arc<Mutex<Vec<(u64, u64, Instant)>>>);

impl Reports {
    fn last(&self, tag: u64) -> Option<u64> {
        let v = self.0.lock().expect("reports");
        v.iter().rev().find(|r| r.0 == tag).map(|r| r.1)
    }
    fn at(&self, tag: u64, value: u64) -> Option<Instant> {
        let v = self.0.lock().expect("reports");
        v.iter().find(|r| r.0 == tag && r.1 == value).map(|r| r.2)
    }
}

impl ExitHandler for Reports {
    fn handle(&mut self, exit: Exit<'_>) -> Result<ExitAction, String> {
        match exit {
            Exit::MmioWrite { addr, data }
                if (REPORT_BASE..=REPORT_BASE + MAX_TAG * 8).contains(&addr) =>
            {
                let b = <[u8; 8]>::try_from(data).map_err(|_| "short report".to_string())?;
                let tag = (addr - REPORT_BASE) / 8;
                self.0.lock().map_err(|_| "poisoned".to_string())?.push((
                    tag,
                    u64::from_le_bytes(b),
                    Instant::now(),
                ));
                Ok(if tag == TAG_DONE {
                    ExitAction::Stop
                } else {
                    ExitAction::Continue
                })
            }
            other => Err(format!("unexpected exit {other:?}")),
        }
    }
}

fn setup(ram: u64) -> (Vm, Arc<SwapFile>, VmSwap) {
    let vm = Vm::new(VmConfig::tiny(ram, 0)).expect("create VM");
    let path = std::env::temp_dir().join(format!(
        "tidepool-tier2-swap-{}-{}",
        std::process::id(),
        ram
    ));
    let file = Arc::new(SwapFile::create(SwapFileConfig::new(path, 2 * GIB)).expect("swap file"));
    let swap = VmSwap::new(Arc::clone(vm.window()), Arc::clone(&file)).expect("swap");
    (vm, file, swap)
}

/// Wait until the vCPU thread ends on its own (no kick: a vCPU stuck in a fault would not
/// answer one); false on timeout.
fn wait_finished<H>(h: &tidepool_vmm::kvm::VcpuHandle<H>, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !h.is_finished() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

#[test]
fn guest_writes_1_gib_while_it_is_swapped_out_and_verifies_every_page() {
    if skip() {
        return;
    }
    let (vm, file, swap) = setup(GIB);
    let layout = vm.window().layout().clone();
    let ranges = layout.boot_ram_ranges();
    let (a, b) = (0x1111_0000_0000_0001u64, 0x2222_0000_0000_0002u64);
    let image = TinyGuestBuilder::new(&layout)
        .step(Step::Fill {
            ranges: ranges.clone(),
            seed: a,
            stride: Stride::Page,
        })
        .step(Step::Report {
            tag: TAG_USER,
            value: 1,
        })
        .step(Step::Fill {
            ranges: ranges.clone(),
            seed: b,
            stride: Stride::Page,
        })
        .step(Step::Report {
            tag: TAG_USER,
            value: 2,
        })
        .step(Step::Verify {
            ranges,
            seed: b,
            stride: Stride::Page,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    let reports = Reports::default();
    let t0 = Instant::now();
    let handle = start_tiny_guest(&vm, &image, 0, reports.clone()).expect("start");
    // Swap out in 64 MiB budgets over the whole RAM for as long as the guest writes (both
    // fill passes); the verify pass then swaps everything still out back in through KVM.
    let mut rounds_while_writing = 0u64;
    let mut reclaimed = 0u64;
    while !handle.is_finished()
        && reports.at(TAG_USER, 2).is_none()
        && t0.elapsed() < Duration::from_secs(60)
    {
        let out = swap.swap_out(0..GIB, 64 * MIB).expect("swap out");
        reclaimed += out.reclaimed_bytes();
        rounds_while_writing += 1;
        // Leave the guest some room between rounds.
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        wait_finished(&handle, Duration::from_secs(60)),
        "guest did not finish"
    );
    let summary = handle.join().expect("join");
    let elapsed = t0.elapsed();
    let c = swap.counters();
    println!(
        "guest run {elapsed:?}; swap-out rounds while the guest wrote: {rounds_while_writing}; \
         reclaimed {} MiB; {c:?}; file {:?}",
        reclaimed / MIB,
        file.counters()
    );
    assert!(summary.result.is_ok(), "vCPU: {:?}", summary.result);
    assert_eq!(reports.last(TAG_MISMATCHES), Some(0));
    let image_pages = image.bytes.len() as u64 / 4096;
    assert_eq!(reports.last(TAG_CHECKED), Some(GIB / 4096 - image_pages));
    assert!(rounds_while_writing > 0);
    assert!(c.swapped_out_pages > 0, "nothing was swapped out");
    assert!(
        c.redirtied_pages + c.wp_faults > 0,
        "no write met a swapped page"
    );
    assert!(c.swapped_in_pages > 0, "nothing was swapped in through KVM");
    // Host side agrees on a sample of pages (swapped-in through the handler again).
    let mem = vm.window().guest_memory().expect("view");
    use vm_memory::{Bytes, GuestAddress};
    for gpa in (64 * MIB..GIB).step_by(7 * 4096 * 13) {
        let gpa = gpa & !4095;
        let v: u64 = mem.read_obj(GuestAddress(gpa)).expect("read");
        assert_eq!(v, pattern(gpa, b), "gpa {gpa:#x}");
    }
}

/// The guest reads a swapped-out range: with `fail` the file's reads fail, and the vCPU must
/// end with a typed error (EFAULT from KVM_RUN), not hang and not see zeros.
fn swapped_read(fail: bool) {
    let (vm, file, swap) = setup(256 * MIB);
    let range = 64 * MIB..128 * MIB;
    let seed = 0x77;
    let image = TinyGuestBuilder::new(vm.window().layout())
        .step(Step::Verify {
            ranges: vec![range.clone()],
            seed,
            stride: Stride::Page,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    let mem = vm.window().guest_memory().expect("view");
    use vm_memory::{Bytes, GuestAddress};
    for gpa in range.clone().step_by(4096) {
        mem.write_obj(pattern(gpa, seed), GuestAddress(gpa))
            .expect("write");
    }
    swap.swap_out(range.clone(), u64::MAX).expect("swap out");
    assert_eq!(swap.swapped_bytes(), 64 * MIB);
    if fail {
        file.inject_read_errors(u64::MAX);
    }
    let reports = Reports::default();
    let handle = start_tiny_guest(&vm, &image, 0, reports.clone()).expect("start");
    assert!(wait_finished(&handle, Duration::from_secs(60)), "vCPU hung");
    let summary = handle.join().expect("join");
    if fail {
        assert!(
            matches!(summary.result, Err(VcpuError::GuestMemoryFault { .. })),
            "expected a guest memory fault (KVM_RUN EFAULT), got {:?}",
            summary.result
        );
        assert_eq!(
            reports.last(TAG_MISMATCHES),
            None,
            "the guest must not go on"
        );
        let f = swap.failure().expect("failure recorded");
        assert!(range.contains(&f.gpa));
    } else {
        assert!(summary.result.is_ok(), "{:?}", summary.result);
        assert_eq!(reports.last(TAG_MISMATCHES), Some(0));
        assert_eq!(reports.last(TAG_CHECKED), Some(64 * MIB / 4096));
    }
}

#[test]
fn swapped_memory_reads_back_through_kvm() {
    if skip() {
        return;
    }
    swapped_read(false);
}

#[test]
fn swap_in_io_error_stops_the_vcpu_with_efault() {
    if skip() {
        return;
    }
    swapped_read(true);
}

#[test]
fn vm_deleted_while_a_vcpu_fault_is_pending() {
    if skip() {
        return;
    }
    let (vm, _file, swap) = setup(256 * MIB);
    let range = 64 * MIB..128 * MIB;
    let image = TinyGuestBuilder::new(vm.window().layout())
        .step(Step::Verify {
            ranges: vec![range.clone()],
            seed: 1,
            stride: Stride::Page,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    let mem = vm.window().guest_memory().expect("view");
    use vm_memory::{Bytes, GuestAddress};
    for gpa in range.clone().step_by(4096) {
        mem.write_obj(pattern(gpa, 1), GuestAddress(gpa))
            .expect("write");
    }
    swap.swap_out(range, u64::MAX).expect("swap out");
    swap.pause_handler(true);
    let reports = Reports::default();
    let handle = start_tiny_guest(&vm, &image, 0, reports.clone()).expect("start");
    // The vCPU blocks on its first fault in the range.
    assert!(!wait_finished(&handle, Duration::from_millis(500)));
    swap.shutdown();
    assert!(
        wait_finished(&handle, Duration::from_secs(30)),
        "vCPU still blocked after shutdown"
    );
    let summary = handle.join().expect("join");
    assert!(
        matches!(summary.result, Err(VcpuError::GuestMemoryFault { .. })),
        "expected a guest memory fault (KVM_RUN EFAULT), got {:?}",
        summary.result
    );
    assert_eq!(reports.last(TAG_MISMATCHES), None);
}

#[test]
fn dirty_log_sees_guest_writes_and_clears() {
    if skip() {
        return;
    }
    let (vm, _file, _swap) = setup(256 * MIB);
    let written = 64 * MIB..96 * MIB;
    let image = TinyGuestBuilder::new(vm.window().layout())
        .step(Step::Fill {
            ranges: vec![written.clone()],
            seed: 3,
            stride: Stride::Page,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    vm.set_dirty_logging(true).expect("dirty logging on");
    assert!(vm.dirty_logging());
    // Host writes (the image load) do not show; start from an empty log anyway.
    let reports = Reports::default();
    let handle = start_tiny_guest(&vm, &image, 0, reports.clone()).expect("start");
    assert!(
        wait_finished(&handle, Duration::from_secs(60)),
        "guest hung"
    );
    assert!(handle.join().expect("join").result.is_ok());
    let dirty = vm.take_dirty_ranges().expect("dirty log");
    let covered = |gpa: u64| dirty.iter().any(|r| r.contains(&gpa));
    for gpa in written.clone().step_by(4096) {
        assert!(
            covered(gpa),
            "page {gpa:#x} written by the guest is not in the log"
        );
    }
    for gpa in (128 * MIB..256 * MIB).step_by(4096 * 17) {
        assert!(!covered(gpa), "page {gpa:#x} was never written");
    }
    // Fetching cleared it.
    assert!(vm.take_dirty_ranges().expect("dirty log").is_empty());
    vm.set_dirty_logging(false).expect("off");
}
