//! Tests of [`Pool::migrate_misplaced`] with a fake mover.

use super::super::tests::{fill, free_frames, n, pool2, pool4, MT, NODE_FRAMES};
use super::*;
use crate::compaction::{MoveError, Mover};
use crate::policy::PolicyError;
use std::collections::HashSet;

/// A mover that records moves and refuses the frames it is told to.
#[derive(Default)]
struct FakeMover {
    refuse: HashSet<FrameId>,
    moved: Vec<(FrameId, FrameId, u8)>,
}

impl Mover for FakeMover {
    fn move_block(&mut self, from: FrameId, to: FrameId, order: u8) -> Result<(), MoveError> {
        if self.refuse.contains(&from) {
            return Err(MoveError::Busy(from));
        }
        self.moved.push((from, to, order));
        Ok(())
    }
}

#[test]
fn migrate_misplaced_bind_moves_to_nearest_bound_node() {
    let p = pool4();
    // Three blocks on node 0 and one on node 2.
    let mut blocks = Vec::new();
    for _ in 0..3 {
        blocks.push((p.alloc(9, MT, &NumaPolicy::Local, n(0)).unwrap().0, 9u8));
    }
    let (on2, _) = p.alloc(6, MT, &NumaPolicy::Local, n(2)).unwrap();
    blocks.push((on2, 6));
    let mut mover = FakeMover::default();
    mover.refuse.insert(blocks[1].0);
    // Bind to {2, 3}: node-0 blocks go to node 2 (20, nearer than 3 at 22).
    let bind = NumaPolicy::Bind(vec![n(3), n(2)]);
    let st = p.migrate_misplaced(&blocks, &bind, &mut mover).unwrap();
    assert_eq!(st.examined, 4);
    assert_eq!(st.moved, 2);
    assert_eq!(st.moved_frames, 1024);
    assert_eq!(st.mover_refused, 1);
    assert_eq!(st.well_placed, 1);
    assert_eq!(mover.moved.len(), 2);
    for m in &st.moves {
        assert_eq!(m.from_node, n(0));
        assert_eq!(m.to_node, n(2));
        assert_eq!(p.node_of(m.to), Some(n(2)));
        assert!(p.with_zone(n(0), |z| z.is_free(m.from)).unwrap());
        assert_eq!(
            p.with_zone(n(2), |z| z.allocation_at(m.to)).unwrap(),
            Some((m.to, 9, MT))
        );
    }
    // The refused block is still allocated on node 0; its destination was given back.
    assert_eq!(
        p.with_zone(n(0), |z| z.allocation_at(blocks[1].0)).unwrap(),
        Some((blocks[1].0, 9, MT))
    );
    assert_eq!(free_frames(&p, n(0)), NODE_FRAMES - 512);
    assert_eq!(free_frames(&p, n(2)), NODE_FRAMES - 1024 - 64);
    p.validate().unwrap();

    // With node 2 full except what it has, the next misplaced block goes to node 3.
    fill(&p, n(2));
    mover.refuse.clear();
    let st = p
        .migrate_misplaced(&[(blocks[1].0, 9)], &bind, &mut mover)
        .unwrap();
    assert_eq!(st.moved, 1);
    assert_eq!(st.moves[0].to_node, n(3));
    // With both bound nodes full, nothing moves.
    fill(&p, n(3));
    let (b, _) = p.alloc(9, MT, &NumaPolicy::Local, n(0)).unwrap();
    let st = p.migrate_misplaced(&[(b, 9)], &bind, &mut mover).unwrap();
    assert_eq!((st.moved, st.no_room), (0, 1));
    p.validate().unwrap();
}

#[test]
fn migrate_misplaced_preferred_and_invalid_entries() {
    let p = pool2();
    let (a, _) = p.alloc(9, MT, &NumaPolicy::Local, n(0)).unwrap();
    let (b, _) = p.alloc(0, MT, &NumaPolicy::Local, n(1)).unwrap();
    let mut mover = FakeMover::default();
    let entries = [
        (a, 9),
        (b, 0),
        (a, 8),                        // wrong order
        (FrameId(a.0 + 1), 0),         // a tail frame
        (FrameId(NODE_FRAMES * 9), 0), // outside the pool
    ];
    let st = p
        .migrate_misplaced(&entries, &NumaPolicy::Preferred(n(1)), &mut mover)
        .unwrap();
    assert_eq!(st.examined, 5);
    assert_eq!(st.moved, 1);
    assert_eq!(st.well_placed, 1);
    assert_eq!(st.invalid, 3);
    assert_eq!(st.moves[0].from, a);
    assert_eq!(p.node_of(st.moves[0].to), Some(n(1)));
    // Preferred node full: the block stays (no room), not moved elsewhere.
    let (c, _) = p.alloc(9, MT, &NumaPolicy::Local, n(0)).unwrap();
    fill(&p, n(1));
    let st = p
        .migrate_misplaced(&[(c, 9)], &NumaPolicy::Preferred(n(1)), &mut mover)
        .unwrap();
    assert_eq!((st.moved, st.no_room), (0, 1));
    // Local and Interleave move nothing; an invalid policy is an error.
    let st = p
        .migrate_misplaced(&[(c, 9)], &NumaPolicy::Local, &mut mover)
        .unwrap();
    assert_eq!(st.well_placed, 1);
    assert_eq!(
        p.migrate_misplaced(&[(c, 9)], &NumaPolicy::Bind(vec![n(7)]), &mut mover)
            .unwrap_err(),
        PoolError::Policy(PolicyError::UnknownNode(n(7)))
    );
    p.validate().unwrap();
}
