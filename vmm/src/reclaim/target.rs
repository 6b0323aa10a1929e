//! What the engine reclaims from: [`ReclaimTarget`], one per VM, with one method per phase.

use std::fmt;

/// The reclaim phases, in the order the engine runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// 1. Count what guests already reported free; start a free page hinting pass where
    ///    negotiated.
    Reported,
    /// 2. Inflate the balloons of the idlest VMs.
    Balloon,
    /// 3. Drop clean cold memory (its swap copy is current).
    DropClean,
    /// 4. Swap out the remaining cold memory.
    SwapOut,
    /// 5. Split huge pages whose 4 KiB pages are only partly in use (zero 4 KiB pages are
    ///    discarded).
    SplitHuge,
}

impl Phase {
    /// All phases in order.
    pub const ALL: [Phase; 5] = [
        Phase::Reported,
        Phase::Balloon,
        Phase::DropClean,
        Phase::SwapOut,
        Phase::SplitHuge,
    ];

    /// Metric and log name.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Reported => "reported",
            Phase::Balloon => "balloon",
            Phase::DropClean => "drop_clean",
            Phase::SwapOut => "swap_out",
            Phase::SplitHuge => "split_huge",
        }
    }

    /// Index in [`Phase::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Whether the phase only touches memory that is idle (so a busy VM is skipped unless the
    /// reclaim is urgent). Phase 1 takes what the guest gave up itself: always allowed.
    pub fn filters_idle(self) -> bool {
        !matches!(self, Phase::Reported)
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A phase name that is not one of [`Phase::name`]'s.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown reclaim phase {0:?} (expected reported, balloon, drop_clean, swap_out or split_huge)"
)]
pub struct UnknownPhase(pub String);

impl std::str::FromStr for Phase {
    type Err = UnknownPhase;

    /// A phase by its metric name ([`Phase::name`]).
    fn from_str(s: &str) -> Result<Phase, UnknownPhase> {
        Phase::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| UnknownPhase(s.to_string()))
    }
}

/// What one phase call on one target achieved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseOutcome {
    /// Host memory given back during the call (bytes).
    pub reclaimed: u64,
    /// Memory asked for that the guest gives back later (balloon inflation, hinting): not yet
    /// reclaimed when the call returns.
    pub requested: u64,
}

impl PhaseOutcome {
    /// Reclaimed now.
    pub fn reclaimed(bytes: u64) -> Self {
        PhaseOutcome {
            reclaimed: bytes,
            requested: 0,
        }
    }

    /// Asked for, arrives later.
    pub fn requested(bytes: u64) -> Self {
        PhaseOutcome {
            reclaimed: 0,
            requested: bytes,
        }
    }
}

/// Limits of one phase call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhaseRequest {
    /// Reclaim at most about this much (targets may overshoot by one unit of their
    /// granularity, e.g. one 2 MiB block).
    pub max_bytes: u64,
    /// Memory touched within this many sampling intervals is hot: leave it.
    pub cold_intervals: u32,
    /// Below the min watermark: ignore idleness, take what can be taken.
    pub urgent: bool,
}

/// How busy a target is, from its access sampling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Idleness {
    /// Resident host memory.
    pub resident_bytes: u64,
    /// Resident memory touched within the last N intervals (the working-set estimate).
    pub working_set_bytes: u64,
}

impl Idleness {
    /// Resident memory outside the working set.
    pub fn idle_bytes(&self) -> u64 {
        self.resident_bytes.saturating_sub(self.working_set_bytes)
    }

    /// `idle / resident` (0 without resident memory).
    pub fn idle_fraction(&self) -> f64 {
        if self.resident_bytes == 0 {
            0.0
        } else {
            self.idle_bytes() as f64 / self.resident_bytes as f64
        }
    }
}

/// Why a target could not run a phase.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// The target does not have this mechanism (no balloon, no swap file, hinting not
    /// negotiated, ...). Not an error for the engine: it moves on.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The VM is gone.
    #[error("the VM is gone")]
    Gone,
    /// The mechanism failed.
    #[error("{0}")]
    Failed(String),
}

/// One VM as the engine sees it. Every phase method has a default that answers
/// [`TargetError::Unsupported`], so a target implements what it has.
pub trait ReclaimTarget: Send + Sync + fmt::Debug {
    /// The VM id (logs, metrics).
    fn id(&self) -> &str;

    /// Host memory resident behind the VM's guest memory now.
    fn resident_bytes(&self) -> Result<u64, TargetError>;

    /// Take one access sample (the engine calls this once per step, which is one interval)
    /// and return the idleness over the last `intervals` intervals.
    fn sample(&self, intervals: u32) -> Result<Idleness, TargetError>;

    /// Phase 1a: bytes the guest reported free (free page reporting) and the host discarded
    /// since the last call.
    fn take_reported(&self) -> Result<PhaseOutcome, TargetError> {
        Err(TargetError::Unsupported("free page reporting".into()))
    }

    /// Phase 1b: start a free page hinting pass (virtio-balloon FREE_PAGE_HINT).
    fn start_hinting(&self) -> Result<PhaseOutcome, TargetError> {
        Err(TargetError::Unsupported("free page hinting".into()))
    }

    /// Phase 2: raise the balloon target by up to `req.max_bytes`.
    fn inflate_balloon(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        let _ = req;
        Err(TargetError::Unsupported("balloon".into()))
    }

    /// Phase 3: discard cold memory whose swap copy is current.
    fn drop_clean(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        let _ = req;
        Err(TargetError::Unsupported("swap (drop clean)".into()))
    }

    /// Phase 4: write cold memory to swap and discard it.
    fn swap_out(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        let _ = req;
        Err(TargetError::Unsupported("swap (swap out)".into()))
    }

    /// Phase 5: discard all-zero 4 KiB pages inside resident huge pages.
    fn split_huge(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        let _ = req;
        Err(TargetError::Unsupported("huge page split".into()))
    }

    /// Pressure is gone: give the guest back up to `max_bytes` of what the engine took from
    /// it through the balloon (deflate). Returns the bytes given back (or asked back).
    fn release(&self, max_bytes: u64) -> Result<u64, TargetError> {
        let _ = max_bytes;
        Err(TargetError::Unsupported("release".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_parse_from_their_metric_names_only() {
        for p in Phase::ALL {
            assert_eq!(p.name().parse::<Phase>(), Ok(p));
        }
        for bad in ["", "Reported", "swap-out", "hint", " balloon"] {
            assert_eq!(bad.parse::<Phase>(), Err(UnknownPhase(bad.to_string())));
        }
    }
}
