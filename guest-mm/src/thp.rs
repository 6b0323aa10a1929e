//! Transparent-huge-page (order-9, 2 MiB) policy: direct, steal, compact, fall back to 4 KiB;
//! splitting under pressure; collapse candidates.
//!
//! [`alloc_thp`] tries, in order:
//! 1. **Direct**: a free block of order 9 or more on the requesting type's own lists;
//! 2. **Stolen**: a large enough block of a fallback type (the zone's steal and claim rules);
//! 3. **Compacted**: with a [`Mover`], [`compact_until`] order 9, then take that block;
//! 4. **Fallback4k**: 512 separate order-0 frames (what Linux does when THP allocation fails).
//!
//! Each path is counted in the zone's [`ThpStats`].

use crate::compaction::{compact_until, Mover};
use crate::frame::{FrameId, MigrateType, PAGEBLOCK_FRAMES, THP_ORDER};
use crate::zone::{AllocError, FreeError, Zone};
use serde::Serialize;

/// Frames in one THP.
pub const THP_FRAMES: u64 = 1 << THP_ORDER;

/// Which path served a THP request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ThpOutcome {
    /// A free 2 MiB block of the requesting type's own.
    Direct(FrameId),
    /// A block stolen from a fallback type.
    Stolen(FrameId),
    /// A block made free by compaction.
    Compacted(FrameId),
    /// No 2 MiB block: 512 separate order-0 frames of the requested type.
    Fallback4k(Vec<FrameId>),
}

impl ThpOutcome {
    /// The huge block, if one was allocated.
    pub fn huge_frame(&self) -> Option<FrameId> {
        match self {
            ThpOutcome::Direct(f) | ThpOutcome::Stolen(f) | ThpOutcome::Compacted(f) => Some(*f),
            ThpOutcome::Fallback4k(_) => None,
        }
    }

    /// Give the memory back to the zone (the order-9 block, or the 512 frames).
    pub fn free(self, zone: &mut Zone) -> Result<(), FreeError> {
        match self {
            ThpOutcome::Direct(f) | ThpOutcome::Stolen(f) | ThpOutcome::Compacted(f) => {
                zone.free(f, THP_ORDER)
            }
            ThpOutcome::Fallback4k(v) => {
                let mut first = Ok(());
                for f in v {
                    first = first.and(zone.free(f, 0));
                }
                first
            }
        }
    }
}

/// THP counters of a zone (see [`Zone::thp_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ThpStats {
    /// Served from the type's own lists.
    pub direct: u64,
    /// Served by stealing from a fallback type.
    pub stolen: u64,
    /// Served after compaction.
    pub compacted: u64,
    /// Served as 512 order-0 frames.
    pub fallback_4k: u64,
    /// Not served at all.
    pub failures: u64,
    /// THPs split into order-0 frames.
    pub splits: u64,
    /// 512 order-0 allocations joined back into a THP.
    pub collapses: u64,
}

/// Allocate 2 MiB for `mt`, trying the paths in the order of the module docs. Without a
/// mover, compaction is skipped. Fails only when not even 512 order-0 frames are free (then
/// nothing stays allocated).
pub fn alloc_thp(
    zone: &mut Zone,
    mt: MigrateType,
    mover: Option<&mut dyn Mover>,
) -> Result<ThpOutcome, AllocError> {
    if mt == MigrateType::Isolate {
        return Err(AllocError::InvalidType(mt));
    }
    if zone.has_own_block(THP_ORDER, mt) {
        let f = zone.alloc(THP_ORDER, mt)?;
        zone.thp_stats_mut().direct += 1;
        return Ok(ThpOutcome::Direct(f));
    }
    if zone.can_alloc(THP_ORDER, mt) {
        let f = zone.alloc(THP_ORDER, mt)?;
        zone.thp_stats_mut().stolen += 1;
        return Ok(ThpOutcome::Stolen(f));
    }
    if let Some(m) = mover {
        let r = compact_until(zone, THP_ORDER, m);
        if let Some(b) = r.block.filter(|_| r.succeeded()) {
            if zone.alloc_at(b, THP_ORDER, mt).is_ok() {
                zone.thp_stats_mut().compacted += 1;
                return Ok(ThpOutcome::Compacted(b));
            }
        }
    }
    let mut frames = Vec::with_capacity(THP_FRAMES as usize);
    for _ in 0..THP_FRAMES {
        match zone.alloc(0, mt) {
            Ok(f) => frames.push(f),
            Err(_) => {
                for f in frames {
                    // Each was allocated just above, so freeing cannot fail.
                    let _ = zone.free(f, 0);
                }
                zone.thp_stats_mut().failures += 1;
                return Err(AllocError::OutOfMemory {
                    order: THP_ORDER,
                    mt,
                });
            }
        }
    }
    zone.thp_stats_mut().fallback_4k += 1;
    Ok(ThpOutcome::Fallback4k(frames))
}

/// Split an allocated THP into 512 order-0 allocations (under memory pressure, so that parts
/// of it can be freed).
pub fn split_thp(zone: &mut Zone, frame: FrameId) -> Result<(), FreeError> {
    zone.split_allocated(frame, THP_ORDER, 0)?;
    zone.thp_stats_mut().splits += 1;
    Ok(())
}

/// A 2 MiB range that could be collapsed back into one THP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct CollapseCandidate {
    /// First frame of the pageblock.
    pub start: FrameId,
    /// The common migration type of its 512 allocations.
    pub mt: MigrateType,
}

/// Pageblocks whose 512 frames are all allocated at order 0 with one migration type (the
/// "same owner" approximation): candidates for [`collapse_thp`].
pub fn collapse_candidates(zone: &Zone) -> Vec<CollapseCandidate> {
    let (base, end) = (zone.base().0, zone.base().0 + zone.nr_frames());
    let mut out = Vec::new();
    let mut pb = base.next_multiple_of(PAGEBLOCK_FRAMES);
    while pb + PAGEBLOCK_FRAMES <= end {
        let mut mt = None;
        let mut n = 0u64;
        let mut ok = true;
        for b in zone.blocks_in(FrameId(pb), PAGEBLOCK_FRAMES) {
            if b.free || b.order != 0 || mt.is_some_and(|t| t != b.mt) {
                ok = false;
                break;
            }
            mt = Some(b.mt);
            n += 1;
        }
        if let (true, Some(mt), PAGEBLOCK_FRAMES) = (ok, mt, n) {
            out.push(CollapseCandidate {
                start: FrameId(pb),
                mt,
            });
        }
        pb += PAGEBLOCK_FRAMES;
    }
    out
}

/// Join the 512 order-0 allocations of a collapse candidate into one THP allocation.
pub fn collapse_thp(zone: &mut Zone, start: FrameId) -> Result<MigrateType, FreeError> {
    if !zone
        .allocations_in(start, THP_FRAMES)
        .all(|(_, o, _)| o == 0)
    {
        return Err(FreeError::InvalidOrder(THP_ORDER));
    }
    let mt = zone.join_allocated(start, THP_ORDER)?;
    zone.thp_stats_mut().collapses += 1;
    Ok(mt)
}
