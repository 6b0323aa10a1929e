//! Inflate and deflate: the driver sends arrays of little-endian u32 page frame numbers
//! (4 KiB pages, `VIRTIO_BALLOON_PFN_SHIFT` = 12). Inflated pages are discarded on the host;
//! deflated pages need no host action (the guest's next touch faults them back in).

use crate::accounting::Ledger;
use crate::backend::ReclaimBackend;
use crate::PAGE_SIZE;

/// Largest PFN array accepted in one buffer (Linux sends at most 256 PFNs).
pub const MAX_PFNS_PER_BUFFER: usize = 16 * 1024;

/// Decode a PFN array; counts trailing bytes that do not form a whole entry.
pub fn parse_pfns(bytes: &[u8], ledger: &mut Ledger) -> Vec<u32> {
    let chunks = bytes.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        ledger.errors.trailing_bytes += 1;
    }
    chunks
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// Sorted, deduplicated guest addresses of `pfns` that lie in RAM. Duplicates within the
/// batch count as `dup` through `on_dup`.
fn valid_pages(pfns: &[u32], ledger: &mut Ledger) -> (Vec<u64>, u64) {
    let mut pages = Vec::with_capacity(pfns.len());
    for &pfn in pfns {
        let gpa = u64::from(pfn) * PAGE_SIZE;
        if ledger.check_present(gpa, PAGE_SIZE) {
            pages.push(gpa);
        }
    }
    pages.sort_unstable();
    let before = pages.len();
    pages.dedup();
    let dups = (before - pages.len()) as u64;
    (pages, dups)
}

/// Runs `(gpa, len)` of consecutive pages in a sorted page list.
fn runs(pages: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some(last) if last.0 + last.1 == p => last.1 += PAGE_SIZE,
            _ => out.push((p, PAGE_SIZE)),
        }
    }
    out
}

impl Ledger {
    /// Inflate: discard the pages and add them to the balloon. Pages outside RAM and pages
    /// already ballooned are counted and skipped. Returns the pages newly ballooned.
    pub fn inflate(&mut self, backend: &mut dyn ReclaimBackend, pfns: &[u32]) -> u64 {
        let (pages, dups) = valid_pages(pfns, self);
        self.errors.duplicate_inflate += dups;
        let mut fresh = Vec::with_capacity(pages.len());
        for p in pages {
            if self.ballooned.contains(p) {
                self.errors.duplicate_inflate += 1;
            } else {
                fresh.push(p);
            }
        }
        let mut added = 0;
        for (gpa, len) in runs(&fresh) {
            if self.discard(backend, gpa, len) {
                added += self.ballooned.insert(gpa, len);
                // Pages that were reported are now ballooned instead.
                self.reported.remove(gpa, len);
            }
        }
        self.counters.inflated_pages += added;
        added
    }

    /// Deflate: take pages out of the balloon. `target_pages` is the host's current target and
    /// `deflate_on_oom` whether the guest negotiated DEFLATE_ON_OOM: pages deflated below the
    /// target are accepted and counted as OOM deflation (or as unrequested without the
    /// feature). Returns the pages taken out.
    pub fn deflate(&mut self, pfns: &[u32], target_pages: u32, deflate_on_oom: bool) -> u64 {
        let (pages, dups) = valid_pages(pfns, self);
        self.errors.deflate_not_inflated += dups;
        let before = self.ballooned.pages();
        let mut removed = 0;
        for (gpa, len) in runs(&pages) {
            let r = self.ballooned.remove(gpa, len);
            self.errors.deflate_not_inflated += len / PAGE_SIZE - r;
            removed += r;
        }
        let requested = before.saturating_sub(u64::from(target_pages));
        let excess = removed.saturating_sub(requested);
        if deflate_on_oom {
            self.counters.oom_deflated_pages += excess;
        } else {
            self.counters.unrequested_deflated_pages += excess;
        }
        self.counters.deflated_pages += removed;
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Discard, RamMap, RecordingBackend};

    const RAM: u64 = 0x100_0000; // 16 MiB

    fn setup() -> (Ledger, RecordingBackend) {
        let b = RecordingBackend::new(&[(0, RAM)]).unwrap();
        (Ledger::new(RamMap::new(&[(0, RAM)]).unwrap()), b)
    }

    #[test]
    fn inflate_coalesces_runs_and_skips_bad_pfns() {
        let (mut l, mut b) = setup();
        let pfns = [5, 3, 4, 100, 4, 0x1000, u32::MAX, 7];
        assert_eq!(l.inflate(&mut b, &pfns), 5);
        assert_eq!(
            b.discards(),
            vec![
                Discard {
                    gpa: 0x3000,
                    len: 0x3000
                },
                Discard {
                    gpa: 0x7000,
                    len: 0x1000
                },
                Discard {
                    gpa: 0x64000,
                    len: 0x1000
                },
            ]
        );
        assert_eq!(l.errors.out_of_ram, 2);
        assert_eq!(l.errors.duplicate_inflate, 1);
        // Inflating again is a duplicate, no second discard.
        b.clear_discards();
        assert_eq!(l.inflate(&mut b, &[3]), 0);
        assert!(b.discards().is_empty());
        assert_eq!(l.errors.duplicate_inflate, 2);
        assert_eq!(l.counters.inflated_pages, 5);
        assert_eq!(l.counters.split_huge_blocks, 3);
    }

    #[test]
    fn failed_discards_are_not_ballooned() {
        let (mut l, mut b) = setup();
        b.set_failure(Some("EIO"));
        assert_eq!(l.inflate(&mut b, &[1, 2]), 0);
        assert_eq!(l.ballooned.pages(), 0);
        assert_eq!(l.counters.discard_failures, 1);
    }

    #[test]
    fn deflate_counts_unrequested_and_oom() {
        let (mut l, mut b) = setup();
        let pfns: Vec<u32> = (0..10).collect();
        l.inflate(&mut b, &pfns);
        // Target 8: deflating 2 is requested, the third is beyond the target.
        assert_eq!(l.deflate(&[0, 1, 2], 8, true), 3);
        assert_eq!(l.counters.oom_deflated_pages, 1);
        assert_eq!(l.deflate(&[3], 8, false), 1);
        assert_eq!(l.counters.unrequested_deflated_pages, 1);
        // Not inflated, duplicate, outside RAM.
        assert_eq!(l.deflate(&[3, 4, 4, 0x10_0000], 0, true), 1);
        assert_eq!(l.errors.deflate_not_inflated, 2);
        assert_eq!(l.errors.out_of_ram, 1);
        assert_eq!(l.ballooned.pages(), 5);
    }

    #[test]
    fn trailing_bytes_are_counted() {
        let (mut l, _) = setup();
        let v = parse_pfns(&[1, 0, 0, 0, 2, 0, 0, 0, 9], &mut l);
        assert_eq!(v, vec![1, 2]);
        assert_eq!(l.errors.trailing_bytes, 1);
    }
}
