//! Congestion back-off for swap writes: an EWMA of per-page write latency against a baseline
//! (the lowest EWMA seen after warm-up). Above `factor` × baseline the writer is throttled:
//! batches halve (down to a floor) and the writer sleeps for about one write's duration before
//! the next batch. Below half that threshold batches grow back.

use std::time::Duration;

/// Tuning of the back-off.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CongestionConfig {
    /// Largest batch (pages per write) when not congested.
    pub max_batch_pages: u32,
    /// Smallest batch when congested.
    pub min_batch_pages: u32,
    /// Congested when the EWMA exceeds `factor` × baseline.
    pub factor: f64,
    /// EWMA weight of a new sample (0..1).
    pub alpha: f64,
    /// Samples before a baseline is taken.
    pub warmup: u32,
    /// Longest single back-off sleep.
    pub max_sleep: Duration,
}

impl Default for CongestionConfig {
    fn default() -> Self {
        CongestionConfig {
            max_batch_pages: 256,
            min_batch_pages: 16,
            factor: 4.0,
            alpha: 0.2,
            warmup: 4,
            max_sleep: Duration::from_millis(50),
        }
    }
}

/// What the writer should do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advice {
    /// Pages per write for the next batch.
    pub batch_pages: u32,
    /// Sleep this long before the next write (zero when not congested).
    pub sleep: Duration,
}

/// The back-off state machine (pure: fed latencies, gives advice).
#[derive(Clone, Debug)]
pub struct Congestion {
    cfg: CongestionConfig,
    samples: u32,
    /// EWMA of nanoseconds per page.
    ewma_ns: f64,
    /// Lowest EWMA seen after warm-up.
    baseline_ns: f64,
    batch: u32,
    congested: bool,
    throttle_events: u64,
    last_write: Duration,
}

impl Congestion {
    /// A fresh state.
    pub fn new(cfg: CongestionConfig) -> Congestion {
        let max = cfg.max_batch_pages.max(1);
        Congestion {
            cfg: CongestionConfig {
                max_batch_pages: max,
                min_batch_pages: cfg.min_batch_pages.clamp(1, max),
                ..cfg
            },
            samples: 0,
            ewma_ns: 0.0,
            baseline_ns: 0.0,
            batch: max,
            congested: false,
            throttle_events: 0,
            last_write: Duration::ZERO,
        }
    }

    /// Record one write of `pages` pages that took `latency`.
    pub fn record(&mut self, pages: u32, latency: Duration) {
        let per_page = latency.as_nanos() as f64 / f64::from(pages.max(1));
        self.last_write = latency;
        self.samples += 1;
        self.ewma_ns = if self.samples == 1 {
            per_page
        } else {
            self.cfg.alpha * per_page + (1.0 - self.cfg.alpha) * self.ewma_ns
        };
        if self.samples < self.cfg.warmup {
            return;
        }
        if self.baseline_ns == 0.0 || self.ewma_ns < self.baseline_ns {
            self.baseline_ns = self.ewma_ns;
        }
        let limit = self.cfg.factor * self.baseline_ns;
        if self.ewma_ns > limit {
            if !self.congested {
                self.throttle_events += 1;
            }
            self.congested = true;
            self.batch = (self.batch / 2).max(self.cfg.min_batch_pages);
        } else if self.ewma_ns < limit / 2.0 {
            self.congested = false;
            self.batch = (self.batch * 2).min(self.cfg.max_batch_pages);
        }
    }

    /// Advice for the next write.
    pub fn advice(&self) -> Advice {
        Advice {
            batch_pages: self.batch,
            sleep: if self.congested {
                self.last_write.min(self.cfg.max_sleep)
            } else {
                Duration::ZERO
            },
        }
    }

    /// Whether writes are currently throttled.
    pub fn congested(&self) -> bool {
        self.congested
    }

    /// Times the state went from normal to congested.
    pub fn throttle_events(&self) -> u64 {
        self.throttle_events
    }

    /// EWMA of write latency per page.
    pub fn ewma_per_page(&self) -> Duration {
        Duration::from_nanos(self.ewma_ns as u64)
    }

    /// Baseline latency per page (zero before warm-up).
    pub fn baseline_per_page(&self) -> Duration {
        Duration::from_nanos(self.baseline_ns as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttles_when_latency_rises_and_recovers() {
        let mut c = Congestion::new(CongestionConfig::default());
        for _ in 0..10 {
            c.record(256, Duration::from_micros(256 * 10));
        }
        assert!(!c.congested());
        assert_eq!(c.advice().batch_pages, 256);
        assert_eq!(c.advice().sleep, Duration::ZERO);
        // Latency per page rises 20x.
        for _ in 0..10 {
            c.record(256, Duration::from_micros(256 * 200));
        }
        assert!(c.congested());
        assert_eq!(c.throttle_events(), 1);
        assert_eq!(c.advice().batch_pages, 16);
        assert!(c.advice().sleep > Duration::ZERO);
        assert!(c.advice().sleep <= Duration::from_millis(50));
        // Back to normal.
        for _ in 0..40 {
            c.record(16, Duration::from_micros(16 * 10));
        }
        assert!(!c.congested());
        assert_eq!(c.advice().batch_pages, 256);
        assert_eq!(c.throttle_events(), 1);
    }
}
