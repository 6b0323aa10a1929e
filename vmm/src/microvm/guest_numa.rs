//! Guest NUMA nodes of a Linux VM whose policy names several host nodes.
//!
//! Boot RAM is cut into one contiguous guest-physical part per host node of the policy, in the
//! policy's order; part `i` takes its pool blocks from host node `nodes[i]` only and is guest
//! proximity domain `i` in the SRAT. The cuts are on 128 MiB lines (a guest memory block), and
//! the last part takes the remainder. The hot-plug region is listed too (hot-pluggable, domain
//! 0), so memory virtio-mem adds lands on guest node 0 (its blocks still come from the pool
//! under the VM's policy). A VM too small for one 128 MiB line per node keeps one guest node
//! and the policy's block-by-block placement.

use guest_mm::frame::NodeId;
use guest_mm::policy::NumaPolicy;

use crate::acpi::NumaMemory;
use crate::hostpool::POOL_BLOCK_BYTES;
use crate::memory::{Layout, MEMSLOT_SIZE};

/// One guest node's share of boot RAM: the host node and the number of 2 MiB blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct GuestNodePart {
    /// Host node the blocks come from.
    pub node: NodeId,
    /// 2 MiB blocks of boot RAM (in guest-physical order after the previous parts).
    pub blocks: u64,
}

/// The parts for `policy` over `boot_blocks` 2 MiB blocks, or None for one guest node.
pub(super) fn split(policy: &NumaPolicy, boot_blocks: u64) -> Option<Vec<GuestNodePart>> {
    let nodes = match policy {
        NumaPolicy::Interleave(v) | NumaPolicy::Bind(v) => {
            let mut seen: Vec<NodeId> = Vec::new();
            for n in v {
                if !seen.contains(n) {
                    seen.push(*n);
                }
            }
            seen
        }
        NumaPolicy::Local | NumaPolicy::Preferred(_) => return None,
    };
    if nodes.len() < 2 {
        return None;
    }
    let line = MEMSLOT_SIZE / POOL_BLOCK_BYTES;
    let per = boot_blocks / nodes.len() as u64 / line * line;
    if per == 0 {
        return None;
    }
    let last = nodes.len() - 1;
    Some(
        nodes
            .iter()
            .enumerate()
            .map(|(i, &node)| GuestNodePart {
                node,
                blocks: if i == last {
                    boot_blocks - per * last as u64
                } else {
                    per
                },
            })
            .collect(),
    )
}

/// The SRAT memory ranges of `parts` over `layout`'s boot RAM (a part may straddle the MMIO
/// hole: one range on each side), plus the hot-plug region.
pub(super) fn srat_ranges(layout: &Layout, parts: &[GuestNodePart]) -> Vec<NumaMemory> {
    let mut out: Vec<NumaMemory> = Vec::new();
    let mut ranges = layout.boot_ram_ranges().into_iter();
    let mut cur = ranges.next();
    for (i, part) in parts.iter().enumerate() {
        let mut left = part.blocks * POOL_BLOCK_BYTES;
        while left > 0 {
            let Some(r) = cur.as_mut() else { break };
            let take = left.min(r.end - r.start);
            out.push(NumaMemory {
                base: r.start,
                size: take,
                proximity: i as u32,
                hotplug: false,
            });
            r.start += take;
            left -= take;
            if r.start == r.end {
                cur = ranges.next();
            }
        }
    }
    if let Some(h) = layout.hotplug() {
        out.push(NumaMemory {
            base: h.start,
            size: h.end - h.start,
            proximity: 0,
            hotplug: true,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{LayoutConfig, GIB, MIB};

    fn n(v: &[u16]) -> Vec<NodeId> {
        v.iter().map(|&x| NodeId(x)).collect()
    }

    #[test]
    fn only_multi_node_policies_split() {
        assert_eq!(split(&NumaPolicy::Local, 256), None);
        assert_eq!(split(&NumaPolicy::Preferred(NodeId(1)), 256), None);
        assert_eq!(split(&NumaPolicy::Bind(n(&[1])), 256), None);
        assert_eq!(split(&NumaPolicy::Interleave(n(&[1, 1])), 256), None);
        // 64 MiB over two nodes: less than 128 MiB each.
        assert_eq!(split(&NumaPolicy::Interleave(n(&[0, 1])), 32), None);
    }

    #[test]
    fn parts_are_cut_on_128_mib_lines() {
        // 512 MiB = 256 blocks over two nodes: 256 MiB each.
        let p = split(&NumaPolicy::Interleave(n(&[0, 1])), 256).unwrap();
        assert_eq!(
            p,
            vec![
                GuestNodePart {
                    node: NodeId(0),
                    blocks: 128
                },
                GuestNodePart {
                    node: NodeId(1),
                    blocks: 128
                }
            ]
        );
        // 640 MiB over three nodes (policy order kept): 128, 128, 384.
        let p = split(&NumaPolicy::Bind(n(&[2, 0, 1])), 320).unwrap();
        let got: Vec<(u16, u64)> = p.iter().map(|x| (x.node.0, x.blocks)).collect();
        assert_eq!(got, vec![(2, 64), (0, 64), (1, 192)]);
    }

    #[test]
    fn srat_ranges_follow_the_hole() {
        let layout = Layout::new(LayoutConfig {
            boot_ram: 4 * GIB,
            hotplug_size: GIB,
        })
        .unwrap();
        let p = split(&NumaPolicy::Interleave(n(&[0, 1])), 4 * GIB / (2 * MIB)).unwrap();
        let r = srat_ranges(&layout, &p);
        let got: Vec<(u64, u64, u32, bool)> = r
            .iter()
            .map(|m| (m.base, m.size, m.proximity, m.hotplug))
            .collect();
        let hp = layout.hotplug().unwrap();
        assert_eq!(
            got,
            vec![
                (0, 2 * GIB, 0, false),
                (2 * GIB, GIB, 1, false),
                (4 * GIB, GIB, 1, false),
                (hp.start, GIB, 0, true),
            ]
        );
    }
}
