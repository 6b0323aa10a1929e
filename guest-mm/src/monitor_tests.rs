use super::*;
use crate::policy::PolicyKind;

fn n(i: u16) -> NodeId {
    NodeId(i)
}

#[test]
fn buckets_are_log2() {
    assert_eq!(latency_bucket(0), 0);
    assert_eq!(latency_bucket(1), 0);
    assert_eq!(latency_bucket(2), 1);
    assert_eq!(latency_bucket(3), 1);
    assert_eq!(latency_bucket(4), 2);
    assert_eq!(latency_bucket(1023), 9);
    assert_eq!(latency_bucket(1024), 10);
    assert_eq!(latency_bucket(u64::MAX), 63);
    assert_eq!(bucket_upper_ns(0), 1);
    assert_eq!(bucket_upper_ns(10), 2047);
    assert_eq!(bucket_upper_ns(63), u64::MAX);
    for ns in [0u64, 1, 5, 100, 4096, 1 << 40] {
        assert!(ns <= bucket_upper_ns(latency_bucket(ns)));
    }
}

#[test]
fn percentiles_from_buckets() {
    let h = LatencyHistogram::default();
    assert_eq!(h.snapshot().p50_ns, None);
    // 90 samples of ~100 ns (bucket 6: 64..127), 9 of ~1000 ns (bucket 9), 1 of 1 ms.
    for _ in 0..90 {
        h.record(100);
    }
    for _ in 0..9 {
        h.record(1000);
    }
    h.record(1_000_000);
    let s = h.snapshot();
    assert_eq!(s.samples, 100);
    assert_eq!(s.buckets.len(), 20); // 1e6 ns is in bucket 19; trailing zeros cut
    assert_eq!(s.p50_ns, Some(127));
    assert_eq!(s.p90_ns, Some(127));
    assert_eq!(s.p99_ns, Some(1023));
    assert_eq!(s.p999_ns, Some((1 << 20) - 1));
    assert_eq!(s.percentile(0.0), Some(127));
    assert_eq!(s.percentile(1.0), Some((1 << 20) - 1));
    assert_eq!(s.percentile(f64::NAN), Some((1 << 20) - 1));
}

#[test]
fn sampling_is_one_in_n_per_thread() {
    // A fresh thread has a fresh counter, so the count is exact.
    std::thread::spawn(|| {
        let m = Monitor::new(&[n(0)], 6); // rounded up to 8
        assert_eq!(m.sample_every(), 8);
        let mut sampled = 0;
        for _ in 0..1000 {
            let t = m.start_sample();
            sampled += usize::from(t.is_some());
            m.record_alloc(0, n(0), t);
        }
        assert_eq!(sampled, 125);
        let s = m.snapshot(vec![], vec![]);
        assert_eq!(s.latency.samples, 125);
        assert_eq!(s.totals.allocs, 1000);
        assert_eq!(s.node(n(0)).allocs, 1000);
    })
    .join()
    .unwrap();
    let every = Monitor::new(&[], 0);
    assert_eq!(every.sample_every(), 1);
    assert!((0..10).all(|_| every.start_sample().is_some()));
    assert_eq!(Monitor::new(&[], u32::MAX).sample_every(), 1 << 31);
}

#[test]
fn counters_per_order_and_node() {
    let m = Monitor::new(&[n(1), n(0), n(1)], 1);
    m.record_alloc(0, n(0), None);
    m.record_alloc(9, n(1), None);
    m.record_alloc(9, n(1), None);
    m.record_free(9);
    m.record_failure(9, None);
    m.record_node_miss(n(0));
    m.record_node_miss(n(7)); // unknown nodes are ignored
    m.record_alloc(200, n(7), None); // out-of-range order ignored
    m.policy().record(PolicyKind::Local, n(0), n(1));
    let s = m.snapshot(vec![], vec![SlabFigures::new("vq", 3, 1)]);
    assert_eq!(s.orders.len(), 2);
    assert_eq!(
        s.order(9),
        OrderStats {
            order: 9,
            allocs: 2,
            frees: 1,
            failures: 1
        }
    );
    assert_eq!(s.order(0).allocs, 1);
    assert_eq!(
        s.order(5),
        OrderStats {
            order: 5,
            ..Default::default()
        }
    );
    assert_eq!(s.totals.allocs, 3);
    assert_eq!(s.nodes.len(), 2);
    assert_eq!(s.node(n(0)).misses, 1);
    assert_eq!(s.node(n(1)).allocs, 2);
    assert_eq!(s.policy.local.remote, 1);
    assert_eq!(s.slabs[0].hit_rate, 0.75);
    assert_eq!(SlabFigures::new("empty", 0, 0).hit_rate, 0.0);
    // The snapshot round-trips through JSON.
    let json = serde_json::to_string(&s).unwrap();
    let back: MonitorSnapshot = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    assert!(json.contains("\"p99_ns\""));
}

fn zone(node: u16, total: u64, free: u64, fi9: Option<f64>) -> ZoneFigures {
    let mut fragmentation_index = vec![None; NR_ORDERS];
    fragmentation_index[9] = fi9;
    fragmentation_index[4] = Some(0.9);
    ZoneFigures {
        node: n(node),
        total_frames: total,
        free_frames: free,
        free_blocks: vec![0; NR_ORDERS],
        fragmentation_index,
        unusable_free_index: vec![0.0; NR_ORDERS],
    }
}

#[test]
fn thresholds_validate() {
    assert!(Thresholds::default().validate().is_ok());
    let bad = Thresholds {
        watermark_low: 0.005,
        ..Default::default()
    };
    assert!(matches!(
        bad.validate(),
        Err(ThresholdError::WatermarkOrder { .. })
    ));
    let bad = Thresholds {
        remote_share_threshold: 1.5,
        ..Default::default()
    };
    assert!(matches!(
        bad.validate(),
        Err(ThresholdError::NotAFraction { .. })
    ));
    let bad = Thresholds {
        fragmentation_threshold: f64::NAN,
        ..Default::default()
    };
    assert!(bad.validate().is_err());
    let bad = Thresholds {
        compact_order: 19,
        ..Default::default()
    };
    assert_eq!(bad.validate(), Err(ThresholdError::Order(19)));
    let t: Thresholds = serde_json::from_str(r#"{"watermark_low":0.03}"#).unwrap();
    assert_eq!(t.watermark_low, 0.03);
    assert_eq!(t.watermark_high, 0.04);
    assert!(serde_json::from_str::<Thresholds>(r#"{"bogus":1}"#).is_err());
}

#[test]
fn reclaim_below_low_watermark() {
    let th = Thresholds::default(); // min 1%, low 2%, high 4%
    let snap = MonitorSnapshot {
        zones: vec![
            zone(0, 10_000, 150, Some(0.9)), // below low (200), above min (100)
            zone(1, 10_000, 50, None),       // below min
            zone(2, 10_000, 5_000, None),    // fine
        ],
        ..Default::default()
    };
    let a = evaluate_window(None, &snap, &th);
    assert_eq!(
        a,
        vec![
            Action::Reclaim {
                node: n(0),
                frames: 250,
                urgent: false,
                reason: ReclaimReason::LowWatermark
            },
            Action::Reclaim {
                node: n(1),
                frames: 350,
                urgent: true,
                reason: ReclaimReason::LowWatermark
            },
        ]
    );
}

#[test]
fn reclaim_on_misses_only_below_high() {
    let th = Thresholds::default();
    let prev = MonitorSnapshot {
        nodes: vec![
            NodeStats {
                node: n(0),
                allocs: 0,
                misses: 4,
            },
            NodeStats {
                node: n(1),
                allocs: 0,
                misses: 0,
            },
        ],
        ..Default::default()
    };
    let mut cur = prev.clone();
    cur.nodes[0].misses = 5;
    cur.nodes[1].misses = 1;
    cur.zones = vec![
        zone(0, 10_000, 300, None),   // between low and high: reclaim to high
        zone(1, 10_000, 9_000, None), // plenty free: no reclaim
    ];
    let a = evaluate_window(Some(&prev), &cur, &th);
    assert_eq!(
        a,
        vec![Action::Reclaim {
            node: n(0),
            frames: 100,
            urgent: false,
            reason: ReclaimReason::AllocationMisses
        }]
    );
    // Without new misses in the window, nothing.
    assert!(evaluate_window(Some(&cur), &cur, &th).is_empty());
}

#[test]
fn compact_when_order9_fragmented_and_for_failed_orders() {
    let th = Thresholds::default();
    let mut snap = MonitorSnapshot {
        zones: vec![
            zone(0, 10_000, 5_000, Some(0.8)),
            zone(1, 10_000, 5_000, Some(0.3)),
            zone(2, 10_000, 5_000, None),
            zone(3, 10_000, 100, Some(0.99)), // below low: reclaim, not compact
        ],
        ..Default::default()
    };
    let a = evaluate_window(None, &snap, &th);
    assert_eq!(
        a,
        vec![
            Action::Compact {
                node: n(0),
                order: 9
            },
            Action::Reclaim {
                node: n(3),
                frames: 300,
                urgent: false,
                reason: ReclaimReason::LowWatermark
            },
        ]
    );
    // A failure at order 4 in the window also checks order 4 (index 0.9 in every zone).
    snap.orders = vec![OrderStats {
        order: 4,
        allocs: 0,
        frees: 0,
        failures: 1,
    }];
    let a = evaluate_window(None, &snap, &th);
    let compacts: Vec<&Action> = a
        .iter()
        .filter(|x| matches!(x, Action::Compact { .. }))
        .collect();
    assert_eq!(compacts.len(), 4); // n0: 4 and 9; n1: 4; n2: 4
    assert!(a.contains(&Action::Compact {
        node: n(2),
        order: 4
    }));
    // The same cumulative failure count is not a new failure.
    assert_eq!(
        evaluate_window(Some(&snap), &snap, &th)
            .iter()
            .filter(|x| matches!(x, Action::Compact { order: 4, .. }))
            .count(),
        0
    );
}

#[test]
fn rebalance_when_remote_share_rises() {
    let th = Thresholds::default();
    let m = Monitor::new(&[n(0), n(1)], 1);
    for _ in 0..90 {
        m.policy().record(PolicyKind::Local, n(0), n(0));
    }
    for _ in 0..10 {
        m.policy().record(PolicyKind::Local, n(0), n(1));
    }
    // 10% remote: nothing.
    assert!(m.evaluate(&m.snapshot(vec![], vec![]), &th).is_empty());
    // The next window: 40 local, 60 remote (Bind fallback inside its set).
    for _ in 0..40 {
        m.policy().record(PolicyKind::Bind, n(1), n(1));
    }
    for _ in 0..60 {
        m.policy().record(PolicyKind::Bind, n(1), n(0));
    }
    let a = m.evaluate(&m.snapshot(vec![], vec![]), &th);
    assert_eq!(a, vec![Action::Rebalance { remote_share: 0.6 }]);
    // A small window (below min_window_allocs) never triggers, even if all remote.
    for _ in 0..10 {
        m.policy().record(PolicyKind::Local, n(0), n(1));
    }
    assert!(m.evaluate(&m.snapshot(vec![], vec![]), &th).is_empty());
    // Action serde form for the API.
    assert_eq!(
        serde_json::to_string(&Action::Compact {
            node: n(1),
            order: 9
        })
        .unwrap(),
        r#"{"action":"compact","node":1,"order":9}"#
    );
}
