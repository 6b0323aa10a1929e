//! Tier-2 tests of hot-plug blocks under both memslot strategies: lazy (placing blocks
//! registers memslots, removing the last block of a chunk deletes its slot) and eager (the
//! region's slots exist from VM creation; placing and removing never change them). The guest can
//! use placed blocks, removing a block leaves nothing behind, and a guest touching a removed
//! block gets a typed [`VcpuError::GuestMemoryFault`]. Both strategies run one scenario;
//! only the expected slot counts and the removed block the guest touches differ. Skips when
//! /dev/kvm cannot be opened.

use std::ops::Range;
use std::time::Duration;

use tidepool_vmm::kvm::{kvm_available, HotplugMemslots, StopReason, VcpuError, Vm, VmConfig};
use tidepool_vmm::memory::{LayoutConfig, GIB, MIB};
use tidepool_vmm::tiny_guest::{
    pattern, run_tiny_guest_on, Step, Stride, TinyGuestBuilder, TinyRun, TAG_CHECKED,
    TAG_MISMATCHES,
};
use vm_memory::{Bytes, GuestAddress};

const TIMEOUT: Duration = Duration::from_secs(60);

/// The run ended with a guest memory fault (EFAULT from KVM_RUN, or KVM_EXIT_MEMORY_FAULT at
/// an address in the block at `block`).
fn assert_guest_fault(result: &Result<StopReason, VcpuError>, block: u64) {
    match result {
        Err(VcpuError::GuestMemoryFault { gpa, .. }) => {
            if let Some(gpa) = gpa {
                assert!((block..block + 2 * MIB).contains(gpa), "fault at {gpa:#x}");
            }
        }
        other => panic!("expected a guest memory fault, got {other:?}"),
    }
}

/// Memslots registered while `chunks` of the region's two 128 MiB chunks hold blocks: lazy
/// registers the boot slot plus one slot a chunk in use, eager all three from creation.
fn expected_slots(mode: HotplugMemslots, chunks: usize) -> usize {
    match mode {
        HotplugMemslots::Lazy => 1 + chunks,
        HotplugMemslots::Eager => 3,
    }
}

/// A [`Step::Fill`] of `ranges` with `seed` and `stride`.
fn fill(ranges: impl IntoIterator<Item = Range<u64>>, seed: u64, stride: Stride) -> Step {
    Step::Fill {
        ranges: ranges.into_iter().collect(),
        seed,
        stride,
    }
}

/// A [`Step::Verify`] of `ranges` against `seed` with `stride`.
fn verify(ranges: impl IntoIterator<Item = Range<u64>>, seed: u64, stride: Stride) -> Step {
    Step::Verify {
        ranges: ranges.into_iter().collect(),
        seed,
        stride,
    }
}

/// Build a tiny guest of `steps` then [`Step::Done`], and run it on a fresh vCPU `vcpu_id`.
fn run_steps(vm: &Vm, steps: Vec<Step>, vcpu_id: u64) -> TinyRun {
    let image = steps
        .into_iter()
        .fold(TinyGuestBuilder::new(vm.window().layout()), |b, s| {
            b.step(s)
        })
        .step(Step::Done)
        .build()
        .expect("build");
    run_tiny_guest_on(vm, &image, vcpu_id, TIMEOUT).expect("run")
}

/// The values of a run's mismatch reports, one a verify step, in order.
fn mismatches(run: &TinyRun) -> Vec<u64> {
    run.summary
        .handler
        .reports
        .iter()
        .filter(|r| r.tag == TAG_MISMATCHES)
        .map(|r| r.value)
        .collect()
}

/// The host reads the guest's pattern word at `gpa`.
fn assert_host_reads(vm: &Vm, gpa: u64, seed: u64) {
    let mem = vm.window().guest_memory().expect("view");
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(gpa)).ok(),
        Some(pattern(gpa, seed))
    );
}

/// The scenario under `mode`: place three blocks (two in the first 128 MiB chunk, one in the
/// second), use them, remove two, have a guest touch a removed one, re-plug and reuse them,
/// then remove everything; checking the slot count and resident memory at every step.
fn hotplug_scenario(mode: HotplugMemslots) {
    if let Err(why) = kvm_available() {
        eprintln!("SKIP: {why}");
        return;
    }
    let vm = Vm::new(VmConfig {
        layout: LayoutConfig {
            boot_ram: 64 * MIB,
            hotplug_size: 256 * MIB,
        },
        platform: true,
        hotplug_memslots: mode,
    })
    .expect("create VM");
    assert_eq!(vm.hotplug_memslots(), mode);
    let hp = vm.window().layout().hotplug().expect("hotplug region");
    assert_eq!(hp.start, 4 * GIB);
    assert_eq!(vm.memslot_count(), expected_slots(mode, 0));
    assert_eq!(
        vm.window().resident_bytes(hp.start, 256 * MIB).ok(),
        Some(0)
    );

    let a = hp.start;
    let b = hp.start + 2 * MIB;
    let c = hp.start + 128 * MIB;
    for gpa in [a, b, c] {
        vm.place_block(gpa, 2 * MIB).expect("place");
    }
    assert_eq!(vm.memslot_count(), expected_slots(mode, 2));
    assert!(vm.place_block(a, 2 * MIB).is_err(), "double place refused");

    let seed = 0x77;
    let ranges = [a..b + 2 * MIB, c..c + 2 * MIB];
    let run = run_steps(
        &vm,
        vec![
            fill(ranges.clone(), seed, Stride::Page),
            verify(ranges.clone(), seed, Stride::Page),
        ],
        0,
    );
    assert_eq!(run.summary.result.as_ref().ok(), Some(&StopReason::Handler));
    assert_eq!(run.summary.handler.value(TAG_MISMATCHES), Some(0));
    assert_eq!(run.summary.handler.value(TAG_CHECKED), Some(3 * 512));
    assert_host_reads(&vm, c + 4096, seed);
    assert_eq!(vm.window().resident_bytes(c, 2 * MIB).ok(), Some(2 * MIB));

    // Removing the only block of the second chunk frees its memory; lazy deletes its slot,
    // eager keeps it.
    vm.remove_block(c, 2 * MIB).expect("remove c");
    assert_eq!(vm.memslot_count(), expected_slots(mode, 1));
    assert_eq!(vm.window().resident_bytes(c, 2 * MIB).ok(), Some(0));
    assert!(
        vm.remove_block(c, 2 * MIB).is_err(),
        "double remove refused"
    );

    // Removing one of two blocks keeps the slot under both strategies.
    vm.remove_block(b, 2 * MIB).expect("remove b");
    assert_eq!(vm.memslot_count(), expected_slots(mode, 1));
    assert_eq!(vm.window().resident_bytes(b, 2 * MIB).ok(), Some(0));

    // A guest touching a removed block still inside a registered slot (lazy: b, as c's slot is
    // gone; eager: c, whose whole chunk is empty) gets no data: the run ends with a typed
    // guest memory fault (not a panic, not a hang) and nothing is populated.
    let removed = match mode {
        HotplugMemslots::Lazy => b,
        HotplugMemslots::Eager => c,
    };
    let run = run_steps(
        &vm,
        vec![verify(
            std::iter::once(removed..removed + 8),
            seed,
            Stride::Page,
        )],
        1,
    );
    println!(
        "{mode:?}: guest touching a removed block: {:?}, exits {}, kicked {}",
        run.summary.result, run.summary.exits, run.kicked
    );
    assert!(!run.kicked, "the fault ends the run; it does not hang");
    assert_guest_fault(&run.summary.result, removed);
    assert_eq!(run.summary.handler.value(TAG_MISMATCHES), None);
    assert_eq!(vm.window().resident_bytes(removed, 2 * MIB).ok(), Some(0));

    // The VM lives on: the block that stayed still holds its data.
    assert_host_reads(&vm, a, seed);

    // Re-plugging: both removed blocks come back (lazy registers c's slot again), read as
    // zeros, and the guest can use them, while a keeps its data.
    vm.place_block(b, 2 * MIB).expect("re-place b");
    vm.place_block(c, 2 * MIB).expect("re-place c");
    assert_eq!(vm.memslot_count(), expected_slots(mode, 2));
    let seed2 = 0x99;
    let replugged = [b..b + 2 * MIB, c..c + 2 * MIB];
    let run = run_steps(
        &vm,
        vec![
            verify(std::iter::once(a..a + 2 * MIB), seed, Stride::Page),
            verify(replugged.clone(), 0, Stride::Block),
            fill(replugged.clone(), seed2, Stride::Block),
            verify(replugged.clone(), seed2, Stride::Block),
        ],
        2,
    );
    assert_eq!(run.summary.result.as_ref().ok(), Some(&StopReason::Handler));
    // a intact; the re-plugged blocks' words (block stride, seed 0 means "expect gpa") are
    // zero, so both mismatch; then the fill reads back.
    assert_eq!(mismatches(&run), [0, 2, 0]);
    assert_host_reads(&vm, c, seed2);

    // Removing everything frees all memory; lazy deletes both slots, eager keeps them.
    for gpa in [a, b, c] {
        vm.remove_block(gpa, 2 * MIB).expect("remove");
    }
    assert_eq!(vm.memslot_count(), expected_slots(mode, 0));
    assert_eq!(
        vm.window().resident_bytes(hp.start, 256 * MIB).ok(),
        Some(0)
    );
}

/// Lazy memslots: placing blocks registers a chunk's slot, removing a chunk's last block
/// deletes it.
#[test]
fn hotplug_blocks_memslots_and_removal() {
    hotplug_scenario(HotplugMemslots::Lazy);
}

/// Eager memslots: the region's two slots are registered at creation and stay through every
/// place and remove; a removed block is discarded and inaccessible, and a guest touching it
/// after the removal fails with a typed guest memory fault, while the VMM and the other
/// blocks carry on.
#[test]
fn eager_memslots_stay_and_removed_blocks_fault() {
    hotplug_scenario(HotplugMemslots::Eager);
}
