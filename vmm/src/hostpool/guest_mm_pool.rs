//! [`FramePool`] over guest-mm's zone-based [`Pool`]: one buddy zone per host node, blocks
//! taken under the VM's NUMA policy, figures from the zones and the pool's monitor.

use guest_mm::frame::{FrameId, MigrateType, NodeId};
use guest_mm::policy::NumaPolicy;
use guest_mm::pool::{Pool, PoolError as MmPoolError};
use guest_mm::topology::Topology;

use super::{FramePool, NodeFigures, PoolError, PoolFigures, BLOCK_ORDER};

fn map_err(e: MmPoolError) -> PoolError {
    match e {
        MmPoolError::OutOfMemory { .. } => PoolError::OutOfMemory,
        MmPoolError::Policy(p) => PoolError::Policy(p.to_string()),
        MmPoolError::Free { frame, .. } | MmPoolError::NotInPool(frame) => {
            PoolError::BadFree(frame)
        }
        other => PoolError::Internal(other.to_string()),
    }
}

/// Build a guest-mm pool over `topo` with `bytes_per_node` on every node that has memory
/// (`None`: each node's own memory size from the topology).
pub fn build_pool(topo: Topology, bytes_per_node: Option<u64>) -> Result<Pool, PoolError> {
    let sizes: Vec<(NodeId, u64)> = topo
        .nodes()
        .iter()
        .filter(|n| n.has_memory)
        .map(|n| {
            let bytes = bytes_per_node.unwrap_or(n.mem_bytes);
            (n.id, bytes / guest_mm::FRAME_SIZE)
        })
        .collect();
    Pool::new(topo, &sizes).map_err(map_err)
}

impl FramePool for Pool {
    fn alloc_block(
        &self,
        mt: MigrateType,
        policy: &NumaPolicy,
        local: NodeId,
    ) -> Result<(FrameId, NodeId), PoolError> {
        self.alloc(BLOCK_ORDER, mt, policy, local).map_err(map_err)
    }

    fn free_block(&self, frame: FrameId) -> Result<(), PoolError> {
        self.free(frame, BLOCK_ORDER).map(|_| ()).map_err(map_err)
    }

    fn node_of_cpu(&self, cpu: u32) -> NodeId {
        self.topology()
            .nodes()
            .iter()
            .find(|n| n.cpus.binary_search(&cpu).is_ok())
            .map_or(NodeId(0), |n| n.id)
    }

    fn figures(&self) -> Result<PoolFigures, PoolError> {
        let stats = self.stats().map_err(map_err)?;
        let figures = self.zone_figures().map_err(map_err)?;
        let nodes = stats
            .iter()
            .map(|s| {
                let frag = figures
                    .iter()
                    .find(|f| f.node == s.node)
                    .and_then(|f| f.fragmentation_index.get(usize::from(BLOCK_ORDER)).copied())
                    .flatten();
                NodeFigures {
                    node: s.node,
                    total_bytes: s.total * guest_mm::FRAME_SIZE,
                    free_bytes: s.free * guest_mm::FRAME_SIZE,
                    allocated_by_type: s.allocated_per_type.map(|f| f * guest_mm::FRAME_SIZE),
                    fragmentation_index: frag,
                }
            })
            .collect();
        let snap = self.monitor().snapshot(Vec::new(), Vec::new());
        Ok(PoolFigures {
            nodes,
            allocs: snap.totals.allocs,
            frees: snap.totals.frees,
            alloc_failures: snap.totals.failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostpool::POOL_BLOCK_BYTES;

    #[test]
    fn guest_mm_pool_as_frame_pool() {
        let topo = Topology::uniform(2, 1 << 30, 10, 20).expect("topology");
        let pool = build_pool(topo, Some(64 << 20)).expect("pool");
        let f = pool.figures().expect("figures");
        assert_eq!(f.nodes.len(), 2);
        assert_eq!(f.total_bytes(), 128 << 20);
        assert!(f.is_whole());
        let (a, n) = pool
            .alloc_block(
                MigrateType::Movable,
                &NumaPolicy::Preferred(NodeId(1)),
                NodeId(0),
            )
            .expect("alloc");
        assert_eq!(n, NodeId(1));
        let (b, n) = pool
            .alloc_block(
                MigrateType::Unmovable,
                &NumaPolicy::Bind(vec![NodeId(0)]),
                NodeId(1),
            )
            .expect("alloc");
        assert_eq!(n, NodeId(0));
        let f = pool.figures().expect("figures");
        assert_eq!(f.free_bytes(), (128 << 20) - 2 * POOL_BLOCK_BYTES);
        assert_eq!(
            f.nodes[1].allocated_by_type[MigrateType::Movable.index()],
            POOL_BLOCK_BYTES
        );
        assert!(matches!(
            pool.alloc_block(
                MigrateType::Movable,
                &NumaPolicy::Bind(vec![NodeId(7)]),
                NodeId(0)
            ),
            Err(PoolError::Policy(_))
        ));
        pool.free_block(a).expect("free");
        assert!(pool.free_block(a).is_err());
        pool.free_block(b).expect("free");
        let f = pool.figures().expect("figures");
        assert!(f.is_whole());
        assert_eq!(f.allocs, 2);
        assert_eq!(f.frees, 2);
    }

    #[test]
    fn cpus_map_to_their_nodes() {
        use guest_mm::topology::NodeInfo;
        let node = |id: u16, cpus: Vec<u32>| NodeInfo {
            id: NodeId(id),
            mem_bytes: 1 << 30,
            has_memory: true,
            cpus,
        };
        let topo = Topology::new(
            vec![node(0, vec![0, 1]), node(1, vec![2, 3])],
            vec![vec![10, 20], vec![20, 10]],
        )
        .expect("topology");
        let pool = build_pool(topo, Some(16 << 20)).expect("pool");
        assert_eq!(pool.node_of_cpu(1), NodeId(0));
        assert_eq!(pool.node_of_cpu(3), NodeId(1));
        assert_eq!(pool.node_of_cpu(99), NodeId(0));
        let _ = pool.local_node();
    }
}
