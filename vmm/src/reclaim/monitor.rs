//! The monitor task: every interval it asks guest-mm's pool monitor what to do
//! ([`guest_mm::monitor::Monitor::evaluate`]) and does it:
//!
//! - `Compact { node, order }`: compaction of the node's zone ([`PoolActions::compact`]);
//! - `Reclaim { reason: AllocationMisses, .. }`, and any new allocation failure: the reclaim
//!   engine runs ([`ReclaimEngine::notify_alloc_failure`]); `Reclaim { reason: LowWatermark }`
//!   alone is counted and logged (outcome `pool_low_noted`): the engine's phases return host
//!   memory, not pool blocks, and it watches host memory itself;
//! - `Rebalance`: NUMA rebalancing through `migrate_misplaced` ([`PoolActions::rebalance`]).
//!
//! Every trigger is counted by action, every result by action and outcome
//! ([`MonitorCounters`]), and logged.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use guest_mm::compaction::{compact_until, MoveError, Mover};
use guest_mm::frame::{FrameId, NodeId};
use guest_mm::monitor::{Action, ReclaimReason, Thresholds};
use guest_mm::policy::NumaPolicy;
use guest_mm::pool::Pool;

use super::engine::ReclaimEngine;
use super::ReclaimError;

/// Why an action could not run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActionError {
    /// The pool or its owners cannot do this.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// It failed.
    #[error("{0}")]
    Failed(String),
}

/// What a compaction or rebalancing did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ActionOutcome {
    /// Whether the goal was reached (a free block of the order; every misplaced block moved).
    pub succeeded: bool,
    /// Frames moved.
    pub frames_moved: u64,
    /// Moves the owners refused.
    pub refused: u64,
}

/// The pool operations the monitor drives.
pub trait PoolActions: Send + Sync + std::fmt::Debug {
    /// The monitor's decisions since the previous call, and the pool's allocation failures so
    /// far.
    fn evaluate(&self, th: &Thresholds) -> Result<(Vec<Action>, u64), ActionError>;
    /// Compact `node` until a block of `order` is free.
    fn compact(&self, node: NodeId, order: u8) -> Result<ActionOutcome, ActionError>;
    /// Move misplaced blocks to where their NUMA policies want them.
    fn rebalance(&self) -> Result<ActionOutcome, ActionError>;
}

/// The allocated blocks of one owner (a VM) and the policy they were taken under.
#[derive(Debug, Clone, PartialEq)]
pub struct Placement {
    /// `(first frame, order)` of each block.
    pub blocks: Vec<(FrameId, u8)>,
    /// Their policy.
    pub policy: NumaPolicy,
}

/// Makes a fresh [`Mover`] for one compaction or rebalancing.
pub type MoverFactory = dyn Fn() -> Box<dyn Mover> + Send + Sync;
/// Lists the placements to rebalance.
pub type PlacementSource = dyn Fn() -> Vec<Placement> + Send + Sync;

/// A mover for blocks whose owners cannot repoint their records yet: every move is refused
/// as pinned, so compaction and rebalancing run, count, and leave the blocks where they are.
#[derive(Debug, Default)]
pub struct PinnedBlocks;

impl Mover for PinnedBlocks {
    fn move_block(&mut self, from: FrameId, _to: FrameId, _order: u8) -> Result<(), MoveError> {
        Err(MoveError::Pinned(from))
    }
}

/// [`PoolActions`] over guest-mm's [`Pool`].
pub struct GuestMmActions {
    pool: Arc<Pool>,
    mover: Box<MoverFactory>,
    placements: Box<PlacementSource>,
}

impl std::fmt::Debug for GuestMmActions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMmActions").finish_non_exhaustive()
    }
}

impl GuestMmActions {
    /// Actions on `pool`; moves go through movers from `mover`, rebalancing covers what
    /// `placements` lists.
    pub fn new(
        pool: Arc<Pool>,
        mover: Box<MoverFactory>,
        placements: Box<PlacementSource>,
    ) -> Self {
        GuestMmActions {
            pool,
            mover,
            placements,
        }
    }
}

/// A pool or mover error as an [`ActionError`].
pub(crate) fn failed(e: impl std::fmt::Display) -> ActionError {
    ActionError::Failed(e.to_string())
}

/// guest-mm's decisions for `pool` under `th`, with the pool's allocation failures so far:
/// [`PoolActions::evaluate`] of every implementation over a guest-mm pool.
pub(crate) fn evaluate_pool(
    pool: &Pool,
    th: &Thresholds,
) -> Result<(Vec<Action>, u64), ActionError> {
    let actions = pool.evaluate(th).map_err(failed)?;
    let failures = pool
        .monitor()
        .snapshot(Vec::new(), Vec::new())
        .totals
        .failures;
    Ok((actions, failures))
}

impl PoolActions for GuestMmActions {
    fn evaluate(&self, th: &Thresholds) -> Result<(Vec<Action>, u64), ActionError> {
        evaluate_pool(&self.pool, th)
    }

    fn compact(&self, node: NodeId, order: u8) -> Result<ActionOutcome, ActionError> {
        let mut mover = (self.mover)();
        let r = self
            .pool
            .with_zone(node, |z| compact_until(z, order, mover.as_mut()))
            .map_err(failed)?;
        Ok(ActionOutcome {
            succeeded: r.succeeded(),
            frames_moved: r.frames_moved,
            refused: r.moves_refused,
        })
    }

    fn rebalance(&self) -> Result<ActionOutcome, ActionError> {
        let mut out = ActionOutcome {
            succeeded: true,
            ..Default::default()
        };
        for p in (self.placements)() {
            let mut mover = (self.mover)();
            let st = self
                .pool
                .migrate_misplaced(&p.blocks, &p.policy, mover.as_mut())
                .map_err(failed)?;
            out.frames_moved += st.moved_frames;
            out.refused += st.mover_refused;
            out.succeeded &= st.mover_refused == 0 && st.no_room == 0;
        }
        Ok(out)
    }
}

/// Monitor settings.
#[derive(Debug, Clone, PartialEq)]
pub struct MonitorConfig {
    /// Decision thresholds (validated).
    pub thresholds: Thresholds,
    /// Tick interval of the thread driver.
    pub interval: Duration,
}

impl Default for MonitorConfig {
    fn default() -> Self {
        MonitorConfig {
            thresholds: Thresholds::default(),
            interval: Duration::from_secs(1),
        }
    }
}

/// The daemon's default compaction order, in MiB: one pool block (order 9), so compaction
/// never fires by default. Every allocation the daemon makes from its pool is one 2 MiB
/// block (boot RAM and virtio-mem plugs of any `block_mib` take their blocks one by one), so
/// free runs larger than 2 MiB serve no allocation, while forming them moves blocks and
/// pauses file-backed VMs. See docs/reclaim.md ("Which order to compact").
pub const DEFAULT_COMPACT_ORDER_MIB: u64 = 2;

/// Why compaction settings (`--compact-order-mib`, `--compact-threshold`) are invalid.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CompactConfigError {
    /// The size is not a power of two of at least one pool block.
    #[error("compact order {0} MiB is not a power of two of at least 2 MiB (one pool block)")]
    NotPowerOfTwo(u64),
    /// The size is above the allocator's largest block.
    #[error("compact order {mib} MiB exceeds the allocator's largest block ({max_mib} MiB)")]
    TooLarge {
        /// The size asked for.
        mib: u64,
        /// The largest block.
        max_mib: u64,
    },
    /// The fragmentation threshold is not in (0, 1].
    #[error("compact threshold {0} is not in (0, 1]")]
    Threshold(f64),
}

/// The allocator order of a block of `mib` MiB (2 MiB: order 9), checked: a power of two of
/// at least 2 MiB and at most the allocator's largest block (`MAX_ORDER`).
pub fn compact_order_of_mib(mib: u64) -> Result<u8, CompactConfigError> {
    let max_mib = (guest_mm::FRAME_SIZE << guest_mm::MAX_ORDER) >> 20;
    if mib < 2 || !mib.is_power_of_two() {
        return Err(CompactConfigError::NotPowerOfTwo(mib));
    }
    if mib > max_mib {
        return Err(CompactConfigError::TooLarge { mib, max_mib });
    }
    // mib is a power of two <= max_mib, so the order is at most MAX_ORDER.
    let frames = (mib << 20) / guest_mm::FRAME_SIZE;
    Ok(frames.trailing_zeros() as u8)
}

impl MonitorConfig {
    /// Set the compaction order (as a block size in MiB) and the fragmentation index above
    /// which the monitor compacts; `None` keeps the current value. Checked: see
    /// [`compact_order_of_mib`]; the threshold must be in (0, 1].
    pub fn set_compaction(
        &mut self,
        order_mib: Option<u64>,
        threshold: Option<f64>,
    ) -> Result<(), CompactConfigError> {
        let order = order_mib.map(compact_order_of_mib).transpose()?;
        if let Some(t) = threshold {
            if !(t > 0.0 && t <= 1.0) {
                return Err(CompactConfigError::Threshold(t));
            }
        }
        if let Some(o) = order {
            self.thresholds.compact_order = o;
        }
        if let Some(t) = threshold {
            self.thresholds.fragmentation_threshold = t;
        }
        Ok(())
    }
}

/// Counters of the monitor task.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MonitorCounters {
    /// Ticks run.
    pub ticks: u64,
    /// Ticks whose evaluation failed.
    pub eval_errors: u64,
    /// Triggers by action (`compact`, `reclaim`, `rebalance`).
    pub triggers: BTreeMap<&'static str, u64>,
    /// Results by `(action, outcome)`.
    pub outcomes: BTreeMap<(&'static str, &'static str), u64>,
}

impl MonitorCounters {
    /// Triggers of `action`.
    pub fn triggers(&self, action: &str) -> u64 {
        self.triggers.get(action).copied().unwrap_or(0)
    }

    /// Results of `action` with `outcome`.
    pub fn outcome(&self, action: &str, outcome: &str) -> u64 {
        self.outcomes
            .iter()
            .find(|((a, o), _)| *a == action && *o == outcome)
            .map_or(0, |(_, v)| *v)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The periodic monitor task. Share it as `Arc<MonitorTask>`.
#[derive(Debug)]
pub struct MonitorTask {
    actions: Arc<dyn PoolActions>,
    engine: Option<Arc<ReclaimEngine>>,
    config: MonitorConfig,
    counters: Mutex<MonitorCounters>,
    last_failures: Mutex<Option<u64>>,
    wake: (Mutex<bool>, Condvar),
}

fn outcome_of(r: &Result<ActionOutcome, ActionError>) -> &'static str {
    match r {
        Ok(o) if o.succeeded => "done",
        Ok(_) => "incomplete",
        Err(ActionError::Unsupported(_)) => "unsupported",
        Err(ActionError::Failed(_)) => "failed",
    }
}

impl MonitorTask {
    /// A task driving `actions`, notifying `engine` (if any) on reclaim triggers.
    pub fn new(
        actions: Arc<dyn PoolActions>,
        engine: Option<Arc<ReclaimEngine>>,
        config: MonitorConfig,
    ) -> Result<MonitorTask, ReclaimError> {
        config
            .thresholds
            .validate()
            .map_err(|e| ReclaimError::Config(e.to_string()))?;
        if config.interval.is_zero() {
            return Err(ReclaimError::Config(
                "monitor interval must not be 0".into(),
            ));
        }
        Ok(MonitorTask {
            actions,
            engine,
            config,
            counters: Mutex::new(MonitorCounters::default()),
            last_failures: Mutex::new(None),
            wake: (Mutex::new(false), Condvar::new()),
        })
    }

    /// The engine reclaim triggers go to.
    pub fn engine(&self) -> Option<&Arc<ReclaimEngine>> {
        self.engine.as_ref()
    }

    /// The counters.
    pub fn counters(&self) -> MonitorCounters {
        lock(&self.counters).clone()
    }

    fn count(&self, action: &'static str, outcome: &'static str) {
        let mut c = lock(&self.counters);
        *c.outcomes.entry((action, outcome)).or_insert(0) += 1;
    }

    fn trigger(&self, action: &'static str) {
        *lock(&self.counters).triggers.entry(action).or_insert(0) += 1;
    }

    fn reclaim(&self, reason: &str) {
        self.trigger("reclaim");
        match &self.engine {
            Some(e) => {
                e.notify_alloc_failure();
                self.count("reclaim", "engine_notified");
            }
            None => {
                tracing::warn!(reason, "reclaim wanted but no reclaim engine runs");
                self.count("reclaim", "no_engine");
            }
        }
    }

    /// One evaluation and its actions; returns the actions the monitor decided.
    pub fn tick(&self) -> Result<Vec<Action>, ActionError> {
        lock(&self.counters).ticks += 1;
        let (actions, failures) = match self.actions.evaluate(&self.config.thresholds) {
            Ok(r) => r,
            Err(e) => {
                lock(&self.counters).eval_errors += 1;
                tracing::warn!(error = %e, "monitor evaluation failed");
                return Err(e);
            }
        };
        let new_failures = {
            let mut last = lock(&self.last_failures);
            let before = last.unwrap_or(0);
            *last = Some(failures);
            failures.saturating_sub(before)
        };
        let mut reclaimed = false;
        for a in &actions {
            match a {
                Action::Compact { node, order } => {
                    self.trigger("compact");
                    let r = self.actions.compact(*node, *order);
                    let outcome = outcome_of(&r);
                    tracing::info!(node = node.0, order, outcome, result = ?r, "monitor: compact");
                    self.count("compact", outcome);
                }
                Action::Reclaim {
                    node,
                    frames,
                    urgent,
                    reason,
                } => {
                    tracing::info!(node = node.0, frames, urgent, reason = ?reason, "monitor: reclaim");
                    match reason {
                        // Allocations missed the node: the engine runs.
                        ReclaimReason::AllocationMisses => {
                            if !reclaimed {
                                self.reclaim("allocation_misses");
                                reclaimed = true;
                            }
                        }
                        // Only low on free pool blocks: counted and logged. The engine's
                        // phases give back host memory, not pool blocks (a VM keeps its
                        // blocks), so waking it every tick would inflate balloons for nothing;
                        // it watches host memory itself (its budget and PSI).
                        ReclaimReason::LowWatermark => {
                            self.trigger("reclaim");
                            self.count("reclaim", "pool_low_noted");
                        }
                    }
                }
                Action::Rebalance { remote_share } => {
                    self.trigger("rebalance");
                    let r = self.actions.rebalance();
                    let outcome = outcome_of(&r);
                    tracing::info!(remote_share, outcome, result = ?r, "monitor: rebalance");
                    self.count("rebalance", outcome);
                }
            }
        }
        if new_failures > 0 && !reclaimed {
            tracing::info!(
                failures = new_failures,
                "monitor: allocations failed, reclaim"
            );
            self.reclaim("alloc_failure");
        }
        Ok(actions)
    }

    /// Tick every [`MonitorConfig::interval`] on a thread until the handle is stopped or
    /// dropped.
    pub fn spawn(self: &Arc<Self>) -> Result<MonitorHandle, ReclaimError> {
        let stop = Arc::new(AtomicBool::new(false));
        let task = Arc::clone(self);
        let stop2 = Arc::clone(&stop);
        let join = std::thread::Builder::new()
            .name("pool-monitor".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    // Errors are counted and logged by tick.
                    let _ = task.tick();
                    let (m, cv) = &task.wake;
                    let mut woken = lock(m);
                    if !*woken && !stop2.load(Ordering::Acquire) {
                        woken = cv
                            .wait_timeout(woken, task.config.interval)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|e| e.into_inner().0);
                    }
                    *woken = false;
                }
            })
            .map_err(|e| ReclaimError::Spawn(e.to_string()))?;
        Ok(MonitorHandle {
            task: Arc::clone(self),
            stop,
            join: Some(join),
        })
    }
}

/// A running monitor thread; stopping or dropping it ends the thread.
#[derive(Debug)]
pub struct MonitorHandle {
    task: Arc<MonitorTask>,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl MonitorHandle {
    /// The task.
    pub fn task(&self) -> &Arc<MonitorTask> {
        &self.task
    }

    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        let (m, cv) = &self.task.wake;
        *lock(m) = true;
        cv.notify_all();
        if let Some(j) = self.join.take() {
            // The last owner of what the thread works on may drop it on the thread itself
            // (e.g. the monitor holding the manager for a moment): never join oneself.
            if j.thread().id() != std::thread::current().id() {
                let _ = j.join();
            }
        }
    }
}

impl Drop for MonitorHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
#[path = "monitor_tests.rs"]
mod tests;
