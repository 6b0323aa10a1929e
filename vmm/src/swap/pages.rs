//! Per-4 KiB page state of one VM, kept only for 2 MiB blocks registered with userfaultfd
//! (a block absent from the table is plain resident memory).

use std::collections::BTreeMap;

use super::slots::Slot;

/// Pages per 2 MiB block.
pub const PAGES_PER_BLOCK: usize = 512;
/// Block size.
pub const BLOCK: u64 = 2 << 20;

/// State of one guest page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Page {
    /// In memory, no valid slot copy (possibly dirty; if unpopulated, its content is zero).
    Resident,
    /// In memory, write-protected, and identical to the copy in the slot.
    Clean(Slot),
    /// Not in memory: the content is in the slot.
    Swapped(Slot),
    /// Being written out: write-protected, no slot yet recorded.
    Busy,
    /// Being written out and written to since the write-out began: the copy will be stale.
    BusyDirty,
}

const KIND_SHIFT: u32 = 29;
const SLOT_MASK: u32 = (1 << KIND_SHIFT) - 1;

impl Page {
    fn encode(self) -> u32 {
        match self {
            Page::Resident => 0,
            Page::Clean(s) => (1 << KIND_SHIFT) | (s & SLOT_MASK),
            Page::Swapped(s) => (2 << KIND_SHIFT) | (s & SLOT_MASK),
            Page::Busy => 3 << KIND_SHIFT,
            Page::BusyDirty => 4 << KIND_SHIFT,
        }
    }

    fn decode(v: u32) -> Page {
        let s = v & SLOT_MASK;
        match v >> KIND_SHIFT {
            1 => Page::Clean(s),
            2 => Page::Swapped(s),
            3 => Page::Busy,
            4 => Page::BusyDirty,
            _ => Page::Resident,
        }
    }

    /// The slot this page owns, if any.
    pub fn slot(self) -> Option<Slot> {
        match self {
            Page::Clean(s) | Page::Swapped(s) => Some(s),
            _ => None,
        }
    }
}

/// One registered block.
#[derive(Debug)]
pub struct Block {
    pages: Box<[u32]>,
    /// Changes when the block is dropped and registered again, so that a write-out that
    /// started before a `remove_block` does not commit into the new incarnation.
    pub epoch: u64,
    /// Hint-armed pages (one bit each): write-protected continuously since the current hint
    /// epoch began, so not written since (see `super::hint`). Cleared by every transition to
    /// a writable state.
    armed: [u64; PAGES_PER_BLOCK / 64],
}

/// The table of registered blocks and page counts.
#[derive(Debug, Default)]
pub struct PageTable {
    blocks: BTreeMap<u64, Block>,
    next_epoch: u64,
    /// The current hint epoch (see `super::hint`); 0 before the first.
    pub hint_epoch: u64,
    swapped: u64,
    clean: u64,
    busy: u64,
}

impl PageTable {
    /// Block index of guest page `p` (page number, not address).
    fn split(p: u64) -> (u64, usize) {
        (
            p / PAGES_PER_BLOCK as u64,
            (p % PAGES_PER_BLOCK as u64) as usize,
        )
    }

    /// Whether block `b` is registered.
    pub fn has_block(&self, b: u64) -> bool {
        self.blocks.contains_key(&b)
    }

    /// The epoch of block `b`.
    pub fn epoch(&self, b: u64) -> Option<u64> {
        self.blocks.get(&b).map(|x| x.epoch)
    }

    /// Add block `b` with every page resident; returns its epoch.
    pub fn add_block(&mut self, b: u64) -> u64 {
        self.next_epoch += 1;
        let epoch = self.next_epoch;
        self.blocks.insert(
            b,
            Block {
                pages: vec![0; PAGES_PER_BLOCK].into_boxed_slice(),
                epoch,
                armed: [0; PAGES_PER_BLOCK / 64],
            },
        );
        epoch
    }

    /// Drop block `b`; returns the slots its pages owned.
    pub fn remove_block(&mut self, b: u64) -> Vec<Slot> {
        let Some(block) = self.blocks.remove(&b) else {
            return Vec::new();
        };
        let mut slots = Vec::new();
        for v in block.pages.iter() {
            let p = Page::decode(*v);
            self.count(p, -1);
            slots.extend(p.slot());
        }
        slots
    }

    /// Registered blocks, in order.
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.blocks.keys().copied()
    }

    /// State of page `p`, or `None` if its block is not registered.
    pub fn get(&self, p: u64) -> Option<Page> {
        let (b, i) = Self::split(p);
        self.blocks.get(&b).map(|x| Page::decode(x.pages[i]))
    }

    fn count(&mut self, p: Page, d: i64) {
        let c = match p {
            Page::Swapped(_) => &mut self.swapped,
            Page::Clean(_) => &mut self.clean,
            Page::Busy | Page::BusyDirty => &mut self.busy,
            Page::Resident => return,
        };
        *c = c.wrapping_add_signed(d);
    }

    /// Set page `p` (its block must be registered; otherwise nothing happens). Returns the
    /// old state.
    pub fn set(&mut self, p: u64, new: Page) -> Option<Page> {
        let (b, i) = Self::split(p);
        let block = self.blocks.get_mut(&b)?;
        let old = Page::decode(block.pages[i]);
        block.pages[i] = new.encode();
        if matches!(new, Page::Resident | Page::BusyDirty) {
            // Writable from here on (or written): no longer unwritten since the epoch.
            block.armed[i / 64] &= !(1 << (i % 64));
        }
        self.count(old, -1);
        self.count(new, 1);
        Some(old)
    }

    /// Mark page `p` hint-armed (the caller has write-protected it or knows it unpopulated
    /// under a registered block). No-op if its block is not registered.
    pub fn arm(&mut self, p: u64) {
        let (b, i) = Self::split(p);
        if let Some(block) = self.blocks.get_mut(&b) {
            block.armed[i / 64] |= 1 << (i % 64);
        }
    }

    /// Clear page `p`'s hint-armed bit (it was, or may be about to be, written).
    pub fn disarm(&mut self, p: u64) {
        let (b, i) = Self::split(p);
        if let Some(block) = self.blocks.get_mut(&b) {
            block.armed[i / 64] &= !(1 << (i % 64));
        }
    }

    /// Whether page `p` is hint-armed.
    pub fn is_armed(&self, p: u64) -> bool {
        let (b, i) = Self::split(p);
        self.blocks
            .get(&b)
            .is_some_and(|x| x.armed[i / 64] & (1 << (i % 64)) != 0)
    }

    /// Clear every hint-armed bit (a new epoch begins, or the old one is abandoned).
    pub fn disarm_all(&mut self) {
        for block in self.blocks.values_mut() {
            block.armed = [0; PAGES_PER_BLOCK / 64];
        }
    }

    /// Pages swapped out now.
    pub fn swapped(&self) -> u64 {
        self.swapped
    }

    /// Pages resident and clean now.
    pub fn clean(&self) -> u64 {
        self.clean
    }

    /// Pages being written out now.
    pub fn busy(&self) -> u64 {
        self.busy
    }

    /// Whether block `b` has a page that is swapped or being written.
    pub fn block_needs_poison(&self, b: u64) -> bool {
        self.blocks.get(&b).is_some_and(|x| {
            x.pages.iter().any(|v| {
                matches!(
                    Page::decode(*v),
                    Page::Swapped(_) | Page::Busy | Page::BusyDirty
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_round_trip_and_counts() {
        for p in [
            Page::Resident,
            Page::Clean(0),
            Page::Clean(SLOT_MASK),
            Page::Swapped(12345),
            Page::Busy,
            Page::BusyDirty,
        ] {
            assert_eq!(Page::decode(p.encode()), p);
        }
        let mut t = PageTable::default();
        assert_eq!(t.get(5), None);
        assert_eq!(t.set(5, Page::Busy), None);
        let e = t.add_block(0);
        assert_eq!(t.epoch(0), Some(e));
        assert_eq!(t.get(5), Some(Page::Resident));
        t.set(5, Page::Swapped(9));
        t.set(6, Page::Clean(10));
        t.set(7, Page::Busy);
        assert_eq!((t.swapped(), t.clean(), t.busy()), (1, 1, 1));
        assert!(t.block_needs_poison(0));
        t.set(5, Page::Clean(9));
        assert_eq!((t.swapped(), t.clean()), (0, 2));
        let mut slots = t.remove_block(0);
        slots.sort();
        assert_eq!(slots, vec![9, 10]);
        assert_eq!((t.swapped(), t.clean(), t.busy()), (0, 0, 0));
        assert!(t.add_block(0) > e);
    }
}
