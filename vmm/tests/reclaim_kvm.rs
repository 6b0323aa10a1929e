//! The reclaim engine against a real KVM guest: the tiny guest touches one word in each 2 MiB
//! block at CPL3, so host THP makes every block resident as a huge page that is almost all
//! zero. The engine sees the touches through residency sampling, waits until the memory is
//! cold, then its huge page split (phase 5) gives the zero 4 KiB pages back, and a second
//! guest program checks every word it wrote. Skips without /dev/kvm.

use std::sync::Arc;
use std::time::Duration;

use tidepool_vmm::kvm::{kvm_available, StopReason, Vm, VmConfig};
use tidepool_vmm::memory::{LayoutConfig, MIB};
use tidepool_vmm::reclaim::{
    EngineConfig, Phase, ReclaimEngine, ReclaimTarget, SyntheticPressure, Trigger,
    WatermarkFractions, WindowTarget,
};
use tidepool_vmm::tiny_guest::{
    run_tiny_guest_on, Step, Stride, TinyGuestBuilder, TAG_CHECKED, TAG_MISMATCHES,
};

const TIMEOUT: Duration = Duration::from_secs(60);
const SEED: u64 = 0x7e1d_0000_0000_00a1;

#[test]
fn engine_splits_a_guests_sparse_huge_pages_without_losing_data() {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let vm = Vm::new(VmConfig {
        layout: LayoutConfig {
            boot_ram: 256 * MIB,
            hotplug_size: 0,
        },
        platform: true,
        hotplug_memslots: tidepool_vmm::kvm::HotplugMemslots::default(),
    })
    .expect("create VM");
    let data = 64 * MIB..256 * MIB;
    let blocks = (data.end - data.start) / (2 * MIB);
    let fill = TinyGuestBuilder::new(vm.window().layout())
        .step(Step::Fill {
            ranges: vec![data.clone()],
            seed: SEED,
            stride: Stride::Block,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    let run = run_tiny_guest_on(&vm, &fill, 0, TIMEOUT).expect("run");
    assert_eq!(
        run.summary.result.as_ref().ok(),
        Some(&StopReason::Handler),
        "fill did not finish"
    );
    let window = Arc::clone(vm.window());
    let touched = window
        .resident_bytes(data.start, data.end - data.start)
        .expect("mincore");
    println!(
        "resident after touching {blocks} blocks: {} MiB",
        touched / MIB
    );
    if touched < blocks * MIB {
        eprintln!("SKIP: host THP did not back the guest's blocks; nothing sparse to split");
        return;
    }

    // No vCPU runs between the two guest programs, so the scan may run without pausing.
    let target = Arc::new(WindowTarget::new("kvm-vm", &window).assume_quiesced());
    let resident = target.resident_bytes().expect("resident");
    // B = 1.2 x resident: free is ~17% of B, below low (30%); high is 50%.
    let budget = resident + resident / 5;
    let cfg = EngineConfig {
        budget_bytes: Some(budget),
        watermarks: WatermarkFractions {
            min: 0.0,
            low: 0.3,
            high: 0.5,
        },
        working_set_intervals: 1,
        backoff_steps: 0,
        ..Default::default()
    };
    let engine = ReclaimEngine::new(cfg, SyntheticPressure::new()).expect("engine");
    engine.add_target(target.clone());
    // First step: the guest's touches are the latest interval's: hot, left alone.
    let r = engine.step().expect("step");
    assert_eq!(r.trigger, Some(Trigger::Watermark));
    assert_eq!(r.reclaimed_bytes(), 0);
    // Second step: cold now; the split brings free memory back to high.
    let r = engine.step().expect("step");
    assert!(r.satisfied, "{r:?}");
    assert_eq!(r.phase_order(), vec![Phase::SplitHuge]);
    let after = target.resident_bytes().expect("resident");
    println!(
        "engine: need {} MiB, split freed {} MiB, resident {} -> {} MiB, split {:?}",
        r.need_bytes / MIB,
        r.reclaimed_bytes() / MIB,
        resident / MIB,
        after / MIB,
        target.split_stats()
    );
    assert!(after <= budget / 2, "resident {after} above the high mark");
    assert_eq!(engine.step().expect("step").trigger, None);

    // The guest reads every word back.
    let verify = TinyGuestBuilder::new(vm.window().layout())
        .step(Step::Verify {
            ranges: vec![data],
            seed: SEED,
            stride: Stride::Block,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    let run = run_tiny_guest_on(&vm, &verify, 1, TIMEOUT).expect("run");
    assert_eq!(run.summary.result.as_ref().ok(), Some(&StopReason::Handler));
    assert_eq!(run.summary.handler.value(TAG_MISMATCHES), Some(0));
    assert_eq!(run.summary.handler.value(TAG_CHECKED), Some(blocks));
}
