//! Host NUMA topology: nodes (memory, CPUs) and the distance matrix between them.
//!
//! A [`Topology`] comes either from the host's sysfs ([`Topology::from_sysfs`], which reads
//! `/sys/devices/system/node` or a copy of it) or is built by hand ([`Topology::synthetic`],
//! [`Topology::uniform`]) for tests and for hosts without NUMA. Reading sysfs is plain file
//! reading; the core still makes no memory syscalls.
//!
//! Distances follow the ACPI SLIT convention that Linux exposes: a node's distance to itself
//! is the smallest in its row (normally 10), and larger numbers mean slower access. The matrix
//! may be asymmetric.

use crate::frame::NodeId;
use serde::{Deserialize, Serialize};
use std::fs;
use std::path::{Path, PathBuf};

/// The conventional distance of a node to itself (ACPI SLIT, Linux `LOCAL_DISTANCE`).
pub const LOCAL_DISTANCE: u32 = 10;
/// The conventional distance to another node one hop away (Linux `REMOTE_DISTANCE`).
pub const REMOTE_DISTANCE: u32 = 20;
/// The largest number of nodes a topology may hold.
pub const MAX_NODES: usize = 1024;

/// Why a topology is invalid or could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// No nodes at all.
    #[error("topology has no nodes")]
    Empty,
    /// More nodes than [`MAX_NODES`].
    #[error("topology has {0} nodes, more than the maximum {MAX_NODES}")]
    TooManyNodes(usize),
    /// The same node id appears twice.
    #[error("node {0} appears more than once")]
    DuplicateNode(NodeId),
    /// The distance matrix is not N x N.
    #[error("distance row {row} has {len} entries, expected {expected}")]
    NotSquare {
        /// Row index (position of the node in the topology).
        row: usize,
        /// Entries found in that row.
        len: usize,
        /// Number of nodes.
        expected: usize,
    },
    /// The distance matrix has the wrong number of rows.
    #[error("distance matrix has {rows} rows for {nodes} nodes")]
    RowCount {
        /// Rows found.
        rows: usize,
        /// Number of nodes.
        nodes: usize,
    },
    /// A distance of zero.
    #[error("distance from {from} to {to} is zero")]
    ZeroDistance {
        /// Source node.
        from: NodeId,
        /// Destination node.
        to: NodeId,
    },
    /// A node is not strictly closer to itself than to another node.
    #[error(
        "distance {from}->{to} ({remote}) is not larger than {from}'s local distance ({local})"
    )]
    DiagonalNotMinimum {
        /// The node whose row is wrong.
        from: NodeId,
        /// The node that is as close as or closer than `from` itself.
        to: NodeId,
        /// `from`'s distance to itself.
        local: u32,
        /// `from`'s distance to `to`.
        remote: u32,
    },
    /// A node id that the topology does not hold.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// A sysfs file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A sysfs file has unexpected contents.
    #[error("cannot parse {path}: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// One NUMA node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// The node number (as Linux numbers it; may be sparse).
    pub id: NodeId,
    /// Memory on the node, in bytes (0 for a memory-less node).
    pub mem_bytes: u64,
    /// Whether the node has memory (sysfs `has_memory`; `mem_bytes > 0` for synthetic nodes).
    pub has_memory: bool,
    /// CPUs on the node, ascending.
    pub cpus: Vec<u32>,
}

/// A validated NUMA topology. Nodes are kept sorted by id; the distance matrix is indexed by
/// node position (see [`Topology::index_of`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Topology {
    nodes: Vec<NodeInfo>,
    distances: Vec<Vec<u32>>,
}

impl Topology {
    /// Build and validate a topology. `distances[i][j]` is the distance from `nodes[i]` to
    /// `nodes[j]`, in the order the nodes are given; they are re-sorted by id here.
    pub fn new(nodes: Vec<NodeInfo>, distances: Vec<Vec<u32>>) -> Result<Self, TopologyError> {
        let n = nodes.len();
        if n == 0 {
            return Err(TopologyError::Empty);
        }
        if n > MAX_NODES {
            return Err(TopologyError::TooManyNodes(n));
        }
        if distances.len() != n {
            return Err(TopologyError::RowCount {
                rows: distances.len(),
                nodes: n,
            });
        }
        for (row, r) in distances.iter().enumerate() {
            if r.len() != n {
                return Err(TopologyError::NotSquare {
                    row,
                    len: r.len(),
                    expected: n,
                });
            }
        }
        // Sort nodes by id and permute the matrix along.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by_key(|&i| nodes[i].id);
        for w in order.windows(2) {
            if nodes[w[0]].id == nodes[w[1]].id {
                return Err(TopologyError::DuplicateNode(nodes[w[0]].id));
            }
        }
        let sorted_nodes: Vec<NodeInfo> = order.iter().map(|&i| nodes[i].clone()).collect();
        let sorted_dist: Vec<Vec<u32>> = order
            .iter()
            .map(|&i| order.iter().map(|&j| distances[i][j]).collect())
            .collect();
        for (i, row) in sorted_dist.iter().enumerate() {
            let from = sorted_nodes[i].id;
            let local = row[i];
            for (j, &d) in row.iter().enumerate() {
                let to = sorted_nodes[j].id;
                if d == 0 {
                    return Err(TopologyError::ZeroDistance { from, to });
                }
                if i != j && d <= local {
                    return Err(TopologyError::DiagonalNotMinimum {
                        from,
                        to,
                        local,
                        remote: d,
                    });
                }
            }
        }
        Ok(Topology {
            nodes: sorted_nodes,
            distances: sorted_dist,
        })
    }

    /// A synthetic topology of `n` nodes numbered `0..n`, each with `mem_bytes_per_node` bytes
    /// and no CPUs, with the given distance matrix.
    pub fn synthetic(
        n: usize,
        mem_bytes_per_node: u64,
        distances: Vec<Vec<u32>>,
    ) -> Result<Self, TopologyError> {
        if n > MAX_NODES {
            return Err(TopologyError::TooManyNodes(n));
        }
        let nodes = (0..n)
            .map(|i| NodeInfo {
                // n <= MAX_NODES, which fits u16.
                id: NodeId(i as u16),
                mem_bytes: mem_bytes_per_node,
                has_memory: mem_bytes_per_node > 0,
                cpus: Vec::new(),
            })
            .collect();
        Self::new(nodes, distances)
    }

    /// `n` nodes, every pair at distance `remote`, each node at `local` from itself
    /// (the conventional values are [`LOCAL_DISTANCE`] and [`REMOTE_DISTANCE`]).
    pub fn uniform(
        n: usize,
        mem_bytes_per_node: u64,
        local: u32,
        remote: u32,
    ) -> Result<Self, TopologyError> {
        let d = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| if i == j { local } else { remote })
                    .collect()
            })
            .collect();
        Self::synthetic(n, mem_bytes_per_node, d)
    }

    /// One node holding `mem_bytes`: the topology of a host without NUMA.
    pub fn single(mem_bytes: u64) -> Self {
        Topology {
            nodes: vec![NodeInfo {
                id: NodeId(0),
                mem_bytes,
                has_memory: mem_bytes > 0,
                cpus: Vec::new(),
            }],
            distances: vec![vec![LOCAL_DISTANCE]],
        }
    }

    /// Read the topology from a sysfs node directory (normally `/sys/devices/system/node`).
    ///
    /// Reads `online` (or, when absent, the `node<N>` directories), `has_memory` (optional),
    /// and for every online node `node<N>/meminfo` (`MemTotal`), `node<N>/distance` (one
    /// entry per online node, in ascending node order) and `node<N>/cpulist`.
    pub fn from_sysfs(root: &Path) -> Result<Self, TopologyError> {
        let online_path = root.join("online");
        let online: Vec<u32> = if online_path.exists() {
            parse_list_file(&online_path)?
        } else {
            list_node_dirs(root)?
        };
        let has_memory_path = root.join("has_memory");
        let has_memory: Option<Vec<u32>> = if has_memory_path.exists() {
            Some(parse_list_file(&has_memory_path)?)
        } else {
            None
        };
        let mut nodes = Vec::with_capacity(online.len());
        let mut distances = Vec::with_capacity(online.len());
        for &n in &online {
            let id = u16::try_from(n).map_err(|_| TopologyError::Parse {
                path: online_path.clone(),
                reason: format!("node number {n} out of range"),
            })?;
            let dir = root.join(format!("node{n}"));
            let mem_bytes = read_mem_total(&dir.join("meminfo"))?;
            let dist_path = dir.join("distance");
            let row = read_file(&dist_path)?
                .split_whitespace()
                .map(|t| {
                    t.parse::<u32>().map_err(|e| TopologyError::Parse {
                        path: dist_path.clone(),
                        reason: format!("bad distance {t:?}: {e}"),
                    })
                })
                .collect::<Result<Vec<u32>, _>>()?;
            let cpulist_path = dir.join("cpulist");
            let cpus = if cpulist_path.exists() {
                parse_list_file(&cpulist_path)?
            } else {
                Vec::new()
            };
            let has_mem = match &has_memory {
                Some(list) => list.contains(&n),
                None => mem_bytes > 0,
            };
            nodes.push(NodeInfo {
                id: NodeId(id),
                mem_bytes,
                has_memory: has_mem,
                cpus,
            });
            distances.push(row);
        }
        Self::new(nodes, distances)
    }

    /// The host's topology from `/sys/devices/system/node`, if that directory exists.
    pub fn from_host() -> Option<Result<Self, TopologyError>> {
        let root = Path::new("/sys/devices/system/node");
        root.exists().then(|| Self::from_sysfs(root))
    }

    /// The nodes, ascending by id.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Always false: a valid topology has at least one node.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The node ids, ascending.
    pub fn node_ids(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes.iter().map(|n| n.id)
    }

    /// Position of `node` in [`Topology::nodes`] and the distance matrix.
    pub fn index_of(&self, node: NodeId) -> Option<usize> {
        self.nodes.binary_search_by_key(&node, |n| n.id).ok()
    }

    /// Whether the topology holds `node`.
    pub fn contains(&self, node: NodeId) -> bool {
        self.index_of(node).is_some()
    }

    /// The node's description.
    pub fn node(&self, node: NodeId) -> Option<&NodeInfo> {
        self.index_of(node).map(|i| &self.nodes[i])
    }

    /// Distance from `from` to `to`.
    pub fn distance(&self, from: NodeId, to: NodeId) -> Result<u32, TopologyError> {
        let i = self
            .index_of(from)
            .ok_or(TopologyError::UnknownNode(from))?;
        let j = self.index_of(to).ok_or(TopologyError::UnknownNode(to))?;
        Ok(self.distances[i][j])
    }

    /// The distance matrix, rows and columns in node order.
    pub fn distances(&self) -> &[Vec<u32>] {
        &self.distances
    }

    /// Every node, nearest to `from` first (`from` itself leads). Ties go to the lower id.
    pub fn nodes_by_distance(&self, from: NodeId) -> Result<Vec<NodeId>, TopologyError> {
        let all: Vec<NodeId> = self.node_ids().collect();
        self.sort_by_distance(from, &all)
    }

    /// `set` sorted by distance from `from` (ties to the lower id). Every node must exist.
    pub fn sort_by_distance(
        &self,
        from: NodeId,
        set: &[NodeId],
    ) -> Result<Vec<NodeId>, TopologyError> {
        let i = self
            .index_of(from)
            .ok_or(TopologyError::UnknownNode(from))?;
        let mut keyed = Vec::with_capacity(set.len());
        for &n in set {
            let j = self.index_of(n).ok_or(TopologyError::UnknownNode(n))?;
            keyed.push((self.distances[i][j], n));
        }
        keyed.sort_unstable();
        Ok(keyed.into_iter().map(|(_, n)| n).collect())
    }

    /// The node that holds `cpu`, if any.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<NodeId> {
        self.nodes
            .iter()
            .find(|n| n.cpus.binary_search(&cpu).is_ok())
            .map(|n| n.id)
    }

    /// Total memory over all nodes, in bytes.
    pub fn total_mem_bytes(&self) -> u64 {
        self.nodes.iter().map(|n| n.mem_bytes).sum()
    }
}

fn read_file(path: &Path) -> Result<String, TopologyError> {
    fs::read_to_string(path).map_err(|source| TopologyError::Io {
        path: path.to_owned(),
        source,
    })
}

fn parse_list_file(path: &Path) -> Result<Vec<u32>, TopologyError> {
    parse_list(&read_file(path)?).map_err(|reason| TopologyError::Parse {
        path: path.to_owned(),
        reason,
    })
}

/// Parse a Linux list such as `0-3,8,10-11` (empty or blank means no entries). The result is
/// sorted and free of duplicates.
pub fn parse_list(s: &str) -> Result<Vec<u32>, String> {
    let mut out = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.trim().is_empty()) {
        let part = part.trim();
        let num = |t: &str| {
            t.trim()
                .parse::<u32>()
                .map_err(|e| format!("bad number {t:?}: {e}"))
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!("descending range {part:?}"));
                }
                if b - a >= 1 << 20 {
                    return Err(format!("range {part:?} too large"));
                }
                out.extend(a..=b);
            }
            None => out.push(num(part)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

fn list_node_dirs(root: &Path) -> Result<Vec<u32>, TopologyError> {
    let rd = fs::read_dir(root).map_err(|source| TopologyError::Io {
        path: root.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|source| TopologyError::Io {
            path: root.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        if let Some(num) = name.to_str().and_then(|s| s.strip_prefix("node")) {
            if let Ok(n) = num.parse::<u32>() {
                out.push(n);
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

/// `MemTotal` from a per-node meminfo (`Node 0 MemTotal:   4548812 kB`), in bytes.
fn read_mem_total(path: &Path) -> Result<u64, TopologyError> {
    let text = read_file(path)?;
    let bad = |reason: String| TopologyError::Parse {
        path: path.to_owned(),
        reason,
    };
    for line in text.lines() {
        let Some((_, rest)) = line.split_once("MemTotal:") else {
            continue;
        };
        let mut it = rest.split_whitespace();
        let value = it
            .next()
            .ok_or_else(|| bad("MemTotal has no value".into()))?;
        let kib: u64 = value
            .parse()
            .map_err(|e| bad(format!("bad MemTotal {value:?}: {e}")))?;
        return match it.next() {
            Some("kB") | None => kib
                .checked_mul(1024)
                .ok_or_else(|| bad("MemTotal overflows".into())),
            Some(unit) => Err(bad(format!("unknown unit {unit:?}"))),
        };
    }
    Err(bad("no MemTotal line".into()))
}

#[cfg(test)]
#[path = "topology_tests.rs"]
mod tests;
