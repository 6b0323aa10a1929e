//! [`BlockPool`]: a single-node pool of 2 MiB blocks (a free stack and a per-block owner
//! table), used until guest-mm's zone-based pool is wired in, and in tests.

use std::sync::Mutex;

use guest_mm::frame::{FrameId, MigrateType, NodeId};
use guest_mm::policy::NumaPolicy;

use super::{FramePool, NodeFigures, PoolError, PoolFigures, BLOCK_ORDER, POOL_BLOCK_BYTES};

#[derive(Debug)]
struct Inner {
    /// Free block indices; popped from the end, lowest index last pushed first.
    free: Vec<u64>,
    /// Per block: the migration type it was allocated as, or None when free.
    owner: Vec<Option<MigrateType>>,
    allocs: u64,
    frees: u64,
    failures: u64,
}

/// A pool of `n` 2 MiB blocks on node 0.
#[derive(Debug)]
pub struct BlockPool {
    inner: Mutex<Inner>,
    blocks: u64,
}

impl BlockPool {
    /// A pool of `bytes` (rounded down to whole 2 MiB blocks).
    pub fn new(bytes: u64) -> BlockPool {
        let blocks = bytes / POOL_BLOCK_BYTES;
        BlockPool {
            inner: Mutex::new(Inner {
                free: (0..blocks).rev().collect(),
                owner: vec![None; blocks as usize],
                allocs: 0,
                frees: 0,
                failures: 0,
            }),
            blocks,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, PoolError> {
        self.inner
            .lock()
            .map_err(|_| PoolError::Internal("block pool lock poisoned".into()))
    }

    fn check_policy(policy: &NumaPolicy) -> Result<(), PoolError> {
        let ok = match policy {
            NumaPolicy::Local => true,
            NumaPolicy::Preferred(_) => true,
            NumaPolicy::Interleave(nodes) | NumaPolicy::Bind(nodes) => nodes.contains(&NodeId(0)),
        };
        if ok {
            Ok(())
        } else {
            Err(PoolError::Policy(format!(
                "{policy:?} allows no node of this single-node pool (node 0)"
            )))
        }
    }
}

impl FramePool for BlockPool {
    fn alloc_block(
        &self,
        mt: MigrateType,
        policy: &NumaPolicy,
        _local: NodeId,
    ) -> Result<(FrameId, NodeId), PoolError> {
        Self::check_policy(policy)?;
        let mut g = self.lock()?;
        let Some(b) = g.free.pop() else {
            g.failures += 1;
            return Err(PoolError::OutOfMemory);
        };
        g.owner[b as usize] = Some(mt);
        g.allocs += 1;
        Ok((FrameId(b << BLOCK_ORDER), NodeId(0)))
    }

    fn free_block(&self, frame: FrameId) -> Result<(), PoolError> {
        if !frame.is_aligned(BLOCK_ORDER) {
            return Err(PoolError::BadFree(frame));
        }
        let b = frame.0 >> BLOCK_ORDER;
        let mut g = self.lock()?;
        match g.owner.get_mut(b as usize) {
            Some(slot @ Some(_)) => {
                *slot = None;
                g.free.push(b);
                g.frees += 1;
                Ok(())
            }
            _ => Err(PoolError::BadFree(frame)),
        }
    }

    fn figures(&self) -> Result<PoolFigures, PoolError> {
        let g = self.lock()?;
        let mut by_type = [0u64; MigrateType::COUNT];
        for mt in g.owner.iter().flatten() {
            by_type[mt.index()] += POOL_BLOCK_BYTES;
        }
        let free_bytes = g.free.len() as u64 * POOL_BLOCK_BYTES;
        Ok(PoolFigures {
            nodes: vec![NodeFigures {
                node: NodeId(0),
                total_bytes: self.blocks * POOL_BLOCK_BYTES,
                free_bytes,
                allocated_by_type: by_type,
                // Every free block is a whole order-9 block: no fragmentation at this order.
                fragmentation_index: if g.free.is_empty() { Some(0.0) } else { None },
            }],
            allocs: g.allocs,
            frees: g.frees,
            alloc_failures: g.failures,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_free_and_figures() {
        let p = BlockPool::new(8 * POOL_BLOCK_BYTES + 4096);
        let f = p.figures().expect("figures");
        assert_eq!(f.total_bytes(), 8 * POOL_BLOCK_BYTES);
        assert!(f.is_whole());
        let (a, n) = p
            .alloc_block(MigrateType::Unmovable, &NumaPolicy::Local, NodeId(0))
            .expect("alloc");
        assert_eq!(n, NodeId(0));
        assert!(a.is_aligned(BLOCK_ORDER));
        let (b, _) = p
            .alloc_block(
                MigrateType::Movable,
                &NumaPolicy::Bind(vec![NodeId(0)]),
                NodeId(0),
            )
            .expect("alloc");
        assert_ne!(a, b);
        let f = p.figures().expect("figures");
        assert_eq!(f.free_bytes(), 6 * POOL_BLOCK_BYTES);
        assert_eq!(
            f.nodes[0].allocated_by_type[MigrateType::Movable.index()],
            POOL_BLOCK_BYTES
        );
        assert_eq!(
            p.free_block(FrameId(a.0 + 1)),
            Err(PoolError::BadFree(FrameId(a.0 + 1)))
        );
        p.free_block(a).expect("free");
        assert_eq!(p.free_block(a), Err(PoolError::BadFree(a)));
        p.free_block(b).expect("free");
        assert!(p.figures().expect("figures").is_whole());
    }

    #[test]
    fn exhaustion_and_foreign_nodes() {
        let p = BlockPool::new(POOL_BLOCK_BYTES);
        assert!(p
            .alloc_block(
                MigrateType::Movable,
                &NumaPolicy::Bind(vec![NodeId(1)]),
                NodeId(0)
            )
            .is_err());
        p.alloc_block(MigrateType::Movable, &NumaPolicy::Local, NodeId(0))
            .expect("alloc");
        assert_eq!(
            p.alloc_block(MigrateType::Movable, &NumaPolicy::Local, NodeId(0)),
            Err(PoolError::OutOfMemory)
        );
        assert_eq!(p.figures().expect("figures").alloc_failures, 1);
    }
}
