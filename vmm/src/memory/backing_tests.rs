//! Tests of the window backings: each kind places, discards and removes; residency through
//! `mincore`; and the isolation rule on a shared pool file: a pool offset that leaves one
//! window reads zeros in the next.

use std::sync::Arc;

use guest_mm::frame::{FrameId, NodeId};
use vm_memory::{Bytes, GuestAddress};

use super::backing::{BackingKind, BackingSpec, PoolBlock, PoolFiles};
use super::layout::{Layout, LayoutConfig, BLOCK_SIZE, MIB};
use super::tuning;
use super::{GuestWindow, MemoryError};

const PAGE: u64 = 4096;

fn layout(boot: u64, hotplug: u64) -> Layout {
    Layout::new(LayoutConfig {
        boot_ram: boot,
        hotplug_size: hotplug,
    })
    .expect("layout")
}

/// Pool block `i` (2 MiB blocks numbered from 0) on node 0.
fn pb(i: u64) -> PoolBlock {
    PoolBlock {
        frame: FrameId(i * (BLOCK_SIZE / guest_mm::FRAME_SIZE)),
        node: NodeId(0),
    }
}

fn file_window(files: &Arc<PoolFiles>, spec: BackingSpec, boot: &[u64]) -> Arc<GuestWindow> {
    let backing = files.backing(spec).expect("backing");
    let blocks: Vec<PoolBlock> = boot.iter().map(|i| pb(*i)).collect();
    Arc::new(
        GuestWindow::with_backing(
            layout(boot.len() as u64 * BLOCK_SIZE, 128 * MIB),
            backing,
            &blocks,
        )
        .expect("window"),
    )
}

const MEMFD: BackingSpec = BackingSpec {
    kind: BackingKind::Memfd,
    thp: false,
};

#[test]
fn memfd_window_places_discards_and_removes() {
    let files = PoolFiles::new();
    let w = file_window(&files, MEMFD, &[3, 4]);
    let file = files.file(BackingKind::Memfd, NodeId(0)).expect("file");
    assert_eq!(w.placed_bytes(), 4 * MIB);
    assert_eq!(w.resident_bytes(0, 4 * MIB).ok(), Some(0));
    // Boot RAM without pool blocks is refused for a file backing.
    let no_blocks = GuestWindow::with_backing(
        layout(4 * MIB, 0),
        files.backing(MEMFD).expect("backing"),
        &[],
    );
    assert!(matches!(no_blocks, Err(MemoryError::PoolBlocks { .. })));

    let mem = w.guest_memory().expect("view");
    for p in 0..16 {
        mem.write_obj(0x1000 + p, GuestAddress(2 * MIB + p * PAGE))
            .expect("write");
    }
    // mincore on the shared mapping sees the file's page cache at the mapped offsets.
    assert_eq!(w.resident_bytes(2 * MIB, 2 * MIB).ok(), Some(16 * PAGE));
    assert_eq!(file.allocated_bytes().ok(), Some(16 * PAGE));
    assert_eq!(w.pool_block(2 * MIB + 5), Some(pb(4)));

    // Discard (balloon): punch-hole, the range stays placed and reads zeros.
    w.discard(2 * MIB, 4 * PAGE).expect("discard");
    assert_eq!(w.resident_bytes(2 * MIB, 2 * MIB).ok(), Some(12 * PAGE));
    assert_eq!(file.allocated_bytes().ok(), Some(12 * PAGE));
    assert_eq!(mem.read_obj::<u64>(GuestAddress(2 * MIB)).ok(), Some(0));
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(2 * MIB + 4 * PAGE)).ok(),
        Some(0x1004)
    );
    assert!(matches!(
        w.discard(2 * MIB, 100),
        Err(MemoryError::Unaligned { .. })
    ));

    // A plugged hot-plug block needs its pool block; then it is file-backed too.
    let hp = w.layout().hotplug().expect("region").start;
    assert!(matches!(
        w.place_block(hp, 2 * MIB),
        Err(MemoryError::PoolBlocks { .. })
    ));
    w.place(hp, 2 * MIB, &[pb(9)]).expect("plug");
    let mem = w.guest_memory().expect("view");
    mem.write_obj(0xfeed_u64, GuestAddress(hp)).expect("write");
    assert_eq!(w.resident_bytes(hp, 2 * MIB).ok(), Some(PAGE));
    drop(mem);

    // Remove: no longer mapped, nothing resident, the file's pages are gone.
    w.remove_block(hp, 2 * MIB).expect("unplug");
    assert!(!w.is_placed(hp));
    assert_eq!(w.resident_bytes(hp, 2 * MIB).ok(), Some(0));
    w.remove_block(0, 4 * MIB).expect("remove boot");
    assert_eq!(file.allocated_bytes().ok(), Some(0));
    assert!(
        w.discard(0, PAGE).is_err(),
        "a removed range cannot be discarded"
    );
}

#[test]
fn a_pool_offset_that_leaves_one_window_reads_zeros_in_the_next() {
    // Two VMs' windows over one shared pool file. VM A writes into pool block 7, which then
    // leaves A (unplug). VM B gets the same block (same file offset) and must read zeros, and
    // while A held it, B could not reach it (it maps only its own offsets).
    let files = PoolFiles::new();
    let a = file_window(&files, MEMFD, &[0]);
    let b = file_window(&files, MEMFD, &[1]);
    let (ra, rb) = (a.host_range(), b.host_range());
    assert!(ra.end <= rb.start || rb.end <= ra.start);
    let hp_a = a.layout().hotplug().expect("a").start;
    let hp_b = b.layout().hotplug().expect("b").start;
    let file = files.file(BackingKind::Memfd, NodeId(0)).expect("file");

    a.place(hp_a, 2 * MIB, &[pb(7)]).expect("A plugs block 7");
    let ma = a.guest_memory().expect("A view");
    for p in 0..512u64 {
        ma.write_obj(0xa5a5_0000_0000_0000 | p, GuestAddress(hp_a + p * PAGE))
            .expect("A writes");
    }
    assert_eq!(file.allocated_bytes().ok(), Some(2 * MIB));
    drop(ma);
    a.remove_block(hp_a, 2 * MIB).expect("A unplugs");
    assert_eq!(file.allocated_bytes().ok(), Some(0), "the hole is punched");

    b.place(hp_b, 2 * MIB, &[pb(7)]).expect("B plugs block 7");
    assert_eq!(b.resident_bytes(hp_b, 2 * MIB).ok(), Some(0));
    let mb = b.guest_memory().expect("B view");
    let mut buf = vec![0xffu8; 2 * MIB as usize];
    mb.read_slice(&mut buf, GuestAddress(hp_b))
        .expect("B reads");
    assert!(buf.iter().all(|x| *x == 0), "B sees nothing of A's data");
    // Unlike private anonymous memory (the shared zero page), a read fault on a shared memfd
    // hole allocates a page: the read made the whole block resident.
    assert_eq!(b.resident_bytes(hp_b, 2 * MIB).ok(), Some(2 * MIB));
    // A no longer maps it: its range is PROT_NONE with nothing behind it.
    assert_eq!(a.resident_bytes(hp_a, 2 * MIB).ok(), Some(0));
    assert!(!a.is_placed(hp_a));

    // Dropping a window with placed file blocks punches their holes too.
    mb.write_obj(1u64, GuestAddress(hp_b)).expect("B writes");
    mb.write_obj(1u64, GuestAddress(0))
        .expect("B writes boot RAM");
    drop(mb);
    assert_eq!(file.allocated_bytes().ok(), Some(2 * MIB + PAGE));
    drop(b);
    assert_eq!(file.allocated_bytes().ok(), Some(0));
}

#[test]
fn anonymous_without_thp_and_with_thp() {
    let files = PoolFiles::new();
    for thp in [false, true] {
        let spec = BackingSpec {
            kind: BackingKind::Anonymous,
            thp,
        };
        let backing = files.backing(spec).expect("backing");
        assert_eq!(backing.spec(), spec);
        assert!(!backing.needs_pool_blocks());
        assert_eq!(backing.huge_page_size(), thp.then_some(BLOCK_SIZE));
        let w = Arc::new(GuestWindow::with_backing(layout(4 * MIB, 0), backing, &[]).expect("w"));
        let mem = w.guest_memory().expect("view");
        mem.write_obj(7u64, GuestAddress(8)).expect("write");
        let res = w.resident_bytes(0, 2 * MIB).expect("mincore");
        if !thp {
            // MADV_NOHUGEPAGE: exactly the touched 4 KiB page.
            assert_eq!(res, PAGE);
        } else {
            // A huge page when the host has one free, else a 4 KiB fallback.
            assert!(res == PAGE || res == 2 * MIB, "{res}");
        }
        w.discard(0, 2 * MIB).expect("discard");
        assert_eq!(w.resident_bytes(0, 2 * MIB).ok(), Some(0));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(8)).ok(), Some(0));
    }
}

#[test]
fn hugetlbfs_reserves_per_block_or_fails_typed() {
    let spec = BackingSpec {
        kind: BackingKind::Hugetlbfs,
        thp: false,
    };
    assert!(matches!(
        BackingSpec { thp: true, ..spec }.validate(),
        Err(MemoryError::Unsupported(_))
    ));
    let files = PoolFiles::new();
    let backing = files.backing(spec).expect("backing");
    let l = layout(2 * MIB, 128 * MIB);
    let hp = l.hotplug().expect("region").start;
    // With no free huge pages, placing fails with a typed error (not a SIGBUS later).
    if tuning::free_hugepages() == 0 {
        let r = GuestWindow::with_backing(l.clone(), Arc::clone(&backing), &[pb(0)]);
        assert!(matches!(r, Err(MemoryError::HugePages { .. })), "{r:?}");
    } else {
        eprintln!("hugetlbfs: free huge pages present, the exhaustion case is not checked");
    }
    // With pages reserved for the test (root only; the old value is put back).
    let reserved = match tuning::reserve_hugepages(4) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("SKIP hugetlbfs placement: cannot raise vm.nr_hugepages ({e})");
            return;
        }
    };
    if reserved.1 < 2 {
        eprintln!(
            "SKIP hugetlbfs placement: only {} free huge pages after raising nr_hugepages",
            reserved.1
        );
        return;
    }
    let w = Arc::new(GuestWindow::with_backing(l, backing, &[pb(0)]).expect("window"));
    // The block's huge page is allocated and mapped at placement.
    assert_eq!(w.resident_bytes(0, 2 * MIB).ok(), Some(2 * MIB));
    w.place(hp, 2 * MIB, &[pb(1)]).expect("plug");
    let mem = w.guest_memory().expect("view");
    mem.write_obj(0x77u64, GuestAddress(hp + 8)).expect("write");
    assert_eq!(mem.read_obj::<u64>(GuestAddress(hp + 8)).ok(), Some(0x77));
    assert!(matches!(
        w.discard(hp, 2 * MIB),
        Err(MemoryError::Unsupported(_))
    ));
    drop(mem);
    let free_before = tuning::free_hugepages();
    w.remove_block(hp, 2 * MIB).expect("unplug");
    assert_eq!(w.resident_bytes(hp, 2 * MIB).ok(), Some(0));
    assert_eq!(tuning::free_hugepages(), free_before + 1);
    drop(w);
    reserved.0.restore().expect("restore nr_hugepages");
}

#[test]
fn vmm_swap_refuses_a_file_backed_window() {
    let files = PoolFiles::new();
    let w = file_window(&files, MEMFD, &[0]);
    let path = std::env::temp_dir().join(format!("tidepool-backing-swap-{}", std::process::id()));
    let file = Arc::new(
        crate::swap::SwapFile::create(crate::swap::SwapFileConfig::new(path.clone(), 4 * MIB))
            .expect("swap file"),
    );
    let r = crate::swap::VmSwap::new(w, file);
    let _ = std::fs::remove_file(&path);
    assert!(
        matches!(r, Err(crate::swap::SwapError::Unsupported("memfd"))),
        "{:?}",
        r.err()
    );
}

#[test]
fn anonymous_window_records_the_pool_blocks_it_is_given() {
    let files = PoolFiles::new();
    let backing = files.backing(BackingSpec::default()).expect("backing");
    let boot: Vec<PoolBlock> = (0..2).map(pb).collect();
    let w = GuestWindow::with_backing(layout(4 * MIB, 128 * MIB), backing, &boot).expect("window");
    assert_eq!(w.pool_block(2 * MIB), Some(pb(1)));
    let hp = w.layout().hotplug().expect("hot-plug region").start;
    // A wrong count is refused; an empty slice still places (no binding, no record).
    assert!(matches!(
        w.place(hp, 2 * BLOCK_SIZE, &[pb(7)]),
        Err(MemoryError::PoolBlocks {
            expected: 2,
            got: 1
        })
    ));
    w.place(hp, BLOCK_SIZE, &[pb(7)])
        .expect("place with a block");
    assert_eq!(w.pool_block(hp), Some(pb(7)));
    w.place_block(hp + BLOCK_SIZE, BLOCK_SIZE)
        .expect("place without");
    assert_eq!(w.pool_block(hp + BLOCK_SIZE), None);
    w.remove_block(hp, 2 * BLOCK_SIZE).expect("remove");
    assert_eq!(w.pool_block(hp), None);
}

#[test]
fn bind_blocks_binds_each_run_to_its_node() {
    use super::numa::{range_policy, MemPolicy};
    // This host has one node: bind a 3-block range to node 0 through the backing helper and
    // read the policy back from every block.
    let len = 3 * BLOCK_SIZE as usize;
    // SAFETY: a fresh anonymous mapping at an address the kernel picks.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let addr = p as usize;
    let blocks: Vec<PoolBlock> = (0..3).map(pb).collect();
    super::backing::bind_blocks(addr, len, &blocks).expect("bind");
    for i in 0..3 {
        assert_eq!(
            range_policy(addr + i * BLOCK_SIZE as usize).expect("policy"),
            MemPolicy::Bind(vec![NodeId(0)])
        );
    }
    assert!(matches!(
        super::backing::bind_blocks(addr, len, &blocks[..2]),
        Err(MemoryError::PoolBlocks { .. })
    ));
    // SAFETY: the mapping made above, not used after this.
    unsafe { libc::munmap(p, len) };
}

#[test]
fn anonymous_relocate_repoints_the_record_and_keeps_the_data() {
    let files = PoolFiles::new();
    let backing = files.backing(BackingSpec::default()).expect("backing");
    let boot: Vec<PoolBlock> = (0..2).map(pb).collect();
    let w = Arc::new(
        GuestWindow::with_backing(layout(4 * MIB, 128 * MIB), backing, &boot).expect("window"),
    );
    let hp = w.layout().hotplug().expect("hot-plug region").start;
    w.place(hp, BLOCK_SIZE, &[pb(7)]).expect("place");
    let mem = w.guest_memory().expect("view");
    mem.write_obj(0xfeed_f00d_u64, GuestAddress(hp + 4096))
        .expect("write");
    // One node here: a same-node move has nothing to migrate; the record follows.
    w.relocate(hp, pb(7), pb(9)).expect("relocate");
    assert_eq!(w.pool_block(hp), Some(pb(9)));
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(hp + 4096)).expect("read"),
        0xfeed_f00d
    );
    // The old block is no longer the record: a second move from it is refused.
    assert!(matches!(
        w.relocate(hp, pb(7), pb(11)),
        Err(MemoryError::NotPlaced { .. })
    ));
}
