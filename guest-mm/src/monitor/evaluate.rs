//! Turning a monitor snapshot into actions: compact, reclaim, rebalance.

use super::MonitorSnapshot;
use crate::frame::{NodeId, MAX_ORDER, THP_ORDER};
use serde::{Deserialize, Serialize};

/// Limits that trigger actions. Watermarks are fractions of each zone's total frames (see
/// the module documentation of [`crate::monitor`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Thresholds {
    /// Below this free fraction a reclaim is `urgent` (default 0.01).
    pub watermark_min: f64,
    /// Below this free fraction reclaim is requested (default 0.02).
    pub watermark_low: f64,
    /// Reclaim target: free memory is brought back up to this fraction (default 0.04).
    pub watermark_high: f64,
    /// The order whose fragmentation index is always checked (default 9, a THP).
    pub compact_order: u8,
    /// Compact when the fragmentation index exceeds this (default 0.5, Linux's
    /// `extfrag_threshold` of 500).
    pub fragmentation_threshold: f64,
    /// Rebalance when the share of remote allocations in the window exceeds this
    /// (default 0.25).
    pub remote_share_threshold: f64,
    /// Fewer allocations than this in the window never trigger a rebalance (default 64).
    pub min_window_allocs: u64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds {
            watermark_min: 0.01,
            watermark_low: 0.02,
            watermark_high: 0.04,
            compact_order: THP_ORDER,
            fragmentation_threshold: 0.5,
            remote_share_threshold: 0.25,
            min_window_allocs: 64,
        }
    }
}

/// Why a set of thresholds is invalid.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum ThresholdError {
    /// A fraction outside 0..=1 (or NaN).
    #[error("{name} = {value} is not a fraction in 0..=1")]
    NotAFraction {
        /// The field.
        name: &'static str,
        /// Its value.
        value: f64,
    },
    /// The watermarks are not ordered min <= low <= high.
    #[error("watermarks must satisfy min <= low <= high (got {min}, {low}, {high})")]
    WatermarkOrder {
        /// min.
        min: f64,
        /// low.
        low: f64,
        /// high.
        high: f64,
    },
    /// `compact_order` above the maximum order.
    #[error("compact_order {0} exceeds the maximum order {MAX_ORDER}")]
    Order(u8),
}

impl Thresholds {
    /// Check ranges and the watermark order.
    pub fn validate(&self) -> Result<(), ThresholdError> {
        for (name, value) in [
            ("watermark_min", self.watermark_min),
            ("watermark_low", self.watermark_low),
            ("watermark_high", self.watermark_high),
            ("fragmentation_threshold", self.fragmentation_threshold),
            ("remote_share_threshold", self.remote_share_threshold),
        ] {
            if !(0.0..=1.0).contains(&value) {
                return Err(ThresholdError::NotAFraction { name, value });
            }
        }
        if !(self.watermark_min <= self.watermark_low && self.watermark_low <= self.watermark_high)
        {
            return Err(ThresholdError::WatermarkOrder {
                min: self.watermark_min,
                low: self.watermark_low,
                high: self.watermark_high,
            });
        }
        if self.compact_order > MAX_ORDER {
            return Err(ThresholdError::Order(self.compact_order));
        }
        Ok(())
    }

    /// `fraction` of `total` frames, rounded up.
    fn frames(fraction: f64, total: u64) -> u64 {
        // Fractions are validated to 0..=1, so the product fits u64.
        (fraction * total as f64).ceil() as u64
    }
}

/// Why a reclaim was requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReclaimReason {
    /// Free memory fell below the low watermark.
    LowWatermark,
    /// Allocations missed this node in the window while it was below the high watermark.
    AllocationMisses,
}

/// Something the monitor wants done.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Compact `node`'s zone until a block of `order` can be formed.
    Compact {
        /// The node.
        node: NodeId,
        /// The order that is fragmented.
        order: u8,
    },
    /// Free `frames` frames on `node` (reclaim, balloon, or discard cached memory), bringing it
    /// up to the high watermark.
    Reclaim {
        /// The node.
        node: NodeId,
        /// Frames to free to reach the high watermark.
        frames: u64,
        /// The node is below the min watermark.
        urgent: bool,
        /// Why.
        reason: ReclaimReason,
    },
    /// Too many allocations landed off their wanted node: migrate misplaced memory.
    Rebalance {
        /// Remote share of allocations in the window.
        remote_share: f64,
    },
}

/// The decision rules, over the window between `prev` (zero when `None`) and `cur`:
///
/// - **Reclaim(node)** when the node's free frames are below the low watermark
///   (`urgent` when also below min), or when the node was missed by an allocation in the
///   window while below the high watermark. The amount brings it to the high watermark.
///   A node above the high watermark that was missed is fragmented, not full: no reclaim.
/// - **Compact(node, order)** when the zone's fragmentation index at `compact_order`, or at an
///   order that had allocation failures in the window, exceeds `fragmentation_threshold`.
///   Not for a zone below its low watermark: reclaim comes first (as in Linux, compaction
///   needs free memory to move blocks into).
/// - **Rebalance** when at least `min_window_allocs` allocations succeeded in the window and
///   the share that landed off their policy's first node exceeds `remote_share_threshold`.
///
/// Actions come per zone (reclaim before compact, zones in snapshot order), rebalance last.
pub fn evaluate_window(
    prev: Option<&MonitorSnapshot>,
    cur: &MonitorSnapshot,
    th: &Thresholds,
) -> Vec<Action> {
    let mut out = Vec::new();
    let failed_orders: Vec<u8> = cur
        .orders
        .iter()
        .filter(|o| {
            let before = prev.map_or(0, |p| p.order(o.order).failures);
            o.failures > before
        })
        .map(|o| o.order)
        .collect();
    for z in &cur.zones {
        if z.total_frames == 0 {
            continue;
        }
        let min = Thresholds::frames(th.watermark_min, z.total_frames);
        let low = Thresholds::frames(th.watermark_low, z.total_frames);
        let high = Thresholds::frames(th.watermark_high, z.total_frames);
        let misses = cur.node(z.node).misses;
        let missed = misses > prev.map_or(0, |p| p.node(z.node).misses);
        let free = z.free_frames;
        if free < low {
            out.push(Action::Reclaim {
                node: z.node,
                frames: high.saturating_sub(free),
                urgent: free < min,
                reason: ReclaimReason::LowWatermark,
            });
            continue;
        }
        if missed && free < high {
            out.push(Action::Reclaim {
                node: z.node,
                frames: high.saturating_sub(free),
                urgent: false,
                reason: ReclaimReason::AllocationMisses,
            });
        }
        let mut orders = vec![th.compact_order];
        orders.extend(failed_orders.iter().copied());
        orders.sort_unstable();
        orders.dedup();
        for order in orders {
            let fi = z
                .fragmentation_index
                .get(usize::from(order))
                .copied()
                .flatten();
            if fi.is_some_and(|fi| fi > th.fragmentation_threshold) {
                out.push(Action::Compact {
                    node: z.node,
                    order,
                });
            }
        }
    }
    let now = cur.policy.total();
    let before = prev.map(|p| p.policy.total()).unwrap_or_default();
    let local = now.local.saturating_sub(before.local);
    let remote = now.remote.saturating_sub(before.remote);
    let window = local + remote;
    if window > 0 && window >= th.min_window_allocs {
        let share = remote as f64 / window as f64;
        if share > th.remote_share_threshold {
            out.push(Action::Rebalance {
                remote_share: share,
            });
        }
    }
    out
}
