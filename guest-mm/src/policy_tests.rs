use super::*;
use crate::topology::NodeInfo;

fn n(i: u16) -> NodeId {
    NodeId(i)
}

fn two() -> Topology {
    Topology::uniform(2, 1 << 30, 10, 20).unwrap()
}

/// 0-1 and 2-3 are close pairs (12); cross pairs are 20 or 22.
fn four() -> Topology {
    Topology::synthetic(
        4,
        1 << 30,
        vec![
            vec![10, 12, 20, 22],
            vec![12, 10, 22, 20],
            vec![20, 22, 10, 12],
            vec![22, 20, 12, 10],
        ],
    )
    .unwrap()
}

#[test]
fn serde_wire_form() {
    let cases = [
        (NumaPolicy::Local, r#"{"mode":"local"}"#),
        (
            NumaPolicy::Preferred(n(1)),
            r#"{"mode":"preferred","node":1}"#,
        ),
        (
            NumaPolicy::Interleave(vec![n(0), n(2)]),
            r#"{"mode":"interleave","nodes":[0,2]}"#,
        ),
        (
            NumaPolicy::Bind(vec![n(3)]),
            r#"{"mode":"bind","nodes":[3]}"#,
        ),
    ];
    for (p, json) in cases {
        assert_eq!(serde_json::to_string(&p).unwrap(), json);
        assert_eq!(serde_json::from_str::<NumaPolicy>(json).unwrap(), p);
    }
}

#[test]
fn serde_rejects_bad_input() {
    for bad in [
        r#"{"mode":"bind","nodes":[]}"#,
        r#"{"mode":"interleave","nodes":[1,1]}"#,
        r#"{"mode":"preferred"}"#,
        r#"{"mode":"preferred","node":1,"extra":2}"#,
        r#"{"mode":"strict"}"#,
        r#"{"mode":"preferred","node":-1}"#,
        r#"{"mode":"preferred","node":70000}"#,
        r#"{"nodes":[0]}"#,
    ] {
        assert!(
            serde_json::from_str::<NumaPolicy>(bad).is_err(),
            "accepted {bad}"
        );
    }
}

#[test]
fn validate_against_topology() {
    let t = four();
    assert!(NumaPolicy::Local.validate(&t).is_ok());
    assert!(NumaPolicy::Preferred(n(3)).validate(&t).is_ok());
    assert_eq!(
        NumaPolicy::Preferred(n(4)).validate(&t),
        Err(PolicyError::UnknownNode(n(4)))
    );
    assert_eq!(
        NumaPolicy::Bind(vec![n(1), n(9)]).validate(&t),
        Err(PolicyError::UnknownNode(n(9)))
    );
    assert_eq!(
        NumaPolicy::Interleave(vec![]).validate(&t),
        Err(PolicyError::EmptyNodeSet(PolicyKind::Interleave))
    );
    assert_eq!(
        NumaPolicy::Bind(vec![n(2), n(2)]).validate(&t),
        Err(PolicyError::DuplicateNode(n(2)))
    );
    // A set made only of memory-less nodes.
    let mk = |id, mem: u64| NodeInfo {
        id: n(id),
        mem_bytes: mem,
        has_memory: mem > 0,
        cpus: vec![],
    };
    let t = Topology::new(
        vec![mk(0, 1 << 30), mk(1, 0)],
        vec![vec![10, 20], vec![20, 10]],
    )
    .unwrap();
    assert_eq!(
        NumaPolicy::Bind(vec![n(1)]).validate(&t),
        Err(PolicyError::NoMemory(PolicyKind::Bind))
    );
    assert!(NumaPolicy::Bind(vec![n(0), n(1)]).validate(&t).is_ok());
}

#[test]
fn local_and_preferred_fall_back_by_distance() {
    let t = two();
    assert_eq!(
        candidate_nodes(&NumaPolicy::Local, &t, n(1), 0).unwrap(),
        vec![n(1), n(0)]
    );
    let t = four();
    assert_eq!(
        candidate_nodes(&NumaPolicy::Local, &t, n(2), 0).unwrap(),
        vec![n(2), n(3), n(0), n(1)]
    );
    // Preferred ignores the caller's node: order is by distance from the preferred node.
    assert_eq!(
        candidate_nodes(&NumaPolicy::Preferred(n(1)), &t, n(2), 0).unwrap(),
        vec![n(1), n(0), n(3), n(2)]
    );
    assert_eq!(
        candidate_nodes(&NumaPolicy::Local, &t, n(7), 0),
        Err(PolicyError::UnknownLocalNode(n(7)))
    );
    assert_eq!(
        candidate_nodes(&NumaPolicy::Preferred(n(7)), &t, n(0), 0),
        Err(PolicyError::UnknownNode(n(7)))
    );
}

#[test]
fn bind_stays_inside_its_set() {
    let t = four();
    // The caller is on node 0; bound to {3, 1}: nearest member to the caller first.
    assert_eq!(
        candidate_nodes(&NumaPolicy::Bind(vec![n(3), n(1)]), &t, n(0), 0).unwrap(),
        vec![n(1), n(3)]
    );
    // The caller on a bound node starts there.
    assert_eq!(
        candidate_nodes(&NumaPolicy::Bind(vec![n(1), n(3)]), &t, n(3), 5).unwrap(),
        vec![n(3), n(1)]
    );
    for local in 0..4 {
        let c = candidate_nodes(&NumaPolicy::Bind(vec![n(2)]), &t, n(local), 0).unwrap();
        assert_eq!(c, vec![n(2)]);
    }
    assert_eq!(
        candidate_nodes(&NumaPolicy::Bind(vec![n(5)]), &t, n(0), 0),
        Err(PolicyError::UnknownNode(n(5)))
    );
    assert_eq!(
        candidate_nodes(&NumaPolicy::Bind(vec![]), &t, n(0), 0),
        Err(PolicyError::EmptyNodeSet(PolicyKind::Bind))
    );
}

#[test]
fn interleave_round_robins_then_falls_back_within_set() {
    let t = four();
    let p = NumaPolicy::Interleave(vec![n(0), n(2), n(3)]);
    let firsts: Vec<NodeId> = (0..6)
        .map(|c| candidate_nodes(&p, &t, n(1), c).unwrap()[0])
        .collect();
    assert_eq!(firsts, vec![n(0), n(2), n(3), n(0), n(2), n(3)]);
    // Fallback stays in the set, ordered by distance from the round-robin target.
    assert_eq!(
        candidate_nodes(&p, &t, n(1), 1).unwrap(),
        vec![n(2), n(3), n(0)]
    );
    assert_eq!(
        candidate_nodes(&p, &t, n(1), 0).unwrap(),
        vec![n(0), n(2), n(3)]
    );
    let cur = InterleaveCursor::new();
    assert_eq!((cur.next(), cur.next(), cur.next()), (0, 1, 2));
}

#[test]
fn memoryless_nodes_are_skipped() {
    let mk = |id, mem: u64| NodeInfo {
        id: n(id),
        mem_bytes: mem,
        has_memory: mem > 0,
        cpus: vec![u32::from(id)],
    };
    let t = Topology::new(
        vec![mk(0, 1 << 30), mk(1, 0), mk(2, 1 << 30)],
        vec![vec![10, 20, 30], vec![25, 10, 15], vec![30, 20, 10]],
    )
    .unwrap();
    // A CPU on memory-less node 1 gets node 2 (nearest with memory) first.
    assert_eq!(
        candidate_nodes(&NumaPolicy::Local, &t, n(1), 0).unwrap(),
        vec![n(2), n(0)]
    );
    let p = NumaPolicy::Interleave(vec![n(0), n(1), n(2)]);
    let firsts: Vec<NodeId> = (0..4)
        .map(|c| candidate_nodes(&p, &t, n(0), c).unwrap()[0])
        .collect();
    assert_eq!(firsts, vec![n(0), n(2), n(0), n(2)]);
    assert_eq!(
        candidate_nodes(&NumaPolicy::Bind(vec![n(1)]), &t, n(0), 0),
        Err(PolicyError::NoMemory(PolicyKind::Bind))
    );
}

#[test]
fn counters_split_local_remote_failed_per_kind() {
    let c = PolicyCounters::new();
    c.record(PolicyKind::Local, n(0), n(0));
    c.record(PolicyKind::Local, n(0), n(1));
    c.record(PolicyKind::Local, n(0), n(0));
    c.record(PolicyKind::Bind, n(2), n(3));
    c.record_failure(PolicyKind::Bind);
    c.record(PolicyKind::Interleave, n(1), n(1));
    let s = c.snapshot();
    assert_eq!(
        s.local,
        KindStats {
            local: 2,
            remote: 1,
            failed: 0
        }
    );
    assert_eq!(
        s.bind,
        KindStats {
            local: 0,
            remote: 1,
            failed: 1
        }
    );
    assert_eq!(s.interleave.local, 1);
    assert_eq!(s.preferred, KindStats::default());
    assert_eq!(
        s.total(),
        KindStats {
            local: 3,
            remote: 2,
            failed: 1
        }
    );
    assert!((s.local.remote_share() - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(KindStats::default().remote_share(), 0.0);
    let json = serde_json::to_string(&s).unwrap();
    assert_eq!(serde_json::from_str::<PolicyStats>(&json).unwrap(), s);
}

#[test]
fn allows_only_restricts_bind() {
    assert!(NumaPolicy::Local.allows(n(5)));
    assert!(NumaPolicy::Preferred(n(1)).allows(n(0)));
    assert!(NumaPolicy::Interleave(vec![n(1)]).allows(n(0)));
    assert!(NumaPolicy::Bind(vec![n(1)]).allows(n(1)));
    assert!(!NumaPolicy::Bind(vec![n(1)]).allows(n(0)));
}
