//! The host frame pool as the VMM sees it: 2 MiB blocks handed to VMs (boot RAM as
//! UNMOVABLE, hot-plugged RAM as MOVABLE) under a NUMA policy, and given back when a VM
//! unplugs or is deleted.
//!
//! [`FramePool`] is the small interface the VM objects use. guest-mm's zone-based
//! [`guest_mm::pool::Pool`] implements it ([`build_pool`] makes one for a topology); the
//! simple single-node [`BlockPool`] does too, for tests.

mod block_pool;
mod guest_mm_pool;

pub use block_pool::BlockPool;
pub use guest_mm_pool::build_pool;

use guest_mm::frame::{FrameId, MigrateType, NodeId, PAGEBLOCK_ORDER};
use guest_mm::policy::NumaPolicy;

/// Order of the blocks VMs take from the pool: 2 MiB (one pageblock, one THP).
pub const BLOCK_ORDER: u8 = PAGEBLOCK_ORDER;
/// Bytes in one pool block.
pub const POOL_BLOCK_BYTES: u64 = guest_mm::FRAME_SIZE << BLOCK_ORDER;

/// Errors of the pool as the VMM sees them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PoolError {
    /// No block is free on any node the policy allows.
    #[error("host memory pool exhausted (no free 2 MiB block the policy allows)")]
    OutOfMemory,
    /// The policy cannot be served by this pool (unknown node, empty set).
    #[error("NUMA policy refused: {0}")]
    Policy(String),
    /// A free of a block the pool did not hand out (a VMM bug; the pool is unchanged).
    #[error("free of frame {0} refused: not an allocated block of this pool")]
    BadFree(FrameId),
    /// The pool's own state is unusable (poisoned lock, broken invariant).
    #[error("pool failure: {0}")]
    Internal(String),
}

/// Pool figures of one node, in bytes.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NodeFigures {
    /// The node.
    pub node: NodeId,
    /// Memory the pool manages on the node.
    pub total_bytes: u64,
    /// Free memory.
    pub free_bytes: u64,
    /// Allocated memory by migration type (index: [`MigrateType::index`]).
    pub allocated_by_type: [u64; MigrateType::COUNT],
    /// Fragmentation index for an order-9 request (None: a block is free).
    pub fragmentation_index: Option<f64>,
}

/// Pool-wide figures.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolFigures {
    /// Per node, ascending.
    pub nodes: Vec<NodeFigures>,
    /// Blocks allocated so far.
    pub allocs: u64,
    /// Blocks freed so far.
    pub frees: u64,
    /// Allocations that failed.
    pub alloc_failures: u64,
}

impl PoolFigures {
    /// Total bytes over nodes.
    pub fn total_bytes(&self) -> u64 {
        self.nodes.iter().map(|n| n.total_bytes).sum()
    }

    /// Free bytes over nodes.
    pub fn free_bytes(&self) -> u64 {
        self.nodes.iter().map(|n| n.free_bytes).sum()
    }

    /// Whether every frame is free again.
    pub fn is_whole(&self) -> bool {
        self.free_bytes() == self.total_bytes()
    }
}

/// Where VMs get their 2 MiB blocks from.
pub trait FramePool: Send + Sync + std::fmt::Debug {
    /// Allocate one 2 MiB block of type `mt` under `policy` for a caller on `local`.
    fn alloc_block(
        &self,
        mt: MigrateType,
        policy: &NumaPolicy,
        local: NodeId,
    ) -> Result<(FrameId, NodeId), PoolError>;
    /// Give back a block from [`FramePool::alloc_block`].
    fn free_block(&self, frame: FrameId) -> Result<(), PoolError>;
    /// Current figures.
    fn figures(&self) -> Result<PoolFigures, PoolError>;
    /// The node of host CPU `cpu` (for the Local policy); node 0 when unknown.
    fn node_of_cpu(&self, cpu: u32) -> NodeId {
        let _ = cpu;
        NodeId(0)
    }
    /// The node of the CPU the calling thread runs on now.
    fn local_node(&self) -> NodeId {
        // SAFETY: sched_getcpu takes no arguments and only reads the calling thread's CPU.
        let cpu = unsafe { libc::sched_getcpu() };
        u32::try_from(cpu).map_or(NodeId(0), |c| self.node_of_cpu(c))
    }
}
