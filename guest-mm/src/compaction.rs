//! Compaction: move MOVABLE blocks through a [`Mover`] callback so that large free blocks
//! form again.
//!
//! [`compact_until`] makes one order-N block free: it picks the naturally aligned order-N
//! regions whose allocated blocks are all MOVABLE, fewest allocated frames first, isolates the
//! region's pageblocks (so nothing new lands there), moves each allocated block to a
//! destination outside (first the holes of pageblocks pinned by unmovable or reclaimable
//! data, which can never become huge anyway; then densely used MOVABLE pageblocks, from the
//! zone end, like Linux's free scanner), frees the sources, and gives the pageblocks their types back, which
//! coalesces the region. If the mover refuses a block, the destination is freed and the next
//! region is tried.
//!
//! [`compact_full`] runs Linux's two scanners over the whole zone: a migration scanner from the
//! start moves every MOVABLE block into free space found by a free scanner from the end, until
//! the two meet.
//!
//! Frames held by per-thread caches look like MOVABLE allocations to the zone: drain the
//! caches before compacting (as Linux drains its per-CPU lists).

use crate::frame::{FrameId, MigrateType, MAX_ORDER, PAGEBLOCK_FRAMES, PAGEBLOCK_ORDER};
use crate::zone::Zone;
use serde::Serialize;

/// Moves the contents of allocated blocks (implemented by whoever owns the memory).
pub trait Mover {
    /// Copy the contents of the block at `from` to `to` and repoint its owner's mapping.
    /// Err means "cannot move now" (pinned, busy): compaction skips the block.
    fn move_block(&mut self, from: FrameId, to: FrameId, order: u8) -> Result<(), MoveError>;
}

/// Why a [`Mover`] could not move a block.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MoveError {
    /// The block is pinned (e.g. under DMA or a long-lived host mapping).
    #[error("block at {0} is pinned")]
    Pinned(FrameId),
    /// The block is busy right now; a later attempt may succeed.
    #[error("block at {0} is busy")]
    Busy(FrameId),
    /// The copy or the remapping failed.
    #[error("moving the block at {frame} failed: {reason}")]
    Failed {
        /// The source block.
        frame: FrameId,
        /// Why.
        reason: String,
    },
}

/// Compaction counters of a zone (see [`Zone::compaction_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CompactionStats {
    /// Calls of [`compact_until`] and [`compact_full`].
    pub runs: u64,
    /// Runs that reached their goal.
    pub successes: u64,
    /// Runs that did not.
    pub failures: u64,
    /// Frames moved.
    pub frames_moved: u64,
    /// Blocks moved.
    pub blocks_moved: u64,
    /// Moves the mover refused.
    pub moves_refused: u64,
    /// Pageblocks examined.
    pub pageblocks_scanned: u64,
}

/// How a compaction run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CompactStatus {
    /// A block of the requested order was already free; nothing was moved.
    AlreadyFree,
    /// Blocks were moved and the goal was reached.
    Compacted,
    /// The goal could not be reached (no suitable region, no destination, moves refused).
    Failed,
}

/// The result of one compaction run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CompactResult {
    /// How it ended.
    pub status: CompactStatus,
    /// [`compact_until`]: a free block of the requested order (its first frame).
    /// [`compact_full`]: the head of a largest free block afterwards.
    pub block: Option<FrameId>,
    /// Frames moved in this run.
    pub frames_moved: u64,
    /// Blocks moved in this run.
    pub blocks_moved: u64,
    /// Moves refused by the mover in this run.
    pub moves_refused: u64,
    /// Candidate regions tried ([`compact_until`]).
    pub regions_tried: u64,
    /// Pageblocks examined.
    pub pageblocks_scanned: u64,
}

impl CompactResult {
    fn new() -> Self {
        CompactResult {
            status: CompactStatus::Failed,
            block: None,
            frames_moved: 0,
            blocks_moved: 0,
            moves_refused: 0,
            regions_tried: 0,
            pageblocks_scanned: 0,
        }
    }

    /// Whether the goal was reached.
    pub fn succeeded(&self) -> bool {
        self.status != CompactStatus::Failed
    }
}

/// Most candidate regions one [`compact_until`] run tries.
pub const MAX_REGIONS_PER_RUN: usize = 16;

/// Move MOVABLE blocks until a free block of `order` exists. See the module docs.
pub fn compact_until(zone: &mut Zone, order: u8, mover: &mut dyn Mover) -> CompactResult {
    let mut r = CompactResult::new();
    if order <= MAX_ORDER {
        if let Some((f, _)) = zone.first_free_block(order) {
            r.status = CompactStatus::AlreadyFree;
            r.block = Some(f);
        } else {
            let cands = plan(zone, order, &mut r);
            for &(_, start) in cands.iter().take(MAX_REGIONS_PER_RUN) {
                r.regions_tried += 1;
                if try_region(zone, start, order, mover, &mut r) {
                    r.status = CompactStatus::Compacted;
                    r.block = Some(start);
                    break;
                }
            }
        }
    }
    record(zone, &r);
    r
}

/// Compact the whole zone: move every MOVABLE block from the low end into free space at the
/// high end until the scanners meet. Refused moves are skipped.
pub fn compact_full(zone: &mut Zone, mover: &mut dyn Mover) -> CompactResult {
    let mut r = CompactResult::new();
    let pbs = pageblocks(zone);
    let mut free_scan = FreeScanner {
        pb: pbs.len(),
        hint: 0,
    };
    let mut seen = 0u64;
    'migrate: for lo in 0..pbs.len() {
        if free_scan.pb <= lo {
            break;
        }
        r.pageblocks_scanned += 1;
        let (start, len) = pbs[lo];
        if zone.pageblock_type(start) == MigrateType::Isolate {
            continue;
        }
        let sources: Vec<(FrameId, u8)> = zone
            .allocations_in(start, len)
            .filter(|&(_, _, mt)| mt == MigrateType::Movable)
            .map(|(f, o, _)| (f, o))
            .collect();
        for (from, o) in sources {
            seen += 1;
            if o >= PAGEBLOCK_ORDER {
                // Whole pageblocks move only into a free block at least as big, higher up;
                // without one the block stays and the scanners go on.
                if let Some(to) = big_dest(zone, &pbs, free_scan.pb, lo, o) {
                    move_one(zone, mover, from, to, o, &mut r);
                }
                continue;
            }
            let Some(to) = free_scan.take(zone, &pbs, lo, o) else {
                break 'migrate;
            };
            move_one(zone, mover, from, to, o, &mut r);
        }
    }
    r.status = if r.frames_moved > 0 {
        CompactStatus::Compacted
    } else if seen == 0 {
        CompactStatus::AlreadyFree
    } else {
        CompactStatus::Failed
    };
    r.block = zone
        .largest_free_order()
        .and_then(|o| zone.first_free_block(o))
        .map(|(f, _)| f);
    record(zone, &r);
    r
}

fn record(zone: &mut Zone, r: &CompactResult) {
    let s = zone.compaction_stats_mut();
    s.runs += 1;
    if r.succeeded() {
        s.successes += 1;
    } else {
        s.failures += 1;
    }
    s.frames_moved += r.frames_moved;
    s.blocks_moved += r.blocks_moved;
    s.moves_refused += r.moves_refused;
    s.pageblocks_scanned += r.pageblocks_scanned;
}

/// Move one allocated block to the allocated destination `to`; on refusal, free `to`.
fn move_one(
    zone: &mut Zone,
    mover: &mut dyn Mover,
    from: FrameId,
    to: FrameId,
    o: u8,
    r: &mut CompactResult,
) -> bool {
    match mover.move_block(from, to, o) {
        Ok(()) => {
            // `from` is an allocated head of order `o` (it came from allocations_in), so
            // freeing it cannot fail; if it did, the zone keeps both blocks allocated.
            if zone.free(from, o).is_ok() {
                r.frames_moved += 1u64 << o;
                r.blocks_moved += 1;
            }
            true
        }
        Err(_) => {
            let _ = zone.free(to, o);
            r.moves_refused += 1;
            false
        }
    }
}

/// The zone's pageblocks as (first frame, frames in the zone).
fn pageblocks(zone: &Zone) -> Vec<(FrameId, u64)> {
    let (base, end) = (zone.base().0, zone.base().0 + zone.nr_frames());
    let mut v = Vec::new();
    let mut pb = base & !(PAGEBLOCK_FRAMES - 1);
    while pb < end {
        let s = pb.max(base);
        let e = (pb + PAGEBLOCK_FRAMES).min(end);
        v.push((FrameId(s), e - s));
        pb += PAGEBLOCK_FRAMES;
    }
    v
}

/// Candidate order-`order` regions: (allocated frames, first frame), fewest allocated first.
/// A region qualifies when it lies in the zone, holds no isolated pageblock, every allocated
/// block in it is MOVABLE and no larger than the region, and the rest of the zone has enough
/// free frames to take its blocks.
fn plan(zone: &Zone, order: u8, r: &mut CompactResult) -> Vec<(u64, FrameId)> {
    let (base, end) = (zone.base().0, zone.base().0 + zone.nr_frames());
    let size = 1u64 << order;
    let stats = zone.stats();
    let usable_free = stats.free - stats.isolated_free;
    r.pageblocks_scanned += pageblocks(zone).len() as u64;
    let mut out = Vec::new();
    // Current region: (start, allocated frames, still a candidate).
    let mut cur: Option<(u64, u64, bool)> = None;
    let flush = |c: Option<(u64, u64, bool)>, out: &mut Vec<(u64, FrameId)>| {
        if let Some((s, alloc, ok)) = c {
            let free_inside = size - alloc;
            if ok
                && alloc > 0
                && s >= base
                && s + size <= end
                && alloc <= usable_free - free_inside.min(usable_free)
            {
                out.push((alloc, FrameId(s)));
            }
        }
    };
    for b in zone.blocks_in(FrameId(base), end - base) {
        if b.order > order {
            flush(cur.take(), &mut out);
            continue;
        }
        let s = b.head.0 & !(size - 1);
        if cur.map(|c| c.0) != Some(s) {
            flush(cur.take(), &mut out);
            cur = Some((s, 0, true));
        }
        if let Some(c) = cur.as_mut() {
            if zone.pageblock_type(b.head) == MigrateType::Isolate {
                c.2 = false;
            } else if !b.free {
                c.1 += 1u64 << b.order;
                if b.mt != MigrateType::Movable {
                    c.2 = false;
                }
            }
        }
    }
    flush(cur.take(), &mut out);
    out.sort_unstable();
    out
}

/// Empty the region (start, order) by moving its blocks out. Returns whether it is now free.
fn try_region(
    zone: &mut Zone,
    start: FrameId,
    order: u8,
    mover: &mut dyn Mover,
    r: &mut CompactResult,
) -> bool {
    let (base, end) = (zone.base().0, zone.base().0 + zone.nr_frames());
    let size = 1u64 << order;
    let iso_s = (start.0 & !(PAGEBLOCK_FRAMES - 1)).max(base);
    let iso_e = ((start.0 + size + PAGEBLOCK_FRAMES - 1) & !(PAGEBLOCK_FRAMES - 1)).min(end);
    // Remember the pageblock types to give them back afterwards.
    let mut runs: Vec<(FrameId, u64, MigrateType)> = Vec::new();
    let mut pb = iso_s;
    while pb < iso_e {
        let next = ((pb | (PAGEBLOCK_FRAMES - 1)) + 1).min(iso_e);
        let t = zone.pageblock_type(FrameId(pb));
        match runs.last_mut() {
            Some(last) if last.2 == t => last.1 += next - pb,
            _ => runs.push((FrameId(pb), next - pb, t)),
        }
        pb = next;
    }
    if zone.isolate_range(FrameId(iso_s), iso_e - iso_s).is_err() {
        return false;
    }
    let blocks: Vec<(FrameId, u8, MigrateType)> = zone.allocations_in(start, size).collect();
    let mut dest = DestFinder::new(zone, iso_s, iso_e);
    let mut ok = true;
    for (from, o, mt) in blocks {
        if mt != MigrateType::Movable {
            ok = false;
            break;
        }
        let Some(to) = dest.take(zone, o) else {
            ok = false;
            break;
        };
        if !move_one(zone, mover, from, to, o, r) {
            ok = false;
            break;
        }
    }
    for (s, n, t) in runs {
        // The range was isolated by us just above, so giving it back cannot fail.
        let _ = zone.unisolate_range(s, n, t);
    }
    ok && zone.free_block_at(start).is_some_and(|(_, o)| o >= order)
}

/// Destinations for [`compact_until`]: pageblocks outside the isolated range that have free
/// frames. Pageblocks pinned by an unmovable or reclaimable allocation come first (they can
/// never become a free 2 MiB block, so their holes are the cheapest place for moved data),
/// then MOVABLE pageblocks, most densely used first, higher addresses first among equals.
struct DestFinder {
    pbs: Vec<FrameId>,
}

impl DestFinder {
    fn new(zone: &Zone, iso_s: u64, iso_e: u64) -> Self {
        let mut cands: Vec<(bool, u64, std::cmp::Reverse<u64>)> = Vec::new();
        for (s, n) in pageblocks(zone) {
            let t = zone.pageblock_type(s);
            if (s.0 >= iso_s && s.0 < iso_e) || t == MigrateType::Isolate {
                continue;
            }
            let (mut free, mut pinned) = (0u64, false);
            for b in zone.blocks_in(s, n) {
                if b.free {
                    free += 1u64 << b.order;
                } else if b.mt != MigrateType::Movable {
                    pinned = true;
                }
            }
            if free > 0 && free < n && (pinned || t == MigrateType::Movable) {
                cands.push((!pinned, free, std::cmp::Reverse(s.0)));
            }
        }
        cands.sort_unstable();
        DestFinder {
            pbs: cands.into_iter().map(|(_, _, s)| FrameId(s.0)).collect(),
        }
    }

    /// Allocate a MOVABLE destination block of `order` (outside the isolated range).
    fn take(&mut self, zone: &mut Zone, order: u8) -> Option<FrameId> {
        if order < PAGEBLOCK_ORDER {
            let mut i = 0;
            while i < self.pbs.len() {
                let pb = self.pbs[i];
                let n = zone.pageblock_frames_in_zone(pb);
                let fit = zone
                    .blocks_in(pb, n)
                    .filter(|b| b.free && b.order >= order)
                    .min_by_key(|b| b.order);
                match fit {
                    Some(b) => {
                        if zone.alloc_at(b.head, order, MigrateType::Movable).is_ok() {
                            return Some(b.head);
                        }
                        i += 1;
                    }
                    None if order == 0 => {
                        // No free frame left at all: never look here again.
                        self.pbs.remove(i);
                    }
                    None => i += 1,
                }
            }
        }
        // Whole pageblocks, or nothing left in the dense ones: the normal allocator (the
        // isolated region cannot be chosen).
        zone.alloc(order, MigrateType::Movable).ok()
    }
}

/// A free block of order >= `order` whose head lies in a pageblock in (lo, below), the
/// highest first; allocated as MOVABLE and returned.
fn big_dest(
    zone: &mut Zone,
    pbs: &[(FrameId, u64)],
    below: usize,
    lo: usize,
    order: u8,
) -> Option<FrameId> {
    for i in (lo + 1..below.min(pbs.len())).rev() {
        let s = pbs[i].0;
        if let Some((h, o)) = zone.free_block_at(s) {
            let ok_type = zone.pageblock_type(h) != MigrateType::Isolate;
            // The highest order-`order` piece of the free block that starts in this pageblock.
            let t = FrameId(s.0 & !((1u64 << order) - 1));
            let fits = ok_type && o >= order && t >= h && t.0 > pbs[lo].0 .0;
            if fits && zone.alloc_at(t, order, MigrateType::Movable).is_ok() {
                return Some(t);
            }
        }
    }
    None
}

/// The free scanner of [`compact_full`]: walks MOVABLE pageblocks down from the zone end.
struct FreeScanner {
    /// Index of the current destination pageblock + 1 (`pbs.len()` at the start).
    pb: usize,
    /// Frame to resume the search at inside the current pageblock (0: its start).
    hint: u64,
}

impl FreeScanner {
    /// A destination of `order` in a pageblock above `lo`, or None when the scanners meet.
    fn take(
        &mut self,
        zone: &mut Zone,
        pbs: &[(FrameId, u64)],
        lo: usize,
        order: u8,
    ) -> Option<FrameId> {
        while self.pb > lo + 1 {
            let (s, n) = pbs[self.pb - 1];
            let t = zone.pageblock_type(s);
            let from = self.hint.max(s.0);
            let fit = if t == MigrateType::Movable
                || (order >= PAGEBLOCK_ORDER && t != MigrateType::Isolate)
            {
                zone.blocks_in(FrameId(from), s.0 + n - from)
                    .find(|b| b.free && b.order >= order && b.mt != MigrateType::Isolate)
            } else {
                None
            };
            if let Some(b) = fit {
                if zone.alloc_at(b.head, order, MigrateType::Movable).is_ok() {
                    self.hint = b.head.0 + (1u64 << order);
                    return Some(b.head);
                }
            }
            self.pb -= 1;
            self.hint = 0;
        }
        None
    }
}
