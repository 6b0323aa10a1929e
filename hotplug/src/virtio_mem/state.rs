//! Which blocks of the region are plugged, and the region's sizes.

use super::request::BlockRangeState;

/// A checked run of blocks: indices `first .. first + count` of the region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRange {
    /// Index of the first block.
    pub first: usize,
    /// Number of blocks (at least 1).
    pub count: usize,
}

/// Why a request's `(addr, nb_blocks)` is unacceptable. Each is answered with ERROR.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// `addr` is not a multiple of the block size.
    #[error("address {0:#x} is not block aligned")]
    Misaligned(u64),
    /// `nb_blocks` is 0.
    #[error("request covers no blocks")]
    ZeroBlocks,
    /// `addr + nb_blocks * block_size` overflows.
    #[error("range end overflows")]
    Overflow,
    /// Part of the range lies outside the usable region.
    #[error("range [{addr:#x}, +{len:#x}) leaves the usable region")]
    OutOfRange {
        /// Range start.
        addr: u64,
        /// Range length.
        len: u64,
    },
}

/// The plugged bitmap of a region plus its sizes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockState {
    addr: u64,
    region_size: u64,
    block_size: u64,
    usable_region_size: u64,
    bitmap: Vec<u64>,
    nr_blocks: usize,
    plugged_blocks: usize,
}

impl BlockState {
    /// All blocks unplugged, nothing usable. The caller has validated the geometry
    /// ([`super::VirtioMemConfig::validate`]); a block count that does not fit a `usize`
    /// yields an empty region rather than a panic.
    pub fn new(addr: u64, region_size: u64, block_size: u64) -> Self {
        let nr_blocks = usize::try_from(region_size / block_size.max(1)).unwrap_or(0);
        BlockState {
            addr,
            region_size,
            block_size,
            usable_region_size: 0,
            bitmap: vec![0; nr_blocks.div_ceil(64)],
            nr_blocks,
            plugged_blocks: 0,
        }
    }

    /// Region start.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Region size.
    pub fn region_size(&self) -> u64 {
        self.region_size
    }

    /// Block size.
    pub fn block_size(&self) -> u64 {
        self.block_size
    }

    /// Number of blocks in the region.
    pub fn nr_blocks(&self) -> usize {
        self.nr_blocks
    }

    /// Size of the part of the region where blocks may be plugged.
    pub fn usable_region_size(&self) -> u64 {
        self.usable_region_size
    }

    /// Bytes plugged.
    pub fn plugged_size(&self) -> u64 {
        self.plugged_blocks as u64 * self.block_size
    }

    /// Number of plugged blocks.
    pub fn plugged_blocks(&self) -> usize {
        self.plugged_blocks
    }

    /// Set the usable size, rounded up to a block and capped at the region. It must not cut
    /// off plugged blocks: the caller only shrinks it when nothing is plugged.
    pub fn set_usable_region_size(&mut self, size: u64) {
        let bs = self.block_size;
        let rounded = size.div_ceil(bs).saturating_mul(bs);
        self.usable_region_size = rounded.min(self.region_size);
    }

    /// Check a request's range: aligned, at least one block, no overflow, inside the usable
    /// region.
    pub fn check_range(&self, addr: u64, nb_blocks: u16) -> Result<BlockRange, RangeError> {
        if addr % self.block_size != 0 {
            return Err(RangeError::Misaligned(addr));
        }
        if nb_blocks == 0 {
            return Err(RangeError::ZeroBlocks);
        }
        let len = u64::from(nb_blocks)
            .checked_mul(self.block_size)
            .ok_or(RangeError::Overflow)?;
        let end = addr.checked_add(len).ok_or(RangeError::Overflow)?;
        let usable_end = self.addr + self.usable_region_size;
        if addr < self.addr || end > usable_end {
            return Err(RangeError::OutOfRange { addr, len });
        }
        let first = usize::try_from((addr - self.addr) / self.block_size)
            .map_err(|_| RangeError::OutOfRange { addr, len })?;
        Ok(BlockRange {
            first,
            count: usize::from(nb_blocks),
        })
    }

    /// Guest-physical start and length of `r`.
    pub fn range_gpa(&self, r: BlockRange) -> (u64, u64) {
        (
            self.addr + r.first as u64 * self.block_size,
            r.count as u64 * self.block_size,
        )
    }

    /// Whether block `index` is plugged (false outside the region).
    pub fn is_plugged(&self, index: usize) -> bool {
        index < self.nr_blocks && self.bitmap[index / 64] & (1 << (index % 64)) != 0
    }

    /// Plugged, unplugged or mixed.
    pub fn range_state(&self, r: BlockRange) -> BlockRangeState {
        let plugged = (r.first..r.first + r.count)
            .filter(|&i| self.is_plugged(i))
            .count();
        if plugged == r.count {
            BlockRangeState::Plugged
        } else if plugged == 0 {
            BlockRangeState::Unplugged
        } else {
            BlockRangeState::Mixed
        }
    }

    /// Mark every block of `r` plugged or unplugged. Blocks outside the region are ignored.
    pub fn set_range(&mut self, r: BlockRange, plugged: bool) {
        let end = r.first.saturating_add(r.count).min(self.nr_blocks);
        for i in r.first..end {
            let (word, bit) = (i / 64, 1u64 << (i % 64));
            let was = self.bitmap[word] & bit != 0;
            if plugged && !was {
                self.bitmap[word] |= bit;
                self.plugged_blocks += 1;
            } else if !plugged && was {
                self.bitmap[word] &= !bit;
                self.plugged_blocks -= 1;
            }
        }
    }

    /// Maximal runs of plugged blocks, lowest first.
    pub fn plugged_runs(&self) -> Vec<BlockRange> {
        let mut runs = Vec::new();
        let mut start: Option<usize> = None;
        for i in 0..=self.nr_blocks {
            match (self.is_plugged(i), start) {
                (true, None) => start = Some(i),
                (false, Some(s)) => {
                    runs.push(BlockRange {
                        first: s,
                        count: i - s,
                    });
                    start = None;
                }
                _ => {}
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 4096 * MIB;

    fn state() -> BlockState {
        let mut s = BlockState::new(BASE, 256 * MIB, 2 * MIB);
        s.set_usable_region_size(128 * MIB);
        s
    }

    #[test]
    fn check_range_rules() {
        let s = state();
        assert_eq!(s.nr_blocks(), 128);
        assert_eq!(
            s.check_range(BASE + 2 * MIB, 3),
            Ok(BlockRange { first: 1, count: 3 })
        );
        assert_eq!(
            s.check_range(BASE + MIB, 1),
            Err(RangeError::Misaligned(BASE + MIB))
        );
        assert_eq!(s.check_range(BASE, 0), Err(RangeError::ZeroBlocks));
        assert_eq!(
            s.check_range(u64::MAX - 2 * MIB + 1, 2),
            Err(RangeError::Overflow)
        );
        // Below the region, straddling the usable end, inside the region but not usable.
        assert!(matches!(
            s.check_range(BASE - 2 * MIB, 1),
            Err(RangeError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.check_range(BASE + 126 * MIB, 2),
            Err(RangeError::OutOfRange { .. })
        ));
        assert!(s.check_range(BASE + 126 * MIB, 1).is_ok());
        assert!(matches!(
            s.check_range(BASE + 128 * MIB, 1),
            Err(RangeError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.check_range(BASE, u16::MAX),
            Err(RangeError::OutOfRange { .. })
        ));
    }

    #[test]
    fn set_range_states_and_runs() {
        let mut s = state();
        let r = |first, count| BlockRange { first, count };
        s.set_range(r(2, 3), true);
        s.set_range(r(63, 3), true);
        assert_eq!(s.plugged_blocks(), 6);
        assert_eq!(s.plugged_size(), 12 * MIB);
        assert_eq!(s.range_state(r(2, 3)), BlockRangeState::Plugged);
        assert_eq!(s.range_state(r(0, 2)), BlockRangeState::Unplugged);
        assert_eq!(s.range_state(r(1, 3)), BlockRangeState::Mixed);
        assert_eq!(s.plugged_runs(), vec![r(2, 3), r(63, 3)]);
        // Setting twice does not double count.
        s.set_range(r(2, 3), true);
        assert_eq!(s.plugged_blocks(), 6);
        s.set_range(r(3, 1), false);
        assert_eq!(s.plugged_runs(), vec![r(2, 1), r(4, 1), r(63, 3)]);
        assert_eq!(s.range_gpa(r(63, 3)), (BASE + 126 * MIB, 6 * MIB));
        // The last block of the region is handled.
        s.set_range(r(127, 1), true);
        assert_eq!(s.plugged_runs().last(), Some(&r(127, 1)));
        s.set_range(r(120, 100), false);
        assert!(!s.is_plugged(127));
    }

    #[test]
    fn usable_size_rounds_and_caps() {
        let mut s = state();
        s.set_usable_region_size(3 * MIB);
        assert_eq!(s.usable_region_size(), 4 * MIB);
        s.set_usable_region_size(u64::MAX);
        assert_eq!(s.usable_region_size(), 256 * MIB);
    }
}
