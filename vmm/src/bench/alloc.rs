//! `tidepool bench alloc`: the guest-mm allocator against a baseline measured in the same run.
//!
//! Figures (names from the allocator issue):
//! - `order0_pair_ns`, `order9_pair_ns`: one alloc plus free through the per-CPU cache, the
//!   path guest memory takes in the VMM;
//! - `zone_order0_pair_ns`, `zone_order9_pair_ns`: the same straight on the zone (buddy split
//!   and merge, no cache), for honesty about where the speed comes from;
//! - `baseline_order0_pair_ns`, `baseline_order9_pair_ns`: `buddy_system_allocator`'s
//!   `FrameAllocator` on a pool of the same size, and the speedups against it;
//! - `frag_free_2m_fraction` (and `_plain`, migration types off): after the churn trace of
//!   [`super::trace`], before any compaction, the share of free memory in free 2 MiB blocks;
//! - `thp_success_rate`, `compaction_moved_frames_per_thp`: order-9 requests after the churn,
//!   with compaction allowed, until free memory runs out;
//! - `slab_pair_ns`, `baseline_box_pair_ns`: a slab object alloc plus free against `Box`.

use super::trace::{churn, ChurnTarget};
use super::{progress, BenchError, BenchOptions, Report};
use buddy_system_allocator::FrameAllocator;
use guest_mm::compaction::{MoveError, Mover};
use guest_mm::pcp::CpuCache;
use guest_mm::slab::TypedSlab;
use guest_mm::thp::{alloc_thp, ThpOutcome};
use guest_mm::zone::Zone;
use guest_mm::{FrameId, MigrateType, NodeId, THP_ORDER};
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Instant;

/// Repetitions of each timed loop; the best (least disturbed) is reported.
const REPS: usize = 5;

fn best_ns_per_iter(iters: u64, mut f: impl FnMut(u64)) -> f64 {
    let mut best = f64::INFINITY;
    for _ in 0..REPS {
        let t = Instant::now();
        f(iters);
        let ns = t.elapsed().as_nanos() as f64 / iters as f64;
        best = best.min(ns);
    }
    best
}

fn failed(reason: impl ToString) -> BenchError {
    BenchError::Failed {
        suite: "alloc",
        reason: reason.to_string(),
    }
}

/// Alloc+free pairs through a per-CPU cache.
fn cache_pair_ns(frames: u64, order: u8, iters: u64) -> Result<f64, BenchError> {
    let zone = Mutex::new(Zone::try_new(NodeId(0), FrameId(0), frames).map_err(failed)?);
    let mut cache = CpuCache::new(&zone);
    // Warm the cache once so the loop measures the steady state.
    let f = cache.alloc(order, MigrateType::Movable).map_err(failed)?;
    cache.free(f, order, MigrateType::Movable).map_err(failed)?;
    let mut err = None;
    let ns = best_ns_per_iter(iters, |n| {
        for _ in 0..n {
            match cache.alloc(black_box(order), MigrateType::Movable) {
                Ok(f) => {
                    if let Err(e) = cache.free(black_box(f), order, MigrateType::Movable) {
                        err = Some(e.to_string());
                    }
                }
                Err(e) => err = Some(e.to_string()),
            }
        }
    });
    cache.drain().map_err(failed)?;
    match err {
        Some(e) => Err(failed(e)),
        None => Ok(ns),
    }
}

/// Alloc+free pairs straight on the zone.
fn zone_pair_ns(frames: u64, order: u8, iters: u64) -> Result<f64, BenchError> {
    let mut zone = Zone::try_new(NodeId(0), FrameId(0), frames).map_err(failed)?;
    let mut err = None;
    let ns = best_ns_per_iter(iters, |n| {
        for _ in 0..n {
            match zone.alloc(black_box(order), MigrateType::Movable) {
                Ok(f) => {
                    if let Err(e) = zone.free(black_box(f), order) {
                        err = Some(e.to_string());
                    }
                }
                Err(e) => err = Some(e.to_string()),
            }
        }
    });
    match err {
        Some(e) => Err(failed(e)),
        None => Ok(ns),
    }
}

/// Alloc+free pairs with `buddy_system_allocator::FrameAllocator` (the baseline).
fn baseline_pair_ns(frames: u64, order: u8, iters: u64) -> Result<f64, BenchError> {
    let mut fa = FrameAllocator::<32>::new();
    // Start the range at a multiple of its size so that the baseline, like the zone, begins
    // with one maximal free block (`add_frame(0, n)` would pre-split it into small blocks).
    let base = frames as usize;
    fa.add_frame(base, base + frames as usize);
    let count = 1usize << order;
    let mut err = false;
    let ns = best_ns_per_iter(iters, |n| {
        for _ in 0..n {
            match fa.alloc(black_box(count)) {
                Some(f) => fa.dealloc(black_box(f), count),
                None => err = true,
            }
        }
    });
    if err {
        return Err(failed("baseline allocator ran out of frames"));
    }
    Ok(ns)
}

impl ChurnTarget for Zone {
    fn alloc(&mut self, order: u8, mt: MigrateType) -> Option<u64> {
        Zone::alloc(self, order, mt).ok().map(|f| f.0)
    }
    fn free(&mut self, frame: u64, order: u8) {
        // The trace only frees what it allocated, so an error here is an allocator bug.
        if let Err(e) = Zone::free(self, FrameId(frame), order) {
            panic!("churn free of {frame:#x} order {order} failed: {e}");
        }
    }
}

/// Share of free memory sitting in free blocks of at least 2 MiB.
fn free_2m_fraction(zone: &Zone) -> f64 {
    let free = zone.free_frames();
    if free == 0 {
        return 0.0;
    }
    let huge: u64 = (THP_ORDER..=guest_mm::MAX_ORDER)
        .map(|o| zone.free_blocks(o) << o)
        .sum();
    huge as f64 / free as f64
}

/// A mover for the benchmark: the pool here backs no memory, so a move is the allocator's
/// bookkeeping only; it counts frames moved.
#[derive(Debug, Default)]
struct CountingMover {
    frames: u64,
}

impl Mover for CountingMover {
    fn move_block(&mut self, _from: FrameId, _to: FrameId, order: u8) -> Result<(), MoveError> {
        self.frames += 1 << order;
        Ok(())
    }
}

struct ChurnFigures {
    free_2m_fraction: f64,
    thp_success_rate: f64,
    moved_per_thp: f64,
    thp_by_path: [u64; 4],
}

fn churn_run(frames: u64, grouping: bool, turnover: f64) -> Result<ChurnFigures, BenchError> {
    let mut zone = Zone::try_new(NodeId(0), FrameId(0), frames).map_err(failed)?;
    zone.set_mobility_grouping(grouping);
    churn(&mut zone, frames, 0.85, turnover, 0x7469_6465);
    zone.validate().map_err(failed)?;
    let free_2m_fraction = free_2m_fraction(&zone);

    let free_at_start = zone.free_frames();
    let possible = free_at_start >> THP_ORDER;
    let mut mover = CountingMover::default();
    let mut ok = 0u64;
    let mut by_path = [0u64; 4];
    loop {
        match alloc_thp(
            &mut zone,
            MigrateType::Movable,
            Some(&mut mover as &mut dyn Mover),
        ) {
            Ok(ThpOutcome::Fallback4k(frames)) => {
                // A 4 KiB fallback is not a THP success; give the frames back and stop.
                for f in frames {
                    zone.free(f, 0).map_err(failed)?;
                }
                by_path[3] += 1;
                break;
            }
            Ok(outcome) => {
                ok += 1;
                by_path[match outcome {
                    ThpOutcome::Direct(_) => 0,
                    ThpOutcome::Stolen(_) => 1,
                    _ => 2,
                }] += 1;
            }
            Err(_) => break,
        }
    }
    zone.validate().map_err(failed)?;
    Ok(ChurnFigures {
        free_2m_fraction,
        thp_success_rate: if possible == 0 {
            1.0
        } else {
            ok as f64 / possible as f64
        },
        moved_per_thp: if ok == 0 {
            0.0
        } else {
            mover.frames as f64 / ok as f64
        },
        thp_by_path: by_path,
    })
}

#[derive(Clone, Copy)]
struct Meta {
    _gpa: u64,
    _len: u64,
    _node: u16,
    _flags: u16,
    _owner: u32,
}

fn slab_pair_ns(iters: u64) -> Result<f64, BenchError> {
    let slab = TypedSlab::<Meta>::new("bench-meta").map_err(failed)?;
    let h = slab.handle(NodeId(0)).map_err(failed)?;
    let meta = Meta {
        _gpa: 1,
        _len: 2,
        _node: 0,
        _flags: 0,
        _owner: 3,
    };
    let mut err = None;
    let ns = best_ns_per_iter(iters, |n| {
        for _ in 0..n {
            match h.alloc(black_box(meta)) {
                Ok(b) => drop(black_box(b)),
                Err(e) => err = Some(e.to_string()),
            }
        }
    });
    match err {
        Some(e) => Err(failed(e)),
        None => Ok(ns),
    }
}

fn box_pair_ns(iters: u64) -> f64 {
    let meta = Meta {
        _gpa: 1,
        _len: 2,
        _node: 0,
        _flags: 0,
        _owner: 3,
    };
    best_ns_per_iter(iters, |n| {
        for _ in 0..n {
            drop(black_box(Box::new(black_box(meta))));
        }
    })
}

/// Run the suite.
pub fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    let pool_bytes: u64 = if opts.quick { 1 << 30 } else { 4 << 30 };
    let frames = pool_bytes / guest_mm::FRAME_SIZE;
    let iters: u64 = if opts.quick { 1_000_000 } else { 5_000_000 };
    let base_iters = iters / 20;
    let turnover = 10.0;
    let mut r = Report::default();
    r.add(
        "pool_gib",
        pool_bytes as f64 / (1u64 << 30) as f64,
        "GiB pool",
    );

    progress("order-0 and order-9 pairs (per-CPU cache, zone, baseline)");
    let o0 = cache_pair_ns(frames, 0, iters)?;
    let o9 = cache_pair_ns(frames, 9, iters)?;
    let z0 = zone_pair_ns(frames, 0, iters / 4)?;
    let z9 = zone_pair_ns(frames, 9, iters / 4)?;
    let b0 = baseline_pair_ns(frames, 0, base_iters)?;
    let b9 = baseline_pair_ns(frames, 9, base_iters)?;
    r.add(
        "order0_pair_ns",
        o0,
        "ns, alloc+free order 0 via per-CPU cache (target <= 25)",
    );
    r.add(
        "order9_pair_ns",
        o9,
        "ns, alloc+free order 9 via per-CPU cache (target <= 40)",
    );
    r.add(
        "zone_order0_pair_ns",
        z0,
        "ns, order 0 straight on the buddy zone",
    );
    r.add(
        "zone_order9_pair_ns",
        z9,
        "ns, order 9 straight on the buddy zone",
    );
    r.add(
        "baseline_order0_pair_ns",
        b0,
        "ns, buddy_system_allocator FrameAllocator",
    );
    r.add(
        "baseline_order9_pair_ns",
        b9,
        "ns, buddy_system_allocator FrameAllocator",
    );
    r.add("order0_speedup", b0 / o0, "x vs baseline (target >= 3)");
    r.add("order9_speedup", b9 / o9, "x vs baseline (target >= 3)");

    progress("churn trace with migration types (85% occupancy, 10x turnover)");
    let grouped = churn_run(frames, true, turnover)?;
    progress("churn trace with migration types off");
    let plain = churn_run(frames, false, turnover)?;
    r.add(
        "frag_free_2m_fraction",
        grouped.free_2m_fraction,
        "free memory in free 2 MiB blocks, before compaction (target >= 0.90)",
    );
    r.add(
        "frag_free_2m_fraction_plain",
        plain.free_2m_fraction,
        "the same with migration types off",
    );
    r.add(
        "thp_success_rate",
        grouped.thp_success_rate,
        "order-9 successes / (free at start / 2 MiB), compaction allowed (target >= 0.99)",
    );
    r.add(
        "compaction_moved_frames_per_thp",
        grouped.moved_per_thp,
        "frames moved by compaction per order-9 success",
    );
    r.add(
        "thp_direct",
        grouped.thp_by_path[0] as f64,
        "order-9 successes from a free 2 MiB block",
    );
    r.add(
        "thp_stolen",
        grouped.thp_by_path[1] as f64,
        "order-9 successes by stealing",
    );
    r.add(
        "thp_compacted",
        grouped.thp_by_path[2] as f64,
        "order-9 successes after compaction",
    );
    r.add(
        "thp_success_rate_plain",
        plain.thp_success_rate,
        "thp_success_rate with migration types off",
    );

    progress("slab pairs against Box");
    let s = slab_pair_ns(iters)?;
    let b = box_pair_ns(iters);
    r.add(
        "slab_pair_ns",
        s,
        "ns, slab alloc+free via the thread magazine",
    );
    r.add(
        "baseline_box_pair_ns",
        b,
        "ns, Box::new + drop of the same object",
    );
    Ok(r)
}
