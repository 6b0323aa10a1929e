//! The host's memory pressure signal: Linux PSI (`/proc/pressure/memory`) behind the
//! [`PressureSource`] trait, so that tests can feed a synthetic signal ([`SyntheticPressure`]).
//!
//! PSI reports, for "some" (at least one task stalled on memory) and "full" (all non-idle tasks
//! stalled), the share of wall time stalled over the last 10, 60 and 300 s (in percent) and the
//! total stall time in microseconds.

use std::sync::{Arc, Mutex};

use super::ReclaimError;

/// The default PSI file.
pub const PSI_MEMORY: &str = "/proc/pressure/memory";

/// One PSI line (`some` or `full`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PsiLine {
    /// Percent of time stalled over the last 10 s.
    pub avg10: f64,
    /// Percent over the last 60 s.
    pub avg60: f64,
    /// Percent over the last 300 s.
    pub avg300: f64,
    /// Total stall time, microseconds.
    pub total_us: u64,
}

/// A reading of the memory pressure signal.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PressureReading {
    /// Some tasks stalled.
    pub some: PsiLine,
    /// All non-idle tasks stalled (absent on old kernels: zero).
    pub full: PsiLine,
}

/// Where the engine gets its pressure signal.
pub trait PressureSource: Send + Sync + std::fmt::Debug {
    /// The current reading.
    fn read(&self) -> Result<PressureReading, ReclaimError>;
}

fn parse_line(rest: &str, line: &str) -> Result<PsiLine, ReclaimError> {
    let bad = || ReclaimError::Psi(format!("malformed PSI line {line:?}"));
    let mut out = PsiLine::default();
    let mut seen = 0u8;
    for field in rest.split_whitespace() {
        let (k, v) = field.split_once('=').ok_or_else(bad)?;
        match k {
            "avg10" => (out.avg10, seen) = (v.parse().map_err(|_| bad())?, seen | 1),
            "avg60" => (out.avg60, seen) = (v.parse().map_err(|_| bad())?, seen | 2),
            "avg300" => (out.avg300, seen) = (v.parse().map_err(|_| bad())?, seen | 4),
            "total" => (out.total_us, seen) = (v.parse().map_err(|_| bad())?, seen | 8),
            // Newer kernels may add fields: ignore them.
            _ => {}
        }
    }
    if seen != 15 || !out.avg10.is_finite() || !out.avg60.is_finite() || !out.avg300.is_finite() {
        return Err(bad());
    }
    Ok(out)
}

/// Parse the text of a PSI file. The `some` line is required, `full` is optional.
pub fn parse_psi(text: &str) -> Result<PressureReading, ReclaimError> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("some ") {
            some = Some(parse_line(rest, line)?);
        } else if let Some(rest) = line.strip_prefix("full ") {
            full = Some(parse_line(rest, line)?);
        } else if !line.is_empty() {
            return Err(ReclaimError::Psi(format!("unexpected PSI line {line:?}")));
        }
    }
    Ok(PressureReading {
        some: some.ok_or_else(|| ReclaimError::Psi("no \"some\" line".into()))?,
        full: full.unwrap_or_default(),
    })
}

/// The host's PSI file.
#[derive(Debug, Clone)]
pub struct ProcPressure {
    path: String,
}

impl ProcPressure {
    /// `/proc/pressure/memory`.
    pub fn new() -> Self {
        Self::at(PSI_MEMORY)
    }

    /// Another file in the same format (e.g. a cgroup's `memory.pressure`).
    pub fn at(path: impl Into<String>) -> Self {
        ProcPressure { path: path.into() }
    }

    /// Whether the file can be read and parsed on this host.
    pub fn available(&self) -> bool {
        self.read().is_ok()
    }
}

impl Default for ProcPressure {
    fn default() -> Self {
        Self::new()
    }
}

impl PressureSource for ProcPressure {
    fn read(&self) -> Result<PressureReading, ReclaimError> {
        let text = std::fs::read_to_string(&self.path)
            .map_err(|e| ReclaimError::Psi(format!("reading {}: {e}", self.path)))?;
        parse_psi(&text)
    }
}

/// A pressure signal set by hand (tests, benchmarks, and hosts without PSI). Clones share the
/// value.
#[derive(Debug, Clone, Default)]
pub struct SyntheticPressure {
    value: Arc<Mutex<PressureReading>>,
}

impl SyntheticPressure {
    /// A signal reading zero.
    pub fn new() -> Self {
        Self::default()
    }

    /// Set the whole reading.
    pub fn set(&self, r: PressureReading) {
        *self.value.lock().unwrap_or_else(|e| e.into_inner()) = r;
    }

    /// Set `some avg10` (percent), leaving the rest.
    pub fn set_some_avg10(&self, pct: f64) {
        self.value
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .some
            .avg10 = pct;
    }
}

impl PressureSource for SyntheticPressure {
    fn read(&self) -> Result<PressureReading, ReclaimError> {
        Ok(*self.value.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// When the pressure signal alone asks for reclaim.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PsiTrigger {
    /// Reclaim when `some avg10` exceeds this percentage.
    pub some_avg10_pct: f64,
    /// Reclaim when `full avg10` exceeds this percentage.
    pub full_avg10_pct: f64,
}

impl Default for PsiTrigger {
    fn default() -> Self {
        PsiTrigger {
            some_avg10_pct: 10.0,
            full_avg10_pct: 2.0,
        }
    }
}

impl PsiTrigger {
    /// Whether `r` is above either threshold.
    pub fn fires(&self, r: &PressureReading) -> bool {
        r.some.avg10 > self.some_avg10_pct || r.full.avg10 > self.full_avg10_pct
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "some avg10=1.50 avg60=0.25 avg300=0.00 total=12345\n\
                          full avg10=0.40 avg60=0.10 avg300=0.00 total=678\n";

    #[test]
    fn parses_some_and_full() {
        let r = parse_psi(SAMPLE).expect("parse");
        assert_eq!(r.some.avg10, 1.5);
        assert_eq!(r.some.avg60, 0.25);
        assert_eq!(r.some.total_us, 12345);
        assert_eq!(r.full.avg10, 0.4);
        assert_eq!(r.full.total_us, 678);
    }

    #[test]
    fn full_is_optional_and_unknown_fields_ignored() {
        let r = parse_psi("some avg10=2.00 avg60=1.00 avg300=0.50 total=9 extra=1\n").expect("ok");
        assert_eq!(r.some.avg300, 0.5);
        assert_eq!(r.full, PsiLine::default());
    }

    #[test]
    fn rejects_malformed_text() {
        for bad in [
            "",
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0",
            "some avg10=x avg60=0.00 avg300=0.00 total=0",
            "some avg10=0.00 avg60=0.00 total=0",
            "some avg10=NaN avg60=0.00 avg300=0.00 total=0",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\nbogus",
            "some avg10 avg60=0.00 avg300=0.00 total=0",
        ] {
            assert!(parse_psi(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn host_psi_parses_when_present() {
        let p = ProcPressure::new();
        match std::fs::read_to_string(PSI_MEMORY) {
            Ok(_) => {
                let r = p.read().expect("host PSI parses");
                assert!(r.some.avg10 >= 0.0);
            }
            Err(e) => eprintln!("skip: {PSI_MEMORY} unreadable here: {e}"),
        }
        assert!(ProcPressure::at("/nonexistent/psi").read().is_err());
    }

    #[test]
    fn synthetic_signal_and_trigger() {
        let s = SyntheticPressure::new();
        let t = PsiTrigger::default();
        assert!(!t.fires(&s.read().expect("read")));
        let clone = s.clone();
        clone.set_some_avg10(25.0);
        assert!(t.fires(&s.read().expect("read")));
        s.set(PressureReading {
            full: PsiLine {
                avg10: 5.0,
                ..Default::default()
            },
            ..Default::default()
        });
        assert!(t.fires(&clone.read().expect("read")));
    }
}
