//! Tier-2 tests (real KVM): a microVM's boot blocks, host-side virtio-mem plug/unplug with
//! pool and residency checks, the lifecycle with pause/resume and forbidden transitions, and
//! a crashing guest. Each test skips with a printed reason when /dev/kvm cannot be opened.

use std::sync::Arc;
use std::time::Duration;

use guest_mm::slab::TypedSlab;
use tidepool_hotplug::MemoryBackend;

use super::test_rig::{
    self, base_config, fill_verify_done, kvm_or_skip, last_report, pool, start_and_wait, with_steps,
};
use super::*;
use crate::devices::IrqMode;
use crate::memory::MIB;
use crate::tiny_guest::program::{TAG_CHECKED, TAG_MISMATCHES};
use crate::tiny_guest::{Step, Stride};

fn slab() -> TypedSlab<crate::devices::BlockRecord> {
    test_rig::slab("test-blocks")
}

fn config(id: &str, hotplug: bool, irq: IrqMode, steps: Vec<Step>) -> MicrovmConfig {
    let mut c = MicrovmConfig {
        balloon: Some(BalloonSpec::default()),
        irq,
        ..base_config(id, 64 * MIB)
    };
    if !hotplug {
        c.hotplug = None;
    }
    with_steps(c, steps)
}

#[test]
fn boot_blocks_come_from_the_pool_and_return_on_drop() {
    if !kvm_or_skip("boot_blocks_come_from_the_pool_and_return_on_drop") {
        return;
    }
    let p = pool(256);
    let vm = Microvm::new(
        config("boot", false, IrqMode::Irqfd, vec![Step::Done]),
        p.clone(),
        slab(),
        1,
    )
    .expect("microvm");
    let f = p.figures().expect("figures");
    assert_eq!(f.free_bytes(), 192 * MIB);
    assert_eq!(vm.boot_blocks().len(), 32);
    assert_eq!(vm.bus().slots().len(), 1, "balloon only");
    drop(vm);
    assert!(p.figures().expect("figures").is_whole());
}

#[test]
fn host_side_plug_makes_memory_usable_and_unplug_releases_it() {
    if !kvm_or_skip("host_side_plug_makes_memory_usable_and_unplug_releases_it") {
        return;
    }
    let p = pool(512);
    let layout = config("x", true, IrqMode::Polled, vec![])
        .layout()
        .expect("layout");
    let hp = layout.hotplug().expect("hotplug region");
    let range = hp.start..hp.start + 4 * MIB;
    let steps = fill_verify_done(range.clone(), 0x5eed);
    let mut vm = Microvm::new(
        config("plug", true, IrqMode::Polled, steps),
        p.clone(),
        slab(),
        1,
    )
    .expect("microvm");
    let total = p.figures().expect("figures").total_bytes();
    assert_eq!(p.figures().expect("figures").free_bytes(), total - 64 * MIB);

    vm.with_memory_backend(|b| b.plug(range.start, 4 * MIB))
        .expect("device")
        .expect("plug");
    let f = p.figures().expect("figures");
    assert_eq!(f.free_bytes(), total - 68 * MIB);
    assert_eq!(
        f.nodes[0].allocated_by_type[guest_mm::MigrateType::Movable.index()],
        4 * MIB
    );
    let records = vm.with_memory_backend(|b| b.records()).expect("device");
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].gpa, range.start);

    // The guest fills and verifies every page of the plugged range.
    let st = start_and_wait(&mut vm, Duration::from_secs(60));
    assert_eq!(st, VmLifecycle::Stopped(StopCause::GuestFinished));
    assert_eq!(last_report(&vm, TAG_MISMATCHES), Some(0));
    assert_eq!(last_report(&vm, TAG_CHECKED), Some(1024));
    let window = Arc::clone(vm.vm().expect("vm").window());
    assert!(
        window
            .resident_bytes(range.start, 4 * MIB)
            .expect("mincore")
            >= 4 * MIB - 4096
    );
    let m = vm.memory().expect("figures");
    assert_eq!(m.plugged, 68 * MIB);
    assert!(m.resident >= 4 * MIB);

    vm.with_memory_backend(|b| b.unplug(range.start, 4 * MIB))
        .expect("device")
        .expect("unplug");
    assert_eq!(window.resident_bytes(range.start, 4 * MIB).ok(), Some(0));
    assert!(!window.is_placed(range.start));
    assert_eq!(p.figures().expect("figures").free_bytes(), total - 64 * MIB);
    // Unplugging again is refused and changes nothing.
    assert!(vm
        .with_memory_backend(|b| b.unplug(range.start, 2 * MIB))
        .expect("device")
        .is_err());
    drop(vm);
    drop(window);
    assert!(p.figures().expect("figures").is_whole());
}

#[test]
fn plug_beyond_the_pool_is_out_of_memory_and_takes_nothing() {
    if !kvm_or_skip("plug_beyond_the_pool_is_out_of_memory_and_takes_nothing") {
        return;
    }
    let p = pool(70);
    let vm = Microvm::new(
        config("oom", true, IrqMode::Polled, vec![Step::Done]),
        p.clone(),
        slab(),
        1,
    )
    .expect("microvm");
    let hp = vm
        .vm()
        .expect("vm")
        .window()
        .layout()
        .hotplug()
        .expect("region");
    let r = vm
        .with_memory_backend(|b| b.plug(hp.start, 8 * MIB))
        .expect("device");
    assert_eq!(r, Err(tidepool_hotplug::BackendError::OutOfMemory));
    assert_eq!(p.figures().expect("figures").free_bytes(), 6 * MIB);
    drop(vm);
    assert!(p.figures().expect("figures").is_whole());
}

#[test]
fn lifecycle_pause_resume_stop_and_forbidden_transitions() {
    if !kvm_or_skip("lifecycle_pause_resume_stop_and_forbidden_transitions") {
        return;
    }
    let p = pool(128);
    let mut vm = Microvm::new(
        config("life", false, IrqMode::Irqfd, vec![Step::Spin]),
        p.clone(),
        slab(),
        1,
    )
    .expect("microvm");
    assert_eq!(vm.state(), &VmLifecycle::Created);
    for op in [LifecycleOp::Pause, LifecycleOp::Resume] {
        match vm.apply(op) {
            Err(MicrovmError::Transition(e)) => assert_eq!(e.from, VmLifecycle::Created),
            other => panic!("{op} from created: {other:?}"),
        }
    }
    vm.apply(LifecycleOp::Start).expect("start");
    assert!(matches!(
        vm.apply(LifecycleOp::Start),
        Err(MicrovmError::Transition(_))
    ));
    assert!(matches!(
        vm.apply(LifecycleOp::Resume),
        Err(MicrovmError::Transition(_))
    ));
    vm.apply(LifecycleOp::Pause).expect("pause");
    assert_eq!(vm.state(), &VmLifecycle::Paused);
    assert!(matches!(
        vm.apply(LifecycleOp::Pause),
        Err(MicrovmError::Transition(_))
    ));
    vm.apply(LifecycleOp::Resume).expect("resume");
    assert_eq!(vm.state(), &VmLifecycle::Running);
    vm.apply(LifecycleOp::Stop).expect("stop");
    assert_eq!(vm.state(), &VmLifecycle::Stopped(StopCause::Requested));
    for op in [
        LifecycleOp::Start,
        LifecycleOp::Pause,
        LifecycleOp::Resume,
        LifecycleOp::Stop,
    ] {
        assert!(
            matches!(vm.apply(op), Err(MicrovmError::Transition(_))),
            "{op}"
        );
    }
    drop(vm);
    assert!(p.figures().expect("figures").is_whole());
}

#[test]
fn a_crashing_guest_stops_its_vm_only() {
    if !kvm_or_skip("a_crashing_guest_stops_its_vm_only") {
        return;
    }
    let p = pool(128);
    // `hlt` at CPL3 without an IDT: #GP, then a triple fault (KVM_EXIT_SHUTDOWN).
    let mut vm = Microvm::new(
        config("crash", false, IrqMode::Polled, vec![Step::Halt]),
        p.clone(),
        slab(),
        1,
    )
    .expect("microvm");
    match start_and_wait(&mut vm, Duration::from_secs(30)) {
        VmLifecycle::Stopped(StopCause::GuestFailed(why)) => {
            assert!(why.contains("shut down"), "{why}")
        }
        other => panic!("expected a failed guest, got {other}"),
    }
    let figures = vm.memory().expect("figures still readable");
    assert_eq!(figures.boot, 64 * MIB);
    drop(vm);
    assert!(p.figures().expect("figures").is_whole());
}

#[test]
fn a_guest_touching_an_unplugged_block_fails_typed() {
    if !kvm_or_skip("a_guest_touching_an_unplugged_block_fails_typed") {
        return;
    }
    let p = pool(256);
    let layout = config("x", true, IrqMode::Polled, vec![])
        .layout()
        .expect("layout");
    let hp = layout.hotplug().expect("hotplug region");
    // The block was plugged and unplugged before the guest runs; its 128 MiB slot stays
    // registered (eager), so the touch reaches KVM over PROT_NONE memory.
    let steps = vec![
        Step::Verify {
            ranges: std::iter::once(hp.start + 2 * MIB..hp.start + 2 * MIB + 8).collect(),
            seed: 1,
            stride: Stride::Page,
        },
        Step::Done,
    ];
    let mut vm = Microvm::new(
        config("unplugged", true, IrqMode::Polled, steps),
        p.clone(),
        slab(),
        1,
    )
    .expect("microvm");
    assert_eq!(
        vm.vm().expect("vm").hotplug_memslots(),
        crate::kvm::HotplugMemslots::Eager
    );
    vm.with_memory_backend(|b| b.plug(hp.start, 4 * MIB))
        .expect("backend")
        .expect("plug");
    vm.with_memory_backend(|b| b.unplug(hp.start + 2 * MIB, 2 * MIB))
        .expect("backend")
        .expect("unplug");
    match start_and_wait(&mut vm, Duration::from_secs(30)) {
        VmLifecycle::Stopped(StopCause::GuestFailed(why)) => {
            assert!(why.contains("inaccessible memory"), "{why}")
        }
        other => panic!("expected a failed guest, got {other}"),
    }
    assert!(vm.reports().iter().all(|r| r.tag != TAG_CHECKED));
    let figures = vm.memory().expect("figures still readable");
    assert_eq!(figures.plugged, 64 * MIB + 2 * MIB);
    drop(vm);
    assert!(p.figures().expect("figures").is_whole());
}
