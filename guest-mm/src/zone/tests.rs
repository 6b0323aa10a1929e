//! Unit tests of the zone: fallback and stealing, indices, isolation, errors.

use super::*;
use crate::frame::frames_in;

const U: MigrateType = MigrateType::Unmovable;
const M: MigrateType = MigrateType::Movable;
const R: MigrateType = MigrateType::Reclaimable;

fn zone(nr: u64) -> Zone {
    Zone::new(NodeId(0), FrameId(0), nr)
}

#[test]
fn new_zone_cuts_unaligned_range_into_maximal_blocks() {
    let z = Zone::new(NodeId(1), FrameId(3), 1000);
    z.validate().unwrap();
    let s = z.stats();
    assert_eq!((s.total, s.free, s.allocated), (1000, 1000, 0));
    // 3 -> 1 frame, 4..8 (2), 8..16 (3), ..., 512..1003: 256,128,64,32,8,2,1 ...
    assert_eq!(z.free_blocks(0), 2);
    assert_eq!(z.free_blocks(8), 2);
    assert!(z.contains(FrameId(3)) && z.contains(FrameId(1002)) && !z.contains(FrameId(1003)));
    let big = Zone::new(NodeId(0), FrameId(0), 1 << 20);
    assert_eq!(big.free_blocks(MAX_ORDER), 4);
}

#[test]
fn alloc_free_coalesces_back() {
    let mut z = zone(4096);
    let mut got = Vec::new();
    for o in [0u8, 3, 9, 0, 1, 5] {
        got.push((z.alloc(o, M).unwrap(), o));
        z.validate().unwrap();
    }
    assert_eq!(
        z.stats().allocated,
        got.iter().map(|&(_, o)| frames_in(o)).sum::<u64>()
    );
    for (f, o) in got.into_iter().rev() {
        z.free(f, o).unwrap();
        z.validate().unwrap();
    }
    assert_eq!(z.free_blocks(12), 1);
    assert_eq!(z.stats().free, 4096);
}

#[test]
fn free_errors_are_typed() {
    let mut z = Zone::new(NodeId(0), FrameId(1024), 1024);
    let f = z.alloc(2, M).unwrap();
    assert_eq!(z.free(FrameId(5), 0), Err(FreeError::OutOfZone(FrameId(5))));
    assert_eq!(
        z.free(f, 3),
        Err(FreeError::WrongOrder {
            frame: f,
            allocated: 2,
            given: 3
        })
    );
    assert_eq!(
        z.free(f.add(1), 0),
        Err(FreeError::TailFrame {
            frame: f.add(1),
            head: f
        })
    );
    assert_eq!(
        z.free(f, MAX_ORDER + 1),
        Err(FreeError::InvalidOrder(MAX_ORDER + 1))
    );
    assert_eq!(
        z.free_as(f, 2, U),
        Err(FreeError::WrongType {
            frame: f,
            allocated: M,
            given: U
        })
    );
    z.free(f, 2).unwrap();
    assert_eq!(z.free(f, 2), Err(FreeError::DoubleFree(f)));
    assert_eq!(z.free(f.add(1), 0), Err(FreeError::DoubleFree(f.add(1))));
    z.validate().unwrap();
    assert_eq!(z.stats().free, 1024);
}

#[test]
fn alloc_errors_are_typed() {
    let mut z = zone(1024);
    assert_eq!(z.alloc(MAX_ORDER + 1, M), Err(AllocError::InvalidOrder(19)));
    assert_eq!(
        z.alloc(0, MigrateType::Isolate),
        Err(AllocError::InvalidType(MigrateType::Isolate))
    );
    assert_eq!(
        z.alloc(11, M),
        Err(AllocError::OutOfMemory { order: 11, mt: M })
    );
    assert_eq!(z.stats().alloc_failures, 1);
    assert_eq!(
        z.alloc_at(FrameId(3), 1, M),
        Err(AllocError::Unaligned {
            frame: FrameId(3),
            order: 1
        })
    );
    assert_eq!(
        z.alloc_at(FrameId(1024), 0, M),
        Err(AllocError::OutOfZone(FrameId(1024)))
    );
    z.alloc_at(FrameId(700), 2, U).unwrap();
    assert_eq!(
        z.alloc_at(FrameId(700), 0, M),
        Err(AllocError::NotFree(FrameId(700)))
    );
    assert_eq!(
        z.alloc_at(FrameId(512), 9, M),
        Err(AllocError::NotFree(FrameId(512)))
    );
    assert_eq!(z.allocation_at(FrameId(702)), Some((FrameId(700), 2, U)));
    z.validate().unwrap();
}

#[test]
fn first_foreign_alloc_claims_one_pageblock_of_a_big_block() {
    let mut z = zone(4 * 512);
    let f = z.alloc(0, U).unwrap();
    z.validate().unwrap();
    let s = z.stats();
    assert_eq!((s.steals, s.claims), (1, 1));
    assert_eq!(s.pageblocks_per_type[U.index()], 1);
    assert_eq!(s.pageblocks_per_type[M.index()], 3);
    assert_eq!(z.pageblock_type(f), U);
    assert_eq!(s.free_per_type[U.index()], 511);
    // Later unmovable allocations come from the claimed pageblock without stealing.
    for _ in 0..100 {
        let g = z.alloc(0, U).unwrap();
        assert_eq!(g.pageblock_start(), f.pageblock_start());
    }
    assert_eq!(z.stats().steals, 1);
    z.validate().unwrap();
}

/// Two fully allocated movable pageblocks, then `free` frames [start, start+n) of pageblock 1
/// returned as order-0 frees.
fn fragmented(free_from: u64, n: u64) -> Zone {
    let mut z = zone(1024);
    let a = z.alloc(9, M).unwrap();
    let b = z.alloc(9, M).unwrap();
    assert_eq!((a, b), (FrameId(0), FrameId(512)));
    z.split_allocated(a, 9, 0).unwrap();
    z.split_allocated(b, 9, 0).unwrap();
    for i in 0..4 {
        z.free(FrameId(i), 0).unwrap();
    }
    z.free(FrameId(8), 0).unwrap();
    for i in free_from..free_from + n {
        z.free(FrameId(i), 0).unwrap();
    }
    z.validate().unwrap();
    z
}

#[test]
fn fallback_steals_the_largest_block_without_claiming_a_busy_pageblock() {
    let mut z = fragmented(512, 64);
    assert_eq!(z.free_blocks(6), 1);
    let f = z.alloc(0, U).unwrap();
    assert_eq!(f, FrameId(512), "the order-6 block is the largest");
    let s = z.stats();
    assert_eq!((s.steals, s.claims), (1, 0));
    assert_eq!(z.pageblock_type(f), M);
    assert_eq!(z.allocation_at(f), Some((f, 0, U)));
    assert_eq!(s.free_per_type[M.index()], 4 + 1 + 63);
    z.validate().unwrap();
}

#[test]
fn fallback_claims_a_pageblock_that_is_half_free() {
    let mut z = fragmented(512, 256);
    let f = z.alloc(0, R).unwrap();
    assert_eq!(f, FrameId(512));
    let s = z.stats();
    assert_eq!((s.steals, s.claims), (1, 1));
    assert_eq!(z.pageblock_type(f), R);
    // The rest of the order-8 block moved to the reclaimable lists with the pageblock.
    assert_eq!(s.free_per_type[R.index()], 255);
    assert_eq!(s.free_per_type[M.index()], 5);
    z.validate().unwrap();
    // Freeing everything of pageblock 1 merges it whole again, on the reclaimable list.
    z.free(f, 0).unwrap();
    for i in 768..1024 {
        z.free(FrameId(i), 0).unwrap();
    }
    z.validate().unwrap();
    assert_eq!(z.free_blocks(9), 1);
}

#[test]
fn movable_falls_back_to_unmovable_pageblocks() {
    let mut z = zone(1024);
    z.alloc(0, U).unwrap(); // claims pageblock 0
    assert_eq!(z.alloc(9, M).unwrap(), FrameId(512));
    let f = z.alloc(0, M).unwrap();
    // 511 of 512 frames are free: the movable request claims the pageblock back.
    assert_eq!(z.pageblock_type(f), M);
    assert_eq!((z.stats().steals, z.stats().claims), (2, 2));
    z.validate().unwrap();
}

#[test]
fn without_mobility_grouping_everything_shares_the_movable_lists() {
    let mut z = zone(2048);
    z.set_mobility_grouping(false);
    let a = z.alloc(0, U).unwrap();
    let b = z.alloc(0, R).unwrap();
    let c = z.alloc(0, M).unwrap();
    assert_eq!(
        (a.pageblock_start(), b.pageblock_start()),
        (c.pageblock_start(), c.pageblock_start())
    );
    let s = z.stats();
    assert_eq!((s.steals, s.claims), (0, 0));
    assert_eq!(s.pageblocks_per_type[M.index()], 4);
    assert_eq!(s.allocated_per_type, [1, 1, 1, 0]);
    z.validate().unwrap();
}

#[test]
fn fragmentation_indices_follow_the_linux_formulas() {
    let mut z = zone(1024);
    assert_eq!(z.fragmentation_index(10), None);
    assert_eq!(z.unusable_free_index(10), 0.0);
    assert_eq!(
        z.fragmentation_index(11),
        Some(0.0) // lack of memory: Linux's formula goes negative, clamped
    );
    let all: Vec<_> = (0..1024).map(|_| z.alloc(0, M).unwrap()).collect();
    assert_eq!(z.fragmentation_index(0), Some(0.0));
    assert_eq!(z.unusable_free_index(0), 1.0);
    for f in all.iter().step_by(2) {
        z.free(*f, 0).unwrap();
    }
    assert_eq!(z.free_blocks(0), 512);
    assert_eq!(z.fragmentation_index(0), None);
    let fi1 = z.fragmentation_index(1).unwrap();
    assert!((fi1 - (1.0 - 257.0 / 512.0)).abs() < 1e-12, "{fi1}");
    let fi9 = z.fragmentation_index(9).unwrap();
    assert!((fi9 - (1.0 - 2.0 / 512.0)).abs() < 1e-12, "{fi9}");
    assert_eq!(z.unusable_free_index(0), 0.0);
    assert_eq!(z.unusable_free_index(1), 1.0);
    z.validate().unwrap();
}

#[test]
fn isolation_keeps_blocks_out_and_unisolation_coalesces() {
    let mut z = zone(1024);
    z.isolate_range(FrameId(512), 512).unwrap();
    z.validate().unwrap();
    assert_eq!(z.stats().isolated_free, 512);
    assert_eq!(z.pageblock_type(FrameId(600)), MigrateType::Isolate);
    assert_eq!(
        z.alloc_at(FrameId(600), 0, M),
        Err(AllocError::Isolated(FrameId(600)))
    );
    assert_eq!(z.fragmentation_index(10), Some(0.0));
    assert_eq!(z.alloc(9, M).unwrap(), FrameId(0));
    assert!(z.alloc(0, U).is_err());
    z.free(FrameId(0), 9).unwrap();
    z.validate().unwrap();
    assert_eq!(
        z.free_blocks(10),
        0,
        "an isolated half never merges with a free one"
    );
    z.unisolate_range(FrameId(512), 512, M).unwrap();
    z.validate().unwrap();
    assert_eq!(z.free_blocks(10), 1);
}

#[test]
fn frees_inside_an_isolated_range_stay_isolated() {
    let mut z = zone(2048);
    let a = z.alloc(0, M).unwrap();
    let b = z.alloc(9, M).unwrap();
    z.isolate_range(FrameId(0), 1024).unwrap();
    z.free(a, 0).unwrap();
    z.free(b, 9).unwrap();
    z.validate().unwrap();
    assert_eq!(z.stats().isolated_free, 1024);
    assert_eq!(z.free_blocks(10), 2);
    z.unisolate_range(FrameId(0), 1024, U).unwrap();
    z.validate().unwrap();
    assert_eq!(z.free_blocks(11), 1);
}

#[test]
fn isolation_errors() {
    let mut z = Zone::new(NodeId(0), FrameId(100), 2000);
    assert!(matches!(
        z.isolate_range(FrameId(100), 0),
        Err(ZoneError::OutOfZone { .. })
    ));
    assert!(matches!(
        z.isolate_range(FrameId(0), 512),
        Err(ZoneError::OutOfZone { .. })
    ));
    assert!(matches!(
        z.isolate_range(FrameId(512), 100),
        Err(ZoneError::Unaligned { .. })
    ));
    // Zone edges count as aligned.
    z.isolate_range(FrameId(100), 412).unwrap();
    assert_eq!(
        z.isolate_range(FrameId(100), 412),
        Err(ZoneError::AlreadyIsolated(FrameId(100)))
    );
    assert_eq!(
        z.unisolate_range(FrameId(512), 512, M),
        Err(ZoneError::NotIsolated(FrameId(512)))
    );
    assert_eq!(
        z.unisolate_range(FrameId(100), 412, MigrateType::Isolate),
        Err(ZoneError::InvalidType(MigrateType::Isolate))
    );
    let big = z.alloc(10, M).unwrap();
    assert_eq!(big, FrameId(1024));
    assert_eq!(
        z.isolate_range(FrameId(1536), 512),
        Err(ZoneError::Straddling(FrameId(1024)))
    );
    z.isolate_range(FrameId(2048), 52).unwrap();
    z.validate().unwrap();
    z.unisolate_range(FrameId(100), 412, M).unwrap();
    z.unisolate_range(FrameId(2048), 52, M).unwrap();
    z.free(big, 10).unwrap();
    z.validate().unwrap();
    assert_eq!(z.stats().free, 2000);
}

#[test]
fn split_allocated_then_free_pieces() {
    let mut z = zone(1024);
    let f = z.alloc(9, R).unwrap();
    assert_eq!(
        z.split_allocated(f, 9, 10),
        Err(FreeError::InvalidOrder(10))
    );
    z.split_allocated(f, 9, 3).unwrap();
    z.validate().unwrap();
    assert_eq!(z.allocations_in(f, 512).count(), 64);
    assert_eq!(z.allocation_at(f.add(9)), Some((f.add(8), 3, R)));
    assert_eq!(
        z.free(f, 9),
        Err(FreeError::WrongOrder {
            frame: f,
            allocated: 3,
            given: 9
        })
    );
    for i in 0..64 {
        z.free(f.add(i * 8), 3).unwrap();
    }
    z.validate().unwrap();
    assert_eq!(z.free_blocks(10), 1);
}

#[test]
fn allocations_in_starts_mid_block_and_skips_free_blocks() {
    let mut z = zone(1024);
    let a = z.alloc_at(FrameId(16), 4, M);
    a.unwrap();
    z.alloc_at(FrameId(64), 0, U).unwrap();
    z.alloc_at(FrameId(512), 9, R).unwrap();
    let v: Vec<_> = z.allocations_in(FrameId(20), 1004).collect();
    assert_eq!(v, vec![(FrameId(64), 0, U), (FrameId(512), 9, R)]);
    let v: Vec<_> = z.allocations_in(FrameId(0), 65).collect();
    assert_eq!(v, vec![(FrameId(16), 4, M), (FrameId(64), 0, U)]);
    assert!(z.is_free(FrameId(65)) && !z.is_free(FrameId(600)));
    assert_eq!(
        z.blocks_in(FrameId(0), 1024).filter(|b| b.free).count(),
        z.stats().free_blocks_per_order.iter().sum::<u64>() as usize
    );
}

#[test]
fn stats_serialize() {
    let mut z = zone(1024);
    z.alloc(0, U).unwrap();
    let j = serde_json::to_value(z.stats()).unwrap();
    assert_eq!(j["total"], 1024);
    assert_eq!(j["allocated_per_type"][0], 1);
    assert_eq!(j["free_blocks_per_order"].as_array().unwrap().len(), 19);
}

#[test]
fn small_allocations_go_to_the_most_used_pageblock() {
    let mut z = zone(2048);
    let all: Vec<FrameId> = (0..2048).map(|_| z.alloc(0, M).unwrap()).collect();
    assert_eq!(z.free_frames(), 0);
    // Pageblock 0: one free frame. Pageblock 1: a large free run plus one free frame, freed
    // last so that it sits at the head of the order-0 list.
    z.free(all[5], 0).unwrap();
    for f in &all[512..712] {
        z.free(*f, 0).unwrap();
    }
    z.free(all[813], 0).unwrap();
    z.validate().unwrap();
    assert_eq!((z.pb_free[0], z.pb_free[1]), (1, 201));
    assert_eq!(z.free_blocks(0), 2);
    // The frame in the nearly full pageblock 0 goes first, then the other one.
    assert_eq!(z.alloc(0, M).unwrap(), FrameId(5));
    assert_eq!(z.alloc(0, M).unwrap(), FrameId(813));
    assert_eq!((z.pb_free[0], z.pb_free[1]), (0, 200));
    z.validate().unwrap();
    // Whole pageblocks do not count: freeing everything leaves the counters at zero.
    z.free(FrameId(5), 0).unwrap();
    z.free(FrameId(813), 0).unwrap();
    for (i, f) in all.iter().enumerate() {
        if i != 5 && i != 813 && !(512..712).contains(&i) {
            z.free(*f, 0).unwrap();
        }
    }
    z.validate().unwrap();
    assert!(z.pb_free.iter().all(|&n| n == 0));
    assert_eq!(z.free_blocks(11), 1);
}

#[test]
fn placement_scan_is_bounded() {
    // More candidates than the scan looks at: the pick comes from the first PLACEMENT_SCAN.
    let mut z = zone(8192);
    let all: Vec<FrameId> = (0..8192).map(|_| z.alloc(0, M).unwrap()).collect();
    // Pageblock 0 is the fullest (one free frame) but is freed first, so it ends up deep in
    // the LIFO list behind PLACEMENT_SCAN frames of emptier pageblocks.
    z.free(all[0], 0).unwrap();
    let mut freed = Vec::new();
    for pb in 1..16u64 {
        for k in 0..3u64 {
            let i = (pb * 512 + 2 * k + 1) as usize;
            z.free(all[i], 0).unwrap();
            freed.push(all[i]);
        }
    }
    z.validate().unwrap();
    let got = z.alloc(0, M).unwrap();
    assert_ne!(
        got,
        FrameId(0),
        "the fullest block lies beyond the scan window"
    );
    assert!(freed.contains(&got));
}
