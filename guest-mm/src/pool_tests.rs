use super::*;
use crate::monitor::ReclaimReason;
use crate::policy::KindStats;

pub(super) fn n(i: u16) -> NodeId {
    NodeId(i)
}

pub(super) const MT: MigrateType = MigrateType::Movable;
/// Frames per node in most tests: 4 order-9 blocks.
pub(super) const NODE_FRAMES: u64 = 2048;

pub(super) fn packed() -> PoolConfig {
    PoolConfig {
        align_frames: 1,
        sample_every: 1,
    }
}

pub(super) fn pool2() -> Pool {
    let t = Topology::uniform(2, NODE_FRAMES * 4096, 10, 20).unwrap();
    Pool::with_config(t, &[(n(0), NODE_FRAMES), (n(1), NODE_FRAMES)], packed()).unwrap()
}

/// 0-1 and 2-3 close (12); 0-2 and 1-3 at 20; 0-3 and 1-2 at 22.
pub(super) fn pool4() -> Pool {
    let t = Topology::synthetic(
        4,
        NODE_FRAMES * 4096,
        vec![
            vec![10, 12, 20, 22],
            vec![12, 10, 22, 20],
            vec![20, 22, 10, 12],
            vec![22, 20, 12, 10],
        ],
    )
    .unwrap();
    let sizes: Vec<(NodeId, u64)> = (0..4).map(|i| (n(i), NODE_FRAMES)).collect();
    Pool::with_config(t, &sizes, PoolConfig::default()).unwrap()
}

/// Allocate every order-9 block of `node` (Bind to it); returns the frames.
pub(super) fn fill(p: &Pool, node: NodeId) -> Vec<FrameId> {
    let mut v = Vec::new();
    while let Ok((f, got)) = p.alloc(9, MT, &NumaPolicy::Bind(vec![node]), node) {
        assert_eq!(got, node);
        v.push(f);
    }
    v
}

pub(super) fn free_frames(p: &Pool, node: NodeId) -> u64 {
    p.with_zone(node, |z| z.stats().free).unwrap()
}

#[test]
fn layout_aligned_and_packed() {
    let t = Topology::uniform(3, 1 << 30, 10, 20).unwrap();
    let p = Pool::new(t.clone(), &[(n(2), 700), (n(0), 1000), (n(1), 0)]).unwrap();
    assert_eq!(
        p.layout(),
        vec![
            ZoneLayout {
                node: n(0),
                start: FrameId(0),
                nr_frames: 1000
            },
            ZoneLayout {
                node: n(2),
                start: FrameId(GIB_FRAMES),
                nr_frames: 700
            },
        ]
    );
    assert_eq!(p.total_frames(), 1700);
    assert_eq!(p.end(), FrameId(GIB_FRAMES + 700));
    assert_eq!(p.node_of(FrameId(999)), Some(n(0)));
    assert_eq!(p.node_of(FrameId(1000)), None); // the gap
    assert_eq!(p.node_of(FrameId(GIB_FRAMES)), Some(n(2)));
    assert_eq!(p.node_of(FrameId(GIB_FRAMES + 700)), None);
    p.validate().unwrap();

    let p = Pool::with_config(t, &[(n(0), 1000), (n(1), 24)], packed()).unwrap();
    assert_eq!(p.layout()[1].start, FrameId(1000));
    assert_eq!(p.node_of(FrameId(1023)), Some(n(1)));
    p.validate().unwrap();
}

#[test]
fn construction_errors() {
    let t = Topology::uniform(2, 1 << 30, 10, 20).unwrap();
    assert_eq!(
        Pool::new(t.clone(), &[(n(5), 10)]).unwrap_err(),
        PoolError::UnknownNode(n(5))
    );
    assert_eq!(
        Pool::new(t.clone(), &[(n(1), 10), (n(1), 20)]).unwrap_err(),
        PoolError::DuplicateNode(n(1))
    );
    assert_eq!(
        Pool::new(t.clone(), &[(n(0), 0)]).unwrap_err(),
        PoolError::Empty
    );
    let cfg = PoolConfig {
        align_frames: 3,
        ..Default::default()
    };
    assert_eq!(
        Pool::with_config(t.clone(), &[(n(0), 8)], cfg).unwrap_err(),
        PoolError::BadAlignment(3)
    );
    assert!(matches!(
        Pool::with_config(t, &[(n(0), u64::MAX)], packed()),
        Err(PoolError::Zone { .. })
    ));
}

#[test]
fn local_falls_back_to_remote_when_full() {
    let p = pool2();
    let mut frames = Vec::new();
    for _ in 0..4 {
        let (f, node) = p.alloc(9, MT, &NumaPolicy::Local, n(0)).unwrap();
        assert_eq!(node, n(0));
        assert_eq!(p.node_of(f), Some(n(0)));
        frames.push(f);
    }
    let (f, node) = p.alloc(9, MT, &NumaPolicy::Local, n(0)).unwrap();
    assert_eq!(node, n(1));
    assert_eq!(p.node_of(f), Some(n(1)));
    let s = p.monitor().policy().snapshot();
    assert_eq!(
        s.local,
        KindStats {
            local: 4,
            remote: 1,
            failed: 0
        }
    );
    let snap = p.snapshot(vec![]).unwrap();
    assert_eq!(snap.node(n(0)).misses, 1);
    assert_eq!(snap.node(n(0)).allocs, 4);
    assert_eq!(snap.node(n(1)).allocs, 1);
    assert_eq!(snap.order(9).allocs, 5);
    // Everything is sampled with sample_every = 1.
    assert_eq!(snap.latency.samples, 5);
    // Caller on node 1 is served locally.
    let (_, node) = p.alloc(0, MT, &NumaPolicy::Local, n(1)).unwrap();
    assert_eq!(node, n(1));
    p.validate().unwrap();
}

#[test]
fn local_and_preferred_fall_back_by_distance_on_4_nodes() {
    let p = pool4();
    // Local on node 2: 2, then 3 (12), then 0 (20), then 1 (22).
    let mut order = Vec::new();
    while let Ok((_, node)) = p.alloc(9, MT, &NumaPolicy::Local, n(2)) {
        order.push(node);
    }
    let expect: Vec<NodeId> = [2, 3, 0, 1].iter().flat_map(|&i| [n(i); 4]).collect();
    assert_eq!(order, expect);
    assert_eq!(
        p.alloc(9, MT, &NumaPolicy::Local, n(2)).unwrap_err(),
        PoolError::OutOfMemory {
            order: 9,
            kind: PolicyKind::Local
        }
    );
    let s = p.monitor().policy().snapshot().local;
    assert_eq!((s.local, s.remote, s.failed), (4, 12, 2));
    p.validate().unwrap();

    // Preferred(1) from a caller on node 3: 1, then 0 (12), then 3 (20), then 2.
    let p = pool4();
    let mut order = Vec::new();
    while let Ok((_, node)) = p.alloc(9, MT, &NumaPolicy::Preferred(n(1)), n(3)) {
        order.push(node);
    }
    let expect: Vec<NodeId> = [1, 0, 3, 2].iter().flat_map(|&i| [n(i); 4]).collect();
    assert_eq!(order, expect);
    let s = p.monitor().policy().snapshot().preferred;
    assert_eq!((s.local, s.remote), (4, 12));
}

#[test]
fn bind_never_leaves_its_nodes_and_fails_cleanly() {
    let p = pool4();
    let bind = NumaPolicy::Bind(vec![n(3), n(1)]);
    let mut got = Vec::new();
    // The caller on node 0: nearest bound node is 1 (12), then 3 (22).
    while let Ok((f, node)) = p.alloc(9, MT, &bind, n(0)) {
        assert_eq!(p.node_of(f), Some(node));
        got.push((f, node));
    }
    let nodes: Vec<NodeId> = got.iter().map(|g| g.1).collect();
    let expect: Vec<NodeId> = [1, 3].iter().flat_map(|&i| [n(i); 4]).collect();
    assert_eq!(nodes, expect);
    let err = p.alloc(9, MT, &bind, n(0)).unwrap_err();
    assert_eq!(
        err,
        PoolError::OutOfMemory {
            order: 9,
            kind: PolicyKind::Bind
        }
    );
    // Nodes 0 and 2 were never touched.
    assert_eq!(free_frames(&p, n(0)), NODE_FRAMES);
    assert_eq!(free_frames(&p, n(2)), NODE_FRAMES);
    // Order 0 fails too: the bound nodes are completely full.
    assert!(p.alloc(0, MT, &bind, n(0)).is_err());
    let s = p.monitor().policy().snapshot().bind;
    assert_eq!((s.local, s.remote, s.failed), (4, 4, 3));
    // Freeing one block on node 3 lets Bind allocate again, there.
    let (f3, _) = got[5];
    assert_eq!(p.free(f3, 9).unwrap(), n(3));
    assert_eq!(p.alloc(9, MT, &bind, n(0)).unwrap(), (f3, n(3)));
    // Unknown bound nodes are a policy error, not an OOM.
    assert_eq!(
        p.alloc(0, MT, &NumaPolicy::Bind(vec![n(9)]), n(0))
            .unwrap_err(),
        PoolError::Policy(PolicyError::UnknownNode(n(9)))
    );
    p.validate().unwrap();
}

#[test]
fn interleave_spreads_evenly_and_falls_back_within_set() {
    let t = Topology::uniform(4, 1 << 30, 10, 20).unwrap();
    let sizes: Vec<(NodeId, u64)> = (0..4).map(|i| (n(i), 1 << 14)).collect();
    let p = Pool::with_config(t, &sizes, packed()).unwrap();
    let all = NumaPolicy::Interleave(vec![n(0), n(1), n(2), n(3)]);
    let mut per_node = [0u32; 4];
    for _ in 0..400 {
        let (_, node) = p.alloc(0, MT, &all, n(0)).unwrap();
        per_node[usize::from(node.0)] += 1;
    }
    assert_eq!(per_node, [100; 4]);
    let pair = NumaPolicy::Interleave(vec![n(1), n(3)]);
    let mut per_node = [0u32; 4];
    for _ in 0..300 {
        let (_, node) = p.alloc(0, MT, &pair, n(0)).unwrap();
        per_node[usize::from(node.0)] += 1;
    }
    assert_eq!(per_node, [0, 150, 0, 150]);
    let s = p.monitor().policy().snapshot().interleave;
    assert_eq!((s.local, s.remote), (700, 0));

    // With node 1 full, the pair falls back to node 3 only (never 0 or 2).
    let p = pool2_plus(4);
    fill(&p, n(1));
    let pair = NumaPolicy::Interleave(vec![n(1), n(3)]);
    for _ in 0..4 {
        let (_, node) = p.alloc(9, MT, &pair, n(0)).unwrap();
        assert_eq!(node, n(3));
    }
    assert!(p.alloc(9, MT, &pair, n(0)).is_err());
    assert_eq!(free_frames(&p, n(0)), NODE_FRAMES);
    assert_eq!(free_frames(&p, n(2)), NODE_FRAMES);
    let s = p.monitor().policy().snapshot().interleave;
    assert_eq!((s.local, s.remote, s.failed), (2, 2, 1));
}

/// `nodes` uniform nodes of NODE_FRAMES frames each.
fn pool2_plus(nodes: usize) -> Pool {
    let t = Topology::uniform(nodes, NODE_FRAMES * 4096, 10, 20).unwrap();
    let sizes: Vec<(NodeId, u64)> = (0..nodes as u16).map(|i| (n(i), NODE_FRAMES)).collect();
    Pool::with_config(t, &sizes, packed()).unwrap()
}

#[test]
fn free_and_alloc_across_nodes_validate() {
    let p = pool4();
    let mut live = Vec::new();
    for i in 0..64u16 {
        let order = (i % 4) as u8 * 3; // 0, 3, 6, 9
        let pol = match i % 4 {
            0 => NumaPolicy::Local,
            1 => NumaPolicy::Preferred(n(i % 4)),
            2 => NumaPolicy::Interleave(vec![n(0), n(2)]),
            _ => NumaPolicy::Bind(vec![n(1), n(3)]),
        };
        if let Ok((f, node)) = p.alloc(order, MT, &pol, n(i % 4)) {
            assert_eq!(p.node_of(f), Some(node));
            live.push((f, order));
        }
    }
    p.validate().unwrap();
    let before: u64 = p.stats().unwrap().iter().map(|s| s.free).sum();
    for (k, &(f, order)) in live.iter().enumerate() {
        if k % 2 == 0 {
            p.free(f, order).unwrap();
        }
    }
    p.validate().unwrap();
    let after: u64 = p.stats().unwrap().iter().map(|s| s.free).sum();
    let freed: u64 = live.iter().step_by(2).map(|&(_, o)| 1u64 << o).sum();
    assert_eq!(after - before, freed);
    for &(f, order) in live.iter().skip(1).step_by(2) {
        p.free(f, order).unwrap();
    }
    p.validate().unwrap();
    assert!(p
        .stats()
        .unwrap()
        .iter()
        .all(|s| s.free == NODE_FRAMES && s.allocated == 0));
    let snap = p.snapshot(vec![]).unwrap();
    assert_eq!(snap.totals.frees, live.len() as u64);
    // Errors: double free, a frame in a gap, a wrong order.
    let (f, _) = live[0];
    assert!(matches!(
        p.free(f, live[0].1),
        Err(PoolError::Free {
            source: FreeError::DoubleFree(_),
            ..
        })
    ));
    assert_eq!(
        p.free(FrameId(NODE_FRAMES + 5), 0).unwrap_err(),
        PoolError::NotInPool(FrameId(NODE_FRAMES + 5))
    );
    let (g, _) = p.alloc(3, MT, &NumaPolicy::Local, n(0)).unwrap();
    assert!(matches!(p.free(g, 2), Err(PoolError::Free { .. })));
    assert!(matches!(
        p.alloc(MAX_ORDER + 1, MT, &NumaPolicy::Local, n(0)),
        Err(PoolError::Request(AllocError::InvalidOrder(_)))
    ));
    assert!(matches!(
        p.alloc(0, MigrateType::Isolate, &NumaPolicy::Local, n(0)),
        Err(PoolError::Request(AllocError::InvalidType(_)))
    ));
    assert_eq!(
        p.alloc(0, MT, &NumaPolicy::Local, n(8)).unwrap_err(),
        PoolError::Policy(PolicyError::UnknownLocalNode(n(8)))
    );
    p.validate().unwrap();
}

#[test]
fn concurrent_alloc_free_keeps_pool_consistent() {
    let p = pool4();
    std::thread::scope(|s| {
        for t in 0..4u16 {
            let p = &p;
            s.spawn(move || {
                let pol = match t {
                    0 => NumaPolicy::Local,
                    1 => NumaPolicy::Interleave(vec![n(0), n(1), n(2), n(3)]),
                    2 => NumaPolicy::Bind(vec![n(2)]),
                    _ => NumaPolicy::Preferred(n(1)),
                };
                let mut live = Vec::new();
                for i in 0..2000u32 {
                    let order = (i % 5) as u8;
                    if i % 3 == 2 {
                        if let Some((f, o)) = live.pop() {
                            p.free(f, o).unwrap();
                        }
                    } else if let Ok((f, node)) = p.alloc(order, MT, &pol, n(t)) {
                        assert!(pol.allows(node));
                        live.push((f, order));
                    }
                }
                for (f, o) in live {
                    p.free(f, o).unwrap();
                }
            });
        }
    });
    p.validate().unwrap();
    assert!(p.stats().unwrap().iter().all(|s| s.free == NODE_FRAMES));
    let snap = p.snapshot(vec![]).unwrap();
    assert_eq!(snap.totals.allocs, snap.totals.frees);
}

#[test]
fn pool_snapshot_drives_monitor_actions() {
    let p = pool2();
    let th = Thresholds::default();
    assert!(p.evaluate(&th).unwrap().is_empty());
    let held = fill(&p, n(0));
    let actions = p.evaluate(&th).unwrap();
    assert!(actions.contains(&Action::Reclaim {
        node: n(0),
        frames: (NODE_FRAMES as f64 * th.watermark_high).ceil() as u64,
        urgent: true,
        reason: ReclaimReason::LowWatermark,
    }));
    let figs = p.zone_figures().unwrap();
    assert_eq!(figs[0].free_frames, 0);
    assert_eq!(figs[1].free_frames, NODE_FRAMES);
    assert_eq!(figs[1].free_blocks[11], 1);
    assert_eq!(figs[1].fragmentation_index[9], None);
    for f in held {
        p.free(f, 9).unwrap();
    }
    assert!(p.evaluate(&th).unwrap().is_empty());
    let json = serde_json::to_string(&p.snapshot(vec![]).unwrap()).unwrap();
    assert!(json.contains("\"zones\""));
}

mod prop {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn policy(k: u8, a: u16, b: u16) -> NumaPolicy {
        match k % 4 {
            0 => NumaPolicy::Local,
            1 => NumaPolicy::Preferred(n(a)),
            2 if a != b => NumaPolicy::Interleave(vec![n(a), n(b)]),
            2 => NumaPolicy::Interleave(vec![n(a)]),
            _ if a != b => NumaPolicy::Bind(vec![n(a), n(b)]),
            _ => NumaPolicy::Bind(vec![n(a)]),
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Random alloc/free sequences under random policies: every block lands on a node
        /// its policy allows, blocks never overlap, the pool validates, and freeing
        /// everything restores every zone.
        #[test]
        fn random_ops_keep_pool_valid(
            ops in proptest::collection::vec(
                (any::<bool>(), 0u8..4, 0u16..4, 0u16..4, 0u16..4, 0u8..=10, any::<u16>()),
                1..300,
            )
        ) {
            let p = pool4();
            let mut live: BTreeMap<u64, (u64, u8)> = BTreeMap::new();
            for (is_alloc, k, a, b, local, order, pick) in ops {
                if is_alloc || live.is_empty() {
                    let pol = policy(k, a, b);
                    match p.alloc(order, MT, &pol, n(local)) {
                        Ok((f, node)) => {
                            prop_assert!(pol.allows(node));
                            prop_assert_eq!(p.node_of(f), Some(node));
                            prop_assert!(f.is_aligned(order));
                            let end = f.0 + (1u64 << order);
                            if let Some((_, &(e, _))) = live.range(..f.0).next_back() {
                                prop_assert!(e <= f.0);
                            }
                            if let Some((&s, _)) = live.range(f.0..).next() {
                                prop_assert!(end <= s);
                            }
                            live.insert(f.0, (end, order));
                        }
                        Err(PoolError::OutOfMemory { .. }) => {}
                        Err(e) => prop_assert!(false, "unexpected error {e}"),
                    }
                } else {
                    let key = *live.keys().nth(usize::from(pick) % live.len()).unwrap();
                    let (_, order) = live.remove(&key).unwrap();
                    p.free(FrameId(key), order).unwrap();
                }
            }
            p.validate().unwrap();
            for (s, (_, order)) in live {
                p.free(FrameId(s), order).unwrap();
            }
            p.validate().unwrap();
            prop_assert!(p.stats().unwrap().iter().all(|s| s.free == NODE_FRAMES));
        }
    }
}
