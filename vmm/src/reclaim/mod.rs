//! The reclaim engine: under memory pressure it takes host memory back from VMs in phases
//! (reported pages and hinting, balloon, drop clean, swap out, huge page split), stopping as
//! soon as every watched domain is back above its high watermark. See `docs/reclaim.md`.
//!
//! - [`pressure`]: the PSI signal behind [`PressureSource`].
//! - [`watermark`]: min/low/high watermarks with hysteresis over the resident budget and the
//!   pool nodes.
//! - [`target`]: [`ReclaimTarget`], one per VM, one method per phase.
//! - [`engine`]: [`ReclaimEngine`] with a deterministic [`ReclaimEngine::step`] and a thread
//!   driver ([`ReclaimEngine::spawn`]).
//! - [`window`]: [`WindowTarget`], a target over a real [`crate::memory::GuestWindow`]
//!   (mincore residency sampling, zero-page huge page split, optional balloon and swap hooks).
//! - [`monitor`]: the periodic task that turns guest-mm monitor actions into compaction,
//!   reclaim and NUMA rebalancing, with counted triggers.
//! - [`mover`]: [`VmBlockMover`], which moves VM blocks for compaction and rebalancing.

pub mod balloon;
pub mod engine;
mod engine_report;
pub mod monitor;
pub mod mover;
pub mod pressure;
pub mod target;
pub mod watermark;
pub mod window;

pub use engine::{
    EngineConfig, EngineHandle, EngineSnapshot, EventOutcome, PhaseStats, ReclaimEngine,
    ReclaimEvent, StepReport, Trigger,
};

pub use balloon::DeviceBalloon;
pub use monitor::{
    compact_order_of_mib, ActionError, ActionOutcome, CompactConfigError, GuestMmActions,
    MonitorConfig, MonitorCounters, MonitorHandle, MonitorTask, PinnedBlocks, Placement,
    PoolActions, DEFAULT_COMPACT_ORDER_MIB,
};
pub use mover::{BlockRef, MoveCounters, PhysicalMove, VmBlockMover, VmBlocks};
pub use pressure::{
    parse_psi, PressureReading, PressureSource, ProcPressure, PsiLine, PsiTrigger,
    SyntheticPressure,
};

pub use target::{
    Idleness, Phase, PhaseOutcome, PhaseRequest, ReclaimTarget, TargetError, UnknownPhase,
};
pub use watermark::{
    Domain, DomainReading, DomainState, Level, WatermarkFractions, WatermarkTracker, Watermarks,
};
pub use window::{AccessHook, BalloonHook, QuiesceFn, SwapHook, WindowTarget, ZeroSplitStats};

/// Errors of the reclaim engine and its parts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReclaimError {
    /// The configuration is invalid.
    #[error("invalid reclaim configuration: {0}")]
    Config(String),
    /// The pressure signal could not be read or parsed.
    #[error("pressure signal: {0}")]
    Psi(String),
    /// The pool figures could not be read.
    #[error("pool figures: {0}")]
    Pool(String),
    /// A thread could not be started.
    #[error("cannot start the reclaim thread: {0}")]
    Spawn(String),
    /// A memory operation on a guest window failed.
    #[error("guest memory: {0}")]
    Memory(String),
}

#[cfg(test)]
mod swap_tests;
