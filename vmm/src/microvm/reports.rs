//! The per-VM log of tiny-guest reports, bounded: a long-running guest that keeps writing to
//! its report window (a driver reporting every resize, say) must not grow the daemon's memory
//! without end. The log keeps the most recent [`REPORT_LOG_CAPACITY`] reports and counts the
//! ones it had to drop.

use std::collections::VecDeque;

use crate::tiny_guest::GuestReport;

/// Reports a VM's log keeps (the most recent ones).
pub const REPORT_LOG_CAPACITY: usize = 4096;

/// A ring of the most recent guest reports with a count of those dropped to make room.
#[derive(Debug, Clone)]
pub struct ReportRing {
    entries: VecDeque<GuestReport>,
    capacity: usize,
    dropped: u64,
}

impl Default for ReportRing {
    fn default() -> Self {
        ReportRing::with_capacity(REPORT_LOG_CAPACITY)
    }
}

impl ReportRing {
    /// An empty ring keeping at most `capacity` reports (at least one).
    pub fn with_capacity(capacity: usize) -> ReportRing {
        let capacity = capacity.max(1);
        ReportRing {
            // Grown on demand: most guests write a handful of reports.
            entries: VecDeque::new(),
            capacity,
            dropped: 0,
        }
    }

    /// Append `r`, dropping the oldest report when the ring is full.
    pub fn push(&mut self, r: GuestReport) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
            self.dropped += 1;
        }
        self.entries.push_back(r);
    }

    /// The reports kept, oldest first.
    pub fn to_vec(&self) -> Vec<GuestReport> {
        self.entries.iter().copied().collect()
    }

    /// Number of reports kept.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no report is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The most reports kept.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Reports dropped to make room for newer ones, since the VM started.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    fn report(value: u64) -> GuestReport {
        GuestReport {
            tag: 16,
            value,
            at: Instant::now(),
        }
    }

    #[test]
    fn keeps_the_newest_and_counts_the_dropped() {
        let mut ring = ReportRing::with_capacity(4);
        for v in 0..3 {
            ring.push(report(v));
        }
        assert_eq!((ring.len(), ring.dropped()), (3, 0));
        for v in 3..10 {
            ring.push(report(v));
        }
        assert_eq!(ring.len(), 4);
        assert_eq!(ring.dropped(), 6);
        let values: Vec<u64> = ring.to_vec().iter().map(|r| r.value).collect();
        assert_eq!(values, vec![6, 7, 8, 9], "oldest first, newest kept");
    }

    #[test]
    fn a_long_running_guest_stays_bounded() {
        let mut ring = ReportRing::default();
        let n = REPORT_LOG_CAPACITY as u64 * 10 + 7;
        for v in 0..n {
            ring.push(report(v));
        }
        assert_eq!(ring.len(), REPORT_LOG_CAPACITY);
        assert_eq!(ring.dropped(), n - REPORT_LOG_CAPACITY as u64);
        assert_eq!(ring.to_vec().last().map(|r| r.value), Some(n - 1));
        assert!(ring.entries.capacity() < 2 * REPORT_LOG_CAPACITY);
        // A zero capacity still keeps the last report.
        let mut one = ReportRing::with_capacity(0);
        one.push(report(1));
        one.push(report(2));
        assert_eq!((one.capacity(), one.dropped()), (1, 1));
        assert_eq!(one.to_vec()[0].value, 2);
    }
}
