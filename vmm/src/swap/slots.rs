//! The swap file's slot allocator: one bit per 4 KiB slot, next-fit, handing out contiguous
//! runs so that a contiguous run of guest pages lands in contiguous slots (one write).

/// A slot number (slot `s` lives at byte offset `s * 4096` of the file).
pub type Slot = u32;

/// Bitmap allocator of slots.
#[derive(Debug)]
pub struct SlotMap {
    bits: Vec<u64>,
    total: u32,
    used: u32,
    cursor: u32,
}

impl SlotMap {
    /// `total` slots, all free.
    pub fn new(total: u32) -> SlotMap {
        SlotMap {
            bits: vec![0; (total as usize).div_ceil(64)],
            total,
            used: 0,
            cursor: 0,
        }
    }

    /// Slots in the map.
    pub fn total(&self) -> u32 {
        self.total
    }

    /// Slots in use.
    pub fn used(&self) -> u32 {
        self.used
    }

    fn is_used(&self, s: u32) -> bool {
        self.bits[(s / 64) as usize] & (1 << (s % 64)) != 0
    }

    fn set(&mut self, s: u32, on: bool) {
        let w = &mut self.bits[(s / 64) as usize];
        if on {
            *w |= 1 << (s % 64);
        } else {
            *w &= !(1 << (s % 64));
        }
    }

    /// First free slot at or after `from`, if any before `end`.
    fn next_free(&self, from: u32, end: u32) -> Option<u32> {
        let mut s = from;
        while s < end {
            let w = self.bits[(s / 64) as usize];
            if s % 64 == 0 && w == u64::MAX {
                s += 64;
                continue;
            }
            if !self.is_used(s) {
                return Some(s);
            }
            s += 1;
        }
        None
    }

    /// Allocate up to `want` contiguous slots (at least one): next-fit from the cursor,
    /// wrapping once. Returns the first slot and how many were taken, or `None` when full.
    pub fn alloc_run(&mut self, want: u32) -> Option<(Slot, u32)> {
        if want == 0 || self.used == self.total {
            return None;
        }
        let start = self
            .next_free(self.cursor, self.total)
            .or_else(|| self.next_free(0, self.cursor))?;
        let mut n = 0;
        while n < want && start + n < self.total && !self.is_used(start + n) {
            self.set(start + n, true);
            n += 1;
        }
        self.used += n;
        self.cursor = start + n;
        if self.cursor >= self.total {
            self.cursor = 0;
        }
        Some((start, n))
    }

    /// Free one slot. Returns false (and changes nothing) if it was not allocated.
    pub fn free(&mut self, s: Slot) -> bool {
        if s >= self.total || !self.is_used(s) {
            return false;
        }
        self.set(s, false);
        self.used -= 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_contiguous_and_wrap() {
        let mut m = SlotMap::new(200);
        assert_eq!(m.alloc_run(100), Some((0, 100)));
        assert_eq!(m.alloc_run(64), Some((100, 64)));
        assert_eq!(m.used(), 164);
        // Only 36 left at the end.
        assert_eq!(m.alloc_run(50), Some((164, 36)));
        assert_eq!(m.alloc_run(1), None);
        for s in 10..20 {
            assert!(m.free(s));
        }
        assert!(!m.free(10));
        assert!(!m.free(5000));
        // Wraps to the hole.
        assert_eq!(m.alloc_run(30), Some((10, 10)));
        assert_eq!(m.used(), 200);
    }

    #[test]
    fn skips_full_words() {
        let mut m = SlotMap::new(1000);
        assert_eq!(m.alloc_run(640), Some((0, 640)));
        assert!(m.free(3));
        assert_eq!(m.alloc_run(8), Some((640, 8)));
        assert_eq!(m.alloc_run(1000), Some((648, 352)));
        assert_eq!(m.alloc_run(8), Some((3, 1)));
    }
}
