//! Counters, fragmentation indices and the serializable statistics snapshot.

use super::{Zone, ISOLATE};
use crate::frame::{FrameId, MigrateType, NodeId, NR_ORDERS};
use serde::Serialize;

/// A snapshot of a zone's counters. Frames held by per-thread caches count as `cached`, not
/// as allocated: `free + allocated + cached == total`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ZoneStats {
    /// The zone's node.
    pub node: NodeId,
    /// First frame.
    pub base: FrameId,
    /// Frames in the zone.
    pub total: u64,
    /// Free frames (including free frames in isolated pageblocks).
    pub free: u64,
    /// Frames allocated to users (not counting frames held by caches).
    pub allocated: u64,
    /// Frames held by per-thread caches (as last reported by them).
    pub cached: u64,
    /// Free frames in isolated pageblocks (part of `free`).
    pub isolated_free: u64,
    /// Free blocks per order (all types).
    pub free_blocks_per_order: Vec<u64>,
    /// Free frames per list type, indexed by `MigrateType::index()`.
    pub free_per_type: [u64; MigrateType::COUNT],
    /// Allocated frames per allocation type (caches excluded).
    pub allocated_per_type: [u64; MigrateType::COUNT],
    /// Cached frames per type.
    pub cached_per_type: [u64; MigrateType::COUNT],
    /// Pageblocks per type.
    pub pageblocks_per_type: [u64; MigrateType::COUNT],
    /// Allocations served by stealing from another type.
    pub steals: u64,
    /// Pageblocks whose type changed to the allocating type by a claim.
    pub claims: u64,
    /// Allocations that failed for lack of memory.
    pub alloc_failures: u64,
    /// Whether mobility grouping is on.
    pub mobility_grouping: bool,
}

impl Zone {
    /// A snapshot of the counters.
    #[allow(clippy::needless_range_loop)] // parallel per-type arrays
    pub fn stats(&self) -> ZoneStats {
        let mut free_per_type = [0u64; MigrateType::COUNT];
        let mut per_order = vec![0u64; NR_ORDERS];
        for (t, counts) in self.lists.counts.iter().enumerate() {
            for (o, &c) in counts.iter().enumerate() {
                free_per_type[t] += c << o;
                per_order[o] += c;
            }
        }
        let mut pageblocks_per_type = [0u64; MigrateType::COUNT];
        for &t in &self.pb_types {
            pageblocks_per_type[t as usize] += 1;
        }
        let mut allocated_per_type = [0u64; MigrateType::COUNT];
        for t in 0..MigrateType::COUNT {
            allocated_per_type[t] = self.alloc_frames[t].saturating_sub(self.cached_frames[t]);
        }
        ZoneStats {
            node: self.node,
            base: FrameId(self.base),
            total: self.nr,
            free: free_per_type.iter().sum(),
            allocated: allocated_per_type.iter().sum(),
            cached: self.cached_frames.iter().sum(),
            isolated_free: free_per_type[ISOLATE],
            free_blocks_per_order: per_order,
            free_per_type,
            allocated_per_type,
            cached_per_type: self.cached_frames,
            pageblocks_per_type,
            steals: self.steals,
            claims: self.claims,
            alloc_failures: self.alloc_failures,
            mobility_grouping: self.mobility_grouping,
        }
    }

    /// Free frames (all types, isolated included).
    pub fn free_frames(&self) -> u64 {
        let mut n = 0;
        for counts in &self.lists.counts {
            for (o, &c) in counts.iter().enumerate() {
                n += c << o;
            }
        }
        n
    }

    /// Free blocks of exactly `order`, all types (0 for an order above `MAX_ORDER`).
    pub fn free_blocks(&self, order: u8) -> u64 {
        let o = order as usize;
        if o >= NR_ORDERS {
            return 0;
        }
        self.lists.counts.iter().map(|c| c[o]).sum()
    }

    /// Free blocks and frames usable for an order-`order` request: (free frames, free blocks,
    /// free blocks of order >= `order`, frames in them). Isolated blocks are not counted.
    fn contig_info(&self, order: u8) -> (u64, u64, u64, u64) {
        let (mut frames, mut blocks, mut suitable, mut suitable_frames) = (0, 0, 0, 0);
        for (t, counts) in self.lists.counts.iter().enumerate() {
            if t == ISOLATE {
                continue;
            }
            for (o, &c) in counts.iter().enumerate() {
                frames += c << o;
                blocks += c;
                if o >= order as usize {
                    suitable += c;
                    suitable_frames += c << o;
                }
            }
        }
        (frames, blocks, suitable, suitable_frames)
    }

    /// Linux's fragmentation index for an order-`order` request, over the allocatable free
    /// lists: `None` when a free block of at least `order` exists (Linux's -1000); otherwise
    /// `1 - (1 + free_frames / 2^order) / free_blocks`, in 0.0..=1.0 (near 0: the request fails
    /// for lack of memory; near 1: it fails because of fragmentation). 0.0 when nothing is free.
    pub fn fragmentation_index(&self, order: u8) -> Option<f64> {
        let (frames, blocks, suitable, _) = self.contig_info(order);
        if blocks == 0 {
            return Some(0.0);
        }
        if suitable > 0 {
            return None;
        }
        let requested = (1u64 << order.min(63)) as f64;
        let idx = 1.0 - (1.0 + frames as f64 / requested) / blocks as f64;
        Some(idx.clamp(0.0, 1.0))
    }

    /// Fraction of allocatable free memory in blocks too small for an order-`order` request
    /// (Linux's unusable free space index): 0.0 = all usable, 1.0 = none usable or nothing free.
    pub fn unusable_free_index(&self, order: u8) -> f64 {
        let (frames, _, _, suitable_frames) = self.contig_info(order);
        if frames == 0 {
            return 1.0;
        }
        (frames - suitable_frames) as f64 / frames as f64
    }

    /// Record that the caches now hold `new` instead of `old` frames of type `mt`.
    pub(crate) fn note_cached(&mut self, mt: MigrateType, old: u64, new: u64) {
        let c = &mut self.cached_frames[mt.index()];
        *c = (*c + new).saturating_sub(old);
    }

    /// Number of allocations that had to steal from another type so far.
    pub fn steals(&self) -> u64 {
        self.steals
    }

    /// Pageblocks claimed so far.
    pub fn claims(&self) -> u64 {
        self.claims
    }
}
