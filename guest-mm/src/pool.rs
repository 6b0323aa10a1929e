//! The pool: one zone per NUMA node, allocation by NUMA policy, counters, and the monitor.
//!
//! Zones are laid out one after another in the pool's frame space, in ascending node order:
//! node *i*'s zone starts where node *i-1*'s ends, rounded up to [`PoolConfig::align_frames`]
//! (1 GiB by default, so that every zone starts on a maximal buddy block). Frames in the gaps
//! belong to no zone.
//!
//! Each zone sits behind its own `std::sync::Mutex`. An allocation walks the policy's node
//! order ([`crate::policy::candidate_nodes`]) and holds one zone lock at a time, only for the
//! zone operation itself. Local/remote counts per policy kind and the sampled latency go to
//! the pool's [`Monitor`].

use crate::frame::{FrameId, MigrateType, NodeId, MAX_ORDER, NR_ORDERS};
use crate::monitor::{Action, Monitor, MonitorSnapshot, SlabFigures, Thresholds, ZoneFigures};
use crate::policy::{candidate_nodes, InterleaveCursor, NumaPolicy, PolicyError, PolicyKind};
use crate::topology::Topology;
use crate::zone::{AllocError, FreeError, ValidateError, Zone, ZoneError, ZoneStats};
use std::sync::{Mutex, MutexGuard};

mod migrate;
pub use migrate::{MigrateStats, Migration};

/// Frames in 1 GiB, the default zone alignment.
pub const GIB_FRAMES: u64 = 1 << MAX_ORDER;

/// Errors of the pool.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PoolError {
    /// The policy is invalid for this topology or caller.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// Every node the policy allows is out of blocks of this order.
    #[error("out of memory: no order-{order} block on any node allowed by the {kind} policy")]
    OutOfMemory {
        /// Requested order.
        order: u8,
        /// The policy kind.
        kind: PolicyKind,
    },
    /// The request itself is invalid (order too large, Isolate type).
    #[error("invalid request: {0}")]
    Request(AllocError),
    /// A free was refused by the zone.
    #[error("free of {frame} refused: {source}")]
    Free {
        /// The frame.
        frame: FrameId,
        /// Why.
        #[source]
        source: FreeError,
    },
    /// The frame lies in no zone of the pool.
    #[error("frame {0} is not in the pool")]
    NotInPool(FrameId),
    /// A zone's lock was poisoned by a panic during a zone operation.
    #[error("zone of {0} is poisoned")]
    Poisoned(NodeId),
    /// A pool size names a node the topology does not have.
    #[error("size given for unknown node {0}")]
    UnknownNode(NodeId),
    /// A node was given two sizes.
    #[error("node {0} is given more than one size")]
    DuplicateNode(NodeId),
    /// No node was given any frames.
    #[error("the pool has no frames")]
    Empty,
    /// `align_frames` is not a power of two.
    #[error("zone alignment {0} is not a power of two")]
    BadAlignment(u64),
    /// The layout does not fit the frame space.
    #[error("zone layout overflows the frame space")]
    Overflow,
    /// A zone could not be built.
    #[error("zone of {node}: {source}")]
    Zone {
        /// The node.
        node: NodeId,
        /// Why.
        #[source]
        source: ZoneError,
    },
    /// A consistency check failed.
    #[error("pool invalid at {node}: {source}")]
    Invalid {
        /// The node whose zone is broken.
        node: NodeId,
        /// The broken invariant.
        #[source]
        source: ValidateError,
    },
    /// The pool's own layout is inconsistent.
    #[error("pool layout invalid: {0}")]
    Layout(String),
}

/// Pool construction options.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// Each zone starts at a multiple of this many frames (a power of two; 1 packs zones
    /// tightly). Default: [`GIB_FRAMES`].
    pub align_frames: u64,
    /// The monitor times one allocation in this many (see [`Monitor::new`]). Default 64.
    pub sample_every: u32,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            align_frames: GIB_FRAMES,
            sample_every: 64,
        }
    }
}

/// One node's zone and where it lies.
#[derive(Debug)]
struct NodeZone {
    node: NodeId,
    start: FrameId,
    nr: u64,
    zone: Mutex<Zone>,
}

impl NodeZone {
    fn contains(&self, f: FrameId) -> bool {
        f.0.wrapping_sub(self.start.0) < self.nr
    }
}

/// Where one node's zone lies in the pool's frame space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneLayout {
    /// The node.
    pub node: NodeId,
    /// First frame.
    pub start: FrameId,
    /// Frames.
    pub nr_frames: u64,
}

/// The NUMA-aware frame pool.
#[derive(Debug)]
pub struct Pool {
    topo: Topology,
    /// Ascending by node id, and therefore by start frame.
    zones: Vec<NodeZone>,
    cursor: InterleaveCursor,
    monitor: Monitor,
}

impl Pool {
    /// A pool with the default configuration; `sizes` gives each node's frames (nodes not
    /// listed, or listed with 0, get no zone).
    pub fn new(topo: Topology, sizes: &[(NodeId, u64)]) -> Result<Self, PoolError> {
        Self::with_config(topo, sizes, PoolConfig::default())
    }

    /// A pool with explicit options.
    pub fn with_config(
        topo: Topology,
        sizes: &[(NodeId, u64)],
        cfg: PoolConfig,
    ) -> Result<Self, PoolError> {
        if !cfg.align_frames.is_power_of_two() {
            return Err(PoolError::BadAlignment(cfg.align_frames));
        }
        let mut sizes = sizes.to_vec();
        sizes.sort_unstable_by_key(|s| s.0);
        for w in sizes.windows(2) {
            if w[0].0 == w[1].0 {
                return Err(PoolError::DuplicateNode(w[0].0));
            }
        }
        let mut zones = Vec::new();
        let mut next = 0u64;
        for &(node, nr) in &sizes {
            if !topo.contains(node) {
                return Err(PoolError::UnknownNode(node));
            }
            if nr == 0 {
                continue;
            }
            let mask = cfg.align_frames - 1;
            let start = next.checked_add(mask).ok_or(PoolError::Overflow)? & !mask;
            next = start.checked_add(nr).ok_or(PoolError::Overflow)?;
            let zone = Zone::try_new(node, FrameId(start), nr)
                .map_err(|source| PoolError::Zone { node, source })?;
            zones.push(NodeZone {
                node,
                start: FrameId(start),
                nr,
                zone: Mutex::new(zone),
            });
        }
        if zones.is_empty() {
            return Err(PoolError::Empty);
        }
        let nodes: Vec<NodeId> = zones.iter().map(|z| z.node).collect();
        Ok(Pool {
            topo,
            zones,
            cursor: InterleaveCursor::new(),
            monitor: Monitor::new(&nodes, cfg.sample_every),
        })
    }

    /// The topology the pool was built from.
    pub fn topology(&self) -> &Topology {
        &self.topo
    }

    /// The pool's monitor.
    pub fn monitor(&self) -> &Monitor {
        &self.monitor
    }

    /// Where every zone lies, ascending.
    pub fn layout(&self) -> Vec<ZoneLayout> {
        self.zones
            .iter()
            .map(|z| ZoneLayout {
                node: z.node,
                start: z.start,
                nr_frames: z.nr,
            })
            .collect()
    }

    /// Frames in all zones.
    pub fn total_frames(&self) -> u64 {
        self.zones.iter().map(|z| z.nr).sum()
    }

    /// One past the last frame of the last zone (the size of the pool's frame space).
    pub fn end(&self) -> FrameId {
        self.zones
            .last()
            .map_or(FrameId(0), |z| FrameId(z.start.0 + z.nr))
    }

    fn zone_index_of_node(&self, node: NodeId) -> Option<usize> {
        self.zones.binary_search_by_key(&node, |z| z.node).ok()
    }

    fn zone_index_of_frame(&self, f: FrameId) -> Option<usize> {
        let i = self
            .zones
            .partition_point(|z| z.start <= f)
            .checked_sub(1)?;
        self.zones[i].contains(f).then_some(i)
    }

    fn lock(&self, i: usize) -> Result<MutexGuard<'_, Zone>, PoolError> {
        let z = &self.zones[i];
        z.zone.lock().map_err(|_| PoolError::Poisoned(z.node))
    }

    /// The node whose zone holds `frame`.
    pub fn node_of(&self, frame: FrameId) -> Option<NodeId> {
        self.zone_index_of_frame(frame).map(|i| self.zones[i].node)
    }

    /// Run `f` on `node`'s zone under its lock (for compaction, hotplug and tests). Hold it
    /// briefly: allocations on that node wait meanwhile.
    pub fn with_zone<R>(
        &self,
        node: NodeId,
        f: impl FnOnce(&mut Zone) -> R,
    ) -> Result<R, PoolError> {
        let i = self
            .zone_index_of_node(node)
            .ok_or(PoolError::UnknownNode(node))?;
        let mut g = self.lock(i)?;
        Ok(f(&mut g))
    }

    /// Allocate a block of `order` and type `mt` under `policy` for a caller on
    /// `local_node`. Tries the policy's nodes in order, one zone lock at a time. Returns the
    /// block's first frame and its node.
    pub fn alloc(
        &self,
        order: u8,
        mt: MigrateType,
        policy: &NumaPolicy,
        local_node: NodeId,
    ) -> Result<(FrameId, NodeId), PoolError> {
        let started = self.monitor.start_sample();
        let kind = policy.kind();
        let cursor = match policy {
            NumaPolicy::Interleave(_) => self.cursor.next(),
            _ => 0,
        };
        let nodes = candidate_nodes(policy, &self.topo, local_node, cursor)?;
        let wanted = nodes[0];
        for node in nodes {
            let Some(i) = self.zone_index_of_node(node) else {
                continue;
            };
            let res = self.lock(i)?.alloc(order, mt);
            match res {
                Ok(frame) => {
                    self.monitor.policy().record(kind, wanted, node);
                    self.monitor.record_alloc(order, node, started);
                    return Ok((frame, node));
                }
                Err(AllocError::OutOfMemory { .. }) => self.monitor.record_node_miss(node),
                Err(e) => return Err(PoolError::Request(e)),
            }
        }
        self.monitor.policy().record_failure(kind);
        self.monitor.record_failure(order, started);
        Err(PoolError::OutOfMemory { order, kind })
    }

    /// Free the block of `order` at `frame`; returns the node it belonged to.
    pub fn free(&self, frame: FrameId, order: u8) -> Result<NodeId, PoolError> {
        let i = self
            .zone_index_of_frame(frame)
            .ok_or(PoolError::NotInPool(frame))?;
        self.lock(i)?
            .free(frame, order)
            .map_err(|source| PoolError::Free { frame, source })?;
        self.monitor.record_free(order);
        Ok(self.zones[i].node)
    }

    /// Per-node zone statistics, ascending by node.
    pub fn stats(&self) -> Result<Vec<ZoneStats>, PoolError> {
        (0..self.zones.len())
            .map(|i| Ok(self.lock(i)?.stats()))
            .collect()
    }

    /// Fragmentation figures of every zone, for the monitor.
    pub fn zone_figures(&self) -> Result<Vec<ZoneFigures>, PoolError> {
        (0..self.zones.len())
            .map(|i| {
                let z = self.lock(i)?;
                let s = z.stats();
                // NR_ORDERS (19) fits u8.
                let orders = 0..NR_ORDERS as u8;
                Ok(ZoneFigures {
                    node: s.node,
                    total_frames: s.total,
                    free_frames: s.free - s.isolated_free,
                    free_blocks: s.free_blocks_per_order.clone(),
                    fragmentation_index: orders.clone().map(|o| z.fragmentation_index(o)).collect(),
                    unusable_free_index: orders.map(|o| z.unusable_free_index(o)).collect(),
                })
            })
            .collect()
    }

    /// A monitor snapshot with this pool's zone figures and the given slab figures.
    pub fn snapshot(&self, slabs: Vec<SlabFigures>) -> Result<MonitorSnapshot, PoolError> {
        Ok(self.monitor.snapshot(self.zone_figures()?, slabs))
    }

    /// Take a snapshot and let the monitor decide what to do (see [`Monitor::evaluate`]).
    pub fn evaluate(&self, th: &Thresholds) -> Result<Vec<Action>, PoolError> {
        let snap = self.snapshot(Vec::new())?;
        Ok(self.monitor.evaluate(&snap, th))
    }

    /// Check the layout (zones ascending, disjoint, matching their nodes) and every zone's
    /// invariants. Locks one zone at a time.
    pub fn validate(&self) -> Result<(), PoolError> {
        let mut prev_end = 0u64;
        let mut prev_node: Option<NodeId> = None;
        for (i, nz) in self.zones.iter().enumerate() {
            if prev_node.is_some_and(|p| p >= nz.node) {
                return Err(PoolError::Layout(format!("{} out of order", nz.node)));
            }
            if nz.start.0 < prev_end {
                return Err(PoolError::Layout(format!(
                    "zone of {} at {} overlaps the previous zone",
                    nz.node, nz.start
                )));
            }
            if !self.topo.contains(nz.node) {
                return Err(PoolError::Layout(format!("{} not in topology", nz.node)));
            }
            let z = self.lock(i)?;
            if z.node() != nz.node || z.base() != nz.start || z.nr_frames() != nz.nr {
                return Err(PoolError::Layout(format!(
                    "zone of {} reports {} at {} (+{}), expected {} (+{})",
                    nz.node,
                    z.node(),
                    z.base(),
                    z.nr_frames(),
                    nz.start,
                    nz.nr
                )));
            }
            z.validate().map_err(|source| PoolError::Invalid {
                node: nz.node,
                source,
            })?;
            prev_end = nz.start.0 + nz.nr;
            prev_node = Some(nz.node);
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "pool_tests.rs"]
mod tests;
