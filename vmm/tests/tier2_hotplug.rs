//! Tier-2 tests of hot-plug blocks under both memslot strategies: lazy (placing blocks
//! registers memslots, removing the last block of a chunk deletes its slot) and eager (the
//! region's slots exist from VM creation; placing and removing never change them). The guest can
//! use placed blocks, removing a block leaves nothing behind, and a guest touching a removed
//! block gets a typed [`VcpuError::GuestMemoryFault`]. Skips when /dev/kvm cannot be opened.

use std::time::Duration;

use tidepool_vmm::kvm::{kvm_available, HotplugMemslots, StopReason, VcpuError, Vm, VmConfig};
use tidepool_vmm::memory::{LayoutConfig, GIB, MIB};
use tidepool_vmm::tiny_guest::{
    pattern, run_tiny_guest_on, Step, Stride, TinyGuestBuilder, TAG_CHECKED, TAG_MISMATCHES,
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

#[test]
fn hotplug_blocks_memslots_and_removal() {
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
        hotplug_memslots: HotplugMemslots::Lazy,
    })
    .expect("create VM");
    assert_eq!(vm.hotplug_memslots(), HotplugMemslots::Lazy);
    let hp = vm.window().layout().hotplug().expect("hotplug region");
    assert_eq!(hp.start, 4 * GIB);
    assert_eq!(vm.memslot_count(), 1);

    // Two blocks in the first 128 MiB chunk, one in the second: two hot-plug slots.
    let a = hp.start;
    let b = hp.start + 2 * MIB;
    let c = hp.start + 128 * MIB;
    for gpa in [a, b, c] {
        vm.place_block(gpa, 2 * MIB).expect("place");
    }
    assert_eq!(vm.memslot_count(), 3);
    assert!(vm.place_block(a, 2 * MIB).is_err(), "double place refused");

    let seed = 0x77;
    let ranges = vec![a..b + 2 * MIB, c..c + 2 * MIB];
    let image = TinyGuestBuilder::new(vm.window().layout())
        .step(Step::Fill {
            ranges: ranges.clone(),
            seed,
            stride: Stride::Page,
        })
        .step(Step::Verify {
            ranges,
            seed,
            stride: Stride::Page,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    let run = run_tiny_guest_on(&vm, &image, 0, TIMEOUT).expect("run");
    assert_eq!(run.summary.result.as_ref().ok(), Some(&StopReason::Handler));
    assert_eq!(run.summary.handler.value(TAG_MISMATCHES), Some(0));
    assert_eq!(run.summary.handler.value(TAG_CHECKED), Some(3 * 512));
    let mem = vm.window().guest_memory().expect("view");
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(c + 4096)).ok(),
        Some(pattern(c + 4096, seed))
    );
    drop(mem);
    assert_eq!(vm.window().resident_bytes(c, 2 * MIB).ok(), Some(2 * MIB));

    // Removing the only block of the second chunk deletes its slot and frees its memory.
    vm.remove_block(c, 2 * MIB).expect("remove c");
    assert_eq!(vm.memslot_count(), 2);
    assert_eq!(vm.window().resident_bytes(c, 2 * MIB).ok(), Some(0));
    assert!(
        vm.remove_block(c, 2 * MIB).is_err(),
        "double remove refused"
    );

    // Removing one of two blocks keeps the slot. A guest touching the removed block, still
    // inside a registered slot, gets no data: KVM_RUN fails with EFAULT, a typed error.
    vm.remove_block(b, 2 * MIB).expect("remove b");
    assert_eq!(vm.memslot_count(), 2);
    assert_eq!(vm.window().resident_bytes(b, 2 * MIB).ok(), Some(0));
    let image = TinyGuestBuilder::new(vm.window().layout())
        .step(Step::Verify {
            ranges: std::iter::once(b..b + 8).collect(),
            seed,
            stride: Stride::Page,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    let run = run_tiny_guest_on(&vm, &image, 1, TIMEOUT).expect("run");
    println!(
        "guest touching a removed block: {:?}, exits {}, kicked {}",
        run.summary.result, run.summary.exits, run.kicked
    );
    assert_guest_fault(&run.summary.result, b);
    assert_eq!(run.summary.handler.value(TAG_MISMATCHES), None);
    assert_eq!(vm.window().resident_bytes(b, 2 * MIB).ok(), Some(0));

    // The block that stayed still holds its data.
    let mem = vm.window().guest_memory().expect("view");
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(a)).ok(),
        Some(pattern(a, seed))
    );
    drop(mem);

    // Re-plugging: both removed blocks come back (c's slot is registered again), read as
    // zeros, and the guest can use them.
    vm.place_block(b, 2 * MIB).expect("re-place b");
    vm.place_block(c, 2 * MIB).expect("re-place c");
    assert_eq!(vm.memslot_count(), 3);
    let seed2 = 0x99;
    let ranges: Vec<_> = [b..b + 2 * MIB, c..c + 2 * MIB].into_iter().collect();
    let image = TinyGuestBuilder::new(vm.window().layout())
        .step(Step::Verify {
            ranges: ranges.clone(),
            seed: 0,
            stride: Stride::Block,
        })
        .step(Step::Fill {
            ranges: ranges.clone(),
            seed: seed2,
            stride: Stride::Block,
        })
        .step(Step::Verify {
            ranges,
            seed: seed2,
            stride: Stride::Block,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    let run = run_tiny_guest_on(&vm, &image, 2, TIMEOUT).expect("run");
    assert_eq!(run.summary.result.as_ref().ok(), Some(&StopReason::Handler));
    // First verify (seed 0 means "expect gpa"): both words are zero, so both mismatch.
    let mismatches: Vec<u64> = run
        .summary
        .handler
        .reports
        .iter()
        .filter(|r| r.tag == TAG_MISMATCHES)
        .map(|r| r.value)
        .collect();
    assert_eq!(mismatches, [2, 0]);
    let mem = vm.window().guest_memory().expect("view");
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(c)).ok(),
        Some(pattern(c, seed2))
    );
}

/// Eager memslots: the region's two slots are registered at creation and stay through every
/// place and remove; a removed block is discarded and inaccessible, and a guest touching it
/// after the removal fails with a typed guest memory fault (not a panic, not a hang), while the
/// VMM and the other blocks carry on.
#[test]
fn eager_memslots_stay_and_removed_blocks_fault() {
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
        hotplug_memslots: HotplugMemslots::Eager,
    })
    .expect("create VM");
    assert_eq!(vm.hotplug_memslots(), HotplugMemslots::Eager);
    let hp = vm.window().layout().hotplug().expect("hotplug region");
    assert_eq!(vm.memslot_count(), 3, "boot slot plus both hot-plug slots");
    assert_eq!(
        vm.window().resident_bytes(hp.start, 256 * MIB).ok(),
        Some(0)
    );

    let a = hp.start;
    let c = hp.start + 128 * MIB;
    vm.place_block(a, 2 * MIB).expect("place a");
    vm.place_block(c, 2 * MIB).expect("place c");
    assert_eq!(vm.memslot_count(), 3);
    let seed = 0x5e;
    let ranges = vec![a..a + 2 * MIB, c..c + 2 * MIB];
    let image = TinyGuestBuilder::new(vm.window().layout())
        .step(Step::Fill {
            ranges: ranges.clone(),
            seed,
            stride: Stride::Page,
        })
        .step(Step::Verify {
            ranges,
            seed,
            stride: Stride::Page,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    let run = run_tiny_guest_on(&vm, &image, 0, TIMEOUT).expect("run");
    assert_eq!(run.summary.result.as_ref().ok(), Some(&StopReason::Handler));
    assert_eq!(run.summary.handler.value(TAG_MISMATCHES), Some(0));
    assert_eq!(vm.window().resident_bytes(c, 2 * MIB).ok(), Some(2 * MIB));

    // The last block of the second chunk leaves: the slot stays, the memory goes.
    vm.remove_block(c, 2 * MIB).expect("remove c");
    assert_eq!(vm.memslot_count(), 3, "eager slots are never deleted");
    assert_eq!(vm.window().resident_bytes(c, 2 * MIB).ok(), Some(0));
    assert!(
        vm.remove_block(c, 2 * MIB).is_err(),
        "double remove refused"
    );

    // A guest that touches the removed block: a typed guest failure, nothing populated.
    let image = TinyGuestBuilder::new(vm.window().layout())
        .step(Step::Verify {
            ranges: std::iter::once(c..c + 8).collect(),
            seed,
            stride: Stride::Page,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    let run = run_tiny_guest_on(&vm, &image, 1, TIMEOUT).expect("run");
    println!(
        "eager: guest touching a removed block: {:?}, exits {}, kicked {}",
        run.summary.result, run.summary.exits, run.kicked
    );
    assert!(!run.kicked, "the fault ends the run; it does not hang");
    assert_guest_fault(&run.summary.result, c);
    assert_eq!(run.summary.handler.value(TAG_MISMATCHES), None);
    assert_eq!(vm.window().resident_bytes(c, 2 * MIB).ok(), Some(0));

    // The VM lives on: the block that stayed keeps its data, and a re-placed block reads zero
    // and is usable, with no slot registered.
    let seed2 = 0x6f;
    vm.place_block(c, 2 * MIB).expect("re-place c");
    assert_eq!(vm.memslot_count(), 3);
    let image = TinyGuestBuilder::new(vm.window().layout())
        .step(Step::Verify {
            ranges: std::iter::once(a..a + 2 * MIB).collect(),
            seed,
            stride: Stride::Page,
        })
        .step(Step::Verify {
            ranges: std::iter::once(c..c + 2 * MIB).collect(),
            seed: 0,
            stride: Stride::Block,
        })
        .step(Step::Fill {
            ranges: std::iter::once(c..c + 2 * MIB).collect(),
            seed: seed2,
            stride: Stride::Block,
        })
        .step(Step::Done)
        .build()
        .expect("build");
    let run = run_tiny_guest_on(&vm, &image, 2, TIMEOUT).expect("run");
    assert_eq!(run.summary.result.as_ref().ok(), Some(&StopReason::Handler));
    let mismatches: Vec<u64> = run
        .summary
        .handler
        .reports
        .iter()
        .filter(|r| r.tag == TAG_MISMATCHES)
        .map(|r| r.value)
        .collect();
    // a intact; c's one word (block stride) is zero, not its gpa.
    assert_eq!(mismatches, [0, 1]);
    let mem = vm.window().guest_memory().expect("view");
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(c)).ok(),
        Some(pattern(c, seed2))
    );
    drop(mem);

    // Removing everything leaves the slots and no memory.
    vm.remove_block(a, 2 * MIB).expect("remove a");
    vm.remove_block(c, 2 * MIB).expect("remove c again");
    assert_eq!(vm.memslot_count(), 3);
    assert_eq!(
        vm.window().resident_bytes(hp.start, 256 * MIB).ok(),
        Some(0)
    );
}
