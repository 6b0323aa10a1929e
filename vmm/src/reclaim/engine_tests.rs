//! Engine tests against scripted targets and a synthetic pressure signal.

use super::*;
use crate::hostpool::{BlockPool, POOL_BLOCK_BYTES};
use crate::reclaim::pressure::SyntheticPressure;
use guest_mm::frame::{MigrateType, NodeId};
use guest_mm::policy::NumaPolicy;

const MIB: u64 = 1 << 20;

/// A scripted VM: resident memory that each phase can lower by up to `per_phase[phase]`.
#[derive(Debug)]
struct FakeVm {
    id: String,
    state: Mutex<FakeState>,
}

#[derive(Debug, Default)]
struct FakeState {
    resident: u64,
    working_set: u64,
    /// Bytes each phase can take (index: phase); `None`: unsupported.
    per_phase: [Option<u64>; 5],
    /// Balloon requests are asynchronous: they arrive on the next sample.
    pending_balloon: u64,
    calls: Vec<Phase>,
    reported: u64,
    /// Balloon bytes the engine inflated (given back by `release`).
    ballooned: u64,
}

impl FakeVm {
    fn new(id: &str, resident: u64, working_set: u64, per_phase: [Option<u64>; 5]) -> Arc<Self> {
        Arc::new(FakeVm {
            id: id.into(),
            state: Mutex::new(FakeState {
                resident,
                working_set,
                per_phase,
                ..Default::default()
            }),
        })
    }

    fn calls(&self) -> Vec<Phase> {
        lock(&self.state).calls.clone()
    }

    fn resident(&self) -> u64 {
        lock(&self.state).resident
    }

    fn take(&self, phase: Phase, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        let mut s = lock(&self.state);
        s.calls.push(phase);
        let Some(avail) = s.per_phase[phase.index()] else {
            return Err(TargetError::Unsupported(phase.name().into()));
        };
        let cold = if req.urgent {
            s.resident
        } else {
            s.resident.saturating_sub(s.working_set)
        };
        let n = avail.min(req.max_bytes).min(cold);
        s.per_phase[phase.index()] = Some(avail - n);
        if phase == Phase::Balloon {
            s.pending_balloon += n;
            s.ballooned += n;
            return Ok(PhaseOutcome::requested(n));
        }
        s.resident -= n;
        Ok(PhaseOutcome::reclaimed(n))
    }
}

impl ReclaimTarget for FakeVm {
    fn id(&self) -> &str {
        &self.id
    }
    fn resident_bytes(&self) -> Result<u64, TargetError> {
        Ok(self.resident())
    }
    fn sample(&self, _intervals: u32) -> Result<Idleness, TargetError> {
        let mut s = lock(&self.state);
        let p = std::mem::take(&mut s.pending_balloon);
        s.resident = s.resident.saturating_sub(p);
        Ok(Idleness {
            resident_bytes: s.resident,
            working_set_bytes: s.working_set.min(s.resident),
        })
    }
    fn take_reported(&self) -> Result<PhaseOutcome, TargetError> {
        let mut s = lock(&self.state);
        s.calls.push(Phase::Reported);
        Ok(PhaseOutcome::reclaimed(std::mem::take(&mut s.reported)))
    }
    fn inflate_balloon(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        self.take(Phase::Balloon, req)
    }
    fn drop_clean(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        self.take(Phase::DropClean, req)
    }
    fn swap_out(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        self.take(Phase::SwapOut, req)
    }
    fn split_huge(&self, req: &PhaseRequest) -> Result<PhaseOutcome, TargetError> {
        self.take(Phase::SplitHuge, req)
    }
    fn release(&self, max_bytes: u64) -> Result<u64, TargetError> {
        let mut s = lock(&self.state);
        let n = s.ballooned.min(max_bytes);
        s.ballooned -= n;
        s.resident += n;
        Ok(n)
    }
}

fn engine(budget: u64, psi: SyntheticPressure) -> ReclaimEngine {
    ReclaimEngine::new(EngineConfig::with_budget(budget), psi).expect("engine")
}

/// An engine with `cfg` and no pressure.
fn engine_with(cfg: EngineConfig) -> ReclaimEngine {
    ReclaimEngine::new(cfg, SyntheticPressure::new()).expect("engine")
}

/// An engine over a 1000 MiB budget with no pressure, watching `vms`.
fn rig(vms: &[&Arc<FakeVm>]) -> ReclaimEngine {
    let e = engine(1000 * MIB, SyntheticPressure::new());
    for vm in vms {
        e.add_target(Arc::clone(*vm) as Arc<dyn ReclaimTarget>);
    }
    e
}

/// A [`rig`] watching one VM, "a", made by [`FakeVm::new`] from the arguments.
fn one_vm(
    resident: u64,
    working_set: u64,
    per_phase: [Option<u64>; 5],
) -> (Arc<FakeVm>, ReclaimEngine) {
    let vm = FakeVm::new("a", resident, working_set, per_phase);
    let e = rig(&[&vm]);
    (vm, e)
}

/// The phases of a run that goes as far as swap out, in order.
const THROUGH_SWAP_OUT: [Phase; 4] = [
    Phase::Reported,
    Phase::Balloon,
    Phase::DropClean,
    Phase::SwapOut,
];

#[test]
fn config_is_validated() {
    let p = SyntheticPressure::new();
    for bad in [
        EngineConfig {
            working_set_intervals: 0,
            ..Default::default()
        },
        EngineConfig {
            idle_min_fraction: 2.0,
            ..Default::default()
        },
        EngineConfig {
            budget_bytes: Some(0),
            ..Default::default()
        },
        EngineConfig {
            watermarks: WatermarkFractions {
                min: 0.5,
                low: 0.1,
                high: 0.2,
            },
            ..Default::default()
        },
    ] {
        assert!(ReclaimEngine::new(bad, p.clone()).is_err());
    }
}

#[test]
fn no_pressure_no_run() {
    let (vm, e) = one_vm(500 * MIB, 0, [Some(1 << 40); 5]);
    let r = e.step().expect("step");
    assert_eq!(r.trigger, None);
    assert!(vm.calls().is_empty());
    assert_eq!(e.snapshot().runs, 0);
    assert_eq!(e.snapshot().steps, 1);
}

#[test]
fn phases_run_in_order_and_stop_at_high() {
    // Budget 1000 MiB: low = 50, high = 100 free. Resident 980 -> free 20 (below min 20? no:
    // 20 is not < 20, so low, not urgent). Need 80 MiB.
    // Only 30 MiB from the balloon (asynchronous, credited), 30 from drop clean, plenty from
    // swap: the run must stop inside swap out and never reach split.
    let (vm, e) = one_vm(
        980 * MIB,
        100 * MIB,
        [
            Some(0),
            Some(30 * MIB),
            Some(30 * MIB),
            Some(500 * MIB),
            Some(500 * MIB),
        ],
    );
    let r = e.step().expect("step");
    assert_eq!(r.trigger, Some(Trigger::Watermark));
    assert!(!r.urgent);
    assert_eq!(r.need_bytes, 80 * MIB);
    assert_eq!(vm.calls(), THROUGH_SWAP_OUT);
    assert_eq!(r.phase_order(), THROUGH_SWAP_OUT);
    assert!(r.satisfied, "{r:?}");
    // Swap took only what was still needed: 80 - 30 (balloon credit) - 30.
    assert_eq!(r.phases[3].1.reclaimed, 20 * MIB);
    assert_eq!(vm.resident(), 930 * MIB);
    let s = e.snapshot();
    assert_eq!(s.runs, 1);
    assert_eq!(s.satisfied_runs, 1);
    assert_eq!(s.trigger(Trigger::Watermark), 1);
    assert_eq!(s.phase(Phase::Balloon).requested_bytes, 30 * MIB);
    assert_eq!(s.phase(Phase::SwapOut).reclaimed_bytes, 20 * MIB);
    assert_eq!(s.phase(Phase::SplitHuge).calls, 0);
    assert_eq!(s.events.len(), 3, "balloon, drop clean, swap out");
    // The balloon lands at the next sample: free = 1000 - 900 = 100 = high, no more run.
    let r = e.step().expect("step");
    assert_eq!(r.trigger, None, "{r:?}");
    assert_eq!(vm.resident(), 900 * MIB);
}

#[test]
fn busy_vms_are_skipped_unless_urgent() {
    // Idle VM: 400 resident, 0 working set. Busy VM: 560 resident, all of it working set.
    let idle = FakeVm::new(
        "idle",
        400 * MIB,
        0,
        [Some(0), None, Some(10 * MIB), None, None],
    );
    let busy = FakeVm::new(
        "busy",
        560 * MIB,
        560 * MIB,
        [Some(0), None, Some(500 * MIB), None, None],
    );
    let e = rig(&[&idle, &busy]);
    // free = 40: low, not urgent.
    let r = e.step().expect("step");
    assert!(!r.urgent);
    assert!(!r.satisfied);
    assert_eq!(busy.calls(), vec![Phase::Reported], "busy VM left alone");
    assert_eq!(idle.resident(), 390 * MIB);
    // Push below min: resident 990 -> free 10 < 20.
    lock(&busy.state).resident = 600 * MIB;
    lock(&busy.state).working_set = 600 * MIB;
    let r = e.step().expect("step");
    assert!(r.urgent, "{r:?}");
    assert!(
        busy.calls().contains(&Phase::DropClean),
        "urgent ignores idleness"
    );
    assert!(r.satisfied);
    assert_eq!(e.snapshot().urgent_runs, 1);
}

#[test]
fn urgent_does_not_count_on_the_balloon() {
    // free = 10 (< min 20): need 90. The balloon could give it all, but only later.
    let (_vm, e) = one_vm(
        990 * MIB,
        0,
        [Some(0), Some(500 * MIB), Some(0), Some(500 * MIB), None],
    );
    let r = e.step().expect("step");
    assert!(r.urgent);
    assert_eq!(r.phase_order(), THROUGH_SWAP_OUT);
    assert_eq!(
        r.phases[3].1.reclaimed,
        90 * MIB,
        "swap covers the whole need now"
    );
    assert!(r.satisfied);
}

#[test]
fn idlest_vm_goes_first() {
    let a = FakeVm::new(
        "a",
        480 * MIB,
        400 * MIB,
        [Some(0), None, Some(1 << 30), None, None],
    );
    let b = FakeVm::new(
        "b",
        480 * MIB,
        100 * MIB,
        [Some(0), None, Some(1 << 30), None, None],
    );
    let e = rig(&[&a, &b]);
    // free 40, need 60: b (380 idle) alone covers it.
    let r = e.step().expect("step");
    assert!(r.satisfied);
    assert_eq!(b.resident(), 420 * MIB);
    assert_eq!(a.resident(), 480 * MIB);
    assert_eq!(a.calls(), vec![Phase::Reported]);
}

#[test]
fn psi_and_alloc_failure_trigger_without_watermarks() {
    let psi = SyntheticPressure::new();
    let e = engine(10_000 * MIB, psi.clone());
    let vm = FakeVm::new(
        "a",
        500 * MIB,
        0,
        [Some(0), None, None, Some(1 << 30), None],
    );
    e.add_target(vm.clone());
    assert_eq!(e.step().expect("step").trigger, None);
    psi.set_some_avg10(50.0);
    let r = e.step().expect("step");
    assert_eq!(r.trigger, Some(Trigger::Psi));
    assert_eq!(r.need_bytes, 64 * MIB);
    assert_eq!(r.reclaimed_bytes(), 64 * MIB);
    assert!(r.satisfied);
    psi.set_some_avg10(0.0);
    e.notify_alloc_failure();
    let r = e.step().expect("step");
    assert_eq!(r.trigger, Some(Trigger::AllocFailure));
    assert_eq!(
        e.step().expect("step").trigger,
        None,
        "one failure, one run"
    );
    let s = e.snapshot();
    assert_eq!(s.trigger(Trigger::Psi), 1);
    assert_eq!(s.trigger(Trigger::AllocFailure), 1);
    assert_eq!(s.pressure.map(|p| p.some.avg10), Some(0.0));
}

#[test]
fn disabled_and_unsupported_phases_are_skipped() {
    let cfg = EngineConfig {
        phases: vec![Phase::SwapOut, Phase::Reported],
        ..EngineConfig::with_budget(1000 * MIB)
    };
    let e = engine_with(cfg);
    let vm = FakeVm::new(
        "a",
        960 * MIB,
        0,
        [Some(0), Some(1 << 30), Some(1 << 30), None, None],
    );
    e.add_target(vm.clone());
    let r = e.step().expect("step");
    assert_eq!(vm.calls(), vec![Phase::Reported, Phase::SwapOut]);
    assert!(!r.satisfied);
    assert_eq!(e.snapshot().phase(Phase::SwapOut).unsupported, 1);
    // No progress: the engine backs off for `backoff_steps` steps.
    for _ in 0..4 {
        assert!(e.step().expect("step").backed_off);
    }
    assert!(!e.step().expect("step").backed_off);
}

#[test]
fn gone_targets_are_dropped_and_removal_works() {
    #[derive(Debug)]
    struct Gone;
    impl ReclaimTarget for Gone {
        fn id(&self) -> &str {
            "gone"
        }
        fn resident_bytes(&self) -> Result<u64, TargetError> {
            Err(TargetError::Gone)
        }
        fn sample(&self, _: u32) -> Result<Idleness, TargetError> {
            Err(TargetError::Gone)
        }
    }
    let e = engine(1000 * MIB, SyntheticPressure::new());
    e.add_target(Arc::new(Gone));
    e.add_target(FakeVm::new("a", 0, 0, [None; 5]));
    e.step().expect("step");
    assert_eq!(e.target_ids(), vec!["a".to_string()]);
    assert!(e.remove_target("a"));
    assert!(!e.remove_target("a"));
}

#[test]
fn node_watermarks_from_the_pool() {
    // 8 blocks of 2 MiB; watermarks 25% / 50% / 75%.
    let pool = Arc::new(BlockPool::new(8 * POOL_BLOCK_BYTES));
    let cfg = EngineConfig {
        watermarks: WatermarkFractions {
            min: 0.25,
            low: 0.5,
            high: 0.75,
        },
        ..Default::default()
    };
    let e = engine_with(cfg).with_pool(pool.clone());
    let alloc = || {
        pool.alloc_block(MigrateType::Movable, &NumaPolicy::Local, NodeId(0))
            .expect("alloc")
            .0
    };
    let mut held: Vec<_> = (0..5).map(|_| alloc()).collect();
    // 3 of 8 free (37.5%): below low, above min.
    let r = e.step().expect("step");
    assert_eq!(r.trigger, Some(Trigger::Watermark));
    assert_eq!(r.domains_before[0].reading.domain, Domain::Node(NodeId(0)));
    assert!(!r.urgent);
    held.push(alloc());
    // 2 of 8 free (25%) is not below min; one more is.
    held.push(alloc());
    assert!(e.step().expect("step").urgent);
    for f in held.drain(..3) {
        pool.free_block(f).expect("free");
    }
    // 4 of 8 free: between low and high, still reclaiming (hysteresis).
    let r = e.step().expect("step");
    assert_eq!(r.trigger, Some(Trigger::Watermark));
    for f in held.drain(..) {
        pool.free_block(f).expect("free");
    }
    assert_eq!(e.step().expect("step").trigger, None);
}

#[test]
fn driver_thread_steps_and_wakes_on_alloc_failure() {
    let cfg = EngineConfig {
        interval: Duration::from_secs(3600),
        ..EngineConfig::with_budget(1000 * MIB)
    };
    let e = Arc::new(engine_with(cfg));
    let h = e.spawn().expect("spawn");
    // The first step runs at once; a notify wakes the thread long before the hour is over.
    let t0 = Instant::now();
    while e.snapshot().steps < 1 && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    e.notify_alloc_failure();
    while e.snapshot().trigger(Trigger::AllocFailure) < 1 && t0.elapsed() < Duration::from_secs(10)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(e.snapshot().trigger(Trigger::AllocFailure), 1);
    h.stop();
    let steps = e.snapshot().steps;
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(e.snapshot().steps, steps, "stopped");
}

#[test]
fn balloon_is_given_back_when_pressure_is_gone() {
    let (vm, e) = one_vm(980 * MIB, 0, [Some(0), Some(200 * MIB), None, None, None]);
    // Need 80: the balloon takes 80 (credited), lands at the next sample.
    let r = e.step().expect("step");
    assert!(r.satisfied);
    assert_eq!(e.step().expect("step").trigger, None);
    assert_eq!(vm.resident(), 900 * MIB);
    // free 100 = high: no surplus (high + (high - low) = 150), nothing given back.
    assert_eq!(e.step().expect("step").released_bytes, 0);
    // The guest frees 200 MiB itself: free 300, surplus 150, but only 80 was the engine's.
    lock(&vm.state).resident = 700 * MIB;
    let r = e.step().expect("step");
    assert_eq!(r.released_bytes, 80 * MIB);
    assert_eq!(e.snapshot().released_bytes, 80 * MIB);
    assert_eq!(e.step().expect("step").released_bytes, 0);
    // With release off nothing is given back.
    let cfg = EngineConfig {
        release: false,
        ..EngineConfig::with_budget(1000 * MIB)
    };
    let e2 = engine_with(cfg);
    let vm2 = FakeVm::new("b", 100 * MIB, 0, [None; 5]);
    lock(&vm2.state).ballooned = 50 * MIB;
    e2.add_target(vm2);
    assert_eq!(e2.step().expect("step").released_bytes, 0);
}
