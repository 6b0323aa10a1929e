//! The slab layer: slabs carved into objects, kept on partial, full and free lists.
//!
//! A slab's bookkeeping lives off the slab (in this module's tables), so free objects keep
//! whatever a constructor or their last user left in them: the slab layer never writes object
//! memory. An object finds its slab by masking its address with the slab size (slabs are
//! aligned to their size), then looking the slab number up in a hash map. That lookup happens
//! only when a magazine is taken apart, never on the thread fast path.

use super::backend::SlabBackend;
use super::magazine::ObjPtr;
use crate::frame::NodeId;
use std::alloc::Layout;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ptr::NonNull;
use std::sync::Arc;

/// How a cache's slabs are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Geometry {
    /// Object size asked for.
    pub object_size: usize,
    /// Object alignment.
    pub align: usize,
    /// Distance between objects: the size rounded up to the alignment.
    pub stride: usize,
    /// Bytes per slab (a power of two); slabs are aligned to it.
    pub slab_size: usize,
    /// Objects per slab.
    pub objects_per_slab: u32,
    /// Distinct colour offsets (1 when colouring is off or there is no slack).
    pub colours: u32,
    /// Bytes between two colours (a multiple of the alignment).
    pub colour_step: usize,
    /// What the backend is asked for: `slab_size` bytes aligned to `slab_size`.
    pub layout: Layout,
}

impl Geometry {
    fn slab_layout(&self) -> Layout {
        self.layout
    }

    fn slab_shift(&self) -> u32 {
        self.slab_size.trailing_zeros()
    }
}

/// Which list a slab is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ListKind {
    /// Some objects in use, some free or never carved.
    Partial = 0,
    /// Every object in use.
    Full = 1,
    /// No object in use.
    Free = 2,
}

/// The base address of a slab.
#[derive(Clone, Copy, Debug)]
struct SlabMem(NonNull<u8>);

// SAFETY: a `SlabMem` is the base of a slab that the owning `SlabSet` alone manages; the set
// only touches it under the depot's lock (it never reads or writes object memory at all), so
// moving it between threads shares nothing.
unsafe impl Send for SlabMem {}

/// One slab's bookkeeping.
#[derive(Debug)]
struct Slab {
    base: SlabMem,
    /// Byte offset of object 0 (the colour).
    colour: usize,
    /// Objects `0..carved` have been carved (constructed) at least once.
    carved: u32,
    /// Objects handed out (to magazines or users).
    in_use: u32,
    /// Carved objects that are free, by index.
    free: Vec<u32>,
    /// One bit per object: set while it is handed out.
    live: Vec<u64>,
    list: ListKind,
    /// Position in its list.
    pos: usize,
}

impl Slab {
    fn is_live(&self, idx: u32) -> bool {
        self.live[(idx / 64) as usize] & (1 << (idx % 64)) != 0
    }

    fn set_live(&mut self, idx: u32, on: bool) {
        let w = &mut self.live[(idx / 64) as usize];
        if on {
            *w |= 1 << (idx % 64);
        } else {
            *w &= !(1 << (idx % 64));
        }
    }
}

/// A cheap hasher for slab numbers (addresses shifted right by the slab size).
#[derive(Default, Debug)]
struct SlabNumHasher(u64);

impl Hasher for SlabNumHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }

    fn write_usize(&mut self, n: usize) {
        let h = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = h ^ (h >> 29);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// What became of an object given back to a slab set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GiveBack {
    /// Returned to its slab.
    Done,
    /// Not from one of this set's slabs (maybe another node's).
    Foreign,
    /// From one of this set's slabs but not a handed-out object (double free or a pointer
    /// into the middle of an object); ignored.
    Invalid,
}

/// Slow-path counters of one slab set.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct SlabCounters {
    pub slabs_allocated: u64,
    pub slabs_freed: u64,
    pub objects_carved: u64,
    pub invalid_frees: u64,
    pub backend_failures: u64,
}

/// All slabs of one node of one cache.
#[derive(Debug)]
pub(crate) struct SlabSet {
    geo: Geometry,
    node: NodeId,
    backend: Arc<dyn SlabBackend>,
    slabs: Vec<Option<Slab>>,
    vacant: Vec<u32>,
    by_num: HashMap<usize, u32, BuildHasherDefault<SlabNumHasher>>,
    lists: [Vec<u32>; 3],
    next_colour: u32,
    /// Objects handed out from all slabs.
    in_use: u64,
    pub counters: SlabCounters,
}

impl SlabSet {
    /// An empty set.
    pub(crate) fn new(geo: Geometry, node: NodeId, backend: Arc<dyn SlabBackend>) -> Self {
        SlabSet {
            geo,
            node,
            backend,
            slabs: Vec::new(),
            vacant: Vec::new(),
            by_num: HashMap::default(),
            lists: [Vec::new(), Vec::new(), Vec::new()],
            next_colour: 0,
            in_use: 0,
            counters: SlabCounters::default(),
        }
    }

    /// Slabs on the partial, full and free lists.
    pub(crate) fn list_lens(&self) -> (usize, usize, usize) {
        (
            self.lists[0].len(),
            self.lists[1].len(),
            self.lists[2].len(),
        )
    }

    /// Objects handed out from this set's slabs.
    pub(crate) fn in_use(&self) -> u64 {
        self.in_use
    }

    fn slab(&self, id: u32) -> &Slab {
        // Ids on lists and in the map always name occupied entries (see validate()).
        match &self.slabs[id as usize] {
            Some(s) => s,
            None => unreachable!("slab id {id} is vacant"),
        }
    }

    fn slab_mut(&mut self, id: u32) -> &mut Slab {
        match &mut self.slabs[id as usize] {
            Some(s) => s,
            None => unreachable!("slab id {id} is vacant"),
        }
    }

    fn list_remove(&mut self, id: u32) {
        let (kind, pos) = {
            let s = self.slab(id);
            (s.list, s.pos)
        };
        let list = &mut self.lists[kind as usize];
        list.swap_remove(pos);
        if let Some(&moved) = list.get(pos) {
            self.slab_mut(moved).pos = pos;
        }
    }

    fn list_insert(&mut self, id: u32, kind: ListKind) {
        let pos = self.lists[kind as usize].len();
        self.lists[kind as usize].push(id);
        let s = self.slab_mut(id);
        s.list = kind;
        s.pos = pos;
    }

    /// Put the slab on the list its state calls for.
    fn relist(&mut self, id: u32) {
        let (cur, want) = {
            let s = self.slab(id);
            let want = if s.in_use == 0 {
                ListKind::Free
            } else if s.in_use == self.geo.objects_per_slab {
                ListKind::Full
            } else {
                ListKind::Partial
            };
            (s.list, want)
        };
        if cur != want {
            self.list_remove(id);
            self.list_insert(id, want);
        }
    }

    /// Get a new slab from the backend and put it on the free list.
    fn grow(&mut self) -> Option<u32> {
        let layout = self.geo.slab_layout();
        let Some(base) = self.backend.alloc_slab(self.node, layout) else {
            self.counters.backend_failures += 1;
            return None;
        };
        let colour = (self.next_colour % self.geo.colours) as usize * self.geo.colour_step;
        self.next_colour = self.next_colour.wrapping_add(1) % self.geo.colours;
        let n = self.geo.objects_per_slab;
        let slab = Slab {
            base: SlabMem(base),
            colour,
            carved: 0,
            in_use: 0,
            free: Vec::new(),
            live: vec![0; n.div_ceil(64) as usize],
            list: ListKind::Free,
            pos: 0,
        };
        let id = match self.vacant.pop() {
            Some(id) => {
                self.slabs[id as usize] = Some(slab);
                id
            }
            None => {
                self.slabs.push(Some(slab));
                (self.slabs.len() - 1) as u32
            }
        };
        self.by_num
            .insert(base.as_ptr() as usize >> self.geo.slab_shift(), id);
        self.list_insert(id, ListKind::Free);
        self.counters.slabs_allocated += 1;
        Some(id)
    }

    /// Hand out up to `want` objects: already constructed ones are pushed to `reused`, newly
    /// carved ones (which need the constructor) to `fresh`. Partial slabs are used first, then
    /// free ones, then new slabs. Returns how many were handed out; fewer than `want` only
    /// when the backend is out of memory.
    pub(crate) fn take(
        &mut self,
        want: usize,
        reused: &mut Vec<ObjPtr>,
        fresh: &mut Vec<ObjPtr>,
    ) -> usize {
        self.take_with(want, |p, is_fresh| {
            if is_fresh {
                fresh.push(p);
            } else {
                reused.push(p);
            }
        })
    }

    /// Hand out one object: `(object, newly carved)`, or `None` when out of memory.
    pub(crate) fn take_one(&mut self) -> Option<(ObjPtr, bool)> {
        let mut out = None;
        self.take_with(1, |p, is_fresh| out = Some((p, is_fresh)));
        out
    }

    /// [`take`](Self::take) with a sink that gets each object and whether it is newly carved.
    fn take_with(&mut self, want: usize, mut sink: impl FnMut(ObjPtr, bool)) -> usize {
        let mut got = 0;
        while got < want {
            let id = match self.lists[ListKind::Partial as usize].last() {
                Some(&id) => id,
                None => match self.lists[ListKind::Free as usize].last() {
                    Some(&id) => id,
                    None => match self.grow() {
                        Some(id) => id,
                        None => break,
                    },
                },
            };
            let geo = self.geo;
            let s = self.slab_mut(id);
            let mut n = 0u32;
            let mut carved = 0u64;
            while got < want {
                if let Some(idx) = s.free.pop() {
                    sink(object_at(&geo, s, idx), false);
                } else if s.carved < geo.objects_per_slab {
                    let idx = s.carved;
                    s.carved += 1;
                    carved += 1;
                    sink(object_at(&geo, s, idx), true);
                } else {
                    break;
                }
                got += 1;
                n += 1;
            }
            s.in_use += n;
            self.in_use += u64::from(n);
            self.counters.objects_carved += carved;
            self.relist(id);
        }
        got
    }

    /// Give one handed-out object back to its slab.
    pub(crate) fn give_back(&mut self, p: ObjPtr) -> GiveBack {
        let addr = p.addr();
        let num = addr >> self.geo.slab_shift();
        let Some(&id) = self.by_num.get(&num) else {
            return GiveBack::Foreign;
        };
        let geo = self.geo;
        let s = self.slab_mut(id);
        let off = addr - (s.base.0.as_ptr() as usize);
        let Some(rel) = off.checked_sub(s.colour) else {
            self.counters.invalid_frees += 1;
            return GiveBack::Invalid;
        };
        let idx = rel / geo.stride;
        if rel % geo.stride != 0 || idx >= s.carved as usize || !s.is_live(idx as u32) {
            self.counters.invalid_frees += 1;
            return GiveBack::Invalid;
        }
        let idx = idx as u32;
        s.set_live(idx, false);
        s.free.push(idx);
        s.in_use -= 1;
        self.in_use -= 1;
        self.relist(id);
        GiveBack::Done
    }

    /// Release free slabs to the backend, keeping `keep` of them. Returns slabs released.
    pub(crate) fn release_free(&mut self, keep: usize) -> usize {
        let layout = self.geo.slab_layout();
        let mut released = 0;
        while self.lists[ListKind::Free as usize].len() > keep {
            let Some(id) = self.lists[ListKind::Free as usize].pop() else {
                break;
            };
            let Some(slab) = self.slabs[id as usize].take() else {
                continue;
            };
            self.by_num
                .remove(&(slab.base.0.as_ptr() as usize >> self.geo.slab_shift()));
            self.vacant.push(id);
            // SAFETY: the slab came from this backend's `alloc_slab(self.node, layout)` with
            // the same geometry; it is on the free list, so no object of it is handed out, and
            // it was just removed from every table, so nothing here touches it again.
            unsafe { self.backend.free_slab(self.node, slab.base.0, layout) };
            self.counters.slabs_freed += 1;
            released += 1;
        }
        released
    }

    /// Check the set's invariants; the error names the first one broken.
    pub(crate) fn validate(&self) -> Result<(), String> {
        let mut total = 0u64;
        let mut seen = 0usize;
        for (kind_idx, list) in self.lists.iter().enumerate() {
            for (pos, &id) in list.iter().enumerate() {
                let Some(s) = self.slabs.get(id as usize).and_then(Option::as_ref) else {
                    return Err(format!("list {kind_idx} names vacant slab {id}"));
                };
                if s.list as usize != kind_idx || s.pos != pos {
                    return Err(format!("slab {id} list/pos mismatch"));
                }
                let live = s.live.iter().map(|w| w.count_ones()).sum::<u32>();
                if live != s.in_use {
                    return Err(format!("slab {id}: {live} live bits, in_use {}", s.in_use));
                }
                if s.in_use + s.free.len() as u32 != s.carved {
                    return Err(format!("slab {id}: in_use + free != carved"));
                }
                let want = if s.in_use == 0 {
                    ListKind::Free
                } else if s.in_use == self.geo.objects_per_slab {
                    ListKind::Full
                } else {
                    ListKind::Partial
                };
                if want != s.list {
                    return Err(format!("slab {id} on the wrong list"));
                }
                let num = s.base.0.as_ptr() as usize >> self.geo.slab_shift();
                if self.by_num.get(&num) != Some(&id) {
                    return Err(format!("slab {id} missing from the address map"));
                }
                total += u64::from(s.in_use);
                seen += 1;
            }
        }
        if seen != self.by_num.len() || seen + self.vacant.len() != self.slabs.len() {
            return Err("slab tables disagree on the number of slabs".into());
        }
        if total != self.in_use {
            return Err(format!("in_use {} but slabs sum to {total}", self.in_use));
        }
        Ok(())
    }
}

impl Drop for SlabSet {
    fn drop(&mut self) {
        let layout = self.geo.slab_layout();
        for slab in self.slabs.drain(..).flatten() {
            // SAFETY: the slab came from this backend with this layout. The set is being
            // dropped, which happens only when the cache itself goes away: no handle exists
            // any more (each holds an `Arc` of the cache), so every object still handed out
            // was leaked by a raw user, whom `SlabHandle::free`'s contract already told that
            // objects do not outlive their cache.
            unsafe { self.backend.free_slab(self.node, slab.base.0, layout) };
            self.counters.slabs_freed += 1;
        }
    }
}

/// The address of object `idx` of slab `s`, marking it live.
fn object_at(geo: &Geometry, s: &mut Slab, idx: u32) -> ObjPtr {
    s.set_live(idx, true);
    let off = s.colour + idx as usize * geo.stride;
    // SAFETY: `idx < objects_per_slab` and the builder made sure that the largest colour plus
    // `objects_per_slab * stride` fits in `slab_size`, so `off` stays inside the slab, one
    // allocation of `slab_size` bytes; the result is therefore in bounds and not null.
    ObjPtr::new(unsafe { s.base.0.add(off) })
}
