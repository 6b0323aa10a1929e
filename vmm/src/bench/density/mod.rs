//! `tidepool bench density`: how many 2 GiB (nominal) tiny-guest VMs the host holds within a
//! budget B of resident memory, with reclaim and without, in the same invocation.
//!
//! - **Guests** ([`guest`]): each VM runs the density loop at CPL3 (native speed here): every
//!   phase touches the next 256 MiB window of its RAM with a pattern that depends on the VM
//!   and the phase, reads the previous window back against its pattern (mismatching pages
//!   are the run's `data_errors`), and reports that window free on the real
//!   virtio-balloon reporting queue. Phases repeat until the host stops the guest; a phase
//!   lasts at least the pace, 500 ms (the guest idles in its last exit).
//! - **Reclaim on**: reported windows are discarded (`MADV_DONTNEED` through the balloon's
//!   mmap backend). **Reclaim off**: reports complete but nothing is discarded.
//! - **Ramp** ([`ramp`]): VMs are added one at a time until a step does not hold: resident
//!   memory (this process's RSS, sampled every 20 ms) went over B, or a phase stalled over
//!   1 s. Reclaim on judges a step after the new VM ran 2 phases and every other VM 1 more;
//!   reclaim off after the new VM went once round its RAM (its resident size has peaked).
//! - **Stall** of a phase: (wall time of its touch - the vCPU thread's runqueue wait during
//!   it) - the same on an idle host, plus the same for its verify; never negative. The idle
//!   figures are the fastest of a calibration VM run alone first. Runqueue wait comes from
//!   `/proc/thread-self/schedstat`, read on the vCPU thread at each phase report, so time
//!   lost to many vCPU threads sharing the cores does not count.
//!
//! Output: the figures, and `density.json` (figures, series, reasons) plus `density.png`
//! (resident memory and VM count over time) in the output directory.

pub mod engine;
pub mod guest;
pub mod plot;
pub mod ramp;

use std::path::{Path, PathBuf};
use std::time::Duration;

use engine::{EngineFigures, EngineRig};
use guest::{DensityVm, GuestSpec, Reporting};
use ramp::{percentile, Baseline, RampConfig, RampEnd, RampResult, Sample, Sampler};

use super::{progress, BenchError, BenchOptions, Report};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

/// One density run's parameters.
#[derive(Clone, Debug)]
pub struct DensityConfig {
    /// Resident budget B, bytes.
    pub budget: u64,
    /// Nominal RAM of each VM, bytes.
    pub vm_ram: u64,
    /// Bytes each phase touches.
    pub window: u64,
    /// Phases of the calibration VM.
    pub calibration_phases: u32,
    /// Cap on VMs per ramp.
    pub max_vms: usize,
    /// Time each ramp may take.
    pub ramp_time: Duration,
    /// Time the whole run may take: the reclaim ramp gets what is left of it (less the time
    /// to stop its VMs), so `--quick` stays under a minute.
    pub total_time: Duration,
    /// Time one step may take.
    pub step_timeout: Duration,
    /// A phase stalling longer than this ends the ramp.
    pub stall_limit: Duration,
    /// Minimum length of a phase: a VM touches a window at most this often (the workload's
    /// rate), idling for the rest.
    pub pace: Duration,
    /// Reclaim on also runs the reclaim engine with the budget (and the VMM swap behind it);
    /// false: free page reporting only.
    pub engine: bool,
    /// Directory of the engine's swap file (removed after the run).
    pub swap_dir: PathBuf,
}

impl DensityConfig {
    /// The full run: B = 16 GiB.
    pub fn full() -> DensityConfig {
        DensityConfig {
            budget: 16 * GIB,
            vm_ram: 2 * GIB,
            window: 256 * MIB,
            calibration_phases: 8,
            max_vms: 128,
            ramp_time: Duration::from_secs(900),
            total_time: Duration::from_secs(3600),
            step_timeout: Duration::from_secs(120),
            stall_limit: Duration::from_secs(1),
            pace: Duration::from_millis(500),
            engine: true,
            swap_dir: PathBuf::from("target/bench/density"),
        }
    }

    /// `--quick`: B = 4 GiB, within 60 s.
    pub fn quick() -> DensityConfig {
        DensityConfig {
            budget: 4 * GIB,
            calibration_phases: 4,
            max_vms: 32,
            ramp_time: Duration::from_secs(40),
            total_time: Duration::from_secs(54),
            step_timeout: Duration::from_secs(20),
            ..DensityConfig::full()
        }
    }

    /// Phases a VM needs to go once round the ring of its RAM.
    pub fn fill_phases(&self) -> u64 {
        let ring = self
            .vm_ram
            .saturating_sub(crate::tiny_guest::fpr_driver::PHASES_BASE);
        ring.div_ceil(self.window.max(1))
    }
}

/// Everything one density run measured.
#[derive(Clone, Debug)]
pub struct DensityRun {
    /// The parameters.
    pub config: DensityConfig,
    /// Idle-host touch and verify times.
    pub baseline: Baseline,
    /// Minimum phase length the VMs ran with.
    pub pace: Duration,
    /// The ramp with reclaim.
    pub reclaim: RampResult,
    /// What the engine did in it (None: free page reporting only).
    pub engine: Option<EngineFigures>,
    /// Its samples.
    pub reclaim_samples: Vec<Sample>,
    /// The ramp without reclaim.
    pub no_reclaim: RampResult,
    /// Its samples.
    pub no_reclaim_samples: Vec<Sample>,
}

/// Run one VM alone for `cfg.calibration_phases` phases: the idle-host baseline.
fn calibrate(cfg: &DensityConfig) -> Result<Baseline, String> {
    let spec = GuestSpec {
        ram: cfg.vm_ram,
        window: cfg.window,
        pace: Duration::ZERO,
        max_phases: cfg.calibration_phases,
        reporting: Reporting::Discard,
    };
    let vm = DensityVm::start(0, &spec)?;
    let shared = std::sync::Arc::clone(vm.shared());
    let t0 = std::time::Instant::now();
    while shared.phases() < u64::from(cfg.calibration_phases) {
        vm.check_alive()?;
        if t0.elapsed() > cfg.step_timeout {
            return Err("calibration VM made no progress".into());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let totals = vm.stop(Duration::from_secs(30))?;
    if totals.mismatches != 0 {
        return Err(format!(
            "calibration VM found {} bad pages",
            totals.mismatches
        ));
    }
    let records = shared.records_from(0);
    let own: Vec<String> = records
        .iter()
        .map(|r| format!("{:.0}", r.touch.own().as_secs_f64() * 1e3))
        .collect();
    progress(&format!(
        "calibration touches (ms, runqueue wait left out): {}",
        own.join(" ")
    ));
    // The fastest touch is the idle host's: slower ones waited on the host (compaction when
    // free huge pages ran short, other work's faults), which is what a stall is.
    let fastest = |v: Vec<Duration>| v.into_iter().min().unwrap_or_default();
    Ok(Baseline {
        touch: fastest(records.iter().map(|r| r.touch.own()).collect()),
        verify: fastest(
            records
                .iter()
                .filter_map(|r| r.verify)
                .map(|v| v.own())
                .collect(),
        ),
    })
}

fn mem_available() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Calibrate, then ramp without reclaim, then with.
pub fn run_density(cfg: &DensityConfig) -> Result<DensityRun, String> {
    let t0 = std::time::Instant::now();
    crate::kvm::kvm_available()?;
    guest::schedstat_available()
        .map_err(|e| format!("the stall measure needs per-thread schedstat: {e}"))?;
    if let Some(avail) = mem_available() {
        if avail < cfg.budget + GIB {
            return Err(format!(
                "the host has {:.1} GiB available, too little for a budget of {:.1} GiB",
                avail as f64 / GIB as f64,
                cfg.budget as f64 / GIB as f64
            ));
        }
    }
    progress(&format!(
        "calibrating: one {} MiB VM alone, {} phases of {} MiB",
        cfg.vm_ram / MIB,
        cfg.calibration_phases,
        cfg.window / MIB
    ));
    let baseline = calibrate(cfg)?;
    let pace = cfg.pace;
    progress(&format!(
        "idle touch {:.1} ms, verify {:.1} ms (fastest); one phase every {:.0} ms or slower",
        baseline.touch.as_secs_f64() * 1e3,
        baseline.verify.as_secs_f64() * 1e3,
        pace.as_secs_f64() * 1e3
    ));
    let ramp_cfg = |reporting, newest_phases, others_phases, time_limit| RampConfig {
        budget: cfg.budget,
        spec: GuestSpec {
            ram: cfg.vm_ram,
            window: cfg.window,
            pace,
            max_phases: 0,
            reporting,
        },
        max_vms: cfg.max_vms,
        stall_limit: cfg.stall_limit,
        newest_phases,
        others_phases,
        step_timeout: cfg.step_timeout,
        time_limit,
        baseline,
    };
    let sampler = Sampler::start(Duration::from_millis(20));
    let no_reclaim = ramp::ramp(
        &ramp_cfg(Reporting::Ignore, cfg.fill_phases(), 0, cfg.ramp_time),
        &sampler,
        "reclaim off",
        None,
    )?;
    let no_reclaim_samples = sampler.finish();
    let left = cfg
        .total_time
        .saturating_sub(t0.elapsed() + Duration::from_secs(3));
    let rig = if cfg.engine {
        progress("reclaim on: free page reporting, the reclaim engine with budget B, swap");
        Some(EngineRig::start(cfg.budget, cfg.budget, &cfg.swap_dir)?)
    } else {
        progress("reclaim on: free page reporting only (no engine)");
        None
    };
    let sampler = Sampler::start(Duration::from_millis(20));
    let reclaim = ramp::ramp(
        &ramp_cfg(Reporting::Discard, 2, 1, cfg.ramp_time.min(left)),
        &sampler,
        "reclaim on",
        rig.as_ref(),
    );
    let reclaim_samples = sampler.finish();
    let engine = rig.map(EngineRig::finish);
    let reclaim = reclaim?;
    if let Some(e) = &engine {
        progress(&format!(
            "engine: {} runs ({} urgent); reclaimed by phase {:?}; swap wrote {:.2} GiB, read {:.2} GiB; {} failed calls, first {:?}",
            e.runs,
            e.urgent_runs,
            e.phase_bytes,
            e.swap_written_bytes as f64 / GIB as f64,
            e.swap_read_bytes as f64 / GIB as f64,
            e.failed_calls,
            e.first_failure
        ));
    }
    Ok(DensityRun {
        config: cfg.clone(),
        baseline,
        pace,
        reclaim,
        engine,
        reclaim_samples,
        no_reclaim,
        no_reclaim_samples,
    })
}

/// Mismatching pages a ramp found: the guests' own totals, which must agree with the sum of
/// the per-phase reports plus the final checks (a disagreement is an error in itself).
pub fn ramp_data_errors(r: &RampResult) -> Result<u64, String> {
    let totals: u64 = r.totals.iter().map(|t| t.mismatches).sum();
    let per_phase: u64 = r.records.iter().map(|p| p.mismatches).sum::<u64>() + r.tail_mismatches;
    if totals != per_phase {
        return Err(format!(
            "guest totals say {totals} bad pages, per-phase reports {per_phase}"
        ));
    }
    Ok(totals)
}

/// Check that a ramp's records agree with what its guests reported on stop: each VM's phase
/// count equals its phase records.
pub fn check_consistency(r: &RampResult) -> Result<(), String> {
    for (vm, t) in r.totals.iter().enumerate() {
        let n = r.records.iter().filter(|p| p.vm == vm).count() as u64;
        if n != t.phases {
            return Err(format!(
                "VM {vm}: guest ran {} phases, host timed {n}",
                t.phases
            ));
        }
    }
    Ok(())
}

fn end_reason(e: &RampEnd) -> String {
    match e {
        RampEnd::OverBudget { resident } => {
            format!(
                "resident {:.2} GiB over budget",
                *resident as f64 / GIB as f64
            )
        }
        RampEnd::Stall { vm, stall } => {
            format!("VM {vm} stalled {:.0} ms", stall.as_secs_f64() * 1e3)
        }
        RampEnd::StepTimeout => "a step made no progress in time".into(),
        RampEnd::TimeLimit => "ramp time ran out (held is a lower bound)".into(),
        RampEnd::MaxVms => "VM cap reached (held is a lower bound)".into(),
    }
}

/// The figures of a run.
pub fn figures(run: &DensityRun) -> Result<Report, String> {
    let cfg = &run.config;
    let mut r = Report::default();
    let held = run.reclaim.held as f64;
    let held_off = run.no_reclaim.held as f64;
    let gib = |b: u64| b as f64 / GIB as f64;
    r.add("vms_held", held, "VMs held within B with reclaim");
    r.add(
        "vms_held_no_reclaim",
        held_off,
        "VMs held within B, reports ignored",
    );
    r.add(
        "density_gain",
        if held_off > 0.0 {
            held / held_off
        } else {
            f64::NAN
        },
        "vms_held / vms_held_no_reclaim (target >= 5)",
    );
    r.add(
        "overcommit_ratio",
        held * cfg.vm_ram as f64 / cfg.budget as f64,
        "nominal memory of the VMs held / B",
    );
    let reported: u64 = run.reclaim.totals.iter().map(|t| t.reported_bytes).sum();
    let beyond = run
        .engine
        .as_ref()
        .map_or(0, EngineFigures::beyond_reporting);
    let reclaimed = reported + beyond;
    r.add(
        "reclaim_gib_s",
        gib(reclaimed) / run.reclaim.wall.as_secs_f64().max(1e-9),
        "GiB/s reclaimed (reports + engine) over the reclaim ramp, sustained",
    );
    let p99 = |v: &[Duration]| percentile(v, 99.0).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3);
    r.add(
        "p99_guest_stall_ms",
        p99(&run.reclaim.stalls),
        "ms, phases of held steps, reclaim on",
    );
    check_consistency(&run.reclaim)?;
    check_consistency(&run.no_reclaim)?;
    let errors = ramp_data_errors(&run.reclaim)? + ramp_data_errors(&run.no_reclaim)?;
    r.add(
        "data_errors",
        errors as f64,
        "pages read back wrong (must be 0)",
    );
    let blocked: Vec<Duration> = run
        .reclaim
        .records
        .iter()
        .map(|p| {
            let off = |s: guest::Span| s.wall.saturating_sub(s.runq + s.run);
            off(p.touch) + p.verify.map(off).unwrap_or_default()
        })
        .collect();
    r.add(
        "p99_guest_blocked_ms",
        p99(&blocked),
        "ms a phase's touch+verify slept off-CPU (uffd, I/O, locks), reclaim on",
    );
    r.add(
        "p99_guest_stall_no_reclaim_ms",
        p99(&run.no_reclaim.stalls),
        "ms, phases of held steps, reclaim off",
    );
    if run.no_reclaim.held > 0 {
        r.add(
            "vm_resident_no_reclaim_gib",
            gib(run.no_reclaim.max_resident_held) / held_off,
            "resident per VM without reclaim (process overhead shared in)",
        );
    }
    r.add("budget_gib", gib(cfg.budget), "B");
    r.add("vm_nominal_gib", gib(cfg.vm_ram), "each VM");
    r.add(
        "max_resident_gib",
        gib(run.reclaim.max_resident_held),
        "highest sample in held steps, reclaim on",
    );
    r.add(
        "max_resident_no_reclaim_gib",
        gib(run.no_reclaim.max_resident_held),
        "highest sample in held steps, reclaim off",
    );
    r.add(
        "idle_touch_ms",
        run.baseline.touch.as_secs_f64() * 1e3,
        "ms per window on an idle host (stall baseline)",
    );
    let phases: u64 = run
        .reclaim
        .totals
        .iter()
        .chain(&run.no_reclaim.totals)
        .map(|t| t.phases)
        .sum();
    r.add("phases", phases as f64, "phases run, both ramps");
    let capped =
        |e: &RampEnd| f64::from(u8::from(matches!(e, RampEnd::TimeLimit | RampEnd::MaxVms)));
    r.add(
        "ramp_capped",
        capped(&run.reclaim.end).max(capped(&run.no_reclaim.end)),
        "1 when a ramp ran out of time or VMs: its held count is a lower bound",
    );
    r.add(
        "reclaim_engine",
        f64::from(u8::from(run.engine.is_some())),
        "1 when the reclaim engine ran (0: free page reporting only)",
    );
    if let Some(e) = &run.engine {
        r.add(
            "engine_reclaimed_gib",
            gib(beyond),
            "GiB the engine's phases 2-5 reclaimed (beyond reports)",
        );
        r.add(
            "engine_runs",
            e.runs as f64,
            "engine runs (urgent ones too)",
        );
        r.add(
            "engine_urgent_runs",
            e.urgent_runs as f64,
            "runs below the min watermark",
        );
        r.add(
            "swap_out_gib",
            gib(e.swap_written_bytes),
            "GiB written to the swap file",
        );
        r.add(
            "swap_in_gib",
            gib(e.swap_read_bytes),
            "GiB read back (swap-ins)",
        );
    }
    Ok(r)
}

fn records_json(r: &RampResult, b: &Baseline) -> serde_json::Value {
    let ms = |d: Duration| (d.as_secs_f64() * 1e6).round() / 1e3;
    serde_json::Value::Array(
        r.records
            .iter()
            .map(|p| {
                let v = p.verify.unwrap_or_default();
                serde_json::json!([
                    p.vm,
                    p.phase,
                    ms(p.touch.wall),
                    ms(p.touch.runq),
                    ms(p.touch.run),
                    ms(v.wall),
                    ms(v.runq),
                    ms(p.report),
                    ms(b.stall(p)),
                    p.mismatches
                ])
            })
            .collect(),
    )
}

fn samples_json(s: &[Sample]) -> serde_json::Value {
    serde_json::Value::Array(
        s.iter()
            .map(|s| serde_json::json!([s.t, s.resident, s.vms]))
            .collect(),
    )
}

/// Write `density.json` and `density.png` into `dir`.
pub fn write_outputs(dir: &Path, run: &DensityRun, report: &Report) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let figures: serde_json::Value =
        serde_json::from_str(&report.to_json()).map_err(|e| e.to_string())?;
    let doc = serde_json::json!({
        "figures": figures,
        "reclaim_end": end_reason(&run.reclaim.end),
        "no_reclaim_end": end_reason(&run.no_reclaim.end),
        "pace_ms": run.pace.as_secs_f64() * 1e3,
        "window_mib": run.config.window / MIB,
        "samples_columns": ["t_s", "resident_bytes", "vms"],
        "reclaim_samples": samples_json(&run.reclaim_samples),
        "no_reclaim_samples": samples_json(&run.no_reclaim_samples),
        "records_columns": [
            "vm", "phase", "touch_wall_ms", "touch_runq_ms", "touch_run_ms", "verify_wall_ms",
            "verify_runq_ms", "report_ms", "stall_ms", "mismatches"
        ],
        "reclaim_records": records_json(&run.reclaim, &run.baseline),
        "no_reclaim_records": records_json(&run.no_reclaim, &run.baseline),
    });
    let json = dir.join("density.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&doc).map_err(|e| e.to_string())?,
    )
    .map_err(|e| format!("{}: {e}", json.display()))?;
    let png = dir.join("density.png");
    let b = run.config.budget as f64 / GIB as f64;
    plot::draw(
        &png,
        &[
            plot::Panel {
                title: format!(
                    "reclaim on: {} VMs held in B = {b:.0} GiB ({})",
                    run.reclaim.held,
                    end_reason(&run.reclaim.end)
                ),
                samples: &run.reclaim_samples,
            },
            plot::Panel {
                title: format!(
                    "reclaim off: {} VMs held in B = {b:.0} GiB ({})",
                    run.no_reclaim.held,
                    end_reason(&run.no_reclaim.end)
                ),
                samples: &run.no_reclaim_samples,
            },
        ],
        run.config.budget,
    )?;
    Ok(png)
}

/// Run the suite.
pub fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    let failed = |reason: String| BenchError::Failed {
        suite: "density",
        reason,
    };
    let dir = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("target/bench/density"));
    let cfg = DensityConfig {
        swap_dir: dir.clone(),
        ..if opts.quick {
            DensityConfig::quick()
        } else {
            DensityConfig::full()
        }
    };
    let run = run_density(&cfg).map_err(failed)?;
    progress(&format!(
        "reclaim on: {}; reclaim off: {}",
        end_reason(&run.reclaim.end),
        end_reason(&run.no_reclaim.end)
    ));
    let report = figures(&run).map_err(failed)?;
    match write_outputs(&dir, &run, &report) {
        Ok(png) => progress(&format!("wrote {} and density.json", png.display())),
        Err(e) => return Err(failed(e)),
    }
    Ok(report)
}
