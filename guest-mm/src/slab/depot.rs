//! The per-node depot: full and empty magazines in front of the node's slabs.
//!
//! Thread caches come here only on a miss, and always with a whole magazine: an alloc miss
//! takes a full magazine (or has one built from slabs), a free miss leaves a full magazine and
//! takes an empty one. The depot keeps at most `max_full` full magazines; past that it takes
//! the extra magazine apart and returns its objects to their slabs, so that idle objects
//! become free slabs that [`shrink`](super::SlabCache::shrink) can give back.

use super::magazine::{Magazine, ObjPtr};
use super::slabs::{GiveBack, SlabSet};

/// Slow-path counters of one depot.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DepotCounters {
    /// Alloc misses served with a full magazine.
    pub full_handouts: u64,
    /// Alloc misses served by filling a magazine from slabs.
    pub slab_fills: u64,
    /// Full magazines received from thread caches.
    pub flushes: u64,
    /// Magazines taken apart (objects back to slabs).
    pub dismantled: u64,
    /// Magazines whose storage was freed.
    pub magazines_freed: u64,
}

/// Result of a shrink of one depot.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct DepotShrink {
    pub magazines_freed: u64,
    pub magazine_bytes: u64,
    pub slabs_freed: u64,
}

/// One node's depot. Always used under the cache's lock for that node.
#[derive(Debug)]
pub(crate) struct Depot {
    pub(crate) slabs: SlabSet,
    full: Vec<Magazine>,
    empty: Vec<Magazine>,
    max_full: usize,
    max_empty: usize,
    max_free_slabs: usize,
    pub(crate) counters: DepotCounters,
}

impl Depot {
    /// A depot with no magazines over `slabs`.
    pub(crate) fn new(
        slabs: SlabSet,
        max_full: usize,
        max_empty: usize,
        max_free_slabs: usize,
    ) -> Self {
        Depot {
            slabs,
            full: Vec::new(),
            empty: Vec::new(),
            max_full,
            max_empty,
            max_free_slabs,
            counters: DepotCounters::default(),
        }
    }

    /// Full and empty magazines held.
    pub(crate) fn magazine_counts(&self) -> (usize, usize) {
        (self.full.len(), self.empty.len())
    }

    /// Objects sitting in full magazines here.
    pub(crate) fn cached_objects(&self) -> u64 {
        self.full.iter().map(|m| m.len() as u64).sum()
    }

    /// Alloc miss: a full magazine, if the depot has one.
    pub(crate) fn take_full(&mut self) -> Option<Magazine> {
        let m = self.full.pop()?;
        self.counters.full_handouts += 1;
        Some(m)
    }

    /// Alloc miss with no full magazine: fill `mag` from slabs. Constructed objects go into
    /// `mag`; newly carved ones into `fresh` (the caller constructs them and moves them into
    /// `mag`). Objects already waiting in `fresh` count against the magazine's room.
    /// Returns the number of objects handed out (0 when out of memory).
    pub(crate) fn fill(&mut self, mag: &mut Magazine, fresh: &mut Vec<ObjPtr>) -> usize {
        let want = mag.room().saturating_sub(fresh.len());
        let got = self.slabs.take(want, mag.objs_mut(), fresh);
        if got > 0 {
            self.counters.slab_fills += 1;
        }
        got
    }

    /// Keep an empty magazine for later, or free it when the depot has enough.
    pub(crate) fn put_empty(&mut self, m: Magazine) {
        debug_assert!(m.is_empty());
        if m.capacity() == 0 {
            return;
        }
        if self.empty.len() < self.max_empty {
            self.empty.push(m);
        } else {
            self.counters.magazines_freed += 1;
        }
    }

    /// An empty magazine, if the depot has one.
    pub(crate) fn take_empty(&mut self) -> Option<Magazine> {
        self.empty.pop()
    }

    /// Free miss: take `full` and hand back an empty magazine (`None`: the caller allocates
    /// one). Past the full-magazine limit, `full` itself is taken apart and handed back.
    /// Objects of other nodes' slabs land in `foreign`.
    pub(crate) fn exchange_full(
        &mut self,
        mut full: Magazine,
        foreign: &mut Vec<ObjPtr>,
    ) -> Option<Magazine> {
        self.counters.flushes += 1;
        if self.full.len() < self.max_full {
            self.full.push(full);
            self.empty.pop()
        } else {
            self.dismantle(&mut full, foreign);
            self.slabs.release_free(self.max_free_slabs);
            Some(full)
        }
    }

    /// Take back a thread cache's magazine when the cache flushes or goes away: full ones are
    /// kept (up to the limit), others are taken apart.
    pub(crate) fn take_back(&mut self, mut m: Magazine, foreign: &mut Vec<ObjPtr>) {
        if m.is_full() && m.capacity() > 0 && self.full.len() < self.max_full {
            self.counters.flushes += 1;
            self.full.push(m);
            return;
        }
        if !m.is_empty() {
            self.dismantle(&mut m, foreign);
            self.slabs.release_free(self.max_free_slabs);
        }
        self.put_empty(m);
    }

    /// Return every object of `m` to its slab; objects of other nodes go to `foreign`.
    pub(crate) fn dismantle(&mut self, m: &mut Magazine, foreign: &mut Vec<ObjPtr>) {
        self.counters.dismantled += 1;
        while let Some(p) = m.pop() {
            self.give_back(p, foreign);
        }
    }

    /// Return one object to its slab; objects of other nodes go to `foreign`.
    pub(crate) fn give_back(&mut self, p: ObjPtr, foreign: &mut Vec<ObjPtr>) {
        match self.slabs.give_back(p) {
            GiveBack::Done | GiveBack::Invalid => {}
            GiveBack::Foreign => foreign.push(p),
        }
    }

    /// Memory pressure, first half: take every full magazine apart and free every empty one.
    pub(crate) fn shrink_magazines(&mut self, foreign: &mut Vec<ObjPtr>, out: &mut DepotShrink) {
        let mut full = std::mem::take(&mut self.full);
        for m in &mut full {
            self.dismantle(m, foreign);
        }
        for m in full.into_iter().chain(std::mem::take(&mut self.empty)) {
            out.magazines_freed += 1;
            out.magazine_bytes += m.storage_bytes() as u64;
            self.counters.magazines_freed += 1;
        }
    }

    /// Memory pressure, second half: give every free slab back to the backend.
    pub(crate) fn shrink_slabs(&mut self, out: &mut DepotShrink) {
        out.slabs_freed += self.slabs.release_free(0) as u64;
    }
}

impl Depot {
    /// Whether a full magazine handed back now would be kept whole.
    pub(crate) fn wants_full(&self) -> bool {
        self.full.len() < self.max_full
    }

    /// Give free slabs beyond the keep limit back to the backend.
    pub(crate) fn trim(&mut self) {
        self.slabs.release_free(self.max_free_slabs);
    }
}
