//! What [`super::engine::ReclaimEngine`] tells: why a run started, what each phase did, the
//! events it keeps and the snapshot its callers read.

use std::time::Duration;

use super::pressure::PressureReading;
use super::target::{Phase, PhaseOutcome};
use super::watermark::DomainState;

/// Why a run started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// A domain went below its low watermark (or stayed under high since).
    Watermark,
    /// PSI above its trigger.
    Psi,
    /// An allocation failed ([`super::ReclaimEngine::notify_alloc_failure`]).
    AllocFailure,
}

impl Trigger {
    /// Metric name.
    pub fn name(self) -> &'static str {
        match self {
            Trigger::Watermark => "watermark",
            Trigger::Psi => "psi",
            Trigger::AllocFailure => "alloc_failure",
        }
    }

    pub(super) const ALL: [Trigger; 3] = [Trigger::Watermark, Trigger::Psi, Trigger::AllocFailure];

    pub(super) fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseStats {
    /// Target calls.
    pub calls: u64,
    /// Calls that reclaimed or requested something.
    pub productive: u64,
    /// Bytes reclaimed at once.
    pub reclaimed_bytes: u64,
    /// Bytes requested from guests (balloon, hinting).
    pub requested_bytes: u64,
    /// Time spent in calls, nanoseconds.
    pub time_ns: u64,
    /// Calls answered "unsupported".
    pub unsupported: u64,
    /// Calls that failed.
    pub errors: u64,
}

/// What happened in one target call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventOutcome {
    /// Done.
    Done(PhaseOutcome),
    /// Failed.
    Failed(String),
}

/// One entry of the event log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReclaimEvent {
    /// The engine step it happened in.
    pub step: u64,
    /// The VM.
    pub vm: String,
    /// The phase.
    pub phase: Phase,
    /// Whether the run was urgent.
    pub urgent: bool,
    /// Result.
    pub outcome: EventOutcome,
    /// Time the call took.
    pub duration: Duration,
}

/// What one step did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepReport {
    /// The step number (from 1).
    pub step: u64,
    /// Why a run started (`None`: no pressure, no run).
    pub trigger: Option<Trigger>,
    /// Whether the run was urgent.
    pub urgent: bool,
    /// Skipped because of a backoff after a run without progress.
    pub backed_off: bool,
    /// Domain states at the start of the step.
    pub domains_before: Vec<DomainState>,
    /// Domain states at the end.
    pub domains_after: Vec<DomainState>,
    /// Bytes the run set out to free.
    pub need_bytes: u64,
    /// Phases that ran (in order), with the bytes reclaimed and requested.
    pub phases: Vec<(Phase, PhaseOutcome)>,
    /// Whether the run reached its goal (every domain at or above high, or the signal's
    /// amount freed).
    pub satisfied: bool,
    /// The pressure reading (None when it could not be read).
    pub pressure: Option<PressureReading>,
    /// Bytes given back to guests (no pressure; [`super::EngineConfig::release`]).
    pub released_bytes: u64,
}

impl StepReport {
    /// Bytes reclaimed at once over all phases.
    pub fn reclaimed_bytes(&self) -> u64 {
        self.phases.iter().map(|(_, o)| o.reclaimed).sum()
    }

    /// Phases in the order they ran.
    pub fn phase_order(&self) -> Vec<Phase> {
        self.phases.iter().map(|(p, _)| *p).collect()
    }
}

/// Everything the engine exposes (metrics, API).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineSnapshot {
    /// Steps taken.
    pub steps: u64,
    /// Runs (steps with a trigger that were not backed off).
    pub runs: u64,
    /// Urgent runs.
    pub urgent_runs: u64,
    /// Runs that reached their goal.
    pub satisfied_runs: u64,
    /// Runs by trigger (`watermark`, `psi`, `alloc_failure`).
    pub triggers: Vec<(&'static str, u64)>,
    /// Counters per phase, in phase order.
    pub phases: Vec<(Phase, PhaseStats)>,
    /// Domain states after the last step.
    pub domains: Vec<DomainState>,
    /// Last pressure reading.
    pub pressure: Option<PressureReading>,
    /// Bytes given back to guests after pressure went away.
    pub released_bytes: u64,
    /// Targets registered.
    pub targets: usize,
    /// The latest events, oldest first.
    pub events: Vec<ReclaimEvent>,
}

impl EngineSnapshot {
    /// Counters of `phase`.
    pub fn phase(&self, phase: Phase) -> PhaseStats {
        self.phases
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }

    /// Runs started by `trigger`.
    pub fn trigger(&self, trigger: Trigger) -> u64 {
        self.triggers
            .iter()
            .find(|(n, _)| *n == trigger.name())
            .map_or(0, |(_, v)| *v)
    }
}
