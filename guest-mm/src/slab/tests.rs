//! Tests of the slab allocator: fast and slow paths, constructor, colouring, shrink, stats,
//! the typed front end and many threads at once.

use super::*;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc;

/// A backend over `StdBackend` that counts live slabs per node and can run out of memory.
#[derive(Debug, Default)]
struct CountingBackend {
    live: [AtomicUsize; 4],
    allocated: AtomicUsize,
    freed: AtomicUsize,
    /// Refuse allocations once this many slabs are live (0: no limit).
    limit: AtomicUsize,
}

impl CountingBackend {
    fn live_total(&self) -> usize {
        self.live.iter().map(|c| c.load(Ordering::SeqCst)).sum()
    }
}

// SAFETY: every slab comes from `StdBackend`, which honours the contract; this wrapper only
// counts and may refuse (return `None`).
unsafe impl SlabBackend for CountingBackend {
    fn alloc_slab(&self, node: NodeId, layout: Layout) -> Option<NonNull<u8>> {
        let limit = self.limit.load(Ordering::SeqCst);
        if limit != 0 && self.live_total() >= limit {
            return None;
        }
        let p = StdBackend.alloc_slab(node, layout)?;
        assert_eq!(p.as_ptr() as usize % layout.align(), 0);
        self.live[usize::from(node.0)].fetch_add(1, Ordering::SeqCst);
        self.allocated.fetch_add(1, Ordering::SeqCst);
        Some(p)
    }

    unsafe fn free_slab(&self, node: NodeId, ptr: NonNull<u8>, layout: Layout) {
        self.live[usize::from(node.0)].fetch_sub(1, Ordering::SeqCst);
        self.freed.fetch_add(1, Ordering::SeqCst);
        // SAFETY: forwarded from our caller, who gives the same guarantees `StdBackend` needs;
        // the pointer came from `StdBackend.alloc_slab` with this layout.
        unsafe { StdBackend.free_slab(node, ptr, layout) }
    }
}

fn counting() -> Arc<CountingBackend> {
    Arc::new(CountingBackend::default())
}

fn n0() -> NodeId {
    NodeId(0)
}

#[test]
fn fast_path_serves_from_the_magazine() {
    let cache = SlabCacheBuilder::new("fast", 64, 8).build().unwrap();
    let mut h = cache.handle(n0()).unwrap();
    let first = h.alloc().unwrap();
    for _ in 0..1000 {
        let p = h.alloc().unwrap();
        // SAFETY: `p` came from this cache and is not used again.
        unsafe { h.free(p) };
    }
    // SAFETY: as above.
    unsafe { h.free(first) };
    let s = cache.stats();
    assert_eq!(s.allocs, 1001);
    assert_eq!(s.frees, 1001);
    assert_eq!(
        s.alloc_misses, 1,
        "only the very first alloc goes to the depot"
    );
    assert_eq!(s.alloc_hits, 1000);
    assert_eq!(s.free_misses, 0);
    assert_eq!(s.free_hits, 1001);
    assert_eq!(s.depot_slab_fills, 1);
    assert_eq!(s.slabs_allocated, 1);
    assert_eq!(h.cached(), cache.magazine_size());
}

#[test]
fn slow_path_refills_grows_and_flushes() {
    let backend = counting();
    let cache = SlabCacheBuilder::new("slow", 512, 8)
        .slab_size(4096)
        .magazine_size(4)
        .colouring(false)
        .backend(backend.clone())
        .build()
        .unwrap();
    assert_eq!(cache.objects_per_slab(), 8);
    let mut h = cache.handle(n0()).unwrap();
    let objs: Vec<_> = (0..20).map(|_| h.alloc().unwrap()).collect();
    let distinct: HashSet<_> = objs.iter().map(|p| p.as_ptr() as usize).collect();
    assert_eq!(distinct.len(), 20);
    assert!(objs.iter().all(|p| p.as_ptr() as usize % 8 == 0));
    let s = cache.stats();
    assert_eq!(
        s.alloc_misses, 5,
        "each miss fills one 4-object magazine from slabs"
    );
    assert_eq!(s.depot_slab_fills, 5);
    assert_eq!(
        s.slabs_allocated, 3,
        "20 objects of 8 per slab need 3 slabs"
    );
    assert_eq!(backend.live_total(), 3);
    assert_eq!((s.slabs_full, s.slabs_partial, s.slabs_free), (2, 1, 0));
    assert_eq!(s.objects_out_of_slabs, 20);

    for p in &objs {
        // SAFETY: each object came from this cache and is freed once.
        unsafe { h.free(*p) };
    }
    // Frees 1-8 fill the two magazines; 9, 13 and 17 each hand a full magazine to the depot.
    let s = cache.stats();
    assert_eq!(s.free_misses, 3);
    assert_eq!(s.free_hits, 17);
    assert_eq!(s.depot_flushes, 3);
    assert_eq!(s.depot_full_magazines, 3);
    assert_eq!(s.depot_cached_objects, 12);
    assert_eq!(h.cached(), 8);

    // 8 allocs come from the handle's magazines, the 9th takes a full magazine from the depot.
    let again: Vec<_> = (0..9).map(|_| h.alloc().unwrap()).collect();
    let s = cache.stats();
    assert_eq!(s.depot_full_handouts, 1);
    assert_eq!(s.alloc_misses, 6);
    assert_eq!(s.depot_full_magazines, 2);
    assert_eq!(s.slabs_allocated, 3, "reuse needs no new slab");
    for p in again {
        // SAFETY: allocated above, freed once.
        unsafe { h.free(p) };
    }
    cache.validate().unwrap();
    drop(h);
    let s = cache.stats();
    assert_eq!(s.allocs, s.frees);
    assert_eq!(s.objects_out_of_slabs, s.depot_cached_objects);
    assert_eq!(s.live_handles, 0);
}

#[test]
fn constructor_runs_once_per_carved_object() {
    const MAGIC: u64 = 0x5EED_F00D;
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&calls);
    let cache = SlabCacheBuilder::new("ctor", 32, 8)
        .magazine_size(8)
        .constructor(move |p| {
            // SAFETY: the cache passes 32 writable bytes aligned to 8.
            unsafe { p.cast::<u64>().as_ptr().write(MAGIC) };
            c2.fetch_add(1, Ordering::SeqCst);
        })
        .build()
        .unwrap();
    let per_slab = cache.objects_per_slab();
    let mut h = cache.handle(n0()).unwrap();
    let n = per_slab + 10;
    let objs: Vec<_> = (0..n).map(|_| h.alloc().unwrap()).collect();
    for p in &objs {
        // SAFETY: the object is ours and at least 8 bytes.
        let v = unsafe { p.cast::<u64>().as_ptr().read() };
        assert_eq!(v, MAGIC);
    }
    let carved = calls.load(Ordering::SeqCst);
    assert!(carved >= n && carved < n + cache.magazine_size());
    assert_eq!(cache.stats().objects_carved, carved as u64);
    // Leave a mark (still a "constructed" state for this test) and recycle everything.
    for p in &objs {
        // SAFETY: the object is ours.
        unsafe { p.cast::<u64>().as_ptr().write(MAGIC + 1) };
        // SAFETY: allocated above, freed once, not used after.
        unsafe { h.free(*p) };
    }
    h.flush();
    for _ in 0..3 {
        let objs: Vec<_> = (0..n).map(|_| h.alloc().unwrap()).collect();
        for p in &objs {
            // SAFETY: the object is ours.
            let v = unsafe { p.cast::<u64>().as_ptr().read() };
            assert!(v == MAGIC || v == MAGIC + 1);
            // SAFETY: allocated above, freed once.
            unsafe { h.free(*p) };
        }
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        carved,
        "reused objects are not constructed again"
    );
    assert_eq!(cache.stats().objects_carved, carved as u64);
}

/// Offset of the first object in each slab the objects live in.
fn first_offsets(cache: &SlabCache, objs: &[NonNull<u8>]) -> Vec<usize> {
    let mut by_slab: HashMap<usize, usize> = HashMap::new();
    for p in objs {
        let a = p.as_ptr() as usize;
        let base = a & !(cache.slab_size() - 1);
        let off = a - base;
        let e = by_slab.entry(base).or_insert(off);
        *e = (*e).min(off);
    }
    by_slab.into_values().collect()
}

#[test]
fn colouring_offsets_successive_slabs() {
    // 4096 / 1000 = 4 objects, 96 bytes of slack: colours 0 and 64.
    let cache = SlabCacheBuilder::new("colour", 1000, 8)
        .slab_size(4096)
        .magazine_size(4)
        .build()
        .unwrap();
    assert_eq!(cache.colours(), 2);
    let mut h = cache.handle(n0()).unwrap();
    let objs: Vec<_> = (0..16).map(|_| h.alloc().unwrap()).collect();
    assert_eq!(cache.stats().slabs_allocated, 4);
    let offs: HashSet<_> = first_offsets(&cache, &objs).into_iter().collect();
    assert_eq!(offs, HashSet::from([0, 64]));
    for p in objs {
        // SAFETY: allocated above, freed once.
        unsafe { h.free(p) };
    }

    let plain = SlabCacheBuilder::new("plain", 1000, 8)
        .slab_size(4096)
        .magazine_size(4)
        .colouring(false)
        .build()
        .unwrap();
    assert_eq!(plain.colours(), 1);
    let mut h = plain.handle(n0()).unwrap();
    let objs: Vec<_> = (0..16).map(|_| h.alloc().unwrap()).collect();
    assert!(first_offsets(&plain, &objs).iter().all(|&o| o == 0));
    for p in objs {
        // SAFETY: allocated above, freed once.
        unsafe { h.free(p) };
    }
}

#[test]
fn colours_respect_alignment() {
    #[repr(C, align(128))]
    struct Big([u8; 300]);
    let slab =
        TypedSlab::<Big>::with_config("aligned", |b| b.slab_size(4096).magazine_size(2)).unwrap();
    let cache = slab.cache();
    assert_eq!(cache.stride(), 384);
    assert_eq!(cache.colour_step(), 128);
    // 10 objects, 256 bytes of slack: colours 0, 128, 256.
    assert_eq!(cache.colours(), 3);
    let h = slab.handle(n0()).unwrap();
    let boxes: Vec<_> = (0..40).map(|_| h.alloc(Big([7; 300])).unwrap()).collect();
    for b in &boxes {
        assert_eq!(SlabBox::as_ptr(b) as usize % 128, 0);
        assert_eq!(b.0[299], 7);
    }
}

#[test]
fn shrink_releases_free_slabs_and_magazines() {
    let backend = counting();
    let cache = SlabCacheBuilder::new("shrink", 256, 16)
        .slab_size(4096)
        .magazine_size(8)
        .keep_free_slabs(usize::MAX)
        .backend(backend.clone())
        .build()
        .unwrap();
    let mut h = cache.handle(n0()).unwrap();
    let objs: Vec<_> = (0..100).map(|_| h.alloc().unwrap()).collect();
    let slabs = cache.stats().slabs_allocated;
    assert_eq!(backend.live_total() as u64, slabs);
    // Keep one object alive: its slab must survive the shrink.
    let keep = objs[0];
    for p in &objs[1..] {
        // SAFETY: allocated above, freed once.
        unsafe { h.free(*p) };
    }
    h.flush();
    assert_eq!(h.cached(), 0);
    let before = cache.stats();
    assert!(cache.reclaimable_bytes() > 0);
    let r = cache.shrink();
    assert_eq!(r.slabs_released, slabs - 1);
    assert_eq!(
        r.bytes_released,
        r.slabs_released * 4096 + r.magazines_released * 8 * 8
    );
    assert_eq!(
        r.magazines_released,
        before.depot_full_magazines + before.depot_empty_magazines
    );
    assert_eq!(backend.live_total(), 1);
    let s = cache.stats();
    assert_eq!(s.slabs_freed, slabs - 1);
    assert_eq!(s.slab_bytes, 4096);
    assert_eq!(s.depot_full_magazines + s.depot_empty_magazines, 0);
    assert_eq!(s.shrink_calls, 1);
    assert_eq!(s.shrink_bytes_released, r.bytes_released);
    cache.validate().unwrap();

    // The handle still works after a shrink, and the last slab goes on the next shrink.
    // SAFETY: `keep` was allocated above and not freed yet.
    unsafe { h.free(keep) };
    let p = h.alloc().unwrap();
    // SAFETY: just allocated.
    unsafe { h.free(p) };
    h.flush();
    let r = Shrinker::shrink(&*cache);
    assert_eq!(r.slabs_released, 1);
    assert_eq!(backend.live_total(), 0);
    assert_eq!(cache.reclaimable_bytes(), 0);
    drop(h);
    drop(cache);
    assert_eq!(
        backend.allocated.load(Ordering::SeqCst),
        backend.freed.load(Ordering::SeqCst)
    );
}

#[test]
fn dropping_the_cache_returns_every_slab() {
    let backend = counting();
    let cache = SlabCacheBuilder::new("drop", 100, 4)
        .backend(backend.clone())
        .build()
        .unwrap();
    let mut h = cache.handle(n0()).unwrap();
    let objs: Vec<_> = (0..500).map(|_| h.alloc().unwrap()).collect();
    for p in objs {
        // SAFETY: allocated above, freed once.
        unsafe { h.free(p) };
    }
    assert!(backend.live_total() > 0);
    drop(h);
    drop(cache);
    assert_eq!(backend.live_total(), 0);
}

#[test]
fn depot_limit_sends_extra_magazines_home() {
    let backend = counting();
    let cache = SlabCacheBuilder::new("limit", 64, 8)
        .magazine_size(4)
        .depot_limits(1, 1)
        .keep_free_slabs(0)
        .backend(backend.clone())
        .build()
        .unwrap();
    let mut h = cache.handle(n0()).unwrap();
    let objs: Vec<_> = (0..200).map(|_| h.alloc().unwrap()).collect();
    for p in objs {
        // SAFETY: allocated above, freed once.
        unsafe { h.free(p) };
    }
    let s = cache.stats();
    assert_eq!(s.depot_full_magazines, 1);
    assert!(s.magazines_dismantled > 0);
    // Only the 12 cached objects (two magazines in the handle, one in the depot) hold slabs.
    assert_eq!(s.objects_out_of_slabs, 12);
    assert!(
        s.slabs_freed > 0,
        "free slabs beyond the keep limit go back at once"
    );
    cache.validate().unwrap();
}

#[test]
fn out_of_memory_is_an_error_and_recovers() {
    let backend = counting();
    backend.limit.store(1, Ordering::SeqCst);
    let cache = SlabCacheBuilder::new("oom", 1024, 8)
        .slab_size(4096)
        .magazine_size(2)
        .backend(backend.clone())
        .build()
        .unwrap();
    let mut h = cache.handle(NodeId(0)).unwrap();
    let objs: Vec<_> = (0..4).map(|_| h.alloc().unwrap()).collect();
    assert_eq!(h.alloc(), Err(SlabError::OutOfMemory { node: NodeId(0) }));
    let s = cache.stats();
    assert_eq!(s.alloc_failures, 1);
    assert_eq!(s.backend_failures, 1);
    assert_eq!(s.allocs, 4);
    // SAFETY: allocated above, freed once.
    unsafe { h.free(objs[3]) };
    let p = h.alloc().unwrap();
    assert_eq!(p, objs[3]);
    for p in objs {
        // SAFETY: each object is freed once (objs[3] was re-allocated as `p`).
        unsafe { h.free(p) };
    }
}

#[test]
fn config_errors_are_typed() {
    let e = |b: SlabCacheBuilder| b.build().unwrap_err();
    assert_eq!(
        e(SlabCacheBuilder::new("z", 0, 8)),
        SlabConfigError::ZeroSize
    );
    assert_eq!(
        e(SlabCacheBuilder::new("a", 8, 3)),
        SlabConfigError::BadAlign(3)
    );
    assert_eq!(
        e(SlabCacheBuilder::new("s", 8, 8).slab_size(5000)),
        SlabConfigError::BadSlabSize(5000)
    );
    assert_eq!(
        e(SlabCacheBuilder::new("s", 8, 8).slab_size(2048)),
        SlabConfigError::BadSlabSize(2048)
    );
    assert!(matches!(
        e(SlabCacheBuilder::new("big", 5000, 8).slab_size(4096)),
        SlabConfigError::ObjectTooLarge { .. }
    ));
    assert!(matches!(
        e(SlabCacheBuilder::new("huge", 200_000, 8)),
        SlabConfigError::ObjectTooLarge { .. }
    ));
    assert_eq!(
        e(SlabCacheBuilder::new("m", 8, 8).magazine_size(0)),
        SlabConfigError::BadMagazineSize(0)
    );
    assert_eq!(
        e(SlabCacheBuilder::new("n", 8, 8).nodes(0)),
        SlabConfigError::BadNodes(0)
    );
    assert_eq!(
        TypedSlab::<()>::new("zst").unwrap_err(),
        SlabConfigError::ZeroSize
    );
    // Automatic slab size: at least MIN_OBJECTS_PER_SLAB objects.
    let c = SlabCacheBuilder::new("auto", 3000, 8).build().unwrap();
    assert_eq!(c.slab_size(), 32768);
    assert!(c.objects_per_slab() >= MIN_OBJECTS_PER_SLAB);
    let err = c.handle(NodeId(1)).unwrap_err();
    assert_eq!(
        err,
        SlabError::NoSuchNode {
            node: NodeId(1),
            nodes: 1
        }
    );
}

#[test]
fn typed_boxes_drop_their_values_and_return_memory() {
    struct Meta {
        id: u64,
        drops: Arc<AtomicUsize>,
    }
    impl Drop for Meta {
        fn drop(&mut self) {
            self.drops.fetch_add(1, Ordering::SeqCst);
        }
    }
    let drops = Arc::new(AtomicUsize::new(0));
    let slab = TypedSlab::<Meta>::new("meta").unwrap();
    let h = slab.handle(n0()).unwrap();
    let mut boxes = Vec::new();
    for id in 0..300 {
        let b = h
            .alloc(Meta {
                id,
                drops: Arc::clone(&drops),
            })
            .unwrap();
        assert_eq!(
            SlabBox::as_ptr(&b) as usize % std::mem::align_of::<Meta>(),
            0
        );
        boxes.push(b);
    }
    boxes[5].id = 1005;
    assert_eq!(boxes[5].id, 1005);
    assert_eq!(boxes[299].id, 299);
    let inner = SlabBox::into_inner(boxes.pop().unwrap());
    assert_eq!(inner.id, 299);
    assert_eq!(drops.load(Ordering::SeqCst), 0);
    drop(inner);
    drop(boxes);
    assert_eq!(drops.load(Ordering::SeqCst), 300);
    let s = slab.stats();
    assert_eq!(s.allocs, 300);
    assert_eq!(s.frees, 300);
    h.flush().unwrap();
    drop(h);
    let s = slab.stats();
    assert_eq!(s.objects_out_of_slabs, s.depot_cached_objects);
}

#[test]
fn frees_on_another_node_go_home() {
    let backend = counting();
    let cache = SlabCacheBuilder::new("numa", 128, 8)
        .nodes(2)
        .magazine_size(8)
        .backend(backend.clone())
        .build()
        .unwrap();
    let mut h0 = cache.handle(NodeId(0)).unwrap();
    let mut h1 = cache.handle(NodeId(1)).unwrap();
    let objs: Vec<_> = (0..300).map(|_| h0.alloc().unwrap()).collect();
    assert!(backend.live[0].load(Ordering::SeqCst) > 0);
    assert_eq!(backend.live[1].load(Ordering::SeqCst), 0);
    for p in objs {
        // SAFETY: allocated from this cache, freed once (through another node's handle).
        unsafe { h1.free(p) };
    }
    h0.flush();
    h1.flush();
    let r = cache.shrink();
    assert!(r.slabs_released > 0);
    assert_eq!(
        backend.live_total(),
        0,
        "every object went home and every slab was freed"
    );
    let s = cache.stats();
    assert_eq!(s.invalid_frees, 0);
    assert_eq!(s.objects_out_of_slabs, 0);
    cache.validate().unwrap();
}

#[test]
fn many_threads_never_get_the_same_object_twice() {
    use std::sync::atomic::AtomicU64;
    const THREADS: usize = 4;
    const ROUNDS: usize = if cfg!(miri) { 40 } else { 2000 };
    let backend = counting();
    // Each object carries an owner tag: 0 while free (the constructor sets it), the owner's
    // id while allocated. Swapping it on every alloc and free catches any double hand-out.
    let cache = SlabCacheBuilder::new("mt", 48, 8)
        .nodes(2)
        .magazine_size(16)
        .depot_limits(4, 4)
        .backend(backend.clone())
        .constructor(|p| {
            // SAFETY: 48 writable bytes aligned to 8: room for an AtomicU64.
            unsafe { p.cast::<AtomicU64>().as_ptr().write(AtomicU64::new(0)) }
        })
        .build()
        .unwrap();
    let tag = |p: NonNull<u8>| -> &AtomicU64 {
        // SAFETY: every object was constructed with an AtomicU64 at offset 0, which stays
        // valid while the cache lives (the cache outlives this test's threads).
        unsafe { &*p.cast::<AtomicU64>().as_ptr() }
    };
    struct Obj(NonNull<u8>);
    // SAFETY: the test passes ownership of a free-to-use object to the receiving thread.
    unsafe impl Send for Obj {}

    let (senders, receivers): (Vec<_>, Vec<_>) =
        (0..THREADS).map(|_| mpsc::channel::<Obj>()).unzip();
    let held: Vec<Vec<usize>> = std::thread::scope(|s| {
        let mut joins = Vec::new();
        for (t, rx) in receivers.into_iter().enumerate() {
            let cache = Arc::clone(&cache);
            let next = senders[(t + 1) % THREADS].clone();
            joins.push(s.spawn(move || {
                let me = t as u64 + 1;
                let mut h = cache.handle(NodeId((t % 2) as u16)).unwrap();
                let mut mine: Vec<NonNull<u8>> = Vec::new();
                let mut seed = 0x9E37_79B9u64 * me;
                for round in 0..ROUNDS {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let n = (seed % 24) as usize;
                    for _ in 0..n {
                        let p = h.alloc().unwrap();
                        assert_eq!(tag(p).swap(me, Ordering::SeqCst), 0, "handed out twice");
                        mine.push(p);
                    }
                    let keep = (seed >> 8) as usize % 16;
                    while mine.len() > keep {
                        let Some(p) = mine.pop() else { break };
                        if round % 3 == 0 {
                            // Give it to the next thread, which frees it on its own handle.
                            assert_eq!(tag(p).swap(0, Ordering::SeqCst), me);
                            next.send(Obj(p)).unwrap();
                        } else {
                            assert_eq!(tag(p).swap(0, Ordering::SeqCst), me);
                            // SAFETY: ours, freed once.
                            unsafe { h.free(p) };
                        }
                    }
                    while let Ok(Obj(p)) = rx.try_recv() {
                        // SAFETY: handed to us by another thread; its tag is 0 and nobody
                        // else uses it.
                        unsafe { h.free(p) };
                    }
                }
                drop(next);
                for p in &mine {
                    assert_eq!(tag(*p).load(Ordering::SeqCst), me);
                }
                let addrs = mine.iter().map(|p| p.as_ptr() as usize).collect::<Vec<_>>();
                // Free the rest after everyone stopped sending to us.
                let mine: Vec<Obj> = mine.into_iter().map(Obj).collect();
                (addrs, mine, h, rx)
            }));
        }
        drop(senders);
        let results: Vec<_> = joins.into_iter().map(|j| j.join().unwrap()).collect();
        let mut all = HashSet::new();
        let mut held = Vec::new();
        for (addrs, _, _, _) in &results {
            for a in addrs {
                assert!(all.insert(*a), "address {a:#x} held by two threads");
            }
            held.push(addrs.clone());
        }
        for (_, mine, mut h, rx) in results {
            for Obj(p) in mine {
                // SAFETY: still ours, freed once.
                unsafe { h.free(p) };
            }
            while let Ok(Obj(p)) = rx.try_recv() {
                // SAFETY: sent to this thread, not freed yet.
                unsafe { h.free(p) };
            }
        }
        held
    });
    assert!(held.iter().map(Vec::len).sum::<usize>() <= THREADS * 16);
    let s = cache.stats();
    assert_eq!(s.live_handles, 0);
    assert_eq!(s.allocs, s.frees, "every object came back");
    assert_eq!(s.allocs, s.alloc_hits + s.alloc_misses);
    assert_eq!(s.frees, s.free_hits + s.free_misses);
    assert_eq!(s.objects_out_of_slabs, s.depot_cached_objects);
    assert_eq!(s.invalid_frees, 0);
    assert!(s.alloc_hits > s.alloc_misses, "most operations hit: {s:?}");
    assert_eq!(
        s.slabs_allocated - s.slabs_freed,
        s.slabs_partial + s.slabs_full + s.slabs_free
    );
    cache.validate().unwrap();
    let json = serde_json::to_string(&s).unwrap();
    let back: SlabStats = serde_json::from_str(&json).unwrap();
    assert_eq!(back, s);
    assert!(s.hit_rate() > 0.5);
    cache.shrink();
    assert_eq!(backend.live_total(), 0);
}

#[test]
fn owned_boxes_travel_between_threads() {
    let backend = counting();
    let slab =
        TypedSlab::<(u64, String)>::with_config("owned", |b| b.nodes(2).backend(backend.clone()))
            .unwrap();
    let boxes: Vec<OwnedSlabBox<(u64, String)>> = (0..100)
        .map(|i| {
            slab.alloc_owned(NodeId((i % 2) as u16), (i, format!("block{i}")))
                .unwrap()
        })
        .collect();
    assert!(matches!(
        slab.alloc_owned(NodeId(2), (0, String::new())),
        Err(SlabError::NoSuchNode { .. })
    ));
    assert_eq!(backend.live[0].load(Ordering::SeqCst), 1);
    assert_eq!(backend.live[1].load(Ordering::SeqCst), 1);
    let sum = std::thread::spawn(move || {
        let mut sum = 0;
        for mut b in boxes {
            b.0 += 1;
            assert_eq!(b.1, format!("block{}", b.0 - 1));
            sum += if b.0 % 10 == 0 {
                OwnedSlabBox::into_inner(b).0
            } else {
                b.0
            };
        }
        sum
    })
    .join()
    .unwrap();
    assert_eq!(sum, (1..=100).sum::<u64>());
    let s = slab.stats();
    assert_eq!(s.allocs, 100);
    assert_eq!(s.frees, 100);
    assert_eq!(s.alloc_misses, 100);
    assert_eq!(s.objects_out_of_slabs, 0);
    slab.cache().validate().unwrap();
    assert_eq!(slab.cache().shrink().slabs_released, 2);
    assert_eq!(backend.live_total(), 0);
}

#[test]
fn a_panicking_constructor_leaves_the_handle_usable() {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = Arc::clone(&calls);
    let cache = SlabCacheBuilder::new("panicky", 16, 8)
        .magazine_size(4)
        .constructor(move |p| {
            if c2.fetch_add(1, Ordering::SeqCst) == 1 {
                panic!("constructor failed");
            }
            // SAFETY: 16 writable bytes aligned to 8.
            unsafe { p.cast::<u64>().as_ptr().write(42) };
        })
        .build()
        .unwrap();
    let mut h = cache.handle(n0()).unwrap();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| h.alloc()));
    assert!(r.is_err());
    // The next refill constructs the objects the failed one carved.
    let objs: Vec<_> = (0..8).map(|_| h.alloc().unwrap()).collect();
    for p in &objs {
        // SAFETY: ours, 16 bytes.
        assert_eq!(unsafe { p.cast::<u64>().as_ptr().read() }, 42);
    }
    let distinct: HashSet<_> = objs.iter().collect();
    assert_eq!(distinct.len(), 8);
    for p in objs {
        // SAFETY: allocated above, freed once.
        unsafe { h.free(p) };
    }
    assert!(h.cached() <= 8);
    cache.validate().unwrap();
}

#[test]
fn caches_are_shrinkers() {
    let a = SlabCacheBuilder::new("a", 32, 8).build().unwrap();
    let b = TypedSlab::<[u8; 100]>::new("b").unwrap();
    {
        let mut h = a.handle(n0()).unwrap();
        let p = h.alloc().unwrap();
        // SAFETY: allocated above, freed once.
        unsafe { h.free(p) };
        let th = b.handle(n0()).unwrap();
        drop(th.alloc([1; 100]).unwrap());
    }
    let shrinkers: Vec<Arc<dyn Shrinker>> = vec![a.clone(), b.cache().clone()];
    let want: u64 = shrinkers.iter().map(|s| s.reclaimable_bytes()).sum();
    assert!(want > 0);
    let got: u64 = shrinkers.iter().map(|s| s.shrink().bytes_released).sum();
    assert!(got >= want, "{got} < {want}");
    assert_eq!(shrinkers[1].shrinker_name(), "b");
    assert_eq!(a.stats().slab_bytes + b.stats().slab_bytes, 0);
}

#[test]
fn thread_safety_of_the_public_types() {
    fn send<T: Send>() {}
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SlabCache>();
    send_sync::<TypedSlab<std::cell::Cell<u8>>>();
    send_sync::<OwnedSlabBox<u64>>();
    send::<SlabHandle>();
    send::<TypedHandle<u64>>();
    send::<SlabCacheBuilder>();
}
