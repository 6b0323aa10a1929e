use super::*;
use std::sync::atomic::{AtomicU32, Ordering};

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "guest-mm-topo-{}-{}-{}",
            std::process::id(),
            tag,
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Write a fake `/sys/devices/system/node` tree: `nodes[i] = (id, MemTotal kB, cpulist)`.
fn fake_sysfs(tag: &str, nodes: &[(u32, u64, &str)], dist: &[&str], has_memory: &str) -> TempDir {
    let t = TempDir::new(tag);
    let online: Vec<String> = nodes.iter().map(|n| n.0.to_string()).collect();
    fs::write(t.0.join("online"), format!("{}\n", online.join(","))).unwrap();
    fs::write(t.0.join("possible"), "0-7\n").unwrap();
    fs::write(t.0.join("has_memory"), format!("{has_memory}\n")).unwrap();
    for (i, &(id, kb, cpus)) in nodes.iter().enumerate() {
        let d = t.0.join(format!("node{id}"));
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("meminfo"),
            format!(
                "Node {id} MemTotal:       {kb} kB\nNode {id} MemFree:        {} kB\n",
                kb / 2
            ),
        )
        .unwrap();
        fs::write(d.join("distance"), format!("{}\n", dist[i])).unwrap();
        fs::write(d.join("cpulist"), format!("{cpus}\n")).unwrap();
    }
    t
}

#[test]
fn sysfs_one_node() {
    let t = fake_sysfs("one", &[(0, 4_548_812, "0-1")], &["10"], "0");
    let topo = Topology::from_sysfs(&t.0).unwrap();
    assert_eq!(topo.len(), 1);
    let n = &topo.nodes()[0];
    assert_eq!(n.id, NodeId(0));
    assert_eq!(n.mem_bytes, 4_548_812 * 1024);
    assert!(n.has_memory);
    assert_eq!(n.cpus, vec![0, 1]);
    assert_eq!(topo.distance(NodeId(0), NodeId(0)).unwrap(), 10);
    assert_eq!(topo.node_of_cpu(1), Some(NodeId(0)));
    assert_eq!(topo.node_of_cpu(2), None);
}

#[test]
fn sysfs_two_nodes() {
    let t = fake_sysfs(
        "two",
        &[(0, 1 << 20, "0-3,8-11"), (1, 2 << 20, "4-7,12-15")],
        &["10 21", "21 10"],
        "0-1",
    );
    let topo = Topology::from_sysfs(&t.0).unwrap();
    assert_eq!(topo.len(), 2);
    assert_eq!(topo.node(NodeId(1)).unwrap().mem_bytes, 2 << 30);
    assert_eq!(topo.total_mem_bytes(), 3 << 30);
    assert_eq!(topo.distance(NodeId(0), NodeId(1)).unwrap(), 21);
    assert_eq!(topo.node_of_cpu(12), Some(NodeId(1)));
    assert_eq!(topo.node_of_cpu(9), Some(NodeId(0)));
    assert_eq!(
        topo.nodes_by_distance(NodeId(1)).unwrap(),
        vec![NodeId(1), NodeId(0)]
    );
}

#[test]
fn sysfs_four_nodes_sparse_memoryless_asymmetric() {
    // Nodes 0, 1, 2 and 4 (3 offline), node 4 without memory; an asymmetric SLIT.
    let t = fake_sysfs(
        "four",
        &[(0, 1024, "0"), (1, 2048, "1"), (2, 4096, "2"), (4, 0, "3")],
        &["10 16 22 28", "16 10 28 22", "22 28 10 16", "30 22 16 10"],
        "0-2",
    );
    let topo = Topology::from_sysfs(&t.0).unwrap();
    let ids: Vec<NodeId> = topo.node_ids().collect();
    assert_eq!(ids, vec![NodeId(0), NodeId(1), NodeId(2), NodeId(4)]);
    assert!(!topo.node(NodeId(4)).unwrap().has_memory);
    assert!(topo.node(NodeId(2)).unwrap().has_memory);
    assert_eq!(topo.distance(NodeId(4), NodeId(0)).unwrap(), 30);
    assert_eq!(topo.distance(NodeId(0), NodeId(4)).unwrap(), 28);
    assert_eq!(
        topo.nodes_by_distance(NodeId(4)).unwrap(),
        vec![NodeId(4), NodeId(2), NodeId(1), NodeId(0)]
    );
    assert_eq!(
        topo.nodes_by_distance(NodeId(0)).unwrap(),
        vec![NodeId(0), NodeId(1), NodeId(2), NodeId(4)]
    );
    assert!(matches!(
        topo.nodes_by_distance(NodeId(3)),
        Err(TopologyError::UnknownNode(NodeId(3)))
    ));
}

#[test]
fn sysfs_without_online_file_scans_dirs() {
    let t = fake_sysfs(
        "scan",
        &[(0, 1024, "0"), (1, 1024, "1")],
        &["10 20", "20 10"],
        "0-1",
    );
    fs::remove_file(t.0.join("online")).unwrap();
    fs::remove_file(t.0.join("has_memory")).unwrap();
    let topo = Topology::from_sysfs(&t.0).unwrap();
    assert_eq!(topo.len(), 2);
    assert!(topo.nodes().iter().all(|n| n.has_memory));
}

#[test]
fn sysfs_errors_are_typed() {
    // Distance row of the wrong length.
    let t = fake_sysfs(
        "bad-dist",
        &[(0, 1024, "0"), (1, 1024, "1")],
        &["10 20", "20"],
        "0-1",
    );
    assert!(matches!(
        Topology::from_sysfs(&t.0),
        Err(TopologyError::NotSquare { row: 1, .. })
    ));
    // Garbage distance.
    let t = fake_sysfs("garbage", &[(0, 1024, "0")], &["ten"], "0");
    assert!(matches!(
        Topology::from_sysfs(&t.0),
        Err(TopologyError::Parse { .. })
    ));
    // Missing meminfo.
    let t = fake_sysfs("nomem", &[(0, 1024, "0")], &["10"], "0");
    fs::remove_file(t.0.join("node0/meminfo")).unwrap();
    assert!(matches!(
        Topology::from_sysfs(&t.0),
        Err(TopologyError::Io { .. })
    ));
    // meminfo without MemTotal.
    let t = fake_sysfs("nototal", &[(0, 1024, "0")], &["10"], "0");
    fs::write(t.0.join("node0/meminfo"), "Node 0 MemFree: 5 kB\n").unwrap();
    assert!(matches!(
        Topology::from_sysfs(&t.0),
        Err(TopologyError::Parse { .. })
    ));
    // Nonexistent root.
    assert!(Topology::from_sysfs(Path::new("/nonexistent/guest-mm/node")).is_err());
}

#[test]
fn real_host_sysfs_when_present() {
    let Some(res) = Topology::from_host() else {
        eprintln!("skip: /sys/devices/system/node not present");
        return;
    };
    let topo = res.unwrap();
    assert!(!topo.is_empty());
    for n in topo.nodes() {
        let row = topo.nodes_by_distance(n.id).unwrap();
        assert_eq!(row[0], n.id);
        assert_eq!(row.len(), topo.len());
    }
    assert!(topo.total_mem_bytes() > 0);
}

#[test]
fn list_parsing() {
    assert_eq!(parse_list("").unwrap(), Vec::<u32>::new());
    assert_eq!(parse_list("\n").unwrap(), Vec::<u32>::new());
    assert_eq!(parse_list("0").unwrap(), vec![0]);
    assert_eq!(parse_list("0-2,5,7-8\n").unwrap(), vec![0, 1, 2, 5, 7, 8]);
    assert_eq!(parse_list("3,1,1-2").unwrap(), vec![1, 2, 3]);
    assert!(parse_list("3-1").is_err());
    assert!(parse_list("a").is_err());
    assert!(parse_list("0-4294967295").is_err());
}

#[test]
fn synthetic_validation() {
    assert!(matches!(
        Topology::synthetic(0, 1, vec![]),
        Err(TopologyError::Empty)
    ));
    assert!(matches!(
        Topology::synthetic(2, 1, vec![vec![10, 20]]),
        Err(TopologyError::RowCount { rows: 1, nodes: 2 })
    ));
    assert!(matches!(
        Topology::synthetic(2, 1, vec![vec![10, 20], vec![20, 10, 30]]),
        Err(TopologyError::NotSquare { row: 1, len: 3, .. })
    ));
    assert!(matches!(
        Topology::synthetic(2, 1, vec![vec![10, 0], vec![20, 10]]),
        Err(TopologyError::ZeroDistance { .. })
    ));
    assert!(matches!(
        Topology::synthetic(2, 1, vec![vec![0, 20], vec![20, 10]]),
        Err(TopologyError::ZeroDistance { .. })
    ));
    assert!(matches!(
        Topology::synthetic(2, 1, vec![vec![20, 10], vec![20, 10]]),
        Err(TopologyError::DiagonalNotMinimum {
            from: NodeId(0),
            to: NodeId(1),
            ..
        })
    ));
    assert!(matches!(
        Topology::uniform(3, 1, 10, 10),
        Err(TopologyError::DiagonalNotMinimum { .. })
    ));
    // Asymmetric is fine as long as each diagonal is its row's minimum.
    let t = Topology::synthetic(2, 1, vec![vec![10, 20], vec![30, 10]]).unwrap();
    assert_eq!(t.distance(NodeId(1), NodeId(0)).unwrap(), 30);
    let dup = vec![
        NodeInfo {
            id: NodeId(1),
            mem_bytes: 1,
            has_memory: true,
            cpus: vec![],
        };
        2
    ];
    assert!(matches!(
        Topology::new(dup, vec![vec![10, 20], vec![20, 10]]),
        Err(TopologyError::DuplicateNode(NodeId(1)))
    ));
}

#[test]
fn new_sorts_nodes_and_permutes_matrix() {
    let mk = |id| NodeInfo {
        id: NodeId(id),
        mem_bytes: 1 << 30,
        has_memory: true,
        cpus: vec![u32::from(id)],
    };
    // Given in order 2, 0: distance 2->0 is 25, 0->2 is 21.
    let t = Topology::new(vec![mk(2), mk(0)], vec![vec![10, 25], vec![21, 10]]).unwrap();
    assert_eq!(t.nodes()[0].id, NodeId(0));
    assert_eq!(t.distance(NodeId(2), NodeId(0)).unwrap(), 25);
    assert_eq!(t.distance(NodeId(0), NodeId(2)).unwrap(), 21);
    assert_eq!(t.distances(), &[vec![10, 21], vec![25, 10]]);
}

#[test]
fn uniform_and_distance_order() {
    let t = Topology::uniform(4, 1 << 30, LOCAL_DISTANCE, REMOTE_DISTANCE).unwrap();
    assert_eq!(t.len(), 4);
    assert_eq!(
        t.nodes_by_distance(NodeId(2)).unwrap(),
        vec![NodeId(2), NodeId(0), NodeId(1), NodeId(3)]
    );
    // A ring-ish 4-node matrix: 0-1 and 2-3 close, cross pairs far.
    let d = vec![
        vec![10, 12, 20, 22],
        vec![12, 10, 22, 20],
        vec![20, 22, 10, 12],
        vec![22, 20, 12, 10],
    ];
    let t = Topology::synthetic(4, 1 << 30, d).unwrap();
    assert_eq!(
        t.nodes_by_distance(NodeId(3)).unwrap(),
        vec![NodeId(3), NodeId(2), NodeId(1), NodeId(0)]
    );
    assert_eq!(
        t.sort_by_distance(NodeId(0), &[NodeId(3), NodeId(1)])
            .unwrap(),
        vec![NodeId(1), NodeId(3)]
    );
    let s = Topology::single(4096);
    assert_eq!(s.nodes_by_distance(NodeId(0)).unwrap(), vec![NodeId(0)]);
}
