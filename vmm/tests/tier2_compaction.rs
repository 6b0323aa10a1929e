//! Compaction under a running guest: a tiny guest (memfd backing, so its data really lives at
//! pool-file offsets) fills 24 MiB of hot-plugged RAM and then verifies it again and again,
//! while the daemon's pool monitor compacts the pool and moves the guest's blocks (copy to the
//! new offset, remap, punch the old one, with the VM quiesced). Every verification must find
//! its data; the VM's records end up on other frames; deleting the VMs gives every frame back
//! and leaves the pool file empty. Skips without /dev/kvm.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guest_mm::frame::{FrameId, MigrateType, NodeId};
use guest_mm::monitor::Thresholds;
use guest_mm::policy::NumaPolicy;
use guest_mm::pool::Pool;
use guest_mm::slab::TypedSlab;
use guest_mm::topology::Topology;
use tidepool_api::types::{
    BackingConfig, BackingKind as ApiKind, CreateVmRequest, HotplugConfig, ImagePrivilege, RawImage,
};
use tidepool_api::ApiBackend;
use tidepool_hotplug::MemoryBackend;
use tidepool_vmm::devices::BlockRecord;
use tidepool_vmm::hostpool::{build_pool, FramePool, POOL_BLOCK_BYTES};
use tidepool_vmm::manager::{VmManager, VmPoolActions};
use tidepool_vmm::memory::{BackingKind, Layout, LayoutConfig};
use tidepool_vmm::reclaim::{MonitorConfig, MonitorTask, MoveCounters};
use tidepool_vmm::tiny_guest::program::{Stride, TAG_DONE, TAG_MISMATCHES, TAG_USER};
use tidepool_vmm::tiny_guest::{Privilege, Step, TinyGuestBuilder};

const MIB: u64 = 1 << 20;
const BOOT_MIB: u64 = 16;
const REGION_MIB: u64 = 128;
/// Hot-plugged blocks the guest fills and verifies.
const DATA_BLOCKS: u64 = 12;
/// The guest spins until the host writes a non-zero word here (after plugging its blocks).
const FLAG: u64 = 8 * MIB;
const FILLED: u64 = 0xf111;
const SEED: u64 = 0x7e57_c0de;
/// Verification passes after the fill, a wait of up to 20 ms between two.
const PASSES: usize = 150;

fn layout() -> Layout {
    Layout::new(LayoutConfig {
        boot_ram: BOOT_MIB * MIB,
        hotplug_size: REGION_MIB * MIB,
    })
    .expect("layout")
}

fn data() -> std::ops::Range<u64> {
    let hp = layout().hotplug().expect("region");
    hp.start..hp.start + DATA_BLOCKS * POOL_BLOCK_BYTES
}

/// Spin on FLAG, fill DATA, report FILLED, then verify DATA `PASSES` times, then done.
fn image() -> RawImage {
    let l = layout();
    // mov rax, FLAG; 1: cmp qword [rax], 0; je 1b
    let mut spin = vec![0x48, 0xb8];
    spin.extend_from_slice(&FLAG.to_le_bytes());
    spin.extend_from_slice(&[0x48, 0x83, 0x38, 0x00, 0x74, 0xfa]);
    let mut b = TinyGuestBuilder::new(&l)
        .privilege(Privilege::User)
        .step(Step::Raw(spin))
        .step(Step::Fill {
            ranges: vec![data()],
            seed: SEED,
            stride: Stride::Page,
        })
        .step(Step::Report {
            tag: TAG_USER,
            value: FILLED,
        });
    for _ in 0..PASSES {
        b = b
            .step(Step::Verify {
                ranges: vec![data()],
                seed: SEED,
                stride: Stride::Page,
            })
            .step(Step::Wait { us: 20_000 });
    }
    let img = b.step(Step::Done).build().expect("image");
    RawImage {
        path: None,
        inline: Some(img.bytes.clone()),
        load_addr: img.load_addr,
        entry: img.entry(),
        privilege: ImagePrivilege::User,
    }
}

fn hot(kind: ApiKind) -> (Option<HotplugConfig>, Option<BackingConfig>) {
    (
        Some(HotplugConfig {
            region_mib: REGION_MIB,
            block_mib: 2,
            memslots: Default::default(),
        }),
        Some(BackingConfig {
            kind,
            thp: kind == ApiKind::Anonymous,
        }),
    )
}

fn records(m: &VmManager, id: &str) -> Vec<BlockRecord> {
    m.call(id, |vm| vm.with_memory_backend(|b| b.records()))
        .expect("call")
        .expect("virtio-mem")
}

fn reports(m: &VmManager, id: &str, tag: u64) -> Vec<u64> {
    m.call(id, move |vm| {
        vm.reports()
            .iter()
            .filter(|r| r.tag == tag)
            .map(|r| r.value)
            .collect()
    })
    .expect("call")
}

fn wait(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Plug `gpa` in VM `id`; false when the pool is out of blocks.
fn plug(m: &VmManager, id: &str, gpa: u64) -> bool {
    m.call(id, move |vm| {
        vm.with_memory_backend(|b| b.plug(gpa, POOL_BLOCK_BYTES).is_ok())
    })
    .expect("call")
    .expect("virtio-mem")
}

/// Another user of the pool (UNMOVABLE blocks, which compaction never moves) takes every free
/// block, then gives back each whose buddy (the other half of its 4 MiB region) is one of the
/// guest's blocks: those regions then hold one guest block and one free block, so no 4 MiB
/// block is free and only the guest's blocks can be moved to make one.
fn refragment(pool: &Pool, filler: &mut Vec<FrameId>, guest: &BTreeSet<FrameId>) {
    while let Ok((f, _)) = pool.alloc(9, MigrateType::Unmovable, &NumaPolicy::Local, NodeId(0)) {
        filler.push(f);
    }
    filler.retain(|f| {
        let free = guest.contains(&FrameId(f.0 ^ 512));
        if free {
            pool.free(*f, 9).expect("free");
        }
        !free
    });
}

fn guest_frames(m: &VmManager, id: &str) -> BTreeSet<FrameId> {
    records(m, id).iter().map(|r| r.frame).collect()
}

fn frag10(pool: &Pool) -> Option<f64> {
    pool.zone_figures().expect("figures")[0].fragmentation_index[10]
}

#[test]
fn compaction_moves_a_running_guests_memfd_blocks_and_its_data_stays() {
    if let Err(why) = tidepool_vmm::kvm::kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    // 64 MiB: 32 blocks, 8 of them the guest's boot RAM.
    let pool = Arc::new(build_pool(Topology::single(1 << 30), Some(64 * MIB)).expect("pool"));
    let fp: Arc<dyn FramePool> = Arc::clone(&pool) as Arc<dyn FramePool>;
    let m = Arc::new(VmManager::new(
        fp,
        TypedSlab::new("tier2-compaction").expect("slab"),
        1,
        Duration::from_secs(20),
    ));
    let mut req = CreateVmRequest::with_memory(BOOT_MIB);
    req.image = Some(image());
    (req.hotplug, req.backing) = hot(ApiKind::Memfd);
    let guest = m.create_vm(req).expect("guest").id;

    // The guest's blocks alternate with the other user's, so they end up scattered.
    let mut filler = Vec::new();
    for g in data().step_by(POOL_BLOCK_BYTES as usize) {
        assert!(plug(&m, &guest, g), "guest plug");
        let (f, _) = pool
            .alloc(9, MigrateType::Unmovable, &NumaPolicy::Local, NodeId(0))
            .expect("filler");
        filler.push(f);
    }
    refragment(&pool, &mut filler, &guest_frames(&m, &guest));
    let before = records(&m, &guest);
    assert_eq!(before.len() as u64, DATA_BLOCKS);
    m.call(&guest, |vm| {
        let w = vm.vm().expect("vm").window();
        let host = w.host_addr(FLAG).expect("flag address");
        // SAFETY: the host address of a placed, 8-byte aligned guest word inside the window,
        // which the VM keeps mapped; the guest only reads it.
        unsafe { std::ptr::write_volatile(host as *mut u64, 1) };
    })
    .expect("call");
    wait("the guest's fill", 60, || {
        reports(&m, &guest, TAG_USER).contains(&FILLED)
    });

    let counters = Arc::new(MoveCounters::default());
    let actions = VmPoolActions::new(Arc::clone(&pool), Arc::downgrade(&m), Arc::clone(&counters));
    let task = MonitorTask::new(
        Arc::new(actions),
        None,
        MonitorConfig {
            thresholds: Thresholds {
                compact_order: 10,
                fragmentation_threshold: 0.3,
                ..Thresholds::default()
            },
            interval: Duration::from_secs(1),
        },
    )
    .expect("monitor");
    let mut rounds = 0;
    for _ in 0..4 {
        if !frag10(&pool).is_some_and(|f| f > 0.3) {
            break;
        }
        task.tick().expect("tick");
        rounds += 1;
        refragment(&pool, &mut filler, &guest_frames(&m, &guest));
    }
    let verified_at_moves = reports(&m, &guest, TAG_MISMATCHES).len();
    let c = task.counters();
    eprintln!(
        "rounds {rounds}, monitor {c:?}, moves {:?}, verifications so far {verified_at_moves}",
        counters.snapshot()
    );
    assert!(c.outcome("compact", "done") >= 1, "{c:?}");
    let copied = counters.get("moved_copied");
    assert!(copied >= 1, "{:?}", counters.snapshot());
    assert!(
        verified_at_moves < PASSES,
        "the guest was still verifying when its blocks moved"
    );

    wait("the guest's last verification", 120, || {
        reports(&m, &guest, TAG_DONE).contains(&0)
    });
    let mismatches = reports(&m, &guest, TAG_MISMATCHES);
    assert_eq!(mismatches.len(), PASSES, "every pass reported");
    assert!(
        mismatches.iter().all(|v| *v == 0),
        "data lost: {mismatches:?}"
    );
    let after = records(&m, &guest);
    let moved = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.gpa == a.gpa && b.frame != a.frame)
        .count() as u64;
    assert!(moved >= 1, "the guest's records point to new frames");

    m.delete(&guest).expect("delete guest");
    for f in filler {
        pool.free(f, 9).expect("free");
    }
    assert!(
        pool.figures().expect("figures").is_whole(),
        "every frame back"
    );
    let file = m
        .pool_files()
        .file(BackingKind::Memfd, NodeId(0))
        .expect("file");
    assert_eq!(
        file.allocated_bytes().expect("fstat"),
        0,
        "the pool file is empty"
    );
}
