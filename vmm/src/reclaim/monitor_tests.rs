//! The monitor task against a real guest-mm pool.

use super::*;
use crate::reclaim::engine::{EngineConfig, Trigger};
use crate::reclaim::pressure::SyntheticPressure;
use guest_mm::frame::MigrateType;
use guest_mm::topology::Topology;

/// Accepts every move: the pool's books are the only record in these tests.
#[derive(Debug, Default)]
struct BooksOnly;

impl Mover for BooksOnly {
    fn move_block(&mut self, _: FrameId, _: FrameId, _: u8) -> Result<(), MoveError> {
        Ok(())
    }
}

fn pool(nodes: usize, mib_per_node: u64) -> Arc<Pool> {
    let topo = Topology::uniform(nodes, 1 << 30, 10, 20).expect("topology");
    let sizes: Vec<(NodeId, u64)> = (0..nodes)
        .map(|n| {
            (
                NodeId(n as u16),
                (mib_per_node << 20) / guest_mm::FRAME_SIZE,
            )
        })
        .collect();
    Arc::new(Pool::new(topo, &sizes).expect("pool"))
}

fn task(
    pool: &Arc<Pool>,
    accept: bool,
    placements: Vec<Placement>,
    engine: Option<Arc<ReclaimEngine>>,
) -> MonitorTask {
    let mover: Box<MoverFactory> = if accept {
        Box::new(|| Box::new(BooksOnly) as Box<dyn Mover>)
    } else {
        Box::new(|| Box::new(PinnedBlocks) as Box<dyn Mover>)
    };
    let actions = GuestMmActions::new(
        Arc::clone(pool),
        mover,
        Box::new(move || placements.clone()),
    );
    MonitorTask::new(Arc::new(actions), engine, MonitorConfig::default()).expect("task")
}

/// One node of 16 MiB where every 2 MiB block keeps one allocated 4 KiB frame: lots of free
/// memory, no free order-9 block.
fn fragment(p: &Pool) -> Vec<FrameId> {
    // Exactly every frame, so no allocation fails here.
    let frames = p.total_frames();
    let all: Vec<FrameId> = (0..frames)
        .map(|_| {
            p.alloc(0, MigrateType::Movable, &NumaPolicy::Local, NodeId(0))
                .expect("alloc")
                .0
        })
        .collect();
    let mut kept = Vec::new();
    for f in all {
        if f.0 % 512 == 7 {
            kept.push(f);
        } else {
            p.free(f, 0).expect("free");
        }
    }
    kept
}

#[test]
fn no_actions_on_a_quiet_pool() {
    let p = pool(1, 64);
    let t = task(&p, true, Vec::new(), None);
    assert!(t.tick().expect("tick").is_empty());
    let c = t.counters();
    assert_eq!(c.ticks, 1);
    assert!(c.triggers.is_empty());
}

#[test]
fn fragmentation_triggers_compaction() {
    let p = pool(1, 16);
    let kept = fragment(&p);
    assert_eq!(kept.len(), 8);
    let t = task(&p, true, Vec::new(), None);
    let actions = t.tick().expect("tick");
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Compact { order: 9, .. })),
        "{actions:?}"
    );
    let c = t.counters();
    assert_eq!(c.triggers("compact"), 1);
    assert_eq!(c.outcome("compact", "done"), 1);
    // A 2 MiB block can be taken now.
    assert!(p
        .alloc(9, MigrateType::Movable, &NumaPolicy::Local, NodeId(0))
        .is_ok());
}

#[test]
fn pinned_blocks_leave_compaction_incomplete() {
    let p = pool(1, 16);
    fragment(&p);
    let t = task(&p, false, Vec::new(), None);
    t.tick().expect("tick");
    let c = t.counters();
    assert_eq!(c.triggers("compact"), 1);
    assert_eq!(c.outcome("compact", "incomplete"), 1);
}

#[test]
fn allocation_failures_wake_the_reclaim_engine() {
    let p = pool(1, 16);
    fragment(&p);
    let engine = Arc::new(
        ReclaimEngine::new(EngineConfig::default(), SyntheticPressure::new()).expect("engine"),
    );
    let t = task(&p, false, Vec::new(), Some(Arc::clone(&engine)));
    t.tick().expect("tick");
    assert_eq!(t.counters().triggers("reclaim"), 0, "no failure yet");
    assert!(p
        .alloc(9, MigrateType::Movable, &NumaPolicy::Local, NodeId(0))
        .is_err());
    t.tick().expect("tick");
    let c = t.counters();
    assert_eq!(c.triggers("reclaim"), 1);
    assert_eq!(c.outcome("reclaim", "engine_notified"), 1);
    let r = engine.step().expect("step");
    assert_eq!(r.trigger, Some(Trigger::AllocFailure));
    // The same failure is not counted twice.
    t.tick().expect("tick");
    assert_eq!(t.counters().triggers("reclaim"), 1);
}

#[test]
fn remote_allocations_trigger_rebalancing() {
    // Two nodes of 256 MiB (128 blocks). Fill node 0, then 80 blocks preferring node 0 land
    // on node 1; free room on node 0 and let the monitor rebalance.
    let p = pool(2, 256);
    let bind0 = NumaPolicy::Bind(vec![NodeId(0)]);
    let pref0 = NumaPolicy::Preferred(NodeId(0));
    let mut node0 = Vec::new();
    for _ in 0..128 {
        node0.push(
            p.alloc(9, MigrateType::Movable, &bind0, NodeId(0))
                .expect("alloc")
                .0,
        );
    }
    let mut remote = Vec::new();
    for _ in 0..80 {
        let (f, n) = p
            .alloc(9, MigrateType::Movable, &pref0, NodeId(0))
            .expect("alloc");
        assert_eq!(n, NodeId(1));
        remote.push((f, 9u8));
    }
    for f in node0.drain(..80) {
        p.free(f, 9).expect("free");
    }
    let placements = vec![Placement {
        blocks: remote.clone(),
        policy: pref0.clone(),
    }];
    let t = task(&p, true, placements, None);
    let actions = t.tick().expect("tick");
    assert!(
        actions
            .iter()
            .any(|a| matches!(a, Action::Rebalance { .. })),
        "{actions:?}"
    );
    let c = t.counters();
    assert_eq!(c.triggers("rebalance"), 1);
    assert_eq!(c.outcome("rebalance", "done"), 1);
    let figures = p.stats().expect("stats");
    let free1 = figures
        .iter()
        .find(|s| s.node == NodeId(1))
        .map(|s| s.free)
        .expect("node 1");
    assert_eq!(
        free1 * guest_mm::FRAME_SIZE,
        256 << 20,
        "everything moved home"
    );
}

#[test]
fn config_is_validated() {
    let p = pool(1, 16);
    let actions: Arc<dyn PoolActions> = Arc::new(GuestMmActions::new(
        p,
        Box::new(|| Box::new(PinnedBlocks) as Box<dyn Mover>),
        Box::new(Vec::new),
    ));
    let bad = MonitorConfig {
        interval: Duration::ZERO,
        ..Default::default()
    };
    assert!(MonitorTask::new(Arc::clone(&actions), None, bad).is_err());
    let th = Thresholds {
        watermark_min: 0.9,
        ..Default::default()
    };
    let bad = MonitorConfig {
        thresholds: th,
        ..Default::default()
    };
    assert!(MonitorTask::new(actions, None, bad).is_err());
}

#[test]
fn thread_driver_ticks_and_stops() {
    let p = pool(1, 16);
    let t = Arc::new(task(&p, true, Vec::new(), None));
    let h = t.spawn().expect("spawn");
    let t0 = std::time::Instant::now();
    while t.counters().ticks == 0 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    h.stop();
    assert!(t.counters().ticks >= 1);
}

#[test]
fn a_low_pool_is_noted_without_waking_the_engine() {
    // 16 MiB = 8 blocks; take 8: free 0 < low.
    let p = pool(1, 16);
    for _ in 0..8 {
        p.alloc(9, MigrateType::Movable, &NumaPolicy::Local, NodeId(0))
            .expect("alloc");
    }
    let engine = Arc::new(
        ReclaimEngine::new(EngineConfig::default(), SyntheticPressure::new()).expect("engine"),
    );
    let t = task(&p, false, Vec::new(), Some(Arc::clone(&engine)));
    let actions = t.tick().expect("tick");
    assert!(
        actions.iter().any(|a| matches!(
            a,
            Action::Reclaim {
                reason: guest_mm::monitor::ReclaimReason::LowWatermark,
                urgent: true,
                ..
            }
        )),
        "{actions:?}"
    );
    let c = t.counters();
    assert_eq!(c.triggers("reclaim"), 1);
    assert_eq!(c.outcome("reclaim", "pool_low_noted"), 1);
    assert_eq!(
        engine.step().expect("step").trigger,
        None,
        "engine not woken"
    );
}

#[test]
fn compaction_settings_are_checked() {
    assert_eq!(compact_order_of_mib(2), Ok(9));
    assert_eq!(compact_order_of_mib(4), Ok(10));
    assert_eq!(compact_order_of_mib(128), Ok(15));
    assert_eq!(compact_order_of_mib(1024), Ok(guest_mm::MAX_ORDER));
    for bad in [0, 1, 3, 6, 100] {
        assert_eq!(
            compact_order_of_mib(bad),
            Err(CompactConfigError::NotPowerOfTwo(bad))
        );
    }
    assert_eq!(
        compact_order_of_mib(2048),
        Err(CompactConfigError::TooLarge {
            mib: 2048,
            max_mib: 1024
        })
    );
    let mut c = MonitorConfig::default();
    assert_eq!(
        c.thresholds.compact_order,
        compact_order_of_mib(DEFAULT_COMPACT_ORDER_MIB).unwrap()
    );
    for t in [0.0, -0.1, 1.5, f64::NAN] {
        assert!(matches!(
            c.set_compaction(Some(4), Some(t)),
            Err(CompactConfigError::Threshold(_))
        ));
    }
    // A refused setting changes nothing.
    assert_eq!(c, MonitorConfig::default());
    c.set_compaction(Some(4), Some(0.3)).unwrap();
    assert_eq!(c.thresholds.compact_order, 10);
    assert_eq!(c.thresholds.fragmentation_threshold, 0.3);
    c.set_compaction(None, Some(1.0)).unwrap();
    assert_eq!(c.thresholds.compact_order, 10);
    assert_eq!(c.thresholds.fragmentation_threshold, 1.0);
}
