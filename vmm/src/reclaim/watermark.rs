//! Watermarks over memory domains, with hysteresis.
//!
//! A *domain* is something whose free memory the engine watches: the resident **budget** (a
//! host budget B of resident memory for all VM windows; free = B - resident) or one pool
//! **node** (free = the node's free pool memory). Each domain has three watermarks, fractions
//! of its total:
//!
//! - below **low**, the domain starts reclaiming;
//! - it keeps reclaiming until its free memory is back at or above **high** (hysteresis: a
//!   domain between low and high reclaims only if it was already reclaiming);
//! - below **min**, the reclaim is **urgent**.

use std::collections::BTreeMap;
use std::fmt;

use guest_mm::frame::NodeId;

use super::ReclaimError;

/// Watermarks as fractions of a domain's total (`0 <= min <= low <= high <= 1`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WatermarkFractions {
    /// Urgent below this free fraction.
    pub min: f64,
    /// Reclaim starts below this free fraction.
    pub low: f64,
    /// Reclaim stops at or above this free fraction.
    pub high: f64,
}

impl Default for WatermarkFractions {
    /// min 2%, low 5%, high 10%.
    fn default() -> Self {
        WatermarkFractions {
            min: 0.02,
            low: 0.05,
            high: 0.10,
        }
    }
}

impl WatermarkFractions {
    /// Check ranges and order.
    pub fn validate(&self) -> Result<(), ReclaimError> {
        let ok = [self.min, self.low, self.high]
            .iter()
            .all(|v| (0.0..=1.0).contains(v))
            && self.min <= self.low
            && self.low <= self.high;
        if ok {
            Ok(())
        } else {
            Err(ReclaimError::Config(format!(
                "watermarks must satisfy 0 <= min <= low <= high <= 1 (got {}, {}, {})",
                self.min, self.low, self.high
            )))
        }
    }

    /// The watermarks in bytes for a domain of `total` bytes (rounded up).
    pub fn of(&self, total: u64) -> Watermarks {
        let b = |f: f64| (f * total as f64).ceil() as u64;
        Watermarks {
            min: b(self.min),
            low: b(self.low),
            high: b(self.high),
        }
    }
}

/// Watermarks in bytes of free memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Watermarks {
    /// Urgent below.
    pub min: u64,
    /// Start below.
    pub low: u64,
    /// Stop at or above.
    pub high: u64,
}

/// A memory domain the engine watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Domain {
    /// The resident budget of all VM windows.
    Budget,
    /// One pool node.
    Node(NodeId),
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Budget => f.write_str("budget"),
            Domain::Node(n) => write!(f, "node{}", n.0),
        }
    }
}

/// Free and total memory of one domain at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainReading {
    /// The domain.
    pub domain: Domain,
    /// Its size.
    pub total_bytes: u64,
    /// Its free memory.
    pub free_bytes: u64,
}

/// Where free memory stands against the watermarks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Below min.
    Min,
    /// Below low (at or above min).
    Low,
    /// Between low and high.
    Normal,
    /// At or above high.
    High,
}

impl Level {
    /// Lower-case name (`min`, `low`, `normal`, `high`), used in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Level::Min => "min",
            Level::Low => "low",
            Level::Normal => "normal",
            Level::High => "high",
        }
    }

    /// Where `free` lies against `w`.
    pub fn of(free: u64, w: &Watermarks) -> Level {
        if free < w.min {
            Level::Min
        } else if free < w.low {
            Level::Low
        } else if free < w.high {
            Level::Normal
        } else {
            Level::High
        }
    }
}

/// A domain's state after an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainState {
    /// The reading.
    pub reading: DomainReading,
    /// Its watermarks in bytes.
    pub marks: Watermarks,
    /// Where it stands.
    pub level: Level,
    /// Whether it is reclaiming (entered below low, not yet back at high).
    pub reclaiming: bool,
}

impl DomainState {
    /// Below min.
    pub fn urgent(&self) -> bool {
        self.level == Level::Min
    }

    /// Bytes to free to reach the high watermark (0 when not reclaiming).
    pub fn need_bytes(&self) -> u64 {
        if self.reclaiming {
            self.marks.high.saturating_sub(self.reading.free_bytes)
        } else {
            0
        }
    }
}

/// Tracks the reclaiming flag of each domain across readings.
#[derive(Debug, Clone)]
pub struct WatermarkTracker {
    fractions: WatermarkFractions,
    reclaiming: BTreeMap<Domain, bool>,
}

impl WatermarkTracker {
    /// A tracker with these (validated) fractions.
    pub fn new(fractions: WatermarkFractions) -> Result<Self, ReclaimError> {
        fractions.validate()?;
        Ok(WatermarkTracker {
            fractions,
            reclaiming: BTreeMap::new(),
        })
    }

    /// The fractions.
    pub fn fractions(&self) -> WatermarkFractions {
        self.fractions
    }

    /// Apply new readings: a domain starts reclaiming below low, stops at or above high, and
    /// otherwise keeps its previous flag. Domains absent from `readings` are forgotten.
    pub fn update(&mut self, readings: &[DomainReading]) -> Vec<DomainState> {
        let mut next = BTreeMap::new();
        let out = readings
            .iter()
            .map(|r| {
                let marks = self.fractions.of(r.total_bytes);
                let level = Level::of(r.free_bytes, &marks);
                let was = self.reclaiming.get(&r.domain).copied().unwrap_or(false);
                let reclaiming = match level {
                    Level::Min | Level::Low => true,
                    Level::Normal => was,
                    Level::High => false,
                };
                next.insert(r.domain, reclaiming);
                DomainState {
                    reading: *r,
                    marks,
                    level,
                    reclaiming,
                }
            })
            .collect();
        self.reclaiming = next;
        out
    }

    /// Whether `domain` is reclaiming after the last update.
    pub fn is_reclaiming(&self, domain: Domain) -> bool {
        self.reclaiming.get(&domain).copied().unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(domain: Domain, free: u64) -> DomainReading {
        DomainReading {
            domain,
            total_bytes: 1000,
            free_bytes: free,
        }
    }

    #[test]
    fn fractions_are_validated() {
        assert!(WatermarkFractions::default().validate().is_ok());
        for bad in [
            (0.1, 0.05, 0.2),
            (0.0, 0.3, 0.2),
            (-0.1, 0.0, 0.1),
            (0.0, 0.5, 1.5),
        ] {
            let f = WatermarkFractions {
                min: bad.0,
                low: bad.1,
                high: bad.2,
            };
            assert!(WatermarkTracker::new(f).is_err(), "{bad:?}");
        }
        let nan = WatermarkFractions {
            min: f64::NAN,
            ..Default::default()
        };
        assert!(nan.validate().is_err());
    }

    #[test]
    fn hysteresis_between_low_and_high() {
        // min 20, low 50, high 100 of 1000.
        let mut t = WatermarkTracker::new(WatermarkFractions::default()).expect("valid");
        let d = Domain::Budget;
        // Between low and high, never entered: no reclaim.
        let s = t.update(&[r(d, 70)]);
        assert_eq!(s[0].level, Level::Normal);
        assert!(!s[0].reclaiming);
        assert_eq!(s[0].need_bytes(), 0);
        // Below low: reclaim, need = high - free.
        let s = t.update(&[r(d, 40)]);
        assert_eq!(s[0].level, Level::Low);
        assert!(s[0].reclaiming && !s[0].urgent());
        assert_eq!(s[0].need_bytes(), 60);
        // Back between low and high: keeps reclaiming.
        let s = t.update(&[r(d, 70)]);
        assert!(s[0].reclaiming);
        assert_eq!(s[0].need_bytes(), 30);
        // At high: stops.
        let s = t.update(&[r(d, 100)]);
        assert_eq!(s[0].level, Level::High);
        assert!(!s[0].reclaiming);
        // Back between low and high: stays stopped.
        let s = t.update(&[r(d, 60)]);
        assert!(!s[0].reclaiming);
        assert!(!t.is_reclaiming(d));
    }

    #[test]
    fn below_min_is_urgent() {
        let mut t = WatermarkTracker::new(WatermarkFractions::default()).expect("valid");
        let s = t.update(&[r(Domain::Budget, 19)]);
        assert_eq!(s[0].level, Level::Min);
        assert!(s[0].urgent() && s[0].reclaiming);
        assert_eq!(s[0].need_bytes(), 81);
        let s = t.update(&[r(Domain::Budget, 20)]);
        assert_eq!(s[0].level, Level::Low);
        assert!(!s[0].urgent());
    }

    #[test]
    fn domains_are_tracked_separately() {
        let mut t = WatermarkTracker::new(WatermarkFractions::default()).expect("valid");
        let (n0, n1) = (Domain::Node(NodeId(0)), Domain::Node(NodeId(1)));
        let s = t.update(&[r(n0, 10), r(n1, 500)]);
        assert!(s[0].reclaiming && s[0].urgent());
        assert!(!s[1].reclaiming);
        let s = t.update(&[r(n0, 80), r(n1, 80)]);
        assert!(s[0].reclaiming, "node 0 keeps reclaiming up to high");
        assert!(!s[1].reclaiming, "node 1 never went below low");
        assert_eq!(n0.to_string(), "node0");
        assert_eq!(Domain::Budget.to_string(), "budget");
        // A forgotten domain starts fresh.
        t.update(&[r(n1, 80)]);
        assert!(!t.is_reclaiming(n0));
    }
}
