//! # Slab allocator: fixed-size object caches with per-thread magazines
//!
//! Tidepool keeps small metadata objects (for instance one record per plugged virtio-mem
//! block) in slab caches. The design follows Bonwick's magazine layer:
//!
//! - [`SlabCache`] is shared (`Send + Sync`, used through an `Arc`). It holds one depot per
//!   node behind a lock. A depot keeps full and empty magazines and the node's slabs on
//!   partial, full and free lists.
//! - [`SlabHandle`] is a thread cache: a *loaded* and a *previous* magazine, each a small
//!   array of pointers to free objects. Its [`alloc`](SlabHandle::alloc) and
//!   [`free`](SlabHandle::free) take no lock and make no atomic read-modify-write while one of
//!   the two magazines can serve. Otherwise they exchange a whole magazine with the depot.
//! - [`TypedSlab`], [`TypedHandle`] and [`SlabBox`] are the safe typed front end: a `SlabBox<T>`
//!   is aligned for `T`, derefs to it, and gives its memory back to the thread cache when it
//!   drops.
//!
//! Slab memory comes from a [`SlabBackend`] (default: [`StdBackend`], `std::alloc` aligned to
//! the slab size). Optional features: a constructor run once when an object is first carved
//! out of a slab, colouring (successive slabs start their objects at different cache-line
//! offsets), and [`SlabCache::shrink`] (also through the [`Shrinker`] trait), which frees the
//! depot's magazines and free slabs and reports the bytes it gave back. [`SlabStats`] counts
//! hits, misses, slabs and magazines.
//!
//! ## Thread safety
//!
//! A `SlabCache` may be shared by any number of threads. A `SlabHandle` belongs to one thread at
//! a time (it is `Send`, and its operations take `&mut self`). Each handle holds an `Arc` of
//! its cache, so a cache lives as long as any of its handles. An object may be freed through
//! any handle of the same cache, on any node: objects from another node's slabs go home when
//! their magazine is taken apart.
//!
//! The tests pass under Miri (`cargo +nightly miri test -p guest-mm slab`, also with
//! `-Zmiri-strict-provenance`).
//!
//! ## Example
//!
//! ```
//! use guest_mm::slab::{SlabCacheBuilder, TypedSlab};
//! use guest_mm::NodeId;
//!
//! // Raw objects: 48 bytes, 8-byte aligned.
//! let cache = SlabCacheBuilder::new("blocks", 48, 8).build().unwrap();
//! let mut h = cache.handle(NodeId(0)).unwrap();
//! let p = h.alloc().unwrap();
//! // SAFETY: `p` came from this cache and is not used after this call.
//! unsafe { h.free(p) };
//!
//! // Typed objects, freed when the box drops.
//! let slab = TypedSlab::<[u64; 4]>::new("meta").unwrap();
//! let th = slab.handle(NodeId(0)).unwrap();
//! let b = th.alloc([1, 2, 3, 4]).unwrap();
//! assert_eq!(b[2], 3);
//! ```

mod backend;
mod depot;
mod handle;
mod magazine;
mod slabs;
mod stats;
mod typed;

#[cfg(test)]
mod tests;

pub use backend::{SlabBackend, StdBackend};
pub use handle::SlabHandle;
pub use stats::SlabStats;
pub use typed::{OwnedSlabBox, SlabBox, TypedHandle, TypedSlab};

use crate::frame::NodeId;
use depot::{Depot, DepotShrink};
use magazine::{Magazine, ObjPtr};
use serde::{Deserialize, Serialize};
use slabs::{Geometry, SlabSet};
use stats::{HandleCounters, Registry};
use std::alloc::Layout;
use std::fmt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Smallest slab: one 4 KiB page.
pub const MIN_SLAB_SIZE: usize = 4096;
/// Largest slab: 1 MiB.
pub const MAX_SLAB_SIZE: usize = 1 << 20;
/// When the slab size is chosen automatically, a slab holds at least this many objects.
pub const MIN_OBJECTS_PER_SLAB: usize = 8;
/// Largest magazine.
pub const MAX_MAGAZINE_SIZE: usize = 1024;
/// Most nodes a cache can have.
pub const MAX_NODES: usize = 1024;
/// Default colour step: one cache line.
pub const CACHE_LINE: usize = 64;

/// A constructor: called once on each object when it is first carved out of a slab, with a
/// pointer to `object_size` bytes of uninitialized memory aligned as configured.
pub type Constructor = Arc<dyn Fn(NonNull<u8>) + Send + Sync>;

/// Why a cache could not be built.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum SlabConfigError {
    /// Objects of zero bytes need no cache.
    #[error("object size must not be zero")]
    ZeroSize,
    /// The alignment is not a power of two, or is larger than the slab.
    #[error("alignment {0} is not a power of two no larger than the slab")]
    BadAlign(usize),
    /// The slab size is not a power of two in `MIN_SLAB_SIZE..=MAX_SLAB_SIZE`.
    #[error("slab size {0} must be a power of two between 4 KiB and 1 MiB")]
    BadSlabSize(usize),
    /// Not even one object (or, for an automatic slab size, not `MIN_OBJECTS_PER_SLAB`) fits.
    #[error("object of {size} bytes does not fit a slab of at most {slab_size} bytes")]
    ObjectTooLarge {
        /// Object stride.
        size: usize,
        /// Slab size tried.
        slab_size: usize,
    },
    /// The magazine size is not in `1..=MAX_MAGAZINE_SIZE`.
    #[error("magazine size {0} must be between 1 and 1024")]
    BadMagazineSize(usize),
    /// The node count is not in `1..=MAX_NODES`.
    #[error("node count {0} must be between 1 and 1024")]
    BadNodes(usize),
}

/// Why an operation on a cache failed.
#[derive(Debug, thiserror::Error, Clone, Copy, PartialEq, Eq)]
pub enum SlabError {
    /// The backend had no memory for a new slab.
    #[error("slab backend out of memory on {node}")]
    OutOfMemory {
        /// Node whose depot asked.
        node: NodeId,
    },
    /// The cache has no depot for this node.
    #[error("no such node {node}: the cache has {nodes} nodes")]
    NoSuchNode {
        /// Node asked for.
        node: NodeId,
        /// Nodes the cache has.
        nodes: u16,
    },
    /// A typed handle was used from inside one of its own operations (for example from a
    /// backend callback); the inner call is refused rather than aliasing the handle.
    #[error("slab handle is busy (re-entrant use)")]
    Busy,
}

/// The cache's invariants are broken (a bug, or a backend that broke its contract).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
#[error("slab cache {cache}, {node}: {what}")]
pub struct SlabValidateError {
    /// Cache name.
    pub cache: String,
    /// Node whose depot is broken.
    pub node: NodeId,
    /// The first invariant found broken.
    pub what: String,
}

/// What a shrink gave back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShrinkReport {
    /// Bytes returned: slab memory plus magazine storage.
    pub bytes_released: u64,
    /// Slabs returned to the backend.
    pub slabs_released: u64,
    /// Magazines freed.
    pub magazines_released: u64,
}

/// Something that can give memory back under pressure.
pub trait Shrinker: Send + Sync {
    /// A name for logs and reports.
    fn shrinker_name(&self) -> &str;
    /// Bytes a shrink would give back now, at least (free slabs and depot magazines; objects
    /// in full depot magazines may free more slabs once they go home).
    fn reclaimable_bytes(&self) -> u64;
    /// Give back what can be given back.
    fn shrink(&self) -> ShrinkReport;
}

/// Builds a [`SlabCache`].
#[must_use]
pub struct SlabCacheBuilder {
    name: String,
    object_size: usize,
    align: usize,
    slab_size: Option<usize>,
    magazine_size: Option<usize>,
    colouring: bool,
    nodes: usize,
    depot_max_full: usize,
    depot_max_empty: usize,
    keep_free_slabs: usize,
    ctor: Option<Constructor>,
    backend: Arc<dyn SlabBackend>,
}

impl fmt::Debug for SlabCacheBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlabCacheBuilder")
            .field("name", &self.name)
            .field("object_size", &self.object_size)
            .field("align", &self.align)
            .field("slab_size", &self.slab_size)
            .field("magazine_size", &self.magazine_size)
            .field("colouring", &self.colouring)
            .field("nodes", &self.nodes)
            .field("constructor", &self.ctor.is_some())
            .field("backend", &self.backend)
            .finish_non_exhaustive()
    }
}

impl SlabCacheBuilder {
    /// A cache of `object_size`-byte objects aligned to `align`. Defaults: automatic slab and
    /// magazine sizes, colouring on, one node, [`StdBackend`], no constructor.
    pub fn new(name: impl Into<String>, object_size: usize, align: usize) -> Self {
        SlabCacheBuilder {
            name: name.into(),
            object_size,
            align,
            slab_size: None,
            magazine_size: None,
            colouring: true,
            nodes: 1,
            depot_max_full: 16,
            depot_max_empty: 16,
            keep_free_slabs: 2,
            ctor: None,
            backend: Arc::new(StdBackend),
        }
    }

    /// A cache for objects of `layout`.
    pub fn for_layout(name: impl Into<String>, layout: Layout) -> Self {
        Self::new(name, layout.size(), layout.align())
    }

    /// Bytes per slab: a power of two from 4 KiB to 1 MiB.
    pub fn slab_size(mut self, bytes: usize) -> Self {
        self.slab_size = Some(bytes);
        self
    }

    /// Objects per magazine (1 to 1024).
    pub fn magazine_size(mut self, objects: usize) -> Self {
        self.magazine_size = Some(objects);
        self
    }

    /// Whether successive slabs start their objects at different cache-line offsets.
    pub fn colouring(mut self, on: bool) -> Self {
        self.colouring = on;
        self
    }

    /// Number of nodes, one depot each.
    pub fn nodes(mut self, nodes: usize) -> Self {
        self.nodes = nodes;
        self
    }

    /// Full and empty magazines each depot keeps before it takes extra ones apart or frees them.
    pub fn depot_limits(mut self, max_full: usize, max_empty: usize) -> Self {
        self.depot_max_full = max_full;
        self.depot_max_empty = max_empty;
        self
    }

    /// Free slabs each depot keeps between shrinks (extra ones go back to the backend at once).
    pub fn keep_free_slabs(mut self, slabs: usize) -> Self {
        self.keep_free_slabs = slabs;
        self
    }

    /// Run `ctor` once on each object when it is first carved out of a slab. Objects freed to
    /// the cache must be left in their constructed state (Bonwick's rule): they are handed
    /// out again without calling it.
    pub fn constructor(mut self, ctor: impl Fn(NonNull<u8>) + Send + Sync + 'static) -> Self {
        self.ctor = Some(Arc::new(ctor));
        self
    }

    /// Where slabs come from.
    pub fn backend(mut self, backend: Arc<dyn SlabBackend>) -> Self {
        self.backend = backend;
        self
    }

    fn geometry(&self) -> Result<Geometry, SlabConfigError> {
        if self.object_size == 0 {
            return Err(SlabConfigError::ZeroSize);
        }
        if !self.align.is_power_of_two() || self.align > MAX_SLAB_SIZE {
            return Err(SlabConfigError::BadAlign(self.align));
        }
        let stride = self
            .object_size
            .checked_next_multiple_of(self.align)
            .ok_or(SlabConfigError::ObjectTooLarge {
                size: self.object_size,
                slab_size: MAX_SLAB_SIZE,
            })?;
        let slab_size = match self.slab_size {
            Some(s) => {
                if !s.is_power_of_two() || !(MIN_SLAB_SIZE..=MAX_SLAB_SIZE).contains(&s) {
                    return Err(SlabConfigError::BadSlabSize(s));
                }
                if s / stride == 0 {
                    return Err(SlabConfigError::ObjectTooLarge {
                        size: stride,
                        slab_size: s,
                    });
                }
                s
            }
            None => {
                let mut s = MIN_SLAB_SIZE;
                while s / stride < MIN_OBJECTS_PER_SLAB {
                    if s == MAX_SLAB_SIZE {
                        return Err(SlabConfigError::ObjectTooLarge {
                            size: stride,
                            slab_size: s,
                        });
                    }
                    s *= 2;
                }
                s
            }
        };
        if self.align > slab_size {
            return Err(SlabConfigError::BadAlign(self.align));
        }
        let layout = Layout::from_size_align(slab_size, slab_size)
            .map_err(|_| SlabConfigError::BadSlabSize(slab_size))?;
        let n = (slab_size / stride).min(u32::MAX as usize);
        let colour_step = CACHE_LINE.max(self.align);
        let slack = slab_size - n * stride;
        let colours = if self.colouring {
            slack / colour_step + 1
        } else {
            1
        };
        Ok(Geometry {
            object_size: self.object_size,
            align: self.align,
            stride,
            slab_size,
            objects_per_slab: n as u32,
            colours: colours as u32,
            colour_step,
            layout,
        })
    }

    /// Check the configuration and build the cache.
    pub fn build(self) -> Result<Arc<SlabCache>, SlabConfigError> {
        let geo = self.geometry()?;
        let magazine_size = match self.magazine_size {
            Some(m) if (1..=MAX_MAGAZINE_SIZE).contains(&m) => m,
            Some(m) => return Err(SlabConfigError::BadMagazineSize(m)),
            None if geo.stride <= 256 => 64,
            None if geo.stride <= 1024 => 32,
            None => 16,
        };
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return Err(SlabConfigError::BadNodes(self.nodes));
        }
        let depots = (0..self.nodes)
            .map(|n| {
                let node = NodeId(n as u16);
                let slabs = SlabSet::new(geo, node, Arc::clone(&self.backend));
                Padded(Mutex::new(Depot::new(
                    slabs,
                    self.depot_max_full,
                    self.depot_max_empty,
                    self.keep_free_slabs,
                )))
            })
            .collect();
        Ok(Arc::new(SlabCache {
            name: self.name,
            geo,
            magazine_size,
            ctor: self.ctor,
            depots,
            registry: Mutex::new(Registry::default()),
            magazines_allocated: AtomicU64::new(0),
            foreign_invalid: AtomicU64::new(0),
            shrink_calls: AtomicU64::new(0),
            shrink_bytes: AtomicU64::new(0),
            direct_frees: AtomicU64::new(0),
            direct_allocs: AtomicU64::new(0),
            direct_failures: AtomicU64::new(0),
        }))
    }
}

/// A value on its own cache lines, so that two depots' locks never share one.
#[derive(Debug)]
#[repr(align(128))]
struct Padded<T>(T);

/// A cache of fixed-size objects: per-node depots behind locks, shared by thread caches.
///
/// Build one with [`SlabCacheBuilder`], then give each thread a [`SlabHandle`] from
/// [`SlabCache::handle`]. Dropping the last `Arc` (handles hold one each) gives all slab
/// memory back to the backend.
pub struct SlabCache {
    name: String,
    geo: Geometry,
    magazine_size: usize,
    ctor: Option<Constructor>,
    depots: Box<[Padded<Mutex<Depot>>]>,
    registry: Mutex<Registry>,
    magazines_allocated: AtomicU64,
    foreign_invalid: AtomicU64,
    shrink_calls: AtomicU64,
    shrink_bytes: AtomicU64,
    direct_frees: AtomicU64,
    direct_allocs: AtomicU64,
    direct_failures: AtomicU64,
}

impl fmt::Debug for SlabCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlabCache")
            .field("name", &self.name)
            .field("geometry", &self.geo)
            .field("magazine_size", &self.magazine_size)
            .field("nodes", &self.depots.len())
            .field("constructor", &self.ctor.is_some())
            .finish_non_exhaustive()
    }
}

impl SlabCache {
    /// A new thread cache on `node`.
    pub fn handle(self: &Arc<Self>, node: NodeId) -> Result<SlabHandle, SlabError> {
        if usize::from(node.0) >= self.depots.len() {
            return Err(SlabError::NoSuchNode {
                node,
                nodes: self.depots.len() as u16,
            });
        }
        let counters = Arc::new(HandleCounters::default());
        lock(&self.registry).live.push(Arc::clone(&counters));
        Ok(SlabHandle::new(
            Arc::clone(self),
            usize::from(node.0),
            counters,
        ))
    }

    /// The cache's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Object size asked for.
    pub fn object_size(&self) -> usize {
        self.geo.object_size
    }

    /// Object alignment.
    pub fn align(&self) -> usize {
        self.geo.align
    }

    /// Distance between two objects of a slab.
    pub fn stride(&self) -> usize {
        self.geo.stride
    }

    /// Bytes per slab (slabs are aligned to this too).
    pub fn slab_size(&self) -> usize {
        self.geo.slab_size
    }

    /// Objects per slab.
    pub fn objects_per_slab(&self) -> usize {
        self.geo.objects_per_slab as usize
    }

    /// Distinct colour offsets that successive slabs cycle through.
    pub fn colours(&self) -> usize {
        self.geo.colours as usize
    }

    /// Bytes between two colour offsets.
    pub fn colour_step(&self) -> usize {
        self.geo.colour_step
    }

    /// Objects per magazine.
    pub fn magazine_size(&self) -> usize {
        self.magazine_size
    }

    /// Number of nodes (depots).
    pub fn nodes(&self) -> usize {
        self.depots.len()
    }

    /// Give back every free slab and every magazine the depots hold. Objects in the depots'
    /// full magazines go back to their slabs first, so slabs they kept busy can go too.
    /// Objects in thread caches stay there: call [`SlabHandle::flush`] first to include them.
    pub fn shrink(&self) -> ShrinkReport {
        let mut out = DepotShrink::default();
        for (i, d) in self.depots.iter().enumerate() {
            let mut foreign = Vec::new();
            lock(&d.0).shrink_magazines(&mut foreign, &mut out);
            self.forward(foreign, i);
        }
        for d in self.depots.iter() {
            lock(&d.0).shrink_slabs(&mut out);
        }
        let bytes = out.slabs_freed * self.geo.slab_size as u64 + out.magazine_bytes;
        self.shrink_calls.fetch_add(1, Ordering::Relaxed);
        self.shrink_bytes.fetch_add(bytes, Ordering::Relaxed);
        ShrinkReport {
            bytes_released: bytes,
            slabs_released: out.slabs_freed,
            magazines_released: out.magazines_freed,
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SlabStats {
        let (totals, live_handles) = {
            let r = lock(&self.registry);
            (r.totals(), r.live.len())
        };
        let direct = self.direct_frees.load(Ordering::Relaxed);
        let direct_allocs = self.direct_allocs.load(Ordering::Relaxed);
        let g = &self.geo;
        let mut s = SlabStats {
            name: self.name.clone(),
            object_size: g.object_size as u64,
            align: g.align as u64,
            stride: g.stride as u64,
            slab_size: g.slab_size as u64,
            objects_per_slab: u64::from(g.objects_per_slab),
            colours: u64::from(g.colours),
            magazine_size: self.magazine_size as u64,
            nodes: self.depots.len() as u64,
            live_handles: live_handles as u64,
            allocs: totals.alloc_hits + totals.alloc_misses + direct_allocs,
            frees: totals.free_hits + totals.free_misses + direct,
            alloc_hits: totals.alloc_hits,
            alloc_misses: totals.alloc_misses + direct_allocs,
            alloc_failures: totals.alloc_failures + self.direct_failures.load(Ordering::Relaxed),
            free_hits: totals.free_hits,
            free_misses: totals.free_misses + direct,
            magazines_allocated: self.magazines_allocated.load(Ordering::Relaxed),
            invalid_frees: self.foreign_invalid.load(Ordering::Relaxed),
            shrink_calls: self.shrink_calls.load(Ordering::Relaxed),
            shrink_bytes_released: self.shrink_bytes.load(Ordering::Relaxed),
            ..SlabStats::default()
        };
        for d in self.depots.iter() {
            let d = lock(&d.0);
            let (full, empty) = d.magazine_counts();
            let (partial, full_slabs, free_slabs) = d.slabs.list_lens();
            let c = &d.counters;
            let sc = &d.slabs.counters;
            s.depot_full_handouts += c.full_handouts;
            s.depot_slab_fills += c.slab_fills;
            s.depot_flushes += c.flushes;
            s.magazines_dismantled += c.dismantled;
            s.magazines_freed += c.magazines_freed;
            s.depot_full_magazines += full as u64;
            s.depot_empty_magazines += empty as u64;
            s.depot_cached_objects += d.cached_objects();
            s.objects_carved += sc.objects_carved;
            s.objects_out_of_slabs += d.slabs.in_use();
            s.slabs_allocated += sc.slabs_allocated;
            s.slabs_freed += sc.slabs_freed;
            s.slabs_partial += partial as u64;
            s.slabs_full += full_slabs as u64;
            s.slabs_free += free_slabs as u64;
            s.invalid_frees += sc.invalid_frees;
            s.backend_failures += sc.backend_failures;
        }
        s.slab_bytes = (s.slabs_partial + s.slabs_full + s.slabs_free) * s.slab_size;
        s
    }

    /// Check every depot's invariants.
    pub fn validate(&self) -> Result<(), SlabValidateError> {
        for (i, d) in self.depots.iter().enumerate() {
            lock(&d.0)
                .slabs
                .validate()
                .map_err(|what| SlabValidateError {
                    cache: self.name.clone(),
                    node: NodeId(i as u16),
                    what,
                })?;
        }
        Ok(())
    }

    /// The depot of node index `node` (checked when the handle was made).
    pub(crate) fn depot(&self, node: usize) -> MutexGuard<'_, Depot> {
        lock(&self.depots[node].0)
    }

    /// A new empty magazine.
    pub(crate) fn new_magazine(&self) -> Magazine {
        self.magazines_allocated.fetch_add(1, Ordering::Relaxed);
        Magazine::new(self.magazine_size)
    }

    /// Run the constructor, if any, on newly carved objects.
    pub(crate) fn construct(&self, fresh: &[ObjPtr]) {
        if let Some(ctor) = &self.ctor {
            for p in fresh {
                ctor(p.ptr());
            }
        }
    }

    /// Send objects that node `from`'s depot did not own to their own node's depot.
    pub(crate) fn forward(&self, mut foreign: Vec<ObjPtr>, from: usize) {
        for (i, d) in self.depots.iter().enumerate() {
            if foreign.is_empty() {
                return;
            }
            if i == from {
                continue;
            }
            let mut still = Vec::new();
            let mut d = lock(&d.0);
            for p in foreign.drain(..) {
                d.give_back(p, &mut still);
            }
            d.trim();
            foreign = still;
        }
        // Owned by no depot: not an object of this cache. Ignore it rather than corrupt a slab.
        self.foreign_invalid
            .fetch_add(foreign.len() as u64, Ordering::Relaxed);
    }

    /// Take one object straight from node `node`'s slabs, bypassing magazines.
    pub(crate) fn alloc_direct(&self, node: NodeId) -> Result<NonNull<u8>, SlabError> {
        let idx = usize::from(node.0);
        if idx >= self.depots.len() {
            return Err(SlabError::NoSuchNode {
                node,
                nodes: self.depots.len() as u16,
            });
        }
        let got = self.depot(idx).slabs.take_one();
        let Some((p, fresh)) = got else {
            self.direct_failures.fetch_add(1, Ordering::Relaxed);
            return Err(SlabError::OutOfMemory { node });
        };
        if fresh {
            self.construct(&[p]);
        }
        self.direct_allocs.fetch_add(1, Ordering::Relaxed);
        Ok(p.ptr())
    }

    /// Return one object straight to its slab, bypassing magazines.
    pub(crate) fn free_direct(&self, node: usize, p: NonNull<u8>) {
        let mut foreign = Vec::new();
        {
            let mut d = self.depot(node);
            d.give_back(ObjPtr::new(p), &mut foreign);
            d.trim();
        }
        self.forward(foreign, node);
        self.direct_frees.fetch_add(1, Ordering::Relaxed);
    }

    /// Unregister a departing handle's counters.
    pub(crate) fn retire(&self, c: &Arc<HandleCounters>) {
        lock(&self.registry).retire(c);
    }
}

impl Shrinker for SlabCache {
    fn shrinker_name(&self) -> &str {
        &self.name
    }

    fn reclaimable_bytes(&self) -> u64 {
        let mut bytes = 0u64;
        for d in self.depots.iter() {
            let d = lock(&d.0);
            let (full, empty) = d.magazine_counts();
            let (_, _, free_slabs) = d.slabs.list_lens();
            bytes += free_slabs as u64 * self.geo.slab_size as u64;
            bytes +=
                (full + empty) as u64 * (self.magazine_size * std::mem::size_of::<usize>()) as u64;
        }
        bytes
    }

    fn shrink(&self) -> ShrinkReport {
        SlabCache::shrink(self)
    }
}

/// Lock a mutex, ignoring poisoning: every depot operation leaves the depot consistent at
/// each point where a panic (from a backend) could unwind.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
