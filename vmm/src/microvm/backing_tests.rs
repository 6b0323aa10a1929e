//! Tier-2 tests of the memfd backing with the tiny guest: two VMs over one shared pool file.
//! VM A's guest fills a plugged block; the block is unplugged and its pool offset goes to VM B,
//! whose host-side view reads zeros and whose guest then fills and verifies it.

use std::sync::Arc;
use std::time::Duration;

use tidepool_hotplug::MemoryBackend;
use vm_memory::{Bytes, GuestAddress};

use super::test_rig::{
    base_config, fill_verify_done, kvm_or_skip, last_report, pool, slab, start_and_wait, with_steps,
};
use super::*;
use crate::hostpool::FramePool;
use crate::memory::{BackingKind, BackingSpec, PoolFiles, MIB};
use crate::tiny_guest::program::{TAG_CHECKED, TAG_MISMATCHES};
use crate::tiny_guest::Step;

fn memfd_config(id: &str, files: &Arc<PoolFiles>, steps: Vec<Step>) -> MicrovmConfig {
    let c = MicrovmConfig {
        backing: BackingSpec {
            kind: BackingKind::Memfd,
            thp: false,
        },
        pool_files: Some(Arc::clone(files)),
        ..base_config(id, 16 * MIB)
    };
    with_steps(c, steps)
}

fn run_to_end(vm: &mut Microvm) -> (Option<u64>, Option<u64>) {
    assert_eq!(
        start_and_wait(vm, Duration::from_secs(60)),
        VmLifecycle::Stopped(StopCause::GuestFinished)
    );
    (
        last_report(vm, TAG_MISMATCHES),
        last_report(vm, TAG_CHECKED),
    )
}

#[test]
fn memfd_backed_guests_share_the_pool_file_but_never_a_page() {
    if !kvm_or_skip("memfd_backed_guests_share_the_pool_file_but_never_a_page") {
        return;
    }
    let pool = pool(64);
    let files = PoolFiles::new();
    let slab = slab("backing-test");
    let probe = memfd_config("probe", &files, vec![]);
    let hp = probe.layout().expect("layout").hotplug().expect("region");
    let range = hp.start..hp.start + 2 * MIB;
    // A VM `id` whose guest fills and verifies the block with `seed`.
    let new_vm = |id: &str, seed| {
        let config = memfd_config(id, &files, fill_verify_done(range.clone(), seed));
        Microvm::new(config, pool.clone(), slab.clone(), 1).expect("microvm")
    };
    // Plugs the block into `vm`: its pool frame.
    let plug = |vm: &mut Microvm| {
        vm.with_memory_backend(|b| b.plug(range.start, 2 * MIB))
            .expect("device")
            .expect("plug");
        vm.with_memory_backend(|b| b.record(range.start))
            .expect("device")
            .expect("record")
            .frame
    };

    // VM A: its guest fills the plugged block (through KVM, on the shared file's pages).
    let mut a = new_vm("a", 0xa);
    let frame = plug(&mut a);
    assert_eq!(run_to_end(&mut a), (Some(0), Some(512)));
    let wa = Arc::clone(a.vm().expect("vm").window());
    assert_eq!(wa.resident_bytes(range.start, 2 * MIB).ok(), Some(2 * MIB));
    let file = files
        .file(BackingKind::Memfd, guest_mm::frame::NodeId(0))
        .expect("file");
    let before = file.allocated_bytes().expect("fstat");
    assert!(before >= 2 * MIB);

    // VM B (its boot RAM taken now, so the next free block is the one A gives back).
    let mut b = new_vm("b", 0xb);
    let before = file.allocated_bytes().expect("fstat");

    // The block leaves A: out of KVM and the window, hole punched, then back to the pool.
    a.with_memory_backend(|b| b.unplug(range.start, 2 * MIB))
        .expect("device")
        .expect("unplug a");
    assert_eq!(file.allocated_bytes().ok(), Some(before - 2 * MIB));

    // VM B gets the same pool block (the pool hands back the block just freed).
    assert_eq!(plug(&mut b), frame, "B got the pool offset A gave back");
    let wb = Arc::clone(b.vm().expect("vm").window());
    assert_eq!(wb.resident_bytes(range.start, 2 * MIB).ok(), Some(0));
    let view = wb.guest_memory().expect("view");
    let mut buf = vec![0xffu8; 2 * MIB as usize];
    view.read_slice(&mut buf, GuestAddress(range.start))
        .expect("read");
    assert!(buf.iter().all(|x| *x == 0), "B reads zeros, nothing of A");
    drop(view);
    assert_eq!(run_to_end(&mut b), (Some(0), Some(512)));
    assert_eq!(wb.resident_bytes(range.start, 2 * MIB).ok(), Some(2 * MIB));
    assert!(b.memory().expect("figures").resident >= 2 * MIB);

    // Deleting both VMs returns every block and leaves nothing in the pool file.
    drop(a);
    drop(b);
    drop(wa);
    drop(wb);
    assert!(pool.figures().expect("figures").is_whole());
    assert_eq!(file.allocated_bytes().ok(), Some(0));
}
