//! NUMA memory policies and the node order they give one allocation.
//!
//! [`candidate_nodes`] is a pure function: given a [`NumaPolicy`], a [`Topology`], the caller's
//! local node and an interleave cursor, it returns the nodes to try, in order. The first entry
//! is the node the policy *wants*; an allocation that lands anywhere else is counted as remote
//! by [`PolicyCounters`].
//!
//! | policy | first node | fallback |
//! |---|---|---|
//! | `Local` | the caller's node | every other node, nearest to the caller first |
//! | `Preferred(p)` | `p` | every other node, nearest to `p` first |
//! | `Interleave(set)` | `set[cursor % len]` | the rest of `set`, nearest to that node first |
//! | `Bind(set)` | the member of `set` nearest the caller | the rest of `set` by distance; never outside it |
//!
//! Nodes without memory are never candidates: a policy that names one falls through to the
//! next node in its order (as Linux does for memory-less nodes).
//!
//! On the wire a policy is a JSON object tagged by `mode`:
//! `{"mode":"local"}`, `{"mode":"preferred","node":1}`, `{"mode":"interleave","nodes":[0,1]}`,
//! `{"mode":"bind","nodes":[2]}`.

use crate::frame::NodeId;
use crate::topology::{Topology, TopologyError};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a policy is invalid or cannot place an allocation.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum PolicyError {
    /// Interleave or Bind with no nodes.
    #[error("{0} policy needs at least one node")]
    EmptyNodeSet(PolicyKind),
    /// A node listed twice.
    #[error("node {0} is listed more than once")]
    DuplicateNode(NodeId),
    /// The policy names a node the topology does not have.
    #[error("policy names unknown node {0}")]
    UnknownNode(NodeId),
    /// The caller's local node is not in the topology.
    #[error("local node {0} is not in the topology")]
    UnknownLocalNode(NodeId),
    /// None of the nodes the policy allows has memory.
    #[error("no node allowed by the {0} policy has memory")]
    NoMemory(PolicyKind),
}

/// A NUMA memory policy for guest RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "PolicyRepr", into = "PolicyRepr")]
pub enum NumaPolicy {
    /// Allocate on the caller's node, falling back to the nearest other node.
    #[default]
    Local,
    /// Allocate on this node, falling back to the nodes nearest to it.
    Preferred(NodeId),
    /// Spread allocations round-robin over these nodes; fall back within the set.
    Interleave(Vec<NodeId>),
    /// Allocate only on these nodes (nearest to the caller first); fail when they are full.
    Bind(Vec<NodeId>),
}

/// The wire form of [`NumaPolicy`].
#[derive(Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case", deny_unknown_fields)]
enum PolicyRepr {
    Local,
    Preferred { node: NodeId },
    Interleave { nodes: Vec<NodeId> },
    Bind { nodes: Vec<NodeId> },
}

impl TryFrom<PolicyRepr> for NumaPolicy {
    type Error = PolicyError;
    fn try_from(r: PolicyRepr) -> Result<Self, PolicyError> {
        let p = match r {
            PolicyRepr::Local => NumaPolicy::Local,
            PolicyRepr::Preferred { node } => NumaPolicy::Preferred(node),
            PolicyRepr::Interleave { nodes } => NumaPolicy::Interleave(nodes),
            PolicyRepr::Bind { nodes } => NumaPolicy::Bind(nodes),
        };
        p.check_shape()?;
        Ok(p)
    }
}

impl From<NumaPolicy> for PolicyRepr {
    fn from(p: NumaPolicy) -> Self {
        match p {
            NumaPolicy::Local => PolicyRepr::Local,
            NumaPolicy::Preferred(node) => PolicyRepr::Preferred { node },
            NumaPolicy::Interleave(nodes) => PolicyRepr::Interleave { nodes },
            NumaPolicy::Bind(nodes) => PolicyRepr::Bind { nodes },
        }
    }
}

/// The kind of a policy, without its nodes (for counters and messages).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicyKind {
    /// [`NumaPolicy::Local`].
    Local,
    /// [`NumaPolicy::Preferred`].
    Preferred,
    /// [`NumaPolicy::Interleave`].
    Interleave,
    /// [`NumaPolicy::Bind`].
    Bind,
}

impl PolicyKind {
    /// Every kind, in index order.
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::Local,
        PolicyKind::Preferred,
        PolicyKind::Interleave,
        PolicyKind::Bind,
    ];

    /// Index for per-kind arrays.
    pub const fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PolicyKind::Local => "local",
            PolicyKind::Preferred => "preferred",
            PolicyKind::Interleave => "interleave",
            PolicyKind::Bind => "bind",
        })
    }
}

impl NumaPolicy {
    /// The policy's kind.
    pub fn kind(&self) -> PolicyKind {
        match self {
            NumaPolicy::Local => PolicyKind::Local,
            NumaPolicy::Preferred(_) => PolicyKind::Preferred,
            NumaPolicy::Interleave(_) => PolicyKind::Interleave,
            NumaPolicy::Bind(_) => PolicyKind::Bind,
        }
    }

    /// The node set of Interleave and Bind (empty for the others).
    pub fn node_set(&self) -> &[NodeId] {
        match self {
            NumaPolicy::Interleave(n) | NumaPolicy::Bind(n) => n,
            _ => &[],
        }
    }

    /// Whether the policy lets memory live on `node` at all (only Bind restricts).
    pub fn allows(&self, node: NodeId) -> bool {
        match self {
            NumaPolicy::Bind(set) => set.contains(&node),
            _ => true,
        }
    }

    /// Checks that need no topology: node sets are non-empty and free of duplicates.
    fn check_shape(&self) -> Result<(), PolicyError> {
        let set = self.node_set();
        if matches!(self, NumaPolicy::Interleave(_) | NumaPolicy::Bind(_)) && set.is_empty() {
            return Err(PolicyError::EmptyNodeSet(self.kind()));
        }
        for (i, n) in set.iter().enumerate() {
            if set[..i].contains(n) {
                return Err(PolicyError::DuplicateNode(*n));
            }
        }
        Ok(())
    }

    /// Validate against a topology: every named node exists, sets are non-empty and
    /// duplicate-free, and Interleave/Bind sets include at least one node with memory.
    pub fn validate(&self, topo: &Topology) -> Result<(), PolicyError> {
        self.check_shape()?;
        match self {
            NumaPolicy::Local => Ok(()),
            NumaPolicy::Preferred(n) => {
                if topo.contains(*n) {
                    Ok(())
                } else {
                    Err(PolicyError::UnknownNode(*n))
                }
            }
            NumaPolicy::Interleave(set) | NumaPolicy::Bind(set) => {
                let mut any_mem = false;
                for n in set {
                    let info = topo.node(*n).ok_or(PolicyError::UnknownNode(*n))?;
                    any_mem |= info.has_memory;
                }
                if any_mem {
                    Ok(())
                } else {
                    Err(PolicyError::NoMemory(self.kind()))
                }
            }
        }
    }
}

fn map_topo(e: TopologyError, local: NodeId) -> PolicyError {
    match e {
        TopologyError::UnknownNode(n) if n == local => PolicyError::UnknownLocalNode(n),
        TopologyError::UnknownNode(n) => PolicyError::UnknownNode(n),
        // sort_by_distance only fails with UnknownNode.
        _ => PolicyError::UnknownNode(local),
    }
}

/// The nodes to try for one allocation, in order; the first is the node the policy wants.
///
/// `cursor` is only used by Interleave: allocation number `cursor` goes to the
/// `cursor % len`-th member (with memory) of the set. Callers keep the cursor (see
/// [`InterleaveCursor`]). Memory-less nodes are left out. Fails when the policy names an
/// unknown node, `local` is unknown, or no allowed node has memory.
pub fn candidate_nodes(
    policy: &NumaPolicy,
    topo: &Topology,
    local: NodeId,
    cursor: u64,
) -> Result<Vec<NodeId>, PolicyError> {
    if !topo.contains(local) {
        return Err(PolicyError::UnknownLocalNode(local));
    }
    let has_mem = |n: &NodeId| topo.node(*n).is_some_and(|i| i.has_memory);
    let out: Vec<NodeId> = match policy {
        NumaPolicy::Local => topo
            .nodes_by_distance(local)
            .map_err(|e| map_topo(e, local))?,
        NumaPolicy::Preferred(p) => topo.nodes_by_distance(*p).map_err(|e| map_topo(e, local))?,
        NumaPolicy::Bind(set) => {
            policy.check_shape()?;
            topo.sort_by_distance(local, set)
                .map_err(|e| map_topo(e, local))?
        }
        NumaPolicy::Interleave(set) => {
            policy.check_shape()?;
            for n in set {
                if !topo.contains(*n) {
                    return Err(PolicyError::UnknownNode(*n));
                }
            }
            let members: Vec<NodeId> = set.iter().copied().filter(has_mem).collect();
            if members.is_empty() {
                return Err(PolicyError::NoMemory(PolicyKind::Interleave));
            }
            // members.len() >= 1, and the remainder is < len, which fits usize.
            let target = members[(cursor % members.len() as u64) as usize];
            topo.sort_by_distance(target, &members)
                .map_err(|e| map_topo(e, local))?
        }
    };
    let out: Vec<NodeId> = out.into_iter().filter(has_mem).collect();
    if out.is_empty() {
        return Err(PolicyError::NoMemory(policy.kind()));
    }
    Ok(out)
}

/// A shared round-robin cursor for Interleave.
#[derive(Debug, Default)]
pub struct InterleaveCursor(AtomicU64);

impl InterleaveCursor {
    /// A cursor starting at 0.
    pub const fn new() -> Self {
        InterleaveCursor(AtomicU64::new(0))
    }

    /// The current value, advancing the cursor by one.
    pub fn next(&self) -> u64 {
        self.0.fetch_add(1, Ordering::Relaxed)
    }
}

/// Local/remote/failed counts for one policy kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KindStats {
    /// Allocations placed on the node the policy wanted first.
    pub local: u64,
    /// Allocations placed on a fallback node.
    pub remote: u64,
    /// Allocations that found no room on any allowed node.
    pub failed: u64,
}

impl KindStats {
    /// Fraction of successful allocations that went remote (0.0 when there were none).
    pub fn remote_share(&self) -> f64 {
        let total = self.local + self.remote;
        if total == 0 {
            0.0
        } else {
            self.remote as f64 / total as f64
        }
    }
}

/// A snapshot of [`PolicyCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyStats {
    /// Counts for [`NumaPolicy::Local`].
    pub local: KindStats,
    /// Counts for [`NumaPolicy::Preferred`].
    pub preferred: KindStats,
    /// Counts for [`NumaPolicy::Interleave`].
    pub interleave: KindStats,
    /// Counts for [`NumaPolicy::Bind`].
    pub bind: KindStats,
}

impl PolicyStats {
    /// The counts of one kind.
    pub fn kind(&self, k: PolicyKind) -> KindStats {
        match k {
            PolicyKind::Local => self.local,
            PolicyKind::Preferred => self.preferred,
            PolicyKind::Interleave => self.interleave,
            PolicyKind::Bind => self.bind,
        }
    }

    /// Sum over all kinds.
    pub fn total(&self) -> KindStats {
        PolicyKind::ALL.iter().fold(KindStats::default(), |a, &k| {
            let s = self.kind(k);
            KindStats {
                local: a.local + s.local,
                remote: a.remote + s.remote,
                failed: a.failed + s.failed,
            }
        })
    }
}

/// Lock-free local/remote/failed counters per policy kind.
#[derive(Debug, Default)]
pub struct PolicyCounters {
    local: [AtomicU64; 4],
    remote: [AtomicU64; 4],
    failed: [AtomicU64; 4],
}

impl PolicyCounters {
    /// All zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Count a successful allocation under `kind` that the policy wanted on `wanted` and that
    /// landed on `got`.
    pub fn record(&self, kind: PolicyKind, wanted: NodeId, got: NodeId) {
        let arr = if wanted == got {
            &self.local
        } else {
            &self.remote
        };
        arr[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Count an allocation under `kind` that no allowed node could satisfy.
    pub fn record_failure(&self, kind: PolicyKind) {
        self.failed[kind.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Current values.
    pub fn snapshot(&self) -> PolicyStats {
        let get = |k: PolicyKind| KindStats {
            local: self.local[k.index()].load(Ordering::Relaxed),
            remote: self.remote[k.index()].load(Ordering::Relaxed),
            failed: self.failed[k.index()].load(Ordering::Relaxed),
        };
        PolicyStats {
            local: get(PolicyKind::Local),
            preferred: get(PolicyKind::Preferred),
            interleave: get(PolicyKind::Interleave),
            bind: get(PolicyKind::Bind),
        }
    }
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
