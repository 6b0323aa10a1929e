//! Property tests of the zone and the per-thread cache: random operation sequences checked
//! against a shadow model after every step.

use guest_mm::frame::{frames_in, PAGEBLOCK_FRAMES};
use guest_mm::{CpuCache, FrameId, MigrateType, NodeId, Zone, ZoneError};
use proptest::prelude::*;
use std::sync::{Mutex, MutexGuard};

#[derive(Debug, Clone)]
enum Op {
    Alloc { order: u8, mt: usize },
    Free { pick: usize },
    AllocAt { off: u64, order: u8, mt: usize },
    Isolate { pb: u64, n: u64 },
    Unisolate { pick: usize, mt: usize },
    Split { pick: usize, by: u8 },
    PcpAlloc { huge: bool, mt: usize },
    Drain,
    Grouping(bool),
}

fn op() -> impl Strategy<Value = Op> {
    let order = prop_oneof![4 => 0u8..=2, 2 => 3u8..=9, 1 => 10u8..=12];
    prop_oneof![
        8 => (order.clone(), 0usize..3).prop_map(|(order, mt)| Op::Alloc { order, mt }),
        7 => any::<usize>().prop_map(|pick| Op::Free { pick }),
        2 => (0u64..6000, order, 0usize..3).prop_map(|(off, order, mt)| Op::AllocAt { off, order, mt }),
        1 => (0u64..12, 1u64..4).prop_map(|(pb, n)| Op::Isolate { pb, n }),
        1 => (any::<usize>(), 0usize..3).prop_map(|(pick, mt)| Op::Unisolate { pick, mt }),
        1 => (any::<usize>(), 1u8..=4).prop_map(|(pick, by)| Op::Split { pick, by }),
        6 => (prop::bool::weighted(0.2), 0usize..3).prop_map(|(huge, mt)| Op::PcpAlloc { huge, mt }),
        1 => Just(Op::Drain),
        1 => any::<bool>().prop_map(Op::Grouping),
    ]
}

/// One live allocation in the shadow model.
#[derive(Debug, Clone, Copy)]
struct Live {
    frame: FrameId,
    order: u8,
    mt: MigrateType,
    via_cache: bool,
}

struct Model {
    base: u64,
    nr: u64,
    owned: Vec<bool>,
    live: Vec<Live>,
    isolated: Vec<(FrameId, u64)>,
}

impl Model {
    fn take(&mut self, l: Live, z: &Zone) -> Result<(), TestCaseError> {
        for i in 0..frames_in(l.order) {
            let f = l.frame.add(i);
            prop_assert!(z.contains(f), "{f:?} outside the zone");
            let k = (f.0 - self.base) as usize;
            prop_assert!(!self.owned[k], "frame {f:?} handed out twice");
            prop_assert_ne!(
                z.pageblock_type(f),
                MigrateType::Isolate,
                "isolated {:?} handed out",
                f
            );
            self.owned[k] = true;
        }
        self.live.push(l);
        Ok(())
    }

    fn release(&mut self, i: usize) -> Live {
        let l = self.live.swap_remove(i);
        for j in 0..frames_in(l.order) {
            self.owned[(l.frame.0 + j - self.base) as usize] = false;
        }
        l
    }
}

fn lock(z: &Mutex<Zone>) -> MutexGuard<'_, Zone> {
    z.lock().unwrap()
}

fn check(zm: &Mutex<Zone>, cache: &CpuCache<'_>, m: &Model) -> Result<(), TestCaseError> {
    let z = lock(zm);
    if let Err(e) = z.validate() {
        return Err(TestCaseError::fail(format!("validate: {e}")));
    }
    let s = z.stats();
    prop_assert_eq!(s.free + s.allocated + s.cached, s.total);
    for mt in MigrateType::ALL {
        let t = mt.index();
        let shadow: u64 = m
            .live
            .iter()
            .filter(|l| l.mt == mt)
            .map(|l| frames_in(l.order))
            .sum();
        prop_assert_eq!(
            s.allocated_per_type[t] + s.cached_per_type[t],
            shadow + cache.cached_frames_of(mt),
            "type {}",
            mt
        );
    }
    let pbs: u64 = s.pageblocks_per_type.iter().sum();
    let first = m.base / PAGEBLOCK_FRAMES;
    let last = (m.base + m.nr - 1) / PAGEBLOCK_FRAMES;
    prop_assert_eq!(pbs, last - first + 1);
    Ok(())
}

fn run(base: u64, nr: u64, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let zm = Mutex::new(Zone::new(NodeId(0), FrameId(base), nr));
    let mut cache = CpuCache::new(&zm);
    let mut m = Model {
        base,
        nr,
        owned: vec![false; nr as usize],
        live: Vec::new(),
        isolated: Vec::new(),
    };
    let types = MigrateType::ALLOCATABLE;
    for op in ops {
        match op {
            Op::Alloc { order, mt } => {
                let r = lock(&zm).alloc(order, types[mt]);
                if let Ok(frame) = r {
                    let z = lock(&zm);
                    m.take(
                        Live {
                            frame,
                            order,
                            mt: types[mt],
                            via_cache: false,
                        },
                        &z,
                    )?;
                }
            }
            Op::Free { pick } if !m.live.is_empty() => {
                let l = m.release(pick % m.live.len());
                if l.via_cache {
                    cache
                        .free(l.frame, l.order, l.mt)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                } else {
                    lock(&zm)
                        .free(l.frame, l.order)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    // A second free of the same block is always refused.
                    prop_assert!(lock(&zm).free(l.frame, l.order).is_err());
                }
            }
            Op::Free { .. } => {}
            Op::AllocAt { off, order, mt } => {
                let f = FrameId((base + off % nr) & !(frames_in(order) - 1));
                let expect_ok = cache.cached_frames() == 0
                    && f.0 >= base
                    && f.0 + frames_in(order) <= base + nr
                    && (0..frames_in(order)).all(|i| {
                        let g = f.add(i);
                        !m.owned[(g.0 - base) as usize]
                            && lock(&zm).pageblock_type(g) != MigrateType::Isolate
                    });
                let r = lock(&zm).alloc_at(f, order, types[mt]);
                if expect_ok {
                    prop_assert!(r.is_ok(), "alloc_at({f:?}, {order}) = {r:?}");
                }
                if r.is_ok() {
                    let z = lock(&zm);
                    m.take(
                        Live {
                            frame: f,
                            order,
                            mt: types[mt],
                            via_cache: false,
                        },
                        &z,
                    )?;
                }
            }
            Op::Isolate { pb, n } => {
                let first = base / PAGEBLOCK_FRAMES + pb;
                let start = (first * PAGEBLOCK_FRAMES).max(base);
                let end = ((first + n) * PAGEBLOCK_FRAMES).min(base + nr);
                if start < end {
                    match lock(&zm).isolate_range(FrameId(start), end - start) {
                        Ok(()) => m.isolated.push((FrameId(start), end - start)),
                        Err(ZoneError::AlreadyIsolated(_)) | Err(ZoneError::Straddling(_)) => {}
                        Err(e) => return Err(TestCaseError::fail(format!("isolate: {e}"))),
                    }
                }
            }
            Op::Unisolate { pick, mt } if !m.isolated.is_empty() => {
                let (s, c) = m.isolated.swap_remove(pick % m.isolated.len());
                lock(&zm)
                    .unisolate_range(s, c, types[mt])
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Op::Unisolate { .. } => {}
            Op::Split { pick, by } if !m.live.is_empty() => {
                let i = pick % m.live.len();
                let l = m.live[i];
                if !l.via_cache && l.order >= by {
                    let to = l.order - by;
                    lock(&zm)
                        .split_allocated(l.frame, l.order, to)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    m.live.swap_remove(i);
                    for j in 0..(1u64 << by) {
                        m.live.push(Live {
                            frame: l.frame.add(j << to),
                            order: to,
                            ..l
                        });
                    }
                }
            }
            Op::Split { .. } => {}
            Op::PcpAlloc { huge, mt } => {
                let order = if huge { 9 } else { 0 };
                if let Ok(frame) = cache.alloc(order, types[mt]) {
                    let z = lock(&zm);
                    prop_assert_eq!(z.allocation_at(frame), Some((frame, order, types[mt])));
                    m.take(
                        Live {
                            frame,
                            order,
                            mt: types[mt],
                            via_cache: true,
                        },
                        &z,
                    )?;
                }
            }
            Op::Drain => {
                cache
                    .drain()
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(cache.cached_frames(), 0);
                prop_assert_eq!(lock(&zm).stats().cached, 0);
            }
            Op::Grouping(on) => lock(&zm).set_mobility_grouping(on),
        }
        check(&zm, &cache, &m)?;
    }
    // Give everything back: the zone must coalesce into the same maximal blocks as new.
    while !m.live.is_empty() {
        let l = m.release(0);
        if l.via_cache {
            cache
                .free(l.frame, l.order, l.mt)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        } else {
            lock(&zm)
                .free(l.frame, l.order)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
    }
    cache
        .drain()
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    for (s, c) in m.isolated.drain(..) {
        lock(&zm)
            .unisolate_range(s, c, MigrateType::Movable)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    check(&zm, &cache, &m)?;
    drop(cache);
    let z = zm.into_inner().unwrap();
    let fresh = Zone::new(NodeId(0), FrameId(base), nr);
    let s = z.stats();
    prop_assert_eq!(s.free, nr);
    prop_assert_eq!(s.free_blocks_per_order, fresh.stats().free_blocks_per_order);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn zone_and_cache_keep_their_invariants(
        base_pb in 0u64..4,
        base_off in prop_oneof![Just(0u64), 1u64..600],
        extra in prop_oneof![Just(0u64), 1u64..1500],
        ops in prop::collection::vec(op(), 1..150),
    ) {
        let base = base_pb * 4096 + base_off;
        run(base, 4096 + extra, ops)?;
    }
}

#[test]
fn cache_refills_flushes_and_drains() {
    let zm = Mutex::new(Zone::new(NodeId(0), FrameId(0), 8192));
    let mut c = CpuCache::new(&zm);
    let a = c.alloc(0, MigrateType::Movable).unwrap();
    assert_eq!(c.cached_frames(), 30);
    assert_eq!(c.stats().refills, 1);
    let s = lock(&zm).stats();
    assert_eq!((s.allocated, s.cached), (1, 30));
    let h = c.alloc(9, MigrateType::Unmovable).unwrap();
    assert!(h.is_aligned(9));
    assert_eq!(c.cached_frames(), 30 + 3 * 512);
    let mut got = vec![a];
    for _ in 0..200 {
        got.push(c.alloc(0, MigrateType::Movable).unwrap());
    }
    for f in got {
        c.free(f, 0, MigrateType::Movable).unwrap();
    }
    assert!(c.stats().flushes >= 1);
    assert!(c.cached_frames_of(MigrateType::Movable) <= 6 * 31);
    c.free(h, 9, MigrateType::Unmovable).unwrap();
    c.drain().unwrap();
    let z = lock(&zm);
    z.validate().unwrap();
    let s = z.stats();
    assert_eq!((s.free, s.allocated, s.cached), (8192, 0, 0));
}

#[test]
fn cache_reports_a_double_free_when_it_flushes() {
    let zm = Mutex::new(Zone::new(NodeId(0), FrameId(0), 4096));
    let mut c = CpuCache::new(&zm);
    let f = c.alloc(0, MigrateType::Reclaimable).unwrap();
    c.free(f, 0, MigrateType::Reclaimable).unwrap();
    c.free(f, 0, MigrateType::Reclaimable).unwrap();
    assert!(c.drain().is_err());
    assert_eq!(
        c.free(FrameId(9999), 0, MigrateType::Movable)
            .unwrap_err()
            .to_string(),
        "frame 0x270f is outside the zone"
    );
    assert!(c.alloc(0, MigrateType::Isolate).is_err());
    let z = lock(&zm);
    z.validate().unwrap();
    assert_eq!(z.stats().free, 4096);
}

#[test]
fn cache_gives_back_frames_that_become_isolated() {
    let zm = Mutex::new(Zone::new(NodeId(0), FrameId(0), 1024));
    let mut c = CpuCache::new(&zm);
    let f = c.alloc(0, MigrateType::Movable).unwrap();
    assert_eq!(f.pageblock_start(), FrameId(0));
    lock(&zm).isolate_range(FrameId(0), 512).unwrap();
    // The 30 cached frames of pageblock 0 go back; the next frame comes from pageblock 1.
    let g = c.alloc(0, MigrateType::Movable).unwrap();
    assert_eq!(g.pageblock_start(), FrameId(512));
    let z = lock(&zm);
    assert_eq!(z.stats().isolated_free, 511);
    z.validate().unwrap();
}

#[test]
fn caches_on_two_threads_share_one_zone() {
    let zm = Mutex::new(Zone::new(NodeId(0), FrameId(0), 1 << 14));
    std::thread::scope(|s| {
        for seed in 0..2u64 {
            let zm = &zm;
            s.spawn(move || {
                let mut c = CpuCache::new(zm);
                let mut held: Vec<(FrameId, u8, MigrateType)> = Vec::new();
                let mut x = seed * 7919 + 1;
                for _ in 0..20_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let mt = MigrateType::ALLOCATABLE[(x % 3) as usize];
                    let order = if x % 16 == 0 { 9 } else { 0 };
                    if x % 5 < 3 || held.is_empty() {
                        if let Ok(f) = c.alloc(order, mt) {
                            held.push((f, order, mt));
                        }
                    } else {
                        let (f, o, t) = held.swap_remove((x as usize / 5) % held.len());
                        c.free(f, o, t).unwrap();
                    }
                }
                for (f, o, t) in held {
                    c.free(f, o, t).unwrap();
                }
                c.drain().unwrap();
            });
        }
    });
    let z = zm.into_inner().unwrap();
    z.validate().unwrap();
    let s = z.stats();
    assert_eq!((s.free, s.allocated, s.cached), (1 << 14, 0, 0));
    assert_eq!(s.free_blocks_per_order[14], 1);
}
