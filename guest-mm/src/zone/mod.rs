//! One buddy allocator over a contiguous frame range of one NUMA node.
//!
//! Free blocks sit on intrusive lists per order and per migration type (see the `freelist` module).
//! Every 2 MiB pageblock carries a migration type; allocations of one type come from that
//! type's pageblocks first, and only then fall back to other types by stealing the largest
//! free block and, when enough of its pageblock is free or alike, claiming the pageblock (the
//! Linux anti-fragmentation scheme). Isolated pageblocks are never allocated from.
//!
//! Invariants (checked by [`Zone::validate`]): the blocks tile the zone; every free block is on
//! the list of its pageblock's type and all pageblocks it covers share that type; two free
//! buddies of the same order are merged unless exactly one of them is isolated; the counters
//! match the metadata.

mod error;
pub(crate) mod freelist;
mod isolate;
mod query;
mod stats;
mod validate;

pub use error::{AllocError, FreeError, ValidateError, ZoneError};
pub use stats::ZoneStats;

use crate::frame::{FrameId, MigrateType, NodeId, MAX_ORDER, PAGEBLOCK_FRAMES, PAGEBLOCK_ORDER};
use freelist::{FreeLists, Meta, KIND_ALLOC, KIND_FREE, KIND_TAIL};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const MOVABLE: usize = MigrateType::Movable as usize;
const ISOLATE: usize = MigrateType::Isolate as usize;

/// A shared counter that a zone bumps whenever it isolates pageblocks. Per-thread caches
/// read it (one relaxed load) to learn that they must give back frames that became isolated.
#[derive(Clone, Debug, Default)]
pub struct IsolationEpoch(Arc<AtomicU64>);

impl IsolationEpoch {
    /// The current value.
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn bump(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// A buddy allocator over the frames `[base, base + nr_frames)` of one node.
pub struct Zone {
    node: NodeId,
    base: u64,
    nr: u64,
    meta: Vec<Meta>,
    lists: FreeLists,
    /// Migration type per pageblock (index = global pageblock number - `pb_first`).
    pb_types: Vec<u8>,
    pb_first: u64,
    /// Frames in allocated blocks, per allocation type (including frames held by caches).
    alloc_frames: [u64; MigrateType::COUNT],
    /// Frames held by per-thread caches, per type, as last reported by the caches.
    cached_frames: [u64; MigrateType::COUNT],
    steals: u64,
    claims: u64,
    alloc_failures: u64,
    mobility_grouping: bool,
    epoch: IsolationEpoch,
    compaction: crate::compaction::CompactionStats,
    thp: crate::thp::ThpStats,
    /// Free frames per pageblock in listed free blocks below pageblock order (a pageblock
    /// that is one free block, or part of a larger one, counts 0): how used a split pageblock
    /// is, for placement (see [`Zone::list_pick`]).
    pb_free: Vec<u16>,
}

impl std::fmt::Debug for Zone {
    /// A summary: the per-frame metadata is far too large to print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Zone")
            .field("node", &self.node)
            .field("base", &FrameId(self.base))
            .field("nr_frames", &self.nr)
            .field("free", &self.free_frames())
            .field("alloc_frames", &self.alloc_frames)
            .field("cached_frames", &self.cached_frames)
            .field("mobility_grouping", &self.mobility_grouping)
            .finish_non_exhaustive()
    }
}

impl Zone {
    /// A zone over `[base, base + nr_frames)`. All frames start free and all pageblocks
    /// MOVABLE. The range need not be aligned: it is cut into maximal naturally aligned blocks.
    ///
    /// # Panics
    /// If `nr_frames` is 0 or not below `u32::MAX` (use [`Zone::try_new`] to get an error).
    pub fn new(node: NodeId, base: FrameId, nr_frames: u64) -> Zone {
        match Self::try_new(node, base, nr_frames) {
            Ok(z) => z,
            Err(e) => panic!("Zone::new: {e}"),
        }
    }

    /// Like [`Zone::new`], but returns an error for an empty or too large range.
    pub fn try_new(node: NodeId, base: FrameId, nr_frames: u64) -> Result<Zone, ZoneError> {
        let bad = ZoneError::OutOfZone {
            start: base,
            count: nr_frames,
        };
        if nr_frames == 0 || nr_frames >= u64::from(u32::MAX) {
            return Err(bad);
        }
        let end = base.0.checked_add(nr_frames).ok_or(bad)?;
        let pb_first = base.0 >> PAGEBLOCK_ORDER;
        let pb_last = (end - 1) >> PAGEBLOCK_ORDER;
        let mut z = Zone {
            node,
            base: base.0,
            nr: nr_frames,
            meta: vec![Meta::TAIL; nr_frames as usize],
            lists: FreeLists::new(),
            pb_types: vec![MOVABLE as u8; (pb_last - pb_first + 1) as usize],
            pb_first,
            alloc_frames: [0; MigrateType::COUNT],
            cached_frames: [0; MigrateType::COUNT],
            steals: 0,
            claims: 0,
            alloc_failures: 0,
            mobility_grouping: true,
            epoch: IsolationEpoch::default(),
            compaction: Default::default(),
            thp: Default::default(),
            pb_free: vec![0; (pb_last - pb_first + 1) as usize],
        };
        let mut pos = base.0;
        while pos < end {
            let mut o = (pos.trailing_zeros() as u8).min(MAX_ORDER);
            while pos + (1u64 << o) > end {
                o -= 1;
            }
            z.list_push((pos - base.0) as u32, o, MOVABLE);
            pos += 1u64 << o;
        }
        Ok(z)
    }

    /// The node this zone belongs to.
    pub fn node(&self) -> NodeId {
        self.node
    }

    /// First frame.
    pub fn base(&self) -> FrameId {
        FrameId(self.base)
    }

    /// Number of frames.
    pub fn nr_frames(&self) -> u64 {
        self.nr
    }

    /// Whether `f` lies in the zone.
    pub fn contains(&self, f: FrameId) -> bool {
        f.0.wrapping_sub(self.base) < self.nr
    }

    /// Whether allocations are grouped by mobility (default true). When false, every
    /// allocation uses the MOVABLE lists, whatever type it asks for (the allocation still
    /// records the type it asked for): the "plain buddy" baseline.
    pub fn mobility_grouping(&self) -> bool {
        self.mobility_grouping
    }

    /// Switch mobility grouping on or off (see [`Zone::mobility_grouping`]).
    pub fn set_mobility_grouping(&mut self, on: bool) {
        self.mobility_grouping = on;
    }

    /// The counter bumped on every isolation (read by per-thread caches).
    pub fn isolation_epoch(&self) -> IsolationEpoch {
        self.epoch.clone()
    }

    /// Migration type of the pageblock holding `f` (MOVABLE for a frame outside the zone).
    pub fn pageblock_type(&self, f: FrameId) -> MigrateType {
        if !self.contains(f) {
            return MigrateType::Movable;
        }
        let t = self.pb_types[((f.0 >> PAGEBLOCK_ORDER) - self.pb_first) as usize];
        MigrateType::from_index(t as usize).unwrap_or(MigrateType::Movable)
    }

    /// Frames of the pageblock holding `f` that lie in this zone (512 except at the edges).
    pub fn pageblock_frames_in_zone(&self, f: FrameId) -> u64 {
        let start = f.pageblock_start().0.max(self.base);
        let end = (f.pageblock_start().0 + PAGEBLOCK_FRAMES).min(self.base + self.nr);
        end.saturating_sub(start)
    }

    // ---- index helpers -------------------------------------------------------------------

    #[inline]
    fn pb_index(&self, idx: u32) -> usize {
        (((self.base + u64::from(idx)) >> PAGEBLOCK_ORDER) - self.pb_first) as usize
    }

    #[inline]
    fn pb_type_of(&self, idx: u32) -> usize {
        self.pb_types[self.pb_index(idx)] as usize
    }

    /// Set the type of every pageblock covered by block (idx, order).
    fn set_block_pb_types(&mut self, idx: u32, order: u8, mt: usize) -> u64 {
        let first = self.pb_index(idx);
        let last = self.pb_index(idx + (1u32 << order) - 1);
        let mut changed = 0;
        for t in &mut self.pb_types[first..=last] {
            if *t as usize != mt {
                *t = mt as u8;
                changed += 1;
            }
        }
        changed
    }

    /// Zone-relative index of the buddy of block (idx, order), if it lies in the zone.
    #[inline]
    fn buddy_index(&self, idx: u32, order: u8) -> Option<u32> {
        let b = ((self.base + u64::from(idx)) ^ (1u64 << order)).wrapping_sub(self.base);
        // `meta` has one entry per frame: comparing with its length lets the compiler drop
        // the bounds check of the caller's `meta[b]`.
        (b < self.meta.len() as u64).then_some(b as u32)
    }

    /// The block (free or allocated) containing zone index `idx`: (head index, order, kind).
    pub(crate) fn containing_block(&self, idx: u32) -> Option<(u32, u8, u8)> {
        let g = self.base + u64::from(idx);
        for o in 0..=MAX_ORDER {
            let h = (g & !((1u64 << o) - 1)).wrapping_sub(self.base);
            if h >= self.nr {
                return None;
            }
            let m = &self.meta[h as usize];
            if m.kind != KIND_TAIL && m.order == o {
                return Some((h as u32, o, m.kind));
            }
        }
        None
    }

    // ---- allocation ----------------------------------------------------------------------

    /// Allocate a block of `order` for migration type `mt` (not Isolate). Tries `mt`'s own
    /// lists (smallest order first), then the fallback types, stealing the largest free
    /// block and claiming its pageblock when at least half of it is free or alike.
    #[inline]
    pub fn alloc(&mut self, order: u8, mt: MigrateType) -> Result<FrameId, AllocError> {
        if order > MAX_ORDER {
            return Err(AllocError::InvalidOrder(order));
        }
        if mt == MigrateType::Isolate {
            return Err(AllocError::InvalidType(mt));
        }
        let lt = if self.mobility_grouping {
            mt.index()
        } else {
            MOVABLE
        };
        let mask = self.lists.nonempty[lt] >> order;
        let idx = if mask != 0 {
            let o = order + mask.trailing_zeros() as u8;
            let idx = if o < PAGEBLOCK_ORDER {
                let idx = self.list_pick(o, lt);
                self.list_remove(idx);
                idx
            } else {
                self.list_pop(o, lt)
            };
            self.expand(idx, order, o, lt);
            idx
        } else {
            match self.alloc_fallback(order, lt) {
                Some(idx) => idx,
                None => {
                    self.alloc_failures += 1;
                    return Err(AllocError::OutOfMemory { order, mt });
                }
            }
        };
        let m = &mut self.meta[idx as usize];
        m.kind = KIND_ALLOC;
        m.order = order;
        m.mt = mt as u8;
        self.alloc_frames[mt.index()] += 1u64 << order;
        Ok(FrameId(self.base + u64::from(idx)))
    }

    /// Linux's `__rmqueue_fallback`: the largest free block of a fallback type (in
    /// `fallbacks()` order at equal size). Returns the unlisted lower block of `order`.
    fn alloc_fallback(&mut self, order: u8, lt: usize) -> Option<u32> {
        let start = MigrateType::from_index(lt)?;
        let mut any = 0u32;
        for ft in start.fallbacks() {
            any |= self.lists.nonempty[ft.index()];
        }
        any &= !((1u32 << order) - 1);
        if any == 0 {
            return None;
        }
        let o = (31 - any.leading_zeros()) as u8;
        let ft = start
            .fallbacks()
            .iter()
            .map(|t| t.index())
            .find(|&t| self.lists.nonempty[t] & (1 << o) != 0)?;
        let idx = self.list_pop(o, ft);
        self.steals += 1;
        Some(self.steal_block(idx, o, order, ft, lt))
    }

    /// Take the unlisted free block (idx, cur) of type `ft` for an order-`order` request of
    /// type `lt`, claiming pageblocks when the rule says so.
    fn steal_block(&mut self, idx: u32, cur: u8, order: u8, ft: usize, lt: usize) -> u32 {
        if cur >= PAGEBLOCK_ORDER {
            // Claim only what the request needs (at least one pageblock); the rest of a big
            // block stays with its type instead of converting up to 1 GiB at once.
            let target = order.max(PAGEBLOCK_ORDER);
            self.expand(idx, target, cur, ft);
            self.claims += self.set_block_pb_types(idx, target, lt);
            self.expand(idx, order, target, lt);
            return idx;
        }
        let (free, alike, span) = self.pageblock_usage(idx, lt, ft);
        if 2 * (free + alike) >= span {
            self.claim_pageblock(idx, lt);
            self.expand(idx, order, cur, lt);
        } else {
            self.expand(idx, order, cur, ft);
        }
        idx
    }

    /// For the pageblock holding `idx`: (free frames, frames allocated "alike" a type-`lt`
    /// request per Linux's rule, frames of the pageblock in the zone).
    fn pageblock_usage(&self, idx: u32, lt: usize, old: usize) -> (u64, u64, u64) {
        let (start, end) = self.pageblock_bounds(idx);
        let (mut free, mut movable, mut other) = (0u64, 0u64, 0u64);
        let mut pos = start;
        while pos < end {
            let m = &self.meta[pos as usize];
            let n = 1u32 << m.order;
            match m.kind {
                KIND_FREE => free += u64::from(n),
                KIND_ALLOC if m.mt as usize == MOVABLE => movable += u64::from(n),
                KIND_ALLOC => other += u64::from(n),
                _ => {}
            }
            pos += n.max(1);
        }
        let alike = if lt == MOVABLE {
            movable
        } else if old == MOVABLE {
            other
        } else {
            0
        };
        (free, alike, u64::from(end - start))
    }

    /// Zone indices [start, end) of the pageblock holding `idx`, clipped to the zone.
    fn pageblock_bounds(&self, idx: u32) -> (u32, u32) {
        let g = self.base + u64::from(idx);
        let s = (g & !(PAGEBLOCK_FRAMES - 1)).max(self.base);
        let e = ((g | (PAGEBLOCK_FRAMES - 1)) + 1).min(self.base + self.nr);
        ((s - self.base) as u32, (e - self.base) as u32)
    }

    /// Change the (sub-pageblock-split) pageblock holding `idx` to type `mt` and move its
    /// listed free blocks to `mt`'s lists.
    fn claim_pageblock(&mut self, idx: u32, mt: usize) {
        let pb = self.pb_index(idx);
        if self.pb_types[pb] as usize != mt {
            self.pb_types[pb] = mt as u8;
            self.claims += 1;
        }
        let (start, end) = self.pageblock_bounds(idx);
        let mut pos = start;
        while pos < end {
            let m = self.meta[pos as usize];
            if m.kind == KIND_FREE && pos != idx {
                self.list_move(pos, mt);
            }
            pos += 1u32 << m.order;
        }
    }

    /// Allocate the specific block (frame, order) for `mt`. Fails unless every frame in it is
    /// free and it lies outside isolated pageblocks.
    pub fn alloc_at(
        &mut self,
        frame: FrameId,
        order: u8,
        mt: MigrateType,
    ) -> Result<(), AllocError> {
        if order > MAX_ORDER {
            return Err(AllocError::InvalidOrder(order));
        }
        if mt == MigrateType::Isolate {
            return Err(AllocError::InvalidType(mt));
        }
        if !frame.is_aligned(order) {
            return Err(AllocError::Unaligned { frame, order });
        }
        let idx = frame.0.wrapping_sub(self.base);
        if idx >= self.nr || idx + (1u64 << order) > self.nr {
            return Err(AllocError::OutOfZone(frame));
        }
        let idx = idx as u32;
        let (mut h, mut k, kind) = self
            .containing_block(idx)
            .ok_or(AllocError::NotFree(frame))?;
        if kind != KIND_FREE || k < order {
            return Err(AllocError::NotFree(frame));
        }
        let t = self.meta[h as usize].mt as usize;
        if t == ISOLATE {
            return Err(AllocError::Isolated(frame));
        }
        self.list_remove(h);
        while k > order {
            k -= 1;
            let upper = h + (1u32 << k);
            if idx >= upper {
                self.list_push(h, k, t);
                h = upper;
            } else {
                self.list_push(upper, k, t);
            }
        }
        let m = &mut self.meta[h as usize];
        m.kind = KIND_ALLOC;
        m.order = order;
        m.mt = mt as u8;
        self.alloc_frames[mt.index()] += 1u64 << order;
        Ok(())
    }

    // ---- free ----------------------------------------------------------------------------

    /// Free the allocated block (frame, order). Detects double frees, wrong orders, tail
    /// frames and foreign frames.
    #[inline]
    pub fn free(&mut self, frame: FrameId, order: u8) -> Result<(), FreeError> {
        let idx = self.check_allocated(frame, order)?;
        let mt = self.meta[idx as usize].mt as usize;
        self.alloc_frames[mt] -= 1u64 << order;
        self.merge_insert(idx, order);
        Ok(())
    }

    /// Like [`Zone::free`], but also checks that the block was allocated as `mt`.
    pub fn free_as(&mut self, frame: FrameId, order: u8, mt: MigrateType) -> Result<(), FreeError> {
        let idx = self.check_allocated(frame, order)?;
        let t = self.meta[idx as usize].mt as usize;
        if t != mt.index() {
            return Err(FreeError::WrongType {
                frame,
                allocated: MigrateType::from_index(t).unwrap_or(MigrateType::Movable),
                given: mt,
            });
        }
        self.alloc_frames[t] -= 1u64 << order;
        self.merge_insert(idx, order);
        Ok(())
    }

    /// Check that (frame, order) is an allocated head; returns its index.
    #[inline]
    pub(crate) fn check_allocated(&self, frame: FrameId, order: u8) -> Result<u32, FreeError> {
        if order > MAX_ORDER {
            return Err(FreeError::InvalidOrder(order));
        }
        let idx = frame.0.wrapping_sub(self.base);
        if idx >= self.nr {
            return Err(FreeError::OutOfZone(frame));
        }
        let idx = idx as u32;
        let m = &self.meta[idx as usize];
        match m.kind {
            KIND_ALLOC if m.order == order => Ok(idx),
            KIND_ALLOC => Err(FreeError::WrongOrder {
                frame,
                allocated: m.order,
                given: order,
            }),
            KIND_FREE => Err(FreeError::DoubleFree(frame)),
            _ => match self.containing_block(idx) {
                Some((h, _, KIND_ALLOC)) => Err(FreeError::TailFrame {
                    frame,
                    head: FrameId(self.base + u64::from(h)),
                }),
                _ => Err(FreeError::DoubleFree(frame)),
            },
        }
    }

    /// Insert the unlisted free block (idx, order), merging with free buddies.
    pub(crate) fn merge_insert(&mut self, mut idx: u32, mut order: u8) {
        let mut t = self.pb_type_of(idx);
        let (first_idx, first_order) = (idx, order);
        while order < MAX_ORDER {
            let Some(b) = self.buddy_index(idx, order) else {
                break;
            };
            let bm = self.meta[b as usize];
            if bm.kind != KIND_FREE || bm.order != order {
                break;
            }
            if order >= PAGEBLOCK_ORDER {
                // The pageblock type, not the list type: they differ while unisolating.
                let bt = self.pb_type_of(b);
                if (bt == ISOLATE) != (t == ISOLATE) {
                    break;
                }
                if bt != t {
                    // Whole free pageblocks of two allocatable types merge; the result
                    // keeps MOVABLE if either half was MOVABLE.
                    let nt = if bt == MOVABLE || t == MOVABLE {
                        MOVABLE
                    } else {
                        t
                    };
                    self.set_block_pb_types(b, order, nt);
                    self.set_block_pb_types(idx, order, nt);
                    t = nt;
                }
            }
            self.unlink(b);
            let (lo, hi) = if b < idx { (b, idx) } else { (idx, b) };
            self.meta[hi as usize].kind = KIND_TAIL;
            idx = lo;
            order += 1;
        }
        self.list_push(idx, order, t);
        // The buddies merged below pageblock order lay in the pageblock of the freed block.
        if first_order < PAGEBLOCK_ORDER {
            let merged = (1u16 << order.min(PAGEBLOCK_ORDER)) - (1u16 << first_order);
            let pb = self.pb_index(first_idx);
            self.pb_free[pb] -= merged;
        }
    }

    // ---- allocated-block operations ------------------------------------------------------

    /// Split the allocated block (frame, order) into `2^(order - to_order)` allocated blocks
    /// of order `to_order`, all with the block's migration type.
    pub fn split_allocated(
        &mut self,
        frame: FrameId,
        order: u8,
        to_order: u8,
    ) -> Result<(), FreeError> {
        if to_order > order {
            return Err(FreeError::InvalidOrder(to_order));
        }
        let idx = self.check_allocated(frame, order)?;
        let mt = self.meta[idx as usize].mt;
        let step = 1u32 << to_order;
        let mut pos = idx;
        while pos < idx + (1u32 << order) {
            let m = &mut self.meta[pos as usize];
            m.kind = KIND_ALLOC;
            m.order = to_order;
            m.mt = mt;
            pos += step;
        }
        Ok(())
    }

    /// The allocated block containing `f`: (head, order, migration type), if any.
    pub fn allocation_at(&self, f: FrameId) -> Option<(FrameId, u8, MigrateType)> {
        if !self.contains(f) {
            return None;
        }
        let (h, o, kind) = self.containing_block((f.0 - self.base) as u32)?;
        if kind != KIND_ALLOC {
            return None;
        }
        let mt = MigrateType::from_index(self.meta[h as usize].mt as usize)?;
        Some((FrameId(self.base + u64::from(h)), o, mt))
    }

    /// Whether `f` lies in a free block (false outside the zone).
    pub fn is_free(&self, f: FrameId) -> bool {
        self.contains(f)
            && matches!(
                self.containing_block((f.0 - self.base) as u32),
                Some((_, _, KIND_FREE))
            )
    }

    /// Allocated blocks whose head lies in `[start, start + count)`, in address order.
    pub fn allocations_in(
        &self,
        start: FrameId,
        count: u64,
    ) -> impl Iterator<Item = (FrameId, u8, MigrateType)> + '_ {
        self.blocks_in(start, count)
            .filter(|b| !b.free)
            .map(|b| (b.head, b.order, b.mt))
    }

    /// Every block (free or allocated) whose head lies in `[start, start + count)`.
    pub fn blocks_in(&self, start: FrameId, count: u64) -> BlockIter<'_> {
        let end = start.0.saturating_add(count).min(self.base + self.nr);
        let mut pos = start.0.max(self.base);
        if pos < end {
            if let Some((h, o, _)) = self.containing_block((pos - self.base) as u32) {
                let h = self.base + u64::from(h);
                if h < pos {
                    pos = h + (1u64 << o);
                }
            }
        }
        BlockIter {
            zone: self,
            pos,
            end,
        }
    }
}

/// One block reported by [`Zone::blocks_in`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockInfo {
    /// Head frame.
    pub head: FrameId,
    /// Order.
    pub order: u8,
    /// Allocated: the allocation's type. Free: the type of the list it is on.
    pub mt: MigrateType,
    /// Whether the block is free.
    pub free: bool,
}

/// Iterator over the blocks of a range (see [`Zone::blocks_in`]).
#[derive(Debug)]
pub struct BlockIter<'a> {
    zone: &'a Zone,
    pos: u64,
    end: u64,
}

impl Iterator for BlockIter<'_> {
    type Item = BlockInfo;

    fn next(&mut self) -> Option<BlockInfo> {
        if self.pos >= self.end {
            return None;
        }
        let z = self.zone;
        let m = z.meta[(self.pos - z.base) as usize];
        let head = FrameId(self.pos);
        self.pos += 1u64 << m.order;
        Some(BlockInfo {
            head,
            order: m.order,
            mt: MigrateType::from_index(m.mt as usize).unwrap_or(MigrateType::Movable),
            free: m.kind == KIND_FREE,
        })
    }
}

#[cfg(test)]
mod tests;
