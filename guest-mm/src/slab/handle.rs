//! The thread cache: two magazines, no lock on the fast path.

use super::magazine::{Magazine, ObjPtr};
use super::stats::HandleCounters;
use super::{SlabCache, SlabError};
use crate::frame::NodeId;
use std::mem;
use std::ptr::NonNull;
use std::sync::Arc;

/// A thread's cache of free objects of one [`SlabCache`]: a *loaded* and a *previous*
/// magazine.
///
/// [`alloc`](Self::alloc) pops from the loaded magazine and [`free`](Self::free) pushes onto
/// it; when it is empty (or full) and the previous magazine is full (or empty), the two swap.
/// Only when neither can serve does the handle lock its node's depot and exchange a whole
/// magazine. The fast path takes no lock, makes no atomic read-modify-write and never
/// allocates.
///
/// A handle is `Send` but its operations take `&mut self`: one thread uses it at a time. It
/// holds an `Arc` of its cache. Dropping it returns its cached objects to the depot.
#[derive(Debug)]
pub struct SlabHandle {
    loaded: Magazine,
    previous: Magazine,
    /// Scratch space for newly carved objects (capacity: one magazine).
    fresh: Vec<ObjPtr>,
    counters: Arc<HandleCounters>,
    node: usize,
    cache: Arc<SlabCache>,
}

impl SlabHandle {
    pub(crate) fn new(cache: Arc<SlabCache>, node: usize, counters: Arc<HandleCounters>) -> Self {
        let loaded = cache.new_magazine();
        let previous = cache.new_magazine();
        SlabHandle {
            loaded,
            previous,
            fresh: Vec::with_capacity(cache.magazine_size()),
            counters,
            node,
            cache,
        }
    }

    /// The cache this handle serves.
    pub fn cache(&self) -> &Arc<SlabCache> {
        &self.cache
    }

    /// The node whose depot this handle refills from.
    pub fn node(&self) -> NodeId {
        NodeId(self.node as u16)
    }

    /// Free objects cached in this handle's magazines.
    pub fn cached(&self) -> usize {
        self.loaded.len() + self.previous.len()
    }

    /// Allocate one object: `object_size` bytes aligned to the cache's alignment. If the cache
    /// has a constructor, the object is in its constructed state (or in the state its last
    /// user freed it in); otherwise its contents are unspecified.
    #[inline]
    pub fn alloc(&mut self) -> Result<NonNull<u8>, SlabError> {
        match self.loaded.pop() {
            Some(p) => {
                self.counters.alloc_hits.bump();
                Ok(p.ptr())
            }
            None => self.alloc_slow(),
        }
    }

    /// Return an object to the cache.
    ///
    /// # Safety
    ///
    /// `ptr` must have been returned by `alloc` on a handle of this same cache (any handle,
    /// any node), must not have been freed since, and must not be used after this call.
    /// Objects freed to a cache that has a constructor must be in their constructed state.
    ///
    /// Double frees and foreign pointers are undefined behaviour; the cache detects some of
    /// them (counted as `invalid_frees`) when a magazine is taken apart, but not all.
    #[inline]
    pub unsafe fn free(&mut self, ptr: NonNull<u8>) {
        match self.loaded.push(ObjPtr::new(ptr)) {
            Ok(()) => self.counters.free_hits.bump(),
            Err(p) => self.free_slow(p),
        }
    }

    #[cold]
    #[inline(never)]
    fn alloc_slow(&mut self) -> Result<NonNull<u8>, SlabError> {
        if !self.previous.is_empty() {
            mem::swap(&mut self.loaded, &mut self.previous);
            if let Some(p) = self.loaded.pop() {
                self.counters.alloc_hits.bump();
                return Ok(p.ptr());
            }
        }
        // Both magazines are empty: go to the depot.
        let mut depot = self.cache.depot(self.node);
        if let Some(full) = depot.take_full() {
            let empty = mem::replace(&mut self.loaded, full);
            let old_previous = mem::replace(&mut self.previous, empty);
            depot.put_empty(old_previous);
            drop(depot);
        } else {
            depot.fill(&mut self.loaded, &mut self.fresh);
            drop(depot);
            // Constructors run outside the depot lock. Should one panic, the carved objects
            // stay in `fresh` and are constructed (again) on the next refill.
            self.cache.construct(&self.fresh);
            self.loaded.objs_mut().append(&mut self.fresh);
        }
        match self.loaded.pop() {
            Some(p) => {
                self.counters.alloc_misses.bump();
                Ok(p.ptr())
            }
            None => {
                self.counters.alloc_failures.bump();
                Err(SlabError::OutOfMemory { node: self.node() })
            }
        }
    }

    #[cold]
    #[inline(never)]
    fn free_slow(&mut self, p: ObjPtr) {
        if self.previous.is_empty() && self.previous.capacity() > 0 {
            mem::swap(&mut self.loaded, &mut self.previous);
            if self.loaded.push(p).is_ok() {
                self.counters.free_hits.bump();
                return;
            }
        }
        // Both magazines are full: hand the previous one to the depot for an empty one.
        let full = mem::replace(&mut self.previous, Magazine::placeholder());
        let mut foreign = Vec::new();
        let empty = self
            .cache
            .depot(self.node)
            .exchange_full(full, &mut foreign);
        self.cache.forward(foreign, self.node);
        let empty = empty.unwrap_or_else(|| self.cache.new_magazine());
        self.previous = mem::replace(&mut self.loaded, empty);
        self.counters.free_misses.bump();
        if let Err(p) = self.loaded.push(p) {
            // Only possible with a zero-capacity magazine, which the depot never hands out;
            // stay correct anyway and send the object straight home.
            let mut foreign = Vec::new();
            self.cache.depot(self.node).give_back(p, &mut foreign);
            self.cache.forward(foreign, self.node);
        }
    }

    /// Give every cached object back to the depot (full magazines stay whole for other
    /// threads; partly filled ones are taken apart), so that [`SlabCache::shrink`] can reach
    /// them. The handle stays usable.
    pub fn flush(&mut self) {
        if self.loaded.is_empty() && self.previous.is_empty() {
            return;
        }
        let mut foreign = Vec::new();
        {
            let mut depot = self.cache.depot(self.node);
            for m in [&mut self.loaded, &mut self.previous] {
                if m.is_empty() {
                    continue;
                }
                if m.is_full() && depot.wants_full() {
                    let empty = match depot.take_empty() {
                        Some(e) => e,
                        None => self.cache.new_magazine(),
                    };
                    let full = mem::replace(m, empty);
                    depot.take_back(full, &mut foreign);
                } else {
                    depot.dismantle(m, &mut foreign);
                }
            }
            depot.trim();
        }
        self.cache.forward(foreign, self.node);
    }
}

impl Drop for SlabHandle {
    fn drop(&mut self) {
        let mut foreign = Vec::new();
        {
            let mut depot = self.cache.depot(self.node);
            depot.take_back(
                mem::replace(&mut self.loaded, Magazine::placeholder()),
                &mut foreign,
            );
            depot.take_back(
                mem::replace(&mut self.previous, Magazine::placeholder()),
                &mut foreign,
            );
        }
        self.cache.forward(foreign, self.node);
        self.cache.retire(&self.counters);
    }
}
