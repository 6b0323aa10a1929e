//! Reclaim on, beyond free page reporting: the reclaim engine ([`crate::reclaim`]) with the
//! budget B over every density VM, and the VMM swap ([`crate::swap`]) behind its phases 3
//! and 4.
//!
//! Each VM becomes a [`WindowTarget`] over its window with
//! - a balloon hook that takes what the guest reported (phase 1) and answers "unsupported"
//!   to inflation (phase 2): the tiny guest's driver negotiates free page reporting only, so
//!   a raised balloon target would never be met, and counting it as on its way would keep
//!   the engine from freeing memory by other means;
//! - the VM's [`VmSwap`] (on one shared [`SwapFile`]) as its swap hook;
//! - no quiesce hook: the guest writes all the time, so the zero-page split (phase 5) answers
//!   unsupported.
//!
//! The engine steps every 100 ms on its own thread; PSI is read but does not trigger (the
//! host's pressure comes from other work on a shared machine; the budget domain is what the
//! benchmark sets).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tidepool_balloon::Balloon;
use tidepool_virtio::MmioTransport;

use super::guest::DensityVm;
use crate::reclaim::{
    BalloonHook, EngineConfig, EngineHandle, Phase, ProcPressure, ReclaimEngine, TargetError,
    WindowTarget,
};
use crate::swap::{SwapFile, SwapFileConfig, VmSwap};

/// Phase 1 only: the delta of the balloon's discarded-by-reporting counter.
#[derive(Debug)]
struct ReportedOnly {
    dev: Arc<Mutex<MmioTransport<Balloon>>>,
    seen: Mutex<u64>,
}

impl ReportedOnly {
    fn total(&self) -> u64 {
        self.dev
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .accounting()
            .counters
            .reported_bytes_total
    }
}

impl BalloonHook for ReportedOnly {
    fn inflate(&self, _bytes: u64) -> Result<u64, TargetError> {
        Err(TargetError::Unsupported(
            "the density guest's balloon driver only reports free pages".into(),
        ))
    }

    fn take_reported(&self) -> Result<u64, TargetError> {
        let now = self.total();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let delta = now.saturating_sub(*seen);
        *seen = now;
        Ok(delta)
    }
}

/// What the engine and swap did over a ramp.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineFigures {
    /// Bytes each phase reclaimed, by phase name.
    pub phase_bytes: Vec<(&'static str, u64)>,
    /// Engine runs (steps with a trigger).
    pub runs: u64,
    /// Urgent runs (below the min watermark).
    pub urgent_runs: u64,
    /// Bytes written to the swap file.
    pub swap_written_bytes: u64,
    /// Bytes read back from it (swap-ins).
    pub swap_read_bytes: u64,
    /// Phase calls that failed, and the first failure's text.
    pub failed_calls: u64,
    /// The first failure, if any.
    pub first_failure: Option<String>,
}

impl EngineFigures {
    /// Bytes the phases after phase 1 reclaimed (what free page reporting alone did not).
    pub fn beyond_reporting(&self) -> u64 {
        self.phase_bytes
            .iter()
            .filter(|(n, _)| *n != Phase::Reported.name())
            .map(|(_, b)| b)
            .sum()
    }
}

/// The engine, its thread, the swap file and one swap per VM.
#[derive(Debug)]
pub struct EngineRig {
    engine: Arc<ReclaimEngine>,
    handle: Option<EngineHandle>,
    file: Arc<SwapFile>,
    swaps: Mutex<Vec<(usize, Arc<VmSwap>)>>,
}

impl EngineRig {
    /// An engine over budget `budget` and a swap file of `swap_bytes` in `dir`.
    pub fn start(budget: u64, swap_bytes: u64, dir: &Path) -> Result<EngineRig, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let file = SwapFile::create(SwapFileConfig::new(
            dir.join(format!("density-{}.swap", std::process::id())),
            swap_bytes,
        ))
        .map_err(|e| format!("swap file: {e}"))?;
        let config = EngineConfig {
            psi: None,
            interval: Duration::from_millis(100),
            ..EngineConfig::with_budget(budget)
        };
        let engine =
            Arc::new(ReclaimEngine::new(config, ProcPressure::new()).map_err(|e| e.to_string())?);
        let handle = engine.spawn().map_err(|e| e.to_string())?;
        Ok(EngineRig {
            engine,
            handle: Some(handle),
            file: Arc::new(file),
            swaps: Mutex::new(Vec::new()),
        })
    }

    fn id(index: usize) -> String {
        format!("vm{index}")
    }

    /// Register a VM with the engine (its swap, its balloon's reports).
    pub fn add_vm(&self, vm: &DensityVm) -> Result<(), String> {
        let swap = Arc::new(
            VmSwap::new(Arc::clone(vm.vm().window()), Arc::clone(&self.file))
                .map_err(|e| format!("VM {}: swap: {e}", vm.index))?,
        );
        let balloon = ReportedOnly {
            dev: Arc::clone(vm.transport()),
            seen: Mutex::new(0),
        };
        let seen = balloon.total();
        *balloon.seen.lock().unwrap_or_else(|e| e.into_inner()) = seen;
        let target = WindowTarget::new(Self::id(vm.index), vm.vm().window())
            .with_balloon(Arc::new(balloon))
            .with_swap(Arc::clone(&swap) as Arc<dyn crate::reclaim::SwapHook>);
        self.engine.add_target(Arc::new(target));
        self.swaps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((vm.index, swap));
        Ok(())
    }

    /// A swap-in failure of any VM, as text.
    pub fn swap_failure(&self) -> Option<String> {
        let swaps = self.swaps.lock().unwrap_or_else(|e| e.into_inner());
        swaps.iter().find_map(|(i, s)| {
            s.failure()
                .map(|f| format!("VM {i}: swap-in failed: {f:?}"))
        })
    }

    /// Unregister VM `index` and shut its swap down (after its vCPU stopped).
    pub fn remove_vm(&self, index: usize) {
        self.engine.remove_target(&Self::id(index));
        let mut swaps = self.swaps.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pos) = swaps.iter().position(|(i, _)| *i == index) {
            let (_, s) = swaps.remove(pos);
            s.shutdown();
        }
    }

    /// Stop the engine's thread; what it did.
    pub fn finish(mut self) -> EngineFigures {
        if let Some(h) = self.handle.take() {
            h.stop();
        }
        let snap = self.engine.snapshot();
        let io = self.file.counters();
        let failures: Vec<String> = snap
            .events
            .iter()
            .filter_map(|e| match &e.outcome {
                crate::reclaim::EventOutcome::Failed(why) => {
                    Some(format!("{} {}: {why}", e.vm, e.phase))
                }
                crate::reclaim::EventOutcome::Done(_) => None,
            })
            .collect();
        EngineFigures {
            failed_calls: snap.phases.iter().map(|(_, s)| s.errors).sum(),
            first_failure: failures.first().cloned(),
            phase_bytes: snap
                .phases
                .iter()
                .map(|(p, s)| (p.name(), s.reclaimed_bytes))
                .collect(),
            runs: snap.runs,
            urgent_runs: snap.urgent_runs,
            swap_written_bytes: io.bytes_written,
            swap_read_bytes: io.bytes_read,
        }
    }
}
