//! Counters: per-handle fast-path counters and the serde snapshot [`SlabStats`].

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One counter written by a single thread (the handle's owner) and read by anyone.
///
/// The owner bumps it with a relaxed load and store, not a read-modify-write, so the fast
/// path has no locked instruction; readers see a value at most a few operations old.
#[derive(Debug, Default)]
pub(crate) struct OwnerCounter(AtomicU64);

impl OwnerCounter {
    #[inline]
    pub(crate) fn bump(&self) {
        let v = self.0.load(Ordering::Relaxed);
        self.0.store(v.wrapping_add(1), Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// The fast-path counters of one thread cache.
#[derive(Debug, Default)]
pub(crate) struct HandleCounters {
    pub alloc_hits: OwnerCounter,
    pub alloc_misses: OwnerCounter,
    pub alloc_failures: OwnerCounter,
    pub free_hits: OwnerCounter,
    pub free_misses: OwnerCounter,
}

/// Plain totals of [`HandleCounters`].
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct HandleTotals {
    pub alloc_hits: u64,
    pub alloc_misses: u64,
    pub alloc_failures: u64,
    pub free_hits: u64,
    pub free_misses: u64,
}

impl HandleTotals {
    pub(crate) fn add(&mut self, c: &HandleCounters) {
        self.alloc_hits += c.alloc_hits.get();
        self.alloc_misses += c.alloc_misses.get();
        self.alloc_failures += c.alloc_failures.get();
        self.free_hits += c.free_hits.get();
        self.free_misses += c.free_misses.get();
    }
}

/// Live handles' counters, and the totals of handles that are gone.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    pub live: Vec<Arc<HandleCounters>>,
    pub retired: HandleTotals,
}

impl Registry {
    /// Fold a departing handle's counters into the retired totals.
    pub(crate) fn retire(&mut self, c: &Arc<HandleCounters>) {
        if let Some(i) = self.live.iter().position(|x| Arc::ptr_eq(x, c)) {
            self.live.swap_remove(i);
        }
        self.retired.add(c);
    }

    /// Totals over live and retired handles.
    pub(crate) fn totals(&self) -> HandleTotals {
        let mut t = self.retired;
        for c in &self.live {
            t.add(c);
        }
        t
    }
}

/// A snapshot of one slab cache's counters and state.
///
/// Relations that hold in every snapshot taken while no thread is using the cache:
/// `allocs == alloc_hits + alloc_misses`, `frees == free_hits + free_misses`, and
/// `objects_out_of_slabs == depot_cached_objects + (objects in thread caches) + (objects held
/// by users)`; with no handle alive, `objects_out_of_slabs - depot_cached_objects` is the
/// number of objects users still hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SlabStats {
    /// Cache name.
    pub name: String,
    /// Object size asked for, in bytes.
    pub object_size: u64,
    /// Object alignment.
    pub align: u64,
    /// Distance between objects in a slab.
    pub stride: u64,
    /// Bytes per slab.
    pub slab_size: u64,
    /// Objects per slab.
    pub objects_per_slab: u64,
    /// Distinct colour offsets slabs cycle through.
    pub colours: u64,
    /// Objects per magazine.
    pub magazine_size: u64,
    /// Nodes (depots).
    pub nodes: u64,
    /// Thread caches alive.
    pub live_handles: u64,

    /// Successful allocations.
    pub allocs: u64,
    /// Frees.
    pub frees: u64,
    /// Allocations served from the thread's magazines without a lock.
    pub alloc_hits: u64,
    /// Allocations that went to the depot.
    pub alloc_misses: u64,
    /// Allocations that failed (the backend was out of memory).
    pub alloc_failures: u64,
    /// Frees absorbed by the thread's magazines without a lock.
    pub free_hits: u64,
    /// Frees that went to the depot.
    pub free_misses: u64,

    /// Alloc misses served with a full magazine from the depot.
    pub depot_full_handouts: u64,
    /// Alloc misses served by filling a magazine from slabs.
    pub depot_slab_fills: u64,
    /// Full magazines handed to the depot.
    pub depot_flushes: u64,
    /// Magazines taken apart (their objects returned to slabs).
    pub magazines_dismantled: u64,
    /// Magazines allocated.
    pub magazines_allocated: u64,
    /// Magazines freed.
    pub magazines_freed: u64,
    /// Full magazines in the depots now.
    pub depot_full_magazines: u64,
    /// Empty magazines in the depots now.
    pub depot_empty_magazines: u64,
    /// Objects in the depots' full magazines now.
    pub depot_cached_objects: u64,

    /// Objects carved out of slabs (the constructor ran once for each).
    pub objects_carved: u64,
    /// Objects handed out by the slab layer now (to magazines or users).
    pub objects_out_of_slabs: u64,
    /// Slabs obtained from the backend.
    pub slabs_allocated: u64,
    /// Slabs given back to the backend.
    pub slabs_freed: u64,
    /// Slabs now partially used.
    pub slabs_partial: u64,
    /// Slabs now fully used.
    pub slabs_full: u64,
    /// Slabs now with no object in use.
    pub slabs_free: u64,
    /// Bytes of slab memory held now.
    pub slab_bytes: u64,

    /// Frees of pointers that were not handed-out objects, found when a magazine was taken
    /// apart (double frees, foreign pointers). They were ignored.
    pub invalid_frees: u64,
    /// Times the backend had no memory.
    pub backend_failures: u64,
    /// Calls of `shrink()`.
    pub shrink_calls: u64,
    /// Bytes given back by `shrink()`, in total.
    pub shrink_bytes_released: u64,
}

impl SlabStats {
    /// Hits on both paths (served by the thread's magazines).
    pub fn hits(&self) -> u64 {
        self.alloc_hits + self.free_hits
    }

    /// Misses on both paths (went to the depot).
    pub fn misses(&self) -> u64 {
        self.alloc_misses + self.free_misses
    }

    /// Fraction of operations served without the depot (1.0 when there were none).
    pub fn hit_rate(&self) -> f64 {
        let total = self.hits() + self.misses();
        if total == 0 {
            1.0
        } else {
            self.hits() as f64 / total as f64
        }
    }
}
