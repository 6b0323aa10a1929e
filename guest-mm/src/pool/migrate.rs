//! Moving misplaced memory to where its NUMA policy wants it.

use super::{Pool, PoolError};
use crate::compaction::Mover;
use crate::frame::{FrameId, NodeId};
use crate::policy::NumaPolicy;
use crate::zone::AllocError;
use serde::Serialize;

/// One block that was moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Migration {
    /// Old first frame (now free).
    pub from: FrameId,
    /// New first frame.
    pub to: FrameId,
    /// Block order.
    pub order: u8,
    /// Old node.
    pub from_node: NodeId,
    /// New node.
    pub to_node: NodeId,
}

/// What [`Pool::migrate_misplaced`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MigrateStats {
    /// Blocks looked at.
    pub examined: u64,
    /// Blocks already where the policy wants them (or under a policy with no placement
    /// target: Local, Interleave).
    pub well_placed: u64,
    /// Blocks moved.
    pub moved: u64,
    /// Frames moved.
    pub moved_frames: u64,
    /// Misplaced blocks left in place because no wanted node had a free block.
    pub no_room: u64,
    /// Misplaced blocks the mover refused to move (pinned, busy).
    pub mover_refused: u64,
    /// Entries that are not an allocated block of the given order in the pool.
    pub invalid: u64,
    /// Every move, in order, so that the caller can update its records.
    pub moves: Vec<Migration>,
}

impl Pool {
    /// Move the given allocated blocks `(head, order)` that `policy` considers misplaced:
    ///
    /// - `Bind(set)`: a block on a node outside `set` moves to the member of `set` nearest to
    ///   its current node that has a free block (then the next nearest, ...).
    /// - `Preferred(p)`: a block not on `p` moves to `p` if `p` has a free block.
    /// - `Local` and `Interleave` name no node per block: nothing moves.
    ///
    /// Each move allocates the destination with the block's own migration type, calls
    /// `mover.move_block(from, to, order)`, then frees the source; when the mover refuses,
    /// the destination is freed again and the block stays. At most one zone lock is held at a
    /// time, and none while the mover runs. The caller must own the blocks (no concurrent free).
    pub fn migrate_misplaced(
        &self,
        allocations: &[(FrameId, u8)],
        policy: &NumaPolicy,
        mover: &mut dyn Mover,
    ) -> Result<MigrateStats, PoolError> {
        policy.validate(&self.topo)?;
        let mut st = MigrateStats::default();
        for &(frame, order) in allocations {
            st.examined += 1;
            let Some(src) = self.zone_index_of_frame(frame) else {
                st.invalid += 1;
                continue;
            };
            let src_node = self.zones[src].node;
            let mt = match self.lock(src)?.allocation_at(frame) {
                Some((head, o, mt)) if head == frame && o == order => mt,
                _ => {
                    st.invalid += 1;
                    continue;
                }
            };
            let targets: Vec<NodeId> = match policy {
                NumaPolicy::Bind(set) if !set.contains(&src_node) => {
                    self.topo.sort_by_distance(src_node, set).map_err(|_| {
                        // validate() checked every node of the set.
                        PoolError::Layout(format!("{src_node} missing from the topology"))
                    })?
                }
                NumaPolicy::Preferred(p) if *p != src_node => vec![*p],
                _ => {
                    st.well_placed += 1;
                    continue;
                }
            };
            let mut dest = None;
            for node in targets {
                let Some(t) = self.zone_index_of_node(node) else {
                    continue;
                };
                let res = self.lock(t)?.alloc(order, mt);
                match res {
                    Ok(to) => {
                        dest = Some((t, to));
                        break;
                    }
                    Err(AllocError::OutOfMemory { .. }) => continue,
                    Err(e) => return Err(PoolError::Request(e)),
                }
            }
            let Some((t, to)) = dest else {
                st.no_room += 1;
                continue;
            };
            if mover.move_block(frame, to, order).is_ok() {
                self.lock(src)?
                    .free(frame, order)
                    .map_err(|source| PoolError::Free { frame, source })?;
                st.moved += 1;
                st.moved_frames += 1u64 << order;
                st.moves.push(Migration {
                    from: frame,
                    to,
                    order,
                    from_node: src_node,
                    to_node: self.zones[t].node,
                });
            } else {
                self.lock(t)?
                    .free(to, order)
                    .map_err(|source| PoolError::Free { frame: to, source })?;
                st.mover_refused += 1;
            }
        }
        Ok(st)
    }
}

#[cfg(test)]
#[path = "migrate_tests.rs"]
mod tests;
