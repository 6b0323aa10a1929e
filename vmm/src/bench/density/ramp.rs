//! The ramp: add density VMs one at a time while a sampler watches the process's resident
//! memory, until the host can no longer hold them within the budget without a guest stalling.
//!
//! After each VM is added, the ramp waits until the VMs ran enough phases in the new
//! configuration ([`RampConfig::newest_phases`], [`RampConfig::others_phases`]). The step
//! holds when, during that time, the resident memory never exceeded the budget and no phase
//! stalled longer than [`RampConfig::stall_limit`]; the ramp stops at the first step that
//! does not hold (or at [`RampConfig::max_vms`], or when its time runs out).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::engine::EngineRig;
use super::guest::{DensityVm, GuestSpec, PhaseRecord, VmTotals};

/// Time the touch and the verify of one phase take on an idle host (the stall baseline).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Baseline {
    /// Touching one window, less runqueue wait.
    pub touch: Duration,
    /// Reading the previous window back, less runqueue wait.
    pub verify: Duration,
}

impl Baseline {
    /// The stall of one phase: how much longer than on an idle host its touch and its verify
    /// took, not counting time spent waiting for a core.
    pub fn stall(&self, r: &PhaseRecord) -> Duration {
        let touch = r.touch.own().saturating_sub(self.touch);
        let verify = r
            .verify
            .map(|v| v.own().saturating_sub(self.verify))
            .unwrap_or_default();
        touch + verify
    }
}

/// One sample of the host's state.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// Seconds since the sampler started.
    pub t: f64,
    /// Resident memory of this process (`/proc/self/statm`), bytes.
    pub resident: u64,
    /// VMs running.
    pub vms: usize,
}

/// Resident memory of this process, bytes.
pub fn process_resident() -> Result<u64, String> {
    let text = std::fs::read_to_string("/proc/self/statm")
        .map_err(|e| format!("/proc/self/statm: {e}"))?;
    let pages: u64 = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("/proc/self/statm {text:?}"))?;
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Ok(pages * u64::try_from(page).unwrap_or(4096))
}

/// Samples resident memory and the VM count every `period` on its own thread.
#[derive(Debug)]
pub struct Sampler {
    samples: Arc<Mutex<Vec<Sample>>>,
    vms: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sampler {
    /// Start sampling.
    pub fn start(period: Duration) -> Sampler {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let vms = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, v, st) = (Arc::clone(&samples), Arc::clone(&vms), Arc::clone(&stop));
        let t0 = Instant::now();
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Acquire) {
                if let Ok(resident) = process_resident() {
                    s.lock().unwrap_or_else(|e| e.into_inner()).push(Sample {
                        t: t0.elapsed().as_secs_f64(),
                        resident,
                        vms: v.load(Ordering::Acquire),
                    });
                }
                std::thread::sleep(period);
            }
        });
        Sampler {
            samples,
            vms,
            stop,
            thread: Some(thread),
        }
    }

    /// Tell the sampler how many VMs run now.
    pub fn set_vms(&self, n: usize) {
        self.vms.store(n, Ordering::Release);
    }

    /// Samples from index `from` on.
    pub fn samples_from(&self, from: usize) -> Vec<Sample> {
        let g = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        g.get(from..).map(<[_]>::to_vec).unwrap_or_default()
    }

    /// Number of samples so far.
    pub fn len(&self) -> usize {
        self.samples.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether there is no sample yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Stop and return every sample.
    pub fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How to ramp.
#[derive(Clone, Copy, Debug)]
pub struct RampConfig {
    /// Resident budget B, bytes.
    pub budget: u64,
    /// Each VM.
    pub spec: GuestSpec,
    /// Stop adding at this many VMs.
    pub max_vms: usize,
    /// A phase that stalls longer than this ends the ramp.
    pub stall_limit: Duration,
    /// Phases the newest VM must finish before its step is judged.
    pub newest_phases: u64,
    /// Phases every other VM must finish after the add before the step is judged.
    pub others_phases: u64,
    /// A step that takes longer than this fails (a guest made no progress).
    pub step_timeout: Duration,
    /// The whole ramp's time; when it runs out the ramp ends with what it held.
    pub time_limit: Duration,
    /// Idle-host touch and verify times.
    pub baseline: Baseline,
}

/// Why the ramp stopped.
#[derive(Clone, Debug, PartialEq)]
pub enum RampEnd {
    /// Resident memory went over the budget.
    OverBudget {
        /// Highest sample, bytes.
        resident: u64,
    },
    /// A phase stalled longer than the limit.
    Stall {
        /// VM index.
        vm: usize,
        /// The stall.
        stall: Duration,
    },
    /// A step did not finish in time.
    StepTimeout,
    /// The ramp's time ran out.
    TimeLimit,
    /// [`RampConfig::max_vms`] VMs were held.
    MaxVms,
}

/// What one ramp measured.
#[derive(Clone, Debug)]
pub struct RampResult {
    /// VMs held.
    pub held: usize,
    /// VMs started (held, plus the one whose step failed).
    pub started: usize,
    /// Why it stopped.
    pub end: RampEnd,
    /// Stall of every phase finished during held steps.
    pub stalls: Vec<Duration>,
    /// Every phase record, failed step included.
    pub records: Vec<PhaseRecord>,
    /// Highest resident sample during held steps, bytes.
    pub max_resident_held: u64,
    /// What each VM reported when stopped.
    pub totals: Vec<VmTotals>,
    /// Mismatches of the last windows, checked on stop.
    pub tail_mismatches: u64,
    /// From the first VM's start to the last step's end.
    pub wall: Duration,
}

/// Run one ramp; `sampler` must be running (the ramp sets its VM count). With `rig`, every VM
/// is handed to the reclaim engine (and its swap) as it starts.
pub fn ramp(
    cfg: &RampConfig,
    sampler: &Sampler,
    label: &str,
    rig: Option<&EngineRig>,
) -> Result<RampResult, String> {
    let t0 = Instant::now();
    let mut vms: Vec<DensityVm> = Vec::new();
    let mut stalls = Vec::new();
    let mut max_resident_held = 0u64;
    let mut seen: Vec<usize> = Vec::new();
    let mut records = Vec::new();
    let end = loop {
        if vms.len() >= cfg.max_vms {
            break RampEnd::MaxVms;
        }
        if t0.elapsed() >= cfg.time_limit {
            break RampEnd::TimeLimit;
        }
        let n = vms.len();
        let step_sample = sampler.len();
        let base_phases: Vec<u64> = vms.iter().map(|v| v.shared().phases()).collect();
        let vm = DensityVm::start(n, &cfg.spec)?;
        if let Some(rig) = rig {
            rig.add_vm(&vm)?;
        }
        vms.push(vm);
        seen.push(0);
        sampler.set_vms(vms.len());
        let step_t0 = Instant::now();
        let mut step_stalls = Vec::new();
        let mut step_max = 0u64;
        let outcome = loop {
            std::thread::sleep(Duration::from_millis(25));
            for v in &vms {
                v.check_alive()?;
            }
            if let Some(f) = rig.and_then(EngineRig::swap_failure) {
                return Err(f);
            }
            let mut worst: Option<(usize, Duration)> = None;
            for (i, v) in vms.iter().enumerate() {
                let new = v.shared().records_from(seen[i]);
                seen[i] += new.len();
                for r in new {
                    let s = cfg.baseline.stall(&r);
                    step_stalls.push(s);
                    if worst.is_none_or(|(_, w)| s > w) {
                        worst = Some((i, s));
                    }
                    records.push(r);
                }
            }
            step_max = sampler
                .samples_from(step_sample)
                .iter()
                .map(|s| s.resident)
                .fold(step_max, u64::max);
            if step_max > cfg.budget {
                break Some(RampEnd::OverBudget { resident: step_max });
            }
            if let Some((vm, stall)) = worst.filter(|(_, s)| *s > cfg.stall_limit) {
                break Some(RampEnd::Stall { vm, stall });
            }
            let newest_ok = vms[n].shared().phases() >= cfg.newest_phases;
            let others_ok = vms[..n]
                .iter()
                .zip(&base_phases)
                .all(|(v, b)| v.shared().phases() >= b + cfg.others_phases);
            if newest_ok && others_ok {
                break None;
            }
            if step_t0.elapsed() > cfg.step_timeout {
                break Some(RampEnd::StepTimeout);
            }
        };
        if let Some(e) = outcome {
            super::super::progress(&format!(
                "{label}: {} VMs not held ({e:?}), {:.1} s",
                vms.len(),
                t0.elapsed().as_secs_f64()
            ));
            break e;
        }
        stalls.extend(step_stalls);
        max_resident_held = max_resident_held.max(step_max);
        super::super::progress(&format!(
            "{label}: {} VMs held, resident max {:.2} GiB, {:.1} s",
            vms.len(),
            step_max as f64 / (1u64 << 30) as f64,
            t0.elapsed().as_secs_f64()
        ));
    };
    let held = match end {
        RampEnd::MaxVms | RampEnd::TimeLimit => vms.len(),
        _ => vms.len().saturating_sub(1),
    };
    let wall = t0.elapsed();
    let started = vms.len();
    for v in &vms {
        v.request_stop()?;
    }
    let mut totals = Vec::new();
    let mut tail_mismatches = 0;
    for (i, v) in vms.into_iter().enumerate() {
        let shared = Arc::clone(v.shared());
        let index = v.index;
        totals.push(v.stop(Duration::from_secs(60))?);
        if let Some(rig) = rig {
            rig.remove_vm(index);
        }
        let rest = shared.records_from(seen[i]);
        records.extend(rest);
        tail_mismatches += shared.tail_mismatches();
    }
    sampler.set_vms(0);
    Ok(RampResult {
        held,
        started,
        end,
        stalls,
        records,
        max_resident_held,
        totals,
        tail_mismatches,
        wall,
    })
}

/// The `p`-th percentile (0..=100) of `v` (nearest rank); None when empty.
pub fn percentile(v: &[Duration], p: f64) -> Option<Duration> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_unstable();
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s.get(rank.clamp(1, s.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::density::guest::Span;

    #[test]
    fn percentile_is_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&v, 99.0), Some(Duration::from_millis(99)));
        assert_eq!(percentile(&v, 100.0), Some(Duration::from_millis(100)));
        assert_eq!(percentile(&v[..1], 99.0), Some(Duration::from_millis(1)));
        assert_eq!(percentile(&[], 99.0), None);
    }

    #[test]
    fn stall_leaves_out_runqueue_wait_and_the_idle_baseline() {
        let b = Baseline {
            touch: Duration::from_millis(300),
            verify: Duration::from_millis(10),
        };
        let r = PhaseRecord {
            vm: 0,
            phase: 3,
            end: Instant::now(),
            touch: Span {
                wall: Duration::from_millis(2000),
                runq: Duration::from_millis(1500),
                run: Duration::from_millis(400),
            },
            verify: Some(Span {
                wall: Duration::from_millis(5),
                runq: Duration::ZERO,
                run: Duration::from_millis(5),
            }),
            report: Duration::ZERO,
            mismatches: 0,
        };
        assert_eq!(b.stall(&r), Duration::from_millis(200));
    }

    #[test]
    fn resident_is_readable() {
        assert!(process_resident().expect("statm") > 0);
    }
}
