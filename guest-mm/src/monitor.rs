//! The pool monitor: allocation counters, a sampled latency histogram, fragmentation figures,
//! slab hit rates, and the decisions (compact, reclaim, rebalance) drawn from them.
//!
//! Counting is lock-free (relaxed atomics). Latency is *sampled*: reading a clock costs more
//! than a fast-path allocation, so only one allocation in `sample_every` (a power of two) is
//! timed. The choice uses a per-thread counter ([`Monitor::start_sample`]), so it costs one
//! thread-local increment and no shared cache line. Latencies go into log2 buckets of
//! nanoseconds; percentiles are read from the buckets and reported as the bucket's upper
//! bound, so they over-estimate by less than a factor of two.
//!
//! Zone and slab figures are passed in as plain numbers ([`ZoneFigures`], [`SlabFigures`]) so
//! that this module depends on neither the zone nor the slab module. [`MonitorSnapshot`] is the
//! serde form the REST API exposes.
//!
//! # Watermarks
//!
//! Each node's zone has three watermarks, fractions of its total frames ([`Thresholds`]):
//! - **high** (default 4%): the target. Reclaim brings free memory back up to it.
//! - **low** (default 2%): below it, reclaim is requested ([`Action::Reclaim`]).
//! - **min** (default 1%): below it, the reclaim is marked `urgent`: the node is close to
//!   failing allocations and the caller should reclaim synchronously rather than in the
//!   background.
//!
//! They must satisfy `0 <= min <= low <= high <= 1`.

use crate::frame::{NodeId, NR_ORDERS};
use crate::policy::{PolicyCounters, PolicyStats};
use serde::{Deserialize, Serialize};
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Number of latency buckets: bucket `i` holds latencies in `[2^i, 2^(i+1))` ns (bucket 0
/// also holds 0 ns).
pub const LATENCY_BUCKETS: usize = 64;

thread_local! {
    static SAMPLE_TICK: Cell<u32> = const { Cell::new(0) };
}

/// Advance this thread's sampling counter; returns its previous value.
fn tick() -> u32 {
    SAMPLE_TICK.with(|c| {
        let v = c.get();
        c.set(v.wrapping_add(1));
        v
    })
}

/// The log2 bucket of a latency in ns.
pub fn latency_bucket(ns: u64) -> usize {
    (63 - (ns | 1).leading_zeros()) as usize
}

/// The largest latency (ns) a bucket holds.
pub fn bucket_upper_ns(bucket: usize) -> u64 {
    if bucket >= 63 {
        u64::MAX
    } else {
        (2u64 << bucket) - 1
    }
}

/// A lock-free log2 histogram of nanosecond latencies.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: [AtomicU64; LATENCY_BUCKETS],
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl LatencyHistogram {
    /// Record one latency.
    pub fn record(&self, ns: u64) {
        self.buckets[latency_bucket(ns)].fetch_add(1, Ordering::Relaxed);
    }

    /// Current bucket counts with percentiles.
    pub fn snapshot(&self) -> LatencySnapshot {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        LatencySnapshot::from_buckets(counts)
    }
}

/// A histogram snapshot: raw buckets plus derived percentiles (bucket upper bounds, ns).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LatencySnapshot {
    /// Number of sampled latencies.
    pub samples: u64,
    /// Bucket counts; bucket `i` covers `[2^i, 2^(i+1))` ns. Trailing empty buckets are cut.
    pub buckets: Vec<u64>,
    /// Median (upper bound of its bucket), if any samples.
    pub p50_ns: Option<u64>,
    /// 90th percentile.
    pub p90_ns: Option<u64>,
    /// 99th percentile.
    pub p99_ns: Option<u64>,
    /// 99.9th percentile.
    pub p999_ns: Option<u64>,
}

impl LatencySnapshot {
    /// Build from bucket counts.
    pub fn from_buckets(mut buckets: Vec<u64>) -> Self {
        while buckets.last() == Some(&0) {
            buckets.pop();
        }
        let mut s = LatencySnapshot {
            samples: buckets.iter().sum(),
            buckets,
            ..Default::default()
        };
        s.p50_ns = s.percentile(0.50);
        s.p90_ns = s.percentile(0.90);
        s.p99_ns = s.percentile(0.99);
        s.p999_ns = s.percentile(0.999);
        s
    }

    /// The upper bound (ns) of the bucket holding the `q`-quantile (`q` in 0..=1), or `None`
    /// without samples.
    pub fn percentile(&self, q: f64) -> Option<u64> {
        if self.samples == 0 {
            return None;
        }
        let q = if q.is_nan() { 1.0 } else { q.clamp(0.0, 1.0) };
        // The rank (1-based) of the wanted sample; at least 1.
        let rank = ((q * self.samples as f64).ceil() as u64).clamp(1, self.samples);
        let mut seen = 0u64;
        for (i, &c) in self.buckets.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return Some(bucket_upper_ns(i));
            }
        }
        self.buckets.len().checked_sub(1).map(bucket_upper_ns)
    }
}

/// Allocation, free and failure counts for one order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderStats {
    /// The order (block of `2^order` frames).
    pub order: u8,
    /// Successful allocations.
    pub allocs: u64,
    /// Frees.
    pub frees: u64,
    /// Allocations that failed on every allowed node.
    pub failures: u64,
}

/// Per-node allocation counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    /// The node.
    pub node: NodeId,
    /// Allocations served by this node.
    pub allocs: u64,
    /// Times this node was tried and had no suitable free block (the allocation fell back
    /// or failed).
    pub misses: u64,
}

/// Fragmentation figures of one node's zone, supplied by the pool.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ZoneFigures {
    /// The zone's node.
    pub node: NodeId,
    /// Frames in the zone.
    pub total_frames: u64,
    /// Free frames.
    pub free_frames: u64,
    /// Free blocks of exactly each order (index = order).
    pub free_blocks: Vec<u64>,
    /// Linux fragmentation index per order: `None` when a block of that order is free,
    /// else 0.0 (lack of memory) ..= 1.0 (fragmentation).
    pub fragmentation_index: Vec<Option<f64>>,
    /// Fraction of free memory unusable for an allocation of each order.
    pub unusable_free_index: Vec<f64>,
}

/// Hit figures of one slab cache, supplied by the slab module's owner.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SlabFigures {
    /// Cache name.
    pub name: String,
    /// Allocations served from a per-thread magazine.
    pub hits: u64,
    /// Allocations that had to go to the depot or the pool.
    pub misses: u64,
    /// `hits / (hits + misses)`, 0.0 without allocations.
    pub hit_rate: f64,
}

impl SlabFigures {
    /// Figures with the hit rate computed.
    pub fn new(name: impl Into<String>, hits: u64, misses: u64) -> Self {
        let total = hits.saturating_add(misses);
        SlabFigures {
            name: name.into(),
            hits,
            misses,
            hit_rate: if total == 0 {
                0.0
            } else {
                hits as f64 / total as f64
            },
        }
    }
}

/// Everything the monitor knows at one moment; the REST API serves this.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MonitorSnapshot {
    /// One allocation in this many is timed.
    pub sample_every: u32,
    /// Sums over all orders (`order` is 0 and meaningless here).
    pub totals: OrderStats,
    /// Per-order counts, only orders with any activity, ascending.
    pub orders: Vec<OrderStats>,
    /// Sampled allocation latency.
    pub latency: LatencySnapshot,
    /// Per-node counts.
    pub nodes: Vec<NodeStats>,
    /// Local/remote counts per policy kind.
    pub policy: PolicyStats,
    /// Per-zone fragmentation figures.
    pub zones: Vec<ZoneFigures>,
    /// Slab hit rates.
    pub slabs: Vec<SlabFigures>,
}

impl MonitorSnapshot {
    /// Counts of `order` (zero when it saw no activity).
    pub fn order(&self, order: u8) -> OrderStats {
        self.orders
            .iter()
            .copied()
            .find(|o| o.order == order)
            .unwrap_or(OrderStats {
                order,
                ..Default::default()
            })
    }

    /// Counts of `node` (zero when unknown).
    pub fn node(&self, node: NodeId) -> NodeStats {
        self.nodes
            .iter()
            .copied()
            .find(|n| n.node == node)
            .unwrap_or(NodeStats {
                node,
                ..Default::default()
            })
    }
}

/// The pool monitor. Share it by reference (`&Monitor` or `Arc<Monitor>`); all recording
/// methods take `&self`.
#[derive(Debug)]
pub struct Monitor {
    sample_mask: u32,
    allocs: [AtomicU64; NR_ORDERS],
    frees: [AtomicU64; NR_ORDERS],
    failures: [AtomicU64; NR_ORDERS],
    latency: LatencyHistogram,
    nodes: Vec<NodeId>,
    node_allocs: Vec<AtomicU64>,
    node_misses: Vec<AtomicU64>,
    policy: PolicyCounters,
    last_eval: Mutex<Option<MonitorSnapshot>>,
}

fn zeros() -> [AtomicU64; NR_ORDERS] {
    std::array::from_fn(|_| AtomicU64::new(0))
}

impl Monitor {
    /// A monitor for these nodes that times one allocation in `sample_every` (rounded up to
    /// a power of two; 0 and 1 both mean every allocation).
    pub fn new(nodes: &[NodeId], sample_every: u32) -> Self {
        let every = sample_every
            .max(1)
            .checked_next_power_of_two()
            .unwrap_or(1 << 31);
        let mut nodes = nodes.to_vec();
        nodes.sort_unstable();
        nodes.dedup();
        Monitor {
            sample_mask: every - 1,
            allocs: zeros(),
            frees: zeros(),
            failures: zeros(),
            latency: LatencyHistogram::default(),
            node_allocs: nodes.iter().map(|_| AtomicU64::new(0)).collect(),
            node_misses: nodes.iter().map(|_| AtomicU64::new(0)).collect(),
            nodes,
            policy: PolicyCounters::new(),
            last_eval: Mutex::new(None),
        }
    }

    /// One allocation in this many is timed.
    pub fn sample_every(&self) -> u32 {
        self.sample_mask + 1
    }

    /// Call at the start of an allocation: returns a start time for one call in
    /// `sample_every` on this thread, else `None` (no clock read).
    pub fn start_sample(&self) -> Option<Instant> {
        (tick() & self.sample_mask == 0).then(Instant::now)
    }

    fn node_index(&self, node: NodeId) -> Option<usize> {
        self.nodes.binary_search(&node).ok()
    }

    fn finish_sample(&self, started: Option<Instant>) {
        if let Some(t0) = started {
            let ns = u64::try_from(t0.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.latency.record(ns);
        }
    }

    /// Count a successful allocation of `order` on `node`; `started` comes from
    /// [`Monitor::start_sample`]. Orders above the maximum are ignored.
    pub fn record_alloc(&self, order: u8, node: NodeId, started: Option<Instant>) {
        self.finish_sample(started);
        if let Some(c) = self.allocs.get(usize::from(order)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(i) = self.node_index(node) {
            self.node_allocs[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count an allocation of `order` that failed on every allowed node.
    pub fn record_failure(&self, order: u8, started: Option<Instant>) {
        self.finish_sample(started);
        if let Some(c) = self.failures.get(usize::from(order)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count that `node` was tried and could not serve an allocation.
    pub fn record_node_miss(&self, node: NodeId) {
        if let Some(i) = self.node_index(node) {
            self.node_misses[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Count a free of `order`.
    pub fn record_free(&self, order: u8) {
        if let Some(c) = self.frees.get(usize::from(order)) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Record a latency measured elsewhere (e.g. a benchmark timing a batch).
    pub fn record_latency_ns(&self, ns: u64) {
        self.latency.record(ns);
    }

    /// The per-policy local/remote counters.
    pub fn policy(&self) -> &PolicyCounters {
        &self.policy
    }

    /// A snapshot of the counters together with the given zone and slab figures.
    pub fn snapshot(&self, zones: Vec<ZoneFigures>, slabs: Vec<SlabFigures>) -> MonitorSnapshot {
        let mut totals = OrderStats::default();
        let mut orders = Vec::new();
        for o in 0..NR_ORDERS {
            let s = OrderStats {
                // o < NR_ORDERS (19) fits u8.
                order: o as u8,
                allocs: self.allocs[o].load(Ordering::Relaxed),
                frees: self.frees[o].load(Ordering::Relaxed),
                failures: self.failures[o].load(Ordering::Relaxed),
            };
            totals.allocs += s.allocs;
            totals.frees += s.frees;
            totals.failures += s.failures;
            if s.allocs + s.frees + s.failures > 0 {
                orders.push(s);
            }
        }
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, &node)| NodeStats {
                node,
                allocs: self.node_allocs[i].load(Ordering::Relaxed),
                misses: self.node_misses[i].load(Ordering::Relaxed),
            })
            .collect();
        MonitorSnapshot {
            sample_every: self.sample_every(),
            totals,
            orders,
            latency: self.latency.snapshot(),
            nodes,
            policy: self.policy.snapshot(),
            zones,
            slabs,
        }
    }

    /// Decide actions from `snapshot`, comparing its counters with the snapshot passed to the
    /// previous call (the first call compares with zero), then remember `snapshot` for the next
    /// call. See [`evaluate_window`] for the rules.
    pub fn evaluate(&self, snapshot: &MonitorSnapshot, th: &Thresholds) -> Vec<Action> {
        let mut last = self.last_eval.lock().unwrap_or_else(|e| e.into_inner());
        let actions = evaluate_window(last.as_ref(), snapshot, th);
        *last = Some(snapshot.clone());
        actions
    }
}

mod evaluate;
pub use evaluate::{evaluate_window, Action, ReclaimReason, ThresholdError, Thresholds};

#[cfg(test)]
#[path = "monitor_tests.rs"]
mod tests;
