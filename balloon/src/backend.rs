//! The host side of reclaim: a backend that gives guest RAM back to the host, and a residency
//! probe used to estimate refaults. The VMM uses [`crate::MmapBackend`]; tests can use
//! [`RecordingBackend`].

use crate::error::BackendError;
use crate::PAGE_SIZE;
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

/// Gives guest RAM back to the host.
pub trait ReclaimBackend: Send {
    /// Discard `[gpa, gpa + len)`: the host frees the backing memory and the guest reads zeroes
    /// (or the file's contents for a private file mapping) on its next touch. The balloon only
    /// calls this for 4 KiB-aligned ranges that [`ReclaimBackend::guest_ram`] covers entirely.
    fn discard(&mut self, gpa: u64, len: u64) -> Result<(), BackendError>;

    /// The guest RAM this backend owns, as sorted, non-overlapping `(gpa, len)` ranges. The
    /// balloon never discards outside of it.
    fn guest_ram(&self) -> &[(u64, u64)];

    /// The host page size backing guest RAM when it is larger than 4 KiB (2 MiB with THP):
    /// discards that cover part of such a page split it. `None` for 4 KiB backing.
    fn huge_page_size(&self) -> Option<u64> {
        None
    }
}

/// Reports which 4 KiB pages of guest RAM are resident on the host (`mincore`).
pub trait ResidencyProbe {
    /// Fill `out[i]` with whether page `i` of `[gpa, gpa + out.len() * 4096)` is resident.
    fn residency(&self, gpa: u64, out: &mut [bool]) -> Result<(), BackendError>;
}

/// Sorted, non-overlapping guest RAM ranges with containment checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RamMap {
    ranges: Vec<(u64, u64)>,
}

impl RamMap {
    /// A map from ranges in any order; empty ranges are dropped, overlapping or overflowing
    /// ones refused.
    pub fn new(ranges: &[(u64, u64)]) -> Result<Self, BackendError> {
        let mut v: Vec<(u64, u64)> = ranges.iter().copied().filter(|r| r.1 > 0).collect();
        v.sort_unstable();
        for &(gpa, len) in &v {
            if gpa.checked_add(len).is_none() {
                return Err(BackendError::Unsupported(format!(
                    "range {gpa:#x}+{len:#x} overflows"
                )));
            }
            if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
                return Err(BackendError::Misaligned { gpa, len });
            }
        }
        for w in v.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(BackendError::Unsupported(format!(
                    "ranges {:#x}+{:#x} and {:#x}+{:#x} overlap",
                    w[0].0, w[0].1, w[1].0, w[1].1
                )));
            }
        }
        Ok(RamMap { ranges: v })
    }

    /// The ranges, sorted.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Total bytes.
    pub fn total(&self) -> u64 {
        self.ranges.iter().map(|r| r.1).sum()
    }

    /// Whether `[gpa, gpa + len)` is entirely RAM (it may span adjacent ranges). False for an
    /// empty or overflowing range.
    pub fn contains(&self, gpa: u64, len: u64) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        if len == 0 {
            return false;
        }
        let mut cur = gpa;
        // First range starting at or below `cur`.
        let idx = self.ranges.partition_point(|r| r.0 <= cur);
        if idx == 0 {
            return false;
        }
        for &(start, rlen) in &self.ranges[idx - 1..] {
            if start > cur {
                return false;
            }
            let rend = start + rlen;
            if rend > cur {
                cur = rend;
            }
            if cur >= end {
                return true;
            }
        }
        false
    }

    /// Split `[gpa, gpa + len)` (which must be contained) at range boundaries.
    pub fn split(&self, gpa: u64, len: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let end = gpa.saturating_add(len);
        self.ranges.iter().filter_map(move |&(s, l)| {
            let a = s.max(gpa);
            let b = (s + l).min(end);
            (a < b).then(|| (a, b - a))
        })
    }
}

/// One call a [`RecordingBackend`] saw.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Discard {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

#[derive(Debug, Default)]
struct RecordingState {
    discards: Vec<Discard>,
    resident: BTreeSet<u64>,
    fail: Option<String>,
}

/// A [`ReclaimBackend`] and [`ResidencyProbe`] fake: it records discards and simulates host
/// residency (all RAM starts resident; a discard makes pages non-resident; [`Self::touch`]
/// makes them resident again, as a guest refault would). Clones share state, so a test keeps
/// one clone and gives another to the device.
#[derive(Clone, Debug)]
pub struct RecordingBackend {
    ram: RamMap,
    huge: Option<u64>,
    state: Arc<Mutex<RecordingState>>,
}

impl RecordingBackend {
    /// A fake over `ram` with every page resident.
    pub fn new(ram: &[(u64, u64)]) -> Result<Self, BackendError> {
        let ram = RamMap::new(ram)?;
        let mut resident = BTreeSet::new();
        for &(gpa, len) in ram.ranges() {
            resident.extend((gpa..gpa + len).step_by(PAGE_SIZE as usize));
        }
        Ok(RecordingBackend {
            ram,
            huge: None,
            state: Arc::new(Mutex::new(RecordingState {
                resident,
                ..Default::default()
            })),
        })
    }

    /// Pretend guest RAM is backed by huge pages of `size` bytes.
    pub fn with_huge_pages(mut self, size: u64) -> Self {
        self.huge = Some(size);
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, RecordingState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Every discard so far.
    pub fn discards(&self) -> Vec<Discard> {
        self.lock().discards.clone()
    }

    /// Total bytes discarded.
    pub fn discarded_bytes(&self) -> u64 {
        self.lock().discards.iter().map(|d| d.len).sum()
    }

    /// Forget recorded discards (residency is kept).
    pub fn clear_discards(&self) {
        self.lock().discards.clear();
    }

    /// Make discards fail with `reason` (or succeed again with `None`).
    pub fn set_failure(&self, reason: Option<&str>) {
        self.lock().fail = reason.map(str::to_owned);
    }

    /// Simulate the guest touching `[gpa, gpa + len)`: those pages become resident.
    pub fn touch(&self, gpa: u64, len: u64) {
        let mut s = self.lock();
        let mut p = gpa & !(PAGE_SIZE - 1);
        while p < gpa.saturating_add(len) {
            if self.ram.contains(p, PAGE_SIZE) {
                s.resident.insert(p);
            }
            p += PAGE_SIZE;
        }
    }

    /// Resident bytes in the simulation.
    pub fn resident_bytes(&self) -> u64 {
        self.lock().resident.len() as u64 * PAGE_SIZE
    }
}

impl ReclaimBackend for RecordingBackend {
    fn discard(&mut self, gpa: u64, len: u64) -> Result<(), BackendError> {
        if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 {
            return Err(BackendError::Misaligned { gpa, len });
        }
        if !self.ram.contains(gpa, len) {
            return Err(BackendError::NotGuestRam { gpa, len });
        }
        let mut s = self.lock();
        if let Some(reason) = s.fail.clone() {
            return Err(BackendError::Injected(reason));
        }
        s.discards.push(Discard { gpa, len });
        let keys: Vec<u64> = s.resident.range(gpa..gpa + len).copied().collect();
        for k in keys {
            s.resident.remove(&k);
        }
        Ok(())
    }

    fn guest_ram(&self) -> &[(u64, u64)] {
        self.ram.ranges()
    }

    fn huge_page_size(&self) -> Option<u64> {
        self.huge
    }
}

impl ResidencyProbe for RecordingBackend {
    fn residency(&self, gpa: u64, out: &mut [bool]) -> Result<(), BackendError> {
        let len = out.len() as u64 * PAGE_SIZE;
        if !self.ram.contains(gpa, len) {
            return Err(BackendError::NotGuestRam { gpa, len });
        }
        let s = self.lock();
        for (i, o) in out.iter_mut().enumerate() {
            *o = s.resident.contains(&(gpa + i as u64 * PAGE_SIZE));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_map_containment() {
        let m = RamMap::new(&[(0x10_0000, 0x10_0000), (0, 0x9_f000), (0x20_0000, 0x1000)]).unwrap();
        assert_eq!(m.total(), 0x10_0000 + 0x9_f000 + 0x1000);
        assert!(m.contains(0, 0x1000));
        assert!(m.contains(0x9_e000, 0x1000));
        assert!(!m.contains(0x9_f000, 0x1000), "hole");
        assert!(!m.contains(0x9_e000, 0x2000), "runs into the hole");
        // Adjacent ranges join.
        assert!(m.contains(0x1f_f000, 0x2000));
        assert!(!m.contains(0x1f_f000, 0x3000));
        assert!(!m.contains(0x10_0000, 0));
        assert!(!m.contains(u64::MAX - 0xfff, 0x2000));
        assert_eq!(
            m.split(0x1f_f000, 0x2000).collect::<Vec<_>>(),
            vec![(0x1f_f000, 0x1000), (0x20_0000, 0x1000)]
        );
        assert!(RamMap::new(&[(0, 0x2000), (0x1000, 0x1000)]).is_err());
        assert!(RamMap::new(&[(0x800, 0x1000)]).is_err());
        assert!(RamMap::new(&[(u64::MAX - 0xfff, 0x2000)]).is_err());
    }

    #[test]
    fn recording_backend_tracks_residency() {
        let mut b = RecordingBackend::new(&[(0, 0x4000)]).unwrap();
        let probe = b.clone();
        assert_eq!(b.resident_bytes(), 0x4000);
        b.discard(0x1000, 0x2000).unwrap();
        let mut r = [false; 4];
        probe.residency(0, &mut r).unwrap();
        assert_eq!(r, [true, false, false, true]);
        probe.touch(0x2000, 1);
        probe.residency(0, &mut r).unwrap();
        assert_eq!(r, [true, false, true, true]);
        assert!(b.discard(0x3000, 0x2000).is_err());
        assert!(b.discard(0x800, 0x1000).is_err());
        b.set_failure(Some("EIO"));
        assert!(matches!(
            b.discard(0, 0x1000),
            Err(BackendError::Injected(_))
        ));
        assert_eq!(
            probe.discards(),
            vec![Discard {
                gpa: 0x1000,
                len: 0x2000
            }]
        );
    }
}
