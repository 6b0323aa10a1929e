//! Per-thread ("per-CPU") caches of order-0 and order-9 blocks in front of a zone.
//!
//! A [`CpuCache`] is owned by one thread and used through `&mut self`: the fast path pops or
//! pushes a frame on a local stack without any lock. An empty stack is refilled with a batch
//! taken under one zone lock; a stack above its high mark gives a batch back under one lock.
//!
//! Frames on the cache's stacks are allocated in the zone's metadata but the zone counts them
//! as *cached*, not allocated: each time the cache takes the zone lock it reports how many
//! frames it holds, so the zone's `cached` figure is exact as of the cache's last lock.
//! When the zone isolates or unisolates pageblocks it bumps an epoch; the cache notices on its
//! next operation (one atomic load), gives back the frames that now lie in isolated pageblocks
//! and from then on sends frees into isolated ranges straight to the zone. A cache on another
//! thread that is inside an operation while the isolation happens may still hand out one
//! frame of the range; users of isolation (compaction, hot-unplug) see it as allocated.
//!
//! The fast path cannot see the zone's metadata, so a double free into the cache is detected
//! only when the frame is flushed back to the zone (the flush then returns the error).

use crate::frame::{FrameId, MigrateType, PAGEBLOCK_ORDER};
use crate::zone::{AllocError, FreeError, IsolationEpoch, Zone};
use std::sync::{Mutex, MutexGuard};

/// Orders that the cache keeps (others pass straight through to the zone).
const SLOT_ORDERS: [u8; 2] = [0, PAGEBLOCK_ORDER];
/// Allocatable types (Unmovable, Movable, Reclaimable).
const NR_TYPES: usize = 3;

/// Batch sizes and high marks of a [`CpuCache`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PcpConfig {
    /// Order-0 blocks moved per refill or flush.
    pub batch_small: usize,
    /// Order-0 blocks per list above which the cache flushes a batch.
    pub high_small: usize,
    /// Order-9 blocks moved per refill or flush.
    pub batch_huge: usize,
    /// Order-9 blocks per list above which the cache flushes a batch.
    pub high_huge: usize,
}

impl Default for PcpConfig {
    fn default() -> Self {
        PcpConfig {
            batch_small: 31,
            high_small: 6 * 31,
            batch_huge: 4,
            high_huge: 8,
        }
    }
}

/// Counters of one cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PcpStats {
    /// Batches taken from the zone.
    pub refills: u64,
    /// Batches given back to the zone (drains and isolation flushes included).
    pub flushes: u64,
    /// Allocations served from the local stacks.
    pub hits: u64,
}

/// A per-thread cache of free order-0 and order-9 blocks per allocatable type.
#[derive(Debug)]
pub struct CpuCache<'z> {
    zone: &'z Mutex<Zone>,
    /// Local stacks per (slot, type): slot 0 = order 0, slot 1 = order 9.
    lists: [[Vec<FrameId>; NR_TYPES]; 2],
    batch: [usize; 2],
    high: [usize; 2],
    /// Frames per type last reported to the zone.
    reported: [u64; NR_TYPES],
    epoch: IsolationEpoch,
    seen_epoch: u64,
    /// Isolated frame ranges [start, end) as of `seen_epoch`; frees into them bypass the cache.
    isolated: Vec<(u64, u64)>,
    base: u64,
    nr: u64,
    stats: PcpStats,
}

fn lock(zone: &Mutex<Zone>) -> MutexGuard<'_, Zone> {
    zone.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'z> CpuCache<'z> {
    /// A cache with the default batches (31 order-0, 4 order-9).
    pub fn new(zone: &'z Mutex<Zone>) -> Self {
        Self::with_config(zone, PcpConfig::default())
    }

    /// A cache with explicit batches and high marks (a batch is at least 1 and at most the
    /// high mark).
    pub fn with_config(zone: &'z Mutex<Zone>, cfg: PcpConfig) -> Self {
        let (epoch, base, nr) = {
            let z = lock(zone);
            (z.isolation_epoch(), z.base().0, z.nr_frames())
        };
        let high = [cfg.high_small.max(1), cfg.high_huge.max(1)];
        let batch = [
            cfg.batch_small.clamp(1, high[0]),
            cfg.batch_huge.clamp(1, high[1]),
        ];
        let mk = |cap: usize| std::array::from_fn(|_| Vec::with_capacity(cap + 1));
        CpuCache {
            zone,
            lists: [mk(high[0]), mk(high[1])],
            batch,
            high,
            reported: [0; NR_TYPES],
            seen_epoch: epoch.get(),
            epoch,
            isolated: Vec::new(),
            base,
            nr,
            stats: PcpStats::default(),
        }
    }

    /// Frames currently held on the local stacks.
    pub fn cached_frames(&self) -> u64 {
        let mut n = 0;
        for (slot, lists) in self.lists.iter().enumerate() {
            for l in lists {
                n += (l.len() as u64) << SLOT_ORDERS[slot];
            }
        }
        n
    }

    /// Frames of type `mt` currently held on the local stacks.
    pub fn cached_frames_of(&self, mt: MigrateType) -> u64 {
        let t = mt.index();
        if t >= NR_TYPES {
            return 0;
        }
        ((self.lists[0][t].len() as u64) << SLOT_ORDERS[0])
            + ((self.lists[1][t].len() as u64) << SLOT_ORDERS[1])
    }

    /// The cache's counters.
    pub fn stats(&self) -> PcpStats {
        self.stats
    }

    /// Allocate a block. Orders 0 and 9 come from the local stacks; other orders go to the
    /// zone directly.
    #[inline]
    pub fn alloc(&mut self, order: u8, mt: MigrateType) -> Result<FrameId, AllocError> {
        let slot = match order {
            0 => 0,
            PAGEBLOCK_ORDER => 1,
            _ => return lock(self.zone).alloc(order, mt),
        };
        let t = mt.index();
        if t >= NR_TYPES {
            return Err(AllocError::InvalidType(mt));
        }
        if self.epoch.get() != self.seen_epoch {
            self.flush_isolated();
        }
        if let Some(f) = self.lists[slot][t].pop() {
            self.stats.hits += 1;
            return Ok(f);
        }
        self.refill(slot, mt)
    }

    /// Free a block allocated as (order, mt). Orders 0 and 9 go to the local stacks (a batch
    /// is flushed to the zone above the high mark); other orders go to the zone directly.
    /// `mt` must be the type the block was allocated with.
    #[inline]
    pub fn free(&mut self, frame: FrameId, order: u8, mt: MigrateType) -> Result<(), FreeError> {
        let slot = match order {
            0 => 0,
            PAGEBLOCK_ORDER => 1,
            _ => return lock(self.zone).free_as(frame, order, mt),
        };
        let t = mt.index();
        if t >= NR_TYPES {
            return Err(FreeError::WrongType {
                frame,
                allocated: MigrateType::Movable,
                given: mt,
            });
        }
        if frame.0.wrapping_sub(self.base) >= self.nr {
            return Err(FreeError::OutOfZone(frame));
        }
        if !frame.is_aligned(order) {
            return Err(FreeError::InvalidOrder(order));
        }
        if self.epoch.get() != self.seen_epoch {
            self.flush_isolated();
        }
        if !self.isolated.is_empty() && self.in_isolated(frame) {
            // Like Linux, a block freed into an isolated pageblock goes straight to the zone.
            return lock(self.zone).free_as(frame, order, mt);
        }
        let list = &mut self.lists[slot][t];
        list.push(frame);
        if list.len() > self.high[slot] {
            let n = self.batch[slot];
            return self.flush(slot, t, n);
        }
        Ok(())
    }

    /// Give every cached frame back to the zone. Returns the first error met (a double free
    /// that reached the cache); the other frames are still returned.
    pub fn drain(&mut self) -> Result<(), FreeError> {
        let mut z = lock(self.zone);
        let mut first = Ok(());
        for slot in 0..2 {
            for t in 0..NR_TYPES {
                if !self.lists[slot][t].is_empty() {
                    self.stats.flushes += 1;
                }
                let r = Self::give_back(&mut z, &mut self.lists[slot][t], .., slot, t);
                first = first.and(r);
            }
        }
        self.sync(&mut z);
        first
    }

    #[cold]
    fn refill(&mut self, slot: usize, mt: MigrateType) -> Result<FrameId, AllocError> {
        let order = SLOT_ORDERS[slot];
        let mut z = lock(self.zone);
        let list = &mut self.lists[slot][mt.index()];
        let mut res = Ok(());
        for _ in 0..self.batch[slot] {
            match z.alloc(order, mt) {
                Ok(f) => list.push(f),
                Err(e) => {
                    res = Err(e);
                    break;
                }
            }
        }
        // Hand out the first block taken (the lowest-addressed one is usually first).
        let got = if list.is_empty() {
            None
        } else {
            Some(list.swap_remove(0))
        };
        self.stats.refills += 1;
        self.sync(&mut z);
        match (got, res) {
            (Some(f), _) => Ok(f),
            (None, Err(e)) => Err(e),
            (None, Ok(())) => Err(AllocError::OutOfMemory { order, mt }),
        }
    }

    #[cold]
    fn flush(&mut self, slot: usize, t: usize, n: usize) -> Result<(), FreeError> {
        let mut z = lock(self.zone);
        self.stats.flushes += 1;
        let n = n.min(self.lists[slot][t].len());
        // The oldest frames (bottom of the stack) are the coldest.
        let r = Self::give_back(&mut z, &mut self.lists[slot][t], ..n, slot, t);
        self.sync(&mut z);
        r
    }

    fn in_isolated(&self, f: FrameId) -> bool {
        self.isolated.iter().any(|&(s, e)| f.0 >= s && f.0 < e)
    }

    /// After an isolation change: give back the frames that lie in isolated pageblocks and
    /// take a fresh copy of the isolated ranges.
    #[cold]
    #[allow(clippy::needless_range_loop)] // parallel per-type arrays
    fn flush_isolated(&mut self) {
        let mut z = lock(self.zone);
        self.seen_epoch = self.epoch.get();
        self.isolated.clear();
        self.isolated
            .extend(z.isolated_ranges().map(|(s, n)| (s.0, s.0 + n)));
        for slot in 0..2 {
            for t in 0..NR_TYPES {
                let order = SLOT_ORDERS[slot];
                let mt = MigrateType::ALLOCATABLE[t];
                let before = self.lists[slot][t].len();
                self.lists[slot][t].retain(|&f| {
                    if z.pageblock_type(f) != MigrateType::Isolate {
                        return true;
                    }
                    // A frame that cannot be freed is dropped from the cache either way.
                    let _ = z.free_as(f, order, mt);
                    false
                });
                if self.lists[slot][t].len() != before {
                    self.stats.flushes += 1;
                }
            }
        }
        self.sync(&mut z);
    }

    fn give_back(
        z: &mut Zone,
        list: &mut Vec<FrameId>,
        range: impl std::ops::RangeBounds<usize>,
        slot: usize,
        t: usize,
    ) -> Result<(), FreeError> {
        let mut first = Ok(());
        for f in list.drain(range) {
            let r = z.free_as(f, SLOT_ORDERS[slot], MigrateType::ALLOCATABLE[t]);
            first = first.and(r);
        }
        first
    }

    /// Report the frames held per type to the zone.
    fn sync(&mut self, z: &mut Zone) {
        for t in 0..NR_TYPES {
            let held = ((self.lists[0][t].len() as u64) << SLOT_ORDERS[0])
                + ((self.lists[1][t].len() as u64) << SLOT_ORDERS[1]);
            z.note_cached(MigrateType::ALLOCATABLE[t], self.reported[t], held);
            self.reported[t] = held;
        }
    }
}

impl Drop for CpuCache<'_> {
    fn drop(&mut self) {
        // Errors here are double frees that reached the cache; nothing more can be done.
        let _ = self.drain();
    }
}
