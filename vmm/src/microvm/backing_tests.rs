//! Tier-2 tests of the memfd backing with the tiny guest: two VMs over one shared pool file.
//! VM A's guest fills a plugged block; the block is unplugged and its pool offset goes to VM B,
//! whose host-side view reads zeros and whose guest then fills and verifies it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mm::policy::NumaPolicy;
use guest_mm::slab::TypedSlab;
use tidepool_hotplug::MemoryBackend;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::IrqMode;
use crate::hostpool::{BlockPool, FramePool};
use crate::memory::{BackingKind, BackingSpec, PoolFiles, MIB};
use crate::tiny_guest::program::{TAG_CHECKED, TAG_MISMATCHES};
use crate::tiny_guest::{Step, Stride, TinyGuestBuilder};

fn memfd_config(id: &str, files: &Arc<PoolFiles>, steps: Vec<Step>) -> MicrovmConfig {
    let mut c = MicrovmConfig {
        id: id.into(),
        vcpus: 1,
        boot_ram: 16 * MIB,
        hotplug: Some(HotplugSpec {
            region_size: 128 * MIB,
            block_size: 2 * MIB,
            memslots: Default::default(),
        }),
        balloon: None,
        policy: NumaPolicy::Local,
        irq: IrqMode::Polled,
        image: BootImage::Raw {
            bytes: vec![0],
            load_addr: 0x1000,
            entry: 0x1000,
            privilege: crate::tiny_guest::Privilege::Kernel,
        },
        backing: BackingSpec {
            kind: BackingKind::Memfd,
            thp: false,
        },
        pool_files: Some(Arc::clone(files)),
    };
    let layout = c.layout().expect("layout");
    let b = steps
        .into_iter()
        .fold(TinyGuestBuilder::new(&layout), |b, s| b.step(s));
    c.image = BootImage::Tiny(b.build().expect("image"));
    c
}

fn run_to_end(vm: &mut Microvm) -> (Option<u64>, Option<u64>) {
    vm.apply(LifecycleOp::Start).expect("start");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !vm.state().is_stopped() {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        vm.state().clone(),
        VmLifecycle::Stopped(StopCause::GuestFinished)
    );
    let reports = vm.reports();
    let value = |tag| reports.iter().rev().find(|r| r.tag == tag).map(|r| r.value);
    (value(TAG_MISMATCHES), value(TAG_CHECKED))
}

#[test]
fn memfd_backed_guests_share_the_pool_file_but_never_a_page() {
    if let Err(why) = crate::kvm::kvm_available() {
        eprintln!("skipping memfd_backed_guests_share_the_pool_file_but_never_a_page: {why}");
        return;
    }
    let pool = Arc::new(BlockPool::new(64 * MIB));
    let files = PoolFiles::new();
    let slab = TypedSlab::new("backing-test").expect("slab");
    let probe = memfd_config("probe", &files, vec![]);
    let hp = probe.layout().expect("layout").hotplug().expect("region");
    let range = hp.start..hp.start + 2 * MIB;
    let fill = |seed| {
        vec![
            Step::Fill {
                ranges: vec![range.clone()],
                seed,
                stride: Stride::Page,
            },
            Step::Verify {
                ranges: vec![range.clone()],
                seed,
                stride: Stride::Page,
            },
            Step::Done,
        ]
    };

    // VM A: its guest fills the plugged block (through KVM, on the shared file's pages).
    let mut a = Microvm::new(
        memfd_config("a", &files, fill(0xa)),
        pool.clone(),
        slab.clone(),
        1,
    )
    .expect("vm a");
    a.with_memory_backend(|b| b.plug(range.start, 2 * MIB))
        .expect("device")
        .expect("plug a");
    let frame = a
        .with_memory_backend(|b| b.record(range.start))
        .expect("device")
        .expect("record")
        .frame;
    assert_eq!(run_to_end(&mut a), (Some(0), Some(512)));
    let wa = Arc::clone(a.vm().expect("vm").window());
    assert_eq!(wa.resident_bytes(range.start, 2 * MIB).ok(), Some(2 * MIB));
    let file = files
        .file(BackingKind::Memfd, guest_mm::frame::NodeId(0))
        .expect("file");
    let before = file.allocated_bytes().expect("fstat");
    assert!(before >= 2 * MIB);

    // VM B (its boot RAM taken now, so the next free block is the one A gives back).
    let mut b = Microvm::new(
        memfd_config("b", &files, fill(0xb)),
        pool.clone(),
        slab.clone(),
        1,
    )
    .expect("vm b");
    let before = file.allocated_bytes().expect("fstat");

    // The block leaves A: out of KVM and the window, hole punched, then back to the pool.
    a.with_memory_backend(|b| b.unplug(range.start, 2 * MIB))
        .expect("device")
        .expect("unplug a");
    assert_eq!(file.allocated_bytes().ok(), Some(before - 2 * MIB));

    // VM B gets the same pool block (the pool hands back the block just freed).
    b.with_memory_backend(|be| be.plug(range.start, 2 * MIB))
        .expect("device")
        .expect("plug b");
    let frame_b = b
        .with_memory_backend(|be| be.record(range.start))
        .expect("device")
        .expect("record")
        .frame;
    assert_eq!(frame_b, frame, "B got the pool offset A gave back");
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
