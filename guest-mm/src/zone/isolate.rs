//! Pageblock isolation: ranges whose free blocks leave the allocatable lists.

use super::freelist::{KIND_ALLOC, KIND_FREE, KIND_TAIL};
use super::{Zone, ZoneError, ISOLATE};
use crate::frame::{FrameId, MigrateType, PAGEBLOCK_FRAMES, PAGEBLOCK_ORDER};

impl Zone {
    /// Check a range for isolation: inside the zone, and each end pageblock aligned or a zone
    /// edge. Returns zone indices [start, end).
    fn check_range(&self, start: FrameId, count: u64) -> Result<(u32, u32), ZoneError> {
        let zend = self.base + self.nr;
        let end = start.0.checked_add(count);
        let Some(end) = end.filter(|&e| count > 0 && start.0 >= self.base && e <= zend) else {
            return Err(ZoneError::OutOfZone { start, count });
        };
        let aligned = |f: u64| f % PAGEBLOCK_FRAMES == 0 || f == self.base || f == zend;
        if !aligned(start.0) || !aligned(end) {
            return Err(ZoneError::Unaligned { start, count });
        }
        Ok(((start.0 - self.base) as u32, (end - self.base) as u32))
    }

    /// Mark the pageblocks of `[start, start + count)` ISOLATE: their free blocks move to the
    /// isolate lists and are never handed out; blocks freed there later stay isolated. The
    /// range must be pageblock aligned (or end at a zone edge); no pageblock in it may already
    /// be isolated and no allocated block may cross its ends.
    pub fn isolate_range(&mut self, start: FrameId, count: u64) -> Result<(), ZoneError> {
        let (s, e) = self.check_range(start, count)?;
        for pb in self.pb_index(s)..=self.pb_index(e - 1) {
            if self.pb_types[pb] as usize == ISOLATE {
                let f = (self.pb_first + pb as u64) << PAGEBLOCK_ORDER;
                return Err(ZoneError::AlreadyIsolated(FrameId(f.max(self.base))));
            }
        }
        self.check_straddle(s, e)?;
        self.split_free_at(s);
        self.split_free_at(e);
        for pb in self.pb_index(s)..=self.pb_index(e - 1) {
            self.pb_types[pb] = ISOLATE as u8;
        }
        // Free blocks move to the isolate lists, merging with isolated neighbours.
        self.remerge(s, e);
        self.epoch.bump();
        Ok(())
    }

    /// Give the isolated pageblocks of `[start, start + count)` type `mt` again; their free
    /// blocks return to `mt`'s lists and merge with their buddies. Every pageblock of the range
    /// must be isolated and no allocated block may cross its ends (a sub-range of an isolated
    /// range may be given back).
    pub fn unisolate_range(
        &mut self,
        start: FrameId,
        count: u64,
        mt: MigrateType,
    ) -> Result<(), ZoneError> {
        if mt == MigrateType::Isolate {
            return Err(ZoneError::InvalidType(mt));
        }
        let (s, e) = self.check_range(start, count)?;
        for pb in self.pb_index(s)..=self.pb_index(e - 1) {
            if self.pb_types[pb] as usize != ISOLATE {
                let f = (self.pb_first + pb as u64) << PAGEBLOCK_ORDER;
                return Err(ZoneError::NotIsolated(FrameId(f.max(self.base))));
            }
        }
        self.check_straddle(s, e)?;
        self.split_free_at(s);
        self.split_free_at(e);
        for pb in self.pb_index(s)..=self.pb_index(e - 1) {
            self.pb_types[pb] = mt as u8;
        }
        self.remerge(s, e);
        self.epoch.bump();
        Ok(())
    }

    /// Refuse when an allocated block crosses an end of [s, e).
    fn check_straddle(&self, s: u32, e: u32) -> Result<(), ZoneError> {
        for edge in [s, e] {
            if u64::from(edge) < self.nr {
                if let Some((h, _, KIND_ALLOC)) = self.containing_block(edge) {
                    if h < edge {
                        return Err(ZoneError::Straddling(FrameId(self.base + u64::from(h))));
                    }
                }
            }
        }
        Ok(())
    }

    /// Re-insert every free block of [s, e) after a pageblock type change, so that it lands on
    /// its pageblock's list and merges with every buddy it may now merge with.
    fn remerge(&mut self, s: u32, e: u32) {
        let mut pos = s;
        while pos < e {
            let m = self.meta[pos as usize];
            if m.kind == KIND_TAIL {
                // Absorbed by a merge of an earlier block: skip to the end of its block.
                match self.containing_block(pos) {
                    Some((h, o, _)) => pos = h + (1u32 << o),
                    None => pos += 1,
                }
                continue;
            }
            if m.kind == KIND_FREE {
                self.list_remove(pos);
                self.merge_insert(pos, m.order);
            }
            pos += 1u32 << m.order;
        }
    }

    /// The isolated ranges as maximal runs of isolated pageblocks: (first frame, frames).
    pub fn isolated_ranges(&self) -> impl Iterator<Item = (FrameId, u64)> + '_ {
        let zend = self.base + self.nr;
        let frame_of = move |pb: usize| {
            (((self.pb_first + pb as u64) << PAGEBLOCK_ORDER).max(self.base)).min(zend)
        };
        let mut pb = 0usize;
        std::iter::from_fn(move || {
            while pb < self.pb_types.len() && self.pb_types[pb] as usize != ISOLATE {
                pb += 1;
            }
            if pb >= self.pb_types.len() {
                return None;
            }
            let start = pb;
            while pb < self.pb_types.len() && self.pb_types[pb] as usize == ISOLATE {
                pb += 1;
            }
            let s = frame_of(start);
            Some((FrameId(s), frame_of(pb).max(s) - s))
        })
    }

    /// If a free block starts before `edge` and covers it, split it so that a block starts
    /// at `edge`. Halves stay on the original block's list.
    fn split_free_at(&mut self, edge: u32) {
        if u64::from(edge) >= self.nr {
            return;
        }
        let Some((mut h, mut k, KIND_FREE)) = self.containing_block(edge) else {
            return;
        };
        if h == edge {
            return;
        }
        let t = self.meta[h as usize].mt as usize;
        self.list_remove(h);
        while h != edge {
            k -= 1;
            let upper = h + (1u32 << k);
            if edge >= upper {
                self.list_push(h, k, t);
                h = upper;
            } else {
                self.list_push(upper, k, t);
            }
        }
        self.list_push(h, k, t);
    }
}
