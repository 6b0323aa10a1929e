//! The full invariant check.

use super::freelist::{KIND_ALLOC, KIND_FREE, KIND_TAIL, NIL};
use super::{ValidateError, Zone, ISOLATE};
use crate::frame::{FrameId, MigrateType, MAX_ORDER, NR_ORDERS, PAGEBLOCK_ORDER};

impl Zone {
    /// Check every internal invariant; the error names the first one broken. O(frames).
    #[allow(clippy::needless_range_loop)] // parallel per-type arrays
    pub fn validate(&self) -> Result<(), ValidateError> {
        let fid = |i: u32| Some(FrameId(self.base + u64::from(i)));
        let err = |inv: &'static str, i: u32, d: String| Err(ValidateError::new(inv, fid(i), d));
        let mut walk_free = [[0u64; NR_ORDERS]; MigrateType::COUNT];
        let mut walk_alloc = [0u64; MigrateType::COUNT];
        let mut walk_pb_free = vec![0u16; self.pb_free.len()];
        let nr = self.nr as u32;
        let mut pos = 0u32;
        // 1. The blocks tile the zone; tails are tails; types and merges are right.
        while pos < nr {
            let m = self.meta[pos as usize];
            if m.kind != KIND_FREE && m.kind != KIND_ALLOC {
                return err(
                    "tiling",
                    pos,
                    format!("expected a block head, found kind {}", m.kind),
                );
            }
            if m.order > MAX_ORDER || !FrameId(self.base + u64::from(pos)).is_aligned(m.order) {
                return err(
                    "alignment",
                    pos,
                    format!("order {} head misaligned", m.order),
                );
            }
            let size = 1u32 << m.order;
            if u64::from(pos) + u64::from(size) > self.nr {
                return err(
                    "bounds",
                    pos,
                    format!("order {} block leaves the zone", m.order),
                );
            }
            if let Some(t) =
                (pos + 1..pos + size).find(|&i| self.meta[i as usize].kind != KIND_TAIL)
            {
                return err(
                    "overlap",
                    t,
                    format!("head inside the block at {:?}", fid(pos)),
                );
            }
            let first = self.pb_index(pos);
            let last = self.pb_index(pos + size - 1);
            let types = &self.pb_types[first..=last];
            if m.mt as usize >= MigrateType::COUNT {
                return err("type", pos, format!("bad type {}", m.mt));
            }
            if m.kind == KIND_FREE {
                if types.iter().any(|&t| t != m.mt) {
                    return err(
                        "list type",
                        pos,
                        format!("free block on list {} but pageblocks {types:?}", m.mt),
                    );
                }
                walk_free[m.mt as usize][m.order as usize] += 1;
                if m.order < PAGEBLOCK_ORDER {
                    walk_pb_free[first] += 1u16 << m.order;
                }
                if m.order < MAX_ORDER {
                    if let Some(b) = self.buddy_index(pos, m.order) {
                        let bm = self.meta[b as usize];
                        let mergeable = bm.kind == KIND_FREE
                            && bm.order == m.order
                            && (m.order < PAGEBLOCK_ORDER
                                || ((bm.mt as usize == ISOLATE) == (m.mt as usize == ISOLATE)));
                        if mergeable {
                            return err(
                                "merged",
                                pos,
                                format!("free buddies of order {} not merged", m.order),
                            );
                        }
                    }
                }
            } else {
                let iso = types.iter().filter(|&&t| t as usize == ISOLATE).count();
                if iso != 0 && iso != types.len() {
                    return err(
                        "isolate",
                        pos,
                        "allocated block crosses an isolation edge".into(),
                    );
                }
                walk_alloc[m.mt as usize] += u64::from(size);
            }
            pos += size;
        }
        // 2. The lists hold exactly the free heads, with consistent links and counts.
        for t in 0..MigrateType::COUNT {
            for o in 0..NR_ORDERS {
                let mut n = 0u64;
                let mut prev = NIL;
                let mut cur = self.lists.heads[t][o];
                while cur != NIL {
                    if u64::from(cur) >= self.nr || n > self.nr {
                        return err("list", prev, format!("list ({t},{o}) broken"));
                    }
                    let m = self.meta[cur as usize];
                    if m.kind != KIND_FREE
                        || m.order as usize != o
                        || m.mt as usize != t
                        || m.prev != prev
                    {
                        return err(
                            "list",
                            cur,
                            format!(
                                "node of list ({t},{o}) has kind {} order {} type {}",
                                m.kind, m.order, m.mt
                            ),
                        );
                    }
                    n += 1;
                    prev = cur;
                    cur = m.next;
                }
                if n != self.lists.counts[t][o] || n != walk_free[t][o] {
                    return Err(ValidateError::new(
                        "counts",
                        None,
                        format!(
                            "list ({t},{o}): {n} linked, {} counted, {} in the walk",
                            self.lists.counts[t][o], walk_free[t][o]
                        ),
                    ));
                }
                if (n != 0) != (self.lists.nonempty[t] & (1 << o) != 0) {
                    return Err(ValidateError::new("mask", None, format!("list ({t},{o})")));
                }
            }
        }
        // 3. Per-pageblock free counters, allocation and cache counters.
        if let Some(pb) = (0..walk_pb_free.len()).find(|&i| walk_pb_free[i] != self.pb_free[i]) {
            let f = ((self.pb_first + pb as u64) << PAGEBLOCK_ORDER).max(self.base);
            return Err(ValidateError::new(
                "pageblock free",
                Some(FrameId(f)),
                format!(
                    "{} free frames below pageblock order in the walk, {} counted",
                    walk_pb_free[pb], self.pb_free[pb]
                ),
            ));
        }
        if walk_alloc != self.alloc_frames {
            return Err(ValidateError::new(
                "allocated",
                None,
                format!("walk {walk_alloc:?} counters {:?}", self.alloc_frames),
            ));
        }
        for t in 0..MigrateType::COUNT {
            if self.cached_frames[t] > self.alloc_frames[t] {
                return Err(ValidateError::new(
                    "cached",
                    None,
                    format!(
                        "type {t}: {} cached > {} allocated",
                        self.cached_frames[t], self.alloc_frames[t]
                    ),
                ));
            }
        }
        Ok(())
    }
}
