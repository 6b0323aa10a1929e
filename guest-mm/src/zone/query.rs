//! Queries and whole-allocation operations used by compaction and the THP policy.

use super::freelist::{KIND_ALLOC, KIND_FREE};
use super::{FreeError, Zone, ISOLATE, MOVABLE};
use crate::compaction::CompactionStats;
use crate::frame::{FrameId, MigrateType, MAX_ORDER};
use crate::thp::ThpStats;

impl Zone {
    /// The list type an allocation of `mt` uses (MOVABLE when mobility grouping is off).
    fn list_type(&self, mt: MigrateType) -> usize {
        if self.mobility_grouping {
            mt.index()
        } else {
            MOVABLE
        }
    }

    /// Whether an order-`order` allocation of `mt` can be served from `mt`'s own lists
    /// (without stealing).
    pub fn has_own_block(&self, order: u8, mt: MigrateType) -> bool {
        if order > MAX_ORDER || mt == MigrateType::Isolate {
            return false;
        }
        self.lists.nonempty[self.list_type(mt)] >> order != 0
    }

    /// Whether an order-`order` allocation of `mt` can succeed at all (own lists or a
    /// fallback type).
    pub fn can_alloc(&self, order: u8, mt: MigrateType) -> bool {
        if order > MAX_ORDER || mt == MigrateType::Isolate {
            return false;
        }
        let Some(lt) = MigrateType::from_index(self.list_type(mt)) else {
            return false;
        };
        std::iter::once(lt)
            .chain(lt.fallbacks().iter().copied())
            .any(|t| self.lists.nonempty[t.index()] >> order != 0)
    }

    /// The largest order with a free, non-isolated block.
    pub fn largest_free_order(&self) -> Option<u8> {
        let mut any = 0u32;
        for (t, m) in self.lists.nonempty.iter().enumerate() {
            if t != ISOLATE {
                any |= m;
            }
        }
        (any != 0).then(|| (31 - any.leading_zeros()) as u8)
    }

    /// Some free, non-isolated block of order `min_order` or more: (head, order). The
    /// smallest order that has one is used.
    pub fn first_free_block(&self, min_order: u8) -> Option<(FrameId, u8)> {
        for o in min_order..=MAX_ORDER {
            for t in MigrateType::ALLOCATABLE {
                let h = self.lists.heads[t.index()][o as usize];
                if h != super::freelist::NIL {
                    return Some((FrameId(self.base + u64::from(h)), o));
                }
            }
        }
        None
    }

    /// The free block containing `f`: (head, order), if `f` is free.
    pub fn free_block_at(&self, f: FrameId) -> Option<(FrameId, u8)> {
        if !self.contains(f) {
            return None;
        }
        match self.containing_block((f.0 - self.base) as u32)? {
            (h, o, KIND_FREE) => Some((FrameId(self.base + u64::from(h)), o)),
            _ => None,
        }
    }

    /// Join the allocated blocks that exactly tile the naturally aligned block (frame, order)
    /// into one allocated block of `order` (the inverse of [`Zone::split_allocated`]). Every
    /// frame must be allocated, all with the same migration type.
    pub fn join_allocated(&mut self, frame: FrameId, order: u8) -> Result<MigrateType, FreeError> {
        if order > MAX_ORDER {
            return Err(FreeError::InvalidOrder(order));
        }
        if !frame.is_aligned(order) {
            return Err(FreeError::InvalidOrder(order));
        }
        let idx = frame.0.wrapping_sub(self.base);
        if idx >= self.nr || idx + (1u64 << order) > self.nr {
            return Err(FreeError::OutOfZone(frame));
        }
        let idx = idx as u32;
        let end = idx + (1u32 << order);
        let (h, o, kind) = self
            .containing_block(idx)
            .ok_or(FreeError::DoubleFree(frame))?;
        if kind != KIND_ALLOC {
            return Err(FreeError::DoubleFree(frame));
        }
        if o > order {
            return Err(FreeError::WrongOrder {
                frame,
                allocated: o,
                given: order,
            });
        }
        if h != idx {
            return Err(FreeError::TailFrame {
                frame,
                head: FrameId(self.base + u64::from(h)),
            });
        }
        let mt = self.meta[idx as usize].mt;
        let mut pos = idx;
        while pos < end {
            let m = self.meta[pos as usize];
            if m.kind != KIND_ALLOC {
                return Err(FreeError::DoubleFree(FrameId(self.base + u64::from(pos))));
            }
            if m.mt != mt {
                let as_type =
                    |t: u8| MigrateType::from_index(t as usize).unwrap_or(MigrateType::Movable);
                return Err(FreeError::WrongType {
                    frame: FrameId(self.base + u64::from(pos)),
                    allocated: as_type(m.mt),
                    given: as_type(mt),
                });
            }
            pos += 1u32 << m.order;
        }
        pos = idx + 1;
        while pos < end {
            self.meta[pos as usize] = super::freelist::Meta::TAIL;
            pos += 1;
        }
        self.meta[idx as usize].order = order;
        Ok(MigrateType::from_index(mt as usize).unwrap_or(MigrateType::Movable))
    }

    /// Compaction counters of this zone.
    pub fn compaction_stats(&self) -> CompactionStats {
        self.compaction
    }

    pub(crate) fn compaction_stats_mut(&mut self) -> &mut CompactionStats {
        &mut self.compaction
    }

    /// THP policy counters of this zone.
    pub fn thp_stats(&self) -> ThpStats {
        self.thp
    }

    pub(crate) fn thp_stats_mut(&mut self) -> &mut ThpStats {
        &mut self.thp
    }
}
