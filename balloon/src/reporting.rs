//! Free page reporting: each report is a descriptor chain of device-writable buffers, each one
//! free guest block (`4096 << order` bytes, order ≥ `page_reporting_order`, 9 on x86_64).
//! The device discards them and returns the chain; the driver ignores the used length.

use crate::accounting::Ledger;
use crate::backend::ReclaimBackend;
use crate::PAGE_SIZE;

/// One entry of a report as the driver gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReportedRange {
    /// Guest physical address.
    pub gpa: u64,
    /// Length in bytes.
    pub len: u64,
}

/// What one report did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReportOutcome {
    /// Valid ranges.
    pub ranges: u64,
    /// Bytes discarded.
    pub discarded_bytes: u64,
    /// Bytes newly added to the reported set (excludes pages already reported or ballooned).
    pub newly_reported_bytes: u64,
}

impl Ledger {
    /// Validate a report's ranges: zero-length, overflowing, misaligned, out-of-RAM and
    /// overlapping entries are counted per kind and dropped. Returns the valid ranges sorted.
    pub fn validate_report(&mut self, ranges: &[ReportedRange]) -> Vec<(u64, u64)> {
        let mut ok: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for r in ranges {
            if r.len == 0 {
                self.errors.zero_length += 1;
            } else if r.gpa.checked_add(r.len).is_none() {
                self.errors.overflow += 1;
            } else if r.gpa % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 {
                self.errors.misaligned += 1;
            } else if self.check_present(r.gpa, r.len) {
                ok.push((r.gpa, r.len));
            }
        }
        ok.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(ok.len());
        for (gpa, len) in ok {
            match out.last() {
                Some(&(pg, pl)) if gpa < pg + pl => self.errors.overlap += 1,
                _ => out.push((gpa, len)),
            }
        }
        out
    }

    /// Process one report: validate, then (unless `poisoned`) discard the ranges, merging
    /// adjacent ones into single backend calls, and add them to the reported set. Pages in the
    /// balloon stay ballooned. With `poisoned` (PAGE_POISON negotiated and a non-zero poison
    /// value) nothing is discarded: the guest expects its free pages to keep the pattern.
    pub fn report(
        &mut self,
        backend: &mut dyn ReclaimBackend,
        ranges: &[ReportedRange],
        poisoned: bool,
    ) -> ReportOutcome {
        self.counters.reports += 1;
        let valid = self.validate_report(ranges);
        let mut outcome = ReportOutcome {
            ranges: valid.len() as u64,
            ..Default::default()
        };
        self.counters.reported_ranges += outcome.ranges;
        if poisoned {
            self.counters.poison_skipped_reports += 1;
            return outcome;
        }
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(valid.len());
        for (gpa, len) in valid {
            match merged.last_mut() {
                Some(last) if last.0 + last.1 == gpa => last.1 += len,
                _ => merged.push((gpa, len)),
            }
        }
        for (gpa, len) in merged {
            if self.discard(backend, gpa, len) {
                outcome.discarded_bytes += len;
                let added = self.reported.insert_except(gpa, len, Some(&self.ballooned));
                outcome.newly_reported_bytes += added * PAGE_SIZE;
            }
        }
        self.counters.reported_bytes_total += outcome.discarded_bytes;
        outcome
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{Discard, RamMap, RecordingBackend};
    use crate::HUGE_PAGE_SIZE as H;

    const RAM: u64 = 64 << 20;

    fn r(gpa: u64, len: u64) -> ReportedRange {
        ReportedRange { gpa, len }
    }

    fn setup() -> (Ledger, RecordingBackend) {
        (
            Ledger::new(RamMap::new(&[(0, RAM)]).unwrap()),
            RecordingBackend::new(&[(0, RAM)]).unwrap(),
        )
    }

    #[test]
    fn adjacent_ranges_merge_into_one_discard() {
        let (mut l, mut b) = setup();
        let o = l.report(&mut b, &[r(3 * H, H), r(2 * H, H), r(8 * H, 2 * H)], false);
        assert_eq!(o.ranges, 3);
        assert_eq!(o.discarded_bytes, 4 * H);
        assert_eq!(
            b.discards(),
            vec![
                Discard {
                    gpa: 2 * H,
                    len: 2 * H
                },
                Discard {
                    gpa: 8 * H,
                    len: 2 * H
                },
            ]
        );
        assert_eq!(l.counters.whole_huge_blocks, 4);
        assert_eq!(l.counters.split_huge_blocks, 0);
        assert_eq!(l.reported.bytes(), 4 * H);
    }

    #[test]
    fn malformed_entries_are_counted_and_dropped() {
        let (mut l, mut b) = setup();
        let bad = [
            r(0, 0),                     // zero length
            r(u64::MAX - 0xfff, 0x2000), // overflow
            r(0x800, 0x1000),            // misaligned address
            r(0x1000, 0x800),            // misaligned length
            r(RAM, H),                   // outside RAM
            r(RAM - 0x1000, 0x2000),     // straddles the end of RAM
            r(H, H),                     // valid
            r(H + 0x1000, 0x1000),       // overlaps the previous
            r(H, H),                     // exact duplicate
        ];
        let o = l.report(&mut b, &bad, false);
        assert_eq!(o.ranges, 1);
        assert_eq!(b.discards(), vec![Discard { gpa: H, len: H }]);
        let e = l.errors;
        assert_eq!(
            (
                e.zero_length,
                e.overflow,
                e.misaligned,
                e.out_of_ram,
                e.overlap
            ),
            (1, 1, 2, 2, 2)
        );
    }

    #[test]
    fn poisoned_reports_are_not_discarded() {
        let (mut l, mut b) = setup();
        let o = l.report(&mut b, &[r(0, H)], true);
        assert_eq!(o.discarded_bytes, 0);
        assert!(b.discards().is_empty());
        assert_eq!(l.counters.poison_skipped_reports, 1);
        assert_eq!(l.reported.bytes(), 0);
    }

    #[test]
    fn ballooned_pages_are_not_double_counted() {
        let (mut l, mut b) = setup();
        l.inflate(&mut b, &[0, 1]);
        let o = l.report(&mut b, &[r(0, H)], false);
        assert_eq!(o.newly_reported_bytes, H - 2 * PAGE_SIZE);
        let s = l.snapshot(0, 0);
        assert_eq!(s.ballooned_bytes + s.reported_bytes, H);
        assert_eq!(s.resident_estimate_bytes, RAM - H);
    }
}
