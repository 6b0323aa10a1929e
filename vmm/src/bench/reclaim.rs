//! `tidepool bench reclaim`: free page reporting through the balloon device against a raw
//! `madvise(MADV_DONTNEED)` discard of the same memory, measured in the same run.
//!
//! The reporting path is the real one: descriptor chains of up to 32 blocks on the reporting
//! queue over real guest memory, validation, the discard through the balloon's mmap backend and
//! the per-VM accounting. The frames stay the VM's; only their host memory goes back.

use super::{progress, BenchError, BenchOptions, Report};
use tidepool_balloon::bench::{ReclaimBench, ReclaimBenchConfig};

fn failed(e: impl ToString) -> BenchError {
    BenchError::Failed {
        suite: "reclaim",
        reason: e.to_string(),
    }
}

/// Run the suite.
pub fn run(opts: &BenchOptions) -> Result<Report, BenchError> {
    let data: u64 = if opts.quick { 512 << 20 } else { 2 << 30 };
    let rounds = if opts.quick { 3 } else { 7 };
    let mut r = Report::default();

    progress(&format!(
        "2 MiB reports over {} MiB, {rounds} rounds",
        data >> 20
    ));
    let big = ReclaimBench::compare(ReclaimBenchConfig {
        data_bytes: data,
        rounds,
        ..ReclaimBenchConfig::default()
    })
    .map_err(failed)?;
    let fpr = big.reporting.gib_per_s();
    let raw = big.raw.gib_per_s();
    r.add(
        "fpr_reclaim_gib_s",
        fpr,
        "GiB/s, 2 MiB reports to discarded and accounted",
    );
    r.add(
        "raw_discard_gib_s",
        raw,
        "GiB/s, plain madvise(DONTNEED) of the same blocks",
    );
    r.add("fpr_efficiency", fpr / raw, "fpr / raw (target >= 0.8)");
    r.add(
        "fpr_device_overhead_us_per_gib",
        big.reporting.overhead_us_per_gib(),
        "us/GiB spent outside madvise on the reporting path",
    );
    r.add(
        "host_thp_backed",
        f64::from(u8::from(big.host_huge_aligned)),
        "1 when guest RAM was backed by 2 MiB host pages",
    );

    let small: u64 = if opts.quick { 32 << 20 } else { 128 << 20 };
    progress(&format!("4 KiB reports over {} MiB", small >> 20));
    let four_k = ReclaimBench::compare(ReclaimBenchConfig {
        data_bytes: small,
        block_bytes: 4096,
        rounds,
        ..ReclaimBenchConfig::default()
    })
    .map_err(failed)?;
    r.add(
        "fpr_4k_reclaim_gib_s",
        four_k.reporting.gib_per_s(),
        "GiB/s with 4 KiB reports",
    );
    r.add(
        "raw_4k_discard_gib_s",
        four_k.raw.gib_per_s(),
        "GiB/s, raw madvise of the same 4 KiB blocks",
    );
    Ok(r)
}
