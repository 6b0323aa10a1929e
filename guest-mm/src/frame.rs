//! Frame numbers, orders and migration types: the vocabulary every other module speaks.

use serde::{Deserialize, Serialize};
use std::fmt;

/// log2 of the frame size: frames are 4 KiB.
pub const FRAME_SHIFT: u32 = 12;
/// Bytes in one frame.
pub const FRAME_SIZE: u64 = 1 << FRAME_SHIFT;
/// Highest buddy order: order 18 is a 1 GiB block. Orders 9 (2 MiB, THP) and 15 (128 MiB, a
/// virtio-mem/Linux memory block) are both native.
pub const MAX_ORDER: u8 = 18;
/// Number of distinct orders (`0..=MAX_ORDER`).
pub const NR_ORDERS: usize = MAX_ORDER as usize + 1;
/// Order of a pageblock, the unit that carries a migration type (2 MiB, like Linux on x86_64).
pub const PAGEBLOCK_ORDER: u8 = 9;
/// Frames in one pageblock.
pub const PAGEBLOCK_FRAMES: u64 = 1 << PAGEBLOCK_ORDER;
/// Order of a transparent huge page (2 MiB).
pub const THP_ORDER: u8 = 9;

/// A 4 KiB frame number, global across the pool (frame `n` is byte `n * 4096` of the pool's
/// address space). A newtype so that frame numbers, byte offsets and counts cannot be mixed up.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
pub struct FrameId(pub u64);

impl FrameId {
    /// The frame's byte offset in the pool address space.
    pub const fn byte_offset(self) -> u64 {
        self.0 << FRAME_SHIFT
    }

    /// The frame that contains byte offset `off`.
    pub const fn from_byte_offset(off: u64) -> Self {
        FrameId(off >> FRAME_SHIFT)
    }

    /// Whether this frame starts a naturally aligned block of `order`.
    pub const fn is_aligned(self, order: u8) -> bool {
        self.0 & ((1u64 << order) - 1) == 0
    }

    /// The buddy of the order-`order` block starting here.
    pub const fn buddy(self, order: u8) -> Self {
        FrameId(self.0 ^ (1u64 << order))
    }

    /// `self + n` frames.
    pub const fn add(self, n: u64) -> Self {
        FrameId(self.0 + n)
    }

    /// First frame of the pageblock that holds this frame.
    pub const fn pageblock_start(self) -> Self {
        FrameId(self.0 & !(PAGEBLOCK_FRAMES - 1))
    }
}

impl fmt::Debug for FrameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Frame({:#x})", self.0)
    }
}

impl fmt::Display for FrameId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// Frames in a block of `order`.
pub const fn frames_in(order: u8) -> u64 {
    1u64 << order
}

/// Bytes in a block of `order`.
pub const fn bytes_in(order: u8) -> u64 {
    FRAME_SIZE << order
}

/// Migration type of a pageblock or an allocation (Linux's `migratetype`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrateType {
    /// Memory that never moves: boot RAM, VMM data structures.
    Unmovable = 0,
    /// Memory that compaction may move: hot-pluggable guest memory.
    Movable = 1,
    /// Memory the host may take back (reported-free, cache-like).
    Reclaimable = 2,
    /// Ranges being offlined: never handed out.
    Isolate = 3,
}

impl MigrateType {
    /// Number of migration types.
    pub const COUNT: usize = 4;
    /// Every type, in index order.
    pub const ALL: [MigrateType; 4] = [
        MigrateType::Unmovable,
        MigrateType::Movable,
        MigrateType::Reclaimable,
        MigrateType::Isolate,
    ];
    /// The types an allocation may ask for (everything but `Isolate`).
    pub const ALLOCATABLE: [MigrateType; 3] = [
        MigrateType::Unmovable,
        MigrateType::Movable,
        MigrateType::Reclaimable,
    ];

    /// Index for per-type arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// Inverse of [`MigrateType::index`].
    pub const fn from_index(i: usize) -> Option<Self> {
        match i {
            0 => Some(MigrateType::Unmovable),
            1 => Some(MigrateType::Movable),
            2 => Some(MigrateType::Reclaimable),
            3 => Some(MigrateType::Isolate),
            _ => None,
        }
    }

    /// Fallback order when this type's own free lists are empty (Linux's `fallbacks[]`).
    /// `Isolate` has none: it is never allocated from.
    pub const fn fallbacks(self) -> &'static [MigrateType] {
        match self {
            MigrateType::Unmovable => &[MigrateType::Reclaimable, MigrateType::Movable],
            MigrateType::Movable => &[MigrateType::Reclaimable, MigrateType::Unmovable],
            MigrateType::Reclaimable => &[MigrateType::Unmovable, MigrateType::Movable],
            MigrateType::Isolate => &[],
        }
    }
}

impl fmt::Display for MigrateType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            MigrateType::Unmovable => "unmovable",
            MigrateType::Movable => "movable",
            MigrateType::Reclaimable => "reclaimable",
            MigrateType::Isolate => "isolate",
        };
        f.write_str(s)
    }
}

/// A host NUMA node number.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct NodeId(pub u16);

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buddy_and_alignment() {
        assert_eq!(FrameId(0).buddy(0), FrameId(1));
        assert_eq!(FrameId(512).buddy(9), FrameId(0));
        assert!(FrameId(1024).is_aligned(10));
        assert!(!FrameId(1024).is_aligned(11));
        assert_eq!(FrameId(1000).pageblock_start(), FrameId(512));
        assert_eq!(bytes_in(THP_ORDER), 2 << 20);
        assert_eq!(bytes_in(15), 128 << 20);
        assert_eq!(FrameId::from_byte_offset(8192), FrameId(2));
    }

    #[test]
    fn fallbacks_never_include_self_or_isolate() {
        for mt in MigrateType::ALLOCATABLE {
            assert!(!mt.fallbacks().contains(&mt));
            assert!(!mt.fallbacks().contains(&MigrateType::Isolate));
            assert_eq!(MigrateType::from_index(mt.index()), Some(mt));
        }
        assert!(MigrateType::Isolate.fallbacks().is_empty());
    }
}
