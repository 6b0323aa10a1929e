//! The daemon's reclaim: a [`ReclaimEngine`] over the VMs' windows and the pool monitor task
//! ([`MonitorTask`]), both on their own threads, their figures in `GET /metrics`.
//!
//! - Engine: budget = the pool's total size (the host memory the daemon may use), free =
//!   budget - resident memory of all VM windows (mincore); PSI from `/proc/pressure/memory`.
//!   Each VM is a [`WindowTarget`] with its balloon ([`DeviceBalloon`]) when it has one, its
//!   [`VmSwap`] over the daemon's shared swap file (phases 3-4, see [`super::swap`]) and a
//!   quiesce hook that pauses its vCPUs and holds its device locks (phase 5).
//! - Monitor: guest-mm's decisions over the pool. Compaction and rebalancing move VM blocks
//!   through [`super::mover::VmPoolActions`] (every move counted by outcome in `/metrics`,
//!   `action="block_move"`); allocation misses and failures wake the engine.

use std::sync::{Arc, Weak};
use std::time::Duration;

use guest_mm::pool::Pool;
use tidepool_api::metrics::{
    LabeledCounter, NamedCounter, ReclaimMetrics, ReclaimPhaseMetrics, WatermarkMetrics,
};

use super::swap::{failure_hook, quiesce_hook, swap_metrics, DaemonSwap, DaemonSwapConfig};
use super::VmManager;
use crate::devices::lock;
use crate::reclaim::{
    DeviceBalloon, EngineConfig, EngineHandle, MonitorConfig, MonitorHandle, MonitorTask,
    MoveCounters, ProcPressure, ReclaimEngine, ReclaimError, WindowTarget,
};
use crate::swap::VmSwap;

/// The running engine and monitor of a daemon.
#[derive(Debug)]
pub struct ReclaimRuntime {
    engine: Arc<ReclaimEngine>,
    monitor: Arc<MonitorTask>,
    swap: Arc<DaemonSwap>,
    moves: Arc<MoveCounters>,
    quiesce: bool,
    manager: Weak<VmManager>,
    // Dropped (threads stopped and joined) with the runtime.
    _engine_thread: EngineHandle,
    _monitor_thread: MonitorHandle,
}

impl ReclaimRuntime {
    /// The engine.
    pub fn engine(&self) -> &Arc<ReclaimEngine> {
        &self.engine
    }

    /// The monitor task.
    pub fn monitor(&self) -> &Arc<MonitorTask> {
        &self.monitor
    }

    /// Block moves of compaction and rebalancing, by outcome.
    pub fn moves(&self) -> &Arc<MoveCounters> {
        &self.moves
    }
}

/// Settings of the daemon's reclaim.
#[derive(Debug, Clone, PartialEq)]
pub struct DaemonReclaimConfig {
    /// Engine settings; `budget_bytes: None` means the pool's total size.
    pub engine: EngineConfig,
    /// Monitor settings.
    pub monitor: MonitorConfig,
    /// Swap settings (phases 3-4).
    pub swap: DaemonSwapConfig,
    /// Give each VM a quiesce hook, so the zero-page split (phase 5) runs.
    pub quiesce: bool,
}

impl Default for DaemonReclaimConfig {
    fn default() -> Self {
        DaemonReclaimConfig {
            engine: EngineConfig {
                interval: Duration::from_secs(1),
                ..Default::default()
            },
            monitor: MonitorConfig::default(),
            swap: DaemonSwapConfig::default(),
            quiesce: true,
        }
    }
}

impl VmManager {
    /// Start the engine and the monitor over `pool` (the same pool this manager allocates
    /// from). VMs created afterwards become reclaim targets; existing ones are added now.
    pub fn start_reclaim(
        self: &Arc<Self>,
        pool: Arc<Pool>,
        cfg: DaemonReclaimConfig,
    ) -> Result<(), ReclaimError> {
        let mut engine_cfg = cfg.engine;
        let pool_bytes = (pool.total_frames() * guest_mm::FRAME_SIZE).max(1);
        if engine_cfg.budget_bytes.is_none() {
            engine_cfg.budget_bytes = Some(pool_bytes);
        }
        let swap = Arc::new(DaemonSwap::new(cfg.swap, pool_bytes));
        let engine = Arc::new(ReclaimEngine::new(engine_cfg, ProcPressure::new())?);
        let moves = Arc::new(MoveCounters::default());
        let actions =
            super::mover::VmPoolActions::new(pool, Arc::downgrade(self), Arc::clone(&moves));
        let monitor = Arc::new(MonitorTask::new(
            Arc::new(actions),
            Some(Arc::clone(&engine)),
            cfg.monitor,
        )?);
        let engine_thread = engine.spawn()?;
        let monitor_thread = monitor.spawn()?;
        *lock(&self.reclaim) = Some(ReclaimRuntime {
            engine,
            monitor,
            swap,
            moves,
            quiesce: cfg.quiesce,
            manager: Arc::downgrade(self),
            _engine_thread: engine_thread,
            _monitor_thread: monitor_thread,
        });
        for info in self.list() {
            self.reclaim_attach(&info.id);
        }
        tracing::info!("reclaim engine and pool monitor running");
        Ok(())
    }

    /// The engine, when reclaim runs.
    pub fn reclaim_engine(&self) -> Option<Arc<ReclaimEngine>> {
        lock(&self.reclaim).as_ref().map(|r| Arc::clone(&r.engine))
    }

    /// The monitor task, when reclaim runs.
    pub fn monitor_task(&self) -> Option<Arc<MonitorTask>> {
        lock(&self.reclaim).as_ref().map(|r| Arc::clone(&r.monitor))
    }

    /// Block moves of compaction and rebalancing by outcome, when reclaim runs.
    pub fn block_moves(&self) -> Option<Arc<MoveCounters>> {
        lock(&self.reclaim).as_ref().map(|r| Arc::clone(&r.moves))
    }

    /// Make VM `id` a reclaim target (no-op without reclaim): its balloon, its swap (the
    /// shared file is created on the first VM) and its quiesce hook.
    pub(super) fn reclaim_attach(&self, id: &str) {
        let Some((engine, swap, quiesce, manager)) = lock(&self.reclaim).as_ref().map(|r| {
            (
                Arc::clone(&r.engine),
                Arc::clone(&r.swap),
                r.quiesce.then(|| r.manager.clone()),
                r.manager.clone(),
            )
        }) else {
            return;
        };
        let r = self.call(id, move |vm| {
            let window = vm.vm().map(|v| Arc::clone(v.window()))?;
            let failed = Arc::clone(vm.bus().failed_flag());
            let balloon = vm.balloon_device().map(|dev| {
                Arc::new(DeviceBalloon::new(Arc::clone(dev)).with_failed(Arc::clone(&failed)))
            });
            Some((window, balloon, Arc::clone(vm.bus())))
        });
        let (window, balloon, bus) = match r {
            Ok(Some(t)) => t,
            Ok(None) => {
                tracing::warn!(vm = %id, "no guest window: not a reclaim target");
                return;
            }
            Err(e) => {
                tracing::warn!(vm = %id, error = %e, "reclaim target not added");
                return;
            }
        };
        let mut t = WindowTarget::new(id, &window);
        if let Some(b) = &balloon {
            t = t.with_balloon(Arc::clone(b) as _);
        }
        if let Some(file) = swap.file() {
            match VmSwap::new(Arc::clone(&window), file) {
                Ok(s) => {
                    let s = Arc::new(s);
                    let published = {
                        let vms = lock(&self.vms);
                        vms.get(id).map(|e| {
                            *lock(&e.swap) = Some(Arc::clone(&s));
                            Arc::clone(&e.published)
                        })
                    };
                    if let Some(published) = published {
                        failure_hook(&s, id, Arc::clone(&bus), published, manager);
                        if let Some(b) = &balloon {
                            // Hinted pages become discardable under the swap's write tracking.
                            b.set_hint_swap(Arc::clone(&s));
                        }
                        t = t.with_swap(s);
                    } else {
                        // Deleted meanwhile.
                        s.shutdown();
                        return;
                    }
                }
                Err(e @ crate::swap::SwapError::Unsupported(_)) => {
                    tracing::info!(vm = %id, reason = %e, "no swap for this VM's backing: phases 3-4 unsupported")
                }
                Err(e) => {
                    tracing::error!(vm = %id, error = %e, "no swap for this VM: phases 3-4 unsupported")
                }
            }
        }
        if let Some(manager) = quiesce {
            t = t.with_quiesce(quiesce_hook(manager, id.to_string(), bus));
        }
        engine.add_target(Arc::new(t));
    }

    /// Forget VM `id` as a reclaim target.
    pub(super) fn reclaim_detach(&self, id: &str) {
        if let Some(engine) = self.reclaim_engine() {
            engine.remove_target(id);
        }
    }

    /// The daemon's swap file figures, once the file exists.
    pub(super) fn swap_file_metrics(&self) -> Option<tidepool_api::metrics::SwapMetrics> {
        let swap = lock(&self.reclaim).as_ref().map(|r| Arc::clone(&r.swap))?;
        swap.existing().map(|f| swap_metrics(&f))
    }

    /// Monitor triggers, action results and engine figures for `GET /metrics`.
    pub(super) fn reclaim_metrics(
        &self,
    ) -> (
        Vec<NamedCounter>,
        Vec<LabeledCounter>,
        Option<ReclaimMetrics>,
    ) {
        let Some((engine, monitor, moves)) = lock(&self.reclaim).as_ref().map(|r| {
            (
                Arc::clone(&r.engine),
                Arc::clone(&r.monitor),
                Arc::clone(&r.moves),
            )
        }) else {
            return (Vec::new(), Vec::new(), None);
        };
        let c = monitor.counters();
        let triggers = ["compact", "reclaim", "rebalance"]
            .iter()
            .map(|a| NamedCounter {
                name: (*a).into(),
                value: c.triggers(a),
            })
            .collect();
        let moves = moves.snapshot();
        let actions = c
            .outcomes
            .iter()
            .map(|((a, o), v)| (*a, *o, *v))
            .chain(moves.iter().map(|(o, v)| ("block_move", *o, *v)))
            .map(|(a, o, v)| LabeledCounter {
                labels: vec![("action".into(), a.into()), ("outcome".into(), o.into())],
                value: v,
            })
            .collect();
        let s = engine.snapshot();
        let reclaim = ReclaimMetrics {
            runs: s
                .triggers
                .iter()
                .map(|(n, v)| NamedCounter {
                    name: (*n).into(),
                    value: *v,
                })
                .collect(),
            urgent_runs: s.urgent_runs,
            released_bytes: s.released_bytes,
            phases: s
                .phases
                .iter()
                .map(|(p, st)| ReclaimPhaseMetrics {
                    phase: p.name().into(),
                    calls: st.calls,
                    runs: st.productive,
                    reclaimed_bytes: st.reclaimed_bytes,
                    requested_bytes: st.requested_bytes,
                    seconds: st.time_ns as f64 / 1e9,
                    unsupported: st.unsupported,
                    errors: st.errors,
                })
                .collect(),
            watermarks: s
                .domains
                .iter()
                .map(|d| WatermarkMetrics {
                    domain: d.reading.domain.to_string(),
                    total_bytes: d.reading.total_bytes,
                    free_bytes: d.reading.free_bytes,
                    min_bytes: d.marks.min,
                    low_bytes: d.marks.low,
                    high_bytes: d.marks.high,
                    level: d.level.name().into(),
                    reclaiming: d.reclaiming,
                })
                .collect(),
            psi_some_avg10: s.pressure.map(|p| p.some.avg10),
            psi_full_avg10: s.pressure.map(|p| p.full.avg10),
        };
        (triggers, actions, Some(reclaim))
    }
}
