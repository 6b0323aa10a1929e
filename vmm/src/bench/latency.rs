//! Latency bookkeeping for the API load generator: every sample is kept (a 20 s run at
//! 1,000 requests per second is 20,000 numbers), and percentiles use the nearest-rank
//! definition on the sorted samples, so a reported p99 is a latency some request really had.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Latency samples in nanoseconds.
#[derive(Debug, Default, Clone)]
pub struct Latencies {
    samples_ns: Vec<u64>,
}

/// Percentiles of a set of samples, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest sample.
    pub max_us: f64,
    /// Arithmetic mean.
    pub mean_us: f64,
}

impl Latencies {
    /// An empty set with room for `n` samples.
    pub fn with_capacity(n: usize) -> Self {
        Latencies {
            samples_ns: Vec::with_capacity(n),
        }
    }

    /// Record one sample.
    pub fn record(&mut self, d: Duration) {
        self.samples_ns
            .push(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    }

    /// Add every sample of `other`.
    pub fn merge(&mut self, other: Latencies) {
        self.samples_ns.extend(other.samples_ns);
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.samples_ns.len()
    }

    /// True without samples.
    pub fn is_empty(&self) -> bool {
        self.samples_ns.is_empty()
    }

    /// The percentiles (all zero without samples).
    pub fn summary(&self) -> LatencySummary {
        let mut sorted = self.samples_ns.clone();
        sorted.sort_unstable();
        let us = |ns: u64| ns as f64 / 1e3;
        let Some(&max) = sorted.last() else {
            return LatencySummary::default();
        };
        let sum: u128 = sorted.iter().map(|&v| u128::from(v)).sum();
        LatencySummary {
            count: sorted.len() as u64,
            p50_us: us(percentile(&sorted, 50.0)),
            p90_us: us(percentile(&sorted, 90.0)),
            p99_us: us(percentile(&sorted, 99.0)),
            p999_us: us(percentile(&sorted, 99.9)),
            max_us: us(max),
            mean_us: sum as f64 / sorted.len() as f64 / 1e3,
        }
    }
}

/// Nearest-rank percentile `p` (0 < p <= 100) of ascending `sorted`: the smallest sample with
/// at least `p`% of the samples at or below it. 0 for an empty slice.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let n = sorted.len();
    // Rank in 1..=n; the small epsilon keeps exact products (99% of 1,000 = 990) from rounding
    // up through floating-point noise.
    let rank = ((p / 100.0) * n as f64 - 1e-9).ceil();
    let rank = if rank.is_finite() && rank >= 1.0 {
        (rank as usize).min(n)
    } else {
        1
    };
    sorted[rank - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50.0), 50);
        assert_eq!(percentile(&v, 99.0), 99);
        assert_eq!(percentile(&v, 99.9), 100);
        assert_eq!(percentile(&v, 100.0), 100);
        assert_eq!(percentile(&v, 0.5), 1);
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 99.0), 990);
        assert_eq!(percentile(&v, 99.9), 999);
        assert_eq!(percentile(&[7], 99.0), 7);
        assert_eq!(percentile(&[], 50.0), 0);
    }

    #[test]
    fn summary_of_unsorted_samples_in_microseconds() {
        let mut l = Latencies::with_capacity(4);
        // One slow outlier among 99 fast requests: p50 and p90 stay fast, p99 is still a fast
        // one (99 of 100 are at or below it), p99.9 and max are the outlier.
        l.record(Duration::from_micros(5_000));
        for i in 0..99 {
            l.record(Duration::from_micros(100 + i));
        }
        let s = l.summary();
        assert_eq!(s.count, 100);
        assert_eq!(s.p50_us, 149.0);
        assert_eq!(s.p90_us, 189.0);
        assert_eq!(s.p99_us, 198.0);
        assert_eq!(s.p999_us, 5_000.0);
        assert_eq!(s.max_us, 5_000.0);
        assert!((s.mean_us - (5_000.0 + (100..199).sum::<u64>() as f64) / 100.0).abs() < 1e-9);
    }

    #[test]
    fn merge_and_empty() {
        assert_eq!(Latencies::default().summary(), LatencySummary::default());
        let mut a = Latencies::default();
        a.record(Duration::from_nanos(1_500));
        let mut b = Latencies::default();
        b.record(Duration::from_nanos(2_500));
        a.merge(b);
        assert_eq!(a.len(), 2);
        let s = a.summary();
        assert_eq!(s.p50_us, 1.5);
        assert_eq!(s.max_us, 2.5);
    }
}
