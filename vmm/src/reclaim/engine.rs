//! [`ReclaimEngine`]: watermarks and pressure in, phases out.
//!
//! One [`ReclaimEngine::step`] is one sampling interval:
//!
//! 1. every target takes an access sample ([`ReclaimTarget::sample`]), which gives its
//!    resident memory and working-set estimate;
//! 2. the domains are read (budget: `B - sum(resident)`; nodes: the pool's free memory) and
//!    the watermark tracker updated; PSI and reported allocation failures are checked;
//! 3. if a domain is reclaiming, or PSI is above its trigger, or an allocation failed, the
//!    enabled phases run **in order**, each over the targets idlest first, each call bounded by
//!    what is still needed; after every phase the domains are measured again and the run stops
//!    as soon as none is reclaiming (every one back at or above high).
//!
//! Outside urgency, phases other than [`Phase::Reported`] skip targets whose idle share is
//! below [`EngineConfig::idle_min_fraction`], and asynchronous requests (balloon, hinting) are
//! credited against the need, so a run that inflated balloons does not go on to swap for the
//! same bytes. Below min (urgent), idleness is ignored and asynchronous requests are not
//! credited: the run goes on to the phases that free memory at once.
//!
//! A run that ends unsatisfied without any progress backs off for
//! [`EngineConfig::backoff_steps`] steps.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::pressure::{PressureReading, PressureSource, PsiTrigger};
use super::target::{Idleness, Phase, PhaseOutcome, PhaseRequest, ReclaimTarget, TargetError};
use super::watermark::{Domain, DomainReading, DomainState, WatermarkFractions, WatermarkTracker};
use super::ReclaimError;
use crate::hostpool::FramePool;

pub use super::engine_report::{
    EngineSnapshot, EventOutcome, PhaseStats, ReclaimEvent, StepReport, Trigger,
};

/// Engine settings. `Default` watches nothing (no budget, no pool): set `budget_bytes` or
/// call [`ReclaimEngine::with_pool`].
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Resident budget B for all targets' memory; `None`: no budget domain.
    pub budget_bytes: Option<u64>,
    /// Watermarks (fractions of each domain's total).
    pub watermarks: WatermarkFractions,
    /// PSI trigger; `None`: PSI is read (and reported) but never triggers.
    pub psi: Option<PsiTrigger>,
    /// Phases that may run (always in [`Phase::ALL`] order).
    pub phases: Vec<Phase>,
    /// The working set is what was touched in this many intervals (steps).
    pub working_set_intervals: u32,
    /// Outside urgency, targets with a smaller idle share are left alone by phases 2-5.
    pub idle_min_fraction: f64,
    /// What a PSI or allocation-failure trigger asks for when no watermark needs anything.
    pub signal_step_bytes: u64,
    /// Steps to wait after a run that made no progress.
    pub backoff_steps: u32,
    /// Interval of the thread driver.
    pub interval: Duration,
    /// Events kept in the log.
    pub event_log_len: usize,
    /// When every domain is well above high (by more than `high - low`), give targets back
    /// what the engine took through their balloons ([`ReclaimTarget::release`]).
    pub release: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            budget_bytes: None,
            watermarks: WatermarkFractions::default(),
            psi: Some(PsiTrigger::default()),
            phases: Phase::ALL.to_vec(),
            working_set_intervals: 4,
            idle_min_fraction: 0.25,
            signal_step_bytes: 64 << 20,
            backoff_steps: 4,
            interval: Duration::from_millis(500),
            event_log_len: 256,
            release: true,
        }
    }
}

impl EngineConfig {
    /// A budget of `budget_bytes` with default watermarks and every phase.
    pub fn with_budget(budget_bytes: u64) -> Self {
        EngineConfig {
            budget_bytes: Some(budget_bytes),
            ..Default::default()
        }
    }

    /// Check the settings.
    pub fn validate(&self) -> Result<(), ReclaimError> {
        self.watermarks.validate()?;
        if self.working_set_intervals == 0 || self.working_set_intervals > 32 {
            return Err(ReclaimError::Config(
                "working_set_intervals must be in 1..=32".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.idle_min_fraction) {
            return Err(ReclaimError::Config(
                "idle_min_fraction must be in 0..=1".into(),
            ));
        }
        if self.budget_bytes == Some(0) {
            return Err(ReclaimError::Config("budget_bytes must not be 0".into()));
        }
        if self.interval.is_zero() {
            return Err(ReclaimError::Config("interval must not be 0".into()));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct State {
    tracker: WatermarkTracker,
    steps: u64,
    runs: u64,
    urgent_runs: u64,
    satisfied_runs: u64,
    triggers: [u64; 3],
    phases: [PhaseStats; 5],
    domains: Vec<DomainState>,
    pressure: Option<PressureReading>,
    events: VecDeque<ReclaimEvent>,
    backoff: u32,
    psi_error_logged: bool,
    released_bytes: u64,
}

/// The reclaim engine. Share it as `Arc<ReclaimEngine>`; every method takes `&self`.
#[derive(Debug)]
pub struct ReclaimEngine {
    config: EngineConfig,
    pressure: Box<dyn PressureSource>,
    pool: Option<Arc<dyn FramePool>>,
    targets: Mutex<Vec<Arc<dyn ReclaimTarget>>>,
    state: Mutex<State>,
    /// Serialises steps (the driver thread and direct callers).
    stepping: Mutex<()>,
    alloc_failed: AtomicBool,
    wake: (Mutex<bool>, Condvar),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl ReclaimEngine {
    /// An engine with `config` reading `pressure`.
    pub fn new(
        config: EngineConfig,
        pressure: impl PressureSource + 'static,
    ) -> Result<ReclaimEngine, ReclaimError> {
        config.validate()?;
        let tracker = WatermarkTracker::new(config.watermarks)?;
        Ok(ReclaimEngine {
            pressure: Box::new(pressure),
            pool: None,
            targets: Mutex::new(Vec::new()),
            state: Mutex::new(State {
                tracker,
                steps: 0,
                runs: 0,
                urgent_runs: 0,
                satisfied_runs: 0,
                triggers: [0; 3],
                phases: [PhaseStats::default(); 5],
                domains: Vec::new(),
                pressure: None,
                events: VecDeque::new(),
                backoff: 0,
                psi_error_logged: false,
                released_bytes: 0,
            }),
            stepping: Mutex::new(()),
            alloc_failed: AtomicBool::new(false),
            wake: (Mutex::new(false), Condvar::new()),
            config,
        })
    }

    /// Also watch the free memory of every node of `pool`.
    pub fn with_pool(mut self, pool: Arc<dyn FramePool>) -> ReclaimEngine {
        self.pool = Some(pool);
        self
    }

    /// The configuration.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Register a target (a VM). A target with the same id replaces the old one.
    pub fn add_target(&self, target: Arc<dyn ReclaimTarget>) {
        let mut t = lock(&self.targets);
        t.retain(|x| x.id() != target.id());
        t.push(target);
    }

    /// Forget the target `id`; returns whether it was registered.
    pub fn remove_target(&self, id: &str) -> bool {
        let mut t = lock(&self.targets);
        let before = t.len();
        t.retain(|x| x.id() != id);
        t.len() != before
    }

    /// Ids of the registered targets.
    pub fn target_ids(&self) -> Vec<String> {
        lock(&self.targets)
            .iter()
            .map(|t| t.id().to_string())
            .collect()
    }

    /// An allocation failed: the next step runs reclaim even if the watermarks are fine, and a
    /// running driver wakes up at once.
    pub fn notify_alloc_failure(&self) {
        self.alloc_failed.store(true, Ordering::Release);
        let (m, cv) = &self.wake;
        *lock(m) = true;
        cv.notify_all();
    }

    fn read_domains(&self, resident: u64) -> Result<Vec<DomainReading>, ReclaimError> {
        let mut out = Vec::new();
        if let Some(b) = self.config.budget_bytes {
            out.push(DomainReading {
                domain: Domain::Budget,
                total_bytes: b,
                free_bytes: b.saturating_sub(resident),
            });
        }
        if let Some(pool) = &self.pool {
            let f = pool
                .figures()
                .map_err(|e| ReclaimError::Pool(e.to_string()))?;
            for n in f.nodes {
                out.push(DomainReading {
                    domain: Domain::Node(n.node),
                    total_bytes: n.total_bytes,
                    free_bytes: n.free_bytes,
                });
            }
        }
        Ok(out)
    }

    fn resident_of(targets: &[(Arc<dyn ReclaimTarget>, Idleness)]) -> u64 {
        targets
            .iter()
            .map(|(t, i)| t.resident_bytes().unwrap_or(i.resident_bytes))
            .sum()
    }

    fn call_phase(
        phase: Phase,
        t: &dyn ReclaimTarget,
        req: &PhaseRequest,
    ) -> Result<PhaseOutcome, TargetError> {
        match phase {
            Phase::Reported => {
                let mut out = PhaseOutcome::default();
                let mut unsupported = 0;
                let mut last_err = None;
                for r in [t.take_reported(), t.start_hinting()] {
                    match r {
                        Ok(o) => {
                            out.reclaimed += o.reclaimed;
                            out.requested += o.requested;
                        }
                        Err(TargetError::Unsupported(m)) => {
                            unsupported += 1;
                            last_err = Some(TargetError::Unsupported(m));
                        }
                        Err(e) => return Err(e),
                    }
                }
                match last_err {
                    Some(e) if unsupported == 2 => Err(e),
                    _ => Ok(out),
                }
            }
            Phase::Balloon => t.inflate_balloon(req),
            Phase::DropClean => t.drop_clean(req),
            Phase::SwapOut => t.swap_out(req),
            Phase::SplitHuge => t.split_huge(req),
        }
    }

    /// One interval: sample, measure, and reclaim if needed. Deterministic given the targets
    /// and the pressure source; the driver thread calls it every [`EngineConfig::interval`].
    pub fn step(&self) -> Result<StepReport, ReclaimError> {
        let _serial = lock(&self.stepping);
        let targets: Vec<Arc<dyn ReclaimTarget>> = lock(&self.targets).clone();
        let n = self.config.working_set_intervals;
        let mut cands = Vec::with_capacity(targets.len());
        for t in targets {
            match t.sample(n) {
                Ok(i) => cands.push((t, i)),
                Err(TargetError::Gone) => {
                    tracing::info!(vm = %t.id(), "reclaim target gone; removed");
                    self.remove_target(t.id());
                }
                Err(e) => tracing::warn!(vm = %t.id(), error = %e, "access sample failed"),
            }
        }
        let resident: u64 = cands.iter().map(|(_, i)| i.resident_bytes).sum();
        let readings = self.read_domains(resident)?;
        let pressure = self.pressure.read();
        let mut st = lock(&self.state);
        st.steps += 1;
        let step = st.steps;
        let domains = st.tracker.update(&readings);
        let pressure = match pressure {
            Ok(r) => Some(r),
            Err(e) => {
                if !st.psi_error_logged {
                    tracing::warn!(error = %e, "pressure signal unavailable; watermarks only");
                    st.psi_error_logged = true;
                }
                None
            }
        };
        st.pressure = pressure;
        let psi_fires = match (&self.config.psi, &pressure) {
            (Some(t), Some(r)) => t.fires(r),
            _ => false,
        };
        let alloc_failed = self.alloc_failed.swap(false, Ordering::AcqRel);
        let mut report = StepReport {
            step,
            domains_before: domains.clone(),
            domains_after: domains.clone(),
            pressure,
            ..Default::default()
        };
        let watermark = domains.iter().any(|d| d.reclaiming);
        report.trigger = if watermark {
            Some(Trigger::Watermark)
        } else if alloc_failed {
            Some(Trigger::AllocFailure)
        } else if psi_fires {
            Some(Trigger::Psi)
        } else {
            None
        };
        st.domains = domains.clone();
        let Some(trigger) = report.trigger else {
            st.backoff = 0;
            drop(st);
            if self.config.release {
                report.released_bytes = self.release(step, &mut cands, &domains);
            }
            return Ok(report);
        };
        let urgent = domains.iter().any(|d| d.urgent());
        report.urgent = urgent;
        // Urgency and allocation failures override a backoff.
        if st.backoff > 0 && !urgent && trigger != Trigger::AllocFailure {
            st.backoff -= 1;
            report.backed_off = true;
            return Ok(report);
        }
        st.runs += 1;
        st.triggers[trigger.index()] += 1;
        if urgent {
            st.urgent_runs += 1;
        }
        let wm_need = domains.iter().map(|d| d.need_bytes()).max().unwrap_or(0);
        let need = if watermark {
            wm_need
        } else {
            self.config.signal_step_bytes
        };
        report.need_bytes = need;
        tracing::info!(
            step,
            trigger = trigger.name(),
            urgent,
            need_mib = need >> 20,
            "reclaim run"
        );
        drop(st);

        // Idlest first (most idle bytes); ties by id for determinism.
        cands.sort_by(|a, b| {
            b.1.idle_bytes()
                .cmp(&a.1.idle_bytes())
                .then_with(|| a.0.id().cmp(b.0.id()))
        });
        let mut remaining = need;
        let mut async_credit = 0u64;
        let mut progress = false;
        let mut domains_now = domains;
        let mut satisfied = remaining == 0;
        for phase in Phase::ALL {
            if satisfied {
                break;
            }
            if !self.config.phases.contains(&phase) {
                continue;
            }
            let mut phase_total = PhaseOutcome::default();
            let mut ran = false;
            for (t, idle) in &cands {
                if remaining == 0 {
                    break;
                }
                if phase.filters_idle()
                    && !urgent
                    && idle.idle_fraction() < self.config.idle_min_fraction
                {
                    continue;
                }
                let req = PhaseRequest {
                    max_bytes: remaining,
                    cold_intervals: n,
                    urgent,
                };
                let t0 = Instant::now();
                let r = Self::call_phase(phase, t.as_ref(), &req);
                let took = t0.elapsed();
                ran |= self.record(step, t.id(), phase, urgent, &r, took);
                if let Ok(o) = r {
                    phase_total.reclaimed += o.reclaimed;
                    phase_total.requested += o.requested;
                    progress |= o.reclaimed > 0 || o.requested > 0;
                    // Reported pages were discarded before this step: the measurement already
                    // shows them, so they are counted but not credited.
                    let now = if phase == Phase::Reported {
                        0
                    } else {
                        o.reclaimed
                    };
                    let later = if urgent { 0 } else { o.requested };
                    async_credit += later;
                    remaining = remaining.saturating_sub(now + later);
                }
            }
            if ran {
                report.phases.push((phase, phase_total));
            }
            if watermark {
                // Measure again: stop as soon as no domain is reclaiming.
                let resident = Self::resident_of(&cands);
                let readings = self.read_domains(resident)?;
                let mut st = lock(&self.state);
                domains_now = st.tracker.update(&readings);
                st.domains = domains_now.clone();
                drop(st);
                let still = domains_now
                    .iter()
                    .map(|d| d.need_bytes())
                    .max()
                    .unwrap_or(0);
                remaining = still.saturating_sub(async_credit);
                satisfied = remaining == 0;
            } else {
                satisfied = remaining == 0;
            }
        }
        report.domains_after = domains_now;
        report.satisfied = satisfied;
        let mut st = lock(&self.state);
        if satisfied {
            st.satisfied_runs += 1;
            st.backoff = 0;
        } else if !progress {
            st.backoff = self.config.backoff_steps;
        }
        tracing::info!(
            step,
            satisfied,
            reclaimed_mib = report.reclaimed_bytes() >> 20,
            phases = ?report.phase_order(),
            "reclaim run done"
        );
        Ok(report)
    }

    /// No pressure: when every domain is above high by more than `high - low`, give the
    /// busiest targets back up to that surplus. Returns the bytes given back.
    fn release(
        &self,
        step: u64,
        cands: &mut [(Arc<dyn ReclaimTarget>, Idleness)],
        domains: &[DomainState],
    ) -> u64 {
        let surplus = domains
            .iter()
            .map(|d| {
                let margin = d.marks.high.saturating_sub(d.marks.low);
                d.reading
                    .free_bytes
                    .saturating_sub(d.marks.high.saturating_add(margin))
            })
            .min()
            .unwrap_or(0);
        if surplus == 0 {
            return 0;
        }
        // Busiest first: they are the ones that need memory.
        cands.sort_by(|a, b| {
            a.1.idle_bytes()
                .cmp(&b.1.idle_bytes())
                .then_with(|| a.0.id().cmp(b.0.id()))
        });
        let mut given = 0u64;
        for (t, _) in cands.iter() {
            if given >= surplus {
                break;
            }
            match t.release(surplus - given) {
                Ok(0) => {}
                Ok(n) => {
                    given += n;
                    tracing::info!(vm = t.id(), step, bytes = n, "reclaim: released to guest");
                }
                Err(TargetError::Unsupported(_)) => {}
                Err(e) => tracing::warn!(vm = t.id(), error = %e, "release failed"),
            }
        }
        lock(&self.state).released_bytes += given;
        given
    }

    /// Count one target call and log it; returns whether the phase really ran (not
    /// unsupported).
    fn record(
        &self,
        step: u64,
        vm: &str,
        phase: Phase,
        urgent: bool,
        r: &Result<PhaseOutcome, TargetError>,
        took: Duration,
    ) -> bool {
        let mut st = lock(&self.state);
        let s = &mut st.phases[phase.index()];
        s.calls += 1;
        s.time_ns = s.time_ns.saturating_add(nanos(took));
        let outcome = match r {
            Ok(o) => {
                s.reclaimed_bytes += o.reclaimed;
                s.requested_bytes += o.requested;
                if o.reclaimed == 0 && o.requested == 0 {
                    return true;
                }
                s.productive += 1;
                tracing::info!(
                    vm,
                    phase = phase.name(),
                    reclaimed = o.reclaimed,
                    requested = o.requested,
                    us = took.as_micros() as u64,
                    "reclaim phase"
                );
                EventOutcome::Done(*o)
            }
            Err(TargetError::Unsupported(why)) => {
                s.unsupported += 1;
                tracing::debug!(vm, phase = phase.name(), why = %why, "phase unsupported");
                return false;
            }
            Err(e) => {
                s.errors += 1;
                tracing::warn!(vm, phase = phase.name(), error = %e, "reclaim phase failed");
                EventOutcome::Failed(e.to_string())
            }
        };
        let cap = self.config.event_log_len;
        if cap > 0 {
            if st.events.len() >= cap {
                st.events.pop_front();
            }
            st.events.push_back(ReclaimEvent {
                step,
                vm: vm.to_string(),
                phase,
                urgent,
                outcome,
                duration: took,
            });
        }
        true
    }

    /// Counters, domains and the event log.
    pub fn snapshot(&self) -> EngineSnapshot {
        let targets = lock(&self.targets).len();
        let st = lock(&self.state);
        EngineSnapshot {
            steps: st.steps,
            runs: st.runs,
            urgent_runs: st.urgent_runs,
            satisfied_runs: st.satisfied_runs,
            triggers: Trigger::ALL
                .iter()
                .map(|t| (t.name(), st.triggers[t.index()]))
                .collect(),
            phases: Phase::ALL
                .iter()
                .map(|p| (*p, st.phases[p.index()]))
                .collect(),
            domains: st.domains.clone(),
            pressure: st.pressure,
            released_bytes: st.released_bytes,
            targets,
            events: st.events.iter().cloned().collect(),
        }
    }

    /// Run [`ReclaimEngine::step`] on a thread every [`EngineConfig::interval`] (at once after
    /// [`ReclaimEngine::notify_alloc_failure`]) until the handle is stopped or dropped.
    pub fn spawn(self: &Arc<Self>) -> Result<EngineHandle, ReclaimError> {
        let stop = Arc::new(AtomicBool::new(false));
        let engine = Arc::clone(self);
        let stop2 = Arc::clone(&stop);
        let join = std::thread::Builder::new()
            .name("reclaim".into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    if let Err(e) = engine.step() {
                        tracing::warn!(error = %e, "reclaim step failed");
                    }
                    let (m, cv) = &engine.wake;
                    let mut woken = lock(m);
                    if !*woken && !stop2.load(Ordering::Acquire) {
                        woken = cv
                            .wait_timeout(woken, engine.config.interval)
                            .map(|(g, _)| g)
                            .unwrap_or_else(|e| e.into_inner().0);
                    }
                    *woken = false;
                }
            })
            .map_err(|e| ReclaimError::Spawn(e.to_string()))?;
        Ok(EngineHandle {
            engine: Arc::clone(self),
            stop,
            join: Some(join),
        })
    }
}

/// A running driver thread; stopping or dropping it ends the thread.
#[derive(Debug)]
pub struct EngineHandle {
    engine: Arc<ReclaimEngine>,
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl EngineHandle {
    /// The engine.
    pub fn engine(&self) -> &Arc<ReclaimEngine> {
        &self.engine
    }

    /// Stop the thread and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        let (m, cv) = &self.engine.wake;
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

impl Drop for EngineHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
#[path = "engine_tests.rs"]
mod tests;
