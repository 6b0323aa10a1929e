//! Host figures: pool numbers per node joined with what the VMs published (residency by
//! node and type), and the THP share of the VM windows from `/proc/self/smaps`.

use std::ops::Range;

use tidepool_api::types::{HostInfo, NodeInfo, ResidentByType};

use super::{Published, VmManager};
use crate::hostpool::{PoolError, PoolFigures};
use crate::memory::MIB;

/// Resident and THP-backed bytes of the mappings inside `windows`, from smaps text.
pub(crate) fn thp_from_smaps(smaps: &str, windows: &[Range<usize>]) -> (u64, u64) {
    let mut rss = 0u64;
    let mut huge = 0u64;
    let mut inside = false;
    for line in smaps.lines() {
        let mut parts = line.split_whitespace();
        let Some(first) = parts.next() else { continue };
        if let Some((a, b)) = first.split_once('-') {
            if let (Ok(start), Ok(end)) =
                (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
            {
                inside = windows.iter().any(|w| start >= w.start && end <= w.end);
                continue;
            }
        }
        if !inside {
            continue;
        }
        let kib = parts
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        match first {
            "Rss:" => rss += kib * 1024,
            "AnonHugePages:" => huge += kib * 1024,
            _ => {}
        }
    }
    (rss, huge)
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Per-node sums over the VMs' published residency.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct NodeSums {
    pub unmovable: u64,
    pub movable: u64,
    pub assigned: u64,
}

pub(crate) fn node_sums(published: &[Published], node: guest_mm::NodeId) -> NodeSums {
    let mut s = NodeSums::default();
    for p in published {
        for r in p.residency.iter().filter(|r| r.node == node) {
            s.unmovable += r.unmovable;
            s.movable += r.movable;
            s.assigned += r.assigned;
        }
    }
    s
}

impl VmManager {
    /// Host figures: pool per node, with VM residency and THP share.
    pub fn host_info(&self) -> Result<(HostInfo, PoolFigures), PoolError> {
        let figures = self.pool.figures()?;
        let published: Vec<Published> = self.published().into_iter().map(|(_, p)| p).collect();
        let windows: Vec<Range<usize>> = published.iter().map(|p| p.window.clone()).collect();
        let (rss, huge) = std::fs::read_to_string("/proc/self/smaps")
            .map(|s| thp_from_smaps(&s, &windows))
            .unwrap_or((0, 0));
        // THP is measured over all windows together; /proc does not split it by node.
        let thp_share = ratio(huge, rss).clamp(0.0, 1.0);
        let nodes: Vec<NodeInfo> = figures
            .nodes
            .iter()
            .map(|n| {
                let s = node_sums(&published, n.node);
                let total_mib = n.total_bytes / MIB;
                let assigned_mib = s.assigned / MIB;
                NodeInfo {
                    node: u32::from(n.node.0),
                    total_mib,
                    free_mib: n.free_bytes / MIB,
                    assigned_mib,
                    resident_mib: ResidentByType {
                        unmovable_mib: s.unmovable / MIB,
                        movable_mib: s.movable / MIB,
                        reclaimable_mib: 0,
                    },
                    fragmentation_index: n.fragmentation_index.unwrap_or(0.0),
                    thp_share: if s.unmovable + s.movable > 0 {
                        thp_share
                    } else {
                        0.0
                    },
                    overcommit_ratio: ratio(assigned_mib, total_mib),
                }
            })
            .collect();
        let total_mib: u64 = nodes.iter().map(|n| n.total_mib).sum();
        let assigned_mib: u64 = nodes.iter().map(|n| n.assigned_mib).sum();
        let info = HostInfo {
            free_mib: nodes.iter().map(|n| n.free_mib).sum(),
            total_mib,
            assigned_mib,
            overcommit_ratio: ratio(assigned_mib, total_mib),
            vm_count: u32::try_from(self.count()).unwrap_or(u32::MAX),
            nodes,
        };
        Ok((info, figures))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smaps_parsing_counts_only_window_mappings() {
        let smaps = "\
7f0000000000-7f0000400000 rw-p 00000000 00:00 0
Size:               4096 kB
Rss:                4096 kB
AnonHugePages:      2048 kB
7f0000400000-7f0000600000 ---p 00000000 00:00 0
Rss:                   0 kB
AnonHugePages:         0 kB
7f1000000000-7f1000001000 rw-p 00000000 00:00 0
Rss:                   4 kB
AnonHugePages:         0 kB
";
        let w: Vec<Range<usize>> = std::iter::once(0x7f00_0000_0000..0x7f00_0060_0000).collect();
        assert_eq!(thp_from_smaps(smaps, &w), (4 << 20, 2 << 20));
        assert_eq!(thp_from_smaps(smaps, &[]), (0, 0));
    }
}
