//! Guest memory statistics: the stats buffer is an array of 10-byte entries, a little-endian
//! u16 tag followed by a u64 value (packed). Tags follow Linux's
//! `include/uapi/linux/virtio_balloon.h`: 0-9 from the virtio spec, 10-15 from newer kernels.

use serde::Serialize;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Size of one stats entry.
pub const STAT_ENTRY_SIZE: usize = 10;
/// Largest stats buffer read (far more than the 16 tags Linux knows).
pub const MAX_STATS_BYTES: usize = 4096;

/// A statistics tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum StatTag {
    /// Bytes swapped in.
    SwapIn = 0,
    /// Bytes swapped out.
    SwapOut = 1,
    /// Major page faults.
    MajorFaults = 2,
    /// Minor page faults.
    MinorFaults = 3,
    /// Free memory in bytes.
    FreeMemory = 4,
    /// Total memory in bytes.
    TotalMemory = 5,
    /// Available memory in bytes (estimate).
    AvailableMemory = 6,
    /// Disk caches in bytes.
    DiskCaches = 7,
    /// Hugetlb page allocations.
    HugetlbAllocations = 8,
    /// Hugetlb page allocation failures.
    HugetlbFailures = 9,
    /// OOM killer invocations.
    OomKills = 10,
    /// Allocation stalls.
    AllocStalls = 11,
    /// Bytes scanned asynchronously (kswapd).
    AsyncScans = 12,
    /// Bytes scanned in direct reclaim.
    DirectScans = 13,
    /// Bytes reclaimed asynchronously (kswapd).
    AsyncReclaims = 14,
    /// Bytes reclaimed directly.
    DirectReclaims = 15,
}

/// Number of known tags.
pub const NR_STAT_TAGS: usize = 16;

impl StatTag {
    /// Every known tag in tag order.
    pub const ALL: [StatTag; NR_STAT_TAGS] = [
        StatTag::SwapIn,
        StatTag::SwapOut,
        StatTag::MajorFaults,
        StatTag::MinorFaults,
        StatTag::FreeMemory,
        StatTag::TotalMemory,
        StatTag::AvailableMemory,
        StatTag::DiskCaches,
        StatTag::HugetlbAllocations,
        StatTag::HugetlbFailures,
        StatTag::OomKills,
        StatTag::AllocStalls,
        StatTag::AsyncScans,
        StatTag::DirectScans,
        StatTag::AsyncReclaims,
        StatTag::DirectReclaims,
    ];

    /// The tag with wire value `v`, if known.
    pub fn from_wire(v: u16) -> Option<StatTag> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// Linux's name for the tag (`VIRTIO_BALLOON_S_NAMES`).
    pub fn name(self) -> &'static str {
        match self {
            StatTag::SwapIn => "swap-in",
            StatTag::SwapOut => "swap-out",
            StatTag::MajorFaults => "major-faults",
            StatTag::MinorFaults => "minor-faults",
            StatTag::FreeMemory => "free-memory",
            StatTag::TotalMemory => "total-memory",
            StatTag::AvailableMemory => "available-memory",
            StatTag::DiskCaches => "disk-caches",
            StatTag::HugetlbAllocations => "hugetlb-allocations",
            StatTag::HugetlbFailures => "hugetlb-failures",
            StatTag::OomKills => "oom-kills",
            StatTag::AllocStalls => "alloc-stalls",
            StatTag::AsyncScans => "async-scans",
            StatTag::DirectScans => "direct-scans",
            StatTag::AsyncReclaims => "async-reclaims",
            StatTag::DirectReclaims => "direct-reclaims",
        }
    }
}

/// One statistics update from the guest, with when it arrived.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GuestStats {
    /// Milliseconds since the Unix epoch when the buffer arrived.
    pub unix_ms: u64,
    /// Value per known tag (`None`: the guest did not send it).
    #[serde(skip)]
    pub values: [Option<u64>; NR_STAT_TAGS],
    /// Entries with unknown tags in this update.
    pub unknown_tags: u64,
    /// Bytes at the end that did not form a whole entry.
    pub trailing_bytes: u64,
    /// Named view of `values` (for JSON).
    pub named: Vec<(&'static str, u64)>,
    #[serde(skip)]
    received: Option<Instant>,
}

impl GuestStats {
    /// Parse a stats buffer. Later entries with the same tag win.
    pub fn parse(bytes: &[u8]) -> GuestStats {
        let mut values = [None; NR_STAT_TAGS];
        let mut unknown = 0;
        let chunks = bytes.chunks_exact(STAT_ENTRY_SIZE);
        let trailing = chunks.remainder().len() as u64;
        for e in chunks {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..10]);
            match StatTag::from_wire(tag) {
                Some(t) => values[t as usize] = Some(u64::from_le_bytes(v)),
                None => unknown += 1,
            }
        }
        let named = StatTag::ALL
            .iter()
            .filter_map(|t| values[*t as usize].map(|v| (t.name(), v)))
            .collect();
        GuestStats {
            unix_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            values,
            unknown_tags: unknown,
            trailing_bytes: trailing,
            named,
            received: Some(Instant::now()),
        }
    }

    /// The value of `tag`, if the guest sent it.
    pub fn get(&self, tag: StatTag) -> Option<u64> {
        self.values[tag as usize]
    }

    /// Time since this update arrived.
    pub fn age(&self) -> Option<std::time::Duration> {
        self.received.map(|r| r.elapsed())
    }
}

/// Encode stats entries (what a driver writes); used by tests and the benchmark driver.
pub fn encode(entries: &[(u16, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * STAT_ENTRY_SIZE);
    for &(tag, val) in entries {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&val.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tag_parses_and_unknown_ones_are_counted() {
        let mut entries: Vec<(u16, u64)> = (0..16u16).map(|t| (t, 1000 + u64::from(t))).collect();
        entries.push((16, 5));
        entries.push((0xffff, 6));
        let mut buf = encode(&entries);
        buf.extend_from_slice(&[1, 2, 3]);
        let s = GuestStats::parse(&buf);
        for t in StatTag::ALL {
            assert_eq!(s.get(t), Some(1000 + t as u64), "{}", t.name());
        }
        assert_eq!(s.unknown_tags, 2);
        assert_eq!(s.trailing_bytes, 3);
        assert_eq!(s.named.len(), 16);
        assert_eq!(s.named[15], ("direct-reclaims", 1015));
        assert!(s.age().is_some());
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["unknown_tags"], 2);
    }

    #[test]
    fn partial_and_empty_buffers() {
        let s = GuestStats::parse(&encode(&[(4, 7), (4, 9)]));
        assert_eq!(s.get(StatTag::FreeMemory), Some(9));
        assert_eq!(s.get(StatTag::SwapIn), None);
        let e = GuestStats::parse(&[]);
        assert!(e.named.is_empty());
        assert_eq!(StatTag::from_wire(16), None);
        assert_eq!(StatTag::from_wire(11), Some(StatTag::AllocStalls));
    }
}
