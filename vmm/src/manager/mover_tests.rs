//! The daemon's compaction with a real pool, real VMs (idle tiny guests) and their windows:
//! a VM's hot-plugged blocks hold a pattern, the pool is fragmented at order 11, the monitor
//! compacts; the pattern is intact (through the window and, for memfd, through the pool file
//! at the new offsets), the old offsets are punched, the VM's records point to the new
//! frames, and deleting the VM gives every frame back. Skips without /dev/kvm.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use guest_mm::frame::{FrameId, NodeId};
use guest_mm::monitor::Thresholds;
use guest_mm::pool::Pool;
use guest_mm::slab::TypedSlab;
use guest_mm::topology::Topology;
use tidepool_api::types::{BackingConfig, BackingKind as ApiKind, CreateVmRequest, HotplugConfig};
use tidepool_api::ApiBackend;
use tidepool_hotplug::MemoryBackend;

use super::*;
use crate::devices::BlockRecord;
use crate::hostpool::{build_pool, FramePool, POOL_BLOCK_BYTES};
use crate::manager::images::idle_guest;
use crate::memory::BackingKind;
use crate::reclaim::{MonitorConfig, MonitorTask};

const MIB: u64 = 1 << 20;
const SEED: u64 = 0x00c0_ffee_d00d_5eed;
const PAGE: u64 = 4096;
/// The order the test fragments and compacts (4 MiB: two pool blocks). The pool spreads boot
/// RAM's UNMOVABLE blocks one per 16 MiB here, so no larger region could ever be emptied.
const ORDER: u8 = 10;

fn setup() -> Option<(Arc<VmManager>, Arc<Pool>)> {
    if let Err(why) = crate::kvm::kvm_available() {
        eprintln!("skipping: {why}");
        return None;
    }
    // 64 MiB: 32 blocks, 8 order-11 regions.
    let pool = Arc::new(build_pool(Topology::single(1 << 30), Some(64 * MIB)).expect("pool"));
    let fp: Arc<dyn FramePool> = Arc::clone(&pool) as Arc<dyn FramePool>;
    let slab = TypedSlab::new("mover-test").expect("slab");
    let m = Arc::new(VmManager::new(fp, slab, 1, Duration::from_secs(20)));
    Some((m, pool))
}

fn create(m: &VmManager, kind: ApiKind) -> String {
    let mut r = CreateVmRequest::with_memory(16);
    r.image = Some(idle_guest(16).expect("image"));
    r.hotplug = Some(HotplugConfig {
        region_mib: 128,
        block_mib: 2,
        memslots: Default::default(),
    });
    r.backing = Some(BackingConfig {
        kind,
        thp: kind == ApiKind::Anonymous,
    });
    m.create_vm(r).expect("create").id
}

fn records(m: &VmManager, id: &str) -> Vec<BlockRecord> {
    m.call(id, |vm| vm.with_memory_backend(|b| b.records()))
        .expect("call")
        .expect("virtio-mem")
}

/// Whether page `p` of a block holds pattern data (every third page stays a hole).
fn written(p: u64) -> bool {
    p % 3 != 2
}

/// Write the pattern into every written page of every block, through the window.
fn fill(m: &VmManager, id: &str, recs: &[BlockRecord]) {
    let gpas: Vec<u64> = recs.iter().map(|r| r.gpa).collect();
    m.call(id, move |vm| {
        let w = vm.vm().expect("vm").window();
        for gpa in gpas {
            for p in (0..POOL_BLOCK_BYTES / PAGE).filter(|p| written(*p)) {
                let at = gpa + p * PAGE;
                let host = w.host_addr(at).expect("address");
                // SAFETY: `host` is an 8-byte aligned address in a placed block of the
                // window, which the VM keeps mapped; its guest never touches hot-plug RAM.
                unsafe { std::ptr::write_volatile(host as *mut u64, at ^ SEED) };
            }
        }
    })
    .expect("call");
}

/// Pattern mismatches read back through the window (holes must read 0).
fn check_window(m: &VmManager, id: &str, recs: &[BlockRecord]) -> u64 {
    let gpas: Vec<u64> = recs.iter().map(|r| r.gpa).collect();
    m.call(id, move |vm| {
        let w = vm.vm().expect("vm").window();
        let mut bad = 0;
        for gpa in gpas {
            for p in 0..POOL_BLOCK_BYTES / PAGE {
                let at = gpa + p * PAGE;
                let host = w.host_addr(at).expect("address");
                // SAFETY: as in `fill`; a read of a placed block.
                let v = unsafe { std::ptr::read_volatile(host as *const u64) };
                let want = if written(p) { at ^ SEED } else { 0 };
                bad += u64::from(v != want);
            }
        }
        bad
    })
    .expect("call")
}

fn block_at(file: &crate::memory::PoolFile, frame: FrameId) -> Vec<u8> {
    let mut buf = vec![0u8; POOL_BLOCK_BYTES as usize];
    let n = file
        .read_at(&mut buf, frame.0 * guest_mm::FRAME_SIZE)
        .expect("pread");
    buf.truncate(n);
    buf.resize(POOL_BLOCK_BYTES as usize, 0);
    buf
}

fn word(buf: &[u8], off: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&buf[off..off + 8]);
    u64::from_le_bytes(w)
}

fn frag(pool: &Pool) -> Option<f64> {
    pool.zone_figures().expect("figures")[0].fragmentation_index[usize::from(ORDER)]
}

/// Plug 24 blocks (all the pool has left after 16 MiB of boot RAM), then unplug all but two
/// blocks of each 8 MiB region, so free blocks are scattered, none next to another.
fn fragment(m: &VmManager, id: &str) -> Vec<BlockRecord> {
    m.call(id, |vm| {
        let hp = vm
            .vm()
            .expect("vm")
            .window()
            .layout()
            .hotplug()
            .expect("region");
        vm.with_memory_backend(|b| {
            for i in 0..24 {
                b.plug(hp.start + i * POOL_BLOCK_BYTES, POOL_BLOCK_BYTES)
                    .expect("plug");
            }
            let mut recs = b.records();
            recs.sort_by_key(|r| r.frame);
            let mut kept: std::collections::BTreeMap<u64, u32> = Default::default();
            for r in recs {
                let n = kept.entry(r.frame.0 >> 11).or_insert(0);
                if *n < 2 {
                    *n += 1;
                } else {
                    b.unplug(r.gpa, POOL_BLOCK_BYTES).expect("unplug");
                }
            }
        })
        .expect("virtio-mem")
    })
    .expect("call");
    records(m, id)
}

fn compaction_moves_blocks(kind: ApiKind) {
    let Some((m, pool)) = setup() else { return };
    let id = create(&m, kind);
    let before = fragment(&m, &id);
    assert!(before.len() >= 8, "{before:?}");
    fill(&m, &id, &before);
    let fi = frag(&pool);
    assert!(fi.is_some_and(|f| f > 0.3), "fragmented: {fi:?}");

    let counters = Arc::new(MoveCounters::default());
    let actions = VmPoolActions::new(Arc::clone(&pool), Arc::downgrade(&m), Arc::clone(&counters));
    let task = MonitorTask::new(
        Arc::new(actions),
        None,
        MonitorConfig {
            // Single free 2 MiB blocks put the order-10 index at 0.5 - 1/free at most.
            thresholds: Thresholds {
                compact_order: ORDER,
                fragmentation_threshold: 0.3,
                ..Thresholds::default()
            },
            interval: Duration::from_secs(1),
        },
    )
    .expect("monitor");
    task.tick().expect("tick");
    let c = task.counters();
    assert_eq!(c.triggers("compact"), 1, "{c:?}");
    assert_eq!(
        c.outcome("compact", "done"),
        1,
        "{c:?} {:?}",
        counters.snapshot()
    );
    assert_eq!(frag(&pool), None, "a free order-{ORDER} block formed");

    let after = records(&m, &id);
    assert_eq!(after.len(), before.len());
    let moved: Vec<(&BlockRecord, &BlockRecord)> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b.frame != a.frame)
        .collect();
    assert!(!moved.is_empty(), "some block moved");
    let (file, outcome) = match kind {
        ApiKind::Anonymous => (None, "moved_repointed"),
        _ => (
            Some(
                m.pool_files()
                    .file(BackingKind::Memfd, NodeId(0))
                    .expect("file"),
            ),
            "moved_copied",
        ),
    };
    assert_eq!(
        counters.get(outcome),
        moved.len() as u64,
        "{:?}",
        counters.snapshot()
    );
    // The first (unpaused) round defers file-backed moves; they moved in the quiesced round,
    // so none of them is a refusal.
    let deferred = counters.get("deferred_to_quiesce");
    match kind {
        ApiKind::Anonymous => assert_eq!(deferred, 0, "{:?}", counters.snapshot()),
        _ => assert!(deferred > 0, "{:?}", counters.snapshot()),
    }
    for refusal in ["refused_needs_quiesce", "refused_quiesce_failed"] {
        assert_eq!(counters.get(refusal), 0, "{:?}", counters.snapshot());
    }
    assert_eq!(
        check_window(&m, &id, &after),
        0,
        "pattern intact in the window"
    );
    let now: BTreeSet<FrameId> = after.iter().map(|r| r.frame).collect();
    if let Some(file) = file {
        // The data sits at the new offsets; the old ones hold nothing.
        for r in &after {
            let buf = block_at(&file, r.frame);
            for p in 0..POOL_BLOCK_BYTES / PAGE {
                let want = if written(p) {
                    (r.gpa + p * PAGE) ^ SEED
                } else {
                    0
                };
                assert_eq!(
                    word(&buf, (p * PAGE) as usize),
                    want,
                    "block {:#x} page {p}",
                    r.gpa
                );
            }
        }
        for (b, _) in &moved {
            if !now.contains(&b.frame) {
                assert!(
                    block_at(&file, b.frame).iter().all(|x| *x == 0),
                    "old offset punched"
                );
            }
        }
        let data_pages = after.len() as u64 * (0..512).filter(|p| written(*p)).count() as u64;
        let allocated = file.allocated_bytes().expect("fstat");
        assert!(allocated >= data_pages * PAGE, "{allocated}");
        assert!(
            allocated <= data_pages * PAGE + 16 * MIB,
            "holes stayed holes and old offsets were punched: {allocated}"
        );
    }
    // Every record's frame is a live pool allocation, each once.
    assert_eq!(now.len(), after.len());
    pool.with_zone(NodeId(0), |z| {
        for f in &now {
            assert!(z
                .allocation_at(*f)
                .is_some_and(|(h, o, _)| h == *f && o == 9));
        }
    })
    .expect("zone");

    m.delete(&id).expect("delete");
    assert!(
        pool.figures().expect("figures").is_whole(),
        "every frame back"
    );
    if kind == ApiKind::Memfd {
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
}

#[test]
fn compaction_repoints_anonymous_blocks() {
    compaction_moves_blocks(ApiKind::Anonymous);
}

#[test]
fn compaction_copies_memfd_blocks_under_quiesce() {
    compaction_moves_blocks(ApiKind::Memfd);
}

#[test]
fn rebalancing_moves_blocks_to_their_preferred_node() {
    if let Err(why) = crate::kvm::kvm_available() {
        eprintln!("skipping: {why}");
        return;
    }
    // Two pool nodes on (possibly) one host node: the pool's nodes are accounting, the
    // physical step is reported as a no-op on a one-node host.
    let pool = Arc::new(
        build_pool(
            Topology::uniform(2, 1 << 30, 10, 20).expect("topo"),
            Some(32 * MIB),
        )
        .expect("pool"),
    );
    let fp: Arc<dyn FramePool> = Arc::clone(&pool) as Arc<dyn FramePool>;
    let m = Arc::new(VmManager::new(
        fp,
        TypedSlab::new("mover-rebalance").expect("slab"),
        2,
        Duration::from_secs(20),
    ));
    // Node 1 is full (a filler holds it), so the VM, preferring node 1, gets node 0.
    let filler: Vec<FrameId> = (0..16)
        .map(|_| {
            pool.alloc(
                9,
                guest_mm::frame::MigrateType::Movable,
                &guest_mm::policy::NumaPolicy::Bind(vec![NodeId(1)]),
                NodeId(1),
            )
            .expect("filler")
            .0
        })
        .collect();
    let mut r = CreateVmRequest::with_memory(16);
    r.image = Some(idle_guest(16).expect("image"));
    r.backing = Some(BackingConfig {
        kind: ApiKind::Memfd,
        thp: false,
    });
    r.numa = Some(tidepool_api::types::NumaConfig {
        policy: tidepool_api::types::NumaPolicy::Preferred,
        nodes: vec![1],
    });
    let id = m.create_vm(r).expect("create").id;
    let boot: Vec<(FrameId, NodeId)> = m.call(&id, |vm| vm.boot_blocks()).expect("call");
    assert!(boot.iter().all(|(_, n)| *n == NodeId(0)));
    let fill = |gpas: Vec<u64>, check: bool| -> u64 {
        m.call(&id, move |vm| {
            let w = vm.vm().expect("vm").window();
            let mut bad = 0;
            for gpa in gpas {
                // The last page of each block (the idle guest's image sits low).
                let at = gpa + POOL_BLOCK_BYTES - 8;
                let host = w.host_addr(at).expect("address") as *mut u64;
                if check {
                    // SAFETY: an 8-byte aligned address in placed boot RAM, which the VM keeps
                    // mapped; the idle guest never touches the end of a block.
                    let v = unsafe { std::ptr::read_volatile(host) };
                    bad += u64::from(v != at ^ SEED);
                } else {
                    // SAFETY: as above.
                    unsafe { std::ptr::write_volatile(host, at ^ SEED) };
                }
            }
            bad
        })
        .expect("call")
    };
    let gpas: Vec<u64> = (0..8).map(|i| i * POOL_BLOCK_BYTES).collect();
    fill(gpas.clone(), false);
    for f in filler {
        pool.free(f, 9).expect("free");
    }
    let counters = Arc::new(MoveCounters::default());
    let actions = VmPoolActions::new(Arc::clone(&pool), Arc::downgrade(&m), Arc::clone(&counters));
    let out = crate::reclaim::PoolActions::rebalance(&actions).expect("rebalance");
    assert!(out.succeeded, "{out:?} {:?}", counters.snapshot());
    assert_eq!(out.frames_moved, 8 * 512);
    let boot2: Vec<(FrameId, NodeId)> = m.call(&id, |vm| vm.boot_blocks()).expect("call");
    assert!(boot2.iter().all(|(_, n)| *n == NodeId(1)), "{boot2:?}");
    assert_eq!(counters.get("moved_copied"), 8);
    if crate::memory::numa::HostNuma::get().is_multi_node() {
        assert_eq!(counters.get("cross_node_pages_moved"), 8);
    } else {
        assert_eq!(counters.get("cross_node_single_host_node"), 8);
    }
    assert_eq!(fill(gpas, true), 0, "data intact after the cross-node copy");
    m.delete(&id).expect("delete");
    assert!(pool.figures().expect("figures").is_whole());
    for n in [NodeId(0), NodeId(1)] {
        let file = m.pool_files().file(BackingKind::Memfd, n).expect("file");
        assert_eq!(file.allocated_bytes().expect("fstat"), 0);
    }
}

/// What compaction can and cannot help: a virtio-mem plug of a 4 MiB block into a pool with
/// no free 4 MiB run (only scattered 2 MiB singles) succeeds without any compaction, because
/// the plug takes one 2 MiB pool block per 2 MiB (docs/reclaim.md, "Which order to compact").
#[test]
fn plug_of_a_4_mib_block_needs_no_contiguous_run() {
    let Some((m, pool)) = setup() else { return };
    let id = create(&m, ApiKind::Anonymous);
    let before = fragment(&m, &id);
    assert!(frag(&pool).is_some(), "no free order-{ORDER} block");
    let free_before = pool.figures().expect("figures").free_bytes();
    assert!(
        free_before >= 2 * POOL_BLOCK_BYTES,
        "two free blocks left: {free_before}"
    );
    let gpa = m
        .call(&id, |vm| {
            vm.vm()
                .expect("vm")
                .window()
                .layout()
                .hotplug()
                .expect("region")
                .start
        })
        .expect("call")
        + 48 * MIB;
    m.call(&id, move |vm| {
        vm.with_memory_backend(|b| b.plug(gpa, 4 * MIB))
            .expect("virtio-mem")
    })
    .expect("call")
    .expect("4 MiB plug into a fragmented pool");
    let after = records(&m, &id);
    assert_eq!(after.len(), before.len() + 2);
    let f = |g: u64| after.iter().find(|r| r.gpa == g).expect("record").frame;
    let (a, b) = (f(gpa), f(gpa + POOL_BLOCK_BYTES));
    // Two order-9 allocations, not one order-10 block: no free order-10 run existed.
    let pair = |x: FrameId, y: FrameId| x.is_aligned(ORDER) && y.0 == x.0 + 512;
    assert!(!pair(a, b) && !pair(b, a), "{a} {b}");
    m.delete(&id).expect("delete");
    assert!(pool.figures().expect("figures").is_whole());
}
