//! The churn trace used by `tidepool bench alloc`: a deterministic mix of allocation requests
//! that keeps a pool at a target occupancy while turning it over several times.
//!
//! The mix follows the issue: 70% movable, 20% reclaimable and 10% unmovable requests, of mixed
//! orders but mostly order 0. Victims are chosen uniformly at random among live allocations, so
//! lifetimes are random (the hard case for placement).

use guest_mm::MigrateType;

/// A tiny deterministic PRNG (xorshift64*), so that every run replays the same trace.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a non-zero seed.
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() >> 32) * n) >> 32
    }
}

/// Anything the churn trace can drive.
pub trait ChurnTarget {
    /// Allocate a block; `None` when the request cannot be met.
    fn alloc(&mut self, order: u8, mt: MigrateType) -> Option<u64>;
    /// Free a block returned by `alloc`.
    fn free(&mut self, frame: u64, order: u8);
}

/// One live allocation of the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Live {
    /// First frame.
    pub frame: u64,
    /// Order.
    pub order: u8,
    /// Migration type requested.
    pub mt: MigrateType,
}

/// What a churn run did.
#[derive(Debug, Default, Clone)]
pub struct ChurnResult {
    /// Requests issued.
    pub requests: u64,
    /// Requests that failed.
    pub failures: u64,
    /// Frames allocated over the run.
    pub frames_allocated: u64,
    /// Allocations still live at the end.
    pub live: Vec<Live>,
}

/// Draw a request: (order, migration type).
pub fn draw_request(rng: &mut Rng) -> (u8, MigrateType) {
    let mt = match rng.below(100) {
        0..=69 => MigrateType::Movable,
        70..=89 => MigrateType::Reclaimable,
        _ => MigrateType::Unmovable,
    };
    // Mostly order 0: 85% order 0, 7% order 1-2, 4% order 3, 3% order 4-6, 1% order 9.
    let order = match rng.below(100) {
        0..=84 => 0,
        85..=91 => 1 + rng.below(2) as u8,
        92..=95 => 3,
        96..=98 => 4 + rng.below(3) as u8,
        _ => 9,
    };
    (order, mt)
}

/// Run the churn: fill to `occupancy` of `total_frames`, then free a random live allocation and
/// allocate a new one until `turnover` times the pool has been allocated.
pub fn churn<T: ChurnTarget>(
    target: &mut T,
    total_frames: u64,
    occupancy: f64,
    turnover: f64,
    seed: u64,
) -> ChurnResult {
    let mut rng = Rng::new(seed);
    let mut res = ChurnResult::default();
    let goal = (total_frames as f64 * occupancy) as u64;
    let budget = (total_frames as f64 * turnover) as u64;
    let mut in_use = 0u64;
    while res.frames_allocated < budget {
        if in_use >= goal && !res.live.is_empty() {
            let i = rng.below(res.live.len() as u64) as usize;
            let v = res.live.swap_remove(i);
            target.free(v.frame, v.order);
            in_use -= 1 << v.order;
            continue;
        }
        let (order, mt) = draw_request(&mut rng);
        res.requests += 1;
        match target.alloc(order, mt) {
            Some(frame) => {
                res.live.push(Live { frame, order, mt });
                in_use += 1 << order;
                res.frames_allocated += 1 << order;
            }
            None => {
                res.failures += 1;
                // Make room: a failed request frees a random victim, like reclaim would.
                if let Some(i) =
                    (!res.live.is_empty()).then(|| rng.below(res.live.len() as u64) as usize)
                {
                    let v = res.live.swap_remove(i);
                    target.free(v.frame, v.order);
                    in_use -= 1 << v.order;
                }
            }
        }
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// A trivial target that hands out fresh frame numbers (never reuses).
    struct Counter {
        next: u64,
        live: BTreeMap<u64, u8>,
    }

    impl ChurnTarget for Counter {
        fn alloc(&mut self, order: u8, _mt: MigrateType) -> Option<u64> {
            let f = self.next;
            self.next += 1 << order;
            self.live.insert(f, order);
            Some(f)
        }
        fn free(&mut self, frame: u64, order: u8) {
            assert_eq!(self.live.remove(&frame), Some(order));
        }
    }

    #[test]
    fn trace_is_deterministic_and_holds_occupancy() {
        let mut a = Counter {
            next: 0,
            live: BTreeMap::new(),
        };
        let r1 = churn(&mut a, 1 << 16, 0.85, 3.0, 7);
        let mut b = Counter {
            next: 0,
            live: BTreeMap::new(),
        };
        let r2 = churn(&mut b, 1 << 16, 0.85, 3.0, 7);
        assert_eq!(r1.live, r2.live);
        let live_frames: u64 = r1.live.iter().map(|l| 1u64 << l.order).sum();
        let goal = (65536.0 * 0.85) as u64;
        assert!(
            live_frames >= goal && live_frames < goal + 512,
            "{live_frames}"
        );
        assert!(r1.frames_allocated >= 3 * 65536);
        assert_eq!(a.live.len(), r1.live.len());
    }

    #[test]
    fn mix_matches_the_issue() {
        let mut rng = Rng::new(1);
        let mut by_mt = [0u32; 4];
        let mut order0 = 0;
        for _ in 0..100_000 {
            let (o, mt) = draw_request(&mut rng);
            by_mt[mt.index()] += 1;
            order0 += u32::from(o == 0);
        }
        assert!((69_000..71_000).contains(&by_mt[MigrateType::Movable.index()]));
        assert!((19_000..21_000).contains(&by_mt[MigrateType::Reclaimable.index()]));
        assert!((9_000..11_000).contains(&by_mt[MigrateType::Unmovable.index()]));
        assert!(order0 > 80_000);
    }
}
