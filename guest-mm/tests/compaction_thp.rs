//! Compaction with a recording (and sometimes refusing) mover; the THP paths in order.

use guest_mm::compaction::{CompactStatus, MAX_REGIONS_PER_RUN};
use guest_mm::thp::{collapse_candidates, collapse_thp, THP_FRAMES};
use guest_mm::{
    alloc_thp, compact_full, compact_until, split_thp, FrameId, MigrateType, MoveError, Mover,
    NodeId, ThpOutcome, Zone,
};
use std::collections::{BTreeMap, BTreeSet};

const M: MigrateType = MigrateType::Movable;
const U: MigrateType = MigrateType::Unmovable;

/// A mover that owns "contents" (a tag per block), records every call, and refuses blocks in
/// `refuse`.
#[derive(Default)]
struct RecordingMover {
    contents: BTreeMap<FrameId, (u8, u64)>,
    moves: Vec<(FrameId, FrameId, u8)>,
    refuse: BTreeSet<FrameId>,
    refused: u64,
}

impl RecordingMover {
    fn own(&mut self, f: FrameId, order: u8) {
        let tag = f.0 * 7 + 1;
        self.contents.insert(f, (order, tag));
    }
}

impl Mover for RecordingMover {
    fn move_block(&mut self, from: FrameId, to: FrameId, order: u8) -> Result<(), MoveError> {
        if self.refuse.contains(&from) {
            self.refused += 1;
            return Err(MoveError::Pinned(from));
        }
        let Some(c) = self.contents.remove(&from) else {
            return Err(MoveError::Failed {
                frame: from,
                reason: "not mine".into(),
            });
        };
        assert_eq!(c.0, order);
        assert!(
            !self.contents.contains_key(&to),
            "destination {to:?} already holds data"
        );
        self.contents.insert(to, c);
        self.moves.push((from, to, order));
        Ok(())
    }
}

/// A zone of `pbs` pageblocks, every frame allocated at order 0 as MOVABLE, then all freed
/// except the frames at the given offsets of each pageblock (owned by the mover).
fn scattered(pbs: u64, keep: &[u64]) -> (Zone, RecordingMover) {
    let mut z = Zone::new(NodeId(0), FrameId(0), pbs * 512);
    let all: Vec<_> = (0..pbs * 512).map(|_| z.alloc(0, M).unwrap()).collect();
    let mut mover = RecordingMover::default();
    for f in all {
        if keep.contains(&(f.0 % 512)) {
            mover.own(f, 0);
        } else {
            z.free(f, 0).unwrap();
        }
    }
    z.validate().unwrap();
    (z, mover)
}

/// Check that the zone's allocated blocks are exactly the mover's blocks.
fn check_ownership(z: &Zone, mover: &RecordingMover) {
    let zone_blocks: BTreeSet<_> = z
        .allocations_in(z.base(), z.nr_frames())
        .map(|(f, o, _)| (f, o))
        .collect();
    let owned: BTreeSet<_> = mover.contents.iter().map(|(f, (o, _))| (*f, *o)).collect();
    assert_eq!(zone_blocks, owned);
    for (f, (_, tag)) in &mover.contents {
        assert!(tag % 7 == 1, "tag of {f:?} corrupted");
    }
}

#[test]
fn compact_until_frees_the_emptiest_region() {
    // Pageblock 2 holds 1 frame, the others 3: the emptiest region is pageblock 2.
    let (mut z, mut mover) = scattered(4, &[5, 100, 300]);
    for f in [FrameId(1024 + 100), FrameId(1024 + 300)] {
        mover.contents.remove(&f);
        z.free(f, 0).unwrap();
    }
    assert_eq!(z.free_blocks(9), 0);
    let r = compact_until(&mut z, 9, &mut mover);
    assert_eq!(r.status, CompactStatus::Compacted);
    assert_eq!(r.block, Some(FrameId(1024)));
    assert_eq!((r.frames_moved, r.blocks_moved, r.regions_tried), (1, 1, 1));
    assert_eq!(mover.moves.len(), 1);
    let (from, to, _) = mover.moves[0];
    assert_eq!(from, FrameId(1029));
    assert_ne!(to.pageblock_start(), FrameId(1024));
    assert!(z.free_block_at(FrameId(1024)).is_some_and(|(_, o)| o >= 9));
    assert_eq!(z.pageblock_type(FrameId(1024)), M, "types are given back");
    z.validate().unwrap();
    check_ownership(&z, &mover);
    let s = z.compaction_stats();
    assert_eq!(
        (s.runs, s.successes, s.failures, s.frames_moved),
        (1, 1, 0, 1)
    );
    assert!(s.pageblocks_scanned >= 4);
    // Now an order-9 block is free: nothing to do.
    let r = compact_until(&mut z, 9, &mut mover);
    assert_eq!(r.status, CompactStatus::AlreadyFree);
    assert_eq!(r.frames_moved, 0);
}

#[test]
fn destinations_prefer_densely_used_movable_pageblocks() {
    // Pageblock 3 is the densest (many frames kept); pageblock 0 the emptiest.
    let keep: Vec<u64> = (0..8).collect();
    let (mut z, mut mover) = scattered(4, &keep);
    for i in 0..6 {
        let f = FrameId(i);
        mover.contents.remove(&f);
        z.free(f, 0).unwrap();
    }
    for i in 8..400 {
        let f = z.alloc_at(FrameId(1536 + i), 0, M);
        f.unwrap();
        mover.own(FrameId(1536 + i), 0);
    }
    let r = compact_until(&mut z, 9, &mut mover);
    assert_eq!(r.status, CompactStatus::Compacted);
    assert_eq!(r.block, Some(FrameId(0)));
    assert!(mover
        .moves
        .iter()
        .all(|&(_, to, _)| to.pageblock_start() == FrameId(1536)));
    z.validate().unwrap();
    check_ownership(&z, &mover);
}

#[test]
fn destinations_prefer_pageblocks_pinned_by_unmovable_data() {
    // Pageblock 3 is the densest MOVABLE one, but pageblock 1 holds an unmovable frame: it can
    // never become a free 2 MiB block, so moved data goes into its holes first.
    let keep: Vec<u64> = (0..8).collect();
    let (mut z, mut mover) = scattered(4, &keep);
    for i in 0..6 {
        let f = FrameId(i);
        mover.contents.remove(&f);
        z.free(f, 0).unwrap();
    }
    for i in 8..400 {
        z.alloc_at(FrameId(1536 + i), 0, M).unwrap();
        mover.own(FrameId(1536 + i), 0);
    }
    z.alloc_at(FrameId(512 + 100), 0, U).unwrap();
    let r = compact_until(&mut z, 9, &mut mover);
    assert_eq!(r.status, CompactStatus::Compacted);
    assert_eq!(r.block, Some(FrameId(0)));
    assert_eq!(mover.moves.len(), 2);
    assert!(mover
        .moves
        .iter()
        .all(|&(_, to, _)| to.pageblock_start() == FrameId(512)));
    assert_eq!(z.allocation_at(FrameId(512 + 100)).map(|a| a.2), Some(U));
    z.free(FrameId(512 + 100), 0).unwrap();
    z.validate().unwrap();
    check_ownership(&z, &mover);
}

#[test]
fn a_refused_move_gives_up_the_region_and_tries_the_next() {
    let (mut z, mut mover) = scattered(4, &[5]);
    mover.refuse.insert(FrameId(5));
    let r = compact_until(&mut z, 9, &mut mover);
    assert_eq!(r.status, CompactStatus::Compacted);
    assert_eq!(r.moves_refused, 1);
    assert_eq!(r.regions_tried, 2);
    assert_eq!(r.block, Some(FrameId(512)));
    assert!(
        z.allocation_at(FrameId(5)).is_some(),
        "the pinned frame stayed"
    );
    z.validate().unwrap();
    check_ownership(&z, &mover);
    assert_eq!(z.stats().isolated_free, 0);
}

#[test]
fn compaction_fails_cleanly_when_everything_is_pinned_or_unmovable() {
    let (mut z, mut mover) = scattered(4, &[5, 6]);
    mover.refuse.extend(mover.contents.keys().copied());
    let before = z.stats();
    let r = compact_until(&mut z, 9, &mut mover);
    assert_eq!(r.status, CompactStatus::Failed);
    assert_eq!(r.regions_tried, 4);
    assert_eq!(r.frames_moved, 0);
    let after = z.stats();
    assert_eq!(
        (after.free, after.pageblocks_per_type),
        (before.free, before.pageblocks_per_type)
    );
    z.validate().unwrap();
    assert_eq!(z.compaction_stats().failures, 1);
    // Unmovable allocations make regions ineligible: nothing is even tried.
    let mut z = Zone::new(NodeId(0), FrameId(0), 2048);
    for pb in 0..4 {
        z.alloc_at(FrameId(pb * 512 + 7), 0, U).unwrap();
    }
    let r = compact_until(&mut z, 9, &mut mover);
    assert_eq!((r.status, r.regions_tried), (CompactStatus::Failed, 0));
    const { assert!(MAX_REGIONS_PER_RUN >= 4) };
}

#[test]
fn compaction_below_and_above_pageblock_order() {
    // Order 4: a 16-frame region inside a pageblock.
    let keep: Vec<u64> = (0..512).filter(|i| i % 16 == 3).collect();
    let (mut z, mut mover) = scattered(2, &keep);
    // 256 free blocks (4 per region), 960 free frames: 1 - (1 + 960/16) / 256.
    let fi = z.fragmentation_index(4).unwrap();
    assert!((fi - (1.0 - 61.0 / 256.0)).abs() < 1e-12, "{fi}");
    let r = compact_until(&mut z, 4, &mut mover);
    assert_eq!(r.status, CompactStatus::Compacted);
    assert_eq!(r.frames_moved, 1);
    assert_eq!(z.fragmentation_index(4), None);
    z.validate().unwrap();
    check_ownership(&z, &mover);
    // Order 10: two pageblocks, one of them claimed UNMOVABLE but holding only movable data.
    let (mut z, mut mover) = scattered(4, &[9]);
    let u = z.alloc(0, U).unwrap();
    z.free(u, 0).unwrap();
    let r = compact_until(&mut z, 10, &mut mover);
    assert_eq!(r.status, CompactStatus::Compacted);
    assert_eq!(r.frames_moved, 2);
    assert!(z
        .free_block_at(r.block.unwrap())
        .is_some_and(|(_, o)| o >= 10));
    z.validate().unwrap();
    check_ownership(&z, &mover);
}

#[test]
fn compact_full_packs_movable_data_at_the_end() {
    let (mut z, mut mover) = scattered(8, &[1, 77, 200, 300, 511]);
    mover.refuse.insert(FrameId(512 + 77));
    assert_eq!(z.largest_free_order(), Some(6));
    let r = compact_full(&mut z, &mut mover);
    assert_eq!(r.status, CompactStatus::Compacted);
    assert_eq!(r.moves_refused, 1);
    z.validate().unwrap();
    check_ownership(&z, &mover);
    // 40 frames, one pinned in pageblock 1: everything else lives in the last pageblock.
    let owners: BTreeSet<FrameId> = mover.contents.keys().map(|f| f.pageblock_start()).collect();
    assert_eq!(owners, BTreeSet::from([FrameId(512), FrameId(7 * 512)]));
    // Pageblocks 2-3 and 4-5 are free order-10 blocks (the pinned frame keeps 0-3 apart).
    assert_eq!(z.largest_free_order(), Some(10));
    assert_eq!(
        r.block.and_then(|b| z.free_block_at(b)).map(|(_, o)| o),
        z.largest_free_order()
    );
    assert_eq!(z.compaction_stats().frames_moved, r.frames_moved);
}

#[test]
fn thp_paths_in_order() {
    let mut z = Zone::new(NodeId(0), FrameId(0), 4 * 512);
    let mut mover = RecordingMover::default();
    // 1. Direct: a fresh zone has movable 2 MiB blocks.
    let a = alloc_thp(&mut z, M, Some(&mut mover)).unwrap();
    assert!(matches!(a, ThpOutcome::Direct(f) if f.is_aligned(9)));
    // 2. Stolen: no unmovable block yet, so an unmovable THP steals (and claims) one.
    let b = alloc_thp(&mut z, U, None).unwrap();
    let bf = b.huge_frame().unwrap();
    assert!(matches!(b, ThpOutcome::Stolen(_)));
    assert_eq!(z.pageblock_type(bf), U);
    // Fill the remaining two pageblocks with scattered movable frames.
    let mut small = Vec::new();
    while let Ok(f) = z.alloc(0, M) {
        small.push(f);
    }
    for f in small {
        if f.0 % 512 == 42 {
            mover.own(f, 0);
        } else {
            z.free(f, 0).unwrap();
        }
    }
    b.free(&mut z).unwrap();
    // The freed unmovable pageblock is a free 2 MiB block: fill it so only compaction helps.
    let filler = z.alloc(9, U).unwrap();
    assert!(!z.can_alloc(9, M));
    // 3. No mover: 512 separate frames.
    let c = alloc_thp(&mut z, M, None).unwrap();
    let ThpOutcome::Fallback4k(frames) = &c else {
        panic!("expected a 4 KiB fallback, got {c:?}");
    };
    assert_eq!(frames.len() as u64, THP_FRAMES);
    c.free(&mut z).unwrap();
    // 4. With a mover: compaction empties a pageblock.
    let d = alloc_thp(&mut z, M, Some(&mut mover)).unwrap();
    assert!(matches!(d, ThpOutcome::Compacted(_)), "{d:?}");
    assert_eq!(z.compaction_stats().successes, 1);
    // 5. Nothing left even for 4 KiB pieces: an error, and nothing stays allocated.
    let free_before = z.stats().free;
    let mut held = Vec::new();
    while z.stats().free > 100 {
        held.push(z.alloc(0, M).unwrap());
    }
    let free_mid = z.stats().free;
    assert!(alloc_thp(&mut z, M, None).is_err());
    assert_eq!(z.stats().free, free_mid);
    for f in held {
        z.free(f, 0).unwrap();
    }
    assert_eq!(z.stats().free, free_before);
    let s = z.thp_stats();
    assert_eq!(
        (s.direct, s.stolen, s.compacted, s.fallback_4k, s.failures),
        (1, 1, 1, 1, 1)
    );
    z.free(filler, 9).unwrap();
    z.validate().unwrap();
    assert!(alloc_thp(&mut z, MigrateType::Isolate, None).is_err());
    let _ = a;
}

#[test]
fn split_and_collapse() {
    let mut z = Zone::new(NodeId(0), FrameId(0), 4 * 512);
    let t = alloc_thp(&mut z, M, None).unwrap().huge_frame().unwrap();
    assert!(collapse_candidates(&z).is_empty());
    split_thp(&mut z, t).unwrap();
    assert_eq!(z.allocation_at(t.add(100)), Some((t.add(100), 0, M)));
    assert_eq!(collapse_candidates(&z).len(), 1);
    // Free one 4 KiB piece: no longer a candidate; allocate it again: a candidate again.
    z.free(t.add(100), 0).unwrap();
    assert!(collapse_candidates(&z).is_empty());
    z.alloc_at(t.add(100), 0, M).unwrap();
    let c = collapse_candidates(&z);
    assert_eq!(c[0].start, t);
    assert_eq!(c[0].mt, M);
    // A piece of another type spoils it.
    z.free(t.add(7), 0).unwrap();
    z.alloc_at(t.add(7), 0, U).unwrap();
    assert!(collapse_candidates(&z).is_empty());
    assert!(collapse_thp(&mut z, t).is_err());
    z.free(t.add(7), 0).unwrap();
    z.alloc_at(t.add(7), 0, M).unwrap();
    assert_eq!(collapse_thp(&mut z, t), Ok(M));
    assert_eq!(z.allocation_at(t.add(300)), Some((t, 9, M)));
    z.validate().unwrap();
    let s = z.thp_stats();
    assert_eq!((s.splits, s.collapses), (1, 1));
    z.free(t, 9).unwrap();
    assert_eq!(z.stats().free, 2048);
    assert!(split_thp(&mut z, t).is_err());
}

mod props {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Random movable/unmovable layouts with random pinned blocks: compaction keeps the
        /// zone valid, moves data only between allocated blocks, and reports truthfully.
        #[test]
        fn compaction_keeps_zone_and_owner_consistent(
            allocs in prop::collection::vec((0u8..=3, prop::bool::weighted(0.1), prop::bool::weighted(0.1)), 1..300),
            frees in prop::collection::vec(any::<prop::sample::Index>(), 0..200),
            target in 0u8..=11,
            full in any::<bool>(),
        ) {
            let mut z = Zone::new(NodeId(0), FrameId(0), 8 * 512);
            let mut mover = RecordingMover::default();
            let mut live = Vec::new();
            for (order, unmovable, pinned) in allocs {
                let mt = if unmovable { U } else { M };
                if let Ok(f) = z.alloc(order, mt) {
                    if mt == M {
                        mover.own(f, order);
                        if pinned {
                            mover.refuse.insert(f);
                        }
                    }
                    live.push((f, order, mt));
                }
            }
            for i in frees {
                if live.is_empty() {
                    break;
                }
                let (f, o, mt) = live.swap_remove(i.index(live.len()));
                z.free(f, o).unwrap();
                if mt == M {
                    mover.contents.remove(&f);
                }
            }
            let unmovable: BTreeSet<_> = live.iter().filter(|l| l.2 == U).map(|l| (l.0, l.1)).collect();
            let free_before = z.stats().free;
            let r = if full { compact_full(&mut z, &mut mover) } else { compact_until(&mut z, target, &mut mover) };
            if let Err(e) = z.validate() {
                return Err(TestCaseError::fail(format!("validate: {e}")));
            }
            prop_assert_eq!(z.stats().free, free_before);
            prop_assert_eq!(z.stats().isolated_free, 0);
            // Unmovable blocks never move; movable ones are exactly the mover's blocks.
            let now: BTreeSet<_> = z.allocations_in(z.base(), z.nr_frames()).filter(|a| a.2 == U).map(|a| (a.0, a.1)).collect();
            prop_assert_eq!(now, unmovable);
            let movable: BTreeSet<_> = z.allocations_in(z.base(), z.nr_frames()).filter(|a| a.2 == M).map(|a| (a.0, a.1)).collect();
            let owned: BTreeSet<_> = mover.contents.iter().map(|(f, (o, _))| (*f, *o)).collect();
            prop_assert_eq!(movable, owned);
            prop_assert_eq!(r.blocks_moved, mover.moves.len() as u64);
            prop_assert!(mover.moves.iter().all(|m| !mover.refuse.contains(&m.0)));
            if !full && r.succeeded() {
                let b = r.block.unwrap();
                prop_assert!(z.free_block_at(b).is_some_and(|(_, o)| o >= target));
            }
            if !full && !r.succeeded() {
                prop_assert!(z.first_free_block(target).is_none());
            }
        }
    }
}

#[test]
fn compact_full_moves_huge_blocks_only_into_free_huge_space() {
    let mut z = Zone::new(NodeId(0), FrameId(0), 8 * 512);
    let mut mover = RecordingMover::default();
    let thp = z.alloc(9, M).unwrap();
    assert_eq!(thp, FrameId(0));
    mover.own(thp, 9);
    // Pageblocks 1..=5 hold one small movable frame each; 6 and 7 are free.
    for pb in 1..=5u64 {
        let f = FrameId(pb * 512 + 9);
        z.alloc_at(f, 0, M).unwrap();
        mover.own(f, 0);
    }
    let r = compact_full(&mut z, &mut mover);
    assert_eq!(r.status, CompactStatus::Compacted);
    z.validate().unwrap();
    check_ownership(&z, &mover);
    let (from, to, o) = mover.moves[0];
    assert_eq!((from, o), (thp, 9));
    assert_eq!(
        to,
        FrameId(7 * 512),
        "the huge block goes to the highest free pageblock"
    );
    // The small frames were packed into pageblock 6, so 0..=5 coalesce.
    let homes: BTreeSet<FrameId> = mover.contents.keys().map(|f| f.pageblock_start()).collect();
    assert_eq!(homes, BTreeSet::from([FrameId(6 * 512), FrameId(7 * 512)]));
    assert_eq!(z.largest_free_order(), Some(11));
    // Nothing movable at all: AlreadyFree; only pinned blocks: Failed.
    let mut empty = Zone::new(NodeId(0), FrameId(0), 1024);
    assert_eq!(
        compact_full(&mut empty, &mut mover).status,
        CompactStatus::AlreadyFree
    );
    let mut pinned = Zone::new(NodeId(0), FrameId(0), 1024);
    let p = pinned.alloc_at(FrameId(3), 0, M);
    p.unwrap();
    mover.own(FrameId(3), 0);
    mover.refuse.insert(FrameId(3));
    assert_eq!(
        compact_full(&mut pinned, &mut mover).status,
        CompactStatus::Failed
    );
    pinned.validate().unwrap();
}
