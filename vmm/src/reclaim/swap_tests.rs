//! The engine against the VMM swap: [`VmSwap`] is the [`crate::reclaim::SwapHook`] of a real
//! window (phases 3 and 4).

use std::ops::Range;
use std::sync::Arc;

use crate::memory::{GuestWindow, Layout, LayoutConfig, MIB};
use crate::reclaim::{
    EngineConfig, Phase, ReclaimEngine, ReclaimTarget, SyntheticPressure, WatermarkFractions,
    WindowTarget,
};
use crate::swap::{SwapFile, SwapFileConfig, VmSwap};

fn word(gpa: u64) -> u64 {
    gpa.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1
}

fn fill(w: &GuestWindow, range: Range<u64>) {
    for gpa in range.step_by(512) {
        let p = w.host_addr(gpa).expect("inside") as *mut u64;
        // SAFETY: placed boot RAM of a live window; accessed only through raw pointers.
        unsafe { p.write_volatile(word(gpa)) };
    }
}

fn mismatches(w: &GuestWindow, range: Range<u64>) -> u64 {
    range
        .step_by(512)
        .filter(|&gpa| {
            let p = w.host_addr(gpa).expect("inside") as *const u64;
            // SAFETY: as in `fill`; a swapped-out page faults back in through the
            // swap's userfaultfd handler.
            unsafe { p.read_volatile() != word(gpa) }
        })
        .count() as u64
}

/// The engine swaps a real window out to the high watermark, the data reads back intact
/// through userfaultfd, and the next run drops the now-clean pages without I/O.
#[test]
fn engine_swaps_out_then_drops_clean() {
    let layout = Layout::new(LayoutConfig {
        boot_ram: 64 * MIB,
        hotplug_size: 0,
    })
    .expect("layout");
    let w = Arc::new(GuestWindow::new(layout).expect("window"));
    let path = std::env::temp_dir().join(format!("tidepool-reclaim-swap-{}", std::process::id()));
    let file = match SwapFile::create(SwapFileConfig::new(&path, 128 * MIB)) {
        Ok(f) => Arc::new(f),
        Err(e) => {
            eprintln!("skip: no swap file here: {e}");
            return;
        }
    };
    let swap = match VmSwap::new(Arc::clone(&w), file) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("skip: userfaultfd unavailable here: {e}");
            return;
        }
    };
    fill(&w, 0..32 * MIB);
    let target = Arc::new(
        WindowTarget::new("vm", &w)
            .with_swap(Arc::clone(&swap) as Arc<dyn crate::reclaim::SwapHook>)
            .assume_quiesced(),
    );
    // B = 40 MiB, high 60% free: resident must fall to 16 MiB.
    let cfg = EngineConfig {
        budget_bytes: Some(40 * MIB),
        watermarks: WatermarkFractions {
            min: 0.0,
            low: 0.5,
            high: 0.6,
        },
        phases: vec![Phase::DropClean, Phase::SwapOut],
        working_set_intervals: 1,
        backoff_steps: 0,
        ..Default::default()
    };
    let engine = ReclaimEngine::new(cfg, SyntheticPressure::new()).expect("engine");
    engine.add_target(target.clone());
    assert_eq!(engine.step().expect("step").reclaimed_bytes(), 0, "hot");
    let r = engine.step().expect("step");
    assert!(r.satisfied, "{r:?}");
    assert_eq!(r.phases.last().map(|p| p.0), Some(Phase::SwapOut));
    assert!(target.resident_bytes().expect("resident") <= 16 * MIB);
    let written = swap.counters().written_pages;
    assert!(written * 4096 >= 16 * MIB);
    // Every word reads back (the swapped pages fault in, clean).
    assert_eq!(mismatches(&w, 0..32 * MIB), 0);
    assert_eq!(target.resident_bytes().expect("resident"), 32 * MIB);
    // Keep stepping and reading everything back: pages that came back from swap are
    // clean, and once cold the engine drops them without writing them again.
    for _ in 0..6 {
        engine.step().expect("step");
        assert_eq!(mismatches(&w, 0..32 * MIB), 0);
    }
    let s = engine.snapshot();
    let c = swap.counters();
    assert!(s.phase(Phase::DropClean).reclaimed_bytes > 0, "{s:?}");
    assert!(c.dropped_clean_pages > 0, "{c:?}");
    assert_eq!(
        s.phase(Phase::DropClean).reclaimed_bytes + s.phase(Phase::SwapOut).reclaimed_bytes,
        (c.swapped_out_pages + c.dropped_clean_pages) * 4096,
        "the engine's figures are the swap's"
    );
    swap.shutdown();
}
